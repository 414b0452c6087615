"""Read-only storage inventory: filesystems, disks and their addresses, I/O statistics.

``guest-get-fsinfo`` takes the local filesystems from the mount table
(:func:`local_mounts`: qemu-ga's rules, public for other commands) and
describes the disks under each: a real device gets a ``GuestDiskAddress``
built from its sysfs path the way qemu-ga builds it (the PCI controller, then
the bus type and bus/target/unit from the driver and the SCSI/ATA path
components), a virtual one (device-mapper, md) is followed through its
``slaves``.  libvirt parses these addresses to map guest disks to its own
disk definitions, so the numbers must be qemu-ga's.  Every mount is listed,
bind mounts included, as qemu-ga 7.2 does (newer upstream versions skip a
device already listed).

qemu-ga asks libudev for a device's node and serial; without linking libudev
we read what libudev reads: ``DEVNAME`` from the device's ``uevent`` file and
the ``E:`` properties (``ID_SERIAL``, ``DM_NAME``) from the udev database in
``/run/udev/data``.

``guest-get-disks`` and ``guest-get-diskstats`` follow qemu-ga too, including
its list order (qemu-ga prepends, so entries come out in reverse).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import Dict, List, NamedTuple, Optional, Tuple

from qga.commands import command
from qga.commands.system import in_order, read_file
from qga.errors import CommandError

SYS_BLOCK = "/sys/block"
SYS_DEV_BLOCK = "/sys/dev/block"
UDEV_DATA = "/run/udev/data"
DISKSTATS = "/proc/diskstats"

# Members in schema order, for dicts filled in another order.
DISK_ADDRESS_MEMBERS = ("pci-controller", "bus-type", "bus", "target", "unit", "serial", "dev",
                        "ccw-address")
DISK_INFO_MEMBERS = ("name", "partition", "dependencies", "address", "alias", "smart")
DISKSTATS_MEMBERS = (
    "read-sectors", "read-ios", "read-merges", "write-sectors", "write-ios", "write-merges",
    "discard-sectors", "discard-ios", "discard-merges", "flush-ios", "read-ticks", "write-ticks",
    "discard-ticks", "flush-ticks", "ios-pgr", "total-ticks", "weight-ticks")

# Drivers qemu-ga recognises when it walks up a PCI path.
_PCI_DISK_DRIVERS = ("ata_piix", "sym53c8xx", "virtio-pci", "ahci", "nvme", "xhci_hcd", "ehci-pci")
_HEX = "[0-9a-fA-F]+"
_PCI_ROOT = re.compile(rf"{_HEX}:{_HEX}/({_HEX}):({_HEX}):({_HEX})\.({_HEX})")
_PCI_CHILD = re.compile(rf"/({_HEX}):({_HEX}):({_HEX})\.({_HEX})")
_SCSI_TARGET = re.compile(r"[0-9]+:[0-9]+:[0-9]+/[0-9]+:([0-9]+):([0-9]+):([0-9]+)")
_CCW = re.compile(rf"{_HEX}/({_HEX})\.({_HEX})\.({_HEX})/{_HEX}\.{_HEX}\.({_HEX})/")
_LEADING_UINT = re.compile(r"[0-9]+")


def _errno_text(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else "Success"


def _text(name: str) -> str:
    """A path for a reply: bytes that are not UTF-8 become U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


# -- what libudev would say about a device ---------------------------------------


class UdevDevice:
    """The node name and properties libudev reports for a sysfs device."""

    __slots__ = ("devnode", "properties")

    def __init__(self, syspath: str):
        self.devnode: Optional[str] = None
        self.properties: Dict[str, str] = {}
        try:
            uevent = read_file(syspath + "/uevent").decode("utf-8", "replace")
        except OSError:
            return  # libudev refuses a device without a readable uevent file
        for line in uevent.splitlines():
            key, _, value = line.partition("=")
            self.properties[key] = value
        name = self.properties.get("DEVNAME")
        if name:
            self.devnode = name if name.startswith("/") else "/dev/" + name
        major, minor = self.properties.get("MAJOR"), self.properties.get("MINOR")
        if major is not None and minor is not None and self.properties.get("DEVTYPE") in ("disk", "partition"):
            self._read_database(f"{UDEV_DATA}/b{major}:{minor}")

    def _read_database(self, path: str) -> None:
        try:
            lines = read_file(path).decode("utf-8", "replace").splitlines()
        except OSError:
            return
        for line in lines:
            if line.startswith("E:"):
                key, _, value = line[2:].partition("=")
                self.properties[key] = value

    def property(self, name: str) -> Optional[str]:
        return self.properties.get(name)


# -- resolving sysfs paths --------------------------------------------------------


def resolve_sysfs(path: str) -> str:
    """``realpath()`` for sysfs links; raises OSError like realpath would.

    A sysfs device link points at a path made of directories only, so one
    ``readlink`` does what ``realpath`` does with a system call per
    component; a ``stat`` first fails the way realpath fails (a missing
    target, a loop, no permission).
    """
    os.stat(path)
    try:
        target = os.readlink(path)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        return os.path.realpath(path)  # not a link
    return os.path.normpath(os.path.join(os.path.dirname(path), target))


def _checked_realpath(path: str) -> Optional[str]:
    """``realpath(path)``; None for ENOENT, CommandError for other failures."""
    try:
        return resolve_sysfs(path)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return None
        raise CommandError(f'realpath("{path}"): {_errno_text(error)}') from None


# -- disk addresses ---------------------------------------------------------------


def _new_disk_address() -> dict:
    return {
        "pci-controller": {"domain": -1, "bus": -1, "slot": -1, "function": -1},
        "bus-type": "unknown",
        "bus": 0,
        "target": 0,
        "unit": 0,
    }


def _pci_driver(device_path: str) -> Optional[str]:
    try:
        return os.path.basename(os.readlink(device_path + "/driver"))
    except OSError:
        return None


def _host_numbers(directory: str, ata: bool) -> List[int]:
    """Sorted ``ataN``/``hostN`` numbers in ``directory`` (at most 8, as qemu-ga reads)."""
    try:
        names = os.listdir(directory)
    except OSError as error:
        raise CommandError(f'opendir("{directory}"): {_errno_text(error)}') from None
    prefix = "ata" if ata else "host"
    numbers = []
    for name in names:
        if len(numbers) == 8:
            break
        if name.startswith(prefix):
            match = re.match(r"[+-]?[0-9]+", name[len(prefix):])
            if match:
                numbers.append(int(match.group()) % 2**32)
    return sorted(numbers)


def _scsi_target(syspath: str) -> Optional[Tuple[int, int, int]]:
    at = syspath.find("/target")
    if at == -1:
        return None
    match = _SCSI_TARGET.match(syspath, at + 7)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def _fill_pci_address(syspath: str, disk: dict) -> bool:
    """qemu-ga's ``build_guest_fsinfo_for_pci_dev``: True when the address is known."""
    at = syspath.find("/devices/pci")
    match = _PCI_ROOT.match(syspath, at + 12) if at != -1 else None
    if match is None:
        return False
    pci = [int(group, 16) for group in match.groups()]
    position = match.end()
    while True:
        driver = _pci_driver(syspath[:position])
        if driver in _PCI_DISK_DRIVERS:
            break
        child = _PCI_CHILD.match(syspath, position)
        if child is None:
            return False  # a device behind an unsupported driver
        pci = [int(group, 16) for group in child.groups()]
        position = child.end()

    target = _scsi_target(syspath)
    ata = syspath.find("/ata")
    if ata != -1:
        host_at, offset, is_ata = ata, 4, True
    else:
        host_at, offset, is_ata = syspath.find("/host"), 5, False
    host = None
    hosts: List[int] = []
    if host_at != -1:
        number = _LEADING_UINT.match(syspath, host_at + offset)
        if number is not None:
            host = int(number.group()) % 2**32
            hosts = _host_numbers(syspath[:host_at], is_ata)

    disk["pci-controller"] = {"domain": pci[0], "bus": pci[1], "slot": pci[2], "function": pci[3]}
    if driver in ("ata_piix", "ahci"):
        # ata_piix: a host per IDE bus, target*:0:<unit>:0; ahci: a host per unit.
        if host is None or target is None or host not in hosts:
            return False
        if driver == "ata_piix":
            disk["bus-type"], disk["bus"], disk["unit"] = "ide", hosts.index(host), target[1]
        else:
            disk["bus-type"], disk["unit"] = "sata", hosts.index(host)
    elif driver == "sym53c8xx":
        if target is None:
            return False
        disk["bus-type"], disk["unit"] = "scsi", target[1]
    elif driver == "virtio-pci":
        if target is not None:
            disk["bus-type"], disk["unit"] = "scsi", target[2]  # virtio-scsi
        else:
            disk["bus-type"] = "virtio"  # virtio-blk: one disk per device
    elif driver == "nvme":
        disk["bus-type"] = "nvme"
    else:
        disk["bus-type"] = "usb"
    return True


def _fill_nonpci_virtio_address(syspath: str, disk: dict) -> bool:
    if "/virtio" not in syspath or "/block" not in syspath:
        return False
    target = _scsi_target(syspath)
    if target is not None:
        disk["bus-type"] = "scsi"
        disk["bus"], disk["target"], disk["unit"] = target
    else:
        disk["bus-type"] = "virtio"
    return True


def _fill_ccw_address(syspath: str, disk: dict) -> bool:
    at = syspath.find("/devices/css")
    match = _CCW.match(syspath, at + 12) if at != -1 else None
    if match is None:
        return False
    cssid, ssid, subchno, devno = (int(group, 16) for group in match.groups())
    disk["ccw-address"] = {"cssid": cssid, "ssid": ssid, "subchno": subchno, "devno": devno}
    if "/virtio" in syspath[at:]:
        _fill_nonpci_virtio_address(syspath, disk)
    return True


def _real_device_address(syspath: str) -> Optional[dict]:
    disk = _new_disk_address()
    udev = UdevDevice(syspath)
    if udev.devnode is not None:
        disk["dev"] = udev.devnode
    serial = udev.property("ID_SERIAL")
    if serial:
        disk["serial"] = serial
    if "/devices/pci" in syspath:
        known = _fill_pci_address(syspath, disk)
    elif "/devices/css" in syspath:
        known = _fill_ccw_address(syspath, disk)
    elif "/virtio" in syspath:
        known = _fill_nonpci_virtio_address(syspath, disk)
    else:
        known = False
    if known or "dev" in disk or "serial" in disk:
        return in_order(disk, DISK_ADDRESS_MEMBERS)
    return None


class _FsDisks:
    """What ``build_guest_fsinfo_for_device`` accumulates: a name and disk addresses."""

    __slots__ = ("name", "disks")

    def __init__(self) -> None:
        self.name: Optional[str] = None
        self.disks: List[dict] = []  # in qemu-ga's (prepended) order


def _describe_device(devpath: str, found: _FsDisks) -> None:
    syspath = _checked_realpath(devpath)
    if syspath is None:
        # The device may be missing in a container.
        if found.name is None:
            found.name = os.path.basename(devpath)
        return
    if found.name is None:
        found.name = os.path.basename(syspath)
    if "/devices/virtual/block/" in syspath:
        _describe_slaves(syspath, found)
        return
    disk = _real_device_address(syspath)
    if disk is not None:
        found.disks.insert(0, disk)


def _describe_slaves(syspath: str, found: _FsDisks) -> None:
    slaves = syspath + "/slaves"
    try:
        entries = list(os.scandir(slaves))
    except FileNotFoundError:
        return
    except OSError as error:
        raise CommandError(f'opendir("{slaves}"): {_errno_text(error)}') from None
    for entry in entries:
        if entry.is_symlink():
            _describe_device(f"{syspath}/slaves/{entry.name}", found)


def disk_address(syspath: str) -> Optional[dict]:
    """The address of the disk at ``syspath`` (qemu-ga's ``get_disk_address``)."""
    found = _FsDisks()
    _describe_device(syspath, found)
    return found.disks[0] if found.disks else None


# -- the mount table -------------------------------------------------------------------

MOUNTINFO = "/proc/self/mountinfo"


class FsMount(NamedTuple):
    """One local filesystem from the mount table (qemu-ga's ``FsMount``)."""

    dirname: str
    devtype: str
    devmajor: int
    devminor: int


def decode_mount_name(name: bytes) -> bytes:
    """Undo the kernel's escapes in mountinfo: ``\\\\`` and three octal digits (``\\040``)."""
    if b"\\" not in name:
        return name
    out = bytearray()
    position = 0
    while position < len(name):
        byte = name[position]
        if byte == 0x5C and name[position + 1:position + 2] == b"\\":
            out.append(0x5C)
            position += 2
        elif byte == 0x5C and _OCTAL_ESCAPE.match(name, position + 1):
            out.append(int(name[position + 1:position + 4], 8))
            position += 4
        else:
            out.append(byte)
            position += 1
    return bytes(out)


_OCTAL_ESCAPE = re.compile(rb"[0-3][0-7][0-7]")


def _block_device_numbers(path: bytes) -> Optional[Tuple[int, int]]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(info.st_mode):
        return None  # a directory (a bind mount) or anything else
    return os.major(info.st_rdev), os.minor(info.st_rdev)


def parse_mountinfo(data: bytes) -> List[FsMount]:
    """The local filesystems in mount order, by qemu-ga's rules (``build_fs_mount_list``).

    Local means a real device number (major != 0), or btrfs (whose major is
    0) mounted from a block device.  Lines that do not parse are skipped.
    """
    mounts = []
    for line in data.split(b"\n"):
        fields = line.split(b" ", 5)
        if len(fields) < 6:
            continue
        if fields[2][:2] == b"0:" and b" - btrfs " not in fields[5]:
            continue  # no device (proc, tmpfs, ...): most lines, rejected cheaply
        major, colon, minor = fields[2].partition(b":")
        if not (colon and major.isdigit() and minor.isdigit()):
            continue
        rest = b" " + fields[5]
        dash = rest.find(b" - ")
        if dash == -1:
            continue
        tail = rest[dash + 3:].split(b" ", 2)
        devtype = tail[0]
        devmajor, devminor = int(major), int(minor)
        if devmajor == 0:
            if devtype != b"btrfs" or len(tail) < 2:
                continue
            numbers = _block_device_numbers(decode_mount_name(tail[1]))
            if numbers is None:
                continue
            devmajor, devminor = numbers
        mounts.append(FsMount(os.fsdecode(decode_mount_name(fields[4])), os.fsdecode(devtype),
                              devmajor, devminor))
    return mounts


def _read_mountinfo(mountinfo: str) -> bytes:
    try:
        return read_file(mountinfo)
    except OSError:
        # qemu-ga falls back to /proc/self/mounts, which is just as absent.
        raise CommandError("failed to open mtab file: '/proc/self/mounts'") from None


def local_mounts(mountinfo: str = MOUNTINFO) -> List[FsMount]:
    """The local filesystems of this mount namespace (see :func:`parse_mountinfo`)."""
    return parse_mountinfo(_read_mountinfo(mountinfo))


class MountTable:
    """:func:`local_mounts`, parsed again only when the mount table's text changes.

    The kernel writes the whole table on every read, so comparing the text
    is exact; a btrfs line names a device node whose numbers could change,
    so a table with btrfs lines is always parsed.
    """

    def __init__(self, ctx=None) -> None:
        self._text = b""
        self._mounts: List[FsMount] = []

    def mounts(self, mountinfo: str = MOUNTINFO) -> List[FsMount]:
        text = _read_mountinfo(mountinfo)
        if text != self._text or b" - btrfs " in text:
            self._mounts = parse_mountinfo(text)
            self._text = text
        return list(self._mounts)


# -- guest-get-fsinfo --------------------------------------------------------------


def filesystem_info(mount: FsMount) -> dict:
    """One ``GuestFilesystemInfo``."""
    found = _FsDisks()
    _describe_device(f"{SYS_DEV_BLOCK}/{mount.devmajor}:{mount.devminor}", found)
    info = {"name": _text(found.name or ""), "mountpoint": _text(mount.dirname), "type": _text(mount.devtype)}
    try:
        usage = os.statvfs(mount.dirname)
    except OSError:
        pass
    else:
        used = (usage.f_blocks - usage.f_bfree) % 2**64
        info["used-bytes"] = used * usage.f_frsize % 2**64
        info["total-bytes"] = (used + usage.f_bavail) * usage.f_frsize % 2**64
        info["total-bytes-privileged"] = usage.f_blocks * usage.f_frsize % 2**64
    info["disk"] = found.disks
    return info


@command("guest-get-fsinfo")
def get_fsinfo(ctx) -> list:
    # qemu-ga prepends each filesystem, so the list comes out in reverse mount order.
    return [filesystem_info(mount) for mount in reversed(ctx.service(MountTable).mounts())]


# -- guest-get-disks ----------------------------------------------------------------


def _partitions(disk_name: str, disk_dir: str, disk_dev: str) -> List[dict]:
    """Partition entries in ``readdir`` order (``<disk>N`` or ``<disk>pN`` directories)."""
    partitions = []
    try:
        entries = list(os.scandir(disk_dir))
    except OSError:
        return partitions
    size = len(disk_name)
    for entry in entries:
        name = entry.name
        if not name.startswith(disk_name) or not entry.is_dir(follow_symlinks=False):
            continue
        rest = name[size:]
        if not (rest[:1].isdigit() and rest[:1].isascii()
                or rest[:1] == "p" and rest[1:2].isdigit() and rest[1:2].isascii()):
            continue
        devnode = UdevDevice(f"{disk_dir}/{name}").devnode
        if devnode is None:
            continue
        partitions.append({"name": devnode, "partition": True, "dependencies": [disk_dev]})
    return partitions


def _dependencies(disk_dir: str) -> Optional[List[str]]:
    try:
        names = os.listdir(disk_dir + "/slaves")
    except OSError:
        return None
    nodes = [UdevDevice(f"{disk_dir}/slaves/{name}").devnode for name in names]
    return [node for node in reversed(nodes) if node is not None]


def list_disks(sys_block: str = SYS_BLOCK) -> List[dict]:
    try:
        entries = list(os.scandir(sys_block))
    except OSError as error:
        raise CommandError(f'Can\'t open directory "{sys_block}": {_errno_text(error)}') from None
    prepended: List[dict] = []
    for entry in entries:
        if not entry.is_symlink():
            continue
        disk_dir = f"{sys_block}/{entry.name}"
        try:
            if read_file(disk_dir + "/size") == b"0\n":
                continue  # zero-sized (unused loop devices and the like)
        except OSError:
            continue
        udev = UdevDevice(disk_dir)
        if udev.devnode is None:
            continue
        disk = {"name": udev.devnode, "partition": False}
        try:
            virtual = "/devices/virtual/block/" in resolve_sysfs(disk_dir)
        except OSError:
            virtual = True  # qemu-ga then skips the address
        if not virtual:
            try:
                address = disk_address(disk_dir)
            except CommandError:
                address = None  # qemu-ga logs and ignores the error
            if address is not None:
                disk["address"] = address
        alias = udev.property("DM_NAME")
        if alias:
            disk["alias"] = alias
        dependencies = _dependencies(disk_dir)
        if dependencies is not None:
            disk["dependencies"] = dependencies
        if disk.get("address", {}).get("bus-type") == "nvme":
            smart = nvme_smart(udev.devnode)
            if smart is not None:
                disk["smart"] = smart
        prepended.append(in_order(disk, DISK_INFO_MEMBERS))
        prepended.extend(_partitions(entry.name, disk_dir, udev.devnode))
    prepended.reverse()
    return prepended


@command("guest-get-disks")
def get_disks(ctx) -> list:
    return list_disks()


# NVMe SMART / Health Information log page (NVMe spec, log identifier 02h).
NVME_IOCTL_ADMIN_CMD = 0xC0484E41  # _IOWR('N', 0x41, struct nvme_admin_cmd)
_NVME_SMART_FIELDS = (
    "data-units-read", "data-units-written", "host-read-commands", "host-write-commands",
    "controller-busy-time", "power-cycles", "power-on-hours", "unsafe-shutdowns",
    "media-errors", "number-of-error-log-entries",
)


def parse_nvme_smart_log(log: bytes) -> dict:
    """The ``GuestDiskSmart`` for a 512-byte SMART log page."""
    import struct

    critical, temperature, spare, threshold, used = struct.unpack_from("<BHBBB", log, 0)
    smart = {
        "type": "nvme",
        "critical-warning": critical,
        "temperature": temperature,
        "available-spare": spare,
        "available-spare-threshold": threshold,
        "percentage-used": used,
    }
    counters = struct.unpack_from("<20Q", log, 32)
    for index, name in enumerate(_NVME_SMART_FIELDS):
        smart[name + "-lo"] = counters[2 * index]
        smart[name + "-hi"] = counters[2 * index + 1]
    return smart


def nvme_smart(devnode: str) -> Optional[dict]:
    """Ask an NVMe controller for its SMART log, as qemu-ga does; None when it cannot."""
    import ctypes
    import fcntl
    import struct

    log = ctypes.create_string_buffer(512)
    # struct nvme_admin_cmd: opcode, flags, rsvd1, nsid, cdw2, cdw3, metadata,
    # addr, metadata_len, data_len, cdw10..cdw15, timeout_ms, result.
    command_block = bytearray(struct.pack(
        "<BBHIIIQQII6III",
        0x02, 0, 0, 0xFFFFFFFF, 0, 0,  # Get Log Page, all namespaces
        0, ctypes.addressof(log), 0, 512,
        0x02 | 1 << 15 | ((512 >> 2) - 1) << 16, 0, 0, 0, 0, 0,  # SMART log, RAE, length
        0, 0,
    ))
    try:
        fd = os.open(devnode, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.ioctl(fd, NVME_IOCTL_ADMIN_CMD, command_block)
    except OSError:
        return None
    finally:
        os.close(fd)
    return parse_nvme_smart_log(log.raw)


# -- guest-get-diskstats -------------------------------------------------------------

_DISKSTAT_MEMBERS_14 = ("read-ios", "read-merges", "read-sectors", "read-ticks", "write-ios",
                        "write-merges", "write-sectors", "write-ticks", "ios-pgr", "total-ticks",
                        "weight-ticks")
_DISKSTAT_MEMBERS_18 = ("discard-ios", "discard-merges", "discard-sectors", "discard-ticks")
_DISKSTAT_MEMBERS_20 = ("flush-ios", "flush-ticks")
# Columns qemu-ga reads with %u (32 bits); the others are %lu.
_DISKSTAT_32BIT = {"write-ticks", "ios-pgr", "total-ticks", "weight-ticks", "discard-ticks",
                   "flush-ticks"}


def parse_diskstats(text: bytes) -> List[dict]:
    """``/proc/diskstats`` lines as qemu-ga reads them (4, 11, 15 or 17 statistics)."""
    result = []
    for line in text.split(b"\n"):
        fields = line.split()
        if len(fields) < 3 or not fields[0].isdigit() or not fields[1].isdigit():
            continue
        values = []
        for field in fields[3:20]:
            if not field.isdigit():
                break
            values.append(int(field))
        count = 3 + len(values)
        if count < 7:
            continue
        stats: Dict[str, int] = {}
        if count == 7:
            # Old partition lines: reads, read sectors, writes, write sectors.
            stats = {"read-ios": values[0], "read-sectors": values[1],
                     "write-ios": values[2], "write-sectors": values[3]}
        if count >= 14:
            stats.update(zip(_DISKSTAT_MEMBERS_14, values[0:11]))
        if count >= 18:
            stats.update(zip(_DISKSTAT_MEMBERS_18, values[11:15]))
        if count >= 20:
            stats.update(zip(_DISKSTAT_MEMBERS_20, values[15:17]))
        for name, value in stats.items():
            stats[name] = value % 2**32 if name in _DISKSTAT_32BIT else min(value, 2**64 - 1)
        result.append({
            "name": fields[2].decode("utf-8", "replace"),
            "major": int(fields[0]) % 2**32,
            "minor": int(fields[1]) % 2**32,
            "stats": in_order(stats, DISKSTATS_MEMBERS),
        })
    return result


@command("guest-get-diskstats")
def get_diskstats(ctx) -> list:
    try:
        text = read_file(DISKSTATS)
    except OSError as error:
        raise CommandError(f'open("{DISKSTATS}"): {_errno_text(error)}') from None
    return parse_diskstats(text)
