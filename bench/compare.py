#!/usr/bin/env python3
"""Benchmark qga beside the real qemu-ga, in the same run, and print ratios.

Both agents are measured by the team's harness (``qga_bench.py``, found in
``$QGA_BENCH_HARNESS`` or ``../shared/tools/bench/`` beside the checkout)
with the same parameters, one after the other, on a Unix socket.  The table
gives each metric for both agents and the ratio qga/qemu-ga, with the
direction that counts as better, and the issue's target where there is one.

    python3 bench/compare.py              # full run (a few minutes)
    python3 bench/compare.py --quick      # smoke test, small sizes
    python3 bench/compare.py --cpu 0      # pin both agents and the harness to CPU 0
    python3 bench/compare.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QEMU_GA_TEMPLATE = "{qemu_ga} -m unix-listen -p {{sock}} -t {{statedir}} -l {{log}}"
QGA_TEMPLATE = "{python} -m qga -m unix-listen -p {{sock}} -t {{statedir}} -l {{log}}"
# A guest runs qga with its distribution's Python; measure that one when it is
# there (with Debian's python3-psutil & co.), not a development interpreter.
GUEST_PYTHON = "/usr/bin/python3"

# (label, path in the harness result, better when "higher"/"lower", target ratio or None)
METRICS = [
    ("startup p50 (ms)", ("startup_ms", "p50"), "lower", None),
    ("idle RSS (KiB)", ("rss_idle_kb",), "lower", None),
    ("peak RSS, file phases (KiB)", ("rss_peak_file_kb",), "lower", 1.0),
    ("ping p50 (us)", ("ping_rtt_us", "p50"), "lower", 1.1),
    ("ping p99 (us)", ("ping_rtt_us", "p99"), "lower", None),
    ("pipelined ping (req/s)", ("pipeline", "req_per_s"), "higher", 3.0),
    ("file read (MB/s)", ("file_read", "MB_per_s"), "higher", 1.5),
    ("file write (MB/s)", ("file_write", "MB_per_s"), "higher", 2.0),
    ("exec round trip p50 (ms)", ("exec_ms", "p50"), "lower", 1.0),
    ("guest-get-osinfo p50 (ms)", ("info_ms", "guest-get-osinfo", "p50"), "lower", None),
    ("guest-network-get-interfaces p50 (ms)",
     ("info_ms", "guest-network-get-interfaces", "p50"), "lower", None),
    ("guest-get-fsinfo p50 (ms)", ("info_ms", "guest-get-fsinfo", "p50"), "lower", None),
    ("guest-info p50 (ms)", ("info_ms", "guest-info", "p50"), "lower", None),
]


def find_harness() -> Path:
    candidates = [os.environ.get("QGA_BENCH_HARNESS"),
                  REPO.parent / "shared" / "tools" / "bench" / "qga_bench.py"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    sys.exit("qga_bench.py not found: set QGA_BENCH_HARNESS")


def agent_python() -> str:
    return GUEST_PYTHON if os.access(GUEST_PYTHON, os.X_OK) else sys.executable


def precompile(python: str) -> None:
    """Write the byte code a packaged install has, so startup is not compile time."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([python, "-m", "compileall", "-q", str(REPO / "qga")], env=env,
                   stdout=subprocess.DEVNULL, check=False)


def run_harness(harness: Path, template: str, passthrough: list) -> dict:
    env = dict(os.environ, QGA_CONF="/nonexistent",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [sys.executable, str(harness), "--agent", template, *passthrough]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        sys.exit(f"harness failed for {template!r}:\n{done.stdout[-2000:]}")


def lookup(result: dict, path: tuple):
    value = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) else None


def ratio_rows(ours: dict, theirs: dict):
    for label, path, better, target in METRICS:
        mine, reference = lookup(ours, path), lookup(theirs, path)
        ratio = mine / reference if mine is not None and reference else None
        verdict = ""
        if ratio is not None and target is not None:
            met = ratio >= target if better == "higher" else ratio <= target
            sign = ">=" if better == "higher" else "<="
            verdict = f"target {sign} {target:g}x: {'met' if met else 'MISSED'}"
        yield label, reference, mine, ratio, better, verdict


def print_table(rows, ours: dict) -> None:
    print(f"{'metric':40} {'qemu-ga':>12} {'qga':>12} {'qga/qemu-ga':>12}  better  note")
    for label, reference, mine, ratio, better, verdict in rows:
        shown = [f"{v:12.3f}" if isinstance(v, float) else f"{v!s:>12}" for v in (reference, mine)]
        ratio_text = f"{ratio:12.2f}" if ratio is not None else f"{'-':>12}"
        print(f"{label:40} {shown[0]} {shown[1]} {ratio_text}  {better:6}  {verdict}")
    startup = lookup(ours, ("startup_ms", "p50"))
    idle = lookup(ours, ("rss_idle_kb",))
    if startup is not None:
        print(f"qga startup p50 {startup:.1f} ms (target <= 80 ms: {'met' if startup <= 80 else 'MISSED'})")
    if idle is not None:
        print(f"qga idle RSS {idle / 1024:.1f} MiB (target <= 20 MB: {'met' if idle <= 20 * 1000 else 'MISSED'})")
    for name, result in (("qga", ours),):
        if result.get("phase_errors") or result.get("error"):
            print(f"{name} errors: {result.get('error') or result.get('phase_errors')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--cpu", help="pin the agents and the harness to these CPUs, e.g. 0")
    parser.add_argument("--json", help="write both raw results and the ratios here")
    parser.add_argument("harness_args", nargs="*", help="more arguments for qga_bench.py (after --)")
    args = parser.parse_args(argv)

    qemu_ga = shutil.which("qemu-ga") or "/usr/sbin/qemu-ga"
    if not os.access(qemu_ga, os.X_OK):
        sys.exit("qemu-ga is not installed (apt-get install qemu-guest-agent)")
    harness = find_harness()
    passthrough = list(args.harness_args)
    if args.quick:
        passthrough.append("--quick")
    if args.cpu:
        passthrough += ["--cpu", args.cpu]

    python = agent_python()
    precompile(python)
    theirs = run_harness(harness, QEMU_GA_TEMPLATE.format(qemu_ga=qemu_ga), passthrough)
    ours = run_harness(harness, QGA_TEMPLATE.format(python=python), passthrough)
    print(f"qga run by {python}")
    rows = list(ratio_rows(ours, theirs))
    print_table(rows, ours)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"qemu-ga": theirs, "qga": ours,
                       "ratios": {label: ratio for label, _, _, ratio, _, _ in rows}}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
