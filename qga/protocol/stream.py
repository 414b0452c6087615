"""Bytes in, requests out: qemu-ga's JSON stream parser, without IO.

This reproduces the three layers of qemu's JSON input exactly as a host can
observe them:

* the **lexer** (``json-lexer.c``): a byte-driven state machine with
  qemu's extensions (single-quoted strings) and its error recovery (after a
  bad byte, skip to a structural or control character or 0xFE/0xFF);
* the **streamer** (``json-streamer.c``): a message ends when braces and
  brackets balance, *not* at a newline; per-message limits on nesting
  (1024), token count (2 Mi) and token bytes (64 MiB) are checked as each
  token arrives, so nothing grows past them while buffering;
* the **parser** (``json-parser.c``), in :mod:`qga.protocol.parser`.

Speed comes from doing the per-byte work in C where the result is the
same: runs of string content, digits, letters, whitespace and skipped
garbage are consumed with compiled regular expressions, so the cost is
linear in the input and a 64 MiB base64 string costs a few regex calls.
Complete messages are decoded with :func:`json.loads` when the lexer has
proven that ``json`` and qemu agree on them (ASCII strings, no ``\\u``
escapes, no single quotes, integers that fit); anything else, and any
message ``json`` rejects, goes through the exact parser so error texts match
qemu's.  Small flat requests (the common case) are recognised by one regex.

Usage (h11 style)::

    parser = Parser()
    parser.feed(data)
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            break
        ...  # Request(value) or ParseFailure(error)

The parser's state is the agent's, not a connection's: qemu-ga keeps a
half-received request across client reconnects, and so must we.
"""

from __future__ import annotations

import json
import re
import sys
from collections import deque
from typing import Any, Deque, List, Optional, Tuple, Union

from qga.errors import InputError, JSONLimitError, JSONParseError
from qga.protocol.parser import (
    COLON, COMMA, FLOAT, INTEGER, KEYWORD, LCURLY, LSQUARE, RCURLY, RSQUARE, STRING,
    parse_tokens,
)
from qga.protocol.text import decode_lenient

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1024

# Recursive descent over 1024 nesting levels (ours and json's C scanner)
# needs about three frames a level, past Python's default limit of 1000.
_RECURSION_NEEDED = 3 * MAX_NESTING + 1000


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class Request:
    """A complete JSON value from the host (any type; the dispatcher checks it)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"Request({self.value!r})"


class ParseFailure:
    """Bytes that are not JSON; the reply is ``error`` and carries no id."""

    __slots__ = ("error",)

    def __init__(self, error: InputError):
        self.error = error

    def __repr__(self) -> str:
        return f"ParseFailure({self.error.desc!r})"


Event = Union[Request, ParseFailure, _NeedData]

# -- lexer states (qemu's names) -----------------------------------------------

(START, RECOVERY, DQ_STRING, DQ_ESCAPE, SQ_STRING, SQ_ESCAPE, ZERO, SIGN, DIGITS,
 MANTISSA, MANTISSA_DIGITS, EXP_E, EXP_SIGN, EXP_DIGITS, IN_KEYWORD) = range(15)
_ERROR = -1

_SINGLE_CHAR_TOKENS = {
    ord("{"): LCURLY, ord("}"): RCURLY, ord("["): LSQUARE, ord("]"): RSQUARE,
    ord(","): COMMA, ord(":"): COLON,
}


def _start_table() -> List[int]:
    table = [_ERROR] * 256
    table[ord('"')] = DQ_STRING
    table[ord("'")] = SQ_STRING
    table[ord("0")] = ZERO
    for digit in b"123456789":
        table[digit] = DIGITS
    table[ord("-")] = SIGN
    for letter in range(ord("a"), ord("z") + 1):
        table[letter] = IN_KEYWORD
    return table


_START_TABLE = _start_table()
_IS_DIGIT = [ord("0") <= c <= ord("9") for c in range(256)]

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_DIGIT_RUN = re.compile(rb"[0-9]*")
_LETTER_RUN = re.compile(rb"[a-z]*")
# In recovery the lexer skips everything but structural characters, control
# characters other than TAB, and the bytes 0xFE/0xFF.
_RECOVERY_RUN = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff{}\[\]:,]*")
# String bodies: bytes 0x20..0xFD except the quote and the backslash.  The
# ASCII variant stops at the first non-ASCII byte so the message can be
# marked as needing qemu's own UTF-8 rules.
_DQ_ASCII_RUN = re.compile(rb'[\x20\x21\x23-\x5b\x5d-\x7f]*')
_DQ_RUN = re.compile(rb'[\x20\x21\x23-\x5b\x5d-\xfd]*')
_SQ_ASCII_RUN = re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\x7f]*")
_SQ_RUN = re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]*")

# One regex for the requests hosts actually send: an object of string keys
# whose values are plain ASCII strings, small integers, keywords or a flat
# object of those.  Such a message means the same to ``json`` and to qemu.
_W = rb"[ \t\r\n]*"
_S = rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_SCALAR = rb"(?:" + _S + rb"|-?(?:0|[1-9][0-9]{0,17})|true|false|null)"
_MEMBER = _S + _W + rb":" + _W
_FLAT = (rb"\{" + _W + rb"(?:" + _MEMBER + _SCALAR + _W
         + rb"(?:," + _W + _MEMBER + _SCALAR + _W + rb"){0,64})?\}")
_VALUE = rb"(?:" + _SCALAR + rb"|" + _FLAT + rb")"
_SIMPLE_REQUEST = re.compile(
    _W + rb"(\{" + _W + rb"(?:" + _MEMBER + _VALUE + _W
    + rb"(?:," + _W + _MEMBER + _VALUE + _W + rb"){0,16})?\})")

# json.loads agrees with qemu only on integers that fit in int64.
_LONGEST_SAFE_INTEGER = 18


class _DuplicateKey(Exception):
    pass


def _unique_object(pairs: List[Tuple[str, Any]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey()
    return result


# Built once: json.loads with a hook would build a decoder per call.
_JSON = json.JSONDecoder(object_pairs_hook=_unique_object)


def _decode_json(buffer: bytearray, start: int, end: int) -> Any:
    """Decode a message the lexer proved is ASCII; raise ValueError if not JSON.

    Decoding through a memoryview spares a copy of the message: a 64 MiB
    guest-file-write would otherwise hold four copies of its payload at once.
    The views are released at once, or the buffer could not be resized.
    """
    with memoryview(buffer) as whole, whole[start:end] as message:
        text = str(message, "ascii")
    value, end = _JSON.raw_decode(text)
    if end != len(text):
        raise ValueError("a prefix is JSON, the rest is not")  # e.g. the keyword "truee"
    return value


def _stray(token: bytes) -> JSONParseError:
    # qemu formats the token with %s, so it ends at the first NUL byte.
    text = token.split(b"\0", 1)[0]
    return JSONParseError(f"stray '{decode_lenient(text)}'")


class Parser:
    """The sans-IO stream parser; see the module docstring."""

    def __init__(self) -> None:
        if sys.getrecursionlimit() < _RECURSION_NEEDED:
            sys.setrecursionlimit(_RECURSION_NEEDED)
        self._buffer = bytearray()
        self._pos = 0
        self._state = START
        self._token_start = 0
        self._events: Deque[Event] = deque()
        self._reset_message()

    # -- public API ----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_event(self) -> Event:
        if self._events:
            return self._events.popleft()
        if self._state == START and not self._token_count:
            simple = _SIMPLE_REQUEST.match(self._buffer, self._pos)
            if simple is not None:
                value = self._decode_simple(simple)
                if value is not None:
                    self._pos = simple.end()
                    self._compact()
                    return value
        if self._pos < len(self._buffer):
            self._lex()
            if self._events:
                return self._events.popleft()
        return NEED_DATA

    @property
    def buffered(self) -> int:
        """Bytes held for the message in progress (for tests and limits)."""
        return len(self._buffer)

    # -- the streamer: collecting tokens into messages -----------------------

    def _reset_message(self) -> None:
        self._tokens: List[Tuple[int, int, int]] = []
        self._token_count = 0
        self._token_size = 0
        self._braces = 0
        self._brackets = 0
        self._whitespace = 0
        self._needs_exact_parser = False
        self._dropped = False  # the message is doomed; its tokens are gone

    def _emit_error(self, error: InputError) -> None:
        self._reset_message()
        self._events.append(ParseFailure(error))

    def _token(self, kind: int, start: int, end: int) -> None:
        if kind == LCURLY:
            self._braces += 1
        elif kind == RCURLY:
            self._braces -= 1
        elif kind == LSQUARE:
            self._brackets += 1
        elif kind == RSQUARE:
            self._brackets -= 1
        length = end - start
        if self._token_size + length + 1 > MAX_TOKEN_SIZE:
            self._emit_limit("JSON token size limit exceeded")
            return
        if self._token_count + 1 > MAX_TOKEN_COUNT:
            self._emit_limit("JSON token count limit exceeded")
            return
        if self._braces + self._brackets > MAX_NESTING:
            self._emit_limit("JSON nesting depth limit exceeded")
            return
        if not self._dropped:
            self._tokens.append((kind, start, end))
        self._token_size += length
        self._token_count += 1
        braces, brackets = self._braces, self._brackets
        if (braces > 0 or brackets > 0) and braces >= 0 and brackets >= 0:
            return
        self._complete()

    def _emit_limit(self, text: str) -> None:
        self._emit_error(JSONLimitError(text))

    def _complete(self) -> None:
        tokens = self._tokens
        buffer = self._buffer
        value: Any = None
        decoded = False
        if not self._needs_exact_parser:
            try:
                value = _decode_json(buffer, tokens[0][1], tokens[-1][2])
                decoded = True
            except (ValueError, _DuplicateKey, RecursionError):
                pass  # the exact parser finds qemu's error text
        if not decoded:
            try:
                value = parse_tokens([(kind, bytes(buffer[s:e])) for kind, s, e in tokens])
            except JSONParseError as error:
                self._emit_error(error)
                return
        self._reset_message()
        self._events.append(Request(value))

    # -- the lexer -----------------------------------------------------------

    def _lex(self) -> None:
        """Consume input until at least one event is ready or input runs out."""
        buffer = self._buffer
        end = len(buffer)
        pos = self._pos
        state = self._state
        events = self._events
        while pos < end and not events:
            if state == START:
                pos, state = self._lex_start(buffer, pos, end)
            elif state == DQ_STRING or state == SQ_STRING:
                pos, state = self._lex_string(buffer, pos, end, state)
            elif state == RECOVERY:
                pos = _RECOVERY_RUN.match(buffer, pos).end()
                if pos < end:
                    state = START  # resynchronise on this byte, not consuming it
            else:
                pos, state = self._lex_other(buffer, pos, end, state)
            if state > RECOVERY and pos - self._token_start > MAX_TOKEN_SIZE:
                # qemu's lexer forces out a token that grew too big; the
                # streamer rejects it and lexing restarts mid-token.
                self._emit_limit("JSON token size limit exceeded")
                state = START
        self._pos = pos
        self._state = state
        self._compact()

    def _lex_start(self, buffer: bytearray, pos: int, end: int) -> Tuple[int, int]:
        skipped = _WHITESPACE.match(buffer, pos).end()
        if self._token_count:
            self._whitespace += skipped - pos
            if self._whitespace > MAX_TOKEN_SIZE:
                # Our one bound beyond qemu's: qemu discards whitespace as it
                # lexes, we keep the raw message, so whitespace inside one
                # message counts toward the same 64 MiB limit.
                self._emit_limit("JSON token size limit exceeded")
        pos = skipped
        if pos >= end:
            return pos, START
        byte = buffer[pos]
        kind = _SINGLE_CHAR_TOKENS.get(byte)
        if kind is not None:
            self._token_start = pos
            self._token(kind, pos, pos + 1)
            return pos + 1, START
        state = _START_TABLE[byte]
        self._token_start = pos
        if state == _ERROR:
            self._emit_error(_stray(buffer[pos:pos + 1]))
            return pos + 1, RECOVERY
        if state == SQ_STRING:
            self._needs_exact_parser = True
        return pos + 1, state

    def _decode_simple(self, match: "re.Match[bytes]") -> Optional[Request]:
        """A request matched by the one-regex fast path, or None to lex it."""
        start, end = match.span(1)
        if end - start >= MAX_TOKEN_SIZE:
            return None
        try:
            return Request(_decode_json(self._buffer, start, end))
        except (ValueError, _DuplicateKey):
            return None  # lex it token by token to find qemu's error

    def _lex_string(self, buffer: bytearray, pos: int, end: int, state: int) -> Tuple[int, int]:
        limit = min(end, self._token_start + MAX_TOKEN_SIZE + 1)
        double = state == DQ_STRING
        if self._needs_exact_parser:
            run = _DQ_RUN if double else _SQ_RUN
        else:
            run = _DQ_ASCII_RUN if double else _SQ_ASCII_RUN
        pos = run.match(buffer, pos, limit).end()
        if pos >= limit:
            return pos, state
        byte = buffer[pos]
        if byte == (0x22 if double else 0x27):
            self._token(STRING, self._token_start, pos + 1)
            return pos + 1, START
        if byte == 0x5C:
            return pos + 1, DQ_ESCAPE if double else SQ_ESCAPE
        if 0x80 <= byte <= 0xFD:
            self._needs_exact_parser = True  # qemu's UTF-8 rules, not Python's
            return pos, state
        self._emit_error(_stray(buffer[self._token_start:pos + 1]))
        return pos + 1, RECOVERY

    def _lex_other(self, buffer: bytearray, pos: int, end: int, state: int) -> Tuple[int, int]:
        """Escapes, numbers and keywords: short tokens, byte by byte."""
        byte = buffer[pos]
        if state == DQ_ESCAPE or state == SQ_ESCAPE:
            if 0x20 <= byte <= 0xFD:
                if byte == 0x75:  # \u: surrogates and noncharacters need qemu's rules
                    self._needs_exact_parser = True
                return pos + 1, DQ_STRING if state == DQ_ESCAPE else SQ_STRING
            return self._lex_error(buffer, pos)
        if state == DIGITS or state == MANTISSA_DIGITS or state == EXP_DIGITS:
            pos = _DIGIT_RUN.match(buffer, pos, min(end, self._token_start + MAX_TOKEN_SIZE + 1)).end()
            if pos >= end or pos - self._token_start > MAX_TOKEN_SIZE:
                return pos, state
            byte = buffer[pos]
            if state != EXP_DIGITS and byte in b"eE":
                return pos + 1, EXP_E
            if state == DIGITS and byte == 0x2E:
                return pos + 1, MANTISSA
            return self._terminal(buffer, pos, INTEGER if state == DIGITS else FLOAT)
        if state == ZERO:
            if _IS_DIGIT[byte]:
                return self._lex_error(buffer, pos)
            if byte == 0x2E:
                return pos + 1, MANTISSA
            return self._terminal(buffer, pos, INTEGER)
        if state == SIGN:
            if byte == 0x30:
                return pos + 1, ZERO
            if _IS_DIGIT[byte]:
                return pos + 1, DIGITS
            return self._lex_error(buffer, pos)
        if state == MANTISSA or state == EXP_SIGN:
            if _IS_DIGIT[byte]:
                return pos + 1, MANTISSA_DIGITS if state == MANTISSA else EXP_DIGITS
            return self._lex_error(buffer, pos)
        if state == EXP_E:
            if byte == 0x2B or byte == 0x2D:
                return pos + 1, EXP_SIGN
            if _IS_DIGIT[byte]:
                return pos + 1, EXP_DIGITS
            return self._lex_error(buffer, pos)
        # IN_KEYWORD
        pos = _LETTER_RUN.match(buffer, pos, min(end, self._token_start + MAX_TOKEN_SIZE + 1)).end()
        if pos >= end or pos - self._token_start > MAX_TOKEN_SIZE:
            return pos, state
        return self._terminal(buffer, pos, KEYWORD)

    def _terminal(self, buffer: bytearray, pos: int, kind: int) -> Tuple[int, int]:
        """A number or keyword ends before whatever byte is at ``pos``."""
        if kind == INTEGER and pos - self._token_start > _LONGEST_SAFE_INTEGER:
            self._needs_exact_parser = True
        self._token(kind, self._token_start, pos)
        return pos, START

    def _lex_error(self, buffer: bytearray, pos: int) -> Tuple[int, int]:
        """The byte at ``pos`` is invalid here: it is consumed into the error token."""
        self._emit_error(_stray(buffer[self._token_start:pos + 1]))
        return pos + 1, RECOVERY

    # -- memory --------------------------------------------------------------

    def _compact(self) -> None:
        """Drop consumed bytes no message needs any more (amortised linear)."""
        if self._tokens:
            if not self._dropped and self._token_size + self._pending_token_length() + 1 > MAX_TOKEN_SIZE:
                # The message will be refused when its current token ends;
                # keep only that token's bytes until then.
                self._tokens = []
                self._dropped = True
            else:
                return
        keep = self._token_start if self._state > RECOVERY else self._pos
        if keep and (keep == len(self._buffer) or keep > len(self._buffer) // 2):
            del self._buffer[:keep]
            self._pos -= keep
            self._token_start -= keep

    def _pending_token_length(self) -> int:
        return self._pos - self._token_start if self._state > RECOVERY else 0

