"""sd_notify against real datagram sockets: a path, an abstract name, none at all."""

from __future__ import annotations

import os
import socket
import time

import pytest

from qga import sdnotify
from qga.loop import Loop


@pytest.fixture
def path_listener(short_tmp):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(short_tmp / "notify")
    sock.bind(address)
    sock.settimeout(2)
    yield sock, {"NOTIFY_SOCKET": address}
    sock.close()


@pytest.fixture
def abstract_listener():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"qga-test-notify-{os.getpid()}-{os.urandom(4).hex()}"
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    yield sock, {"NOTIFY_SOCKET": "@" + name}
    sock.close()


def test_ready_reaches_a_path_socket(path_listener):
    sock, env = path_listener
    assert sdnotify.notify("READY=1", env) is True
    assert sock.recv(4096) == b"READY=1"


def test_ready_reaches_an_abstract_socket(abstract_listener):
    sock, env = abstract_listener
    assert sdnotify.notify("READY=1", env) is True
    assert sock.recv(4096) == b"READY=1"


def test_every_message_kind(abstract_listener):
    sock, env = abstract_listener
    assert sdnotify.ready("serving", env)
    assert sdnotify.status("frozen\nsince now", env)
    assert sdnotify.watchdog_ping(env)
    assert sdnotify.stopping(env)
    received = [sock.recv(4096) for _ in range(4)]
    assert received == [b"READY=1\nSTATUS=serving", b"STATUS=frozen since now",
                        b"WATCHDOG=1", b"STOPPING=1"]


def test_reads_the_process_environment_by_default(path_listener, monkeypatch):
    sock, env = path_listener
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert sdnotify.notify("STATUS=x") is True
    assert sock.recv(4096) == b"STATUS=x"


@pytest.mark.parametrize("value", [None, "", "@", "relative/path", "vsock:2:1234"])
def test_no_usable_socket_is_a_quiet_no(value):
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    assert sdnotify.notify("READY=1", env) is False


def test_a_socket_nobody_listens_on_is_a_quiet_no(short_tmp):
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(short_tmp / "gone")}) is False


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "lots"}, None),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}, 2.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4243"}, None),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, None),
])
def test_watchdog_timeout(env, expected):
    assert sdnotify.watchdog_timeout(env, pid=4242) == expected


def test_watchdog_interval_is_half_the_timeout():
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({}) is None


def test_watchdog_pings_from_the_loop_until_cancelled(abstract_listener):
    sock, env = abstract_listener
    env = dict(env, WATCHDOG_USEC="100000", WATCHDOG_PID=str(os.getpid()))
    loop = Loop()
    try:
        watchdog = sdnotify.Watchdog(loop, env)
        assert watchdog.start() is True
        loop.call_later(0.32, loop.stop)
        loop.run()
        watchdog.cancel()
        loop.call_later(0.15, loop.stop)
        loop.run()
    finally:
        loop.close()
    sock.setblocking(False)
    pings = []
    while True:
        try:
            pings.append(sock.recv(64))
        except BlockingIOError:
            break
    # One at start, then every 50 ms for 320 ms; none after cancel().
    assert set(pings) == {b"WATCHDOG=1"}
    assert 5 <= len(pings) <= 8


def test_watchdog_not_armed_does_nothing():
    loop = Loop()
    try:
        watchdog = sdnotify.Watchdog(loop, {})
        assert watchdog.start() is False
        started = time.monotonic()
        loop.run_once(max_wait=0)
        assert time.monotonic() - started < 0.5
        watchdog.cancel()
    finally:
        loop.close()
