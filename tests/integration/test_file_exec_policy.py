"""guest-file/guest-exec behaviour only the real agent process shows: our limits, reaping.

``--file-allow-dirs`` and ``--exec-allow-programs`` reach the handlers from
the command line; refusals look to the host like qemu-ga's EACCES answers.
"""

from __future__ import annotations

import base64
import os
import time

import pytest

from tests.support.agents import our_agent


@pytest.fixture
def fenced_agent(short_tmp):
    allowed = short_tmp / "allowed"
    allowed.mkdir()
    (allowed / "file").write_bytes(b"inside")
    (short_tmp / "secret").write_bytes(b"secret")
    echo = os.path.realpath("/bin/echo")
    agent = our_agent(short_tmp, [f"--file-allow-dirs={allowed}",
                                  f"--exec-allow-programs={echo}"]).start()
    yield agent, short_tmp
    agent.stop()


def test_files_inside_only(fenced_agent):
    agent, workdir = fenced_agent
    with agent.connect() as connection:
        handle = connection.call("guest-file-open", {"path": str(workdir / "allowed" / "file")})
        reply = connection.call("guest-file-read", {"handle": handle["return"]})
        assert base64.b64decode(reply["return"]["buf-b64"]) == b"inside"
        secret = str(workdir / "allowed" / ".." / "secret")
        assert connection.call("guest-file-open", {"path": secret}) == {"error": {
            "class": "GenericError",
            "desc": f"failed to open file '{secret}' (mode: 'r'): Permission denied"}}


def test_listed_programs_only(fenced_agent):
    agent, _ = fenced_agent
    with agent.connect() as connection:
        assert connection.call("guest-exec", {"path": "sh", "arg": ["-c", "true"]}) == {"error": {
            "class": "GenericError",
            "desc": "Failed to execute child process \u201csh\u201d (Permission denied)"}}
        pid = connection.call("guest-exec", {"path": "echo", "arg": ["hi"],
                                             "capture-output": True})["return"]["pid"]
        deadline = time.monotonic() + 10
        while True:
            status = connection.call("guest-exec-status", {"pid": pid})["return"]
            if status["exited"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert base64.b64decode(status["out-data"]) == b"hi\n"


def test_children_are_reaped_without_a_status_request(agent):
    """The agent's loop reaps an exited child at once: no zombie waits for the host."""
    with agent.connect() as connection:
        pid = connection.call("guest-exec", {"path": "true"})["return"]["pid"]
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}"):
            assert time.monotonic() < deadline, "the child stayed a zombie"
            time.sleep(0.01)
        assert connection.call("guest-exec-status", {"pid": pid}) == {
            "return": {"exitcode": 0, "exited": True}}
