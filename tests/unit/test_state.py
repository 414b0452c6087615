"""The state directory: counter file compatible with qemu-ga's, frozen marker, atomic writes."""

from __future__ import annotations

import os
import stat

import pytest

from qga.errors import StateError
from qga.state import COUNTER_FILE, FROZEN_MARKER, StateDir, atomic_write, glib_integer


def counter_text(path) -> str:
    return (path / COUNTER_FILE).read_text()


# -- atomic_write -----------------------------------------------------------------------


def test_atomic_write_creates_with_mode_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "file"
    atomic_write(str(target), b"one")
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(str(target), b"two", mode=0o644)
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["file"]


def test_atomic_write_respects_umask_for_the_mode(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(str(tmp_path / "file"), b"x", mode=0o666)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == 0o600


def test_atomic_write_failure_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()  # renaming a file over a directory fails
    (target / "inside").write_text("keep")
    with pytest.raises(StateError) as caught:
        atomic_write(str(target), b"new")
    assert isinstance(caught.value.__cause__, OSError)
    assert sorted(os.listdir(tmp_path)) == ["busy"]
    assert (target / "inside").read_text() == "keep"


def test_atomic_write_into_a_missing_directory(tmp_path):
    with pytest.raises(StateError):
        atomic_write(str(tmp_path / "missing" / "file"), b"x")


# -- the counter ------------------------------------------------------------------------


def test_new_state_dir_starts_at_1000_and_persists_every_handle(tmp_path):
    state = StateDir(str(tmp_path))
    assert counter_text(tmp_path) == "[global]\nfd_counter=1000\n"
    assert state.next_handle() == 1000
    assert counter_text(tmp_path) == "[global]\nfd_counter=1001\n"
    assert state.next_handle() == 1001
    # A restart continues the numbering: handles are never reused.
    assert StateDir(str(tmp_path)).next_handle() == 1002


def test_counter_file_mode_follows_umask_like_glib(tmp_path):
    old = os.umask(0o022)
    try:
        StateDir(str(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / COUNTER_FILE).stat().st_mode) == 0o644


def test_create_counter_false_does_not_write(tmp_path):
    state = StateDir(str(tmp_path), create_counter=False)
    assert not (tmp_path / COUNTER_FILE).exists()
    assert state.next_handle() == 1000
    assert counter_text(tmp_path) == "[global]\nfd_counter=1001\n"


# The counter the real qemu-ga 7.2 starts from for each qga.state (measured through
# guest-file-open; for a negative counter it answers -1, see test_files).
EXISTING_FILES = [
    ("[global]\nfd_counter=5\n", 5),
    ("[global]\nfd_counter=abc\n", 0),
    ("[global]\nfd_counter= 12 \n", 12),
    ("[global]\nfd_counter=5\nfd_counter=7\n", 7),
    ("", 1000),
    ("[global]\nfd_counter=3000000000\n", 0),
    ("[global]\nfd_counter=-5\n", -5),
    ("[global]\nFD_COUNTER=5\n", 1000),
    ("#c\n[other]\nx=1\n", 1000),
    ("[global]\nfd_counter=12abc\n", 0),
    ("[global]\nfd_counter=\n", 0),
    ("[global] \nfd_counter = 9\n", 9),
    ("[global]\n fd_counter=4\n", 4),
    ("[global]\nfd_counter=+8\n", 8),
    ("[global]\nfd_counter=  \n", 0),
    ("[global]\nfd_counter=0x10\n", 0),
    ("[global]\r\nfd_counter=6\r\n", 6),
    ("[global]\nfd counter=1\n", 1000),
    ("[global]\nfd_counter=2147483647\n", 2147483647),
    ("[global]\nfd_counter=1 2\n", 1),
    ("[other]\nfd_counter=3\n[global]\n[other]\n", 1000),
    ("[global]\nfd_counter=3\n[other]\n[global]\nfd_counter=4\n", 4),
]


@pytest.mark.parametrize("content, first", EXISTING_FILES)
def test_existing_counter_file_is_read_like_qemu_ga(tmp_path, content, first):
    (tmp_path / COUNTER_FILE).write_bytes(content.encode())
    state = StateDir(str(tmp_path))
    assert (tmp_path / COUNTER_FILE).read_bytes() == content.encode()  # not rewritten at start
    assert state.next_handle() == first
    assert counter_text(tmp_path) == f"[global]\nfd_counter={first + 1}\n"


# Files qemu-ga 7.2 refuses to start with (measured).
UNPARSABLE_FILES = [
    "garbage\n",
    "[global\n",
    "fd_counter=5\n",
    "[a]x=1\n[global]\nfd_counter=3\n",
    "[glo[bal]\nfd_counter=1\n",
    "[global]\n=1\n",
    "[]\n",
    "\xff\n",
]


@pytest.mark.parametrize("content", UNPARSABLE_FILES)
def test_unparsable_counter_file_stops_the_agent(tmp_path, content):
    (tmp_path / COUNTER_FILE).write_bytes(content.encode("latin-1"))
    with pytest.raises(StateError):
        StateDir(str(tmp_path))


def test_failed_counter_write_fails_the_handle_but_consumes_it(tmp_path):
    state = StateDir(str(tmp_path))
    (tmp_path / COUNTER_FILE).unlink()
    (tmp_path / COUNTER_FILE).mkdir()  # the rename now fails
    with pytest.raises(StateError):
        state.next_handle()
    (tmp_path / COUNTER_FILE).rmdir()
    assert state.next_handle() == 1001
    assert counter_text(tmp_path) == "[global]\nfd_counter=1002\n"


def test_missing_state_dir_is_refused_at_start(tmp_path):
    with pytest.raises(StateError):
        StateDir(str(tmp_path / "missing"))


def test_state_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError):
        StateDir(str(tmp_path / "file"))


@pytest.mark.parametrize("value, number", [
    ("17", 17), (" 17", 17), ("17 ", 17), ("-3", -3), ("+3", 3), ("", 0), ("x", 0),
    ("1x", 0), ("2147483648", 0), ("-2147483648", -2147483648), ("-2147483649", 0),
    (" ", 0), ("1\t", 1),
])
def test_glib_integer(value, number):
    assert glib_integer(value) == number


# -- frozen state ------------------------------------------------------------------------


def test_frozen_marker_round_trip(tmp_path):
    state = StateDir(str(tmp_path))
    assert not state.is_frozen()
    state.set_frozen(True)
    marker = tmp_path / FROZEN_MARKER
    assert state.is_frozen() and marker.exists()
    assert marker.read_bytes() == b""
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600
    state.set_frozen(True)  # no change, no error
    state.set_frozen(False)
    assert not state.is_frozen() and not marker.exists()


def test_starting_frozen_does_not_create_the_counter(tmp_path):
    (tmp_path / FROZEN_MARKER).write_bytes(b"")
    state = StateDir(str(tmp_path))
    assert state.is_frozen()
    assert not (tmp_path / COUNTER_FILE).exists()
    state.set_frozen(False)
    assert not (tmp_path / FROZEN_MARKER).exists()
    assert state.next_handle() == 1000
    assert counter_text(tmp_path) == "[global]\nfd_counter=1001\n"


def test_frozen_flag_is_cached(tmp_path):
    state = StateDir(str(tmp_path))
    (tmp_path / FROZEN_MARKER).write_bytes(b"")  # behind our back: not looked at again
    assert not state.is_frozen()


def test_marker_that_cannot_be_removed_only_warns(tmp_path, caplog):
    state = StateDir(str(tmp_path))
    state.set_frozen(True)
    (tmp_path / FROZEN_MARKER).unlink()
    state.set_frozen(False)
    assert not state.is_frozen()
    assert "unable to delete" in caplog.text
