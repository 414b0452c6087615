"""Filesystems, disks and I/O statistics: this machine (against df, lsblk, /proc) and fake sysfs trees.

The fake trees reproduce the sysfs paths of the disk controllers QEMU
offers (IDE, AHCI, LSI SCSI, virtio-scsi, virtio-blk, NVMe behind a bridge,
USB, s390 CCW) so the ``GuestDiskAddress`` rules libvirt depends on are
checked without that hardware.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from qga.commands import Context
from qga.commands import storage
from qga.errors import CommandError
from qga.protocol import encode_reply
from qga.qdict_order import qdict_order
from tests.support.replies import validate_return


@pytest.fixture
def ctx():
    return Context(config=None, state=None)


# -- the mount table ------------------------------------------------------------------------


def some_block_device():
    for entry in os.scandir("/dev"):
        try:
            info = os.stat(entry.path)
        except OSError:
            continue
        if stat.S_ISBLK(info.st_mode):
            return entry.path, os.major(info.st_rdev), os.minor(info.st_rdev)
    return None


def test_mountinfo_rules():
    text = (
        b"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        b"27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        b"30 27 8:1 / /mnt/with\\040space\\134x rw shared:1 - xfs /dev/sda1 rw\n"
        b"31 27 0:40 / /srv/btrfs-dir rw - btrfs /tmp rw\n"
        b"32 27 8:2 / /no-separator rw xfs /dev/sda2 rw\n"
        b"33 27 bad / /bad rw - ext4 /dev/x rw\n"
        b"short line\n"
    )
    mounts = storage.parse_mountinfo(text)
    assert mounts == [
        storage.FsMount("/", "ext4", 254, 0),
        storage.FsMount("/mnt/with space\\x", "xfs", 8, 1),
    ]


def test_mountinfo_btrfs_takes_the_numbers_of_its_block_device():
    device = some_block_device()
    if device is None:
        pytest.skip("no block device node in /dev")
    path, major, minor = device
    line = f"40 27 0:45 / /data rw,relatime - btrfs {path} rw\n".encode()
    assert storage.parse_mountinfo(line) == [storage.FsMount("/data", "btrfs", major, minor)]


def test_mount_list_matches_the_freeze_commands():
    from qga.commands import fsfreeze

    if os.environ.get(fsfreeze.FENCE_VARIABLE) is not None:
        pytest.skip("the freeze commands are fenced in this environment")
    ours = [tuple(mount) for mount in storage.local_mounts()]
    assert ours == [tuple(mount) for mount in fsfreeze.local_mounts()]
    assert ours, "no local filesystem at all?"


def test_mount_table_follows_changes_of_the_text(tmp_path, ctx):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_bytes(b"27 1 254:0 / / rw - ext4 /dev/vda rw\n")
    table = ctx.service(storage.MountTable)
    first = table.mounts(str(mountinfo))
    assert [mount.dirname for mount in first] == ["/"]
    first.append("changed by a caller")
    assert len(table.mounts(str(mountinfo))) == 1  # callers get copies
    mountinfo.write_bytes(b"27 1 254:0 / / rw - ext4 /dev/vda rw\n"
                          b"30 27 8:1 / /srv rw - xfs /dev/sda1 rw\n")
    assert [mount.dirname for mount in table.mounts(str(mountinfo))] == ["/", "/srv"]
    with pytest.raises(CommandError) as caught:
        table.mounts(str(tmp_path / "missing"))
    assert caught.value.desc == "failed to open mtab file: '/proc/self/mounts'"


def test_decode_mount_name():
    assert storage.decode_mount_name(b"plain") == b"plain"
    assert storage.decode_mount_name(b"a\\040b\\011c\\012d\\134e") == b"a b\tc\nd\\e"
    assert storage.decode_mount_name(b"a\\\\b") == b"a\\b"
    assert storage.decode_mount_name(b"a\\8xy\\4000") == b"a\\8xy\\4000"  # not octal escapes


# -- guest-get-fsinfo on this machine ---------------------------------------------------------


def df_numbers(mountpoint: str):
    output = subprocess.run(["df", "-B1", "--output=size,used,avail", mountpoint],
                            check=True, capture_output=True, text=True).stdout
    return [int(value) for value in output.splitlines()[1].split()]


def test_fsinfo_of_this_machine(ctx):
    reply = storage.get_fsinfo(ctx)
    mounts = storage.local_mounts()
    assert [entry["mountpoint"] for entry in reply] == [mount.dirname for mount in reversed(mounts)]
    for entry, mount in zip(reply, reversed(mounts)):
        assert entry["type"] == mount.devtype
        link = f"/sys/dev/block/{mount.devmajor}:{mount.devminor}"
        expected_name = os.path.basename(os.path.realpath(link)) if os.path.exists(link) else \
            f"{mount.devmajor}:{mount.devminor}"
        assert entry["name"] == expected_name
        assert list(entry) == list([key for key in ("name", "mountpoint", "type", "used-bytes",
                                                           "total-bytes", "total-bytes-privileged", "disk")
                                           if key in entry])
        if shutil.which("df") and os.access(mount.dirname, os.R_OK):
            size, used, avail = df_numbers(mount.dirname)
            slack = 256 << 20  # other processes write meanwhile
            assert entry["total-bytes-privileged"] == size
            assert abs(entry["used-bytes"] - used) < slack
            assert abs(entry["total-bytes"] - (used + avail)) < slack
    validate_return(None, "guest-get-fsinfo", reply)


def test_fsinfo_disk_of_the_root_filesystem_matches_lsblk(ctx):
    if shutil.which("lsblk") is None:
        pytest.skip("lsblk is not installed")
    root = next((entry for entry in storage.get_fsinfo(ctx) if entry["mountpoint"] == "/"), None)
    if root is None or not root["disk"]:
        pytest.skip("the root filesystem is not on a described disk")
    devices = json.loads(subprocess.run(["lsblk", "-J", "-o", "KNAME,PATH"], check=True,
                                        capture_output=True, text=True).stdout)["blockdevices"]
    paths = {device["path"] for device in devices}
    for disk in root["disk"]:
        if "dev" in disk:
            assert disk["dev"] in paths


# -- disk addresses from fake sysfs trees ---------------------------------------------------------


class FakeSysfs:
    """Builds device directories, driver links and uevent files under a temporary /sys."""

    def __init__(self, root: Path):
        self.root = root
        self.sys = root / "sys"
        (self.sys / "bus" / "pci" / "drivers").mkdir(parents=True)
        self.udev = root / "udev"
        self.udev.mkdir()

    def driver(self, device: str, name: str) -> None:
        target = self.sys / "bus" / "pci" / "drivers" / name
        target.mkdir(exist_ok=True)
        directory = self.sys / device
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "driver").symlink_to(target)

    def block(self, path: str, major: int, minor: int, devname: str, devtype: str = "disk",
              serial: str = "", size: str = "2048\n") -> str:
        directory = self.sys / path
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "uevent").write_text(
            f"MAJOR={major}\nMINOR={minor}\nDEVNAME={devname}\nDEVTYPE={devtype}\n")
        (directory / "size").write_text(size)
        (directory / "dev").write_text(f"{major}:{minor}\n")
        if serial:
            (self.udev / f"b{major}:{minor}").write_text(f"S:disk/by-id/x\nE:ID_SERIAL={serial}\nG:systemd\n")
        return str(directory)

    def dirs(self, parent: str, *names: str) -> None:
        for name in names:
            (self.sys / parent / name).mkdir(parents=True, exist_ok=True)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    sysfs = FakeSysfs(tmp_path)
    monkeypatch.setattr(storage, "UDEV_DATA", str(sysfs.udev))
    return sysfs


def pci(domain, bus, slot, function):
    return {"domain": domain, "bus": bus, "slot": slot, "function": function}


def test_ahci_disk_unit_is_the_rank_of_its_ata_port(fake):
    fake.driver("devices/pci0000:00/0000:00:1f.2", "ahci")
    fake.dirs("devices/pci0000:00/0000:00:1f.2", "ata1", "ata2", "ata3", "ata5", "ata_stuff")
    path = fake.block("devices/pci0000:00/0000:00:1f.2/ata5/host4/target4:0:0/4:0:0:0/block/sda",
                      8, 0, "sda", serial="QEMU_HARDDISK_QM00005")
    address = storage.disk_address(path)
    assert address == {"pci-controller": pci(0, 0, 31, 2), "bus-type": "sata", "bus": 0, "target": 0,
                       "unit": 3, "serial": "QEMU_HARDDISK_QM00005", "dev": "/dev/sda"}
    assert list(address) == list(["pci-controller", "bus-type", "bus", "target", "unit", "serial",
                                         "dev"])
    assert list(address["pci-controller"]) == list(["domain", "bus", "slot", "function"])


def test_ide_disk_bus_is_the_rank_of_its_host_and_unit_the_scsi_target(fake):
    fake.driver("devices/pci0000:00/0000:00:01.1", "ata_piix")
    fake.dirs("devices/pci0000:00/0000:00:01.1", "ata1", "ata2")
    path = fake.block("devices/pci0000:00/0000:00:01.1/ata2/host1/target1:0:1/1:0:1:0/block/sdb",
                      8, 16, "sdb")
    assert storage.disk_address(path) == {"pci-controller": pci(0, 0, 1, 1), "bus-type": "ide", "bus": 1,
                                          "target": 0, "unit": 1, "dev": "/dev/sdb"}


def test_lsi_scsi_and_virtio_scsi_units(fake):
    fake.driver("devices/pci0000:00/0000:00:04.0", "sym53c8xx")
    fake.dirs("devices/pci0000:00/0000:00:04.0", "host2")
    lsi = fake.block("devices/pci0000:00/0000:00:04.0/host2/target2:0:3/2:0:3:0/block/sdc", 8, 32, "sdc")
    assert storage.disk_address(lsi)["bus-type"] == "scsi"
    assert storage.disk_address(lsi)["unit"] == 3

    fake.driver("devices/pci0000:00/0000:00:05.0", "virtio-pci")
    fake.dirs("devices/pci0000:00/0000:00:05.0/virtio2", "host3")
    virtio_scsi = fake.block("devices/pci0000:00/0000:00:05.0/virtio2/host3/target3:0:2/3:0:2:7/block/sdd",
                             8, 48, "sdd")
    address = storage.disk_address(virtio_scsi)
    assert (address["bus-type"], address["bus"], address["target"], address["unit"]) == ("scsi", 0, 0, 7)


def test_virtio_blk_nvme_behind_a_bridge_and_usb(fake):
    fake.driver("devices/pci0000:00/0000:00:02.0", "virtio-pci")
    vda = fake.block("devices/pci0000:00/0000:00:02.0/virtio1/block/vda", 254, 0, "vda")
    assert storage.disk_address(vda) == {"pci-controller": pci(0, 0, 2, 0), "bus-type": "virtio",
                                         "bus": 0, "target": 0, "unit": 0, "dev": "/dev/vda"}

    fake.driver("devices/pci0000:00/0000:00:1c.0", "pcieport")
    fake.driver("devices/pci0000:00/0000:00:1c.0/0000:03:00.0", "nvme")
    nvme = fake.block("devices/pci0000:00/0000:00:1c.0/0000:03:00.0/nvme/nvme0/nvme0n1", 259, 0, "nvme0n1")
    address = storage.disk_address(nvme)
    assert address["pci-controller"] == pci(0, 3, 0, 0)
    assert address["bus-type"] == "nvme"

    fake.driver("devices/pci0000:00/0000:00:06.0", "xhci_hcd")
    usb = fake.block("devices/pci0000:00/0000:00:06.0/usb2/2-1/2-1:1.0/host5/target5:0:0/5:0:0:0/block/sde",
                     8, 64, "sde")
    assert storage.disk_address(usb)["bus-type"] == "usb"


def test_unknown_driver_keeps_an_unknown_address_when_the_node_is_known(fake):
    fake.driver("devices/pci0000:00/0000:00:07.0", "megaraid_sas")
    path = fake.block("devices/pci0000:00/0000:00:07.0/host6/target6:0:0/6:0:0:0/block/sdf", 8, 80, "sdf")
    assert storage.disk_address(path) == {"pci-controller": pci(-1, -1, -1, -1), "bus-type": "unknown",
                                          "bus": 0, "target": 0, "unit": 0, "dev": "/dev/sdf"}
    bare = fake.sys / "devices/platform/foo/block/xyz"
    bare.mkdir(parents=True)
    assert storage.disk_address(str(bare)) is None  # nothing known at all


def test_ccw_virtio_disk(fake):
    path = fake.block("devices/css0/0.0.001a/0.0.0815/virtio3/block/vdb", 254, 16, "vdb")
    address = storage.disk_address(path)
    assert address["ccw-address"] == {"cssid": 0, "ssid": 0, "subchno": 0x1a, "devno": 0x815}
    assert address["bus-type"] == "virtio"
    assert list(address["ccw-address"]) == list(["cssid", "ssid", "subchno", "devno"])


def test_virtual_device_lists_its_slaves_in_qemu_ga_order(fake):
    fake.driver("devices/pci0000:00/0000:00:02.0", "virtio-pci")
    fake.driver("devices/pci0000:00/0000:00:03.0", "virtio-pci")
    vda = fake.block("devices/pci0000:00/0000:00:02.0/virtio1/block/vda", 254, 0, "vda")
    vdb = fake.block("devices/pci0000:00/0000:00:03.0/virtio2/block/vdb", 254, 16, "vdb")
    dm = Path(fake.block("devices/virtual/block/dm-0", 253, 0, "dm-0"))
    (dm / "slaves").mkdir()
    (dm / "slaves" / "vda").symlink_to(vda)
    (dm / "slaves" / "vdb").symlink_to(vdb)
    found = storage._FsDisks()
    storage._describe_device(str(dm), found)
    assert found.name == "dm-0"
    order = os.listdir(dm / "slaves")  # qemu-ga prepends: reverse readdir order
    assert [disk["dev"] for disk in found.disks] == [f"/dev/{name}" for name in reversed(order)]


def test_missing_device_names_the_filesystem_after_the_numbers(tmp_path):
    found = storage._FsDisks()
    storage._describe_device(str(tmp_path / "8:99"), found)
    assert (found.name, found.disks) == ("8:99", [])


def test_unreadable_path_is_an_error(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(CommandError) as caught:
        storage._describe_device(str(loop), storage._FsDisks())
    assert caught.value.desc == f'realpath("{loop}"): Too many levels of symbolic links'


# -- guest-get-disks ------------------------------------------------------------------------------


def test_disks_from_a_fake_sys_block(fake):
    fake.driver("devices/pci0000:00/0000:00:02.0", "virtio-pci")
    vda = Path(fake.block("devices/pci0000:00/0000:00:02.0/virtio1/block/vda", 254, 0, "vda"))
    fake.block("devices/pci0000:00/0000:00:02.0/virtio1/block/vda/vda1", 254, 1, "vda1", "partition")
    fake.block("devices/pci0000:00/0000:00:02.0/virtio1/block/vda/vda2", 254, 2, "vda2", "partition")
    (vda / "slaves").mkdir()
    (vda / "holders").mkdir()
    dm = Path(fake.block("devices/virtual/block/dm-0", 253, 0, "dm-0"))
    (dm / "slaves").mkdir()
    (dm / "slaves" / "vda2").symlink_to(vda / "vda2")
    (fake.udev / "b253:0").write_text("E:DM_NAME=vg-root\n")
    loop = Path(fake.block("devices/virtual/block/loop0", 7, 0, "loop0", size="0\n"))
    block = fake.sys / "block"
    block.mkdir()
    for device in (vda, dm, loop):
        (block / device.name).symlink_to(device)

    reply = storage.list_disks(str(block))
    by_name = {entry["name"]: entry for entry in reply}
    assert set(by_name) == {"/dev/vda", "/dev/vda1", "/dev/vda2", "/dev/dm-0"}  # zero-sized loop skipped
    assert by_name["/dev/vda"] == {"name": "/dev/vda", "partition": False, "dependencies": [],
                                   "address": {"pci-controller": pci(0, 0, 2, 0), "bus-type": "virtio",
                                               "bus": 0, "target": 0, "unit": 0, "dev": "/dev/vda"}}
    assert by_name["/dev/vda1"] == {"name": "/dev/vda1", "partition": True, "dependencies": ["/dev/vda"]}
    assert by_name["/dev/dm-0"] == {"name": "/dev/dm-0", "partition": False, "alias": "vg-root",
                                    "dependencies": ["/dev/vda2"]}
    # qemu-ga prepends every entry: a disk comes after its partitions.
    names = [entry["name"] for entry in reply]
    assert names.index("/dev/vda") > names.index("/dev/vda1")
    for entry in reply:
        assert list(entry) == list([key for key in ("name", "partition", "dependencies", "address",
                                                           "alias", "smart") if key in entry])
    validate_return(None, "guest-get-disks", reply)


def test_disks_of_this_machine_match_lsblk(ctx):
    if shutil.which("lsblk") is None:
        pytest.skip("lsblk is not installed")
    reply = storage.get_disks(ctx)
    devices = json.loads(subprocess.run(["lsblk", "-J", "-b", "-o", "PATH,SIZE,TYPE"], check=True,
                                        capture_output=True, text=True).stdout)["blockdevices"]
    expected = {device["path"] for device in devices if device["size"]}
    assert {entry["name"] for entry in reply} == expected
    validate_return(None, "guest-get-disks", reply)


def test_nvme_smart_log_parsing():
    log = bytearray(512)
    struct.pack_into("<BHBBB", log, 0, 1, 310, 100, 10, 3)
    for index in range(20):
        struct.pack_into("<Q", log, 32 + 8 * index, 1000 + index)
    smart = storage.parse_nvme_smart_log(bytes(log))
    assert smart["type"] == "nvme"
    assert (smart["critical-warning"], smart["temperature"], smart["available-spare"],
            smart["available-spare-threshold"], smart["percentage-used"]) == (1, 310, 100, 10, 3)
    assert smart["data-units-read-lo"] == 1000 and smart["data-units-read-hi"] == 1001
    assert smart["number-of-error-log-entries-hi"] == 1019
    members = ["type", "critical-warning", "temperature", "available-spare", "available-spare-threshold",
               "percentage-used"] + [f"{name}-{half}" for name in storage._NVME_SMART_FIELDS
                                     for half in ("lo", "hi")]
    assert list(smart) == members  # schema order: the writer turns it into qemu's order
    wire = [name for name, _ in json.loads(encode_reply({"return": smart}), object_pairs_hook=list)[0][1]]
    assert wire == qdict_order(members)
    assert wire.index("power-cycles-hi") < wire.index("power-cycles-lo")  # a shared bucket


# -- guest-get-diskstats --------------------------------------------------------------------------


def test_diskstats_column_counts():
    text = (b"   8       0 sda 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17\n"
            b"   8       1 sda1 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15\n"
            b"   8       2 sda2 1 2 3 4 5 6 7 8 9 10 11\n"
            b"   8       3 sda3 1 2 3 4\n"
            b"   8       4 sda4 1 2 3 4 5 6\n"
            b"   7       0 loop0 1 2\n"
            b"   8       5 big 1 2 3 4 5 6 7 4294967297 9 10 11\n")
    reply = storage.parse_diskstats(text)
    assert [entry["name"] for entry in reply] == ["sda", "sda1", "sda2", "sda3", "sda4", "big"]
    assert reply[0]["stats"] == {
        "read-ios": 1, "read-merges": 2, "read-sectors": 3, "read-ticks": 4, "write-ios": 5,
        "write-merges": 6, "write-sectors": 7, "write-ticks": 8, "ios-pgr": 9, "total-ticks": 10,
        "weight-ticks": 11, "discard-ios": 12, "discard-merges": 13, "discard-sectors": 14,
        "discard-ticks": 15, "flush-ios": 16, "flush-ticks": 17}
    assert "flush-ios" not in reply[1]["stats"] and reply[1]["stats"]["discard-ticks"] == 15
    assert set(reply[2]["stats"]) == {"read-ios", "read-merges", "read-sectors", "read-ticks", "write-ios",
                                      "write-merges", "write-sectors", "write-ticks", "ios-pgr",
                                      "total-ticks", "weight-ticks"}
    assert reply[3]["stats"] == {"read-ios": 1, "read-sectors": 2, "write-ios": 3, "write-sectors": 4}
    assert reply[4]["stats"] == {}  # neither layout: qemu-ga reports no counters
    assert reply[5]["stats"]["write-ticks"] == 1  # read as a 32-bit %u
    assert (reply[0]["major"], reply[0]["minor"]) == (8, 0)


def test_diskstats_of_this_machine(ctx):
    reply = storage.get_diskstats(ctx)
    with open("/proc/diskstats") as stream:
        lines = [line.split() for line in stream if line.strip()]
    assert [(entry["major"], entry["minor"], entry["name"]) for entry in reply] == \
        [(int(fields[0]), int(fields[1]), fields[2]) for fields in lines]
    for entry in reply:
        assert list(entry) == list(["name", "major", "minor", "stats"])
    validate_return(None, "guest-get-diskstats", reply)
