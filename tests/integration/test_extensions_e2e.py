"""Extensions end to end through our agent process: keygen, build, sign, push, call,
events, upgrade, automatic rollback, remove, restart.

The host side is qga.host.Client on the agent's unix-listen socket; bundles
are built and signed with qga-bundle (tests/support/ext_hello.py).  As root
(CI) each extension runs as its own system user, checked here for real.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from qga.errors import AgentError
from qga.ext.launch import user_name
from qga.host.client import Client
from tests.support.agents import our_agent
from tests.support.ext_hello import NAME, agent_config

ROOT = os.geteuid() == 0

NEVER_READY = """
import os, socket, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(os.environ["QGA_EXT_SOCKET"])
sock.sendall(b'{"hello": "control", "version": 1}\\n')
time.sleep(3600)
"""
CRASHES = "import sys\nprint('broken build', flush=True)\nsys.exit(3)\n"


class Guest:
    """Our agent in its own directory, started with the bundles' trust directory."""

    def __init__(self, bundles):
        self.workdir = Path(tempfile.mkdtemp(prefix="qga-ext-"))
        os.chmod(self.workdir, 0o755)  # extension users must reach their code below it
        self.env = agent_config(self.workdir, bundles.trust_dir)
        self.agent = None
        self.client = None

    def start(self):
        self.agent = our_agent(self.workdir, ["-v"], env=self.env).start()
        self.client = Client(self.agent.sock, timeout=30)
        return self

    def stop(self):
        if self.client is not None:
            self.client.close()
        if self.agent is not None:
            self.agent.stop()

    def kill(self):
        self.client.close()
        self.agent.proc.kill()
        self.agent.proc.wait()

    def log(self):
        return self.agent.stderr() if self.agent else ""

    def status(self, name=NAME):
        return self.client.ext_status(name)

    def wait_state(self, state, name=NAME, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(name)
            if status["state"] == state:
                return status
            time.sleep(0.05)
        raise AssertionError(f"{name} never reached {state}: {status}\n{self.log()[-3000:]}")

    def close(self):
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def guest(bundles):
    running = Guest(bundles).start()
    yield running
    print(running.log()[-4000:])  # shown when the test fails
    running.close()


def process_user(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except OSError:
        return False
    return state != "Z"


def test_push_call_events_upgrade_replay_remove(guest, bundles):
    client = guest.client
    progress = []
    record = client.push(bundles.build("1.0.0", counter=10),
                         progress=lambda sent, total: progress.append((sent, total)))
    assert record == {"name": NAME, "version": "1.0.0", "state": "done"}
    assert progress and progress[-1][0] == progress[-1][1]
    assert client.ext_list() == [{"name": NAME, "version": "1.0.0", "state": "running",
                                  "enabled": True, "mode": "envelope"}]
    status = guest.status()
    assert status["connected"] and status["counter"] == 10 and status["restarts"] == 0
    if ROOT:
        import pwd

        assert pwd.getpwuid(process_user(status["pid"])).pw_name == user_name(NAME)

    assert client.ext_call(NAME, "greet", {"who": "host"}) == {"greeting": "hello host",
                                                                   "count": 1}
    with pytest.raises(AgentError, match=f"arguments of {NAME} greet: at who"):
        client.ext_call(NAME, "greet", {"who": 7})
    with pytest.raises(AgentError, match="has no command 'shout'"):
        client.ext_call(NAME, "shout")
    batch = client.ext_events(NAME)
    assert [(e["name"], e["data"]) for e in batch["events"]] == [
        ("greeted", {"who": "host", "count": 1})]
    assert batch["dropped"] == 0
    assert client.ext_events(NAME, batch["cursor"])["events"] == []

    # An upgrade keeps the extension's data and the version before.
    old_pid = status["pid"]
    record = client.push(bundles.build("1.1.0", counter=11))
    assert record["state"] == "done" and record["version"] == "1.1.0"
    status = guest.status()
    assert (status["version"], status["previous-version"], status["counter"]) == (
        "1.1.0", "1.0.0", 11)
    assert not alive(old_pid)
    assert client.ext_call(NAME, "greet", {"who": "again"})["count"] == 2

    # The old bundle again: a replay, refused, and nothing changes.
    with pytest.raises(AgentError, match="counter 10 is not above the installed counter 11"):
        client.push(bundles.build("1.0.0", counter=10))
    assert guest.status()["version"] == "1.1.0"
    assert guest.status()["install"]["state"] == "failed"

    pid = guest.status()["pid"]
    client.ext_remove(NAME)
    assert client.ext_list() == []
    status = guest.status()
    assert status["state"] == "not-installed" and status["counter"] == 11
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    store = guest.workdir / "state" / "extensions"
    assert sorted(os.listdir(store)) == ["index.json", "staging"]
    assert os.listdir(store / "staging") == []
    assert not (guest.workdir / "run" / "ext" / f"{NAME}.sock").exists()
    client.ping()


def test_a_broken_upgrade_is_rolled_back(guest, bundles):
    client = guest.client
    assert client.push(bundles.build("1.0.0", counter=20))["state"] == "done"
    before = guest.status()["pid"]

    quiet = bundles.build("2.0.0", counter=21, script=NEVER_READY,
                          manifest={"health": {"ready-timeout": 0.5}})
    record = client.push(quiet)
    assert record["state"] == "rolled-back"
    assert record["error"] == "did not say it was ready within 0.5 s"
    status = guest.wait_state("running")
    assert status["version"] == "1.0.0" and "previous-version" not in status
    assert status["pid"] != before  # stopped for the upgrade, started again
    assert client.ext_call(NAME, "greet", {"who": "a"})["count"] == 1

    record = client.push(bundles.build("2.0.1", counter=22, script=CRASHES))
    assert record["state"] == "rolled-back"
    assert record["error"].startswith("exited with status 3")
    assert "broken build" in record["error"]
    guest.wait_state("running")
    assert guest.status()["counter"] == 22  # a failed version is not installed again
    versions = guest.workdir / f"state/extensions/{NAME}/versions"
    assert len(os.listdir(versions)) == 1


def test_a_failed_first_install_leaves_nothing(guest, bundles):
    record = guest.client.push(bundles.build("1.0.0", counter=30, script=CRASHES))
    assert record["state"] == "failed"
    status = guest.status()
    assert status["state"] == "not-installed" and status["install"]["state"] == "failed"
    assert guest.client.ext_list() == []
    assert sorted(os.listdir(guest.workdir / "state/extensions")) == ["index.json", "staging"]


def test_stop_and_start_and_the_agent_restart(guest, bundles):
    client = guest.client
    client.push(bundles.build("1.0.0", counter=40))
    assert client.ext_call(NAME, "greet", {"who": "x"})["count"] == 1
    pid = guest.status()["pid"]
    client.ext_stop(NAME)
    status = guest.wait_state("stopped")
    assert "pid" not in status and not status["enabled"]
    assert not alive(pid)
    with pytest.raises(AgentError, match=f"extension {NAME} is stopped"):
        client.ext_call(NAME, "greet")

    # Stopped stays stopped across a restart of the agent...
    guest.stop()
    guest.start()
    assert guest.status()["state"] == "stopped"
    guest.client.ext_start(NAME)
    guest.wait_state("running")

    # ...and running comes back running, with its data; stopping the agent stops it.
    pid = guest.status()["pid"]
    guest.stop()
    assert not alive(pid)
    guest.start()
    status = guest.wait_state("running")
    assert guest.client.ext_call(NAME, "greet", {"who": "x"})["count"] == 2
    assert status["install"]["state"] == "done"


def test_a_killed_agent_takes_its_extensions_with_it(guest, bundles):
    guest.client.push(bundles.build("1.0.0", counter=50))
    pid = guest.status()["pid"]
    guest.kill()
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)  # the parent-death signal
    guest.start()
    status = guest.wait_state("running")
    assert status["pid"] != pid
    assert guest.client.ext_call(NAME, "echo", {"a": [1, 2]}) == {"a": [1, 2]}


@pytest.mark.skipif(not ROOT, reason="extensions run as their own users only under root")
def test_a_state_directory_its_users_cannot_reach_is_a_clear_failure(guest, bundles):
    os.chmod(guest.workdir, 0o700)
    record = guest.client.push(bundles.build("1.0.0", counter=60))
    assert record["state"] == "failed"
    assert "extension users cannot reach" in record["error"]
    assert "need at least mode 0711" in record["error"]


def test_hostile_pushes_are_refused_and_leave_nothing(guest, bundles):
    client = guest.client
    store = guest.workdir / "state" / "extensions"
    good = bundles.build("1.0.0", counter=70)
    data = good.read_bytes()
    statement, signature = (Path(str(good) + suffix).read_bytes()
                            for suffix in (".statement", ".sig"))

    def install(archive, statement=statement, signature=signature, complete=True):
        upload = client.call("guest-extension-upload", {"size": len(archive)})["upload"]
        chunk = archive if complete else archive[:len(archive) // 2]
        client.call("guest-extension-upload", {"upload": upload, "offset": 0,
                                               "data": base64.b64encode(chunk).decode()})
        return client.call("guest-extension-install", {
            "upload": upload, "statement": base64.b64encode(statement).decode(),
            "signature": base64.b64encode(signature).decode()})

    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0xFF
    forged = bytearray(signature)
    forged[0] ^= 0xFF
    other = bundles.build("1.0.0", counter=71, manifest={"name": "evil"})
    other_statement = Path(str(other) + ".statement").read_bytes()
    other_signature = Path(str(other) + ".sig").read_bytes()
    cases = [
        (lambda: install(data, complete=False), "has .* of its .* bytes"),
        (lambda: install(bytes(tampered)), "SHA-256 differs"),
        (lambda: install(data, signature=bytes(forged)), "signature"),
        (lambda: install(other.read_bytes(), other_statement, other_signature),
         "may not sign extension 'evil'"),
        (lambda: install(data + b"\x00"), "the statement says"),  # one byte appended
    ]
    for attempt, refusal in cases:
        with pytest.raises(AgentError, match=refusal):
            attempt()
        client.ping()
    assert client.ext_list() == []
    assert [name for name in os.listdir(store) if name not in ("index.json", "staging")] == []
    assert len(os.listdir(store / "staging")) == 1  # only the incomplete upload, resumable
    assert client.push(good)["state"] == "done"  # and the real one still goes in
