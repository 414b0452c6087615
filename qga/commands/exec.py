"""guest-exec and guest-exec-status, as current upstream qemu-ga does them.

A child is started with ``os.posix_spawn`` (vfork-fast even from a big
process, no shell): ``argv[0]`` is the path as given, the program is looked
up in ``PATH`` (the ``PATH`` of ``env`` when given, else the agent's, else
``/bin:/usr/bin:.``) with GLib's rules, ``env`` replaces the environment,
stdin is ``/dev/null`` unless ``input-data`` is given (then a pipe, written
without blocking and closed), uncaptured output goes to ``/dev/null``, the
child inherits the agent's cwd and no other descriptor, and ``SIGPIPE``
(and ``SIGXFSZ``, which Python ignores) are back to their default action.
One artefact of glibc's posix_spawn stays: its two internal signals (32, 33)
start out ignored in the child, which only a look at ``/proc/PID/status``
shows (the C library sets its own handlers when it needs them).

The agent watches each child through its loop: a pidfd (reaped as soon as
the child exits, so there are never zombies) and the output pipes (drained
as data comes, 16 MiB kept per stream, the rest read and dropped).  A status
request also drains and reaps without blocking, so it sees the latest state
even before the loop has run, and it works without a loop at all.

``exited`` is true once the child exited *and* both captured streams reached
EOF; the first status that says so frees the record, as in qemu-ga.

Unlike qemu-ga, finished records do not pile up forever when the host never
asks: a record whose child ended is dropped :data:`FINISHED_RECORD_TTL`
seconds after the end, and beyond :data:`MAX_FINISHED_RECORDS` records or
:data:`FINISHED_OUTPUT_BUDGET` bytes of kept output the oldest finished ones
go first.  Running children are never dropped.

Texts follow current upstream: an unknown pid answers ``PID ld does not
exist`` (upstream formats ``"PID " PRId64 " does not exist"`` without an
argument, so that is literally what it sends on 64-bit Linux; 7.2 said
``Invalid parameter 'pid'``), a spawn failure answers GLib's message alone
(7.2 wrapped it in ``Guest agent command failed, error was '...'``).

Our own policy addition: ``config.exec_allow_programs``.  When it is not
empty, only programs whose real path (after the PATH search) is one of the
listed paths run; anything else gets the spawn-failure answer with
``(Permission denied)``.  The checked real path is what gets executed.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import time
from typing import Dict, List, Optional, Tuple, Union

from qga.commands import command
from qga.commands.files import base64_text, c_bytes, decode_base64
from qga.errors import CommandError
from qga.loop import WRITE

log = logging.getLogger(__name__)

MAX_OUTPUT = 16 * 1024 * 1024  # per captured stream, as qemu-ga
READ_CHUNK = 64 * 1024
READS_PER_EVENT = 16  # then let the loop serve others (level-triggered: it comes back)
# A status request drains at most this much per stream: a child that writes
# without end must not keep the agent reading forever.
READS_PER_STATUS = 256

# Bounds on what nobody asked for (see the module docstring).
FINISHED_RECORD_TTL = 3600.0
MAX_FINISHED_RECORDS = 1024
FINISHED_OUTPUT_BUDGET = 256 * 1024 * 1024

DEFAULT_SEARCH_PATH = b"/bin:/usr/bin:."
UNKNOWN_PID = "PID ld does not exist"

# errno values after which GLib's PATH search tries the next directory.
_SEARCH_ON = {errno.ENOENT, errno.ESTALE, errno.ENOTDIR, errno.ENODEV, errno.ETIMEDOUT}

# Members of guest-exec-status in the order qemu-ga's QDict writes them.
_STATUS_ORDER = ("exitcode", "err-data", "out-data", "err-truncated", "signal",
                 "out-truncated", "exited")


def spawn_failure(path: str, code: int) -> CommandError:
    """GLib's message for a child that could not be executed (curly quotes included)."""
    return CommandError(f"Failed to execute child process \u201c{path}\u201d "
                        f"({os.strerror(code)})")


# -- capture modes --------------------------------------------------------------------


def capture_mode(capture_output: Union[None, bool, str]) -> str:
    """The mode for ``capture-output``: absent or false -> none, true -> separated."""
    if capture_output is None or capture_output is False:
        return "none"
    if capture_output is True:
        return "separated"
    return capture_output


# -- the streams of one child ---------------------------------------------------------


class OutputStream:
    """A captured stdout or stderr: its pipe until EOF, then the bytes kept."""

    __slots__ = ("fd", "data", "truncated")

    def __init__(self, fd: Optional[int]):
        self.fd = fd
        self.data = bytearray()
        self.truncated = False

    @property
    def closed(self) -> bool:
        return self.fd is None

    def drain(self, max_reads: Optional[int] = None) -> bool:
        """Read what the pipe has without blocking; True when it reached EOF."""
        reads = 0
        while self.fd is not None:
            if max_reads is not None and reads >= max_reads:
                return False
            reads += 1
            try:
                chunk = os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                return False
            except OSError:
                chunk = b""  # an error ends the stream like EOF (qemu-ga closes it)
            if not chunk:
                self.close()
                return True
            self._keep(chunk)
        return True

    def _keep(self, chunk: bytes) -> None:
        room = MAX_OUTPUT - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:room]
        if chunk:
            self.data += chunk

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class InputFeeder:
    """``input-data`` going into the child's stdin pipe without blocking."""

    __slots__ = ("fd", "data", "offset")

    def __init__(self, fd: int, data: bytes):
        self.fd: Optional[int] = fd
        self.data = data
        self.offset = 0

    def pump(self) -> bool:
        """Write what the pipe takes; True once everything is written (or failed) and closed."""
        while self.fd is not None:
            if self.offset >= len(self.data):
                self.close()
                break
            try:
                with memoryview(self.data) as view:
                    self.offset += os.write(self.fd, view[self.offset:])
            except BlockingIOError:
                return False
            except OSError as error:
                # Typically EPIPE: the child exited or closed its stdin.
                log.warning("qga: i/o error writing to input_data channel: %s", error.strerror)
                self.close()
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.data = b""


class ExecRecord:
    """One child started by guest-exec and what the host has not collected yet."""

    __slots__ = ("pid", "pidfd", "wait_status", "ended_at", "has_output",
                 "stdout", "stderr", "stdin")

    def __init__(self, pid: int, has_output: bool, stdout: OutputStream,
                 stderr: OutputStream, stdin: Optional[InputFeeder]):
        self.pid = pid
        self.pidfd: Optional[int] = None
        self.wait_status: Optional[int] = None
        self.ended_at: Optional[float] = None
        self.has_output = has_output
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin

    @property
    def exited(self) -> bool:
        if self.wait_status is None:
            return False
        return not self.has_output or (self.stdout.closed and self.stderr.closed)

    def reap(self) -> bool:
        """Collect the exit status if the child has ended; True once it has."""
        if self.wait_status is not None:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Reaped behind our back (nothing in the agent should do that).
            log.warning("guest-exec child %d was reaped elsewhere", self.pid)
            pid, status = self.pid, 0
        if pid == 0:
            return False
        self.wait_status = status
        self.ended_at = time.monotonic()
        return True

    def kept_bytes(self) -> int:
        return len(self.stdout.data) + len(self.stderr.data)

    def status_reply(self) -> dict:
        if not self.exited:
            return {"exited": False}
        reply = {}
        status = self.wait_status
        if os.WIFEXITED(status):
            reply["exitcode"] = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            reply["signal"] = os.WTERMSIG(status)
        for name, stream in (("out", self.stdout), ("err", self.stderr)):
            if stream.data:
                reply[f"{name}-data"] = base64_text(stream.data)
                reply[f"{name}-truncated"] = stream.truncated
        reply["exited"] = True
        return {key: reply[key] for key in _STATUS_ORDER if key in reply}

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()
        if self.stdin is not None:
            self.stdin.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


# -- finding the program --------------------------------------------------------------


def find_program(path: bytes, envp: Optional[List[bytes]]) -> Tuple[Optional[bytes], int]:
    """GLib's PATH search: ``(program, 0)`` or ``(None, errno)``.

    A name with a slash is used as is.  Otherwise each directory of the
    search path is tried; missing files and directories are skipped, a file
    that exists but cannot be executed is remembered as EACCES.
    """
    if not path:
        return None, errno.ENOENT
    if b"/" in path:
        return path, 0
    search = None
    if envp is not None:
        search = next((entry[5:] for entry in envp if entry.startswith(b"PATH=")), None)
    if search is None:
        search = os.environb.get(b"PATH", DEFAULT_SEARCH_PATH)
    saw_eacces = False
    last_error = errno.ENOENT
    for directory in search.split(b":"):
        # An empty element means the current directory.
        candidate = directory + b"/" + path if directory else path
        try:
            mode = os.stat(candidate).st_mode
        except OSError as error:
            if error.errno == errno.EACCES:
                saw_eacces = True
            elif error.errno not in _SEARCH_ON:
                return None, error.errno
            last_error = error.errno
            continue
        if not stat.S_ISREG(mode) or not os.access(candidate, os.X_OK):
            saw_eacces = True
            last_error = errno.EACCES
            continue
        return candidate, 0
    return None, errno.EACCES if saw_eacces else last_error


def environment(env: Optional[List[str]]):
    """The child's environment: the agent's, or exactly the ``env`` list given.

    A variable given twice keeps its first value (what ``getenv`` returns in
    the child of qemu-ga); entries without a name or ``=`` cannot be passed
    and are left out, as ``getenv`` ignores them anyway.
    """
    if env is None:
        return os.environb, None
    entries = [c_bytes(entry) for entry in env]
    variables: Dict[bytes, bytes] = {}
    for entry in entries:
        name, equals, value = entry.partition(b"=")
        if not name or not equals:
            log.debug("guest-exec: environment entry %r left out", entry)
            continue
        variables.setdefault(name, value)
    return variables, entries


# -- the table of children -------------------------------------------------------------


class ExecTable:
    """Children started by guest-exec, by pid (a service: ``ctx.service(ExecTable)``).

    Uses ``ctx.loop`` when there is one; without a loop (direct calls in
    tests) everything happens when guest-exec-status is asked.
    """

    def __init__(self, ctx):
        self._ctx = ctx
        self._loop = ctx.loop
        # A list per pid: a recycled pid must not hide an uncollected record
        # (qemu-ga answers with the oldest one first).
        self._records: Dict[int, List[ExecRecord]] = {}

    def __len__(self) -> int:
        return sum(len(records) for records in self._records.values())

    # -- guest-exec --------------------------------------------------------------

    def spawn(self, path: str, arg: Optional[List[str]] = None, env: Optional[List[str]] = None,
              input_data: Optional[str] = None,
              capture_output: Union[None, bool, str] = None) -> dict:
        data = decode_base64(input_data) if input_data is not None else None
        argv = [path] + list(arg or [])
        log.info('guest-exec called: "%s"', " ".join(argv))
        mode = capture_mode(capture_output)
        variables, envp = environment(env)
        program, error = find_program(c_bytes(path), envp)
        if program is None:
            raise spawn_failure(path, error)
        program = self._allowed(path, program)
        record = self._start(path, program, [c_bytes(item) for item in argv], variables,
                             mode, data)
        self._records.setdefault(record.pid, []).append(record)
        self._watch(record)
        self._sweep()
        return {"pid": record.pid}

    def _allowed(self, path: str, program: bytes) -> bytes:
        allowed = getattr(self._ctx.config, "exec_allow_programs", None) or []
        if not allowed:
            return program
        real = os.path.realpath(program)
        if real in {os.path.realpath(os.fsencode(item)) for item in allowed}:
            return real  # run what was checked, not what a symlink points to later
        log.warning("guest-exec of '%s' refused: %s is not in exec-allow-programs",
                    path, os.fsdecode(real))
        raise spawn_failure(path, errno.EACCES)

    def _start(self, path: str, program: bytes, argv: List[bytes], variables, mode: str,
               data: Optional[bytes]) -> ExecRecord:
        pipes: List[int] = []  # every fd we created, closed on failure

        def pipe() -> Tuple[int, int]:
            read_end, write_end = (_above_stdio(fd) for fd in os.pipe2(os.O_CLOEXEC))
            pipes.extend((read_end, write_end))
            return read_end, write_end

        # GLib closes every other descriptor in the child; ours are close-on-exec,
        # but descriptors the agent inherited (or made inheritable) are closed here.
        actions: list = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_descriptors()]
        stdin_write = stdout_read = stderr_read = None
        try:
            if data is not None:
                stdin_read, stdin_write = pipe()
                actions.append((os.POSIX_SPAWN_DUP2, stdin_read, 0))
            else:
                actions.append((os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0))
            if mode in ("stdout", "separated", "merged"):
                stdout_read, stdout_write = pipe()
                actions.append((os.POSIX_SPAWN_DUP2, stdout_write, 1))
            else:
                actions.append((os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0))
            if mode in ("stderr", "separated"):
                stderr_read, stderr_write = pipe()
                actions.append((os.POSIX_SPAWN_DUP2, stderr_write, 2))
            elif mode == "merged":
                actions.append((os.POSIX_SPAWN_DUP2, 1, 2))
            else:
                actions.append((os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0))
            pid = _spawn(path, program, argv, variables, actions)
        except BaseException:
            for fd in pipes:
                os.close(fd)
            raise
        parent_ends = {stdin_write, stdout_read, stderr_read}
        for fd in pipes:
            if fd in parent_ends:
                os.set_blocking(fd, False)
            else:
                os.close(fd)
        stdin = InputFeeder(stdin_write, data) if stdin_write is not None else None
        return ExecRecord(pid, mode != "none", OutputStream(stdout_read),
                          OutputStream(stderr_read), stdin)

    # -- watching through the loop -------------------------------------------------

    def _watch(self, record: ExecRecord) -> None:
        if record.stdin is not None and not record.stdin.pump() and self._loop is not None:
            fd = record.stdin.fd
            self._loop.add(fd, WRITE, lambda _events: self._on_input(record, fd))
        if self._loop is None:
            return
        for stream in (record.stdout, record.stderr):
            if stream.fd is not None:
                fd = stream.fd
                self._loop.add_reader(
                    fd, lambda _events, stream=stream, fd=fd: self._on_output(stream, fd))
        try:
            record.pidfd = os.pidfd_open(record.pid)
        except OSError:
            self._poll_exit_later(record)  # no pidfd (old kernel): look every 50 ms
            return
        self._loop.add_reader(record.pidfd, lambda _events: self._on_exit(record))

    def _on_input(self, record: ExecRecord, fd: int) -> None:
        if record.stdin is None or record.stdin.pump():
            self._loop.remove(fd)

    def _on_output(self, stream: OutputStream, fd: int) -> None:
        if stream.drain(READS_PER_EVENT):
            self._loop.remove(fd)

    def _on_exit(self, record: ExecRecord) -> None:
        if record.reap():
            self._after_exit(record)

    def _poll_exit_later(self, record: ExecRecord) -> None:
        def check() -> None:
            if record.wait_status is not None:
                return
            if record.reap():
                self._after_exit(record)
            else:
                self._loop.call_later(0.05, check)

        self._loop.call_later(0.05, check)

    def _after_exit(self, record: ExecRecord) -> None:
        """The child was reaped: stop watching its pidfd, plan the record's expiry."""
        log.debug("guest_exec_child_watch called, pid: %d, status: %d",
                  record.pid, record.wait_status)
        if record.pidfd is not None:
            if self._loop is not None:
                self._loop.remove(record.pidfd)
            os.close(record.pidfd)
            record.pidfd = None
        if self._loop is not None:
            self._loop.call_later(FINISHED_RECORD_TTL + 1.0, self._sweep)

    # -- guest-exec-status ---------------------------------------------------------

    def status(self, pid: int) -> dict:
        log.info("guest-exec-status called, pid: %u", pid & 0xFFFFFFFF)
        records = self._records.get(pid)
        if not records:
            raise CommandError(UNKNOWN_PID)
        record = records[0]
        self._refresh(record)
        if not record.exited:
            return {"exited": False}
        reply = record.status_reply()
        self._drop(record)
        return reply

    def _refresh(self, record: ExecRecord) -> None:
        """Bring the record up to date without blocking (the loop may not have run yet)."""
        if record.stdin is not None and record.stdin.fd is not None:
            fd = record.stdin.fd
            if record.stdin.pump() and self._loop is not None:
                self._loop.remove(fd)
        for stream in (record.stdout, record.stderr):
            fd = stream.fd
            if fd is not None and stream.drain(READS_PER_STATUS) and self._loop is not None:
                self._loop.remove(fd)
        if record.wait_status is None and record.reap():
            self._after_exit(record)

    def _drop(self, record: ExecRecord) -> None:
        records = self._records.get(record.pid, [])
        if record in records:
            records.remove(record)
        if not records:
            self._records.pop(record.pid, None)
        if self._loop is not None:
            for fd in (record.stdout.fd, record.stderr.fd, record.pidfd,
                       record.stdin.fd if record.stdin is not None else None):
                if fd is not None:
                    self._loop.remove(fd)
        record.close()

    # -- bounds --------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Drop finished records nobody collected (see the module docstring)."""
        finished = sorted((record for records in self._records.values() for record in records
                           if record.ended_at is not None), key=lambda record: record.ended_at)
        if not finished:
            return
        now = time.monotonic()
        kept_bytes = sum(record.kept_bytes() for record in finished)
        excess = len(finished) - MAX_FINISHED_RECORDS
        for record in finished:
            expired = now - record.ended_at > FINISHED_RECORD_TTL
            if not (expired or excess > 0 or kept_bytes > FINISHED_OUTPUT_BUDGET):
                break
            log.warning("guest-exec: dropping the uncollected status of pid %d", record.pid)
            kept_bytes -= record.kept_bytes()
            excess -= 1
            self._drop(record)

    def close(self) -> None:
        """Release pipes and pidfds (the agent is stopping); children keep running."""
        for records in list(self._records.values()):
            for record in list(records):
                record.reap()  # no zombie left behind for what already ended
                self._drop(record)


def _inheritable_descriptors() -> List[int]:
    """Our descriptors above 2 that a child would inherit."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    found = []
    for name in names:
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:
            pass  # the descriptor listdir itself used, closed by now
    return found


def _above_stdio(fd: int) -> int:
    """Keep our pipe ends off 0-2 (an agent started with closed stdio would get them)."""
    if fd > 2:
        return fd
    import fcntl  # only on this rare path

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


def _spawn(path: str, program: bytes, argv: List[bytes], variables, actions) -> int:
    """posix_spawn with GLib's fallback: a file the kernel cannot run goes to /bin/sh."""
    reset = (signal.SIGPIPE, signal.SIGXFSZ)
    try:
        return os.posix_spawn(program, argv, variables, file_actions=actions, setsigdef=reset)
    except OSError as error:
        if error.errno != errno.ENOEXEC:
            raise spawn_failure(path, error.errno) from None
    try:
        return os.posix_spawn(b"/bin/sh", [b"/bin/sh", program] + argv[1:], variables,
                              file_actions=actions, setsigdef=reset)
    except OSError as error:
        raise spawn_failure(path, error.errno) from None


# -- the commands ---------------------------------------------------------------------


@command("guest-exec")
def guest_exec(ctx, path: str, arg: Optional[List[str]] = None,
               env: Optional[List[str]] = None, input_data: Optional[str] = None,
               capture_output: Union[None, bool, str] = None) -> dict:
    return ctx.service(ExecTable).spawn(path, arg, env, input_data, capture_output)


@command("guest-exec-status")
def guest_exec_status(ctx, pid: int) -> dict:
    return ctx.service(ExecTable).status(pid)
