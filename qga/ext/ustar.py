"""A strict reader and a reproducible writer for POSIX ustar archives, optionally gzipped.

Bundles are tar archives, and this module is the whole of our tar: the
format only, no policy (what a bundle may contain is :mod:`qga.ext.bundle`'s
business).  We read with our own ~200 lines instead of :mod:`tarfile`
because tarfile is lenient by design: it follows pax and GNU extension
headers that override a member's path, size or link target, skips bad
blocks, tolerates several header dialects.  Every one of those is a way to
make two readers see two different archives.  Here one byte sequence has
exactly one meaning or is refused:

* 512-byte blocks; every header has ``ustar\\0`` ``00`` magic (POSIX), a
  correct unsigned checksum, octal numbers (no base-256), string fields
  that are NUL-padded with nothing after the first NUL, and a zero
  ``pad`` area.
* Only regular files (``'0'``, or the old ``'\\0'``) and directories
  (``'5'``) exist; every other type flag is refused by name (links,
  devices, FIFOs, pax/GNU extension headers...).  No link names, no device
  numbers.
* File data is padded with zeros to the block; the archive ends with two
  zero blocks, after which only zeros may follow; a gzip stream must end
  (CRC and length checked by zlib) with nothing after it.
* Input and output are counted as they stream: the decompressed size and
  the compression ratio are capped *while* reading, and no size from any
  header is trusted to allocate anything.

The writer produces the same subset, byte for byte reproducibly: entries in
the order given, mtime 0, uid/gid 0, empty owner names, no directory
entries, no record padding, and a gzip header with no name and mtime 0.
"""

from __future__ import annotations

import unicodedata
import zlib
from typing import BinaryIO, Iterable, Iterator, NamedTuple, Optional

from qga.errors import BundleError

BLOCK = 512
CHUNK = 64 * 1024
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK"
USTAR_MAGIC = b"ustar\x00"
USTAR_VERSION = b"00"
GNU_MAGIC = b"ustar  \x00"  # magic + version of GNU tar's own (old) format

REGULAR = "file"
DIRECTORY = "dir"

# Type flags we refuse, with the name the error message uses.
_REFUSED_TYPES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"x": "a pax extended header",
    b"g": "a pax global header",
    b"L": "a GNU long name header",
    b"K": "a GNU long link name header",
    b"S": "a GNU sparse file",
    b"D": "a GNU directory dump",
    b"M": "a GNU multi-volume continuation",
    b"V": "a GNU volume label",
}


class Caps(NamedTuple):
    """How much an archive may cost to read."""

    max_input: int       # bytes of the archive file itself
    max_output: int      # bytes of the (decompressed) tar stream
    max_ratio: int       # decompressed : compressed, beyond the allowance
    ratio_allowance: int  # decompressed bytes granted before the ratio applies


class Header(NamedTuple):
    """One archive member as its header describes it (already checked for form)."""

    index: int       # 1-based position in the archive, for messages
    path: bytes      # prefix + "/" + name, raw; a directory's trailing "/" removed
    kind: str        # REGULAR or DIRECTORY
    mode: int        # the mode field, all of it (special bits included)
    size: int


def display(path: bytes) -> str:
    """A path for an error message: UTF-8 where it is, escapes for anything unprintable."""
    text = path.decode("utf-8", "backslashreplace")
    return "".join(
        char if not unicodedata.category(char).startswith("C")
        else ("\\x%02x" % ord(char) if ord(char) < 0x100 else "\\u%04x" % ord(char))
        for char in text)


# -- the byte stream: gzip or not, counted ------------------------------------------


class ByteStream:
    """The tar stream of an archive file: decompressed if gzipped, counted, capped."""

    def __init__(self, source: BinaryIO, caps: Caps):
        self._source = source
        self._caps = caps
        self._consumed = 0   # bytes read from the archive file
        self._produced = 0   # bytes of tar stream handed out or buffered
        self._pending = bytearray()
        self._source_eof = False
        first = self._read_source(BLOCK)
        if first.startswith(GZIP_MAGIC):
            self._inflater: Optional["zlib._Decompress"] = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self._inflate(first)
        else:
            if first.startswith(ZIP_MAGIC):
                raise BundleError("the archive is a zip file; bundles are tar archives"
                                  " (POSIX ustar, optionally gzip-compressed)")
            self._inflater = None
            self._add_output(first)

    @property
    def compressed(self) -> bool:
        return self._inflater is not None

    def read_exact(self, size: int) -> bytes:
        """``size`` bytes of tar stream; :class:`BundleError` if the archive ends first."""
        while len(self._pending) < size:
            if not self._fill():
                raise BundleError("the archive is truncated")
        data = bytes(self._pending[:size])
        del self._pending[:size]
        return data

    def expect_only_zeros(self) -> None:
        """Read to the end: nothing but zero bytes may follow the end-of-archive blocks."""
        while True:
            if self._pending.strip(b"\x00"):
                raise BundleError("data after the end of the archive")
            self._pending.clear()
            if not self._fill():
                return

    def _fill(self) -> bool:
        """Add some tar stream to the buffer; False at the (checked) end of the archive."""
        if self._inflater is None:
            data = self._read_source(CHUNK)
            self._add_output(data)
            return bool(data)
        while True:
            if self._inflater.unconsumed_tail:
                produced = self._inflate(self._inflater.unconsumed_tail)
            elif self._inflater.eof:
                self._check_gzip_end()
                return False
            else:
                data = self._read_source(CHUNK)
                if not data:
                    raise BundleError("the gzip stream is truncated")
                produced = self._inflate(data)
            if produced:
                return True

    def _inflate(self, data: bytes) -> int:
        assert self._inflater is not None
        try:
            output = self._inflater.decompress(data, CHUNK)
        except zlib.error as error:
            raise BundleError(f"the gzip stream is corrupt ({error})") from None
        self._add_output(output)
        if self._inflater.eof:
            self._check_gzip_end()
        return len(output)

    def _check_gzip_end(self) -> None:
        assert self._inflater is not None
        if self._inflater.unused_data or self._read_source(1):
            raise BundleError("data after the end of the gzip stream")

    def _read_source(self, size: int) -> bytes:
        if self._source_eof:
            return b""
        data = self._source.read(size)
        if not data:
            self._source_eof = True
            return b""
        self._consumed += len(data)
        if self._consumed > self._caps.max_input:
            raise BundleError(f"the archive is larger than {self._caps.max_input} bytes")
        return data

    def _add_output(self, data: bytes) -> None:
        self._produced += len(data)
        caps = self._caps
        if self._produced > caps.max_output:
            raise BundleError(f"the archive expands to more than {caps.max_output} bytes")
        if (self._inflater is not None
                and self._produced > caps.max_ratio * self._consumed + caps.ratio_allowance):
            raise BundleError(f"the archive's compression ratio is above {caps.max_ratio}:1"
                              " (a compression bomb?)")
        self._pending += data


# -- reading --------------------------------------------------------------------------


class TarReader:
    """Headers and data of a strict ustar stream, in archive order.

    Call :meth:`next_header` until it returns ``None``; between calls, read a
    regular file's data with :meth:`data` (whatever is left unread is read
    and dropped by the next call, so the stream stays in step).
    """

    def __init__(self, stream: ByteStream):
        self._stream = stream
        self._index = 0
        self._remaining = 0       # data bytes of the current entry not yet read
        self._padding = 0         # zero bytes after them
        self._current: Optional[Header] = None
        self._ended = False

    def next_header(self) -> Optional[Header]:
        self._skip_rest_of_entry()
        if self._ended:
            return None
        block = self._stream.read_exact(BLOCK)
        self._index += 1
        if block == bytes(BLOCK):
            if self._stream.read_exact(BLOCK) != bytes(BLOCK):
                raise BundleError(f"entry #{self._index}: a zero block inside the archive")
            self._stream.expect_only_zeros()
            self._ended = True
            self._current = None
            return None
        header = parse_header(block, self._index)
        self._current = header
        self._remaining = header.size
        self._padding = -header.size % BLOCK
        return header

    def data(self) -> Iterator[bytes]:
        """The current entry's data in chunks, then its padding checked."""
        while self._remaining:
            size = min(self._remaining, CHUNK)
            chunk = self._stream.read_exact(size)
            self._remaining -= size
            yield chunk
        self._read_padding()

    def _skip_rest_of_entry(self) -> None:
        for _ in self.data():
            pass

    def _read_padding(self) -> None:
        if self._padding:
            padding = self._stream.read_exact(self._padding)
            self._padding = 0
            if padding.strip(b"\x00"):
                assert self._current is not None
                raise BundleError(f"entry '{display(self._current.path)}':"
                                  " non-zero bytes in the padding after its data")


def parse_header(block: bytes, index: int) -> Header:
    """Check one header block for form and return what it says."""
    where = f"entry #{index}"
    checksum = _octal(block[148:156], where, "checksum")
    actual = sum(block[:148]) + 8 * ord(" ") + sum(block[156:])
    if checksum != actual:
        raise BundleError(f"{where}: bad header checksum (the archive is corrupt)")
    if block[257:265] == GNU_MAGIC:
        raise BundleError(f"{where}: a GNU tar header; only POSIX ustar is accepted")
    if block[257:263] != USTAR_MAGIC or block[263:265] != USTAR_VERSION:
        raise BundleError(f"{where}: not a POSIX ustar header")
    name = _string(block[0:100], where, "name")
    prefix = _string(block[345:500], where, "prefix")
    path = prefix + b"/" + name if prefix else name
    where = f"entry '{display(path)}'"
    typeflag = block[156:157]
    if typeflag in _REFUSED_TYPES:
        raise BundleError(f"{where} is {_REFUSED_TYPES[typeflag]}; only regular files"
                          " and directories are accepted")
    if typeflag in (b"0", b"\x00"):
        kind = REGULAR
    elif typeflag == b"5":
        kind = DIRECTORY
        if path.endswith(b"/"):
            path = path[:-1]
    else:
        raise BundleError(f"{where} has the unknown type {typeflag!r}")
    mode = _octal(block[100:108], where, "mode")
    size = _octal(block[124:136], where, "size")
    if kind == DIRECTORY and size:
        raise BundleError(f"{where}: a directory with data")
    if _string(block[157:257], where, "link name"):
        raise BundleError(f"{where} names a link target")
    if _octal(block[329:337], where, "device major") or _octal(block[337:345], where,
                                                                "device minor"):
        raise BundleError(f"{where} has device numbers")
    for field, what in ((block[108:116], "uid"), (block[116:124], "gid"),
                        (block[136:148], "mtime")):
        _octal(field, where, what)
    _string(block[265:297], where, "owner name")
    _string(block[297:329], where, "group name")
    if block[500:512].strip(b"\x00"):
        raise BundleError(f"{where}: non-zero bytes at the end of its header")
    return Header(index, path, kind, mode, size)


def _string(field: bytes, where: str, what: str) -> bytes:
    """A NUL-padded field: the bytes before the first NUL; only NULs may follow."""
    end = field.find(b"\x00")
    if end < 0:
        return field
    if field[end:].strip(b"\x00"):
        raise BundleError(f"{where}: bytes after the end of the {what} field")
    return field[:end]


def _octal(field: bytes, where: str, what: str) -> int:
    """An octal number field: blanks, octal digits, then NULs or blanks; empty is 0."""
    if field[:1] and field[0] & 0x80:
        raise BundleError(f"{where}: a base-256 {what} field")
    digits = field.rstrip(b"\x00 ").lstrip(b" ")
    if not digits:
        return 0
    if digits.strip(b"01234567"):
        raise BundleError(f"{where}: the {what} field is not an octal number")
    return int(digits, 8)


def open_tar(source: BinaryIO, caps: Caps) -> TarReader:
    """A :class:`TarReader` over the archive file ``source`` (read from where it is)."""
    return TarReader(ByteStream(source, caps))


# -- writing --------------------------------------------------------------------------


class Member(NamedTuple):
    """One regular file to write: its archive path, mode, size and data chunks."""

    path: str
    mode: int
    size: int
    chunks: Iterable[bytes]


def make_header(path: str, mode: int, size: int) -> bytes:
    """A ustar header for a regular file, with every variable field fixed."""
    name, prefix = _split_path(path.encode("utf-8"))
    block = bytearray(BLOCK)
    block[0:len(name)] = name
    block[100:108] = b"%07o\x00" % mode
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"00000000000\x00"
    block[148:156] = b" " * 8
    block[156:157] = b"0"
    block[257:263] = USTAR_MAGIC
    block[263:265] = USTAR_VERSION
    block[329:337] = b"0000000\x00"
    block[337:345] = b"0000000\x00"
    block[345:345 + len(prefix)] = prefix
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def _split_path(path: bytes):
    """ustar's name (100 bytes) and prefix (155 bytes), split at a '/'."""
    if len(path) <= 100:
        return path, b""
    for cut in range(len(path) - 1, 0, -1):
        if path[cut:cut + 1] == b"/" and cut <= 155 and len(path) - cut - 1 <= 100:
            return path[cut + 1:], path[:cut]
    raise BundleError(f"'{display(path)}' is too long for a ustar archive")


def write_tar(out: BinaryIO, members: Iterable[Member], compress: bool = True) -> None:
    """Write ``members`` as a ustar archive (gzipped unless ``compress`` is False)."""
    sink = _GzipSink(out) if compress else out
    for member in members:
        sink.write(make_header(member.path, member.mode, member.size))
        written = 0
        for chunk in member.chunks:
            written += len(chunk)
            sink.write(chunk)
        if written != member.size:
            raise BundleError(f"'{member.path}' changed size while the archive was written")
        sink.write(bytes(-written % BLOCK))
    sink.write(bytes(2 * BLOCK))
    if isinstance(sink, _GzipSink):
        sink.close()


class _GzipSink:
    """A gzip stream with a fixed header (no name, mtime 0), so output is reproducible."""

    def __init__(self, out: BinaryIO):
        self._out = out
        self._deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def write(self, data: bytes) -> None:
        self._out.write(self._deflater.compress(data))

    def close(self) -> None:
        self._out.write(self._deflater.flush())
