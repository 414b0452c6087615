"""QDict and GHashTable orders (qga.qdict_order), against values seen on qemu-ga 7.2."""

from __future__ import annotations

import pytest

from qga.qdict_order import first_unexpected, g_str_hash, qdict_order, tdb_hash


def test_hash_functions_known_values():
    # g_str_hash is djb2: h = h * 33 + c from 5381, over signed chars.
    assert g_str_hash("") == 5381
    assert g_str_hash("a") == (5381 * 33 + 97) & 0xFFFFFFFF
    assert g_str_hash("\u00e9") == ((5381 * 33 + (0xC3 - 256)) * 33 + (0xA9 - 256)) & 0xFFFFFFFF
    assert tdb_hash("") == 12345


@pytest.mark.parametrize("keys, wire_order", [
    # Member orders of replies written by qemu-ga 7.2.
    (["return", "id"], ["return", "id"]),
    (["error", "id"], ["id", "error"]),
    (["desc", "class"], ["class", "desc"]),
    (["phys-index", "response", "error-code"], ["response", "error-code", "phys-index"]),
    (["count", "buf-b64", "eof"], ["count", "buf-b64", "eof"]),
])
def test_qdict_order_matches_qemu_replies(keys, wire_order):
    assert qdict_order(keys) == wire_order


def test_qdict_bucket_lists_newest_first():
    # Find two keys sharing a bucket: the one inserted last comes first.
    seen = {}
    for number in range(5000):
        key = f"k{number}"
        bucket = tdb_hash(key) % 512
        if bucket in seen:
            first = seen[bucket]
            assert qdict_order([first, key]) == [key, first]
            assert qdict_order([key, first]) == [first, key]
            return
        seen[bucket] = key
    raise AssertionError("no collision found")


@pytest.mark.parametrize("keys, consumed, expected", [
    # Measured with guest-ping / guest-sync on qemu-ga 7.2.
    (["a", "b"], [], "b"),
    (["b", "a"], [], "b"),
    (["b", "a", "c"], [], "b"),
    (["zz", "id"], ["id"], "zz"),
])
def test_first_unexpected_matches_qemu(keys, consumed, expected):
    assert first_unexpected(keys, consumed) == expected


def test_first_unexpected_survives_growth_and_removal():
    keys = [f"member{number}" for number in range(40)]
    consumed = keys[:35]
    result = first_unexpected(keys, consumed)
    assert result in keys[35:]
    assert first_unexpected(keys, keys) is None
