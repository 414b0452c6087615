"""The hostile corpus: every bad bundle is refused with a clear error, and nothing is left behind.

Every archive here is built on the fly, byte by byte where needed.  Each
case goes through the whole verification (signed by a trusted key, so it is
the archive checks that must catch it) *and* through extraction on its own,
which must refuse it too; the directory tree around the test (install
target, a "victim" directory links point at, the trust store) must be
exactly as it was.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qga.errors import (
    BundleError, ExtensionError, ManifestError, RollbackError, SignatureError, TrustError,
)
from qga.ext import statement as statements
from qga.ext.bundle import check_archive, extract_archive, read_manifest
from qga.ext.manifest import encode_manifest
from qga.ext.rules import Limits
from qga.ext.trust import TrustedKey, TrustStore
from qga.ext.ustar import BLOCK
from qga.ext.verify import verify_bundle
from tests.support.ext_bundles import (
    Entry, Signer, file_item, good_archive, good_files, gz, header, manifest_value,
    raw_archive, raw_tar, snapshot,
)

REPO = Path(__file__).resolve().parents[2]
FILES = good_files()   # hello.py, lib/util.py


@pytest.fixture
def world(tmp_path):
    """The tree that must not change: trust store, install area, a victim directory."""
    signer = Signer(tmp_path / "trust.d")
    (tmp_path / "install" / "hello-0.9.0").mkdir(parents=True)
    (tmp_path / "install" / "hello-0.9.0" / "hello.py").write_text("old version")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious").write_text("do not touch")
    return tmp_path, signer


def refused(world, archive, error, message, *, sign=True, statement=None, signature=None,
            installed_counter=None, trust=None, extract_too=True):
    """Verification refuses ``archive`` with ``error``/``message``; so does bare extraction."""
    root, signer = world
    before = snapshot(root)
    if sign:
        statement, signature = signer.sign(archive)
    with pytest.raises(error) as caught:
        verify_bundle(io.BytesIO(archive), statement, signature, trust or signer.trust(),
                      installed_counter=installed_counter)
    text = str(caught.value)
    assert message in text, text
    assert "\x00" not in text and "\n" not in text
    if extract_too:
        _extraction_refuses(archive, root / "install")
    assert snapshot(root) == before
    return text


def _extraction_refuses(archive, install):
    try:
        manifest = read_manifest(io.BytesIO(archive))
    except BundleError:
        return  # nothing to extract with
    with pytest.raises(BundleError):
        extract_archive(io.BytesIO(archive), manifest, str(install), "hello-1.0.0")


def archive_with(entries, manifest=None, compress=True):
    return raw_archive(manifest or manifest_value(FILES), entries, compress)


def good_entries():
    return [Entry(path.encode(), data) for path, data in FILES.items()]


# -- signatures, trust, counters --------------------------------------------------------


def test_missing_signature(world):
    refused(world, good_archive(), SignatureError, "the bundle is not signed", sign=False,
            extract_too=False)


def test_signature_without_statement(world):
    _, signer = world
    _, signature = signer.sign(good_archive())
    refused(world, good_archive(), SignatureError, "a signature without its statement",
            sign=False, signature=signature, extract_too=False)


def test_bad_signature(world):
    _, signer = world
    statement, signature = signer.sign(good_archive())
    bad = bytes([signature[0] ^ 1]) + signature[1:]
    refused(world, good_archive(), SignatureError, "the signature does not match", sign=False,
            statement=statement, signature=bad, extract_too=False)
    refused(world, good_archive(), SignatureError, "the signature is 0 bytes", sign=False,
            statement=statement, signature=b"", extract_too=False)


def test_signature_over_different_bytes(world):
    _, signer = world
    archive = good_archive()
    _, signature = signer.sign(archive, counter=10)
    replaced = signer.statement(archive, counter=11)   # same key id, other bytes
    refused(world, archive, SignatureError, "the signature does not match", sign=False,
            statement=replaced, signature=signature, extract_too=False)


def test_untrusted_key(world, tmp_path_factory):
    stranger = Signer(tmp_path_factory.mktemp("stranger"))
    statement, signature = stranger.sign(good_archive())
    refused(world, good_archive(), TrustError, f"key {stranger.key_id} is not trusted",
            sign=False, statement=statement, signature=signature, extract_too=False)


def test_wrong_key_scope(world, tmp_path_factory):
    root, _ = world
    other = Signer(tmp_path_factory.mktemp("other"), names=["other", "hello-*"])
    statement, signature = other.sign(good_archive())
    text = refused(world, good_archive(), TrustError, "may not sign extension 'hello'",
                   sign=False, statement=statement, signature=signature, trust=other.trust(),
                   extract_too=False)
    assert "other hello-*" in text


def test_replayed_older_counter(world):
    _, signer = world
    archive = good_archive()
    statement, signature = signer.sign(archive, counter=9)
    for installed in (9, 10, 2 ** 40):
        refused(world, archive, RollbackError, f"counter 9 is not above the installed"
                f" counter {installed}", sign=False, statement=statement, signature=signature,
                installed_counter=installed, extract_too=False)


def test_statement_for_another_extension_or_version(world, tmp_path_factory):
    both = Signer(tmp_path_factory.mktemp("both"), names=["hello", "other"])
    archive = good_archive()
    for fields, message in (({"name": "other"}, "the statement for 'other' 1.0.0"),
                            ({"version": "2.0.0"}, "the statement for 'hello' 2.0.0")):
        statement, signature = both.sign(archive, **fields)
        refused(world, archive, BundleError, message, sign=False, statement=statement,
                signature=signature, trust=both.trust(), extract_too=False)


def test_non_canonical_statement(world):
    _, signer = world
    archive = good_archive()
    spaced = signer.statement(archive).replace(b",", b", ")
    signature = statements.sign(spaced, signer.private_key)   # a valid signature, even
    refused(world, archive, SignatureError, "not in canonical form", sign=False,
            statement=spaced, signature=signature, extract_too=False)


# -- the archive against its statement --------------------------------------------------


def test_truncated_upload(world):
    _, signer = world
    archive = good_archive()
    statement, signature = signer.sign(archive)
    for cut in (1, BLOCK, len(archive) // 2):
        refused(world, archive[:-cut], BundleError, "the statement says", sign=False,
                statement=statement, signature=signature)


def test_hash_mismatch(world):
    _, signer = world
    archive = good_archive()
    statement, signature = signer.sign(archive)
    altered = archive[:100] + bytes([archive[100] ^ 0x55]) + archive[101:]
    refused(world, altered, BundleError, "SHA-256 differs from the statement's", sign=False,
            statement=statement, signature=signature)


# -- the archive itself (signed: only the archive checks stand in the way) -------------


def test_truncated_archive_signed_as_is(world):
    for archive in (good_archive()[:-40], good_archive(compress=False)[:-2 * BLOCK - 10]):
        refused(world, archive, BundleError, "truncated")


@pytest.mark.parametrize("path, reason", [
    (b"../evil.py", "a '..' component"),
    (b"lib/../../evil.py", "a '..' component"),
    (b"/tmp/evil.py", "an absolute path"),
    (b"..\\..\\evil.py", "a backslash"),
    (b"./hello.py", "a '.' component"),
    (b"lib//util.py", "an empty component"),
    (b"evil\x1b[2J.py", "U+001B"),
    (b"\xff.py", "not UTF-8"),
])
def test_tar_slip(world, path, reason):
    text = refused(world, archive_with(good_entries() + [Entry(path, b"owned")]),
                   BundleError, reason)
    assert text.startswith("entry '")


def test_slip_listed_in_the_manifest_too(world):
    files = dict(FILES, **{"../evil.py": b"owned"})
    manifest = manifest_value(FILES)
    manifest["files"].append(file_item("../evil.py", b"owned"))
    archive = archive_with([Entry(p.encode(), d) for p, d in files.items()], manifest)
    refused(world, archive, ManifestError, "manifest file '../evil.py': a '..' component")


def test_zip_slip(world):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.json", encode_manifest(manifest_value(FILES)))
        archive.writestr("../../evil.py", "owned")
    refused(world, buffer.getvalue(), BundleError, "the archive is a zip file")


@pytest.mark.parametrize("entry, message", [
    (Entry(b"hello.py", typeflag=b"2", linkname=b"/etc/passwd"), "'hello.py' is a symbolic"),
    (Entry(b"hello.py", typeflag=b"1", linkname=b"/etc/shadow"), "'hello.py' is a hard link"),
    (Entry(b"lib/util.py", typeflag=b"1", linkname=b"hello.py"), "is a hard link"),
    (Entry(b"dev", typeflag=b"3", mode=0o666), "'dev' is a character device"),
    (Entry(b"disk", typeflag=b"4", mode=0o660), "'disk' is a block device"),
    (Entry(b"pipe", typeflag=b"6"), "'pipe' is a FIFO"),
    (Entry(b"hello.py", FILES["hello.py"], mode=0o140644), "file-type bits"),  # a socket
    (Entry(b"PaxHeader", b"30 path=../../../../etc/cron\n", typeflag=b"x"),
     "a pax extended header"),
    (Entry(b"././@LongLink", b"../../evil\x00", typeflag=b"L"), "a GNU long name header"),
    (Entry(b"hello.py", FILES["hello.py"], mode=0o4755), "'hello.py' has the setuid bit"),
    (Entry(b"hello.py", FILES["hello.py"], mode=0o2755), "has the setgid bit"),
    (Entry(b"hello.py", FILES["hello.py"], mode=0o1644), "has the sticky bit"),
])
def test_links_devices_and_special_bits(world, entry, message):
    refused(world, archive_with([entry] + good_entries()[1:]), BundleError, message)


def test_link_then_a_file_through_it(world):
    root, _ = world
    victim = str(root / "victim").encode()
    for typeflag in (b"2", b"1"):
        entries = [Entry(b"hello.py", FILES["hello.py"]),
                   Entry(b"lib", typeflag=typeflag, linkname=victim),
                   Entry(b"lib/util.py", FILES["lib/util.py"])]
        refused(world, archive_with(entries), BundleError, "'lib' is a")
    # Even a symlink the manifest does not mention, pointing at the install area.
    entries = good_entries() + [Entry(b"escape", typeflag=b"2", linkname=b"../..")]
    refused(world, archive_with(entries), BundleError, "'escape' is a symbolic link")


@pytest.mark.parametrize("extra, message", [
    (Entry(b"hello.py", FILES["hello.py"]), "'hello.py' appears twice"),
    (Entry(b"Hello.py", FILES["hello.py"]), "'Hello.py' collides with 'hello.py'"),
    (Entry(b"LIB/util.py", FILES["lib/util.py"]), "collides with 'lib'"),
    (Entry("hello\u2024py".encode(), b"x"), "NFKC folding"),   # ONE DOT LEADER
])
def test_duplicates_and_folded_duplicates(world, extra, message):
    refused(world, archive_with(good_entries() + [extra]), BundleError, message)


def test_nfc_and_nfd_names_collide(world):
    nfc, nfd = "caf\u00e9.py", "cafe\u0301.py"
    files = {"hello.py": b"", nfc: b"x"}
    entries = [Entry(b"hello.py"), Entry(nfc.encode(), b"x"), Entry(nfd.encode(), b"x")]
    refused(world, archive_with(entries, manifest_value(files)), BundleError,
            "the same name after case and Unicode NFKC folding")


def test_oversized_manifest(world):
    big = b"{" + b" " * (Limits().max_manifest_size + 10) + b"}"
    archive = gz(raw_tar([Entry(b"manifest.json", big)] + good_entries()))
    refused(world, archive, ManifestError, "over the 1048576-byte limit")


def test_manifest_must_come_first(world):
    manifest = encode_manifest(manifest_value(FILES))
    archive = gz(raw_tar(good_entries() + [Entry(b"manifest.json", manifest)]))
    refused(world, archive, BundleError, "a bundle starts with manifest.json")
    archive = gz(raw_tar([Entry(b"manifest.json", manifest, mode=0o4644)] + good_entries()))
    refused(world, archive, BundleError, "'manifest.json' has the setuid bit")


@pytest.mark.parametrize("entries, message", [
    (good_entries() + [Entry(b"extra.py", b"surprise")],
     "entry 'extra.py' is not listed in the manifest"),
    (good_entries()[:1], "file 'lib/util.py' of the manifest is missing from the archive"),
    ([good_entries()[0], Entry(b"lib/util.py", b"X = 12\n")],
     "'lib/util.py' is 7 bytes; the manifest says 6"),
    ([good_entries()[0], Entry(b"lib/util.py", b"X = 2\n")],
     "'lib/util.py': its SHA-256 differs from the manifest's"),
    ([good_entries()[0], Entry(b"lib/util.py", FILES["lib/util.py"], mode=0o755)],
     "'lib/util.py' has mode 0755; the manifest says 0644"),
    # A header claiming more data than there is: the next bytes are read as data.
    ([good_entries()[0], Entry(b"lib/util.py", b"X = 1", size=6)], "SHA-256 differs"),
])
def test_manifest_and_archive_disagree(world, entries, message):
    refused(world, archive_with(entries), BundleError, message)


def test_hash_mismatch_in_a_later_file_removes_the_earlier_ones(world):
    root, _ = world
    files = {f"f{i}.py": b"%d" % i for i in range(5)}
    entries = [Entry(p.encode(), d) for p, d in files.items()]
    entries[-1] = Entry(b"f4.py", b"5")
    refused(world, archive_with(entries, manifest_value(files)), BundleError,
            "'f4.py': its SHA-256 differs")
    assert list((root / "install").iterdir()) == [root / "install" / "hello-0.9.0"]


# -- bombs and caps ---------------------------------------------------------------------


def gzip_bomb(size):
    """A valid bundle (manifest honest) whose one file is ``size`` zero bytes, gzipped."""
    zeros_sha = hashlib.sha256()
    chunk = bytes(1024 * 1024)
    for _ in range(size // len(chunk)):
        zeros_sha.update(chunk)
    manifest = manifest_value({"hello.py": b""})
    manifest["files"].append({"path": "zeros", "size": size, "mode": "0644",
                              "sha256": zeros_sha.hexdigest()})
    data = encode_manifest(manifest)
    deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [deflater.compress(header(Entry(b"manifest.json", data)) + data
                             + bytes(-len(data) % BLOCK) + header(Entry(b"hello.py"))
                             + header(Entry(b"zeros", size=size)))]
    for _ in range(size // len(chunk)):
        out.append(deflater.compress(chunk))
    out.append(deflater.compress(bytes(2 * BLOCK)) + deflater.flush())
    return b"".join(out)


def test_gzip_bomb(world):
    bomb = gzip_bomb(60 * 1024 * 1024)
    assert len(bomb) < 100 * 1024
    refused(world, bomb, BundleError, "compression ratio is above 200:1")


def test_zip_bomb_is_not_even_read(world):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", bytes(10 * 1024 * 1024))
    refused(world, buffer.getvalue(), BundleError, "zip file")


def test_file_count_cap(world):
    files = {f"{i:x}": b"" for i in range(Limits().max_files + 1)}
    manifest = manifest_value(files)
    refused(world, archive_with([Entry(p.encode()) for p in files], manifest),
            ManifestError, "lists 2049 files, over the limit of 2048")


def test_size_caps(world):
    big = 65 * 1024 * 1024
    manifest = manifest_value(FILES)
    manifest["files"].append({"path": "big", "size": big, "mode": "0644", "sha256": "0" * 64})
    archive = archive_with(good_entries() + [Entry(b"big", size=big)], manifest)
    refused(world, archive, ManifestError, "over the per-file limit of 67108864")
    manifest["files"][-1]["size"] = 60 * 1024 * 1024
    for name in "abcde":
        manifest["files"].append({"path": name, "size": 60 * 1024 * 1024, "mode": "0644",
                                  "sha256": "0" * 64})
    refused(world, archive_with(good_entries(), manifest), ManifestError,
            "bytes of files, over the limit of 268435456")


# -- disk full -------------------------------------------------------------------------


def big_bundle():
    files = {"hello.py": b"print(1)\n", "big.bin": os.urandom(512 * 1024)}
    archive = archive_with([Entry(p.encode(), d) for p, d in files.items()],
                           manifest_value(files))
    return archive, check_archive(io.BytesIO(archive))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_on_a_small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        archive, manifest = big_bundle()
        (mount / "previous").mkdir()
        before = snapshot(mount)
        with pytest.raises(BundleError) as caught:
            extract_archive(io.BytesIO(archive), manifest, str(mount), "hello-1.0.0")
        assert str(caught.value) == ("cannot extract 'big.bin': no space left on the device"
                                     " (or over quota)")
        assert snapshot(mount) == before
        usage = os.statvfs(mount)
        assert usage.f_bfree == usage.f_blocks   # every block given back
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_file_size_limit_in_a_child(tmp_path):
    """The same with RLIMIT_FSIZE (works without root): EFBIG, then everything removed."""
    archive, _ = big_bundle()
    (tmp_path / "bundle.qgb").write_bytes(archive)
    (tmp_path / "install").mkdir()
    code = (
        "import resource, signal, sys\n"
        "from qga.errors import BundleError\n"
        "from qga.ext.bundle import check_archive, extract_archive\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "manifest = check_archive(sys.argv[1])\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))\n"
        "try:\n"
        "    extract_archive(sys.argv[1], manifest, sys.argv[2], 'hello-1.0.0')\n"
        "except BundleError as error:\n"
        "    print(error)\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bundle.qgb"),
                             str(tmp_path / "install")], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "cannot extract 'big.bin': File too large\n"
    assert list((tmp_path / "install").iterdir()) == []


# -- properties ------------------------------------------------------------------------


def _signed_bundle():
    key = statements.generate_private_key()
    public = statements.public_raw(key)
    archive = good_archive()
    statement = statements.Statement("hello", "1.0.0", 5, hashlib.sha256(archive).hexdigest(),
                                     len(archive), statements.key_id(public)).encode()
    trust = TrustStore([TrustedKey(statements.key_id(public), public, ("hello",), "memory")])
    return {"archive": archive, "statement": statement,
            "signature": statements.sign(statement, key)}, trust


SIGNED, SIGNED_TRUST = _signed_bundle()


def test_the_uncorrupted_signed_bundle_verifies():
    verified = verify_bundle(io.BytesIO(SIGNED["archive"]), SIGNED["statement"],
                             SIGNED["signature"], SIGNED_TRUST)
    assert verified.counter == 5


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(part=st.sampled_from(sorted(SIGNED)), where=st.floats(0, 1, exclude_max=True),
       flip=st.integers(1, 255))
def test_any_single_byte_corruption_of_a_signed_bundle_is_refused(part, where, flip):
    parts = dict(SIGNED)
    data = bytearray(parts[part])
    position = int(where * len(data))
    data[position] ^= flip
    parts[part] = bytes(data)
    with pytest.raises(ExtensionError):
        verify_bundle(io.BytesIO(parts["archive"]), parts["statement"], parts["signature"],
                      SIGNED_TRUST)


PLAIN = good_archive(compress=False)
ZIPPED = good_archive()


@settings(max_examples=400, deadline=None)
@given(compressed=st.booleans(), where=st.floats(0, 1, exclude_max=True),
       flip=st.integers(1, 255))
def test_the_reader_never_fails_any_other_way(compressed, where, flip):
    """Unsigned, a corrupt archive is refused with a BundleError or still self-consistent.

    (A flipped byte inside the manifest of a plain tar can make another valid
    manifest: only the signature protects the manifest's content.)
    """
    data = bytearray(ZIPPED if compressed else PLAIN)
    data[int(where * len(data))] ^= flip
    try:
        manifest = check_archive(io.BytesIO(bytes(data)))
    except BundleError:
        return
    assert len(manifest.files) == len(FILES)


@settings(max_examples=200, deadline=None)
@given(compressed=st.booleans(), where=st.floats(0, 1, exclude_max=True))
def test_every_truncation_is_refused(compressed, where):
    data = ZIPPED if compressed else PLAIN
    with pytest.raises(BundleError):
        check_archive(io.BytesIO(data[:int(where * len(data))]))
