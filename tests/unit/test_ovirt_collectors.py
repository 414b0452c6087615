"""The Linux collectors: the real /proc, /sys, dpkg and psutil here, and prepared trees."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extensions" / "ovirt_sso"))

from ovirt_agent import collectors, config  # noqa: E402
from tests.support.fake_vdsm import validate  # noqa: E402

MEMINFO = """MemTotal:        4000000 kB
MemFree:         1000000 kB
MemAvailable:    2000000 kB
Buffers:           72864 kB
Cached:           500000 kB
SwapCached:            0 kB
SwapTotal:       1048576 kB
SwapFree:         524288 kB
HugePages_Total:       0
"""


def vmstat(pswpin, pswpout, pgfault, pgmajfault):
    return (f"nr_free_pages 1\npswpin {pswpin}\npswpout {pswpout}\npgfault {pgfault}\n"
            f"pgmajfault {pgmajfault}\n")


def make(tmp_path, settings=None, **paths):
    return collectors.LinuxCollectors(config.Config(settings or {}), **paths)


def test_memory_units_and_rates(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "vmstat").write_text(vmstat(10, 20, 1000, 5))
    now = [100.0]
    source = make(tmp_path, proc=str(proc), clock=lambda: now[0])
    assert source.free_ram() == str((1000000 + 72864 + 500000) // 1024) == "1536"
    first = source.memory_stats()
    assert first == {"mem_total": 4000000, "mem_free": 1572864, "mem_unused": 1000000,
                     "mem_buffers": 72864, "mem_cached": 500000, "swap_usage": 524288,
                     "swap_total": 1048576, "swap_in": 0, "swap_out": 0, "pageflt": 0,
                     "majflt": 0}
    (proc / "vmstat").write_text(vmstat(60, 20, 3000, 25))
    now[0] += 5.0
    rates = source.memory_stats()
    assert (rates["swap_in"], rates["swap_out"], rates["pageflt"], rates["majflt"]) == (
        10, 0, 400, 4)
    assert validate("memory-stats", {"memory": rates}) == []


def test_memory_from_the_real_proc():
    source = collectors.LinuxCollectors(config.Config({}))
    assert source.free_ram().isdigit()
    stats = source.memory_stats()
    assert stats["mem_total"] > 0 and stats["mem_free"] >= stats["mem_unused"]
    assert all(isinstance(value, int) and value >= 0 for value in stats.values())
    with open("/proc/meminfo") as stream:
        total = int(re.search(r"MemTotal:\s+(\d+)", stream.read()).group(1))
    assert stats["mem_total"] == total


def test_active_user_is_the_first_of_users(monkeypatch):
    source = collectors.LinuxCollectors(config.Config({}))
    words = subprocess.run(["users"], capture_output=True, text=True).stdout.split()
    assert source.active_user() == (words[0] if words else "None")

    class Entry:
        def __init__(self, name):
            self.name = name

    class FakePsutil:
        @staticmethod
        def users():
            return [Entry("zoe"), Entry("bob"), Entry("bob")]

    source._psutil = FakePsutil
    assert source.active_user() == "bob" and source.user_names() == ["bob", "bob", "zoe"]
    source._psutil = False        # no psutil: the users program
    source.run = lambda argv: "mallory alice\n" if argv == ["users"] else None
    assert source.active_user() == "alice"


def test_network_interfaces_up_not_loopback_not_ignored(tmp_path):
    net = tmp_path / "sys" / "class" / "net"
    for name, flags, address in [("lo", "0x9", "00:00:00:00:00:00"),
                                 ("eth0", "0x1003", "52:54:00:AB:CD:EF"),
                                 ("eth1", "0x1002", "52:54:00:00:00:01"),    # down
                                 ("docker0", "0x1003", "02:42:00:00:00:02"),
                                 ("tun0", "0x1091", "")]:
        (net / name).mkdir(parents=True)
        (net / name / "flags").write_text(flags + "\n")
        (net / name / "address").write_text(address + "\n")
    source = make(tmp_path, sys=str(tmp_path / "sys"))
    source._psutil = False
    interfaces = source.network_interfaces()
    assert interfaces == [
        {"name": "eth0", "inet": [], "inet6": [], "hw": "52:54:00:ab:cd:ef"},
        {"name": "tun0", "inet": [], "inet6": [], "hw": "00:00:00:00:00:00"}]
    assert validate("network-interfaces", {"interfaces": interfaces}) == []


def test_network_interfaces_of_this_machine():
    source = collectors.LinuxCollectors(config.Config({}))
    interfaces = source.network_interfaces()
    assert "lo" not in [item["name"] for item in interfaces]
    assert validate("network-interfaces", {"interfaces": interfaces}) == []
    psutil = pytest.importorskip("psutil")
    addresses = psutil.net_if_addrs()
    for item in interfaces:
        expected = [entry.address for entry in addresses.get(item["name"], [])
                    if entry.family == socket.AF_INET]
        assert item["inet"] == expected
        assert all("%" not in address for address in item["inet6"])


def test_applications_from_the_real_dpkg():
    if not collectors.shutil.which("dpkg-query"):
        pytest.skip("not a dpkg system")
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpkg"],
                             capture_output=True, text=True).stdout
    source = collectors.LinuxCollectors(config.Config(
        {"applications_list": "dpkg no-such-package-here"}))
    assert source.applications() == [f"dpkg-{version}"]


def test_applications_exact_names_virtual_packages_and_rpm():
    dpkg = ("ii \tkernel-thing\t1.0\t\n"
            "ii \tcloud-init\t22.4.2-1\t\n"
            "rc \tovirt-guest-agent\t1.0.16\t\n"                   # removed: not installed
            "ii \tlinux-image-6.1.0-18-amd64\t6.1.76-1\t"
            "linux-image (= 6.1.76-1), wireguard-modules (= 1.0.0)\n"
            "ii \tcloud-init-extra\t1\t\n")
    rpm = "kernel\t5.14.0\t362.el9\nkernel-core\t5.14.0\t362.el9\ncloud-init\t23.1\t1.el9\n"
    calls = []

    def run(argv):
        calls.append(argv[0])
        return {"dpkg-query": dpkg, "rpm": rpm}[argv[0]]

    source = collectors.LinuxCollectors(config.Config({}), run=run)
    assert source.applications() == sorted([
        "cloud-init-22.4.2-1", "linux-image-6.1.76-1", "kernel-5.14.0-362.el9",
        "cloud-init-23.1-1.el9"])
    assert calls == ["dpkg-query", "rpm"]
    assert collectors.LinuxCollectors(config.Config({"applications_list": ""}),
                                      run=run).applications() == []


def test_applications_with_test_doubles_on_path(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rpm").write_text("#!/bin/sh\n[ \"$1\" = -qa ] || exit 2\n"
                                 "printf 'kernel\\t4.18.0\\t513.el8\\n'\n")
    (bin_dir / "rpm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    source = collectors.LinuxCollectors(config.Config({"applications_list": "kernel"}))
    assert "kernel-4.18.0-513.el8" in source.applications()


def test_disks_usage(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    spaced = tmp_path / "with space"
    spaced.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    (proc / "mounts").write_bytes(
        b"/dev/vda1 / ext4 rw 0 0\n"
        b"/dev/vdb1 " + str(tmp_path).encode() + b"/with\\040space xfs rw 0 0\n"
        b"tmpfs /run tmpfs rw 0 0\n"
        b"/dev/vda1 " + str(a_file).encode() + b" ext4 rw 0 0\n"     # a file bind mount
        b"proc /proc proc rw 0 0\n"
        b"short line\n")
    source = make(tmp_path, proc=str(proc), sys=str(tmp_path / "nosys"))
    disks, mapping = source.disks_usage()
    assert [(disk["path"], disk["fs"]) for disk in disks] == [("/", "ext4"),
                                                              (str(spaced), "xfs")]
    root = os.statvfs("/")
    assert disks[0]["total"] == root.f_bsize * root.f_blocks
    assert 0 <= disks[0]["used"] <= disks[0]["total"]
    assert mapping == {}
    assert validate("disks-usage", {"disks": disks}) == []
    # Zero-size filesystems: skipped unless asked for.
    everything = make(tmp_path, {"ignored_fs": "", "ignore_zero_size_fs": False},
                      proc=str(proc), sys=str(tmp_path / "nosys"))
    assert "/proc" in [disk["path"] for disk in everything.disks_usage()[0]]
    nonzero = make(tmp_path, {"ignored_fs": ""}, proc=str(proc), sys=str(tmp_path / "nosys"))
    assert "/proc" not in [disk["path"] for disk in nonzero.disks_usage()[0]]


def test_disk_mapping_from_udev_and_sysfs(tmp_path):
    block = tmp_path / "sys" / "block"
    for name, number in [("vda", "252:0"), ("vdb", "252:16"), ("loop0", "7:0")]:
        (block / name).mkdir(parents=True)
        (block / name / "dev").write_text(number + "\n")
    (block / "vdb" / "serial").write_text("b0b1b2b3-serial\n")
    udev = tmp_path / "udev"
    udev.mkdir()
    (udev / "b252:0").write_text("S:disk/by-id/virtio-abc\nE:ID_SERIAL=5e7a8bd1-6a9f-4c5b-8\n"
                                 "G:systemd\n")
    source = make(tmp_path, sys=str(tmp_path / "sys"), udev_data=str(udev))
    assert source.disk_mapping() == {"5e7a8bd1-6a9f-4c5b-8": {"name": "/dev/vda"},
                                     "b0b1b2b3-serial": {"name": "/dev/vdb"}}


def test_os_info_and_arch(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
                                    'NAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
                                    'VERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\n'
                                    "# comment\nID=debian\n")
    source = make(tmp_path, etc=str(etc))
    info = source.os_info()
    assert info == {"version": "12", "distribution": "Debian GNU/Linux", "codename": "bookworm",
                    "arch": {"i686": "x86"}.get(platform.machine(), platform.machine()),
                    "type": "linux", "kernel": os.uname().release}
    assert validate("os-info", info) == []
    (etc / "os-release").write_text('NAME="CentOS Linux"\nVERSION="7 (Core)"\n'
                                    'VERSION_ID="7"\n')
    monkeypatch.setattr(collectors.platform, "machine", lambda: "i686")
    info = source.os_info()
    assert (info["codename"], info["arch"]) == ("Core", "x86")


@pytest.mark.parametrize("target,zone", [
    ("/usr/share/zoneinfo/Europe/Prague", "Europe/Prague"),
    ("/usr/share/zoneinfo/UTC", "UTC"),
    ("/usr/share/zoneinfo/America/Argentina/Buenos_Aires", "America/Argentina/Buenos_Aires"),
    ("/usr/share/zoneinfo/posix/Asia/Tokyo", "Asia/Tokyo"),
])
def test_timezone_from_the_localtime_link(tmp_path, target, zone):
    etc = tmp_path / "etc"
    etc.mkdir()
    os.symlink(target, etc / "localtime")
    result = make(tmp_path, etc=str(etc)).timezone()
    assert result == {"zone": zone, "offset": -time.timezone // 60}
    assert validate("timezone", result) == []


def test_timezone_fallbacks(tmp_path):
    etc = tmp_path / "etc"
    (etc / "sysconfig").mkdir(parents=True)
    (etc / "localtime").write_bytes(b"TZif2")               # a copy, not a link
    (etc / "sysconfig" / "clock").write_text('UTC=true\nZONE="America/New_York"\n')
    source = make(tmp_path, etc=str(etc))
    assert source.timezone()["zone"] == "America/New_York"
    (etc / "timezone").write_text("Europe/Berlin\n")
    assert source.timezone()["zone"] == "Europe/Berlin"
    os.unlink(etc / "timezone")
    os.unlink(etc / "sysconfig" / "clock")
    assert source.timezone()["zone"] == ""


def test_timezone_offset_is_minutes_east_of_utc_standard_time(tmp_path):
    script = ("import sys; sys.path.insert(0, sys.argv[1]);"
              "from ovirt_agent import collectors, config;"
              "print(collectors.LinuxCollectors(config.Config({})).timezone()['offset'])")
    extension = str(Path(__file__).resolve().parents[2] / "extensions" / "ovirt_sso")
    for tz, offset in [("Asia/Kolkata", 330), ("America/St_Johns", -210), ("UTC", 0),
                       ("Europe/Prague", 60)]:
        if not os.path.exists(f"/usr/share/zoneinfo/{tz}"):
            continue
        output = subprocess.run([sys.executable, "-c", script, extension], text=True,
                                capture_output=True, env=dict(os.environ, TZ=tz), check=True)
        assert int(output.stdout) == offset, tz


def test_number_of_cpus_and_names():
    source = collectors.LinuxCollectors(config.Config({}))
    assert source.number_of_cpus() == os.sysconf("SC_NPROCESSORS_ONLN")
    assert source.fqdn() == socket.getfqdn() == source.host_name()
    assert source.os_version() == platform.release()


class FakeDocker:
    """The Docker API's /containers/json on a Unix socket."""

    def __init__(self, path, body, status=b"200 OK"):
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.requests = []
        self.thread = threading.Thread(target=self._serve, args=(body, status), daemon=True)
        self.thread.start()

    def _serve(self, body, status):
        connection, _ = self.server.accept()
        with connection:
            self.requests.append(connection.recv(4096))
            connection.sendall(b"HTTP/1.0 " + status + b"\r\nContent-Type: application/json"
                               b"\r\n\r\n" + body)

    def close(self):
        self.thread.join(5)
        self.server.close()


def test_containers_from_the_docker_api(tmp_path):
    path = str(tmp_path / "docker.sock")
    body = json.dumps([{"Id": "8dfafdbc3a40", "Names": ["/boring_feynman"], "Image": "ubuntu",
                        "Command": "echo 1", "Status": "Exited (0) 8 hours ago",
                        "State": "exited"}]).encode()
    docker = FakeDocker(path, body)
    source = make(tmp_path, {"docker_socket": path})
    listed = source.containers()
    docker.close()
    assert listed == [{"id": "8dfafdbc3a40", "names": ["/boring_feynman"], "image": "ubuntu",
                       "command": "echo 1", "status": "Exited (0) 8 hours ago"}]
    assert docker.requests[0].startswith(b"GET /containers/json?all=true HTTP/1.0\r\n")
    assert validate("containers", {"list": listed}) == []


def test_containers_without_docker(tmp_path):
    assert make(tmp_path, {"docker_socket": str(tmp_path / "absent")}).containers() == []
    path = str(tmp_path / "docker.sock")
    docker = FakeDocker(path, b"{}", status=b"500 Internal Server Error")
    assert make(tmp_path, {"docker_socket": path}).containers() == []
    docker.close()


def test_unescape_mount_fields():
    assert collectors.unescape_mount_field(b"/a\\040b\\011c\\134d\\012") == b"/a b\tc\\d\n"
