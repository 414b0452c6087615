"""Freezing, thawing and trimming the guest's filesystems, as qemu-ga does.

Commands: guest-fsfreeze-status, guest-fsfreeze-freeze,
guest-fsfreeze-freeze-list, guest-fsfreeze-thaw and guest-fstrim.

The filesystems are the local ones in ``/proc/self/mountinfo``: a real
device number (major != 0), or btrfs, whose major is 0 but whose source is a
block device.  A freeze runs the hook with ``freeze``, builds the mount list,
enters the frozen state (the marker file, the dispatcher's gate of six
commands, the log filter: all keyed on ``ctx.state``), then issues FIFREEZE in
reverse mount order.  EOPNOTSUPP and EBUSY (a second mount of a frozen
filesystem) are skipped; any other error thaws everything and fails the
command.  A thaw issues FITHAW until it fails, counts the filesystems thawed,
leaves the frozen state and then runs the hook with ``thaw``.

Our additions, invisible on the wire:

* The hook is given :data:`HOOK_TIMEOUT` seconds.  qemu-ga waits forever, and
  while it waits the agent answers nothing, not even a thaw.  Ten minutes
  leaves room for the slow things hooks really do (flushing and locking
  databases) and still gets a wedged agent back.  A hook that overstays is
  killed with its whole session and reported as qemu-ga reports a hook killed
  by a signal.
* ``config.fsfreeze_max_frozen_time`` (seconds; 0 or None turns it off): the
  agent thaws by itself when filesystems stay frozen that long, so a host
  that dies between freeze and thaw does not leave the guest's disks frozen.
  The warning is logged after the thaw, once logging is back.
* FITRIM runs in a worker thread and the command waits at most
  :data:`TRIM_TIMEOUT` seconds for it; filesystems not trimmed by then get an
  ``error`` string in the (still successful) reply.
* Test safety fence: when the environment variable ``QGA_TEST_MOUNTPOINTS``
  is set (only tests set it), these commands see only the mountpoints it
  lists (separated by ``:``), so a test can never freeze or trim the
  filesystems of the machine running it.
"""

from __future__ import annotations

import errno as errno_codes
import fcntl
import logging
import os
import struct
from typing import List, Optional

from qga.commands import command
from qga.commands.storage import FsMount, local_mounts as storage_mounts
from qga.commands.sysutil import run_forked_helper
from qga.errors import CommandError, StateError
from qga.log import audit

log = logging.getLogger(__name__)

# <linux/fs.h>: _IOWR('X', 119, int), _IOWR('X', 120, int),
# _IOWR('X', 121, struct fstrim_range)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
FITRIM = 0xC0185879
FSTRIM_RANGE = struct.Struct("=QQQ")  # start, len, minlen (all __u64)

HOOK_TIMEOUT = 600.0
TRIM_TIMEOUT = 600.0
FENCE_VARIABLE = "QGA_TEST_MOUNTPOINTS"
MOUNTINFO = "/proc/self/mountinfo"
UINT64 = 1 << 64


# -- the mount list ----------------------------------------------------------------


def local_mounts(mountinfo: str = MOUNTINFO) -> List[FsMount]:
    """The local filesystems, in mount order, like qemu-ga's build_fs_mount_list.

    The parsing is guest-get-fsinfo's (:func:`qga.commands.storage.local_mounts`);
    this adds the test fence: with ``QGA_TEST_MOUNTPOINTS`` set (tests only),
    nothing outside those mountpoints is ever frozen or trimmed.
    """
    mounts = storage_mounts(mountinfo)
    fence = os.environ.get(FENCE_VARIABLE)
    if fence is not None:
        allowed = set(fence.split(":"))
        mounts = [mount for mount in mounts if mount.dirname in allowed]
    return mounts


def _open_mountpoint(dirname: str) -> int:
    # O_NONBLOCK: a mountpoint that is somehow a FIFO must not hang the agent.
    return os.open(dirname, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)


# -- the hook ---------------------------------------------------------------------


def run_hook(hook: Optional[str], argument: str, timeout: float = HOOK_TIMEOUT) -> None:
    """Run the fsfreeze hook with one argument, as qemu-ga does; raise on failure."""
    if not hook:
        return
    if not os.access(hook, os.X_OK):
        raise CommandError(f"can't access fsfreeze hook '{hook}': {_access_error(hook)}")
    audit(f"executing fsfreeze hook with arg '{argument}'")
    status = run_forked_helper([hook, argument], hook, timeout=timeout)
    if status.timed_out:
        log.warning("fsfreeze hook '%s %s' did not finish within %g seconds; killed it",
                    hook, argument, timeout)
    if not status.exited:
        raise CommandError("fsfreeze hook has terminated abnormally")
    if status.code:
        raise CommandError(f"fsfreeze hook has failed with status {status.code}")


def _access_error(path: str) -> str:
    """The strerror() that access(X_OK) would have set."""
    try:
        os.stat(path)
    except OSError as error:
        return os.strerror(error.errno)
    return os.strerror(errno_codes.EACCES)


# -- the service ------------------------------------------------------------------


class FreezeService:
    """Freezes and thaws filesystems and owns the auto-thaw timer.

    ``close()`` thaws when the agent stops while frozen.  Built while the
    state is already frozen (an agent restarted in frozen mode), it arms the
    auto-thaw timer at once, so the agent should build it at start-up then.
    """

    def __init__(self, ctx) -> None:
        self._ctx = ctx
        self._timer = None
        self.hook_timeout = HOOK_TIMEOUT
        # Where the filesystems come from; tests narrow it further than the fence.
        self.list_mounts = local_mounts
        if self.is_frozen():
            self._arm_timer()

    # -- state ------------------------------------------------------------------

    def is_frozen(self) -> bool:
        return bool(self._ctx.state.is_frozen())

    def _set_frozen(self, frozen: bool) -> None:
        try:
            self._ctx.state.set_frozen(frozen)
        except StateError as error:
            # qemu-ga carries on too: the in-memory state still gates commands.
            log.warning("%s", error)

    def _hook(self) -> Optional[str]:
        return getattr(self._ctx.config, "fsfreeze_hook", None)

    # -- commands ---------------------------------------------------------------

    def status(self) -> str:
        return "frozen" if self.is_frozen() else "thawed"

    def freeze(self, mountpoints: Optional[List[str]] = None) -> int:
        audit("guest-fsfreeze called")
        run_hook(self._hook(), "freeze", self.hook_timeout)
        mounts = self.list_mounts()
        # From here on the agent must not write to disk: a write to a frozen
        # filesystem would block the agent itself.
        self._set_frozen(True)
        try:
            frozen = self._freeze_mounts(mounts, mountpoints)
        except CommandError:
            self._thaw_after_failure()
            raise
        if frozen == 0:
            self._set_frozen(False)
        else:
            self._arm_timer()
        return frozen

    def thaw(self) -> int:
        thawed = self._thaw_mounts()
        self._cancel_timer()
        self._set_frozen(False)
        audit("guest-fsthaw called")
        run_hook(self._hook(), "thaw", self.hook_timeout)
        return thawed

    def close(self) -> None:
        """Thaw on the way out if filesystems are still frozen."""
        self._cancel_timer()
        if self.is_frozen():
            try:
                self.thaw()
            except CommandError as error:
                log.warning("failed to clean up frozen filesystems: %s", error.desc)

    # -- the ioctls -------------------------------------------------------------

    @staticmethod
    def _freeze_mounts(mounts: List[FsMount], mountpoints: Optional[List[str]]) -> int:
        wanted = None if mountpoints is None else set(mountpoints)
        frozen = 0
        for mount in reversed(mounts):
            if wanted is not None and mount.dirname not in wanted:
                continue
            try:
                fd = _open_mountpoint(mount.dirname)
            except OSError as error:
                raise CommandError(f"failed to open {mount.dirname}: {os.strerror(error.errno)}") from None
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as error:
                # EOPNOTSUPP: this filesystem cannot freeze; EBUSY: it is
                # already frozen through another of its mounts.
                if error.errno not in (errno_codes.EOPNOTSUPP, errno_codes.EBUSY):
                    raise CommandError(
                        f"failed to freeze {mount.dirname}: {os.strerror(error.errno)}") from None
            else:
                frozen += 1
            finally:
                os.close(fd)
        return frozen

    def _thaw_mounts(self) -> int:
        thawed = 0
        for mount in self.list_mounts():
            try:
                fd = _open_mountpoint(mount.dirname)
            except OSError:
                continue
            try:
                # Each FIFREEZE needs its own FITHAW; the last one that
                # succeeds is the one that thawed the filesystem.
                thawed_once = False
                while True:
                    try:
                        fcntl.ioctl(fd, FITHAW, 0)
                    except OSError:
                        break
                    thawed_once = True
                thawed += thawed_once
            finally:
                os.close(fd)
        return thawed

    def _thaw_after_failure(self) -> None:
        try:
            self.thaw()
        except CommandError as error:
            log.warning("thaw after a failed freeze: %s", error.desc)

    # -- the auto-thaw timer ----------------------------------------------------

    def _max_frozen_time(self) -> float:
        limit = getattr(self._ctx.config, "fsfreeze_max_frozen_time", None)
        return float(limit) if limit else 0.0

    def _arm_timer(self) -> None:
        limit = self._max_frozen_time()
        loop = self._ctx.loop
        if limit <= 0 or loop is None:
            return
        self._cancel_timer()
        self._timer = loop.call_later(limit, lambda: self._auto_thaw(limit))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _auto_thaw(self, limit: float) -> None:
        self._timer = None
        if not self.is_frozen():
            return
        failure = None
        try:
            thawed = self.thaw()
        except CommandError as error:
            thawed, failure = None, error.desc
        # Logged only now: while frozen, logging is suspended.
        log.warning("filesystems stayed frozen for %g seconds (fsfreeze-max-frozen-time); "
                    "thawed them%s", limit,
                    f" ({thawed} filesystems)" if failure is None else f", but: {failure}")


# -- trimming ---------------------------------------------------------------------


class TrimService:
    """Runs FITRIM over the local filesystems in a worker thread, bounded in time."""

    def __init__(self, ctx) -> None:
        self._ctx = ctx
        self._worker = None
        self.timeout = TRIM_TIMEOUT

    def trim(self, minimum: Optional[int]) -> dict:
        import threading

        if self._worker is not None and self._worker.is_alive():
            raise CommandError("a previous guest-fstrim is still running")
        audit("guest-fstrim called")
        mounts = local_mounts()
        job = _TrimJob(mounts, 0 if minimum is None else minimum)
        self._worker = threading.Thread(target=job.run, name="fstrim", daemon=True)
        self._worker.start()
        self._worker.join(self.timeout)
        results = job.collect(self.timeout)
        # qemu-ga prepends each result: the reply lists mounts in reverse order.
        return {"paths": list(reversed(results))}


class _TrimJob:
    """The worker's side: trims mounts in order until done or abandoned."""

    def __init__(self, mounts: List[FsMount], minimum: int) -> None:
        import threading

        self._mounts = mounts
        self._minimum = minimum % UINT64
        self._lock = threading.Lock()
        self._outcomes: List[Optional[dict]] = [None] * len(mounts)
        self._abandoned = False

    def run(self) -> None:
        for index, mount in enumerate(self._mounts):
            with self._lock:
                if self._abandoned:
                    return
            outcome = self._trim_one(mount.dirname)
            with self._lock:
                self._outcomes[index] = outcome

    def collect(self, timeout: float) -> List[dict]:
        with self._lock:
            self._abandoned = True
            results = []
            for mount, outcome in zip(self._mounts, self._outcomes):
                if outcome is None:
                    outcome = {"error": f"failed to trim: no result within {timeout:g} seconds"}
                results.append(_trim_result(_reply_text(mount.dirname), outcome))
            return results

    def _trim_one(self, dirname: str) -> dict:
        try:
            fd = _open_mountpoint(dirname)
        except OSError as error:
            return {"error": f"failed to open: {os.strerror(error.errno)}"}
        try:
            request = bytearray(FSTRIM_RANGE.pack(0, UINT64 - 1, self._minimum))
            fcntl.ioctl(fd, FITRIM, request, True)
        except OSError as error:
            if error.errno in (errno_codes.ENOTTY, errno_codes.EOPNOTSUPP):
                return {"error": "trim not supported"}
            return {"error": f"failed to trim: {os.strerror(error.errno)}"}
        finally:
            os.close(fd)
        _, trimmed, minimum = FSTRIM_RANGE.unpack(request)
        return {"trimmed": _as_int64(trimmed), "minimum": _as_int64(minimum)}


def _trim_result(path: str, outcome: dict) -> dict:
    # Schema order: the reply writer turns it into qemu-ga's QDict order.
    if "error" in outcome:
        return {"path": path, "error": outcome["error"]}
    return {"path": path, "trimmed": outcome["trimmed"], "minimum": outcome["minimum"]}


def _as_int64(value: int) -> int:
    return value - UINT64 if value >= 1 << 63 else value


def _reply_text(path: str) -> str:
    # Paths that are not UTF-8 go out with U+FFFD, as qemu-ga's encoder does.
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# -- the commands -----------------------------------------------------------------


@command("guest-fsfreeze-status")
def fsfreeze_status(ctx):
    return ctx.service(FreezeService).status()


@command("guest-fsfreeze-freeze")
def fsfreeze_freeze(ctx):
    return ctx.service(FreezeService).freeze()


@command("guest-fsfreeze-freeze-list")
def fsfreeze_freeze_list(ctx, mountpoints=None):
    return ctx.service(FreezeService).freeze(mountpoints)


@command("guest-fsfreeze-thaw")
def fsfreeze_thaw(ctx):
    return ctx.service(FreezeService).thaw()


@command("guest-fstrim")
def fstrim(ctx, minimum=None):
    return ctx.service(TrimService).trim(minimum)
