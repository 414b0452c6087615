"""guest-set-vcpus and guest-set-memory-blocks: hot-(un)plug through sysfs.

Both write ``online`` state files under ``/sys/devices/system`` exactly as
qemu-ga does, including its error texts and its habits:

* guest-set-vcpus works through the list in order and stops at the first
  failure; it returns how many entries succeeded and fails only when the
  very first one did.  A cpu without an ``online`` file (cpu0, usually)
  cannot be offlined; asking for it to be online "succeeds".
* guest-set-memory-blocks answers every block, with a ``response`` and, on
  failure, the errno in ``error-code``.  The errno is reported even in a few
  "success" answers, because qemu-ga does.

Nested arguments keep their QAPI member names (``logical-id``,
``phys-index``).  The sysfs root moves under ``$QGA_TEST_SYSROOT`` in tests.
"""

from __future__ import annotations

import errno as errno_codes
import os
from typing import Optional

from qga.commands import command
from qga.commands.sysutil import system_path
from qga.errors import CommandError

CPU_DIR = "/sys/devices/system/cpu"
MEMORY_DIR = "/sys/devices/system/memory/"
UINT64 = 1 << 64


# -- vcpus --------------------------------------------------------------------------


@command("guest-set-vcpus")
def set_vcpus(ctx, vcpus):
    processed = 0
    for vcpu in vcpus:
        try:
            _set_vcpu_online(vcpu["logical-id"], vcpu["online"])
        except CommandError:
            if processed == 0:
                raise
            break
        processed += 1
    return processed


def _set_vcpu_online(logical_id: int, online: bool) -> None:
    dirpath = system_path(f"{CPU_DIR}/cpu{logical_id}/")
    try:
        dirfd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise CommandError(f'open("{dirpath}"): {os.strerror(error.errno)}') from None
    try:
        _transfer_vcpu(dirfd, dirpath, logical_id, online)
    finally:
        os.close(dirfd)


def _transfer_vcpu(dirfd: int, dirpath: str, logical_id: int, online: bool) -> None:
    name = f"{dirpath}/online"
    try:
        fd = os.open("online", os.O_RDWR | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as error:
        if error.errno != errno_codes.ENOENT:
            raise CommandError(f'open("{name}"): {os.strerror(error.errno)}') from None
        if not online:
            raise CommandError(f"logical processor #{logical_id} can't be offlined") from None
        return  # no switch: the cpu is always online, so "re-onlining" succeeds
    try:
        try:
            current = os.pread(fd, 1, 0)
        except OSError as error:
            raise CommandError(f'pread("{name}"): {os.strerror(error.errno)}') from None
        if not current:
            raise CommandError(f'pread("{name}"): unexpected EOF')
        if online != (current != b"0"):
            try:
                os.pwrite(fd, b"1" if online else b"0", 0)
            except OSError as error:
                raise CommandError(f'pwrite("{name}"): {os.strerror(error.errno)}') from None
    finally:
        os.close(fd)


# -- memory blocks ------------------------------------------------------------------


@command("guest-set-memory-blocks")
def set_memory_blocks(ctx, mem_blks):
    return [_set_memory_block(block["phys-index"] % UINT64, block["online"]) for block in mem_blks]


class _BlockAnswer:
    """One GuestMemoryBlockResponse being filled in, the way qemu-ga fills it."""

    def __init__(self, phys_index: int):
        self.phys_index = phys_index
        self.response = "success"  # qemu-ga's zero-initialised enum value
        self.error_code: Optional[int] = None

    def fail(self, errno: int, response: Optional[str] = None) -> "_BlockAnswer":
        if response is not None:
            self.response = response
        self.error_code = errno
        return self

    def reply(self) -> dict:
        # Schema order: the reply writer turns it into qemu-ga's QDict order.
        answer = {"phys-index": self.phys_index, "response": self.response}
        if self.error_code is not None:
            answer["error-code"] = self.error_code
        return answer


def _set_memory_block(phys_index: int, online: bool) -> dict:
    return _transfer_memory_block(_BlockAnswer(phys_index), online).reply()


def _transfer_memory_block(answer: _BlockAnswer, online: bool) -> _BlockAnswer:
    memory_dir = system_path(MEMORY_DIR)
    try:
        os.close(os.open(memory_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError as error:
        # No memory directory in sysfs: this guest cannot hot-plug memory.
        missing = error.errno == errno_codes.ENOENT
        return answer.fail(error.errno, "operation-not-supported" if missing else None)
    # qemu-ga prints the uint64 index with PRId64.
    signed_index = answer.phys_index - UINT64 if answer.phys_index >= 1 << 63 else answer.phys_index
    dirpath = f"{memory_dir}memory{signed_index}/"
    try:
        dirfd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        found = error.errno != errno_codes.ENOENT
        return answer.fail(error.errno, "operation-failed" if found else "not-found")
    try:
        return _switch_block(dirfd, answer, online)
    finally:
        os.close(dirfd)


def _switch_block(dirfd: int, answer: _BlockAnswer, online: bool) -> _BlockAnswer:
    try:
        state = _read_sysfs(dirfd, "state", 10)
    except OSError as error:
        if error.errno == errno_codes.ENOENT:
            # An old kernel without the state file: blocks are always online.
            return answer.fail(error.errno, None if online else "operation-not-supported")
        return answer.fail(error.errno, "operation-failed")
    if online != state.startswith(b"online"):
        try:
            _write_sysfs(dirfd, "state", b"online" if online else b"offline")
        except OSError as error:
            return answer.fail(error.errno, "operation-failed")
    return answer


def _read_sysfs(dirfd: int, name: str, size: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if not data:
        raise OSError(0, "unexpected EOF")  # qemu-ga reports errno 0 here
    return data


def _write_sysfs(dirfd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)

