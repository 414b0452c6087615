"""Opening the channel as qemu-ga does: its log lines, giving up, and --retry-path."""

from __future__ import annotations

import logging
import os
import pty
import time

import pytest

from qga.channel import RETRY_INTERVAL, ChannelOpener
from qga.config import Config
from qga.loop import Loop


class Outcome:
    def __init__(self):
        self.opened = []
        self.gave_up = 0

    def on_open(self, channel):
        self.opened.append(channel)

    def on_give_up(self):
        self.gave_up += 1

    def close(self):
        for channel in self.opened:
            channel.close()


@pytest.fixture
def loop():
    event_loop = Loop()
    yield event_loop
    event_loop.close()


@pytest.fixture
def outcome():
    result = Outcome()
    yield result
    result.close()


def messages(caplog):
    return [(record.levelname, record.getMessage()) for record in caplog.records
            if record.name == "qga.channel"]


def run_until(loop, condition, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        loop.run_once(max_wait=0.05)
    return condition()


def test_retry_interval_is_qemu_gas():
    assert RETRY_INTERVAL == 5.0


def test_unsupported_method(loop, outcome, caplog):
    caplog.set_level(logging.DEBUG, logger="qga.channel")
    ChannelOpener(Config(method="bogus", path="/x"), loop, outcome.on_open, outcome.on_give_up).start()
    assert (outcome.opened, outcome.gave_up) == ([], 1)
    assert messages(caplog) == [
        ("CRITICAL", "unsupported channel method/type: bogus"),
        ("CRITICAL", "failed to initialize guest agent channel"),
    ]


def test_missing_device_without_retry(loop, outcome, caplog):
    caplog.set_level(logging.DEBUG, logger="qga.channel")
    config = Config(method="isa-serial", path="/nonexistent/ttyS0")
    ChannelOpener(config, loop, outcome.on_open, outcome.on_give_up).start()
    assert outcome.gave_up == 1
    assert messages(caplog) == [
        ("CRITICAL", "error opening channel '/nonexistent/ttyS0': No such file or directory"),
        ("CRITICAL", "failed to create guest agent channel"),
        ("CRITICAL", "failed to initialize guest agent channel"),
    ]


def test_retry_until_the_device_appears(tmp_path, loop, outcome, caplog):
    caplog.set_level(logging.DEBUG, logger="qga.channel")
    link = tmp_path / "org.qemu.guest_agent.0"
    config = Config(method="virtio-serial", path=str(link), retry_path=True)
    opener = ChannelOpener(config, loop, outcome.on_open, outcome.on_give_up)
    opener.retry_interval = 0.05
    opener.start()
    assert outcome.opened == [] and outcome.gave_up == 0
    assert messages(caplog)[-2:] == [("WARNING", "agent stopped unexpectedly, restarting..."),
                                     ("WARNING", "waiting for channel path...")]
    assert run_until(loop, lambda: len(caplog.records) >= 10)  # it keeps trying
    master, slave = pty.openpty()
    try:
        link.symlink_to(os.ttyname(slave))  # the port appears (driver loaded, hot-plug)
        assert run_until(loop, lambda: outcome.opened)
        assert outcome.gave_up == 0
    finally:
        os.close(master)
        os.close(slave)


def test_channel_failure_in_use(tmp_path, loop, outcome):
    master, slave = pty.openpty()
    try:
        config = Config(method="virtio-serial", path=os.ttyname(slave))
        opener = ChannelOpener(config, loop, outcome.on_open, outcome.on_give_up)
        opener.start()
        assert len(outcome.opened) == 1
        assert opener.channel_failed() is False  # no -r: the agent stops
        config.retry_path = True
        opener.retry_interval = 0.01
        assert opener.channel_failed() is True
        assert run_until(loop, lambda: len(outcome.opened) == 2)
        opener.cancel()
    finally:
        os.close(master)
        os.close(slave)
