"""Byte-level tables and properties for the sans-IO protocol.

The expected lines were observed on the real qemu-ga 7.2; the compat suite
re-checks them against the live agent.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qga.protocol import NEED_DATA, ParseFailure, Parser, Request, encode_reply
from qga.protocol.stream import MAX_NESTING, MAX_TOKEN_SIZE
from qga.protocol.text import is_valid_codepoint


def events(data: bytes, parser: Parser = None):
    parser = parser or Parser()
    parser.feed(data)
    out = []
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)


def described(data: bytes):
    """Requests as values, failures as their desc text."""
    return [e.value if isinstance(e, Request) else e.error.desc for e in events(data)]


PARSE_TABLE = [
    (b'{"execute":"guest-ping"}', [{"execute": "guest-ping"}]),
    (b'{"execute":"guest-ping"}{"execute":"guest-info"}',
     [{"execute": "guest-ping"}, {"execute": "guest-info"}]),
    (b"{'execute':'guest-ping','id':'it\\'s'}", [{"execute": "guest-ping", "id": "it's"}]),
    (b'{"id":01}', ["JSON parse error, stray '01'", "JSON parse error, expecting value"]),
    (b"\xff", ["JSON parse error, stray '\ufffd'"]),
    (b'{"execute":"guest-ping",\xff', ["JSON parse error, stray '\ufffd'"]),
    (b"}", ["JSON parse error, expecting value"]),
    (b'{"a" 1}', ["JSON parse error, missing : in object pair"]),
    (b'{"a":1,"a":2}', ["JSON parse error, duplicate key"]),
    (b'{"a":"\\q"}', ["JSON parse error, invalid escape sequence in string"]),
    (b'{"a":"\\ud800"}', ["JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b'{"a":"\\uffff"}', ["JSON parse error, \\uffff is not a valid Unicode character"]),
    (b'{"a":"\xef\xbf\xbf"}', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b'{"a":"\xc0\x80"}', [{"a": "\x00"}]),
    (b'{"a":"\xc3\xa9\xf0\x9f\x98\x80"}', [{"a": "\u00e9\U0001f600"}]),
    (b'{"a":nul}', ["JSON parse error, invalid keyword 'nul'"]),
    (b'{"a":[1,2,]}', ["JSON parse error, expecting value"]),
    (b'{1:2}', ["JSON parse error, key is not a string in object"]),
    (b'[1 2]', ["JSON parse error, expected separator in list"]),
    (b'{"a":1 "b":2}', ["JSON parse error, expected separator in dict"]),
    (b'{"a":"x\x01y"}', ["JSON parse error, stray '\"x\x01'", "JSON parse error, expecting value"]),
    (b'{"a":12\x80}', ["JSON parse error, stray '\ufffd'", "JSON parse error, expecting value"]),
    (b'42\n', [42]),
    (b'{"a":18446744073709551615}', [{"a": 18446744073709551615}]),
    (b'{"a":18446744073709551616}', [{"a": 1.8446744073709552e19}]),
    (b'{"a":-9223372036854775809}', [{"a": -9.223372036854776e18}]),
    (b'{"a":1.0}', [{"a": 1.0}]),
]


@pytest.mark.parametrize("data,expected", PARSE_TABLE)
def test_parse_table(data, expected):
    got = described(data)
    assert got == expected
    for value, want in zip(got, expected):
        assert type(value) is type(want)


def test_number_at_end_of_buffer_waits_for_next_byte():
    parser = Parser()
    assert events(b"42", parser) == []
    assert [e.value for e in events(b" ", parser)] == [42]


def test_state_survives_between_feeds_like_between_clients():
    parser = Parser()
    assert events(b'{"execute":', parser) == []
    assert [e.value for e in events(b'"guest-ping"}', parser)] == [{"execute": "guest-ping"}]


def test_noncharacters_are_refused_even_escaped():
    assert described(b'{"\\ufffe":null}') == [
        "JSON parse error, \\ufffe is not a valid Unicode character"]


def test_nesting_limit_is_1024():
    ok = described(b"[" * MAX_NESTING + b"]" * MAX_NESTING)
    assert len(ok) == 1 and isinstance(ok[0], list)
    too_deep = described(b"[" * (MAX_NESTING + 1))
    assert too_deep == ["JSON nesting depth limit exceeded"]


def test_token_count_limit():
    # 1 + 2 * 2**20 tokens: the last comma is token number 2**21 + 1.
    data = b"[" + b"0," * (1 << 20)
    got = described(data)
    assert got[0] == "JSON token count limit exceeded"


def test_oversized_string_token_is_refused_while_buffering():
    parser = Parser()
    parser.feed(b'{"execute":"guest-file-write","arguments":{"buf-b64":"')
    chunk = b"A" * (1 << 20)
    for _ in range(MAX_TOKEN_SIZE // len(chunk) + 1):
        parser.feed(chunk)
        while parser.next_event() is not NEED_DATA:
            pass
        assert parser.buffered <= MAX_TOKEN_SIZE + 2 * len(chunk)
    # the refused message is gone and the parser answers the next request
    parser.feed(b'"}}\xff{"execute":"guest-ping"}')
    tail = []
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            break
        tail.append(event)
    assert isinstance(tail[-1], Request) and tail[-1].value == {"execute": "guest-ping"}


def test_buffering_is_linear_for_a_large_request():
    """A 32 MiB request fed in page-sized pieces parses in bounded time."""
    import time

    payload = b"QUFB" * (8 << 20)
    data = b'{"execute":"guest-file-write","arguments":{"handle":1000,"buf-b64":"' + payload + b'"}}'
    parser = Parser()
    started = time.process_time()
    got = []
    for offset in range(0, len(data), 4096):
        parser.feed(data[offset:offset + 4096])
        event = parser.next_event()
        if event is not NEED_DATA:
            got.append(event)
    elapsed = time.process_time() - started
    assert len(got) == 1 and got[0].value["arguments"]["buf-b64"] == payload.decode()
    # Quadratic rescanning would take minutes here; linear takes about a second.
    assert elapsed < 30


ENCODE_TABLE = [
    ({"return": {}}, b'{"return": {}}\n'),
    ({"return": {}, "id": 1}, b'{"return": {}, "id": 1}\n'),
    ({"return": {}, "id": 0.1}, b'{"return": {}, "id": 0.10000000000000001}\n'),
    ({"return": {}, "id": "\u00e9\U0001f600\x7f"},
     b'{"return": {}, "id": "\\u00E9\\uD83D\\uDE00\\u007F"}\n'),
    ({"return": {}, "id": "a/b\\u00e9\n"}, b'{"return": {}, "id": "a/b\\\\u00e9\\n"}\n'),
    ({"id": [1, {"a": 2}], "error": {"class": "CommandNotFound", "desc": "x"}},
     b'{"id": [1, {"a": 2}], "error": {"class": "CommandNotFound", "desc": "x"}}\n'),
    ({"return": [], "id": None}, b'{"return": [], "id": null}\n'),
    ({"return": {"x": float("inf")}}, b'{"return": {"x": inf}}\n'),
    ({"return": "\ufdd0"}, b'{"return": "\\uFFFD"}\n'),
]


@pytest.mark.parametrize("reply,line", ENCODE_TABLE)
def test_encode_table(reply, line):
    assert encode_reply(reply) == line


# -- properties ----------------------------------------------------------------

# Text qemu accepts: no surrogates and no noncharacters (U+FDD0..U+FDEF,
# U+xxFFFE/U+xxFFFF), which qemu refuses even when escaped.
qemu_text_chars = st.characters(blacklist_categories=("Cs",)).filter(
    lambda c: is_valid_codepoint(ord(c)))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.text(qemu_text_chars, max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(qemu_text_chars, max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.text(qemu_text_chars, max_size=8), json_values, max_size=4),
                min_size=1, max_size=4),
       st.data())
def test_any_split_of_a_valid_stream_gives_the_same_requests(values, data):
    stream = b"".join(json.dumps(v).encode() + b"\n" for v in values)
    whole = [e.value for e in events(stream)]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = Parser()
    pieces = []
    previous = 0
    for cut in cuts + [len(stream)]:
        pieces.append(events(stream[previous:cut], parser))
        previous = cut
    split = [e.value for batch in pieces for e in batch]
    assert split == whole
    expected = [json.loads(json.dumps(v)) for v in values]
    assert whole == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_or_hang(data):
    parser = Parser()
    got = events(data, parser)
    assert all(isinstance(e, (Request, ParseFailure)) for e in got)
    # After 0xFF and a newline the parser is clean whatever came before.
    clean = events(b"\xff\n{\"execute\":\"guest-ping\"}", parser)
    assert isinstance(clean[-1], Request) and clean[-1].value == {"execute": "guest-ping"}
