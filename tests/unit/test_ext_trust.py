"""Trust keys and scopes, the canonical statement, signatures, anti-rollback, and verify_bundle."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import pytest

from qga.cli import main as qga_main
from qga.config import Config, dump, load_file
from qga.errors import (
    BundleError, RollbackError, SignatureError, TrustError,
)
from qga.ext import statement as statements
from qga.ext.statement import Statement, parse_statement
from qga.ext.trust import TrustStore, check_counter, trust_file
from qga.ext.verify import VerifiedBundle, extract_bundle, read_detached, verify_bundle
from tests.support.ext_bundles import Signer, good_archive

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture
def trust_dir(tmp_path):
    path = tmp_path / "trust.d"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    return path


def write_key(directory: Path, name: str, names=("hello",), mode=0o644) -> Signer:
    signer = Signer(directory, names, file_name=name)
    os.chmod(directory / name, mode)
    return signer


# -- trust store -----------------------------------------------------------------------


def test_load_reads_json_files_and_ignores_others(trust_dir):
    signer = write_key(trust_dir, "a.json", ["hello", "ovirt-*", "x?"])
    (trust_dir / "README").write_text("not a key")
    (trust_dir / "a.json.dpkg-old").write_text("garbage")
    (trust_dir / ".hidden.json").write_text("garbage")
    store = TrustStore.load([str(trust_dir)])
    assert [key.key_id for key in store.keys] == [signer.key_id]
    key = store.keys[0]
    assert key.public_key == signer.public_key and key.source == str(trust_dir / "a.json")
    assert key.may_sign("hello") and key.may_sign("ovirt-sso") and key.may_sign("xy")
    assert not key.may_sign("hello2") and not key.may_sign("ovirt") and not key.may_sign("xyz")


def test_missing_directories_hold_no_keys(tmp_path):
    store = TrustStore.load([str(tmp_path / "absent"), str(tmp_path / "also-absent")])
    assert store.keys == ()
    with pytest.raises(TrustError, match="is not trusted"):
        store.key_for("0" * 32, "hello")


def test_scope_is_enforced(trust_dir):
    signer = write_key(trust_dir, "a.json", ["ovirt-*"])
    store = TrustStore.load([str(trust_dir)])
    assert store.key_for(signer.key_id, "ovirt-sso").key_id == signer.key_id
    with pytest.raises(TrustError) as refused:
        store.key_for(signer.key_id, "hello")
    assert str(refused.value) == (f"key {signer.key_id} may not sign extension 'hello'"
                                  f" ({trust_dir / 'a.json'}: ovirt-*)")
    with pytest.raises(TrustError, match=f"key {'f' * 32} is not trusted"):
        store.key_for("f" * 32, "ovirt-sso")


def test_admin_file_replaces_or_masks_the_vendor_file(tmp_path):
    admin, vendor = tmp_path / "etc", tmp_path / "usr"
    for directory in (admin, vendor):
        directory.mkdir(mode=0o755)
    vendor_key = write_key(vendor, "vendor.json", ["hello"])
    other_vendor = write_key(vendor, "other.json", ["other"])
    assert {k.key_id for k in TrustStore.load([str(admin), str(vendor)]).keys} == {
        vendor_key.key_id, other_vendor.key_id}
    admin_key = write_key(admin, "vendor.json", ["hello"])
    store = TrustStore.load([str(admin), str(vendor)])
    assert {k.key_id for k in store.keys} == {admin_key.key_id, other_vendor.key_id}
    (admin / "vendor.json").write_bytes(b"")
    store = TrustStore.load([str(admin), str(vendor)])
    assert {k.key_id for k in store.keys} == {other_vendor.key_id}


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_trust_file_writable_by_others_is_refused(trust_dir, mode):
    write_key(trust_dir, "a.json", mode=mode)
    with pytest.raises(TrustError, match=r"a.json is writable by group or others \(mode 0"):
        TrustStore.load([str(trust_dir)])


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_a_trust_dir_writable_by_others_is_refused(trust_dir, mode):
    write_key(trust_dir, "a.json")
    os.chmod(trust_dir, mode)
    with pytest.raises(TrustError, match="trust.d is writable by group or others"):
        TrustStore.load([str(trust_dir)])


def test_an_unsafe_ancestor_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)          # anyone could rename trust.d away and put another
    write_key(shared / "trust.d", "a.json")
    with pytest.raises(TrustError, match="could let someone else replace it"):
        TrustStore.load([str(shared / "trust.d")])
    os.chmod(shared, 0o1777)         # sticky, like /tmp: only the owner may rename
    assert len(TrustStore.load([str(shared / "trust.d")]).keys) == 1


@needs_root
def test_trust_files_not_owned_by_root_are_refused(trust_dir):
    write_key(trust_dir, "a.json")
    os.chown(trust_dir / "a.json", 65534, 65534)
    with pytest.raises(TrustError, match="a.json is owned by uid 65534, not root"):
        TrustStore.load([str(trust_dir)])
    os.chown(trust_dir / "a.json", 0, 0)
    os.chown(trust_dir, 65534, 0)
    with pytest.raises(TrustError, match="trust.d is owned by uid 65534, not root"):
        TrustStore.load([str(trust_dir)])


def test_when_not_root_our_own_files_are_accepted(trust_dir):
    write_key(trust_dir, "a.json")
    uid = os.stat(trust_dir).st_uid
    assert len(TrustStore.load([str(trust_dir)], euid=uid).keys) == 1


@needs_root
def test_when_not_root_files_of_others_are_refused(trust_dir):
    write_key(trust_dir, "a.json")
    os.chown(trust_dir / "a.json", 4343, 0)
    with pytest.raises(TrustError, match="owned by uid 4343, not root or uid 4242"):
        TrustStore.load([str(trust_dir)], euid=4242)
    os.chown(trust_dir / "a.json", 4242, 0)
    assert len(TrustStore.load([str(trust_dir)], euid=4242).keys) == 1


def test_symlinks_and_special_files_are_refused(tmp_path, trust_dir):
    elsewhere = Signer(tmp_path / "elsewhere")
    os.symlink(elsewhere.trust_dir / "test.json", trust_dir / "link.json")
    with pytest.raises(TrustError, match="link.json is a symbolic link"):
        TrustStore.load([str(trust_dir)])
    os.unlink(trust_dir / "link.json")
    os.mkfifo(trust_dir / "fifo.json", 0o644)
    with pytest.raises(TrustError, match="fifo.json is not a regular file"):
        TrustStore.load([str(trust_dir)])
    os.unlink(trust_dir / "fifo.json")
    os.symlink(trust_dir, tmp_path / "dir-link")
    with pytest.raises(TrustError, match="dir-link"):
        TrustStore.load([str(tmp_path / "dir-link")])
    (tmp_path / "plain").write_text("")
    with pytest.raises(TrustError, match="plain"):
        TrustStore.load([str(tmp_path / "plain")])


@pytest.mark.parametrize("content, message", [
    (b"{", "is not valid JSON"),
    (b"[]", "must be an object with 'key', 'names'"),
    (b'{"key": "ed25519:AAAA"}', "must be an object"),
    (b'{"key": "ed25519:AAAA", "names": ["a"], "extra": 1}', "must be an object"),
    (b'{"key": "rsa:AAAA", "names": ["a"]}', "ed25519:<base64>"),
    (b'{"key": "ed25519:!!!!", "names": ["a"]}', "not valid base64"),
    (b'{"key": "ed25519:AAAA", "names": ["a"]}', "32 bytes, not 3"),
    (b'{"key": "ed25519:' + b"A" * 43 + b'=", "names": []}', "'names' must be a non-empty"),
    (b'{"key": "ed25519:' + b"A" * 43 + b'=", "names": ["A"]}', "'names' must be"),
    (b'{"key": "ed25519:' + b"A" * 43 + b'=", "names": ["[a]"]}', "'names' must be"),
    (b'{"key": "ed25519:' + b"A" * 43 + b'=", "names": ["a"], "comment": 1}', "'comment'"),
    (b" " * (64 * 1024 + 1), "is over 65536 bytes"),
])
def test_bad_trust_files_fail_closed(trust_dir, content, message):
    write_key(trust_dir, "good.json")
    (trust_dir / "bad.json").write_bytes(content)
    os.chmod(trust_dir / "bad.json", 0o644)
    with pytest.raises(TrustError) as refused:
        TrustStore.load([str(trust_dir)])
    assert message in str(refused.value) and "bad.json" in str(refused.value)


def test_trust_file_refuses_bad_names():
    with pytest.raises(TrustError, match="'Hello' is not an extension name"):
        trust_file(b"\x00" * 32, ["Hello"])


def test_check_counter():
    check_counter("hello", 5, None)
    check_counter("hello", 5, 4)
    for installed in (5, 6):
        with pytest.raises(RollbackError, match=f"counter 5 is not above the installed"
                                                f" counter {installed}"):
            check_counter("hello", 5, installed)


# -- statement -------------------------------------------------------------------------


def good_statement(**changes):
    fields = dict(name="hello", version="1.0.0", counter=7, archive_sha256="ab" * 32,
                  archive_size=123, key_id="cd" * 16)
    fields.update(changes)
    return Statement(**fields)


def test_statement_bytes_are_canonical():
    data = good_statement().encode()
    assert data == (b'{"archive-sha256":"' + b"ab" * 32 + b'","archive-size":123,'
                    b'"counter":7,"format":"qga-bundle-statement/1","key-id":"'
                    + b"cd" * 16 + b'","name":"hello","version":"1.0.0"}')
    assert parse_statement(data) == good_statement()


def reencoded(change):
    value = json.loads(good_statement().encode())
    change(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("data, message", [
    (json.dumps(json.loads(good_statement().encode())).encode(), "not in canonical form"),
    (good_statement().encode() + b"\n", "not in canonical form"),
    (reencoded(lambda v: v.update(counter=7.0)), "counter is not a int"),
    (reencoded(lambda v: v.update(counter=True)), "counter is not a int"),
    (reencoded(lambda v: v.update(counter=0)), "between 1 and 2^63-1"),
    (reencoded(lambda v: v.update(counter=2 ** 63)), "between 1 and 2^63-1"),
    (reencoded(lambda v: v.update({"archive-size": -1})), "archive-size is out of range"),
    (reencoded(lambda v: v.update(extra=1)), "exactly the members"),
    (reencoded(lambda v: v.pop("key-id")), "exactly the members"),
    (reencoded(lambda v: v.update(format="qga-bundle-statement/2")), "format is"),
    (reencoded(lambda v: v.update(name="Hello")), "name 'Hello' is not allowed"),
    (reencoded(lambda v: v.update(name="hello\n")), "is not allowed"),
    (reencoded(lambda v: v.update({"archive-sha256": "AB" * 32})), "archive-sha256"),
    (reencoded(lambda v: v.update({"key-id": "cd" * 15})), "key-id"),
    (b'{"name":"a","name":"b"}', "duplicate key"),
    ("{\"name\":\"\u00e9\"}".encode(), "not valid JSON"),
    (b"[]", "exactly the members"),
    (b"x" * 5000, "over the 4096-byte limit"),
])
def test_bad_statements(data, message):
    with pytest.raises(SignatureError) as refused:
        parse_statement(data)
    assert message in str(refused.value)


def test_signatures():
    key = statements.generate_private_key()
    public = statements.public_raw(key)
    data = good_statement(key_id=statements.key_id(public)).encode()
    signature = statements.sign(data, key)
    assert len(signature) == 64
    statements.verify_signature(data, signature, public)
    with pytest.raises(SignatureError, match="does not match the statement"):
        statements.verify_signature(data.replace(b'"counter":7', b'"counter":8'), signature,
                                    public)
    with pytest.raises(SignatureError, match="does not match"):
        statements.verify_signature(data, signature,
                                    statements.public_raw(statements.generate_private_key()))
    with pytest.raises(SignatureError, match="the signature is 63 bytes"):
        statements.verify_signature(data, signature[:-1], public)


def test_private_key_round_trip():
    key = statements.generate_private_key()
    pem = statements.private_key_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = statements.load_private_key(pem)
    assert statements.public_raw(again) == statements.public_raw(key)
    with pytest.raises(SignatureError, match="not a usable private key"):
        statements.load_private_key(b"nonsense")
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives import serialization

    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        statements.load_private_key(other)


def test_key_id_and_public_key_text():
    raw = bytes(range(32))
    assert statements.key_id(raw) == hashlib.sha256(raw).hexdigest()[:32]
    text = statements.encode_public_key(raw)
    assert text.startswith("ed25519:") and statements.decode_public_key(text) == raw


# -- verify_bundle ---------------------------------------------------------------------


@pytest.fixture
def signer(tmp_path):
    return Signer(tmp_path / "trust.d")


def test_a_signed_bundle_verifies_and_extracts(signer, tmp_path):
    archive = good_archive()
    data, signature = signer.sign(archive, counter=42)
    verified = verify_bundle(io.BytesIO(archive), data, signature, signer.trust(),
                             installed_counter=41)
    assert isinstance(verified, VerifiedBundle)
    assert verified.signed and verified.counter == 42
    assert verified.key.key_id == signer.key_id
    assert verified.manifest.name == "hello"
    assert verified.archive_sha256 == hashlib.sha256(archive).hexdigest()
    assert verified.archive_size == len(archive)
    target = extract_bundle(verified, io.BytesIO(archive), str(tmp_path), "hello-1.0.0")
    assert (Path(target) / "lib" / "util.py").read_bytes() == b"X = 1\n"


def test_a_path_works_as_well_as_a_file_object(signer, tmp_path):
    archive = good_archive()
    path = tmp_path / "hello.qgb"
    path.write_bytes(archive)
    data, signature = signer.sign(archive)
    (tmp_path / "hello.qgb.statement").write_bytes(data)
    (tmp_path / "hello.qgb.sig").write_bytes(signature)
    assert read_detached(str(path)) == (data, signature)
    assert read_detached(str(tmp_path / "other.qgb")) == (None, None)
    assert verify_bundle(str(path), data, signature, signer.trust()).manifest.name == "hello"


def test_unsigned_bundles_need_the_admin_setting(signer, caplog):
    archive = good_archive()
    with pytest.raises(SignatureError, match="not signed, and unsigned extensions are not"
                                             " allowed"):
        verify_bundle(io.BytesIO(archive), None, None, signer.trust())
    with caplog.at_level(logging.WARNING, logger="qga.ext.verify"):
        verified = verify_bundle(io.BytesIO(archive), None, None, TrustStore(),
                                 allow_unsigned=True)
    assert not verified.signed and verified.counter is None
    assert "accepting unsigned extension bundle 'hello' 1.0.0" in caplog.text
    # A statement without signature still counts, even unsigned.
    data = signer.statement(archive, counter=3)
    assert verify_bundle(io.BytesIO(archive), data, None, TrustStore(),
                         allow_unsigned=True).counter == 3
    with pytest.raises(RollbackError):
        verify_bundle(io.BytesIO(archive), data, None, TrustStore(), allow_unsigned=True,
                      installed_counter=3)
    with pytest.raises(BundleError, match=f"the statement says {len(archive) + 5}"):
        verify_bundle(io.BytesIO(archive), signer.statement(archive + bytes(5)),
                      None, TrustStore(), allow_unsigned=True)


def test_a_bad_signature_is_refused_even_when_unsigned_is_allowed(signer):
    archive = good_archive()
    data, signature = signer.sign(archive)
    with pytest.raises(SignatureError, match="does not match"):
        verify_bundle(io.BytesIO(archive), data, bytes(64), signer.trust(),
                      allow_unsigned=True)


def test_core_version_range_is_checked(signer):
    archive = good_archive(**{"requires-core": {"min": "0.2.0", "below": "0.3.0"}})
    data, signature = signer.sign(archive)
    with pytest.raises(BundleError, match="needs qga core >= 0.2.0, < 0.3.0; this is 0.1.0"):
        verify_bundle(io.BytesIO(archive), data, signature, signer.trust(),
                      core_version="0.1.0")
    assert verify_bundle(io.BytesIO(archive), data, signature, signer.trust(),
                         core_version="0.2.5").manifest.name == "hello"


# -- the admin setting -----------------------------------------------------------------


def test_allow_unsigned_extensions_config_key(tmp_path):
    assert Config().allow_unsigned_extensions is False
    path = tmp_path / "qga.conf"
    path.write_bytes(b"[qga]\nallow-unsigned-extensions=true\n")
    config = Config()
    load_file(config, str(path))
    assert config.allow_unsigned_extensions is True
    assert b"\nallow-unsigned-extensions=true\n" in dump(config)
    assert b"allow-unsigned-extensions" not in dump(Config())
    path.write_bytes(b"[qga]\nallow-unsigned-extensions=maybe\n")
    from qga.errors import ConfigError

    with pytest.raises(ConfigError, match="allow-unsigned-extensions"):
        load_file(Config(), str(path))


def test_allow_unsigned_extensions_option(monkeypatch, tmp_path, capfdbinary):
    monkeypatch.setenv("QGA_CONF", str(tmp_path / "absent.conf"))
    assert qga_main(["-D", "--allow-unsigned-extensions"], prog="qga") == 0
    assert b"[qga]\n" in capfdbinary.readouterr().out.split(b"allow-unsigned-extensions=true")[0]
    assert qga_main(["-D"], prog="qga") == 0
    assert b"allow-unsigned" not in capfdbinary.readouterr().out
