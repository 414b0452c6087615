"""Deferred replies: the agent holds later requests until a deferred reply is settled.

A real agent loop, dispatcher and schema; the channel is one end of a
socketpair, the host the other.  ``guest-get-time`` is given a handler that
answers later, the way ``guest-extension-call`` does.
"""

from __future__ import annotations

import json
import socket

import pytest

from qga.agent import Agent
from qga.commands import Context, Deferred, collect_handlers
from qga.config import Config
from qga.dispatch import Dispatcher
from qga.errors import CommandError
from qga.loop import Loop
from qga.schema import Schema


class PairChannel:
    """The agent's side of a socketpair, as a level-triggered channel."""

    edge_triggered = False

    def __init__(self, sock):
        self.sock = sock
        sock.setblocking(False)

    def fileno(self):
        return self.sock.fileno()

    def read(self):
        try:
            return self.sock.recv(65536) or None
        except BlockingIOError:
            return None

    def write(self, data):
        self.sock.sendall(data)

    def close(self):
        self.sock.close()


class Harness:
    def __init__(self):
        self.pending = []
        agent = Agent(Config())
        agent.loop = Loop()
        agent.ctx = Context(Config(), None, agent.loop)
        handlers = collect_handlers(lazy=False)
        handlers["guest-get-time"] = self.later
        agent.dispatcher = Dispatcher(Schema.load(), handlers, agent.ctx)
        ours, self.host = socket.socketpair()
        self.host.settimeout(0.01)
        agent.channel = PairChannel(ours)
        agent._register()
        self.agent = agent
        self.buffer = b""

    def later(self, ctx):
        deferred = Deferred()
        self.pending.append(deferred)
        return deferred

    def send(self, *requests):
        self.host.sendall(b"".join(json.dumps(r).encode() for r in requests))

    def spin(self, rounds=20):
        for _ in range(rounds):
            self.agent.loop.run_once(0.005)

    def replies(self):
        self.spin()
        try:
            while True:
                data = self.host.recv(65536)
                if not data:
                    break
                self.buffer += data
        except (socket.timeout, BlockingIOError):
            pass
        lines = self.buffer.split(b"\n")
        self.buffer = lines.pop()
        return [json.loads(line.lstrip(b"\xff")) for line in lines]

    def close(self):
        self.agent.channel.close()
        self.host.close()
        self.agent.loop.close()


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def test_later_requests_wait_for_the_deferred_reply(harness):
    harness.send({"execute": "guest-ping", "id": 1}, {"execute": "guest-get-time", "id": 2},
                 {"execute": "guest-ping", "id": 3})
    assert harness.replies() == [{"return": {}, "id": 1}]
    assert len(harness.pending) == 1
    harness.send({"execute": "guest-ping", "id": 4})
    assert harness.replies() == []  # held: the host sees replies in order
    harness.pending[0].resolve(1234)
    assert harness.replies() == [{"return": 1234, "id": 2}, {"return": {}, "id": 3},
                                 {"return": {}, "id": 4}]


def test_a_failed_deferred_is_an_error_reply_with_the_id(harness):
    harness.send({"execute": "guest-get-time", "id": "x"})
    harness.spin()
    harness.pending[0].fail(CommandError("took too long"))
    harness.send({"execute": "guest-get-time"})
    assert harness.replies() == [{"id": "x", "error": {"class": "GenericError",
                                                       "desc": "took too long"}}]
    harness.pending[1].fail(CommandError("again"))
    assert harness.replies() == [{"error": {"class": "GenericError", "desc": "again"}}]


def test_the_loop_keeps_running_while_a_reply_is_held(harness):
    fired = []
    harness.send({"execute": "guest-get-time", "id": 1})
    harness.spin()
    harness.agent.loop.call_later(0, lambda: fired.append(True))
    harness.spin()
    assert fired == [True]
    # Settling twice counts once (a timeout and a late answer).
    harness.pending[0].resolve(5)
    harness.pending[0].fail(CommandError("late"))
    assert harness.replies() == [{"return": 5, "id": 1}]


def test_a_deferred_settled_at_once_is_an_ordinary_reply(harness):
    def settled(ctx):
        deferred = Deferred()
        deferred.resolve(7)
        return deferred

    harness.agent.dispatcher._entries["guest-get-time"].handler = settled
    harness.send({"execute": "guest-get-time", "id": 1}, {"execute": "guest-ping", "id": 2})
    assert harness.replies() == [{"return": 7, "id": 1}, {"return": {}, "id": 2}]


def test_sync_delimited_after_a_held_reply_keeps_its_delimiter(harness):
    harness.send({"execute": "guest-get-time", "id": 1},
                 {"execute": "guest-sync-delimited", "arguments": {"id": 9}})
    harness.spin()
    harness.pending[0].resolve(0)
    harness.spin()
    data = harness.host.recv(65536)
    assert data == b'{"return": 0, "id": 1}\n\xff{"return": 9}\n'
