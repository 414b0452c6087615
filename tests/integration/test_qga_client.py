"""qga.host.Client and qga-client against real agents: qemu-ga and ours.

Every test runs twice, once per agent, with the same expectations: a host
tool that works with one must work with the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qga.errors import AgentError, ReplyTimeout
from qga.host import Client
from tests.support.agents import REPO


@pytest.fixture(params=["qemu-ga", "qga"])
def any_agent(request):
    """The real qemu-ga, then our agent (the fixtures of tests/conftest.py)."""
    return request.getfixturevalue("qemu_ga" if request.param == "qemu-ga" else "agent")


@pytest.fixture
def client(any_agent):
    with Client(any_agent.sock, timeout=20) as connected:
        yield connected


def test_ping_and_info(client):
    client.ping()
    info = client.info()
    assert isinstance(info["version"], str)
    names = {entry["name"] for entry in info["supported_commands"]}
    assert {"guest-sync-delimited", "guest-file-open", "guest-exec"} <= names


def test_sync_with_stale_replies_pending(any_agent):
    with Client(any_agent.sock) as client:
        client.ping()
        # Requests whose replies nobody reads, then half a request: the next
        # call must resync past all of it.
        stale = b"".join(b'{"execute":"guest-ping","id":"stale-%d"}' % i for i in range(20))
        client._reader.sock.sendall(stale + b'{"execute":"guest-info",')
        time.sleep(0.1)
        client.sync()
        assert client.call("guest-sync", {"id": 99}) == 99
        assert client.call("guest-ping") == {}


def test_sync_after_another_client_left_half_a_request(any_agent):
    with any_agent.connect() as raw:
        raw.send(b'{"execute":"guest-ping","arguments":{')
    with Client(any_agent.sock) as client:
        assert client.call("guest-sync", {"id": 7}) == 7


def test_resync_after_reply_timeout(any_agent):
    with Client(any_agent.sock) as client:
        client.ping()
        # An exec that finishes later than we wait: the reply arrives stale.
        with pytest.raises(ReplyTimeout):
            client.exec("/bin/sleep", ["0.3"], capture=False, timeout=0.05)
        with pytest.raises(ReplyTimeout):
            client.call("guest-get-osinfo", timeout=1e-9)
        assert client.call("guest-sync", {"id": 5}) == 5


def test_file_round_trip_with_sha256(client, tmp_path):
    data = os.urandom(5 * 1024 * 1024 + 12345)
    guest_path = str(tmp_path / "payload.bin")
    assert client.write_file(guest_path, data) == len(data)
    assert hashlib.sha256(Path(guest_path).read_bytes()).digest() == hashlib.sha256(data).digest()
    back = client.read_file(guest_path)
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
    chunks = list(client.iter_file(guest_path, chunk_size=1024 * 1024))
    assert [len(chunk) for chunk in chunks] == [1024 * 1024] * 5 + [12345]


def test_write_file_from_a_file_object_and_append(client, tmp_path):
    guest_path = str(tmp_path / "log.txt")
    source = tmp_path / "source"
    source.write_bytes(b"first\n")
    with open(source, "rb") as stream:
        client.write_file(guest_path, stream)
    client.write_file(guest_path, b"second\n", mode="a")
    assert Path(guest_path).read_bytes() == b"first\nsecond\n"


def test_exec_exit_code_and_output(client):
    result = client.exec("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"])
    assert (result.exitcode, result.signal) == (3, None)
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")


def test_exec_input_env_and_signal(client):
    result = client.exec("cat", env={"PATH": "/usr/bin:/bin"}, input_data=b"\x00\xffdata")
    assert (result.exitcode, result.stdout) == (0, b"\x00\xffdata")
    result = client.exec("/bin/sh", ["-c", "echo $ONLY; env | wc -l"], env=["ONLY=me"])
    assert result.stdout.split() == [b"me", b"2"]  # ONLY and the shell's PWD
    result = client.exec("/bin/sh", ["-c", "kill -KILL $$"])
    assert (result.exitcode, result.signal, result.returncode) == (None, 9, -9)


def test_errors_become_agent_error(client, tmp_path):
    with pytest.raises(AgentError) as info:
        client.call("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    assert info.value.desc == "The command no-such-command has not been found"
    missing = str(tmp_path / "missing")
    with pytest.raises(AgentError) as info:
        client.read_file(missing)
    assert info.value.error_class == "GenericError"
    assert info.value.desc == f"failed to open file '{missing}' (mode: 'r'): No such file or directory"
    assert info.value.command == "guest-file-open"
    with pytest.raises(AgentError, match="Parameter 'id' is missing"):
        client.call("guest-sync", {})
    # A command that replies only on failure still reports its failure.
    with pytest.raises(AgentError, match="mode is invalid"):
        client.call("guest-shutdown", {"mode": "bogus"})
    client.ping()


# -- the qga-client command line -------------------------------------------------------------


def qga_client(agent, *args, input_data=None):
    env = dict(os.environ, QGA_SOCKET=str(agent.sock))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "qga.host.cli", *args], input=input_data,
                          capture_output=True, env=env, timeout=60)


def test_cli_ping_info_call(any_agent):
    done = qga_client(any_agent, "ping")
    assert (done.returncode, done.stdout) == (0, b"ok\n")
    done = qga_client(any_agent, "--json", "info")
    assert done.returncode == 0
    assert "guest-ping" in {entry["name"] for entry in json.loads(done.stdout)["supported_commands"]}
    done = qga_client(any_agent, "--json", "call", '{"execute":"guest-sync","arguments":{"id":4}}')
    assert (done.returncode, done.stdout) == (0, b"4\n")
    done = qga_client(any_agent, "call", "nope")
    assert done.returncode == 1
    assert done.stderr == b"qga-client: nope: CommandNotFound: The command nope has not been found\n"


def test_cli_exec_exit_status_and_streams(any_agent):
    done = qga_client(any_agent, "exec", "--input", "-", "/bin/sh", "-c",
                      "cat; echo E >&2; exit 42", input_data=b"from stdin\n")
    assert done.returncode == 42, done.stderr
    assert (done.stdout, done.stderr) == (b"from stdin\n", b"E\n")
    done = qga_client(any_agent, "exec", "--env", "PATH=/bin:/usr/bin", "true")
    assert done.returncode == 0, done.stderr
    # Options after PROG belong to the program.
    done = qga_client(any_agent, "exec", "/bin/echo", "--env", "x")
    assert (done.returncode, done.stdout) == (0, b"--env x\n")


def test_cli_put_get_cat(any_agent, tmp_path):
    data = os.urandom(2 * 1024 * 1024 + 3)
    (tmp_path / "up").write_bytes(data)
    guest = str(tmp_path / "guest")
    assert qga_client(any_agent, "put", str(tmp_path / "up"), guest).returncode == 0
    assert qga_client(any_agent, "get", guest, str(tmp_path / "down")).returncode == 0
    assert (tmp_path / "down").read_bytes() == data
    done = qga_client(any_agent, "cat", guest)
    assert done.returncode == 0 and done.stdout == data
    done = qga_client(any_agent, "cat", str(tmp_path / "absent"))
    assert done.returncode == 1 and b"GenericError: failed to open file" in done.stderr
