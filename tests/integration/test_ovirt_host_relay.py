"""qga.host.ovirt: VDSM on a host socket, the oVirt protocol carried by envelope calls and events.

The extension runs as a process behind a stand-in core with no channel port
at all; the helper reaches it through ``guest-extension-call`` and
``guest-extension-events`` (served by the stand-in); a fake VDSM connects
to the helper's socket as it would to libvirt's.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from qga.host.ovirt import OvirtRelay
from tests.support.fake_vdsm import (ExtensionProcess, FakeAgentClient, FakeCore, FakeVdsm,
                                     validate)
from tests.support.ovirt_bundle import BURST_V3

TICK = 0.05


class Helper:
    """The relay helper stepping in a thread until closed."""

    def __init__(self, client, path):
        self.relay = OvirtRelay(client, path, lease=30, poll_wait=0.05)
        self.stopping = False
        self.thread = threading.Thread(target=self.relay.serve,
                                       args=(lambda: self.stopping,), daemon=True)
        self.thread.start()

    def close(self):
        self.stopping = True
        self.thread.join(10)
        self.relay.close()


@pytest.fixture
def setup(tmp_path, ovirt_bundle_dir):
    bundle_dir = ovirt_bundle_dir
    core = FakeCore(str(tmp_path))
    environ = core.environ({"tick_interval": TICK, "config_file": "", "session_events": False},
                           bundle_dir=bundle_dir)
    process = ExtensionProcess(bundle_dir, environ, str(tmp_path / "extension.log"))
    core.wait_frame(lambda frame: frame.get("type") == "ready")
    client = FakeAgentClient(core)
    helper = Helper(client, str(tmp_path / "vm.ovirt-guest-agent.0"))
    yield core, client, helper, tmp_path
    helper.close()
    process.kill()
    core.close()


def test_vdsm_negotiates_through_the_relay(setup):
    core, client, helper, tmp_path = setup
    vdsm = FakeVdsm(str(tmp_path / "vm.ovirt-guest-agent.0"), api_version=3)
    try:
        # VDSM's refresh goes through ovirt-relay-send; the burst comes back as events.
        vdsm.wait_for("os-info", timeout=15)
        assert vdsm.effective_api_version == 3
        heartbeats = [args["apiVersion"] for args in vdsm.of("heartbeat")]
        assert heartbeats[:2] == [0, 3]          # renegotiated: VDSM remembered 3
        names = vdsm.names()
        assert names[-len(BURST_V3):] == BURST_V3
        for _, name, args in vdsm.messages:
            assert validate(name, args) == []
        assert not vdsm.exceptions and not vdsm.errors
        vdsm.forward("echo", {"through": "the relay"})
        assert vdsm.wait_for("echo") == [{"through": "the relay"}]
        commands = [arguments["command"] for execute, arguments in client.calls
                    if execute == "guest-extension-call"]
        assert commands[0] == "ovirt-relay-open" and "ovirt-relay-send" in commands
        vdsm.close()
        core.wait_frame(lambda frame: frame.get("type") == "log"
                        and "relays the oVirt channel" in frame["message"])
        for _ in range(200):
            if any(arguments["command"] == "ovirt-relay-close"
                   for execute, arguments in list(client.calls)
                   if execute == "guest-extension-call"):
                break
            threading.Event().wait(0.02)
        else:
            raise AssertionError("the lease was not given back")
        # A new VDSM connection: its refresh brings the burst (a heartbeat may come first).
        again = FakeVdsm(str(tmp_path / "vm.ovirt-guest-agent.0"), api_version=3)
        again.wait_for("os-info", timeout=15)
        names = again.names()
        assert names[names.index("session-startup"):][:len(BURST_V3)] == BURST_V3
        assert set(names[:names.index("session-startup")]) <= {"heartbeat"}
        again.close()
    finally:
        vdsm.close()


def test_one_vdsm_at_a_time(setup):
    core, client, helper, tmp_path = setup
    path = str(tmp_path / "vm.ovirt-guest-agent.0")
    first = FakeVdsm(path)
    first.wait_for("session-startup", timeout=15)
    second = FakeVdsm(path)
    assert not second.pump(2.0)                  # closed by the helper
    second.close()
    first.forward("echo", {"still": "here"})
    assert first.wait_for("echo") == [{"still": "here"}]
    first.close()
    assert Path(path).exists()
