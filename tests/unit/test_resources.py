"""guest-set-vcpus and guest-set-memory-blocks.

Changes happen only in a fake sysfs under ``$QGA_TEST_SYSROOT``; against the
real sysfs of this machine the tests ask only for what is already true
(cpu0 online, memory block 0 online), which qemu-ga answers without writing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qga.commands import Context
from qga.commands import resources
from qga.commands.sysutil import SYSROOT_VARIABLE
from qga.config import Config
from qga.errors import CommandError
from tests.support.replies import validate_return


@pytest.fixture
def ctx():
    return Context(Config(), state=None)


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    """A fake /sys/devices/system: cpu0 (no online file), cpu1 online, cpu2 offline."""
    root = tmp_path / "root"
    system = root / "sys" / "devices" / "system"
    (system / "cpu" / "cpu0").mkdir(parents=True)
    for number, state in ((1, "1\n"), (2, "0\n")):
        (system / "cpu" / f"cpu{number}").mkdir()
        (system / "cpu" / f"cpu{number}" / "online").write_text(state)
    memory = system / "memory"
    memory.mkdir()
    for number, state in ((0, "online\n"), (1, "offline\n")):
        (memory / f"memory{number}").mkdir()
        (memory / f"memory{number}" / "state").write_text(state)
    (memory / "memory2").mkdir()  # an old kernel: no state file
    monkeypatch.setenv(SYSROOT_VARIABLE, str(root))
    return system


def vcpu(logical_id, online):
    return {"logical-id": logical_id, "online": online}


def block(phys_index, online):
    return {"phys-index": phys_index, "online": online}


# -- vcpus ----------------------------------------------------------------------------


def test_empty_list(ctx, sysfs):
    assert resources.set_vcpus(ctx, vcpus=[]) == 0
    assert resources.set_memory_blocks(ctx, mem_blks=[]) == []


def test_switching_cpus_writes_the_online_files(ctx, sysfs):
    processed = resources.set_vcpus(ctx, vcpus=[vcpu(1, False), vcpu(2, True)])
    validate_return(None, "guest-set-vcpus", processed)
    assert processed == 2
    assert (sysfs / "cpu" / "cpu1" / "online").read_text() == "0\n"
    assert (sysfs / "cpu" / "cpu2" / "online").read_text() == "1\n"


def test_unchanged_cpu_is_not_written(ctx, sysfs):
    online = sysfs / "cpu" / "cpu1" / "online"
    online.write_text("1 but not rewritten")
    assert resources.set_vcpus(ctx, vcpus=[vcpu(1, True)]) == 1
    assert online.read_text() == "1 but not rewritten"


def test_cpu_without_online_file(ctx, sysfs):
    assert resources.set_vcpus(ctx, vcpus=[vcpu(0, True)]) == 1
    with pytest.raises(CommandError, match=r"^logical processor #0 can't be offlined$"):
        resources.set_vcpus(ctx, vcpus=[vcpu(0, False)])


def test_count_of_leading_successes(ctx, sysfs):
    assert resources.set_vcpus(ctx, vcpus=[vcpu(1, False), vcpu(9, True), vcpu(2, True)]) == 1
    # Processing stopped at the failure: cpu2 was not touched.
    assert (sysfs / "cpu" / "cpu2" / "online").read_text() == "0\n"


def test_first_failure_is_an_error(ctx, sysfs):
    path = f"{sysfs}/cpu/cpu9/"
    with pytest.raises(CommandError) as raised:
        resources.set_vcpus(ctx, vcpus=[vcpu(9, True), vcpu(1, True)])
    assert raised.value.desc == f'open("{path}"): No such file or directory'


def test_unreadable_state(ctx, sysfs):
    (sysfs / "cpu" / "cpu1" / "online").write_text("")
    with pytest.raises(CommandError) as raised:
        resources.set_vcpus(ctx, vcpus=[vcpu(1, True)])
    assert raised.value.desc == f'pread("{sysfs}/cpu/cpu1//online"): unexpected EOF'
    os.unlink(sysfs / "cpu" / "cpu1" / "online")
    (sysfs / "cpu" / "cpu1" / "online").mkdir()
    with pytest.raises(CommandError) as raised:
        resources.set_vcpus(ctx, vcpus=[vcpu(1, True)])
    assert raised.value.desc == f'open("{sysfs}/cpu/cpu1//online"): Is a directory'


def test_real_sysfs_without_changes(ctx):
    assert resources.set_vcpus(ctx, vcpus=[vcpu(0, True)]) == 1
    with pytest.raises(CommandError) as raised:
        resources.set_vcpus(ctx, vcpus=[vcpu(99999, True)])
    assert raised.value.desc == 'open("/sys/devices/system/cpu/cpu99999/"): No such file or directory'


# -- memory blocks -------------------------------------------------------------------


def test_memory_block_answers(ctx, sysfs):
    answers = resources.set_memory_blocks(ctx, mem_blks=[
        block(0, True), block(1, True), block(999, True), block(2, False), block(2, True),
    ])
    validate_return(None, "guest-set-memory-blocks", answers)
    # Schema order; the reply writer turns it into qemu-ga's QDict order.
    assert [list(answer) for answer in answers[2:3]] == [["phys-index", "response", "error-code"]]
    assert answers == [
        {"phys-index": 0, "response": "success"},
        {"phys-index": 1, "response": "success"},
        {"phys-index": 999, "response": "not-found", "error-code": 2},
        {"phys-index": 2, "response": "operation-not-supported", "error-code": 2},
        # qemu-ga reports the ENOENT even when it pretends success.
        {"phys-index": 2, "response": "success", "error-code": 2},
    ]
    # pwrite at offset 0, as qemu-ga does (sysfs takes it whole; a plain file keeps a tail)
    assert (sysfs / "memory" / "memory1" / "state").read_text().startswith("online")


def test_memory_block_offline(ctx, sysfs):
    assert resources.set_memory_blocks(ctx, mem_blks=[block(0, False)]) == [
        {"phys-index": 0, "response": "success"}]
    assert (sysfs / "memory" / "memory0" / "state").read_text().startswith("offline")


def test_negative_index_wraps_to_uint64(ctx, sysfs):
    assert resources.set_memory_blocks(ctx, mem_blks=[block(-1, True)]) == [
        {"phys-index": 18446744073709551615, "response": "not-found", "error-code": 2}]


def test_write_failure(ctx, sysfs):
    state = sysfs / "memory" / "memory1" / "state"
    state.unlink()
    state.mkdir()  # readable as nothing: reading a directory fails with EISDIR
    assert resources.set_memory_blocks(ctx, mem_blks=[block(1, True)]) == [
        {"phys-index": 1, "response": "operation-failed", "error-code": 21}]


def test_no_memory_directory(ctx, sysfs):
    (sysfs / "memory").rename(sysfs / "gone")
    assert resources.set_memory_blocks(ctx, mem_blks=[block(0, True)]) == [
        {"phys-index": 0, "response": "operation-not-supported", "error-code": 2}]


def test_real_sysfs_memory_block(ctx):
    if not os.path.isdir("/sys/devices/system/memory/memory0"):
        pytest.skip("no memory block 0 in this machine's sysfs")
    state = Path("/sys/devices/system/memory/memory0/state").read_text()
    if not state.startswith("online"):
        pytest.skip("memory block 0 is not online here")
    assert resources.set_memory_blocks(ctx, mem_blks=[block(0, True), block(10 ** 9, True)]) == [
        {"phys-index": 0, "response": "success"},
        {"phys-index": 10 ** 9, "response": "not-found", "error-code": 2},
    ]
