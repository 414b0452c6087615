"""Logging the way qemu-ga logs.

Every module logs through :mod:`logging` under the ``qga`` logger
(``logging.getLogger(__name__)``).  :func:`setup_logging` makes those records
look like qemu-ga's::

    1700000000.123456: critical: error opening channel '/dev/ttyS0': No such file or directory

* One line per message, ``<unix seconds>.<microseconds>: <level>: <message>``,
  appended to the ``-l`` file or written to stderr.  The microseconds have six
  digits (qemu-ga 8.x and later; 7.2 printed them without leading zeros).
* Level names are GLib's.  qemu-ga reports its failures as ``critical``, so
  use ``log.critical`` for those; ``error`` exists too, and :data:`MESSAGE`
  is GLib's level between warning and info.
* Without ``-v`` only ``critical`` and ``error`` are written; with ``-v``
  everything down to ``debug``.
* When stderr is systemd's journal stream (``$JOURNAL_STREAM`` names the same
  file as fd 2) each line starts with its syslog priority, ``<2>`` for
  critical and so on, so journald files it at the right level.
* While filesystems are frozen nothing is written anywhere: the log file may
  live on a frozen filesystem and a write would block the agent.  A log file
  that could not be opened at start-up because the agent started frozen is
  opened on the first message after the thaw (stderr if that fails), as in
  qemu-ga.

:func:`audit` sends qemu-ga's audit lines ("guest-ping called", file paths,
exec argv) to syslog at LOG_INFO with the ``info: `` prefix, whatever the
verbosity, and also not while frozen.

:func:`glib_message` prints the messages qemu-ga prints before its log
handler exists (bad configuration, missing channel path) in GLib's default
format, ``\\n** (process:PID): CRITICAL **: HH:MM:SS.mmm: message``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Optional, TextIO

MESSAGE = 25  # GLib's G_LOG_LEVEL_MESSAGE, between warning and info

LOGGER_NAME = "qga"
AUDIT_LOGGER_NAME = "qga.audit"

_LEVELS = (  # threshold, GLib name, syslog priority
    (logging.CRITICAL, "critical", 2),
    (logging.ERROR, "error", 3),
    (logging.WARNING, "warning", 4),
    (MESSAGE, "message", 5),
    (logging.INFO, "info", 6),
    (logging.DEBUG, "debug", 7),
)


def glib_level(levelno: int) -> tuple:
    """(GLib level name, syslog priority) of a :mod:`logging` level."""
    for threshold, name, priority in _LEVELS:
        if levelno >= threshold:
            return name, priority
    return "debug", 7


def format_line(created: float, levelno: int, message: str) -> str:
    micros = int(round(created * 1_000_000))
    seconds, micros = divmod(micros, 1_000_000)
    return f"{seconds}.{micros:06d}: {glib_level(levelno)[0]}: {message}"


class QgaFormatter(logging.Formatter):
    """qemu-ga's line format, optionally with journald priority prefixes."""

    def __init__(self, journal: bool = False):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        line = format_line(record.created, record.levelno, message)
        if self.journal:
            prefix = f"<{glib_level(record.levelno)[1]}>"
            line = "\n".join(prefix + part for part in line.split("\n"))
        return line


class FrozenFilter(logging.Filter):
    """Drops every record while ``is_frozen()`` is true."""

    def __init__(self, is_frozen: Callable[[], bool]):
        super().__init__()
        self.is_frozen = is_frozen

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.is_frozen()


class LogFileHandler(logging.StreamHandler):
    """Appends to the ``-l`` file, opened now or, if frozen, after the thaw."""

    def __init__(self, path: str, open_now: bool):
        super().__init__(sys.stderr)
        self.path = path
        self.opened = False
        if open_now:
            self.stream = open_log_file(path)
            self.opened = True

    def emit(self, record: logging.LogRecord) -> None:
        if not self.opened:
            self.opened = True
            try:
                self.stream = open_log_file(self.path)
            except OSError:
                self.stream = sys.stderr  # qemu-ga falls back the same way
        super().emit(record)

    def close(self) -> None:
        try:
            if self.opened and self.stream not in (sys.stderr, None):
                self.stream.close()
        finally:
            super().close()


def open_log_file(path: str) -> TextIO:
    """fopen(path, "a") with close-on-exec, line-buffered."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")


class SyslogHandler(logging.Handler):
    """qemu-ga's audit channel: ``syslog(LOG_INFO, "info: %s")``, made cheap.

    qemu-ga writes an audit line for every command, so a host that pipelines
    requests pays one syslog call per request.  This handler formats the
    datagram glibc's ``syslog()`` would send (``<14>Mmm dd hh:mm:ss qemu-ga:
    info: ...``) and sends it on a socket it keeps connected, instead of
    glibc's reconnect-per-call when no syslog daemon listens; without a
    daemon it retries the connection at most every :attr:`RECONNECT_DELAY`
    seconds.

    Identical consecutive lines within :attr:`REPEAT_WINDOW` seconds are
    counted, not sent, and reported as "last message repeated N times" when a
    different line comes, when the window has passed, or at close, as syslog
    daemons do: a host flooding one command cannot flood the guest's log.
    """

    RECONNECT_DELAY = 10.0
    REPEAT_WINDOW = 30.0

    def __init__(self, is_frozen: Callable[[], bool] = lambda: False, ident: str = "qemu-ga",
                 address: str = "/dev/log", clock: Callable[[], float] = time.time):
        super().__init__(logging.INFO)
        self.is_frozen = is_frozen  # nothing is written while frozen
        self.ident = ident
        self.address = address
        self._clock = clock
        self._socket = None
        self._next_connect = 0.0
        self._last: Optional[str] = None
        self._last_sent = 0.0
        self._repeats = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_audit(record.getMessage(), glib_level(record.levelno)[0])
        except Exception:  # noqa: BLE001 - logging must never break the agent
            self.handleError(record)

    def write_audit(self, message: str, level: str = "info") -> None:
        """Send one audit line (the fast path :func:`audit` uses)."""
        if self.is_frozen():
            return
        line = f"{level}: {message}"
        now = self._clock()
        if line == self._last and now - self._last_sent < self.REPEAT_WINDOW:
            self._repeats += 1
            return
        self._report_repeats(now)
        self._send(line, now)
        self._last = line
        self._last_sent = now

    def _report_repeats(self, now: float) -> None:
        if self._repeats:
            self._send(f"last message repeated {self._repeats} times", now)
            self._repeats = 0

    def _send(self, line: str, now: float) -> None:
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(now))
        datagram = f"<14>{stamp} {self.ident}: {line}".encode("utf-8", "backslashreplace")
        sock = self._connected(now)
        if sock is None:
            return
        try:
            sock.send(datagram)
        except OSError:
            sock.close()  # the daemon went away: reconnect on a later line
            self._socket = None

    def _connected(self, now: float):
        if self._socket is None and now >= self._next_connect:
            import socket

            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                self._next_connect = now + self.RECONNECT_DELAY
                return None
            sock.setblocking(False)  # a stuck daemon must not stop the agent
            self._socket = sock
        return self._socket

    def close(self) -> None:
        if not self.is_frozen():
            self._report_repeats(self._clock())
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        super().close()


class LoggingSetup:
    """What :func:`setup_logging` installed; ``close()`` removes it again."""

    def __init__(self, handler: logging.Handler, audit_handler: Optional[logging.Handler]):
        self.handler = handler
        self.audit_handler = audit_handler
        self._logger = logging.getLogger(LOGGER_NAME)
        self._audit = logging.getLogger(AUDIT_LOGGER_NAME)
        self._saved = (self._logger.level, self._logger.propagate, self._audit.propagate)

    def close(self) -> None:
        self._logger.removeHandler(self.handler)
        self.handler.close()
        if self.audit_handler is not None:
            self._audit.removeHandler(self.audit_handler)
            self.audit_handler.close()
        level, propagate, audit_propagate = self._saved
        self._logger.setLevel(level)
        self._logger.propagate = propagate
        self._audit.propagate = audit_propagate


def setup_logging(config, is_frozen: Callable[[], bool], use_syslog: bool = True) -> LoggingSetup:
    """Send the ``qga`` loggers' records where qemu-ga sends its messages.

    ``config`` supplies ``logfile`` (None = stderr) and ``verbose``.  Raises
    :class:`~qga.errors.ConfigError` with qemu-ga's message when the log file
    cannot be opened.
    """
    logging.addLevelName(MESSAGE, "MESSAGE")
    frozen_filter = FrozenFilter(is_frozen)
    if config.logfile:
        try:
            handler: logging.Handler = LogFileHandler(config.logfile, open_now=not is_frozen())
        except OSError as error:
            from qga.errors import ConfigError

            raise ConfigError(f"unable to open specified log file: {os.strerror(error.errno)}") from None
        journal = False
    else:
        handler = logging.StreamHandler(sys.stderr)
        journal = stderr_is_journal()
    handler.setFormatter(QgaFormatter(journal))
    handler.addFilter(frozen_filter)

    audit_handler = None
    if use_syslog:
        audit_handler = SyslogHandler(is_frozen)

    setup = LoggingSetup(handler, audit_handler)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG if config.verbose else logging.ERROR)
    logger.propagate = False
    logger.addHandler(handler)
    audit_logger = logging.getLogger(AUDIT_LOGGER_NAME)
    audit_logger.propagate = False  # audit lines go to syslog only
    # The audit logger has its own level: -v does not change what syslog gets.
    audit_logger.setLevel(logging.INFO)
    if audit_handler is not None:
        audit_logger.addHandler(audit_handler)
    return setup


_AUDIT_LOGGER = logging.getLogger(AUDIT_LOGGER_NAME)


def audit(message: str) -> None:
    """One of qemu-ga's audit lines (syslog LOG_INFO, "info: " prefix).

    It runs for every command, so it skips building a LogRecord when the
    handler has a fast path.
    """
    logger = _AUDIT_LOGGER
    if logger.propagate:
        logger.info(message)  # not set up by setup_logging (tests): plain logging
        return
    for handler in logger.handlers:
        write = getattr(handler, "write_audit", None)
        if write is None:
            handler.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, message, None, None))
        else:
            write(message)


def stderr_is_journal() -> bool:
    """True when fd 2 is the stream systemd connected to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        info = os.fstat(2)
        return (int(device), int(inode)) == (info.st_dev, info.st_ino)
    except (ValueError, OSError):
        return False


def glib_message(level: str, message: str, stream: Optional[TextIO] = None) -> None:
    """Print ``message`` as GLib's default handler does (qemu-ga before its own).

    GLib converts the text to the C locale's charset, so every non-ASCII
    character becomes ``?``, and escapes control characters.
    """
    now = time.time()
    clock = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
    text = "".join(_glib_char(char) for char in message)
    out = sys.stderr if stream is None else stream
    out.write(f"\n** (process:{os.getpid()}): {level.upper()} **: {clock}: {text}\n")
    out.flush()


def _glib_char(char: str) -> str:
    if char in "\n\t":
        return char
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        return f"\\u{code:04x}"
    return char if code < 0x80 else "?"
