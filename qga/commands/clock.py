"""guest-set-time: set the system clock and the hardware clock, as qemu-ga does.

With ``time`` (nanoseconds since the epoch, UTC) the system clock is set to
it, at microsecond resolution like settimeofday(), and then
``/sbin/hwclock -w`` copies it to the RTC.  Without ``time`` the host asks for
the opposite, ``/sbin/hwclock -s`` (after a resume, say).  qemu-ga refuses the
command when ``/sbin/hwclock`` is not executable, and accepts only times whose
local-time year lies in 1970..2069.
"""

from __future__ import annotations

import os
import time as time_module

from qga.commands import command
from qga.commands.sysutil import run_forked_helper, system_path
from qga.errors import CommandError, Unsupported

HWCLOCK = "/sbin/hwclock"
NANOSECONDS = 1_000_000_000


@command("guest-set-time")
def set_time(ctx, time=None):
    hwclock = system_path(HWCLOCK)
    if not os.access(hwclock, os.X_OK):
        raise Unsupported()
    if time is not None:
        _set_system_clock(time)
    status = run_forked_helper(["hwclock", "-w" if time is not None else "-s"], hwclock)
    if not status.exited:
        raise CommandError("child process has terminated abnormally")
    if status.code:
        raise CommandError("hwclock failed to set hardware clock to system time")
    return None


def _set_system_clock(time_ns: int) -> None:
    seconds, microseconds = _c_division(time_ns)
    if not _year_in_range(seconds):
        raise CommandError("Invalid time")
    if microseconds < 0:
        # settimeofday() rejects a negative tv_usec with EINVAL.
        raise CommandError("Failed to set time to guest: Invalid argument")
    try:
        time_module.clock_settime_ns(time_module.CLOCK_REALTIME,
                                     seconds * NANOSECONDS + microseconds * 1000)
    except OSError as error:
        raise CommandError(f"Failed to set time to guest: {os.strerror(error.errno)}") from None


def _c_division(time_ns: int):
    """(tv_sec, tv_usec) as qemu-ga computes them with C's truncating division."""
    seconds = abs(time_ns) // NANOSECONDS
    remainder = abs(time_ns) % NANOSECONDS // 1000
    if time_ns < 0:
        return -seconds, -remainder
    return seconds, remainder


def _year_in_range(seconds: int) -> bool:
    # g_date_set_time_t() uses local time; qemu-ga accepts years 1970..2069.
    try:
        year = time_module.localtime(seconds).tm_year
    except (OverflowError, OSError, ValueError):
        return False
    return 1970 <= year < 2070
