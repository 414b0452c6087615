"""Channel mode's relay on a pty standing in for the port (agent: master, host: slave)."""

from __future__ import annotations

import os
import pty
import select
import socket
import time
import tty

import pytest

from qga.channel.virtio import VirtioSerialChannel
from qga.ext import relay as relay_module
from qga.ext.proxy import Stream
from qga.ext.relay import PortRelay, find_port
from qga.loop import Loop


class Rig:
    def __init__(self):
        self.loop = Loop()
        self.frozen = False
        self.hosts = []
        master, slave = pty.openpty()
        self.slave_name = os.ttyname(slave)
        tty.setraw(slave)
        os.close(slave)
        self.host = None
        self.relay = PortRelay("hello", self.loop, ["port0"], "/nonexistent",
                               lambda: self.frozen, self.hosts.append)
        port = VirtioSerialChannel(self.slave_name, fd=master)
        port.open()
        self.relay.use_port(port)
        ours, self.extension = socket.socketpair()
        self.extension.setblocking(False)
        self.stream = Stream(self.loop, ours, lambda data: None, lambda: None)
        assert self.relay.attach(self.stream, b"")

    def host_open(self):
        self.host = os.open(self.slave_name, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    def host_close(self):
        os.close(self.host)
        self.host = None

    def spin(self, seconds=0.1):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.loop.run_once(0.01)

    def host_read(self):
        self.spin()
        data = b""
        while True:
            try:
                chunk = os.read(self.host, 65536)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk

    def extension_read(self):
        self.spin()
        data = b""
        while True:
            try:
                chunk = self.extension.recv(65536)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk

    def close(self):
        self.relay.close()
        self.extension.close()
        if self.host is not None:
            os.close(self.host)
        self.loop.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_bytes_flow_both_ways_untouched(rig):
    rig.host_open()
    os.write(rig.host, b'{"__name__": "refresh"}\n\x00\xff')
    assert rig.extension_read() == b'{"__name__": "refresh"}\n\x00\xff'
    assert rig.hosts[-1] is True
    rig.extension.sendall(b'{"__name__": "heartbeat"}\n')
    assert rig.host_read() == b'{"__name__": "heartbeat"}\n'


def test_an_absent_host_drops_bytes_and_its_return_is_noticed(rig):
    assert rig.hosts == [False]  # the pty's far end is closed: POLLHUP, as a port
    rig.extension.sendall(b"lost\n")
    rig.spin()
    rig.host_open()
    os.write(rig.host, b"hello\n")  # the host's first bytes tell us it is there
    assert rig.extension_read() == b"hello\n"
    assert rig.hosts == [False, True]
    assert rig.host_read() == b""  # "lost" was dropped, not held for it
    rig.host_close()
    rig.spin()
    assert rig.hosts == [False, True, False]


def test_while_frozen_bytes_wait(rig, monkeypatch):
    monkeypatch.setattr(relay_module, "FROZEN_POLL", 0.05)
    rig.host_open()
    os.write(rig.host, b"x")
    assert rig.extension_read() == b"x"
    rig.frozen = True
    os.write(rig.host, b"to the extension\n")
    rig.extension.sendall(b"to the host\n")
    assert rig.extension_read() == b"" and rig.host_read() == b""
    rig.frozen = False
    rig.spin(0.2)
    assert rig.extension_read() == b"to the extension\n"
    assert rig.host_read() == b"to the host\n"


def test_an_extension_that_does_not_read_is_bounded(rig, monkeypatch):
    monkeypatch.setattr(relay_module, "BUFFER", 64 * 1024)
    rig.host_open()
    sent = 0
    chunk = b"y" * 4096
    for _ in range(400):  # 1.6 MB offered by the host
        try:
            sent += os.write(rig.host, chunk)
        except BlockingIOError:
            pass
        rig.loop.run_once(0.001)
    assert len(rig.relay._to_extension) <= 64 * 1024
    assert rig.stream.pending_output <= rig.stream.max_output
    received = 0
    deadline = time.monotonic() + 5
    while received < sent and time.monotonic() < deadline:
        received += len(rig.extension_read())
    assert received == sent  # nothing lost: the kernel held the rest meanwhile


def test_find_port_takes_the_first_that_exists(tmp_path):
    (tmp_path / "com.redhat.rhevm.vdsm").touch()
    ports = ["ovirt-guest-agent.0", "com.redhat.rhevm.vdsm"]
    assert find_port(ports, str(tmp_path)) == str(tmp_path / "com.redhat.rhevm.vdsm")
    (tmp_path / "ovirt-guest-agent.0").touch()
    assert find_port(ports, str(tmp_path)) == str(tmp_path / "ovirt-guest-agent.0")
    assert find_port(["none"], str(tmp_path)) is None


def test_a_port_that_appears_later_is_opened(tmp_path, monkeypatch):
    monkeypatch.setattr(relay_module, "PORT_RETRY", 0.05)
    loop = Loop()
    master, slave = pty.openpty()
    tty.setraw(slave)
    relay = PortRelay("hello", loop, ["port0"], str(tmp_path), lambda: False, lambda c: None)
    try:
        relay.open()
        assert relay.port is None
        os.symlink(os.ttyname(slave), tmp_path / "port0")
        deadline = time.monotonic() + 2
        while relay.port is None and time.monotonic() < deadline:
            loop.run_once(0.02)
        assert relay.port is not None and relay.port.path == str(tmp_path / "port0")
    finally:
        relay.close()
        os.close(master)
        os.close(slave)
        loop.close()


def test_a_removal_notice_follows_what_is_pending_and_never_waits(rig):
    rig.host_open()
    os.write(rig.host, b"x")           # the host is there
    assert rig.extension_read() == b"x"
    rig.extension.sendall(b'{"__name__": "heartbeat"}\n')
    rig.spin()
    rig.relay.farewell(b'{"__name__": "uninstalled"}\n')
    assert rig.host_read() == b'{"__name__": "heartbeat"}\n{"__name__": "uninstalled"}\n'


def test_no_host_no_removal_notice(rig):
    assert rig.hosts == [False]
    started = time.monotonic()
    rig.relay.farewell(b'{"__name__": "uninstalled"}\n')
    assert time.monotonic() - started < 0.5
    rig.host_open()
    assert rig.host_read() == b""     # nothing was left waiting for the host


def test_a_stopped_extensions_port_is_opened_for_the_removal_notice(tmp_path):
    master, slave = pty.openpty()
    tty.setraw(slave)
    os.symlink(os.ttyname(slave), tmp_path / "port0")
    os.close(slave)
    loop = Loop()
    relay = PortRelay("hello", loop, ["missing.0", "port0"], str(tmp_path), lambda: False,
                      lambda connected: None)
    try:
        relay.close()                  # as after a stop: no port held
        relay.farewell(b'{"__name__": "uninstalled"}\n')
        assert select.select([master], [], [], 5)[0]
        assert os.read(master, 4096) == b'{"__name__": "uninstalled"}\n'
        relay.ports_dir = str(tmp_path / "nowhere")
        relay.farewell(b"x")           # no port: nothing, no error
    finally:
        os.close(master)
        loop.close()
