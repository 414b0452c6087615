"""isa-serial: a plain serial port (``-m isa-serial``, default ``/dev/ttyS0``).

Opened with pyserial (imported only when this method is used) at 38400
baud, 8N1, no flow control, then given qemu-ga's exact raw settings: input
flags IGNBRK BRKINT IGNPAR PARMRK INPCK ISTRIP INLCR IGNCR ICRNL IXON IXOFF
IXANY IMAXBEL cleared, output and local flags zero, VMIN=1 VTIME=0, and the
pending input discarded (TCIFLUSH).  One difference: pyserial also sets
CLOCAL, so a port without carrier detect wired does not hang up on us.

Like virtio-serial the port stays open; a hang-up (EOF, EIO) reads as "host
absent" and the port is watched edge-triggered, since a hung-up tty reports
POLLHUP forever.
"""

from __future__ import annotations

import os
import termios

from qga.channel.base import DeviceChannel
from qga.errors import ChannelError

BAUD_RATE = 38400

_RAW_INPUT_CLEARED = (
    termios.IGNBRK | termios.BRKINT | termios.IGNPAR | termios.PARMRK | termios.INPCK
    | termios.ISTRIP | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
    | termios.IXOFF | termios.IXANY | termios.IMAXBEL
)


class IsaSerialChannel(DeviceChannel):
    """The serial port at ``path``."""

    def __init__(self, path: str):
        super().__init__(path)
        self._port = None

    def open(self) -> None:
        import serial

        port = serial.Serial()
        port.port = self.path
        port.baudrate = BAUD_RATE
        port.bytesize = serial.EIGHTBITS
        port.parity = serial.PARITY_NONE
        port.stopbits = serial.STOPBITS_ONE
        port.xonxoff = port.rtscts = port.dsrdtr = False
        port.timeout = 0
        try:
            port.open()
        except serial.SerialException as error:
            raise self._serial_error(error) from None
        try:
            make_raw(port.fd)
        except termios.error as error:
            port.close()
            raise ChannelError(f"error opening channel '{self.path}': {error.args[-1]}") from None
        self._port = port
        self._fd = port.fd

    def _serial_error(self, error: Exception) -> ChannelError:
        code = error.args[0] if error.args and isinstance(error.args[0], int) else None
        reason = os.strerror(code) if code is not None else str(error)
        return ChannelError(f"error opening channel '{self.path}': {reason}")

    def close(self) -> None:
        port, self._port = self._port, None
        self._fd = -1
        if port is not None:
            port.close()


def make_raw(fd: int) -> None:
    """qemu-ga's serial settings on top of pyserial's, then drop stale input."""
    attributes = termios.tcgetattr(fd)
    attributes[0] &= ~_RAW_INPUT_CLEARED  # iflag
    attributes[1] = 0  # oflag
    attributes[3] = 0  # lflag
    attributes[6][termios.VMIN] = 1
    attributes[6][termios.VTIME] = 0
    termios.tcflush(fd, termios.TCIFLUSH)
    termios.tcsetattr(fd, termios.TCSANOW, attributes)
