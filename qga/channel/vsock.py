"""vsock-listen: an AF_VSOCK socket (``-m vsock-listen -p <cid>:<port>``).

The address is parsed as qemu parses ``vsock:<cid>:<port>`` and the errors
carry qemu's messages.  The CID to bind must be the guest's own or
4294967295 (any).  With systemd socket activation the inherited listening
socket is used as it is.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from typing import Optional, Tuple

from qga.channel.base import ListeningChannel
from qga.errors import ChannelError

# sscanf("%32[^:]:%32[^,]%n"): up to 32 non-colons, a colon, up to 32 non-commas.
_ADDRESS = re.compile(r"([^:]{1,32}):([^,]{1,32})")
_UINT = re.compile(r"[ \t\n\v\f\r]*[0-9]+")
_UINT32_MAX = 2 ** 32 - 1


def parse_address(text: str) -> Tuple[int, int]:
    """``"<cid>:<port>"`` -> (cid, port), or ChannelError with qemu's message."""
    match = _ADDRESS.match(text)
    if match is None:
        raise ChannelError(f"error parsing address '{text}'")
    if match.end() != len(text):
        raise ChannelError(f"trailing characters in address '{text}'")
    cid_text, port_text = match.groups()
    cid = _parse_uint32(cid_text)
    if cid is None:
        raise ChannelError(f"Failed to parse cid '{cid_text}'")
    port = _parse_uint32(port_text)
    if port is None:
        raise ChannelError(f"Failed to parse port '{port_text}'")
    return cid, port


def _parse_uint32(text: str) -> Optional[int]:
    if not _UINT.fullmatch(text):
        return None
    value = int(text)
    return value if value <= _UINT32_MAX else None


class VsockListenChannel(ListeningChannel):
    """Listens on the vsock address ``path`` (or serves the inherited ``listen_fd``)."""

    def __init__(self, path: Optional[str], listen_fd: Optional[int] = None):
        super().__init__(listen_fd)
        self.path = path

    def _listen(self) -> socket.socket:
        cid, port = parse_address(self.path or "")
        family = getattr(socket, "AF_VSOCK", None)
        try:
            if family is None:
                raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as error:
            raise ChannelError(f"Failed to create socket: {os.strerror(error.errno)}") from None
        return self._bind_and_listen(sock, (cid, port), "Failed to bind socket")
