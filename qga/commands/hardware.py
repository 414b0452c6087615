"""Read-only processor and memory inventory: vCPUs, memory blocks, CPU time statistics.

The replies come from sysfs and ``/proc/stat`` exactly as qemu-ga reads them:
directory entries in ``readdir`` order (management software maps entries by
id, but a faithful order keeps replies byte-for-byte comparable), the same
fallbacks when a file is missing, and the same error texts (paths included,
down to qemu-ga's doubled slash in ``cpuN//online``).

:func:`read_vcpu` and :func:`vcpu_dir` are public for ``guest-set-vcpus``;
:func:`memory_block_dir` for ``guest-set-memory-blocks``.
"""

from __future__ import annotations

import errno
import os
import re
from typing import List, Optional

from qga.commands import command
from qga.commands.system import read_file
from qga.errors import CommandError

CPU_SYSFS_DIR = "/sys/devices/system/cpu"
MEMORY_SYSFS_DIR = "/sys/devices/system/memory/"
PROC_STAT = "/proc/stat"

# sscanf(name, "cpu%" PRId64): "cpu", optional blanks and sign, digits.
_CPU_ENTRY = re.compile(r"cpu[ \t\n\v\f\r]*([+-]?[0-9]+)")


def _errno_text(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else "Success"


# -- guest-get-vcpus --------------------------------------------------------------


def vcpu_dir(logical_id: int, cpu_dir: str = CPU_SYSFS_DIR) -> str:
    """qemu-ga's directory path for a logical CPU, trailing slash included."""
    return f"{cpu_dir}/cpu{logical_id}/"


def read_vcpu(logical_id: int, cpu_dir: str = CPU_SYSFS_DIR) -> dict:
    """One ``GuestLogicalProcessor`` as qemu-ga reads it (``transfer_vcpu``, system to reply).

    A CPU without an ``online`` file (usually cpu0) is online and cannot be
    offlined; otherwise it is online unless the file starts with ``0``.
    """
    directory = vcpu_dir(logical_id, cpu_dir)
    online_path = directory + "/online"  # qemu-ga prints "%s/%s" after a trailing slash
    try:
        fd = os.open(directory + "online", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        if error.errno != errno.ENOENT:
            raise CommandError(f'open("{online_path}"): {_errno_text(error)}') from None
        # Tell a missing file from a missing directory, as qemu-ga's
        # open(dir) + openat(dir, "online") does.
        try:
            os.close(os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError as dir_error:
            raise CommandError(f'open("{directory}"): {_errno_text(dir_error)}') from None
        return {"logical-id": logical_id, "online": True, "can-offline": False}
    try:
        status = os.pread(fd, 1, 0)
    except OSError as error:
        raise CommandError(f'pread("{online_path}"): {_errno_text(error)}') from None
    finally:
        os.close(fd)
    if not status:
        raise CommandError(f'pread("{online_path}"): unexpected EOF')
    return {"logical-id": logical_id, "online": status != b"0", "can-offline": True}


def list_vcpus(cpu_dir: str = CPU_SYSFS_DIR) -> List[dict]:
    """Every ``cpuN`` directory in ``readdir`` order."""
    try:
        names = os.listdir(cpu_dir)
    except OSError as error:
        raise CommandError(f"failed to list entries: {cpu_dir}: {_errno_text(error)}") from None
    vcpus = []
    for name in names:
        match = _CPU_ENTRY.match(name)
        if match is not None:
            vcpus.append(read_vcpu(int(match.group(1)), cpu_dir))
    return vcpus


@command("guest-get-vcpus")
def get_vcpus(ctx) -> list:
    return list_vcpus()


# -- guest-get-memory-blocks / guest-get-memory-block-info ---------------------------


def memory_block_dir(phys_index: int, memory_dir: str = MEMORY_SYSFS_DIR) -> str:
    """qemu-ga's directory path for a memory block, trailing slash included."""
    return f"{memory_dir}memory{phys_index}/"


class _SysfsError(Exception):
    """A failed sysfs read: qemu-ga's error text, and the errno its callers test."""

    def __init__(self, desc: str, error_number: Optional[int]):
        super().__init__(desc)
        self.desc = desc
        self.errno = error_number


def _read_sysfs_file(dir_fd: int, name: str, size: int) -> bytes:
    """qemu-ga's ``ga_read_sysfs_file``: up to ``size`` bytes, or :class:`_SysfsError`."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as error:
        raise _SysfsError(f'open sysfs file "{name}": {_errno_text(error)}', error.errno) from None
    try:
        data = os.pread(fd, size, 0)
    except OSError as error:
        raise _SysfsError(f'pread sysfs file "{name}": {_errno_text(error)}', error.errno) from None
    finally:
        os.close(fd)
    if not data:
        raise _SysfsError(f'pread sysfs file "{name}": unexpected EOF', 0)
    return data


def read_memory_block(phys_index: int, memory_dir: str = MEMORY_SYSFS_DIR) -> dict:
    """One ``GuestMemoryBlock`` as qemu-ga reads it (``transfer_memory_block``, system to reply)."""
    directory = memory_block_dir(phys_index, memory_dir)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise CommandError(f'open("{directory}"): {_errno_text(error)}') from None
    try:
        try:
            state = _read_sysfs_file(dir_fd, "state", 10)
        except _SysfsError as error:
            if error.errno == errno.ENOENT:  # old kernels: no state file
                return {"phys-index": phys_index, "online": True, "can-offline": False}
            raise CommandError(error.desc) from None
        try:
            can_offline = _read_sysfs_file(dir_fd, "removable", 1) != b"0"
        except _SysfsError as error:
            if error.errno != errno.ENOENT:
                raise CommandError(error.desc) from None
            can_offline = False
    finally:
        os.close(dir_fd)
    return {"phys-index": phys_index, "online": state.startswith(b"online"), "can-offline": can_offline}


def _strtoul(text: bytes) -> int:
    """C ``strtoul(text, NULL, 10)`` for the digits after ``memory``."""
    match = re.match(rb"[ \t\n\v\f\r]*([+-]?)([0-9]*)", text)
    assert match is not None
    value = min(int(match.group(2) or b"0"), 2**64 - 1)
    return (-value) % 2**64 if match.group(1) == b"-" else value


def list_memory_blocks(memory_dir: str = MEMORY_SYSFS_DIR) -> List[dict]:
    """Every ``memoryN`` directory in ``readdir`` order; ``[]`` without memory hotplug support."""
    try:
        entries = list(os.scandir(memory_dir))
    except FileNotFoundError:
        return []
    except OSError as error:
        # qemu-ga's format string lacks the space before the quote.
        raise CommandError(f'Can\'t open directory"{memory_dir}": {_errno_text(error)}') from None
    blocks = []
    for entry in entries:
        if entry.name.startswith("memory") and entry.is_dir(follow_symlinks=False):
            blocks.append(read_memory_block(_strtoul(os.fsencode(entry.name[6:])), memory_dir))
    if not blocks:
        raise CommandError("guest reported zero memory blocks!")
    return blocks


@command("guest-get-memory-blocks")
def get_memory_blocks(ctx) -> list:
    return list_memory_blocks()


def _strtol_hex(text: bytes) -> int:
    """C ``strtol(text, NULL, 16)``, saturating like glibc."""
    match = re.match(rb"[ \t\n\v\f\r]*([+-]?)(?:0[xX](?=[0-9a-fA-F]))?([0-9a-fA-F]*)", text)
    assert match is not None
    value = int(match.group(2) or b"0", 16)
    if match.group(1) == b"-":
        return max(-value, -2**63)
    return min(value, 2**63 - 1)


def memory_block_size(memory_dir: str = MEMORY_SYSFS_DIR) -> int:
    try:
        dir_fd = os.open(memory_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise CommandError(f'open("{memory_dir}"): {_errno_text(error)}') from None
    try:
        data = _read_sysfs_file(dir_fd, "block_size_bytes", 20)
    except _SysfsError as error:
        raise CommandError(error.desc) from None
    finally:
        os.close(dir_fd)
    return _strtol_hex(data) % 2**64  # the reply member is a uint64


@command("guest-get-memory-block-info")
def get_memory_block_info(ctx) -> dict:
    return {"size": memory_block_size()}


# -- guest-get-cpustats --------------------------------------------------------------

# /proc/stat columns after the name, with the reply member for each.
_CPUSTAT_MEMBERS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
                    "guest", "guestnice")


def parse_cpustats(text: bytes, ticks_per_second: int) -> List[dict]:
    """``cpuN`` lines of ``/proc/stat`` in milliseconds, as qemu-ga converts them.

    The first four values are always present; later ones only when the line
    has them (``irq`` brings ``softirq`` along, as in qemu-ga).  A ``cpuN``
    line with fewer than four values ends the list.
    """
    stats = []
    for line in text.split(b"\n"):
        fields = line.split()
        if not fields:
            continue
        name = fields[0]
        if not name.startswith(b"cpu") or name == b"cpu":
            continue
        values = []
        for field in fields[1:11]:
            if not field.isdigit():
                break
            values.append(int(field) % 2**64)
        if len(values) < 4:
            break
        entry = {"type": "linux", "cpu": _atoi(name[3:])}
        for member, value in zip(_CPUSTAT_MEMBERS, values):
            entry[member] = value * 1000 // ticks_per_second % 2**64
        if len(values) == 6:
            entry["softirq"] = 0  # qemu-ga reports it whenever irq is there
        stats.append(entry)
    return stats


def _atoi(text: bytes) -> int:
    match = re.match(rb"[ \t\n\v\f\r]*([+-]?[0-9]+)", text)
    return int(match.group(1)) if match else 0


@command("guest-get-cpustats")
def get_cpustats(ctx) -> list:
    try:
        text = read_file(PROC_STAT)
    except OSError as error:
        raise CommandError(f'open("{PROC_STAT}"): {_errno_text(error)}') from None
    return parse_cpustats(text, os.sysconf("SC_CLK_TCK"))
