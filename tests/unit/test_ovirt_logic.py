"""The agent's logic against VDSM's reader, both sans-IO, on a fake clock.

Each agent line goes through :class:`VdsmReader` in 64 KiB chunks, as VDSM
reads them; whatever VDSM forwards comes back to the logic as host lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extensions" / "ovirt_sso"))

from ovirt_agent import config, logic, messages  # noqa: E402
from tests.support.fake_vdsm import Unsupported, VdsmReader, validate  # noqa: E402
from tests.support.ovirt_bundle import BURST_V0, BURST_V3, STARTUP_V0  # noqa: E402



class Collectors:
    """Fixed data in the shapes of the real collectors; ``fail`` names ones that raise."""

    def __init__(self):
        self.user = "alice"
        self.fail = set()
        self.apps = ["kernel-6.1.0-1", "cloud-init-22.4"]
        self.calls = {}

    def _get(self, name, value):
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fail:
            raise OSError(f"{name} is broken")
        return value

    def host_name(self): return self._get("host_name", "guest.example.com")
    def os_version(self): return self._get("os_version", "6.1.0-18-amd64")
    def fqdn(self): return self._get("fqdn", "guest.example.com")
    def active_user(self): return self._get("active_user", self.user)
    def applications(self): return self._get("applications", list(self.apps))
    def number_of_cpus(self): return self._get("number_of_cpus", 4)
    def containers(self): return self._get("containers", [])
    def free_ram(self): return self._get("free_ram", "1536")

    def network_interfaces(self):
        return self._get("network_interfaces", [
            {"name": "eth0", "hw": "52:54:00:12:34:56", "inet": ["192.0.2.10"],
             "inet6": ["2001:db8::10"]}])

    def disks_usage(self):
        return self._get("disks_usage", ([{"path": "/", "fs": "ext4", "total": 10 << 30,
                                           "used": 3 << 30}],
                                         {"QM00001": {"name": "/dev/vda"}}))

    def memory_stats(self):
        return self._get("memory_stats", {
            "mem_total": 4000000, "mem_free": 1572864, "mem_unused": 1000000,
            "mem_buffers": 72864, "mem_cached": 500000, "swap_in": 0, "swap_out": 0,
            "pageflt": 12, "majflt": 0, "swap_usage": 0, "swap_total": 0})

    def os_info(self):
        return self._get("os_info", {"version": "12", "distribution": "Debian GNU/Linux",
                                     "codename": "bookworm", "arch": "x86_64",
                                     "type": "linux", "kernel": "6.1.0-18-amd64"})

    def timezone(self): return self._get("timezone", {"zone": "Europe/Prague", "offset": 60})


class Actions:
    def __init__(self):
        self.calls = []
        self.hold_lifecycle = False
        self.pending = []

    def lock_screen(self): self.calls.append(("lock-screen",))
    def log_off(self): self.calls.append(("log-off",))

    def shutdown(self, delay, message, reboot):
        self.calls.append(("shutdown", delay, message, reboot))

    def hibernate(self, state): self.calls.append(("hibernate", state))
    def login(self, credentials): self.calls.append(("login", credentials))

    def lifecycle(self, event, done):
        self.calls.append(("lifecycle", event))
        if self.hold_lifecycle:
            self.pending.append(done)
        else:
            done()


class Wire:
    """The logic and VDSM's reader connected back to back, on a fake clock."""

    def __init__(self, vdsm_version=0, settings=None, start=True):
        self.now = 0.0
        self.timers = []
        self.to_agent = []
        self.lines = []
        self.vdsm = VdsmReader(vdsm_version, send=self.to_agent.append, clock=lambda: self.now)
        self.collectors = Collectors()
        self.actions = Actions()
        self.logic = logic.AgentLogic(config.Config(settings or {}), self.collectors,
                                      self.actions, self.write, self.call_later)
        if start:
            self.logic.start()
            self.deliver()

    def write(self, line):
        assert line.endswith(b"\n") and len(line) <= messages.MAX_LINE
        line.decode("ascii")
        self.lines.append(line)
        for start in range(0, len(line), 65536):
            self.vdsm.handle_chunk(line[start:start + 65536])

    def call_later(self, delay, callback):
        self.timers.append((self.now + delay, callback))

    def deliver(self):
        while self.to_agent:
            data = self.to_agent.pop(0)
            for line in data.split(b"\n")[:-1]:
                self.logic.handle_line(line)

    def host(self, name, **args):
        """VDSM forwards a command (raises Unsupported as VDSM would)."""
        self.vdsm.forward(name, args)
        self.deliver()

    def tick(self, count=1):
        """``count`` passes of the 1-second loop; the first pass is at t=0."""
        for _ in range(count):
            for when, callback in [timer for timer in self.timers if timer[0] <= self.now]:
                self.timers.remove((when, callback))
                callback()
            self.logic.tick()
            self.deliver()
            self.now += 1

    def names(self, since=0):
        return self.vdsm.names(since)

    def mark(self):
        return len(self.vdsm.messages)


def assert_valid(wire):
    for _, name, args in wire.vdsm.messages:
        assert validate(name, args) == [], (name, args)
    assert not wire.vdsm.exceptions


def test_startup_set_at_version_zero():
    wire = Wire()
    assert wire.names() == STARTUP_V0
    assert wire.logic.api_version == 0
    assert_valid(wire)


def test_negotiation_first_heartbeat_zero_then_three_then_the_v3_burst():
    wire = Wire()
    start = wire.mark()
    wire.tick(4)
    assert wire.names(start) == []                       # t = 0..3 s
    wire.tick()                                          # t = 4 s
    assert wire.names(start) == ["heartbeat"]
    assert wire.vdsm.of("heartbeat")[0]["apiVersion"] == 0
    assert wire.vdsm.sent == []                          # 0 == VDSM's effective: no api-version
    wire.tick(5)                                         # t = 9 s: user check, heartbeat
    assert wire.vdsm.of("heartbeat")[1]["apiVersion"] == 3
    assert wire.vdsm.sent == [("api-version", {"apiVersion": 3, "__name__": "api-version"})]
    assert wire.logic.api_version == 3 and wire.vdsm.effective_api_version == 3
    assert wire.names(start) == ["heartbeat", "heartbeat"] + BURST_V3
    assert wire.vdsm.guest_info["guestOsInfo"]["codename"] == "bookworm"
    assert wire.vdsm.guest_info["guestTimezone"] == {"zone": "Europe/Prague", "offset": 60}
    assert_valid(wire)


def test_vdsm_that_remembers_version_three_renegotiates_with_a_restarted_agent():
    wire = Wire(vdsm_version=3)
    wire.tick(5)
    assert wire.vdsm.effective_api_version == 0          # the first heartbeat said 0
    wire.tick(5)
    assert wire.logic.api_version == 3 and wire.vdsm.effective_api_version == 3


def test_refresh_while_at_zero_rearms_the_zero_heartbeat():
    # The agent started while VDSM was away: its first heartbeat went nowhere.
    wire = Wire(vdsm_version=3)
    wire.logic.send_heartbeat()
    wire.vdsm.messages.clear()
    wire.vdsm.effective_api_version = 3                  # as kept in the VM metadata
    wire.host("refresh", apiVersion=3)                   # VDSM connects
    assert wire.names() == BURST_V0 and wire.logic.api_version == 0
    wire.tick(5)
    assert wire.vdsm.of("heartbeat")[-1]["apiVersion"] == 0
    wire.tick(5)
    assert wire.logic.api_version == 3 and wire.vdsm.effective_api_version == 3


@pytest.mark.parametrize("version,refresh,after,burst", [
    (1, {"apiVersion": 1}, 1, set(BURST_V0)),
    (1, {}, 0, set(BURST_V0)),
    (2, {}, 0, set(BURST_V0)),
    (3, {}, 0, set(BURST_V0)),
    (2, {"apiVersion": 2}, 2, set(BURST_V0) | {"timezone", "os-info"}),
    (3, {"apiVersion": 3}, 3, set(BURST_V3)),
    (3, {"apiVersion": 1}, 3, set(BURST_V3)),            # not adopted
])
def test_the_refresh_matrix(version, refresh, after, burst):
    wire = Wire()
    wire.logic.api_version = version
    start = wire.mark()
    wire.logic.handle_line(json.dumps(dict(refresh, __name__="refresh")).encode())
    assert set(wire.names(start)) == burst
    assert wire.names(start)[0] == "session-startup"
    assert wire.logic.api_version == after
    assert_valid(wire)


@pytest.mark.parametrize("value,expected", [
    (4, 3), (3, 3), ("2", 2), (1, 1), (-1, 0), ("abc", 0), (None, 0), ([3], 0), (2.9, 2),
])
def test_api_version_values(value, expected):
    wire = Wire()
    start = wire.mark()
    wire.logic.handle_line(json.dumps({"__name__": "api-version",
                                       "apiVersion": value}).encode())
    assert wire.logic.api_version == expected
    assert bool(wire.names(start)) == (expected != 0)    # a burst only when it changed
    start = wire.mark()
    wire.logic.handle_line(json.dumps({"__name__": "api-version",
                                       "apiVersion": value}).encode())
    assert wire.names(start) == []                        # same again: nothing


def test_the_periodic_messages_and_active_user_only_on_change():
    wire = Wire()
    wire.tick(10)                                        # negotiated to 3 at t = 9
    start = wire.mark()
    wire.tick(10)                                        # t = 10..19
    assert wire.names(start) == ["heartbeat", "heartbeat"]   # user unchanged: not sent
    wire.collectors.user = "bob"
    wire.tick(10)                                        # t = 20..29: check at 29
    assert wire.names(start)[2:] == ["heartbeat", "heartbeat", "active-user"]
    assert wire.vdsm.guest_info["username"] == "bob"
    start = wire.mark()
    wire.tick(31)                                        # t = 30..60
    assert wire.names(start).count("number-of-cpus") == 1    # at t = 59
    assert wire.vdsm.guest_info["guestCPUCount"] == 4
    start = wire.mark()
    wire.tick(60)                                        # t = 61..120: applications at 119
    periodic = [name for name in wire.names(start) if name != "heartbeat"]
    assert periodic == ["applications", "containers", "host-name", "os-version",
                        "network-interfaces", "fqdn", "number-of-cpus"]   # one tick, in order
    start = wire.mark()
    wire.tick(180)                                       # t = 121..300: disks at 299
    assert [name for name in wire.names(start) if name == "disks-usage"] == ["disks-usage"]
    assert_valid(wire)


def test_heartbeat_units_as_vdsm_stores_them():
    wire = Wire()
    wire.tick(5)
    heartbeat = wire.vdsm.of("heartbeat")[0]
    assert heartbeat["free-ram"] == "1536"                   # MiB, a string
    assert all(isinstance(value, int) for value in heartbeat["memory-stat"].values())
    assert wire.vdsm.guest_info["memUsage"] == 1536
    stats = wire.vdsm.guest_info["memoryStats"]
    assert stats["mem_free"] == stats["mem_unused"] == "1000000"
    assert stats["mem_total"] == "4000000" and "swap_total" not in stats
    assert wire.vdsm.guest_status == "Up"


def test_gating_suppresses_what_the_version_does_not_allow():
    wire = Wire()
    start = wire.mark()
    for name in ("containers", "completion", "timezone", "os-info", "number-of-cpus"):
        assert not wire.logic.send(name, {})
    assert not wire.logic.send("api-version", {})            # undocumented
    assert wire.names(start) == []


def test_shutdown_arguments_parsed_like_the_original():
    wire = Wire()
    wire.host("shutdown", timeout=30, message="Bye", reboot="False")
    wire.host("shutdown", timeout="61", message="Back soon", reboot="True")
    wire.host("shutdown")
    wire.host("shutdown", timeout="soon", reboot=True)       # a JSON true is not "True"
    wire.host("shutdown", timeout=0, reboot="TRUE")
    assert wire.actions.calls == [
        ("shutdown", 1, "Bye", False), ("shutdown", 2, "Back soon", True),
        ("shutdown", 0, "System is going down", False),
        ("shutdown", 0, "System is going down", False), ("shutdown", 0,
                                                        "System is going down", True)]


def test_the_other_commands():
    wire = Wire()
    start = wire.mark()
    wire.host("lock-screen")
    wire.host("log-off")
    wire.host("hibernate")
    wire.host("hibernate", state="mem")
    wire.host("hibernate", state="freeze")                   # unknown: ignored
    wire.host("login", username="alice@example.com", password="s3cret")
    wire.host("login", username="alice")                     # no password: ignored
    wire.host("echo", text="ping", n=[1, 2])
    wire.host("no-such-command", x=1)
    assert wire.actions.calls == [
        ("lock-screen",), ("log-off",), ("hibernate", "disk"), ("hibernate", "mem"),
        ("login", {"username": "alice@example.com", "password": "s3cret"})]
    assert wire.names(start) == ["echo"]
    assert wire.vdsm.of("echo") == [{"text": "ping", "n": [1, 2]}]
    assert wire.vdsm.errors == ["Unknown message type echo"]  # as VDSM logs it


def test_set_number_of_cpus_needs_version_one_on_both_sides():
    wire = Wire()
    with pytest.raises(Unsupported):
        wire.host("set-number-of-cpus", count=2)
    wire.tick(10)
    start = wire.mark()
    wire.host("set-number-of-cpus", count=2)
    wire.host("set-number-of-cpus", count=0)
    wire.host("set-number-of-cpus", count="many")            # int() fails: logged, dropped
    assert wire.names(start) == ["number-of-cpus"]


def test_lifecycle_events_and_completion():
    wire = Wire()
    with pytest.raises(Unsupported):
        wire.host("lifecycle-event", type="before_migration", reply_id="r0")
    wire.tick(10)
    wire.actions.hold_lifecycle = True
    wire.host("lifecycle-event", type="before_migration", reply_id="r1")
    assert wire.vdsm.completions == []                       # the hooks are still running
    wire.actions.pending.pop()()
    assert wire.vdsm.completions == ["r1"]
    wire.actions.hold_lifecycle = False
    wire.host("lifecycle-event", type="after_migration")     # no reply_id: no completion
    wire.host("lifecycle-event", type="after_hibernation", failure=True)
    wire.host("lifecycle-event", type="sideways", reply_id="r2")   # unknown: no hooks
    assert wire.vdsm.completions == ["r1", "r2"]
    assert [call for call in wire.actions.calls if call[0] == "lifecycle"] == [
        ("lifecycle", "before_migration"), ("lifecycle", "after_migration"),
        ("lifecycle", "after_hibernation")]
    assert wire.vdsm.of("completion")[0] == {"reply_id": "r1", "done": True}


@pytest.mark.parametrize("line", [
    b"", b"garbage", b"{", b"[]", b"null", b'{"apiVersion": 3}', b'{"__name__": null}',
    b'{"__name__": "refresh", "bad": "\xc3"}', b'{"__name__": "set-number-of-cpus"}',
    b'{"__name__": "shutdown", "timeout": {"a": 1}}', b'{"__name__": "lifecycle-event"}',
    b"\xff\xfe\x00",
])
def test_malformed_host_lines_are_dropped_without_harm(line):
    wire = Wire()
    state = (wire.logic.api_version, wire.logic.active_user)
    wire.logic.handle_line(line)
    wire.tick(10)
    assert wire.logic.api_version == 3 and state == (0, "alice")


def test_a_failing_collector_costs_only_its_message():
    wire = Wire(start=False)
    wire.collectors.fail = {"applications", "memory_stats"}
    wire.logic.start()
    assert wire.names() == [name for name in STARTUP_V0 if name != "applications"]
    wire.tick(10)
    assert wire.vdsm.of("heartbeat") == []                   # no memory stats: no heartbeat
    wire.collectors.fail = set()
    wire.tick(5)
    assert wire.vdsm.of("heartbeat")[0]["apiVersion"] == 0   # still the first one


def test_session_events():
    wire = Wire()
    start = wire.mark()
    wire.logic.session_lock()
    wire.logic.session_unlock()
    assert wire.vdsm.guest_info["session"] == "Active"
    wire.logic.session_logoff()
    assert wire.names(start)[2:] == ["session-logoff", "active-user"]
    assert wire.vdsm.guest_info["session"] == "LoggedOff"
    # A logon while utmp does not show the user yet: retried a second later.
    wire.collectors.user = "None"
    wire.logic.session_logoff()
    start = wire.mark()
    wire.logic.session_logon()
    assert wire.names(start) == []
    wire.collectors.user = "carol"
    wire.tick(2)
    assert wire.names(start) == ["active-user", "session-logon"]
    assert wire.vdsm.guest_info["username"] == "carol"
    assert wire.vdsm.guest_info["session"] == "UserLoggedOn"
    assert_valid(wire)


def test_oversized_lists_are_trimmed_and_reach_vdsm():
    wire = Wire(start=False)
    wire.collectors.apps = [f"pkg-{i:07d}-1.0" for i in range(80000)]
    wire.logic.start()
    apps = wire.vdsm.guest_info["appsList"]
    assert 0 < len(apps) < 80000 and wire.logic.trimmed == 80000 - len(apps)
    assert wire.vdsm.too_big == 0
    start = wire.mark()
    wire.host("echo", blob="x" * (1 << 20))                  # cannot be trimmed: not sent
    assert wire.names(start) == [] and wire.logic.dropped == 1


def test_shutdown_message_at_stop():
    wire = Wire()
    wire.logic.stop()
    assert wire.names()[-1] == "session-shutdown"
