"""The agent's IO: the SDK's loop, the channel connection, the clock, the relay, the bus.

:class:`Runner` joins the sans-IO :class:`~.logic.AgentLogic` to the world:

* the channel: the core relays the ``ovirt-guest-agent.0`` port (legacy
  ``com.redhat.rhevm.vdsm``) over the extension's channel connection; lines
  from it go to the logic (at most :data:`MAX_HOST_LINE` bytes each), lines
  from the logic go to it.  If the connection cannot be opened or is lost, it
  is opened again with a growing delay, and the agent goes on meanwhile (its
  lines are dropped, as on a port with nobody at the host side);
* the clock: one :meth:`~.logic.AgentLogic.tick` per ``tick_interval``
  (1 s), the first right after the startup set, like the original's loop;
  ticks are kept on a fixed grid and never run in bursts to catch up;
* the relay (:mod:`.relay`) for hosts that reach us through envelope calls;
* session events from systemd-logind (:mod:`.logind`) when enabled;
* stopping (SIGTERM, or the core going away): ``session-shutdown`` is sent
  and flushed before the process ends.

When VDSM reconnects it sends ``refresh`` itself, which the logic handles;
the core's ``host`` frames are only logged.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from . import config as agent_config
from . import messages, relay
from .actions import Actions
from .collectors import LinuxCollectors
from .logic import AgentLogic

try:
    import qga_ext_sdk as sdk     # the copy the bundle ships
except ImportError:               # running from a qga source tree or installation
    from qga.ext import sdk

#: Host -> agent lines longer than this are dropped (VDSM's commands are small).
MAX_HOST_LINE = messages.MAX_LINE

#: Agent -> host bytes the channel connection may hold before lines are dropped.
CHANNEL_BUFFER = 4 * messages.MAX_LINE

REOPEN_FIRST, REOPEN_MAX = 1.0, 30.0
STOP_FLUSH_SECONDS = 2.0

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class Runner:
    """One running agent on an SDK :class:`Extension`."""

    def __init__(self, extension: Any, config: Optional[agent_config.Config] = None,
                 collectors: Any = None, actions: Any = None):
        self.extension = extension
        self.loop = extension.loop
        self.log = logging.getLogger("ovirt_agent")
        self.config = config or agent_config.load(extension.settings)
        self.collectors = collectors or LinuxCollectors(self.config)
        self.actions = actions or Actions(self.config, self.loop, extension)
        self.logic = AgentLogic(self.config, self.collectors, self.actions, self.write,
                                self.loop.call_later, self.log)
        self.relay = relay.Relay(extension.emit, self.logic.handle_line, self.loop.time)
        self.channel: Optional[Any] = None
        self._splitter = sdk.LineSplitter(MAX_HOST_LINE)
        self._reopen_delay = REOPEN_FIRST
        self._next_tick = 0.0
        self.session_watcher: Any = None
        self.lines_lost = 0
        self.stopped = False

    # -- start and stop --

    def start(self) -> None:
        self.extension.connect()
        self._register_commands()
        self.extension.on_host(self._on_host)
        self.extension.on_stop(self.stop)
        self.open_channel()
        # The startup set goes out before any host line is read, as in the original.
        self._begin()
        self.extension.ready()

    def _begin(self) -> None:
        self.logic.start()
        self._start_session_events()
        self._start_sso()
        self._next_tick = self.loop.time()
        self._tick()

    def _start_sso(self) -> None:
        start_sso = getattr(self.actions, "start_sso", None)
        if start_sso is not None:
            try:
                start_sso()
            except Exception:
                self.log.exception("single sign-on could not start; logins will retry")

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.session_watcher is not None:
            self.session_watcher.close()
        self.logic.stop()
        if self.channel is not None and not self.channel.closed:
            self.channel.flush(STOP_FLUSH_SECONDS)

    # -- the clock --

    def _tick(self) -> None:
        if self.stopped:
            return
        try:
            self.logic.tick()
        finally:
            interval = self.config.tick_interval
            self._next_tick += interval
            now = self.loop.time()
            if self._next_tick < now - interval:
                self._next_tick = now      # we fell behind (a stalled guest): no burst
            self.loop.call_at(self._next_tick, self._tick)

    # -- the channel --

    def open_channel(self) -> None:
        try:
            sock = self.extension.open_channel()
        except sdk.SdkError as error:
            self.log.warning("the channel is not available (%s); trying again in %.0f s",
                             error, self._reopen_delay)
            self._schedule_reopen()
            return
        self._splitter = sdk.LineSplitter(MAX_HOST_LINE)
        self.channel = sdk.Stream(self.loop, sock, self._on_channel_data,
                                  self._on_channel_closed, max_buffer=CHANNEL_BUFFER)
        self._reopen_delay = REOPEN_FIRST

    def _schedule_reopen(self) -> None:
        delay, self._reopen_delay = self._reopen_delay, min(self._reopen_delay * 2, REOPEN_MAX)
        self.loop.call_later(delay, self._reopen)

    def _reopen(self) -> None:
        if not self.stopped and (self.channel is None or self.channel.closed):
            self.open_channel()

    def _on_channel_data(self, data: bytes) -> None:
        dropped = self._splitter.dropped
        for line in self._splitter.feed(data):
            self.logic.handle_line(line)
        if self._splitter.dropped != dropped:
            self.log.warning("dropped a host line over %d bytes", MAX_HOST_LINE)

    def _on_channel_closed(self) -> None:
        if self.stopped:
            return
        self.log.warning("the channel connection closed; opening it again")
        self._schedule_reopen()

    def write(self, line: bytes) -> None:
        """One finished agent line: to the channel, and to a relaying host if any."""
        if self.channel is not None and not self.channel.write(line):
            self.lines_lost += 1
        self.relay.forward(line)

    def _on_host(self, connected: bool) -> None:
        self.log.info("the host side of the channel %s", "connected" if connected
                      else "went away")

    # -- envelope commands --

    def _register_commands(self) -> None:
        for name, method in ((relay.OPEN, self.relay.open), (relay.SEND, self.relay.send),
                             (relay.CLOSE, self.relay.close)):
            self.extension.command(name)(self._refusing(method))

    @staticmethod
    def _refusing(method: Any) -> Any:
        def handler(arguments: Any) -> Any:
            try:
                return method(arguments)
            except relay.CommandRefused as refused:
                raise sdk.CommandFailed(str(refused)) from None
        return handler

    # -- session events --

    def _start_session_events(self) -> None:
        if not self.config.session_events:
            return
        try:
            from .logind import SessionWatcher
            self.session_watcher = SessionWatcher(self.loop, self.logic)
            self.session_watcher.start()
        except Exception as error:  # no bus, no logind: the original never had these
            self.log.info("no session events from systemd-logind: %s", error)
            self.session_watcher = None


def configure_logging(extension: Any, level: str) -> None:
    """Send the agent's log records to the core (stderr without one)."""
    handler = extension.logging_handler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    # Ours, and the SDK loop's (a callback that raised).
    for name in ("ovirt_agent", "qga.ext.sdk"):
        logger = logging.getLogger(name)
        logger.setLevel(_LEVELS.get(level, logging.INFO))
        logger.propagate = False
        logger.addHandler(handler)


def main(environ: Optional[dict] = None) -> int:
    """The extension's entry point: run until SIGTERM or until the core goes away."""
    extension = sdk.Extension(environ)
    try:
        config = agent_config.load(extension.settings)
    except (agent_config.ConfigProblem, OSError, ValueError) as error:
        extension.connect()
        extension.log("error", f"bad settings: {error}")
        return 2
    configure_logging(extension, config.log_level)
    runner = Runner(extension, config)
    runner.start()
    status = extension.run(ready=False)
    extension.loop.close()
    return status
