"""Starting, recognising and killing one extension process.

**Who it runs as.**  When the agent runs as root, each extension runs as its
own system user, ``qga-ext-<name>`` (names over 32 characters are cut and
given a hash suffix), created on first use with::

    useradd --system --no-create-home --home-dir /nonexistent \\
            --shell /usr/sbin/nologin --user-group qga-ext-<name>

and with one supplementary group, ``qga-ext`` (``groupadd --system``), the
group of the runtime directory holding the extensions' sockets.  Users are
kept when an extension is removed (a later install reuses the same uid, so
files it left cannot fall to someone else).  A ``qga-ext-*`` user that is
root, or whose primary group is root's, is refused.  When the agent does not
run as root, extensions run as the agent's user.

**How it is started.**  Where systemd is the service manager (and the agent
runs as root) the process is a transient service ``qga-ext-<name>.service``
started with ``systemd-run --wait --pipe``: systemd applies the limits
(``MemoryMax``, ``CPUQuota``, ``TasksMax``, ``LimitNOFILE``, ``LimitNPROC``)
and a sandbox (read-only system, private ``/tmp`` and devices, no new
privileges, only ``AF_UNIX`` sockets unless the manifest asks for
``network``, no D-Bus system bus unless it asks for ``system-bus``), and
stopping the unit kills its whole cgroup.  Elsewhere it is a plain child:
``fork``/``exec`` in a new session, the manifest's limits as rlimits
(``memory`` as ``RLIMIT_AS``, ``nofile``, ``nproc`` when it has its own user,
no core files; ``cpu`` and ``tasks`` need systemd), umask 077, and a
parent-death signal so it does not outlive a killed agent.  The tests run
the plain path (there is no systemd in the test containers); the systemd
command line is checked by unit tests only.

**The environment** is scrubbed: the ``QGA_EXT_*`` variables of
:mod:`qga.ext.wire`, a fixed ``PATH``, ``LANG=C.UTF-8`` and ``HOME`` (the
extension's state directory); nothing of the agent's environment, except,
for an extension with ``system-bus``, the agent's ``DBUS_SYSTEM_BUS_ADDRESS``
when it has one, so the extension finds the same system bus as the agent.

**The system bus learns of a new user.**  A D-Bus policy that names a user
(``contrib/dbus`` names ``qga-ext-ovirt-guest-agent``) is resolved when the
bus reads its configuration: a user created later is unknown to the bus
until it reloads.  So when the agent creates the user of an extension with
``system-bus``, it asks the bus to reload (``ReloadConfig``, allowed to root,
through ``dbus-send``); without a bus or the tool the agent logs what the
admin must do and goes on.

**Stopping kills the whole tree**: SIGTERM to the process group, then, when
the leader is gone or after the grace time, SIGKILL to every process of its
session or group, every descendant, and (with its own user) every process of
that user, which catches daemons that left the session.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import sys
from typing import Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Set, Tuple

from qga.errors import ExtensionRunError
from qga.ext import wire

log = logging.getLogger(__name__)

USER_PREFIX = "qga-ext-"
MAX_USER_NAME = 32
RUNTIME_GROUP = "qga-ext"
COMMAND_TIMEOUT = 10.0   # useradd, groupadd, systemctl: never longer
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_BUS_VARIABLE = "DBUS_SYSTEM_BUS_ADDRESS"
NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")
PR_SET_PDEATHSIG = 1


class Identity(NamedTuple):
    """Who an extension runs as; ``uid`` None: as the agent itself."""

    uid: Optional[int]
    gid: Optional[int]
    groups: Tuple[int, ...]
    user: Optional[str]

    @property
    def own_user(self) -> bool:
        return self.uid is not None


AGENT_IDENTITY = Identity(None, None, (), None)


class LaunchSpec(NamedTuple):
    """Everything needed to start one extension process."""

    name: str
    argv: List[str]
    env: Dict[str, str]
    cwd: str
    identity: Identity
    limits: Dict[str, int]
    capabilities: FrozenSet[str]
    writable: Tuple[str, ...]   # its state and runtime directories


# -- users ---------------------------------------------------------------------------------


def user_name(extension: str) -> str:
    """``qga-ext-<name>``, cut to 32 characters with a hash suffix when longer."""
    name = USER_PREFIX + extension
    if len(name) <= MAX_USER_NAME:
        return name
    digest = hashlib.sha256(extension.encode()).hexdigest()[:6]
    keep = MAX_USER_NAME - len(USER_PREFIX) - len(digest) - 1
    return f"{USER_PREFIX}{extension[:keep]}-{digest}"


def identity_for(extension: str, capabilities: Iterable[str] = ()) -> Identity:
    """The extension's own user (created if missing) when we are root; else ours.

    ``capabilities`` are the extension's: with ``system-bus`` a new user is
    announced to the system bus (see the module's docstring)."""
    if os.geteuid() != 0:
        return AGENT_IDENTITY
    import grp
    import pwd

    group = _ensure_group(grp)
    name = user_name(extension)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        _run_tool(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                   "--shell", _nologin(), "--user-group", "--comment",
                   f"qga extension {extension}", name], f"cannot create user {name}")
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ExtensionRunError(f"user {name} was created but cannot be found") from None
        log.info("created system user %s (uid %d) for extension %s", name, entry.pw_uid,
                 extension)
        if "system-bus" in capabilities:
            reload_system_bus(name)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ExtensionRunError(f"user {name} is root or in root's group; refusing to run"
                                f" extension {extension} as it")
    return Identity(entry.pw_uid, entry.pw_gid, (group,), name)


def runtime_group() -> Optional[int]:
    """The gid of ``qga-ext`` (created if missing) when we are root; else None."""
    if os.geteuid() != 0:
        return None
    import grp

    return _ensure_group(grp)


def reload_system_bus(user: str) -> None:
    """Ask the system bus to read its configuration again, so policies naming ``user`` apply."""
    argv = ["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus", "org.freedesktop.DBus.ReloadConfig"]
    try:
        _run_tool(argv, "cannot reload the system bus configuration",
                  _bus_environment(os.environ))
    except ExtensionRunError as error:
        log.warning("%s; D-Bus policies naming %s apply after 'systemctl reload dbus'",
                    error, user)
    else:
        log.info("the system bus reloaded its configuration for the new user %s", user)


def _bus_environment(environ: Dict[str, str]) -> Dict[str, str]:
    """The agent's system bus address, if it has one of its own."""
    address = environ.get(SYSTEM_BUS_VARIABLE)
    return {SYSTEM_BUS_VARIABLE: address} if address else {}


def _ensure_group(grp) -> int:
    try:
        return grp.getgrnam(RUNTIME_GROUP).gr_gid
    except KeyError:
        _run_tool(["groupadd", "--system", RUNTIME_GROUP], f"cannot create group {RUNTIME_GROUP}")
    try:
        return grp.getgrnam(RUNTIME_GROUP).gr_gid
    except KeyError:
        raise ExtensionRunError(f"group {RUNTIME_GROUP} was created but cannot be found") from None


def _nologin() -> str:
    return next((shell for shell in NOLOGIN_SHELLS if os.path.exists(shell)), "/bin/false")


def _run_tool(argv: List[str], what: str, extra_env: Optional[Dict[str, str]] = None) -> None:
    """Run a system tool with a bounded wait; ExtensionRunError with its message on failure."""
    import subprocess

    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, timeout=COMMAND_TIMEOUT, check=False,
                                env=dict({"PATH": SAFE_PATH, "LANG": "C"}, **(extra_env or {})))
    except subprocess.TimeoutExpired:
        raise ExtensionRunError(f"{what}: {argv[0]} took more than {COMMAND_TIMEOUT:g} s"
                                ) from None
    except OSError as error:
        raise ExtensionRunError(f"{what}: {argv[0]}: {error.strerror}") from None
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ExtensionRunError(f"{what}: {argv[0]} failed"
                                + (f": {detail[-1]}" if detail else ""))


# -- the command line and the environment ---------------------------------------------------


def find_python() -> str:
    """The guest's python3: the system one first (the agent's may live where users cannot)."""
    for candidate in PYTHON_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("python3", path=SAFE_PATH) or sys.executable


def build_argv(entry_point, bundle_dir: str, python: str) -> List[str]:
    program = os.path.join(bundle_dir, entry_point.path)
    if entry_point.interpreter == "python3":
        # -s: no user site; -E: no PYTHON* variables; -B: the bundle is read-only.
        return [python, "-s", "-E", "-B", program, *entry_point.args]
    return [program, *entry_point.args]


def build_env(name: str, socket_path: str, bundle_dir: str, state_dir: str,
              settings_path: str, runtime_dir: str,
              capabilities: Iterable[str] = ()) -> Dict[str, str]:
    env = {
        wire.ENV_NAME: name, wire.ENV_SOCKET: socket_path, wire.ENV_DIR: bundle_dir,
        wire.ENV_STATE: state_dir, wire.ENV_SETTINGS: settings_path,
        wire.ENV_RUNTIME: runtime_dir, "PATH": SAFE_PATH, "LANG": "C.UTF-8",
        "HOME": state_dir,
    }
    if "system-bus" in capabilities:
        env.update(_bus_environment(os.environ))
    return env


# -- /proc ---------------------------------------------------------------------------------------


class ProcStat(NamedTuple):
    pid: int
    ppid: int
    pgrp: int
    session: int
    start: int   # clock ticks after boot
    uid: int


def proc_stat(pid: int) -> Optional[ProcStat]:
    """The fields of /proc/PID/stat we use, and the owner; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            data = stream.read()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return ProcStat(pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), uid)


def all_processes() -> List[ProcStat]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = proc_stat(int(name))
            if info is not None:
                found.append(info)
    return found


def tree_members(leader: int, uid: Optional[int] = None,
                 processes: Optional[Iterable[ProcStat]] = None) -> Set[int]:
    """Processes that belong to the tree ``leader`` started.

    Its session or process group, its descendants, and with ``uid`` every
    process of that user; never ourselves or init.
    """
    table = list(all_processes() if processes is None else processes)
    children: Dict[int, List[int]] = {}
    for info in table:
        children.setdefault(info.ppid, []).append(info.pid)
    members = {info.pid for info in table
               if info.session == leader or info.pgrp == leader
               or (uid is not None and info.uid == uid)}
    stack = [leader]
    while stack:
        pid = stack.pop()
        for child in children.get(pid, ()):
            if child not in members:
                members.add(child)
                stack.append(child)
        members.add(pid)
    members.discard(os.getpid())
    members.discard(1)
    return {pid for pid in members if pid in {info.pid for info in table}}


def descends_from(pid: int, leader: int) -> bool:
    """Whether ``pid`` is ``leader`` or in its session, or has it as an ancestor."""
    for _ in range(64):
        info = proc_stat(pid)
        if info is None:
            return False
        if pid == leader or info.session == leader:
            return True
        if info.ppid <= 1:
            return False
        pid = info.ppid
    return False


def signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


# -- a running extension process -----------------------------------------------------------------


class Launched:
    """One started extension process: its exit, its output, its tree."""

    def __init__(self, popen, spec: LaunchSpec):
        self.popen = popen
        self.spec = spec
        self.pid: int = popen.pid
        self.returncode: Optional[int] = None
        self.exit_fd = _pidfd(self.pid)
        self.output_fd: Optional[int] = None
        if popen.stdout is not None:
            self.output_fd = popen.stdout.fileno()
            os.set_blocking(self.output_fd, False)

    def poll(self) -> Optional[int]:
        """The exit status once the process ended (-N: killed by signal N), else None."""
        if self.returncode is None:
            self.returncode = self.popen.poll()
        return self.returncode

    def owns(self, pid: int, uid: int) -> bool:
        """Whether a peer (pid, uid) is this extension."""
        raise NotImplementedError

    def terminate(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release our descriptors (after the process ended)."""
        if self.exit_fd is not None:
            os.close(self.exit_fd)
            self.exit_fd = None
        if self.popen.stdout is not None:
            self.popen.stdout.close()
            self.output_fd = None


class PlainProcess(Launched):
    """A direct child in its own session."""

    def owns(self, pid: int, uid: int) -> bool:
        expected = self.spec.identity.uid if self.spec.identity.own_user else os.geteuid()
        return uid == expected and descends_from(pid, self.pid)

    def terminate(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        signal_all(tree_members(self.pid, self.spec.identity.uid), signal.SIGKILL)


class SystemdProcess(Launched):
    """``systemd-run --wait`` in front of a transient service; the service is the tree."""

    def owns(self, pid: int, uid: int) -> bool:
        if self.spec.identity.own_user and uid != self.spec.identity.uid:
            return False
        try:
            with open(f"/proc/{pid}/cgroup", "rb") as stream:
                lines = stream.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return False
        suffix = "/" + unit_name(self.spec.name)
        return any(line.rstrip().endswith(suffix) for line in lines)

    def terminate(self) -> None:
        _systemctl("kill", "--signal=SIGTERM", unit_name(self.spec.name))

    def kill(self) -> None:
        _systemctl("kill", "--signal=SIGKILL", unit_name(self.spec.name))
        if self.spec.identity.own_user:
            signal_all(tree_members(-1, self.spec.identity.uid), signal.SIGKILL)


def _pidfd(pid: int) -> Optional[int]:
    try:
        return os.pidfd_open(pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None  # old kernel or Python: the supervisor polls instead


def _systemctl(*args: str) -> None:
    try:
        _run_tool(["systemctl", *args], f"systemctl {args[0]}")
    except ExtensionRunError as error:
        log.debug("%s", error)


# -- starting ---------------------------------------------------------------------------------------


def systemd_available() -> bool:
    """systemd runs this system (sd_booted) and we may start system units."""
    return (os.geteuid() == 0 and os.path.isdir("/run/systemd/system")
            and shutil.which("systemd-run", path=SAFE_PATH) is not None)


def unit_name(extension: str) -> str:
    return f"{user_name(extension)}.service"


def launch(spec: LaunchSpec, use_systemd: bool) -> Launched:
    """Start the process described by ``spec``; ExtensionRunError if it cannot start."""
    clear_leftovers(spec, use_systemd)
    if use_systemd:
        return _start(SystemdProcess, systemd_argv(spec), spec, cwd="/", env={"PATH": SAFE_PATH},
                      preexec=None, identity=AGENT_IDENTITY)
    return _start(PlainProcess, spec.argv, spec, cwd=spec.cwd, env=spec.env,
                  preexec=_child_setup(spec), identity=spec.identity)


def clear_leftovers(spec: LaunchSpec, use_systemd: bool) -> None:
    """Kill what an earlier agent may have left running for this extension."""
    if use_systemd:
        _systemctl("stop", unit_name(spec.name))
        _systemctl("reset-failed", unit_name(spec.name))
    if spec.identity.own_user:
        signal_all(tree_members(-1, spec.identity.uid), signal.SIGKILL)


def _start(kind, argv: List[str], spec: LaunchSpec, cwd: str, env: Dict[str, str],
           preexec, identity: Identity) -> Launched:
    import subprocess

    options = {}
    if identity.own_user:
        options = {"user": identity.uid, "group": identity.gid,
                   "extra_groups": list(identity.groups)}
    try:
        popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 close_fds=True, start_new_session=True, umask=0o077,
                                 preexec_fn=preexec, **options)
    except OSError as error:
        raise ExtensionRunError(f"cannot start extension {spec.name}: {argv[0]}:"
                                f" {error.strerror or error}") from None
    except subprocess.SubprocessError as error:
        raise ExtensionRunError(f"cannot start extension {spec.name}: {error}") from None
    return kind(popen, spec)


def _child_setup(spec: LaunchSpec):
    """The rlimits and parent-death signal, applied in the child after the user switch."""
    import ctypes
    import resource

    wanted = [(resource.RLIMIT_AS, spec.limits.get("memory")),
              (resource.RLIMIT_NOFILE, spec.limits.get("nofile")),
              (resource.RLIMIT_CORE, 0)]
    if spec.identity.own_user:  # per user: with the agent's own user it would count ours
        wanted.append((resource.RLIMIT_NPROC, spec.limits.get("nproc")))
    limits = []
    for which, value in wanted:
        if value is None:
            continue
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        limits.append((which, value))
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def setup() -> None:
        for which, value in limits:
            resource.setrlimit(which, (value, value))
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the agent died before the signal was armed
            os._exit(1)

    return setup


def systemd_argv(spec: LaunchSpec) -> List[str]:
    """The ``systemd-run`` command line for ``spec`` (see the module docstring)."""
    limits = spec.limits
    properties = [
        "Type=exec", "KillMode=control-group", "TimeoutStopSec=5",
        f"MemoryMax={limits['memory']}", f"CPUQuota={limits['cpu']}%",
        f"TasksMax={limits['tasks']}", f"LimitNOFILE={limits['nofile']}",
        f"LimitNPROC={limits['nproc']}", "LimitCORE=0", "UMask=0077",
        "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "PrivateDevices=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes", "ProtectControlGroups=yes", "ProtectClock=yes",
        "ProtectHostname=yes", "RestrictSUIDSGID=yes", "RestrictRealtime=yes",
        "RestrictNamespaces=yes", "LockPersonality=yes", "SystemCallArchitectures=native",
        f"WorkingDirectory={spec.cwd}",
        "ReadWritePaths=" + " ".join(spec.writable),
    ]
    families = ["AF_UNIX"]
    if "network" in spec.capabilities:
        families += ["AF_INET", "AF_INET6"]
    properties.append("RestrictAddressFamilies=" + " ".join(families))
    if "system-bus" not in spec.capabilities:
        properties.append("InaccessiblePaths=-/run/dbus/system_bus_socket")
    identity = spec.identity
    if identity.own_user:
        properties += [f"User={identity.uid}", f"Group={identity.gid}",
                       "SupplementaryGroups=" + " ".join(map(str, identity.groups))]
    argv = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect",
            f"--unit={unit_name(spec.name)}",
            f"--description=qga extension {spec.name}"]
    argv += [f"--property={item}" for item in properties]
    argv += [f"--setenv={key}={value}" for key, value in sorted(spec.env.items())]
    return argv + ["--", *spec.argv]
