"""Privileged primitives: capabilities, arguments, and the programs they run (faked)."""

from __future__ import annotations

import json
import os

import pytest

from qga.errors import CommandError, ParameterError
from qga.ext import primitives
from qga.ext.primitives import perform

ALL = frozenset({"power", "sessions", "root-socket"})


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """/sbin/shutdown and /proc/sys/vm under QGA_TEST_SYSROOT, loginctl first on PATH;
    each fake program appends its argv to calls.jsonl."""
    calls = tmp_path / "calls.jsonl"
    root = tmp_path / "root"
    (root / "sbin").mkdir(parents=True)
    (root / "proc/sys/vm").mkdir(parents=True)
    (root / "proc/sys/vm/drop_caches").write_text("0\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    program = ("#!/usr/bin/python3\nimport json, sys\n"
               f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
               "if sys.argv[1:3] == ['show-seat', 'seat0']: print('c7')\n")
    for path in (root / "sbin/shutdown", bindir / "loginctl"):
        path.write_text(program)
        os.chmod(path, 0o755)
    monkeypatch.setenv("QGA_TEST_SYSROOT", str(root))
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")

    def recorded():
        if not calls.exists():
            return []
        return [json.loads(line)[1:] for line in calls.read_text().splitlines()]

    recorded.root = root
    return recorded


def test_unknown_primitives_and_missing_capabilities_are_refused():
    with pytest.raises(CommandError, match="no primitive 'format-disk'"):
        perform(None, "x", ALL, "format-disk", {})
    with pytest.raises(CommandError, match="no primitive"):
        perform(None, "x", ALL, ["shutdown"], {})
    with pytest.raises(CommandError, match="'shutdown' needs the 'power' capability"):
        perform(None, "x", frozenset({"sessions"}), "shutdown", {})
    with pytest.raises(CommandError, match="needs the 'root-socket' capability"):
        perform(None, "x", frozenset(), "sso-offer-credentials", {})


def test_shutdown_runs_the_program_with_checked_arguments(fakes):
    assert perform(None, "x", ALL, "shutdown",
                   {"mode": "reboot", "delay": 2, "message": '"bye"'}) == {}
    assert perform(None, "x", ALL, "shutdown", {}) == {}
    assert fakes() == [["-r", "+2", '"bye"'], ["-h", "+0"]]
    for bad in ({"mode": "halt"}, {"delay": -1}, {"delay": 1.5}, {"delay": True},
                {"message": "x" * 1025}, {"message": 3}, {"when": "now"}):
        with pytest.raises(ParameterError):
            perform(None, "x", ALL, "shutdown", bad)
    assert len(fakes()) == 2


def test_a_failing_program_is_an_error(fakes):
    (fakes.root / "sbin/shutdown").write_text("#!/bin/sh\necho no permission >&2\nexit 1\n")
    with pytest.raises(CommandError, match="shutdown: .*failed: no permission"):
        perform(None, "x", ALL, "shutdown", {})


def test_drop_caches_writes_three(fakes):
    assert perform(None, "x", ALL, "drop-caches", {}) == {}
    assert (fakes.root / "proc/sys/vm/drop_caches").read_text() == "3\n"
    with pytest.raises(ParameterError):
        perform(None, "x", ALL, "drop-caches", {"level": 1})


def test_sessions(fakes):
    assert perform(None, "x", ALL, "lock-sessions", {}) == {}
    assert perform(None, "x", ALL, "log-off", {}) == {}
    assert fakes() == [["lock-sessions"],
                       ["show-seat", "seat0", "--property=ActiveSession", "--value"],
                       ["terminate-session", "c7"]]


def test_suspend_checks_its_state_first():
    with pytest.raises(ParameterError, match="'state' must be 'disk' or 'mem'"):
        perform(None, "x", ALL, "suspend", {"state": "hybrid"})


def test_sso_arguments_are_checked_by_the_credentials_server():
    with pytest.raises(ParameterError):
        perform(None, "x", ALL, "sso-offer-credentials", {"user": "a"})
    assert set(primitives.PRIMITIVES) == {"shutdown", "suspend", "drop-caches",
                                          "lock-sessions", "log-off", "sso-offer-credentials"}
