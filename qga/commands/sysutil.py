"""Fixed system paths and helper programs for the commands that change the guest.

qemu-ga reaches the operating system through a handful of fixed paths
(``/sbin/shutdown``, ``/sbin/hwclock``, ``/sys/power/state``, the sysfs cpu
and memory directories) and a few programs found through ``PATH``
(``chpasswd``, ``systemctl``, ``pm-*``).  This module names the fixed paths in
one place and runs helper programs the way qemu-ga does, with one addition:
every wait is bounded by a time limit, because a hung helper would otherwise
wedge the single-threaded agent for good.

Test doubles.  Nothing in the test suite may power off, suspend, or reclock the
machine it runs on, so the fixed paths can be moved under a directory named by
the environment variable ``QGA_TEST_SYSROOT`` (only tests set it):
``/sbin/shutdown`` becomes ``$QGA_TEST_SYSROOT/sbin/shutdown`` and so on.
Programs found through ``PATH`` are replaced by putting scripts first on
``PATH``.  The variable only moves where the agent looks; it grants nothing
the agent's own environment could not already do.
"""

from __future__ import annotations

import os
import signal
from typing import Optional, Sequence

SYSROOT_VARIABLE = "QGA_TEST_SYSROOT"

# How long a helper program (shutdown, hwclock, chpasswd, systemctl, pm-*) may
# run.  qemu-ga waits forever; these programs normally finish in well under a
# second, so five minutes only ever cuts off a program that is truly stuck.
HELPER_TIMEOUT = 300.0


def system_path(path: str) -> str:
    """``path`` (absolute), moved under ``$QGA_TEST_SYSROOT`` when tests set it."""
    root = os.environ.get(SYSROOT_VARIABLE)
    if root:
        return root.rstrip("/") + path
    return path


class ChildStatus:
    """How a helper program ended: like a wait status, plus "we killed it"."""

    __slots__ = ("exited", "code", "signal", "timed_out")

    def __init__(self, exited: bool, code: int = 0, signal_number: int = 0, timed_out: bool = False):
        self.exited = exited
        self.code = code
        self.signal = signal_number
        self.timed_out = timed_out

    @classmethod
    def from_returncode(cls, returncode: int) -> "ChildStatus":
        if returncode < 0:
            return cls(False, signal_number=-returncode)
        return cls(True, code=returncode)

    def __repr__(self) -> str:
        if self.timed_out:
            return "ChildStatus(timed out)"
        if self.exited:
            return f"ChildStatus(exit {self.code})"
        return f"ChildStatus(signal {self.signal})"


def run_program(
    argv: Sequence[str],
    *,
    executable: Optional[str] = None,
    stdin_data: Optional[bytes] = None,
    timeout: float = HELPER_TIMEOUT,
    new_session: bool = True,
) -> ChildStatus:
    """Run a program with stdout/stderr on /dev/null and wait for it, bounded.

    ``executable`` is the file to run (``argv[0]`` is then only the name the
    program sees, as with ``execl``); without it ``argv[0]`` is searched on
    ``PATH``.  stdin is /dev/null, or a pipe fed with ``stdin_data``.  With
    ``new_session`` the child gets its own session (qemu-ga's ``setsid()``),
    and a child that overstays ``timeout`` is killed with its whole session.
    The environment and working directory are the agent's.

    Raises ``OSError`` when the program cannot be started at all; callers
    decide what that means (qemu-ga's fork-then-exec helpers see it as exit
    status 1, its ``g_spawn`` helpers as "not found").
    """
    import subprocess

    process = subprocess.Popen(
        list(argv),
        executable=executable,
        stdin=subprocess.DEVNULL if stdin_data is None else subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=new_session,
    )
    try:
        process.communicate(stdin_data, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process, new_session)
        return ChildStatus(False, signal_number=signal.SIGKILL, timed_out=True)
    except BaseException:
        _kill(process, new_session)
        raise
    return ChildStatus.from_returncode(process.returncode)


def run_forked_helper(argv: Sequence[str], executable: str, *, stdin_data: Optional[bytes] = None,
                      timeout: float = HELPER_TIMEOUT) -> ChildStatus:
    """Run ``executable`` the way qemu-ga's fork + ``execl`` helpers do.

    A program that cannot be executed makes qemu-ga's child ``_exit(1)``, so
    the caller sees exit status 1 and reports its usual failure text.
    """
    try:
        return run_program(argv, executable=executable, stdin_data=stdin_data, timeout=timeout)
    except OSError:
        return ChildStatus(True, code=1)


def _kill(process, whole_session: bool) -> None:
    try:
        if whole_session:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
