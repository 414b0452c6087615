"""Channels: the transports between the agent and the host, one module each.

* :mod:`~qga.channel.virtio`: virtio-serial (the default)
* :mod:`~qga.channel.isa`: isa-serial
* :mod:`~qga.channel.unix`: unix-listen
* :mod:`~qga.channel.vsock`: vsock-listen

:func:`open_channel` builds and opens the channel a :class:`~qga.config.Config`
describes (including a socket inherited through systemd socket activation,
``config.listen_fd``) or raises :class:`~qga.errors.ChannelError` with
qemu-ga's message.  :class:`ChannelOpener` adds qemu-ga's log lines and
``--retry-path``: try again every 5 s instead of giving up.  The interface
every channel offers is described in :mod:`qga.channel.base`.  Only the
module of the configured method is imported.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from qga.channel.base import Channel
from qga.errors import ChannelError

log = logging.getLogger(__name__)

RETRY_INTERVAL = 5.0  # seconds, qemu-ga's QGA_RETRY_INTERVAL

__all__ = ["Channel", "ChannelOpener", "RETRY_INTERVAL", "make_channel", "open_channel"]


def make_channel(config: Any) -> Channel:
    """The (not yet opened) channel for ``config.method``."""
    method = config.method
    listen_fd = getattr(config, "listen_fd", None)
    if method == "virtio-serial":
        from qga.channel.virtio import VirtioSerialChannel

        return VirtioSerialChannel(config.path)
    if method == "isa-serial":
        from qga.channel.isa import IsaSerialChannel

        return IsaSerialChannel(config.path)
    if method == "unix-listen":
        from qga.channel.unix import UnixListenChannel

        return UnixListenChannel(config.path, listen_fd)
    if method == "vsock-listen":
        from qga.channel.vsock import VsockListenChannel

        return VsockListenChannel(config.path, listen_fd)
    raise ChannelError(f"unsupported channel method/type: {method}")


def open_channel(config: Any) -> Channel:
    """Build and open the configured channel; ChannelError with qemu-ga's message."""
    channel = make_channel(config)
    channel.open()
    return channel


class ChannelOpener:
    """Opens the channel as qemu-ga does, logging its lines, retrying with ``-r``.

    ``on_open(channel)`` receives every channel opened.  When opening fails
    and ``config.retry_path`` is off, ``on_give_up()`` is called (qemu-ga
    exits with status 1 then); with it on, another attempt follows every
    :data:`RETRY_INTERVAL` seconds on ``loop`` (a :class:`qga.loop.Loop`).
    When a channel fails while in use the agent closes it and calls
    :meth:`channel_failed`.
    """

    def __init__(self, config: Any, loop: Any, on_open: Callable[[Channel], None],
                 on_give_up: Callable[[], None]):
        self.config = config
        self.loop = loop
        self.on_open = on_open
        self.on_give_up = on_give_up
        self.retry_interval = RETRY_INTERVAL
        self._timer: Optional[Any] = None

    def start(self) -> None:
        self._attempt()

    def channel_failed(self) -> bool:
        """The channel broke while in use: True if another is on its way (``-r``)."""
        if not self.config.retry_path:
            return False
        self._retry_later()
        return True

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _attempt(self) -> None:
        self._timer = None
        try:
            channel = make_channel(self.config)
        except ChannelError as error:
            self._failed(str(error), created=False)
            return
        try:
            channel.open()
        except ChannelError as error:
            self._failed(str(error), created=True)
            return
        self.on_open(channel)

    def _failed(self, reason: str, created: bool) -> None:
        log.critical("%s", reason)
        if created:
            log.critical("failed to create guest agent channel")
        log.critical("failed to initialize guest agent channel")
        if self.config.retry_path:
            self._retry_later()
        else:
            self.on_give_up()

    def _retry_later(self) -> None:
        log.warning("agent stopped unexpectedly, restarting...")
        log.warning("waiting for channel path...")
        self._timer = self.loop.call_later(self.retry_interval, self._attempt)
