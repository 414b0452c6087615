"""Boot the end-to-end guest in ``qemu-system-x86_64`` with the agent on virtio-serial.

The guest (see :mod:`tests.support.guest_image`) boots PVH straight into
Debian's kernel, under TCG (KVM does not work on these machines, see
``../shared/reference/vm-e2e.md``; it is used when ``/dev/kvm`` really works
and ``QGA_E2E_KVM=1`` asks for it).  The agent port
``org.qemu.guest_agent.0`` is a Unix socket chardev in the VM's work
directory; a small ext4 disk made on the host is attached as ``/dev/vda``
and mounted at ``/mnt/data`` in the guest.  More named virtio-serial ports
(``extra_ports``, e.g. oVirt's ``ovirt-guest-agent.0``) can be added, each a
chardev socket of its own; the guest's init links them all under
``/dev/virtio-ports``.

Every QEMU process is started in its own process group and killed by PID
when the VM is stopped, whatever state it is in.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from tests.support.guest_image import GuestImage, guest_initrd

QEMU = "qemu-system-x86_64"
AGENT_PORT = "org.qemu.guest_agent.0"
GUEST_DATA_MOUNT = "/mnt/data"
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1 rdinit=/init"


def qemu_missing_reason() -> Optional[str]:
    """Why a VM cannot be booted here, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 is not installed (apt-get install e2fsprogs)"
    return None


def make_data_disk(path: Path, size_mib: int = 32) -> Path:
    """An ext4 image with one small file, made on the host without mounting anything."""
    content = path.with_suffix(".content")
    content.mkdir(parents=True, exist_ok=True)
    (content / "hello.txt").write_text("hello from the host\n")
    with open(path, "wb") as image:
        image.truncate(size_mib * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "qgadata", "-d", str(content), str(path)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shutil.rmtree(content)
    return path


def kernel_cmdline(agent: str, ports: int = 1) -> str:
    """The command line: the agent to run and how many named ports init waits for."""
    return f"{KERNEL_CMDLINE} qga_agent={agent} qga_ports={ports}"


class QemuVM:
    """One guest with ``agent`` ("qga" or "qemu-ga") serving the virtio-serial port.

    ``workdir`` holds the chardev socket (``agent.sock``), the serial
    console log (``console.log``), the data disk and the initrd.
    ``extra_ports`` maps more port names to their chardev socket paths
    (QEMU listens on each, like libvirt's bind-mode channels).
    """

    def __init__(self, image: GuestImage, workdir: Path, agent: str = "qga",
                 memory_mib: int = 512, cpus: int = 1,
                 extra_ports: Optional[Mapping[str, Path]] = None):
        self.image = image
        self.workdir = workdir
        self.agent = agent
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.extra_ports: Dict[str, Path] = dict(extra_ports or {})
        self.socket_path = workdir / "agent.sock"
        self.console = workdir / "console.log"
        self.disk = workdir / "data.img"
        self.proc: Optional[subprocess.Popen] = None
        self.started_at: Optional[float] = None

    def argv(self, initrd: Path) -> List[str]:
        accel = "kvm" if os.environ.get("QGA_E2E_KVM") == "1" else "tcg"
        return [
            QEMU, "-accel", accel, "-machine", "pc", "-m", str(self.memory_mib),
            "-smp", str(self.cpus), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", f"file:{self.console}", "-no-reboot",
            "-kernel", str(self.image.kernel), "-initrd", str(initrd),
            "-append", kernel_cmdline(self.agent, 1 + len(self.extra_ports)),
            "-chardev", f"socket,path={self.socket_path},server=on,wait=off,id=qga0",
            "-device", "virtio-serial",
            "-device", f"virtserialport,chardev=qga0,name={AGENT_PORT}",
            *self._extra_port_argv(),
            "-drive", f"file={self.disk},if=virtio,format=raw",
        ]

    def _extra_port_argv(self) -> List[str]:
        argv: List[str] = []
        for number, (name, path) in enumerate(sorted(self.extra_ports.items()), 1):
            argv += ["-chardev", f"socket,path={path},server=on,wait=off,id=port{number}",
                     "-device", f"virtserialport,chardev=port{number},name={name}"]
        return argv

    def start(self) -> "QemuVM":
        self.workdir.mkdir(parents=True, exist_ok=True)
        make_data_disk(self.disk)
        initrd = guest_initrd(self.image, self.workdir)
        self.started_at = time.monotonic()
        with open(self.workdir / "qemu.stderr", "wb") as stderr:
            self.proc = subprocess.Popen(self.argv(initrd), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=stderr,
                                         start_new_session=True)
        deadline = time.monotonic() + 10
        while not all(path.exists() for path in (self.socket_path, *self.extra_ports.values())):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}: {self.qemu_stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not create its chardev sockets in 10 s")
            time.sleep(0.01)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> Optional[int]:
        """QEMU's exit status, or None if it is still running after ``timeout``."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Kill QEMU by PID (the guest needs no clean shutdown: nothing in it persists)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def qemu_stderr(self) -> str:
        try:
            return (self.workdir / "qemu.stderr").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        """What to print when a test fails: QEMU's stderr and the console's tail."""
        return (f"QEMU pid {self.proc.pid if self.proc else None}, "
                f"status {self.proc.poll() if self.proc else None}\n"
                f"qemu stderr: {self.qemu_stderr()}\n"
                f"console tail:\n{self.console_text()[-3000:]}")


def wait_for_agent(path: Path, timeout: float, vm: Optional[QemuVM] = None) -> float:
    """Seconds until the agent behind chardev socket ``path`` answers a sync.

    One ``guest-sync-delimited`` is sent and awaited; it is resent rarely,
    because QEMU holds host bytes until the guest opens its port (and stops
    reading the socket when its buffer is full).
    """
    from qga.errors import ClientError
    from qga.host.client import Client

    start = time.monotonic()
    deadline = start + timeout
    client = Client(path, timeout=5.0, sync_timeout=5.0)
    try:
        while True:
            if vm is not None and not vm.running():
                raise RuntimeError("QEMU exited before the agent answered\n" + vm.diagnostics())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no agent reply within {timeout} s"
                                   + ("\n" + vm.diagnostics() if vm else ""))
            try:
                client.sync(timeout=min(5.0, remaining))
                return time.monotonic() - start
            except ClientError:
                client.close()
                time.sleep(0.05)
    finally:
        client.close()
