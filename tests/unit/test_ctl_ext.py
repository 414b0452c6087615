"""qgactl ext list and ext verify on a real store (read only)."""

from __future__ import annotations

import json
import os

import pytest

from qga import ctl
from qga.ext.manifest import encode_manifest
from qga.ext.store import Store
from tests.support.ext_bundles import manifest_value

FILES = {"hello.py": b"print('hello')\n", "lib/util.py": b"X = 1\n"}


def install(store, version, counter):
    version_id = store.new_version("hello", version)
    path = store.version_dir("hello", version_id)
    os.makedirs(os.path.join(path, "bundle", "lib"))
    for name, data in FILES.items():
        target = os.path.join(path, "bundle", name)
        with open(target, "wb") as stream:
            stream.write(data)
        os.chmod(target, 0o644)
    with open(os.path.join(path, "manifest.json"), "wb") as stream:
        stream.write(encode_manifest(manifest_value(FILES, version=version)))
    store.switch("hello", version_id, counter)
    store.confirm("hello")
    return version_id


@pytest.fixture
def statedir(tmp_path):
    store = Store.open(str(tmp_path))
    install(store, "1.0.0", 10)
    install(store, "1.1.0", 11)
    store.record_failure("hello", "2.0.0", "bad signature")
    return tmp_path


def run(capsys, *args):
    status = ctl.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_list(statedir, capsys):
    status, out, _ = run(capsys, "ext", "-t", str(statedir), "list")
    assert status == 0
    assert out == ("hello 1.1.0 previous 1.0.0 counter 11;"
                   " last install failed: bad signature\n")
    status, out, _ = run(capsys, "ext", "-t", str(statedir), "list", "--json")
    assert json.loads(out) == [{"name": "hello", "version": "1.1.0", "previous": "1.0.0",
                                "counter": 11, "enabled": True, "last-install": "failed",
                                "last-error": "bad signature"}]


def test_verify_good_then_tampered(statedir, capsys):
    assert run(capsys, "ext", "-t", str(statedir), "verify") == (
        0, "hello 1.1.0: ok\nhello 1.0.0 (previous): ok\n", "")
    store = Store.inspect(str(statedir))
    bundle = store.bundle_dir("hello", store.entry("hello").current)
    with open(os.path.join(bundle, "hello.py"), "wb") as stream:
        stream.write(b"print('owned')\n")
    with open(os.path.join(bundle, "extra.py"), "w") as stream:
        stream.write("x")
    os.unlink(os.path.join(bundle, "lib", "util.py"))
    os.symlink("/etc/shadow", os.path.join(bundle, "lib", "util.py"))
    status, out, _ = run(capsys, "ext", "-t", str(statedir), "verify", "hello")
    assert status == 1
    assert out.splitlines() == [
        "hello 1.1.0: 3 problem(s)",
        "  hello.py: its SHA-256 differs from the manifest's",
        "  lib/util.py: not a regular file",
        "  extra.py: not in the manifest",
        "hello 1.0.0 (previous): ok",
    ]


def test_verify_an_unknown_extension(statedir, capsys):
    status, _, err = run(capsys, "ext", "-t", str(statedir), "verify", "other")
    assert status == 1 and "extension other is not installed" in err


def test_inspecting_changes_nothing(statedir, capsys):
    index = (statedir / "extensions/index.json").read_bytes()
    store = Store.open(str(statedir))
    version_id = store.new_version("hello", "9.9.9")
    os.makedirs(store.version_dir("hello", version_id))  # garbage the agent would collect
    run(capsys, "ext", "-t", str(statedir), "list")
    run(capsys, "ext", "-t", str(statedir), "verify")
    assert os.path.isdir(store.version_dir("hello", version_id))
    assert (statedir / "extensions/index.json").read_bytes() == index
