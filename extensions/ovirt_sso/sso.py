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

The D-Bus client is the smallest that does this (SASL EXTERNAL, ``Hello``,
method calls, one signal), with the standard library only: Debian's
``python3-jeepney`` would do too, but the extension would then depend on a
package the guest may not have.  :class:`BusConnection` also reads messages,
which the tests use to subscribe.

Tokens and passwords are never logged.  The password passes through here as
the ``str`` VDSM's JSON gave us and goes to the core at once; Python gives no
way to wipe a ``str``.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

log = logging.getLogger("ovirt_agent.sso")

PRIMITIVE = "sso-offer-credentials"
TOKEN_TTL = 5  # seconds, the original agent's window

BUS_NAME = "org.ovirt.vdsm.Credentials"
OBJECT_PATH = "/org/ovirt/vdsm/Credentials"
INTERFACE = "org.ovirt.vdsm.Credentials"
SIGNAL = "UserAuthenticated"

SYSTEM_BUS_ADDRESS = "unix:path=/var/run/dbus/system_bus_socket"
BUS_TIMEOUT = 2.0  # seconds for the whole announcement

# -- the D-Bus wire format -------------------------------------------------------------

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL_MESSAGE = 1, 2, 3, 4
NO_REPLY_EXPECTED = 0x1
FIELD_PATH, FIELD_INTERFACE, FIELD_MEMBER, FIELD_ERROR_NAME = 1, 2, 3, 4
FIELD_REPLY_SERIAL, FIELD_DESTINATION, FIELD_SENDER, FIELD_SIGNATURE = 5, 6, 7, 8
_FIELD_TYPES = {FIELD_PATH: "o", FIELD_INTERFACE: "s", FIELD_MEMBER: "s",
                FIELD_ERROR_NAME: "s", FIELD_REPLY_SERIAL: "u", FIELD_DESTINATION: "s",
                FIELD_SENDER: "s", FIELD_SIGNATURE: "g"}
_FIXED = {"y": ("B", 1), "b": ("I", 4), "i": ("i", 4), "u": ("I", 4),
          "x": ("q", 8), "t": ("Q", 8), "d": ("d", 8), "n": ("h", 2), "q": ("H", 2)}
MAX_MESSAGE = 1 << 20  # far more than any reply we expect

# RequestName flags and answers
DO_NOT_QUEUE = 0x4
PRIMARY_OWNER, ALREADY_OWNER = 1, 4


class DBusError(Exception):
    """The bus refused, answered with an error, or could not be reached in time."""


class _Writer:
    """Marshals basic types (y b i u x t d n q s o g) and variants, little-endian."""

    def __init__(self, start: int = 0):
        self.data = bytearray()
        self._start = start  # offset of this buffer in the message, for alignment

    def align(self, boundary: int) -> None:
        self.data += bytes(-(self._start + len(self.data)) % boundary)

    def value(self, code: str, item: Any) -> None:
        if code in _FIXED:
            fmt, size = _FIXED[code]
            self.align(size)
            self.data += struct.pack("<" + fmt, item)
        elif code in "so":
            encoded = item.encode("utf-8")
            self.align(4)
            self.data += struct.pack("<I", len(encoded)) + encoded + b"\0"
        elif code == "g":
            encoded = item.encode("ascii")
            self.data += bytes((len(encoded),)) + encoded + b"\0"
        else:
            raise DBusError(f"cannot marshal type {code!r}")

    def variant(self, code: str, item: Any) -> None:
        self.value("g", code)
        self.value(code, item)


class _Reader:
    """Unmarshals what :class:`_Writer` writes, in either byte order."""

    def __init__(self, data: bytes, order: str, offset: int = 0, start: int = 0):
        self.data = data
        self.order = order
        self.offset = offset
        self._start = start

    def align(self, boundary: int) -> None:
        self.offset += -(self._start + self.offset) % boundary

    def value(self, code: str) -> Any:
        try:
            if code in _FIXED:
                fmt, size = _FIXED[code]
                self.align(size)
                (item,) = struct.unpack_from(self.order + fmt, self.data, self.offset)
                self.offset += size
                return item
            if code in "sog":
                if code == "g":
                    length = self.data[self.offset]
                    self.offset += 1
                else:
                    self.align(4)
                    (length,) = struct.unpack_from(self.order + "I", self.data, self.offset)
                    self.offset += 4
                text = self.data[self.offset:self.offset + length]
                if len(text) != length:
                    raise DBusError("truncated message")
                self.offset += length + 1
                return text.decode("utf-8")
        except (struct.error, IndexError):
            raise DBusError("truncated message") from None
        raise DBusError(f"cannot unmarshal type {code!r}")

    def variant(self) -> Any:
        return self.value(self.value("g"))


class Message:
    """One D-Bus message: its type, serial, header fields and body values."""

    def __init__(self, kind: int, serial: int, fields: Dict[int, Any], body: List[Any],
                 flags: int = 0):
        self.kind = kind
        self.serial = serial
        self.fields = fields
        self.body = body
        self.flags = flags

    @property
    def member(self) -> Optional[str]:
        return self.fields.get(FIELD_MEMBER)

    def encode(self) -> bytes:
        signature = self.fields.get(FIELD_SIGNATURE, "")
        body = _Writer()
        for code, item in zip(signature, self.body):
            body.value(code, item)
        header = _Writer()
        header.data += struct.pack("<cBBBII", b"l", self.kind, self.flags, 1,
                                   len(body.data), self.serial)
        fields = _Writer(start=16)
        for code, item in sorted(self.fields.items()):
            if code == FIELD_SIGNATURE and not item:
                continue
            fields.align(8)
            fields.data += bytes((code,))
            fields.variant(_FIELD_TYPES[code], item)
        header.data += struct.pack("<I", len(fields.data)) + fields.data
        header.align(8)
        return bytes(header.data + body.data)

    @classmethod
    def decode(cls, data: bytes) -> "Message":
        order = {b"l": "<", b"B": ">"}.get(data[:1])
        if order is None:
            raise DBusError("bad byte order mark")
        kind, flags, _version, body_length, serial, fields_length = struct.unpack_from(
            order + "BBBIII", data, 1)
        reader = _Reader(data, order, offset=16)
        fields: Dict[int, Any] = {}
        while reader.offset < 16 + fields_length:
            reader.align(8)
            code = reader.value("y")
            fields[code] = reader.variant()
        header_end = 16 + fields_length + (-(16 + fields_length) % 8)
        body_reader = _Reader(data[header_end:header_end + body_length], order)
        body = [body_reader.value(code) for code in fields.get(FIELD_SIGNATURE, "")]
        return cls(kind, serial, fields, body, flags)

    @staticmethod
    def total_length(prefix: bytes) -> int:
        """The full length of the message whose first 16 bytes are ``prefix``."""
        order = "<" if prefix[:1] == b"l" else ">"
        body_length, _serial, fields_length = struct.unpack_from(order + "III", prefix, 4)
        return 16 + fields_length + (-(16 + fields_length) % 8) + body_length


# -- a connection --------------------------------------------------------------------------


def _parse_addresses(addresses: str) -> List[Tuple[str, str]]:
    """``unix:path=...`` / ``unix:abstract=...`` entries as (kind, where); others skipped."""
    found = []
    for address in addresses.split(";"):
        transport, _, parameters = address.partition(":")
        if transport != "unix":
            continue
        for pair in parameters.split(","):
            key, _, value = pair.partition("=")
            if key in ("path", "abstract"):
                found.append((key, _unescape(value)))
    return found


def _unescape(value: str) -> str:
    out, index = bytearray(), 0
    raw = value.encode("utf-8")
    while index < len(raw):
        if raw[index:index + 1] == b"%":
            out.append(int(raw[index + 1:index + 3], 16))
            index += 3
        else:
            out.append(raw[index])
            index += 1
    return out.decode("utf-8")


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_ADDRESS


class BusConnection:
    """A blocking connection to a message bus, authenticated as our uid (SASL EXTERNAL).

    Every operation is bounded by the deadline given to the constructor.
    """

    def __init__(self, address: str, timeout: float = BUS_TIMEOUT):
        self._deadline = time.monotonic() + timeout
        self._serial = 0
        self._buffer = b""
        self._queue: List[Message] = []
        self._sock = self._connect(address)
        try:
            self._authenticate()
            (self.unique_name,) = self.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                            "org.freedesktop.DBus", "Hello")
        except BaseException:
            self._sock.close()
            raise

    def _connect(self, address: str) -> socket.socket:
        errors = []
        for kind, where in _parse_addresses(address):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self._remaining())
            try:
                sock.connect(where if kind == "path" else "\0" + where)
                return sock
            except OSError as error:
                sock.close()
                errors.append(f"{where}: {error.strerror or error}")
        raise DBusError("cannot connect to the bus: " + ("; ".join(errors) or address))

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DBusError("the bus did not answer in time")
        return left

    def _recv(self) -> bytes:
        self._sock.settimeout(self._remaining())
        try:
            data = self._sock.recv(65536)
        except socket.timeout:
            raise DBusError("the bus did not answer in time") from None
        except OSError as error:
            raise DBusError(f"the bus connection failed: {error.strerror or error}") from None
        if not data:
            raise DBusError("the bus closed the connection")
        return data

    def _send(self, data: bytes) -> None:
        self._sock.settimeout(self._remaining())
        try:
            self._sock.sendall(data)
        except OSError as error:
            raise DBusError(f"the bus connection failed: {error.strerror or error}") from None

    def _authenticate(self) -> None:
        uid = str(os.geteuid()).encode("ascii").hex().encode("ascii")
        self._send(b"\0AUTH EXTERNAL " + uid + b"\r\n")
        while b"\r\n" not in self._buffer:
            self._buffer += self._recv()
            if len(self._buffer) > 4096:
                raise DBusError("the bus sent an overlong authentication line")
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        if not line.startswith(b"OK "):
            raise DBusError("the bus refused authentication: "
                            + line.decode("ascii", "replace"))
        self._send(b"BEGIN\r\n")

    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def send(self, message: Message) -> int:
        message.serial = self._next_serial()
        self._send(message.encode())
        return message.serial

    def _read_message(self) -> Message:
        while len(self._buffer) < 16:
            self._buffer += self._recv()
        total = Message.total_length(self._buffer[:16])
        if total > MAX_MESSAGE:
            raise DBusError(f"the bus sent a message of {total} bytes")
        while len(self._buffer) < total:
            self._buffer += self._recv()
        data, self._buffer = self._buffer[:total], self._buffer[total:]
        return Message.decode(data)

    def fileno(self) -> int:
        return self._sock.fileno()

    def pending(self) -> List[Message]:
        """Without waiting: the messages queued and those the socket already holds."""
        self._sock.settimeout(0.0)  # a timeout would make recv wait for it first
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                raise DBusError(f"the bus connection failed: {error.strerror or error}") from None
            if not data:
                raise DBusError("the bus closed the connection")
            self._buffer += data
        messages, self._queue = self._queue, []
        while len(self._buffer) >= 16:
            total = Message.total_length(self._buffer[:16])
            if total > MAX_MESSAGE:
                raise DBusError(f"the bus sent a message of {total} bytes")
            if len(self._buffer) < total:
                break
            data, self._buffer = self._buffer[:total], self._buffer[total:]
            messages.append(Message.decode(data))
        return messages

    def extend_deadline(self, timeout: float) -> None:
        """Give the next operations ``timeout`` seconds (a long-lived connection)."""
        self._deadline = time.monotonic() + timeout

    def reply(self, call: Message, signature: str = "", *arguments: Any) -> None:
        self._answer(call, METHOD_RETURN, {FIELD_SIGNATURE: signature}, list(arguments))

    def reply_error(self, call: Message, name: str, text: str) -> None:
        self._answer(call, ERROR, {FIELD_ERROR_NAME: name, FIELD_SIGNATURE: "s"}, [text])

    def _answer(self, call: Message, kind: int, fields: Dict[int, Any], body: List[Any]) -> None:
        if call.flags & NO_REPLY_EXPECTED:
            return
        fields[FIELD_REPLY_SERIAL] = call.serial
        sender = call.fields.get(FIELD_SENDER)
        if sender:
            fields[FIELD_DESTINATION] = sender
        self.send(Message(kind, 0, fields, body, NO_REPLY_EXPECTED))

    def receive(self) -> Message:
        """The next message not yet taken by :meth:`call` (signals, mostly)."""
        if self._queue:
            return self._queue.pop(0)
        return self._read_message()

    def call(self, destination: str, path: str, interface: str, member: str,
             signature: str = "", *arguments: Any) -> List[Any]:
        """A method call; its reply's values, or :class:`DBusError` for an error reply."""
        fields = {FIELD_PATH: path, FIELD_INTERFACE: interface, FIELD_MEMBER: member,
                  FIELD_DESTINATION: destination, FIELD_SIGNATURE: signature}
        serial = self.send(Message(METHOD_CALL, 0, fields, list(arguments)))
        while True:
            message = self._read_message()
            if message.fields.get(FIELD_REPLY_SERIAL) == serial:
                if message.kind == ERROR:
                    detail = message.body[0] if message.body else ""
                    raise DBusError(f"{member}: {message.fields.get(FIELD_ERROR_NAME)}: {detail}")
                return message.body
            self._queue.append(message)

    def bus_call(self, member: str, signature: str = "", *arguments: Any) -> List[Any]:
        return self.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                         "org.freedesktop.DBus", member, signature, *arguments)

    def emit(self, path: str, interface: str, member: str, signature: str,
             *arguments: Any) -> None:
        fields = {FIELD_PATH: path, FIELD_INTERFACE: interface, FIELD_MEMBER: member,
                  FIELD_SIGNATURE: signature}
        self.send(Message(SIGNAL_MESSAGE, 0, fields, list(arguments), NO_REPLY_EXPECTED))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "BusConnection":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


# -- single sign-on ----------------------------------------------------------------------


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
        self._bus: Optional[BusConnection] = None

    @property
    def owner(self) -> Optional[str]:
        """Our unique name on the bus while we own the name, else None."""
        return self._bus.unique_name if self._bus is not None else None

    def connect(self) -> None:
        """Connect and own the name (nothing if already done); :class:`DBusError` if not."""
        if self._bus is not None:
            return
        bus = BusConnection(self._address or system_bus_address(), self._timeout)
        try:
            (answer,) = bus.bus_call("RequestName", "su", BUS_NAME, DO_NOT_QUEUE)
            if answer not in (PRIMARY_OWNER, ALREADY_OWNER):
                raise DBusError(f"{BUS_NAME} is owned by another process"
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
                self._bus.extend_deadline(self._timeout)
                self._bus.emit(OBJECT_PATH, INTERFACE, SIGNAL, "s", token)
                # The bus handles a connection's messages in order: this
                # answer proves the signal went out while we owned the name.
                (owner,) = self._bus.bus_call("GetNameOwner", "s", BUS_NAME)
                if owner != self._bus.unique_name:
                    raise DBusError(f"{BUS_NAME} was taken over by {owner}")
                return
            except DBusError:
                self.close()
                if attempt == 2:
                    raise

    def _on_readable(self) -> None:
        bus = self._bus
        if bus is None:
            return
        try:
            bus.extend_deadline(self._timeout)
            for message in bus.pending():
                self._handle(bus, message)
        except DBusError as error:
            log.warning("single sign-on: the system bus connection ended: %s", error)
            self.close()

    def _handle(self, bus: BusConnection, message: Message) -> None:
        if message.kind == SIGNAL_MESSAGE and message.member == "NameLost":
            log.warning("single sign-on: the bus took %s away", BUS_NAME)
            self.close()
        elif message.kind == METHOD_CALL:
            interface, member = message.fields.get(FIELD_INTERFACE), message.member
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
    except DBusError as error:
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
        except DBusError as bus_error:
            finish(f"cannot announce the login on the system bus: {bus_error}")
            return
        log.info("single sign-on: credentials for %s are ready for the login screen", username)
        finish(None)

    context.primitive(PRIMITIVE, {"user": username, "password": password,
                                  "token-ttl": TOKEN_TTL}, offered)
