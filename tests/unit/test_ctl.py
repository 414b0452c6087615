"""qgactl's parts: finding the agent's arguments, config provenance, state, trust files."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from qga import ctl
from qga.config import Config, dump
from qga.state import COUNTER_FILE, FROZEN_MARKER


# -- finding the agent's command line ------------------------------------------------


@pytest.mark.parametrize("cmdline, expected", [
    (["/usr/bin/python3", "/usr/bin/qga", "-t", "/var/lib/qga"], ["-t", "/var/lib/qga"]),
    (["python3", "-m", "qga", "-m", "unix-listen"], ["-m", "unix-listen"]),
    (["/usr/bin/python3", "-X", "dev", "-m", "qga"], []),
    (["/usr/local/bin/qga", "-v"], ["-v"]),
    (["python3", "-m", "pytest", "qga"], None),
    (["/usr/bin/python3", "/usr/bin/qgactl", "status"], None),
    (["/usr/sbin/qemu-ga", "-m", "unix-listen"], None),
    (["bash", "/home/me/qga", "-v"], None),
])
def test_agent_arguments(cmdline, expected):
    assert ctl.agent_arguments(cmdline) == expected


SYSTEMCTL_SHOW = """\
LoadState=loaded
ActiveState=active
SubState=running
MainPID=4321
StatusText=
ExecStart={ path=/usr/bin/qga ; argv[]=/usr/bin/qga --statedir=/var/lib/qga -b "guest-exec,guest-exec-status" ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }
Environment=QGA_CONF=/etc/qga/qga.conf "EXTRA=a b"
FragmentPath=/lib/systemd/system/qga.service
"""


def test_systemctl_show_parsing():
    unit = ctl.parse_systemctl_show(SYSTEMCTL_SHOW)
    assert unit["MainPID"] == "4321" and unit["StatusText"] == ""
    assert ctl.exec_start_argv(unit["ExecStart"]) == [
        "/usr/bin/qga", "--statedir=/var/lib/qga", "-b", "guest-exec,guest-exec-status"]
    assert ctl.unit_environment(unit["Environment"]) == {
        "QGA_CONF": "/etc/qga/qga.conf", "EXTRA": "a b"}
    assert ctl.exec_start_argv("") == []


def test_read_process_sees_our_own_argv_and_environment(monkeypatch):
    cmdline, environ = ctl.read_process(os.getpid())
    with open("/proc/self/cmdline", "rb") as stream:
        assert cmdline == [os.fsdecode(p) for p in stream.read().split(b"\0")[:-1]]
    assert environ.get("PATH") == os.environ.get("PATH")


def test_read_pidfile(tmp_path):
    path = tmp_path / "pid"
    path.write_text("1234\n")
    assert ctl.read_pidfile(str(path)) == 1234
    path.write_text("garbage")
    assert ctl.read_pidfile(str(path)) is None
    assert ctl.read_pidfile(str(tmp_path / "absent")) is None


# -- configuration provenance --------------------------------------------------------


@pytest.fixture
def conf_file(tmp_path):
    path = tmp_path / "qga.conf"
    path.write_text("[general]\nstatedir=/srv/state\nblock-rpcs=guest-exec\nverbose=true\n"
                    "[qga]\nexec-allow-programs=/bin/true\n")
    return str(path)


def test_sources_of_every_setting(conf_file):
    sourced = ctl.sourced_config(
        ["-m", "unix-listen", "-p", "/run/x.sock", "-b", "guest-ping", "-v"],
        {"QGA_CONF": conf_file})
    config, sources = sourced.config, sourced.sources
    assert sourced.file_path == conf_file and sourced.file_error is None
    assert config.statedir == "/srv/state" and sources["statedir"] == conf_file
    assert config.method == "unix-listen" and sources["method"] == "command line"
    assert sources["path"] == "command line"
    # Lists accumulate: both sources count.
    assert config.block_rpcs == ["guest-exec", "guest-ping"]
    assert sources["block_rpcs"] == f"{conf_file} + command line"
    # A scalar given in both places comes from the command line.
    assert sources["verbose"] == "command line"
    assert sources["exec_allow_programs"] == conf_file
    assert sources["pidfile"] == "default" and sources["daemonize"] == "default"


def test_dash_c_names_the_file_and_the_default_path_is_a_default(conf_file):
    sourced = ctl.sourced_config(["-c", conf_file], {})
    assert sourced.file_path == conf_file
    assert sourced.config.path == "/dev/virtio-ports/org.qemu.guest_agent.0"
    assert sourced.sources["path"] == "default"


def test_a_broken_file_is_reported_not_fatal(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("[general]\nverbose=maybe\n")
    sourced = ctl.sourced_config(["-t", "/x"], {"QGA_CONF": str(bad)})
    assert "verbose" in sourced.file_error
    assert sourced.config.statedir == "/x"


def test_options_qga_would_refuse_are_skipped(capsys):
    sourced = ctl.sourced_config(["--file-allow-dirs=relative", "--bogus", "-t", "/y"],
                                 {"QGA_CONF": "/nonexistent"})
    assert sourced.config.file_allow_dirs == [] and sourced.config.statedir == "/y"
    assert capsys.readouterr().err == ""


def test_annotated_dump_is_qga_dash_d_plus_comments(conf_file):
    sourced = ctl.sourced_config(["-t", "/var/lib/qga"], {"QGA_CONF": conf_file})
    text = ctl.annotated_dump(sourced)
    without_comments = "".join(line + "\n" for line in text.split("\n")[:-1]
                               if not line.startswith("#"))
    assert without_comments.encode() == dump(sourced.config)
    lines = text.split("\n")
    assert lines[lines.index("statedir=/var/lib/qga") - 1] == "# command line"
    assert lines[lines.index("exec-allow-programs=/bin/true") - 1] == f"# {conf_file}"
    assert lines[lines.index("daemon=false") - 1] == "# default"


def test_annotated_dump_reads_back_as_the_same_configuration(conf_file, tmp_path):
    from qga.config import load_file

    sourced = ctl.sourced_config(["-t", "/var/lib/qga", "-a", "guest-ping"],
                                 {"QGA_CONF": conf_file})
    copy = tmp_path / "copy.conf"
    copy.write_text(ctl.annotated_dump(sourced))
    reread = Config()
    load_file(reread, str(copy), required=True)
    assert dump(reread) == dump(sourced.config)


# -- state -----------------------------------------------------------------------------


def test_state_summary(tmp_path):
    summary = ctl.state_summary(str(tmp_path))
    assert summary["frozen"] is False and summary["next_handle"] is None
    (tmp_path / COUNTER_FILE).write_text("[global]\nfd_counter=1234\n")
    (tmp_path / FROZEN_MARKER).write_text("")
    summary = ctl.state_summary(str(tmp_path))
    assert summary["frozen"] is True and summary["next_handle"] == 1234
    assert abs(summary["frozen_since"] - time.time()) < 60
    (tmp_path / COUNTER_FILE).write_text("not a key file\n")
    assert "counter_error" in ctl.state_summary(str(tmp_path))


def test_boot_time_is_in_the_past():
    booted = ctl.boot_time()
    assert 0 < booted < time.time()


def test_a_marker_from_before_the_boot_is_removed(tmp_path):
    marker = tmp_path / FROZEN_MARKER
    marker.write_text("")
    booted = ctl.boot_time()
    os.utime(marker, (booted - 3600, booted - 3600))
    assert ctl.clear_stale_freeze(str(tmp_path)) == str(marker)
    assert not marker.exists()
    assert ctl.clear_stale_freeze(str(tmp_path)) is None


def test_a_marker_from_this_boot_stays(tmp_path):
    marker = tmp_path / FROZEN_MARKER
    marker.write_text("")
    assert ctl.clear_stale_freeze(str(tmp_path)) is None
    assert marker.exists()


def test_clear_stale_freeze_command(tmp_path, capsys):
    marker = tmp_path / FROZEN_MARKER
    marker.write_text("")
    os.utime(marker, (1, 1))
    assert ctl.main(["clear-stale-freeze", "--statedir", str(tmp_path)]) == 0
    assert "removed" in capsys.readouterr().out and not marker.exists()
    assert ctl.main(["clear-stale-freeze", "--statedir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""


# -- trust files -----------------------------------------------------------------------


@pytest.fixture
def trust(tmp_path):
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "distro.pub").write_bytes(b"vendor key\n")
    return ctl.TrustStore(str(tmp_path / "admin"), str(vendor))


def trust_cli(store, *args):
    return ctl.main(["trust", "--admin-trust-dir", store.admin_dir,
                     "--vendor-trust-dir", store.vendor_dir, *args])


def test_trust_add_list_remove(trust, tmp_path, capsys):
    key = tmp_path / "ops.pub"
    key.write_bytes(b"admin key\n")
    os.chmod(key, 0o600)
    assert trust_cli(trust, "add", str(key)) == 0
    installed = os.path.join(trust.admin_dir, "ops.pub")
    assert open(installed, "rb").read() == b"admin key\n"
    assert stat.S_IMODE(os.stat(installed).st_mode) == 0o644
    assert sorted(os.listdir(trust.admin_dir)) == ["ops.pub"]  # no temporary left

    capsys.readouterr()
    assert trust_cli(trust, "list", "--json") == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["origin"], e["name"]) for e in entries] == [("admin", "ops.pub"),
                                                           ("vendor", "distro.pub")]
    import hashlib
    assert entries[0]["sha256"] == hashlib.sha256(b"admin key\n").hexdigest()
    assert entries[0]["problems"] == []

    assert trust_cli(trust, "remove", "ops.pub") == 0
    assert os.listdir(trust.admin_dir) == []


def test_trust_add_refuses_to_replace_without_asking(trust, tmp_path, capsys):
    key = tmp_path / "k.pub"
    key.write_bytes(b"one")
    assert trust_cli(trust, "add", str(key)) == 0
    key.write_bytes(b"two")
    assert trust_cli(trust, "add", str(key)) == 1
    assert "exists" in capsys.readouterr().err
    assert open(os.path.join(trust.admin_dir, "k.pub"), "rb").read() == b"one"
    assert trust_cli(trust, "add", str(key), "--replace") == 0
    assert open(os.path.join(trust.admin_dir, "k.pub"), "rb").read() == b"two"


@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b"])
def test_trust_names_are_plain_file_names(trust, tmp_path, name):
    key = tmp_path / "k.pub"
    key.write_bytes(b"key")
    assert trust_cli(trust, "add", str(key), "--name", name) == 1
    assert not os.path.exists(trust.admin_dir) or os.listdir(trust.admin_dir) == []


def test_trust_remove_of_a_vendor_key_says_whose_it_is(trust, capsys):
    assert trust_cli(trust, "remove", "distro.pub") == 1
    assert "vendor key" in capsys.readouterr().err
    assert os.path.exists(os.path.join(trust.vendor_dir, "distro.pub"))
    assert trust_cli(trust, "remove", "nothing.pub") == 1


def test_trust_list_warns_about_writable_keys(trust, capsys):
    path = os.path.join(trust.vendor_dir, "distro.pub")
    os.chmod(path, 0o666)
    assert trust_cli(trust, "list") == 0
    out = capsys.readouterr().out
    assert "distro.pub" in out and "WARNING: writable by group or others" in out


def test_ext_without_a_store_says_so(capsys):
    assert ctl.main(["ext", "verify"]) == 2
    assert "no extension store" in capsys.readouterr().err


def test_status_of_no_agent(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QGA_CONF", str(tmp_path / "none.conf"))
    status = ctl.main(["--pidfile", str(tmp_path / "no.pid"), "status", "--json"])
    report = json.loads(capsys.readouterr().out)
    if report["found_by"].startswith("systemd"):
        pytest.skip("a qga.service exists on this machine")
    assert status == 3 and report["running"] is False
    assert report["config_file"] == str(tmp_path / "none.conf")
    assert report["config_file_exists"] is False
