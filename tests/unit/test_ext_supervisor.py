"""Extension processes for real: users, environment, limits, restarts, crash loops, stopping."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from qga.ext import launch
from qga.ext.supervisor import FAILED, RESTARTING, RUNNING, STARTING, STOPPED, Supervisor
from qga.loop import Loop

ROOT = os.geteuid() == 0
# Per test run: runs side by side must not share (and kill) each other's users.
SUP = f"t-sup-{os.getpid()}"
TREE_NAME = f"t-sup-tree-{os.getpid()}"
NAMES = (SUP, TREE_NAME)


@pytest.fixture(scope="module", autouse=True)
def remove_test_users():
    yield
    if ROOT:
        for name in NAMES:
            subprocess.run(["userdel", launch.user_name(name)], capture_output=True)


@pytest.fixture
def workdir():
    """A directory other users can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="qga-sup-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Rig:
    def __init__(self, workdir, script, name=SUP, limits=None, ready_timeout=5.0):
        self.workdir = workdir
        self.loop = Loop()
        self.frozen = False
        self.name = name
        (workdir / "bundle").mkdir(exist_ok=True)
        (workdir / "bundle" / "main.py").write_text(script)
        os.chmod(workdir / "bundle", 0o755)
        self.state = workdir / "state"
        self.limits = dict({"memory": 512 * 1024 * 1024, "nofile": 64, "nproc": 64,
                            "cpu": 100, "tasks": 64}, **(limits or {}))
        self.health = []
        self.supervisor = Supervisor(name, self.loop, self.prepare, ready_timeout,
                                     lambda: self.frozen)
        self.supervisor.backoff_first = 0.02
        self.supervisor.grace = 0.5

    def prepare(self):
        identity = launch.identity_for(self.name)
        self.state.mkdir(exist_ok=True)
        if identity.own_user:
            os.chown(self.state, identity.uid, identity.gid)
        entry = type("EntryPoint", (), {"interpreter": "python3", "path": "main.py",
                                        "args": ("--flag",)})
        bundle = str(self.workdir / "bundle")
        env = launch.build_env(self.name, "/nonexistent.sock", bundle, str(self.state),
                               "/nonexistent.json", str(self.state))
        return launch.LaunchSpec(self.name, launch.build_argv(entry, bundle, launch.find_python()),
                                 env, bundle, identity, self.limits, frozenset(),
                                 (str(self.state),))

    def run_until(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            self.loop.run_once(0.02)
        return predicate()

    def close(self):
        self.supervisor.close()
        self.loop.close()


@pytest.fixture
def rig_factory(workdir):
    rigs = []

    def make(script, **kwargs):
        rig = Rig(workdir, script, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


SLEEPER = """
import json, os, sys, time
state = os.environ["QGA_EXT_STATE"]
with open(os.path.join(state, "seen.json"), "w") as out:
    json.dump({"env": dict(os.environ), "argv": sys.argv, "uid": os.getuid(),
               "groups": os.getgroups(), "cwd": os.getcwd(), "sid": os.getsid(0),
               "umask": os.umask(0)}, out)
print("started", flush=True)
time.sleep(60)
"""


def wait_for_file(rig, path):
    assert rig.run_until(path.exists), rig.supervisor.last_error
    time.sleep(0.05)
    return json.loads(path.read_text())


def test_start_runs_it_scrubbed_in_its_own_session_as_its_own_user(rig_factory, monkeypatch):
    monkeypatch.setenv("SECRET_OF_THE_AGENT", "x")
    rig = rig_factory(SLEEPER)
    rig.supervisor.start()
    assert rig.supervisor.state == STARTING
    seen = wait_for_file(rig, rig.state / "seen.json")
    env = seen["env"]
    assert set(env) == {"QGA_EXT_NAME", "QGA_EXT_SOCKET", "QGA_EXT_DIR", "QGA_EXT_STATE",
                        "QGA_EXT_SETTINGS", "QGA_EXT_RUNTIME", "PATH", "LANG", "HOME"}
    assert env["QGA_EXT_NAME"] == SUP and env["HOME"] == str(rig.state)
    assert seen["argv"][1:] == ["--flag"]
    assert seen["cwd"] == str(rig.workdir / "bundle")
    assert seen["sid"] == rig.supervisor.pid  # a new session: it leads its own tree
    assert seen["umask"] == 0o077
    if ROOT:
        import grp
        import pwd

        user = pwd.getpwuid(seen["uid"])
        assert user.pw_name == launch.user_name(SUP)
        assert user.pw_shell.endswith(("nologin", "false"))
        assert seen["groups"] == [grp.getgrnam("qga-ext").gr_gid]
    assert rig.run_until(lambda: "started" in rig.supervisor.output_tail)
    limits = Path(f"/proc/{rig.supervisor.pid}/limits").read_text()
    assert any(line.startswith("Max open files") and " 64 " in line
               for line in limits.splitlines())
    assert any(line.startswith("Max address space") and str(512 * 1024 * 1024) in line
               for line in limits.splitlines())
    assert any(line.startswith("Max core file size") and " 0 " in line
               for line in limits.splitlines())
    rig.supervisor.ready()
    assert rig.supervisor.state == RUNNING


def test_a_crash_is_restarted_and_a_crash_loop_gives_up(rig_factory):
    rig = rig_factory("import sys; print('boom'); sys.exit(3)\n")
    rig.supervisor.start()
    assert rig.run_until(lambda: rig.supervisor.state == FAILED)
    assert rig.supervisor.restarts == rig.supervisor.crash_limit - 1
    assert "gave up after 5 failures" in rig.supervisor.last_error
    assert "exited with status 3 (last output: boom)" in rig.supervisor.last_error
    assert rig.supervisor.pid is None
    rig.supervisor.start()  # the host may try again
    assert rig.supervisor.state == STARTING


def test_a_killed_process_comes_back(rig_factory):
    rig = rig_factory(SLEEPER)
    rig.supervisor.start()
    assert rig.run_until(lambda: "started" in rig.supervisor.output_tail)
    rig.supervisor.ready()
    first = rig.supervisor.pid
    os.kill(first, signal.SIGKILL)
    assert rig.run_until(lambda: rig.supervisor.state == RESTARTING)
    assert rig.supervisor.last_error == "was killed by SIGKILL (last output: started)"
    assert rig.run_until(lambda: rig.supervisor.state == STARTING)
    assert rig.supervisor.pid != first


def test_no_ready_in_time_counts_as_a_failure(rig_factory):
    rig = rig_factory(SLEEPER, ready_timeout=0.2)
    rig.supervisor.start()
    first = rig.supervisor.pid
    assert rig.run_until(lambda: rig.supervisor.state == RESTARTING)
    assert "did not say it was ready within 0.2 s" in rig.supervisor.last_error
    assert not Path(f"/proc/{first}").exists() or _zombie_or_gone(first)


def _zombie_or_gone(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except OSError:
        return True


def test_a_health_check_gets_one_chance(rig_factory):
    rig = rig_factory("import sys; sys.exit(1)\n")
    rig.supervisor.start(health=rig.health.append)
    assert rig.run_until(lambda: rig.health)
    assert rig.health == ["exited with status 1"]
    assert rig.supervisor.state == FAILED and rig.supervisor.restarts == 0

    quiet = rig_factory(SLEEPER, ready_timeout=0.2)
    quiet.supervisor.start(health=quiet.health.append)
    assert quiet.run_until(lambda: quiet.supervisor.state == STOPPED)
    assert quiet.health == ["did not say it was ready within 0.2 s"]

    good = rig_factory(SLEEPER)
    good.supervisor.start(health=good.health.append)
    good.supervisor.ready()
    assert good.supervisor.state == RUNNING
    assert good.health == []  # reported from the loop, not from inside ready()
    assert good.run_until(lambda: good.health) and good.health == [None]


TREE = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # makes the grace time expire
if os.fork() == 0:                               # a child in the session
    time.sleep(60); os._exit(0)
if os.fork() == 0:                               # a daemon that leaves the session
    os.setsid()
    if os.fork() == 0:
        print("daemon", flush=True); time.sleep(60); os._exit(0)
    os._exit(0)
print("tree", flush=True)
time.sleep(60)
"""


def test_stop_kills_the_whole_tree(rig_factory):
    rig = rig_factory(TREE, name=TREE_NAME)
    rig.supervisor.start()
    tail = rig.supervisor.output_tail
    assert rig.run_until(lambda: "tree" in tail and "daemon" in tail)
    leader = rig.supervisor.pid
    uid = rig.supervisor.process.spec.identity.uid

    def members():
        return {pid for pid in launch.tree_members(leader, uid) if not _zombie_or_gone(pid)}

    # The leader, its child, and (as root, by its user) the daemon that left the
    # session, once the daemon's first parent is gone.
    assert rig.run_until(lambda: len(members()) == (3 if ROOT else 2)), members()
    found = members()
    stopped = []
    rig.supervisor.stop(lambda: stopped.append(True))
    assert rig.run_until(lambda: stopped, timeout=5)
    assert rig.supervisor.state == STOPPED
    time.sleep(0.1)
    alive = [pid for pid in found if Path(f"/proc/{pid}").exists() and not _zombie_or_gone(pid)]
    assert alive == []


def test_a_frozen_guest_delays_the_start(rig_factory):
    rig = rig_factory(SLEEPER)
    rig.frozen = True
    rig.supervisor.start()
    assert rig.supervisor.state == RESTARTING and rig.supervisor.pid is None
    rig.run_until(lambda: False, timeout=0.4)
    assert rig.supervisor.pid is None
    rig.frozen = False
    assert rig.run_until(lambda: rig.supervisor.state == STARTING, timeout=2)


def test_a_program_that_cannot_start_is_a_failure(rig_factory, workdir):
    rig = rig_factory(SLEEPER)
    original = rig.prepare

    def broken():
        spec = original()
        return spec._replace(argv=[str(workdir / "missing")])

    rig.supervisor.prepare = broken
    rig.supervisor.start(health=rig.health.append)
    assert rig.run_until(lambda: rig.health)
    assert f"cannot start extension {SUP}" in rig.health[0]
    assert rig.supervisor.state == FAILED


def test_user_names_fit_useradd():
    assert launch.user_name("hello") == "qga-ext-hello"
    long = launch.user_name("a" * 64)
    assert len(long) == 32 and long.startswith("qga-ext-aaaa")
    assert launch.user_name("a" * 64) != launch.user_name("a" * 63 + "b")


def test_the_systemd_command_line():
    identity = launch.Identity(990, 990, (980,), "qga-ext-hello")
    spec = launch.LaunchSpec("hello", ["/usr/bin/python3", "-s", "/b/hello.py"],
                             {"QGA_EXT_NAME": "hello", "PATH": "/usr/bin"}, "/b", identity,
                             {"memory": 1 << 26, "cpu": 50, "nofile": 256, "nproc": 32,
                              "tasks": 16}, frozenset({"network"}), ("/s", "/r"))
    argv = launch.systemd_argv(spec)
    assert argv[:5] == ["systemd-run", "--quiet", "--wait", "--pipe", "--collect"]
    assert "--unit=qga-ext-hello.service" in argv
    for item in ("MemoryMax=67108864", "CPUQuota=50%", "TasksMax=16", "LimitNOFILE=256",
                 "LimitNPROC=32", "User=990", "Group=990", "SupplementaryGroups=980",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/s /r",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "WorkingDirectory=/b",
                 "InaccessiblePaths=-/run/dbus/system_bus_socket"):
        assert f"--property={item}" in argv
    assert "--setenv=QGA_EXT_NAME=hello" in argv
    assert argv[argv.index("--"):] == ["--", "/usr/bin/python3", "-s", "/b/hello.py"]


def test_only_a_system_bus_extension_learns_the_agents_bus_address(monkeypatch):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/private/bus")
    paths = ("hello", "/r/hello.sock", "/b", "/s", "/s/settings.json", "/r/hello")
    assert "DBUS_SYSTEM_BUS_ADDRESS" not in launch.build_env(*paths, frozenset({"network"}))
    env = launch.build_env(*paths, frozenset({"system-bus"}))
    assert env["DBUS_SYSTEM_BUS_ADDRESS"] == "unix:path=/run/private/bus"
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS")
    assert "DBUS_SYSTEM_BUS_ADDRESS" not in launch.build_env(*paths, frozenset({"system-bus"}))


def test_a_bus_that_cannot_reload_is_a_warning_not_a_failure(monkeypatch, caplog, workdir):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={workdir}/no-bus")
    launch.reload_system_bus("qga-ext-hello")
    [record] = [r for r in caplog.records if "systemctl reload dbus" in r.getMessage()]
    assert record.levelname == "WARNING" and "qga-ext-hello" in record.getMessage()
