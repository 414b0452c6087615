"""The state directory: the file-handle counter, the frozen marker, atomic writes.

qemu-ga keeps two things in its state directory (``-t``, default ``/var/run``)
and we keep them in the same files, so an agent can replace qemu-ga (or be
replaced by it) without handles being reused:

``qga.state``
    A GLib key file, ``[global]\\nfd_counter=N\\n``: the number the next
    ``guest-file-open`` hands out.  It is rewritten (atomically) on every open,
    before the handle is returned, so handles are never reused across
    restarts.  We read it with GLib's rules: a missing key means 1000, a value
    ``g_key_file_get_integer`` rejects means 0, a file GLib cannot parse stops
    the agent.

``qga.state.isfrozen``
    An empty file that exists while filesystems are frozen.  If it exists at
    start-up the agent starts frozen and does not create ``qga.state``.
    The dispatcher asks :meth:`StateDir.is_frozen` on every request, so the
    flag is cached in memory and the file is touched only on changes.

:func:`atomic_write` is the one way the project writes a state file: a
temporary file in the same directory, fsync, rename.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

from qga.errors import StateError

log = logging.getLogger(__name__)

COUNTER_FILE = "qga.state"
FROZEN_MARKER = "qga.state.isfrozen"
DEFAULT_FD_COUNTER = 1000

# The counter file is written the way g_file_set_contents() writes it: mode
# 0666 filtered by the umask (0644 with the usual umask), like qemu-ga's.
COUNTER_FILE_MODE = 0o666

_INT32_MIN = -(2 ** 31)
_INT32_MAX = 2 ** 31 - 1
_INT64_MAX = 2 ** 63 - 1

# strtol(): optional leading whitespace, an optional sign, decimal digits.
_STRTOL = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_ASCII_SPACE = " \t\n\v\f\r"
# A group line: "[name]", only blanks may follow the bracket.
_GROUP_LINE = re.compile(r"\[([^\]]*)\][ \t]*$")


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file.

    The data goes to a new file in the same directory (created with ``mode``,
    which the umask may restrict further), is fsync'ed, then renamed over
    ``path``.  On failure the temporary file is removed, ``path`` is left as it
    was, and :class:`StateError` is raised (the ``OSError`` is its cause).
    """
    directory, name = os.path.split(os.fspath(path))
    temp_fd, temp_path = _create_temporary(directory or ".", name, mode)
    try:
        try:
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.write(temp_fd, view[written:])
            os.fsync(temp_fd)
        finally:
            os.close(temp_fd)
        os.rename(temp_path, path)
    except OSError as error:
        _unlink_quietly(temp_path)
        raise StateError(f"cannot write {path}: {error.strerror or error}") from error


def _create_temporary(directory: str, name: str, mode: int):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        # Same shape as GLib's temporary name (qga.state.XXXXXX).
        temp_path = os.path.join(directory, f"{name}.{os.urandom(3).hex()}")
        try:
            return os.open(temp_path, flags, mode), temp_path
        except FileExistsError:
            continue
        except OSError as error:
            raise StateError(f"cannot write {os.path.join(directory, name)}: "
                             f"{error.strerror or error}") from error
    raise StateError(f"cannot create a temporary file in {directory}")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class StateDir:
    """The agent's state directory: persistent handle counter and frozen marker.

    ``StateDir(path)`` checks the frozen marker, then loads ``qga.state``
    (creating it with 1000 when it is missing, unless the agent starts frozen
    or ``create_counter`` is false).  Raises :class:`StateError` when the
    directory or the files in it cannot be used, as qemu-ga refuses to start.
    """

    def __init__(self, path: str, create_counter: bool = True):
        self.path = os.fspath(path)
        self.counter_path = os.path.join(self.path, COUNTER_FILE)
        self.frozen_marker_path = os.path.join(self.path, FROZEN_MARKER)
        self._frozen = self._marker_exists()
        self._fd_counter = self._load_counter(create=create_counter and not self._frozen)

    # -- the handle counter ------------------------------------------------------

    def next_handle(self) -> int:
        """Hand out the next file handle and persist the counter after it.

        Like qemu-ga, the number is consumed even when the write fails: the
        next call hands out the following one.
        """
        handle = self._fd_counter
        self._fd_counter += 1
        if self._fd_counter >= _INT64_MAX:
            # qemu-ga aborts here; 2**63 opens will not happen in practice.
            raise StateError("file handle counter exhausted")
        self._write_counter()
        return handle

    @property
    def fd_counter(self) -> int:
        """The number the next :meth:`next_handle` call returns."""
        return self._fd_counter

    def _write_counter(self) -> None:
        data = f"[global]\nfd_counter={self._fd_counter}\n".encode("ascii")
        atomic_write(self.counter_path, data, COUNTER_FILE_MODE)

    def _load_counter(self, create: bool) -> int:
        try:
            with open(self.counter_path, "rb") as stream:
                raw = stream.read()
        except FileNotFoundError:
            if create:
                self._fd_counter = DEFAULT_FD_COUNTER
                try:
                    self._write_counter()
                except StateError as error:
                    raise StateError(f"unable to create state file at path "
                                     f"{self.counter_path}: {error}") from error
            return DEFAULT_FD_COUNTER
        except OSError as error:
            raise StateError(f"unable to access state file at path {self.counter_path}: "
                             f"{error.strerror or error}") from error
        value = parse_key_file(raw, self.counter_path).get(("global", "fd_counter"))
        if value is None:
            return DEFAULT_FD_COUNTER
        return glib_integer(value)

    # -- frozen state -------------------------------------------------------------

    def is_frozen(self) -> bool:
        return self._frozen

    def set_frozen(self, frozen: bool) -> None:
        """Enter or leave frozen state: create or remove the marker file.

        qemu-ga only warns when the marker cannot be written (the freeze
        itself goes on), and so do we.
        """
        if frozen == self._frozen:
            return
        self._frozen = frozen
        if frozen:
            try:
                fd = os.open(self.frozen_marker_path,
                             os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                os.close(fd)
            except OSError as error:
                log.warning("unable to create %s, fsfreeze may not function properly: %s",
                            self.frozen_marker_path, error.strerror)
        else:
            try:
                os.unlink(self.frozen_marker_path)
            except OSError as error:
                log.warning("unable to delete %s, fsfreeze may not function properly: %s",
                            self.frozen_marker_path, error.strerror)

    def _marker_exists(self) -> bool:
        try:
            os.stat(self.frozen_marker_path)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise StateError(f"unable to access state file at path "
                             f"{self.frozen_marker_path}: {error.strerror}") from error
        log.warning("previous instance appears to have exited with frozen filesystems. "
                    "deferring logging/pidfile creation and disabling non-fsfreeze-safe "
                    "commands until guest-fsfreeze-thaw is issued, or filesystems are "
                    "manually unfrozen and the file %s is removed", self.frozen_marker_path)
        return True


# -- GLib key file reading ---------------------------------------------------------


def parse_key_file(raw: bytes, where: str = "key file") -> dict:
    """Parse a GLib key file into ``{(group, key): raw value}``.

    Follows ``g_key_file_load_from_data`` closely enough to accept what it
    accepts and reject what it rejects for the files a state directory holds:
    comments and blank lines are skipped, a later duplicate key wins, a group
    may be reopened, anything else that is not ``[group]`` or ``key=value``
    (or a key before the first group) is an error.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise StateError(f"error loading persistent state from path: {where}, "
                         f"invalid UTF-8") from error
    values = {}
    group: Optional[str] = None
    for line in text.split("\n"):
        if line.endswith("\r"):
            line = line[:-1]  # GLib reads CRLF files too
        stripped = line.lstrip(_ASCII_SPACE)
        if not stripped or stripped.startswith("#"):
            continue
        group_line = _GROUP_LINE.match(stripped)
        if group_line:
            group = _group_name(group_line.group(1), where)
            continue
        if "=" not in stripped or stripped.startswith("="):
            raise StateError(f"error loading persistent state from path: {where}, "
                             f"line {line!r} is not a key-value pair, group, or comment")
        if group is None:
            raise StateError(f"error loading persistent state from path: {where}, "
                             "key file does not start with a group")
        key, _, value = stripped.partition("=")
        key = key.rstrip(_ASCII_SPACE)
        if not _is_key_name(key):
            raise StateError(f"error loading persistent state from path: {where}, "
                             f"invalid key name: {key!r}")
        values[(group, key)] = value.lstrip(_ASCII_SPACE)
    return values


def _group_name(name: str, where: str) -> str:
    if not name or any(c == "[" or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise StateError(f"error loading persistent state from path: {where}, "
                         f"invalid group name: {name!r}")
    return name


def _is_key_name(key: str) -> bool:
    if not key or key[0] == " " or key[-1] == " ":
        return False
    if "[" in key:
        # A localized key, key[locale]: the bracket must close the name.
        return key.endswith("]") and key.index("[") > 0 and "]" not in key[:-1]
    return "]" not in key


def glib_integer(value: str) -> int:
    """``g_key_file_get_integer``'s reading of a value; 0 where GLib reports an error."""
    match = _STRTOL.match(value)
    end = match.end() if match else 0
    if not value or (end < len(value) and value[end] not in _ASCII_SPACE):
        return 0
    if match is None:
        return 0  # strtol converted nothing (whitespace only): GLib takes its 0
    number = int(match.group().strip(_ASCII_SPACE))
    if not _INT32_MIN <= number <= _INT32_MAX:
        return 0  # "Integer value out of range"
    return number
