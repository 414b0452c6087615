"""Events an extension emits, queued for ``guest-extension-events``: bounded, rate limited.

libvirt drops messages the guest agent sends on its own, so events wait in
the guest until the host asks.  Delivery is *at least once*:

* each event gets a sequence number; a reply carries the events after the
  host's ``cursor`` and a new cursor, the sequence number of the last event
  it holds;
* an event stays queued until the host sends a cursor at or past it, so an
  answer lost on the way is simply read again;
* a cursor is ``"<stream>-<sequence>"``; the stream is new each time the
  agent starts (the queue does not survive it), and a cursor of another
  stream reads from the oldest event held.

Bounds: at most :data:`MAX_EVENTS` events and :data:`MAX_BYTES` bytes are held
(the oldest go first), at most :data:`RATE` events a second are accepted
(bursts of :data:`BURST`), and one reply holds at most :data:`MAX_REPLY_BYTES`
of events.  Every event lost to a bound counts in ``dropped``, which only
grows, so the host can tell whether it missed something.

A read may *wait*: with nothing to return it is answered when an event
arrives or when the wait ends (a :class:`~qga.commands.Deferred`), so a host
following events need not poll.
"""

from __future__ import annotations

import collections
import os
import re
import time
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Tuple

from qga.errors import ParameterError

MAX_EVENTS = 10000
MAX_BYTES = 8 * 1024 * 1024
RATE = 1000.0
BURST = 2000.0
MAX_REPLY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX = 100
MAX_WAIT = 60.0

_CURSOR = re.compile(r"([0-9a-f]{8})-(0|[1-9][0-9]{0,18})")


class Event(NamedTuple):
    seq: int
    name: str
    data: Dict[str, Any]
    time: float     # wall clock, seconds
    size: int       # bytes of its frame, for the bounds


class EventQueue:
    """One extension's queued events; see the module docstring."""

    def __init__(self, loop: Any = None, clock=time.monotonic):
        self.loop = loop
        self.clock = clock
        self.stream = os.urandom(4).hex()
        self.dropped = 0
        self.accepted = 0
        self._events: Deque[Event] = collections.deque()
        self._bytes = 0
        self._next = 1
        self._tokens = BURST
        self._refilled = clock()
        self._waiters: List[Tuple[Any, Any, int, str]] = []   # (deferred, timer, max, cursor)

    def __len__(self) -> int:
        return len(self._events)

    # -- in ------------------------------------------------------------------------------

    def push(self, name: str, data: Dict[str, Any], size: int) -> bool:
        """Queue one event; False if the rate limit dropped it."""
        if not self.admit():
            return False
        self.append(name, data, size)
        return True

    def admit(self) -> bool:
        """Whether the rate limit lets one more event in (counted as dropped if not).

        The proxy asks before it checks an event against its schema, so a
        flood costs the agent little more than reading it.
        """
        if self._take_token():
            return True
        self.dropped += 1
        return False

    def append(self, name: str, data: Dict[str, Any], size: int) -> None:
        """Queue an admitted event, dropping the oldest beyond the bounds."""
        self._events.append(Event(self._next, name, data, time.time(), size))
        self._next += 1
        self._bytes += size
        self.accepted += 1
        while len(self._events) > MAX_EVENTS or self._bytes > MAX_BYTES:
            self._bytes -= self._events.popleft().size
            self.dropped += 1
        self._wake_waiters()

    def _take_token(self) -> bool:
        now = self.clock()
        self._tokens = min(BURST, self._tokens + (now - self._refilled) * RATE)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    # -- out -----------------------------------------------------------------------------

    def read(self, cursor: Optional[str] = None, maximum: int = DEFAULT_MAX) -> Dict[str, Any]:
        """Acknowledge up to ``cursor``, then the events after it (at most ``maximum``)."""
        after = self._acknowledge(cursor)
        events = []
        size = 0
        last = after
        for event in self._events:
            if event.seq <= after:
                continue
            if len(events) >= maximum or (events and size + event.size > MAX_REPLY_BYTES):
                break
            events.append({"seq": event.seq, "name": event.name, "data": event.data,
                           "time": round(event.time, 6)})
            size += event.size
            last = event.seq
        return {"events": events, "cursor": f"{self.stream}-{last}", "dropped": self.dropped}

    def read_or_wait(self, cursor: Optional[str], maximum: int, wait: float) -> Any:
        """:meth:`read`, or with nothing to read and ``wait`` > 0 a Deferred of it."""
        result = self.read(cursor, maximum)
        if result["events"] or wait <= 0 or self.loop is None:
            return result
        from qga.commands import Deferred

        deferred = Deferred()
        timer = self.loop.call_later(min(wait, MAX_WAIT),
                                     lambda: self._finish_waiter(deferred))
        self._waiters.append((deferred, timer, maximum, result["cursor"]))
        return deferred

    def _acknowledge(self, cursor: Optional[str]) -> int:
        """Drop events up to the cursor; return the sequence number to read after."""
        if cursor is None:
            return 0
        match = _CURSOR.fullmatch(cursor)
        if match is None:
            raise ParameterError(f"'{cursor}' is not an event cursor")
        if match.group(1) != self.stream:
            return 0  # from an earlier agent: everything held is new to this host
        seq = int(match.group(2))
        while self._events and self._events[0].seq <= seq:
            self._bytes -= self._events.popleft().size
        return seq

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for deferred, timer, maximum, cursor in waiters:
            timer.cancel()
            deferred.resolve(self.read(cursor, maximum))

    def _finish_waiter(self, deferred: Any) -> None:
        for item in self._waiters:
            if item[0] is deferred:
                self._waiters.remove(item)
                deferred.resolve(self.read(item[3], item[2]))
                return

    def close(self) -> None:
        """Answer every waiting read now (with what there is)."""
        waiters, self._waiters = self._waiters, []
        for deferred, timer, maximum, cursor in waiters:
            timer.cancel()
            deferred.resolve(self.read(cursor, maximum))
