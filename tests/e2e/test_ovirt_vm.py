"""The oVirt extension in the real QEMU guest: push, negotiate, heartbeat, shut down.

The guest (see ``tests/support/vm.py``) runs our agent as root on
``org.qemu.guest_agent.0`` and has a second virtio-serial port,
``ovirt-guest-agent.0``, whose host side is a chardev socket a fake VDSM
(:class:`tests.support.fake_vdsm.FakeVdsm`, VDSM's reader line for line)
connects to as the VM starts, as VDSM does.  The test:

1. trusts a throwaway key in the guest (``/etc/qga/trust.d``, written
   through the agent) and pushes the oVirt bundle signed with it over the
   agent's channel (its reporting loop 5 times faster through the
   manifest's settings defaults);
2. sees the extension run as its own system user, which the agent created
   with Debian's real ``useradd``;
3. has VDSM see the startup set, the negotiation to API 3 (heartbeat
   ``apiVersion`` 0 then 3, ``api-version``, the v3 refresh burst) and
   later heartbeats, every message valid for the original's validator;
4. sends VDSM's ``shutdown``: the extension asks the core's ``shutdown``
   primitive, the core runs ``/sbin/shutdown -h +0 '"bye"'`` and the guest
   powers off: QEMU exits.
"""

from __future__ import annotations

import time

import pytest

from qga.host.client import Client
from tests.support.fake_vdsm import FakeVdsm, validate
from tests.support.ovirt_bundle import BURST_V3, NAME, PORT, STARTUP_V0, signed_bundle
from tests.support.vm import QemuVM, wait_for_agent

pytestmark = pytest.mark.e2e

TICK = 0.2                 # the reporting loop's tick: heartbeats every second
FIRST_REPLY_TIMEOUT = 90.0
STEP_TIMEOUT = 45.0        # one step in the guest under TCG on a busy CI machine
GUEST_TRUST_DIR = "/etc/qga/trust.d"
BURST_V0 = [name for name in BURST_V3 if name not in ("containers", "timezone", "os-info")]


@pytest.fixture
def ovirt_vm(guest_image, module_workdir, request):
    machine = QemuVM(guest_image, module_workdir, agent="qga",
                     extra_ports={PORT: module_workdir / "ovirt.sock"})
    try:
        machine.start()
        yield machine
    finally:
        if request.session.testsfailed:
            print(machine.diagnostics())
        machine.stop()


def trust_key(client: Client, trust_file: bytes) -> None:
    """Install the signing key's trust file in the guest (root's, 0644, as trust.py demands)."""
    script = (f"mkdir -p {GUEST_TRUST_DIR} && cat > {GUEST_TRUST_DIR}/vendor.json"
              f" && chmod 0644 {GUEST_TRUST_DIR}/vendor.json")
    result = client.exec("/bin/sh", ["-c", script], input_data=trust_file, timeout=30)
    assert result.exitcode == 0, result.stderr


def guest_text(client: Client, path: str) -> str:
    return client.read_file(path).decode()


def position(names, run, start: int = 0) -> int:
    """Where the messages ``run`` follow each other in ``names`` (from ``start``), or -1."""
    for index in range(start, len(names) - len(run) + 1):
        if names[index:index + len(run)] == run:
            return index
    return -1


def test_push_negotiate_heartbeat_and_shutdown(ovirt_vm, module_workdir, measure):
    vm = ovirt_vm
    (module_workdir / "bundle").mkdir()
    bundle = signed_bundle(module_workdir / "bundle", {"tick_interval": TICK})  # while it boots
    vdsm = FakeVdsm(str(vm.extra_ports[PORT]))     # connects and sends refresh, as VDSM does
    try:
        wait_for_agent(vm.socket_path, FIRST_REPLY_TIMEOUT, vm)
        booted = time.monotonic()
        with Client(vm.socket_path, timeout=60, sync_timeout=15) as client:
            client.sync()
            trust_key(client, (bundle.parent / "trust.d" / "vendor.json").read_bytes())
            record = client.push(str(bundle), install_timeout=STEP_TIMEOUT * 2)
            assert record["state"] == "done", record
            measure("oVirt in QEMU: first reply -> pushed, installed, ready (s)",
                    time.monotonic() - booted)

            # VDSM's trace of a fresh start: the startup set, the burst answering the
            # refresh VDSM sent on connecting (at version 0), heartbeat 0, heartbeat 3,
            # VDSM's api-version 3, the v3 burst.
            vdsm.wait_for("os-info", timeout=STEP_TIMEOUT)
            measure("oVirt in QEMU: first reply -> API 3 and its burst (s)",
                    time.monotonic() - booted)
            names = vdsm.names()
            assert names[:len(STARTUP_V0)] == STARTUP_V0, names
            assert position(names, BURST_V0, len(STARTUP_V0)) >= 0, names
            assert vdsm.effective_api_version == 3
            assert [beat["apiVersion"] for beat in vdsm.of("heartbeat")][:2] == [0, 3]
            assert vdsm.sent == [("refresh", {"apiVersion": 3, "__name__": "refresh"}),
                                 ("api-version", {"apiVersion": 3, "__name__": "api-version"})]
            second_beat = [index for index, name in enumerate(names) if name == "heartbeat"][1]
            assert position(names, BURST_V3, second_beat) > second_beat, names
            # Heartbeats go on, each with VDSM's units (free-ram: MiB as a string).
            count = len(vdsm.of("heartbeat"))
            beats = vdsm.wait_for("heartbeat", count + 2, timeout=STEP_TIMEOUT)
            assert all(beat["apiVersion"] == 3 for beat in beats[count:])
            assert isinstance(beats[-1]["free-ram"], str) and int(beats[-1]["free-ram"]) > 0
            for _, name, args in vdsm.messages:
                assert validate(name, args) == [], (name, args)
            assert not vdsm.exceptions and not vdsm.errors and vdsm.too_big == 0

            # It runs as its own system user, made by the real useradd with no login shell.
            status = client.ext_status(NAME)
            assert status["state"] == "running", status
            uid = next(int(line.split()[1]) for line in
                       guest_text(client, f"/proc/{status['pid']}/status").splitlines()
                       if line.startswith("Uid:"))
            users = {fields[0]: fields for fields in
                     (line.split(":") for line in guest_text(client, "/etc/passwd").splitlines())}
            user = users["qga-ext-" + NAME]
            assert int(user[2]) == uid and uid != 0
            assert user[6] == "/usr/sbin/nologin"
            groups = [line.split(":")[0] for line in
                      guest_text(client, "/etc/group").splitlines()]
            assert "qga-ext" in groups and "qga-ext-" + NAME in groups

        # VDSM's shutdown: the extension asks the core, the core runs shutdown, QEMU exits.
        asked = time.monotonic()
        vdsm.forward("shutdown", {"timeout": 0, "message": "bye", "reboot": "False"})
        exit_status = vm.wait_exit(STEP_TIMEOUT)
        assert exit_status is not None, "the guest did not power off\n" + vm.diagnostics()
        measure("oVirt in QEMU: shutdown command -> QEMU exits (s)", time.monotonic() - asked)
        assert exit_status == 0, vm.diagnostics()
        assert 'e2e-shutdown: -h +0 "bye"' in vm.console_text()
    finally:
        vdsm.close()
