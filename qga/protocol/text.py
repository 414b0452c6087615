"""Unicode rules of qemu's JSON code: "modified UTF-8" in, escaped ASCII out.

qemu validates and emits strings with its own UTF-8 walker
(``mod_utf8_codepoint``), which differs from Python's codec in ways a host can
see: the overlong ``C0 80`` is accepted as NUL, noncharacters (U+FDD0..U+FDEF
and U+xxFFFE/U+xxFFFF) are invalid, and an invalid sequence is skipped
differently.  These functions reproduce those rules.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

REPLACEMENT = "\ufffd"

_MIN_BY_LENGTH = {2: 0x80, 3: 0x800, 4: 0x10000, 5: 0x200000, 6: 0x4000000}
NONCHARACTER = re.compile("[\ufdd0-\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff"
                           "\U0003fffe\U0003ffff\U0004fffe\U0004ffff\U0005fffe\U0005ffff"
                           "\U0006fffe\U0006ffff\U0007fffe\U0007ffff\U0008fffe\U0008ffff"
                           "\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe\U000bffff"
                           "\U000cfffe\U000cffff\U000dfffe\U000dffff\U000efffe\U000effff"
                           "\U000ffffe\U000fffff\U0010fffe\U0010ffff]")


def is_valid_codepoint(cp: int) -> bool:
    """qemu's ``is_valid_codepoint``: in range, not a surrogate, not a noncharacter."""
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


def codepoint_at(data: bytes, pos: int) -> Tuple[int, int]:
    """Decode one code point at ``pos`` like ``mod_utf8_codepoint(s, 6, &end)``.

    Returns ``(codepoint, end)``; codepoint is -1 for an invalid sequence and
    ``end`` is where qemu resumes (it stops *at* a missing continuation byte).
    """
    byte = data[pos]
    end = pos + 1
    if byte < 0x80:
        return byte, end
    if byte >= 0xFE or not byte & 0x40:
        return -1, end
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    limit = len(data)
    for i in range(1, length):
        # qemu reads at most 6 bytes; past the data it sees NUL.
        following = data[pos + i] if pos + i < limit and i < 6 else 0
        if following & 0xC0 != 0x80:
            return -1, pos + i
        end = pos + i + 1
        cp = (cp << 6) | (following & 0x3F)
    if not is_valid_codepoint(cp):
        return -1, end
    if cp < _MIN_BY_LENGTH[length] and not (cp == 0 and length == 2):
        return -1, end
    return cp, end


def decode_strict(data: bytes) -> Optional[str]:
    """Decode string content as qemu's parser does, or None if qemu rejects it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return _decode_slowly(data, strict=True)
    if NONCHARACTER.search(text):
        return None
    return text


def decode_lenient(data: bytes) -> str:
    """Decode arbitrary bytes for output, invalid sequences becoming U+FFFD.

    This is what qemu's JSON writer does with a string holding raw bytes,
    e.g. the text of a stray token in a parse error.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return _decode_slowly(data, strict=False)  # type: ignore[return-value]
    return NONCHARACTER.sub(REPLACEMENT, text)


def _decode_slowly(data: bytes, strict: bool) -> Optional[str]:
    out = []
    pos = 0
    size = len(data)
    while pos < size:
        cp, pos = codepoint_at(data, pos)
        if cp < 0:
            if strict:
                return None
            out.append(REPLACEMENT)
        else:
            out.append(chr(cp))
    return "".join(out)
