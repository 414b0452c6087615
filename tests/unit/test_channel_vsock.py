"""vsock-listen: qemu's address syntax and errors; binding where the kernel has AF_VSOCK.

Connecting needs a vsock transport that loops back to the guest itself
(vsock_loopback); machines without one (most CI and VM hosts, this one
included) skip the end-to-end test.
"""

from __future__ import annotations

import random
import socket
import time

import pytest

from qga.channel.vsock import VsockListenChannel, parse_address
from qga.errors import ChannelError

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_LOCAL = 1


@pytest.mark.parametrize("text, address", [
    ("3:5000", (3, 5000)),
    ("4294967295:1", (4294967295, 1)),
    ("1:4294967295", (1, 4294967295)),
    ("0001:07", (1, 7)),
])
def test_parse_address(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text, message", [
    ("foo", "error parsing address 'foo'"),
    ("", "error parsing address ''"),
    (":5000", "error parsing address ':5000'"),
    ("3:", "error parsing address '3:'"),
    ("1" * 33 + ":1", "error parsing address '" + "1" * 33 + ":1'"),
    ("3:5000,x", "trailing characters in address '3:5000,x'"),
    ("3:" + "1" * 33, "trailing characters in address '3:" + "1" * 33 + "'"),
    ("x:1", "Failed to parse cid 'x'"),
    ("-1:1", "Failed to parse cid '-1'"),
    ("4294967296:1", "Failed to parse cid '4294967296'"),
    ("2:x", "Failed to parse port 'x'"),
    ("2:1:2", "Failed to parse port '1:2'"),
])
def test_parse_errors_are_qemus(text, message):
    with pytest.raises(ChannelError) as caught:
        parse_address(text)
    assert str(caught.value) == message


def vsock_available():
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
        return True
    except (AttributeError, OSError):
        return False


needs_vsock = pytest.mark.skipif(not vsock_available(), reason="the kernel has no AF_VSOCK")


def listen_somewhere(cid):
    for _ in range(20):
        port = random.randint(20000, 60000)
        channel = VsockListenChannel(f"{cid}:{port}")
        try:
            channel.open()
        except ChannelError as error:
            if "Address already in use" in str(error):
                continue
            raise
        return channel, port
    pytest.fail("no free vsock port")


@needs_vsock
def test_listens_on_any_cid():
    channel, _port = listen_somewhere(VMADDR_CID_ANY)
    try:
        assert channel.fileno() >= 0
        assert channel.read() is None  # no client yet
        channel.write(b"nobody\n")  # dropped
    finally:
        channel.close()


@needs_vsock
def test_foreign_cid_cannot_be_bound():
    with pytest.raises(ChannelError, match="^Failed to bind socket: Cannot assign requested address$"):
        VsockListenChannel("99:5000").open()


def loopback_works():
    if not vsock_available():
        return False
    probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        probe.bind((VMADDR_CID_LOCAL, socket.VMADDR_PORT_ANY))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.mark.skipif(not loopback_works(), reason="no vsock loopback transport (vsock_loopback)")
def test_serves_a_client_over_loopback():
    channel, port = listen_somewhere(VMADDR_CID_LOCAL)
    try:
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect((VMADDR_CID_LOCAL, port))
            client.sendall(b'{"execute":"guest-ping"}')
            data = b""
            deadline = time.monotonic() + 5
            while not data and time.monotonic() < deadline:
                data = channel.read() or b""
                time.sleep(0.005)
            assert data == b'{"execute":"guest-ping"}'
            channel.write(b'{"return": {}}\n')
            assert client.recv(100) == b'{"return": {}}\n'
    finally:
        channel.close()
