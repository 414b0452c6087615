"""Inventory commands: the real qemu-ga and the candidate, side by side.

* Replies that do not change between two calls are compared byte for byte
  through the shared ``wire`` fixture (member order included).
* Replies with live counters (time, CPU and disk statistics, interface
  counters, used bytes) are compared member by member, in order, with the
  counters allowed to have moved on.
* Controlled inputs: os-release files through ``$QGA_OS_RELEASE``, ``TZ``
  values, a utmp file on a private ``/run``, interfaces in a private network
  namespace, and loop filesystems (a path with a space, bind mounts) in a
  private mount namespace.  The namespaces need root, ``unshare`` and
  ``nsenter``; both agents run inside the same namespace.

qemu-ga 7.2 has no ``total-bytes-privileged`` (9.1) in ``guest-get-fsinfo``
and no ``guest-get-load`` / ``guest-network-get-route``; the candidate may
report those, everything else must match.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

from tests.support.agents import QEMU_GA, REPO, AgentProcess, RawConnection, qemu_ga_available

pytestmark = pytest.mark.compat


def request(name: str, arguments: Optional[dict] = None, **extra) -> bytes:
    body = {"execute": name}
    if arguments is not None:
        body["arguments"] = arguments
    body.update(extra)
    return json.dumps(body).encode()


# -- byte-identical replies -------------------------------------------------------------------

STABLE = [
    request("guest-get-osinfo"),
    request("guest-get-host-name"),
    request("guest-get-timezone"),
    request("guest-get-users"),
    request("guest-get-vcpus"),
    request("guest-get-memory-block-info"),
    request("guest-get-memory-blocks"),
    request("guest-get-disks"),
    request("guest-get-vcpus", id="vcpus"),
    request("guest-get-osinfo", id=[1, {"x": None}]),
    request("guest-get-disks", {}),
    request("guest-get-vcpus", {"bogus": 1}),
    request("guest-get-fsinfo", {"bogus": True}, id=3),
]


@pytest.mark.parametrize("data", STABLE, ids=lambda data: data.decode()[:60])
def test_stable_replies_are_identical(wire, data):
    wire.compare(data)


# -- replies with live counters ---------------------------------------------------------------

# Members whose value may move between the two calls, and by how much.
MOVING = {
    "used-bytes": 1 << 28, "total-bytes": 1 << 28,
    "rx-bytes": 1 << 24, "rx-packets": 1 << 16, "tx-bytes": 1 << 24, "tx-packets": 1 << 16,
    "rx-dropped": 1 << 10, "tx-dropped": 1 << 10, "rx-errs": 1 << 10, "tx-errs": 1 << 10,
    "user": 60000, "nice": 60000, "system": 60000, "idle": 120000, "iowait": 60000, "irq": 60000,
    "softirq": 60000, "steal": 60000, "guest": 60000, "guestnice": 60000,
    "read-sectors": 1 << 24, "read-ios": 1 << 16, "read-merges": 1 << 16, "write-sectors": 1 << 24,
    "write-ios": 1 << 16, "write-merges": 1 << 16, "discard-sectors": 1 << 28, "discard-ios": 1 << 16,
    "discard-merges": 1 << 16, "flush-ios": 1 << 16, "read-ticks": 1 << 20, "write-ticks": 1 << 20,
    "discard-ticks": 1 << 20, "flush-ticks": 1 << 20, "ios-pgr": 1 << 10, "total-ticks": 1 << 20,
    "weight-ticks": 1 << 20,
}
NEWER_THAN_7_2 = {"total-bytes-privileged"}


def parse(line: bytes):
    """A reply with objects as lists of (member, value) pairs, to compare member order."""
    return json.loads(line, object_pairs_hook=list)


def assert_alike(expected, actual, where: str = "reply", key: str = "") -> None:
    """``actual`` is ``expected`` up to counters that moved on (:data:`MOVING`)."""
    if isinstance(expected, list) and expected and isinstance(expected[0], tuple) or \
            isinstance(actual, list) and actual and isinstance(actual[0], tuple):
        actual = [(name, value) for name, value in actual
                  if name not in NEWER_THAN_7_2 or name in dict(expected)]
        assert [name for name, _ in actual] == [name for name, _ in expected], where
        for (name, want), (_, have) in zip(expected, actual):
            assert_alike(want, have, f"{where}.{name}", name)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r}"
        for index, (want, have) in enumerate(zip(expected, actual)):
            assert_alike(want, have, f"{where}[{index}]", key)
    elif key in MOVING and isinstance(expected, int) and isinstance(actual, int):
        assert abs(actual - expected) <= MOVING[key], f"{where}: {expected} vs {actual}"
    else:
        assert actual == expected, f"{where}: {expected!r} vs {actual!r}"


def one_reply(lines: Sequence[bytes]) -> bytes:
    """The command's reply; what follows is the transcript marker's own (0xFF) reply."""
    assert lines and lines[0].startswith(b'{"return": '), lines
    return lines[0]


@pytest.mark.parametrize("command", ["guest-get-cpustats", "guest-get-diskstats",
                                     "guest-network-get-interfaces", "guest-get-fsinfo"])
def test_live_replies_match_up_to_moving_counters(wire, command):
    expected, actual = wire.both(request(command))
    assert_alike(parse(one_reply(expected)), parse(one_reply(actual)))


def test_time(wire):
    before = time.time_ns()
    expected, actual = wire.both(request("guest-get-time"))
    after = time.time_ns()
    for line in (expected, actual):
        value = json.loads(one_reply(line))["return"]
        assert before // 1000 * 1000 <= value <= after and value % 1000 == 0


# -- agents in a controlled environment -----------------------------------------------------------


def namespace_tools_reason() -> Optional[str]:
    if not qemu_ga_available():
        return "qemu-ga is not installed"
    if os.geteuid() != 0:
        return "needs root (namespaces)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


class AgentPair:
    """qemu-ga and our agent, started with the same environment, maybe in one new namespace.

    ``unshare_flags`` (e.g. ``["-n"]``) put qemu-ga into new namespaces after
    running ``setup`` (shell commands) there; our agent then joins them with
    ``nsenter``.  Every process is stopped by its PID.
    """

    def __init__(self, env: Optional[dict] = None, unshare_flags: Sequence[str] = (), setup: str = ""):
        self.base = Path(tempfile.mkdtemp(prefix="qgainv-"))
        self.env = dict(os.environ, QGA_CONF="/nonexistent", **(env or {}))
        self.unshare_flags = list(unshare_flags)
        self.setup = setup
        self.agents: List[AgentProcess] = []

    def start(self) -> "AgentPair":
        reference = self._workdir("qemu-ga")
        argv = [QEMU_GA, "-m", "unix-listen", "-p", str(reference / "sock"), "-t", str(reference)]
        if self.unshare_flags:
            script = f"{self.setup}\nexec \"$@\""
            argv = ["unshare", *self.unshare_flags, "sh", "-ec", script, "sh", *argv]
        self.reference = self._launch(argv, reference)
        ours = self._workdir("qga")
        argv = [sys.executable, "-m", "qga", "-m", "unix-listen", "-p", str(ours / "sock"), "-t", str(ours)]
        if self.unshare_flags:
            join = [flag for flag in self.unshare_flags if flag in ("-n", "-m", "-u")]
            argv = ["nsenter", "-t", str(self.reference.pid), *join, *argv]
        env = dict(self.env, PYTHONPATH=str(REPO) + os.pathsep + self.env.get("PYTHONPATH", ""))
        self.candidate = self._launch(argv, ours, env)
        return self

    def _workdir(self, name: str) -> Path:
        path = self.base / name
        path.mkdir()
        return path

    def _launch(self, argv, workdir: Path, env: Optional[dict] = None) -> AgentProcess:
        agent = AgentProcess(argv, workdir, workdir / "sock", env or self.env)
        self.agents.append(agent)
        return agent.start(timeout=20)

    def replies(self, data: bytes) -> List[bytes]:
        lines = []
        for agent in (self.reference, self.candidate):
            with RawConnection(agent.sock) as connection:
                connection.send(data + b"\n")
                lines.append(connection.read_line(timeout=10))
        return lines

    def compare(self, data: bytes) -> bytes:
        expected, actual = self.replies(data)
        assert actual == expected, f"{data!r}\n  qemu-ga: {expected!r}\n  qga:     {actual!r}"
        return expected

    def stop(self) -> None:
        for agent in reversed(self.agents):
            agent.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def agent_pair():
    pairs: List[AgentPair] = []

    def make(**options) -> AgentPair:
        pair = AgentPair(**options)
        pairs.append(pair)
        return pair.start()

    yield make
    for pair in pairs:
        pair.stop()


OS_RELEASE_FILES = [
    b'ID=debian\nNAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
    b'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVARIANT="Server Edition"\nVARIANT_ID=server\n',
    b"ID=deb ian\nNAME=a;b\nVERSION='x y'\n",
    b'NAME="abc\nID="a\\"b\\$c\\\\d\\x\\`e"tail\n',
    b'NAME="a\\"bc\nVERSION="\\\\\\\\\n',
    b"NAME=one\nNAME=two\n# comment\n\n   ID = spaced  \n",
    b"=bad\nID=x\n",
    b"ID=x\n[Other]\nNAME=y\n",
    b"ID=x\n[]\n",
    b"ID=x\nEncoding=latin1\n",
    b"ID=x\r\nNAME=y\r\nVERSION=\"v\"\r",
    b"ID=\xff\n",
    b"ID=x\x00NAME=y\n",
    b"ID=x\nNAME[de]=y\nNA]ME=z\n",
    b'PRETTY_NAME="\xc3\xa9t\xc3\xa9 \xe2\x82\xac\n',
    b"ID=x\n\x0bNAME=y\n\tVERSION_ID=\t7\n",
    b"",
]


def test_os_release_files(agent_pair):
    if not qemu_ga_available():
        pytest.skip("qemu-ga is not installed")
    directory = Path(tempfile.mkdtemp(prefix="qgaosr-"))
    try:
        path = directory / "os-release"
        pair = agent_pair(env={"QGA_OS_RELEASE": str(path)})
        pair.compare(request("guest-get-osinfo"))  # no file at all
        for data in OS_RELEASE_FILES:
            path.write_bytes(data)  # rewritten in place: the agents must notice
            pair.compare(request("guest-get-osinfo"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


TZ_VALUES = [None, "", "UTC", "GMT", "Europe/Paris", ":America/New_York", "Asia/Kathmandu",
             "CET-1CEST,M3.5.0,M10.5.0/3", "EST5EDT", "<+03>-3", "Foo", "Foo/Bar", "A-1", "XXX+25",
             "XXX+24:30", "ABC1DEF,J60,J300", "ABC1DEF,M3.5.0,M10.5.0,M11.1.0", "CET-1CEST", "+03",
             "-05:30", "Z", "IST-5:30", "ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJKL-1"]


def test_time_zones(tmp_path):
    """qemu-ga under each TZ against our handler under the same TZ, encoded by our writer."""
    if not qemu_ga_available():
        pytest.skip("qemu-ga is not installed")
    from qga.commands import Context, system
    from qga.protocol import encode_reply

    saved = os.environ.get("TZ")
    try:
        for tz in TZ_VALUES:
            env = dict(os.environ, QGA_CONF="/nonexistent")
            env.pop("TZ", None)
            if tz is not None:
                env["TZ"] = tz
            workdir = tmp_path / f"tz{TZ_VALUES.index(tz)}"
            workdir.mkdir()
            agent = AgentProcess([QEMU_GA, "-m", "unix-listen", "-p", str(workdir / "s"), "-t", str(workdir)],
                                 workdir, workdir / "s", env).start()
            try:
                with RawConnection(agent.sock) as connection:
                    connection.send(request("guest-get-timezone") + b"\n")
                    expected = connection.read_line()
            finally:
                agent.stop()
            if tz is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = tz
            actual = encode_reply({"return": system.get_timezone(Context(None, None))})
            assert actual == expected, f"TZ={tz!r}"
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def utmp_record(kind: int, user: bytes, seconds: int, microseconds: int, host: bytes = b"") -> bytes:
    record = bytearray(384)
    struct.pack_into("<hxxi", record, 0, kind, 4242)
    record[8:13] = b"pts/0"
    record[44:44 + len(user)] = user
    record[76:76 + len(host)] = host
    struct.pack_into("<ii", record, 340, seconds, microseconds)
    return bytes(record)


def test_users_from_a_utmp_file(agent_pair, tmp_path):
    reason = namespace_tools_reason()
    if reason:
        pytest.skip(reason)
    utmp = tmp_path / "utmp"
    utmp.write_bytes(b"".join([
        utmp_record(7, b"alice", 1700000000, 500000),
        utmp_record(7, b"bob", 1700000100, 1),
        utmp_record(8, b"carol", 1700000000, 0),
        utmp_record(7, b"alice", 1690000000, 999999),
        utmp_record(7, b"x" * 32, 1700000200, 250000, b"hostpart"),
        utmp_record(7, b"\xc3\xa9\xff", 1700000300, 0),
        utmp_record(6, b"LOGIN", 1700000400, 0),
        utmp_record(7, b"root", -5, 3),
    ]) + b"\x07" * 100)
    # A private /run holding only our utmp file, for both agents.
    pair = agent_pair(unshare_flags=["-m"],
                      setup=f"mount -t tmpfs qga-test-run /run && cp {utmp} /run/utmp")
    reply = pair.compare(request("guest-get-users"))
    assert b'"alice"' in reply and b"carol" not in reply


NETWORK_SETUP = """
ip link set lo up
ip addr add 127.0.0.2/8 dev lo label lo:5
ip addr add 10.0.0.1 peer 10.0.0.2/32 dev lo
ip addr add 2001:db8::1/64 dev lo
ip tuntap add tun0 mode tun
ip tuntap add tap0 mode tap
ip link set tap0 address 52:54:00:12:34:56
ip addr add 192.168.9.1/24 dev tap0
ip addr add 192.168.9.7/24 dev tap0 label tap0:web
ip addr add fe80::99/64 dev tap0
ip addr add 10.7.0.1/16 dev tun0
ip link add br0 type bridge 2>/dev/null || true
ip link add ifb9 type ifb 2>/dev/null || true
"""


def test_interfaces_in_a_network_namespace(agent_pair):
    reason = namespace_tools_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    pair = agent_pair(unshare_flags=["-n"], setup=NETWORK_SETUP)
    reply = json.loads(pair.compare(request("guest-network-get-interfaces")))["return"]
    names = [entry["name"] for entry in reply]
    assert names[:3] == ["lo", "tun0", "tap0"] and "lo:5" in names and "tap0:web" in names


def test_filesystems_in_a_mount_namespace(agent_pair, tmp_path):
    reason = namespace_tools_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("mkfs.ext4") is None or not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop filesystems here")
    image = tmp_path / "image"
    with open(image, "wb") as stream:
        stream.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    spaced = tmp_path / "with space"
    bound = tmp_path / "bound"
    sub = tmp_path / "sub"
    for directory in (spaced, bound, sub):
        directory.mkdir()
    setup = (f"mount -o loop '{image}' '{spaced}'\n"
             f"mkdir '{spaced}/dir'\n"
             f"mount --bind '{spaced}' '{bound}'\n"
             f"mount --bind '{spaced}/dir' '{sub}'\n")
    pair = agent_pair(unshare_flags=["-m"], setup=setup)
    expected, actual = pair.replies(request("guest-get-fsinfo"))
    assert_alike(parse(expected), parse(actual))
    ours = [entry for entry in json.loads(actual)["return"] if str(tmp_path) in entry["mountpoint"]]
    assert [entry["mountpoint"] for entry in ours] == [str(sub), str(bound), str(spaced)]
    assert all(entry["name"].startswith("loop") and entry["disk"] == [] for entry in ours)


@pytest.mark.parametrize("length", [63, 64])
def test_host_name_at_the_length_limit(agent_pair, length):
    """gethostname() into a 64-byte buffer: a 64-character name is an error in qemu-ga."""
    reason = namespace_tools_reason()
    if reason:
        pytest.skip(reason)
    name = "h" * length
    pair = agent_pair(unshare_flags=["-u"], setup=f"hostname {name}")
    reply = pair.compare(request("guest-get-host-name"))
    assert (name.encode() in reply) == (length == 63)
