"""Channel mode through the agent: the manifest's port (a pty here) relayed to the extension.

The test holds the pty's master as the host; the agent finds the slave as
the manifest's fallback port name in its virtio-ports-dir and relays it,
byte for byte, to the extension's channel connection.  The extension (an
SDK script) answers each chunk in upper case and emits an event when the
core tells it the host came.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import tempfile
import time
import tty
from pathlib import Path

import pytest

from qga.ext.launch import user_name
from tests.integration.test_extensions_e2e import ROOT, Guest
from tests.support.ext_hello import HelloBundles, NAME

UPPER = """
import sys
import qga_ext_sdk as sdk
extension = sdk.Extension()
channel = extension.open_channel()  # blocking: sendall waits while the core holds back

def readable():
    data = channel.recv(65536)
    if not data:
        extension.stop()
        return
    channel.sendall(data.upper())

extension.loop.add_reader(channel, readable)
extension.on_host(lambda connected: extension.emit("host", {"connected": connected}))
sys.exit(extension.run())
"""

MANIFEST = {
    "mode": "channel", "capabilities": ["channel", "events"],
    "channel": {"ports": ["test-agent.0", "test-legacy.0"]},
    "commands": {}, "events": {"host": {"type": "object", "required": ["connected"]}},
}


@pytest.fixture(scope="module", autouse=True)
def remove_users():
    yield
    if ROOT:
        subprocess.run(["userdel", user_name(NAME)], capture_output=True)


@pytest.fixture
def setup():
    workdir = Path(tempfile.mkdtemp(prefix="qga-chan-"))
    os.chmod(workdir, 0o755)
    bundles = HelloBundles(workdir, name=NAME)
    master, slave = pty.openpty()
    tty.setraw(slave)
    guest = Guest(bundles)
    os.symlink(os.ttyname(slave), guest.workdir / "ports" / "test-legacy.0")
    guest.start()
    yield guest, bundles, master
    print(guest.log()[-3000:])
    guest.close()
    os.close(master)
    os.close(slave)
    shutil.rmtree(workdir, ignore_errors=True)


def host_read(master, want, timeout=5.0):
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < len(want) and time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            data += os.read(master, 65536)
    return data


def test_the_port_is_relayed_to_the_extension(setup):
    guest, bundles, master = setup
    record = guest.client.push(bundles.build("1.0.0", counter=10, script=UPPER,
                                             manifest=MANIFEST))
    assert record["state"] == "done", guest.log()
    status = guest.status()
    assert status["mode"] == "channel" and status["host-connected"] is True
    os.write(master, b'{"__name__": "refresh"}\n')
    assert host_read(master, b'{"__NAME__": "REFRESH"}\n') == b'{"__NAME__": "REFRESH"}\n'
    big = bytes(range(97, 123)) * 40000  # about 1 MB, both ways through the bounded buffers
    sent = 0
    received = b""
    while sent < len(big) or len(received) < len(big):
        readable, writable, _ = select.select([master], [master] if sent < len(big) else [],
                                              [], 5)
        assert readable or writable, (sent, len(received))
        if writable:
            sent += os.write(master, big[sent:sent + 4096])
        if readable:
            received += os.read(master, 65536)
    assert received == big.upper()
    events = guest.client.ext_events(NAME)["events"]
    assert {"name": "host", "data": {"connected": True}} in [
        {"name": e["name"], "data": e["data"]} for e in events]
    guest.client.ping()
