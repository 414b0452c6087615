#!/usr/bin/env python3
"""Benchmark qga beside the real qemu-ga inside a real VM, through virtio-serial.

The e2e test guest (``tests/support/guest_image.py``: Debian's kernel,
python3 and packages; TCG) is booted twice, once with qemu-ga serving the
agent port and once with qga, and the team's harness (``qga_bench.py``) runs
against the QEMU chardev socket of each (``--connect``), with the same
parameters.  The table is ``bench/compare.py``'s: each metric for both agents,
the ratio qga/qemu-ga and the issue's target.  Startup and memory are not
measured here (the agent runs in the guest; see ``bench/compare.py``).

    python3 bench/vm.py                  # 16 MiB file phases, a few minutes
    python3 bench/vm.py --quick          # smoke test
    python3 bench/vm.py --file-mib 32 --json out.json

Run as root on a machine with qemu-system-x86 (``tests/run`` installs it);
the first run also builds the guest image (about 30 s, cached).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import compare  # noqa: E402  (bench/compare.py: harness lookup and the ratio table)

from tests.support.guest_image import build_guest_image  # noqa: E402
from tests.support.vm import QemuVM, qemu_missing_reason, wait_for_agent  # noqa: E402

AGENTS = ("qemu-ga", "qga")
PHASES = "ping,pipeline,info,exec,fileread,filewrite"
BOOT_TIMEOUT = 120.0


def harness_arguments(args) -> list:
    if args.quick:
        sizes = ["--ping-n", "300", "--pipeline-n", "1000", "--info-n", "10", "--exec-n", "10",
                 "--file-mib", "4"]
    else:
        sizes = ["--ping-n", "2000", "--pipeline-n", "5000", "--info-n", "50", "--exec-n", "50",
                 "--file-mib", str(args.file_mib)]
    # Chunks as libvirt could carry them (its cap is 10 MiB per message).
    return ["--phases", PHASES, "--guest-dir", "/tmp", "--budget", str(args.budget),
            "--op-timeout", "120", "--connect-timeout", "30",
            "--read-chunk", str(4 << 20), "--write-chunk", str(4 << 20), *sizes]


def bench_agent(image, agent: str, harness: Path, arguments: list, keep: bool) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"qga-benchvm-{agent}-", dir="/tmp"))
    vm = QemuVM(image, workdir, agent=agent, memory_mib=1024)
    try:
        vm.start()
        first_reply = wait_for_agent(vm.socket_path, BOOT_TIMEOUT, vm)
        boot = time.monotonic() - vm.started_at
        done = subprocess.run([sys.executable, str(harness), "--connect", str(vm.socket_path),
                               *arguments], stdout=subprocess.PIPE, text=True, check=False,
                              timeout=float(arguments[arguments.index("--budget") + 1]) + 120)
        try:
            result = json.loads(done.stdout)
        except json.JSONDecodeError:
            sys.exit(f"harness failed against {agent}:\n{done.stdout[-2000:]}\n{vm.diagnostics()}")
        result["vm_first_reply_s"] = round(first_reply, 2)
        result["vm_boot_to_reply_s"] = round(boot, 2)
        return result
    finally:
        vm.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--file-mib", type=int, default=16, help="file phase size (MiB)")
    parser.add_argument("--budget", type=float, default=600.0, help="harness budget per agent (s)")
    parser.add_argument("--json", help="write both raw results and the ratios here")
    parser.add_argument("--keep", action="store_true", help="keep the VM work directories")
    args = parser.parse_args(argv)

    reason = qemu_missing_reason()
    if reason:
        sys.exit(reason)
    harness = compare.find_harness()
    image = build_guest_image(log=lambda message: print(f"image: {message}", file=sys.stderr))
    arguments = harness_arguments(args)
    results = {}
    for agent in AGENTS:
        print(f"benchmarking {agent} in the VM ...", file=sys.stderr, flush=True)
        results[agent] = bench_agent(image, agent, harness, arguments, args.keep)
    theirs, ours = results["qemu-ga"], results["qga"]
    # Startup and memory rows stay empty here (the agents run in the guest).
    rows = [row for row in compare.ratio_rows(ours, theirs)
            if row[1] is not None or row[2] is not None]
    print(f"inside a TCG guest over virtio-serial ({os.cpu_count()} host CPUs, "
          f"file phases {4 if args.quick else args.file_mib} MiB in 4 MiB chunks)")
    compare.print_table(rows, ours)
    for agent in AGENTS:
        result = results[agent]
        print(f"{agent}: QEMU start -> first reply {result['vm_boot_to_reply_s']} s; "
              f"file write {lookup_verified(result, 'file_write')}, "
              f"read {lookup_verified(result, 'file_read')}")
        if result.get("phase_errors") or result.get("truncated"):
            print(f"{agent} problems: {result.get('phase_errors') or ''} "
                  f"{result.get('truncated') or ''}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"qemu-ga": theirs, "qga": ours,
                       "ratios": {label: ratio for label, _, _, ratio, _, _ in rows}}, out, indent=1)
    return 0


def lookup_verified(result: dict, phase: str) -> str:
    found = result.get(phase)
    if not isinstance(found, dict):
        return "not run"
    verified = found.get("verified")
    return f"{found.get('MB_per_s')} MB/s" + ("" if verified is None else
                                               f" (sha256 {'ok' if verified else 'MISMATCH'})")


if __name__ == "__main__":
    sys.exit(main())
