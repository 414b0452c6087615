"""The minimal D-Bus client's wire format: every container type, both byte orders, limits."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extensions" / "ovirt_sso"))

from ovirt_agent import dbus  # noqa: E402


def test_signatures():
    assert dbus.split_signature("sa{sv}as") == ["s", "a{sv}", "as"]
    assert dbus.split_signature("a(susso)ya{s(ii)}v") == ["a(susso)", "y", "a{s(ii)}", "v"]
    for bad in ("a", "(s", "a{sv", "z"):
        with pytest.raises(dbus.DBusError):
            dbus.split_signature(bad)


def test_round_trip_of_every_type():
    sessions = [("1", 1000, "alice", "seat0", "/org/s/1")]
    properties = {"Class": dbus.Variant("s", "user"), "LockedHint": dbus.Variant("b", True),
                  "Nested": dbus.Variant("a{sx}", {"k": 5})}
    basics = (7, True, -3, 12, -(1 << 40), 1 << 63, 2.5, "caf\u00e9", "/a/b", "a{sv}")
    message = dbus.Message(dbus.SIGNAL, {dbus.PATH: "/p", dbus.INTERFACE: "i.f",
                                         dbus.MEMBER: "M",
                                         dbus.SIGNATURE: "ybnixtdsoga(susso)a{sv}asv"},
                           basics + (sessions, properties, [], dbus.Variant("(ii)", (1, 2))),
                           serial=9)
    data = message.encode()
    assert dbus.Message.length(data[:16]) == len(data)
    decoded = dbus.Message.decode(data)
    assert (decoded.kind, decoded.serial, decoded.path, decoded.member) == (dbus.SIGNAL, 9,
                                                                           "/p", "M")
    assert decoded.body[:10] == basics
    assert decoded.body[10] == sessions
    assert decoded.body[11] == {"Class": "user", "LockedHint": True, "Nested": {"k": 5}}
    assert decoded.body[12:] == ([], (1, 2))


def test_big_endian_messages_are_read():
    # A METHOD_RETURN in big-endian order with body "s" = "hi", built by hand.
    fields = bytearray()
    fields += bytes([dbus.REPLY_SERIAL, 1]) + b"u\0" + struct.pack(">I", 3)
    fields += bytes(-len(fields) % 8)
    fields += bytes([dbus.SIGNATURE, 1]) + b"g\0" + b"\x01s\0"
    body = struct.pack(">I", 2) + b"hi\0"
    head = struct.pack(">cBBBIII", b"B", dbus.METHOD_RETURN, 0, 1, len(body), 5, len(fields))
    data = head + bytes(fields) + bytes(-(16 + len(fields)) % 8) + body
    message = dbus.Message.decode(data)
    assert (message.reply_serial, message.body) == (3, ("hi",))


def test_feed_splits_messages_and_refuses_garbage():
    connection = dbus.Connection.__new__(dbus.Connection)
    connection._buffer = bytearray()
    one = dbus.Message(dbus.SIGNAL, {dbus.PATH: "/a", dbus.INTERFACE: "x.y", dbus.MEMBER: "A"},
                       serial=1).encode()
    two = dbus.Message(dbus.SIGNAL, {dbus.PATH: "/b", dbus.INTERFACE: "x.y", dbus.MEMBER: "B",
                                     dbus.SIGNATURE: "s"}, ("z",), serial=2).encode()
    stream = one + two
    assert connection.feed(stream[:10]) == []
    got = connection.feed(stream[10:])
    assert [message.member for message in got] == ["A", "B"]
    with pytest.raises(dbus.DBusError):
        connection.feed(b"X" + bytes(15))
    with pytest.raises(dbus.DBusError):
        dbus.Message.decode(two[:-3])


def test_bus_addresses(monkeypatch):
    assert dbus._socket_address("unix:path=/run/dbus/system_bus_socket") == \
        "/run/dbus/system_bus_socket"
    assert dbus._socket_address("tcp:host=x;unix:abstract=/tmp/dbus-%41b,guid=1") == \
        "\0/tmp/dbus-Ab"
    with pytest.raises(dbus.DBusError):
        dbus._socket_address("tcp:host=localhost,port=1")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/x")
    assert dbus.bus_address() == "unix:path=/x"
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS")
    assert dbus.bus_address() == dbus.SYSTEM_BUS_ADDRESS
