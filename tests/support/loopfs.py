"""A throwaway ext4 filesystem on a loop device: the only thing tests may freeze.

Freezing a real filesystem of the machine running the tests (``/`` above all)
would hang it, so every freezing test goes through :class:`LoopFilesystem`
and :func:`freeze_list_request`: the request names the loop mountpoint and
nothing else, and the helper refuses any mountpoint that is not a loop-device
mount made by this module.  Tests that start our agent also set
``QGA_TEST_MOUNTPOINTS`` (see :func:`fence_env`), so even a broken
``mountpoints`` filter in the agent could not reach another filesystem.

Cleanup always thaws first (``fsfreeze --unfreeze``, ignoring "not frozen"),
then unmounts and detaches, so a failed test never leaves a frozen
filesystem or a blocked writer behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Optional

import pytest

FENCE_VARIABLE = "QGA_TEST_MOUNTPOINTS"


def loop_support_reason() -> Optional[str]:
    """Why loop filesystems cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (mount, losetup, FIFREEZE)"
    for tool in ("mkfs.ext4", "mount", "umount", "fsfreeze"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no loop device support (/dev/loop-control is missing)"
    return None


class LoopFilesystem:
    """mkfs.ext4 on an image file, loop-mounted under a fresh temporary directory."""

    def __init__(self, size_mb: int = 32):
        self.base = Path(tempfile.mkdtemp(prefix="qga-loopfs-"))
        self.image = self.base / "image"
        self.mountpoint = self.base / "mnt"
        self.size_mb = size_mb
        self.mounted = False

    def create(self) -> "LoopFilesystem":
        with open(self.image, "wb") as image:
            image.truncate(self.size_mb << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.mountpoint.mkdir()
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mountpoint)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.mounted = True
        assert self.is_loop_mount(str(self.mountpoint)), "mounted, but not as a loop device?"
        return self

    @property
    def path(self) -> str:
        return str(self.mountpoint)

    @staticmethod
    def is_loop_mount(mountpoint: str) -> bool:
        """Whether ``mountpoint`` is mounted from /dev/loopN under our temp prefix."""
        if "/qga-loopfs-" not in mountpoint:
            return False
        with open("/proc/self/mountinfo") as table:
            for line in table:
                fields = line.split()
                separator = fields.index("-", 6)
                if fields[4] == mountpoint and fields[separator + 2].startswith("/dev/loop"):
                    return True
        return False

    def thaw(self) -> None:
        """Thaw with util-linux, whatever state the filesystem is in."""
        if self.mounted:
            subprocess.run(["fsfreeze", "--unfreeze", self.path],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def is_frozen(self) -> bool:
        """Ask the kernel: a second FIFREEZE fails with EBUSY only on a frozen fs."""
        probe = subprocess.run(["fsfreeze", "--freeze", self.path],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if probe.returncode == 0:
            self.thaw()  # it was thawed; undo our probe
            return False
        return True

    def destroy(self) -> None:
        self.thaw()
        if self.mounted:
            subprocess.run(["umount", self.path], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            self.mounted = False
        shutil.rmtree(self.base, ignore_errors=True)


def freeze_list_request(loopfs: LoopFilesystem) -> dict:
    """The only freezing request tests send: freeze-list of the loop mountpoint."""
    if not LoopFilesystem.is_loop_mount(loopfs.path):
        raise AssertionError(f"refusing to freeze {loopfs.path}: not a test loop mount")
    return {"execute": "guest-fsfreeze-freeze-list", "arguments": {"mountpoints": [loopfs.path]}}


def fence_env(loopfs: Optional[LoopFilesystem], base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """An environment whose agent sees only the loop mount (or nothing at all)."""
    env = dict(os.environ if base is None else base)
    env[FENCE_VARIABLE] = loopfs.path if loopfs is not None else "/nonexistent/qga-test-fence"
    return env


@pytest.fixture
def loopfs():
    """A mounted test loop filesystem; skips with the reason when unavailable."""
    reason = loop_support_reason()
    if reason:
        pytest.skip(reason)
    filesystem = LoopFilesystem()
    try:
        filesystem.create()
    except (subprocess.CalledProcessError, AssertionError) as error:
        filesystem.destroy()
        detail = getattr(error, "stderr", b"") or b""
        pytest.skip(f"cannot set up a loop filesystem: {error} {detail.decode(errors='replace')}")
    yield filesystem
    filesystem.destroy()
