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


class AsciiText(bytes):
    """Text known to be printable ASCII with nothing to escape (base64).

    A handler may return it where the schema says ``str``; the encoder copies
    it into the reply as is, which spares a 64 MiB ``str`` for a big
    ``guest-file-read``.
    """

    __slots__ = ()


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
    # ``out`` collects str pieces and, for AsciiText, bytes pieces.
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
        out.append(b'"')
        out.append(value)
        out.append(b'"')
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
    out: List[Any] = []
    _encode(value, out)
    if all(isinstance(piece, str) for piece in out):
        return "".join(out).encode("ascii")
    return b"".join(piece.encode("ascii") if isinstance(piece, str) else piece for piece in out)


def encode_reply(reply: dict) -> bytes:
    """A reply line: the dict's members in its order, then ``\\n``."""
    if len(reply) == 1 and reply.get("return", None) == {} and isinstance(reply["return"], dict):
        return _EMPTY_RETURN
    return encode_value(reply) + b"\n"
