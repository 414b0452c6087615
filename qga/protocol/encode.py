"""Replies out: qemu's JSON writer (``qobject/qjson.c``), byte for byte.

Style as qemu-ga writes it: ``": "`` after keys, ``", "`` between members,
one reply per line ending in ``\\n``.  Object members come out in QDict
order (qemu's hash-bucket order, :mod:`qga.qdict_order`), whatever order the
handler or the host used: an echoed ``id`` object is reordered exactly as
qemu-ga reorders it.  Strings are pure ASCII: every code
point from 0x7F up and every control character becomes ``\\uXXXX`` with
*uppercase* hex (surrogate pairs above the BMP), noncharacters become
``\\uFFFD``, ``/`` is not escaped.  Doubles print like ``%.17g`` (so an id of
0.1 echoes as ``0.10000000000000001`` and infinity as ``inf``, which is not
JSON: a real qemu-ga quirk kept on purpose).
"""

from __future__ import annotations

import re
from functools import lru_cache
from json.encoder import encode_basestring_ascii  # the C implementation
from typing import Any, List, Tuple

from qga.protocol.text import REPLACEMENT, NONCHARACTER
from qga.qdict_order import qdict_order


class AsciiText:
    """Text known to be printable ASCII with nothing to escape (base64).

    A handler may return it where the schema says ``str``.  It wraps the
    bytes without copying them, and :func:`encode_reply_chunks` hands them
    to the channel as they are: a 48 MiB ``guest-file-read`` costs no 64 MiB
    ``str`` and no copy into one reply buffer.  It compares equal to the same
    bytes.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __bytes__(self) -> bytes:
        return bytes(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsciiText):
            other = other.data
        return isinstance(other, (bytes, bytearray)) and self.data == other

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        shown = self.data if len(self.data) <= 40 else self.data[:40] + b"..."
        return f"AsciiText({shown!r})"


_ESCAPE = re.compile(r"\\(\\|u[0-9a-f]{4})")
_EMPTY_RETURN = b'{"return": {}}\n'


def _uppercase_escape(match: "re.Match[str]") -> str:
    escape = match.group(1)
    return "\\\\" if escape == "\\" else "\\u" + escape[1:].upper()


@lru_cache(maxsize=1024)
def _member_order(keys: Tuple[str, ...]) -> Tuple[str, ...]:
    # Replies reuse a few key sets (one per return type), so this is a cache hit.
    return tuple(qdict_order(keys))


def encode_string(text: str) -> str:
    if not text.isascii():
        text = NONCHARACTER.sub(REPLACEMENT, text)
    quoted = encode_basestring_ascii(text)
    if "\\u" in quoted:
        quoted = _ESCAPE.sub(_uppercase_escape, quoted)
    if "\x7f" in quoted:
        quoted = quoted.replace("\x7f", "\\u007F")
    return quoted


def _encode(value: Any, out: List[Any]) -> None:
    # ``out`` collects str pieces and, for AsciiText, its bytes uncopied.
    if isinstance(value, str):
        out.append(encode_string(value))
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append("%.17g" % value)
    elif isinstance(value, AsciiText):
        out.append('"')
        out.append(value.data)
        out.append('"')
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        keys = tuple(value)
        if len(keys) > 1:
            keys = _member_order(keys)
        separator = "{"
        for key in keys:
            out.append(separator)
            out.append(encode_string(key))
            out.append(": ")
            _encode(value[key], out)
            separator = ", "
        out.append("}")
    elif isinstance(value, (list, tuple)):
        if not value:
            out.append("[]")
            return
        separator = "["
        for item in value:
            out.append(separator)
            _encode(item, out)
            separator = ", "
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} in a reply")


def encode_value(value: Any) -> bytes:
    """One JSON value in qemu's style (no newline)."""
    return b"".join(_chunks(value, ""))


def _is_empty_return(reply: dict) -> bool:
    if len(reply) != 1:
        return False
    value = reply.get("return")
    return type(value) is dict and not value


def encode_reply(reply: dict) -> bytes:
    """A reply line: the dict's members in QDict order, then ``\\n``."""
    if _is_empty_return(reply):
        return _EMPTY_RETURN
    return b"".join(_chunks(reply, "\n"))


def encode_reply_chunks(reply: dict) -> List[bytes]:
    """The reply line as chunks to write in order, without joining big payloads.

    Usually one chunk; an :class:`AsciiText` payload stays a chunk of its own
    so a large reply is never copied into one buffer.
    """
    if _is_empty_return(reply):
        return [_EMPTY_RETURN]
    return _chunks(reply, "\n")


def _chunks(value: Any, end: str) -> List[bytes]:
    out: List[Any] = []
    _encode(value, out)
    out.append(end)
    try:
        return ["".join(out).encode("ascii")]
    except TypeError:
        pass  # an AsciiText payload: keep it a chunk of its own
    chunks: List[bytes] = []
    text: List[str] = []
    for piece in out:
        if isinstance(piece, str):
            text.append(piece)
        else:
            chunks.append("".join(text).encode("ascii"))
            chunks.append(piece)
            text = []
    chunks.append("".join(text).encode("ascii"))
    return chunks
