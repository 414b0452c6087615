"""isa-serial on a pty: qemu-ga's raw settings, stale input dropped, hang-ups survived."""

from __future__ import annotations

import os
import pty
import termios
import time

import pytest

pytest.importorskip("serial")

from qga.channel.isa import IsaSerialChannel  # noqa: E402
from qga.errors import ChannelError  # noqa: E402

CLEARED_INPUT_FLAGS = {
    name: getattr(termios, name)
    for name in ("IGNBRK", "BRKINT", "IGNPAR", "PARMRK", "INPCK", "ISTRIP", "INLCR", "IGNCR",
                 "ICRNL", "IXON", "IXOFF", "IXANY", "IMAXBEL")
}


@pytest.fixture
def serial_pty():
    """(master fd, slave path); the slave starts cooked, with pty defaults."""
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    # Input flags qemu-ga must clear, set beforehand so the test can fail.
    attributes = termios.tcgetattr(slave)
    attributes[0] |= termios.ICRNL | termios.IXON | termios.IMAXBEL | termios.BRKINT
    termios.tcsetattr(slave, termios.TCSANOW, attributes)
    yield master, name, slave
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


def open_channel(name):
    channel = IsaSerialChannel(name)
    channel.open()
    return channel


def drain(channel):
    chunks = []
    while (data := channel.read()) is not None:
        chunks.append(data)
    return b"".join(chunks)


def test_raw_settings_as_qemu_ga(serial_pty):
    _master, name, slave = serial_pty
    channel = open_channel(name)
    try:
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(slave)
    finally:
        channel.close()
    assert [flag for flag, bit in CLEARED_INPUT_FLAGS.items() if iflag & bit] == []
    assert (oflag, lflag) == (0, 0)
    assert (ispeed, ospeed) == (termios.B38400, termios.B38400)
    assert cflag & termios.CSIZE == termios.CS8 and cflag & termios.CREAD
    assert not cflag & (termios.PARENB | termios.CSTOPB | termios.CRTSCTS)
    assert (cc[termios.VMIN], cc[termios.VTIME]) == (1, 0)


def test_stale_input_is_discarded(serial_pty):
    master, name, _slave = serial_pty
    os.write(master, b"garbage from before\n")
    time.sleep(0.02)
    os.read(master, 1000)  # the cooked pty's echo of it
    channel = open_channel(name)
    try:
        assert channel.read() is None
        os.write(master, b'{"execute":"guest-ping"}\r\n')
        time.sleep(0.02)
        assert drain(channel) == b'{"execute":"guest-ping"}\r\n'  # raw: CR kept, no echo
        channel.write(b'{"return": {}}\n')
        assert os.read(master, 100) == b'{"return": {}}\n'  # no CRLF translation
    finally:
        channel.close()


def test_hang_up_reads_as_host_absent(serial_pty):
    master, name, slave = serial_pty
    channel = open_channel(name)
    try:
        assert channel.edge_triggered
        os.close(master)
        assert channel.read() is None
        channel.write(b"lost\n")  # dropped, no error
        assert channel.fileno() >= 0
    finally:
        channel.close()
    assert channel.fileno() == -1


def test_open_error_is_qemu_gas():
    with pytest.raises(ChannelError) as caught:
        open_channel("/nonexistent/ttyS0")
    assert str(caught.value) == "error opening channel '/nonexistent/ttyS0': No such file or directory"


def test_not_a_tty(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ChannelError, match="^error opening channel '.*/file': "):
        open_channel(str(path))
