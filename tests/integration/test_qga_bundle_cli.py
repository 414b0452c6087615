"""``qga-bundle`` as a process: keygen, build, sign, verify, inspect, and its refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qga.ext.statement import parse_statement
from qga.ext.trust import TrustStore
from tests.support.ext_bundles import write_source_dir

REPO = Path(__file__).resolve().parents[2]

FILES = {"hello.py": b"print('hello')\n", "lib/util.py": b"X = 1\n"}


def bundle_tool(*args, cwd=None):
    """``python -m qga.ext.cli args`` (what the ``qga-bundle`` script runs)."""
    return subprocess.run([sys.executable, "-m", "qga.ext.cli", *map(str, args)], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=60)


def ok(*args, cwd=None):
    result = bundle_tool(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(*args, cwd=None):
    result = bundle_tool(*args, cwd=cwd)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("qga-bundle: error: ")
    return result.stderr


@pytest.fixture
def work(tmp_path):
    write_source_dir(tmp_path / "src", FILES)
    trust = tmp_path / "trust.d"
    trust.mkdir()
    os.chmod(trust, 0o755)
    return tmp_path


def keygen(work, prefix="signer", names="hello"):
    out = ok("keygen", work / prefix, "--names", names, "--comment", "test key")
    shutil.copy(work / f"{prefix}.json", work / "trust.d" / f"{prefix}.json")
    return out


def test_the_whole_flow(work):
    out = keygen(work, names="hello,other-*")
    assert out.startswith("key ") and "may sign: hello other-*" in out
    assert stat.S_IMODE(os.stat(work / "signer.key").st_mode) == 0o600
    assert (work / "signer.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    trust_file = json.loads((work / "signer.json").read_text())
    assert set(trust_file) == {"key", "names", "comment"}
    key_id = TrustStore.load([str(work / "trust.d")]).keys[0].key_id
    assert out.startswith(f"key {key_id}:")

    out = ok("build", work / "src", cwd=work)
    bundle = work / "hello-1.0.0.qgb"
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert out == f"hello-1.0.0.qgb: hello 1.0.0, 2 files, sha256 {digest}\n"
    assert not list(work.glob(".qga-bundle-*"))

    before = int(time.time())
    out = ok("sign", bundle, "--key", work / "signer.key")
    stated = parse_statement((work / "hello-1.0.0.qgb.statement").read_bytes())
    assert before <= stated.counter <= int(time.time())
    assert (stated.name, stated.version, stated.key_id) == ("hello", "1.0.0", key_id)
    assert (stated.archive_sha256, stated.archive_size) == (digest, bundle.stat().st_size)
    assert len((work / "hello-1.0.0.qgb.sig").read_bytes()) == 64

    out = ok("verify", bundle, "--trust-dir", work / "trust.d")
    assert out == (f"{bundle}: OK: hello 1.0.0, counter {stated.counter}, signed by key"
                   f" {key_id} ({work / 'trust.d' / 'signer.json'})\n")
    err = fails("verify", bundle, "--trust-dir", work / "trust.d", "--installed-counter",
                stated.counter)
    assert f"counter {stated.counter} is not above the installed counter" in err

    out = ok("inspect", bundle)
    assert "extension:    hello 1.0.0\n" in out
    assert "entry point:  python3 hello.py\n" in out
    assert f"statement:    counter {stated.counter}, key {key_id} (not verified" in out
    assert "  0644          6 " in out and out.rstrip().count("\n") > 10
    value = json.loads(ok("inspect", bundle, "--json"))
    assert [item["path"] for item in value["files"]] == ["hello.py", "lib/util.py"]


def test_builds_are_reproducible(work):
    first = ok("build", work / "src", "-o", work / "a.qgb")
    os.utime(work / "src" / "hello.py", (0, 12345))
    second = ok("build", work / "src", "-o", work / "b.qgb")
    assert first.split("sha256 ")[1] == second.split("sha256 ")[1]
    assert (work / "a.qgb").read_bytes() == (work / "b.qgb").read_bytes()
    ok("build", work / "src", "-o", work / "c.tar", "--no-compress")
    assert (work / "c.tar").read_bytes()[257:263] == b"ustar\x00"


def test_tampering_and_scope_are_caught(work):
    keygen(work, names="other")
    bundle = work / "hello.qgb"
    ok("build", work / "src", "-o", bundle)
    ok("sign", bundle, "--key", work / "signer.key", "--counter", "7")
    err = fails("verify", bundle, "--trust-dir", work / "trust.d")
    assert "may not sign extension 'hello'" in err

    keygen(work, "good", names="hello")
    ok("sign", bundle, "--key", work / "good.key", "--counter", "8")
    ok("verify", bundle, "--trust-dir", work / "trust.d")
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 1
    bundle.write_bytes(bytes(data))
    assert "SHA-256 differs from the statement's" in fails(
        "verify", bundle, "--trust-dir", work / "trust.d")


def test_unsigned_needs_allow_unsigned(work):
    bundle = work / "hello.qgb"
    ok("build", work / "src", "-o", bundle)
    assert "not signed" in fails("verify", bundle, "--trust-dir", work / "trust.d")
    out = ok("verify", bundle, "--trust-dir", work / "trust.d", "--allow-unsigned")
    assert out == f"{bundle}: OK: hello 1.0.0, UNSIGNED\n"


def test_an_unsafe_trust_dir_refuses_everything(work):
    keygen(work)
    bundle = work / "hello.qgb"
    ok("build", work / "src", "-o", bundle)
    ok("sign", bundle, "--key", work / "signer.key")
    os.chmod(work / "trust.d", 0o777)
    assert "writable by group or others" in fails("verify", bundle, "--trust-dir",
                                                  work / "trust.d")


def test_refusals_and_usage_errors(work):
    keygen(work)
    assert "not overwriting a key" in fails("keygen", work / "signer", "--names", "x")
    assert "'Bad' is not an extension name" in fails("keygen", work / "k2", "--names", "Bad")
    assert not (work / "k2.key").exists()
    os.symlink("/etc/passwd", work / "src" / "passwd")
    assert "'passwd' is not a regular file" in fails("build", work / "src", "-o",
                                                     work / "x.qgb")
    assert "not a usable private key" in fails("sign", work / "signer.json", "--key",
                                               work / "signer.json")
    assert "no such file" in fails("inspect", work / "absent.qgb").lower()
    (work / "junk.qgb").write_bytes(b"PK\x03\x04" + bytes(1000))
    assert "zip file" in fails("inspect", work / "junk.qgb")
    for args in ([], ["bogus"], ["sign", "x"], ["sign", "x", "--key", "k", "--counter", "0"]):
        assert bundle_tool(*args).returncode == 2


def test_the_console_script_is_declared():
    assert 'qga-bundle = "qga.ext.cli:main"' in (REPO / "pyproject.toml").read_text()
    script = shutil.which("qga-bundle")
    if script is None:
        pytest.skip("qga-bundle is not installed (pip install -e .)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "keygen" in result.stdout


def test_build_with_sdk_adds_the_sdk_copy(work):
    ok("build", work / "src", "--with-sdk", "-o", work / "b.qgb")
    listing = json.loads(ok("inspect", work / "b.qgb", "--json"))
    paths = {entry["path"] for entry in listing["files"]}
    assert paths == {"hello.py", "lib/util.py", "qga_ext_sdk.py"}
    sdk_source = (REPO / "qga" / "ext" / "sdk.py").read_bytes()
    sdk_entry = next(e for e in listing["files"] if e["path"] == "qga_ext_sdk.py")
    assert sdk_entry["sha256"] == hashlib.sha256(sdk_source).hexdigest()
    assert not (work / "src" / "qga_ext_sdk.py").exists()  # the source directory is untouched


def test_build_with_sdk_refuses_a_directory_that_has_one(work):
    (work / "src" / "qga_ext_sdk.py").write_text("# an old copy\n")
    assert "already has a qga_ext_sdk.py" in fails("build", work / "src", "--with-sdk",
                                                   "-o", work / "b.qgb")
