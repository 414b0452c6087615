"""Session events from systemd-logind, on a private dbus-daemon with a stand-in logind.

The stand-in owns ``org.freedesktop.login1`` on the private bus, answers
``ListSessions`` and ``Properties.GetAll`` and emits logind's signals; an
impostor emits the same signals from another connection, which must not count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "extensions" / "ovirt_sso"))

from ovirt_agent import dbus, logind  # noqa: E402
from qga.ext import sdk  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None,
                                reason="dbus-daemon is not installed")

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture
def bus_address(tmp_path):
    config = tmp_path / "bus.conf"
    socket_path = tmp_path / "bus"
    config.write_text(BUS_CONFIG.format(path=socket_path))
    daemon = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork",
                               "--print-address"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    address = daemon.stdout.readline().decode().strip()
    assert address.startswith("unix:")
    yield address
    daemon.terminate()
    daemon.wait(10)
    daemon.stdout.close()


class FakeLogind:
    """org.freedesktop.login1 on the private bus: sessions, their properties, signals."""

    def __init__(self, address, sessions):
        self.bus = dbus.Connection(address)
        owned = self.bus.call_sync(dbus.BUS_NAME, dbus.BUS_PATH, dbus.BUS_NAME, "RequestName",
                                   "su", logind.LOGIN1, 4)
        assert owned == (1,)
        self.sessions = dict(sessions)          # id -> class
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def path(session_id):
        return f"/org/freedesktop/login1/session/_3{session_id}"

    def _serve(self):
        while self.running:
            try:
                messages = self.bus.receive(0.1)
            except (dbus.DBusError, OSError):
                return
            for message in messages:
                if message.kind == dbus.METHOD_CALL:
                    self._answer(message)

    def _answer(self, call):
        with self.lock:
            if call.member == "ListSessions":
                listed = [(session_id, 1000, "alice", "seat0", self.path(session_id))
                          for session_id in self.sessions]
                self.bus.reply(call, "a(susso)", listed)
            elif call.member == "GetAll":
                session_id = next((key for key in self.sessions
                                   if self.path(key) == call.path), None)
                if session_id is None:
                    self.bus.reply_error(call, "org.freedesktop.DBus.Error.UnknownObject",
                                         "no such session")
                    return
                self.bus.reply(call, "a{sv}", {
                    "Id": dbus.Variant("s", session_id),
                    "Class": dbus.Variant("s", self.sessions[session_id]),
                    "LockedHint": dbus.Variant("b", False),
                    "Remote": dbus.Variant("b", False)})

    def new(self, session_id, kind="user"):
        with self.lock:
            self.sessions[session_id] = kind
            self.bus.signal(logind.MANAGER_PATH, logind.MANAGER, "SessionNew", "so",
                            session_id, self.path(session_id))

    def removed(self, session_id):
        with self.lock:
            del self.sessions[session_id]
            self.bus.signal(logind.MANAGER_PATH, logind.MANAGER, "SessionRemoved", "so",
                            session_id, self.path(session_id))

    def lock_signal(self, session_id, member="Lock"):
        with self.lock:
            self.bus.signal(self.path(session_id), logind.SESSION, member)

    def locked_hint(self, session_id, locked):
        with self.lock:
            self.bus.signal(self.path(session_id), logind.PROPERTIES, "PropertiesChanged",
                            "sa{sv}as", logind.SESSION,
                            {"LockedHint": dbus.Variant("b", locked)}, [])

    def close(self):
        self.running = False
        self.thread.join(5)
        self.bus.close()


class Recorder:
    """The logic's session methods, recorded."""

    def __init__(self):
        self.calls = []

    def session_logon(self):
        self.calls.append("logon")

    def session_logoff(self):
        self.calls.append("logoff")

    def session_lock(self):
        self.calls.append("lock")

    def session_unlock(self):
        self.calls.append("unlock")


def test_session_events(bus_address):
    fake = FakeLogind(bus_address, {"1": "user", "c1": "greeter"})
    impostor = dbus.Connection(bus_address)
    loop = sdk.Loop()
    recorder = Recorder()
    watcher = logind.SessionWatcher(loop, recorder, bus_address)
    try:
        watcher.start()
        assert list(watcher.sessions) == [FakeLogind.path("1")]

        def expect(calls):
            assert loop.run_until(lambda: len(recorder.calls) >= len(calls), 5), recorder.calls
            loop.run_until(lambda: False, 0.1)       # nothing more comes
            assert recorder.calls == calls

        fake.new("2")
        fake.new("c2", "greeter")
        expect(["logon"])
        fake.locked_hint("2", True)
        fake.lock_signal("2")                         # already locked: once
        expect(["logon", "lock"])
        fake.lock_signal("2", "Unlock")
        fake.locked_hint("2", False)                  # already unlocked
        expect(["logon", "lock", "unlock"])
        # Signals from someone who is not logind do not count.
        impostor.signal(logind.MANAGER_PATH, logind.MANAGER, "SessionRemoved", "so", "2",
                        FakeLogind.path("2"))
        impostor.signal(FakeLogind.path("1"), logind.SESSION, "Lock")
        fake.removed("c2")
        fake.lock_signal("1")                         # a session known from the start
        expect(["logon", "lock", "unlock", "lock"])
        fake.removed("2")
        expect(["logon", "lock", "unlock", "lock", "logoff"])
    finally:
        watcher.close()
        impostor.close()
        fake.close()
        loop.close()


def test_no_logind_is_an_error_the_runner_can_log(bus_address):
    loop = sdk.Loop()
    try:
        with pytest.raises(dbus.DBusError, match="ServiceUnknown|NameHasNoOwner"):
            logind.SessionWatcher(loop, Recorder(), bus_address, timeout=2).start()
        with pytest.raises(dbus.DBusError, match="cannot connect"):
            logind.SessionWatcher(loop, Recorder(), "unix:path=/nonexistent/bus").start()
    finally:
        loop.close()


def test_vdsm_sees_the_session_state(bus_address, tmp_path, ovirt_bundle_dir):
    from tests.support.fake_vdsm import ExtensionProcess, FakeCore, FakeVdsm

    bundle = ovirt_bundle_dir
    fake = FakeLogind(bus_address, {})
    core = FakeCore(str(tmp_path))
    vdsm = FakeVdsm(core.host_path)
    environ = core.environ({"tick_interval": 0.05, "config_file": ""},
                           bundle_dir=bundle)
    environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus_address
    process = ExtensionProcess(bundle, environ, str(tmp_path / "extension.log"))
    try:
        core.wait_frame(lambda frame: "following systemd-logind" in frame.get("message", ""))
        fake.new("5")
        vdsm.wait_for("session-logon")
        assert vdsm.guest_info["session"] == "UserLoggedOn"
        fake.locked_hint("5", True)
        vdsm.wait_for("session-lock")
        assert vdsm.guest_info["session"] == "Locked"
        fake.removed("5")
        vdsm.wait_for("session-logoff")
        assert vdsm.guest_info["session"] == "LoggedOff"
        # ... followed by whoever is still logged in.
        assert vdsm.pump_until(lambda: vdsm.names()[-1] != "session-logoff", 5)
        names = vdsm.names()
        assert names[names.index("session-logoff") + 1] == "active-user"
    finally:
        process.kill()
        vdsm.close()
        core.close()
        fake.close()
    assert os.path.exists(tmp_path / "extension.log")
