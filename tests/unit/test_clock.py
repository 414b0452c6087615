"""guest-set-time, without ever changing this machine's clock.

``/sbin/hwclock`` is a recording stand-in under ``$QGA_TEST_SYSROOT``.  The
system clock is only ever asked to change from a process that lacks
CAP_SYS_TIME (``setpriv`` drops it), so the call fails with EPERM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qga.commands import Context
from qga.commands import clock
from qga.commands.sysutil import SYSROOT_VARIABLE
from qga.config import Config
from qga.errors import CommandError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ctx():
    return Context(Config(), state=None)


@pytest.fixture
def hwclock(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "sbin").mkdir(parents=True)
    program = root / "sbin" / "hwclock"
    calls = tmp_path / "calls"
    program.write_text(f'#!/bin/sh\necho "${{0##*/}} $*" >> {calls}\nexit ${{HWCLOCK_EXIT:-0}}\n')
    program.chmod(0o755)
    monkeypatch.setenv(SYSROOT_VARIABLE, str(root))
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield calls
    monkeypatch.delenv("TZ")
    time.tzset()


def test_without_time_the_rtc_sets_the_system_clock(ctx, hwclock):
    assert clock.set_time(ctx) is None
    assert hwclock.read_text() == "hwclock -s\n"


def test_hwclock_failure(ctx, hwclock, monkeypatch):
    monkeypatch.setenv("HWCLOCK_EXIT", "1")
    with pytest.raises(CommandError) as raised:
        clock.set_time(ctx)
    assert raised.value.desc == "hwclock failed to set hardware clock to system time"


def test_no_hwclock_is_unsupported(ctx, tmp_path, monkeypatch):
    monkeypatch.setenv(SYSROOT_VARIABLE, str(tmp_path))
    with pytest.raises(CommandError) as raised:
        clock.set_time(ctx, time=0)
    assert raised.value.desc == "this feature or command is not currently supported"


@pytest.mark.parametrize("value", [
    -10 ** 18,               # 1938
    4 * 10 ** 18,            # 2096
    3155760000 * 10 ** 9,    # 2070-01-01: the first year refused
    -2 * 10 ** 9,            # 1969-12-31 23:59:58
])
def test_times_outside_1970_to_2069_are_invalid(ctx, hwclock, value):
    with pytest.raises(CommandError) as raised:
        clock.set_time(ctx, time=value)
    assert raised.value.desc == "Invalid time"
    assert not hwclock.exists()


def test_negative_microseconds_are_refused_like_settimeofday(ctx, hwclock):
    # C division: -1500 ns is tv_sec 0 (1970, valid) and tv_usec -1 (EINVAL).
    with pytest.raises(CommandError) as raised:
        clock.set_time(ctx, time=-1500)
    assert raised.value.desc == "Failed to set time to guest: Invalid argument"


def test_c_division_truncates_toward_zero():
    assert clock._c_division(-1_500_000_001) == (-1, -500000)
    assert clock._c_division(1_500_000_999) == (1, 500000)


def test_setting_the_clock_without_the_capability(tmp_path, hwclock):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_SYS_TIME")
    code = ("import time; from qga.commands import Context, clock; from qga.config import Config\n"
            "from qga.errors import CommandError\n"
            "try:\n"
            "    clock.set_time(Context(Config(), None), time=time.time_ns())\n"
            "except CommandError as e:\n"
            "    print(e.desc)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        ["setpriv", "--bounding-set=-sys_time", "--inh-caps=-sys_time", sys.executable, "-c", code],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert result.stdout.decode().strip() == "Failed to set time to guest: Operation not permitted", \
        result.stderr.decode()
    assert not hwclock.exists()
