"""The oVirt extension's settings: the original's keys and defaults, its INI file, our keys."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extensions" / "ovirt_sso"))

from ovirt_agent import config  # noqa: E402


def test_the_originals_defaults():
    settings = config.Config({})
    assert settings.rates == {"heart_beat_rate": 5, "report_user_rate": 10,
                              "report_num_cpu_rate": 60, "report_application_rate": 120,
                              "report_disk_usage": 300}
    assert settings.applications[:3] == ("kernel", "ovirt-guest-agent",
                                         "ovirt-guest-agent-common")
    assert len(settings.applications) == 16 and "cloud-init" in settings.applications
    assert {"tmpfs", "cgroup2", "tracefs", "fuse.gvfsd-fuse", "proc"} <= settings.ignored_fs
    assert settings.ignored_nics == {"docker0"} and settings.ignore_zero_size_fs is True
    assert settings.privileged_actions == "core" and settings.tick_interval == 1.0


def test_settings_then_the_ini_file_win(tmp_path):
    ini = tmp_path / "ovirt-guest-agent.conf"
    ini.write_text("[general]\nheart_beat_rate = 7\napplications_list = kernel qemu-kvm\n"
                   "ignore_zero_size_fs = false\nunknown_key = 1\n"
                   "[virtio]\ndevice = /dev/virtio-ports/com.redhat.rhevm.vdsm\n")
    settings = config.load({"heart_beat_rate": 3, "report_user_rate": 2,
                            "ignored_nics": ["docker0", "virbr0 virbr1"],
                            "config_file": str(ini)})
    assert settings.rates["heart_beat_rate"] == 7 and settings.rates["report_user_rate"] == 2
    assert settings.applications == ("kernel", "qemu-kvm")
    assert settings.ignore_zero_size_fs is False
    assert settings.ignored_nics == {"docker0", "virbr0", "virbr1"}
    assert config.load({"config_file": str(tmp_path / "absent")}).rates["heart_beat_rate"] == 5
    assert config.load({"config_file": ""}).applications == config.Config({}).applications
    round_trip = config.as_settings(settings)
    assert config.Config(round_trip).applications == settings.applications


@pytest.mark.parametrize("settings,problem", [
    ({"heart_beat_rate": 0}, "heart_beat_rate"),
    ({"heart_beat_rate": "fast"}, "heart_beat_rate"),
    ({"heart_beat_rate": True}, "heart_beat_rate"),
    ({"ignored_fs": 5}, "ignored_fs"),
    ({"session_events": "maybe"}, "session_events"),
    ({"privileged_actions": "sudo"}, "privileged_actions"),
    ({"tick_interval": 0}, "tick_interval"),
    ({"hooks_dir": None}, "hooks_dir"),
    ({"heartbeat_rate": 5}, "unknown settings: heartbeat_rate"),
])
def test_bad_settings_are_refused(settings, problem):
    with pytest.raises(config.ConfigProblem, match=problem):
        config.Config(settings)


def test_a_broken_ini_file_is_refused():
    with pytest.raises(config.ConfigProblem):
        config.load({}, ini_text="[general\nx")
    assert config.load({}, ini_text="[other]\nheart_beat_rate = 1\n").rates[
        "heart_beat_rate"] == 5
