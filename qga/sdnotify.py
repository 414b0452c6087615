"""systemd's readiness and watchdog protocol, without libsystemd.

A service of ``Type=notify`` tells systemd how it is doing by sending small
datagrams (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``) to the
Unix socket named by ``$NOTIFY_SOCKET``.  The address is a path, or an
abstract name written with a leading ``@`` (sent with a leading NUL byte).
Outside systemd the variable is absent and every call is a cheap no-op that
returns False, so the agent calls these functions unconditionally.

The watchdog: with ``WatchdogSec=`` in the unit, systemd exports
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process it is meant for) and
kills the service when no ``WATCHDOG=1`` arrives within that time.
:class:`Watchdog` pings from the agent's event loop at half the timeout, so a
loop that hangs (not merely a live process) gets the agent restarted.

Nothing here keeps state between calls: the environment is read each time.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def notify(state: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Send ``state`` (``"READY=1"``, several lines allowed) to systemd.

    Returns True when the datagram was sent, False when there is no
    notification socket or sending failed (never raises: a service manager
    that went away must not take the agent down).
    """
    address = _socket_address((os.environ if environ is None else environ).get(NOTIFY_SOCKET))
    if address is None:
        return False
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8", "replace"), address)
    except OSError:
        return False
    return True


def _socket_address(value: Optional[str]) -> Optional[bytes]:
    """The sockaddr_un path of ``$NOTIFY_SOCKET``, or None when unusable.

    Only Unix addresses are understood; systemd 253's ``vsock:`` form (for
    a VM's own manager on the host) does not reach a service inside a guest.
    """
    if not value or len(value) < 2:
        return None
    if value[0] == "@":
        return b"\0" + os.fsencode(value[1:])
    if value[0] == "/":
        return os.fsencode(value)
    return None


def ready(status: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> bool:
    """``READY=1``, with a status line if given."""
    return notify("READY=1" + ("\n" + _status_line(status) if status else ""), environ)


def status(text: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    """``STATUS=text``: the line ``systemctl status`` shows."""
    return notify(_status_line(text), environ)


def stopping(environ: Optional[Mapping[str, str]] = None) -> bool:
    """``STOPPING=1``: the agent is shutting down on purpose."""
    return notify("STOPPING=1", environ)


def watchdog_ping(environ: Optional[Mapping[str, str]] = None) -> bool:
    """``WATCHDOG=1``: the event loop is alive."""
    return notify("WATCHDOG=1", environ)


def _status_line(text: str) -> str:
    # One assignment per line: a newline in the text would start a new one.
    return "STATUS=" + text.replace("\n", " ")


def watchdog_timeout(environ: Optional[Mapping[str, str]] = None,
                     pid: Optional[int] = None) -> Optional[float]:
    """The watchdog timeout in seconds, or None when no watchdog is armed for us.

    Like ``sd_watchdog_enabled()``: ``WATCHDOG_USEC`` must be a positive
    integer and ``WATCHDOG_PID``, when set, must be this process.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get(WATCHDOG_USEC, ""), 10)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID)
    if owner:
        try:
            if int(owner, 10) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


def watchdog_interval(environ: Optional[Mapping[str, str]] = None,
                      pid: Optional[int] = None) -> Optional[float]:
    """How often to ping: half the timeout, as systemd recommends; None if unarmed."""
    timeout = watchdog_timeout(environ, pid)
    return None if timeout is None else timeout / 2


class Watchdog:
    """Pings systemd's watchdog from an event loop until cancelled.

    ``loop`` needs ``call_later(delay, callback)`` returning an object with
    ``cancel()`` (:class:`qga.loop.Loop`).  :meth:`start` returns False and
    does nothing when no watchdog is armed for this process.
    """

    def __init__(self, loop, environ: Optional[Mapping[str, str]] = None,
                 ping: Optional[Callable[[], bool]] = None) -> None:
        self.loop = loop
        self.environ = environ
        self.interval = watchdog_interval(environ)
        self._ping = ping or (lambda: watchdog_ping(self.environ))
        self._timer = None

    def start(self) -> bool:
        if self.interval is None:
            return False
        self._tick()
        return True

    def _tick(self) -> None:
        self._ping()
        self._timer = self.loop.call_later(self.interval, self._tick)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
