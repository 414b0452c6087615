"""System facts: host name, os-release, clock, time zone, users, load.

Expected values in the tables were observed on the real qemu-ga 7.2
(``tests/compat/test_inventory.py`` re-checks them against it).
"""

from __future__ import annotations

import json
import os
import struct
import time

import pytest

from qga.commands import Context
from qga.commands import system
from qga.errors import CommandError
from qga.protocol import encode_reply
from qga.qdict_order import qdict_order
from tests.support.replies import validate_return


@pytest.fixture
def ctx():
    return Context(config=None, state=None)


@pytest.fixture
def os_release(tmp_path, monkeypatch):
    """Point ``$QGA_OS_RELEASE`` at a file; returns a function that writes it."""
    path = tmp_path / "os-release"
    monkeypatch.setenv("QGA_OS_RELEASE", str(path))

    def write(data: bytes) -> None:
        # A new inode each time, as package managers replace the file.
        temporary = tmp_path / "os-release.new"
        temporary.write_bytes(data)
        os.replace(temporary, path)

    return write


# (file contents, reply members besides the kernel ones), from qemu-ga 7.2.
OS_RELEASE_CASES = [
    (b'ID=debian\nNAME="Debian GNU/Linux"\n', {"name": "Debian GNU/Linux", "id": "debian"}),
    (b"ID=deb ian\nNAME=a;b\nVERSION='x y'\n", {"name": "a", "version": "'x", "id": "deb"}),
    (b'NAME="abc\nID="a\\"b\\$c\\\\d\\x\\`e"tail\n', {"name": "abcc", "id": 'a"b$c\\d\\x`e'}),
    (b'NAME="a\\"bc\nVERSION="\\\\\\\\\n', {"name": 'a"bcbc', "version": "\\\\\\\\\\"}),
    (b"NAME=one\nNAME=two\n", {"name": "two"}),
    (b"# comment\n\n   ID = spaced  \n", {"id": "spaced"}),
    (b"=bad\nID=x\n", {}),
    (b"ID=x\nnoequals\n", {}),
    (b"ID=x\n[Other]\nNAME=y\n", {"id": "x"}),
    (b"ID=x\n[os-release]\nNAME=y\n", {"name": "y", "id": "x"}),
    (b"ID=x\n[]\n", {}),
    (b"ID=x\nEncoding=latin1\n", {}),
    (b"ID=x\nEncoding=utf-8\n", {"id": "x"}),
    (b"ID=x\r\nNAME=y\r\n", {"name": "y", "id": "x"}),
    (b'ID=x\r\nNAME="y"\r', {"name": "y", "id": "x"}),
    (b"ID=\xff\n", {}),
    (b"ID=x\x00NAME=y\n", {"id": "x"}),
    (b"ID=x\nNAME[de]=y\nVERSION=1\n", {"version": "1", "id": "x"}),
    (b"ID=x\nNA]ME=y\n", {}),
    (b"ID=x\nNAME[d e]=y\n", {}),
    (b"ID=x\nNAME[de]x=y\n", {}),
    (b"ID=x\n  [os-release]  \nVERSION=2", {"version": "2", "id": "x"}),
    (b'PRETTY_NAME="\xc3\xa9t\xc3\xa9\n', {"pretty-name": "\u00e9t\u00e9\ufffd"}),
    (b'VARIANT="a b" c\nVARIANT_ID=\n', {"variant": "a b", "variant-id": ""}),
    (b"ID=\"x\"\nVERSION_ID='1 2'\n", {"version-id": "'1", "id": "x"}),
    (b"ID=x\n[a]b]\n", {}),
    (b"ID=x\n\tNAME=\ty\n", {"name": "y", "id": "x"}),
    (b"ID=x\nKEY WITH SPACE=1\nNAME=n\n", {"name": "n", "id": "x"}),
    (b"ID=x\n\x0bNAME=y\n", {"id": "x"}),
    (b"", {}),
]


@pytest.mark.parametrize("data, expected", OS_RELEASE_CASES)
def test_osinfo_reads_os_release_like_qemu_ga(ctx, os_release, data, expected):
    os_release(data)
    reply = system.get_osinfo(ctx)
    uname = os.uname()
    assert reply == dict(expected, **{"kernel-release": uname.release,
                                      "kernel-version": uname.version, "machine": uname.machine})
    validate_return(None, "guest-get-osinfo", reply)


def wire_members(value) -> list:
    """The member names of a reply object in the order the reply writer puts them."""
    return [name for name, _ in json.loads(encode_reply({"return": value}),
                                           object_pairs_hook=list)[0][1]]


def test_osinfo_members_come_in_qemu_ga_order(ctx, os_release):
    os_release(b'ID=debian\nNAME="Debian"\nPRETTY_NAME="D"\nVERSION="12"\nVERSION_ID="12"\n')
    reply = system.get_osinfo(ctx)
    assert list(reply) == ["kernel-release", "kernel-version", "machine", "id", "name", "pretty-name",
                           "version", "version-id"]  # schema order: what the writer needs
    # Observed on the wire from qemu-ga 7.2.
    assert wire_members(reply) == ["name", "kernel-release", "version", "pretty-name", "version-id",
                                   "kernel-version", "machine", "id"]


def test_osinfo_sees_a_replaced_file_at_once(ctx, os_release):
    os_release(b"ID=first\n")
    assert system.get_osinfo(ctx)["id"] == "first"
    os_release(b"ID=second\n")
    assert system.get_osinfo(ctx)["id"] == "second"


def test_osinfo_sees_an_in_place_rewrite_of_the_same_size(ctx, tmp_path, monkeypatch):
    path = tmp_path / "os-release"
    monkeypatch.setenv("QGA_OS_RELEASE", str(path))
    path.write_bytes(b"ID=aaaa\n")
    assert system.get_osinfo(ctx)["id"] == "aaaa"
    with open(path, "r+b") as stream:  # same inode, same size, same coarse mtime
        stream.write(b"ID=bbbb\n")
    assert system.get_osinfo(ctx)["id"] == "bbbb"


def test_osinfo_caches_a_settled_file(ctx, monkeypatch):
    monkeypatch.delenv("QGA_OS_RELEASE", raising=False)
    path = next((path for path in system.OS_RELEASE_FILES if os.path.exists(path)), None)
    if path is None or time.time() - os.stat(path).st_ctime < 10:
        pytest.skip("no settled os-release file on this machine")
    service = ctx.service(system.OsRelease)
    first = service.reply()
    assert path in service._cache  # remembered: unchanged for long enough
    assert service._cache[path][1] == first
    first["id"] = "changed by a caller"
    assert service.reply()["id"] != "changed by a caller"  # callers get copies


def test_osinfo_without_any_file_has_only_kernel_members(ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("QGA_OS_RELEASE", str(tmp_path / "missing"))
    assert set(system.get_osinfo(ctx)) == {"kernel-release", "kernel-version", "machine"}


def test_osinfo_of_this_machine_matches_etc_os_release(ctx, monkeypatch):
    monkeypatch.delenv("QGA_OS_RELEASE", raising=False)
    path = "/etc/os-release" if os.path.exists("/etc/os-release") else "/usr/lib/os-release"
    values = {}
    with open(path) as stream:
        for line in stream:
            key, sep, value = line.strip().partition("=")
            if sep:
                values[key] = value.strip('"')
    reply = system.get_osinfo(ctx)
    if "ID" in values:
        assert reply["id"] == values["ID"]
    if "VERSION_ID" in values:
        assert reply["version-id"] == values["VERSION_ID"]
    if "PRETTY_NAME" in values:
        assert reply["pretty-name"] == values["PRETTY_NAME"]


def test_os_release_value_rules():
    assert system.os_release_value('"quoted value" tail') == "quoted value"
    assert system.os_release_value("plain value") == "plain"
    assert system.os_release_value("a;b") == "a"
    assert system.os_release_value("'single quoted'") == "'single"
    assert system.os_release_value('"a\\$b\\nc"') == "a$b\\nc"
    assert system.os_release_value('"abc') == "abcc"  # qemu-ga never terminates the copy
    assert system.os_release_value('"trailing\\') == "trailing\\\\"


def test_key_file_errors():
    with pytest.raises(system.KeyFileError):
        system.parse_key_file(b"[g]\n=value\n", "g")
    with pytest.raises(system.KeyFileError):
        system.parse_key_file(b"key=value\n", "g")  # before any group
    assert system.parse_key_file(b"[g]\nk = v \n[h]\nk=w\n", "g") == {"k": "v "}


# -- time zone -------------------------------------------------------------------------

# TZ value -> (zone, offset) as qemu-ga 7.2 (GLib) reports them, for values
# whose answer does not depend on the date.
FIXED_ZONES = [
    ("UTC", "UTC", 0),
    ("UTC0", "UTC", 0),
    ("GMT", "GMT", 0),
    ("", "UTC", 0),
    ("Foo", "UTC", 0),  # glibc: "Foo" at +0; GLib refuses it
    ("Foo/Bar", "UTC", 0),
    ("A-1", "UTC", 0),
    ("<A>-1", "UTC", 0),
    ("::UTC", "UTC", 0),
    ("XXX+25", "UTC", 0),
    ("XXX+1:60", "UTC", 0),
    ("ABC-001", "UTC", 0),
    ("CET-1CEST", "UTC", 0),  # DST rules are required
    ("XYZ-5", "XYZ", 18000),
    ("<+03>-3", "+03", 10800),
    ("<UTC+5>-5", "UTC+5", 18000),
    ("IST-5:30", "IST", 19800),
    ("XXX+24:30", "XXX", -88200),
    ("XXX+1:59:59", "XXX", -7199),
    ("+03", "+03", 10800),
    ("-05:30", "-05:30", -19800),
    ("+0530", "+0530", 19800),
    ("Z", "Z", 0),
    ("Asia/Kolkata", "IST", 19800),
    ("Etc/GMT-3", "+03", 10800),
    ("ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJKL-1", "ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEF", 3600),
]


@pytest.fixture
def restore_tz():
    saved = os.environ.get("TZ")
    yield
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.mark.parametrize("tz, zone, offset", FIXED_ZONES)
def test_timezone_as_glib_reports_it(ctx, restore_tz, tz, zone, offset):
    if tz in ("Asia/Kolkata", "Etc/GMT-3") and not os.path.exists(os.path.join("/usr/share/zoneinfo", tz)):
        pytest.skip(f"no tzdata for {tz}")
    os.environ["TZ"] = tz
    reply = system.get_timezone(ctx)
    assert reply == {"zone": zone, "offset": offset}
    assert list(reply) == ["zone", "offset"]
    assert wire_members(reply) == ["zone", "offset"]
    validate_return(None, "guest-get-timezone", reply)


@pytest.mark.parametrize("tz", ["Europe/Paris", "America/New_York", "CET-1CEST,M3.5.0,M10.5.0/3",
                                "NZST-12NZDT,M9.5.0,M4.1.0/3"])
def test_timezone_with_daylight_saving_follows_the_date(ctx, restore_tz, tz):
    if "," not in tz and not os.path.exists(os.path.join("/usr/share/zoneinfo", tz)):
        pytest.skip(f"no tzdata for {tz}")
    os.environ["TZ"] = tz
    time.tzset()
    now = time.localtime()
    assert system.get_timezone(ctx) == {"zone": now.tm_zone, "offset": now.tm_gmtoff}


def test_timezone_follows_a_changed_tz(ctx, restore_tz):
    os.environ["TZ"] = "XYZ-5"
    assert system.get_timezone(ctx)["offset"] == 18000
    os.environ["TZ"] = "ABC+2"
    assert system.get_timezone(ctx) == {"zone": "ABC", "offset": -7200}


# -- users --------------------------------------------------------------------------------


def utmp_record(kind: int, user: bytes, seconds: int, microseconds: int, host: bytes = b"") -> bytes:
    record = bytearray(system.UTMP_RECORD)
    struct.pack_into("<hxxi", record, 0, kind, 4242)
    record[8:13] = b"pts/0"
    record[44:44 + len(user)] = user
    record[76:76 + len(host)] = host
    struct.pack_into("<ii", record, 340, seconds, microseconds)
    return bytes(record)


def test_users_from_utmp_like_qemu_ga(tmp_path):
    path = tmp_path / "utmp"
    path.write_bytes(b"".join([
        utmp_record(7, b"alice", 1700000000, 500000),
        utmp_record(7, b"bob", 1700000100, 1),
        utmp_record(8, b"carol", 1700000000, 0),  # DEAD_PROCESS
        utmp_record(7, b"alice", 1690000000, 999999),  # earlier login wins
        utmp_record(7, b"x" * 32, 1700000200, 250000, b"hostpart"),  # no NUL: runs on
        utmp_record(7, b"\xc3\xa9\xff", 1700000300, 0),
        utmp_record(7, b"neg", -5, 3),
    ]) + b"\x07" * 100)  # a torn record at the end is ignored
    users = system.read_utmp_users(str(path))
    # The reply qemu-ga 7.2 gave for this very file (parsed).
    assert users == json.loads(
        '[{"login-time": 1690000000.999999, "user": "alice"}, '
        '{"login-time": 1700000100.000001, "user": "bob"}, '
        '{"login-time": 1700000200.25, "user": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxhostpart"}, '
        '{"login-time": 1700000300, "user": "\\u00E9\\uFFFD"}, '
        '{"login-time": -4.9999969999999996, "user": "neg"}]')
    assert all(list(user) == ["user", "login-time"] for user in users)
    assert all(wire_members(user) == ["login-time", "user"] for user in users)
    validate_return(None, "guest-get-users", users)


def test_users_without_utmp_is_empty(tmp_path):
    assert system.read_utmp_users(str(tmp_path / "missing")) == []


def test_users_handler_reads_the_system_utmp(ctx):
    assert system.get_users(ctx) == system.read_utmp_users(system.UTMP_FILE)


# -- host name, time, load -------------------------------------------------------------------


def test_host_name_is_the_node_name(ctx):
    reply = system.get_host_name(ctx)
    assert reply == {"host-name": os.uname().nodename}
    validate_return(None, "guest-get-host-name", reply)


def test_time_is_nanoseconds_with_microsecond_resolution(ctx):
    before = time.time_ns()
    value = system.get_time(ctx)
    after = time.time_ns()
    assert before // 1000 * 1000 <= value <= after
    assert value % 1000 == 0
    validate_return(None, "guest-get-time", value)


def test_load_is_proc_loadavg(ctx):
    reply = system.get_load(ctx)
    with open("/proc/loadavg") as stream:
        expected = [float(field) for field in stream.read().split()[:3]]
    assert abs(reply["load1m"] - expected[0]) < 1.0
    assert list(reply) == ["load1m", "load5m", "load15m"]
    # load1m and load5m share a QDict bucket: the later one comes out first.
    assert wire_members(reply) == qdict_order(["load1m", "load5m", "load15m"])
    assert wire_members(reply).index("load5m") < wire_members(reply).index("load1m")
    validate_return(None, "guest-get-load", reply)


def test_load_error_names_the_cause(ctx, monkeypatch, tmp_path):
    monkeypatch.setattr(system, "LOADAVG_FILE", str(tmp_path / "missing"))
    with pytest.raises(CommandError) as caught:
        system.get_load(ctx)
    assert caught.value.desc == "cannot query load average: No such file or directory"
