"""vCPUs, memory blocks and CPU statistics: this machine's sysfs and /proc, and fake trees for the odd cases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qga.commands import Context
from qga.commands import hardware
from qga.errors import CommandError
from tests.support.replies import validate_return


@pytest.fixture
def ctx():
    return Context(config=None, state=None)


# -- vcpus ----------------------------------------------------------------------------------


def test_vcpus_of_this_machine(ctx):
    reply = hardware.get_vcpus(ctx)
    cpus = [name for name in os.listdir(hardware.CPU_SYSFS_DIR)
            if name.startswith("cpu") and name[3:].isdigit()]
    assert [f"cpu{entry['logical-id']}" for entry in reply] == cpus  # readdir order
    for entry in reply:
        online = Path(hardware.CPU_SYSFS_DIR, f"cpu{entry['logical-id']}", "online")
        if online.exists():
            assert entry["online"] == (online.read_text()[:1] != "0")
            assert entry["can-offline"] is True
        else:
            assert entry == {"logical-id": entry["logical-id"], "online": True, "can-offline": False}
        assert list(entry) == list(["logical-id", "online", "can-offline"])
    validate_return(None, "guest-get-vcpus", reply)


@pytest.fixture
def cpu_tree(tmp_path):
    root = tmp_path / "cpu"
    (root / "cpu0").mkdir(parents=True)  # no online file
    (root / "cpu1").mkdir()
    (root / "cpu1" / "online").write_text("1\n")
    (root / "cpu2").mkdir()
    (root / "cpu2" / "online").write_text("0\n")
    (root / "cpufreq").mkdir()  # not a cpu, though its name starts like one
    (root / "possible").write_text("0-2\n")
    return root


def test_vcpus_online_files(cpu_tree):
    reply = sorted(hardware.list_vcpus(str(cpu_tree)), key=lambda entry: entry["logical-id"])
    assert reply == [
        {"logical-id": 0, "online": True, "can-offline": False},
        {"logical-id": 1, "online": True, "can-offline": True},
        {"logical-id": 2, "online": False, "can-offline": True},
    ]


def test_vcpu_errors_use_qemu_ga_texts(cpu_tree):
    (cpu_tree / "cpu3").mkdir()
    (cpu_tree / "cpu3" / "online").mkdir()  # reading it fails
    with pytest.raises(CommandError) as caught:
        hardware.list_vcpus(str(cpu_tree))
    assert caught.value.desc == f'pread("{cpu_tree}/cpu3//online"): Is a directory'

    (cpu_tree / "cpu3" / "online").rmdir()
    (cpu_tree / "cpu3" / "online").write_text("")
    with pytest.raises(CommandError) as caught:
        hardware.read_vcpu(3, str(cpu_tree))
    assert caught.value.desc == f'pread("{cpu_tree}/cpu3//online"): unexpected EOF'

    with pytest.raises(CommandError) as caught:
        hardware.read_vcpu(9, str(cpu_tree))
    assert caught.value.desc == f'open("{cpu_tree}/cpu9/"): No such file or directory'

    with pytest.raises(CommandError) as caught:
        hardware.list_vcpus(str(cpu_tree / "missing"))
    assert caught.value.desc == f"failed to list entries: {cpu_tree}/missing: No such file or directory"


# -- memory blocks ---------------------------------------------------------------------------


def test_memory_blocks_of_this_machine(ctx):
    if not os.path.isdir(hardware.MEMORY_SYSFS_DIR):
        assert hardware.get_memory_blocks(ctx) == []
        return
    reply = hardware.get_memory_blocks(ctx)
    names = [entry.name for entry in os.scandir(hardware.MEMORY_SYSFS_DIR)
             if entry.name.startswith("memory") and entry.is_dir(follow_symlinks=False)]
    assert [f"memory{entry['phys-index']}" for entry in reply] == names
    for entry in reply[:8]:
        directory = Path(hardware.MEMORY_SYSFS_DIR, f"memory{entry['phys-index']}")
        assert entry["online"] == (directory / "state").read_text().startswith("online")
        assert entry["can-offline"] == ((directory / "removable").read_text()[:1] != "0")
        assert list(entry) == list(["phys-index", "online", "can-offline"])
    validate_return(None, "guest-get-memory-blocks", reply)


def test_memory_block_size_of_this_machine(ctx):
    if not os.path.isdir(hardware.MEMORY_SYSFS_DIR):
        pytest.skip("no memory hotplug on this machine")
    reply = hardware.get_memory_block_info(ctx)
    expected = int(Path(hardware.MEMORY_SYSFS_DIR, "block_size_bytes").read_text(), 16)
    assert reply == {"size": expected}
    validate_return(None, "guest-get-memory-block-info", reply)


@pytest.fixture
def memory_tree(tmp_path):
    root = tmp_path / "memory"
    root.mkdir()
    (root / "block_size_bytes").write_text("8000000\n")
    blocks = {"memory0": ("online\n", "0\n"), "memory7": ("offline\n", "1\n"),
              "memory12": ("online\n", None), "memory3": (None, None)}
    for name, (state, removable) in blocks.items():
        (root / name).mkdir()
        if state is not None:
            (root / name / "state").write_text(state)
        if removable is not None:
            (root / name / "removable").write_text(removable)
    (root / "memory_note").write_text("a file, not a block\n")
    return str(root) + "/"


def test_memory_block_files(memory_tree):
    reply = sorted(hardware.list_memory_blocks(memory_tree), key=lambda entry: entry["phys-index"])
    assert reply == [
        {"phys-index": 0, "online": True, "can-offline": False},
        {"phys-index": 3, "online": True, "can-offline": False},  # no state file: old kernel
        {"phys-index": 7, "online": False, "can-offline": True},
        {"phys-index": 12, "online": True, "can-offline": False},  # no removable file
    ]
    assert hardware.memory_block_size(memory_tree) == 0x8000000


def test_memory_block_errors_and_empty_cases(tmp_path, memory_tree):
    assert hardware.list_memory_blocks(str(tmp_path / "none") + "/") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CommandError) as caught:
        hardware.list_memory_blocks(str(empty) + "/")
    assert caught.value.desc == "guest reported zero memory blocks!"

    with pytest.raises(CommandError) as caught:
        hardware.memory_block_size(str(tmp_path / "none") + "/")
    assert caught.value.desc == f'open("{tmp_path}/none/"): No such file or directory'
    with pytest.raises(CommandError) as caught:
        hardware.memory_block_size(str(empty) + "/")
    assert caught.value.desc == 'open sysfs file "block_size_bytes": No such file or directory'

    Path(memory_tree, "memory0", "state").unlink()
    Path(memory_tree, "memory0", "state").mkdir()
    with pytest.raises(CommandError) as caught:
        hardware.read_memory_block(0, memory_tree)
    assert caught.value.desc == 'pread sysfs file "state": Is a directory'


def test_hex_and_decimal_parsing_like_c():
    assert hardware._strtol_hex(b"8000000\n") == 0x8000000
    assert hardware._strtol_hex(b"0x10") == 16
    assert hardware._strtol_hex(b"zz") == 0
    assert hardware._strtol_hex(b"f" * 20) == 2**63 - 1
    assert hardware._strtoul(b"12abc") == 12
    assert hardware._strtoul(b"") == 0


# -- cpustats ---------------------------------------------------------------------------------


def test_cpustats_of_this_machine(ctx):
    reply = hardware.get_cpustats(ctx)
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as stream:
        lines = [line.split() for line in stream if line.startswith("cpu") and not line.startswith("cpu ")]
    assert [entry["cpu"] for entry in reply] == [int(fields[0][3:]) for fields in lines]
    for entry, fields in zip(reply, lines):
        assert entry["type"] == "linux"
        # Counters only grow; allow for the time between the two reads.
        assert 0 <= int(fields[1]) * 1000 // ticks - entry["user"] < 2000
        assert 0 <= int(fields[4]) * 1000 // ticks - entry["idle"] < 2000
        assert list(entry) == list(["type", "cpu", "user", "nice", "system", "idle", "iowait", "irq",
                                           "softirq", "steal", "guest", "guestnice"])
    validate_return(None, "guest-get-cpustats", reply)


def test_cpustats_columns_present_decide_members():
    text = (b"cpu  1 2 3 4 5 6 7 8 9 10\n"
            b"cpu0 100 200 300 400\n"
            b"cpu1 100 200 300 400 500\n"
            b"cpu2 100 200 300 400 500 600 700 800\n"
            b"cpu3 100 200 300 400 500 600 700 800 900 1000\n"
            b"intr 1 2 3\n"
            b"cpu4 1\n"
            b"cpu5 100 200 300 400\n")
    reply = hardware.parse_cpustats(text, 100)
    assert reply[0] == {"type": "linux", "cpu": 0, "user": 1000, "nice": 2000, "system": 3000, "idle": 4000}
    assert reply[1]["iowait"] == 5000 and "irq" not in reply[1]
    assert reply[2]["steal"] == 8000 and "guest" not in reply[2]
    assert reply[3]["guestnice"] == 10000
    assert [entry["cpu"] for entry in reply] == [0, 1, 2, 3]  # a short cpu line ends the list
