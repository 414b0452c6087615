"""Host commands' side effects: power, screen lock, log-off, single sign-on, lifecycle hooks.

The extension runs unprivileged, and shutting down, suspending, locking
every session, ending a session or dropping the page cache need root.  The
original ran root-owned wrapper scripts through sudo or consolehelper; here
the core does each as a narrow *primitive* (``qga.ext.wire``), allowed by a
capability in the manifest.  The primitives, their arguments and what the
core does for them:

==================  ==================================================  ===============
primitive           arguments                                           capability
==================  ==================================================  ===============
``shutdown``        ``mode``: ``"powerdown"`` | ``"reboot"``,            ``power``
                    ``delay``: whole minutes (0..1440),
                    ``message``: text (at most 1024 characters);
                    runs ``shutdown -h|-r +<delay> <message>``
``suspend``         ``state``: ``"disk"`` | ``"mem"``; suspends as        ``power``
                    guest-suspend-disk / guest-suspend-ram do
``drop-caches``     none; writes ``3`` to ``/proc/sys/vm/drop_caches``    ``power``
``lock-sessions``   none; ``loginctl lock-sessions``                      ``sessions``
``log-off``         none; ends the session active on ``seat0``            ``sessions``
                    (``loginctl terminate-session <its id>``)
==================  ==================================================  ===============

Each answers ``{}`` or an error; none returns data.  With the setting
``privileged_actions = "direct"`` the same commands run here instead (for
an agent that runs as root outside qga, or commands wrapped with sudo).

The shutdown message keeps the original's literal double quotes around it
(it passed ``"\\"%s\\"" % message`` as one argument), so the broadcast text users
see is the same.

``login`` goes to the single sign-on module shipped beside this package
(``sso.py``) when it is present: ``sso.handle_login(credentials, context)``
with ``credentials = {"username": ..., "password": ...}`` as VDSM sent them
and, as the context, the SDK's :class:`Extension` (``loop``,
``primitive()``, ``on_stop()``, ``emit()``, ``log()``; the module may keep
its own state on it).
"""

from __future__ import annotations

import importlib
import logging
import subprocess
from typing import Any, Callable, Dict, List, Optional, Sequence

from .config import Config
from .hooks import HookRunner

log = logging.getLogger("ovirt_agent.actions")

POLL_INTERVAL = 0.1
DIRECT_TIMEOUT = 60.0

#: The primitives this extension asks the core for: name -> the capability that allows it.
PRIMITIVES = {
    "shutdown": "power",
    "suspend": "power",
    "drop-caches": "power",
    "lock-sessions": "sessions",
    "log-off": "sessions",
}


class Actions:
    """The side effects the logic asks for, through the core (or directly)."""

    def __init__(self, config: Config, loop: Any, extension: Any = None,
                 hooks: Optional[HookRunner] = None,
                 sso_loader: Callable[[], Any] = lambda: importlib.import_module("sso")):
        self.config = config
        self.loop = loop
        self.extension = extension
        self.hooks = hooks or HookRunner(loop, config.hooks_dir, config.hook_timeout,
                                         self._builtin_hooks())
        self._sso_loader = sso_loader
        self.outcomes: List[tuple] = []   # (what, error or None), for logs and tests

    def _builtin_hooks(self) -> Dict[str, Dict[str, Callable[[Callable[[], None]], None]]]:
        if not self.config.flush_caches:
            return {}
        flush = {"55_flush-caches": self.drop_caches}
        return {"before_migration": dict(flush), "before_hibernation": dict(flush)}

    # -- what the logic calls --

    def shutdown(self, delay_minutes: int, message: str, reboot: bool) -> None:
        quoted = f'"{message}"'
        self._privileged("shutdown", {"mode": "reboot" if reboot else "powerdown",
                                      "delay": min(delay_minutes, 1440),
                                      "message": quoted[:1024]},
                         ["shutdown", "-r" if reboot else "-h", f"+{delay_minutes}", quoted])

    def hibernate(self, state: str) -> None:
        self._privileged("suspend", {"state": state},
                         ["systemctl", "hibernate" if state == "disk" else "suspend"])

    def lock_screen(self) -> None:
        self._privileged("lock-sessions", {}, ["loginctl", "lock-sessions"])

    def log_off(self) -> None:
        if self.config.privileged_actions == "direct":
            session = _active_session()
            if session is None:
                log.info("log-off: no active session on seat0")
                return
            self._spawn(["loginctl", "terminate-session", session], "log-off")
            return
        self._privileged("log-off", {}, [])

    def drop_caches(self, done: Callable[[], None] = lambda: None) -> None:
        if self.config.privileged_actions == "direct":
            try:
                with open("/proc/sys/vm/drop_caches", "w") as stream:
                    stream.write("3\n")
                self.outcomes.append(("drop-caches", None))
            except OSError as error:
                log.warning("drop-caches: %s", error.strerror)
                self.outcomes.append(("drop-caches", error.strerror))
            done()
            return
        self._primitive("drop-caches", {}, done)

    def login(self, credentials: Dict[str, str]) -> None:
        try:
            sso = self._sso_loader()
        except ImportError:
            log.warning("login: single sign-on is not part of this bundle; ignored")
            return
        if self.extension is None:
            log.error("login: no core connection for single sign-on; ignored")
            return
        sso.handle_login(credentials, self.extension)

    def start_sso(self) -> None:
        """Let the single sign-on module set up at start (the original owned its bus
        name from the start); nothing when the module is absent."""
        try:
            sso = self._sso_loader()
        except ImportError:
            return
        start = getattr(sso, "start", None)
        if start is not None and self.extension is not None:
            start(self.extension)

    def lifecycle(self, event: str, done: Callable[[], None]) -> None:
        self.hooks.run(event, done)

    # -- how --

    def _privileged(self, primitive: str, arguments: Dict[str, Any],
                    argv: Sequence[str]) -> None:
        if self.config.privileged_actions == "direct":
            self._spawn(argv, primitive)
        else:
            self._primitive(primitive, arguments)

    def _primitive(self, name: str, arguments: Dict[str, Any],
                   done: Callable[[], None] = lambda: None) -> None:
        if self.extension is None:
            log.error("%s: no core connection to ask", name)
            self.outcomes.append((name, "no core connection"))
            done()
            return

        def answered(_value: Any, error: Optional[str]) -> None:
            if error is not None:
                log.error("%s: the core refused or failed: %s", name, error)
            self.outcomes.append((name, error))
            done()

        self.extension.primitive(name, arguments, answered)

    def _spawn(self, argv: Sequence[str], what: str) -> None:
        """Start ``argv`` without waiting; its exit is logged from a timer."""
        try:
            child = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as error:
            log.error("%s: cannot run %s: %s", what, argv[0], error)
            self.outcomes.append((what, str(error)))
            return
        deadline = self.loop.time() + DIRECT_TIMEOUT

        def poll() -> None:
            status = child.poll()
            if status is None:
                if self.loop.time() < deadline:
                    self.loop.call_later(POLL_INTERVAL, poll)
                    return
                child.kill()
                status = child.wait()
            if status != 0:
                log.error("%s: %s exited with %d", what, argv[0], status)
            self.outcomes.append((what, None if status == 0 else f"exit status {status}"))

        self.loop.call_later(POLL_INTERVAL, poll)


def _active_session() -> Optional[str]:
    try:
        result = subprocess.run(["loginctl", "show-seat", "seat0", "-p", "ActiveSession",
                                 "--value"], stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    session = result.stdout.decode("utf-8", "replace").strip()
    return session if result.returncode == 0 and session else None
