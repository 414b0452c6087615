"""The periodic loop's counters, as the original agent's ``doWork`` kept them (sans-IO).

The original loop runs once a second.  Each job has a counter that starts at
its rate and is decremented *before* it is compared: a job fires when its
counter reaches zero, then starts again from its rate.  So the first
heartbeat (rate 5) goes out 4 s after the startup set, then every 5 s; the
first user check 9 s in, the first applications report 119 s in, and so on.

:meth:`Scheduler.tick` is one pass of that loop and returns the jobs due, in
the original's order.  Who calls it, and on which clock, is the runner's
business; tests call it directly.
"""

from __future__ import annotations

from typing import Dict, List, Mapping

HEARTBEAT = "heartbeat"
USER = "user"
APPLICATIONS = "applications"
DISKS = "disks"
CPUS = "cpus"

#: Job -> the configuration key of its rate, in the order one tick runs them.
JOBS = (
    (HEARTBEAT, "heart_beat_rate"),
    (USER, "report_user_rate"),
    (APPLICATIONS, "report_application_rate"),
    (DISKS, "report_disk_usage"),
    (CPUS, "report_num_cpu_rate"),
)


class Scheduler:
    """Counters for the periodic jobs; one :meth:`tick` per loop pass."""

    def __init__(self, rates: Mapping[str, int]):
        self.rates: Dict[str, int] = {job: int(rates[key]) for job, key in JOBS}
        self.counters: Dict[str, int] = dict(self.rates)
        self.ticks = 0

    def tick(self) -> List[str]:
        """Decrement every counter; the jobs that reached zero (their counters restart)."""
        self.ticks += 1
        due = []
        for job, _ in JOBS:
            self.counters[job] -= 1
            if self.counters[job] <= 0:
                due.append(job)
                self.counters[job] = self.rates[job]
        return due
