"""guest-shutdown and guest-suspend-disk/ram/hybrid, as qemu-ga does them.

These commands have ``success-response: false``: on success the handler
returns None and the dispatcher sends nothing (the host waits for QEMU's
SHUTDOWN/SUSPEND event instead); a failure is an ordinary error reply.

guest-shutdown checks the mode first (its error text really lacks the
closing parenthesis), then runs
``/sbin/shutdown -h -P|-H|-r +0 "hypervisor initiated shutdown"`` in a new
session with stdio on /dev/null and waits for it.

guest-suspend-* follow upstream qemu-ga: ask systemd (``systemctl status
systemd-suspend`` etc. answering an LSB status 1..3 means "supported", then
``systemctl suspend``), then pm-utils (``pm-is-supported --suspend``, then
``pm-suspend``), then ``/sys/power/state`` (``mem`` or ``disk``; never for
hybrid).  Support is checked before each attempt.  Like upstream, the
failures of systemd and pm-utils are not reported: only "not supported at
all" or the last mechanism's failure reaches the host, and when a supported
mechanism failed and nothing else applied, the command "succeeds" silently.
We log what happened, which qemu-ga does not.

Tests replace ``/sbin/shutdown`` and ``/sys/power/state`` through
``$QGA_TEST_SYSROOT`` and the PATH programs through ``PATH``
(see :mod:`qga.commands.sysutil`).
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Tuple

from qga.commands import command
from qga.commands.sysutil import run_forked_helper, run_program, system_path
from qga.errors import CommandError
from qga.log import audit

log = logging.getLogger(__name__)

SHUTDOWN = "/sbin/shutdown"
POWER_STATE = "/sys/power/state"
SHUTDOWN_FLAGS = {"powerdown": "-P", "halt": "-H", "reboot": "-r"}


# -- shutdown -----------------------------------------------------------------------


@command("guest-shutdown")
def shutdown(ctx, mode=None):
    audit(f"guest-shutdown called, mode: {'(null)' if mode is None else mode}")
    flag = SHUTDOWN_FLAGS.get("powerdown" if mode is None else mode)
    if flag is None:
        raise CommandError("mode is invalid (valid values are: halt|powerdown|reboot")
    status = run_forked_helper(
        ["shutdown", "-h", flag, "+0", "hypervisor initiated shutdown"], system_path(SHUTDOWN))
    if not status.exited:
        raise CommandError("child process has terminated abnormally")
    if status.code:
        raise CommandError("child process has failed to shutdown")
    return None


# -- suspend ------------------------------------------------------------------------


class SuspendMode:
    """The names each mechanism uses for one suspend mode."""

    def __init__(self, systemd_unit: str, systemctl_verb: str, pm_flag: str,
                 pm_program: str, sysfs_word: Optional[str]):
        self.systemd_unit = systemd_unit
        self.systemctl_verb = systemctl_verb
        self.pm_flag = pm_flag
        self.pm_program = pm_program
        self.sysfs_word = sysfs_word


DISK = SuspendMode("systemd-hibernate", "hibernate", "--hibernate", "pm-hibernate", "disk")
RAM = SuspendMode("systemd-suspend", "suspend", "--suspend", "pm-suspend", "mem")
HYBRID = SuspendMode("systemd-hybrid-sleep", "hybrid-sleep", "--suspend-hybrid",
                     "pm-suspend-hybrid", None)


@command("guest-suspend-disk")
def suspend_disk(ctx):
    return guest_suspend(DISK)


@command("guest-suspend-ram")
def suspend_ram(ctx):
    return guest_suspend(RAM)


@command("guest-suspend-hybrid")
def suspend_hybrid(ctx):
    return guest_suspend(HYBRID)


def guest_suspend(mode: SuspendMode) -> None:
    supported = False
    error: Optional[str] = None
    if _systemd_supports(mode):
        supported = True
        error = _systemd_suspend(mode)
        if error is None:
            return None
        log.warning("suspend through systemd failed: %s", error)
    if _pmutils_supports(mode)[0]:
        supported = True
        error = _pmutils_suspend(mode)
        if error is None:
            return None
        log.warning("suspend through pm-utils failed: %s", error)
    error = None
    if mode.sysfs_word is None:
        error = "unknown guest suspend mode"
    elif _sysfs_supports(mode.sysfs_word):
        supported = True
        error = _sysfs_suspend(mode.sysfs_word)
    if not supported:
        raise CommandError("the requested suspend mode is not supported by the guest")
    if error is not None:
        raise CommandError(error)
    log.warning("suspend was attempted but no mechanism reported success")
    return None


def _run_spawned(argv: Sequence[str]) -> Tuple[int, Optional[str]]:
    """qemu-ga's run_process_child(): (exit status, spawn error); -1 when not found.

    Like g_spawn_sync(): searched on PATH, stdin/stdout/stderr on /dev/null,
    same session, and WEXITSTATUS() of a killed child reads as 0.
    """
    try:
        status = run_program(argv, new_session=False)
    except FileNotFoundError:
        return -1, None
    except OSError as error:
        reason = f"Failed to execute child process \u201c{argv[0]}\u201d ({os.strerror(error.errno)})"
        return -1, f"failed to create child process, error '{reason}'"
    if status.timed_out:
        return -1, f"the helper program '{' '.join(argv)}' did not finish in time and was killed"
    return (status.code if status.exited else 0), None


def _systemd_supports(mode: SuspendMode) -> bool:
    status, _ = _run_spawned(["systemctl", "status", mode.systemd_unit])
    # LSB status codes: 1..3 mean the unit exists (3: not running); 4: unknown.
    return 0 < status < 4


def _systemd_suspend(mode: SuspendMode) -> Optional[str]:
    status, spawn_error = _run_spawned(["systemctl", mode.systemctl_verb])
    if status == 0:
        return None
    if spawn_error is not None:
        return spawn_error
    if status == -1:
        return f"the helper program 'systemctl {mode.systemctl_verb}' was not found"
    return (f"the helper program 'systemctl {mode.systemctl_verb}' returned an "
            f"unexpected exit status code ({status})")


def _pmutils_supports(mode: SuspendMode) -> Tuple[bool, Optional[str]]:
    status, spawn_error = _run_spawned(["pm-is-supported", mode.pm_flag])
    if status == 0:
        return True, None
    if spawn_error is not None:
        return False, spawn_error
    if status == -1:
        return False, None
    return False, (f"the helper program 'pm-is-supported' returned an unexpected "
                   f"exit status code ({status})")


def _pmutils_suspend(mode: SuspendMode) -> Optional[str]:
    status, spawn_error = _run_spawned([mode.pm_program])
    if status == 0:
        return None
    if spawn_error is not None:
        return spawn_error
    if status == -1:
        return f"the helper program '{mode.pm_program}' was not found"
    return (f"the helper program '{mode.pm_program}' returned an unexpected "
            f"exit status code ({status})")


def _sysfs_supports(word: str) -> bool:
    try:
        with open(system_path(POWER_STATE), "rb") as state:
            available = state.read(31)
    except OSError:
        return False
    return word.encode() in available


def _sysfs_suspend(word: str) -> Optional[str]:
    path = system_path(POWER_STATE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as error:
        return f"suspend: cannot write to '{path}': {os.strerror(error.errno)}"
    try:
        # The write returns once the guest has resumed.
        os.write(fd, word.encode())
    except OSError as error:
        return f"suspend: cannot write to '{path}': {os.strerror(error.errno)}"
    finally:
        os.close(fd)
    return None
