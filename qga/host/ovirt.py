"""The oVirt guest agent channel on a host Unix socket, relayed through qga's own channel.

VDSM talks to the oVirt guest agent over a second virtio-serial port
(``ovirt-guest-agent.0``): it connects to the Unix socket libvirt binds for
that port and exchanges newline-delimited JSON.  A host that cannot give the
guest that port runs this helper instead: it binds the socket VDSM expects
and carries the lines over the qga agent channel, through the oVirt
extension's envelope commands::

    python3 -m qga.host.ovirt --agent /var/lib/libvirt/qemu/channel/target/qga.sock \\
        --listen /var/lib/libvirt/qemu/channels/<vm-uuid>.ovirt-guest-agent.0

* VDSM -> guest: each line becomes part of a ``guest-extension-call`` of
  ``ovirt-relay-send`` ``{"lines": [...]}`` (lines of invalid UTF-8, or over
  :data:`MAX_LINE` bytes, are dropped: the agent would drop them too);
* guest -> VDSM: the extension's ``ovirt-message`` events, read with
  ``guest-extension-events`` (a cursor, at least once: duplicates are
  skipped by sequence number), are written to VDSM, one line each.

The extension only emits those events while this helper holds a lease
(``ovirt-relay-open``, renewed every third of it); when VDSM disconnects
the lease is given back (``ovirt-relay-close``).  Events left from an
earlier connection are acknowledged, not delivered: VDSM sends ``refresh``
on connect and gets the current state.  One VDSM connection at a time, as
with libvirt's socket.  The helper is one thread: it waits on VDSM's
socket and on the agent (``guest-extension-events`` with a short ``wait``)
in turn, so a VDSM line waits at most :data:`POLL_WAIT` seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from qga.errors import ClientError

log = logging.getLogger(__name__)

EXTENSION = "ovirt-guest-agent"
EVENT = "ovirt-message"
MAX_LINE = 1 << 20          # VDSM's own limit for one message
MAX_LINES_PER_CALL = 64     # the extension's ovirt-relay-send limit
DEFAULT_LEASE = 60.0
POLL_WAIT = 0.25            # seconds guest-extension-events waits for an event
MAX_EVENTS = 200


class OvirtRelay:
    """One VDSM-facing socket relayed through a :class:`qga.host.Client`."""

    def __init__(self, client: Any, listen_path: str, extension: str = EXTENSION,
                 lease: float = DEFAULT_LEASE, poll_wait: float = POLL_WAIT,
                 clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.listen_path = listen_path
        self.extension = extension
        self.lease = lease
        self.poll_wait = poll_wait
        self.clock = clock
        self.listener = _bind(listen_path)
        self.vdsm: Optional[socket.socket] = None
        self._partial = bytearray()
        self._skipping = False
        self._outgoing: List[str] = []
        self._cursor: Optional[str] = None
        self._last_seq = -1
        self._renew_at = 0.0
        self._dropped_seen = 0
        self.delivered = 0

    # -- the loop --

    def serve(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        while not should_stop():
            self.step()

    def step(self) -> None:
        """One round: VDSM's side (accept, read, forward), then the guest's (events)."""
        wait = 0.0 if self.vdsm is not None else self.poll_wait
        readable, _, _ = select.select([self.listener] + ([self.vdsm] if self.vdsm else []),
                                       [], [], wait)
        if self.listener in readable:
            self._accept()
        if self.vdsm is not None and self.vdsm in readable:
            self._read_vdsm()
        if self.vdsm is None:
            return
        self._send_lines()
        if self.vdsm is not None and self.clock() >= self._renew_at:
            self._open_lease()
        if self.vdsm is not None:
            self._read_events(self.poll_wait if not self._outgoing else 0.0)

    # -- VDSM's side --

    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        if self.vdsm is not None:      # one at a time, like libvirt's chardev socket
            log.warning("a second connection while VDSM is connected: refused")
            sock.close()
            return
        sock.setblocking(False)
        self.vdsm = sock
        self._partial.clear()
        self._skipping = False
        self._outgoing.clear()
        log.info("VDSM connected")
        self._drain_stale_events()
        self._open_lease()

    def _read_vdsm(self) -> None:
        assert self.vdsm is not None
        try:
            data = self.vdsm.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect("VDSM disconnected")
            return
        for line in self._lines(data):
            try:
                self._outgoing.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                log.warning("dropped a line from VDSM that is not UTF-8")

    def _lines(self, data: bytes) -> List[bytes]:
        lines = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            elif len(self._partial) + end - start < MAX_LINE:
                lines.append(bytes(self._partial) + data[start:end])
            else:
                log.warning("dropped a line from VDSM over %d bytes", MAX_LINE)
            self._partial.clear()
            start = end + 1
        if not self._skipping:
            self._partial += data[start:]
            if len(self._partial) >= MAX_LINE:
                log.warning("dropped a line from VDSM over %d bytes", MAX_LINE)
                self._partial.clear()
                self._skipping = True
        return lines

    def _write_vdsm(self, data: bytes) -> None:
        assert self.vdsm is not None
        self.vdsm.setblocking(True)
        self.vdsm.settimeout(10.0)
        try:
            self.vdsm.sendall(data)
        except OSError as error:
            self._disconnect(f"writing to VDSM failed: {error}")
            return
        self.vdsm.setblocking(False)

    def _disconnect(self, why: str) -> None:
        log.info("%s", why)
        if self.vdsm is not None:
            self.vdsm.close()
            self.vdsm = None
        try:
            self._call("ovirt-relay-close", {})
        except ClientError as error:
            log.warning("giving back the lease failed: %s", error)

    # -- the guest's side --

    def _call(self, command: str, arguments: Dict[str, Any]) -> Any:
        return self.client.call("guest-extension-call", {"name": self.extension,
                                                         "command": command,
                                                         "arguments": arguments})

    def _open_lease(self) -> None:
        self._call("ovirt-relay-open", {"lease": self.lease})
        self._renew_at = self.clock() + self.lease / 3

    def _send_lines(self) -> None:
        while self._outgoing:
            batch, self._outgoing = (self._outgoing[:MAX_LINES_PER_CALL],
                                     self._outgoing[MAX_LINES_PER_CALL:])
            self._call("ovirt-relay-send", {"lines": batch})
            self._renew_at = max(self._renew_at, self.clock() + self.lease / 3)

    def _events(self, wait: float) -> List[Dict[str, Any]]:
        request: Dict[str, Any] = {"name": self.extension, "max": MAX_EVENTS}
        if self._cursor is not None:
            request["cursor"] = self._cursor
        if wait > 0:
            request["wait"] = wait
        batch = self.client.call("guest-extension-events", request)
        self._cursor = batch["cursor"]
        dropped = batch.get("dropped", 0)
        if dropped > self._dropped_seen:
            log.warning("the guest dropped %d oVirt messages (queue bound or rate limit)",
                        dropped - self._dropped_seen)
            self._dropped_seen = dropped
        fresh = [event for event in batch["events"] if event["seq"] > self._last_seq]
        if batch["events"]:
            self._last_seq = max(self._last_seq, max(event["seq"] for event in batch["events"]))
        return [event for event in fresh if event.get("name") == EVENT]

    def _drain_stale_events(self) -> None:
        """Acknowledge what an earlier connection left (VDSM's refresh brings it anew)."""
        for _ in range(100):    # bounded: a lease left running keeps adding some
            if not self._events(0.0):
                return          # this read's cursor acknowledged the last batch

    def _read_events(self, wait: float) -> None:
        events = self._events(wait)
        data = b"".join(event["data"]["line"].encode("utf-8") + b"\n" for event in events
                        if isinstance(event.get("data"), dict)
                        and isinstance(event["data"].get("line"), str))
        if data:
            self._write_vdsm(data)
            self.delivered += len(events)

    def close(self) -> None:
        if self.vdsm is not None:
            self._disconnect("stopping")
        self.listener.close()
        try:
            os.unlink(self.listen_path)
        except OSError:
            pass


def _bind(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(1)
    return listener


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m qga.host.ovirt",
        description="Present the oVirt guest agent channel on a Unix socket, relayed through"
                    " the qga agent channel (for hosts without the ovirt-guest-agent.0 port).")
    parser.add_argument("--agent", required=True, help="the qga agent channel's Unix socket")
    parser.add_argument("--listen", required=True,
                        help="the socket to bind for VDSM (where it expects the port's)")
    parser.add_argument("--extension", default=EXTENSION, help="the extension's name")
    parser.add_argument("--lease", type=float, default=DEFAULT_LEASE,
                        help="seconds the extension relays without hearing from us")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(name)s: %(message)s")
    from qga.host.client import Client

    client = Client(args.agent, timeout=30.0)
    relay = OvirtRelay(client, args.listen, args.extension, args.lease)
    try:
        relay.serve()
    except KeyboardInterrupt:
        return 0
    except ClientError as error:
        print(f"qga.host.ovirt: {error}", file=sys.stderr)
        return 1
    finally:
        relay.close()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
