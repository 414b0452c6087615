"""Bundle archives: reproducible builds, the strict ustar reader, checking and extraction."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from qga.errors import BundleError, ManifestError
from qga.ext import ustar
from qga.ext.bundle import (
    build_bundle, check_archive, extract_archive, read_manifest, remove_tree_at, sha256_of,
)
from qga.ext.rules import Limits, PathSet, check_path, fold
from tests.support.ext_bundles import (
    Entry, good_archive, good_files, gz, manifest_value, raw_archive, raw_tar, snapshot,
    write_source_dir,
)

FILES = {"hello.py": b"print('hello')\n", "lib/util.py": b"X = 1\n",
         "lib/deep/data.bin": bytes(range(256)) * 40, "bin/run": b"#!/bin/sh\necho hi\n"}


@pytest.fixture
def source(tmp_path):
    directory = write_source_dir(tmp_path / "src", FILES)
    os.chmod(directory / "bin/run", 0o750)
    return directory


# -- building --------------------------------------------------------------------------


def test_build_lists_every_file_sorted_with_modes(source, tmp_path):
    manifest = build_bundle(str(source), str(tmp_path / "b.qgb"))
    assert [entry.path for entry in manifest.files] == sorted(FILES)
    assert {entry.path: entry.mode for entry in manifest.files} == {
        "bin/run": 0o755, "hello.py": 0o644, "lib/deep/data.bin": 0o644,
        "lib/util.py": 0o644}
    for entry in manifest.files:
        assert entry.size == len(FILES[entry.path])
        assert entry.sha256 == hashlib.sha256(FILES[entry.path]).hexdigest()


def test_build_is_reproducible(source, tmp_path):
    first = tmp_path / "first.qgb"
    build_bundle(str(source), str(first))
    # Same content, other times, permissions (beyond x) and owner: same bytes.
    for path in source.rglob("*"):
        os.utime(path, (1, 1_000_000))
        if path.is_file():
            os.chmod(path, 0o600 if not os.access(path, os.X_OK) else 0o700)
            if os.geteuid() == 0:
                os.chown(path, 1234, 5678)
    (source / "lib" / "__pycache__").mkdir()
    (source / "lib" / "__pycache__" / "util.cpython-311.pyc").write_bytes(b"junk")
    (source / ".git").mkdir()
    (source / "hello.py~").write_bytes(b"backup")
    second = tmp_path / "second.qgb"
    build_bundle(str(source), str(second))
    assert first.read_bytes() == second.read_bytes()
    assert sha256_of(str(first)) == hashlib.sha256(first.read_bytes()).hexdigest()


def test_built_archive_is_plain_tar_for_other_tools(source, tmp_path):
    archive = tmp_path / "b.qgb"
    build_bundle(str(source), str(archive))
    assert archive.read_bytes()[:2] == b"\x1f\x8b"
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["manifest.json"] + sorted(FILES)
        assert all(m.isreg() and m.mtime == 0 and m.uid == 0 and m.gid == 0
                   for m in members)
        assert tar.extractfile("lib/deep/data.bin").read() == FILES["lib/deep/data.bin"]


def test_uncompressed_build(source, tmp_path):
    archive = tmp_path / "b.tar"
    manifest = build_bundle(str(source), str(archive), compress=False)
    assert archive.read_bytes()[257:265] == b"ustar\x0000"
    assert check_archive(str(archive)).sha256 == manifest.sha256


def test_build_refuses_links_and_special_files(source, tmp_path):
    os.symlink("/etc/passwd", source / "passwd")
    with pytest.raises(BundleError, match="'passwd' is not a regular file"):
        build_bundle(str(source), str(tmp_path / "b.qgb"))
    os.unlink(source / "passwd")
    os.symlink("/etc", source / "etc")
    with pytest.raises(BundleError, match="symbolic link"):
        build_bundle(str(source), str(tmp_path / "b.qgb"))
    os.unlink(source / "etc")
    os.mkfifo(source / "fifo")
    with pytest.raises(BundleError, match="'fifo' is not a regular file"):
        build_bundle(str(source), str(tmp_path / "b.qgb"))
    assert not list(tmp_path.glob("*.qgb")) and not list(tmp_path.glob(".b.qgb.*"))


def test_build_checks_the_manifest(tmp_path):
    source = write_source_dir(tmp_path / "src", {"a.py": b""},
                              {"manifest-version": 1, "name": "Bad Name"})
    with pytest.raises(ManifestError, match="at name|required property"):
        build_bundle(str(source), str(tmp_path / "b.qgb"))


def test_python_tarfile_ustar_output_is_accepted(tmp_path):
    # Another writer of the same subset: tarfile in USTAR format.
    files = good_files()
    manifest = manifest_value(files)
    from qga.ext.manifest import encode_manifest

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("manifest.json", encode_manifest(manifest))] + list(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
            info.uname, info.gname = "builder", "builder"
            tar.addfile(info, io.BytesIO(data))
    assert check_archive(io.BytesIO(buffer.getvalue())).name == "hello"


# -- checking --------------------------------------------------------------------------


def test_check_returns_the_manifest_and_read_manifest_stops_early():
    archive = good_archive()
    assert check_archive(io.BytesIO(archive)).name == "hello"
    # read_manifest does not read past the first entry: a broken tail goes unseen.
    broken = gz(raw_tar([Entry(b"manifest.json", __import__("qga.ext.manifest", fromlist=["x"])
                               .encode_manifest(manifest_value(good_files())))])[:-1024]
                + b"garbage")
    assert read_manifest(io.BytesIO(broken)).name == "hello"
    with pytest.raises(BundleError):
        check_archive(io.BytesIO(broken))


def test_directory_entries_for_parents_are_accepted():
    files = good_files()
    archive = raw_archive(manifest_value(files), [
        Entry(b"lib/", typeflag=b"5", mode=0o755),
        Entry(b"hello.py", files["hello.py"]),
        Entry(b"lib/util.py", files["lib/util.py"]),
    ])
    assert check_archive(io.BytesIO(archive)).name == "hello"


@pytest.mark.parametrize("entries, message", [
    ([Entry(b"lib/", typeflag=b"5"), Entry(b"lib/", typeflag=b"5")], "'lib' appears twice"),
    ([Entry(b"other/", typeflag=b"5")], "'other' is not a parent of any file"),
    ([Entry(b"hello.py/", typeflag=b"5")], "both a file and a directory"),
    ([Entry(b"LIB/", typeflag=b"5")], "collides"),
    ([Entry(b"lib/", typeflag=b"5", mode=0o1755)], "sticky bit"),
    ([Entry(b"lib/", typeflag=b"5", data=b"x" * 10)], "a directory with data"),
])
def test_bad_directory_entries(entries, message):
    files = good_files()
    archive = raw_archive(manifest_value(files), [
        Entry(path.encode(), data) for path, data in files.items()] + entries)
    with pytest.raises(BundleError) as refused:
        check_archive(io.BytesIO(archive))
    assert message in str(refused.value)


def test_trailing_zero_blocks_are_fine_but_not_garbage():
    tar = good_archive(compress=False)
    assert check_archive(io.BytesIO(tar + bytes(10240))).name == "hello"
    with pytest.raises(BundleError, match="data after the end of the archive"):
        check_archive(io.BytesIO(tar + b"\x01"))
    with pytest.raises(BundleError, match="data after the end of the gzip stream"):
        check_archive(io.BytesIO(gz(tar) + b"\x00"))
    with pytest.raises(BundleError, match="data after the end of the gzip stream"):
        check_archive(io.BytesIO(gz(tar) + gz(b"")))  # a second gzip member


def test_the_reader_refuses_header_forms_outside_strict_ustar():
    good = ustar.make_header("a.py", 0o644, 0)

    def with_field(offset, value):
        block = bytearray(good)
        block[offset:offset + len(value)] = value
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\x00 " % sum(block)
        return bytes(block)

    cases = [
        (good[:148] + b"0000000\x00" + good[156:], "bad header checksum"),
        (with_field(257, b"ustar  \x00"), "a GNU tar header"),
        (with_field(257, b"ustaR\x0000"), "not a POSIX ustar header"),
        (with_field(124, b"\x80" + bytes(11)), "a base-256 size field"),
        (with_field(124, b"0000000001x\x00"), "the size field is not an octal number"),
        (with_field(0, b"a.py\x00junk"), "bytes after the end of the name field"),
        (with_field(500, b"\x01"), "non-zero bytes at the end of its header"),
        (with_field(156, b"Z"), "unknown type b'Z'"),
        (with_field(329, b"0000001\x00"), "has device numbers"),
    ]
    for block, message in cases:
        reader = ustar.TarReader(ustar.ByteStream(io.BytesIO(block + bytes(1024)),
                                                  Limits().caps()))
        with pytest.raises(BundleError) as refused:
            reader.next_header()
        assert message in str(refused.value), (message, str(refused.value))


def test_non_zero_padding_after_data_is_refused():
    files = {"hello.py": b"x"}
    tar = bytearray(raw_archive(manifest_value(files), [Entry(b"hello.py", b"x")],
                                compress=False))
    data_offset = tar.index(b"x", 1024 + 512)  # after manifest header+data and the header
    tar[data_offset + 1] = 0x20
    with pytest.raises(BundleError, match="'hello.py': non-zero bytes in the padding"):
        check_archive(io.BytesIO(bytes(tar)))


def test_archive_caps_count_the_stream():
    archive = good_archive()
    tight = Limits(max_total_size=100, max_manifest_size=1000, max_files=2)
    assert tight.caps().max_output < 20000
    deep = "a/b/c/d/e/f"
    many = raw_archive(manifest_value({deep: b"x"}), [
        Entry(parent.encode() + b"/", typeflag=b"5") for parent in
        ("a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e")] + [Entry(deep.encode(), b"x")])
    assert check_archive(io.BytesIO(many)).name == "hello"
    with pytest.raises(BundleError, match="the archive has more than 5 entries"):
        check_archive(io.BytesIO(many), tight)
    assert check_archive(io.BytesIO(good_archive()), tight).name == "hello"
    long_tail = good_archive(compress=False) + bytes(tight.caps().max_output)
    with pytest.raises(BundleError, match="the archive expands to more than"):
        check_archive(io.BytesIO(gz(long_tail)), tight)
    with pytest.raises(BundleError, match="the archive expands to more than"):  # plain tar
        check_archive(io.BytesIO(long_tail), tight)
    assert check_archive(io.BytesIO(archive)).name == "hello"


# -- extracting ------------------------------------------------------------------------


def test_extraction_writes_exactly_the_manifest(source, tmp_path):
    archive = tmp_path / "b.qgb"
    manifest = build_bundle(str(source), str(archive))
    checked = check_archive(str(archive))
    target = extract_archive(str(archive), checked, str(tmp_path), "hello-1.0.0")
    assert target == str(tmp_path / "hello-1.0.0")
    root = Path(target)
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    found = {str(p.relative_to(root)): p for p in root.rglob("*")}
    assert set(found) == set(FILES) | {"bin", "lib", "lib/deep"}
    for entry in manifest.files:
        path = found[entry.path]
        assert path.read_bytes() == FILES[entry.path]
        assert stat.S_IMODE(path.stat().st_mode) == entry.mode
    assert all(stat.S_IMODE(found[d].stat().st_mode) == 0o755 for d in ("bin", "lib"))


def test_extraction_ignores_the_umask(source, tmp_path):
    archive = tmp_path / "b.qgb"
    build_bundle(str(source), str(archive))
    old = os.umask(0o077)
    try:
        root = Path(extract_archive(str(archive), check_archive(str(archive)), str(tmp_path),
                                    "x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((root / "bin" / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "lib").stat().st_mode) == 0o755


def test_extraction_needs_a_fresh_directory(tmp_path):
    archive = good_archive()
    manifest = check_archive(io.BytesIO(archive))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(BundleError, match="already exists"):
        extract_archive(io.BytesIO(archive), manifest, str(tmp_path), "taken")
    os.symlink("taken", tmp_path / "link")
    before = snapshot(tmp_path)
    with pytest.raises(BundleError, match="already exists"):
        extract_archive(io.BytesIO(archive), manifest, str(tmp_path), "link")
    for bad in ("", ".", "..", "a/b"):
        with pytest.raises(BundleError, match="bad extraction directory name"):
            extract_archive(io.BytesIO(archive), manifest, str(tmp_path), bad)
    assert snapshot(tmp_path) == before


def test_extraction_refuses_an_archive_whose_manifest_changed(tmp_path):
    checked = check_archive(io.BytesIO(good_archive()))
    other = good_archive(version="1.0.1")
    with pytest.raises(BundleError, match="differs from the one that was checked"):
        extract_archive(io.BytesIO(other), checked, str(tmp_path), "x")
    assert list(tmp_path.iterdir()) == []


def test_remove_tree_at_does_not_follow_links(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    os.symlink(victim, tree / "a" / "link")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree_at(fd, "tree")
        remove_tree_at(fd, "absent")
    finally:
        os.close(fd)
    assert not tree.exists() and (victim / "precious").read_text() == "keep"


# -- path rules ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["a", "a.py", "lib/x/y.py", "caf\u00e9", "with space",
                                  "x" * 255, "/".join("d" * 16), "...", "a..b", ".hidden"])
def test_good_paths(path):
    assert check_path(path, "entry") == path
    assert check_path(path.encode(), "entry") == path


@pytest.mark.parametrize("path, reason", [
    (b"", "an empty path"),
    (b"/a", "an absolute path"),
    (b"..", "a '..' component"),
    (b"a/../b", "a '..' component"),
    (b".", "a '.' component"),
    (b"./a", "a '.' component"),
    (b"a//b", "an empty component"),
    (b"a/", "an empty component"),
    (b"a\\b", "a backslash"),
    (b"a\x00b", "U+0000"),
    (b"a\nb", "U+000A"),
    (b"a\x7fb", "U+007F"),
    (b"a\xc2\x85b", "U+0085"),
    ("a\u200bb".encode(), "U+200B"),
    ("a\u2028b".encode(), "U+2028"),
    (b"a\xffb", "not UTF-8"),
    (b"a\xed\xa0\x80", "not UTF-8"),  # an encoded surrogate
    (b"x" * 256, "longer than 255 bytes"),
    ("\u00e9".encode() * 128, "longer than 255 bytes"),
    ("/".join("d" * 17).encode(), "deeper than 16"),
])
def test_bad_paths_name_the_entry(path, reason):
    with pytest.raises(BundleError) as refused:
        check_path(path, "entry")
    message = str(refused.value)
    assert reason in message and message.startswith("entry '")
    assert "\x00" not in message and "\n" not in message


def test_fold_merges_case_nfc_and_nfkc():
    assert fold("README") == fold("readme")
    assert fold("caf\u00e9") == fold("cafe\u0301")   # NFC
    assert fold("\ufb01") == fold("fi")              # NFKC
    assert fold("Stra\u00dfe") == fold("STRASSE")     # full case folding
    assert fold("a") != fold("b")


def test_path_set():
    seen = PathSet("entry")
    seen.add_file("lib/a.py")
    seen.add_file("lib/b.py")
    seen.add_directory("lib")          # explicit after implied: fine
    assert seen.is_directory("lib")
    with pytest.raises(BundleError, match="appears twice"):
        seen.add_directory("lib")
    with pytest.raises(BundleError, match="appears twice"):
        seen.add_file("lib/a.py")
    with pytest.raises(BundleError, match="both a file and a directory"):
        seen.add_file("lib")
    with pytest.raises(BundleError, match="collides"):
        seen.add_file("LIB/c.py")


def test_gzip_detection_and_zip_refusal():
    with pytest.raises(BundleError, match="zip file"):
        check_archive(io.BytesIO(b"PK\x03\x04" + bytes(600)))
    with pytest.raises(BundleError, match="gzip stream is corrupt"):
        check_archive(io.BytesIO(b"\x1f\x8b\x08\x00" + b"\xff" * 600))
    with pytest.raises(BundleError, match="the archive is truncated"):
        check_archive(io.BytesIO(b""))
    assert gzip.decompress(good_archive())[:13] == b"manifest.json"
