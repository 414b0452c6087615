"""Bundles built on the fly for the extension tests: good ones, and hostile ones byte by byte.

:func:`raw_archive` writes any tar we like (any path bytes, type flag, mode,
link name, size), so the hostile corpus needs no binary fixtures.
:class:`Signer` makes a key, its trust directory, and statements.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from qga.ext import statement as statements
from qga.ext.manifest import encode_manifest
from qga.ext.trust import TrustStore, trust_file
from qga.ext.ustar import BLOCK


class Entry(NamedTuple):
    """One raw archive entry."""

    path: bytes
    data: bytes = b""
    typeflag: bytes = b"0"
    mode: int = 0o644
    linkname: bytes = b""
    size: Optional[int] = None   # the header's size; None: len(data)


def header(entry: Entry) -> bytes:
    """A ustar header for ``entry`` with a correct checksum (long paths split at '/')."""
    path = entry.path
    name, prefix = path, b""
    if len(path) > 100:
        cut = path.rindex(b"/", 0, 156)
        name, prefix = path[cut + 1:], path[:cut]
    size = len(entry.data) if entry.size is None else entry.size
    block = bytearray(BLOCK)
    block[0:len(name)] = name
    block[100:108] = b"%07o\x00" % entry.mode
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"00000000000\x00"
    block[148:156] = b" " * 8
    block[156:157] = entry.typeflag
    block[157:157 + len(entry.linkname)] = entry.linkname
    block[257:265] = b"ustar\x0000"
    block[329:345] = b"0000000\x000000000\x00"
    block[345:345 + len(prefix)] = prefix
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def raw_tar(entries: Iterable[Entry]) -> bytes:
    out = bytearray()
    for entry in entries:
        out += header(entry) + entry.data + bytes(-len(entry.data) % BLOCK)
    return bytes(out + bytes(2 * BLOCK))


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def file_item(path: str, data: bytes, mode: str = "0644") -> Dict[str, object]:
    return {"path": path, "size": len(data), "mode": mode,
            "sha256": hashlib.sha256(data).hexdigest()}


def manifest_value(files: Dict[str, bytes], name: str = "hello", version: str = "1.0.0",
                   modes: Optional[Dict[str, str]] = None, **extra: object) -> Dict[str, object]:
    """A valid manifest listing ``files`` (path -> data), entry point the first one."""
    modes = modes or {}
    items = [file_item(path, data, modes.get(path, "0644")) for path, data in files.items()]
    value: Dict[str, object] = {
        "manifest-version": 1, "name": name, "version": version,
        "requires-core": {"min": "0.1.0"},
        "entry-point": {"interpreter": "python3", "path": items[0]["path"]},
        "files": items,
    }
    value.update(extra)
    return value


def raw_archive(manifest: Dict[str, object], entries: Iterable[Entry],
                compress: bool = True) -> bytes:
    """manifest.json first, then ``entries`` exactly as given."""
    data = encode_manifest(manifest)
    tar = raw_tar([Entry(b"manifest.json", data)] + list(entries))
    return gz(tar) if compress else tar


def good_files() -> Dict[str, bytes]:
    return {"hello.py": b"print('hello')\n", "lib/util.py": b"X = 1\n"}


def good_archive(compress: bool = True, **manifest_extra: object) -> bytes:
    files = good_files()
    manifest = manifest_value(files, **manifest_extra)
    return raw_archive(manifest, [Entry(path.encode(), data) for path, data in files.items()],
                       compress)


def write_source_dir(directory: Path, files: Dict[str, bytes],
                     manifest: Optional[Dict[str, object]] = None) -> Path:
    """A directory ``qga-bundle build`` accepts: files plus manifest.json (without files)."""
    directory.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    value = manifest or {"manifest-version": 1, "name": "hello", "version": "1.0.0",
                         "requires-core": {"min": "0.1.0"},
                         "entry-point": {"interpreter": "python3",
                                         "path": next(iter(files))}}
    (directory / "manifest.json").write_text(json.dumps(value))
    return directory


class Signer:
    """An Ed25519 key, a trust directory holding it, and statements it signs."""

    def __init__(self, trust_dir: Path, names: Iterable[str] = ("hello",),
                 file_name: str = "test.json"):
        self.private_key = statements.generate_private_key()
        self.public_key = statements.public_raw(self.private_key)
        self.key_id = statements.key_id(self.public_key)
        self.trust_dir = trust_dir
        trust_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(trust_dir, 0o755)
        path = trust_dir / file_name
        path.write_bytes(trust_file(self.public_key, list(names)))
        os.chmod(path, 0o644)

    def trust(self) -> TrustStore:
        return TrustStore.load([str(self.trust_dir)])

    def statement(self, archive: bytes, name: str = "hello", version: str = "1.0.0",
                  counter: int = 10) -> bytes:
        return statements.Statement(name, version, counter,
                                    hashlib.sha256(archive).hexdigest(), len(archive),
                                    self.key_id).encode()

    def sign(self, archive: bytes, **fields: object) -> Tuple[bytes, bytes]:
        data = self.statement(archive, **fields)  # type: ignore[arg-type]
        return data, statements.sign(data, self.private_key)


def snapshot(root: Path) -> List[Tuple[str, int, int, str]]:
    """Everything below ``root``: path, mode (with type), size, content hash; links not followed."""
    found = []
    for directory, subdirectories, names in os.walk(root):
        for name in sorted(subdirectories + names):
            path = os.path.join(directory, name)
            info = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            found.append((os.path.relpath(path, root), info.st_mode, info.st_size, digest))
    return sorted(found)


def bytes_io(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
