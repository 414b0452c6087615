"""The agent: one event loop joining the channel, the protocol and the dispatcher.

Bytes from the host go into one :class:`~qga.protocol.Parser` that lives as
long as the process (qemu-ga keeps a half-received request across host
reconnects, and hosts rely on resynchronising with 0xFF rather than on a
fresh stream).  Each request is dispatched in order; the replies produced by
one chunk of input are written together, which keeps their order and saves
a system call per reply when a host pipelines requests.

A handler may answer later (an extension's reply): it returns a
:class:`~qga.commands.Deferred`.  The agent then stops reading the channel,
so the host's next requests wait their turn and replies keep their order,
while the loop goes on serving timers, children and extensions; once the
deferred is settled its reply is written and the requests resume.

Installed extensions start with the agent (:mod:`qga.ext.manager`) and are
stopped, their whole process trees, with the command services.

Shutdown follows qemu-ga: SIGTERM and SIGINT end the loop with status 0,
except while filesystems are frozen, when they are ignored (a frozen guest
must not lose its agent, the only way to thaw it).  Every exit path closes
the command services, which thaws filesystems left frozen.
"""

from __future__ import annotations

import logging
import signal
from typing import List, Optional

from qga.commands import Context, Deferred, collect_handlers
from qga.errors import StateError
from qga.loop import Loop
from qga.protocol import DELIMITER, NEED_DATA, Parser, Request, encode_reply_chunks

log = logging.getLogger("qga.agent")

# Replies are written in batches; past this size a batch is written at once
# so a long pipelined burst does not hold many replies in memory.
_MAX_PENDING_OUTPUT = 1 << 20


class Agent:
    """A configured agent; :meth:`run` serves the host until told to stop."""

    def __init__(self, config) -> None:
        self.config = config
        self.loop: Optional[Loop] = None
        self.ctx: Optional[Context] = None
        self.dispatcher = None
        self.parser = Parser()
        self.channel = None
        self._opener = None
        self._registered_fd: Optional[int] = None
        self._exit_status = 0
        self._watchdog = None
        self._waiting: Optional[Deferred] = None  # a reply the host's next requests wait for

    # -- life cycle ----------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (status 0) or a fatal channel error (1)."""
        from qga.log import setup_logging
        from qga.state import StateDir

        state = StateDir(self.config.statedir)
        logging_setup = setup_logging(self.config, state.is_frozen)
        self.loop = Loop()
        try:
            self._build(state)
            self._install_signals()
            self._open_channel()
            if self._exit_status:
                return self._exit_status  # gave up before the loop ran: stop() had no loop to stop
            self._notify_ready()
            self.loop.run()
            return self._exit_status
        except StateError as error:
            log.critical("%s", error)
            return 1
        finally:
            self._shutdown()
            logging_setup.close()

    def _build(self, state) -> None:
        from qga.dispatch import Dispatcher, Policy
        from qga.schema import Schema

        if getattr(self.config, "allow_unsigned_extensions", False):
            # An explicit admin choice that weakens the security model: say so.
            log.warning("unsigned extension bundles are allowed (allow-unsigned-extensions)")
        self.ctx = Context(self.config, state, self.loop)
        self.dispatcher = Dispatcher(Schema.load(), collect_handlers(), self.ctx,
                                     Policy.from_config(self.config))
        self.ctx.dispatcher = self.dispatcher
        if state.is_frozen():
            # Restarted in frozen mode: the fsfreeze service arms its auto-thaw
            # timer now, and ctx.close() lets it thaw what is still frozen.
            from qga.commands.fsfreeze import FreezeService
            self.ctx.service(FreezeService)
        self._start_extensions(state)

    def _start_extensions(self, state) -> None:
        """Start the installed extensions (nothing is imported on a guest without any)."""
        from qga.ext.store import has_store

        if has_store(state.path):
            from qga.ext.manager import Extensions

            self.ctx.service(Extensions).start()

    def _install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal(signum, self._on_stop_signal)

    def _on_stop_signal(self, signum: int) -> None:
        if self.ctx is not None and self.ctx.state.is_frozen():
            return  # never leave the guest frozen without its agent
        log.debug("received signal num %d, quitting", signum)
        from qga import sdnotify

        sdnotify.stopping()
        self.loop.stop()

    def _notify_ready(self) -> None:
        """Tell systemd (Type=notify) we serve, and keep its watchdog fed."""
        from qga import sdnotify

        sdnotify.ready()
        self._watchdog = sdnotify.Watchdog(self.loop)
        self._watchdog.start()

    def _shutdown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._opener is not None:
            self._opener.cancel()
        if self.ctx is not None:
            self.ctx.close()
        if self.channel is not None:
            self._unregister()
            self.channel.close()
            self.channel = None
        if self.loop is not None:
            self.loop.close()

    # -- the channel ---------------------------------------------------------

    def _open_channel(self) -> None:
        from qga.channel import ChannelOpener

        self._opener = ChannelOpener(self.config, self.loop, self._on_channel_open,
                                     self._on_channel_give_up)
        self._opener.start()

    def _on_channel_open(self, channel) -> None:
        self.channel = channel
        self._register()

    def _on_channel_give_up(self) -> None:
        self._exit_status = 1
        self.loop.stop()

    def _register(self) -> None:
        fd = self.channel.fileno()
        if fd == self._registered_fd:
            return
        self._unregister()
        self.loop.add_reader(fd, self._on_readable, edge=self.channel.edge_triggered)
        self._registered_fd = fd

    def _unregister(self) -> None:
        if self._registered_fd is not None:
            self.loop.remove(self._registered_fd)
            self._registered_fd = None

    def _on_readable(self, _events: int) -> None:
        from qga.errors import ChannelError

        if self._waiting is not None:
            self._unregister()  # a reopened channel waits too
            return
        try:
            while self._waiting is None:
                data = self.channel.read()
                if data is None:
                    break
                self.parser.feed(data)
                self._serve_pending()
        except ChannelError as error:
            log.error("channel failed: %s", error)
            self._unregister()
            self.channel.close()
            self.channel = None
            if not self._opener.channel_failed():
                self._on_channel_give_up()
            return
        if self.channel is not None and self._waiting is None:
            self._register()

    # -- requests and replies ------------------------------------------------

    def _serve_pending(self) -> None:
        """Dispatch every complete request buffered so far, in order, until one is deferred."""
        pending: List[bytes] = []
        size = 0
        parser = self.parser
        dispatcher = self.dispatcher
        ctx = self.ctx
        while self._waiting is None:
            event = parser.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Request):
                reply = dispatcher.dispatch(event.value)
            else:
                reply = dispatcher.error_reply(event.error)
            if reply is None:
                continue  # guest-shutdown and the suspends answer nothing on success
            if type(reply.get("return")) is Deferred:
                deferred = reply["return"]
                if not deferred.done:
                    self._wait_for(deferred, reply)
                    break
                reply = _settled_reply(deferred, reply)
            chunks = encode_reply_chunks(reply)
            if ctx.take_delimit_flag():
                chunks[0] = DELIMITER + chunks[0]
            pending.extend(chunks)
            size += sum(map(len, chunks))
            if size >= _MAX_PENDING_OUTPUT:
                self._write(pending)
                pending = []
                size = 0
        if pending:
            self._write(pending)

    def _wait_for(self, deferred: Deferred, reply: dict) -> None:
        self._waiting = deferred
        self._unregister()
        # Settled from the loop, never from inside whoever settles it.
        deferred.add_done_callback(
            lambda settled: self.loop.call_later(0, lambda: self._on_settled(settled, reply)))

    def _on_settled(self, deferred: Deferred, reply: dict) -> None:
        if self._waiting is not deferred:
            return
        self._waiting = None
        chunks = encode_reply_chunks(_settled_reply(deferred, reply))
        if self.ctx.take_delimit_flag():
            chunks[0] = DELIMITER + chunks[0]
        self._write(chunks)
        self._serve_pending()  # requests parsed while waiting
        if self._waiting is None and self.channel is not None:
            self._on_readable(0)  # then whatever the channel holds; it registers again

    def _write(self, chunks: List[bytes]) -> None:
        """Write small chunks joined (one system call), big ones as they are."""
        if self.channel is None:
            return
        batch: List[bytes] = []
        for chunk in chunks:
            if len(chunk) < _MAX_PENDING_OUTPUT:
                batch.append(chunk)
                continue
            if batch:
                self.channel.write(b"".join(batch))
                batch = []
            self.channel.write(chunk)
        if batch:
            self.channel.write(batch[0] if len(batch) == 1 else b"".join(batch))


def _settled_reply(deferred: Deferred, reply: dict) -> dict:
    """The reply of a settled deferred: its value, or its error with the request's id."""
    if deferred.error is None:
        reply["return"] = deferred.value
        return reply
    body = {"class": deferred.error.error_class, "desc": deferred.error.desc}
    return {"id": reply["id"], "error": body} if "id" in reply else {"error": body}
