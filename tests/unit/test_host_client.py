"""Unit tests of qga.host.Client's framing, sync and error handling.

The peer here is a scripted agent on a real Unix socket (a thread), because
the cases are exactly what a real agent never does on purpose: stale and
garbage lines, over-long lines, silence, dropped connections.  The client's
behaviour with the real agents is in tests/integration/test_qga_client.py.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from typing import Callable, List, Optional

import pytest

from qga.errors import AgentError, BadReply, ConnectionLost, ReplyTimeout, SyncError
from qga.host import cli
from qga.host.client import Client


class Peer:
    """The agent side of one connection, as seen by a script."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.buffer = b""
        self.raw: List[bytes] = []  # every request line as received, 0xFF included

    def request(self) -> Optional[dict]:
        """The next request (one per line, as the client sends them); None at EOF."""
        while b"\n" not in self.buffer:
            data = self.conn.recv(65536)
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        self.raw.append(line)
        return json.loads(line.lstrip(b"\xff"))

    def write(self, data: bytes) -> None:
        self.conn.sendall(data)

    def reply(self, request: dict, value=None, **extra) -> None:
        reply = {"return": {} if value is None else value, **extra}
        if "id" in request:
            reply["id"] = request["id"]
        self.write(json.dumps(reply).encode() + b"\n")

    def error(self, request: dict, desc: str, error_class: str = "GenericError") -> None:
        reply = {"error": {"class": error_class, "desc": desc}}
        if "id" in request:
            reply = {"id": request["id"], **reply}
        self.write(json.dumps(reply).encode() + b"\n")

    def sync(self, before: bytes = b"") -> dict:
        """Answer the client's sync the way qemu-ga does, after writing ``before``."""
        request = self.request()
        assert request is not None and request["execute"] == "guest-sync-delimited"
        assert self.raw[-1].startswith(b"\xff{"), "sync must start with one 0xFF"
        self.write(before + b'{"error": {"class": "GenericError", "desc": "JSON parse error, '
                   b'stray \'\\uFFFD\'"}}\n')
        self.write(b"\xff" + json.dumps({"return": request["arguments"]["id"],
                                          "id": request["id"]}).encode() + b"\n")
        return request


class ScriptedAgent:
    """A Unix socket server running ``script(peer)`` for each connection, in a thread."""

    def __init__(self, path: str, script: Callable[[Peer], None], connections: int = 1):
        self.path = path
        self.script = script
        self.errors: List[BaseException] = []
        self.peers: List[Peer] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.server.settimeout(10)
        self.thread = threading.Thread(target=self._serve, args=(connections,), daemon=True)
        self.thread.start()

    def _serve(self, connections: int) -> None:
        try:
            for _ in range(connections):
                conn, _ = self.server.accept()
                conn.settimeout(10)
                peer = Peer(conn)
                self.peers.append(peer)
                try:
                    self.script(peer)
                finally:
                    conn.close()
        except BaseException as error:  # reported by finish()
            self.errors.append(error)

    def finish(self) -> None:
        self.thread.join(10)
        self.server.close()
        assert not self.thread.is_alive(), "script did not finish"
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def serve(tmp_path):
    agents: List[ScriptedAgent] = []

    def start(script, connections=1) -> str:
        path = str(tmp_path / f"agent{len(agents)}.sock")
        agents.append(ScriptedAgent(path, script, connections))
        return path

    yield start
    for agent in agents:
        agent.server.close()


# -- sync ----------------------------------------------------------------------------


def test_sync_skips_stale_replies_and_garbage(serve):
    def script(peer: Peer):
        stale = (b'{"return": {}, "id": 1}\n' b"garbage that is not json\n"
                 b'\xff{"return": 12345}\n'  # an older client's delimited sync reply
                 b'{"return": 7')  # and half a line, finished by the next write
        peer.sync(before=stale + b"}\n")
        request = peer.request()
        assert request["execute"] == "guest-ping"
        peer.reply(request)

    path = serve(script)
    with Client(path) as client:
        client.ping()


def test_sync_error_when_agent_is_silent(serve):
    def script(peer: Peer):
        peer.request()
        time.sleep(0.5)

    with Client(serve(script), sync_timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(SyncError):
            client.ping()
        assert time.monotonic() - started < 0.45


def test_sync_falls_back_to_guest_sync_when_delimited_is_refused(serve):
    def script(peer: Peer):
        request = peer.request()
        peer.error(request, "Command guest-sync-delimited has been disabled", "CommandNotFound")
        request = peer.request()
        assert request["execute"] == "guest-sync"
        peer.write(b'{"return": 1}\n')  # not ours
        peer.reply(request, request["arguments"]["id"])
        request = peer.request()
        peer.reply(request, 42)

    with Client(serve(script)) as client:
        assert client.call("guest-get-time") == 42


def test_sync_error_when_no_sync_is_possible(serve):
    def script(peer: Peer):
        for _ in range(2):
            request = peer.request()
            peer.error(request, f"Command {request['execute']} has been disabled",
                       "CommandNotFound")

    with Client(serve(script)) as client:
        with pytest.raises(SyncError, match="has been disabled"):
            client.sync()


def test_sync_accepts_reply_without_delimiter_or_id(serve):
    def script(peer: Peer):
        request = peer.request()
        peer.write(b'{"return": %d}\n' % request["arguments"]["id"])
        peer.reply(peer.request())

    with Client(serve(script)) as client:
        client.ping()


# -- calls ---------------------------------------------------------------------------


def test_call_returns_value_and_skips_replies_for_other_ids(serve):
    seen = []

    def script(peer: Peer):
        peer.sync()
        request = peer.request()
        seen.append(request)
        peer.write(b'{"return": "late", "id": 99}\n')
        peer.reply(request, {"version": "1.2.3"})

    with Client(serve(script)) as client:
        assert client.call("guest-info", {"x": 1}) == {"version": "1.2.3"}
    assert seen[0]["execute"] == "guest-info" and seen[0]["arguments"] == {"x": 1}
    assert isinstance(seen[0]["id"], int)


def test_error_reply_becomes_agent_error(serve):
    def script(peer: Peer):
        peer.sync()
        peer.error(peer.request(), "The command nope has not been found", "CommandNotFound")
        peer.reply(peer.request())

    with Client(serve(script)) as client:
        with pytest.raises(AgentError) as info:
            client.call("nope")
        assert info.value.error_class == "CommandNotFound"
        assert info.value.desc == "The command nope has not been found"
        assert info.value.command == "nope"
        client.ping()  # still in step: no resync needed after an error reply


def test_error_without_id_is_taken_as_ours(serve):
    def script(peer: Peer):
        peer.sync()
        peer.request()
        peer.write(b'{"error": {"class": "GenericError", "desc": "JSON parse error, x"}}\n')

    with Client(serve(script)) as client:
        with pytest.raises(AgentError, match="JSON parse error"):
            client.ping()


def test_timeout_then_automatic_resync_skips_the_late_reply(serve):
    def script(peer: Peer):
        peer.sync()
        slow = peer.request()
        # The reply to the abandoned request arrives just before the next sync's.
        peer.sync(before=json.dumps({"return": "late", "id": slow["id"]}).encode() + b"\n")
        peer.reply(peer.request(), "fresh")

    agent_path = serve(script)
    with Client(agent_path, timeout=0.2) as client:
        with pytest.raises(ReplyTimeout):
            client.call("guest-slow")
        assert client.call("guest-fast") == "fresh"


def test_connection_lost(serve):
    def script(peer: Peer):
        peer.sync()
        peer.request()

    with Client(serve(script)) as client:
        with pytest.raises(ConnectionLost):
            client.ping()
        assert not client.connected


def test_connect_waits_while_the_backlog_is_full(tmp_path):
    path = str(tmp_path / "busy.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(path)  # takes the only place in the backlog
    client = Client(path, sync_timeout=2)
    try:
        timer = threading.Timer(0.2, lambda: server.accept()[0].close())
        timer.start()
        started = time.monotonic()
        client.connect()
        assert 0.15 < time.monotonic() - started < 1.5
        timer.join()
    finally:
        client.close()
        filler.close()
        server.close()


def test_connect_gives_up_when_the_agent_stays_busy(tmp_path):
    path = str(tmp_path / "busy.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(path)
    try:
        with pytest.raises(ConnectionLost, match="busy"):
            Client(path, sync_timeout=0.2).connect()
    finally:
        filler.close()
        server.close()


def test_connect_failure_is_connection_lost(tmp_path):
    with pytest.raises(ConnectionLost, match="cannot connect"):
        Client(str(tmp_path / "absent.sock")).ping()


def test_garbage_reply_is_bad_reply_and_forces_resync(serve):
    def script(peer: Peer):
        peer.sync()
        peer.request()
        peer.write(b"<html>oops</html>\n")
        peer.sync()
        peer.reply(peer.request(), 5)

    with Client(serve(script)) as client:
        with pytest.raises(BadReply):
            client.ping()
        assert client.call("guest-sync", {"id": 5}) == 5


def test_over_long_line_is_bounded(serve):
    def script(peer: Peer):
        peer.sync()
        peer.request()
        # 64 KiB without a newline, in pieces, then the end of that line.
        for _ in range(64):
            peer.write(b"x" * 1024)
        peer.write(b"\n")
        peer.sync(before=b"y" * 5000 + b"\n")  # too long as well, skipped during sync
        peer.reply(peer.request(), "ok")

    with Client(serve(script), max_line=4096) as client:
        with pytest.raises(BadReply, match="longer than 4096"):
            client.ping()
        assert len(client._reader.buffer) <= 4096  # what was read of the line is gone
        assert client.call("guest-ping") == "ok"


# -- commands without a reply on success -------------------------------------------------


def test_no_reply_command_returns_none_after_grace(serve):
    def script(peer: Peer):
        peer.sync()
        request = peer.request()
        assert request["execute"] == "guest-shutdown"
        peer.sync()  # the next call resyncs, in case an error was still coming
        peer.reply(peer.request())

    with Client(serve(script), no_reply_grace=0.2) as client:
        started = time.monotonic()
        assert client.call("guest-shutdown", {"mode": "powerdown"}) is None
        assert 0.15 < time.monotonic() - started < 1.0
        client.ping()


def test_no_reply_command_reports_its_error(serve):
    def script(peer: Peer):
        peer.sync()
        peer.error(peer.request(), "child process has failed to suspend")

    with Client(serve(script), no_reply_grace=2) as client:
        with pytest.raises(AgentError, match="failed to suspend"):
            client.call("guest-suspend-ram")


def test_no_reply_command_and_dropped_connection(serve):
    def script(peer: Peer):
        peer.sync()
        peer.request()

    with Client(serve(script), no_reply_grace=5) as client:
        started = time.monotonic()
        assert client.call("guest-suspend-disk") is None
        assert time.monotonic() - started < 2


# -- file and exec helpers ------------------------------------------------------------------


class FileAgent:
    """A script that implements guest-file-* over an in-memory file system."""

    def __init__(self, files=None, short_writes=False):
        self.files = dict(files or {})
        self.handles = {}
        self.closed = []
        self.writes = []
        self.short_writes = short_writes

    def __call__(self, peer: Peer) -> None:
        peer.sync()
        while True:
            request = peer.request()
            if request is None:
                return
            name, args = request["execute"], request.get("arguments", {})
            if name == "guest-file-open":
                if args["mode"] == "r" and args["path"] not in self.files:
                    peer.error(request, f"failed to open file '{args['path']}' (mode: 'r'): "
                                        "No such file or directory")
                    continue
                if args["mode"] == "w":
                    self.files[args["path"]] = b""
                handle = 1000 + len(self.handles)
                self.handles[handle] = [args["path"], 0]
                peer.reply(request, handle)
            elif name == "guest-file-read":
                path, position = self.handles[args["handle"]]
                data = self.files[path][position:position + args["count"]]
                self.handles[args["handle"]][1] += len(data)
                eof = self.handles[args["handle"]][1] >= len(self.files[path])
                peer.reply(request, {"count": len(data), "eof": eof,
                                     "buf-b64": base64.b64encode(data).decode()})
            elif name == "guest-file-write":
                data = base64.b64decode(args["buf-b64"])
                if self.short_writes and len(data) > 1:
                    data = data[:len(data) // 2]
                self.writes.append(len(data))
                self.files[self.handles[args["handle"]][0]] += data
                peer.reply(request, {"count": len(data), "eof": False})
            elif name == "guest-file-close":
                self.closed.append(args["handle"])
                peer.reply(request)
            else:
                peer.error(request, f"The command {name} has not been found", "CommandNotFound")


def test_write_file_in_chunks(serve):
    agent = FileAgent()
    data = bytes(range(256)) * 40  # 10240 bytes
    with Client(serve(agent)) as client:
        assert client.write_file("/f", data, chunk_size=4096) == len(data)
        assert client.write_file("/g", io.BytesIO(data), chunk_size=3000) == len(data)
    assert agent.files == {"/f": data, "/g": data}
    assert agent.writes == [4096, 4096, 2048, 3000, 3000, 3000, 1240]
    assert agent.closed == [1000, 1001]


def test_write_file_finishes_short_writes(serve):
    agent = FileAgent(short_writes=True)
    with Client(serve(agent)) as client:
        assert client.write_file("/f", b"abcdefgh", chunk_size=8) == 8
    assert agent.files["/f"] == b"abcdefgh"
    assert agent.writes == [4, 2, 1, 1]


def test_read_file_streams_and_closes(serve):
    content = b"0123456789" * 1000
    agent = FileAgent({"/f": content, "/empty": b""})
    with Client(serve(agent)) as client:
        assert client.read_file("/f", chunk_size=3000) == content
        sink = io.BytesIO()
        assert client.read_file("/f", sink, chunk_size=4096) == len(content)
        assert sink.getvalue() == content
        assert client.read_file("/empty") == b""
        chunks = client.iter_file("/f", chunk_size=100)
        assert next(chunks) == content[:100]
        chunks.close()  # stopping early still closes the guest handle
        with pytest.raises(AgentError, match="No such file"):
            client.read_file("/missing")
    assert agent.closed == [1000, 1001, 1002, 1003]


def test_exec_polls_until_exited(serve, monkeypatch):
    polls = []
    delays = []
    real_sleep = time.sleep

    def recorded_sleep(seconds):
        if threading.current_thread() is threading.main_thread():
            delays.append(seconds)  # the client's waits between polls
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", recorded_sleep)

    def script(peer: Peer):
        peer.sync()
        request = peer.request()
        assert request["arguments"] == {
            "path": "/bin/prog", "arg": ["-x"], "env": ["A=1", "PATH=/bin"],
            "input-data": base64.b64encode(b"in").decode(), "capture-output": True}
        peer.reply(request, {"pid": 77})
        while True:
            request = peer.request()
            assert request == {"execute": "guest-exec-status", "arguments": {"pid": 77},
                               "id": request["id"]}
            polls.append(time.monotonic())
            if len(polls) < 4:
                peer.reply(request, {"exited": False})
            else:
                peer.reply(request, {"exited": True, "exitcode": 3,
                                     "out-data": base64.b64encode(b"out").decode(),
                                     "err-data": base64.b64encode(b"err").decode(),
                                     "err-truncated": True})
                return

    with Client(serve(script)) as client:
        result = client.exec("/bin/prog", ["-x"], env={"A": "1", "PATH": "/bin"},
                             input_data=b"in")
    assert (result.pid, result.exitcode, result.signal) == (77, 3, None)
    assert (result.stdout, result.stderr) == (b"out", b"err")
    assert (result.out_truncated, result.err_truncated) == (False, True)
    # The waits between polls grow (wall-clock gaps would be at the mercy
    # of the scheduler on a loaded machine).
    assert len(delays) == 3 and delays == sorted(delays) and delays[0] < delays[-1], delays


def test_exec_wait_timeout(serve):
    def script(peer: Peer):
        peer.sync()
        peer.reply(peer.request(), {"pid": 5})
        while True:
            request = peer.request()
            if request is None:
                return
            peer.reply(request, {"exited": False})

    with Client(serve(script)) as client:
        with pytest.raises(ReplyTimeout, match="still running"):
            client.exec("/bin/sleep", ["100"], capture=False, timeout=0.1)


# -- qga-client's command line ---------------------------------------------------------------


@pytest.mark.parametrize("operands, expected", [
    (["guest-ping"], ("guest-ping", None)),
    (["guest-sync", '{"id": 3}'], ("guest-sync", {"id": 3})),
    (['{"execute": "guest-sync", "arguments": {"id": 3}}'], ("guest-sync", {"id": 3})),
    ([' {"execute": "guest-info"}'], ("guest-info", None)),
])
def test_cli_call_operands(operands, expected):
    assert cli.parse_call(*(operands + [None])[:2]) == expected


@pytest.mark.parametrize("operands", [
    ["{bad"], ['{"arguments": {}}'], ['{"execute": "x", "id": 1}'], ["guest-sync", "[1]"],
    ['{"execute": "x"}', "{}"], ["guest-sync", "not json"],
])
def test_cli_call_usage_errors(operands, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["-s", "/nonexistent.sock", "call", *operands])
    assert info.value.code == 2
    assert "qga-client: error:" in capsys.readouterr().err


def test_cli_needs_a_socket(monkeypatch, capsys):
    monkeypatch.delenv("QGA_SOCKET", raising=False)
    with pytest.raises(SystemExit) as info:
        cli.main(["ping"])
    assert info.value.code == 2
    assert "QGA_SOCKET" in capsys.readouterr().err


def test_cli_reports_agent_errors_with_class_and_desc(serve, capsys):
    def script(peer: Peer):
        peer.sync()
        peer.error(peer.request(), "The command nope has not been found", "CommandNotFound")

    path = serve(script)
    assert cli.main(["-s", path, "call", "nope"]) == 1
    assert capsys.readouterr().err == (
        "qga-client: nope: CommandNotFound: The command nope has not been found\n")


def test_cli_unreachable_agent(tmp_path, capsys):
    assert cli.main(["-s", str(tmp_path / "none.sock"), "ping"]) == 1
    assert "cannot connect" in capsys.readouterr().err
