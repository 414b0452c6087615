"""fsfreeze and fstrim handlers, called directly with a real Context.

Every test runs with ``QGA_TEST_MOUNTPOINTS`` set (autouse fixture), so the
handlers see no filesystem at all, or only the test's loop mount: nothing
here can freeze or trim a filesystem of the machine running the tests.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from qga.commands import Context
from qga.commands import fsfreeze
from qga.commands.fsfreeze import FreezeService, TrimService, local_mounts
from qga.commands.storage import FsMount, decode_mount_name
from qga.config import Config
from qga.errors import CommandError
from qga.loop import Loop
from qga.state import StateDir
from tests.support.loopfs import FENCE_VARIABLE, loopfs  # noqa: F401  (fixture)
from tests.support.replies import validate_return


@pytest.fixture(autouse=True)
def fence(monkeypatch):
    monkeypatch.setenv(FENCE_VARIABLE, "/nonexistent/qga-test-fence")


@pytest.fixture
def statedir(tmp_path):
    path = tmp_path / "state"
    path.mkdir()
    return path


def make_ctx(statedir: Path, hook=None, loop=None, max_frozen_time=0) -> Context:
    config = Config()
    config.fsfreeze_hook = None if hook is None else str(hook)
    config.fsfreeze_max_frozen_time = max_frozen_time
    return Context(config, StateDir(str(statedir)), loop)


def write_hook(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def hook_log(tmp_path):
    return tmp_path / "hook.log"


@pytest.fixture
def logging_hook(tmp_path, hook_log):
    """A hook that records its arguments, session, stdio, cwd and one env variable."""
    return write_hook(tmp_path / "hook", f"""
sid=$(ps -o sid= -p $$ | tr -d ' ')
echo "args=$*|count=$#|pid=$$|sid=$sid|stdin=$(readlink /proc/$$/fd/0)|stdout=$(readlink /proc/$$/fd/1)|cwd=$(pwd)|var=$QGA_HOOK_TEST" >> {hook_log}
exit ${{HOOK_EXIT:-0}}
""")


def hook_calls(hook_log: Path):
    if not hook_log.exists():
        return []
    calls = []
    for line in hook_log.read_text().splitlines():
        calls.append(dict(field.split("=", 1) for field in line.split("|")))
    return calls


# -- the mount list -----------------------------------------------------------------


def test_decode_mount_name_undoes_kernel_escapes():
    assert decode_mount_name(rb"/mnt/a\040b") == b"/mnt/a b"
    assert decode_mount_name(rb"/mnt/tab\011x\\y") == b"/mnt/tab\tx\\y"
    # Not an escape: kept as is, like qemu-ga's decoder.
    assert decode_mount_name(rb"/mnt/\9x\4") == rb"/mnt/\9x\4"


def test_mountinfo_parsing(tmp_path, monkeypatch):
    monkeypatch.delenv(FENCE_VARIABLE)
    loop_device = "/dev/loop0" if os.path.exists("/dev/loop0") else None
    lines = [
        "22 27 0:21 / /proc rw,relatime - proc proc rw",
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
        r"30 27 8:1 / /mnt/with\040space rw,relatime shared:5 - xfs /dev/sda1 rw",
        "31 27 0:40 / /nfs rw - nfs server:/export rw",
        "32 27 0:41 / /btrfs-dir rw - btrfs /tmp rw",  # source is a directory: skipped
        "garbage line",
    ]
    if loop_device:
        lines.append(f"33 27 0:42 / /btrfs rw - btrfs {loop_device} rw")
    info = tmp_path / "mountinfo"
    info.write_text("\n".join(lines) + "\n")
    mounts = local_mounts(str(info))
    names = [mount.dirname for mount in mounts]
    expected = ["/", "/mnt/with space"] + (["/btrfs"] if loop_device else [])
    assert names == expected
    assert mounts[0].devtype == "ext4" and (mounts[0].devmajor, mounts[0].devminor) == (254, 0)
    if loop_device:
        assert mounts[2].devmajor == os.major(os.stat(loop_device).st_rdev)


def test_real_mount_table_has_root_and_no_pseudo_filesystems(monkeypatch):
    monkeypatch.delenv(FENCE_VARIABLE)
    mounts = local_mounts()
    assert all(mount.dirname not in ("/proc", "/sys") for mount in mounts)
    assert all(mount.devmajor != 0 for mount in mounts)


def test_fence_hides_every_other_mount(monkeypatch):
    monkeypatch.setenv(FENCE_VARIABLE, "/")
    assert [mount.dirname for mount in local_mounts()] in ([], ["/"])
    monkeypatch.setenv(FENCE_VARIABLE, "/nonexistent")
    assert local_mounts() == []


def test_unreadable_mount_table_is_an_error(tmp_path):
    with pytest.raises(CommandError, match="failed to open mtab file"):
        local_mounts(str(tmp_path / "missing"))


# -- status, freeze without filesystems, thaw ----------------------------------------


def test_status_follows_the_state(statedir):
    ctx = make_ctx(statedir)
    assert fsfreeze.fsfreeze_status(ctx) == "thawed"
    ctx.state.set_frozen(True)
    assert fsfreeze.fsfreeze_status(ctx) == "frozen"
    validate_return(None, "guest-fsfreeze-status", "frozen")


def test_freeze_list_of_unknown_mountpoint_freezes_nothing(statedir, logging_hook, hook_log):
    ctx = make_ctx(statedir, hook=logging_hook)
    assert fsfreeze.fsfreeze_freeze_list(ctx, mountpoints=["/nonexistent"]) == 0
    assert fsfreeze.fsfreeze_status(ctx) == "thawed"
    assert not (statedir / "qga.state.isfrozen").exists()
    # The freeze hook ran; with nothing frozen there is no thaw (and no thaw hook).
    assert [call["args"] for call in hook_calls(hook_log)] == ["freeze"]


def test_hook_gets_one_argument_new_session_null_stdio_inherited_env_and_cwd(
        statedir, logging_hook, hook_log, monkeypatch, tmp_path):
    monkeypatch.setenv("QGA_HOOK_TEST", "inherited")
    monkeypatch.chdir(tmp_path)
    ctx = make_ctx(statedir, hook=logging_hook)
    fsfreeze.fsfreeze_freeze(ctx)  # no filesystem visible through the fence
    fsfreeze.fsfreeze_thaw(ctx)
    calls = hook_calls(hook_log)
    assert [call["args"] for call in calls] == ["freeze", "thaw"]
    for call in calls:
        assert call["count"] == "1"
        assert call["sid"] == call["pid"], "the hook must lead its own session"
        assert call["stdin"] == "/dev/null" and call["stdout"] == "/dev/null"
        assert call["cwd"] == str(tmp_path)
        assert call["var"] == "inherited"


def test_failing_freeze_hook_aborts_the_freeze(statedir, logging_hook, monkeypatch):
    monkeypatch.setenv("HOOK_EXIT", "7")
    ctx = make_ctx(statedir, hook=logging_hook)
    with pytest.raises(CommandError) as raised:
        fsfreeze.fsfreeze_freeze_list(ctx, mountpoints=["/nonexistent"])
    assert raised.value.desc == "fsfreeze hook has failed with status 7"
    assert fsfreeze.fsfreeze_status(ctx) == "thawed"


def test_hook_killed_by_signal(statedir, tmp_path):
    hook = write_hook(tmp_path / "hook", "kill -9 $$\n")
    ctx = make_ctx(statedir, hook=hook)
    with pytest.raises(CommandError) as raised:
        fsfreeze.fsfreeze_freeze(ctx)
    assert raised.value.desc == "fsfreeze hook has terminated abnormally"


@pytest.mark.parametrize("kind, reason", [("not-executable", "Permission denied"),
                                          ("missing", "No such file or directory")])
def test_hook_access_checked_at_each_use(statedir, tmp_path, kind, reason):
    hook = tmp_path / "hook"
    if kind == "not-executable":
        hook.write_text("#!/bin/sh\nexit 0\n")
        hook.chmod(0o644)
    ctx = make_ctx(statedir, hook=hook)
    for handler in (fsfreeze.fsfreeze_freeze, fsfreeze.fsfreeze_thaw):
        with pytest.raises(CommandError) as raised:
            handler(ctx)
        assert raised.value.desc == f"can't access fsfreeze hook '{hook}': {reason}"
    # Fixed between calls: the next use sees it.
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    assert fsfreeze.fsfreeze_thaw(ctx) == 0


def test_hook_that_cannot_be_executed_fails_with_status_1(statedir, tmp_path):
    hook = tmp_path / "hook"
    hook.write_bytes(b"\x7fELF garbage")  # executable bit, but not a program
    hook.chmod(0o755)
    ctx = make_ctx(statedir, hook=hook)
    with pytest.raises(CommandError) as raised:
        fsfreeze.fsfreeze_freeze(ctx)
    assert raised.value.desc == "fsfreeze hook has failed with status 1"


def test_hook_timeout_kills_the_hook_and_its_session(statedir, tmp_path):
    marker = tmp_path / "survivor"
    hook = write_hook(tmp_path / "hook", f"(sleep 2; touch {marker}) &\nsleep 30\n")
    ctx = make_ctx(statedir, hook=hook)
    service = ctx.service(FreezeService)
    service.hook_timeout = 0.5
    started = time.monotonic()
    with pytest.raises(CommandError) as raised:
        fsfreeze.fsfreeze_freeze(ctx)
    assert time.monotonic() - started < 5
    assert raised.value.desc == "fsfreeze hook has terminated abnormally"
    time.sleep(2.5)
    assert not marker.exists(), "the hook's background child outlived the timeout"


def test_thaw_when_not_frozen_runs_the_hook_and_returns_0(statedir, logging_hook, hook_log):
    ctx = make_ctx(statedir, hook=logging_hook)
    assert fsfreeze.fsfreeze_thaw(ctx) == 0
    assert [call["args"] for call in hook_calls(hook_log)] == ["thaw"]


def test_failing_thaw_hook_is_an_error_but_the_thaw_happened(statedir, logging_hook, monkeypatch):
    ctx = make_ctx(statedir, hook=logging_hook)
    ctx.state.set_frozen(True)  # as after a restart in frozen mode
    monkeypatch.setenv("HOOK_EXIT", "3")
    with pytest.raises(CommandError, match="fsfreeze hook has failed with status 3"):
        fsfreeze.fsfreeze_thaw(ctx)
    assert fsfreeze.fsfreeze_status(ctx) == "thawed"
    assert not (statedir / "qga.state.isfrozen").exists()


def test_close_thaws_when_frozen(statedir, logging_hook, hook_log):
    ctx = make_ctx(statedir, hook=logging_hook)
    ctx.state.set_frozen(True)
    ctx.service(FreezeService)
    ctx.close()
    assert not ctx.state.is_frozen()
    assert [call["args"] for call in hook_calls(hook_log)] == ["thaw"]


def test_close_does_nothing_when_thawed(statedir, logging_hook, hook_log):
    ctx = make_ctx(statedir, hook=logging_hook)
    ctx.service(FreezeService)
    ctx.close()
    assert hook_calls(hook_log) == []


# -- real freezing of the test loop filesystem (root) ---------------------------------


def test_freeze_and_thaw_the_loop_filesystem(statedir, loopfs, monkeypatch, logging_hook, hook_log):
    monkeypatch.setenv(FENCE_VARIABLE, loopfs.path)
    ctx = make_ctx(statedir, hook=logging_hook)
    frozen = fsfreeze.fsfreeze_freeze_list(ctx, mountpoints=[loopfs.path, loopfs.path])
    validate_return(None, "guest-fsfreeze-freeze-list", frozen)
    assert frozen == 1
    try:
        assert fsfreeze.fsfreeze_status(ctx) == "frozen"
        assert (statedir / "qga.state.isfrozen").exists()
        assert loopfs.is_frozen()
    finally:
        assert fsfreeze.fsfreeze_thaw(ctx) == 1
    assert not loopfs.is_frozen()
    assert fsfreeze.fsfreeze_status(ctx) == "thawed"
    assert not (statedir / "qga.state.isfrozen").exists()
    assert fsfreeze.fsfreeze_thaw(ctx) == 0
    assert [call["args"] for call in hook_calls(hook_log)] == ["freeze", "thaw", "thaw"]


def test_empty_mountpoint_list_freezes_nothing(statedir, loopfs, monkeypatch):
    """An empty list is a list (qemu-ga's has_mountpoints), not "everything"."""
    monkeypatch.setenv(FENCE_VARIABLE, loopfs.path)
    ctx = make_ctx(statedir)
    assert fsfreeze.fsfreeze_freeze_list(ctx, mountpoints=[]) == 0
    assert not loopfs.is_frozen()
    assert not ctx.state.is_frozen()


def test_failed_freeze_thaws_what_it_froze(statedir, loopfs, monkeypatch, tmp_path,
                                          logging_hook, hook_log):
    """A mount that cannot be opened fails the freeze after the loop fs froze."""
    ctx = make_ctx(statedir, hook=logging_hook)
    vanished = str(tmp_path / "vanished")
    # Frozen in reverse order: the loop mount first, then the one that fails.
    ctx.service(FreezeService).list_mounts = lambda: [
        FsMount(vanished, "ext4", 7, 1), FsMount(loopfs.path, "ext4", 7, 0)]
    with pytest.raises(CommandError) as raised:
        fsfreeze.fsfreeze_freeze_list(ctx, mountpoints=[loopfs.path, vanished])
    assert raised.value.desc == f"failed to open {vanished}: No such file or directory"
    assert not loopfs.is_frozen()
    assert not ctx.state.is_frozen()
    assert not (statedir / "qga.state.isfrozen").exists()
    # qemu-ga's error path is a full thaw, thaw hook included.
    assert [call["args"] for call in hook_calls(hook_log)] == ["freeze", "thaw"]


def test_auto_thaw_after_max_frozen_time(statedir, loopfs, monkeypatch, caplog):
    monkeypatch.setenv(FENCE_VARIABLE, loopfs.path)
    loop = Loop()
    try:
        ctx = make_ctx(statedir, loop=loop, max_frozen_time=0.3)
        assert fsfreeze.fsfreeze_freeze_list(ctx, mountpoints=[loopfs.path]) == 1
        assert loopfs.is_frozen()
        caplog.set_level(logging.WARNING, logger="qga.commands.fsfreeze")
        deadline = time.monotonic() + 5
        while ctx.state.is_frozen() and time.monotonic() < deadline:
            loop.run_once(max_wait=0.1)
        assert not ctx.state.is_frozen()
        assert not loopfs.is_frozen()
        assert "stayed frozen for 0.3 seconds" in caplog.text
    finally:
        loopfs.thaw()
        loop.close()


def test_thaw_cancels_the_auto_thaw_timer(statedir, loopfs, monkeypatch, logging_hook, hook_log):
    monkeypatch.setenv(FENCE_VARIABLE, loopfs.path)
    loop = Loop()
    try:
        ctx = make_ctx(statedir, hook=logging_hook, loop=loop, max_frozen_time=0.2)
        fsfreeze.fsfreeze_freeze_list(ctx, mountpoints=[loopfs.path])
        fsfreeze.fsfreeze_thaw(ctx)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            loop.run_once(max_wait=0.1)
        assert [call["args"] for call in hook_calls(hook_log)] == ["freeze", "thaw"]
    finally:
        loopfs.thaw()
        loop.close()


def test_service_built_while_frozen_arms_the_timer(statedir, tmp_path):
    (statedir / "qga.state.isfrozen").touch()
    loop = Loop()
    try:
        ctx = make_ctx(statedir, loop=loop, max_frozen_time=0.1)
        assert ctx.state.is_frozen()
        ctx.service(FreezeService)
        deadline = time.monotonic() + 3
        while ctx.state.is_frozen() and time.monotonic() < deadline:
            loop.run_once(max_wait=0.1)
        assert not ctx.state.is_frozen()
    finally:
        loop.close()


# -- fstrim ------------------------------------------------------------------------


def test_fstrim_without_filesystems(statedir):
    assert fsfreeze.fstrim(make_ctx(statedir)) == {"paths": []}


def test_fstrim_the_loop_filesystem(statedir, loopfs, monkeypatch):
    monkeypatch.setenv(FENCE_VARIABLE, loopfs.path)
    ctx = make_ctx(statedir)
    reply = fsfreeze.fstrim(ctx, minimum=1 << 20)
    validate_return(None, "guest-fstrim", reply)
    [entry] = reply["paths"]
    assert list(entry) == ["path", "trimmed", "minimum"]  # schema order, for the reply writer
    assert entry["path"] == loopfs.path
    assert entry["minimum"] >= 1 << 20
    assert isinstance(entry["trimmed"], int) and entry["trimmed"] >= 0
    assert "error" not in entry
    assert fsfreeze.fstrim(ctx)["paths"][0]["minimum"] >= 0


def test_fstrim_reports_per_path_errors(statedir, loopfs, monkeypatch):
    monkeypatch.setenv(FENCE_VARIABLE, loopfs.path)
    ctx = make_ctx(statedir)
    # A minimum larger than the filesystem: the kernel refuses with EINVAL.
    reply = fsfreeze.fstrim(ctx, minimum=1 << 40)
    validate_return(None, "guest-fstrim", reply)
    [entry] = reply["paths"]
    assert entry == {"path": loopfs.path, "error": "failed to trim: Invalid argument"}
    assert list(entry) == ["path", "error"]  # schema order, for the reply writer


def test_fstrim_time_limit(statedir, loopfs, monkeypatch):
    monkeypatch.setenv(FENCE_VARIABLE, loopfs.path)
    ctx = make_ctx(statedir)
    service = ctx.service(TrimService)
    service.timeout = 0
    [entry] = fsfreeze.fstrim(ctx)["paths"]
    # Either the worker beat the zero timeout or the path reports the limit.
    assert "trimmed" in entry or entry["error"] == "failed to trim: no result within 0 seconds"
    service._worker.join(10)
