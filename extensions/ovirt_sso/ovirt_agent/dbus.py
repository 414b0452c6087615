"""A minimal D-Bus client: SASL EXTERNAL, method calls and replies, signals, match rules.

The extension's one D-Bus client: the session watcher (:mod:`.logind`)
follows systemd-logind with it, single sign-on (``sso.py``) owns
``org.ovirt.vdsm.Credentials`` and emits its signal with it, and the tests
play systemd-logind and the login screen with it on a private bus; the
standard library only, so the extension
depends on nothing the guest may lack (Debian's ``python3-jeepney`` would do
as well, but is rarely installed).  The whole wire format is here: every
type D-Bus has (basic types, arrays, structs, dict entries, variants; no
Unix fds), in either byte order when reading, little-endian when writing.

:class:`Connection` connects and authenticates blocking (with a deadline),
then works message by message: :meth:`~Connection.feed` turns received
bytes into :class:`Message` objects, so a caller can drive it from any
event loop, or :meth:`~Connection.pending` reads what already arrived
without waiting.  :meth:`~Connection.call_sync` is the blocking round trip
used while setting up.  Every socket operation is bounded (the
constructor's ``timeout`` for sends), and every failure, the socket's
included, is a :class:`DBusError`.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any, Dict, List, Optional, Tuple

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
NO_REPLY_EXPECTED = 0x1
PATH, INTERFACE, MEMBER, ERROR_NAME, REPLY_SERIAL, DESTINATION, SENDER, SIGNATURE = range(1, 9)
_FIELD_TYPES = {PATH: "o", INTERFACE: "s", MEMBER: "s", ERROR_NAME: "s", REPLY_SERIAL: "u",
                DESTINATION: "s", SENDER: "s", SIGNATURE: "g"}

SYSTEM_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"
BUS_NAME, BUS_PATH = "org.freedesktop.DBus", "/org/freedesktop/DBus"
MAX_MESSAGE = 1 << 24

_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q",
          "d": "d", "h": "I"}
_ALIGN = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4,
          "s": 4, "o": 4, "g": 1, "a": 4, "(": 8, "{": 8, "v": 1}


class DBusError(Exception):
    """The bus is unreachable, refused us, answered with an error, or sent garbage."""


class Variant:
    """A value with its D-Bus type, for marshalling ``v``."""

    def __init__(self, signature: str, value: Any):
        self.signature = signature
        self.value = value

    def __repr__(self) -> str:
        return f"Variant({self.signature!r}, {self.value!r})"


# -- signatures --------------------------------------------------------------------------


def split_signature(signature: str) -> List[str]:
    """The complete types of a signature: ``"sa{sv}as"`` -> ``["s", "a{sv}", "as"]``."""
    types = []
    index = 0
    while index < len(signature):
        end = _type_end(signature, index)
        types.append(signature[index:end])
        index = end
    return types


def _type_end(signature: str, index: int) -> int:
    if index >= len(signature):
        raise DBusError(f"incomplete signature {signature!r}")
    code = signature[index]
    if code == "a":
        return _type_end(signature, index + 1)
    if code in "({":
        closing = ")" if code == "(" else "}"
        index += 1
        while index < len(signature) and signature[index] != closing:
            index = _type_end(signature, index)
        if index >= len(signature):
            raise DBusError(f"unbalanced signature {signature!r}")
        return index + 1
    if code in _ALIGN:
        return index + 1
    raise DBusError(f"unknown type {code!r} in signature {signature!r}")


# -- marshalling -------------------------------------------------------------------------


class _Writer:
    def __init__(self, offset: int = 0):
        self.data = bytearray()
        self._offset = offset    # where this buffer starts in the message (for alignment)

    def align(self, boundary: int) -> None:
        self.data += bytes(-(self._offset + len(self.data)) % boundary)

    def write(self, type_: str, value: Any) -> None:
        code = type_[0]
        self.align(_ALIGN[code])
        if code in _FIXED:
            self.data += struct.pack("<" + _FIXED[code], value)
        elif code in "so":
            encoded = value.encode("utf-8")
            self.data += struct.pack("<I", len(encoded)) + encoded + b"\0"
        elif code == "g":
            encoded = value.encode("ascii")
            self.data += bytes((len(encoded),)) + encoded + b"\0"
        elif code == "v":
            if not isinstance(value, Variant):
                raise DBusError("a 'v' value must be a Variant")
            self.write("g", value.signature)
            self.write(value.signature, value.value)
        elif code == "a":
            self._write_array(type_[1:], value)
        elif code == "(":
            for member_type, member in zip(split_signature(type_[1:-1]), value):
                self.write(member_type, member)
        else:
            raise DBusError(f"cannot write type {type_!r}")

    def _write_array(self, element: str, value: Any) -> None:
        length_at = len(self.data)
        self.data += b"\0\0\0\0"
        self.align(_ALIGN[element[0]])
        start = len(self.data)
        if element[0] == "{":
            key_type, value_type = split_signature(element[1:-1])
            for key, item in value.items():
                self.align(8)
                self.write(key_type, key)
                self.write(value_type, item)
        else:
            for item in value:
                self.write(element, item)
        struct.pack_into("<I", self.data, length_at, len(self.data) - start)


class _Reader:
    def __init__(self, data: bytes, order: str, offset: int = 0, base: int = 0):
        self.data = data
        self.order = order
        self.offset = offset
        self._base = base        # alignment is relative to the message start

    def align(self, boundary: int) -> None:
        self.offset += -(self._base + self.offset) % boundary

    def read(self, type_: str) -> Any:
        try:
            return self._read(type_)
        except (struct.error, IndexError, UnicodeDecodeError) as error:
            raise DBusError(f"malformed message ({error})") from None

    def _read(self, type_: str) -> Any:
        code = type_[0]
        self.align(_ALIGN[code])
        if code in _FIXED:
            fmt = self.order + _FIXED[code]
            (value,) = struct.unpack_from(fmt, self.data, self.offset)
            self.offset += struct.calcsize(fmt)
            return bool(value) if code == "b" else value
        if code in "sog":
            if code == "g":
                length = self.data[self.offset]
                self.offset += 1
            else:
                (length,) = struct.unpack_from(self.order + "I", self.data, self.offset)
                self.offset += 4
            if self.offset + length >= len(self.data) + 1:
                raise DBusError("a string runs past the message")
            text = bytes(self.data[self.offset:self.offset + length]).decode("utf-8")
            self.offset += length + 1
            return text
        if code == "v":
            signature = self._read("g")
            types = split_signature(signature)
            if len(types) != 1:
                raise DBusError(f"variant signature {signature!r}")
            return self._read(types[0])
        if code == "a":
            (length,) = struct.unpack_from(self.order + "I", self.data, self.offset)
            self.offset += 4
            element = type_[1:]
            self.align(_ALIGN[element[0]])
            end = self.offset + length
            if length > MAX_MESSAGE or end > len(self.data):
                raise DBusError("an array runs past the message")
            if element[0] == "{":
                key_type, value_type = split_signature(element[1:-1])
                result: Dict[Any, Any] = {}
                while self.offset < end:
                    self.align(8)
                    key = self._read(key_type)
                    result[key] = self._read(value_type)
                return result
            items = []
            while self.offset < end:
                items.append(self._read(element))
            return items
        if code == "(":
            return tuple(self._read(member) for member in split_signature(type_[1:-1]))
        raise DBusError(f"cannot read type {type_!r}")


class Message:
    """One D-Bus message."""

    def __init__(self, kind: int, fields: Dict[int, Any], body: Tuple[Any, ...] = (),
                 serial: int = 0, flags: int = 0):
        self.kind = kind
        self.fields = fields
        self.body = tuple(body)
        self.serial = serial
        self.flags = flags

    path = property(lambda self: self.fields.get(PATH))
    interface = property(lambda self: self.fields.get(INTERFACE))
    member = property(lambda self: self.fields.get(MEMBER))
    sender = property(lambda self: self.fields.get(SENDER))
    signature = property(lambda self: self.fields.get(SIGNATURE, ""))
    reply_serial = property(lambda self: self.fields.get(REPLY_SERIAL))
    error_name = property(lambda self: self.fields.get(ERROR_NAME))

    def encode(self) -> bytes:
        body = _Writer()
        types = split_signature(self.signature)
        if len(types) != len(self.body):
            raise DBusError(f"signature {self.signature!r} does not match the body")
        for type_, value in zip(types, self.body):
            body.write(type_, value)
        fields = _Writer(offset=16)
        for code, value in sorted(self.fields.items()):
            if code == SIGNATURE and not value:
                continue
            fields.align(8)
            fields.write("y", code)
            fields.write("v", Variant(_FIELD_TYPES[code], value))
        head = struct.pack("<cBBBIII", b"l", self.kind, self.flags, 1, len(body.data),
                           self.serial, len(fields.data))
        padding = bytes(-(16 + len(fields.data)) % 8)
        return head + bytes(fields.data) + padding + bytes(body.data)

    @staticmethod
    def length(prefix: bytes) -> int:
        """A message's total size from its first 16 bytes."""
        order = {b"l": "<", b"B": ">"}.get(prefix[:1])
        if order is None:
            raise DBusError("bad byte order mark")
        body, _serial, fields = struct.unpack_from(order + "III", prefix, 4)
        total = 16 + fields + (-(16 + fields) % 8) + body
        if total > MAX_MESSAGE:
            raise DBusError(f"a {total}-byte message")
        return total

    @classmethod
    def decode(cls, data: bytes) -> "Message":
        order = {b"l": "<", b"B": ">"}.get(data[:1])
        if order is None:
            raise DBusError("bad byte order mark")
        kind, flags, _version, body_length, serial = struct.unpack_from(order + "BBBII", data, 1)
        reader = _Reader(data, order, offset=12)
        raw_fields = reader.read("a(yv)")
        fields = {code: value for code, value in raw_fields}
        reader.align(8)
        body_reader = _Reader(data[reader.offset:reader.offset + body_length], order)
        body = tuple(body_reader.read(type_)
                     for type_ in split_signature(fields.get(SIGNATURE, "")))
        return cls(kind, fields, body, serial, flags)


# -- the connection ----------------------------------------------------------------------


def bus_address(system: bool = True) -> str:
    """The system bus (``DBUS_SYSTEM_BUS_ADDRESS`` or the standard socket)."""
    variable = "DBUS_SYSTEM_BUS_ADDRESS" if system else "DBUS_SESSION_BUS_ADDRESS"
    return os.environ.get(variable) or SYSTEM_BUS_ADDRESS


def _socket_addresses(address: str) -> List[str]:
    """Every ``unix:path=`` or ``unix:abstract=`` of a D-Bus address, in its order
    (an address may list several, to be tried in turn)."""
    found = []
    for entry in address.split(";"):
        transport, _, options = entry.partition(":")
        if transport != "unix":
            continue
        pairs = dict(option.split("=", 1) for option in options.split(",") if "=" in option)
        if "path" in pairs:
            found.append(_unescape(pairs["path"]))
        elif "abstract" in pairs:
            found.append("\0" + _unescape(pairs["abstract"]))
    if not found:
        raise DBusError(f"no unix socket in the bus address {address!r}")
    return found


def _socket_address(address: str) -> str:
    """The first ``unix:path=`` or ``unix:abstract=`` of a D-Bus address."""
    return _socket_addresses(address)[0]


def _unescape(value: str) -> str:
    out = bytearray()
    index = 0
    while index < len(value):
        if value[index] == "%" and index + 2 < len(value):
            out.append(int(value[index + 1:index + 3], 16))
            index += 3
        else:
            out += value[index].encode()
            index += 1
    return out.decode("utf-8", "surrogateescape")


class Connection:
    """One authenticated connection to a bus."""

    def __init__(self, address: Optional[str] = None, timeout: float = 5.0):
        self.address = address or bus_address()
        self.timeout = timeout                # the bound of every send
        self._buffer = bytearray()
        self._serial = 0
        self.unique_name = ""
        self.postponed: List[Message] = []   # what arrived during call_sync()
        deadline = time.monotonic() + timeout
        self.sock = self._connect(deadline)
        try:
            self._authenticate(deadline)
            self.unique_name = self.call_sync(BUS_NAME, BUS_PATH, BUS_NAME, "Hello",
                                              timeout=max(0.1, deadline - time.monotonic()))[0]
        except OSError as error:
            self.sock.close()
            raise DBusError(f"cannot connect to the bus at {self.address}:"
                            f" {error.strerror or error}") from None
        except DBusError:
            self.sock.close()
            raise

    def _connect(self, deadline: float) -> socket.socket:
        """A socket connected to the first entry of the address that answers."""
        errors = []
        for where in _socket_addresses(self.address):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                sock.connect(where)
                return sock
            except OSError as error:
                sock.close()
                errors.append(f"{where.lstrip(chr(0))}: {error.strerror or error}")
        raise DBusError(f"cannot connect to the bus at {self.address}: {'; '.join(errors)}")

    def _authenticate(self, deadline: float) -> None:
        uid = str(os.geteuid()).encode("ascii").hex()
        self.sock.sendall(b"\0AUTH EXTERNAL " + uid.encode("ascii") + b"\r\n")
        line = bytearray()
        while not line.endswith(b"\r\n"):
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(1)
            if not chunk or len(line) > 4096:
                raise DBusError("the bus closed during authentication")
            line += chunk
        if not line.startswith(b"OK "):
            raise DBusError(f"the bus refused EXTERNAL authentication: {bytes(line)!r}")
        self.sock.sendall(b"BEGIN\r\n")

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Message) -> int:
        """Send ``message`` with the next serial; returns the serial."""
        self._serial += 1
        message.serial = self._serial
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(message.encode())
        except OSError as error:
            raise DBusError(f"the bus connection failed: {error.strerror or error}") from None
        return message.serial

    def call(self, destination: str, path: str, interface: str, member: str,
             signature: str = "", *body: Any) -> int:
        fields = {PATH: path, INTERFACE: interface, MEMBER: member, DESTINATION: destination}
        if signature:
            fields[SIGNATURE] = signature
        return self.send(Message(METHOD_CALL, fields, body))

    def reply(self, call: Message, signature: str = "", *body: Any) -> None:
        """Answer ``call`` (nothing if its caller asked for no reply)."""
        if call.flags & NO_REPLY_EXPECTED:
            return
        fields = {REPLY_SERIAL: call.serial}
        if call.sender:
            fields[DESTINATION] = call.sender
        if signature:
            fields[SIGNATURE] = signature
        self.send(Message(METHOD_RETURN, fields, body))

    def reply_error(self, call: Message, name: str, text: str) -> None:
        if call.flags & NO_REPLY_EXPECTED:
            return
        fields = {REPLY_SERIAL: call.serial, ERROR_NAME: name, SIGNATURE: "s"}
        if call.sender:
            fields[DESTINATION] = call.sender
        self.send(Message(ERROR, fields, (text,)))

    def signal(self, path: str, interface: str, member: str, signature: str = "",
               *body: Any) -> None:
        fields = {PATH: path, INTERFACE: interface, MEMBER: member}
        if signature:
            fields[SIGNATURE] = signature
        self.send(Message(SIGNAL, fields, body, flags=NO_REPLY_EXPECTED))

    def feed(self, data: bytes) -> List[Message]:
        """Received bytes in, complete messages out."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= 16:
            total = Message.length(bytes(self._buffer[:16]))
            if len(self._buffer) < total:
                break
            messages.append(Message.decode(bytes(self._buffer[:total])))
            del self._buffer[:total]
        return messages

    def receive(self, timeout: float) -> List[Message]:
        """Block up to ``timeout`` for at least one message (an empty list: none came)."""
        try:
            self.sock.settimeout(max(0.001, timeout))
            data = self.sock.recv(65536)
        except socket.timeout:
            return []
        except OSError as error:
            raise DBusError(f"the bus connection failed: {error.strerror or error}") from None
        if not data:
            raise DBusError("the bus closed the connection")
        return self.feed(data)

    def pending(self) -> List[Message]:
        """Without waiting: the postponed messages and those the socket already holds."""
        data = bytearray()
        while True:
            try:
                self.sock.settimeout(0.0)
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                raise DBusError(f"the bus connection failed: {error.strerror or error}") from None
            if not chunk:
                raise DBusError("the bus closed the connection")
            data += chunk
        return self.take_postponed() + self.feed(bytes(data))

    def call_sync(self, destination: str, path: str, interface: str, member: str,
                  signature: str = "", *body: Any, timeout: float = 5.0) -> Tuple[Any, ...]:
        """A method call and its reply's body, blocking; other messages are kept for later."""
        serial = self.call(destination, path, interface, member, signature, *body)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DBusError(f"no reply to {interface}.{member} within {timeout} s")
            for message in self.receive(left):
                if message.reply_serial == serial and message.kind == METHOD_RETURN:
                    return message.body
                if message.reply_serial == serial and message.kind == ERROR:
                    raise DBusError(f"{member}: {message.error_name}: "
                                    f"{message.body[0] if message.body else ''}")
                self.postponed.append(message)

    def add_match(self, rule: str, timeout: float = 5.0) -> None:
        self.call_sync(BUS_NAME, BUS_PATH, BUS_NAME, "AddMatch", "s", rule, timeout=timeout)

    def take_postponed(self) -> List[Message]:
        postponed, self.postponed = self.postponed, []
        return postponed

    def close(self) -> None:
        self.sock.close()
