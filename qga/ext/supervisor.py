"""Keeping one extension running: start, health, restarts with backoff, crash loops, stop.

A :class:`Supervisor` drives one extension's process (:mod:`qga.ext.launch`)
on the agent's loop.  Its states, as ``guest-extension-status`` shows them::

    stopped --start()--> starting --ready()--> running
       ^                    |                     |
       |                 exit or no ready      exit
       |                 in ready-timeout         |
       |                    v                     v
       +--stop()------- restarting <--------------+   (backoff: 0.25 s, doubling, 30 s at most)
                            |
                   5 failures in 60 s
                            v
                          failed        (until guest-extension-start or an agent restart)

``stopping`` is the time between SIGTERM and the end of the process tree
(SIGKILL after :attr:`Supervisor.grace` seconds).  A process that stayed
ready for :attr:`Supervisor.stable_after` seconds starts its failure count
afresh.

**Health checks.**  ``start(health=callback)`` is the install pipeline's:
the process has one chance.  ``callback(None)`` once it says ready within
the manifest's ``ready-timeout``; ``callback("why")`` when it exits or stays
silent first, and then it is *not* restarted (the installer rolls back).
The callback runs from the loop, after the supervisor's state has settled.

**Frozen filesystems.**  Starting a process may create a user (writes to
``/etc``) and the extension itself may write: while the guest is frozen a
start waits, polled every :data:`FROZEN_POLL` seconds, until the thaw.

The supervisor owns the process and its output (each line goes to the
agent's log under the extension's name, rate limited; the last lines are
kept for the status).  What surrounds it (the proxy socket, the settings
file) is prepared by ``prepare()``, the callback that returns the
:class:`~qga.ext.launch.LaunchSpec` just before each start.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Deque, List, Optional

from qga.errors import ExtensionError
from qga.ext import launch

log = logging.getLogger(__name__)

FROZEN_POLL = 0.25
OUTPUT_LINE_MAX = 4096
OUTPUT_TAIL_LINES = 20
OUTPUT_LINES_PER_SECOND = 20
OUTPUT_READ_BUDGET = 256 * 1024  # per wake-up; level-triggered, the rest comes next time

STOPPED, STARTING, RUNNING, STOPPING, RESTARTING, FAILED = (
    "stopped", "starting", "running", "stopping", "restarting", "failed")

HealthCallback = Callable[[Optional[str]], None]


class Supervisor:
    """Runs one extension; see the module docstring for the life cycle."""

    backoff_first = 0.25
    backoff_max = 30.0
    crash_window = 60.0
    crash_limit = 5
    stable_after = 30.0
    grace = 3.0

    def __init__(self, name: str, loop, prepare: Callable[[], launch.LaunchSpec],
                 ready_timeout: float, is_frozen: Callable[[], bool],
                 use_systemd: bool = False,
                 on_change: Optional[Callable[["Supervisor"], None]] = None):
        self.name = name
        self.loop = loop
        self.prepare = prepare
        self.ready_timeout = ready_timeout
        self.is_frozen = is_frozen
        self.use_systemd = use_systemd
        self.on_change = on_change
        self.state = STOPPED
        self.process: Optional[launch.Launched] = None
        self.restarts = 0
        self.last_error: Optional[str] = None
        self.started_at: Optional[float] = None    # wall clock, for the status
        self.output_tail: Deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self._failures: List[float] = []
        self._ready_at: Optional[float] = None
        self._health: Optional[HealthCallback] = None
        self._timer = None        # the ready timeout, a backoff, a frozen poll or the grace
        self._exit_poll = None    # without pidfds: poll for the exit
        self._stopped_callbacks: List[Callable[[], None]] = []
        self._restart_after_exit = False  # stopping after a ready timeout: then a restart
        self._output = bytearray()
        self._output_budget = (0.0, 0)  # (second, lines logged in it)

    # -- commands ------------------------------------------------------------------------

    def start(self, health: Optional[HealthCallback] = None) -> None:
        """Start (or restart after a failure); a running process is left alone."""
        if self.state in (STARTING, RUNNING) and health is None:
            return
        if self.state in (STARTING, RUNNING, STOPPING):
            raise ExtensionError(f"extension {self.name} is {self.state}")
        self._cancel_timer()
        self._failures = []
        self._health = health
        self._spawn()

    def stop(self, callback: Optional[Callable[[], None]] = None) -> None:
        """Stop for good (no restart); ``callback()`` once the whole tree is gone."""
        if callback is not None:
            self._stopped_callbacks.append(callback)
        self._cancel_timer()
        self._restart_after_exit = False
        if self.state in (STARTING, RUNNING):
            self._fail_health("stopped before it said it was ready")
            self._set_state(STOPPING)
            self.process.terminate()
            self._timer = self.loop.call_later(self.grace, self._kill)
        elif self.state != STOPPING:
            self._set_state(STOPPED)
            self._run_stopped_callbacks()

    def ready(self) -> None:
        """The extension said ``ready`` (from the proxy's control connection)."""
        if self.state != STARTING:
            return
        self._cancel_timer()
        self._ready_at = time.monotonic()
        self.last_error = None
        self._set_state(RUNNING)
        health, self._health = self._health, None
        if health is not None:
            self.loop.call_later(0, lambda: health(None))

    def fail(self, reason: str) -> None:
        """The extension misbehaved (broke the protocol): kill it now; a failure like a crash."""
        if self.state not in (STARTING, RUNNING):
            return
        self._cancel_timer()
        self.last_error = reason
        self._restart_after_exit = not self._fail_health(reason)
        self._set_state(STOPPING)
        self.process.kill()
        self._timer = self.loop.call_later(self.grace, self._kill)

    def close(self) -> None:
        """At agent exit: SIGTERM, a short wait, SIGKILL; synchronous."""
        self._cancel_timer()
        self._health = None
        process = self.process
        if process is None:
            self._set_state(STOPPED)
            return
        process.terminate()
        deadline = time.monotonic() + min(self.grace, 2.0)
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.kill()
        deadline = time.monotonic() + 2.0
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self._forget_process()
        self._set_state(STOPPED)

    # -- the status ------------------------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        return None if self.process is None else self.process.pid

    def owns(self, pid: int, uid: int) -> bool:
        return self.process is not None and self.process.owns(pid, uid)

    # -- starting ------------------------------------------------------------------------------

    def _spawn(self) -> None:
        if self.is_frozen():
            self._set_state(RESTARTING)
            self._timer = self.loop.call_later(FROZEN_POLL, self._spawn)
            return
        self._timer = None
        try:
            spec = self.prepare()
            self.process = launch.launch(spec, self.use_systemd)
        except ExtensionError as error:
            self._failed_start(str(error))
            return
        self.started_at = time.time()
        self._ready_at = None
        self._watch(self.process)
        self._set_state(STARTING)
        self._timer = self.loop.call_later(self.ready_timeout, self._ready_timed_out)
        log.info("extension %s started (pid %d)", self.name, self.process.pid)

    def _watch(self, process: launch.Launched) -> None:
        if process.exit_fd is not None:
            self.loop.add_reader(process.exit_fd, lambda _events: self._check_exit())
        else:
            self._poll_exit()
        if process.output_fd is not None:
            self.loop.add_reader(process.output_fd, lambda _events: self._read_output())

    def _poll_exit(self) -> None:
        self._exit_poll = self.loop.call_later(0.1, self._poll_exit)
        self._check_exit()

    def _ready_timed_out(self) -> None:
        self._timer = None
        message = f"did not say it was ready within {self.ready_timeout:g} s"
        log.warning("extension %s %s", self.name, message)
        self.last_error = message
        self._restart_after_exit = not self._fail_health(message)
        self._set_state(STOPPING)
        self.process.terminate()
        self._timer = self.loop.call_later(self.grace, self._kill)

    def _failed_start(self, message: str) -> None:
        log.error("extension %s: %s", self.name, message)
        self.last_error = message
        if self._fail_health(message):
            self._set_state(FAILED)
            return
        self._schedule_restart()

    # -- the end of a process ------------------------------------------------------------------

    def _check_exit(self) -> None:
        process = self.process
        if process is None or process.poll() is None:
            return
        self._read_output()
        status = process.returncode
        was = self.state
        self._forget_process()
        # The rest of its tree goes with it.
        process.kill()
        self._cancel_timer()
        if was == STOPPING:
            restart, self._restart_after_exit = self._restart_after_exit, False
            if restart:
                self._schedule_restart()
            else:
                log.info("extension %s stopped", self.name)
                self._set_state(STOPPED)
                self._run_stopped_callbacks()
            return
        message = _describe_exit(status)
        if self.output_tail:
            message += f" (last output: {self.output_tail[-1]})"
        self.last_error = message
        log.warning("extension %s %s", self.name, message)
        if self._fail_health(message):
            self._set_state(FAILED)
            return
        self._schedule_restart()

    def _kill(self) -> None:
        self._timer = None
        if self.process is not None:
            log.warning("extension %s did not stop within %g s: killing it", self.name,
                        self.grace)
            self.process.kill()

    def _schedule_restart(self) -> None:
        now = time.monotonic()
        if self._ready_at is not None and now - self._ready_at >= self.stable_after:
            self._failures = []
        self._failures = [when for when in self._failures if now - when < self.crash_window]
        self._failures.append(now)
        if len(self._failures) >= self.crash_limit:
            message = (f"gave up after {len(self._failures)} failures within"
                       f" {self.crash_window:g} s")
            log.error("extension %s %s (last: %s)", self.name, message, self.last_error)
            self.last_error = f"{message}; last: {self.last_error}"
            self._set_state(FAILED)
            return
        delay = min(self.backoff_first * 2 ** (len(self._failures) - 1), self.backoff_max)
        self.restarts += 1
        self._set_state(RESTARTING)
        self._timer = self.loop.call_later(delay, self._spawn)

    def _fail_health(self, message: str) -> bool:
        """Report a failed health check; True if there was one (then: no restart).

        The callback runs from the loop, once this supervisor's state is settled.
        """
        health, self._health = self._health, None
        if health is None:
            return False
        self.loop.call_later(0, lambda: health(message))
        return True

    def _forget_process(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if self._exit_poll is not None:
            self._exit_poll.cancel()
            self._exit_poll = None
        for fd in (process.exit_fd, process.output_fd):
            if fd is not None:
                self.loop.remove(fd)
        if self._output:
            self._log_output_line(bytes(self._output))
            self._output.clear()
        process.close()

    def _run_stopped_callbacks(self) -> None:
        callbacks, self._stopped_callbacks = self._stopped_callbacks, []
        for callback in callbacks:
            callback()

    # -- output --------------------------------------------------------------------------------

    def _read_output(self) -> None:
        process = self.process
        if process is None or process.output_fd is None:
            return
        import os

        budget = OUTPUT_READ_BUDGET
        while budget > 0:
            try:
                data = os.read(process.output_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.loop.remove(process.output_fd)
                return
            budget -= len(data)
            self._output += data
            while True:
                end = self._output.find(b"\n")
                if end < 0:
                    break
                self._log_output_line(bytes(self._output[:end]))
                del self._output[:end + 1]
            if len(self._output) > OUTPUT_LINE_MAX:
                self._log_output_line(bytes(self._output[:OUTPUT_LINE_MAX]))
                self._output.clear()

    def _log_output_line(self, raw: bytes) -> None:
        line = raw[:OUTPUT_LINE_MAX].decode("utf-8", "replace").rstrip()
        if not line:
            return
        self.output_tail.append(line)
        second = int(time.monotonic())
        current, count = self._output_budget
        count = count + 1 if current == second else 1
        self._output_budget = (second, count)
        if count <= OUTPUT_LINES_PER_SECOND:
            log.warning("extension %s: %s", self.name, line)
        elif count == OUTPUT_LINES_PER_SECOND + 1:
            log.warning("extension %s: more output this second is not logged", self.name)

    # -- helpers ---------------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change(self)


def _describe_exit(status: Optional[int]) -> str:
    if status is None:
        return "ended"
    if status < 0:
        import signal

        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"
