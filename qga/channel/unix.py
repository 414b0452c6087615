"""unix-listen: a Unix socket the host side connects to (``-m unix-listen -p PATH``).

As qemu does: a stale file at the path is unlinked before bind(), the
socket file is left behind on exit, a path longer than ``sun_path`` is
refused, and errors carry qemu's messages.  With systemd socket activation
the inherited listening socket is used as it is.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from qga.channel.base import ListeningChannel
from qga.errors import ChannelError

SUN_PATH_SIZE = 108


class UnixListenChannel(ListeningChannel):
    """Listens on ``path`` (or serves the inherited ``listen_fd``)."""

    def __init__(self, path: Optional[str], listen_fd: Optional[int] = None):
        super().__init__(listen_fd)
        self.path = path

    def _listen(self) -> socket.socket:
        path = self.path or ""
        if len(os.fsencode(path)) > SUN_PATH_SIZE:
            raise ChannelError(f"UNIX socket path '{path}' is too long")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise ChannelError(f"Failed to unlink socket {path}: {os.strerror(error.errno)}") from None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as error:
            raise ChannelError(f"Failed to create Unix socket: {os.strerror(error.errno)}") from None
        return self._bind_and_listen(sock, path, f"Failed to bind socket to {path}")
