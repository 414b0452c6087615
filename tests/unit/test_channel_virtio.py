"""virtio-serial on a pty: the port stays open, an absent host costs nothing, reconnects are instant.

A pty stands in for the port.  With the agent on the master side and the
"host" on the slave side, the host can close and reopen its end the way
a host process comes and goes: while it is away the master reports POLLHUP
without end (as a virtio port does), and reading it fails with EIO.
"""

from __future__ import annotations

import os
import pty
import threading
import time
import tty

import pytest

from qga.channel.virtio import VirtioSerialChannel
from qga.errors import ChannelError
from qga.loop import Loop


class PortPair:
    """A pty: ``channel`` adopts the master, the host opens and closes the slave."""

    def __init__(self):
        master, slave = pty.openpty()
        self.name = os.ttyname(slave)
        tty.setraw(slave)  # the settings stay with the pty when the slave is closed
        os.close(slave)
        self.host = None
        self.channel = VirtioSerialChannel(self.name, fd=master)
        self.channel.open()

    def connect(self):
        self.host = os.open(self.name, os.O_RDWR | os.O_NOCTTY)

    def disconnect(self):
        os.close(self.host)
        self.host = None

    def host_read(self, timeout=2.0):
        deadline = time.monotonic() + timeout
        os.set_blocking(self.host, False)
        data = b""
        while time.monotonic() < deadline:
            try:
                data += os.read(self.host, 65536)
            except BlockingIOError:
                if data:
                    return data
                time.sleep(0.005)
        return data

    def close(self):
        if self.host is not None:
            self.disconnect()
        self.channel.close()


@pytest.fixture
def port():
    pair = PortPair()
    yield pair
    pair.close()


def finishes(function, timeout=5.0):
    """Run ``function`` in a thread; True if it returned within ``timeout``."""
    worker = threading.Thread(target=function, daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive()


def drain(channel):
    chunks = []
    while True:
        data = channel.read()
        if data is None:
            return b"".join(chunks)
        chunks.append(data)


class Watched:
    """The channel registered in a real Loop the way the agent registers it."""

    def __init__(self, channel, edge=None):
        self.channel = channel
        self.loop = Loop()
        self.wakeups = 0
        self.received = []
        self.loop.add_reader(channel.fileno(), self._ready,
                             edge=channel.edge_triggered if edge is None else edge)

    def _ready(self, _events):
        self.wakeups += 1
        data = drain(self.channel)
        if data:
            self.received.append((time.monotonic(), data))

    def run_for(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.loop.run_once(max_wait=deadline - time.monotonic())

    def run_until_received(self, timeout=2.0):
        deadline = time.monotonic() + timeout
        while not self.received and time.monotonic() < deadline:
            self.loop.run_once(max_wait=deadline - time.monotonic())
        return self.received

    def close(self):
        self.loop.close()


def test_is_edge_triggered():
    assert VirtioSerialChannel("/dev/null").edge_triggered is True


def test_request_and_reply(port):
    port.connect()
    os.write(port.host, b'{"execute":"guest-ping"}')
    assert drain(port.channel) == b'{"execute":"guest-ping"}'
    port.channel.write(b'{"return": {}}\n')
    assert port.host_read() == b'{"return": {}}\n'


@pytest.mark.timeout(60)
def test_read_drains_large_input_in_chunks(port):
    port.connect()
    payload = bytes(range(256)) * 1000
    writer = threading.Thread(target=os.write, args=(port.host, payload), daemon=True)
    writer.start()
    received = b""
    deadline = time.monotonic() + 5
    while len(received) < len(payload) and time.monotonic() < deadline:
        received += drain(port.channel)
        time.sleep(0.001)
    writer.join(1)
    assert received == payload


def test_host_absent_reads_nothing_and_keeps_the_port(port):
    assert port.channel.read() is None  # nobody ever connected
    port.connect()
    port.disconnect()
    assert port.channel.read() is None
    assert port.channel.fileno() >= 0  # never closed


def test_write_while_host_absent_is_dropped(port):
    # More than a pty buffers: this would block if the reply were not dropped.
    assert finishes(lambda: port.channel.write(b"x" * (1 << 20)))


def test_absent_host_costs_no_cpu(port):
    watched = Watched(port.channel)
    try:
        cpu = time.process_time()
        watched.run_for(0.5)
        cpu = time.process_time() - cpu
    finally:
        watched.close()
    assert watched.wakeups <= 1
    assert cpu < 0.05


def test_level_triggered_would_spin(port):
    """The reason for edge triggering: level-triggered, an absent host wakes us without end."""
    watched = Watched(port.channel, edge=False)
    try:
        watched.run_for(0.1)
    finally:
        watched.close()
    assert watched.wakeups > 100


def test_first_request_after_reconnect_is_read_at_once(port):
    watched = Watched(port.channel)
    try:
        for _ in range(3):
            watched.run_for(0.1)  # host absent
            watched.received.clear()
            port.connect()
            sent = time.monotonic()
            os.write(port.host, b'{"execute":"guest-sync","arguments":{"id":1}}')
            received = watched.run_until_received()
            assert received and received[0][1] == b'{"execute":"guest-sync","arguments":{"id":1}}'
            assert received[0][0] - sent < 0.05
            port.channel.write(b'{"return": 1}\n')
            assert port.host_read() == b'{"return": 1}\n'
            port.disconnect()
    finally:
        watched.close()


def test_open_by_path(tmp_path):
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    tty.setraw(slave)
    os.close(slave)
    channel = VirtioSerialChannel(name)
    channel.open()
    try:
        assert not os.get_inheritable(channel.fileno())
        assert not os.get_blocking(channel.fileno())
        os.write(master, b"{}")
        time.sleep(0.02)
        assert drain(channel) == b"{}"
        channel.write(b"ok\n")
        assert os.read(master, 100) == b"ok\n"
        # A tty port whose other side vanishes is hung up for good: EOF, no error.
        os.close(master)
        master = None
        assert channel.read() is None
        channel.write(b"lost\n")
    finally:
        channel.close()
        if master is not None:
            os.close(master)


def test_open_error_is_qemu_gas():
    with pytest.raises(ChannelError) as caught:
        VirtioSerialChannel("/nonexistent/org.qemu.guest_agent.0").open()
    assert str(caught.value) == ("error opening channel '/nonexistent/org.qemu.guest_agent.0':"
                                 " No such file or directory")


def test_read_error_other_than_absence_is_a_channel_error(tmp_path):
    channel = VirtioSerialChannel(str(tmp_path))
    channel._fd = os.open(str(tmp_path), os.O_RDONLY)  # a directory: EISDIR on read
    try:
        with pytest.raises(ChannelError, match="^error reading channel: Is a directory$"):
            channel.read()
    finally:
        channel.close()
