"""Logging: qemu-ga's line format, -v, the frozen gate, journald priorities, syslog audit."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from qga.config import Config
from qga.errors import ConfigError
from qga.log import format_line, glib_message, setup_logging

LINE = re.compile(r"^\d+\.\d{6}: (\w+): (.*)$")


class Frozen:
    def __init__(self, value=False):
        self.value = value

    def __call__(self):
        return self.value


@pytest.fixture
def logger():
    return logging.getLogger("qga.test_log")


@pytest.fixture
def installed():
    setups = []

    def install(config, is_frozen):
        setup = setup_logging(config, is_frozen, use_syslog=False)
        setups.append(setup)
        return setup

    yield install
    for setup in setups:
        setup.close()


def lines(path):
    return [LINE.match(line).groups() for line in Path(path).read_text().splitlines()]


def test_format_line():
    assert format_line(1700000000.000042, logging.CRITICAL, "boom") == "1700000000.000042: critical: boom"
    assert format_line(5.5, logging.DEBUG, "x") == "5.500000: debug: x"
    assert format_line(5.0, 25, "m") == "5.000000: message: m"
    assert format_line(5.0, logging.WARNING, "w").endswith(": warning: w")
    assert format_line(5.0, logging.INFO, "i").endswith(": info: i")
    assert format_line(5.0, logging.ERROR, "e").endswith(": error: e")


def test_quiet_by_default(tmp_path, installed, logger):
    log_file = tmp_path / "qga.log"
    installed(Config(logfile=str(log_file)), Frozen())
    logger.debug("debug line")
    logger.warning("warning line")
    logger.error("error line")
    logger.critical("critical line")
    assert lines(log_file) == [("error", "error line"), ("critical", "critical line")]


def test_verbose_logs_everything_and_appends(tmp_path, installed, logger):
    log_file = tmp_path / "qga.log"
    log_file.write_text("1.000000: critical: an earlier run\n")
    installed(Config(logfile=str(log_file), verbose=True), Frozen())
    logger.debug("debug line")
    logger.info("info line")
    assert lines(log_file) == [("critical", "an earlier run"), ("debug", "debug line"),
                               ("info", "info line")]


def test_nothing_is_written_while_frozen(tmp_path, installed, logger):
    log_file = tmp_path / "qga.log"
    frozen = Frozen()
    installed(Config(logfile=str(log_file)), frozen)
    frozen.value = True
    logger.critical("while frozen")
    frozen.value = False
    logger.critical("after the thaw")
    assert lines(log_file) == [("critical", "after the thaw")]


def test_log_file_waits_for_the_thaw_when_starting_frozen(tmp_path, installed, logger):
    log_file = tmp_path / "qga.log"
    frozen = Frozen(True)
    installed(Config(logfile=str(log_file)), frozen)
    logger.critical("while frozen")
    assert not log_file.exists()  # not even created: it may be on a frozen filesystem
    frozen.value = False
    logger.critical("after the thaw")
    assert lines(log_file) == [("critical", "after the thaw")]


def test_unopenable_log_file_fails_setup(tmp_path):
    with pytest.raises(ConfigError) as caught:
        setup_logging(Config(logfile=str(tmp_path / "no" / "such" / "dir.log")), Frozen(),
                      use_syslog=False)
    assert str(caught.value) == "unable to open specified log file: No such file or directory"


def test_close_restores_the_logger(tmp_path, logger):
    parent = logging.getLogger("qga")
    before = (parent.level, parent.propagate, list(parent.handlers))
    setup = setup_logging(Config(logfile=str(tmp_path / "l")), Frozen(), use_syslog=False)
    setup.close()
    assert (parent.level, parent.propagate, list(parent.handlers)) == before


def test_log_file_is_not_inherited(tmp_path, installed):
    setup = installed(Config(logfile=str(tmp_path / "qga.log")), Frozen())
    assert not os.get_inheritable(setup.handler.stream.fileno())


def test_glib_message(capsys):
    glib_message("critical", "error loading configuration from path: /x, Key file contains"
                             " line \u201cfoo\u201d \x01")
    err = capsys.readouterr().err
    assert re.fullmatch(r"\n\*\* \(process:\d+\): CRITICAL \*\*: \d\d:\d\d:\d\d\.\d{3}: "
                        r"error loading configuration from path: /x, Key file contains"
                        r" line \?foo\? \\u0001\n", err), err
