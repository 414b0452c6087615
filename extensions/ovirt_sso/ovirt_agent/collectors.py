"""Where the agent's data comes from on Linux: /proc, /sys, psutil, dpkg/rpm, statvfs, ...

Each method returns one message's payload in the original's shapes and
units (see the reference's section 3).  Paths are parameters so tests can
point them at prepared trees; by default they are the guest's own.
psutil is imported on first use, and everything it gives has a fallback, so
the agent runs (with less data) where it is missing.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .config import Config

IFF_UP = 0x1
IFF_LOOPBACK = 0x8

COMMAND_TIMEOUT = 30.0

_VMSTAT_FIELDS = {"pswpin": "swap_in", "pswpout": "swap_out", "pgfault": "pageflt",
                  "pgmajfault": "majflt"}

_ARCHES = {"i386": "x86", "i486": "x86", "i586": "x86", "i686": "x86"}

log = logging.getLogger("ovirt_agent.collectors")


def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> Optional[str]:
    """A program's standard output (C locale), or None if it cannot run or fails."""
    if shutil.which(argv[0]) is None:
        return None
    environ = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "LC_ALL": "C"}
    try:
        result = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, timeout=timeout, env=environ,
                                check=False)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("%s failed: %s", argv[0], error)
        return None
    if result.returncode != 0:
        log.debug("%s exited with %d", argv[0], result.returncode)
        return None
    return result.stdout.decode("utf-8", "replace")


class LinuxCollectors:
    """The data of one Linux guest."""

    def __init__(self, config: Config, proc: str = "/proc", sys: str = "/sys",
                 etc: str = "/etc", udev_data: str = "/run/udev/data",
                 run: Callable[[Sequence[str]], Optional[str]] = run_command,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.proc = proc
        self.sys = sys
        self.etc = etc
        self.udev_data = udev_data
        self.run = run
        self.clock = clock
        self._vmstat_previous: Optional[Tuple[float, Dict[str, int]]] = None
        self._psutil: Any = None

    def _psutil_module(self) -> Any:
        if self._psutil is None:
            try:
                import psutil
            except ImportError:
                log.warning("psutil is not installed: no addresses and users from it")
                psutil = False
            self._psutil = psutil
        return self._psutil

    # -- identity --

    def host_name(self) -> str:
        # The original sent the FQDN here too (sic).
        return socket.getfqdn()

    def fqdn(self) -> str:
        return socket.getfqdn()

    def os_version(self) -> str:
        return os.uname().release

    def number_of_cpus(self) -> int:
        try:
            return int(os.sysconf("SC_NPROCESSORS_ONLN"))
        except (ValueError, OSError):
            return -1

    def os_info(self) -> Dict[str, str]:
        release = self._os_release()
        version = release.get("VERSION_ID") or release.get("VERSION") or "unknown"
        codename = release.get("VERSION_CODENAME", "")
        if not codename:
            found = re.search(r"\(([^)]*)\)", release.get("VERSION", ""))
            codename = found.group(1) if found else ""
        machine = platform.machine()
        return {"version": version,
                "distribution": release.get("NAME", "Linux"),
                "codename": codename,
                "arch": _ARCHES.get(machine, machine),
                "type": "linux",
                "kernel": os.uname().release}

    def _os_release(self) -> Dict[str, str]:
        for path in (os.path.join(self.etc, "os-release"), "/usr/lib/os-release"):
            try:
                with open(path, encoding="utf-8", errors="replace") as stream:
                    return parse_os_release(stream.read(65536))
            except OSError:
                continue
        return {}

    def timezone(self) -> Dict[str, Any]:
        # Minutes east of UTC, standard time, as the original (-time.timezone/60).
        return {"zone": self._zone_name(), "offset": -time.timezone // 60}

    def _zone_name(self) -> str:
        localtime = os.path.join(self.etc, "localtime")
        try:
            # One level, as the admin set it: realpath would turn UTC into Etc/UTC.
            target = os.readlink(localtime) if os.path.islink(localtime) else ""
        except OSError:
            target = ""
        if "zoneinfo/" in target:
            # The part after zoneinfo/: "UTC", "Europe/Prague",
            # "America/Argentina/Buenos_Aires" (the original's "last two
            # parts" gave "zoneinfo/UTC" and "Argentina/Buenos_Aires").
            name = target.split("zoneinfo/", 1)[1]
            for prefix in ("posix/", "right/"):
                if name.startswith(prefix):
                    name = name[len(prefix):]
            return name
        try:
            with open(os.path.join(self.etc, "timezone"), encoding="utf-8") as stream:
                name = stream.read(4096).strip()
            if name:
                return name
        except OSError:
            pass
        try:
            with open(os.path.join(self.etc, "sysconfig", "clock"), encoding="utf-8") as stream:
                for line in stream.read(65536).splitlines():
                    key, _, value = line.partition("=")
                    if key.strip() == "ZONE":
                        return value.strip().strip("\"'")
        except OSError:
            pass
        return ""

    # -- memory --

    def _meminfo(self) -> Dict[str, int]:
        values: Dict[str, int] = {}
        with open(os.path.join(self.proc, "meminfo"), encoding="ascii") as stream:
            for line in stream:
                fields = line.split()
                if len(fields) >= 2 and fields[1].isdigit():
                    values[fields[0].rstrip(":")] = int(fields[1])
        return values

    def free_ram(self) -> str:
        """MiB a guest could use: (MemFree + Buffers + Cached) / 1024, as a decimal string."""
        info = self._meminfo()
        return str((info.get("MemFree", 0) + info.get("Buffers", 0)
                    + info.get("Cached", 0)) // 1024)

    def memory_stats(self) -> Dict[str, int]:
        """KiB amounts from /proc/meminfo and per-second rates from /proc/vmstat deltas."""
        info = self._meminfo()
        free, buffers, cached = (info.get("MemFree", 0), info.get("Buffers", 0),
                                 info.get("Cached", 0))
        stats = {"mem_total": info.get("MemTotal", 0),
                 "mem_free": free + buffers + cached,
                 "mem_unused": free,
                 "mem_buffers": buffers,
                 "mem_cached": cached,
                 "swap_usage": info.get("SwapTotal", 0) - info.get("SwapFree", 0),
                 "swap_total": info.get("SwapTotal", 0)}
        stats.update(self._vmstat_rates())
        return stats

    def _vmstat_rates(self) -> Dict[str, int]:
        counters: Dict[str, int] = {}
        with open(os.path.join(self.proc, "vmstat"), encoding="ascii") as stream:
            for line in stream:
                key, _, value = line.partition(" ")
                if key in _VMSTAT_FIELDS:
                    counters[_VMSTAT_FIELDS[key]] = int(value)
        now = self.clock()
        previous, self._vmstat_previous = self._vmstat_previous, (now, counters)
        rates = {name: 0 for name in _VMSTAT_FIELDS.values()}
        if previous is not None and now > previous[0]:
            interval = now - previous[0]
            for name, value in counters.items():
                # A counter that went back (it never should) reports 0, not a negative rate.
                rates[name] = max(0, int((value - previous[1].get(name, value)) / interval))
        return rates

    # -- users --

    def active_user(self) -> str:
        """The first name ``users`` would print (any login, sorted), or ``None``."""
        names = self.user_names()
        return names[0] if names else "None"

    def user_names(self) -> List[str]:
        psutil = self._psutil_module()
        if psutil:
            return sorted(entry.name for entry in psutil.users() if entry.name)
        output = self.run(["users"])
        return sorted((output or "").split())

    # -- network --

    def network_interfaces(self) -> List[Dict[str, Any]]:
        """Interfaces that are up and not loopback, minus ``ignored_nics``."""
        net = os.path.join(self.sys, "class", "net")
        try:
            names = sorted(os.listdir(net))
        except OSError:
            return []
        addresses = self._addresses()
        interfaces = []
        for name in names:
            if name in self.config.ignored_nics:
                continue
            flags = _read_int(os.path.join(net, name, "flags"), 16)
            if flags is None or not flags & IFF_UP or flags & IFF_LOOPBACK:
                continue
            hw = _read_text(os.path.join(net, name, "address")) or "00:00:00:00:00:00"
            inet, inet6 = addresses.get(name, ([], []))
            interfaces.append({"name": name, "inet": inet, "inet6": inet6, "hw": hw.lower()})
        return interfaces

    def _addresses(self) -> Dict[str, Tuple[List[str], List[str]]]:
        psutil = self._psutil_module()
        result: Dict[str, Tuple[List[str], List[str]]] = {}
        if not psutil:
            return result
        for name, entries in psutil.net_if_addrs().items():
            inet = [entry.address for entry in entries if entry.family == socket.AF_INET]
            inet6 = [entry.address.split("%", 1)[0] for entry in entries
                     if entry.family == socket.AF_INET6]
            result[name] = (inet, inet6)
        return result

    # -- applications --

    def applications(self) -> List[str]:
        """``name-version`` (dpkg) and ``name-version-release`` (rpm) of the listed packages."""
        wanted = set(self.config.applications)
        found = set()
        if wanted:
            found.update(dpkg_applications(wanted, self.run([
                "dpkg-query", "-W",
                "-f=${db:Status-Abbrev}\\t${Package}\\t${Version}\\t${Provides}\\n"])))
            found.update(rpm_applications(wanted, self.run([
                "rpm", "-qa", "--qf", "%{NAME}\\t%{VERSION}\\t%{RELEASE}\\n"])))
        return sorted(found)

    # -- disks --

    def disks_usage(self) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, str]]]:
        """Mounted filesystems' sizes in bytes, and the disks' serial -> device mapping."""
        disks = []
        with open(os.path.join(self.proc, "mounts"), "rb") as stream:
            table = stream.read()
        for line in table.splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            path = os.fsdecode(unescape_mount_field(fields[1]))
            fs = os.fsdecode(fields[2])
            if fs in self.config.ignored_fs or not os.path.isdir(path):
                continue
            try:
                info = os.statvfs(path)
            except OSError as error:
                log.debug("statvfs %r: %s", path, error)
                continue
            total = info.f_bsize * info.f_blocks
            if total == 0 and self.config.ignore_zero_size_fs:
                continue
            used = total - info.f_bsize * info.f_bfree
            disks.append({"path": path, "fs": fs, "total": total, "used": used})
        return disks, self.disk_mapping()

    def disk_mapping(self) -> Dict[str, Dict[str, str]]:
        """{serial: {"name": "/dev/vdX"}} of the whole disks (udev's ID_SERIAL)."""
        block = os.path.join(self.sys, "block")
        mapping: Dict[str, Dict[str, str]] = {}
        try:
            names = sorted(os.listdir(block))
        except OSError:
            return mapping
        for name in names:
            serial = self._udev_serial(os.path.join(block, name))
            if not serial:
                serial = (_read_text(os.path.join(block, name, "serial"))
                          or _read_text(os.path.join(block, name, "device", "serial")))
            if serial:
                mapping[serial] = {"name": "/dev/" + name}
        return mapping

    def _udev_serial(self, device: str) -> str:
        number = _read_text(os.path.join(device, "dev"))
        if not number:
            return ""
        try:
            with open(os.path.join(self.udev_data, "b" + number), encoding="utf-8",
                      errors="replace") as stream:
                for line in stream.read(1 << 16).splitlines():
                    if line.startswith("E:ID_SERIAL="):
                        return line[len("E:ID_SERIAL="):]
        except OSError:
            pass
        return ""

    # -- containers --

    def containers(self) -> List[Dict[str, Any]]:
        """Docker's containers (``/containers/json?all=true``); [] when Docker is not reachable."""
        if not self.config.docker_socket or not os.path.exists(self.config.docker_socket):
            return []
        try:
            listed = docker_get(self.config.docker_socket, "/containers/json?all=true")
        except (OSError, ValueError) as error:
            log.debug("docker: %s", error)
            return []
        result = []
        for item in listed if isinstance(listed, list) else []:
            if not isinstance(item, dict):
                continue
            result.append({"id": str(item.get("Id", "")),
                           "names": [str(name) for name in item.get("Names") or []],
                           "image": str(item.get("Image", "")),
                           "command": str(item.get("Command", "")),
                           "status": str(item.get("Status", ""))})
        return result


# -- parsing helpers -----------------------------------------------------------------------


def parse_os_release(text: str) -> Dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        values[key] = value
    return values


def unescape_mount_field(field: bytes) -> bytes:
    r"""/proc/mounts writes space, tab, newline and backslash as \040 \011 \012 \134."""
    return re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match.group(1), 8)]), field)


def dpkg_applications(wanted: set, output: Optional[str]) -> List[str]:
    """``name-version`` of installed wanted packages, and of installed providers of wanted
    virtual packages (the original's apt provides_list walk)."""
    found = []
    for line in (output or "").splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or len(fields[0]) < 2 or fields[0][1] != "i":
            continue
        package, version = fields[1], fields[2]
        if package in wanted:
            found.append(f"{package}-{version}")
        provides = fields[3] if len(fields) > 3 else ""
        for provided in provides.split(","):
            name = provided.strip().split(" ", 1)[0]
            if name and name in wanted and name != package:
                found.append(f"{name}-{version}")
    return found


def rpm_applications(wanted: set, output: Optional[str]) -> List[str]:
    found = []
    for line in (output or "").splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0] in wanted:
            found.append("-".join(fields))
    return found


def docker_get(path: str, resource: str, timeout: float = 5.0) -> Any:
    """GET ``resource`` from the Docker API on Unix socket ``path``; the decoded JSON body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(f"GET {resource} HTTP/1.0\r\nHost: docker\r\n\r\n".encode("ascii"))
        data = bytearray()
        while len(data) < 16 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise ValueError(f"the Docker API answered {head[:80]!r}")
    return json.loads(body)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return stream.read(4096).strip()
    except OSError:
        return ""


def _read_int(path: str, base: int) -> Optional[int]:
    try:
        return int(_read_text(path), base)
    except ValueError:
        return None
