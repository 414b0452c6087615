#!/usr/bin/env python3
"""Benchmark the extension runtime through our agent on a Unix socket.

What it measures (qemu-ga has no extensions, so there is nothing to compare
with; guest-ping is the baseline of a round trip through the agent):

* push: upload of a signed bundle holding 10 MiB of incompressible data in
  4 MiB chunks, then install until the new version said it is ready: time
  and MB/s for the upload alone and for the whole push;
* guest-extension-call round trip of the example extension's ``echo``
  (p50/p99), beside guest-ping's;
* events: the example's ``emit`` queues a burst, then guest-extension-events
  reads them 1000 a time: events/s delivered to the host; and, offered at
  twice the agent's rate limit for a while, the rate the host gets.

    python3 bench/extensions.py              # the full run (about a minute)
    python3 bench/extensions.py --quick      # smoke test
    python3 bench/extensions.py --json out.json

The agent runs as ``python -m qga`` of this tree with the guest's Python
(``/usr/bin/python3`` when there); as root, the extension runs as its own
user, as in a guest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qga.host.client import Client  # noqa: E402
from tests.support.agents import our_agent  # noqa: E402
from tests.support.ext_hello import HelloBundles, agent_config  # noqa: E402

MiB = 1024 * 1024
BURST_REFILL = 2.5  # seconds for the agent's event bucket (2000 at 1000/s) to fill again


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def timed_calls(function, count):
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1000)
    return {"p50": round(percentile(samples, 0.5), 3), "p99": round(percentile(samples, 0.99), 3),
            "mean": round(statistics.mean(samples), 3)}


def bench_push(client, bundles, size):
    bundle = bundles.build("2.0.0", counter=20, extra_files={"data/blob.bin": os.urandom(size)})
    total = bundle.stat().st_size
    uploaded = []
    started = time.perf_counter()
    record = client.push(bundle, progress=lambda sent, whole: uploaded.append(
        (sent, time.perf_counter())))
    finished = time.perf_counter()
    assert record["state"] == "done", record
    upload_seconds = uploaded[-1][1] - started
    return {"bundle_bytes": total, "upload_s": round(upload_seconds, 3),
            "upload_MB_per_s": round(total / MiB / upload_seconds, 1),
            "push_s": round(finished - started, 3),
            "push_MB_per_s": round(total / MiB / (finished - started), 1)}


def bench_events(client, burst):
    emitted = client.ext_call("hello", "emit", {"count": burst}, timeout=60)
    started = time.perf_counter()
    cursor = None
    received = 0
    while received < emitted:
        batch = client.ext_events("hello", cursor, maximum=1000)
        cursor = batch["cursor"]
        received += len(batch["events"])
    read_seconds = time.perf_counter() - started
    client.ext_events("hello", cursor)  # acknowledge the last batch
    return {"burst": burst, "queued": emitted, "read_s": round(read_seconds, 3),
            "delivered_per_s": round(received / read_seconds)}


def bench_sustained(client, seconds, offered_per_s=2000, step=0.1):
    """Offer events above the rate limit for a while, reading as they come."""
    time.sleep(BURST_REFILL)  # start with a full bucket, as after a quiet spell
    dropped_before = client.ext_status("hello")["events-dropped"]
    per_step = int(offered_per_s * step)
    cursor = None
    offered = received = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        client.ext_call("hello", "emit", {"count": per_step})
        offered += per_step
        while True:
            batch = client.ext_events("hello", cursor, maximum=1000)
            cursor = batch["cursor"]
            received += len(batch["events"])
            if len(batch["events"]) < 1000:
                break
        time.sleep(step)
    elapsed = time.perf_counter() - started
    client.ext_events("hello", cursor)
    dropped = client.ext_status("hello")["events-dropped"] - dropped_before
    return {"offered_per_s": round(offered / elapsed), "delivered_per_s": round(received / elapsed),
            "dropped": dropped, "seconds": round(elapsed, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--json", help="write the results here")
    options = parser.parse_args(argv)
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    workdir = Path(tempfile.mkdtemp(prefix="qga-bench-ext-"))
    os.chmod(workdir, 0o755)
    agent = None
    try:
        bundles = HelloBundles(workdir)
        env = agent_config(workdir, bundles.trust_dir)
        env["QGA_AGENT_PYTHON"] = python
        agent = our_agent(workdir, [], env=env)
        agent.argv[0] = python
        agent.start()
        client = Client(agent.sock, timeout=120)
        assert client.push(bundles.build("1.0.0", counter=10))["state"] == "done"
        calls = 100 if options.quick else 1000
        results = {
            "ping_ms": timed_calls(client.ping, calls),
            "call_echo_ms": timed_calls(lambda: client.ext_call("hello", "echo", {"x": 1}),
                                        calls),
            "push_10MiB": bench_push(client, bundles, (1 if options.quick else 10) * MiB),
            "events_burst": bench_events(client, 2000),
            "events_sustained": bench_sustained(client, 2 if options.quick else 10),
        }
        client.close()
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if os.geteuid() == 0:
            subprocess.run(["userdel", "qga-ext-hello"], capture_output=True)
    print(json.dumps(results, indent=2))
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
