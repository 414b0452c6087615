"""Bundle archives: building one from a directory, checking one, extracting one.

**Format.**  A bundle is a POSIX ustar archive, gzip-compressed (``.qgb``;
``tar tzvf`` lists it).  Its first entry is ``manifest.json``; then come the
files the manifest lists (sorted by path when we build, any order when we
read), and optionally directory entries for their parent directories.

**Why tar and not zip.**  A tar stream has one description of each member,
in front of its data; zip has two (the local header and the central
directory) that can disagree, and readers pick different ones — the root of
most zip parser-differential attacks.  Tar has one compression layer over
the whole stream, so the ratio cap is a single count made while
decompressing, where zip compresses each member with its own method and
declared sizes.  Tar reads in one pass without seeking, which suits a
bundle uploaded in chunks.  Its weaknesses (pax and GNU extension headers
that override paths and sizes, links, devices) are excluded by reading a
strict ustar subset with our own reader (:mod:`qga.ext.ustar`), and the
ustar limit on path length (255 bytes) is also our limit.

**Checking** (:func:`check_archive`) streams the whole archive and refuses,
naming the entry, anything :mod:`qga.ext.ustar` or :mod:`qga.ext.rules`
refuses, plus: a first entry that is not a regular ``manifest.json``, a
manifest that is not valid, more entries than the caps allow, a file not
in the manifest, a file of the manifest missing from the archive, a size,
mode or SHA-256 different from the manifest's, any setuid, setgid or sticky
bit, a directory entry that is not a parent of a listed file.  Nothing is
written; nothing is sanitized.

**Extraction** (:func:`extract_archive`) runs the same check again while it
writes, into a directory it creates fresh (``mkdir`` fails if the name
exists).  Every directory is opened with ``O_DIRECTORY | O_NOFOLLOW``
relative to its parent's descriptor, every file is created with
``O_CREAT | O_EXCL | O_NOFOLLOW``, so nothing the archive could have made
is ever followed; files get exactly the manifest's mode, directories 0755.
Any failure (a bad entry, a hash mismatch found at a file's end, a full
disk) removes the whole new directory before the error is raised.

**Building** (:func:`build_bundle`) is reproducible: the same directory and
``manifest.json`` give the same bytes (sorted entries, mtime 0, uid/gid 0,
no owner names, modes normalised to 0644/0755, a fixed gzip header).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Union

from qga.errors import BundleError, ManifestError
from qga.ext import ustar
from qga.ext.manifest import Manifest, encode_manifest, parse_manifest, strict_json
from qga.ext.rules import MANIFEST_NAME, Limits, PathSet, check_path, parents
from qga.ext.ustar import DIRECTORY, display

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]

# What building leaves out of a source directory: build by-products and
# version-control or editor files, never meant to ship.
IGNORED_NAMES = ("__pycache__", ".git", ".hg", ".svn")
IGNORED_SUFFIXES = (".pyc", ".pyo", "~", ".swp")


# -- checking ----------------------------------------------------------------------------


class _FileSink:
    """Where :func:`_scan` sends each file's data (the default: nowhere)."""

    def begin(self, path: str, mode: int) -> None:
        pass

    def write(self, chunk: bytes) -> None:
        pass

    def end(self) -> None:
        pass


def check_archive(archive: PathOrFile, limits: Limits = Limits()) -> Manifest:
    """Check the whole archive without writing anything; return its manifest.

    ``archive`` is a path (opened without following a final symbolic link)
    or a binary file object, which is read from its start.
    """
    with open_archive(archive) as source:
        return _scan(source, limits, _FileSink())


def read_manifest(archive: PathOrFile, limits: Limits = Limits()) -> Manifest:
    """Only the manifest (the first entry), checked; the rest of the archive is not read."""
    with open_archive(archive) as source:
        reader = ustar.open_tar(source, limits.caps())
        return _read_manifest_entry(reader, limits)


def _scan(source: BinaryIO, limits: Limits, sink: _FileSink,
          expected: Optional[Manifest] = None) -> Manifest:
    """Walk the archive, checking every entry against the manifest; stream files to ``sink``."""
    reader = ustar.open_tar(source, limits.caps())
    manifest = _read_manifest_entry(reader, limits)
    if expected is not None and manifest.sha256 != expected.sha256:
        raise BundleError(f"{MANIFEST_NAME} differs from the one that was checked")
    seen = PathSet("entry")
    seen.add_file(MANIFEST_NAME)
    wanted_directories = {parent for entry in manifest.files for parent in parents(entry.path)}
    found = set()
    entries = 1
    while True:
        header = reader.next_header()
        if header is None:
            break
        entries += 1
        if entries > limits.max_entries:
            raise BundleError(f"the archive has more than {limits.max_entries} entries")
        path = check_path(header.path, "entry", limits)
        _check_mode_bits(header.mode, path)
        if header.kind == DIRECTORY:
            seen.add_directory(path)
            if path not in wanted_directories:
                raise BundleError(f"directory entry '{display(header.path)}' is not a"
                                  " parent of any file in the manifest")
            continue
        seen.add_file(path)
        _copy_file(reader, header, path, manifest, sink)
        found.add(path)
    missing = [entry.path for entry in manifest.files if entry.path not in found]
    if missing:
        raise BundleError(f"file '{display(missing[0].encode())}' of the manifest is"
                          " missing from the archive")
    return manifest


def _read_manifest_entry(reader: ustar.TarReader, limits: Limits) -> Manifest:
    header = reader.next_header()
    if header is None:
        raise BundleError("the archive is empty")
    if header.path != MANIFEST_NAME.encode() or header.kind != ustar.REGULAR:
        raise BundleError(f"the first entry is '{display(header.path)}';"
                          f" a bundle starts with {MANIFEST_NAME}")
    _check_mode_bits(header.mode, MANIFEST_NAME)
    if header.size > limits.max_manifest_size:
        raise ManifestError(f"{MANIFEST_NAME} is {header.size} bytes, over the"
                            f" {limits.max_manifest_size}-byte limit")
    return parse_manifest(b"".join(reader.data()), limits)


def _check_mode_bits(mode: int, path: str) -> None:
    where = f"entry '{display(path.encode())}'"
    for bit, name in ((stat.S_ISUID, "setuid"), (stat.S_ISGID, "setgid"),
                      (stat.S_ISVTX, "sticky")):
        if mode & bit:
            raise BundleError(f"{where} has the {name} bit")
    if mode & ~0o7777:
        raise BundleError(f"{where} has file-type bits in its mode ({mode:o})")


def _copy_file(reader: ustar.TarReader, header: ustar.Header, path: str,
               manifest: Manifest, sink: _FileSink) -> None:
    where = f"entry '{display(header.path)}'"
    entry = manifest.file(path)
    if entry is None:
        raise BundleError(f"{where} is not listed in the manifest")
    if header.size != entry.size:
        raise BundleError(f"{where} is {header.size} bytes; the manifest says {entry.size}")
    if header.mode != entry.mode:
        raise BundleError(f"{where} has mode {header.mode:04o}; the manifest says"
                          f" {entry.mode:04o}")
    digest = hashlib.sha256()
    sink.begin(path, entry.mode)
    for chunk in reader.data():
        digest.update(chunk)
        sink.write(chunk)
    if digest.hexdigest() != entry.sha256:
        raise BundleError(f"{where}: its SHA-256 differs from the manifest's")
    sink.end()


@contextlib.contextmanager
def open_archive(archive: PathOrFile) -> Iterator[BinaryIO]:
    """The archive as a file object at its start: a path opened (no final symlink), or as given."""
    if hasattr(archive, "read"):
        archive.seek(0)  # type: ignore[union-attr]
        yield archive  # type: ignore[misc]
        return
    try:
        fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # type: ignore[arg-type]
    except OSError as error:
        raise BundleError(f"cannot open the archive {os.fspath(archive)}:"  # type: ignore
                          f" {error.strerror}") from None
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"the archive {os.fspath(archive)} is not a regular file")  # type: ignore
        yield source


# -- extracting --------------------------------------------------------------------------


class _DirectoryWriter(_FileSink):
    """Writes files below a directory descriptor, never following anything."""

    def __init__(self, root_fd: int):
        self._root_fd = root_fd
        self._directories: List[str] = []   # created, for the final fsync
        self._fd: Optional[int] = None
        self._path = ""
        self._mode = 0

    def begin(self, path: str, mode: int) -> None:
        self._path, self._mode = path, mode
        *directories, name = path.split("/")
        parent_fd = self._open_directories(directories)
        try:
            self._fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600, dir_fd=parent_fd)
        except OSError as error:
            raise self._error(error) from None
        finally:
            if parent_fd != self._root_fd:
                os.close(parent_fd)

    def write(self, chunk: bytes) -> None:
        assert self._fd is not None
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as error:
            raise self._error(error) from None

    def end(self) -> None:
        assert self._fd is not None
        try:
            os.fchmod(self._fd, self._mode)
            os.fsync(self._fd)
        except OSError as error:
            raise self._error(error) from None
        finally:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def sync_directories(self) -> None:
        for path in reversed(self._directories):
            fd = self._open_directories(path.split("/"), create=False)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.fsync(self._root_fd)

    def _open_directories(self, components: List[str], create: bool = True) -> int:
        """A descriptor for root/components..., made as needed; the caller closes it."""
        fd = self._root_fd
        for depth, name in enumerate(components, 1):
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                        self._directories.append("/".join(components[:depth]))
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=fd)
                if create:
                    os.fchmod(child, 0o755)
            except OSError as error:
                raise self._error(error) from None
            finally:
                if fd != self._root_fd:
                    os.close(fd)
            fd = child
        return fd

    def _error(self, error: OSError) -> BundleError:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "no space left on the device (or over quota)"
        else:
            reason = error.strerror or str(error)
        return BundleError(f"cannot extract '{display(self._path.encode())}': {reason}")


def extract_archive(archive: PathOrFile, manifest: Manifest, parent: str, name: str,
                    limits: Limits = Limits()) -> str:
    """Extract a checked archive into the new directory ``parent/name``; return its path.

    ``manifest`` is the one :func:`check_archive` returned: the archive's own
    must be byte for byte the same.  ``name`` must not exist.  On any error
    the new directory and everything in it are removed, then the error
    (:class:`BundleError`) is raised.
    """
    if not name or "/" in name or name in (".", ".."):
        raise BundleError(f"bad extraction directory name {name!r}")
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise BundleError(f"cannot open {parent}: {error.strerror}") from None
    try:
        _make_fresh_directory(parent_fd, name, parent)
        try:
            _extract_into(archive, manifest, parent_fd, name, limits)
        except BaseException:
            with contextlib.suppress(OSError):  # the first error is the one to report
                remove_tree_at(parent_fd, name)
            raise
        os.fsync(parent_fd)
    finally:
        os.close(parent_fd)
    return os.path.join(parent, name)


def _make_fresh_directory(parent_fd: int, name: str, parent: str) -> None:
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        raise BundleError(f"{os.path.join(parent, name)} already exists") from None
    except OSError as error:
        raise BundleError(f"cannot create {os.path.join(parent, name)}:"
                          f" {error.strerror}") from None


def _extract_into(archive: PathOrFile, manifest: Manifest, parent_fd: int, name: str,
                  limits: Limits) -> None:
    try:
        root_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=parent_fd)
    except OSError as error:
        raise BundleError(f"cannot open the new directory {name}: {error.strerror}") from None
    writer = _DirectoryWriter(root_fd)
    try:
        with open_archive(archive) as source:
            _scan(source, limits, writer, expected=manifest)
        writer.sync_directories()
        os.fchmod(root_fd, 0o755)
    except OSError as error:
        raise BundleError(f"cannot extract the bundle: {error.strerror or error}") from None
    finally:
        writer.close()
        os.close(root_fd)


def remove_tree_at(parent_fd: int, name: str) -> None:
    """Remove ``name`` below ``parent_fd`` and all it holds, through descriptors only."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(name, dir_fd=parent_fd)
        return
    try:
        for entry in os.scandir(fd):
            if entry.is_dir(follow_symlinks=False):
                remove_tree_at(fd, entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


# -- building ----------------------------------------------------------------------------


def build_bundle(source_dir: str, output: str, compress: bool = True,
                 limits: Limits = Limits()) -> Manifest:
    """Build a bundle of ``source_dir`` (which holds ``manifest.json``) into ``output``.

    The source manifest is everything but ``files``, which is computed here
    from the directory's regular files (``IGNORED_NAMES``/``_SUFFIXES``
    and hidden files left out; a symbolic link or any other special file
    is an error).  A file with any execute bit becomes 0755, any other 0644.
    ``output`` is replaced atomically.  Returns the manifest written.
    """
    with open(os.path.join(source_dir, MANIFEST_NAME), "rb") as stream:
        value = strict_json(stream.read(limits.max_manifest_size + 1), MANIFEST_NAME)
    if not isinstance(value, dict):
        raise ManifestError(f"{MANIFEST_NAME} is not a JSON object")
    files = _collect_files(source_dir, limits)
    value["files"] = [{"path": path, "size": info["size"], "mode": info["mode"],
                       "sha256": info["sha256"]} for path, info in files.items()]
    manifest = parse_manifest(encode_manifest(value), limits)

    def members() -> Iterator[ustar.Member]:
        yield ustar.Member(MANIFEST_NAME, 0o644, len(manifest.data), [manifest.data])
        for entry in manifest.files:
            yield ustar.Member(entry.path, entry.mode, entry.size,
                               _chunks(os.path.join(source_dir, entry.path)))

    _write_atomically(output, lambda out: ustar.write_tar(out, members(), compress))
    return manifest


def _collect_files(source_dir: str, limits: Limits) -> Dict[str, Dict[str, Any]]:
    found: Dict[str, Dict[str, Any]] = {}
    for directory, subdirectories, names in os.walk(source_dir):
        subdirectories[:] = sorted(name for name in subdirectories if _wanted(name))
        relative = os.path.relpath(directory, source_dir)
        for name in names:
            path = name if relative == "." else f"{relative}/{name}"
            if path == MANIFEST_NAME or not _wanted(name):
                continue
            full = os.path.join(directory, name)
            info = os.lstat(full)
            if not stat.S_ISREG(info.st_mode):
                raise BundleError(f"'{path}' is not a regular file (links and special"
                                  " files cannot be bundled)")
            check_path(path, "file", limits)
            found[path] = {"size": info.st_size,
                           "mode": "0755" if info.st_mode & 0o111 else "0644",
                           "sha256": _file_sha256(full)}
        for name in subdirectories:
            if os.path.islink(os.path.join(directory, name)):
                raise BundleError(f"'{os.path.join(relative, name)}' is a symbolic link"
                                  " (links cannot be bundled)")
    return dict(sorted(found.items(), key=lambda item: item[0].encode()))


def _wanted(name: str) -> bool:
    return not (name.startswith(".") or name in IGNORED_NAMES
                or name.endswith(IGNORED_SUFFIXES))


def _chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as stream:
        while True:
            chunk = stream.read(ustar.CHUNK)
            if not chunk:
                return
            yield chunk


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temporary file beside ``path``, fsync, rename."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(4).hex()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def sha256_of(archive: PathOrFile) -> str:
    """The archive file's SHA-256, streamed."""
    digest = hashlib.sha256()
    with open_archive(archive) as source:
        while True:
            chunk = source.read(ustar.CHUNK)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)
