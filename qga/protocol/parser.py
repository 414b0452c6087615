"""The exact JSON parser: qemu's ``json-parser.c`` semantics over a token list.

The stream (``stream.py``) hands complete token lists here when the fast path
(``json.loads``) cannot be trusted to behave like qemu or has failed.  This
module produces the same values and, above all, the same first error message
as qemu-ga for any token sequence.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from qga.errors import JSONParseError
from qga.protocol.text import decode_strict, is_valid_codepoint

# Token types, named as in qemu's json-parser-int.h.
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA, INTEGER, FLOAT, KEYWORD, STRING = range(10)

Token = Tuple[int, bytes]

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = {
    ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
    ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t",
}


def parse_tokens(tokens: List[Token]) -> Any:
    """Parse one message; raise :class:`JSONParseError` with qemu's text."""
    return _Parser(tokens).parse()


def integer_value(text: bytes) -> Any:
    """qemu's integer rule: int64, else uint64 (non-negative), else double."""
    value = int(text)
    if _INT64_MIN <= value <= _UINT64_MAX:
        return value
    return float(text)


def string_value(token: bytes) -> str:
    """Decode a string token (with its quotes) like qemu's ``parse_string``."""
    if b"\\" not in token:
        text = decode_strict(token[1:-1])
        if text is None:
            raise JSONParseError("invalid UTF-8 sequence in string")
        return text
    return _decode_escaped(token)


def _decode_escaped(token: bytes) -> str:
    # Work in token coordinates: qemu's error text for a truncated \u escape
    # shows the closing quote, so the quote must stay addressable.
    out: List[str] = []
    pos = 1
    size = len(token) - 1
    while pos < size:
        slash = token.find(b"\\", pos, size)
        if slash < 0:
            slash = size
        if slash > pos:
            text = decode_strict(token[pos:slash])
            if text is None:
                raise JSONParseError("invalid UTF-8 sequence in string")
            out.append(text)
        if slash == size:
            break
        pos = _decode_escape(token, slash, out)
    return "".join(out)


def _decode_escape(body: bytes, start: int, out: List[str]) -> int:
    """Decode the escape at ``body[start] == '\\'``; return the position after it."""
    kind = body[start + 1]  # the lexer guarantees a character follows
    simple = _SIMPLE_ESCAPES.get(kind)
    if simple is not None:
        out.append(simple)
        return start + 2
    if kind != ord("u"):
        raise JSONParseError("invalid escape sequence in string")
    cp = _hex4(body, start + 2)
    end = start + 6
    if 0xD800 <= cp <= 0xDBFF and body[end:end + 2] == b"\\u":
        trailing = _hex4(body, end + 2)
        if 0xDC00 <= trailing <= 0xDFFF:
            cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
            end += 6
        else:
            cp = -1
    if not is_valid_codepoint(cp):
        shown = body[start:end].decode("latin-1")
        raise JSONParseError(f"{shown} is not a valid Unicode character")
    out.append(chr(cp))
    return end


def _hex4(body: bytes, pos: int) -> int:
    digits = body[pos:pos + 4]
    if len(digits) != 4 or not all(d in _HEX for d in digits):
        return -1
    return int(digits, 16)


class _Parser:
    """Recursive descent exactly as qemu's; the caller bounds nesting at 1024."""

    def __init__(self, tokens: List[Token]):
        self.tokens = tokens
        self.pos = 0

    def parse(self) -> Any:
        return self.value()

    def peek(self) -> Token:
        if self.pos >= len(self.tokens):
            raise JSONParseError("premature EOI")
        return self.tokens[self.pos]

    def pop(self) -> Token:
        token = self.peek()
        self.pos += 1
        return token

    def value(self) -> Any:
        kind, text = self.peek()
        if kind == LCURLY:
            return self.object()
        if kind == LSQUARE:
            return self.array()
        self.pos += 1
        if kind == STRING:
            return string_value(text)
        if kind == INTEGER:
            return integer_value(text)
        if kind == FLOAT:
            return float(text)
        if kind == KEYWORD:
            return self.keyword(text)
        raise JSONParseError("expecting value")

    @staticmethod
    def keyword(text: bytes) -> Any:
        if text == b"true":
            return True
        if text == b"false":
            return False
        if text == b"null":
            return None
        raise JSONParseError(f"invalid keyword '{text.decode('ascii')}'")

    def object(self) -> Dict[str, Any]:
        self.pop()  # '{'
        result: Dict[str, Any] = {}
        if self.peek()[0] == RCURLY:
            self.pop()
            return result
        self.pair(result)
        kind = self.pop()[0]
        while kind != RCURLY:
            if kind != COMMA:
                raise JSONParseError("expected separator in dict")
            self.pair(result)
            kind = self.pop()[0]
        return result

    def pair(self, result: Dict[str, Any]) -> None:
        self.peek()
        key = self.value()
        if not isinstance(key, str):
            raise JSONParseError("key is not a string in object")
        if self.pop()[0] != COLON:
            raise JSONParseError("missing : in object pair")
        value = self.value()
        if key in result:
            raise JSONParseError("duplicate key")
        result[key] = value

    def array(self) -> List[Any]:
        self.pop()  # '['
        result: List[Any] = []
        if self.peek()[0] == RSQUARE:
            self.pop()
            return result
        result.append(self.value())
        kind = self.pop()[0]
        while kind != RSQUARE:
            if kind != COMMA:
                raise JSONParseError("expected separator in list")
            result.append(self.value())
            kind = self.pop()[0]
        return result
