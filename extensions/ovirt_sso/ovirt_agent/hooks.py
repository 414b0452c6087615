"""Lifecycle hooks: ``<hooks_dir>/<event>/*`` run one after the other, in name order.

The original ran every executable in ``/etc/ovirt-guest-agent/hooks.d/<event>/``
(``before_migration``, ``after_migration``, ``before_hibernation``,
``after_hibernation``) sorted by name, logged non-zero exits, and then
answered ``completion``.  The same here, on the extension's loop instead of
a blocked listener thread: each hook is a child process polled from a timer
and killed after ``hook_timeout`` seconds; events that arrive while hooks run
wait their turn.  *Built-in* hooks (a name and a callable, such as the
original's ``55_flush-caches``) take their place in the same name order.

Hooks run as the extension's own (unprivileged) user, with a minimal
environment and the hook's directory as working directory.
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import Any, Callable, Dict, List, Optional, Tuple

Done = Callable[[], None]
Builtin = Callable[[Done], None]

POLL_INTERVAL = 0.05

log = logging.getLogger("ovirt_agent.hooks")


class HookRunner:
    """Runs the hooks of one event at a time on ``loop`` (an :class:`qga.ext.sdk.Loop`)."""

    def __init__(self, loop: Any, hooks_dir: str, timeout: float,
                 builtins: Optional[Dict[str, Dict[str, Builtin]]] = None):
        self.loop = loop
        self.hooks_dir = hooks_dir
        self.timeout = timeout
        self.builtins = builtins or {}      # event -> {name: callable(done)}
        self._queue: List[Tuple[str, Done]] = []
        self._busy = False
        self.history: List[Tuple[str, str, Optional[int]]] = []   # (event, hook, exit status)

    def run(self, event: str, done: Done) -> None:
        """Run ``event``'s hooks, then ``done()`` (whatever the hooks' outcome)."""
        self._queue.append((event, done))
        if not self._busy:
            self._next_event()

    def _next_event(self) -> None:
        if not self._queue:
            self._busy = False
            return
        self._busy = True
        event, done = self._queue.pop(0)
        steps = self._steps(event)
        self._run_steps(event, steps, done)

    def _steps(self, event: str) -> List[Tuple[str, Any]]:
        steps: Dict[str, Any] = dict(self.builtins.get(event, {}))
        directory = os.path.join(self.hooks_dir, event)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            names = []
        except OSError as error:
            log.warning("hooks of %s: %s", event, error.strerror)
            names = []
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                steps[name] = path
        return sorted(steps.items())

    def _run_steps(self, event: str, steps: List[Tuple[str, Any]], done: Done) -> None:
        if not steps:
            self._finish(done)
            return
        name, step = steps[0]
        rest = steps[1:]

        def after() -> None:
            self._run_steps(event, rest, done)

        if callable(step):
            self.history.append((event, name, None))
            try:
                step(lambda: self.loop.call_soon(after))
            except Exception:
                log.exception("built-in hook %s of %s failed", name, event)
                self.loop.call_soon(after)
            return
        self._spawn(event, name, step, after)

    def _spawn(self, event: str, name: str, path: str, after: Done) -> None:
        try:
            child = subprocess.Popen([path], cwd=os.path.dirname(path),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                          "LC_ALL": "C"})
        except OSError as error:
            log.error("hook %s of %s cannot run: %s", name, event, error)
            self.history.append((event, name, None))
            self.loop.call_soon(after)
            return
        deadline = self.loop.time() + self.timeout

        def poll() -> None:
            status = child.poll()
            if status is None and self.loop.time() < deadline:
                self.loop.call_later(POLL_INTERVAL, poll)
                return
            if status is None:
                log.error("hook %s of %s still runs after %s s: killed", name, event,
                          self.timeout)
                try:
                    os.killpg(child.pid, 9)
                except OSError:
                    pass
                status = child.wait()
            elif status != 0:
                log.warning("hook %s of %s exited with %d", name, event, status)
            self.history.append((event, name, status))
            after()

        self.loop.call_later(POLL_INTERVAL, poll)

    def _finish(self, done: Done) -> None:
        try:
            done()
        finally:
            self._next_event()
