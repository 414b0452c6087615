"""The oVirt extension pushed to our agent, VDSM reading the relayed port: end to end.

The bundle is staged by ``extensions/ovirt_sso/build.py`` (its reporting loop
made 5 times faster through the manifest's settings), built and signed with
``qga-bundle`` and a throwaway key the agent trusts, pushed with ``qga.host.Client.push`` over the
agent's own channel, installed, started (as its own system user when the
tests run as root) and given the ``ovirt-guest-agent.0`` port: a pty whose
slave stands in for the virtio port in the agent's ports directory, its
master held by a fake VDSM.  Then: the startup set, negotiation to 3, the v3
burst, heartbeats, a command, the envelope relay through the agent, a
refused primitive, the extension killed and restarted by the supervisor
(a new agent start: renegotiated), its removal (VDSM gets ``uninstalled``),
and guest-ping answering throughout.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from qga.host.client import Client
from tests.support.agents import our_agent
from tests.support.ext_hello import agent_config
from tests.support.fake_vdsm import PtyVdsm, validate
from tests.support.ovirt_bundle import BURST_V3, NAME, STARTUP_V0, pty_port, signed_bundle

TICK = 0.2


def test_push_negotiate_heartbeat_and_relay(ovirt_workdir):
    workdir = ovirt_workdir
    bundle = signed_bundle(workdir, {"tick_interval": TICK})
    master = pty_port(workdir)
    env = agent_config(workdir, workdir / "trust.d")
    agent = our_agent(workdir, ["-v"], env=env).start()
    client = Client(agent.sock, timeout=60)
    try:
        client.push(str(bundle))
        vdsm = PtyVdsm(master)
        vdsm.wait_for("fqdn", timeout=30)
        assert vdsm.names()[:len(STARTUP_V0)] == STARTUP_V0   # held by the port until read
        vdsm.wait_for("os-info", timeout=30)       # heartbeat 0, then 3, api-version, burst
        assert vdsm.effective_api_version == 3
        assert [beat["apiVersion"] for beat in vdsm.of("heartbeat")][:2] == [0, 3]
        names = vdsm.names()
        start = len(names) - 1 - names[::-1].index("session-startup")
        assert names[start:start + len(BURST_V3)] == BURST_V3
        assert client.call("guest-ping") == {}
        vdsm.forward("echo", {"over": "the real relay"})
        assert vdsm.wait_for("echo") == [{"over": "the real relay"}]
        count = len(vdsm.of("heartbeat"))
        vdsm.wait_for("heartbeat", count + 1, timeout=15)
        for _, name, args in vdsm.messages:
            assert validate(name, args) == [], (name, args)
        assert not vdsm.exceptions and vdsm.too_big == 0

        # The same protocol through the envelope commands (qga.host.ovirt's way).
        assert client.ext_call(NAME, "ovirt-relay-open", {"lease": 30})["event"] == \
            "ovirt-message"
        deadline = time.monotonic() + 20
        lines = []
        cursor = None
        while time.monotonic() < deadline and not any('"heartbeat"' in line for line in lines):
            batch = client.ext_events(NAME, cursor, wait=2)
            cursor = batch["cursor"]
            lines += [event["data"]["line"] for event in batch["events"]]
        assert any('"heartbeat"' in line for line in lines), lines
        client.ext_call(NAME, "ovirt-relay-close", {})
        status = client.ext_status(NAME)
        assert status["state"] == "running", status
        if os.geteuid() == 0:              # unprivileged, as its own user
            uid = next(int(line.split()[1]) for line in
                       Path(f"/proc/{status['pid']}/status").read_text().splitlines()
                       if line.startswith("Uid:"))
            assert uid != 0

        # A privileged action becomes a primitive the core answers (refuses, until the
        # core serves the power and sessions primitives); the extension goes on.
        vdsm.forward("lock-screen")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "lock-sessions: the core" not in agent.stderr():
            time.sleep(0.1)
        assert "lock-sessions: the core" in agent.stderr()
        count = len(vdsm.of("heartbeat"))
        vdsm.wait_for("heartbeat", count + 1, timeout=15)

        # The extension dies: the supervisor starts it again, which VDSM sees as an
        # agent start (the startup set, heartbeat 0 then 3, api-version, the v3 burst).
        mark, sent = len(vdsm.messages), len(vdsm.sent)
        os.kill(status["pid"], signal.SIGKILL)
        assert vdsm.pump_until(lambda: "os-info" in vdsm.names(mark), 60), vdsm.names(mark)
        assert vdsm.names(mark)[:len(STARTUP_V0)] == STARTUP_V0
        beats = [args["apiVersion"] for _, name, args in vdsm.messages[mark:]
                 if name == "heartbeat"]
        assert beats[:2] == [0, 3]
        assert vdsm.sent[sent:] == [("api-version", {"apiVersion": 3,
                                                     "__name__": "api-version"})]
        assert client.ext_status(NAME)["restarts"] >= 1
        assert client.call("guest-ping") == {}

        # Removed, it leaves VDSM the notice the original's package uninstaller left.
        mark = len(vdsm.messages)
        client.ext_remove(NAME)
        assert vdsm.pump_until(lambda: "uninstalled" in vdsm.names(mark), 15), vdsm.names(mark)
        assert vdsm.names(mark)[-1] == "uninstalled" and vdsm.guest_info["appsList"] == ()
        assert client.call("guest-ping") == {}
        assert not vdsm.exceptions and vdsm.too_big == 0
    finally:
        client.close()
        agent.stop()
        os.close(master)
