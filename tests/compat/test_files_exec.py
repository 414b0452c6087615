"""guest-file-* and guest-exec*: the same requests to the real qemu-ga and to the candidate.

Each scenario is a list of requests run against one agent at a time, in a
fresh directory both agents can reach (the files are recreated between the
two runs).  Replies are compared byte for byte after three normalisations:

* file handles become ``$H0``, ``$H1``... in the order they were handed out
  (the reference agent is shared between candidates, so its counter runs
  ahead), pids become ``$P0``...;
* the scenario directory becomes ``$DIR``;
* two texts where we follow current upstream instead of 7.2 are mapped to
  the upstream form on both sides: an unknown pid (7.2 ``Invalid parameter
  'pid'``, upstream ``PID ld does not exist``, a literal upstream bug) and a
  spawn failure (7.2 wraps GLib's message in ``Guest agent command failed,
  error was '...'``, upstream sends it alone).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest

Step = Tuple[str, Optional[dict]]
Send = Callable[[bytes], List[bytes]]

UNKNOWN_PID_72 = b"Invalid parameter 'pid'"
UNKNOWN_PID_UPSTREAM = b"PID ld does not exist"
SPAWN_WRAPPER_72 = re.compile(rb"Guest agent command failed, error was '(.*)'\"")


# -- running a scenario ----------------------------------------------------------------


class Run:
    """One scenario against one agent: sends steps, keeps normalised reply lines."""

    def __init__(self, send: Send, directory: str):
        self.send = send
        self.directory = directory
        self.handles: List[int] = []
        self.pids: List[int] = []
        self.lines: List[bytes] = []

    def substitute(self, value: Any) -> Any:
        if isinstance(value, str):
            match = re.fullmatch(r"\$([HP])(\d+)", value)
            if match:
                table = self.handles if match.group(1) == "H" else self.pids
                return table[int(match.group(2))]
            return value.replace("$DIR", self.directory)
        if isinstance(value, list):
            return [self.substitute(item) for item in value]
        if isinstance(value, dict):
            return {key: self.substitute(item) for key, item in value.items()}
        return value

    def call(self, execute: str, arguments: Optional[dict] = None) -> dict:
        request: Dict[str, Any] = {"execute": execute}
        if arguments is not None:
            request["arguments"] = self.substitute(arguments)
        lines = self.send(json.dumps(request).encode())
        assert len(lines) == 1, f"{execute}: expected one reply line, got {lines!r}"
        reply = json.loads(lines[0])
        if "return" in reply:
            if execute == "guest-file-open":
                self.handles.append(reply["return"])
            elif execute == "guest-exec":
                self.pids.append(reply["return"]["pid"])
        self.lines.append(self.normalise(lines[0]))
        return reply

    def normalise(self, line: bytes) -> bytes:
        for index, handle in enumerate(self.handles):
            line = line.replace(b'"return": %d}' % handle, b'"return": $H%d}' % index)
            line = line.replace(b"'%d'" % handle, b"'$H%d'" % index)
        for index, pid in enumerate(self.pids):
            line = line.replace(b'"pid": %d}' % pid, b'"pid": $P%d}' % index)
        line = line.replace(self.directory.encode(), b"$DIR")
        line = line.replace(UNKNOWN_PID_72, UNKNOWN_PID_UPSTREAM)
        return SPAWN_WRAPPER_72.sub(rb'\1"', line)

    def status_until_exited(self, pid: str, timeout: float = 10.0) -> dict:
        """Poll guest-exec-status; keep only the final reply (timing decides the rest)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.call("guest-exec-status", {"pid": pid})
            if "error" in reply or reply["return"]["exited"]:
                return reply
            self.lines.pop()
            assert time.monotonic() < deadline, f"{pid} did not exit in {timeout} s"
            time.sleep(0.01)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- file scenarios --------------------------------------------------------------------

HELLO = b"hello"
OPEN_MODES = ("r", "rb", "w", "wb", "a", "ab", "r+", "rb+", "r+b",
              "w+", "wb+", "w+b", "a+", "ab+", "a+b")


def every_mode_steps(index: int, mode: str) -> List[Step]:
    """Open hello with ``mode`` (as the index-th handle), read, write, seek, read back."""
    handle = "$H%d" % index
    return [
        ("guest-file-open", {"path": "$DIR/hello", "mode": mode}),
        ("guest-file-read", {"handle": handle, "count": 2}),
        ("guest-file-write", {"handle": handle, "buf-b64": b64(b"XY")}),
        ("guest-file-seek", {"handle": handle, "offset": 0, "whence": "cur"}),
        ("guest-file-seek", {"handle": handle, "offset": 0, "whence": "set"}),
        ("guest-file-read", {"handle": handle}),
        ("guest-file-close", {"handle": handle}),
    ]

FILE_SCENARIOS: Dict[str, List[Step]] = {
    "read-eof-rules": [
        ("guest-file-open", {"path": "$DIR/hello"}),
        ("guest-file-read", {"handle": "$H0", "count": 0}),
        ("guest-file-read", {"handle": "$H0", "count": 3}),
        ("guest-file-read", {"handle": "$H0", "count": 3}),
        ("guest-file-read", {"handle": "$H0", "count": 3}),
        ("guest-file-read", {"handle": "$H0"}),
        ("guest-file-seek", {"handle": "$H0", "offset": 0, "whence": "set"}),
        ("guest-file-read", {"handle": "$H0", "count": 5}),
        ("guest-file-read", {"handle": "$H0", "count": 5}),
        ("guest-file-read", {"handle": "$H0", "count": -1}),
        ("guest-file-read", {"handle": "$H0", "count": 50331649}),
        ("guest-file-read", {"handle": "$H0", "count": 50331648}),
        ("guest-file-close", {"handle": "$H0"}),
        ("guest-file-close", {"handle": "$H0"}),
        ("guest-file-read", {"handle": "$H0"}),
    ],
    "open-errors": [
        ("guest-file-open", {"path": "$DIR/hello", "mode": "rw"}),
        ("guest-file-open", {"path": "$DIR/hello", "mode": "R"}),
        ("guest-file-open", {"path": "$DIR/missing"}),
        ("guest-file-open", {"path": "$DIR/missing", "mode": "r+"}),
        ("guest-file-open", {"path": "$DIR/no/such/dir", "mode": "w"}),
        ("guest-file-open", {"path": "$DIR", "mode": "w"}),
        ("guest-file-open", {"path": ""}),
        ("guest-file-open", {"path": "$DIR/hello/below"}),
        # qemu's strings hold U+0000 as C0 80: the path does not end there.
        ("guest-file-open", {"path": "$DIR/x\u0000y"}),
        ("guest-file-open", {"path": "$DIR/new\u0000name", "mode": "w"}),
        ("guest-file-open", {"path": "$DIR/hello", "mode": "r\u0000"}),
        ("guest-file-write", {"handle": 5, "buf-b64": ""}),
        ("guest-file-seek", {"handle": 5, "offset": 0, "whence": 0}),
        ("guest-file-flush", {"handle": 5}),
    ],
    "every-mode": [step for index, mode in enumerate(OPEN_MODES) for step in every_mode_steps(index, mode)],
    "write-rules": [
        ("guest-file-open", {"path": "$DIR/out", "mode": "w+"}),
        ("guest-file-write", {"handle": "$H0", "buf-b64": "aGVsbG8=", "count": 6}),
        ("guest-file-write", {"handle": "$H0", "buf-b64": "aGVsbG8=", "count": 3}),
        ("guest-file-write", {"handle": "$H0", "buf-b64": "aGVsbG8=", "count": -1}),
        ("guest-file-write", {"handle": "$H0", "buf-b64": "aGVsbG8=", "count": 0}),
        ("guest-file-write", {"handle": "$H0", "buf-b64": ""}),
        ("guest-file-write", {"handle": "$H0", "buf-b64": "!!", "count": 0}),
        ("guest-file-read", {"handle": "$H0"}),
        ("guest-file-seek", {"handle": "$H0", "offset": 0, "whence": "set"}),
        ("guest-file-read", {"handle": "$H0"}),
        ("guest-file-seek", {"handle": "$H0", "offset": 1, "whence": 0}),
        ("guest-file-write", {"handle": "$H0", "buf-b64": "WFg="}),
        ("guest-file-seek", {"handle": "$H0", "offset": 0, "whence": 1}),
        ("guest-file-seek", {"handle": "$H0", "offset": -2, "whence": "end"}),
        ("guest-file-read", {"handle": "$H0"}),
        ("guest-file-flush", {"handle": "$H0"}),
        ("guest-file-close", {"handle": "$H0"}),
        ("guest-file-open", {"path": "$DIR/out", "mode": "a"}),
        ("guest-file-seek", {"handle": "$H1", "offset": 0, "whence": "cur"}),
        ("guest-file-write", {"handle": "$H1", "buf-b64": "WVo="}),
        ("guest-file-seek", {"handle": "$H1", "offset": 0, "whence": "cur"}),
        ("guest-file-close", {"handle": "$H1"}),
        ("guest-file-open", {"path": "$DIR/out"}),
        ("guest-file-read", {"handle": "$H2"}),
        ("guest-file-close", {"handle": "$H2"}),
    ],
    # test-qga's check: write, then read without a seek gives nothing, at EOF.
    "write-then-read": [
        ("guest-file-open", {"path": "$DIR/foo", "mode": "w+"}),
        ("guest-file-write", {"handle": "$H0", "buf-b64": b64(b"foobar")}),
        ("guest-file-read", {"handle": "$H0"}),
        ("guest-file-seek", {"handle": "$H0", "offset": 0, "whence": "set"}),
        ("guest-file-read", {"handle": "$H0", "count": 3}),
        ("guest-file-write", {"handle": "$H0", "buf-b64": b64(b"X")}),
        ("guest-file-seek", {"handle": "$H0", "offset": 0, "whence": "set"}),
        ("guest-file-read", {"handle": "$H0"}),
        ("guest-file-close", {"handle": "$H0"}),
    ],
    "seek-rules": [
        ("guest-file-open", {"path": "$DIR/hello", "mode": "r"}),
        ("guest-file-seek", {"handle": "$H0", "offset": 0, "whence": 3}),
        ("guest-file-seek", {"handle": "$H0", "offset": 0, "whence": -1}),
        ("guest-file-seek", {"handle": "$H0", "offset": -1, "whence": "set"}),
        ("guest-file-seek", {"handle": "$H0", "offset": 100, "whence": "end"}),
        ("guest-file-read", {"handle": "$H0"}),
        ("guest-file-seek", {"handle": "$H0", "offset": -200, "whence": "cur"}),
        ("guest-file-seek", {"handle": "$H0", "offset": 9223372036854775807, "whence": "end"}),
        ("guest-file-seek", {"handle": "$H0", "offset": 9223372036854775807, "whence": "set"}),
        ("guest-file-seek", {"handle": "$H0", "offset": -9223372036854775808, "whence": "cur"}),
        ("guest-file-seek", {"handle": "$H0", "offset": 2, "whence": "set"}),
        ("guest-file-read", {"handle": "$H0", "count": 1}),
        ("guest-file-close", {"handle": "$H0"}),
        ("guest-file-open", {"path": "/dev/null", "mode": "r+"}),
        ("guest-file-seek", {"handle": "$H1", "offset": 5, "whence": "set"}),
        ("guest-file-write", {"handle": "$H1", "buf-b64": "WFg="}),
        ("guest-file-read", {"handle": "$H1"}),
        ("guest-file-close", {"handle": "$H1"}),
    ],
    "base64-leniency": [
        step
        for index, text in enumerate(["YQ==YWJj", "AB=C", "YWJ", "Y\nW\nJj", "====", "=", "YQ=",
                                      "YWJjZA", "YQ=\nYWJj", "A=AA", "AAA=AAA=", "YWJj=",
                                      "YQ===", "aGVs\u0000!!!", "aGVs bG8=", "aGVs-G8_",
                                      "aGVsbG8=\n", "\n", "aGVsbG8\u00e9"])
        for step in (
            ("guest-file-open", {"path": "$DIR/b64", "mode": "w+"}),
            ("guest-file-write", {"handle": "$H%d" % index, "buf-b64": text}),
            ("guest-file-seek", {"handle": "$H%d" % index, "offset": 0, "whence": "set"}),
            ("guest-file-read", {"handle": "$H%d" % index}),
            ("guest-file-close", {"handle": "$H%d" % index}),
        )
    ],
    "directory-and-devices": [
        ("guest-file-open", {"path": "$DIR", "mode": "r"}),
        ("guest-file-read", {"handle": "$H0"}),
        ("guest-file-read", {"handle": "$H0", "count": 0}),
        ("guest-file-write", {"handle": "$H0", "buf-b64": "WFg="}),
        ("guest-file-close", {"handle": "$H0"}),
        ("guest-file-open", {"path": "$DIR/out", "mode": "w"}),
        ("guest-file-read", {"handle": "$H1"}),
        ("guest-file-read", {"handle": "$H1", "count": 0}),
        ("guest-file-close", {"handle": "$H1"}),
        ("guest-file-open", {"path": "$DIR/fifo", "mode": "r"}),
        ("guest-file-read", {"handle": "$H2"}),
        ("guest-file-seek", {"handle": "$H2", "offset": 0, "whence": "cur"}),
        ("guest-file-write", {"handle": "$H2", "buf-b64": "WFg="}),
        ("guest-file-close", {"handle": "$H2"}),
        ("guest-file-open", {"path": "$DIR/fifo", "mode": "w"}),
        ("guest-file-open", {"path": "$DIR/fifo", "mode": "r+"}),
        ("guest-file-write", {"handle": "$H3", "buf-b64": "WFg="}),
        ("guest-file-read", {"handle": "$H3", "count": 2}),
        ("guest-file-write", {"handle": "$H3", "buf-b64": "WFg="}),
        ("guest-file-flush", {"handle": "$H3"}),
        ("guest-file-read", {"handle": "$H3", "count": 1}),
        ("guest-file-write", {"handle": "$H3", "buf-b64": "WFla"}),
        ("guest-file-read", {"handle": "$H3", "count": 4}),
        ("guest-file-close", {"handle": "$H3"}),
        ("guest-file-open", {"path": "$DIR/link-to-hello"}),
        ("guest-file-read", {"handle": "$H4"}),
        ("guest-file-close", {"handle": "$H4"}),
        ("guest-file-open", {"path": "$DIR/dangling", "mode": "w"}),
    ],
}


def prepare_directory(directory: str) -> None:
    """(Re)create the scenario files: the same starting point for each agent."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    with open(os.path.join(directory, "hello"), "wb") as stream:
        stream.write(HELLO)
    os.chmod(os.path.join(directory, "hello"), 0o644)
    os.mkfifo(os.path.join(directory, "fifo"))
    os.symlink("hello", os.path.join(directory, "link-to-hello"))
    os.symlink("nowhere/at/all", os.path.join(directory, "dangling"))


def file_state(directory: str) -> Dict[str, Tuple[int, bytes]]:
    """What the scenario left on disk: mode and content of every regular file."""
    state = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as stream:
                state[name] = (os.stat(path).st_mode & 0o7777, stream.read())
    return state


# -- exec scenarios -------------------------------------------------------------------


def exec_scenario(run: Run, steps: Sequence[Step]) -> None:
    """guest-exec steps; after each successful spawn, poll until it exited."""
    for execute, arguments in steps:
        reply = run.call(execute, arguments)
        if execute == "guest-exec" and "return" in reply:
            run.status_until_exited("$P%d" % (len(run.pids) - 1))
            run.call("guest-exec-status", {"pid": "$P%d" % (len(run.pids) - 1)})


SIGNAL_MASKS = ('while read -r key value; do case $key in SigIgn:|SigBlk:) '
                'echo $key $(( 0x$value & ~0x180000000 ));; esac; done < /proc/$$/status')

EXEC_SCENARIOS: Dict[str, List[Step]] = {
    "exit-codes-and-output": [
        ("guest-exec", {"path": "/bin/sh", "arg": ["-c", "echo out; echo err >&2; exit 3"],
                        "capture-output": True}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "kill -9 $$"], "capture-output": True}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "echo hi"]}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "echo hi"], "capture-output": False}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "exit 0"], "capture-output": True}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "printf x >&2"], "capture-output": True}),
        ("guest-exec", {"path": "cat", "input-data": b64(b"some input\n"), "capture-output": True}),
        ("guest-exec", {"path": "cat", "input-data": "aGVsbG8", "capture-output": True}),
        ("guest-exec", {"path": "cat", "input-data": "", "capture-output": True}),
        ("guest-exec", {"path": "cat", "capture-output": True}),
        ("guest-exec", {"path": "cat", "input-data": "!!!", "capture-output": True}),
    ],
    "environment-and-path": [
        ("guest-exec", {"path": "env", "env": ["A=1", "B=two words"], "capture-output": True}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "echo $0 $# \"$1\""],
                        "capture-output": True}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "echo \"$1|$2\"", "x", "", "y z"],
                        "capture-output": True}),
        ("guest-exec", {"path": "true", "env": []}),
        ("guest-exec", {"path": "true", "env": ["PATH=/nonexistent"]}),
        ("guest-exec", {"path": "prog", "env": ["PATH=/nonexistent:$DIR/bin"],
                        "capture-output": True}),
        ("guest-exec", {"path": "$DIR/bin/script-without-shebang", "capture-output": True}),
    ],
    "spawn-failures": [
        ("guest-exec", {"path": "/bin/x"}),
        ("guest-exec", {"path": "x"}),
        ("guest-exec", {"path": ""}),
        ("guest-exec", {"path": "$DIR"}),
        ("guest-exec", {"path": "$DIR/hello"}),
        ("guest-exec", {"path": "hello", "env": ["PATH=$DIR"]}),
        ("guest-exec", {"path": "$DIR/no/such"}),
        ("guest-exec", {"path": "$DIR/hello/below"}),
        ("guest-exec-status", {"pid": 123456789}),
    ],
    "child-environment": [
        # What a child inherits besides its argv: no stray descriptors, the
        # signal dispositions (SIGPIPE back to default), stdin at EOF.
        ("guest-exec", {"path": "ls", "arg": ["/proc/self/fd"], "capture-output": True}),
        # Ignored and blocked signals (glibc's posix_spawn leaves its internal
        # signals 32 and 33 ignored: masked out), SIGPIPE kills again.
        ("guest-exec", {"path": "sh", "arg": ["-c", SIGNAL_MASKS], "capture-output": True}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "(yes; echo $? >&2) | head -c 3"],
                        "capture-output": True}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "wc -c; ls -l /proc/self/fd/0 | "
                                              "sed 's/.*-> //'"],
                        "capture-output": True}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "ls -l /proc/self/fd/1 /proc/self/fd/2 | "
                                              "sed 's/.*-> //' >&2"]}),
    ],
    "truncation": [
        ("guest-exec", {"path": "head", "arg": ["-c", "16777216", "/dev/zero"],
                        "capture-output": True}),
        ("guest-exec", {"path": "sh", "arg": ["-c", "head -c 16777217 /dev/zero >&2"],
                        "capture-output": True}),
    ],
}


def prepare_exec_directory(directory: str) -> None:
    prepare_directory(directory)
    bin_dir = os.path.join(directory, "bin")
    os.mkdir(bin_dir)
    with open(os.path.join(bin_dir, "prog"), "w") as stream:
        stream.write("#!/bin/sh\necho prog \"$0\" \"$@\"\n")
    os.chmod(os.path.join(bin_dir, "prog"), 0o755)
    with open(os.path.join(bin_dir, "script-without-shebang"), "w") as stream:
        stream.write("echo run by a shell\n")
    os.chmod(os.path.join(bin_dir, "script-without-shebang"), 0o755)


# -- the tests ------------------------------------------------------------------------


# The transcript's marker starts with 0xFF, which after a complete request is
# a stray byte: both agents answer it with this error, which we set aside.
MARKER_ERROR = b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'


def session_sender(session) -> Send:
    def send(request: bytes) -> List[bytes]:
        lines = session.transcript(request, timeout=60.0)
        assert lines[-1:] == [MARKER_ERROR], f"unexpected end of transcript: {lines[-1:]!r}"
        return lines[:-1]

    return send


@pytest.fixture
def shared_dir():
    """A directory both agents can reach (outside their private work dirs)."""
    directory = tempfile.mkdtemp(prefix="qga-files-")
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def both_runs(wire, directory: str, prepare: Callable[[str], None],
              scenario: Callable[[Run], None]):
    results = []
    for session in wire.sessions():
        prepare(directory)
        run = Run(session_sender(session), directory)
        scenario(run)
        results.append((run.lines, file_state(directory)))
    return results


@pytest.mark.compat
@pytest.mark.parametrize("name", sorted(FILE_SCENARIOS))
def test_file_scenario(wire, shared_dir, name):
    def scenario(run: Run) -> None:
        for execute, arguments in FILE_SCENARIOS[name]:
            run.call(execute, arguments)

    (expected, expected_files), (actual, actual_files) = both_runs(
        wire, shared_dir, prepare_directory, scenario)
    assert actual == expected, wire.mismatch(name.encode(), expected, actual)
    assert actual_files == expected_files


@pytest.mark.compat
@pytest.mark.parametrize("name", sorted(EXEC_SCENARIOS))
def test_exec_scenario(wire, shared_dir, name):
    (expected, _), (actual, _) = both_runs(
        wire, shared_dir, prepare_exec_directory,
        lambda run: exec_scenario(run, EXEC_SCENARIOS[name]))
    assert actual == expected, wire.mismatch(name.encode(), expected, actual)


@pytest.mark.compat
def test_big_read_and_write_round_trip(wire, shared_dir):
    """Multi-megabyte writes and a read of both at once, through the real wire.

    (The 48 MiB read limit itself is checked in the unit tests and in
    read-eof-rules; here the size is kept to what the transcript reader
    handles in well under a second.)
    """
    data = os.urandom(1 << 20) * 8
    encoded = b64(data)

    def scenario(run: Run) -> None:
        run.call("guest-file-open", {"path": "$DIR/big", "mode": "w+"})
        reply = run.call("guest-file-write", {"handle": "$H0", "buf-b64": encoded})
        assert reply == {"return": {"count": len(data), "eof": False}}
        run.call("guest-file-write", {"handle": "$H0", "buf-b64": encoded})
        run.call("guest-file-seek", {"handle": "$H0", "offset": 0, "whence": "set"})
        reply = run.call("guest-file-read", {"handle": "$H0", "count": 3 * len(data)})
        assert reply["return"]["count"] == 2 * len(data)
        assert reply["return"]["buf-b64"] == b64(data + data)
        run.call("guest-file-close", {"handle": "$H0"})

    (expected, _), (actual, _) = both_runs(wire, shared_dir, prepare_directory, scenario)
    assert actual == expected
