"""The periodic loop's counters: decrement, then compare; first fire at rate - 1 ticks."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extensions" / "ovirt_sso"))

from ovirt_agent import config, scheduler  # noqa: E402


def fires(rates, ticks):
    """{job: [tick index (0 = the pass right after start, at t=0 s), ...]}."""
    plan = scheduler.Scheduler(rates)
    result = {}
    for index in range(ticks):
        for job in plan.tick():
            result.setdefault(job, []).append(index)
    return result


def test_the_default_schedule():
    result = fires(config.Config({}).rates, 601)
    assert result["heartbeat"][:4] == [4, 9, 14, 19] and len(result["heartbeat"]) == 120
    assert result["user"][:3] == [9, 19, 29]
    assert result["applications"] == [119, 239, 359, 479, 599]
    assert result["disks"] == [299, 599]
    assert result["cpus"] == [59, 119, 179, 239, 299, 359, 419, 479, 539, 599]


def test_a_rate_of_one_fires_every_tick_and_order_is_the_originals():
    rates = dict(config.Config({}).rates, heart_beat_rate=1, report_user_rate=1,
                 report_application_rate=1, report_disk_usage=1, report_num_cpu_rate=1)
    plan = scheduler.Scheduler(rates)
    assert [plan.tick() for _ in range(2)] == [
        ["heartbeat", "user", "applications", "disks", "cpus"]] * 2
    assert plan.ticks == 2
