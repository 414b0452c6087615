"""Fixtures that send the same bytes to the real qemu-ga and to a candidate agent.

The *reference* is always a real qemu-ga.  The *candidate* is, in turn, a
second qemu-ga (the suite must pass against qemu-ga by definition, which also
proves every comparison is deterministic) and our agent (``python -m qga``).
Agents are started once per test session and restarted if one dies; each
test gets fresh connections.

A test's input is followed by a *marker*: one 0xFF byte and a ``guest-sync``
with a random id.  Everything the agent writes before the marker's reply is
the input's *transcript*.  The 0xFF makes the marker work whatever state the
input left the parser in, and its own error reply (if any) is part of the
transcript, so the way an agent handles 0xFF is compared in every test.
Sending and receiving are interleaved, so inputs that make an agent write a
flood of error replies cannot deadlock the test.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import pytest

from tests.support.agents import AgentProcess, our_agent, qemu_ga_available, real_qemu_ga

REFERENCE = "qemu-ga"
CANDIDATES = ("qemu-ga", "qga")

STARTERS: Dict[str, Callable[[Path], AgentProcess]] = {
    "qemu-ga": real_qemu_ga,
    "qga": our_agent,
}

Chunks = Union[bytes, Sequence[bytes]]


class AgentPool:
    """Agents by role, started on first use and restarted when found dead."""

    def __init__(self) -> None:
        self._agents: Dict[str, AgentProcess] = {}
        self._dirs: List[Path] = []
        self._start_failures: Dict[str, str] = {}

    def get(self, role: str, kind: str) -> AgentProcess:
        agent = self._agents.get(role)
        if agent is not None and agent.proc is not None and agent.proc.poll() is None:
            return agent
        if agent is not None:
            agent.stop()
        if role in self._start_failures:
            # Do not pay the start-up timeout again in every test.
            pytest.fail(f"{kind} did not start earlier: {self._start_failures[role]}")
        workdir = Path(tempfile.mkdtemp(prefix=f"qgacmp-{kind}-"))
        self._dirs.append(workdir)
        try:
            agent = STARTERS[kind](workdir).start()
        except RuntimeError as error:
            self._start_failures[role] = str(error)[-2000:]
            raise
        self._agents[role] = agent
        return agent

    def stop_all(self) -> None:
        for agent in self._agents.values():
            agent.stop()
        self._agents.clear()
        for workdir in self._dirs:
            shutil.rmtree(workdir, ignore_errors=True)


class Session:
    """One raw connection to an agent, able to produce transcripts."""

    def __init__(self, name: str, agent: AgentProcess):
        self.name = name
        self.agent = agent
        self.sock: Optional[socket.socket] = None
        self.buffer = b""

    # -- connection --------------------------------------------------------------

    def connect(self, resync: bool = True) -> "Session":
        self.close()
        self.sock = _connect(self.agent.sock)
        self.buffer = b""
        if resync:
            self.transcript(b"")  # leaves the parser clean; what came before is not ours
        return self

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- raw traffic -----------------------------------------------------------

    def send(self, data: bytes, timeout: float = 30.0) -> None:
        """Send everything, reading (and keeping) whatever arrives meanwhile."""
        self._pump([data], 0.0, None, timeout)

    def read_quiet(self, wait: float = 0.3) -> bytes:
        """Everything that arrives within ``wait`` seconds."""
        self._pump([], 0.0, lambda: False, wait, quiet_ok=True)
        data, self.buffer = self.buffer, b""
        return data

    def _pump(self, chunks: Sequence[bytes], delay: float, until: Optional[Callable[[], bool]],
              timeout: float, quiet_ok: bool = False) -> bool:
        """Send ``chunks`` (``delay`` s apart) while reading, then read until ``until()``.

        Without ``until`` it stops once everything is sent.

        Returns False if the time ran out (only allowed with ``quiet_ok``) or
        the agent closed the connection.
        """
        assert self.sock is not None, "not connected"
        selector = selectors.DefaultSelector()
        pending = [memoryview(chunk) for chunk in chunks if chunk]
        next_send = time.monotonic()
        deadline = time.monotonic() + timeout
        try:
            selector.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while True:
                if not pending and (until is None or until()):
                    return True
                now = time.monotonic()
                if now >= deadline:
                    if quiet_ok:
                        return False
                    raise TimeoutError(f"{self.name}: no end of transcript after {timeout} s; "
                                       f"have {self.buffer[-300:]!r}")
                want_write = bool(pending) and now >= next_send
                selector.modify(self.sock, selectors.EVENT_READ
                                | (selectors.EVENT_WRITE if want_write else 0))
                wait = deadline - now
                if pending and not want_write:
                    wait = min(wait, next_send - now)
                for _, mask in selector.select(max(wait, 0.0)):
                    if mask & selectors.EVENT_READ:
                        data = self.sock.recv(1 << 20)
                        if not data:
                            return False
                        self.buffer += data
                    if mask & selectors.EVENT_WRITE and pending:
                        sent = self.sock.send(pending[0])
                        pending[0] = pending[0][sent:]
                        if not pending[0]:
                            pending.pop(0)
                            next_send = time.monotonic() + delay
        finally:
            selector.close()

    # -- transcripts -----------------------------------------------------------

    def transcript(self, data: Chunks, delay: float = 0.0, timeout: float = 20.0) -> List[bytes]:
        """The reply lines the agent writes for ``data``, in order, each with its ``\\n``.

        ``data`` may be a list of chunks, sent ``delay`` seconds apart.  A line
        ``<closed>`` ends the transcript if the agent closed the connection.
        """
        chunks = [data] if isinstance(data, bytes) else list(data)
        marker_id = int.from_bytes(os.urandom(6), "big")
        marker = b'\xff{"execute":"guest-sync","arguments":{"id":%d}}' % marker_id
        lines: List[bytes] = []
        found = []

        def marker_seen() -> bool:
            while b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                if _is_marker_reply(line, marker_id):
                    found.append(True)
                    return True
                lines.append(line + b"\n")
            return False

        alive = self._pump(chunks + [marker], delay, marker_seen, timeout)
        if not found:
            marker_seen()
            if not alive:
                lines.append(b"<closed>")
        return lines


def _connect(path: Path, timeout: float = 5.0) -> socket.socket:
    """Connect, retrying while the agent's small listen backlog is full.

    An agent serves one client at a time and qemu-ga listens with a backlog
    of one, so a connection made just after the previous one closed can be
    refused for a moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, BlockingIOError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
            continue
        sock.setblocking(False)
        return sock


def _is_marker_reply(line: bytes, marker_id: int) -> bool:
    if len(line) > 200:
        return False  # not a short sync reply, and maybe too deep for json.loads
    try:
        reply = json.loads(line)
    except ValueError:
        return False
    return isinstance(reply, dict) and reply.get("return") == marker_id and "error" not in reply


def show(lines: Iterable[bytes], limit: int = 400) -> str:
    """Transcript lines for an assertion message, long ones shortened."""
    out = []
    for line in lines:
        text = repr(line)
        out.append(text if len(text) <= limit else f"{text[:limit]}... ({len(line)} bytes)")
    return "\n    ".join(out) if out else "(nothing)"


def show_input(data: Chunks, limit: int = 300) -> str:
    joined = data if isinstance(data, bytes) else b"".join(data)
    text = repr(joined)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(joined)} bytes)"


class Wire:
    """The reference qemu-ga and the candidate, side by side."""

    def __init__(self, pool: AgentPool, candidate: str):
        self.pool = pool
        self.candidate = candidate
        self.ref = Session(f"{REFERENCE} (reference)", pool.get("reference", REFERENCE))
        self.cand = Session(candidate, pool.get("candidate-" + candidate, candidate))

    def sessions(self) -> List[Session]:
        return [self.ref, self.cand]

    def connect(self, resync: bool = True) -> None:
        for session in self.sessions():
            session.connect(resync)

    def close(self) -> None:
        for session in self.sessions():
            session.close()

    def both(self, data: Chunks, delay: float = 0.0, timeout: float = 20.0):
        """Transcripts of the reference and the candidate for the same input."""
        return (self.ref.transcript(data, delay, timeout),
                self.cand.transcript(data, delay, timeout))

    def compare(self, data: Chunks, delay: float = 0.0, timeout: float = 20.0) -> List[bytes]:
        """Assert both agents write byte-identical transcripts; return the reference's."""
        expected, actual = self.both(data, delay, timeout)
        assert actual == expected, self.mismatch(data, expected, actual)
        return expected

    def mismatch(self, data: Chunks, expected: Sequence[bytes], actual: Sequence[bytes]) -> str:
        return (f"transcripts differ\n  input: {show_input(data)}\n"
                f"  {REFERENCE}:\n    {show(expected)}\n  {self.candidate}:\n    {show(actual)}")


@pytest.fixture(scope="session")
def agent_pool():
    if not qemu_ga_available():
        if os.environ.get("CI"):
            pytest.fail("qemu-ga is not installed; .ci/run installs it")
        pytest.skip("qemu-ga is not installed (apt-get install qemu-guest-agent)")
    pool = AgentPool()
    yield pool
    pool.stop_all()


@pytest.fixture(params=CANDIDATES)
def wire(request, agent_pool):
    """Connected sessions to the reference qemu-ga and the candidate, parser state clean."""
    pair = Wire(agent_pool, request.param)
    pair.connect()
    yield pair
    pair.close()
