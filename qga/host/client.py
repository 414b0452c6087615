"""Talk to a guest agent from the host: connect, synchronise, call commands.

The agent (qemu-ga or qga) is reached through a Unix stream socket: the
chardev socket QEMU exposes for the guest's virtio-serial port, or an agent's
own ``unix-listen`` socket.  That stream has no notion of sessions: the
agent's parser state survives reconnects and replies to an earlier client may
still be in flight.  So before its first command (and after anything that may
have left the stream out of step) the client resynchronises:

1. it sends one 0xFF byte, which makes the agent drop any half-received
   request, followed by ``guest-sync-delimited`` with a random id;
2. it discards everything until a 0xFF byte from the agent (the agent puts
   exactly one before the reply to ``guest-sync-delimited``; replies are
   otherwise pure ASCII), then reads lines until the reply carrying its id.

Every request also carries an ``id`` of its own, which the agent echoes, so
a late reply to an abandoned request can never be taken for the current one.

Replies are read one line at a time with a hard bound on the line length,
so a broken agent cannot make the client grow without limit.  The client is
not thread-safe: one conversation at a time, like the agent itself.

Only the standard library is imported here.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import time
from typing import (
    Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Union,
)

from qga.errors import AgentError, BadReply, ClientError, ConnectionLost, ReplyTimeout, SyncError

MiB = 1024 * 1024

# One reply line may hold a guest-file-read of the agent's maximum (48 MiB,
# about 64 MiB of base64) plus the JSON around it.
MAX_LINE = 80 * MiB

# Decoded bytes per guest-file-read/-write call: about 5.6 MiB of base64 per
# message, far below libvirt's 10 MiB cap, so the same sizes work through it.
FILE_CHUNK = 4 * MiB

DELIMITER = b"\xff"

# Commands that send nothing when they succeed (QAPI success-response false).
NO_REPLY_COMMANDS = frozenset({
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
})

_RECV_SIZE = 1 * MiB

# Ids are random 62-bit integers: valid int64 for qemu-ga, and unlikely to
# collide with another client's.
def _random_id() -> int:
    return int.from_bytes(os.urandom(8), "big") >> 2


class _UseDefault:
    """Marker for "use the client's default timeout" (None means "wait forever")."""


USE_DEFAULT: Any = _UseDefault()


class _LineTooLong(Exception):
    """Internal: a line exceeded the bound; its bytes were dropped."""


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


class _LineReader:
    """Bounded reading of ``\\n``-terminated lines from a socket, with deadlines."""

    def __init__(self, sock: socket.socket, max_line: int):
        self.sock = sock
        self.max_line = max_line
        self.buffer = bytearray()
        self._scanned = 0  # bytes of ``buffer`` already known to hold no newline
        self._dropping = False  # inside an over-long line: drop bytes until its end

    def _remaining(self, deadline: Optional[float]) -> Optional[float]:
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReplyTimeout("no reply from the agent in time")
        return remaining

    def send(self, data: bytes, deadline: Optional[float]) -> None:
        view = memoryview(data)
        try:
            while view:
                self.sock.settimeout(self._remaining(deadline))
                sent = self.sock.send(view)
                view = view[sent:]
        except socket.timeout:
            raise ReplyTimeout("the agent does not read its input") from None
        except OSError as error:
            raise ConnectionLost(f"cannot send to the agent: {error}") from None

    def _fill(self, deadline: Optional[float]) -> None:
        try:
            self.sock.settimeout(self._remaining(deadline))
            data = self.sock.recv(_RECV_SIZE)
        except socket.timeout:
            raise ReplyTimeout("no reply from the agent in time") from None
        except OSError as error:
            raise ConnectionLost(f"cannot read from the agent: {error}") from None
        if not data:
            raise ConnectionLost("the agent closed the connection")
        self.buffer += data

    def read_line(self, deadline: Optional[float]) -> bytes:
        """The next line without its newline.

        Raises ``_LineTooLong`` as soon as a line exceeds the bound; the rest
        of that line is dropped as it arrives, by later calls.
        """
        while True:
            newline = self.buffer.find(b"\n", self._scanned)
            if newline >= 0:
                line = bytes(self.buffer[:newline])
                del self.buffer[:newline + 1]
                self._scanned = 0
                if self._dropping:
                    self._dropping = False  # the end of the over-long line
                    continue
                return line
            if self._dropping:
                self.buffer.clear()
            elif len(self.buffer) > self.max_line:
                self.buffer.clear()
                self._dropping = True
                self._scanned = 0
                raise _LineTooLong()
            self._scanned = len(self.buffer)
            self._fill(deadline)


class ExecResult:
    """The outcome of a program run with :meth:`Client.exec`."""

    def __init__(self, pid: int, status: Mapping[str, Any]):
        self.pid = pid
        self.exitcode: Optional[int] = status.get("exitcode")
        self.signal: Optional[int] = status.get("signal")
        self.stdout = base64.b64decode(status.get("out-data", ""))
        self.stderr = base64.b64decode(status.get("err-data", ""))
        self.out_truncated = bool(status.get("out-truncated", False))
        self.err_truncated = bool(status.get("err-truncated", False))

    @property
    def returncode(self) -> int:
        """Like :mod:`subprocess`: the exit code, or minus the signal number."""
        if self.signal is not None:
            return -self.signal
        return self.exitcode if self.exitcode is not None else 0

    def __repr__(self) -> str:
        return (f"ExecResult(pid={self.pid}, exitcode={self.exitcode}, signal={self.signal}, "
                f"stdout={len(self.stdout)} bytes, stderr={len(self.stderr)} bytes)")


class Client:
    """A connection to one guest agent over a Unix socket.

    ``timeout`` bounds each command (None waits forever), ``sync_timeout``
    each resynchronisation, ``no_reply_grace`` how long a command that
    replies only on failure (guest-shutdown, guest-suspend-*) may take to
    report that failure.  The socket is opened on first use.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], timeout: Optional[float] = 30.0,
                 sync_timeout: float = 5.0, no_reply_grace: float = 2.0,
                 max_line: int = MAX_LINE):
        self.path = os.fspath(path)
        self.timeout = timeout
        self.sync_timeout = sync_timeout
        self.no_reply_grace = no_reply_grace
        self.max_line = max_line
        self._reader: Optional[_LineReader] = None
        self._need_sync = True
        self._ids = itertools.count(_random_id())

    # -- connection ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._reader is not None

    def connect(self) -> None:
        """Open the socket (closing any previous one); the next call resynchronises."""
        self.close()
        deadline = time.monotonic() + self.sync_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.sync_timeout)
                sock.connect(self.path)
                break
            except BlockingIOError:
                # The listen backlog is full: agents serve one client at a time
                # and listen with a backlog of one, so wait for our turn.
                sock.close()
                if time.monotonic() >= deadline:
                    raise ConnectionLost(f"cannot connect to {self.path}: the agent is busy "
                                         "with another client") from None
                time.sleep(0.01)
            except OSError as error:
                sock.close()
                raise ConnectionLost(f"cannot connect to {self.path}: {error}") from None
        self._reader = _LineReader(sock, self.max_line)
        self._need_sync = True

    def close(self) -> None:
        if self._reader is not None:
            self._reader.sock.close()
            self._reader = None

    def __enter__(self) -> "Client":
        if not self.connected:
            self.connect()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _open_reader(self) -> _LineReader:
        if self._reader is None:
            self.connect()
        assert self._reader is not None
        return self._reader

    # -- synchronisation -------------------------------------------------------

    def sync(self, timeout: Optional[float] = None) -> None:
        """Reset the agent's parser and skip every stale reply (raises :class:`SyncError`)."""
        reader = self._open_reader()
        sync_id = _random_id()
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}, "id": sync_id}
        deadline = _deadline(self.sync_timeout if timeout is None else timeout)
        try:
            reader.send(DELIMITER + _encode(request), deadline)
            self._await_sync(reader, sync_id, deadline)
        except ReplyTimeout:
            raise SyncError(f"the agent at {self.path} did not answer guest-sync-delimited "
                            f"in time") from None
        except ConnectionLost:
            self.close()
            raise
        self._need_sync = False

    def _await_sync(self, reader: _LineReader, sync_id: int, deadline: Optional[float]) -> None:
        while True:
            try:
                line = reader.read_line(deadline)
            except _LineTooLong:
                continue  # a stale reply too big to keep: it is not ours anyway
            reply = _parse(line.rpartition(DELIMITER)[2])
            if reply is None:
                continue  # garbage, or the rest of a line cut by an earlier client
            if "error" not in reply and reply.get("return") == sync_id:
                # The random id is ours alone, so the reply counts even from an
                # agent that forgot the delimiter.
                return
            if "error" in reply and reply.get("id") == sync_id:
                # Only our request carries this id; the agent refused it (blocked
                # by policy, say): fall back to plain guest-sync, as libvirt uses.
                self._sync_plain(reader, deadline)
                return
            # Otherwise: the agent's answer to our 0xFF, or a stale reply.

    def _sync_plain(self, reader: _LineReader, deadline: Optional[float]) -> None:
        sync_id = _random_id()
        request = {"execute": "guest-sync", "arguments": {"id": sync_id}, "id": sync_id}
        reader.send(_encode(request), deadline)
        while True:
            try:
                reply = _parse(reader.read_line(deadline))
            except _LineTooLong:
                continue
            if reply is None:
                continue
            if "error" not in reply and reply.get("return") == sync_id:
                return
            if "error" in reply and reply.get("id") == sync_id:
                error = reply["error"] if isinstance(reply["error"], dict) else {}
                raise SyncError(f"the agent refuses to synchronise: {error.get('class')}: "
                                f"{error.get('desc')}")

    # -- commands --------------------------------------------------------------

    def call(self, execute: str, arguments: Optional[Mapping[str, Any]] = None,
             timeout: Any = USE_DEFAULT) -> Any:
        """Run one command; return its ``return`` value (None for a no-reply command).

        Raises :class:`AgentError` for an error reply, :class:`ReplyTimeout`,
        :class:`ConnectionLost`, :class:`BadReply` or :class:`SyncError`.
        """
        if timeout is USE_DEFAULT:
            timeout = self.timeout
        reader = self._open_reader()
        if self._need_sync:
            self.sync()
        request_id = next(self._ids)
        request: Dict[str, Any] = {"execute": execute}
        if arguments is not None:
            request["arguments"] = dict(arguments)
        request["id"] = request_id
        deadline = _deadline(timeout)
        try:
            reader.send(_encode(request), deadline)
            if execute in NO_REPLY_COMMANDS:
                return self._await_failure(reader, execute, request_id, deadline)
            return self._await_reply(reader, execute, request_id, deadline)
        except (ReplyTimeout, BadReply):
            self._need_sync = True  # a late or partial reply may still arrive
            raise
        except ConnectionLost:
            self.close()
            raise

    def _await_reply(self, reader: _LineReader, execute: str, request_id: int,
                     deadline: Optional[float]) -> Any:
        while True:
            try:
                line = reader.read_line(deadline)
            except _LineTooLong:
                raise BadReply(f"reply to {execute} longer than {self.max_line} bytes") from None
            reply = _parse(line.rpartition(DELIMITER)[2])
            if reply is None:
                raise BadReply(f"reply to {execute} is not a JSON object: {line[:200]!r}")
            if "id" in reply and reply["id"] != request_id:
                continue  # a late reply to a request we gave up on
            return _result(reply, execute)

    def _await_failure(self, reader: _LineReader, execute: str, request_id: int,
                       deadline: Optional[float]) -> Any:
        """A no-reply command: an error may come within the grace time, success is silence."""
        grace = _deadline(self.no_reply_grace)
        if deadline is not None and grace is not None:
            grace = min(grace, deadline)
        try:
            return self._await_reply(reader, execute, request_id, grace)
        except ReplyTimeout:
            self._need_sync = True  # an error reply may still come later: skip it then
            return None
        except ConnectionLost:
            self.close()  # the guest went down or suspended, as asked
            return None

    # -- helpers on top of call() ----------------------------------------------

    def ping(self) -> None:
        self.call("guest-ping")

    def info(self) -> Dict[str, Any]:
        """``guest-info``: ``version`` and ``supported_commands``."""
        return self.call("guest-info")

    def iter_file(self, path: str, chunk_size: int = FILE_CHUNK) -> Iterator[bytes]:
        """Yield a guest file's content in chunks; the guest handle is always closed."""
        handle = self.call("guest-file-open", {"path": path, "mode": "r"})
        finished = False
        try:
            while True:
                reply = self.call("guest-file-read", {"handle": handle, "count": chunk_size})
                data = base64.b64decode(reply["buf-b64"])
                if data:
                    yield data
                # An empty read without eof only happens on pipes with nothing
                # buffered; stopping there keeps the loop from spinning.
                if reply.get("eof") or not data:
                    break
            finished = True
        finally:
            self._close_handle(handle, report_errors=finished)

    def read_file(self, path: str, dest: Optional[BinaryIO] = None,
                  chunk_size: int = FILE_CHUNK) -> Union[bytes, int]:
        """A guest file's content; with ``dest``, write it there and return the byte count."""
        if dest is None:
            return b"".join(self.iter_file(path, chunk_size))
        total = 0
        for chunk in self.iter_file(path, chunk_size):
            dest.write(chunk)
            total += len(chunk)
        return total

    def write_file(self, path: str, data: Union[bytes, bytearray, memoryview, BinaryIO],
                   mode: str = "w", chunk_size: int = FILE_CHUNK) -> int:
        """Write bytes or a binary file object to a guest file; return the byte count.

        ``mode`` is a ``guest-file-open`` mode ("w" truncates, "a" appends).
        qemu-ga creates new files with mode 0666 whatever its umask.
        """
        handle = self.call("guest-file-open", {"path": path, "mode": mode})
        finished = False
        total = 0
        try:
            for chunk in _chunks(data, chunk_size):
                total += self._write_chunk(handle, chunk)
            finished = True
        finally:
            self._close_handle(handle, report_errors=finished)
        return total

    def _write_chunk(self, handle: int, chunk: bytes) -> int:
        view = memoryview(chunk)
        while view:
            reply = self.call("guest-file-write", {
                "handle": handle, "buf-b64": base64.b64encode(view).decode("ascii")})
            written = reply["count"]
            if not 0 < written <= len(view):
                raise ClientError(f"guest-file-write wrote {written} of {len(view)} bytes")
            view = view[written:]
        return len(chunk)

    def _close_handle(self, handle: int, report_errors: bool) -> None:
        if report_errors:
            self.call("guest-file-close", {"handle": handle})
            return
        # Already failing: try to release the handle, but keep the first error.
        try:
            if self.connected:
                self.call("guest-file-close", {"handle": handle})
        except ClientError:
            pass

    def exec(self, path: str, args: Iterable[str] = (),
             env: Union[Mapping[str, str], Iterable[str], None] = None,
             input_data: Optional[bytes] = None, capture: Union[bool, str] = True,
             timeout: Optional[float] = None) -> ExecResult:
        """Run a program in the guest and wait for it (``guest-exec`` + status polling).

        ``env`` *replaces* the guest program's whole environment (and its PATH
        is the one searched for ``path``).  ``capture`` is a bool or, with
        agents from 8.0 on, "none", "stdout", "stderr", "separated" or "merged".
        ``timeout`` bounds the wait for the program (None waits forever);
        :class:`ReplyTimeout` leaves it running.
        """
        arguments: Dict[str, Any] = {"path": path}
        args = list(args)
        if args:
            arguments["arg"] = args
        if env is not None:
            if isinstance(env, Mapping):
                arguments["env"] = [f"{key}={value}" for key, value in env.items()]
            else:
                arguments["env"] = list(env)
        if input_data is not None:
            arguments["input-data"] = base64.b64encode(input_data).decode("ascii")
        if capture:
            arguments["capture-output"] = capture
        pid = self.call("guest-exec", arguments)["pid"]
        return self.wait_exec(pid, timeout)

    def wait_exec(self, pid: int, timeout: Optional[float] = None,
                  first_poll: float = 0.002, max_poll: float = 0.5) -> ExecResult:
        """Poll ``guest-exec-status`` with growing intervals until the program ended."""
        deadline = _deadline(timeout)
        delay = first_poll
        while True:
            status = self.call("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                return ExecResult(pid, status)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ReplyTimeout(f"guest process {pid} still running after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, max_poll)


    # -- extensions (qga only) ---------------------------------------------------

    def push(self, bundle: Union[str, "os.PathLike[str]"], statement: Optional[bytes] = None,
             signature: Optional[bytes] = None, wait: bool = True,
             progress: Optional[Callable[[int, int], None]] = None,
             chunk_size: int = FILE_CHUNK, install_timeout: float = 120.0) -> Dict[str, Any]:
        """Upload a bundle and install it; return the install's record.

        ``statement`` and ``signature`` default to the files beside the bundle
        (``BUNDLE.statement``, ``BUNDLE.sig``) when they exist.  The upload
        goes in chunks; a chunk whose answer is lost (timeout, reconnect) is
        resumed from the offset the agent reports.  ``progress(sent, total)``
        is called after each chunk.  With ``wait`` the call returns when the
        new version said it is ready or the agent rolled back: the record's
        ``state`` is then ``done``, ``rolled-back`` or ``failed`` (with
        ``error``); without, it is ``installing``.
        """
        path = os.fspath(bundle)
        if statement is None:
            statement = _read_if_exists(path + ".statement")
        if signature is None:
            signature = _read_if_exists(path + ".sig")
        with open(path, "rb") as source:
            total = os.fstat(source.fileno()).st_size
            upload = self.call("guest-extension-upload", {"size": total})["upload"]
            self._upload_chunks(source, upload, total, progress, chunk_size)
        arguments: Dict[str, Any] = {"upload": upload}
        if statement is not None:
            arguments["statement"] = base64.b64encode(statement).decode("ascii")
        if signature is not None:
            arguments["signature"] = base64.b64encode(signature).decode("ascii")
        record = self.call("guest-extension-install", arguments)
        if not wait:
            return record
        return self.wait_install(record["name"], install_timeout)

    def _upload_chunks(self, source: BinaryIO, upload: str, total: int,
                       progress: Optional[Callable[[int, int], None]], chunk_size: int) -> None:
        offset = 0
        retries = 0
        while offset < total:
            source.seek(offset)
            chunk = _read_full(source, min(chunk_size, total - offset))
            try:
                reply = self.call("guest-extension-upload", {
                    "upload": upload, "offset": offset,
                    "data": base64.b64encode(chunk).decode("ascii")})
            except (ReplyTimeout, ConnectionLost):
                retries += 1
                if retries > 3:
                    raise
                # The chunk may or may not have arrived: ask where the upload stands.
                reply = self.call("guest-extension-upload", {"upload": upload})
            else:
                retries = 0
            offset = reply["offset"]
            if progress is not None:
                progress(offset, total)

    def wait_install(self, name: str, timeout: Optional[float] = 120.0,
                     first_poll: float = 0.01, max_poll: float = 0.5) -> Dict[str, Any]:
        """Poll ``guest-extension-status`` until the install of ``name`` is no longer running."""
        deadline = _deadline(timeout)
        delay = first_poll
        while True:
            install = self.call("guest-extension-status", {"name": name}).get("install", {})
            if install.get("state") != "installing":
                return dict(install, name=name)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ReplyTimeout(f"the install of {name} is still running after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, max_poll)

    def ext_list(self) -> List[Dict[str, Any]]:
        return self.call("guest-extension-list")

    def ext_status(self, name: str) -> Dict[str, Any]:
        return self.call("guest-extension-status", {"name": name})

    def ext_start(self, name: str) -> None:
        self.call("guest-extension-start", {"name": name})

    def ext_stop(self, name: str) -> None:
        self.call("guest-extension-stop", {"name": name})

    def ext_remove(self, name: str) -> None:
        self.call("guest-extension-remove", {"name": name})

    def ext_call(self, name: str, command: str, arguments: Optional[Mapping[str, Any]] = None,
                 timeout: Optional[float] = None) -> Any:
        """One request to an extension; ``timeout`` is the agent's wait for it."""
        request: Dict[str, Any] = {"name": name, "command": command,
                                   "arguments": dict(arguments or {})}
        if timeout is not None:
            request["timeout"] = timeout
        # The agent answers within the extension's timeout: wait a little longer.
        reply_timeout = self.timeout
        if reply_timeout is not None:
            reply_timeout = max(reply_timeout, (timeout or 0) + 5.0)
        return self.call("guest-extension-call", request, timeout=reply_timeout)

    def ext_events(self, name: str, cursor: Optional[str] = None, maximum: Optional[int] = None,
                   wait: Optional[float] = None) -> Dict[str, Any]:
        """One read of an extension's events (see ``guest-extension-events``)."""
        request: Dict[str, Any] = {"name": name}
        if cursor is not None:
            request["cursor"] = cursor
        if maximum is not None:
            request["max"] = maximum
        reply_timeout: Any = USE_DEFAULT
        if wait:
            request["wait"] = wait
            if self.timeout is not None:
                reply_timeout = max(self.timeout, wait + 5.0)
        return self.call("guest-extension-events", request, timeout=reply_timeout)

    def follow_events(self, name: str, cursor: Optional[str] = None,
                      wait: float = 5.0) -> Iterator[Dict[str, Any]]:
        """Yield an extension's events as they come, forever (each one at least once)."""
        while True:
            batch = self.ext_events(name, cursor, wait=wait)
            cursor = batch["cursor"]
            yield from batch["events"]


def _read_if_exists(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as stream:
            return stream.read(1024 * 1024)
    except FileNotFoundError:
        return None


def _encode(request: Mapping[str, Any]) -> bytes:
    return json.dumps(request, separators=(",", ":")).encode("ascii") + b"\n"


def _parse(line: bytes) -> Optional[Dict[str, Any]]:
    """A reply object, or None for a line that is not one."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _result(reply: Dict[str, Any], execute: str) -> Any:
    if "error" in reply:
        error = reply["error"]
        if not isinstance(error, dict):
            raise BadReply(f"malformed error reply to {execute}: {reply!r}")
        raise AgentError(str(error.get("class", "GenericError")), str(error.get("desc", "")),
                         execute)
    if "return" not in reply:
        raise BadReply(f"reply to {execute} has neither return nor error: {reply!r}")
    return reply["return"]


def _chunks(data: Union[bytes, bytearray, memoryview, BinaryIO], size: int) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), size):
            yield bytes(view[start:start + size])
        return
    while True:
        chunk = _read_full(data, size)
        if not chunk:
            return
        yield chunk


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at end of stream (pipes return short reads)."""
    parts: List[bytes] = []
    wanted = size
    while wanted > 0:
        part = stream.read(wanted)
        if not part:
            break
        parts.append(part)
        wanted -= len(part)
    return b"".join(parts)
