"""Lifecycle hooks: name order with built-ins, one event at a time, a time limit per hook."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extensions" / "ovirt_sso"))

from ovirt_agent.hooks import HookRunner  # noqa: E402
from qga.ext import sdk  # noqa: E402


def hook(directory, name, body, mode=0o755):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(f"#!/bin/sh\n{body}\n")
    (directory / name).chmod(mode)


def test_order_builtins_queueing_and_the_time_limit(tmp_path):
    record = tmp_path / "record"
    before = tmp_path / "hooks" / "before_migration"
    hook(before, "20_b", f"echo b >> {record}")
    hook(before, "10_a", f"echo a >> {record}")
    hook(before, "30_slow", f"echo slow >> {record}; exec sleep 30")
    hook(before, "00_off", "echo never", mode=0o644)
    (before / "40_dir").mkdir()
    hook(tmp_path / "hooks" / "after_migration", "10_c", f"echo c >> {record}")
    loop = sdk.Loop()
    done = []

    def builtin(finished):
        with open(record, "a") as stream:
            stream.write("builtin\n")
        finished()

    runner = HookRunner(loop, str(tmp_path / "hooks"), timeout=0.3,
                        builtins={"before_migration": {"15_builtin": builtin}})
    try:
        runner.run("before_migration", lambda: done.append("before"))
        runner.run("after_migration", lambda: done.append("after"))      # waits its turn
        runner.run("before_hibernation", lambda: done.append("nothing"))  # no directory
        assert loop.run_until(lambda: len(done) == 3, 10)
    finally:
        loop.close()
    assert done == ["before", "after", "nothing"]
    assert record.read_text().split() == ["a", "builtin", "b", "slow", "c"]
    statuses = {name: status for _, name, status in runner.history}
    assert statuses["10_a"] == 0 and statuses["15_builtin"] is None
    assert statuses["30_slow"] == -9                    # killed at the time limit
