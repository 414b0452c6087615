"""guest-shutdown and guest-suspend-*, against test doubles only.

Nothing here may power off or suspend the machine running the tests:
``/sbin/shutdown`` and ``/sys/power/state`` are moved under a temporary
``$QGA_TEST_SYSROOT`` and ``PATH`` holds nothing but recording stand-ins for
``systemctl``, ``pm-is-supported`` and ``pm-*``.  The ``doubles`` fixture
sets both for every test in this file and checks the result before any
handler runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import pytest

from qga.commands import Context
from qga.commands import power
from qga.commands.sysutil import SYSROOT_VARIABLE, system_path
from qga.config import Config
from qga.errors import CommandError


class Doubles:
    """The fake system: a sysroot and a PATH directory, with one call log."""

    def __init__(self, base: Path):
        self.sysroot = base / "root"
        self.bindir = base / "bin"
        self.calls = base / "calls"
        (self.sysroot / "sbin").mkdir(parents=True)
        (self.sysroot / "sys" / "power").mkdir(parents=True)
        self.bindir.mkdir()

    def program(self, path: Path, exit_code: int = 0, body: str = "") -> None:
        # The script's own PATH: the agent's PATH holds nothing but the fakes.
        path.write_text(f'#!/bin/sh\nPATH=/usr/bin:/bin\necho "${{0##*/}} $*" >> {self.calls}\n'
                        f"{body}exit {exit_code}\n")
        path.chmod(0o755)

    def shutdown(self, exit_code: int = 0, body: str = "") -> None:
        self.program(self.sysroot / "sbin" / "shutdown", exit_code, body)

    def tool(self, name: str, exit_code: int = 0, body: str = "") -> None:
        self.program(self.bindir / name, exit_code, body)

    def power_state(self, text: Optional[str]) -> Path:
        path = self.sysroot / "sys" / "power" / "state"
        if text is not None:
            path.write_text(text)
        return path

    def log(self):
        lines = self.calls.read_text().splitlines() if self.calls.exists() else []
        return [line.rstrip(" ") for line in lines]


@pytest.fixture
def doubles(tmp_path, monkeypatch):
    fake = Doubles(tmp_path)
    monkeypatch.setenv(SYSROOT_VARIABLE, str(fake.sysroot))
    monkeypatch.setenv("PATH", str(fake.bindir))
    # The safety check: every path these commands use now lies in the fakes.
    assert system_path(power.SHUTDOWN).startswith(str(tmp_path))
    assert system_path(power.POWER_STATE).startswith(str(tmp_path))
    return fake


@pytest.fixture
def ctx():
    return Context(Config(), state=None)


# -- shutdown ------------------------------------------------------------------------


@pytest.mark.parametrize("mode, flag", [(None, "-P"), ("powerdown", "-P"), ("halt", "-H"),
                                        ("reboot", "-r")])
def test_shutdown_runs_sbin_shutdown(ctx, doubles, mode, flag):
    doubles.shutdown()
    arguments: Dict[str, str] = {} if mode is None else {"mode": mode}
    assert power.shutdown(ctx, **arguments) is None  # success: the dispatcher sends nothing
    assert doubles.log() == [f"shutdown -h {flag} +0 hypervisor initiated shutdown"]


def test_shutdown_child_has_own_session_and_null_stdio(ctx, doubles, tmp_path):
    report = tmp_path / "report"
    doubles.shutdown(body=f'sid=$(ps -o sid= -p $$ | tr -d " ")\n'
                          f'echo "$sid $$ $(readlink /proc/$$/fd/0) $(readlink /proc/$$/fd/2)"'
                          f" > {report}\n")
    power.shutdown(ctx, mode="halt")
    sid, pid, stdin, stderr = report.read_text().split()
    assert sid == pid
    assert stdin == stderr == "/dev/null"


def test_invalid_mode_is_refused_before_anything_runs(ctx, doubles):
    doubles.shutdown()
    with pytest.raises(CommandError) as raised:
        power.shutdown(ctx, mode="bogus")
    assert raised.value.desc == "mode is invalid (valid values are: halt|powerdown|reboot"
    assert doubles.log() == []


def test_shutdown_failure(ctx, doubles):
    doubles.shutdown(exit_code=1)
    with pytest.raises(CommandError, match="^child process has failed to shutdown$"):
        power.shutdown(ctx)


def test_shutdown_missing_program(ctx, doubles):
    with pytest.raises(CommandError, match="^child process has failed to shutdown$"):
        power.shutdown(ctx)


def test_shutdown_killed(ctx, doubles):
    doubles.shutdown(body="kill -9 $$\n")
    with pytest.raises(CommandError, match="^child process has terminated abnormally$"):
        power.shutdown(ctx)


# -- suspend -------------------------------------------------------------------------


def test_nothing_available_is_not_supported(ctx, doubles):
    for handler in (power.suspend_disk, power.suspend_ram, power.suspend_hybrid):
        with pytest.raises(CommandError) as raised:
            handler(ctx)
        assert raised.value.desc == "the requested suspend mode is not supported by the guest"


@pytest.mark.parametrize("handler, unit, verb", [
    (power.suspend_disk, "systemd-hibernate", "hibernate"),
    (power.suspend_ram, "systemd-suspend", "suspend"),
    (power.suspend_hybrid, "systemd-hybrid-sleep", "hybrid-sleep"),
])
def test_systemd_first(ctx, doubles, handler, unit, verb):
    # "systemctl status" exits 3 (unit not running): the mode is supported.
    doubles.tool("systemctl", body='[ "$1" = status ] && exit 3\n')
    doubles.tool("pm-is-supported")
    assert handler(ctx) is None
    assert doubles.log() == [f"systemctl status {unit}", f"systemctl {verb}"]


@pytest.mark.parametrize("handler, flag, program", [
    (power.suspend_disk, "--hibernate", "pm-hibernate"),
    (power.suspend_ram, "--suspend", "pm-suspend"),
    (power.suspend_hybrid, "--suspend-hybrid", "pm-suspend-hybrid"),
])
def test_pm_utils_when_systemd_does_not_know_the_unit(ctx, doubles, handler, flag, program):
    doubles.tool("systemctl", exit_code=4)
    doubles.tool("pm-is-supported")
    doubles.tool(program)
    assert handler(ctx) is None
    assert doubles.log()[1:] == [f"pm-is-supported {flag}", program]


@pytest.mark.parametrize("handler, word", [(power.suspend_disk, "disk"), (power.suspend_ram, "mem")])
def test_sys_power_state_last(ctx, doubles, handler, word):
    state = doubles.power_state("freeze mem disk\n")
    assert handler(ctx) is None
    assert state.read_text().startswith(word)


def test_sys_power_state_without_the_mode(ctx, doubles):
    doubles.power_state("freeze\n")
    with pytest.raises(CommandError, match="not supported by the guest"):
        power.suspend_ram(ctx)


def test_hybrid_never_uses_sys_power_state(ctx, doubles):
    state = doubles.power_state("freeze mem disk\n")
    with pytest.raises(CommandError, match="not supported by the guest"):
        power.suspend_hybrid(ctx)
    assert state.read_text() == "freeze mem disk\n"


def test_hybrid_after_failed_systemd_reports_unknown_mode(ctx, doubles):
    doubles.tool("systemctl", exit_code=1)  # status 1: supported; suspending fails too
    with pytest.raises(CommandError) as raised:
        power.suspend_hybrid(ctx)
    assert raised.value.desc == "unknown guest suspend mode"


def test_failed_systemd_with_no_fallback_succeeds_silently(ctx, doubles):
    """Upstream drops the error of a supported mechanism that failed."""
    doubles.tool("systemctl", exit_code=1)
    assert power.suspend_ram(ctx) is None
    assert doubles.log() == ["systemctl status systemd-suspend", "systemctl suspend"]


def test_failed_systemd_falls_back_to_pm_utils(ctx, doubles):
    doubles.tool("systemctl", exit_code=2)
    doubles.tool("pm-is-supported")
    doubles.tool("pm-suspend")
    assert power.suspend_ram(ctx) is None
    assert doubles.log()[-1] == "pm-suspend"


def test_killed_helper_counts_as_success_like_wexitstatus(ctx, doubles):
    doubles.tool("systemctl", body='[ "$1" = status ] && exit 3\nkill -9 $$\n')
    assert power.suspend_disk(ctx) is None


def test_unexecutable_helper_is_a_spawn_error_not_a_crash(ctx, doubles):
    (doubles.bindir / "systemctl").write_text("#!/bin/sh\nexit 3\n")  # not executable
    doubles.tool("pm-is-supported", exit_code=1)
    with pytest.raises(CommandError, match="not supported by the guest"):
        power.suspend_ram(ctx)


def test_sys_power_state_write_failure(ctx, doubles):
    # The file offers "mem", then cannot be opened for writing (a directory now).
    state = doubles.power_state("mem\n")
    assert power._sysfs_supports("mem")
    state.unlink()
    state.mkdir()
    assert power._sysfs_suspend("mem") == f"suspend: cannot write to '{state}': Is a directory"
