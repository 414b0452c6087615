"""The event queue: cursors, at-least-once, bounds, rate limit, waiting reads."""

from __future__ import annotations

import time

import pytest

from qga.commands import Deferred
from qga.errors import ParameterError
from qga.ext import events as ev
from qga.ext.events import EventQueue
from qga.loop import Loop


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_cursor_reads_and_acknowledges():
    queue = EventQueue()
    for number in range(5):
        queue.push("tick", {"n": number}, 20)
    first = queue.read(maximum=2)
    assert [e["data"]["n"] for e in first["events"]] == [0, 1]
    assert first["cursor"] == f"{queue.stream}-2" and first["dropped"] == 0
    again = queue.read(maximum=2)  # no cursor: nothing was acknowledged
    assert again["events"] == first["events"]
    second = queue.read(first["cursor"], maximum=10)
    assert [e["seq"] for e in second["events"]] == [3, 4, 5]
    assert len(queue) == 3  # 1 and 2 are gone, 3..5 wait for their acknowledgement
    empty = queue.read(second["cursor"])
    assert empty == {"events": [], "cursor": second["cursor"], "dropped": 0}
    assert len(queue) == 0


def test_a_lost_reply_is_read_again():
    queue = EventQueue()
    queue.push("a", {}, 10)
    lost = queue.read()
    queue.push("b", {}, 10)
    retried = queue.read()  # the host never got `lost`: it asks with its old cursor
    assert [e["name"] for e in retried["events"]] == ["a", "b"]
    assert retried["events"][0] == lost["events"][0]


def test_a_cursor_of_an_earlier_agent_reads_everything_held():
    queue = EventQueue()
    queue.push("a", {}, 10)
    assert [e["name"] for e in queue.read("0000abcd-99")["events"]] == ["a"]
    for bad in ("", "12", "zz-1", f"{queue.stream}-01", f"{queue.stream}--1"):
        with pytest.raises(ParameterError):
            queue.read(bad)


def test_bounds_drop_the_oldest_and_count(monkeypatch):
    monkeypatch.setattr(ev, "MAX_EVENTS", 3)
    monkeypatch.setattr(ev, "MAX_BYTES", 1000)
    queue = EventQueue()
    for number in range(5):
        queue.push("tick", {"n": number}, 10)
    result = queue.read()
    assert [e["data"]["n"] for e in result["events"]] == [2, 3, 4]
    assert result["dropped"] == 2
    queue.push("big", {}, 995)
    assert [e["name"] for e in queue.read()["events"]] == ["big"]
    assert queue.dropped == 5


def test_reply_size_is_bounded(monkeypatch):
    monkeypatch.setattr(ev, "MAX_REPLY_BYTES", 100)
    queue = EventQueue()
    for _ in range(5):
        queue.push("tick", {}, 40)
    assert len(queue.read(maximum=100)["events"]) == 2
    queue2 = EventQueue()
    queue2.push("huge", {}, 500)  # one event always fits, however big
    assert len(queue2.read()["events"]) == 1


def test_rate_limit_allows_bursts_then_the_rate():
    clock = Clock()
    queue = EventQueue(clock=clock)
    accepted = sum(queue.push("flood", {}, 1) for _ in range(int(ev.BURST) + 500))
    assert accepted == ev.BURST and queue.dropped == 500
    clock.now += 0.25  # a quarter of a second refills RATE / 4 tokens
    accepted = sum(queue.push("flood", {}, 1) for _ in range(1000))
    assert accepted == int(ev.RATE / 4)
    assert queue.read()["dropped"] == 500 + 1000 - int(ev.RATE / 4)


def test_a_waiting_read_is_answered_by_the_next_event():
    loop = Loop()
    try:
        queue = EventQueue(loop)
        result = queue.read_or_wait(None, 10, 5.0)
        assert isinstance(result, Deferred) and not result.done
        queue.push("late", {"x": 1}, 10)
        assert result.done and [e["name"] for e in result.value["events"]] == ["late"]
        started = time.monotonic()
        timed = queue.read_or_wait(result.value["cursor"], 10, 0.1)
        while not timed.done:
            loop.run_once(0.05)
        assert timed.value["events"] == [] and time.monotonic() - started >= 0.09
        assert queue.read_or_wait(None, 10, 0) == queue.read()  # no wait: at once
    finally:
        loop.close()
