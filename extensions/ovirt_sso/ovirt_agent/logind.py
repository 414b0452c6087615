"""Session logon, logoff, lock and unlock from systemd-logind, as the Windows agent sent them.

The original agent reported ``session-logon``/``-logoff``/``-lock``/``-unlock``
only on Windows.  On Linux systemd-logind knows the same things and says so
on the system bus, so this watcher turns them into the same messages:

* ``Manager.SessionNew(id, path)`` of a session whose ``Class`` is ``user``
  (not a greeter or a lock screen) -> :meth:`~.logic.AgentLogic.session_logon`;
* ``Manager.SessionRemoved(id, path)`` of such a session -> ``session_logoff``;
* a user session's ``LockedHint`` turning true or false (desktops set it when
  their screen locks or unlocks), or its ``Lock``/``Unlock`` signals (what
  ``loginctl lock-session`` sends) -> ``session_lock`` / ``session_unlock``,
  once per change.

VDSM then knows the session state (``Locked``, ``Active``, ``LoggedOff``,
``UserLoggedOn``); before a hibernation it no longer waits 30 s for a
``Locked`` that Linux guests never reported.  Signals are taken only from the
owner of ``org.freedesktop.login1`` (the bus enforces the match rule's
sender).  Reading the bus needs no privilege.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Dict, Optional

from . import dbus

LOGIN1 = "org.freedesktop.login1"
MANAGER_PATH = "/org/freedesktop/login1"
MANAGER = "org.freedesktop.login1.Manager"
SESSION = "org.freedesktop.login1.Session"
PROPERTIES = "org.freedesktop.DBus.Properties"

RULES = (
    f"type='signal',sender='{LOGIN1}',interface='{MANAGER}',member='SessionNew'",
    f"type='signal',sender='{LOGIN1}',interface='{MANAGER}',member='SessionRemoved'",
    f"type='signal',sender='{LOGIN1}',interface='{SESSION}',member='Lock'",
    f"type='signal',sender='{LOGIN1}',interface='{SESSION}',member='Unlock'",
    f"type='signal',sender='{LOGIN1}',interface='{PROPERTIES}',member='PropertiesChanged',"
    f"arg0='{SESSION}'",
)

log = logging.getLogger("ovirt_agent.logind")


class SessionWatcher:
    """Follows logind's user sessions on ``loop`` and tells ``logic`` what changes."""

    def __init__(self, loop: Any, logic: Any, address: Optional[str] = None,
                 timeout: float = 5.0):
        self.loop = loop
        self.logic = logic
        self.address = address
        self.timeout = timeout
        self.bus: Optional[dbus.Connection] = None
        self.sessions: Dict[str, Dict[str, Any]] = {}   # path -> {"id", "locked"}
        self._pending: Dict[int, str] = {}               # GetAll serial -> session path

    def start(self) -> None:
        """Connect, subscribe, learn the current user sessions (DBusError if the bus fails)."""
        bus = dbus.Connection(self.address, self.timeout)
        try:
            for rule in RULES:
                bus.add_match(rule, self.timeout)
            listed = bus.call_sync(LOGIN1, MANAGER_PATH, MANAGER, "ListSessions",
                                   timeout=self.timeout)[0]
            for session_id, _uid, _user, _seat, path in listed:
                properties = bus.call_sync(LOGIN1, path, PROPERTIES, "GetAll", "s", SESSION,
                                           timeout=self.timeout)[0]
                if properties.get("Class") == "user":
                    self.sessions[path] = {"id": session_id,
                                           "locked": bool(properties.get("LockedHint"))}
        except dbus.DBusError:
            bus.close()
            raise
        self.bus = bus
        self.loop.add_reader(bus.fileno(), self._readable)
        log.info("following systemd-logind: %d user session(s)", len(self.sessions))
        for message in bus.take_postponed():
            self._handle(message)

    def _readable(self) -> None:
        assert self.bus is not None
        try:
            data = self.bus.sock.recv(65536)
        except (BlockingIOError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:
            log.warning("the system bus closed the connection: no more session events")
            self.close()
            return
        try:
            messages = self.bus.feed(data)
        except dbus.DBusError as error:
            log.warning("the system bus sent something unreadable (%s): no more session"
                        " events", error)
            self.close()
            return
        for message in messages:
            self._handle(message)

    def _handle(self, message: dbus.Message) -> None:
        if message.kind == dbus.SIGNAL:
            self._signal(message)
        elif message.reply_serial in self._pending:
            path = self._pending.pop(message.reply_serial)
            if message.kind == dbus.METHOD_RETURN:
                self._session_new(path, message.body[0])

    def _signal(self, message: dbus.Message) -> None:
        interface, member, body = message.interface, message.member, message.body
        if interface == MANAGER and member == "SessionNew" and len(body) == 2:
            assert self.bus is not None
            serial = self.bus.call(LOGIN1, body[1], PROPERTIES, "GetAll", "s", SESSION)
            self._pending[serial] = body[1]
        elif interface == MANAGER and member == "SessionRemoved" and len(body) == 2:
            if self.sessions.pop(body[1], None) is not None:
                self.logic.session_logoff()
        elif interface == SESSION and member in ("Lock", "Unlock"):
            self._locked(message.path, member == "Lock")
        elif interface == PROPERTIES and len(body) == 3 and body[0] == SESSION:
            changed = body[1]
            if "LockedHint" in changed:
                self._locked(message.path, bool(changed["LockedHint"]))

    def _session_new(self, path: str, properties: Dict[str, Any]) -> None:
        if properties.get("Class") != "user" or path in self.sessions:
            return
        self.sessions[path] = {"id": properties.get("Id", ""),
                               "locked": bool(properties.get("LockedHint"))}
        self.logic.session_logon()

    def _locked(self, path: Optional[str], locked: bool) -> None:
        session = self.sessions.get(path or "")
        if session is None or session["locked"] == locked:
            return
        session["locked"] = locked
        if locked:
            self.logic.session_lock()
        else:
            self.logic.session_unlock()

    def close(self) -> None:
        if self.bus is not None:
            self.loop.remove_reader(self.bus.fileno())
            self.bus.close()
            self.bus = None
