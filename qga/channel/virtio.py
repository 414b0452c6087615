"""virtio-serial: the port QEMU gives the guest agent (``-m virtio-serial``).

The port is opened once and kept open for the agent's whole life: holding
it open is what makes QEMU report the agent "connected" to libvirt.  No
termios settings (it is not a tty).

While no host process is attached to the port's chardev, the guest kernel
reports POLLHUP on it without end and read() returns 0.  qemu-ga polls
level-triggered and sleeps 100 ms after each such wake-up.  We register the
port edge-triggered instead (``edge_triggered = True``): the kernel wakes us
only when the port's state changes (the host connects, data arrives), so
an absent host costs no CPU and the first request after it connects is read
at once.  Writes while the host is absent fail with EAGAIN and POLLHUP; the
reply is dropped, as qemu-ga's would be lost.
"""

from __future__ import annotations

import os
from typing import Optional

from qga.channel.base import DeviceChannel


class VirtioSerialChannel(DeviceChannel):
    """The virtio-serial port at ``path``.

    ``fd`` adopts a descriptor already open on a port instead of opening
    ``path``.  Tests use the master side of a pty, whose far end can be
    closed and reopened the way a host comes and goes.
    """

    def __init__(self, path: str, fd: Optional[int] = None):
        super().__init__(path)
        self._adopt = fd

    def open(self) -> None:
        if self._adopt is not None:
            os.set_blocking(self._adopt, False)
            self._fd, self._adopt = self._adopt, None
            return
        try:
            # O_NOCTTY: a tty standing in for the port must not become our
            # controlling terminal (its hang-up would send us SIGHUP).
            self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as error:
            raise self._open_error(error) from None
