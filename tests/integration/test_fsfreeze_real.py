"""Real freezing through our agent process: a loop-mounted ext4, a blocked writer.

Root only (skipped with the reason otherwise).  The agent runs with
``QGA_TEST_MOUNTPOINTS`` naming the loop mountpoint, so it cannot see any
other filesystem, and the only freezing request sent is
``guest-fsfreeze-freeze-list`` of that mountpoint
(:func:`tests.support.loopfs.freeze_list_request`).  Every test thaws with
util-linux and kills its writer on the way out, whatever happened.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest

from tests.support.agents import AgentProcess, our_agent
from tests.support.loopfs import fence_env, freeze_list_request, loopfs  # noqa: F401

SAFE_COMMANDS = {"guest-ping", "guest-info", "guest-sync", "guest-sync-delimited",
                 "guest-fsfreeze-status", "guest-fsfreeze-thaw"}


def write_hook(directory: Path) -> Path:
    hook = directory / "hook"
    log = directory / "hook.log"
    hook.write_text(f'#!/bin/sh\necho "$#:$*" >> {log}\n')
    hook.chmod(0o755)
    return hook


def hook_calls(directory: Path) -> List[str]:
    log = directory / "hook.log"
    return log.read_text().splitlines() if log.exists() else []


def start_agent(workdir: Path, loopfs, extra=()) -> AgentProcess:
    hook = write_hook(workdir)
    return our_agent(workdir, [f"-F{hook}", "-v", *extra], env=fence_env(loopfs)).start()


def call(agent: AgentProcess, request: dict, timeout: float = 20.0) -> dict:
    with agent.connect() as connection:
        connection.send(json.dumps(request).encode() + b"\n")
        return json.loads(connection.read_line(timeout))


def execute(agent: AgentProcess, name: str, arguments: Optional[dict] = None) -> dict:
    request = {"execute": name}
    if arguments is not None:
        request["arguments"] = arguments
    return call(agent, request)


class Writer:
    """A process writing and fsync'ing a file on the loop filesystem."""

    def __init__(self, path: Path):
        code = ("import os, sys\n"
                "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
                "os.write(fd, b'written while frozen'); os.fsync(fd); os.close(fd)\n")
        self.path = path
        self.process = subprocess.Popen([sys.executable, "-c", code, str(path)])

    def finished_within(self, seconds: float) -> bool:
        try:
            self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def cleanup(loopfs):
    """Processes to kill after the test; the loop fs is thawed before anything else."""
    agents: List[AgentProcess] = []
    writers: List[Writer] = []
    yield agents, writers
    loopfs.thaw()
    for writer in writers:
        writer.kill()
    for agent in agents:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()


def test_freeze_blocks_writers_until_thaw(short_tmp, loopfs, cleanup):
    agents, writers = cleanup
    agent = start_agent(short_tmp, loopfs)
    agents.append(agent)
    assert call(agent, freeze_list_request(loopfs)) == {"return": 1}
    assert loopfs.is_frozen()
    assert execute(agent, "guest-fsfreeze-status") == {"return": "frozen"}
    assert (short_tmp / "state" / "qga.state.isfrozen").exists()

    writer = Writer(Path(loopfs.path) / "file")
    writers.append(writer)
    assert not writer.finished_within(1.0), "a write to a frozen filesystem went through"

    assert execute(agent, "guest-fsfreeze-thaw") == {"return": 1}
    assert writer.finished_within(10.0), "the writer stayed blocked after the thaw"
    assert writer.process.returncode == 0
    assert (Path(loopfs.path) / "file").read_bytes() == b"written while frozen"
    assert execute(agent, "guest-fsfreeze-status") == {"return": "thawed"}
    assert not (short_tmp / "state" / "qga.state.isfrozen").exists()
    assert hook_calls(short_tmp) == ["1:freeze", "1:thaw"]


def test_frozen_agent_runs_only_the_six_safe_commands(short_tmp, loopfs, cleanup):
    agents, _ = cleanup
    agent = start_agent(short_tmp, loopfs)
    agents.append(agent)
    assert call(agent, freeze_list_request(loopfs)) == {"return": 1}
    reply = execute(agent, "guest-get-time")
    assert reply == {"error": {"class": "CommandNotFound", "desc":
                               "Command guest-get-time has been disabled: "
                               "the agent is in frozen state"}}
    assert execute(agent, "guest-ping") == {"return": {}}
    commands = execute(agent, "guest-info")["return"]["supported_commands"]
    enabled = {entry["name"] for entry in commands if entry["enabled"]}
    assert enabled == SAFE_COMMANDS
    assert execute(agent, "guest-fsfreeze-thaw") == {"return": 1}
    assert "return" in execute(agent, "guest-get-time")


def test_sigterm_is_ignored_while_frozen(short_tmp, loopfs, cleanup):
    agents, _ = cleanup
    agent = start_agent(short_tmp, loopfs)
    agents.append(agent)
    assert call(agent, freeze_list_request(loopfs)) == {"return": 1}
    agent.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert agent.proc.poll() is None, "the agent exited while filesystems were frozen"
    assert execute(agent, "guest-ping") == {"return": {}}
    assert execute(agent, "guest-fsfreeze-thaw") == {"return": 1}
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0


def test_restart_while_frozen(short_tmp, loopfs, cleanup):
    agents, _ = cleanup
    first = start_agent(short_tmp, loopfs)
    agents.append(first)
    assert call(first, freeze_list_request(loopfs)) == {"return": 1}
    first.proc.kill()  # a crash: no cleanup, the filesystem stays frozen
    first.proc.wait()
    assert loopfs.is_frozen()
    marker = short_tmp / "state" / "qga.state.isfrozen"
    assert marker.exists()

    second = start_agent(short_tmp, loopfs)
    agents.append(second)
    assert execute(second, "guest-fsfreeze-status") == {"return": "frozen"}
    reply = execute(second, "guest-file-open", {"path": "/etc/hostname"})
    assert reply["error"]["class"] == "CommandNotFound"
    assert reply["error"]["desc"].endswith("has been disabled: the agent is in frozen state")
    assert execute(second, "guest-fsfreeze-thaw") == {"return": 1}
    assert not loopfs.is_frozen()
    assert not marker.exists()
    assert "return" in execute(second, "guest-get-time")
    assert hook_calls(short_tmp) == ["1:freeze", "1:thaw"]


def test_max_frozen_time_thaws_by_itself(short_tmp, loopfs, cleanup):
    agents, writers = cleanup
    agent = start_agent(short_tmp, loopfs, ["--fsfreeze-max-frozen-time=1"])
    agents.append(agent)
    assert call(agent, freeze_list_request(loopfs)) == {"return": 1}
    writer = Writer(Path(loopfs.path) / "file")
    writers.append(writer)
    assert writer.finished_within(10.0), "no automatic thaw"
    assert not loopfs.is_frozen()
    assert execute(agent, "guest-fsfreeze-status") == {"return": "thawed"}
    assert hook_calls(short_tmp) == ["1:freeze", "1:thaw"]
    deadline = time.monotonic() + 5
    while "stayed frozen" not in agent.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "stayed frozen for 1 seconds" in agent.stderr()


def test_sigint_is_ignored_while_frozen(short_tmp, loopfs, cleanup):
    agents, _ = cleanup
    agent = start_agent(short_tmp, loopfs)
    agents.append(agent)
    assert call(agent, freeze_list_request(loopfs)) == {"return": 1}
    agent.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert agent.proc.poll() is None
    assert loopfs.is_frozen()


def test_restart_while_frozen_still_thaws_after_max_frozen_time(short_tmp, loopfs, cleanup):
    agents, _ = cleanup
    first = start_agent(short_tmp, loopfs)
    agents.append(first)
    assert call(first, freeze_list_request(loopfs)) == {"return": 1}
    first.proc.kill()
    first.proc.wait()

    second = start_agent(short_tmp, loopfs, ["--fsfreeze-max-frozen-time=1"])
    agents.append(second)
    deadline = time.monotonic() + 10
    while loopfs.is_frozen() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not loopfs.is_frozen(), "a restarted frozen agent never thawed by itself"
    assert execute(second, "guest-fsfreeze-status") == {"return": "thawed"}
