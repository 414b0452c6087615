"""unix-listen: one client at a time, the backlog waits, qemu's socket-file rules and errors."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time

import pytest

from qga.channel import make_channel, open_channel
from qga.channel.unix import UnixListenChannel
from qga.config import Config
from qga.errors import ChannelError


@pytest.fixture
def sock_path(short_tmp):
    return short_tmp / "qga.sock"


@pytest.fixture
def channel(sock_path):
    chan = UnixListenChannel(str(sock_path))
    chan.open()
    yield chan
    chan.close()


def connect(path):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(path))
    return client


def read_until(channel, predicate, timeout=2.0):
    """Call read() as the agent does (whenever there may be something) until predicate(data)."""
    data = b""
    deadline = time.monotonic() + timeout
    while not predicate(data) and time.monotonic() < deadline:
        chunk = channel.read()
        if chunk is None:
            time.sleep(0.005)
        else:
            data += chunk
    return data


def test_level_triggered():
    assert UnixListenChannel("/x").edge_triggered is False


def test_serves_a_client(channel, sock_path):
    listening_fd = channel.fileno()
    assert channel.read() is None  # nobody there yet
    with connect(sock_path) as client:
        client.sendall(b'{"execute":"guest-ping"}')
        assert read_until(channel, bool) == b'{"execute":"guest-ping"}'
        assert channel.fileno() != listening_fd  # now the client's socket
        channel.write(b'{"return": {}}\n')
        assert client.recv(100) == b'{"return": {}}\n'
    assert read_until(channel, lambda _: not channel.connected) == b""
    assert channel.fileno() == listening_fd


def test_one_client_at_a_time(channel, sock_path):
    first = connect(sock_path)
    second = connect(sock_path)  # waits in the backlog
    second.sendall(b"from the second")
    first.sendall(b"from the first")
    assert read_until(channel, bool) == b"from the first"
    channel.write(b"to the first\n")
    assert first.recv(100) == b"to the first\n"
    first.close()
    # The second is served once the first has gone, with what it sent meanwhile.
    assert read_until(channel, lambda data: data == b"from the second") == b"from the second"
    channel.write(b"to the second\n")
    assert second.recv(100) == b"to the second\n"
    second.close()


def test_client_that_sends_and_leaves(channel, sock_path):
    with connect(sock_path) as client:
        client.sendall(b"request")
    assert channel.read() == b"request"  # the data first ...
    assert channel.read() is None  # ... then the end
    assert not channel.connected


def test_writes_without_a_client_are_dropped(channel, sock_path):
    channel.write(b"nobody listens\n")
    with connect(sock_path) as client:
        client.sendall(b"x")
        read_until(channel, bool)
        client.shutdown(socket.SHUT_RDWR)
    channel.write(b"client gone\n" * 10000)  # EPIPE or ECONNRESET: dropped


def test_large_reply_to_a_slow_reader(channel, sock_path):
    reply = os.urandom(4 << 20)
    with connect(sock_path) as client:
        client.sendall(b"x")
        read_until(channel, bool)
        received = bytearray()

        def slow_reader():
            while len(received) < len(reply):
                time.sleep(0.001)
                received.extend(client.recv(65536))

        reader = threading.Thread(target=slow_reader, daemon=True)
        reader.start()
        channel.write(reply)  # waits in poll() for the reader, all of it arrives
        reader.join(10)
    assert bytes(received) == reply


def test_stale_socket_and_files_are_replaced(sock_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()
    for leftover in ("socket", "file"):
        if leftover == "file":
            sock_path.unlink()
            sock_path.write_text("not a socket")
        chan = UnixListenChannel(str(sock_path))
        chan.open()
        try:
            assert stat.S_ISSOCK(sock_path.stat().st_mode)
            connect(sock_path).close()
        finally:
            chan.close()
        assert sock_path.exists()  # left behind on close, as qemu-ga leaves it


def test_socket_is_not_inherited(channel, sock_path):
    assert not os.get_inheritable(channel.fileno())
    with connect(sock_path) as client:
        client.sendall(b"x")
        read_until(channel, bool)
        assert not os.get_inheritable(channel.fileno())


@pytest.mark.parametrize("make_path, message", [
    (lambda tmp: tmp, "Failed to unlink socket {path}: Is a directory"),
    (lambda tmp: tmp / "missing" / "qga.sock",
     "Failed to bind socket to {path}: No such file or directory"),
    (lambda tmp: tmp / ("a" * 120), "UNIX socket path '{path}' is too long"),
])
def test_errors_are_qemus(short_tmp, make_path, message):
    path = make_path(short_tmp)
    with pytest.raises(ChannelError) as caught:
        UnixListenChannel(str(path)).open()
    assert str(caught.value) == message.format(path=path)


def test_inherited_listening_socket(sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    chan = open_channel(Config(method="unix-listen", path=None, listen_fd=listener.detach()))
    try:
        with connect(sock_path) as client:
            client.sendall(b"activated")
            assert read_until(chan, bool) == b"activated"
    finally:
        chan.close()


def test_factory_knows_every_method(sock_path):
    for method, module in (("virtio-serial", "virtio"), ("isa-serial", "isa"),
                           ("unix-listen", "unix"), ("vsock-listen", "vsock")):
        chan = make_channel(Config(method=method, path="/p"))
        assert type(chan).__module__ == f"qga.channel.{module}"
    with pytest.raises(ChannelError, match="^unsupported channel method/type: bogus$"):
        make_channel(Config(method="bogus", path="/p"))
