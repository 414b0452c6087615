"""The core's side of :mod:`qga.ext.wire`: one Unix socket per extension.

The socket is ``<runtime-dir>/ext/<name>.sock``, owned by the extension's
user with mode 0600, in a directory of mode 0750 whose group is ``qga-ext``
(the only group extension users have), so no one else can even reach it.
Each connection is checked before it may say anything: its peer credentials
(``SO_PEERCRED``) must be the extension's user and a process the extension
started (:meth:`qga.ext.launch.Launched.owns`).  Then the first line must be
a *hello* within :data:`HELLO_TIMEOUT` seconds:

* ``control``: exactly one at a time; its frames are JSON objects, one per
  line, at most :data:`qga.ext.wire.MAX_FRAME` bytes.  A line that is longer,
  not JSON or not an object is a protocol violation: the connection is
  closed and the extension restarted (its supervisor counts a failure).
* ``channel``: channel-mode extensions only, one at a time; raw bytes handed
  to the port relay (:mod:`qga.ext.relay`).

What the control connection carries (see :mod:`qga.ext.wire`):

* ``ready`` goes to the supervisor;
* ``event`` is checked against the manifest (a declared name, an object
  that follows the event's schema) and queued (:mod:`qga.ext.events`);
  anything else is refused and counted in ``rejected``;
* ``reply`` answers a pending ``guest-extension-call`` (:meth:`Proxy.call`):
  its ``return`` must follow the command's ``reply`` schema; an ``error``
  becomes the host's error text;
* ``log`` goes to the agent's log, tagged and rate limited;
* ``primitive`` is performed by ``primitive(name, arguments)`` (the core's
  :mod:`qga.ext.primitives`, which checks the manifest's capabilities) and
  answered with a ``primitive-reply`` of its value or its error text.

Writes towards the extension are buffered without blocking, up to
:data:`MAX_OUTPUT` bytes; an extension that stops reading its requests gets
no more.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import time
from typing import Any, Callable, Dict, Optional, Tuple

from qga.errors import CommandError, ExtensionError, ExtensionRunError, ParameterError
from qga.ext import wire
from qga.loop import READ, WRITE

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 5.0
DEFAULT_CALL_TIMEOUT = 10.0  # seconds, when neither the host nor the manifest says
MAX_GREETING = 4            # connections that have not said hello yet
MAX_OUTPUT = 8 * wire.MAX_FRAME
READ_BUDGET = 256 * 1024    # per wake-up, so one extension cannot starve the loop
CONTROL_READ_BUDGET = 64 * 1024  # frames cost more than bytes: less per wake-up
LOG_LINES_PER_SECOND = 50
MAX_ERROR_TEXT = 4096
_UCRED = struct.Struct("3i")


# -- a non-blocking stream ---------------------------------------------------------------------


class Stream:
    """A connected non-blocking socket on the loop, with a bounded output buffer.

    ``on_data(bytes)`` gets what arrives, ``on_close()`` is called once when the
    peer leaves or :meth:`close` is called, ``on_drain()`` (if set) when the
    output buffer emptied after the socket had been full.
    """

    def __init__(self, loop, sock: socket.socket, on_data: Callable[[bytes], None],
                 on_close: Callable[[], None], max_output: int = MAX_OUTPUT):
        self.read_budget = READ_BUDGET
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.on_data = on_data
        self.on_close = on_close
        self.on_drain: Optional[Callable[[], None]] = None
        self.max_output = max_output
        self.closed = False
        self._out = bytearray()
        self._reading = True
        sock.setblocking(False)
        self._update()

    @property
    def pending_output(self) -> int:
        return len(self._out)

    def write(self, data: bytes) -> bool:
        """Queue ``data``; False (nothing queued) when the buffer is full or the stream closed."""
        if self.closed or len(self._out) + len(data) > self.max_output:
            return False
        self._out += data
        self._flush()
        return True

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._update()

    def resume_reading(self) -> None:
        if not self._reading and not self.closed:
            self._reading = True
            self._update()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove(self.fd)
        self.sock.close()
        self._out.clear()
        self.on_close()

    def _update(self) -> None:
        if self.closed:
            return
        events = (READ if self._reading else 0) | (WRITE if self._out else 0)
        if events:
            self.loop.add(self.fd, events, self._on_events)
        else:
            self.loop.remove(self.fd)

    def _on_events(self, events: int) -> None:
        if events & WRITE:
            self._flush()
            if not self._out and self.on_drain is not None and not self.closed:
                self.on_drain()
        if self._reading and not self.closed and events & ~WRITE:
            self._read()

    def _read(self) -> None:
        budget = self.read_budget
        while budget > 0 and self._reading and not self.closed:
            try:
                data = self.sock.recv(min(65536, budget))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            budget -= len(data)
            self.on_data(data)

    def _flush(self) -> None:
        while self._out and not self.closed:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            del self._out[:sent]
        self._update()


class LineSplitter:
    """Lines out of a byte stream, none longer than ``cap`` bytes (newline included)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.buffer = bytearray()

    def feed(self, data: bytes):
        """Yield complete lines (without the newline); FrameError past the cap."""
        self.buffer += data
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end < 0:
                break
            if end + 1 - start > self.cap:
                raise wire.FrameError(f"a frame longer than {self.cap} bytes")
            yield bytes(self.buffer[start:end])
            start = end + 1
        del self.buffer[:start]
        if len(self.buffer) >= self.cap:
            raise wire.FrameError(f"a frame longer than {self.cap} bytes")


# -- the proxy ------------------------------------------------------------------------------------


class Proxy:
    """One extension's socket, its control connection, its calls and its events.

    ``owns(pid, uid)`` says whether a peer is the extension, ``on_ready()``
    and ``on_violation(reason)`` report to the supervisor, ``events`` is its
    :class:`~qga.ext.events.EventQueue`, ``relay`` its port relay (channel
    mode) or None, ``primitive(name, arguments)`` performs a primitive (or
    raises; None: every primitive is refused).
    """

    def __init__(self, name: str, loop, manifest, socket_path: str,
                 owns: Callable[[int, int], bool], on_ready: Callable[[], None],
                 on_violation: Callable[[str], None], events, relay=None,
                 primitive: Optional[Callable[[Any, Any], Any]] = None):
        self.name = name
        self.loop = loop
        self.manifest = manifest
        self.socket_path = socket_path
        self.owns = owns
        self.on_ready = on_ready
        self.on_violation = on_violation
        self.events = events
        self.relay = relay
        self.primitive = primitive
        self.rejected = 0
        self._listener: Optional[socket.socket] = None
        self._greeting: Dict[int, Tuple[Stream, bytearray, Any]] = {}
        self._control: Optional[Stream] = None
        self._lines: Optional[LineSplitter] = None
        self._calls: Dict[int, Tuple[Any, Any, str]] = {}
        self._ids = itertools.count(1)
        self._validators: Dict[Tuple[str, str], Any] = {}
        self._log_budget = (0, 0)

    # -- the socket ------------------------------------------------------------------------

    def listen(self, uid: Optional[int], gid: Optional[int]) -> None:
        """Bind the socket (replacing a stale one), for ``uid`` alone when given."""
        if self._listener is not None:
            return
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise ExtensionRunError(f"cannot replace {self.socket_path}: {error.strerror}"
                                    ) from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.socket_path)
            os.chmod(self.socket_path, 0o600)
            if uid is not None:
                os.chown(self.socket_path, uid, gid if gid is not None else -1)
            listener.listen(MAX_GREETING)
        except OSError as error:
            listener.close()
            raise ExtensionRunError(f"cannot listen on {self.socket_path}:"
                                    f" {error.strerror or error}") from None
        listener.setblocking(False)
        self._listener = listener
        self.loop.add_reader(listener.fileno(), self._accept)

    def close(self, reason: str = "stopped") -> None:
        """Close every connection and the socket; pending calls fail with ``reason``."""
        self.drop_connections(reason)
        if self._listener is not None:
            self.loop.remove(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass

    def drop_connections(self, reason: str) -> None:
        """The process is gone: its connections go, and the calls waiting on it fail."""
        for stream, _buffer, timer in list(self._greeting.values()):
            timer.cancel()
            stream.close()
        self._greeting.clear()
        if self._control is not None:
            self._control.close()
        self._fail_calls(reason)

    @property
    def connected(self) -> bool:
        return self._control is not None

    def _accept(self, _events: int) -> None:
        for _ in range(8):
            try:
                sock, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("extension %s: accept failed: %s", self.name, error)
                return
            self._greet(sock)

    def _greet(self, sock: socket.socket) -> None:
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       _UCRED.size))
        if not self.owns(pid, uid):
            log.warning("extension %s: refused a connection from pid %d uid %d: not the"
                        " extension", self.name, pid, uid)
            sock.close()
            return
        if len(self._greeting) >= MAX_GREETING:
            log.warning("extension %s: too many connections without hello", self.name)
            sock.close()
            return
        buffer = bytearray()
        stream = Stream(self.loop, sock, lambda data: self._on_hello_data(stream, data),
                        lambda: self._greeting.pop(stream.fd, None))
        timer = self.loop.call_later(HELLO_TIMEOUT, stream.close)
        self._greeting[stream.fd] = (stream, buffer, timer)

    def _on_hello_data(self, stream: Stream, data: bytes) -> None:
        _stream, buffer, timer = self._greeting[stream.fd]
        buffer += data
        end = buffer.find(b"\n")
        if end < 0 and len(buffer) <= 4096:
            return
        timer.cancel()
        del self._greeting[stream.fd]
        if end < 0:
            self._refuse(stream, "a hello line over 4096 bytes")
            return
        rest = bytes(buffer[end + 1:])
        try:
            hello = wire.decode(bytes(buffer[:end]))
        except wire.FrameError as error:
            self._refuse(stream, f"a bad hello ({error})")
            return
        role = hello.get("hello")
        if hello.get("version") != wire.VERSION:
            self._refuse(stream, f"wire version {hello.get('version')!r}, not {wire.VERSION}")
        elif role == wire.ROLE_CONTROL:
            self._take_control(stream, rest)
        elif role == wire.ROLE_CHANNEL and self.relay is not None:
            if not self.relay.attach(stream, rest):
                self._refuse(stream, "a second channel connection")
        else:
            self._refuse(stream, f"a hello for role {role!r}")

    def _refuse(self, stream: Stream, why: str) -> None:
        log.warning("extension %s: connection refused: %s", self.name, why)
        stream.on_close = lambda: None
        stream.close()

    # -- the control connection -----------------------------------------------------------

    def _take_control(self, stream: Stream, rest: bytes) -> None:
        if self._control is not None:
            self._refuse(stream, "a second control connection")
            return
        self._control = stream
        stream.read_budget = CONTROL_READ_BUDGET
        self._lines = LineSplitter(wire.MAX_FRAME)
        stream.on_data = self._on_control_data
        stream.on_close = self._on_control_closed
        log.debug("extension %s: control connection", self.name)
        if self.relay is not None and self.relay.host_connected is not None:
            self.send_host(self.relay.host_connected)
        if rest:
            self._on_control_data(rest)

    def _on_control_closed(self) -> None:
        self._control = None
        self._lines = None
        self._fail_calls(f"extension {self.name} closed its connection")

    def _on_control_data(self, data: bytes) -> None:
        stream = self._control
        try:
            for line in self._lines.feed(data):
                self._on_frame(wire.decode(line), len(line))
                if self._control is not stream:
                    return  # closed by what the frame did
        except wire.FrameError as error:
            self._violation(str(error))

    def _violation(self, reason: str) -> None:
        log.warning("extension %s broke the protocol: %s; restarting it", self.name, reason)
        if self._control is not None:
            self._control.close()
        self.on_violation(f"broke the protocol: {reason}")

    def _on_frame(self, frame: Dict[str, Any], size: int) -> None:
        kind = frame.get("type")
        if kind == "event":
            self._on_event(frame, size)
        elif kind == "reply":
            self._on_reply(frame)
        elif kind == "ready":
            self.on_ready()
        elif kind == "log":
            self._on_log(frame)
        elif kind == "primitive":
            self._on_primitive(frame)
        else:
            self._throttled_log(logging.WARNING, f"a frame of unknown type {str(kind)[:64]!r}"
                                                 " ignored")

    def _on_primitive(self, frame: Dict[str, Any]) -> None:
        reply: Dict[str, Any] = {"type": "primitive-reply", "id": frame.get("id")}
        name = frame.get("name")
        try:
            if self.primitive is None:
                raise CommandError(f"the core offers no primitive {str(name)[:64]!r}")
            reply["return"] = self.primitive(name, frame.get("arguments"))
        except CommandError as error:
            reply["error"] = {"desc": error.desc[:MAX_ERROR_TEXT]}
        except ExtensionError as error:
            reply["error"] = {"desc": str(error)[:MAX_ERROR_TEXT]}
        except Exception as error:  # a bug in a primitive must not take the agent down
            log.exception("extension %s: primitive %s failed", self.name, str(name)[:64])
            reply["error"] = {"desc": f"internal error in primitive {str(name)[:64]}:"
                                      f" {type(error).__name__}"}
        try:
            self._send(reply)
        except wire.FrameError:
            self._send({"type": "primitive-reply", "id": frame.get("id"),
                        "error": {"desc": "the primitive's answer is over the frame limit"}})

    def send_host(self, connected: bool) -> None:
        """Channel mode: tell the extension the port's host came or went."""
        self._send({"type": "host", "connected": connected})

    def _send(self, frame: Dict[str, Any]) -> bool:
        if self._control is None:
            return False
        return self._control.write(wire.encode(frame))

    # -- events ---------------------------------------------------------------------------------

    def _on_event(self, frame: Dict[str, Any], size: int) -> None:
        if not self.events.admit():
            return  # over the rate limit: counted as dropped, not even checked
        name, data = frame.get("name"), frame.get("data")
        problem = None
        if not isinstance(name, str) or name not in self.manifest.events:
            problem = f"an event {str(name)[:64]!r} its manifest does not declare"
        elif not isinstance(data, dict):
            problem = f"event {name}: its data is not an object"
        else:
            problem = self._schema_problem("event", name, self.manifest.events[name], data)
        if problem is not None:
            self.rejected += 1
            self._throttled_log(logging.WARNING, f"refused {problem}")
            return
        self.events.append(name, data, size)

    # -- calls ------------------------------------------------------------------------------------

    def call(self, command: str, arguments: Dict[str, Any], timeout: Optional[float]):
        """Send a host request; a Deferred of its reply (CommandError on failure or timeout)."""
        from qga.commands import Deferred

        spec = self.manifest.commands.get(command)
        if spec is None:
            raise ParameterError(f"extension {self.name} has no command '{command}'")
        problem = self._schema_problem("request", command, spec["request"], arguments)
        if problem is not None:
            raise ParameterError(f"arguments of {self.name} {command}: {problem}")
        if self._control is None:
            raise ExtensionRunError(f"extension {self.name} is not connected")
        if timeout is None:
            timeout = spec.get("timeout", DEFAULT_CALL_TIMEOUT)
        request_id = next(self._ids)
        try:
            frame = wire.encode({"type": "request", "id": request_id, "command": command,
                                 "arguments": arguments})
        except wire.FrameError:
            raise ParameterError(f"arguments of {self.name} {command} are over the"
                                 f" {wire.MAX_FRAME}-byte frame limit") from None
        if not self._control.write(frame):
            raise ExtensionRunError(f"extension {self.name} is not reading its requests")
        deferred = Deferred()
        timer = self.loop.call_later(timeout, lambda: self._call_timed_out(request_id, timeout))
        self._calls[request_id] = (deferred, timer, command)
        return deferred

    def _call_timed_out(self, request_id: int, timeout: float) -> None:
        call = self._calls.pop(request_id, None)
        if call is not None:
            call[0].fail(CommandError(f"extension {self.name} did not answer '{call[2]}'"
                                      f" within {timeout:g} s"))

    def _on_reply(self, frame: Dict[str, Any]) -> None:
        request_id = frame.get("id")
        call = self._calls.pop(request_id, None) if type(request_id) is int else None
        if call is None:
            self._throttled_log(logging.DEBUG, f"a reply to no pending request"
                                               f" ({str(request_id)[:32]})")
            return
        deferred, timer, command = call
        timer.cancel()
        if "error" in frame:
            error = frame["error"]
            desc = error.get("desc") if isinstance(error, dict) else None
            deferred.fail(CommandError(str(desc or f"extension {self.name} failed")
                                       [:MAX_ERROR_TEXT]))
            return
        if "return" not in frame:
            deferred.fail(CommandError(f"extension {self.name} answered '{command}' with"
                                       " neither return nor error"))
            return
        value = frame["return"]
        problem = self._schema_problem("reply", command,
                                       self.manifest.commands[command]["reply"], value)
        if problem is not None:
            deferred.fail(CommandError(f"extension {self.name} answered '{command}' with a"
                                       f" reply its manifest does not allow: {problem}"))
            return
        deferred.resolve(value)

    def _fail_calls(self, reason: str) -> None:
        calls, self._calls = self._calls, {}
        for deferred, timer, _command in calls.values():
            timer.cancel()
            deferred.fail(CommandError(reason))

    # -- logs and schemas -------------------------------------------------------------------------

    def _on_log(self, frame: Dict[str, Any]) -> None:
        level = frame.get("level")
        message = frame.get("message")
        if level not in wire.LOG_LEVELS or not isinstance(message, str):
            self._throttled_log(logging.WARNING, "a malformed log frame ignored")
            return
        self._throttled_log(logging.getLevelName(level.upper()), message[:MAX_ERROR_TEXT])

    def _throttled_log(self, level: int, message: str) -> None:
        second = int(time.monotonic())
        current, count = self._log_budget
        count = count + 1 if current == second else 1
        self._log_budget = (second, count)
        if count <= LOG_LINES_PER_SECOND:
            log.log(level, "extension %s: %s", self.name, message)
        elif count == LOG_LINES_PER_SECOND + 1:
            log.warning("extension %s: more log lines this second are dropped", self.name)

    def _schema_problem(self, kind: str, name: str, schema: Any, value: Any) -> Optional[str]:
        validator = self._validators.get((kind, name))
        if validator is None:
            from qga.ext.manifest import strict_validator

            validator = self._validators[(kind, name)] = strict_validator(schema)
        error = next(iter(validator.iter_errors(value)), None)
        if error is None:
            return None
        from qga.ext.manifest import describe_error

        return describe_error(error)

