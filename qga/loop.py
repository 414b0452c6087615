"""The agent's single-threaded event loop: one epoll, file descriptors, timers.

Everything the agent waits for goes through one :class:`Loop`: the host
channel, exec children (pidfds) and their pipes, extension sockets, timers
and signals.  Callbacks run one at a time, so handlers never need locks.

Edge-triggered registration exists for virtio-serial ports: while the host
side is absent the port reports POLLHUP permanently, which would make a
level-triggered poll spin.  Edge-triggered, the kernel wakes us only when the
port's state changes (host connects, data arrives).
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import signal
import time
from typing import Callable, Dict, List, Optional, Tuple

READ = select.EPOLLIN | select.EPOLLPRI | select.EPOLLRDHUP
WRITE = select.EPOLLOUT
EDGE = select.EPOLLET

Callback = Callable[[int], None]


class Timer:
    """A handle on a scheduled call; ``cancel()`` it to drop the call."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """An epoll loop with timers and signal delivery through a wakeup pipe."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: Dict[int, Callback] = {}
        self._timers: List[Tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self._signal_handlers: Dict[int, Callable[[int], None]] = {}
        self._wakeup_r: Optional[int] = None
        self._running = False

    # -- file descriptors ----------------------------------------------------

    def add(self, fd: int, events: int, callback: Callback) -> None:
        """Call ``callback(events)`` whenever ``fd`` is ready for ``events``."""
        if fd in self._callbacks:
            self._epoll.modify(fd, events)
        else:
            self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def add_reader(self, fd: int, callback: Callback, edge: bool = False) -> None:
        self.add(fd, READ | (EDGE if edge else 0), callback)

    def remove(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it with the fd

    def watching(self, fd: int) -> bool:
        return fd in self._callbacks

    # -- timers ------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._sequence), timer))
        return timer

    # -- signals -----------------------------------------------------------------

    def add_signal(self, signum: int, handler: Callable[[int], None]) -> None:
        """Run ``handler(signum)`` from the loop (not from the signal context)."""
        if self._wakeup_r is None:
            self._wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
            self.add_reader(self._wakeup_r, self._on_wakeup)
        self._signal_handlers[signum] = handler
        # The Python-level handler does nothing: the wakeup fd carries the
        # signal number to the loop, where the real handler runs.
        signal.signal(signum, lambda *_: None)

    def _on_wakeup(self, _events: int) -> None:
        try:
            data = os.read(self._wakeup_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)

    # -- running -----------------------------------------------------------------

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        self._running = True
        while self._running:
            self.run_once()

    def run_once(self, max_wait: Optional[float] = None) -> None:
        timeout = self._next_timeout(max_wait)
        try:
            ready = self._epoll.poll(timeout)
        except InterruptedError:
            ready = []
        for fd, events in ready:
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback(events)
        self._run_due_timers()

    def _next_timeout(self, max_wait: Optional[float]) -> float:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        timeout = -1.0 if max_wait is None else max_wait
        if self._timers:
            until_next = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = until_next if timeout < 0 else min(timeout, until_next)
        return timeout

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()

    def close(self) -> None:
        if self._wakeup_r is not None:
            signal.set_wakeup_fd(-1)
        self._epoll.close()
