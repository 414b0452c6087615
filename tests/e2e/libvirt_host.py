"""A private libvirtd for the end-to-end tests, and the guest as a libvirt domain.

libvirtd runs without systemd, started by the test itself, in a mount
namespace of its own (``unshare --mount``) where ``/etc/libvirt``,
``/run/libvirt``, ``/var/lib/libvirt`` and ``/var/log/libvirt`` are
bind mounts of directories under the test's work directory.  So the test
changes nothing of the machine's libvirt (no config file edited, no socket
or state left behind) and can set what it needs in its own ``qemu.conf``:

* QEMU runs as root with no security driver and no ownership changes, so
  the kernel, initrd and disk can stay where the test put them;
* that also keeps libvirt's QEMU capability cache valid between domains:
  with the packaged defaults (QEMU as ``libvirt-qemu``) on a machine whose
  ``/dev/kvm`` is root-only (no udev), libvirt finds KVM "enabled when
  probing, but not available now", drops the cache and re-probes QEMU on
  every lookup: about a minute per ``virsh create``.

``/var/cache/libvirt`` is bound to a directory of the e2e cache, so the
capability probe (a few seconds) is paid once per machine, not per run.
Clients reach the daemon through ``qemu:///system?socket=...``.  Stopping
destroys every domain, then kills libvirtd and any QEMU left, by PID.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional

from tests.support.vm import AGENT_PORT, kernel_cmdline

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
"""

LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
log_outputs = "3:stderr"
"""

# Host directory -> name of its private stand-in under the work directory.
PRIVATE_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
}


def libvirt_missing_reason() -> Optional[str]:
    for tool in ("libvirtd", "virsh", "unshare"):
        if shutil.which(tool) is None:
            return (f"{tool} is not installed (apt-get install libvirt-daemon-system "
                    "libvirt-clients)")
    if os.geteuid() != 0:
        return "a private libvirtd needs root (mount namespace, system mode)"
    return None


class PrivateLibvirt:
    """libvirtd serving ``uri`` from ``workdir``; caps cache in ``cache_dir``."""

    def __init__(self, workdir: Path, cache_dir: Path):
        self.workdir = workdir
        self.cache_dir = cache_dir
        self.socket_path = workdir / "run" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket_path}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> "PrivateLibvirt":
        for name in PRIVATE_DIRS.values():
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (self.workdir / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        mounts = dict(PRIVATE_DIRS)
        binds = [(str(self.workdir / name), host) for host, name in mounts.items()]
        binds.append((str(self.cache_dir), "/var/cache/libvirt"))
        script = "set -e\n"
        for source, target in binds:
            script += f"mkdir -p {shlex.quote(target)}\n"
            script += f"mount --bind {shlex.quote(source)} {shlex.quote(target)}\n"
        script += "exec libvirtd\n"
        with open(self.workdir / "libvirtd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited with {self.proc.returncode}: {self.log_tail()}")
            if self._accepts():
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not listen in {timeout} s: {self.log_tail()}")
            time.sleep(0.05)

    def _accepts(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(self.socket_path))
            return True
        except OSError:
            return False

    def log_tail(self) -> str:
        try:
            return (self.workdir / "libvirtd.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def virsh(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run virsh against this daemon; never raises for a non-zero status."""
        return subprocess.run(["virsh", "-c", self.uri, *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout)

    def domain_names(self) -> List[str]:
        done = self.virsh("list", "--all", "--name", timeout=15)
        return [name for name in done.stdout.split() if name]

    def qemu_pids(self) -> List[int]:
        """PIDs of the QEMU processes this daemon started (from its pid files)."""
        pids = []
        for pidfile in (self.workdir / "run" / "qemu").glob("*.pid"):
            try:
                pids.append(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                pass
        return pids

    def stop(self) -> None:
        if self.proc is None:
            return
        leftovers = self.qemu_pids()
        if self.proc.poll() is None:
            for name in self.domain_names():
                self.virsh("destroy", name, timeout=15)
            leftovers += self.qemu_pids()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in set(leftovers):
            _kill_qemu(pid)


def _kill_qemu(pid: int) -> None:
    """SIGKILL ``pid`` if it still is a QEMU process (a pid file may be stale)."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            if not comm.read().startswith("qemu"):
                return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


def domain_xml(name: str, kernel: Path, initrd: Path, disk: Path, console: Path,
               agent: str, memory_mib: int = 512) -> str:
    """A direct-kernel-boot TCG domain with the data disk and the agent channel."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{kernel_cmdline(agent)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' discard='unmap'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='{AGENT_PORT}'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
"""
