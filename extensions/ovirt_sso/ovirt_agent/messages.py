"""The oVirt channel's messages: names, version gating, text filtering, line framing (sans-IO).

Agent -> host messages are one JSON object per line with the message name
under ``__name__``, written the way the original agent wrote them:
``json.dumps`` with its default separators and ``ensure_ascii``, so the wire
is pure ASCII with ``\\uXXXX`` escapes.  Before that every string, keys
included, is made text (bytes decoded with the locale's encoding, else with
replacement, else ``????``) and filtered: the characters VDSM may not pass on
through XML (:data:`FILTERED`) become U+FFFD.

VDSM drops any line it cannot see the end of within 1 MiB
(:data:`MAX_LINE`).  The original agent sent such lines anyway, and the
host lost them whole; here a message whose payload is a list (applications,
interfaces, disks, containers) is cut to the items that fit, and any other
message over the limit is not sent (:func:`fit`).

Host -> agent lines are decoded as strict UTF-8 JSON objects with a string
``__name__``; anything else is dropped silently (:func:`parse_command`).
"""

from __future__ import annotations

import json
import locale
import re
from typing import Any, Dict, Optional, Tuple

MAX_API_VERSION = 3
DISABLED_API_VERSION = 0

#: The lowest negotiated API version each agent -> host message needs.
MESSAGE_MIN_API_VERSION: Dict[str, int] = {
    "active-user": 0,
    "applications": 0,
    "disks-usage": 0,
    "echo": 0,
    "fqdn": 0,
    "heartbeat": 0,
    "host-name": 0,
    "memory-stats": 0,
    "network-interfaces": 0,
    "os-version": 0,
    "session-lock": 0,
    "session-logoff": 0,
    "session-logon": 0,
    "session-shutdown": 0,
    "session-startup": 0,
    "session-unlock": 0,
    "number-of-cpus": 1,
    "os-info": 2,
    "timezone": 2,
    "containers": 3,
    "completion": 3,
}

#: VDSM's MAX_MESSAGE_SIZE: a line whose end it has not seen within this many
#: bytes is thrown away.  A line of at most this size, newline included, is safe.
MAX_LINE = 1 << 20

#: Messages whose payload is one list that may be cut to fit MAX_LINE.
TRIMMABLE = {
    "applications": "applications",
    "network-interfaces": "interfaces",
    "disks-usage": "disks",
    "containers": "list",
}

REPLACEMENT = "\ufffd"

#: XML 1.1 RestrictedChar and the XML-invalid code points (VDSM's _FILTERED_CHARS).
FILTERED = re.compile("[\u0000-\u0008\u000b-\u000c\u000e-\u001f\u007f-\u0084\u0086-\u009f"
                      "\ud800-\udfff\ufffe-\uffff]")


def allowed(name: str, version: int) -> Optional[bool]:
    """Whether ``name`` may be sent at API ``version``; None for a name not in the table."""
    minimum = MESSAGE_MIN_API_VERSION.get(name)
    return None if minimum is None else minimum <= version


def to_text(value: Any) -> str:
    """A string as text: bytes decoded as the original did (locale, replace, ``????``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        encoding = locale.getpreferredencoding(False) or "utf-8"
        try:
            return bytes(value).decode(encoding)
        except UnicodeDecodeError:
            return bytes(value).decode(encoding, "replace")
        except LookupError:
            return "????"
    raise TypeError(f"{type(value).__name__} is not text")


def filter_text(text: str) -> str:
    return FILTERED.sub(REPLACEMENT, text)


def sanitize(value: Any) -> Any:
    """``value`` with every string (dict keys too) made text and filtered; tuples become lists."""
    if isinstance(value, (str, bytes, bytearray)):
        return filter_text(to_text(value))
    if isinstance(value, dict):
        return {sanitize(key): sanitize(member) for key, member in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [sanitize(member) for member in value]
    return value


def encode(name: str, arguments: Optional[Dict[str, Any]] = None) -> bytes:
    """One message as the line the original agent wrote (ASCII, newline-terminated)."""
    message: Dict[str, Any] = {"__name__": name}
    message.update(arguments or {})
    return (json.dumps(sanitize(message)) + "\n").encode("ascii")


def fit(name: str, arguments: Optional[Dict[str, Any]] = None,
        max_line: int = MAX_LINE) -> Tuple[Optional[bytes], int]:
    """The message's line within ``max_line`` bytes, and how many list items were cut.

    Returns ``(None, 0)`` when the message cannot be made to fit.
    """
    line = encode(name, arguments)
    if len(line) <= max_line:
        return line, 0
    key = TRIMMABLE.get(name)
    items = (arguments or {}).get(key) if key else None
    if not isinstance(items, (list, tuple)):
        return None, 0
    items = list(items)

    def line_with(count: int) -> bytes:
        return encode(name, dict(arguments or {}, **{key: items[:count]}))

    # The largest prefix of the list that fits: binary search on its length.
    low, high = 0, len(items)
    best = line_with(0)
    if len(best) > max_line:
        return None, 0
    while low < high:
        middle = (low + high + 1) // 2
        candidate = line_with(middle)
        if len(candidate) <= max_line:
            low, best = middle, candidate
        else:
            high = middle - 1
    return best, len(items) - low


def parse_command(line: bytes) -> Optional[Tuple[str, Dict[str, Any]]]:
    """A host line as ``(name, arguments)``; None when the original would drop it."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    name = value.pop("__name__", None)
    if not isinstance(name, str):
        return None
    return name, value
