"""Channel mode: relaying a virtio-serial port to a channel-mode extension, byte for byte.

The manifest's ``channel.ports`` name the port, with fallbacks (the oVirt
extension: ``ovirt-guest-agent.0``, then the legacy ``com.redhat.rhevm.vdsm``);
the first that exists under the ports directory (``/dev/virtio-ports``, the
``virtio-ports-dir`` setting) is opened, with :class:`qga.channel.virtio.
VirtioSerialChannel`, and kept open while the extension is enabled (holding
it is what tells the host a guest agent is there).  No port yet: it is looked
for again every :data:`PORT_RETRY` seconds (hot plug).

The host's absence is handled as on the agent's own port: the port is
registered edge-triggered (an absent host makes it report POLLHUP without
end), so the relay wakes only when something changes.  A wake-up with
POLLHUP means the host is gone: bytes waiting for it are dropped, as the
port itself drops them; one without means it is there.  Each change is sent
to the extension as a ``host`` frame on its control connection.

Both directions are buffered without blocking, at most :data:`BUFFER` bytes
each; a full buffer stops reading from its source until it drains (the
kernel then holds the rest), so a side that does not read cannot make the
agent grow.  While the guest's filesystems are frozen nothing is passed on:
bytes are held (within the same bounds) and flow again after the thaw.
"""

from __future__ import annotations

import errno
import logging
import os
import select
from typing import Callable, Optional, Sequence

from qga.errors import ChannelError

log = logging.getLogger(__name__)

BUFFER = 1024 * 1024
PORT_RETRY = 5.0
FROZEN_POLL = 0.25
_PORT_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_HANGUP = select.EPOLLHUP | select.EPOLLERR
_PEER_GONE = (errno.EIO, errno.EPIPE, errno.ECONNRESET, errno.ENXIO)


def find_port(ports: Sequence[str], ports_dir: str) -> Optional[str]:
    """The first of ``ports`` that exists in ``ports_dir``."""
    for name in ports:
        path = os.path.join(ports_dir, name)
        if os.path.exists(path):
            return path
    return None


class PortRelay:
    """One channel-mode extension's port and its channel connection."""

    def __init__(self, name: str, loop, ports: Sequence[str], ports_dir: str,
                 is_frozen: Callable[[], bool], on_host: Callable[[bool], None]):
        self.name = name
        self.loop = loop
        self.ports = tuple(ports)
        self.ports_dir = ports_dir
        self.is_frozen = is_frozen
        self.on_host = on_host
        self.port = None                   # a VirtioSerialChannel once open
        self.stream = None                 # the extension's channel connection (proxy.Stream)
        self.host_connected: Optional[bool] = None
        self._to_port = bytearray()
        self._to_extension = bytearray()
        self._port_paused = False          # stopped reading the port: the buffer is full
        self._retry = None                 # looking for the port again
        self._poll = None                  # frozen: looking for the thaw
        self._closed = False

    # -- the port ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open the first port found, or look again later."""
        from qga.channel.virtio import VirtioSerialChannel

        self._retry = None
        if self._closed or self.port is not None:
            return
        path = find_port(self.ports, self.ports_dir)
        if path is None:
            log.info("extension %s: none of its ports (%s) is in %s yet", self.name,
                     ", ".join(self.ports), self.ports_dir)
            self._retry = self.loop.call_later(PORT_RETRY, self.open)
            return
        port = VirtioSerialChannel(path)
        try:
            port.open()
        except ChannelError as error:
            log.warning("extension %s: %s", self.name, error)
            self._retry = self.loop.call_later(PORT_RETRY, self.open)
            return
        log.info("extension %s: relaying port %s", self.name, path)
        self.use_port(port)

    def use_port(self, port) -> None:
        """Relay ``port``, an open :class:`~qga.channel.virtio.VirtioSerialChannel`."""
        self.port = port
        self.loop.add(port.fileno(), _PORT_EVENTS, self._on_port_events)
        poller = select.poll()
        poller.register(port.fileno(), select.POLLIN | select.POLLOUT)
        ready = poller.poll(0)
        self._set_host(not (ready and ready[0][1] & select.POLLHUP))
        self._read_port()

    def _on_port_events(self, events: int) -> None:
        self._set_host(not events & _HANGUP)
        if events & ~select.EPOLLOUT:
            self._read_port()
        self._flush()

    def _set_host(self, connected: bool) -> None:
        if connected == self.host_connected:
            return
        self.host_connected = connected
        if not connected and self._to_port:
            log.debug("extension %s: host absent, %d bytes for it dropped", self.name,
                      len(self._to_port))
            self._to_port.clear()
            self._resume_extension()
        self.on_host(connected)

    def _read_port(self) -> None:
        while self.port is not None and len(self._to_extension) < BUFFER:
            try:
                data = self.port.read()
            except ChannelError as error:
                self._port_failed(str(error))
                return
            if data is None:
                self._port_paused = False
                return
            self._to_extension += data
        self._port_paused = True  # full: read again once the extension took some

    def _write_port(self) -> None:
        while self._to_port and self.port is not None:
            try:
                written = os.write(self.port.fileno(), self._to_port)
            except BlockingIOError:
                return  # the EPOLLOUT edge brings us back
            except OSError as error:
                if error.errno in _PEER_GONE:
                    self._set_host(False)
                    return
                self._port_failed(os.strerror(error.errno))
                return
            del self._to_port[:written]
        self._resume_extension()

    def _port_failed(self, reason: str) -> None:
        log.error("extension %s: port failed: %s; opening it again in %g s", self.name, reason,
                  PORT_RETRY)
        self._close_port()
        self._retry = self.loop.call_later(PORT_RETRY, self.open)

    def _close_port(self) -> None:
        if self.port is not None:
            self.loop.remove(self.port.fileno())
            self.port.close()
            self.port = None
        self._to_port.clear()

    # -- the extension's side ---------------------------------------------------------------------

    def attach(self, stream, rest: bytes) -> bool:
        """Take the extension's channel connection; False if one is attached already."""
        if self.stream is not None or self._closed:
            return False
        self.stream = stream
        stream.on_data = self._on_extension_data
        stream.on_close = self._on_extension_closed
        stream.on_drain = self._flush
        if rest:
            self._on_extension_data(rest)
        self._flush()
        return True

    def _on_extension_data(self, data: bytes) -> None:
        if self.host_connected is False or self.port is None:
            return  # no host: dropped, as the port itself drops it
        self._to_port += data
        if len(self._to_port) >= BUFFER and self.stream is not None:
            self.stream.pause_reading()
        self._flush()

    def _on_extension_closed(self) -> None:
        self.stream = None

    def _resume_extension(self) -> None:
        if self.stream is not None and len(self._to_port) < BUFFER // 2:
            self.stream.resume_reading()

    # -- passing bytes on --------------------------------------------------------------------------

    def _flush(self) -> None:
        if self.is_frozen():
            if self._poll is None and (self._to_port or self._to_extension):
                self._poll = self.loop.call_later(FROZEN_POLL, self._after_frozen_poll)
            return
        self._write_port()
        if self.stream is not None and self._to_extension:
            # What does not fit in the stream's buffer waits for its on_drain.
            room = self.stream.max_output - self.stream.pending_output
            if room > 0:
                chunk = bytes(self._to_extension[:room])
                if self.stream.write(chunk):
                    del self._to_extension[:len(chunk)]
        if self._port_paused and len(self._to_extension) < BUFFER:
            self._read_port()

    def _after_frozen_poll(self) -> None:
        self._poll = None
        self._flush()

    def farewell(self, notice: bytes) -> None:
        """Write ``notice`` after what is pending, without waiting; then the port may close.

        As a package's uninstaller writes to the port with ``dd oflag=nonblock``:
        with no host there, or no room in the port, it is lost and nothing waits.
        A relay whose port is closed (the extension was stopped) opens it for
        this one write.
        """
        if self.is_frozen():
            log.info("extension %s: frozen; no removal notice on its port", self.name)
        elif self.port is None:
            self._write_notice_once(notice)
        elif self.host_connected is False:
            log.info("extension %s: no host on the port to tell of its removal", self.name)
        else:
            self._to_port += notice
            self._write_port()
            if self._to_port:
                log.info("extension %s: the port took only part of the removal notice",
                         self.name)

    def _write_notice_once(self, notice: bytes) -> None:
        path = find_port(self.ports, self.ports_dir)
        if path is None:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as error:
            log.info("extension %s: cannot open %s for the removal notice: %s", self.name,
                     path, error.strerror)
            return
        try:
            os.write(fd, notice)
        except OSError as error:  # EAGAIN: no host, or no room; lost, as dd's would be
            log.info("extension %s: removal notice not written to %s: %s", self.name, path,
                     error.strerror)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._closed = True
        for timer in (self._retry, self._poll):
            if timer is not None:
                timer.cancel()
        self._retry = self._poll = None
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.on_close = lambda: None
            stream.close()
        self._close_port()
        self._to_extension.clear()
