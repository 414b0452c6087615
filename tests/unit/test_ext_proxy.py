"""The proxy's socket for real: peer checks, hello, frames, calls, events, violations."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time

import pytest

from qga.errors import CommandError, ExtensionRunError, ParameterError
from qga.ext import proxy as proxy_module
from qga.ext import wire
from qga.ext.events import EventQueue
from qga.ext.manifest import parse_manifest, encode_manifest
from qga.ext.proxy import LineSplitter, Proxy
from qga.loop import Loop
from tests.support.ext_bundles import manifest_value

COMMANDS = {
    "greet": {"request": {"type": "object", "properties": {"who": {"type": "string"}},
                          "additionalProperties": False},
              "reply": {"type": "string"}, "timeout": 0.3},
}
EVENTS = {"greeted": {"type": "object", "required": ["who"]}}


def manifest():
    value = manifest_value({"hello.py": b"x"}, capabilities=["events"], commands=COMMANDS,
                           events=EVENTS)
    return parse_manifest(encode_manifest(value))


class Rig:
    def __init__(self, directory, owner=True):
        self.loop = Loop()
        self.path = str(directory / "hello.sock")
        self.ready = []
        self.violations = []
        self.events = EventQueue(self.loop)
        self.owner = owner
        self.proxy = Proxy("hello", self.loop, manifest(), self.path,
                           lambda pid, uid: self.owner and pid == os.getpid(),
                           lambda: self.ready.append(True), self.violations.append,
                           self.events)
        self.proxy.listen(None, None)
        self.clients = []

    def connect(self, role="control"):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(2)
        sock.connect(self.path)
        if role is not None:
            sock.sendall(wire.hello(role))
        self.clients.append(sock)
        self.spin()
        return sock

    def spin(self, rounds=10):
        for _ in range(rounds):
            self.loop.run_once(0.01)

    def until(self, predicate, timeout=3.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            self.loop.run_once(0.01)
        return predicate()

    def close(self):
        for sock in self.clients:
            sock.close()
        self.proxy.close()
        self.loop.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def send(sock, *frames):
    sock.sendall(b"".join(wire.encode(frame) for frame in frames))


def receive(sock):
    data = b""
    while not data.endswith(b"\n"):
        data += sock.recv(65536)
    return [json.loads(line) for line in data.splitlines()]


def closed(sock):
    """Whether the proxy closed it (whatever it sent before)."""
    sock.settimeout(2)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return False
    return True


def test_the_socket_is_private(rig):
    assert stat.S_IMODE(os.stat(rig.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(rig.path).st_mode)


def test_ready_and_a_call_answered(rig):
    control = rig.connect()
    send(control, {"type": "ready"})
    assert rig.until(lambda: rig.ready)
    deferred = rig.proxy.call("greet", {"who": "host"}, None)
    rig.spin()
    (request,) = receive(control)
    assert request == {"type": "request", "id": request["id"], "command": "greet",
                       "arguments": {"who": "host"}}
    send(control, {"type": "reply", "id": request["id"], "return": "hello host"})
    assert rig.until(lambda: deferred.done)
    assert deferred.value == "hello host" and deferred.error is None


def test_replies_are_checked_and_errors_passed_on(rig):
    control = rig.connect()
    bad = rig.proxy.call("greet", {}, None)
    failing = rig.proxy.call("greet", {}, None)
    rig.spin()
    first, second = receive(control)
    send(control, {"type": "reply", "id": first["id"], "return": 42},
         {"type": "reply", "id": second["id"], "error": {"desc": "no one to greet"}})
    assert rig.until(lambda: bad.done and failing.done)
    assert "a reply its manifest does not allow: at the top level: 42 is not of type" \
        in bad.error.desc
    assert failing.error.desc == "no one to greet"


def test_a_call_times_out_and_a_late_reply_is_ignored(rig):
    control = rig.connect()
    started = time.monotonic()
    deferred = rig.proxy.call("greet", {}, None)  # the manifest's timeout: 0.3 s
    assert rig.until(lambda: deferred.done)
    assert 0.25 < time.monotonic() - started < 2
    assert deferred.error.desc == "extension hello did not answer 'greet' within 0.3 s"
    (request,) = receive(control)
    send(control, {"type": "reply", "id": request["id"], "return": "late"})
    rig.spin()
    assert rig.violations == [] and rig.proxy.connected
    short = rig.proxy.call("greet", {}, 0.05)
    assert rig.until(lambda: short.done) and "within 0.05 s" in short.error.desc


def test_requests_are_checked_before_they_go(rig):
    rig.connect()
    with pytest.raises(ParameterError, match="arguments of hello greet: at the top level"):
        rig.proxy.call("greet", {"who": 1, "extra": True}, None)
    with pytest.raises(ParameterError, match="has no command 'shout'"):
        rig.proxy.call("shout", {}, None)


def test_calls_without_a_connection_or_after_it_closed(rig):
    with pytest.raises(ExtensionRunError, match="not connected"):
        rig.proxy.call("greet", {}, None)
    control = rig.connect()
    deferred = rig.proxy.call("greet", {}, None)
    rig.spin()
    control.close()
    assert rig.until(lambda: deferred.done)
    assert deferred.error.desc == "extension hello closed its connection"
    assert not rig.proxy.connected


def test_events_are_checked_and_queued(rig):
    control = rig.connect()
    send(control, {"type": "event", "name": "greeted", "data": {"who": "a"}},
         {"type": "event", "name": "greeted", "data": {"nobody": 1}},
         {"type": "event", "name": "undeclared", "data": {}},
         {"type": "event", "name": "greeted", "data": [1]})
    assert rig.until(lambda: rig.proxy.rejected == 3)
    events = rig.events.read()["events"]
    assert [(e["name"], e["data"]) for e in events] == [("greeted", {"who": "a"})]


@pytest.mark.parametrize("payload, reason", [
    (b"x" * (wire.MAX_FRAME + 10), "a frame longer than"),
    (b"{not json\n", "frame is not JSON"),
    (b"[1, 2]\n", "frame is not a JSON object"),
], ids=["oversized", "not-json", "not-an-object"])
def test_protocol_violations_close_the_connection(rig, payload, reason):
    control = rig.connect()
    deferred = rig.proxy.call("greet", {}, None)
    control.setblocking(False)
    view = memoryview(payload)
    while view and not rig.violations:  # the loop must run to read what we send
        try:
            view = view[control.send(view):]
        except BlockingIOError:
            pass
        except OSError:
            break
        rig.spin(1)
    assert rig.until(lambda: rig.violations)
    assert reason in rig.violations[0]
    assert deferred.done and "closed its connection" in deferred.error.desc
    assert closed(control)


def test_a_stranger_is_refused_before_it_says_anything(tmp_path, caplog):
    rig = Rig(tmp_path, owner=False)
    try:
        caplog.set_level(logging.WARNING)
        stranger = rig.connect()
        assert closed(stranger)
        assert "refused a connection from pid" in caplog.text
        assert not rig.proxy.connected
    finally:
        rig.close()


def test_one_control_connection_and_no_channel_in_envelope_mode(rig):
    first = rig.connect()
    second = rig.connect()
    assert closed(second)
    channel = rig.connect("channel")
    assert closed(channel)
    bogus = rig.connect(None)
    bogus.sendall(b'{"hello": "control", "version": 2}\n')
    rig.spin()
    assert closed(bogus)
    send(first, {"type": "ready"})
    assert rig.until(lambda: rig.ready)


def test_a_silent_connection_is_dropped(rig, monkeypatch):
    monkeypatch.setattr(proxy_module, "HELLO_TIMEOUT", 0.1)
    silent = rig.connect(None)
    rig.until(lambda: False, timeout=0.3)
    assert closed(silent)
    assert rig.proxy._greeting == {}


def test_logs_and_primitives(rig, caplog):
    caplog.set_level(logging.DEBUG, logger="qga.ext.proxy")
    control = rig.connect()
    send(control, {"type": "log", "level": "warning", "message": "disk almost full"},
         {"type": "primitive", "id": 7, "name": "root-socket", "arguments": {}},
         {"type": "something-new"})
    rig.spin()
    assert "extension hello: disk almost full" in caplog.text
    assert "unknown type 'something-new'" in caplog.text
    (reply,) = receive(control)
    assert reply["type"] == "primitive-reply" and reply["id"] == 7 and "error" in reply


def test_primitives_are_performed_and_their_errors_passed_on(rig):
    asked = []

    def primitive(name, arguments):
        asked.append((name, arguments))
        if name == "drop-caches":
            return {}
        if name == "boom":
            raise KeyError("bug")
        raise CommandError(f"primitive '{name}' needs the 'power' capability")

    rig.proxy.primitive = primitive
    control = rig.connect()
    send(control, {"type": "primitive", "id": 1, "name": "drop-caches", "arguments": {}},
         {"type": "primitive", "id": 2, "name": "shutdown"},
         {"type": "primitive", "id": 3, "name": "boom", "arguments": {}})
    replies = []
    while len(replies) < 3:
        rig.spin()
        replies += receive(control)
    assert replies[0] == {"type": "primitive-reply", "id": 1, "return": {}}
    assert replies[1] == {"type": "primitive-reply", "id": 2, "error": {
        "desc": "primitive 'shutdown' needs the 'power' capability"}}
    assert replies[2]["error"]["desc"] == "internal error in primitive boom: KeyError"
    assert asked[1] == ("shutdown", None) and rig.proxy.connected


def test_line_splitter_caps_lines():
    splitter = LineSplitter(8)
    assert list(splitter.feed(b"abc\nde")) == [b"abc"]
    assert list(splitter.feed(b"f\n")) == [b"def"]
    with pytest.raises(wire.FrameError):
        list(splitter.feed(b"0123456789"))
    with pytest.raises(wire.FrameError):
        list(LineSplitter(4).feed(b"12345\n"))
