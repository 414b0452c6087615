"""The oVirt message layer: gating table, text filtering, ASCII lines, the 1 MiB limit, parsing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extensions" / "ovirt_sso"))

from ovirt_agent import messages  # noqa: E402
from tests.support.fake_vdsm import VdsmReader, filter_object  # noqa: E402


def test_the_gating_table_is_the_originals():
    by_version = {}
    for name, version in messages.MESSAGE_MIN_API_VERSION.items():
        by_version.setdefault(version, set()).add(name)
    assert by_version == {
        0: {"active-user", "applications", "disks-usage", "echo", "fqdn", "heartbeat",
            "host-name", "memory-stats", "network-interfaces", "os-version", "session-lock",
            "session-logoff", "session-logon", "session-shutdown", "session-startup",
            "session-unlock"},
        1: {"number-of-cpus"},
        2: {"os-info", "timezone"},
        3: {"containers", "completion"},
    }
    assert messages.allowed("timezone", 1) is False and messages.allowed("timezone", 2)
    assert messages.allowed("api-version", 3) is None


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x05", "\x08", "\x0b", "\x0c", "\x0e",
                                  "\x1f", "\x7f", "\x84", "\x86", "\x9f", "\ufffe", "\uffff",
                                  "\ud800", "\udc79"])
def test_restricted_characters_become_the_replacement_character(char):
    assert messages.sanitize({"k" + char: ["a" + char]}) == {"k\ufffd": ["a\ufffd"]}


@pytest.mark.parametrize("char", ["\t", "\n", "\r", "\x85", "\u2122", "\u0f65", "\U0001f600"])
def test_allowed_characters_pass(char):
    assert messages.sanitize(char) == char


def test_byte_strings_become_text_keys_included():
    assert messages.sanitize({b"name": [b"caf\xc3\xa9", (1, None, True)]}) == {
        "name": ["caf\u00e9", [1, None, True]]}
    # Not valid in the locale's encoding: replaced, not refused.
    assert "\ufffd" in messages.sanitize(b"\xff\xfe")


def test_lines_are_ascii_json_with_the_name():
    line = messages.encode("active-user", {"name": "J\u00fcrgen\x07"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")
    assert json.loads(line) == {"__name__": "active-user", "name": "J\u00fcrgen\ufffd"}
    assert b'"name": "J\\u00fcrgen\\ufffd"' in line   # json.dumps's default separators
    assert messages.encode("session-startup") == b'{"__name__": "session-startup"}\n'


def test_vdsm_reads_what_we_write():
    reader = VdsmReader()
    reader.handle_chunk(messages.encode("host-name", {"name": "guest\u2122"})
                        + messages.encode("applications", {"applications": ["a-1", "b-2"]}))
    assert reader.guest_info["guestName"] == "guest\u2122"
    assert reader.guest_info["appsList"] == ("a-1", "b-2")
    assert not reader.errors and not reader.exceptions


def test_fit_trims_list_payloads_to_the_line_limit():
    apps = [f"package-number-{i:06d}-1.0-1.el9" for i in range(40000)]   # ~1.4 MiB
    whole = messages.encode("applications", {"applications": apps})
    assert len(whole) > messages.MAX_LINE
    line, cut = messages.fit("applications", {"applications": apps})
    assert len(line) <= messages.MAX_LINE and cut > 0
    kept = json.loads(line)["applications"]
    assert kept == apps[:len(apps) - cut]
    # One more item would not have fitted.
    assert len(messages.encode("applications", {"applications": apps[:len(kept) + 1]})) \
        > messages.MAX_LINE
    # VDSM drops the whole line, but takes the trimmed one.
    reader = VdsmReader()
    for data in (whole, line):
        for start in range(0, len(data), 65536):
            reader.handle_chunk(data[start:start + 65536])
    assert reader.too_big == 1 and len(reader.guest_info["appsList"]) == len(kept)


def test_fit_drops_what_cannot_be_trimmed():
    assert messages.fit("echo", {"data": "x" * messages.MAX_LINE}) == (None, 0)
    assert messages.fit("applications", {"applications": ["x"], "pad": "y" * (1 << 20)}) \
        == (None, 0)
    small = {"applications": ["a"]}
    assert messages.fit("applications", small) == (messages.encode("applications", small), 0)
    # Exactly the limit, newline included, is still safe for VDSM.
    line, _ = messages.fit("echo", {"d": ""})
    padding = messages.MAX_LINE - len(line)
    exact, cut = messages.fit("echo", {"d": "x" * padding})
    assert len(exact) == messages.MAX_LINE and cut == 0
    assert messages.fit("echo", {"d": "x" * (padding + 1)}) == (None, 0)


@pytest.mark.parametrize("line,parsed", [
    (b'{"__name__": "refresh", "apiVersion": 3}', ("refresh", {"apiVersion": 3})),
    (b'{"apiVersion": 3, "__name__": "api-version"}\r', ("api-version", {"apiVersion": 3})),
    (b'{"__name__": "echo"}', ("echo", {})),
    (b"", None),
    (b"{", None),
    (b"[1, 2]", None),
    (b'"refresh"', None),
    (b'{"apiVersion": 3}', None),
    (b'{"__name__": 7}', None),
    (b'{"__name__": "echo", "x": "\xff"}', None),            # not UTF-8
    (b"[" * 100000, None),                                    # deeper than json can go
])
def test_host_lines(line, parsed):
    assert messages.parse_command(line) == parsed


def test_the_filter_is_vdsms():
    text = "".join(chr(code) for code in range(0, 0x2000)) + "\ud800\udfff\ufffe\uffff"
    assert messages.filter_text(text) == filter_object(text)
