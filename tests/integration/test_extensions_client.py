"""qga-client push and ext as processes against our agent; the progress bar."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

from qga.host import cli
from tests.integration.test_extensions_e2e import Guest
from tests.support.ext_hello import NAME, REPO


@pytest.fixture
def guest(bundles):
    running = Guest(bundles).start()
    running.client.close()  # the agent serves one client at a time: qga-client's turn
    yield running
    running.close()


def qga_client(guest, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "qga.host.cli", "-s", str(guest.agent.sock),
                             *map(str, args)], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_push_list_status_call_events_stop_start_remove(guest, bundles):
    bundle = bundles.build("1.0.0", counter=10)
    out = qga_client(guest, "push", bundle).stdout
    assert out == f"{NAME} 1.0.0: done\n"
    assert qga_client(guest, "ext", "list").stdout == f"{NAME} 1.0.0 running envelope\n"
    status = json.loads(qga_client(guest, "--json", "ext", "status", NAME).stdout)
    assert status["state"] == "running" and status["install"]["state"] == "done"
    result = json.loads(qga_client(guest, "--json", "ext", "call", NAME, "greet",
                                   '{"who": "cli"}').stdout)
    assert result == {"greeting": "hello cli", "count": 1}
    events = qga_client(guest, "ext", "events", NAME)
    assert [json.loads(line)["data"] for line in events.stdout.splitlines()] == [
        {"who": "cli", "count": 1}]
    assert "0 dropped so far" in events.stderr
    bad = qga_client(guest, "ext", "call", NAME, "greet", "[1]", check=False)
    assert bad.returncode == 2 and "must be a JSON object" in bad.stderr

    # --follow prints what comes, as it comes.
    follower = subprocess.Popen([sys.executable, "-m", "qga.host.cli", "-s",
                                 str(guest.agent.sock), "ext", "events", NAME, "--follow"],
                                stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        first = json.loads(follower.stdout.readline())
        assert first["name"] == "greeted"  # nothing was acknowledged yet: it comes again
    finally:
        follower.kill()
        follower.wait()

    assert qga_client(guest, "ext", "stop", NAME).stdout == f"{NAME}: stop done\n"
    assert "stopped" in qga_client(guest, "ext", "list").stdout
    qga_client(guest, "ext", "start", NAME)
    deadline = time.monotonic() + 10
    while "running" not in qga_client(guest, "ext", "list").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    qga_client(guest, "ext", "remove", NAME)
    assert qga_client(guest, "ext", "list").stdout == ""


def test_push_reports_a_rollback_and_a_refusal(guest, bundles):
    qga_client(guest, "push", bundles.build("1.0.0", counter=10))
    broken = bundles.build("1.0.1", counter=11, script="import sys; sys.exit(2)\n")
    result = qga_client(guest, "push", broken, check=False)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{NAME} 1.0.1: rolled-back (exited with status 2")
    replay = qga_client(guest, "push", bundles.build("1.0.0", counter=9), check=False)
    assert replay.returncode == 1
    assert "counter 9 is not above the installed counter 11" in replay.stderr
    unsigned = qga_client(guest, "push", bundles.build("1.0.2", sign=False), check=False)
    assert unsigned.returncode == 1 and "not signed" in unsigned.stderr


def test_the_progress_bar(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = cli.ProgressBar("hello.qgb")
    bar.update(0, 4 << 20)
    bar.update(2 << 20, 4 << 20)
    bar.update(4 << 20, 4 << 20)
    bar.finish()
    lines = stream.getvalue().split("\r")
    assert lines[2] == "hello.qgb [###############...............]  50%  2.0/4.0 MiB"
    assert lines[3] == "hello.qgb [##############################] 100%  4.0/4.0 MiB\n"
