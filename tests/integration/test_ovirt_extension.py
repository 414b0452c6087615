"""The oVirt extension as a process, as the bundle ships it, behind a stand-in core.

The bundle's files are staged by ``extensions/ovirt_sso/build.py`` (with its
copy of the SDK) and run with only the core's environment, so nothing of this
source tree is on the extension's Python path.  A :class:`FakeCore` relays the
channel to a socket where a :class:`FakeVdsm` reads it as VDSM does.  The
reporting loop runs 20 times faster than the original (``tick_interval``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.fake_vdsm import ExtensionProcess, FakeCore, FakeVdsm, validate
from tests.support.ovirt_bundle import BURST_V3, STARTUP_V0

TICK = 0.05


class Guest:
    """A stand-in core, the extension process, and helpers to start and stop them."""

    def __init__(self, directory: Path, bundle_dir: str):
        self.directory = directory
        self.bundle_dir = bundle_dir
        self.core = FakeCore(str(directory))
        self.process = None
        self.vdsm = None
        self.settings = {"tick_interval": TICK, "config_file": "", "session_events": False,
                         "hooks_dir": str(directory / "hooks"), "log_level": "debug"}
        self.extra_environ = {}

    def start(self, **settings):
        environ = self.core.environ(dict(self.settings, **settings), bundle_dir=self.bundle_dir)
        environ.update(self.extra_environ)
        self.process = ExtensionProcess(self.bundle_dir, environ,
                                        str(self.directory / "extension.log"))
        self.core.wait_frame(lambda frame: frame.get("type") == "ready")

    def connect_vdsm(self, api_version=0):
        self.vdsm = FakeVdsm(self.core.host_path, api_version=api_version)
        return self.vdsm

    def negotiated(self, timeout=10.0):
        """Wait until VDSM sent api-version 3 and the v3 burst arrived."""
        self.vdsm.wait_for("os-info", timeout=timeout)
        assert self.vdsm.effective_api_version == 3

    def logs(self):
        return [frame["message"] for frame in self.core.of_type("log")]

    def close(self):
        if self.process is not None:
            self.process.kill()
        if self.vdsm is not None:
            self.vdsm.close()
        self.core.close()


@pytest.fixture
def guest(tmp_path, ovirt_bundle_dir):
    guest = Guest(tmp_path, ovirt_bundle_dir)
    yield guest
    guest.close()


def assert_all_valid(vdsm):
    for _, name, args in vdsm.messages:
        assert validate(name, args) == [], (name, args)
    assert not vdsm.exceptions and vdsm.too_big == 0


def test_startup_negotiation_heartbeats_and_units(guest):
    vdsm = guest.connect_vdsm()                      # VDSM is there before the agent starts
    guest.start()
    vdsm.wait_for("heartbeat", 2)
    names = vdsm.names()
    assert names[:7] == STARTUP_V0
    assert names[7] == "heartbeat" and vdsm.of("heartbeat")[0]["apiVersion"] == 0
    guest.negotiated()
    assert vdsm.of("heartbeat")[1]["apiVersion"] == 3
    assert ("api-version", {"apiVersion": 3, "__name__": "api-version"}) in vdsm.sent
    names = vdsm.names()
    start = names.index("heartbeat", 8) + 1
    assert names[start:start + len(BURST_V3)] == BURST_V3
    # Heartbeats keep coming, every 5 ticks, each with apiVersion 3 now.
    count = len(vdsm.of("heartbeat"))
    vdsm.wait_for("heartbeat", count + 3)
    assert {beat["apiVersion"] for beat in vdsm.of("heartbeat")[2:]} == {3}
    beats = [when for when, name, _ in vdsm.messages if name == "heartbeat"][-3:]
    assert all(3 * TICK < later - earlier < 8 * TICK for earlier, later in zip(beats,
                                                                              beats[1:]))
    # Units, as VDSM stores them.
    info = vdsm.guest_info
    with open("/proc/meminfo") as stream:
        meminfo = {line.split(":")[0]: int(line.split()[1]) for line in stream}
    assert info["memoryStats"]["mem_total"] == str(meminfo["MemTotal"])       # KiB
    assert 0 < info["memUsage"] <= meminfo["MemTotal"] // 1024                  # MiB
    assert isinstance(vdsm.of("heartbeat")[-1]["free-ram"], str)
    assert info["memoryStats"]["mem_free"] == info["memoryStats"]["mem_unused"]
    assert info["guestOs"] == os.uname().release
    assert info["guestOsInfo"]["type"] == "linux"
    assert_all_valid(vdsm)
    assert [frame["type"] for frame in guest.core.frames].count("ready") == 1
    assert guest.core.hellos == ["control", "channel"]


def test_the_periodic_reports(guest):
    vdsm = guest.connect_vdsm()
    guest.start(report_application_rate=20, report_disk_usage=30, report_num_cpu_rate=12,
                report_user_rate=4)
    guest.negotiated()
    mark = len(vdsm.messages)
    vdsm.wait_for("disks-usage", 2, timeout=10)          # the burst's, then the timer's
    vdsm.wait_for("number-of-cpus", 1)
    later = vdsm.names(mark)
    assert {"applications", "containers", "host-name", "os-version", "network-interfaces",
            "fqdn"} <= set(later)
    assert "active-user" not in later                    # nobody logged on or off
    assert vdsm.guest_info["guestCPUCount"] == os.sysconf("SC_NPROCESSORS_ONLN")
    assert_all_valid(vdsm)


def test_host_disconnects_and_reconnects(guest):
    vdsm = guest.connect_vdsm()
    guest.start()
    guest.negotiated()
    vdsm.close()
    guest.core.wait_frame(lambda frame: "the host side of the channel went away"
                          in frame.get("message", ""))
    time.sleep(10 * TICK)                                # heartbeats into the void
    again = guest.connect_vdsm(api_version=3)            # VDSM kept 3 in the VM metadata
    again.wait_for("os-info")                            # the refresh burst, still at v3
    assert again.names()[:len(BURST_V3)] == BURST_V3
    again.wait_for("heartbeat", 2)
    assert {beat["apiVersion"] for beat in again.of("heartbeat")} == {3}
    assert again.effective_api_version == 3 and again.sent[1:] == []   # no renegotiation
    assert_all_valid(again)
    assert guest.process.process.poll() is None


def test_malformed_host_lines_do_no_harm(guest):
    vdsm = guest.connect_vdsm()
    guest.start()
    guest.negotiated()
    vdsm.send_raw(b"garbage\n\xff\xfe\n[1]\n{\"no\": \"name\"}\n{\"__name__\": 5}\n")
    vdsm.send_raw(b"{" + b"x" * (2 << 20) + b"\n")      # over the 1 MiB cap: dropped
    vdsm.send_raw(b'{"__name__": "echo", "after": "all that"}\n')
    assert vdsm.wait_for("echo") == [{"after": "all that"}]
    mark = len(vdsm.of("heartbeat"))
    vdsm.wait_for("heartbeat", mark + 2)
    assert guest.process.process.poll() is None
    assert any("over 1048576 bytes" in line for line in guest.logs())


def test_stop_sends_session_shutdown(guest):
    vdsm = guest.connect_vdsm()
    guest.start()
    vdsm.wait_for("heartbeat")
    assert guest.process.stop(signal.SIGTERM) == 0
    vdsm.wait_for("session-shutdown")


def test_losing_the_core_ends_the_extension(guest):
    guest.start()
    guest.core.close()
    assert guest.process.process.wait(10) == 1


def test_restart_is_an_agent_start_and_renegotiates(guest):
    vdsm = guest.connect_vdsm()
    guest.start()
    guest.negotiated()
    guest.process.stop(signal.SIGKILL)
    mark = len(vdsm.messages)
    sent = len(vdsm.sent)
    guest.start()
    vdsm.pump_until(lambda: "os-info" in vdsm.names(mark), 10)
    names = vdsm.names(mark)
    assert names[:7] == STARTUP_V0
    beats = [args["apiVersion"] for _, name, args in vdsm.messages[mark:] if name == "heartbeat"]
    assert beats[:2] == [0, 3]
    assert vdsm.sent[sent:] == [("api-version", {"apiVersion": 3, "__name__": "api-version"})]
    assert vdsm.effective_api_version == 3
    assert_all_valid(vdsm)


def test_power_and_session_commands_become_primitives(guest):
    vdsm = guest.connect_vdsm()
    guest.core.primitive_results["suspend"] = ("error", "not supported")
    guest.start()
    guest.negotiated()
    vdsm.forward("shutdown", {"timeout": 90, "message": "Going down for maintenance",
                              "reboot": "True"})
    vdsm.forward("hibernate", {"state": "mem"})
    vdsm.forward("lock-screen")
    vdsm.forward("log-off")
    vdsm.forward("shutdown", {"timeout": 30, "message": "bye", "reboot": "False"})
    guest.core.wait_frame(lambda frame: len(guest.core.of_type("primitive")) >= 5)
    primitives = [(frame["name"], frame["arguments"]) for frame in guest.core.of_type("primitive")]
    assert primitives == [
        ("shutdown", {"mode": "reboot", "delay": 2,
                      "message": '"Going down for maintenance"'}),
        ("suspend", {"state": "mem"}), ("lock-sessions", {}), ("log-off", {}),
        ("shutdown", {"mode": "powerdown", "delay": 1, "message": '"bye"'})]
    guest.core.wait_frame(lambda frame: frame.get("type") == "log"
                          and "not supported" in frame["message"])


def test_lifecycle_hooks_then_completion(guest):
    hooks = guest.directory / "hooks" / "before_migration"
    hooks.mkdir(parents=True)
    record = guest.directory / "record"
    for name, body in [("10_first", f"echo first >> {record}"),
                       ("60_fails", f"echo fails >> {record}; exit 3"),
                       ("90_last", f"sleep 0.2; echo last >> {record}"),
                       ("README", "not executable")]:
        (hooks / name).write_text(f"#!/bin/sh\n{body}\n")
        (hooks / name).chmod(0o644 if name == "README" else 0o755)
    vdsm = guest.connect_vdsm()
    guest.start()
    guest.negotiated()
    vdsm.forward("lifecycle-event", {"type": "before_migration", "reply_id": "id-1"})
    vdsm.pump_until(lambda: vdsm.completions, 10)
    assert vdsm.completions == ["id-1"]
    assert record.read_text().split() == ["first", "fails", "last"]
    # The built-in 55_flush-caches ran between them, through the core.
    assert [frame["name"] for frame in guest.core.of_type("primitive")] == ["drop-caches"]
    vdsm.forward("lifecycle-event", {"type": "after_migration"})
    vdsm.forward("lifecycle-event", {"type": "before_hibernation", "reply_id": "id-2"})
    vdsm.pump_until(lambda: len(vdsm.completions) == 2, 10)
    assert vdsm.completions == ["id-1", "id-2"]
    assert any("60_fails of before_migration exited with 3" in line for line in guest.logs())


def test_direct_actions_with_test_doubles_on_path(guest):
    bin_dir = guest.directory / "bin"
    bin_dir.mkdir()
    calls = guest.directory / "calls"
    for program in ("shutdown", "systemctl", "loginctl"):
        extra = ""
        if program == "loginctl":
            extra = '[ "$1" = show-seat ] && echo 7\n'
        (bin_dir / program).write_text(f'#!/bin/sh\n{extra}echo "{program} $*" >> {calls}\n')
        (bin_dir / program).chmod(0o755)
    guest.extra_environ["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    vdsm = guest.connect_vdsm()
    guest.start(privileged_actions="direct", flush_caches=False)
    vdsm.wait_for("fqdn")
    vdsm.forward("shutdown", {"timeout": 120, "message": "maintenance", "reboot": "false"})
    vdsm.forward("hibernate")
    vdsm.forward("lock-screen")
    vdsm.forward("log-off")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not calls.exists()
                                           or len(calls.read_text().splitlines()) < 5):
        time.sleep(0.05)
    # The commands run side by side: their order in the file is not theirs.
    assert sorted(calls.read_text().splitlines()) == sorted([
        'shutdown -h +2 "maintenance"', "systemctl hibernate", "loginctl lock-sessions",
        "loginctl show-seat seat0 -p ActiveSession --value", "loginctl terminate-session 7"])
    assert guest.core.of_type("primitive") == []


def test_the_envelope_relay(guest):
    guest.start()
    events = lambda: [frame for frame in guest.core.of_type("event")  # noqa: E731
                      if frame["name"] == "ovirt-message"]
    time.sleep(6 * TICK)
    assert events() == []                                # no lease: no events
    reply = guest.core.call("ovirt-relay-open", {"lease": 30})
    assert reply["return"] == {"lease": 30.0, "event": "ovirt-message"}
    line = json.dumps({"__name__": "refresh", "apiVersion": 3})
    assert guest.core.call("ovirt-relay-send", {"lines": [line]})["return"] == {"accepted": 1}
    guest.core.wait_frame(lambda frame: frame.get("name") == "ovirt-message"
                          and '"fqdn"' in frame["data"]["line"])
    lines = [json.loads(frame["data"]["line"]) for frame in events()]
    assert [message["__name__"] for message in lines][:8] == [
        "session-startup", "active-user", "applications", "host-name", "os-version",
        "network-interfaces", "disks-usage", "fqdn"]
    refused = guest.core.call("ovirt-relay-send", {"lines": "not a list"})
    assert "lines must be a list" in refused["error"]["desc"]
    assert guest.core.call("ovirt-relay-close", {})["return"] == {}
    count = len(events())
    time.sleep(12 * TICK)
    assert len(events()) == count                        # heartbeats no longer relayed
