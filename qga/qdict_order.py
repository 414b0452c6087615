"""The iteration orders of QEMU's QDict and GLib's GHashTable, reproduced.

qemu-ga never sorts anything: where several things could be reported or
written, the order is whatever its hash tables yield.  Two places make that
visible on the wire:

* a request with several bad top-level members reports the *first one in
  QDict order* (``qmp_dispatch_check_obj`` walks the request dict), and every
  JSON object qemu-ga writes lists its members in QDict order;
* arguments with several unexpected members report the first one a
  ``GHashTable`` iterator yields (``qobject_input_check_struct``).

A QDict is 512 buckets chosen by ``tdb_hash``; ``qdict_first``/``qdict_next``
walk the buckets in index order, and a bucket lists its newest entry first.

The visitor copies the argument keys into a ``GHashTable(g_str_hash)`` in
QDict order, removes every declared member it visits, then takes the first
key left.  GLib's table is open addressing with quadratic probing, a
``(hash * 11) % prime`` home slot, tombstones, and an in-place rehash when it
grows or shrinks; all of it changes which key comes first, so all of it is
modelled here.  Both orders were checked against the real qemu-ga 7.2
(``tests/compat``).  These functions run only on error paths.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

_MASK32 = 0xFFFFFFFF
_QDICT_BUCKETS = 512

# GLib's prime_mod[] table: the modulus used for a table of 1 << shift slots.
_PRIME_MOD = (
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381,
    32749, 65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593,
    16777213, 33554393, 67108859, 134217689, 268435399, 536870909, 1073741789,
    2147483647,
)
_MIN_SHIFT = 3
_UNUSED, _TOMBSTONE = 0, 1


def _c_string(key: str) -> bytes:
    # QEMU keys are C strings: UTF-8, cut at the first NUL.
    return key.encode("utf-8", "surrogatepass").split(b"\0", 1)[0]


def tdb_hash(key: str) -> int:
    """QDict's bucket hash (``tdb_hash`` in qobject/qdict.c)."""
    data = _c_string(key)
    value = (0x238F13AF * len(data)) & _MASK32
    for index, byte in enumerate(data):
        value = (value + ((byte << (index * 5 % 24)) & _MASK32)) & _MASK32
    return (1103515243 * value + 12345) & _MASK32


def g_str_hash(key: str) -> int:
    """GLib's ``g_str_hash`` (djb2 over *signed* chars)."""
    value = 5381
    for byte in _c_string(key):
        if byte >= 0x80:
            byte -= 0x100
        value = (value * 33 + byte) & _MASK32
    return value


def qdict_order(keys: Iterable[str]) -> List[str]:
    """The order a QDict built by inserting ``keys`` (in order) iterates in."""
    buckets: dict = {}
    for key in keys:
        # QLIST_INSERT_HEAD: a bucket lists its newest entry first.
        buckets.setdefault(tdb_hash(key) % _QDICT_BUCKETS, []).insert(0, key)
    return [key for bucket in sorted(buckets) for key in buckets[bucket]]


class _StringHashTable:
    """Just enough of GLib's GHashTable (ghash.c) to know its iteration order."""

    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: List[Optional[str]] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _home(self, hash_value: int) -> int:
        return ((hash_value * 11) & _MASK32) % self.mod

    def _lookup(self, key: str):
        hash_value = g_str_hash(key)
        if hash_value < 2:  # 0 and 1 mark unused and deleted slots
            hash_value = 2
        index = self._home(hash_value)
        step = 0
        tombstone = None
        while self.hashes[index] != _UNUSED:
            if self.hashes[index] == hash_value and self.keys[index] == key:
                return index, hash_value
            if self.hashes[index] == _TOMBSTONE and tombstone is None:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return (index if tombstone is None else tombstone), hash_value

    def insert(self, key: str) -> None:
        index, hash_value = self._lookup(key)
        previous = self.hashes[index]
        if previous >= 2:
            return
        self.hashes[index] = hash_value
        self.keys[index] = key
        self.nnodes += 1
        if previous == _UNUSED:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        index, _ = self._lookup(key)
        if self.hashes[index] < 2:
            return
        self.hashes[index] = _TOMBSTONE
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        if ((self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT)
                or self.size <= self.noccupied + self.noccupied // 16):
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        wanted = int(self.nnodes * 1.333)
        shift = 0
        while wanted:
            wanted >>= 1
            shift += 1
        self._set_shift(max(shift, _MIN_SHIFT))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        placed = set()
        # resize_map(): rehash in place, evicting entries along the way.
        for index in range(old_size):
            node_hash = self.hashes[index]
            if node_hash < 2:
                self.hashes[index] = _UNUSED
                continue
            if index in placed:
                continue
            self.hashes[index] = _UNUSED
            key, self.keys[index] = self.keys[index], None
            while True:
                slot = self._home(node_hash)
                step = 0
                while slot in placed:
                    step += 1
                    slot = (slot + step) & self.mask
                placed.add(slot)
                replaced = self.hashes[slot]
                self.hashes[slot] = node_hash
                if replaced < 2:
                    self.keys[slot] = key
                    break
                node_hash = replaced
                key, self.keys[slot] = self.keys[slot], key
        if self.size < old_size:
            del self.hashes[self.size:]
            del self.keys[self.size:]
        self.noccupied = self.nnodes

    def first(self) -> Optional[str]:
        for index in range(self.size):
            if self.hashes[index] >= 2:
                return self.keys[index]
        return None


def first_unexpected(keys: Iterable[str], consumed: Iterable[str]) -> Optional[str]:
    """The member qemu's input visitor reports as unexpected.

    ``keys`` are the object's members in the order they were parsed;
    ``consumed`` the declared members that were present, in the order the
    visitor took them (schema order).
    """
    table = _StringHashTable()
    for key in qdict_order(keys):
        table.insert(key)
    for key in consumed:
        table.remove(key)
    return table.first()
