"""guest-file-open/close/read/write/seek/flush, as qemu-ga does them.

qemu-ga wraps every guest file in a stdio ``FILE``.  We use raw file
descriptors (``os.read``/``os.write``/``os.lseek``) for speed and keep a small
model of what the host can see of stdio:

* ``eof`` of a read is true when a ``read()`` returned 0 before ``count``
  bytes came (stdio's ``feof`` right after ``fread``; qemu-ga clears the flag
  after every call, so it never carries over); writes and seeks report false.
* A read loops until ``count`` bytes, end of file or an error, like ``fread``;
  on a non-blocking pipe with too little data that is an error
  (``Resource temporarily unavailable``) and the bytes read are lost, as in
  qemu-ga.
* Switching from reading to writing does ``lseek(fd, 0, SEEK_CUR)`` first (the
  ``fseek`` qemu-ga does), so it fails on pipes exactly when qemu-ga's does.
  Writes are not buffered: data reaches the file at once, which is only
  visible as "earlier than qemu-ga" to another reader.

Handles come from the persistent counter of :class:`qga.state.StateDir`.

Our own policy addition: ``config.file_allow_dirs``.  When it is not empty,
``guest-file-open`` only opens files whose real path lies inside one of those
directories.  The path is resolved, then opened component by component from
the allowed directory with ``O_NOFOLLOW``, so a symlink swapped in after the
check cannot lead outside.  A refusal looks like ``EACCES`` to the host.
"""

from __future__ import annotations

import binascii
import errno
import logging
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple, Union

from qga.commands import command
from qga.errors import CommandError, StateError
from qga.protocol import AsciiText

log = logging.getLogger(__name__)

READ_COUNT_DEFAULT = 4096
# 48 MiB: its base64 (64 MiB) is what qemu's JSON parser accepts as one token.
READ_COUNT_MAX = 48 * 1024 * 1024
NEW_FILE_MODE = 0o666

# qemu-ga's table (POSIX fopen modes); anything else is refused.
OPEN_MODES: Dict[str, int] = {
    "r": os.O_RDONLY,
    "rb": os.O_RDONLY,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "r+": os.O_RDWR,
    "rb+": os.O_RDWR,
    "r+b": os.O_RDWR,
    "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "wb+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "w+b": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    "ab+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    "a+b": os.O_RDWR | os.O_CREAT | os.O_APPEND,
}
# Non-blocking so that a FIFO cannot hang the agent; no controlling tty.
ALWAYS_FLAGS = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC

WHENCE_NAMES = {"set": os.SEEK_SET, "cur": os.SEEK_CUR, "end": os.SEEK_END}
# QGA_SEEK_SET/CUR/END are 0/1/2 on the wire whatever the guest's values are.
WHENCE_CODES = {0: os.SEEK_SET, 1: os.SEEK_CUR, 2: os.SEEK_END}

# What the last operation on a handle was (qemu-ga's RwState).
NEW, READING, WRITING = 0, 1, 2


def c_bytes(text: str) -> bytes:
    """The bytes qemu's C code passes to the kernel for a JSON string.

    qemu's JSON parser stores U+0000 as the overlong ``C0 80`` (its strings
    are NUL-terminated), so a NUL in a path reaches ``open()`` as those two
    bytes rather than cutting the path short.
    """
    return os.fsencode(text).replace(b"\0", b"\xc0\x80")


def _strerror(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


# -- base64 as qemu decodes it ------------------------------------------------------

_BASE64_VALID = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n"
_STRICT_BASE64 = sys.version_info >= (3, 11)


def decode_base64(text: str) -> bytes:
    """Decode like qemu's ``qbase64_decode``: a strict alphabet, GLib's lenient decoder.

    The alphabet is ``A-Za-z0-9+/=`` plus ``\\n``; anything else is an error.
    The decoder then reads groups of four characters (``\\n`` skipped, ``=``
    worth 0), drops the second and third byte of a group whose third and
    fourth character is ``=``, and ignores an incomplete last group.
    """
    if _STRICT_BASE64:
        try:
            # Canonical base64 (the common case) decodes the same either way,
            # without copying the (possibly 64 MiB) string.
            return binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError):
            pass
    return _decode_base64_like_glib(text)


def _decode_base64_like_glib(text: str) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise CommandError("Base64 data contains invalid characters") from None
    if raw.translate(None, _BASE64_VALID):
        raise CommandError("Base64 data contains invalid characters")
    if b"\n" in raw:
        raw = raw.replace(b"\n", b"")
    raw = raw[: len(raw) // 4 * 4]
    if b"=" not in raw:
        return binascii.a2b_base64(raw)
    decoded = binascii.a2b_base64(raw.replace(b"=", b"A"))
    dropped = []
    position = raw.find(b"=")
    while position >= 0:
        group, offset = divmod(position, 4)
        if offset >= 2:
            # A '=' third drops the group's second byte, fourth its third.
            dropped.append(group * 3 + offset - 1)
        position = raw.find(b"=", position + 1)
    return _without_positions(decoded, dropped)


def _without_positions(data: bytes, positions: List[int]) -> bytes:
    pieces = []
    start = 0
    for position in positions:
        pieces.append(data[start:position])
        start = position + 1
    pieces.append(data[start:])
    return b"".join(pieces)


# -- one open file ------------------------------------------------------------------


class GuestFile:
    """An open guest file: its descriptor and what was done with it last."""

    __slots__ = ("handle", "fd", "state")

    def __init__(self, handle: int, fd: int):
        self.handle = handle
        self.fd = fd
        self.state = NEW

    def read(self, count: int) -> dict:
        # Switching from writing: qemu-ga flushes stdio; our writes are not buffered.
        # A failed read leaves the state as it was, as in qemu-ga.
        pieces, eof = self._read_pieces(count) if count else ([], False)
        self.state = READING
        if not pieces:
            return {"count": 0, "buf-b64": "", "eof": eof}
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        del pieces[:]
        return {"count": len(data), "buf-b64": base64_text(data), "eof": eof}

    def _read_pieces(self, count: int) -> Tuple[List[bytes], bool]:
        """``fread``: read until ``count`` bytes, end of file (eof true) or an error.

        ``os.read`` allocates ``count`` bytes without touching them and gives
        back what it does not fill, so a big count on a small file costs no
        memory; a regular file needs one read, or two at its end.
        """
        pieces: List[bytes] = []
        wanted = count
        while wanted:
            try:
                piece = os.read(self.fd, wanted)
            except OSError as error:
                raise CommandError(f"failed to read file: {_strerror(error)}") from None
            if not piece:
                return pieces, True
            pieces.append(piece)
            wanted -= len(piece)
        return pieces, False

    def write(self, buf_b64: str, count: Optional[int]) -> dict:
        if self.state == READING:
            # qemu-ga's fseek(fh, 0, SEEK_CUR) when switching to writing.
            try:
                os.lseek(self.fd, 0, os.SEEK_CUR)
            except OSError as error:
                raise CommandError(f"failed to seek file: {_strerror(error)}") from None
            self.state = NEW
        data = decode_base64(buf_b64)
        if count is None:
            count = len(data)
        elif count < 0 or count > len(data):
            raise CommandError(f"value '{count}' is invalid for argument count")
        if count:
            self._write_all(data, count)
        self.state = WRITING
        return {"count": count, "eof": False}

    def _write_all(self, data: bytes, count: int) -> None:
        written = 0
        with memoryview(data) as view:
            while written < count:
                try:
                    written += os.write(self.fd, view[written:count])
                except OSError as error:
                    log.info("guest-file-write failed, handle: %d", self.handle)
                    raise CommandError(f"failed to write to file: {_strerror(error)}") from None

    def seek(self, offset: int, whence: Union[int, str]) -> dict:
        if isinstance(whence, str):
            code = WHENCE_NAMES.get(whence)
            if code is None:  # the schema's enum normally stops this earlier
                raise CommandError(f"Parameter 'whence' does not accept value '{whence}'")
        else:
            code = WHENCE_CODES.get(whence)
            if code is None:
                raise CommandError(f"invalid whence code {whence}")
        try:
            position = os.lseek(self.fd, offset, code)
        except OSError as error:
            if error.errno == errno.ESPIPE:  # stdio would not be buffering anyway
                self.state = NEW
            raise CommandError(f"failed to seek file: {_strerror(error)}") from None
        self.state = NEW
        return {"eof": False, "position": position}

    def flush(self) -> None:
        # Nothing is buffered; what stays is qemu-ga's state change.
        self.state = NEW

    def close(self) -> None:
        os.close(self.fd)


def base64_text(data) -> bytes:
    """Base64 of ``data`` (bytes or bytearray) as :class:`AsciiText`, freeing ``data`` early.

    A bytearray is emptied, and the caller is expected to drop its bytes,
    before the encoded text is copied into its AsciiText, so at most two of
    the three big objects live at once.
    """
    encoded = binascii.b2a_base64(data, newline=False)
    if isinstance(data, bytearray):
        del data[:]
    del data
    return AsciiText(encoded)


# -- the table of open files -----------------------------------------------------------


Opener = Callable[[int, int], int]


class FileTable:
    """The agent's open guest files, by handle (a service: ``ctx.service(FileTable)``)."""

    def __init__(self, ctx):
        self._ctx = ctx
        self._files: Dict[int, GuestFile] = {}

    def __len__(self) -> int:
        return len(self._files)

    def get(self, handle: int) -> GuestFile:
        guest_file = self._files.get(handle)
        if guest_file is None:
            raise CommandError(f"handle '{handle}' has not been found")
        return guest_file

    def open(self, path: str, mode: str) -> int:
        log.info("guest-file-open called, filepath: %s, mode: %s", path, mode)
        flags = OPEN_MODES.get(mode)
        if flags is None:
            raise CommandError(f"invalid file open mode '{mode}'")
        opener = self._opener_for(path, mode)
        fd = _open_or_create(path, mode, flags | ALWAYS_FLAGS, opener)
        try:
            handle = self._ctx.state.next_handle()
        except StateError as error:
            os.close(fd)
            log.error("%s", error)
            raise CommandError("failed to commit persistent state to disk") from None
        if handle < 0:
            # qemu-ga treats a negative counter value as a failure without an
            # error: it closes the file and answers -1.
            os.close(fd)
            return -1
        self._files[handle] = GuestFile(handle, fd)
        log.info("guest-file-open, handle: %d", handle)
        return handle

    def close_handle(self, handle: int) -> None:
        log.info("guest-file-close called, handle: %d", handle)
        guest_file = self.get(handle)
        del self._files[handle]
        try:
            guest_file.close()
        except OSError as error:
            raise CommandError(f"failed to close handle: {_strerror(error)}") from None

    def close(self) -> None:
        """Close every open file (the agent is stopping)."""
        files, self._files = self._files, {}
        for guest_file in files.values():
            try:
                guest_file.close()
            except OSError:
                pass

    # -- the file-allow-dirs policy --------------------------------------------------

    def _opener_for(self, path: str, mode: str) -> Opener:
        target = c_bytes(path)
        allowed = getattr(self._ctx.config, "file_allow_dirs", None) or []
        if not allowed or not target:
            return _plain_opener(target)
        resolved = os.path.realpath(target)
        for directory in allowed:
            root = os.path.realpath(os.fsencode(directory))
            inside = _relative_parts(resolved, root)
            if inside is not None:
                return _beneath_opener(root, inside)
        log.warning("guest-file-open of '%s' (mode: '%s') refused: it resolves to '%s', "
                    "outside file-allow-dirs", path, mode, os.fsdecode(resolved))
        raise CommandError(f"failed to open file '{path}' (mode: '{mode}'): "
                           f"{os.strerror(errno.EACCES)}")  # what hosts already handle


def _relative_parts(resolved: bytes, root: bytes) -> Optional[List[bytes]]:
    """The components of ``resolved`` below ``root``, or None if it is not inside."""
    if resolved == root:
        return []
    prefix = root if root.endswith(b"/") else root + b"/"
    if not resolved.startswith(prefix):
        return None
    return resolved[len(prefix):].split(b"/")


def _plain_opener(path: bytes) -> Opener:
    def open_plain(flags: int, mode: int) -> int:
        return os.open(path, flags, mode)

    return open_plain


def _beneath_opener(root: bytes, parts: List[bytes]) -> Opener:
    """Open ``root/parts...`` without following any symlink on the way."""
    directory_flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

    def open_beneath(flags: int, mode: int) -> int:
        directory = os.open(root, directory_flags)
        try:
            for part in parts[:-1]:
                inner = os.open(part, directory_flags | os.O_NOFOLLOW, dir_fd=directory)
                os.close(directory)
                directory = inner
            last = parts[-1] if parts else b"."
            return os.open(last, flags | os.O_NOFOLLOW, mode, dir_fd=directory)
        finally:
            os.close(directory)

    return open_beneath


def _open_or_create(path: str, mode: str, flags: int, opener: Opener) -> int:
    """qemu-ga's safe_open_or_create: new files get 0666 whatever the umask.

    A creating open is tried with O_EXCL first; if the file exists it is
    opened without O_CREAT and its mode is left alone.
    """
    creating = bool(flags & os.O_CREAT)
    try:
        try:
            fd = opener(flags | (os.O_EXCL if creating else 0), 0)
        except FileExistsError:
            if not creating:
                raise
            creating = False
            fd = opener(flags & ~os.O_CREAT, 0)
    except OSError as error:
        raise CommandError(f"failed to open file '{path}' (mode: '{mode}'): "
                           f"{_strerror(error)}") from None
    if creating:
        try:
            os.fchmod(fd, NEW_FILE_MODE)
        except OSError as error:
            os.close(fd)
            _unlink_quietly(c_bytes(path))
            raise CommandError(f"failed to set permission 0{NEW_FILE_MODE:03o} on new file "
                               f"'{path}' (mode: '{mode}'): {_strerror(error)}") from None
    return fd


def _unlink_quietly(path: bytes) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- the commands ---------------------------------------------------------------------


@command("guest-file-open")
def file_open(ctx, path: str, mode: str = "r") -> int:
    return ctx.service(FileTable).open(path, mode)


@command("guest-file-close")
def file_close(ctx, handle: int) -> None:
    ctx.service(FileTable).close_handle(handle)


@command("guest-file-read")
def file_read(ctx, handle: int, count: Optional[int] = None) -> dict:
    guest_file = ctx.service(FileTable).get(handle)
    if count is None:
        count = READ_COUNT_DEFAULT
    elif count < 0 or count > READ_COUNT_MAX:
        raise CommandError(f"value '{count}' is invalid for argument count")
    return guest_file.read(count)


@command("guest-file-write")
def file_write(ctx, handle: int, buf_b64: str, count: Optional[int] = None) -> dict:
    return ctx.service(FileTable).get(handle).write(buf_b64, count)


@command("guest-file-seek")
def file_seek(ctx, handle: int, offset: int, whence: Union[int, str]) -> dict:
    return ctx.service(FileTable).get(handle).seek(offset, whence)


@command("guest-file-flush")
def file_flush(ctx, handle: int) -> None:
    ctx.service(FileTable).get(handle).flush()
