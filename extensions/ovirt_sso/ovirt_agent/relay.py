"""The oVirt protocol through qga's envelope commands, for hosts without the second port.

Some hosts cannot give the guest an ``ovirt-guest-agent.0`` port.  There
the host-side helper :mod:`qga.host.ovirt` presents the channel on a local
Unix socket and carries its lines over the qga channel itself:

* host -> agent: ``guest-extension-call`` of ``ovirt-relay-send``
  ``{"lines": [LINE, ...]}`` (each line without its newline);
* agent -> host: events ``ovirt-message`` ``{"line": LINE}``, read with
  ``guest-extension-events``, in order.

Events are only emitted while a helper holds a *lease*: ``ovirt-relay-open``
``{"lease": SECONDS}`` starts or renews it (``ovirt-relay-send`` renews it
too), ``ovirt-relay-close`` ends it.  Without one, nothing fills the core's
event queue.  A line too big for one event frame is not relayed (VDSM
would have dropped it anyway: it is over its 1 MiB limit).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict

EVENT = "ovirt-message"
OPEN, SEND, CLOSE = "ovirt-relay-open", "ovirt-relay-send", "ovirt-relay-close"

DEFAULT_LEASE = 60.0
MAX_LEASE = 3600.0
MAX_LINES = 64        # per ovirt-relay-send

log = logging.getLogger("ovirt_agent.relay")


class CommandRefused(Exception):
    """A relay command with arguments it cannot take (the SDK's CommandFailed is raised
    from this by the runner, which knows the SDK)."""


class Relay:
    """The envelope side of the channel: lines in through commands, out as events."""

    def __init__(self, emit: Callable[[str, Dict[str, Any]], bool],
                 deliver: Callable[[bytes], None], clock: Callable[[], float]):
        self._emit = emit
        self._deliver = deliver
        self._clock = clock
        self._lease_until = 0.0
        self.relayed = 0
        self.lost = 0

    @property
    def active(self) -> bool:
        return self._clock() < self._lease_until

    def open(self, arguments: Dict[str, Any]) -> Dict[str, Any]:
        lease = arguments.get("lease", DEFAULT_LEASE)
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or lease <= 0:
            raise CommandRefused("lease must be a positive number of seconds")
        lease = min(float(lease), MAX_LEASE)
        was_active = self.active
        self._lease_until = self._clock() + lease
        if not was_active:
            log.info("a host relays the oVirt channel through guest-extension-call/-events")
        return {"lease": lease, "event": EVENT}

    def send(self, arguments: Dict[str, Any]) -> Dict[str, Any]:
        lines = arguments.get("lines")
        if not isinstance(lines, list) or len(lines) > MAX_LINES or \
                not all(isinstance(line, str) for line in lines):
            raise CommandRefused(f"lines must be a list of at most {MAX_LINES} strings")
        if self.active:
            self._lease_until = max(self._lease_until, self._clock() + DEFAULT_LEASE)
        for line in lines:
            self._deliver(line.encode("utf-8", "surrogatepass"))
        return {"accepted": len(lines)}

    def close(self, arguments: Dict[str, Any]) -> Dict[str, Any]:
        self._lease_until = 0.0
        return {}

    def forward(self, line: bytes) -> None:
        """An agent line (newline-terminated ASCII) to the host, if a helper holds a lease."""
        if not self.active:
            return
        try:
            queued = self._emit(EVENT, {"line": line.rstrip(b"\n").decode("ascii")})
        except Exception as error:   # a frame over the cap: the SDK refuses it
            log.warning("a %d-byte line cannot go as an event: %s", len(line), error)
            queued = False
        if queued:
            self.relayed += 1
        else:
            self.lost += 1
