"""The extension SDK against a stand-in core on a real Unix socket, in-process."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import threading
import time

import pytest

from qga.ext import sdk, wire


class Peer:
    """One accepted connection, read line by line without blocking the test."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lines = []
        self._splitter = sdk.LineSplitter(wire.MAX_FRAME)

    def poll(self, timeout: float = 0.0) -> None:
        while select.select([self.sock], [], [], timeout)[0]:
            data = self.sock.recv(65536)
            if not data:
                return
            self.lines += self._splitter.feed(data)
            timeout = 0.0

    def readline(self, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.lines and time.monotonic() < deadline:
            self.poll(0.05)
        return self.lines.pop(0)


class Core:
    """The core's end of the extension socket: accepts connections, reads their hello."""

    def __init__(self, path: str):
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.server.settimeout(5)
        self.connections = []

    def accept(self):
        sock, _ = self.server.accept()
        sock.settimeout(5)
        peer = Peer(sock)
        hello = json.loads(peer.readline())
        self.connections.append(sock)
        return sock, peer, hello

    def close(self):
        for sock in self.connections:
            sock.close()
        self.server.close()


@pytest.fixture
def core(tmp_path):
    core = Core(str(tmp_path / "ext.sock"))
    yield core
    core.close()


@pytest.fixture
def extension(tmp_path, core):
    settings = tmp_path / "settings.json"
    settings.write_text('{"rate": 5, "names": ["a"]}')
    environ = {wire.ENV_NAME: "demo", wire.ENV_SOCKET: core.path,
               wire.ENV_DIR: str(tmp_path / "bundle"), wire.ENV_STATE: str(tmp_path / "state"),
               wire.ENV_RUNTIME: str(tmp_path / "run"), wire.ENV_SETTINGS: str(settings)}
    extension = sdk.Extension(environ)
    yield extension
    extension.loop.close()


def connected(core, extension):
    """Connect the extension's control connection; the core's side of it."""
    accepted = {}
    thread = threading.Thread(target=lambda: accepted.update(zip(("sock", "reader", "hello"),
                                                                  core.accept())))
    thread.start()
    extension.connect()
    thread.join(5)
    return accepted["sock"], accepted["reader"], accepted["hello"]


def frames_until(extension, peer, count, timeout=5.0):
    """Run the extension's loop until the core has read ``count`` frames."""
    deadline = time.monotonic() + timeout
    while len(peer.lines) < count and time.monotonic() < deadline:
        extension.loop.run_once(0.01)
        peer.poll(0.01)
    got, peer.lines[:count] = [wire.decode(line) for line in peer.lines[:count]], []
    return got


def test_wire_constants_are_the_cores():
    assert (sdk.WIRE_VERSION, sdk.MAX_FRAME) == (wire.VERSION, wire.MAX_FRAME)
    assert [sdk.ENV_NAME, sdk.ENV_SOCKET, sdk.ENV_DIR, sdk.ENV_STATE, sdk.ENV_SETTINGS,
            sdk.ENV_RUNTIME] == [wire.ENV_NAME, wire.ENV_SOCKET, wire.ENV_DIR, wire.ENV_STATE,
                                 wire.ENV_SETTINGS, wire.ENV_RUNTIME]
    assert (sdk.ROLE_CONTROL, sdk.ROLE_CHANNEL, sdk.LOG_LEVELS) == (
        wire.ROLE_CONTROL, wire.ROLE_CHANNEL, wire.LOG_LEVELS)
    frame = {"type": "event", "name": "x", "data": {"text": "caf\u00e9\n"}}
    assert sdk.encode_frame(frame) == wire.encode(frame)
    with pytest.raises(sdk.SdkError):
        sdk.encode_frame({"type": "log", "message": "x" * sdk.MAX_FRAME})


def test_the_sdk_imports_nothing_of_qga():
    source = open(sdk.__file__, encoding="utf-8").read()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports and not [line for line in imports
                            if "qga" in line and "__future__" not in line]


def test_line_splitter_drops_long_lines_and_recovers():
    splitter = sdk.LineSplitter(8)
    assert splitter.feed(b"ab\ncd") == [b"ab"]
    assert splitter.feed(b"e\n1234567\n") == [b"cde", b"1234567"]   # 7 + newline = 8: kept
    assert splitter.feed(b"12345678\nok\n") == [b"ok"]              # 9 with newline: dropped
    assert splitter.dropped == 1
    assert splitter.feed(b"x" * 5) == [] and splitter.feed(b"y" * 5) == []
    assert splitter.pending == 0 and splitter.dropped == 2          # given up before its end
    assert splitter.feed(b"zz\nnext\n") == [b"next"]


def test_hello_ready_settings_and_directories(core, extension, tmp_path):
    sock, reader, hello = connected(core, extension)
    assert hello == {"hello": "control", "version": 1}
    extension.ready()
    assert frames_until(extension, reader, 1) == [{"type": "ready"}]
    assert extension.settings == {"rate": 5, "names": ["a"]}
    assert (extension.name, extension.state_dir) == ("demo", str(tmp_path / "state"))


def test_requests_are_served_by_decorated_handlers(core, extension):
    @extension.command("add")
    def add(arguments):
        return arguments["a"] + arguments["b"]

    @extension.command("refuse")
    def refuse(arguments):
        raise sdk.CommandFailed("no, thanks")

    @extension.command("crash")
    def crash(arguments):
        return 1 // 0

    answers = []

    @extension.command("later", deferred=True)
    def later(arguments, responder):
        answers.append(responder)

    sock, reader, _ = connected(core, extension)
    for number, (command, arguments) in enumerate([("add", {"a": 2, "b": 3}), ("refuse", {}),
                                                   ("crash", {}), ("missing", {}),
                                                   ("later", {})]):
        sock.sendall(wire.encode({"type": "request", "id": number, "command": command,
                                  "arguments": arguments}))
    frames = frames_until(extension, reader, 5)
    assert frames[0] == {"type": "reply", "id": 0, "return": 5}
    assert frames[1] == {"type": "reply", "id": 1, "error": {"desc": "no, thanks"}}
    assert frames[2]["type"] == "log" and "ZeroDivisionError" in frames[2]["message"]
    assert frames[3]["id"] == 2 and "ZeroDivisionError" in frames[3]["error"]["desc"]
    assert frames[4] == {"type": "reply", "id": 3,
                         "error": {"desc": "the extension has no command 'missing'"}}
    answers[0].reply({"done": True})
    with pytest.raises(sdk.SdkError):
        answers[0].fail("twice")
    assert frames_until(extension, reader, 1) == [{"type": "reply", "id": 4,
                                                   "return": {"done": True}}]


def test_events_logs_and_the_logging_handler(core, extension):
    sock, reader, _ = connected(core, extension)
    assert extension.emit("greeted", {"who": "you"})
    extension.log("warning", "careful")
    with pytest.raises(ValueError):
        extension.log("loud", "x")
    logger = logging.getLogger("test-ext-sdk")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(extension.logging_handler())
    logger.error("broken %d", 7)
    logger.debug("detail")
    assert frames_until(extension, reader, 4) == [
        {"type": "event", "name": "greeted", "data": {"who": "you"}},
        {"type": "log", "level": "warning", "message": "careful"},
        {"type": "log", "level": "error", "message": "broken 7"},
        {"type": "log", "level": "debug", "message": "detail"}]


def test_primitives_and_host_frames(core, extension):
    results, hosts = [], []
    extension.on_host(hosts.append)
    sock, reader, _ = connected(core, extension)
    first = extension.primitive("lock-sessions", {}, lambda *result: results.append(result))
    second = extension.primitive("shutdown", {"mode": "reboot"},
                                 lambda *result: results.append(result))
    frames = frames_until(extension, reader, 2)
    assert frames == [{"type": "primitive", "id": first, "name": "lock-sessions",
                       "arguments": {}},
                      {"type": "primitive", "id": second, "name": "shutdown",
                       "arguments": {"mode": "reboot"}}]
    sock.sendall(wire.encode({"type": "primitive-reply", "id": second,
                              "error": {"desc": "not allowed"}})
                 + wire.encode({"type": "primitive-reply", "id": first, "return": {}})
                 + wire.encode({"type": "host", "connected": True})
                 + b"not json\n")
    assert extension.loop.run_until(lambda: len(results) == 2 and hosts, 5)
    assert results == [(None, "not allowed"), ({}, None)]
    assert hosts == [True] and extension.host_connected is True


def test_losing_the_core_fails_pending_primitives_and_stops(core, extension):
    results, stopped = [], []
    extension.on_stop(lambda: stopped.append(True))
    sock, reader, _ = connected(core, extension)
    extension.primitive("suspend", {"state": "disk"}, lambda *result: results.append(result))
    frames_until(extension, reader, 1)
    sock.close()
    assert extension.loop.run_until(lambda: results, 5)
    assert results == [(None, "the core connection was lost")]
    assert stopped == [True] and extension.exit_status == 1
    assert not extension.emit("late", {})


def test_channel_connection_is_a_plain_socket(core, extension):
    accepted = {}
    thread = threading.Thread(target=lambda: accepted.update(zip(("sock", "reader", "hello"),
                                                                  core.accept())))
    thread.start()
    channel = extension.open_channel()
    thread.join(5)
    assert accepted["hello"] == {"hello": "channel", "version": 1}
    channel.sendall(b'{"__name__": "heartbeat"}\n')
    assert accepted["reader"].readline() == b'{"__name__": "heartbeat"}'
    channel.close()


def test_not_started_by_the_core():
    extension = sdk.Extension({})
    with pytest.raises(sdk.SdkError, match="QGA_EXT_SOCKET"):
        extension.connect()
    assert extension.settings == {}
    extension.loop.close()


def test_refused_socket(tmp_path):
    extension = sdk.Extension({sdk.ENV_SOCKET: str(tmp_path / "absent.sock")})
    with pytest.raises(sdk.SdkError, match="cannot connect"):
        extension.connect()
    extension.loop.close()


def test_loop_timers_readers_and_signals():
    loop = sdk.Loop()
    calls = []
    try:
        loop.call_later(0.02, lambda: calls.append("late"))
        cancelled = loop.call_later(0.01, lambda: calls.append("cancelled"))
        loop.call_soon(lambda: calls.append("soon"))
        loop.call_soon(lambda: 1 // 0)               # logged, the loop goes on
        cancelled.cancel()
        assert loop.run_until(lambda: "late" in calls, 2)
        assert calls == ["soon", "late"]
        read_end, write_end = socket.socketpair()
        loop.add_reader(read_end, lambda: calls.append(read_end.recv(10)))
        write_end.send(b"ping")
        assert loop.run_until(lambda: b"ping" in calls, 2)
        loop.remove_reader(read_end)
        previous = signal.getsignal(signal.SIGUSR1)
        loop.add_signal_handler(signal.SIGUSR1, lambda: calls.append("signal"))
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert loop.run_until(lambda: "signal" in calls, 2)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert not loop.run_until(lambda: False, 0.05)
        read_end.close()
        write_end.close()
    finally:
        loop.close()


def test_run_stops_on_sigterm_with_the_stop_callbacks(core, extension):
    stopped = []
    extension.on_stop(lambda: extension.emit("bye", {}))
    extension.on_stop(lambda: stopped.append(True))
    accepted = {}
    thread = threading.Thread(target=lambda: accepted.update(zip(("sock", "reader", "hello"),
                                                                  core.accept())))
    thread.start()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    extension.loop.call_later(0.05, lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        assert extension.run() == 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    thread.join(5)
    reader = accepted["reader"]
    assert [json.loads(reader.readline()) for _ in range(2)] == [
        {"type": "ready"}, {"type": "event", "name": "bye", "data": {}}]
    assert stopped == [True]
