"""The extension store: index, switch/confirm/roll back, recovery after a kill, garbage."""

from __future__ import annotations

import json
import os
import stat

import pytest

from qga.errors import StoreError
from qga.ext.store import Store, has_store, version_of


def add_version(store, name, version):
    """What the installer does before a switch: a fresh, extracted version directory."""
    version_id = store.new_version(name, version)
    path = store.version_dir(name, version_id)
    os.makedirs(os.path.join(path, "bundle"))
    with open(os.path.join(path, "bundle", "hello.py"), "w") as stream:
        stream.write(version)
    return version_id


def index(statedir):
    with open(os.path.join(statedir, "extensions", "index.json")) as stream:
        return json.load(stream)["extensions"]


def test_a_fresh_store(tmp_path):
    assert not has_store(str(tmp_path))
    store = Store.open(str(tmp_path))
    assert has_store(str(tmp_path))
    assert store.names() == [] and list(store.installed()) == []
    root = tmp_path / "extensions"
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "staging").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "index.json").stat().st_mode) == 0o600


def test_upgrade_keeps_one_previous_version(tmp_path):
    store = Store.open(str(tmp_path))
    first = add_version(store, "hello", "1.0.0")
    store.switch("hello", first, 10)
    store.confirm("hello")
    second = add_version(store, "hello", "1.1.0")
    store.switch("hello", second, 11)
    store.confirm("hello")
    third = add_version(store, "hello", "1.2.0")
    entry = store.switch("hello", third, 12)
    assert (entry.current, entry.previous) == (third, second)
    assert os.path.isdir(store.version_dir("hello", first))  # until confirmed
    store.confirm("hello")
    assert not os.path.exists(store.version_dir("hello", first))
    assert sorted(os.listdir(tmp_path / "extensions/hello/versions")) == sorted([second, third])
    saved = index(tmp_path)["hello"]
    assert (saved["current"], saved["previous"], saved["counter"]) == (third, second, 12)
    assert saved["install"]["state"] == "done" and saved["install"]["version"] == "1.2.0"
    assert version_of(third) == "1.2.0"


def test_roll_back_restores_the_version_before(tmp_path):
    store = Store.open(str(tmp_path))
    first = add_version(store, "hello", "1.0.0")
    store.switch("hello", first, 10)
    store.confirm("hello")
    broken = add_version(store, "hello", "2.0.0")
    store.switch("hello", broken, 20)
    entry = store.roll_back("hello", "never said it was ready")
    assert (entry.current, entry.previous) == (first, None)
    assert entry.install["state"] == "rolled-back"
    assert entry.install["error"] == "never said it was ready"
    assert not os.path.exists(store.version_dir("hello", broken))
    assert store.counter("hello") == 20  # the broken bundle cannot be replayed
    assert index(tmp_path)["hello"]["current"] == first


def test_a_failed_first_install_leaves_nothing_but_the_record(tmp_path):
    store = Store.open(str(tmp_path))
    broken = add_version(store, "hello", "1.0.0")
    store.switch("hello", broken, 5)
    entry = store.roll_back("hello", "crashed")
    assert not entry.installed and entry.install["state"] == "failed"
    reopened = Store.open(str(tmp_path))
    assert list(reopened.installed()) == []
    assert reopened.counter("hello") == 5
    assert not (tmp_path / "extensions/hello").exists()


def test_killed_after_the_switch_restarts_on_the_version_before(tmp_path):
    store = Store.open(str(tmp_path))
    first = add_version(store, "hello", "1.0.0")
    store.switch("hello", first, 10)
    store.confirm("hello")
    second = add_version(store, "hello", "1.1.0")
    store.switch("hello", second, 11)
    # The agent is killed here: a new one opens the store.
    reopened = Store.open(str(tmp_path))
    entry = reopened.entry("hello")
    assert (entry.current, entry.previous) == (first, None)
    assert entry.install["state"] == "rolled-back" and "interrupted" in entry.install["error"]
    assert not os.path.exists(reopened.version_dir("hello", second))
    assert index(tmp_path)["hello"]["current"] == first


def test_killed_during_extraction_or_before_deleting_leaves_no_garbage(tmp_path):
    store = Store.open(str(tmp_path))
    first = add_version(store, "hello", "1.0.0")
    store.switch("hello", first, 10)
    store.confirm("hello")
    half = add_version(store, "hello", "1.1.0")  # extracted, never switched to
    stray = tmp_path / "extensions/index.json.a1b2c3"  # an interrupted index write
    stray.write_text("{")
    orphan = tmp_path / "extensions/gone/versions/1-0.1.0"
    orphan.mkdir(parents=True)
    reopened = Store.open(str(tmp_path))
    assert not os.path.exists(reopened.version_dir("hello", half))
    assert os.path.isdir(reopened.bundle_dir("hello", first))
    assert not stray.exists() and not (tmp_path / "extensions/gone").exists()
    assert reopened.entry("hello").current == first


def test_remove_keeps_the_counter_and_forgets_everything_else(tmp_path):
    store = Store.open(str(tmp_path))
    first = add_version(store, "hello", "1.0.0")
    store.switch("hello", first, 10)
    store.confirm("hello")
    os.makedirs(store.state_dir("hello"))
    store.remove("hello")
    assert not (tmp_path / "extensions/hello").exists()
    assert not store.entry("hello").installed
    assert Store.open(str(tmp_path)).counter("hello") == 10


def test_unsigned_versions_have_no_counter_and_leave_no_entry(tmp_path):
    store = Store.open(str(tmp_path))
    first = add_version(store, "hello", "1.0.0")
    store.switch("hello", first, None)
    store.confirm("hello")
    assert store.counter("hello") is None
    store.remove("hello")
    assert store.entry("hello") is None and index(tmp_path) == {}


def test_enabled_is_remembered(tmp_path):
    store = Store.open(str(tmp_path))
    first = add_version(store, "hello", "1.0.0")
    store.switch("hello", first, 1)
    store.confirm("hello")
    store.set_enabled("hello", False)
    assert Store.open(str(tmp_path)).entry("hello").enabled is False


def test_a_refused_install_is_recorded(tmp_path):
    store = Store.open(str(tmp_path))
    store.record_failure("hello", "1.0.0", "bad signature")
    entry = Store.open(str(tmp_path)).entry("hello")
    assert not entry.installed and entry.install["error"] == "bad signature"


@pytest.mark.parametrize("text", ["{", '{"format": 2, "extensions": {}}',
                                  '{"format": 1, "extensions": {"Bad": {}}}',
                                  '{"format": 1, "extensions": {"a": {"current": "../x"}}}'])
def test_an_unreadable_index_is_refused_and_nothing_is_deleted(tmp_path, text):
    store = Store.open(str(tmp_path))
    add_version(store, "hello", "1.0.0")
    (tmp_path / "extensions/index.json").write_text(text)
    with pytest.raises(StoreError):
        Store.open(str(tmp_path))
    assert os.listdir(tmp_path / "extensions/hello/versions")


def test_failed_index_write_leaves_memory_as_the_disk(tmp_path):
    from qga.errors import StateError

    store = Store.open(str(tmp_path))
    first = add_version(store, "hello", "1.0.0")
    store.switch("hello", first, 1)
    store.confirm("hello")
    index_path = tmp_path / "extensions/index.json"
    saved = index_path.read_bytes()
    index_path.unlink()
    (index_path / "blocker").mkdir(parents=True)  # rename() over it fails, even for root
    with pytest.raises(StateError):
        store.set_enabled("hello", False)
    assert store.entry("hello").enabled is True
    assert [name for name in os.listdir(tmp_path / "extensions")
            if name.startswith("index.json.")] == []
    (index_path / "blocker").rmdir()
    index_path.rmdir()
    index_path.write_bytes(saved)
