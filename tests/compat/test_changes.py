"""The commands that change the guest: the real qemu-ga and the candidate, side by side.

Only paths that are safe on the machine running the tests are exercised:

* argument checks and error paths that stop before anything changes
  (shutdown with a bad mode, set-time out of range, suspend with a bad
  argument, vcpus and memory blocks that do not exist or already are in the
  requested state);
* the ssh-key and password commands on a throwaway user;
* freezing: ``guest-fsfreeze-freeze-list`` of a nonexistent mountpoint or of
  a test loop mount, never anything else; our agent additionally runs
  fenced to the loop mount (``QGA_TEST_MOUNTPOINTS``);
* guest-fstrim, compared on the loop mount's entry (qemu-ga trims every
  local filesystem, which is harmless).

Replies are compared byte for byte, except where noted.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest

from tests.support.agents import our_agent, qemu_ga_available, real_qemu_ga
from tests.support.loopfs import fence_env, freeze_list_request, loopfs  # noqa: F401
from tests.support.users import throwaway_user  # noqa: F401

pytestmark = pytest.mark.compat


def request(name: str, arguments: Optional[dict] = None) -> bytes:
    body = {"execute": name}
    if arguments is not None:
        body["arguments"] = arguments
    return json.dumps(body).encode()


def sysfs_state(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def unchanged_memory_block() -> dict:
    """Block 0 in the state it is already in (so neither agent writes)."""
    state = sysfs_state("/sys/devices/system/memory/memory0/state")
    return {"phys-index": 0, "online": state != "offline"}


REQUESTS = [
    # guest-shutdown: checked before anything runs
    request("guest-shutdown", {"mode": "bogus"}),
    request("guest-shutdown", {"mode": 1}),
    request("guest-shutdown", {"mode": "halt", "delay": 1}),
    # guest-set-time: years outside 1970..2069 are refused before settimeofday
    request("guest-set-time", {"time": -10 ** 18}),
    request("guest-set-time", {"time": 4 * 10 ** 18}),
    request("guest-set-time", {"time": "now"}),
    request("guest-set-time", {"time": 1.5}),
    # guest-suspend-*: only argument errors
    request("guest-suspend-ram", {"x": 1}),
    request("guest-suspend-disk", {"mode": "disk"}),
    request("guest-suspend-hybrid", {"delay": None}),
    # guest-set-vcpus: nothing changes (cpu0 cannot go offline; cpu999 is absent)
    request("guest-set-vcpus", {"vcpus": []}),
    request("guest-set-vcpus", {"vcpus": [{"logical-id": 999, "online": True}]}),
    request("guest-set-vcpus", {"vcpus": [{"logical-id": 999, "online": False}]}),
    request("guest-set-vcpus", {"vcpus": [{"logical-id": 0, "online": False}]}),
    request("guest-set-vcpus", {"vcpus": [{"logical-id": 0, "online": True},
                                          {"logical-id": 999, "online": False}]}),
    request("guest-set-vcpus", {"vcpus": [{"logical-id": 0}]}),
    request("guest-set-vcpus", {"vcpus": [{"logical-id": 0, "online": True, "can-offline": "x"}]}),
    request("guest-set-vcpus", {"vcpus": {}}),
    # guest-set-memory-blocks
    request("guest-set-memory-blocks", {"mem-blks": []}),
    request("guest-set-memory-blocks", {"mem-blks": [{"phys-index": 999999, "online": True}]}),
    request("guest-set-memory-blocks", {"mem-blks": [{"phys-index": -1, "online": True}]}),
    request("guest-set-memory-blocks", {"mem-blks": [unchanged_memory_block(),
                                                     {"phys-index": 999998, "online": False}]}),
    request("guest-set-memory-blocks", {"mem-blks": [{"phys-index": 1.0, "online": True}]}),
    # ssh keys: unknown users and bad keys
    request("guest-ssh-get-authorized-keys", {"username": "qga-no-such-user"}),
    request("guest-ssh-add-authorized-keys", {"username": "qga-no-such-user", "keys": ["a b"]}),
    request("guest-ssh-remove-authorized-keys", {"username": "qga-no-such-user", "keys": []}),
    request("guest-ssh-add-authorized-keys", {"username": "qga-no-such-user", "keys": ["#a b"]}),
    request("guest-ssh-remove-authorized-keys", {"username": "x", "keys": ["a\nb"]}),
    request("guest-ssh-add-authorized-keys", {"username": "x", "keys": "a b"}),
    request("guest-ssh-add-authorized-keys", {"username": "x", "keys": [], "reset": "yes"}),
    # guest-set-user-password: everything refused before chpasswd, or a failing chpasswd
    request("guest-set-user-password", {"username": "a:b", "password": "YWJj", "crypted": False}),
    request("guest-set-user-password", {"username": "a\nb", "password": "YWJj", "crypted": True}),
    request("guest-set-user-password", {"username": "ab", "password": "YQpi", "crypted": False}),
    request("guest-set-user-password", {"username": "ab", "password": "!!!", "crypted": False}),
    request("guest-set-user-password", {"username": "ab", "password": "YWJj"}),
    request("guest-set-user-password", {"username": "qga-no-such-user", "password": "YWJj",
                                        "crypted": False}),
    # fsfreeze and fstrim without touching anything
    request("guest-fsfreeze-status"),
    request("guest-fsfreeze-status", {"x": 1}),
    request("guest-fsfreeze-freeze-list", {"mountpoints": "/"}),
    request("guest-fsfreeze-freeze-list", {"mountpoints": [1]}),
    request("guest-fstrim", {"minimum": "x"}),
]


@pytest.mark.parametrize("data", REQUESTS, ids=lambda data: data.decode()[:90])
def test_same_reply(wire, data):
    wire.compare(data)


# -- ssh keys and passwords on a throwaway user -------------------------------------------


def ssh_steps(user: str) -> List[bytes]:
    return [
        request("guest-ssh-get-authorized-keys", {"username": user}),
        request("guest-ssh-remove-authorized-keys", {"username": user, "keys": ["k1"]}),
        request("guest-ssh-add-authorized-keys", {"username": user,
                                                  "keys": ["k1 a", "k2 b", "k1 a"]}),
        request("guest-ssh-get-authorized-keys", {"username": user}),
        request("guest-ssh-add-authorized-keys", {"username": user, "keys": ["k3 c", ""]}),
        request("guest-ssh-get-authorized-keys", {"username": user}),
        request("guest-ssh-remove-authorized-keys", {"username": user, "keys": ["k2 b", "zz"]}),
        request("guest-ssh-get-authorized-keys", {"username": user}),
        request("guest-ssh-add-authorized-keys", {"username": user, "keys": ["k4"],
                                                  "reset": True}),
        request("guest-ssh-get-authorized-keys", {"username": user}),
        request("guest-ssh-add-authorized-keys", {"username": user, "keys": [], "reset": True}),
        request("guest-ssh-get-authorized-keys", {"username": user}),
    ]


def file_state(path: Path) -> Tuple:
    if not path.exists():
        return ("missing",)
    info = path.stat()
    contents = path.read_bytes() if path.is_file() else None
    return (oct(info.st_mode), info.st_uid, info.st_gid, contents)


def test_ssh_key_scenario(wire, throwaway_user):
    ssh = throwaway_user.home / ".ssh"
    results = []
    for session in wire.sessions():
        shutil.rmtree(ssh, ignore_errors=True)
        lines = []
        states = []
        for step in ssh_steps(throwaway_user.name):
            lines.extend(session.transcript(step))
            states.append((file_state(ssh), file_state(ssh / "authorized_keys")))
        results.append((lines, states))
    (ref_lines, ref_states), (cand_lines, cand_states) = results
    assert cand_lines == ref_lines
    assert cand_states == ref_states


def test_existing_file_with_trailing_newline(wire, throwaway_user):
    ssh = throwaway_user.home / ".ssh"
    results = []
    for session in wire.sessions():
        shutil.rmtree(ssh, ignore_errors=True)
        ssh.mkdir(mode=0o755)
        (ssh / "authorized_keys").write_bytes(b"  one \n# c\n\ttwo\n")
        lines = session.transcript(request("guest-ssh-get-authorized-keys",
                                           {"username": throwaway_user.name}))
        lines += session.transcript(request("guest-ssh-add-authorized-keys",
                                            {"username": throwaway_user.name, "keys": ["new"]}))
        results.append((lines, file_state(ssh), file_state(ssh / "authorized_keys")))
    assert results[1] == results[0]


def test_set_password_of_throwaway_user(wire, throwaway_user):
    data = request("guest-set-user-password", {
        "username": throwaway_user.name,
        "password": base64.b64encode(b"compat-pw").decode(), "crypted": False})
    wire.compare(data)
    crypted = base64.b64encode(b"$6$abcdefgh$" + b"x" * 86).decode()
    wire.compare(request("guest-set-user-password", {
        "username": throwaway_user.name, "password": crypted, "crypted": True}))


# -- freezing with a hook, on dedicated agents -----------------------------------------------


class HookedAgent:
    """An agent started with a logging hook whose exit status a file decides."""

    def __init__(self, kind: str, loopfs):
        self.kind = kind
        self.workdir = Path(tempfile.mkdtemp(prefix=f"qga-h6-{kind}-"))
        self.hook = self.workdir / "hook"
        self.log = self.workdir / "hook.log"
        self.status_file = self.workdir / "hook.status"
        self.status_file.write_text("0\n")
        self.hook.write_text(f'#!/bin/sh\necho "$#:$*" >> {self.log}\n'
                             f"exit $(cat {self.status_file})\n")
        self.hook.chmod(0o755)
        extra = [f"-F{self.hook}"]
        if kind == "qemu-ga":
            self.agent = real_qemu_ga(self.workdir, extra)
        else:
            self.agent = our_agent(self.workdir, extra, env=fence_env(loopfs))
        self.agent.start()

    def calls(self, steps: Sequence[bytes]) -> List[bytes]:
        with self.agent.connect() as connection:
            lines = []
            for step in steps:
                connection.send(step + b"\n")
                line = connection.read_line(30)
                lines.append(line.replace(str(self.workdir).encode(), b"$DIR"))
            return lines

    def hook_log(self) -> List[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def stop(self) -> None:
        self.agent.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def hooked(loopfs):
    if not qemu_ga_available():
        pytest.skip("qemu-ga is not installed")
    agents = [HookedAgent("qemu-ga", loopfs), HookedAgent("qga", loopfs)]
    yield agents
    loopfs.thaw()
    for agent in agents:
        agent.stop()


def run_both(agents, steps, prepare=None):
    results = []
    for agent in agents:
        if prepare is not None:
            prepare(agent)
        results.append((agent.calls(steps), agent.hook_log()))
    return results


def test_freeze_list_of_nothing_runs_the_hook(hooked):
    steps = [request("guest-fsfreeze-freeze-list", {"mountpoints": ["/nonexistent"]}),
             request("guest-fsfreeze-status"),
             request("guest-fsfreeze-thaw")]
    reference, candidate = run_both(hooked, steps)
    assert reference[0][0] == b'{"return": 0}\n'
    assert reference[1] == ["1:freeze", "1:thaw"]
    assert candidate == reference


def test_hook_failures(hooked):
    def failing(agent):
        agent.status_file.write_text("7\n")

    steps = [request("guest-fsfreeze-freeze-list", {"mountpoints": ["/nonexistent"]}),
             request("guest-fsfreeze-status"),
             request("guest-fsfreeze-thaw")]
    reference, candidate = run_both(hooked, steps, failing)
    assert b"fsfreeze hook has failed with status 7" in reference[0][0]
    assert candidate == reference


@pytest.mark.parametrize("breakage", ["not-executable", "missing"])
def test_hook_access(hooked, breakage):
    def break_hook(agent):
        if breakage == "missing":
            agent.hook.unlink()
        else:
            agent.hook.chmod(0o644)

    steps = [request("guest-fsfreeze-freeze-list", {"mountpoints": ["/nonexistent"]}),
             request("guest-fsfreeze-thaw")]
    reference, candidate = run_both(hooked, steps, break_hook)
    assert b"can't access fsfreeze hook '$DIR/hook'" in reference[0][0]
    assert candidate == reference


def test_freeze_and_thaw_the_loop_mount(hooked, loopfs):
    freeze = json.dumps(freeze_list_request(loopfs)).encode()
    twice = dict(freeze_list_request(loopfs))
    twice["arguments"] = {"mountpoints": [loopfs.path, loopfs.path, "/nonexistent"]}
    steps = [
        json.dumps(twice).encode(),
        request("guest-fsfreeze-status"),
        freeze,  # refused while frozen
        request("guest-fstrim"),
        request("guest-set-user-password", {"username": "x", "password": "", "crypted": False}),
        request("guest-fsfreeze-thaw"),
        request("guest-fsfreeze-thaw"),
        request("guest-fsfreeze-status"),
    ]
    results = []
    for agent in hooked:
        results.append((agent.calls(steps), agent.hook_log()))
        assert not loopfs.is_frozen()
    reference, candidate = results
    assert reference[0][0] == b'{"return": 1}\n'
    assert reference[0][5] == b'{"return": 1}\n'
    assert candidate == reference


def test_fstrim_the_loop_mount(hooked, loopfs):
    entries = []
    for agent in hooked:
        [line] = agent.calls([request("guest-fstrim", {"minimum": 65536})])
        paths = json.loads(line)["return"]["paths"]
        [entry] = [entry for entry in paths if entry["path"] == loopfs.path]
        entries.append(entry)
    reference, candidate = entries
    # Member order too: qemu-ga writes QDict order.
    assert list(candidate) == list(reference) == ["minimum", "path", "trimmed"]
    assert candidate["minimum"] == reference["minimum"]
