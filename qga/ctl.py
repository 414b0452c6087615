"""``qgactl``: the guest administrator's view of the agent.

::

    qgactl status [--json]           is it running, with which configuration and state
    qgactl show-config [--plain]     what `qga -D` prints, with where each value came from
    qgactl logs [-f] [-n N]          the journal of qga.service, or the -l log file
    qgactl trust list|add|remove     keys trusted to sign extensions
    qgactl ext list|verify           installed extensions; re-hash their files
    qgactl clear-stale-freeze        drop a frozen marker older than this boot

Which agent: the main process of the systemd unit (``--unit``, default
``qga.service``) when systemd runs it, else the process named by the pid
file, else ``--pid``.  The configuration shown is the one *that process*
was started with: its command line and its ``$QGA_CONF`` are read from
``/proc`` and replayed through the agent's own option parser and key-file
reader (:mod:`qga.cli`, :mod:`qga.config`), so there is no second
implementation to drift.  With no process, the unit's ``ExecStart=`` and
``Environment=`` are used, and without systemd qgactl's own ``-c`` and
``$QGA_CONF``.

Trust keys are ``*.json`` files in ``/etc/qga/trust.d/`` (the admin's) and
``/usr/lib/qga/trust.d/`` (shipped by packages), read by
:mod:`qga.ext.trust`.  qgactl adds a file after the agent's own loader
accepted it, writes it atomically, masks a vendor key with an empty admin
file, and lists what the agent trusts (or why it refuses to trust anything).

Exit status: 0 on success, 1 on failure, 2 for usage errors or a feature this
installation lacks, 3 for ``status`` when the agent is not running (as
``systemctl status``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from qga.config import (
    CONFIG_ENV, DEFAULT_CONFIG_PATH, Config, config_file_path, dump, load_file,
)
from qga.errors import ConfigError, QgaError

PROG = "qgactl"
DEFAULT_UNIT = "qga.service"
ADMIN_TRUST_DIR = "/etc/qga/trust.d"
VENDOR_TRUST_DIR = "/usr/lib/qga/trust.d"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3

# -D's key names that are not the Config attribute's name with "_" for "-".
_KEY_ATTRIBUTES = {"daemon": "daemonize"}
# Where each setting can be given: key-file keys and option codes (qga.cli).
_FILE_KEYS = {
    ("general", "daemon"): "daemonize", ("general", "method"): "method",
    ("general", "path"): "path", ("general", "logfile"): "logfile",
    ("general", "pidfile"): "pidfile", ("general", "fsfreeze-hook"): "fsfreeze_hook",
    ("general", "statedir"): "statedir", ("general", "verbose"): "verbose",
    ("general", "retry-path"): "retry_path", ("general", "block-rpcs"): "block_rpcs",
    ("general", "blacklist"): "block_rpcs", ("general", "allow-rpcs"): "allow_rpcs",
    ("qga", "file-allow-dirs"): "file_allow_dirs",
    ("qga", "exec-allow-programs"): "exec_allow_programs",
    ("qga", "fsfreeze-max-frozen-time"): "fsfreeze_max_frozen_time",
    ("qga", "allow-unsigned-extensions"): "allow_unsigned_extensions",
    ("qga", "runtime-dir"): "runtime_dir", ("qga", "trust-dirs"): "trust_dirs",
    ("qga", "virtio-ports-dir"): "virtio_ports_dir",
}
_OPTION_ATTRIBUTES = {
    "d": "daemonize", "m": "method", "p": "path", "l": "logfile", "f": "pidfile",
    "F": "fsfreeze_hook", "t": "statedir", "v": "verbose", "r": "retry_path",
    "b": "block_rpcs", "a": "allow_rpcs", "file-allow-dirs": "file_allow_dirs",
    "exec-allow-programs": "exec_allow_programs",
    "fsfreeze-max-frozen-time": "fsfreeze_max_frozen_time",
    "allow-unsigned-extensions": "allow_unsigned_extensions",
    "runtime-dir": "runtime_dir", "trust-dirs": "trust_dirs",
    "virtio-ports-dir": "virtio_ports_dir",
}
# Settings whose file and command-line values add up.
_LISTS = ("block_rpcs", "allow_rpcs", "file_allow_dirs", "exec_allow_programs", "trust_dirs")
# What provenance is reported for (listen_fd and config_path are not settings).
_SOURCED = tuple(name for name in Config.SETTINGS if name not in ("listen_fd", "config_path"))


class CtlError(QgaError):
    """A qgactl command failed; the message is printed, the status is 1."""


# -- finding the agent ---------------------------------------------------------------


class AgentProcess:
    """How the agent was (or would be) started: pid, argv, environment, manager."""

    def __init__(self, pid: Optional[int], args: List[str], environ: Mapping[str, str],
                 origin: str, unit: Optional[Dict[str, str]] = None):
        self.pid = pid
        self.args = args            # the agent's arguments, without the program
        self.environ = environ
        self.origin = origin        # where pid/args came from, for people
        self.unit = unit            # `systemctl show` properties, when systemd manages it

    @property
    def running(self) -> bool:
        return self.pid is not None


def systemd_running() -> bool:
    """sd_booted(): systemd is the service manager of this system."""
    return os.path.isdir("/run/systemd/system")


def systemctl_show(unit: str) -> Optional[Dict[str, str]]:
    """The unit's properties qgactl uses, or None when systemctl cannot tell."""
    properties = ("LoadState", "ActiveState", "SubState", "MainPID", "StatusText",
                  "ExecStart", "Environment", "FragmentPath")
    try:
        result = subprocess.run(
            ["systemctl", "show", unit] + [f"--property={name}" for name in properties],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return parse_systemctl_show(result.stdout.decode("utf-8", "replace"))


def parse_systemctl_show(text: str) -> Dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def exec_start_argv(value: str) -> List[str]:
    """argv of the first command in systemctl's ``ExecStart=`` rendering.

    ``{ path=/usr/bin/qga ; argv[]=/usr/bin/qga --statedir=/var/lib/qga ; ... }``
    """
    start = value.find("argv[]=")
    if start < 0:
        return []
    text = value[start + len("argv[]="):]
    end = text.find(" ;")
    return shlex.split(text if end < 0 else text[:end])


def unit_environment(value: str) -> Dict[str, str]:
    """systemctl's ``Environment=`` rendering: space-separated, shell-quoted pairs."""
    environ = {}
    for item in shlex.split(value):
        key, sep, val = item.partition("=")
        if sep:
            environ[key] = val
    return environ


def agent_arguments(cmdline: Sequence[str]) -> Optional[List[str]]:
    """The agent's own arguments in a process's argv, or None if it is not qga.

    ``/usr/bin/python3 /usr/bin/qga ARGS`` (a console script),
    ``python3 -m qga ARGS`` and ``qga ARGS`` are recognised.
    """
    for index, item in enumerate(cmdline):
        if os.path.basename(item) == "qga":
            if index > 0 and cmdline[index - 1] == "-m" or index == 0 or _is_python(cmdline[0]):
                return list(cmdline[index + 1:])
        if item == "-m" and index + 1 < len(cmdline) and cmdline[index + 1] != "qga":
            return None  # python3 -m something-else
    return None


def _is_python(program: str) -> bool:
    return os.path.basename(program).startswith("python")


def read_process(pid: int) -> Tuple[List[str], Dict[str, str]]:
    """argv and initial environment of a process (the environment needs root)."""
    with open(f"/proc/{pid}/cmdline", "rb") as stream:
        cmdline = [os.fsdecode(part) for part in stream.read().split(b"\0")[:-1]]
    environ: Dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/environ", "rb") as stream:
            for item in stream.read().split(b"\0"):
                key, sep, value = os.fsdecode(item).partition("=")
                if sep:
                    environ[key] = value
    except OSError:
        pass
    return cmdline, environ


def read_pidfile(path: str) -> Optional[int]:
    try:
        with open(path, "rb") as stream:
            text = stream.read(64).decode("ascii", "replace").strip()
        pid = int(text, 10)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def find_agent(options: argparse.Namespace) -> AgentProcess:
    """The agent to report on, as :class:`AgentProcess` (maybe not running)."""
    own_env = dict(os.environ)
    if options.config:
        own_env[CONFIG_ENV] = options.config
    if options.pid is not None:
        return _from_pid(options.pid, f"--pid {options.pid}", None)
    unit = systemctl_show(options.unit) if systemd_running() else None
    if unit is not None and unit.get("LoadState") == "loaded":
        main_pid = int(unit.get("MainPID", "0") or 0)
        if main_pid > 0:
            return _from_pid(main_pid, f"systemd unit {options.unit}", unit)
        args = exec_start_argv(unit.get("ExecStart", ""))[1:]
        environ = dict(own_env, **unit_environment(unit.get("Environment", "")))
        return AgentProcess(None, args, environ, f"systemd unit {options.unit}", unit)
    # No systemd unit: the pid file of the configuration qgactl would use.
    presumed = Config()
    try:
        load_file(presumed, config_file_path(own_env))
    except ConfigError:
        pass
    pidfile = options.pidfile or presumed.pidfile
    pid = read_pidfile(pidfile)
    if pid is not None:
        agent = _from_pid(pid, f"pid file {pidfile}", None, quiet=True)
        if agent.running:
            return agent
    return AgentProcess(None, [], own_env, "no running agent found")


def _from_pid(pid: int, origin: str, unit: Optional[Dict[str, str]],
              quiet: bool = False) -> AgentProcess:
    try:
        cmdline, environ = read_process(pid)
    except OSError:
        if quiet:
            return AgentProcess(None, [], dict(os.environ), origin, unit)
        raise CtlError(f"no process {pid}") from None
    args = agent_arguments(cmdline)
    if args is None:
        if quiet:
            return AgentProcess(None, [], dict(os.environ), origin, unit)
        raise CtlError(f"process {pid} is not qga: {' '.join(cmdline)}")
    return AgentProcess(pid, args, environ, origin, unit)


# -- the configuration, with where each value came from -------------------------------


class SourcedConfig:
    """A configuration as the agent builds it, and the source of every setting."""

    def __init__(self, config: Config, sources: Dict[str, str], file_path: str,
                 file_error: Optional[str]):
        self.config = config
        self.sources = sources
        self.file_path = file_path
        self.file_error = file_error


def sourced_config(args: Sequence[str], environ: Mapping[str, str],
                   pid: Optional[int] = None) -> SourcedConfig:
    """Replay qga's start-up (key file, then options) on ``args`` and ``environ``."""
    from qga.cli import ERROR, getopt_long

    file_path = config_file_path(dict(environ))
    required = False
    for code, value in getopt_long(args):
        if code == "c":
            file_path, required = value, True

    final = Config()
    file_error = None
    try:
        load_file(final, file_path, required)
    except ConfigError as error:
        file_error = str(error)  # qga would not start; show what the rest gives
        final = Config()
    for code, value in getopt_long(args):
        if code in (ERROR, "c", "D", "V", "h") or (code in ("b", "a") and value in ("help", "?")):
            continue
        _apply_quietly(code, value, final)

    _resolve_quietly(final)
    in_file = _attributes_in_file(file_path) if file_error is None else set()
    on_command_line = {_OPTION_ATTRIBUTES[code] for code, _ in getopt_long(args)
                       if code in _OPTION_ATTRIBUTES}
    sources = {}
    for name in _SOURCED:
        parts = []
        if name in in_file:
            parts.append(file_path)
        if name in on_command_line:
            if name not in _LISTS:
                parts = []  # a scalar option replaces the file's value
            parts.append("command line")
        sources[name] = " + ".join(parts) or "default"
    if pid is not None and _socket_activated(environ, pid):
        sources["method"] = sources["path"] = "systemd socket activation"
    final.config_path = file_path
    return SourcedConfig(final, sources, file_path, file_error)


def _attributes_in_file(path: str) -> set:
    from qga.config import KeyFile

    try:
        keyfile = KeyFile.load(path)
    except (OSError, ConfigError):
        return set()
    return {attribute for (group, key), attribute in _FILE_KEYS.items()
            if keyfile.has_key(group, key)}


def _apply_quietly(code: str, value: Optional[str], config: Config) -> None:
    """One option as qga applies it; a value qga would refuse is skipped."""
    from qga.cli import Exit, apply_option

    saved = sys.stderr
    try:
        sys.stderr = open(os.devnull, "w")
        apply_option(code, value, "qga", config)
    except (Exit, ConfigError):
        pass
    finally:
        sys.stderr.close()
        sys.stderr = saved


def _resolve_quietly(config: Config) -> None:
    try:
        config.resolve_path()
    except ConfigError:
        pass  # a listening method without a path: qga would refuse to start


def _socket_activated(environ: Mapping[str, str], pid: int) -> bool:
    return environ.get("LISTEN_PID") == str(pid) and environ.get("LISTEN_FDS") == "1"


def annotated_dump(sourced: SourcedConfig) -> str:
    """``qga -D``'s key file with a comment line naming each value's source."""
    lines = []
    for line in dump(sourced.config).decode("utf-8", "surrogateescape").split("\n"):
        key, sep, _ = line.partition("=")
        if sep and not line.startswith("["):
            attribute = _KEY_ATTRIBUTES.get(key, key.replace("-", "_"))
            lines.append(f"# {sourced.sources.get(attribute, 'default')}")
        lines.append(line)
    return "\n".join(lines)


# -- state ------------------------------------------------------------------------------


def state_summary(statedir: str) -> Dict[str, object]:
    """Frozen or not, and the next file handle, read without side effects."""
    from qga.state import COUNTER_FILE, DEFAULT_FD_COUNTER, FROZEN_MARKER, glib_integer, \
        parse_key_file

    marker = os.path.join(statedir, FROZEN_MARKER)
    summary: Dict[str, object] = {"statedir": statedir, "exists": os.path.isdir(statedir)}
    try:
        summary["frozen_since"] = os.stat(marker).st_mtime
        summary["frozen"] = True
    except OSError:
        summary["frozen"] = False
    counter_path = os.path.join(statedir, COUNTER_FILE)
    try:
        with open(counter_path, "rb") as stream:
            values = parse_key_file(stream.read(), counter_path)
        raw = values.get(("global", "fd_counter"))
        summary["next_handle"] = DEFAULT_FD_COUNTER if raw is None else glib_integer(raw)
    except FileNotFoundError:
        summary["next_handle"] = None
    except (OSError, QgaError) as error:
        summary["counter_error"] = str(error)
    return summary


def boot_time(proc_stat: str = "/proc/stat") -> float:
    with open(proc_stat) as stream:
        for line in stream:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise CtlError("no boot time in /proc/stat")


def clear_stale_freeze(statedir: str, booted: Optional[float] = None) -> Optional[str]:
    """Remove a frozen marker written before this boot; return its path if removed.

    Filesystems cannot stay frozen across a reboot, but a marker on a
    persistent state directory can (a guest reset while frozen).  An agent
    finding one starts frozen and refuses most commands until the host
    thaws; qemu-ga never meets this because its /var/run is emptied at boot.
    """
    from qga.state import FROZEN_MARKER

    marker = os.path.join(statedir, FROZEN_MARKER)
    try:
        written = os.stat(marker).st_mtime
    except FileNotFoundError:
        return None
    if written >= (boot_time() if booted is None else booted):
        return None  # frozen during this boot: the agent must start frozen
    os.unlink(marker)
    return marker


# -- trust keys ----------------------------------------------------------------------------


class TrustFiles:
    """The trust directories as files: what each holds and what the agent makes of it.

    The format and the rules are :mod:`qga.ext.trust`'s (``*.json`` files, the
    admin's directory first, an empty admin file masking the vendor's of the
    same name, fail closed on unsafe files); this class only reads and
    writes files and asks :class:`qga.ext.trust.TrustStore` what it trusts.
    """

    def __init__(self, admin_dir: str = ADMIN_TRUST_DIR, vendor_dir: str = VENDOR_TRUST_DIR):
        self.admin_dir = admin_dir
        self.vendor_dir = vendor_dir

    @property
    def dirs(self) -> Tuple[str, str]:
        return (self.admin_dir, self.vendor_dir)

    def load(self):
        """The agent's view: a TrustStore, or raises TrustError as the agent would."""
        from qga.ext.trust import TrustStore

        return TrustStore.load(self.dirs)

    def report(self) -> Dict[str, object]:
        """Every file of both directories with what it means; the store's error if any."""
        from qga.errors import TrustError
        from qga.ext.trust import TRUST_SUFFIX

        try:
            keys = {key.source: key for key in self.load().keys}
            error = None
        except TrustError as failure:
            keys, error = {}, str(failure)
        files = []
        admin_names = set(_listdir(self.admin_dir))
        for origin, directory in (("admin", self.admin_dir), ("vendor", self.vendor_dir)):
            for name in _listdir(directory):
                path = os.path.join(directory, name)
                entry: Dict[str, object] = {"name": name, "origin": origin, "path": path}
                if not name.endswith(TRUST_SUFFIX):
                    entry["status"] = f"ignored (not *{TRUST_SUFFIX})"
                elif origin == "vendor" and name in admin_names:
                    masked = _is_empty(os.path.join(self.admin_dir, name))
                    entry["status"] = "masked by the admin" if masked else "replaced by the admin's"
                elif path in keys:
                    key = keys[path]
                    entry.update(status="trusted", key_id=key.key_id, names=list(key.names))
                elif origin == "admin" and _is_empty(path):
                    entry["status"] = "masks the vendor's" if os.path.exists(
                        os.path.join(self.vendor_dir, name)) else "empty"
                else:
                    entry["status"] = "unusable" if error else "unknown"
                files.append(entry)
        return {"error": error, "files": files}

    def add(self, source: str, name: Optional[str] = None, replace: bool = False) -> str:
        """Copy a trust file into the admin directory after checking it is one."""
        from qga.ext.trust import TRUST_SUFFIX

        name = name or os.path.basename(source)
        _check_trust_name(name)
        if not name.endswith(TRUST_SUFFIX):
            raise CtlError(f"{name}: trust files are named *{TRUST_SUFFIX} (--name to rename)")
        data = _read_small(source)
        key = _parse_trust_data(data, source)
        target = os.path.join(self.admin_dir, name)
        if os.path.lexists(target) and not replace:
            raise CtlError(f"{target} exists (--replace to replace it)")
        self._install(name, data)
        return f"trusted key {key.key_id} (may sign: {' '.join(key.names)}) in {target}"

    def remove(self, name: str, mask: bool = False) -> str:
        _check_trust_name(name)
        target = os.path.join(self.admin_dir, name)
        vendor = os.path.join(self.vendor_dir, name)
        if mask:
            if not os.path.exists(vendor):
                raise CtlError(f"no vendor key {name} in {self.vendor_dir} to mask")
            self._install(name, b"")
            return f"masked {vendor} with an empty {target}"
        try:
            os.unlink(target)
        except FileNotFoundError:
            if os.path.exists(vendor):
                raise CtlError(f"{name} is a vendor key ({vendor}), shipped by a package; "
                               f"'trust remove --mask {name}' masks it") from None
            raise CtlError(f"no trusted key {name} in {self.admin_dir}") from None
        except OSError as error:
            raise CtlError(f"cannot remove {target}: {error.strerror}") from None
        if os.path.exists(vendor):
            return f"removed {target}; the vendor's {vendor} applies again"
        return f"removed {target}"

    def _install(self, name: str, data: bytes) -> None:
        from qga.state import atomic_write

        os.makedirs(self.admin_dir, mode=0o755, exist_ok=True)
        # Written under a dot name first: the agent skips dot files, so it
        # sees no key or the whole key, never a part.
        hidden = os.path.join(self.admin_dir, "." + name)
        try:
            atomic_write(hidden, data, 0o644)
            os.chmod(hidden, 0o644)  # whatever the umask: the agent checks the mode
            os.rename(hidden, os.path.join(self.admin_dir, name))
        except (QgaError, OSError) as error:
            raise CtlError(str(error)) from None


def _parse_trust_data(data: bytes, source: str):
    """The key in ``data``, checked by the agent's own loader in a private directory."""
    import tempfile

    from qga.errors import TrustError
    from qga.ext.trust import TrustStore

    if not data:
        raise CtlError(f"{source} is empty (an empty file only masks a vendor key: "
                       "'trust remove --mask')")
    with tempfile.TemporaryDirectory(prefix="qgactl-") as directory:
        probe = os.path.join(directory, "key.json")
        with open(probe, "wb") as stream:
            stream.write(data)
        os.chmod(probe, 0o644)
        try:
            (key,) = TrustStore.load([directory]).keys
        except TrustError as error:
            raise CtlError(str(error).replace(probe, source)) from None
    return key


def _read_small(path: str, limit: int = 64 * 1024) -> bytes:
    try:
        with open(path, "rb") as stream:
            data = stream.read(limit + 1)
    except OSError as error:
        raise CtlError(f"cannot read {path}: {error.strerror}") from None
    if len(data) > limit:
        raise CtlError(f"{path} is over {limit} bytes: not a trust file")
    return data


def _listdir(directory: str) -> List[str]:
    try:
        return sorted(name for name in os.listdir(directory) if not name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_empty(path: str) -> bool:
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False


def _check_trust_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise CtlError(f"bad key name {name!r}: a plain file name, not starting with '.'")


# -- commands ------------------------------------------------------------------------------


def cmd_status(options: argparse.Namespace) -> int:
    agent = find_agent(options)
    sourced = sourced_config(agent.args, agent.environ, agent.pid)
    config = sourced.config
    state = state_summary(config.statedir)
    report: Dict[str, object] = {
        "running": agent.running,
        "pid": agent.pid,
        "found_by": agent.origin,
        "command_line": agent.args,
        "config_file": sourced.file_path,
        "config_file_exists": os.path.exists(sourced.file_path),
        "config_error": sourced.file_error,
        "method": config.method,
        "path": config.path,
        **state,
    }
    if agent.unit is not None:
        report["unit"] = {key: agent.unit.get(key, "") for key in
                          ("ActiveState", "SubState", "StatusText", "FragmentPath")}
    if options.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(_status_text(report))
    return EXIT_OK if agent.running else EXIT_NOT_RUNNING


def _status_text(report: Dict[str, object]) -> str:
    lines = []
    if report["running"]:
        lines.append(f"agent:        running, pid {report['pid']} ({report['found_by']})")
    else:
        lines.append(f"agent:        not running ({report['found_by']})")
    unit = report.get("unit")
    if isinstance(unit, dict):
        lines.append(f"unit:         {unit['ActiveState']}/{unit['SubState']}"
                     + (f", {unit['StatusText']}" if unit["StatusText"] else ""))
    if report["command_line"]:
        lines.append(f"arguments:    {shlex.join(report['command_line'])}")  # type: ignore[arg-type]
    presence = "" if report["config_file_exists"] else " (absent: defaults)"
    lines.append(f"config file:  {report['config_file']}{presence}")
    if report["config_error"]:
        lines.append(f"config error: {report['config_error']}")
    channel = f"{report['method']} {report['path'] or ''}".rstrip()
    lines.append(f"channel:      {channel}")
    lines.append(f"statedir:     {report['statedir']}"
                 + ("" if report["exists"] else " (missing)"))
    if report["frozen"]:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["frozen_since"]))  # type: ignore[arg-type]
        lines.append(f"frozen:       yes, since {since}")
    else:
        lines.append("frozen:       no")
    if "counter_error" in report:
        lines.append(f"next handle:  unreadable: {report['counter_error']}")
    elif report["next_handle"] is None:
        lines.append("next handle:  1000 (no counter file yet)")
    else:
        lines.append(f"next handle:  {report['next_handle']}")
    return "\n".join(lines)


def cmd_show_config(options: argparse.Namespace) -> int:
    agent = find_agent(options)
    sourced = sourced_config(agent.args, agent.environ, agent.pid)
    if options.plain:
        sys.stdout.flush()
        sys.stdout.buffer.write(dump(sourced.config))
        return EXIT_OK
    what = f"pid {agent.pid}" if agent.running else "not running"
    print(f"# qga configuration: {agent.origin} ({what})")
    if agent.args:
        print(f"# arguments: {shlex.join(agent.args)}")
    print(f"# config file: {sourced.file_path}"
          + ("" if os.path.exists(sourced.file_path) else " (absent)"))
    if sourced.file_error:
        print(f"# config error: {sourced.file_error}")
    sys.stdout.write(annotated_dump(sourced))
    return EXIT_OK


def cmd_logs(options: argparse.Namespace) -> int:
    agent = find_agent(options)
    config = sourced_config(agent.args, agent.environ, agent.pid).config
    if config.logfile:
        argv = ["tail", "-n", str(options.lines)] + (["-F"] if options.follow else [])
        argv.append(config.logfile)
    else:
        argv = ["journalctl", "--no-pager", "-u", options.unit, "-n", str(options.lines)]
        if options.follow:
            argv.append("--follow")
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        raise CtlError(f"cannot run {argv[0]}: {error.strerror}") from None
    return EXIT_FAILURE  # not reached


def cmd_trust(options: argparse.Namespace) -> int:
    files = TrustFiles(options.admin_trust_dir, options.vendor_trust_dir)
    if options.trust_command == "list":
        report = files.report()
        if options.json:
            print(json.dumps(report, indent=2))
        else:
            print(_trust_text(report, files))
        return EXIT_FAILURE if report["error"] else EXIT_OK
    if options.trust_command == "add":
        print(files.add(options.file, options.name, options.replace))
        return EXIT_OK
    print(files.remove(options.name, options.mask))
    return EXIT_OK


def _trust_text(report: Dict[str, object], files: TrustFiles) -> str:
    lines = []
    if report["error"]:
        lines.append(f"ERROR: the agent refuses every bundle until this is fixed: "
                     f"{report['error']}")
    entries = report["files"]
    if not entries:
        lines.append(f"no trust files in {files.admin_dir} or {files.vendor_dir}")
    for entry in entries:  # type: ignore[union-attr]
        detail = entry["status"]
        if entry.get("key_id"):
            detail = f"key {entry['key_id']}, may sign: {' '.join(entry['names'])}"
        lines.append(f"{entry['origin']:<7} {entry['path']}: {detail}")
    return "\n".join(lines)


def cmd_ext(options: argparse.Namespace) -> int:
    """``ext list`` and ``ext verify``: the agent's extension store, read only."""
    from qga.errors import ExtensionError
    from qga.ext.store import Store, version_of

    statedir = options.statedir
    if statedir is None:
        agent = find_agent(options)
        statedir = sourced_config(agent.args, agent.environ, agent.pid).config.statedir
    try:
        store = Store.inspect(statedir)
    except ExtensionError as error:
        raise CtlError(str(error)) from None
    entries = [store.entry(name) for name in store.names()]
    if options.ext_command == "list":
        return _ext_list(entries, version_of, options.json)
    wanted = [entry for entry in entries if entry.installed
              and (options.name is None or entry.name == options.name)]
    if options.name is not None and not wanted:
        raise CtlError(f"extension {options.name} is not installed in {statedir}")
    status = EXIT_OK
    for entry in wanted:
        for version_id in entry.versions():
            problems = store.verify(entry.name, version_id)
            label = f"{entry.name} {version_of(version_id)}"
            if version_id == entry.previous:
                label += " (previous)"
            if problems:
                status = EXIT_FAILURE
                print(f"{label}: {len(problems)} problem(s)")
                for problem in problems:
                    print(f"  {problem}")
            else:
                print(f"{label}: ok")
    return status


def _ext_list(entries, version_of, as_json: bool) -> int:
    rows = []
    for entry in entries:
        install = entry.install or {}
        rows.append({
            "name": entry.name,
            "version": version_of(entry.current) if entry.current else None,
            "previous": version_of(entry.previous) if entry.previous else None,
            "counter": entry.counter, "enabled": entry.enabled,
            "last-install": install.get("state"), "last-error": install.get("error"),
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        line = f"{row['name']} {row['version'] or '(not installed)'}"
        if row["previous"]:
            line += f" previous {row['previous']}"
        if row["counter"] is not None:
            line += f" counter {row['counter']}"
        if not row["enabled"]:
            line += " stopped"
        if row["last-install"]:
            line += f"; last install {row['last-install']}"
            if row["last-error"]:
                line += f": {row['last-error']}"
        print(line)
    return EXIT_OK


def cmd_clear_stale_freeze(options: argparse.Namespace) -> int:
    removed = clear_stale_freeze(options.statedir)
    if removed:
        print(f"removed {removed}: written before this boot, nothing can still be frozen")
    return EXIT_OK


# -- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Administer the qga guest agent.")
    parser.add_argument("--unit", default=DEFAULT_UNIT, help="systemd unit (default qga.service)")
    parser.add_argument("--pid", type=int, help="the agent's process id (default: ask systemd, "
                                                 "then the pid file)")
    parser.add_argument("-c", "--config", help=f"configuration file when qgactl cannot find the "
                                               f"agent's (default ${CONFIG_ENV} or "
                                               f"{DEFAULT_CONFIG_PATH})")
    parser.add_argument("-f", "--pidfile", help="pid file of a daemonized agent")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    status = commands.add_parser("status", help="is the agent running; its state")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=cmd_status)

    show = commands.add_parser("show-config", help="the configuration and where it came from")
    show.add_argument("--plain", action="store_true", help="exactly what `qga -D` prints")
    show.set_defaults(run=cmd_show_config)

    logs = commands.add_parser("logs", help="the agent's log (journal or -l file)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")
    logs.set_defaults(run=cmd_logs)

    trust = commands.add_parser("trust", help="keys trusted to sign extensions")
    trust.add_argument("--admin-trust-dir", default=ADMIN_TRUST_DIR, help=argparse.SUPPRESS)
    trust.add_argument("--vendor-trust-dir", default=VENDOR_TRUST_DIR, help=argparse.SUPPRESS)
    trust_commands = trust.add_subparsers(dest="trust_command", metavar="list|add|remove")
    trust_commands.required = True
    trust_list = trust_commands.add_parser("list", help="every trusted key file")
    trust_list.add_argument("--json", action="store_true", help="print JSON")
    trust_add = trust_commands.add_parser(
        "add", help=f"trust a key: copy its trust file (qga-bundle keygen's PREFIX.json) "
                    f"to {ADMIN_TRUST_DIR}")
    trust_add.add_argument("file")
    trust_add.add_argument("--name", help="file name in the trust directory (*.json)")
    trust_add.add_argument("--replace", action="store_true", help="replace a key of that name")
    trust_remove = trust_commands.add_parser("remove", help="stop trusting an admin key")
    trust_remove.add_argument("name")
    trust_remove.add_argument("--mask", action="store_true",
                              help="mask a vendor key with an empty admin file")
    trust.set_defaults(run=cmd_trust)

    ext = commands.add_parser("ext", help="installed extensions")
    ext.add_argument("--statedir", "-t", help="the agent's state directory (default: the "
                                              "running agent's)")
    ext_commands = ext.add_subparsers(dest="ext_command", metavar="list|verify")
    ext_commands.required = True
    ext_list = ext_commands.add_parser("list", help="installed extensions and their state")
    ext_list.add_argument("--json", action="store_true", help="print JSON")
    ext_verify = ext_commands.add_parser("verify", help="re-hash installed files against "
                                                        "their signed manifests")
    ext_verify.add_argument("name", nargs="?", help="one extension (default: all)")
    ext.set_defaults(run=cmd_ext)

    clear = commands.add_parser("clear-stale-freeze",
                                help="drop a frozen marker written before this boot "
                                     "(the unit runs this before the agent)")
    clear.add_argument("--statedir", "-t", required=True)
    clear.set_defaults(run=cmd_clear_stale_freeze)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        return options.run(options)
    except CtlError as error:
        sys.stderr.write(f"{PROG}: {error}\n")
        return EXIT_FAILURE
    except BrokenPipeError:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
