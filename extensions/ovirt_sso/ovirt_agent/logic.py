"""What the agent sends and when, and what it does with host commands (sans-IO).

:class:`AgentLogic` is the original ``AgentLogicBase`` without threads or
sockets: the runner feeds it host lines (:meth:`~AgentLogic.handle_line`),
clock ticks (:meth:`~AgentLogic.tick`) and session events, and it writes
finished lines through the ``write`` callable it was given.  Data comes from a
collectors object, side effects go to an actions object (see
:class:`Collectors` and :class:`Actions` for what they must offer), and
anything later goes through ``call_later``.

The behaviour, from the reference of the original:

* start: ``session-startup``, ``host-name``, ``os-version``,
  ``network-interfaces``, ``active-user``, ``applications``, ``containers``*,
  ``fqdn``, ``timezone``*, ``os-info``* (* gated off at API version 0, where
  the agent starts);
* every tick the :class:`~.scheduler.Scheduler` says which periodic jobs are
  due: heartbeat, active-user (only when it changed), applications +
  containers + host-name + os-version + network-interfaces + fqdn,
  disks-usage, number-of-cpus;
* the refresh burst (``refresh``, or an ``api-version`` that changes the
  version): ``session-startup``, ``active-user`` (forced), ``applications``,
  ``containers``, ``host-name``, ``os-version``, ``network-interfaces``,
  ``disks-usage``, ``fqdn``, ``timezone``, ``os-info``, each gated;
* negotiation: heartbeats report ``apiVersion`` 0 the first time, then 3;
  ``api-version`` sets the version (clamped, the burst when it changed);
  ``refresh`` without ``apiVersion`` resets it to 0.

Where this differs from the original, on purpose:

* a ``refresh`` carrying ``apiVersion`` while the agent is still at version 0
  makes the next heartbeat report 0 again.  The original only did that once
  per start, so when its first heartbeat went nowhere (VDSM not connected
  yet) and VDSM remembered version 3 from before, the agent stayed at 0
  (BZ 1285851 again).  To VDSM it looks exactly like an agent restart;
* a failing data source costs that one message, not the whole loop (the
  original's loop died on any exception);
* ``api-version`` values below 0 are clamped to 0 (the original kept them and
  then gated off every message);
* on Linux, ``session-logoff`` is followed by ``active-user`` with whoever is
  still logged in (the original's Windows code sent ``None``: one session).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import messages, scheduler
from .config import Config

LIFECYCLE_EVENTS = ("before_migration", "after_migration", "before_hibernation",
                    "after_hibernation")

DEFAULT_SHUTDOWN_MESSAGE = "System is going down"

# session-logon waits up to this many ticks (seconds) for the user to show up in utmp.
LOGON_USER_RETRIES = 5


class Collectors:
    """What the logic asks for (the real ones are :class:`.collectors.LinuxCollectors`)."""

    def host_name(self) -> str: ...
    def os_version(self) -> str: ...
    def network_interfaces(self) -> List[Dict[str, Any]]: ...
    def applications(self) -> List[str]: ...
    def active_user(self) -> str: ...
    def fqdn(self) -> str: ...
    def disks_usage(self) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]: ...
    def free_ram(self) -> str: ...
    def memory_stats(self) -> Dict[str, int]: ...
    def number_of_cpus(self) -> int: ...
    def os_info(self) -> Dict[str, str]: ...
    def timezone(self) -> Dict[str, Any]: ...
    def containers(self) -> List[Dict[str, Any]]: ...


class Actions:
    """The side effects of host commands (the real ones are :class:`.actions.Actions`)."""

    def lock_screen(self) -> None: ...
    def log_off(self) -> None: ...
    def shutdown(self, delay_minutes: int, message: str, reboot: bool) -> None: ...
    def hibernate(self, state: str) -> None: ...
    def login(self, credentials: Dict[str, str]) -> None: ...
    def lifecycle(self, event: str, done: Callable[[], None]) -> None: ...


class AgentLogic:
    """The agent's state and its reactions; writes finished lines through ``write``."""

    def __init__(self, config: Config, collectors: Collectors, actions: Actions,
                 write: Callable[[bytes], None],
                 call_later: Callable[[float, Callable[[], None]], Any],
                 log: Optional[logging.Logger] = None):
        self.config = config
        self.collectors = collectors
        self.actions = actions
        self._write = write
        self._call_later = call_later
        self.log = log or logging.getLogger("ovirt_agent")
        self.scheduler = scheduler.Scheduler(config.rates)
        self.api_version = messages.DISABLED_API_VERSION
        self.active_user = ""
        # The next heartbeat reports apiVersion 0 (see the module docstring).
        self.report_version_zero = True
        self.sent: Dict[str, int] = {}
        self.trimmed = 0
        self.dropped = 0

    # -- sending --

    def send(self, name: str, arguments: Optional[Dict[str, Any]] = None) -> bool:
        """Send one message if the negotiated version allows it; True if written."""
        permitted = messages.allowed(name, self.api_version)
        if permitted is None:
            self.log.error('Undocumented message "%s"', name)
            return False
        if not permitted:
            self.log.debug("Message %s not supported by api version %d.", name,
                           self.api_version)
            return False
        line, cut = messages.fit(name, arguments)
        if line is None:
            self.dropped += 1
            self.log.warning("message %s is over VDSM's %d-byte line limit: not sent", name,
                             messages.MAX_LINE)
            return False
        if cut:
            self.trimmed += cut
            self.log.warning("message %s: %d list items left out to stay within VDSM's"
                             " %d-byte line limit", name, cut, messages.MAX_LINE)
        self._write(line)
        self.sent[name] = self.sent.get(name, 0) + 1
        return True

    def _send_collected(self, name: str, collect: Callable[[], Dict[str, Any]]) -> bool:
        """Send ``name`` with what ``collect()`` returns; a failing collector costs only it."""
        if not messages.allowed(name, self.api_version):
            return self.send(name)  # logs why; collecting would be wasted work
        try:
            arguments = collect()
        except Exception:
            self.log.exception("collecting %s failed; not sent", name)
            return False
        return self.send(name, arguments)

    # -- the messages --

    def send_info(self) -> None:
        self._send_collected("host-name", lambda: {"name": self.collectors.host_name()})
        self._send_collected("os-version", lambda: {"version": self.collectors.os_version()})
        self._send_collected("network-interfaces",
                             lambda: {"interfaces": self.collectors.network_interfaces()})

    def send_user_info(self, force: bool = False) -> None:
        try:
            user = str(self.collectors.active_user())
        except Exception:
            self.log.exception("finding the active user failed")
            return
        if user != self.active_user or force:
            if self.send("active-user", {"name": user}):
                self.active_user = user

    def send_applications(self) -> None:
        self._send_collected("applications",
                             lambda: {"applications": self.collectors.applications()})

    def send_containers(self) -> None:
        self._send_collected("containers", lambda: {"list": self.collectors.containers()})

    def send_fqdn(self) -> None:
        self._send_collected("fqdn", lambda: {"fqdn": self.collectors.fqdn()})

    def send_disks_usage(self) -> None:
        def collect() -> Dict[str, Any]:
            disks, mapping = self.collectors.disks_usage()
            return {"disks": disks, "mapping": mapping}
        self._send_collected("disks-usage", collect)

    def send_os_info(self) -> None:
        self._send_collected("os-info", self.collectors.os_info)

    def send_timezone(self) -> None:
        self._send_collected("timezone", self.collectors.timezone)

    def send_number_of_cpus(self) -> None:
        self._send_collected("number-of-cpus",
                             lambda: {"count": self.collectors.number_of_cpus()})

    def send_heartbeat(self) -> None:
        version = (messages.DISABLED_API_VERSION if self.report_version_zero
                   else messages.MAX_API_VERSION)

        def collect() -> Dict[str, Any]:
            return {"free-ram": self.collectors.free_ram(),
                    "memory-stat": self.collectors.memory_stats(),
                    "apiVersion": version}
        if self._send_collected("heartbeat", collect):
            self.report_version_zero = False

    # -- the schedule --

    def start(self) -> None:
        """The startup set, in the original's order."""
        self.send("session-startup")
        self.send_info()
        self.send_user_info()
        self.send_applications()
        self.send_containers()
        self.send_fqdn()
        self.send_timezone()
        self.send_os_info()

    def tick(self) -> None:
        """One pass of the original's 1-second loop."""
        for job in self.scheduler.tick():
            if job == scheduler.HEARTBEAT:
                self.send_heartbeat()
            elif job == scheduler.USER:
                self.send_user_info()
            elif job == scheduler.APPLICATIONS:
                self.send_applications()
                self.send_containers()
                self.send_info()
                self.send_fqdn()
            elif job == scheduler.DISKS:
                self.send_disks_usage()
            elif job == scheduler.CPUS:
                self.send_number_of_cpus()

    def refresh(self) -> None:
        """The full refresh burst, in the original's order."""
        self.send("session-startup")
        self.send_user_info(force=True)
        self.send_applications()
        self.send_containers()
        self.send_info()
        self.send_disks_usage()
        self.send_fqdn()
        self.send_timezone()
        self.send_os_info()

    def stop(self) -> None:
        """The agent is stopping: tell the host, as the original did when its loop ended."""
        self.send("session-shutdown")

    # -- API version --

    def set_api_version(self, value: Any) -> None:
        try:
            version = int(value)
        except (TypeError, ValueError, OverflowError):
            self.log.info("Invalid api version value '%s' set. Version value not changed.",
                          value)
            return
        version = max(messages.DISABLED_API_VERSION, min(version, messages.MAX_API_VERSION))
        if version == self.api_version:
            self.log.debug("API version %d already set, no update necessary", version)
            return
        old, self.api_version = self.api_version, version
        self.log.info("API Version updated from %d to %d", old, version)
        self.refresh()

    # -- host commands --

    def handle_line(self, line: bytes) -> None:
        """One line from the host: a command, or nothing (dropped silently like the original)."""
        parsed = messages.parse_command(line)
        if parsed is None:
            self.log.debug("dropped a host line that is not a command (%d bytes)", len(line))
            return
        name, arguments = parsed
        try:
            self.handle_command(name, arguments)
        except Exception:
            self.log.exception("handling the host command %s failed", name)

    def handle_command(self, name: str, arguments: Dict[str, Any]) -> None:
        self.log.info("Received an external command: %s...", name)
        handler = self._COMMANDS.get(name)
        if handler is None:
            self.log.error("Unknown external command: %s", name)
            return
        handler(self, arguments)

    def _on_refresh(self, arguments: Dict[str, Any]) -> None:
        if "apiVersion" not in arguments:
            if self.api_version > messages.DISABLED_API_VERSION:
                self.log.info("API versioning not supported by VDSM. Disabling versioning"
                              " support.")
                self.api_version = messages.DISABLED_API_VERSION
        elif self.api_version == messages.DISABLED_API_VERSION:
            # A VDSM that negotiates (re)connected while we are at 0: make the
            # next heartbeat say 0 so its version changes and it sends api-version.
            self.report_version_zero = True
        self.refresh()

    def _on_api_version(self, arguments: Dict[str, Any]) -> None:
        if "apiVersion" not in arguments:
            self.log.info("api-version without apiVersion: ignored")
            return
        self.set_api_version(arguments["apiVersion"])

    def _on_echo(self, arguments: Dict[str, Any]) -> None:
        self.send("echo", arguments)

    def _on_lock_screen(self, arguments: Dict[str, Any]) -> None:
        self.actions.lock_screen()

    def _on_log_off(self, arguments: Dict[str, Any]) -> None:
        self.actions.log_off()

    def _on_shutdown(self, arguments: Dict[str, Any]) -> None:
        # Defensive parsing, exactly as the original: anything odd takes the default.
        try:
            timeout = int(arguments["timeout"])
        except Exception:
            timeout = 0
        message = arguments.get("message", DEFAULT_SHUTDOWN_MESSAGE)
        reboot = arguments.get("reboot")
        reboot = isinstance(reboot, str) and reboot.lower() == "true"
        # shutdown(8) counts in minutes, VDSM in seconds: round up.
        delay = max(0, (timeout + 59) // 60)
        self.log.info("%s (timeout = %d, message = '%s')",
                      "Rebooting" if reboot else "Shutting down", timeout, message)
        self.actions.shutdown(delay, str(message), reboot)

    def _on_hibernate(self, arguments: Dict[str, Any]) -> None:
        state = arguments.get("state", "disk")
        if state not in ("disk", "mem"):
            self.log.error("hibernate: unknown state %r", state)
            return
        self.actions.hibernate(state)

    def _on_login(self, arguments: Dict[str, Any]) -> None:
        username, password = arguments.get("username"), arguments.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            self.log.error("login: username and password must be strings; ignored")
            return
        self.log.info("User log-in (username = %r)", username)
        self.actions.login({"username": username, "password": password})

    def _on_set_number_of_cpus(self, arguments: Dict[str, Any]) -> None:
        count = int(arguments["count"])
        # Nothing to do on Linux (the original neither); report the count.
        if count > 0:
            self.send_number_of_cpus()

    def _on_lifecycle_event(self, arguments: Dict[str, Any]) -> None:
        event = arguments.get("type")
        reply_id = arguments.get("reply_id")

        def done() -> None:
            if reply_id is not None:
                self.send("completion", {"reply_id": reply_id, "done": True})

        if event not in LIFECYCLE_EVENTS:
            self.log.error("lifecycle-event: unknown type %r", event)
            done()
            return
        self.actions.lifecycle(event, done)

    _COMMANDS: Dict[str, Callable[["AgentLogic", Dict[str, Any]], None]] = {
        "refresh": _on_refresh,
        "api-version": _on_api_version,
        "echo": _on_echo,
        "lock-screen": _on_lock_screen,
        "log-off": _on_log_off,
        "shutdown": _on_shutdown,
        "hibernate": _on_hibernate,
        "login": _on_login,
        "set-number-of-cpus": _on_set_number_of_cpus,
        "lifecycle-event": _on_lifecycle_event,
    }

    # -- session events (systemd-logind on Linux) --

    def session_logon(self, retries: int = LOGON_USER_RETRIES) -> None:
        """A user logged on: active-user (once utmp shows someone), then session-logon."""
        try:
            nobody = self.collectors.active_user() == "None"
        except Exception:
            nobody = False
        if nobody and retries > 0:
            # The original slept 1 s between tries: one tick of our loop.
            self._call_later(self.config.tick_interval,
                             lambda: self.session_logon(retries - 1))
            return
        self.send_user_info()
        self.send("session-logon")

    def session_logoff(self) -> None:
        self.send("session-logoff")
        self.send_user_info(force=True)

    def session_lock(self) -> None:
        self.send("session-lock")

    def session_unlock(self) -> None:
        self.send("session-unlock")
