"""Read-only facts about the guest system: host name, OS release, clock, time zone, users, load.

Every reply is built the way qemu-ga builds it, including its quirks, because
management software parses these replies and compares guests:

* ``guest-get-osinfo`` reads ``$QGA_OS_RELEASE``, else ``/etc/os-release``,
  else ``/usr/lib/os-release`` as a GLib key file (so a line GLib rejects
  makes the whole file unusable) and post-processes each value as qemu-ga
  does: a value starting with ``"`` is cut at the next unescaped ``"``
  (without a closing quote the text is shifted over itself, like qemu-ga's
  in-place copy); any other value, single-quoted ones included, is cut at
  the first space or ``;``.
* ``guest-get-timezone`` reports what GLib's local time zone says, and GLib
  refuses some ``TZ`` values glibc accepts (it then falls back to UTC); see
  :func:`glib_accepts_tz`.
* ``guest-get-users`` reads the utmp file record by record (x86_64 layout)
  like ``getutxent``.

The parsed os-release file is cached by the file's identity (device, inode,
size, change times), so repeated calls cost a ``stat`` instead of a parse.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from typing import Dict, List, Optional, Tuple

from qga.commands import command
from qga.errors import CommandError

OS_RELEASE_FILES = ("/etc/os-release", "/usr/lib/os-release")
UTMP_FILE = "/var/run/utmp"
LOADAVG_FILE = "/proc/loadavg"

# os-release keys in the order qemu-ga reads them, with the reply member names.
OS_RELEASE_FIELDS = (
    ("ID", "id"),
    ("NAME", "name"),
    ("PRETTY_NAME", "pretty-name"),
    ("VERSION", "version"),
    ("VERSION_ID", "version-id"),
    ("VARIANT", "variant"),
    ("VARIANT_ID", "variant-id"),
)

# gethostname() fails with ENAMETOOLONG unless the name and its NUL fit in
# sysconf(_SC_HOST_NAME_MAX) bytes, which is 64 on Linux.
HOST_NAME_MAX = 64


def in_order(value: dict, members: Tuple[str, ...]) -> dict:
    """``value`` with its members in schema order (``members``); absent ones are skipped.

    The reply writer lists an object's members in qemu's QDict order, which
    depends on the order the members were inserted: qemu inserts them in
    schema order, so handlers build their dicts in schema order too.
    """
    return {key: value[key] for key in members if key in value}


def read_file(path: str) -> bytes:
    """The whole content of a (small, often virtual) file; raises OSError.

    Plain ``os`` calls: for sysfs and procfs files the buffered ``open()``
    machinery costs more than the system calls themselves.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_fd(fd)
    finally:
        os.close(fd)


def read_fd(fd: int) -> bytes:
    """Everything left to read from ``fd`` (left open); raises OSError."""
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def decode(raw: bytes) -> str:
    """Text from the system for a reply; bytes that are not UTF-8 become U+FFFD."""
    return raw.decode("utf-8", "replace")


# -- guest-get-host-name -------------------------------------------------------


@command("guest-get-host-name")
def get_host_name(ctx) -> dict:
    # qemu-ga calls gethostname() each time (GLib's cached name would miss
    # renames); glibc's gethostname() is uname()'s node name.
    # qemu-ga's "localhost" fallback only happens together with an error,
    # and the error is what the host sees.
    node = os.uname().nodename.encode("utf-8", "surrogateescape")
    if len(node) + 1 > HOST_NAME_MAX:
        raise CommandError("cannot get hostname: " + os.strerror(errno.ENAMETOOLONG))
    return {"host-name": decode(node)}


# -- guest-get-time / guest-get-load ----------------------------------------------


@command("guest-get-time")
def get_time(ctx) -> int:
    # g_get_real_time() * 1000: nanoseconds with microsecond resolution.
    return time.time_ns() // 1000 * 1000


@command("guest-get-load")
def get_load(ctx) -> dict:
    try:
        fd = os.open(LOADAVG_FILE, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 64)
        finally:
            os.close(fd)
    except OSError as error:
        raise CommandError("cannot query load average: " + os.strerror(error.errno)) from None
    fields = data.split()
    try:
        load1, load5, load15 = (float(field) for field in fields[:3])
    except ValueError:
        raise CommandError("cannot query load average: Success") from None
    return {"load1m": load1, "load5m": load5, "load15m": load15}


# -- guest-get-osinfo -----------------------------------------------------------

# g_ascii_isspace(): unlike C isspace(), no vertical tab.
_ASCII_SPACE = " \t\n\f\r"


class KeyFileError(ValueError):
    """The data is not a key file GLib would load."""


def parse_key_file(data: bytes, group: str) -> Dict[str, str]:
    """The raw values of ``group`` in a GLib key file, as ``g_key_file_get_value`` sees them.

    Implements the parts of GLib's parser that decide whether a file loads
    and what a value is: comments, group lines, ``key=value`` lines (key
    trimmed, value with leading whitespace dropped, nothing unescaped), the
    last of duplicate keys winning, the ``Encoding`` key check.  Raises
    :class:`KeyFileError` where GLib refuses the whole file.
    """
    data = data.split(b"\0", 1)[0]  # GLib validates and copies up to the first NUL
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError("file is not UTF-8") from None
    groups: Dict[str, Dict[str, str]] = {}
    current: Optional[Dict[str, str]] = None
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if index < len(lines) - 1 and line.endswith("\r"):
            line = line[:-1]  # CR before LF is dropped; a CR on the last line stays
        start = line.lstrip(_ASCII_SPACE)
        if not start or start[0] == "#":
            continue
        if _is_group_line(start):
            name = start[1:start.rindex("]")]
            if not name or any(c in "[]" or ord(c) < 0x20 or c == "\x7f" for c in name):
                raise KeyFileError("invalid group name")
            current = groups.setdefault(name, {})
            continue
        equals = start.find("=")
        if equals <= 0:
            raise KeyFileError("not a key-value pair, group, or comment")
        if current is None:
            raise KeyFileError("key file does not start with a group")
        key = start[:equals].rstrip(_ASCII_SPACE)
        if not _is_key_name(key):
            raise KeyFileError("invalid key name")
        value = start[equals + 1:].lstrip(_ASCII_SPACE)
        if key == "Encoding" and value.lower() != "utf-8":
            raise KeyFileError("unsupported encoding")
        current[key] = value
    return groups.get(group, {})


def _is_group_line(line: str) -> bool:
    if line[0] != "[":
        return False
    close = line.find("]", 1)
    return close != -1 and not line[close + 1:].strip(" \t")


def _is_key_name(key: str) -> bool:
    stop = len(key)
    for position, char in enumerate(key):
        if char in "=[]":
            stop = position
            break
    if stop == 0:
        return False
    if stop == len(key):
        return True
    if key[stop] != "[":
        return False
    close = stop + 1
    while close < len(key) and (key[close].isalnum() or key[close] in "-_.@"):
        close += 1
    return close == len(key) - 1 and key[close] == "]"


def os_release_value(raw: str) -> str:
    """qemu-ga's post-processing of one os-release value (``ga_osrelease_replace_special``)."""
    if not raw.startswith('"'):
        # Unquoted, and single-quoted too (qemu-ga's test for ' is dead code).
        for stop in (" ", ";"):
            cut = raw.find(stop)
            if cut != -1:
                raw = raw[:cut]
        return raw
    # qemu-ga copies bytes in place from after the opening quote, resolving
    # \$ \' \" \\ \`; work on the same bytes so even its odd cases match.
    buffer = bytearray(raw.encode("utf-8"))
    write, read = 0, 1
    while read < len(buffer):
        byte = buffer[read]
        if byte == 0x5C and read + 1 < len(buffer) and buffer[read + 1] in b"$'\"\\`":
            read += 1
            byte = buffer[read]
        elif byte == 0x22:
            return decode(bytes(buffer[:write]))
        buffer[write] = byte
        write += 1
        read += 1
    # No closing quote: qemu-ga never terminates the copy, so the tail of the
    # original string stays behind the shifted text.
    return decode(bytes(buffer))


# Timestamps come from a coarse clock; two writes this close may look alike.
RACY_NS = 2_000_000_000


class OsRelease:
    """The osinfo reply, rebuilt only when the os-release file changes.

    The kernel members come from ``uname()`` once: the running kernel's
    release, version and machine cannot change while the agent runs.
    """

    def __init__(self, ctx=None):
        uname = os.uname()
        self._kernel = {"kernel-release": uname.release, "kernel-version": uname.version,
                        "machine": uname.machine}
        # path -> (file identity, reply or None when the file is unusable)
        self._cache: Dict[str, Tuple[tuple, Optional[dict]]] = {}

    def reply(self) -> dict:
        """A fresh copy of the reply (callers may change it)."""
        override = os.environ.get("QGA_OS_RELEASE")
        for path in (override,) if override is not None else OS_RELEASE_FILES:
            reply = self._load(path)
            if reply is not None:
                return dict(reply)
        return dict(self._kernel)

    def _load(self, path: str) -> Optional[dict]:
        try:
            info = os.stat(path)
        except OSError:
            self._cache.pop(path, None)
            return None
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == identity:
            return cached[1]
        try:
            # qemu-ga loads the file as a key file behind a group line of its own.
            data = b"[os-release]\n" + read_file(path)
            values: Optional[Dict[str, str]] = parse_key_file(data, "os-release")
        except (OSError, KeyFileError):
            values = None
        reply = None
        if values is not None:
            reply = dict(self._kernel)  # then the os-release members, in schema order
            reply.update((member, os_release_value(values[key]))
                         for key, member in OS_RELEASE_FIELDS if key in values)
        # Like git's "racy" entries: a file changed within the last moments
        # could change again without a visible change of its ctime (a coarse
        # clock), so it is not remembered until it has been quiet for a while.
        if time.time_ns() - info.st_ctime_ns > RACY_NS:
            self._cache[path] = (identity, reply)
        else:
            self._cache.pop(path, None)
        return reply


@command("guest-get-osinfo")
def get_osinfo(ctx) -> dict:
    return ctx.service(OsRelease).reply()


# -- guest-get-timezone ---------------------------------------------------------


GLIB_TZ_NAME_MAX = 32


def _glib_time(text: str, wide_hours: bool) -> bool:
    """GLib's ``parse_time``: hh[[:]mm[[:]ss]], hours up to 24 (or 167 in rule times)."""
    digits = 0
    position = 0
    while position < len(text) and text[position].isdigit() and digits < (3 if wide_hours else 2):
        position += 1
        digits += 1
    if digits == 0:
        return False
    hours = int(text[:position])
    if hours > (167 if wide_hours else 24):
        return False
    rest = text[position:]
    for _ in range(2):  # minutes, then seconds
        if not rest:
            return True
        if rest[0] == ":":
            rest = rest[1:]
        elif wide_hours:
            return False
        if len(rest) < 2 or not ("0" <= rest[0] <= "5") or not rest[1].isdigit():
            return False
        rest = rest[2:]
    return not rest


def _glib_constant_offset(text: str, identifier: bool) -> bool:
    if identifier and text in ("UTC", "Z"):
        return True
    if text[:1] in ("+", "-"):
        text = text[1:]
    return _glib_time(text, False)


def _glib_tz_name(text: str, position: int) -> int:
    """End of a zone name at ``position`` (``ABC`` or ``<+03>``), or -1."""
    if text[position:position + 1] == "<":
        end = position + 1
        while end < len(text) and (text[end].isascii() and text[end].isalnum() or text[end] in "+-"):
            end += 1
        if end >= len(text) or text[end] != ">" or end - position - 1 < 3:
            return -1
        return end + 1
    end = position
    while end < len(text) and text[end].isascii() and text[end].isalpha():
        end += 1
    return end if end - position >= 3 else -1


def _glib_offset(text: str, position: int) -> Tuple[int, bool]:
    end = position
    while end < len(text) and (text[end] in "+-:" or text[end].isdigit()):
        end += 1
    return end, _glib_constant_offset(text[position:end], False)


def _glib_boundary(text: str) -> bool:
    date, _, when = text.partition("/")
    if date.startswith("M"):
        parts = date[1:].split(".")
        if len(parts) < 3 or not all(part[:1].isdigit() for part in parts[:3]):
            return False
        numbers = [int("".join(_leading_digits(part))) for part in parts[:3]]
        if not (1 <= numbers[0] <= 12 and 1 <= numbers[1] <= 5 and 0 <= numbers[2] <= 6):
            return False
    elif date.startswith("J") or date[:1].isdigit():
        julian = date[1:] if date.startswith("J") else date
        day = int("".join(_leading_digits(julian)) or "0")
        low = 1 if date.startswith("J") else 0
        if not low <= day <= 365:
            return False
    else:
        return False
    if "/" in text:
        sign = when[:1] in ("+", "-")
        return _glib_time(when[1:] if sign else when, True)
    return True


def _leading_digits(text: str):
    for char in text:
        if not char.isdigit():
            break
        yield char


def _glib_rules(text: str) -> bool:
    """Whether GLib's ``rules_from_identifier`` accepts a POSIX TZ string."""
    position = _glib_tz_name(text, 0)
    if position < 0:
        return False
    position, valid = _glib_offset(text, position)
    if not valid:
        return False
    if position == len(text):
        return True
    position = _glib_tz_name(text, position)
    if position < 0:
        return False
    position, _ = _glib_offset(text, position)  # GLib ignores a bad DST offset
    if text[position:position + 1] != ",":
        return False
    # GLib reads the start and end boundaries and ignores anything after them.
    boundaries = text[position + 1:].split(",")
    return len(boundaries) >= 2 and all(_glib_boundary(part) for part in boundaries[:2])


def _is_tzfile(name: str) -> bool:
    if name.startswith(":"):
        name = name[1:]
    if not name.startswith("/"):
        name = os.path.join(os.environ.get("TZDIR", "/usr/share/zoneinfo"), name)
    try:
        with open(name, "rb") as stream:
            return stream.read(4) == b"TZif"
    except OSError:
        return False


def glib_accepts_tz(tz: str) -> bool:
    """Whether GLib builds a time zone from ``TZ`` (otherwise it falls back to UTC).

    GLib tries, in order, a constant offset (``UTC``, ``Z``, ``+03``,
    ``-05:30``), a POSIX rule string (names of three or more letters, hours up
    to 24, both DST boundaries required), and a tzfile (path or name under
    ``$TZDIR``).  glibc is more lenient (``TZ=Foo`` is "Foo" at UTC+0 there).
    """
    return _glib_constant_offset(tz, True) or _glib_rules(tz) or _is_tzfile(tz)


def _constant_offset_seconds(tz: str) -> int:
    if tz in ("UTC", "Z"):
        return 0
    sign = -1 if tz.startswith("-") else 1
    digits = tz.lstrip("+-").replace(":", "")
    if len(digits) in (1, 3, 5):
        digits = "0" + digits
    hours, minutes, seconds = int(digits[0:2]), int(digits[2:4] or 0), int(digits[4:6] or 0)
    return sign * (hours * 3600 + minutes * 60 + seconds)


@command("guest-get-timezone")
def get_timezone(ctx) -> dict:
    tz = os.environ.get("TZ")
    if tz is not None:
        if _glib_constant_offset(tz, True):
            # GLib names a constant-offset zone after the TZ value itself.
            return {"zone": tz, "offset": _constant_offset_seconds(tz)}
        if not glib_accepts_tz(tz):
            return {"zone": "UTC", "offset": 0}
    # glibc caches the zone per process; tzset() re-reads TZ and /etc/localtime
    # so a changed zone is seen, as GLib sees it.
    time.tzset()
    now = time.localtime()
    zone = now.tm_zone
    if tz is not None and _glib_rules(tz):
        zone = zone[:GLIB_TZ_NAME_MAX]  # GLib keeps rule-string names in a fixed buffer
    return {"zone": zone, "offset": now.tm_gmtoff}


# -- guest-get-users ------------------------------------------------------------

# struct utmp on x86_64 (glibc): type at 0, user at 44, ut_tv at 340.
UTMP_RECORD = 384
USER_PROCESS = 7
_UTMP_TYPE = struct.Struct("<h")
_UTMP_TV = struct.Struct("<ii")


def read_utmp_users(path: str = UTMP_FILE) -> List[dict]:
    """USER_PROCESS entries, one per user name, with the earliest login time."""
    try:
        data = read_file(path)
    except OSError:
        return []  # getutxent() just finds no entries
    users: Dict[bytes, dict] = {}
    for offset in range(0, len(data) - UTMP_RECORD + 1, UTMP_RECORD):
        if _UTMP_TYPE.unpack_from(data, offset)[0] != USER_PROCESS:
            continue
        # qemu-ga g_strdup()s ut_user, which need not be NUL-terminated:
        # a 32-byte name runs on into ut_host.
        end = data.find(b"\0", offset + 44, offset + UTMP_RECORD)
        name = data[offset + 44:end if end != -1 else offset + UTMP_RECORD]
        seconds, microseconds = _UTMP_TV.unpack_from(data, offset + 340)
        login = float(seconds) + float(microseconds) / 1000000
        user = users.get(name)
        if user is None:
            users[name] = {"user": decode(name), "login-time": login}
        elif login < user["login-time"]:
            user["login-time"] = login
    return list(users.values())


@command("guest-get-users")
def get_users(ctx) -> list:
    return read_utmp_users()
