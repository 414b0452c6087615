"""Request shapes, argument checking and policy texts against the real qemu-ga.

Two comparisons:

* on the wire (the ``wire`` fixture): the same bytes to qemu-ga and to the
  candidate agent, transcripts compared byte for byte;
* in process: the same request to qemu-ga and to our :class:`Dispatcher`
  (stub handlers), replies compared as JSON.  This also covers hundreds of
  generated cases (several unexpected members, several bad request members)
  whose answer depends on qemu's hash-table orders, a frozen qemu-ga and one
  started with ``-b``.

Every case is harmless on the host running the suite (as root in CI): a
case whose arguments are valid only reaches commands that then fail or read
(unknown handles, unknown users, missing programs); shutdown, suspend,
set-time, set-vcpus and passwords are only sent with invalid arguments.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from qga.commands import Context, module_handlers
from qga.dispatch import Dispatcher, Policy
from qga.qdict_order import qdict_order
from qga.schema import LINUX_DEFINES, Schema
from tests.compat.conftest import Session, Wire
from tests.support.agents import real_qemu_ga
from tests.support.replies import validate_return

pytestmark = pytest.mark.compat

SCHEMA = Schema.load(defines=LINUX_DEFINES)
ACCEPTED = "accepted by the argument check"
NO_HANDLE = 7777777
NO_USER = "no-such-user-qga"

# Replies that come from the request or argument checks, not from a handler.
CHECK_PREFIXES = ("Parameter '", "Invalid parameter type for '", "QMP input", "The command ", "Command ")

CASES = {
    # request shapes
    "not-an-object-array": [1, 2],
    "not-an-object-string": "guest-ping",
    "no-execute": {"arguments": {}, "id": 1},
    "execute-not-string": {"execute": ["guest-ping"], "id": 2},
    "arguments-array": {"execute": "guest-ping", "arguments": [], "id": 3},
    "arguments-null": {"execute": "guest-ping", "arguments": None},
    "exec-oob": {"exec-oob": "guest-ping", "id": 4},
    "extra-member": {"execute": "guest-ping", "control": {}, "id": 5},
    "empty-argument-name": {"execute": "guest-file-open", "arguments": {"path": "/x", "": 1}},
    "empty-nested-argument-name": {"execute": "guest-set-vcpus",
                                   "arguments": {"vcpus": [{"logical-id": 0, "online": True, "": 1}]}},
    "bad-arguments-and-extra": {"arguments": [], "foo": 1, "execute": "guest-ping", "id": 6},
    "extra-and-bad-execute": {"foo": 1, "execute": 5},
    "extra-and-bad-arguments": {"zzz": 1, "arguments": 5, "execute": "guest-ping"},
    "unknown": {"execute": "guest-no-such", "arguments": {"x": 1}, "id": [7]},
    "unknown-case": {"execute": "Guest-Ping"},
    "windows-only": {"execute": "guest-get-devices"},
    # argument checks
    "ping-extra": {"execute": "guest-ping", "arguments": {"a": 1}},
    "ping-extras": {"execute": "guest-ping", "arguments": {"b": 1, "a": 2, "c": 3}},
    "ping-empty": {"execute": "guest-ping", "arguments": {}, "id": None},
    "sync-missing": {"execute": "guest-sync", "id": 8},
    "sync-float": {"execute": "guest-sync", "arguments": {"id": 1.0}},
    "sync-exponent": {"execute": "guest-sync", "arguments": {"id": 1e2}},
    "sync-string": {"execute": "guest-sync", "arguments": {"id": "1"}},
    "sync-bool": {"execute": "guest-sync", "arguments": {"id": False}},
    "sync-null": {"execute": "guest-sync", "arguments": {"id": None}},
    "sync-2^63": {"execute": "guest-sync", "arguments": {"id": 1 << 63}},
    "sync-int64-min": {"execute": "guest-sync", "arguments": {"id": -(1 << 63)}},
    "sync-extra-after-valid": {"execute": "guest-sync", "arguments": {"id": 1, "foo": 2}},
    "sync-bad-before-extra": {"execute": "guest-sync", "arguments": {"zz": 1, "id": "x"}},
    "sync-delimited-missing": {"execute": "guest-sync-delimited", "arguments": {}, "id": "d"},
    "time-extra": {"execute": "guest-get-time", "arguments": {"now": True}},
    "set-time-float": {"execute": "guest-set-time", "arguments": {"time": 1.5}},
    "shutdown-mode-type": {"execute": "guest-shutdown", "arguments": {"mode": 1}},
    "open-missing-path": {"execute": "guest-file-open", "arguments": {"mode": "r"}},
    "open-path-type": {"execute": "guest-file-open", "arguments": {"path": ["/"]}},
    "read-count-type": {"execute": "guest-file-read", "arguments": {"handle": NO_HANDLE, "count": "4"}},
    "read-valid": {"execute": "guest-file-read", "arguments": {"handle": NO_HANDLE, "count": 4}},
    "write-missing-buf": {"execute": "guest-file-write", "arguments": {"handle": NO_HANDLE}},
    "seek-whence-name": {"execute": "guest-file-seek", "arguments": {"handle": NO_HANDLE, "offset": 0, "whence": "end"}},
    "seek-whence-number": {"execute": "guest-file-seek", "arguments": {"handle": NO_HANDLE, "offset": 0, "whence": 9}},
    "seek-whence-bogus": {"execute": "guest-file-seek", "arguments": {"handle": 1, "offset": 0, "whence": "bogus"}},
    "seek-whence-bool": {"execute": "guest-file-seek", "arguments": {"handle": 1, "offset": 0, "whence": True}},
    "seek-whence-null": {"execute": "guest-file-seek", "arguments": {"handle": 1, "offset": 0, "whence": None}},
    "seek-whence-float": {"execute": "guest-file-seek", "arguments": {"handle": 1, "offset": 0, "whence": 0.5}},
    "seek-whence-missing": {"execute": "guest-file-seek", "arguments": {"handle": 1, "offset": 0}},
    "close-valid": {"execute": "guest-file-close", "arguments": {"handle": NO_HANDLE}, "id": 9},
    "freeze-list-null": {"execute": "guest-fsfreeze-freeze-list", "arguments": {"mountpoints": None}},
    "freeze-list-element": {"execute": "guest-fsfreeze-freeze-list", "arguments": {"mountpoints": ["/", 1]}},
    "fstrim-null": {"execute": "guest-fstrim", "arguments": {"minimum": None}},
    "set-vcpus-missing-online": {"execute": "guest-set-vcpus", "arguments": {"vcpus": [{"logical-id": 0}]}},
    "set-vcpus-second-bad": {"execute": "guest-set-vcpus",
                             "arguments": {"vcpus": [{"logical-id": 0, "online": True}, {"logical-id": "x"}]}},
    "set-vcpus-nested-extra": {"execute": "guest-set-vcpus",
                               "arguments": {"vcpus": [{"logical-id": 0, "online": True, "zz": 1}]}},
    "set-vcpus-element-type": {"execute": "guest-set-vcpus", "arguments": {"vcpus": [1]}},
    "set-vcpus-not-array": {"execute": "guest-set-vcpus", "arguments": {"vcpus": {}}},
    "memory-uint64-string": {"execute": "guest-set-memory-blocks",
                             "arguments": {"mem-blks": [{"phys-index": "x", "online": True}]}},
    "memory-uint64-float": {"execute": "guest-set-memory-blocks",
                            "arguments": {"mem-blks": [{"phys-index": 1.5, "online": True}]}},
    "memory-uint64-negative": {"execute": "guest-set-memory-blocks",
                               "arguments": {"mem-blks": [{"phys-index": -1, "online": True}]}},
    "memory-uint64-max": {"execute": "guest-set-memory-blocks",
                          "arguments": {"mem-blks": [{"phys-index": (1 << 64) - 1, "online": False}]}},
    "memory-empty": {"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": []}},
    "memory-missing-index": {"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [{"online": True}]}},
    "password-missing-crypted": {"execute": "guest-set-user-password",
                                 "arguments": {"username": NO_USER, "password": "eA=="}},
    "password-crypted-string": {"execute": "guest-set-user-password",
                                "arguments": {"username": NO_USER, "password": "eA==", "crypted": "no"}},
    "exec-arg-element": {"execute": "guest-exec", "arguments": {"path": "/nonexistent-qga", "arg": ["a", 1]}},
    "exec-capture-number": {"execute": "guest-exec", "arguments": {"path": "/nonexistent-qga", "capture-output": 1}},
    "exec-capture-bogus": {"execute": "guest-exec", "arguments": {"path": "/nonexistent-qga", "capture-output": "all"}},
    "exec-missing-path": {"execute": "guest-exec", "arguments": {"env": []}},
    "exec-status-type": {"execute": "guest-exec-status", "arguments": {"pid": "1"}},
    "ssh-get-valid": {"execute": "guest-ssh-get-authorized-keys", "arguments": {"username": NO_USER}},
    "ssh-add-key-type": {"execute": "guest-ssh-add-authorized-keys", "arguments": {"username": NO_USER, "keys": [1]}},
    "ssh-add-reset-type": {"execute": "guest-ssh-add-authorized-keys",
                           "arguments": {"username": NO_USER, "keys": [], "reset": "yes"}},
    "ssh-remove-missing-keys": {"execute": "guest-ssh-remove-authorized-keys", "arguments": {"username": NO_USER}},
}


# Where current upstream (which we follow) answers differently from 7.2:
# guest-get-devices is no longer registered off Windows (9.1), and
# capture-output became an alternate of bool and a mode enum (8.0).
UPSTREAM_DIFFERS = {
    "windows-only": ("Command guest-get-devices has been disabled",
                     "The command guest-get-devices has not been found"),
    "exec-capture-number": ("Invalid parameter type for 'capture-output', expected: boolean",
                            "Invalid parameter type for 'capture-output', expected: GuestExecCaptureOutput"),
    "exec-capture-bogus": ("Invalid parameter type for 'capture-output', expected: boolean",
                           "Parameter 'capture-output' does not accept value 'all'"),
}


def _stub(ctx, **kwargs):
    return ACCEPTED


def _our_dispatcher(state=None, policy=None, **overrides) -> Dispatcher:
    """Our dispatcher with every non-core handler replaced by a stub."""
    handlers = {name: _stub for name in SCHEMA.command_names()}
    handlers.update(module_handlers("qga.commands.core"))
    handlers.update(overrides)
    return Dispatcher(SCHEMA, handlers, Context(config=None, state=state), policy)


OURS = _our_dispatcher()
# Cases whose whole reply comes from the checks (or from the core commands),
# so the candidate agent must write exactly the bytes qemu-ga writes.
WIRE_CASES = [name for name, request in CASES.items() if name not in UPSTREAM_DIFFERS
              and (OURS.dispatch(json.loads(json.dumps(request))) or {}).get("return") != ACCEPTED]


@pytest.fixture(scope="module")
def ours():
    return OURS


@pytest.fixture
def reference(agent_pool):
    session = Session("qemu-ga", agent_pool.get("reference", "qemu-ga")).connect()
    yield session
    session.close()


# The transcript marker starts with 0xFF, which qemu-ga answers with this
# error when its parser is idle.
STRAY_FF = b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'


def replies(session: Session, data: bytes) -> list:
    lines = session.transcript(data)
    assert lines and lines[-1] == STRAY_FF, lines
    return [json.loads(line) for line in lines[:-1]]


def ask(session: Session, request) -> dict:
    (reply,) = replies(session, json.dumps(request).encode())
    return reply


def assert_same_verdict(request, theirs: dict, mine: dict) -> None:
    desc = theirs.get("error", {}).get("desc", "")
    if mine.get("return") == ACCEPTED:
        assert not desc.startswith(CHECK_PREFIXES), (request, theirs)
        assert mine.get("id") == theirs.get("id")
    else:
        assert mine == theirs, request


# -- byte for byte --------------------------------------------------------------------

@pytest.mark.parametrize("name", WIRE_CASES)
def test_wire_transcripts(wire: Wire, name):
    wire.compare(json.dumps(CASES[name]).encode())


# -- in process ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_dispatcher_matches_qemu_ga(reference, ours, name):
    request = CASES[name]
    theirs, mine = ask(reference, request), ours.dispatch(json.loads(json.dumps(request)))
    if name in UPSTREAM_DIFFERS:
        assert (theirs["error"]["desc"], mine["error"]["desc"]) == UPSTREAM_DIFFERS[name]
        assert theirs["error"]["class"] == mine["error"]["class"]
    else:
        assert_same_verdict(request, theirs, mine)


def test_several_unexpected_members_match(reference, ours):
    rng = random.Random(20240722)
    alphabet = "abcdefghijklmnopqrstuvwxyz-_0123456789"
    batch = []
    for _ in range(250):
        keys = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
                for _ in range(rng.choice([2, 3, 5, 8, 9, 13, 20, 40]))}
        arguments = {key: 1 for key in keys}
        command = rng.choice(["guest-ping", "guest-sync", "guest-file-close"])
        if command == "guest-sync":
            arguments["id"] = 1
        elif command == "guest-file-close":
            arguments["handle"] = NO_HANDLE
        batch.append({"execute": command, "arguments": arguments})
    answers = replies(reference, b"".join(json.dumps(request).encode() for request in batch))
    assert len(answers) == len(batch)
    for request, answer in zip(batch, answers):
        assert ours.dispatch(request) == answer, request


def test_request_member_order_matches(reference, ours):
    rng = random.Random(8)
    members = {"execute": ["guest-ping", 5, None], "arguments": [{}, [], 1], "id": [1],
               "exec-oob": ["guest-ping"], "foo": [1], "control": [{}], "zz": [True]}
    batch = []
    for _ in range(200):
        names = rng.sample(list(members), rng.randint(1, len(members)))
        batch.append({name: rng.choice(members[name]) for name in names})
    answers = replies(reference, b"".join(json.dumps(request).encode() for request in batch))
    assert len(answers) == len(batch)
    for request, answer in zip(batch, answers):
        assert ours.dispatch(request) == answer, request


def test_guest_info_order_and_flags_match(reference, ours):
    theirs = ask(reference, {"execute": "guest-info"})["return"]["supported_commands"]
    mine = ours.dispatch({"execute": "guest-info"})["return"]["supported_commands"]
    common = {entry["name"] for entry in theirs} & {entry["name"] for entry in mine}
    assert len(common) == 41  # 7.2 lacks get-load and get-route; we lack the Windows-only one
    assert [e for e in mine if e["name"] in common] == [e for e in theirs if e["name"] in common]


def test_qemu_ga_writes_members_in_qdict_order(reference):
    """The order qga.qdict_order predicts is the one qemu-ga writes."""
    requests = [
        {"execute": "guest-info", "id": 1},
        {"execute": "guest-get-osinfo", "id": 2},
        {"execute": "guest-get-timezone"},
        {"execute": "guest-get-host-name"},
        {"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [{"phys-index": 7, "online": True}]}},
        {"execute": "guest-no-such", "id": 3},
        {"execute": "guest-get-vcpus"},
    ]
    checked = 0
    for request in requests:
        line = reference.transcript(json.dumps(request).encode())[0]
        assert line != STRAY_FF
        for keys in _object_key_orders(json.loads(line, object_pairs_hook=list)):
            assert keys == qdict_order(keys), (request, keys)
            checked += 1
    assert checked > 10


def _object_key_orders(value):
    """Key lists of every object in a value parsed with object_pairs_hook=list."""
    if isinstance(value, list) and value and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        yield [key for key, _ in value]
        for _, item in value:
            yield from _object_key_orders(item)
    elif isinstance(value, list):
        for item in value:
            yield from _object_key_orders(item)


# -- frozen and blocked agents ----------------------------------------------------------

@pytest.fixture(scope="module")
def special_agents(agent_pool):
    """A qemu-ga started frozen (marker present) and one with -b."""
    workdirs = [Path(tempfile.mkdtemp(prefix="qgaargs-")) for _ in range(2)]
    (workdirs[0] / "state").mkdir()
    (workdirs[0] / "state" / "qga.state.isfrozen").touch()
    frozen = real_qemu_ga(workdirs[0]).start()
    blocked = real_qemu_ga(workdirs[1], ["-b", "guest-get-time,guest-info", "-b", "guest-no-such"]).start()
    yield frozen, blocked
    for agent in (frozen, blocked):
        agent.stop()
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)


class _Frozen:
    def is_frozen(self) -> bool:
        return True


POLICY_CASES = [
    {"execute": "guest-get-time", "id": 1},
    {"execute": "guest-file-open", "arguments": {"bad": 1}},
    {"execute": "guest-info"},
    {"execute": "guest-fsfreeze-status"},
    {"execute": "guest-ping", "arguments": {"x": 1}},
    {"execute": "guest-sync", "arguments": {"id": 4}},
    {"execute": "guest-no-such"},
]


def test_frozen_agent_matches(special_agents):
    ours = _our_dispatcher(_Frozen(), **{"guest-fsfreeze-status": lambda ctx: "frozen"})
    session = Session("frozen qemu-ga", special_agents[0]).connect()
    try:
        for request in POLICY_CASES:
            if request["execute"] == "guest-info":
                theirs = ask(session, request)["return"]["supported_commands"]
                mine = ours.dispatch(request)["return"]["supported_commands"]
                enabled = {e["name"] for e in theirs if e["enabled"]}
                assert enabled == {e["name"] for e in mine if e["enabled"]}
                assert len(enabled) == 6
            else:
                assert_same_verdict(request, ask(session, request), ours.dispatch(request))
    finally:
        session.close()


def test_blocked_agent_matches(special_agents):
    ours = _our_dispatcher(policy=Policy(blocked=["guest-get-time", "guest-info", "guest-no-such"]),
                           **{"guest-fsfreeze-status": lambda ctx: "thawed"})
    session = Session("qemu-ga -b", special_agents[1]).connect()
    try:
        for request in POLICY_CASES:
            assert_same_verdict(request, ask(session, request), ours.dispatch(request))
    finally:
        session.close()


READ_ONLY_COMMANDS = [
    "guest-info", "guest-get-time", "guest-fsfreeze-status", "guest-network-get-interfaces",
    "guest-get-vcpus", "guest-get-disks", "guest-get-fsinfo", "guest-get-memory-blocks",
    "guest-get-memory-block-info", "guest-get-host-name", "guest-get-users", "guest-get-timezone",
    "guest-get-osinfo", "guest-get-diskstats", "guest-get-cpustats",
]


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS)
def test_qemu_ga_replies_fit_our_return_schemas(reference, command):
    reply = ask(reference, {"execute": command})
    if "error" in reply:
        pytest.skip(f"{command} fails on this host: {reply['error']['desc']}")
    validate_return(SCHEMA, command, reply["return"])
