"""The minimal D-Bus client's wire format: every container type, both byte orders, limits."""

from __future__ import annotations

import socket
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


def test_every_unix_entry_of_an_address_is_listed_in_order():
    assert dbus._socket_addresses("unix:path=/a;tcp:host=x;unix:abstract=b,guid=1") == \
        ["/a", "\0b"]
    with pytest.raises(dbus.DBusError, match="no unix socket"):
        dbus._socket_addresses("tcp:host=x")


def test_connecting_tries_each_entry_and_names_every_failure(tmp_path):
    with pytest.raises(dbus.DBusError, match="cannot connect.*/one: .*; .*/two: "):
        dbus.Connection(f"unix:path={tmp_path}/one;unix:path={tmp_path}/two", timeout=1)


@pytest.fixture
def peer():
    """A Connection on one end of a socket pair (no bus), and the other end."""
    ours, theirs = socket.socketpair()
    connection = dbus.Connection.__new__(dbus.Connection)
    connection.sock, connection.timeout = ours, 1.0
    connection._buffer, connection._serial, connection.postponed = bytearray(), 0, []
    yield connection, theirs
    ours.close()
    theirs.close()


def test_pending_returns_what_arrived_without_waiting(peer):
    connection, other = peer
    assert connection.pending() == []  # nothing there: no wait, no error
    postponed = dbus.Message(dbus.SIGNAL, {dbus.PATH: "/a", dbus.INTERFACE: "x.y",
                                           dbus.MEMBER: "Early"}, serial=1)
    connection.postponed.append(postponed)
    other.sendall(dbus.Message(dbus.SIGNAL, {dbus.PATH: "/b", dbus.INTERFACE: "x.y",
                                             dbus.MEMBER: "Late"}, serial=2).encode())
    assert [message.member for message in connection.pending()] == ["Early", "Late"]
    assert connection.postponed == []
    other.close()
    with pytest.raises(dbus.DBusError, match="closed"):
        connection.pending()


def test_no_reply_goes_to_a_call_that_expects_none(peer):
    connection, other = peer
    fields = {dbus.PATH: "/p", dbus.INTERFACE: "x.y", dbus.MEMBER: "M", dbus.SENDER: ":1.9"}
    quiet = dbus.Message(dbus.METHOD_CALL, fields, serial=4, flags=dbus.NO_REPLY_EXPECTED)
    connection.reply(quiet)
    connection.reply_error(quiet, "x.Error", "no")
    connection.reply(dbus.Message(dbus.METHOD_CALL, fields, serial=5))
    other.settimeout(1)
    [answer] = connection.feed(other.recv(65536))  # only the call that wants an answer
    assert (answer.kind, answer.reply_serial, answer.fields[dbus.DESTINATION]) == \
        (dbus.METHOD_RETURN, 5, ":1.9")


def test_a_broken_socket_is_a_dbus_error(peer):
    connection, other = peer
    other.close()
    signal = ("/p", "x.y", "M")
    with pytest.raises(dbus.DBusError, match="the bus connection failed"):
        for _ in range(3):  # the first send may still be buffered
            connection.signal(*signal)
    connection.sock.close()
    with pytest.raises(dbus.DBusError, match="the bus connection failed"):
        connection.receive(0.1)
