"""What every channel shares: the interface, device fds, listening sockets.

A channel moves bytes between the agent and the host and knows nothing of
what they mean.  It exposes ``open()``, ``fileno()``, ``read()``,
``write(data)``, ``close()`` and ``edge_triggered``:

* ``read()`` is called when ``fileno()`` is readable and returns bytes, or
  ``None`` when nothing more is available now (host absent, client gone,
  EAGAIN).  The agent calls it until it returns ``None``, handling each
  chunk (and writing its replies) before the next call, so a client that
  sends a request and hangs up still gets its reply.
* ``fileno()`` may change after ``read()`` (a listening channel switches
  between its listening socket and its client); the agent re-registers.
* ``write(data)`` writes everything, waiting in ``poll()`` when the kernel
  is full, and drops the data without a word when the peer is gone.
* ``edge_triggered`` channels must be registered with EPOLLET.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from typing import Optional

from qga.errors import ChannelError

log = logging.getLogger(__name__)

# qemu-ga reads 4 KiB per event; the parser does not care how bytes are
# cut, and larger reads make file uploads cheaper.
READ_SIZE = 65536

# Errors that mean "the other end is not there" rather than "the channel is
# broken": a pty reports EIO once its far end is closed, sockets EPIPE/ECONNRESET.
PEER_GONE = frozenset({errno.EIO, errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN,
                       errno.ECONNABORTED, errno.ESHUTDOWN})

_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL


class Channel:
    """The interface every transport implements."""

    edge_triggered = False

    def open(self) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        raise NotImplementedError

    def read(self) -> Optional[bytes]:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to the non-blocking ``fd``; False if the peer is gone.

    On EAGAIN it waits in poll() for POLLOUT: no spinning.  A hang-up while
    waiting, or an error that means the peer left, drops the rest.  Any
    other error is a broken channel (:class:`ChannelError`).
    """
    view = memoryview(data)
    poller = None
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
            events = poller.poll()[0][1]  # no timeout: returns only with an event
            if events & _HANGUP and not events & select.POLLOUT:
                return False
            continue
        except OSError as error:
            if error.errno in PEER_GONE:
                return False
            raise ChannelError(f"error writing to channel: {os.strerror(error.errno)}") from None
        view = view[written:]
    return True


class DeviceChannel(Channel):
    """A character device kept open for the agent's whole life (serial ports).

    End of file and EIO mean the host side is absent: ``read()`` returns
    None and the port stays open; the edge-triggered registration wakes the
    agent again when the port's state changes.
    """

    edge_triggered = True

    def __init__(self, path: str):
        self.path = path
        self._fd = -1

    def fileno(self) -> int:
        return self._fd

    def read(self) -> Optional[bytes]:
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno in PEER_GONE:
                return None
            raise ChannelError(f"error reading channel: {os.strerror(error.errno)}") from None
        return data or None

    def write(self, data: bytes) -> None:
        if self._fd >= 0 and not write_all(self._fd, data):
            log.debug("host side absent, %d bytes of reply dropped", len(data))

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _open_error(self, error: OSError) -> ChannelError:
        return ChannelError(f"error opening channel '{self.path}': {os.strerror(error.errno)}")


class ListeningChannel(Channel):
    """A listening socket serving one client at a time (unix-listen, vsock-listen).

    While a client is connected the listening socket is not watched: more
    clients wait in the backlog, with whatever they send, until the current
    one leaves, as with qemu-ga.  ``fileno()`` is the client's socket while
    there is one, else the listening socket.
    """

    # qemu creates its listening sockets with a backlog of 1.
    BACKLOG = 1

    def __init__(self, listen_fd: Optional[int] = None):
        self._inherited_fd = listen_fd
        self._listener: Optional[socket.socket] = None
        self._client: Optional[socket.socket] = None

    def open(self) -> None:
        if self._inherited_fd is not None:
            listener = socket.socket(fileno=self._inherited_fd)
        else:
            listener = self._listen()
        listener.setblocking(False)
        self._listener = listener

    def _listen(self) -> socket.socket:
        raise NotImplementedError

    def _bind_and_listen(self, sock: socket.socket, address, bind_failed: str) -> socket.socket:
        """Bind and listen with qemu's error texts; the socket is closed on failure."""
        try:
            try:
                sock.bind(address)
            except OSError as error:
                raise ChannelError(f"{bind_failed}: {os.strerror(error.errno)}") from None
            try:
                sock.listen(self.BACKLOG)
            except OSError as error:
                raise ChannelError(f"Failed to listen on socket: {os.strerror(error.errno)}") from None
        except ChannelError:
            sock.close()
            raise
        return sock

    @property
    def connected(self) -> bool:
        return self._client is not None

    def fileno(self) -> int:
        current = self._client or self._listener
        return current.fileno() if current is not None else -1

    def read(self) -> Optional[bytes]:
        if self._client is None and not self._accept():
            return None
        try:
            data = self._client.recv(READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as error:
            log.debug("client connection failed: %s", error)
            data = b""
        if not data:
            self._drop_client()
            return None
        return data

    def _accept(self) -> bool:
        if self._listener is None:
            return False
        try:
            client, _address = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as error:
            # The client may have given up already (ECONNABORTED): keep listening.
            log.warning("error accepting connection: %s", error.strerror or error)
            return False
        client.setblocking(False)
        self._client = client
        return True

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def write(self, data: bytes) -> None:
        if self._client is None:
            log.debug("no client, %d bytes of reply dropped", len(data))
            return
        if not write_all(self._client.fileno(), data):
            log.debug("client gone, %d bytes of reply dropped", len(data))

    def close(self) -> None:
        """Close the client and the listening socket (its file stays, as with qemu-ga)."""
        self._drop_client()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
