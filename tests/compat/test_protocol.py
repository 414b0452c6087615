"""The wire-compatibility suite: the same bytes to qemu-ga and to the candidate.

Every test sends one byte sequence to the reference qemu-ga and to the
candidate agent and compares the *transcripts* (see ``conftest.py``) byte for
byte: reply count, order, member order, separators, escapes, error classes
and descriptions, id echo.  qemu-ga's output is deterministic for a given
input (error replies are ``{"id": ..., "error": {"class": ..., "desc": ...}}``,
successes ``{"return": ..., "id": ...}``), so nothing is normalised except
where a test says so.  Facts the suite relies on are also asserted on the
reference itself, so a change in qemu-ga shows up as a failure there.

Sources of the cases: the reference sheet (``reference/qemu-ga.md`` §2, §3,
§9) and measurements of qemu-ga 7.2.
"""

from __future__ import annotations

import json
from typing import List

import pytest

from tests.compat.conftest import Wire

pytestmark = pytest.mark.compat

MiB = 1024 * 1024
ERROR_STRAY_FF = b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'


def ping(id_json: bytes) -> bytes:
    return b'{"execute":"guest-ping","id":' + id_json + b"}"


def unknown(id_json: bytes) -> bytes:
    return b'{"execute":"no-such-command","id":' + id_json + b"}"


def cases(table):
    return [pytest.param(data, id=name) for name, data in table.items()]


# -- ids of every JSON type -------------------------------------------------------

ID_VALUES = {
    "int": b"1",
    "zero": b"0",
    "negative": b"-42",
    "minus-zero-int": b"-0",
    "int64-max": b"9223372036854775807",
    "int64-min": b"-9223372036854775808",
    "2^63": b"9223372036854775808",
    "2^64-1": b"18446744073709551615",
    "2^64": b"18446744073709551616",
    "-2^63-1": b"-9223372036854775809",
    "30-digits": b"123456789012345678901234567890",
    "float-0.1": b"0.1",
    "float-1.0": b"1.0",
    "float-minus-zero": b"-0.0",
    "float-1.5": b"1.5",
    "exponent": b"1e2",
    "exponent-upper-plus": b"1E+2",
    "exponent-negative": b"25e-1",
    "float-big": b"1.5e300",
    "float-small": b"1e-300",
    "float-denormal": b"5e-324",
    "float-17-digits": b"0.30000000000000004",
    "float-overflow-inf": b"1e400",
    "float-negative-overflow": b"-1e400",
    "string": b'"abc"',
    "string-empty": b'""',
    "string-non-ascii": '"caf\u00e9 \u00fc\u00df \u4e2d\u6587"'.encode(),
    "string-astral": '"\U0001f600 \U00010348"'.encode(),
    "string-astral-escaped": b'"\\ud83d\\ude00"',
    "string-short-escapes": b'"\\"\\\\\\/\\b\\f\\n\\r\\t"',
    "string-control-escapes": b'"\\u0000\\u0001\\u001f\\u007f\\u0080"',
    "string-uppercase-hex": b'"\\u00E9\\u00e9"',
    "string-raw-del": b'"a\x7fb"',
    "string-raw-u+fffd": '"\ufffd"'.encode(),
    "string-raw-u+10fffd": '"\U0010fffd"'.encode(),
    "string-overlong-nul": b'"a\xc0\x80b"',
    "string-slash": b'"a/b"',
    "single-quoted": b"'abc'",
    "single-quoted-escaped-quote": b"'it\\'s'",
    "double-quoted-escaped-single": b'"it\\\'s"',
    "single-quoted-with-double": b"'say \"hi\"'",
    "null": b"null",
    "true": b"true",
    "false": b"false",
    "array-empty": b"[]",
    "object-empty": b"{}",
    "nested": b'[1,[2,[3,{"a":{"b":[]}}]],"x",null,true,false,1.5]',
    "object-key-order": b'{"z":1,"a":2,"m":{"y":[],"b":{}},"":0}',
    "object-many-keys": b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(40)) + b"}",
    "whitespace-inside": b'[ 1 ,\t2 ,\r\n{ "a" : [ ] } ]',
}


@pytest.mark.parametrize("id_json", cases(ID_VALUES))
def test_id_is_echoed_on_success(wire: Wire, id_json):
    wire.compare(ping(id_json))


@pytest.mark.parametrize("id_json", cases({name: ID_VALUES[name] for name in (
    "int", "float-0.1", "2^64", "string-astral", "null", "nested", "object-key-order")}))
def test_id_is_echoed_on_error(wire: Wire, id_json):
    lines = wire.compare(unknown(id_json))
    assert lines[0].startswith(b'{"id": '), lines


def test_reference_echo_facts(wire: Wire):
    """What the reference sheet says about id echo, checked on qemu-ga itself."""
    lines = wire.ref.transcript(ping(b"0.1") + ping(b"1.0") + ping(b"-9223372036854775809")
                                + ping('"\u00e9\U0001f600"'.encode()) + ping(b"null"))
    assert lines[:5] == [
        b'{"return": {}, "id": 0.10000000000000001}\n',
        b'{"return": {}, "id": 1}\n',
        b'{"return": {}, "id": -9.2233720368547758e+18}\n',
        b'{"return": {}, "id": "\\u00E9\\uD83D\\uDE00"}\n',
        b'{"return": {}, "id": null}\n',
    ]


# -- framing: structure, not lines ------------------------------------------------------

FRAMING = {
    "no-newline": b'{"execute":"guest-ping"}',
    "newline": b'{"execute":"guest-ping"}\n',
    "crlf": b'{"execute":"guest-ping"}\r\n',
    "leading-whitespace": b' \t\r\n {"execute":"guest-ping"}',
    "pretty-printed": b'{\n    "execute": "guest-ping",\n    "id": [\n        1,\n        2\n    ]\n}\n',
    "crlf-between-tokens": b'{\r\n"execute"\r\n:\r\n"guest-ping"\r\n}',
    "tabs-between-tokens": b'{\t"execute"\t:\t"guest-ping"\t,\t"id"\t:\t7\t}',
    "members-reordered": b'{"id":5,"arguments":{},"execute":"guest-ping"}',
    "empty-arguments": b'{"execute":"guest-ping","arguments":{}}',
    "escaped-command-name": b'{"execute":"guest-\\u0070ing","id":3}',
    "escaped-member-name": b'{"\\u0065xecute":"guest-ping","id":4}',
    "single-quotes": b"{'execute':'guest-ping','id':'x'}",
    "mixed-quotes": b"{'execute':\"guest-ping\",\"id\":'y'}",
    "pipelined-3": b'{"execute":"guest-ping","id":1}{"execute":"guest-ping","id":2}'
                   b'{"execute":"guest-ping","id":3}',
    "pipelined-50": b"".join(ping(b"%d" % i) for i in range(50)),
    "pipelined-with-newlines": b"\n".join(ping(b"%d" % i) for i in range(10)) + b"\n",
    "pipelined-mixed-good-and-bad": ping(b"1") + b"[]" + ping(b"2") + b"}" + unknown(b"3")
                                    + b'{"id":01}' + ping(b"4"),
    "sync-then-ping": b'{"execute":"guest-sync","arguments":{"id":123}}' + ping(b"9"),
    "top-level-number-then-request": b"42 " + ping(b"1"),
    "empty-input": b"",
    "only-whitespace": b" \r\n\t \n",
}


@pytest.mark.parametrize("data", cases(FRAMING))
def test_framing(wire: Wire, data):
    wire.compare(data)


def test_pipelined_replies_stay_in_order(wire: Wire):
    lines = wire.compare(FRAMING["pipelined-50"])
    assert [json.loads(line)["id"] for line in lines[:50]] == list(range(50))


def test_split_byte_by_byte(wire: Wire):
    data = b'{"execute":"guest-sync","arguments":{"id":77},"id":"\xc3\xa9"}' + ping(b"[1,2]")
    lines = wire.compare([data[i:i + 1] for i in range(len(data))], delay=0.002)
    assert lines[:2] == [b'{"return": 77, "id": "\\u00E9"}\n', b'{"return": {}, "id": [1, 2]}\n']


@pytest.mark.parametrize("data", [
    pytest.param(b'{"execute":"guest-ping","id":12345}', id="number-at-chunk-end"),
    pytest.param(b'{"execute":"guest-ping","id":"\xf0\x9f\x98\x80"}', id="astral-utf8-split"),
    pytest.param(b'{"execute":"guest-ping","id":true}', id="keyword-split"),
])
def test_split_at_every_position(wire: Wire, data):
    """Two writes, cut at every byte: the agent must not care where a read ends."""
    for cut in range(1, len(data)):
        wire.compare([data[:cut], data[cut:]], delay=0.01)


# -- malformed input ---------------------------------------------------------------------

MALFORMED = {
    # lexer: stray bytes and tokens
    "stray-at": b"@",
    "stray-in-object": b'{"execute" x "guest-ping"}',
    "stray-leading-zero-id": b'{"id":01}',
    "leading-zero": b"00",
    "negative-leading-zero": b"-01",
    "plus-sign": b'{"execute":"guest-ping","id":+1}',
    "dot-number": b'{"execute":"guest-ping","id":.5}',
    "trailing-dot": b'{"execute":"guest-ping","id":1.}',
    "hex-number": b'{"execute":"guest-ping","id":0x10}',
    "uppercase-keyword": b"TRUE",
    "uppercase-in-request": b'{"execute":"guest-ping","id":True}',
    "bad-keyword": b'{"execute":"guest-ping","id":tru}',
    "bad-keyword-long": b'{"execute":"guest-ping","id":truex}',
    "keyword-nul": b"nul ",
    "bare-word": b"hello\n",
    "infinity-word": b'{"execute":"guest-ping","id":Infinity}',
    "nan-word": b'{"execute":"guest-ping","id":nan}',
    # parser
    "stray-close-brace": b"}",
    "stray-close-bracket": b"]",
    "stray-colon": b":",
    "stray-comma": b",",
    "mismatched-close": b"[1}",
    "mismatched-close-object": b'{"a":1]',
    "missing-colon": b'{"a" 1}',
    "missing-value": b'{"a":}',
    "missing-comma-object": b'{"a":1 "b":2}',
    "missing-comma-list": b"[1 2]",
    "trailing-comma-object": b'{"execute":"guest-ping",}',
    "trailing-comma-list": b"[1,]",
    "leading-comma-list": b"[,1]",
    "key-not-string": b'{1:2}',
    "key-keyword": b"{null:1}",
    "duplicate-keys": b'{"a":1,"a":2}',
    "duplicate-execute": b'{"execute":"guest-ping","execute":"guest-ping"}',
    "duplicate-nested": b'{"execute":"guest-ping","id":{"x":1,"x":1}}',
    "two-values-in-object": b'{"a":1 2}',
    "colon-in-list": b"[1:2]",
    # strings
    "invalid-escape-x": b'"\\x41"',
    "invalid-escape-in-request": b'{"execute":"guest-ping","id":"\\a"}',
    "short-unicode-escape": b'{"execute":"guest-ping","id":"\\u12"}',
    "bad-hex-unicode-escape": b'{"execute":"guest-ping","id":"\\u12G4"}',
    "lone-high-surrogate": b'{"execute":"guest-ping","id":"\\ud800"}',
    "lone-low-surrogate": b'{"execute":"guest-ping","id":"\\udc00"}',
    "high-surrogate-then-text": b'{"execute":"guest-ping","id":"\\ud800x"}',
    "high-surrogate-then-bmp-escape": b'{"execute":"guest-ping","id":"\\ud800\\u0041"}',
    "reversed-surrogates": b'{"execute":"guest-ping","id":"\\ude00\\ud83d"}',
    "noncharacter-uffff": b'"\\uffff"',
    "noncharacter-ufffe": b'{"execute":"guest-ping","id":"\\ufffe"}',
    "noncharacter-ufdd0": b'{"execute":"guest-ping","id":"\\ufdd0"}',
    "noncharacter-escaped-pair": b'{"execute":"guest-ping","id":"\\uDBFF\\uDFFF"}',
    "noncharacter-raw-bmp": b'{"execute":"guest-ping","id":"\xef\xbf\xbf"}',
    "noncharacter-raw-fdd0": b'{"execute":"guest-ping","id":"\xef\xb7\x90"}',
    "noncharacter-raw-astral": b'{"execute":"guest-ping","id":"\xf4\x8f\xbf\xbf"}',
    "raw-control-char": b'{"execute":"guest-ping","id":"a\x01b"}',
    "raw-control-1f": b'"\x1f"',
    "raw-newline-in-string": b'{"execute":"guest-ping","id":"a\nb"}',
    "raw-tab-in-string": b'{"execute":"guest-ping","id":"a\tb"}',
    "raw-nul": b"\x00",
    "raw-nul-in-string": b'{"execute":"guest-ping","id":"a\x00b"}',
    "control-char-top-level": b"\x01\x02",
    "unterminated-string-then-newline": b'{"execute":"guest-ping","id":"abc\n',
    # UTF-8
    "utf8-truncated-2byte": b'{"execute":"guest-ping","id":"\xc3"}',
    "utf8-lone-continuation": b'{"execute":"guest-ping","id":"\x80"}',
    "utf8-5-byte": b'{"execute":"guest-ping","id":"\xf8\x88\x80\x80\x80"}',
    "utf8-surrogate-encoded": b'{"execute":"guest-ping","id":"\xed\xa0\x80"}',
    "utf8-overlong-slash": b'{"execute":"guest-ping","id":"\xc0\xaf"}',
    "utf8-overlong-3byte": b'{"execute":"guest-ping","id":"\xe0\x80\x80"}',
    "utf8-overlong-c1": b'{"execute":"guest-ping","id":"\xc1\xbf"}',
    "utf8-above-10ffff": b'{"execute":"guest-ping","id":"\xf4\x90\x80\x80"}',
    "utf8-truncated-then-ascii": b'{"execute":"guest-ping","id":"\xe2\x82x"}',
    "utf8-outside-string": b"\xc3\xa9",
    "utf8-in-key": b'{"execute":"guest-ping","\xc3\xa9":1}',
    # 0xFF and 0xFE
    "ff-alone": b"\xff",
    "ff-twice": b"\xff\xff",
    "ff-inside-partial-request": b'{"execute":"guest-ping"\xff',
    "ff-inside-string": b'{"execute":"guest-ping","id":"ab\xff',
    "ff-then-request": b"\xff" + ping(b"1"),
    "ff-in-the-middle-then-request": b'{"execute":"guest-pi\xff' + ping(b"2"),
    "fe-alone": b"\xfe",
    "fe-inside-partial-request": b'{"execute":"guest-ping"\xfe',
    "fe-inside-string": b'{"execute":"guest-ping","id":"a\xfeb"}',
    # recovery: what follows an error is parsed afresh
    "error-then-request": b'{"a" 1}' + ping(b"8"),
    "stray-then-request-same-write": b"@@@" + ping(b"9"),
    "bad-escape-then-request": b'{"id":"\\q"}' + ping(b"10"),
}


@pytest.mark.parametrize("data", cases(MALFORMED))
def test_malformed_input(wire: Wire, data):
    lines = wire.compare(data)
    for line in lines:
        if b'"JSON parse error' in line:
            assert b'"id"' not in line, "parse errors never carry an id"


def test_reference_malformed_facts(wire: Wire):
    """A few errors whose exact text libvirt users quote, checked on qemu-ga itself."""
    lines = wire.ref.transcript(b'{"id":01}')
    assert lines == [
        b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'01\'"}}\n',
        b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\n',
        ERROR_STRAY_FF,
    ]
    assert wire.ref.transcript(b"\xff") == [ERROR_STRAY_FF, ERROR_STRAY_FF]


# -- request shape -------------------------------------------------------------------------

SHAPES = {
    "array": b"[]",
    "array-with-request": b'[{"execute":"guest-ping"}]',
    "number": b"42\n",
    "string": b'"guest-ping"',
    "true": b"true\n",
    "null": b"null\n",
    "empty-object": b"{}",
    "no-execute-with-id": b'{"id":5}',
    "no-execute-with-arguments": b'{"arguments":{},"id":5}',
    "execute-number": b'{"execute":1}',
    "execute-null-with-id": b'{"execute":null,"id":6}',
    "execute-object": b'{"execute":{"a":1}}',
    "execute-array": b'{"execute":["guest-ping"]}',
    "execute-empty": b'{"execute":""}',
    "arguments-null": b'{"execute":"guest-ping","arguments":null}',
    "arguments-array": b'{"execute":"guest-ping","arguments":[],"id":7}',
    "arguments-number": b'{"execute":"guest-ping","arguments":1}',
    "arguments-string": b'{"execute":"guest-ping","arguments":"x"}',
    "unexpected-member": b'{"execute":"guest-ping","foo":1}',
    "unexpected-member-with-id": b'{"execute":"guest-ping","foo":1,"id":8}',
    "unexpected-member-only": b'{"foo":1}',
    "unexpected-control": b'{"execute":"guest-ping","control":{}}',
    "exec-oob": b'{"exec-oob":"guest-ping"}',
    "exec-oob-with-id": b'{"exec-oob":"guest-ping","id":9}',
    "exec-oob-and-execute": b'{"execute":"guest-ping","exec-oob":"guest-ping"}',
    "exec-oob-number": b'{"exec-oob":1}',
    # several problems at once: which one is reported depends on qemu's checking order
    "bad-execute-and-bad-arguments": b'{"execute":1,"arguments":[]}',
    "bad-arguments-and-unexpected": b'{"execute":"guest-ping","arguments":[],"zzz":1}',
    "unexpected-and-no-execute": b'{"zzz":1,"arguments":{}}',
    "two-unexpected": b'{"execute":"guest-ping","b":1,"a":2}',
    "unexpected-and-bad-execute": b'{"a":1,"execute":2}',
    "unknown-command-and-bad-arguments": b'{"execute":"nope","arguments":1}',
    "unknown-command-and-unexpected": b'{"execute":"nope","extra":1}',
}


@pytest.mark.parametrize("data", cases(SHAPES))
def test_request_shape_errors(wire: Wire, data):
    wire.compare(data)


UNKNOWN = {
    "unknown": b'{"execute":"no-such-command"}',
    "unknown-with-id": b'{"execute":"no-such-command","id":1}',
    "wrong-case": b'{"execute":"GUEST-PING"}',
    "trailing-space": b'{"execute":"guest-ping "}',
    "non-ascii-name": '{"execute":"guest-p\u00efng","id":2}'.encode(),
    "qmp-capabilities": b'{"execute":"qmp_capabilities"}',
    "unknown-with-arguments": b'{"execute":"nope","arguments":{"a":1},"id":4}',
    "long-name": b'{"execute":"' + b"x" * 5000 + b'"}',
}


@pytest.mark.parametrize("data", cases(UNKNOWN))
def test_unknown_command(wire: Wire, data):
    lines = wire.compare(data)
    assert b'"class": "CommandNotFound"' in lines[0]


ARGUMENTS = {
    "sync-missing-id": b'{"execute":"guest-sync"}',
    "sync-empty-arguments": b'{"execute":"guest-sync","arguments":{}}',
    "sync-id-string": b'{"execute":"guest-sync","arguments":{"id":"1"},"id":1}',
    "sync-id-float": b'{"execute":"guest-sync","arguments":{"id":1.0}}',
    "sync-id-bool": b'{"execute":"guest-sync","arguments":{"id":true}}',
    "sync-id-null": b'{"execute":"guest-sync","arguments":{"id":null}}',
    "sync-id-2^63": b'{"execute":"guest-sync","arguments":{"id":9223372036854775808}}',
    "sync-id-minus-zero": b'{"execute":"guest-sync","arguments":{"id":-0}}',
    "sync-id-int64-min": b'{"execute":"guest-sync","arguments":{"id":-9223372036854775808}}',
    "sync-extra-argument": b'{"execute":"guest-sync","arguments":{"id":1,"foo":2}}',
    "sync-extra-before-missing": b'{"execute":"guest-sync","arguments":{"foo":2}}',
    "ping-extra-argument": b'{"execute":"guest-ping","arguments":{"x":1},"id":"e"}',
}


@pytest.mark.parametrize("data", cases(ARGUMENTS))
def test_argument_errors_of_protocol_commands(wire: Wire, data):
    wire.compare(data)


# -- guest-sync and guest-sync-delimited -------------------------------------------------

SYNC = {
    "sync": b'{"execute":"guest-sync","arguments":{"id":5}}',
    "sync-with-request-id": b'{"execute":"guest-sync","arguments":{"id":5},"id":"req"}',
    "sync-negative": b'{"execute":"guest-sync","arguments":{"id":-1}}',
    "sync-int64-max": b'{"execute":"guest-sync","arguments":{"id":9223372036854775807}}',
    "delimited": b'{"execute":"guest-sync-delimited","arguments":{"id":5}}',
    "delimited-with-request-id": b'{"execute":"guest-sync-delimited","arguments":{"id":5},"id":"r"}',
    "delimited-twice": b'{"execute":"guest-sync-delimited","arguments":{"id":1}}'
                       b'{"execute":"guest-sync-delimited","arguments":{"id":2}}',
    "delimited-then-ping": b'{"execute":"guest-sync-delimited","arguments":{"id":3}}' + ping(b"4"),
    "delimited-error-not-delimited": b'{"execute":"guest-sync-delimited"}' + ping(b"5"),
    "delimited-bad-id-then-ping": b'{"execute":"guest-sync-delimited","arguments":{"id":"x"}}'
                                  + ping(b"6"),
    "ff-then-delimited": b'\xff{"execute":"guest-sync-delimited","arguments":{"id":7}}',
    "delimited-then-parse-error": b'{"execute":"guest-sync-delimited","arguments":{"id":8}}}',
    "delimited-then-unknown": b'{"execute":"guest-sync-delimited","arguments":{"id":9}}'
                              + unknown(b"10"),
}


@pytest.mark.parametrize("data", cases(SYNC))
def test_sync(wire: Wire, data):
    wire.compare(data)


def test_reference_sync_delimited_facts(wire: Wire):
    """0xFF precedes the sync-delimited reply exactly once and nothing else."""
    lines = wire.ref.transcript(SYNC["delimited-with-request-id"] + ping(b"1"))
    assert lines[0] == b'\xff{"return": 5, "id": "r"}\n'
    assert all(b"\xff" not in line for line in lines[1:])
    lines = wire.ref.transcript(SYNC["delimited-error-not-delimited"])
    assert lines[0] == b'{"error": {"class": "GenericError", "desc": "Parameter \'id\' is missing"}}\n'
    assert all(b"\xff" not in line for line in lines)
    lines = wire.ref.transcript(SYNC["delimited-twice"])
    assert [line.count(b"\xff") for line in lines[:2]] == [1, 1]


# -- limits ------------------------------------------------------------------------------------


def nested_request(depth: int) -> bytes:
    """A ping whose id nests arrays so that the whole message is ``depth`` levels deep."""
    inner = depth - 1
    return b'{"execute":"guest-ping","id":' + b"[" * inner + b"]" * inner + b"}"


@pytest.mark.parametrize("depth", [1023, 1024])
def test_nesting_within_limit(wire: Wire, depth):
    lines = wire.compare(nested_request(depth))
    assert lines[0].startswith(b'{"return": {}, "id": [[')


def test_nesting_over_limit(wire: Wire):
    lines = wire.compare(nested_request(1025))
    assert lines[0] == b'{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}\n'


@pytest.mark.parametrize("depth", [1024, 1025])
def test_nesting_of_arrays_only(wire: Wire, depth):
    wire.compare(b"[" * depth + b"]" * depth)


def test_nesting_objects(wire: Wire):
    deep = b'{"a":' * 1024 + b"1" + b"}" * 1024
    wire.compare(deep)
    wire.compare(b'{"a":' * 1025 + b"1" + b"}" * 1025)


def test_token_count_limit(wire: Wire):
    """2 Mi tokens are fine, 2 Mi + 1 are not; then the agent works again."""
    within = b"[" + b"0," * (MiB - 2) + b"0]"  # 2 Mi - 1 tokens: a valid array
    over = b"[" + b"0," * MiB  # 2 Mi + 1 tokens, the last one trips the limit
    for data in (within, over):
        expected, actual = wire.both(data, timeout=120)
        assert actual[:1] == expected[:1], wire.mismatch(data, expected[:3], actual[:3])
    assert expected[0] == b'{"error": {"class": "GenericError", "desc": "JSON token count limit exceeded"}}\n'
    wire.compare(ping(b"1"))


def test_token_size_limit(wire: Wire):
    """One string token of 64 MiB: the first error and the recovery must match."""
    data = b'["' + b"a" * (64 * MiB) + b'"]'
    expected, actual = wire.both(data, timeout=180)
    assert expected[0] == b'{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}\n'
    assert actual[:1] == expected[:1], wire.mismatch(data, expected[:3], actual[:3])
    wire.compare(ping(b"2"))


# -- connections ---------------------------------------------------------------------------------


def test_parser_state_survives_reconnect(wire: Wire):
    """Client A leaves half a request behind; client B's bytes complete it."""
    for session in wire.sessions():
        session.send(b'{"execute":"guest-ping",')
        session.close()
    wire.connect(resync=False)
    wire.compare(b'"id":42}')
    for session in wire.sessions():
        session.close()
    wire.connect(resync=False)
    expected, _ = wire.both(b"")
    assert expected == [ERROR_STRAY_FF], "the completed request left nothing behind"


def test_half_string_survives_reconnect(wire: Wire):
    for session in wire.sessions():
        session.send(b'{"execute":"guest-ping","id":"half')
        session.close()
    wire.connect(resync=False)
    lines = wire.compare(b' done"}')
    assert lines[0] == b'{"return": {}, "id": "half done"}\n'


def test_second_client_waits_for_the_first(wire: Wire):
    """unix-listen serves one client at a time; the next one's bytes wait in the socket."""
    from tests.compat.conftest import Session

    waiting = [Session(s.name + " second", s.agent) for s in wire.sessions()]
    try:
        for session in waiting:
            session.connect(resync=False)
            session.send(ping(b'"second"'))
        assert [session.read_quiet(0.3) for session in waiting] == [b"", b""]
        wire.compare(ping(b'"first"'))
        wire.close()
        results = []
        for session in waiting:
            session.send(b"\n")
            results.append(session.transcript(b""))
        assert results[1] == results[0], f"{results[0]!r} != {results[1]!r}"
        assert results[0] == [b'{"return": {}, "id": "second"}\n', ERROR_STRAY_FF]
    finally:
        for session in waiting:
            session.close()


def test_no_banner_on_connect(wire: Wire):
    wire.close()
    wire.connect(resync=False)
    assert [session.read_quiet(0.5) for session in wire.sessions()] == [b"", b""]


def test_nothing_written_without_a_request(wire: Wire):
    wire.compare(ping(b"1"))
    assert [session.read_quiet(0.5) for session in wire.sessions()] == [b"", b""]


def test_incomplete_request_gets_no_reply(wire: Wire):
    for data in (b'{"execute":"guest-ping"', b'{"execute":"guest-ping","id":12', b"42", b"tru"):
        for session in wire.sessions():
            session.send(data)
        quiet = [session.read_quiet(0.3) for session in wire.sessions()]
        assert quiet == [b"", b""], data
        wire.compare(b"")


# -- reply format ------------------------------------------------------------------------------


def test_reply_line_format(wire: Wire):
    """ASCII only, ": " and ", " separators, one "\\n", no "\\r" -- on both agents."""
    request = ping('{"k":[1,"\u00e9",null,true,false,1.5,{}],"\U0001f600":{"a":"\\n"}}'.encode())
    data = request + unknown(b"2") + b"[]"
    lines = wire.compare(data)
    for line in lines:
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert b"\r" not in line
        assert line.isascii() or line.startswith(b"\xff")
    assert lines[0] == (b'{"return": {}, "id": {"k": [1, "\\u00E9", null, true, false, 1.5, {}], '
                        b'"\\uD83D\\uDE00": {"a": "\\n"}}}\n')


def _shape(value):
    """A JSON value's structure: types and keys, no leaf values."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


def test_guest_info_shape(wire: Wire):
    """guest-info differs in content (version, command set) but not in shape."""
    expected, actual = wire.both(b'{"execute":"guest-info","id":1}')
    assert len(expected) == len(actual) == 2
    ref, cand = json.loads(expected[0]), json.loads(actual[0])
    assert list(cand) == list(ref) == ["return", "id"]
    assert _shape(cand) == _shape(ref)
    names = [entry["name"] for entry in cand["return"]["supported_commands"]]
    for name in ("guest-sync", "guest-sync-delimited", "guest-ping", "guest-info"):
        assert name in names
    assert actual[1] == expected[1]


def test_many_requests_in_one_connection(wire: Wire):
    """A long run of mixed requests and errors keeps both agents in step."""
    data = b"".join(ping(b"%d" % i) + (b"}" if i % 7 == 0 else b"") + (unknown(b"%d" % i) if i % 5 == 0 else b"")
                    for i in range(200))
    lines: List[bytes] = wire.compare(data)
    assert len(lines) == 200 + 29 + 40 + 1
