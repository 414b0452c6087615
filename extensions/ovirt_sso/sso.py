"""Single sign-on, the extension's side: a host ``login`` becomes a token on the system bus.

When VDSM sends ``login {username, password}``, :func:`handle_login`:

1. asks the core for the primitive ``sso-offer-credentials`` (see
   ``qga/ext/credentials.py``): the core keeps the credentials behind a
   one-time, short-lived random token on a socket only root can reach, and
   answers the token.  This process stays unprivileged and never serves the
   password to anyone.
2. announces the token exactly as the original agent did, so the login
   screens need no change: it owns the name ``org.ovirt.vdsm.Credentials`` on
   the D-Bus system bus and emits the signal
   ``org.ovirt.vdsm.Credentials.UserAuthenticated(s token)`` from the object
   ``/org/ovirt/vdsm/Credentials``.  gnome-shell then runs the PAM service
   ``gdm-ovirtcred``, whose module (``native/pam_ovirt_cred.c``) trades the
   token with the core.

A :class:`CredentialsAnnouncer` owns the name from its first announcement (or
from :func:`start`, at the extension's start) for as long as the extension
runs, as the original agent did: login screens that follow the name's owner
(GDBusProxy, ``gdbus monitor``) then know it before any signal comes.  After
each signal a ``GetNameOwner`` round trip proves the bus dispatched it while we
owned the name.  It answers ``Introspect`` and ``Ping`` on the object and
refuses other calls, so a caller never waits for a timeout.  The policy
``contrib/dbus/org.ovirt.vdsm.Credentials.conf`` lets only this extension's
user (and root) own the name.

The D-Bus client is the extension's own, :mod:`ovirt_agent.dbus` (the
session watcher uses it too), with the standard library only.  This module
sits beside the ``ovirt_agent`` package in the bundle, whose directory is
first on ``sys.path`` (see ``main.py``), so both import it the same way.
Every bus operation of an announcement shares one deadline.

Tokens and passwords are never logged.  The password passes through here as
the ``str`` VDSM's JSON gave us and goes to the core at once; Python gives no
way to wipe a ``str``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional

from ovirt_agent import dbus

log = logging.getLogger("ovirt_agent.sso")

PRIMITIVE = "sso-offer-credentials"
TOKEN_TTL = 5  # seconds, the original agent's window

BUS_NAME = "org.ovirt.vdsm.Credentials"
OBJECT_PATH = "/org/ovirt/vdsm/Credentials"
INTERFACE = "org.ovirt.vdsm.Credentials"
SIGNAL = "UserAuthenticated"

BUS_TIMEOUT = 2.0  # seconds for the whole announcement

# RequestName's flag and answers
DO_NOT_QUEUE = 0x4
PRIMARY_OWNER, ALREADY_OWNER = 1, 4

INTROSPECTION = f"""<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
  <interface name="{INTERFACE}">
    <signal name="{SIGNAL}">
      <arg name="token" type="s"/>
    </signal>
  </interface>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg name="xml_data" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
  </interface>
</node>
"""


class CredentialsAnnouncer:
    """Owns ``org.ovirt.vdsm.Credentials`` and emits ``UserAuthenticated(token)``.

    ``loop`` (the SDK's, optional) lets it answer the bus while idle; without
    one, whatever the bus sends waits in the socket until the next
    announcement.  The connection is made on first use and again after the
    bus went away.
    """

    def __init__(self, loop: Any = None, address: Optional[str] = None,
                 timeout: float = BUS_TIMEOUT):
        self._loop = loop
        self._address = address
        self._timeout = timeout
        self._bus: Optional[dbus.Connection] = None

    @property
    def owner(self) -> Optional[str]:
        """Our unique name on the bus while we own the name, else None."""
        return self._bus.unique_name if self._bus is not None else None

    def connect(self) -> None:
        """Connect and own the name (nothing if already done); :class:`DBusError` if not."""
        if self._bus is not None:
            return
        deadline = time.monotonic() + self._timeout
        bus = dbus.Connection(self._address, self._timeout)
        try:
            (answer,) = _bus_call(bus, deadline, "RequestName", "su", BUS_NAME, DO_NOT_QUEUE)
            if answer not in (PRIMARY_OWNER, ALREADY_OWNER):
                raise dbus.DBusError(f"{BUS_NAME} is owned by another process"
                                     " (is the original ovirt-guest-agent running?)")
        except BaseException:
            bus.close()
            raise
        self._bus = bus
        if self._loop is not None:
            self._loop.add_reader(bus.fileno(), self._on_readable)

    def announce(self, token: str) -> None:
        """Emit the signal; reconnects once if the bus connection was lost."""
        for attempt in (1, 2):
            try:
                self.connect()
                assert self._bus is not None
                deadline = time.monotonic() + self._timeout
                self._bus.signal(OBJECT_PATH, INTERFACE, SIGNAL, "s", token)
                # The bus handles a connection's messages in order: this
                # answer proves the signal went out while we owned the name.
                (owner,) = _bus_call(self._bus, deadline, "GetNameOwner", "s", BUS_NAME)
                if owner != self._bus.unique_name:
                    raise dbus.DBusError(f"{BUS_NAME} was taken over by {owner}")
                return
            except dbus.DBusError:
                self.close()
                if attempt == 2:
                    raise

    def _on_readable(self) -> None:
        bus = self._bus
        if bus is None:
            return
        try:
            for message in bus.pending():
                self._handle(bus, message)
        except dbus.DBusError as error:
            log.warning("single sign-on: the system bus connection ended: %s", error)
            self.close()

    def _handle(self, bus: dbus.Connection, message: dbus.Message) -> None:
        if message.kind == dbus.SIGNAL and message.member == "NameLost":
            log.warning("single sign-on: the bus took %s away", BUS_NAME)
            self.close()
        elif message.kind == dbus.METHOD_CALL:
            interface, member = message.interface, message.member
            if member == "Introspect" and interface in (None, "org.freedesktop.DBus.Introspectable"):
                bus.reply(message, "s", INTROSPECTION)
            elif member == "Ping" and interface in (None, "org.freedesktop.DBus.Peer"):
                bus.reply(message)
            else:
                bus.reply_error(message, "org.freedesktop.DBus.Error.UnknownMethod",
                                f"{BUS_NAME} has no method {member}")

    def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            if self._loop is not None:
                self._loop.remove_reader(bus.fileno())
            bus.close()


def _bus_call(bus: dbus.Connection, deadline: float, member: str, signature: str,
              *arguments: Any) -> Any:
    """A call to the bus itself, within what is left of ``deadline``."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise dbus.DBusError("the bus did not answer in time")
    return bus.call_sync(dbus.BUS_NAME, dbus.BUS_PATH, dbus.BUS_NAME, member, signature,
                         *arguments, timeout=left)


def announcer_for(context: Any) -> CredentialsAnnouncer:
    """The extension's one announcer, kept on the context (made on first use)."""
    announcer = getattr(context, "sso_announcer", None)
    if announcer is None:
        announcer = CredentialsAnnouncer(loop=getattr(context, "loop", None))
        context.sso_announcer = announcer
        on_stop = getattr(context, "on_stop", None)
        if on_stop is not None:
            on_stop(announcer.close)
    return announcer


def start(context: Any) -> None:
    """Own the name from the extension's start (optional; the first login does it anyway)."""
    try:
        announcer_for(context).connect()
    except dbus.DBusError as error:
        log.warning("single sign-on: not on the system bus yet (%s); the next login retries",
                    error)


def handle_login(credentials: Dict[str, Any], context: Any,
                 on_done: Optional[Callable[[Optional[str]], None]] = None) -> None:
    """The ``login`` command: hand ``{"username", "password"}`` to the login screen.

    ``context`` is the SDK's :class:`Extension` (anything with ``loop`` and
    ``primitive(name, arguments, callback)``, whose callback runs in that
    loop; it also keeps the announcer as ``context.sso_announcer``).
    ``on_done(error)`` runs once it is over: ``None`` when the token went out,
    else why not.  Nothing is raised: a failed login is logged, as the
    original agent did.
    """
    def finish(error: Optional[str]) -> None:
        if error is not None:
            log.error("single sign-on: %s", error)
        if on_done is not None:
            on_done(error)

    username, password = credentials.get("username"), credentials.get("password")
    if not isinstance(username, str) or not username or not isinstance(password, str):
        finish("login needs a user name and a password; ignored")
        return

    def offered(value: Any, error: Optional[str]) -> None:
        if error is not None:
            finish(f"the core cannot hold the credentials: {error}")
            return
        token = value.get("token") if isinstance(value, dict) else None
        if not isinstance(token, str) or not token:
            finish("the core answered no token")
            return
        try:
            announcer_for(context).announce(token)
        except dbus.DBusError as bus_error:
            finish(f"cannot announce the login on the system bus: {bus_error}")
            return
        log.info("single sign-on: credentials for %s are ready for the login screen", username)
        finish(None)

    context.primitive(PRIMITIVE, {"user": username, "password": password,
                                  "token-ttl": TOKEN_TTL}, offered)
