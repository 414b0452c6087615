"""A small SDK for writing qga extensions: the extension side of :mod:`qga.ext.wire`.

An extension is a process the core starts with a few environment variables
(see :mod:`qga.ext.wire`).  With this module it needs nothing else::

    from qga.ext import sdk          # or the copy shipped in the bundle

    extension = sdk.Extension()

    @extension.command("greet")
    def greet(arguments):
        extension.emit("greeted", {"who": arguments.get("who", "world")})
        return "hello " + arguments.get("who", "world")

    extension.loop.call_later(1.0, lambda: extension.log("info", "one second in"))
    extension.run()                  # connect, say ready, serve until SIGTERM

What it offers:

* :class:`Extension`: the control connection (hello, ``ready``, requests
  served by decorated handlers, ``event``, ``log``, ``primitive``), the
  extension's settings and directories, and :meth:`Extension.open_channel`,
  the raw channel connection of a channel-mode extension as a plain socket.
* :class:`Loop`: a selector loop with readers, writers, timers and signals,
  so an extension needs no framework of its own.
* :class:`Stream`: a non-blocking socket with a bounded write buffer, and
  :class:`LineSplitter`, sans-IO line framing with a hard line cap.

This module imports only the standard library and nothing from the rest of
qga, and runs on Python 3.9: a bundle may ship a copy of this file beside its
entry point, so the extension works whatever Python path the guest gives the
interpreter.  For the same reason its errors are its own (:class:`SdkError`,
:class:`CommandFailed`) rather than :mod:`qga.errors`, and the wire constants
are repeated here (a unit test keeps them equal to :mod:`qga.ext.wire`'s).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

# -- the wire contract (kept equal to qga.ext.wire by tests) -----------------------------

WIRE_VERSION = 1
MAX_FRAME = 1 << 20  # one frame, newline included

ENV_NAME = "QGA_EXT_NAME"
ENV_SOCKET = "QGA_EXT_SOCKET"
ENV_DIR = "QGA_EXT_DIR"
ENV_STATE = "QGA_EXT_STATE"
ENV_SETTINGS = "QGA_EXT_SETTINGS"
ENV_RUNTIME = "QGA_EXT_RUNTIME"

ROLE_CONTROL = "control"
ROLE_CHANNEL = "channel"

LOG_LEVELS = ("debug", "info", "warning", "error")

# Frames the control connection may buffer towards the core before new
# events are refused: the core reads promptly, so this only fills when the
# core is stuck, and then an extension must not grow without bound.
CONTROL_BUFFER = 8 * MAX_FRAME

_READ_SIZE = 65536


class SdkError(Exception):
    """The extension cannot talk to the core (missing environment, socket refused, lost)."""


class CommandFailed(Exception):
    """Raised by a command handler: the host gets an error reply with this text."""

    def __init__(self, desc: str):
        super().__init__(desc)
        self.desc = desc


def encode_frame(frame: Dict[str, Any]) -> bytes:
    """One frame as a line: compact ASCII JSON, so it never contains a newline."""
    line = json.dumps(frame, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"
    if len(line) > MAX_FRAME:
        raise SdkError(f"frame of {len(line)} bytes is over the {MAX_FRAME} byte cap")
    return line


# -- the loop ----------------------------------------------------------------------------


class Timer:
    """A scheduled call; ``cancel()`` drops it."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """One selector, timers on the monotonic clock, and signals delivered in the loop.

    Callbacks run one at a time in the thread that calls :meth:`run`; an
    exception in a callback is logged and the loop goes on (an extension
    that wants to die on errors calls :meth:`stop` itself).
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._handlers: Dict[int, List[Optional[Callable[[], None]]]] = {}
        self._timers: List[Tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self._signals: Dict[int, Callable[[], None]] = {}
        self._wakeup: Optional[Tuple[int, int]] = None
        self._running = False
        self.log = logging.getLogger("qga.ext.sdk")

    @staticmethod
    def time() -> float:
        """The loop's clock (monotonic seconds)."""
        return time.monotonic()

    # -- file descriptors --

    def add_reader(self, fd: Union[int, Any], callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` (an int or anything with fileno()) is readable."""
        self._set(_fd(fd), 0, callback)

    def add_writer(self, fd: Union[int, Any], callback: Callable[[], None]) -> None:
        self._set(_fd(fd), 1, callback)

    def remove_reader(self, fd: Union[int, Any]) -> None:
        self._set(_fd(fd), 0, None)

    def remove_writer(self, fd: Union[int, Any]) -> None:
        self._set(_fd(fd), 1, None)

    def _set(self, fd: int, slot: int, callback: Optional[Callable[[], None]]) -> None:
        handlers = self._handlers.get(fd, [None, None])
        handlers[slot] = callback
        events = ((selectors.EVENT_READ if handlers[0] else 0)
                  | (selectors.EVENT_WRITE if handlers[1] else 0))
        registered = fd in self._handlers
        if not events:
            self._handlers.pop(fd, None)
            if registered:
                try:
                    self._selector.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
            return
        self._handlers[fd] = handlers
        if registered:
            self._selector.modify(fd, events)
        else:
            self._selector.register(fd, events)

    # -- timers --

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._sequence), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.time() + max(0.0, delay), callback)

    def call_soon(self, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.time(), callback)

    # -- signals --

    def add_signal_handler(self, signum: int, callback: Callable[[], None]) -> None:
        """Run ``callback()`` in the loop when ``signum`` arrives (main thread only)."""
        if self._wakeup is None:
            read_end, write_end = os.pipe()
            for end in (read_end, write_end):
                os.set_blocking(end, False)
                os.set_inheritable(end, False)
            signal.set_wakeup_fd(write_end)
            self._wakeup = (read_end, write_end)
            self.add_reader(read_end, self._on_wakeup)
        self._signals[signum] = callback
        # A Python-level handler that does nothing: the wakeup pipe carries
        # the signal number into the loop, where the real callback runs.
        signal.signal(signum, lambda *_: None)

    def _on_wakeup(self) -> None:
        assert self._wakeup is not None
        try:
            data = os.read(self._wakeup[0], 512)
        except BlockingIOError:
            return
        for signum in data:
            callback = self._signals.get(signum)
            if callback is not None:
                self._guarded(callback)

    # -- running --

    def run(self) -> None:
        """Run until :meth:`stop`."""
        self._running = True
        while self._running:
            self.run_once()

    def run_until(self, condition: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        """Run until ``condition()`` is true (then True) or ``timeout`` passes (then False)."""
        deadline = None if timeout is None else self.time() + timeout
        self._running = True
        while self._running and not condition():
            if deadline is not None and self.time() >= deadline:
                return False
            wait = None if deadline is None else max(0.0, deadline - self.time())
            self.run_once(wait)
        return condition()

    def stop(self) -> None:
        self._running = False

    def run_once(self, max_wait: Optional[float] = None) -> None:
        """Wait for one round of events (at most ``max_wait`` s) and run what is due."""
        timeout = self._next_timeout(max_wait)
        if not self._handlers:
            # selectors cannot wait on nothing: sleep until the next timer.
            time.sleep(timeout if timeout is not None else 0.1)
            ready = []
        else:
            try:
                ready = self._selector.select(timeout)
            except InterruptedError:
                ready = []
        for key, events in ready:
            handlers = self._handlers.get(key.fd)
            if handlers is None:
                continue
            if events & selectors.EVENT_READ and handlers[0] is not None:
                self._guarded(handlers[0])
            handlers = self._handlers.get(key.fd)  # the reader may have removed it
            if handlers is not None and events & selectors.EVENT_WRITE and handlers[1]:
                self._guarded(handlers[1])
        now = self.time()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._guarded(timer.callback)

    def _next_timeout(self, max_wait: Optional[float]) -> Optional[float]:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        timeout = max_wait
        if self._timers:
            until_next = max(0.0, self._timers[0][0] - self.time())
            timeout = until_next if timeout is None else min(timeout, until_next)
        return timeout

    def _guarded(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # one failing callback must not end the extension
            self.log.exception("callback %r failed", callback)

    def close(self) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for end in self._wakeup:
                os.close(end)
            self._wakeup = None
        self._selector.close()


def _fd(source: Union[int, Any]) -> int:
    return source if isinstance(source, int) else source.fileno()


# -- streams and lines -------------------------------------------------------------------


class LineSplitter:
    """Sans-IO: bytes in, complete lines out; a line over ``max_line`` bytes is dropped.

    ``feed()`` returns the complete lines (without their newline).  When a
    line grows past ``max_line`` (newline included) before its end arrives,
    everything of it is discarded up to and including its newline, and
    :attr:`dropped` counts it.
    """

    def __init__(self, max_line: int):
        self.max_line = max_line
        self.dropped = 0
        self._partial = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> List[bytes]:
        lines: List[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            elif len(self._partial) + end - start + 1 > self.max_line:
                self.dropped += 1
            else:
                self._partial += data[start:end]
                lines.append(bytes(self._partial))
            self._partial.clear()
            start = end + 1
        if not self._skipping:
            self._partial += data[start:]
            if len(self._partial) >= self.max_line:
                self._partial.clear()
                self._skipping = True
                self.dropped += 1
        return lines

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held."""
        return len(self._partial)


class Stream:
    """A connected, non-blocking socket on a :class:`Loop`.

    Received bytes go to ``on_data(bytes)``; end of stream or an error
    closes the stream and calls ``on_close()`` once.  :meth:`write` queues
    bytes (at most ``max_buffer`` waiting) and sends them as the socket
    takes them.
    """

    def __init__(self, loop: Loop, sock: socket.socket, on_data: Callable[[bytes], None],
                 on_close: Callable[[], None], max_buffer: int = CONTROL_BUFFER):
        self.loop = loop
        self.sock = sock
        self.max_buffer = max_buffer
        self._on_data = on_data
        self._on_close = on_close
        self._out = bytearray()
        self.closed = False
        sock.setblocking(False)
        loop.add_reader(sock, self._readable)

    @property
    def buffered(self) -> int:
        return len(self._out)

    def write(self, data: bytes) -> bool:
        """Queue ``data``; False (nothing queued) when closed or the buffer is full."""
        if self.closed or len(self._out) + len(data) > self.max_buffer:
            return False
        if not self._out:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return False
            data = data[sent:]
        if data:
            self._out += data
            self.loop.add_writer(self.sock, self._writable)
        return True

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self._out[:sent]
        if not self._out:
            self.loop.remove_writer(self.sock)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._on_data(data)

    def flush(self, timeout: float) -> bool:
        """Send what is queued, blocking up to ``timeout`` s (used when stopping)."""
        if self.closed or not self._out:
            return not self._out
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(self._out)
            self._out.clear()
        except OSError:
            return False
        finally:
            self.sock.setblocking(False)
        self.loop.remove_writer(self.sock)
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock)
        self.loop.remove_writer(self.sock)
        self.sock.close()
        self._out.clear()
        self._on_close()


# -- the extension -----------------------------------------------------------------------


Handler = Callable[[Dict[str, Any]], Any]
PrimitiveCallback = Callable[[Any, Optional[str]], None]


class Responder:
    """The answer-later side of a request, for handlers registered with ``deferred=True``."""

    def __init__(self, extension: "Extension", request_id: Any):
        self._extension = extension
        self.id = request_id
        self.done = False

    def reply(self, value: Any = None) -> None:
        self._send({"type": "reply", "id": self.id, "return": value})

    def fail(self, desc: str) -> None:
        self._send({"type": "reply", "id": self.id, "error": {"desc": str(desc)}})

    def _send(self, frame: Dict[str, Any]) -> None:
        if self.done:
            raise SdkError(f"request {self.id!r} was answered already")
        self.done = True
        self._extension.send_frame(frame)


class Extension:
    """One extension process: its environment, its control connection, its loop."""

    def __init__(self, environ: Optional[Dict[str, str]] = None, loop: Optional[Loop] = None):
        self.environ = dict(os.environ if environ is None else environ)
        self.loop = loop or Loop()
        self.name = self.environ.get(ENV_NAME, "")
        self.socket_path = self.environ.get(ENV_SOCKET, "")
        self.bundle_dir = self.environ.get(ENV_DIR, "")
        self.state_dir = self.environ.get(ENV_STATE, "")
        self.runtime_dir = self.environ.get(ENV_RUNTIME, "")
        self.settings_path = self.environ.get(ENV_SETTINGS, "")
        self._settings: Optional[Dict[str, Any]] = None
        self._commands: Dict[str, Tuple[Callable[..., Any], bool]] = {}
        self._host_callbacks: List[Callable[[bool], None]] = []
        self._stop_callbacks: List[Callable[[], None]] = []
        self._pending: Dict[Any, PrimitiveCallback] = {}
        self._ids = itertools.count(1)
        self._control: Optional[Stream] = None
        self._lines = LineSplitter(MAX_FRAME)
        self._stopping = False
        self.host_connected: Optional[bool] = None  # None: the core has not said
        self.exit_status = 0

    # -- what the core gave us --

    @property
    def settings(self) -> Dict[str, Any]:
        """The settings object (manifest defaults overlaid with the admin's file); {} if none."""
        if self._settings is None:
            self._settings = {}
            if self.settings_path:
                with open(self.settings_path, "rb") as stream:
                    value = json.loads(stream.read(MAX_FRAME * 4))
                if not isinstance(value, dict):
                    raise SdkError(f"{self.settings_path}: settings are not a JSON object")
                self._settings = value
        return self._settings

    # -- registration --

    def command(self, name: str, deferred: bool = False) -> Callable[[Callable[..., Any]],
                                                                       Callable[..., Any]]:
        """Decorator: serve host requests ``name``.

        ``handler(arguments)`` returns the reply value or raises
        :class:`CommandFailed`; with ``deferred=True`` it is called as
        ``handler(arguments, responder)`` and answers later through the
        :class:`Responder`.
        """
        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self._commands[name] = (handler, deferred)
            return handler
        return register

    def on_host(self, callback: Callable[[bool], None]) -> Callable[[bool], None]:
        """Call ``callback(connected)`` when the core reports the channel's host came or went."""
        self._host_callbacks.append(callback)
        return callback

    def on_stop(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` once when the extension stops (SIGTERM, or the core went away)."""
        self._stop_callbacks.append(callback)
        return callback

    # -- connections --

    def _connect_socket(self, role: str) -> socket.socket:
        if not self.socket_path:
            raise SdkError(f"{ENV_SOCKET} is not set: not started by the qga core")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(10.0)
            sock.connect(self.socket_path)
            sock.sendall(encode_frame({"hello": role, "version": WIRE_VERSION}))
        except OSError as error:
            sock.close()
            raise SdkError(f"cannot connect to the core at {self.socket_path}:"
                           f" {error.strerror or error}") from None
        return sock

    def connect(self) -> None:
        """Open the control connection (once)."""
        if self._control is None:
            sock = self._connect_socket(ROLE_CONTROL)
            self._control = Stream(self.loop, sock, self._on_control_data, self._on_control_lost)

    @property
    def connected(self) -> bool:
        return self._control is not None and not self._control.closed

    def open_channel(self) -> socket.socket:
        """Channel mode: a new connection carrying the port's raw bytes, as a blocking socket."""
        sock = self._connect_socket(ROLE_CHANNEL)
        sock.settimeout(None)
        return sock

    # -- frames out --

    def send_frame(self, frame: Dict[str, Any]) -> bool:
        """Send one frame to the core; False when it could not be queued."""
        self.connect()
        assert self._control is not None
        return self._control.write(encode_frame(frame))

    def ready(self) -> None:
        """Tell the core the extension is serving (within the manifest's ready-timeout)."""
        self.send_frame({"type": "ready"})

    def emit(self, name: str, data: Dict[str, Any]) -> bool:
        """An event for the host; False when the control buffer is full (the event is lost)."""
        return self.send_frame({"type": "event", "name": name, "data": data})

    def log(self, level: str, message: str) -> None:
        """A line for the agent's log (stderr when there is no core connection)."""
        if level not in LOG_LEVELS:
            raise ValueError(f"log level {level!r} is not one of {LOG_LEVELS}")
        if self.connected:
            # Cut in the middle of a huge message rather than lose it.
            if len(message) > MAX_FRAME // 8:
                message = message[:MAX_FRAME // 16] + " ... " + message[-1024:]
            self.send_frame({"type": "log", "level": level, "message": message})
        else:
            print(f"{self.name or 'extension'}: {level}: {message}", file=sys.stderr)

    def logging_handler(self) -> logging.Handler:
        """A :class:`logging.Handler` that sends records as ``log`` frames."""
        return _FrameLogHandler(self)

    def primitive(self, name: str, arguments: Dict[str, Any],
                  callback: Optional[PrimitiveCallback] = None) -> Any:
        """Ask the core for privileged operation ``name``.

        ``callback(value, error)`` runs in the loop when the ``primitive-reply``
        arrives: ``error`` is None on success, else the core's text (the value
        is then None).  If the control connection is lost first, the
        callback gets an error.  Returns the request id.
        """
        request_id = next(self._ids)
        if callback is not None:
            self._pending[request_id] = callback
        if not self.send_frame({"type": "primitive", "id": request_id, "name": name,
                                "arguments": arguments}):
            self._pending.pop(request_id, None)
            if callback is not None:
                self.loop.call_soon(lambda: callback(None, "the core connection is not"
                                                     " available"))
        return request_id

    # -- frames in --

    def _on_control_data(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            try:
                frame = json.loads(line)
            except ValueError:
                self.log("warning", "the core sent a line that is not JSON; ignored")
                continue
            if isinstance(frame, dict):
                self._dispatch(frame)

    def _dispatch(self, frame: Dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "request":
            self._serve(frame.get("id"), frame.get("command"), frame.get("arguments") or {})
        elif kind == "primitive-reply":
            callback = self._pending.pop(frame.get("id"), None)
            if callback is not None:
                error = frame.get("error")
                if error is not None:
                    desc = error.get("desc") if isinstance(error, dict) else None
                    callback(None, str(desc or "the primitive failed"))
                else:
                    callback(frame.get("return"), None)
        elif kind == "host":
            self.host_connected = bool(frame.get("connected"))
            for host_callback in list(self._host_callbacks):
                self.loop._guarded(lambda: host_callback(bool(self.host_connected)))

    def _serve(self, request_id: Any, command: Any, arguments: Dict[str, Any]) -> None:
        responder = Responder(self, request_id)
        entry = self._commands.get(command) if isinstance(command, str) else None
        if entry is None:
            responder.fail(f"the extension has no command {command!r}")
            return
        handler, deferred = entry
        try:
            if deferred:
                handler(arguments, responder)
                return
            value = handler(arguments)
        except CommandFailed as failure:
            if not responder.done:
                responder.fail(failure.desc)
            return
        except Exception as error:
            self.log("error", f"command {command} failed: {type(error).__name__}: {error}")
            if not responder.done:
                responder.fail(f"{type(error).__name__}: {error}")
            return
        responder.reply(value)

    def _on_control_lost(self) -> None:
        pending, self._pending = self._pending, {}
        for callback in pending.values():
            self.loop._guarded(lambda: callback(None, "the core connection was lost"))
        if not self._stopping:
            # Without the core there is nobody to serve: stop, and let the
            # supervisor decide whether to start us again.
            self.exit_status = 1
            self.stop()

    # -- running --

    def run(self, ready: bool = True) -> int:
        """Connect, say ready (unless ``ready=False``: call :meth:`ready` yourself),
        serve until SIGTERM/SIGINT or until the core goes away.  Returns the
        exit status for ``sys.exit``."""
        self.connect()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stop)
        if ready:
            self.ready()
        self.loop.run()
        return self.exit_status

    def stop(self) -> None:
        """Run the stop callbacks once, flush what is queued for the core, end the loop."""
        if self._stopping:
            return
        self._stopping = True
        for callback in list(self._stop_callbacks):
            self.loop._guarded(callback)
        if self._control is not None and not self._control.closed:
            self._control.flush(2.0)
        self.loop.stop()


class _FrameLogHandler(logging.Handler):
    _LEVELS = ((logging.ERROR, "error"), (logging.WARNING, "warning"), (logging.INFO, "info"))

    def __init__(self, extension: Extension):
        super().__init__()
        self.extension = extension

    def emit(self, record: logging.LogRecord) -> None:
        level = next((name for number, name in self._LEVELS if record.levelno >= number),
                     "debug")
        try:
            self.extension.log(level, self.format(record))
        except Exception:
            self.handleError(record)

