"""Our agent inside a real QEMU guest, on the real virtio-serial port, driven from the host.

One TCG virtual machine is booted for the module (see
``tests/support/vm.py``): Debian's kernel, Debian's python3 and Debian's
packages of our dependencies, the live checkout's ``qga`` package, a
virtio ext4 disk at ``/mnt/data``.  The tests run in file order and the last
one shuts the guest down through the agent.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from qga import QEMU_GA_VERSION
from qga.errors import AgentError
from qga.host.client import Client
from tests.support.vm import GUEST_DATA_MOUNT, QemuVM, wait_for_agent

pytestmark = pytest.mark.e2e

FIRST_REPLY_TIMEOUT = 90.0  # TCG boot plus the interpreter's start, with headroom for a busy CI
FROZEN_SECONDS = 2.0


@pytest.fixture(scope="module")
def vm(guest_image, module_workdir, measure, request):
    machine = QemuVM(guest_image, module_workdir, agent="qga")
    try:
        machine.start()
        first_reply = wait_for_agent(machine.socket_path, FIRST_REPLY_TIMEOUT, machine)
        measure("qga in QEMU: QEMU start -> first reply (s)", time.monotonic() - machine.started_at)
        assert first_reply > 0
        yield machine
    finally:
        if request.session.testsfailed:
            print(machine.diagnostics())
        machine.stop()


@pytest.fixture
def client(vm):
    if not vm.running():
        pytest.fail("the VM is not running any more\n" + vm.diagnostics())
    with Client(vm.socket_path, timeout=30.0, sync_timeout=15.0) as connected:
        connected.sync()
        yield connected


def guest_shell(client: Client, script: str, timeout: float = 30.0):
    return client.exec("/bin/sh", ["-c", script], timeout=timeout)


def test_sync_ping_and_info(client):
    client.sync()
    client.ping()
    info = client.info()
    assert info["version"] == QEMU_GA_VERSION
    enabled = {entry["name"] for entry in info["supported_commands"] if entry["enabled"]}
    for name in ("guest-sync-delimited", "guest-file-open", "guest-exec", "guest-fsfreeze-freeze-list",
                 "guest-shutdown", "guest-get-fsinfo"):
        assert name in enabled


def test_agent_runs_on_debian_packages(client):
    """The guest's python3 imports our dependencies from Debian's dist-packages."""
    result = guest_shell(client, "/usr/bin/python3 -c 'import sys, psutil, jsonschema, "
                         "cryptography, serial, qga; print(sys.version_info[:2]); "
                         "[print(m.__file__) for m in (psutil, jsonschema, cryptography, serial)]; "
                         "print(qga.__file__)'")
    assert result.exitcode == 0, result.stderr
    lines = result.stdout.decode().split()
    assert lines[0:2] == ["(3,", "11)"]
    for path in lines[2:6]:
        assert path.startswith("/usr/lib/python3/dist-packages/"), path
    assert lines[6] == "/opt/qga/qga/__init__.py"
    # The process serving the port is our module on that interpreter.
    agents = guest_shell(client, "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done")
    assert any(line.startswith("/usr/bin/python3 -m qga -m virtio-serial")
               for line in agents.stdout.decode().splitlines())


def test_filesystem_info_sees_the_virtio_disk(client):
    filesystems = client.call("guest-get-fsinfo")
    data = [fs for fs in filesystems if fs["mountpoint"] == GUEST_DATA_MOUNT]
    assert len(data) == 1, filesystems
    assert data[0]["type"] == "ext4"
    assert data[0]["name"] == "vda"
    assert data[0]["disk"][0]["bus-type"] == "virtio"
    assert data[0]["disk"][0]["dev"] == "/dev/vda"


def test_file_round_trip_of_several_megabytes(client, measure):
    payload = os.urandom(6 * 1024 * 1024 + 12345)
    path = f"{GUEST_DATA_MOUNT}/blob.bin"
    started = time.monotonic()
    assert client.write_file(path, payload) == len(payload)
    write_seconds = time.monotonic() - started
    started = time.monotonic()
    back = client.read_file(path)
    read_seconds = time.monotonic() - started
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(payload).hexdigest()
    in_guest = guest_shell(client, f"sha256sum {path}")
    assert in_guest.stdout.decode().split()[0] == hashlib.sha256(payload).hexdigest()
    measure("qga in QEMU: guest-file-write, 6 MiB (MB/s)", len(payload) / write_seconds / 1e6)
    measure("qga in QEMU: guest-file-read, 6 MiB (MB/s)", len(payload) / read_seconds / 1e6)
    guest_shell(client, f"rm {path}")


def test_exec_status_output_and_input(client):
    result = guest_shell(client, "echo out; echo err >&2; exit 3")
    assert (result.exitcode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    piped = client.exec("/bin/cat", input_data=b"through stdin\n")
    assert (piped.exitcode, piped.stdout) == (0, b"through stdin\n")
    killed = guest_shell(client, "kill -9 $$")
    assert killed.signal == 9


def test_fsfreeze_blocks_writers_until_thaw(client, measure):
    """A writer on the frozen disk stalls for the whole freeze; the marker file comes and goes."""
    marker = "/run/qga-state/qga.state.isfrozen"
    # guest-exec is refused while frozen, so both loops start before the freeze.
    writer = client.call("guest-exec", {"path": "/bin/sh", "arg": [
        "-c", f"while :; do cut -d' ' -f1 /proc/uptime >> {GUEST_DATA_MOUNT}/ticks; "
              "usleep 50000; done"]})["pid"]
    watcher = client.call("guest-exec", {"path": "/bin/sh", "arg": [
        "-c", f"while :; do if [ -e {marker} ]; then s=frozen; else s=thawed; fi; "
              "echo $(cut -d' ' -f1 /proc/uptime) $s >> /run/watch; usleep 50000; done"]})["pid"]
    try:
        time.sleep(0.7)
        assert client.call("guest-fsfreeze-status") == "thawed"
        assert client.call("guest-fsfreeze-freeze-list",
                           {"mountpoints": [GUEST_DATA_MOUNT]}) == 1
        frozen_at = time.monotonic()
        assert client.call("guest-fsfreeze-status") == "frozen"
        with pytest.raises(AgentError) as refused:
            client.call("guest-file-open", {"path": "/tmp/x", "mode": "w"})
        assert refused.value.error_class == "CommandNotFound"
        time.sleep(FROZEN_SECONDS)
        assert client.call("guest-fsfreeze-thaw") == 1
        measure("qga in QEMU: freeze -> thaw held (s)", time.monotonic() - frozen_at)
        assert client.call("guest-fsfreeze-status") == "thawed"
        time.sleep(0.7)
    finally:
        if client.call("guest-fsfreeze-status") == "frozen":
            client.call("guest-fsfreeze-thaw")
        client.exec("/bin/kill", [str(writer), str(watcher)])
        for pid in (writer, watcher):
            client.wait_exec(pid, timeout=10)
    ticks = [float(value) for value in
             client.read_file(f"{GUEST_DATA_MOUNT}/ticks").decode().split()]
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
    longest = max(gaps)
    measure("qga in QEMU: longest stall of a writer on the frozen disk (s)", longest)
    assert longest >= FROZEN_SECONDS * 0.8, gaps
    assert gaps.index(longest) < len(gaps) - 2, "the writer did not resume after the thaw"
    states = [line.split()[1] for line in client.read_file("/run/watch").decode().splitlines()]
    first_frozen = states.index("frozen")
    assert "thawed" in states[first_frozen:], "the frozen marker was never removed"
    assert states[-1] == "thawed"


def test_host_reconnects_are_answered_at_once(vm, measure):
    """The agent keeps the port open while the host is away and answers a new host at once."""
    times = []
    for _ in range(5):
        with Client(vm.socket_path, timeout=10.0, sync_timeout=10.0) as client:
            started = time.monotonic()
            client.sync()
            synced = time.monotonic()
            client.ping()
            times.append((synced - started, time.monotonic() - synced))
        time.sleep(0.3)  # the host is absent: the guest port reports HUP meanwhile
    first_replies = [sync for sync, _ in times]
    measure("qga in QEMU: first reply after a host reconnect, max of 5 (ms)",
            max(first_replies) * 1000)
    measure("qga in QEMU: ping after a reconnect, max of 5 (ms)",
            max(ping for _, ping in times) * 1000)
    assert max(first_replies) < 1.0, times
    assert "exited with status" not in vm.console_text(), "the agent restarted"


def test_guest_shutdown_stops_qemu(vm, client, measure):
    started = time.monotonic()
    assert client.call("guest-shutdown") is None
    status = vm.wait_exit(30)
    assert status == 0, vm.diagnostics()
    measure("qga in QEMU: guest-shutdown -> QEMU exited (s)", time.monotonic() - started)
