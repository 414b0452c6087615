"""The install pipeline: upload in chunks, verify, extract, switch, start, confirm or roll back.

**Uploads** (:class:`Uploads`) go to the store's private staging directory
(0700).  ``guest-extension-upload`` without an ``upload`` id starts one: the
host gives the archive's total ``size``, which must be within the archive
cap, leave :data:`RESERVE_BYTES` free on the filesystem and find
:data:`RESERVE_INODES` free inodes.  Each chunk is at most
:data:`MAX_CHUNK` bytes (4 MiB: libvirt caps a message at 10 MiB, base64
adds a third) written at the ``offset`` the host names: the current end
appends, an earlier offset rewrites from there (the host retries a chunk
whose answer it lost), a later one is refused.  An upload's file is its
only state (``<id>-<size>.part``, its length is the offset), so an upload
survives an agent restart and is resumed the same way; one left alone for
:data:`UPLOAD_TTL` seconds is deleted.  At most :data:`MAX_UPLOADS` at once.

**Install** (:class:`Installer`, one at a time), synchronous up to the switch,
so every refusal is the answer to ``guest-extension-install``:

1. the upload is complete; the statement and signature decode;
2. :func:`qga.ext.verify.verify_bundle` with the trust directories and the
   store's anti-rollback counter: signature, scope, counter, size and hash,
   every archive check (see :mod:`qga.ext.verify`);
3. free space and inodes for the unpacked files;
4. extraction into a fresh version directory nothing refers to yet, with
   the manifest, statement and signature beside it;
5. the switch (:meth:`qga.ext.store.Store.switch`, journaled).

The answer is then ``{"state": "installing"}``; the rest runs on the loop:
the old version's process tree stops, the new version starts with a health
check (it must say ``ready`` within its ``ready-timeout``), and either the
store confirms it (``done``) or rolls back to the version before, which is
started again (``rolled-back``; ``failed`` for a first install).  The host
follows this with ``guest-extension-status`` (its ``install`` member).
While the guest is frozen these steps wait for the thaw (they write).
Every failure removes what it created: nothing is left behind.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import time
from typing import Any, Dict, List, Optional

from qga.errors import (BundleError, ExtensionError, ExtensionRunError, ParameterError,
                        StateError)
from qga.ext.rules import Limits
from qga.ext.store import (MANIFEST_FILE, SIGNATURE_FILE, STATEMENT_FILE, Entry,
                           remove_path, version_of)

log = logging.getLogger(__name__)

MAX_CHUNK = 4 * 1024 * 1024
MAX_UPLOADS = 4
UPLOAD_TTL = 3600.0
RESERVE_BYTES = 16 * 1024 * 1024
RESERVE_INODES = 64
FROZEN_POLL = 0.25
_PART = re.compile(r"([0-9a-f]{16})-([0-9]{1,15})\.part")


def decode_base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ParameterError(f"{what} is not valid base64") from None


def check_room(path: str, size: int, files: int = 1) -> None:
    """Refuse (BundleError) unless ``size`` bytes and ``files`` inodes fit with the reserve."""
    try:
        info = os.statvfs(path)
    except OSError as error:
        raise BundleError(f"cannot check free space in {path}: {error.strerror}") from None
    free = info.f_bavail * info.f_frsize
    if size + RESERVE_BYTES > free:
        raise BundleError(f"not enough free space in {path}: {size} bytes needed and"
                          f" {RESERVE_BYTES} kept free, {free} available")
    if info.f_files and files + RESERVE_INODES > info.f_favail:
        raise BundleError(f"not enough free inodes in {path}: {files} needed,"
                          f" {info.f_favail} available")


# -- uploads ---------------------------------------------------------------------------------


class Uploads:
    """Uploads in progress in the private staging directory; see the module docstring."""

    def __init__(self, staging: str, limits: Limits = Limits()):
        self.staging = staging
        self.limits = limits

    def _find(self, upload: str):
        for name in _listdir(self.staging):
            match = _PART.fullmatch(name)
            if match and match.group(1) == upload:
                return os.path.join(self.staging, name), int(match.group(2))
        raise ParameterError(f"no upload '{upload}' (finished, expired or never started)")

    def start(self, size: int) -> str:
        self.expire()
        if not 0 < size <= self.limits.max_archive_size:
            raise ParameterError(f"size {size} is not between 1 and the archive limit of"
                                 f" {self.limits.max_archive_size} bytes")
        if sum(1 for name in _listdir(self.staging) if _PART.fullmatch(name)) >= MAX_UPLOADS:
            raise ExtensionRunError(f"{MAX_UPLOADS} uploads are in progress already; finish"
                                    " one or wait until it expires")
        check_room(self.staging, size)
        upload = os.urandom(8).hex()
        path = os.path.join(self.staging, f"{upload}-{size}.part")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except OSError as error:
            raise ExtensionRunError(f"cannot start an upload: {error.strerror}") from None
        return upload

    def write(self, upload: str, offset: int, data: bytes) -> Dict[str, Any]:
        path, size = self._find(upload)
        if len(data) > MAX_CHUNK:
            raise ParameterError(f"a chunk of {len(data)} bytes is over the {MAX_CHUNK}-byte"
                                 " limit")
        current = os.stat(path).st_size
        if offset < 0 or offset > current:
            raise ParameterError(f"offset {offset} is not within the {current} bytes received"
                                 f" of upload '{upload}'")
        if offset + len(data) > size:
            raise ParameterError(f"upload '{upload}' is {size} bytes; {offset + len(data)}"
                                 " would be more")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, offset)
                view = memoryview(data)
                position = offset
                while view:
                    written = os.pwrite(fd, view, position)
                    view = view[written:]
                    position += written
            finally:
                os.close(fd)
        except OSError as error:
            raise ExtensionRunError(f"cannot write upload '{upload}':"
                                    f" {error.strerror}") from None
        return {"upload": upload, "offset": offset + len(data), "size": size}

    def status(self, upload: str) -> Dict[str, Any]:
        path, size = self._find(upload)
        return {"upload": upload, "offset": os.stat(path).st_size, "size": size}

    def complete_path(self, upload: str) -> str:
        path, size = self._find(upload)
        received = os.stat(path).st_size
        if received != size:
            raise ParameterError(f"upload '{upload}' has {received} of its {size} bytes")
        return path

    def discard(self, upload: str) -> None:
        try:
            path, _size = self._find(upload)
        except ParameterError:
            return
        remove_path(path)

    def expire(self) -> None:
        """Delete uploads idle for UPLOAD_TTL and anything else in the staging directory."""
        now = time.time()
        for name in _listdir(self.staging):
            path = os.path.join(self.staging, name)
            if _PART.fullmatch(name):
                try:
                    if now - os.stat(path).st_mtime < UPLOAD_TTL:
                        continue
                except OSError:
                    continue
            remove_path(path)


def _listdir(path: str) -> List[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


# -- installing --------------------------------------------------------------------------------


class Installer:
    """Installs one bundle at a time for an :class:`~qga.ext.manager.Extensions`."""

    def __init__(self, manager: Any):
        self.manager = manager
        self.busy: Optional[str] = None   # the name being installed, until confirmed or rolled back

    def check_idle(self, name: Optional[str] = None) -> None:
        if self.busy is not None and (name is None or name == self.busy):
            raise ExtensionRunError(f"an install of extension {self.busy} is in progress")

    def describe(self, name: str, record: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """The ``install`` member of guest-extension-status."""
        if not record:
            return None
        state = record.get("state")
        result = {"version": record.get("version") or "",
                  "state": "installing" if state == "switched" else state}
        if record.get("error"):
            result["error"] = record["error"]
        return result

    def install(self, upload: str, statement: Optional[str],
                signature: Optional[str]) -> Dict[str, Any]:
        self.check_idle()
        uploads = self.manager.uploads
        archive = uploads.complete_path(upload)
        statement_bytes = None if statement is None else decode_base64(statement, "statement")
        signature_bytes = None if signature is None else decode_base64(signature, "signature")
        name, version = "", ""
        try:
            name, version = _identify(archive, statement_bytes)
            verified = self._verify(archive, name, statement_bytes, signature_bytes)
            version = verified.manifest.version
            version_id = self._unpack(verified, archive, statement_bytes, signature_bytes)
        except (ExtensionError, StateError) as error:
            uploads.discard(upload)
            if name:
                self._record_failure(name, version, str(error))
            raise
        uploads.discard(upload)
        try:
            self.manager.store.switch(name, version_id, verified.counter)
        except StateError:
            self.manager.store.discard(name, version_id)
            raise
        log.info("extension %s: version %s installed; starting it", name, version)
        self.busy = name
        self.manager.replace(name, lambda: self._start_new(name))
        return {"name": name, "version": version, "state": "installing"}

    def _verify(self, archive: str, name: str, statement: Optional[bytes],
                signature: Optional[bytes]):
        from qga.ext.trust import DEFAULT_TRUST_DIRS, TrustStore
        from qga.ext.verify import verify_bundle

        config = self.manager.config
        trust = TrustStore.load(config.trust_dirs or DEFAULT_TRUST_DIRS)
        return verify_bundle(archive, statement, signature, trust,
                             installed_counter=self.manager.store.counter(name),
                             allow_unsigned=config.allow_unsigned_extensions)

    def _unpack(self, verified, archive: str, statement: Optional[bytes],
                signature: Optional[bytes]) -> str:
        from qga.ext.verify import extract_bundle
        from qga.state import atomic_write

        store = self.manager.store
        manifest = verified.manifest
        check_room(store.root, manifest.total_size + 64 * 1024,
                   files=2 * len(manifest.files) + 8)
        version_id = store.new_version(manifest.name, manifest.version)
        directory = store.version_dir(manifest.name, version_id)
        try:
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)
            atomic_write(os.path.join(directory, MANIFEST_FILE), manifest.data, 0o644)
            if statement is not None:
                atomic_write(os.path.join(directory, STATEMENT_FILE), statement, 0o644)
            if signature is not None:
                atomic_write(os.path.join(directory, SIGNATURE_FILE), signature, 0o644)
            extract_bundle(verified, archive, directory, "bundle")
        except OSError as error:
            store.discard(manifest.name, version_id)
            raise BundleError(f"cannot unpack the bundle: {error.strerror or error}") from None
        except BaseException:
            store.discard(manifest.name, version_id)
            raise
        return version_id

    def _record_failure(self, name: str, version: str, error: str) -> None:
        try:
            self.manager.store.record_failure(name, version, error)
        except (ExtensionError, StateError) as failure:
            log.warning("extension %s: cannot record the failed install: %s", name, failure)

    # -- on the loop -------------------------------------------------------------------------------

    def _start_new(self, name: str) -> None:
        try:
            runtime = self.manager.activate(name)
        except ExtensionError as error:
            self._health(name, str(error))
            return
        runtime.start(health=lambda problem: self._health(name, problem))

    def _health(self, name: str, problem: Optional[str]) -> None:
        if self.manager.is_frozen():
            self.manager.loop.call_later(FROZEN_POLL, lambda: self._health(name, problem))
            return
        store = self.manager.store
        if problem is None:
            try:
                store.confirm(name)
                log.info("extension %s: the new version is ready", name)
            except StateError as error:
                log.error("extension %s: cannot confirm the install: %s", name, error)
            self.busy = None
            return
        log.warning("extension %s: the new version failed (%s); rolling back", name, problem)
        self.manager.replace(name, lambda: self._roll_back(name, problem))

    def _roll_back(self, name: str, problem: str) -> None:
        self.busy = None
        try:
            entry: Entry = self.manager.store.roll_back(name, problem)
        except StateError as error:
            log.error("extension %s: cannot roll back: %s", name, error)
            return
        if entry.installed and entry.enabled:
            log.info("extension %s: back to version %s", name, version_of(entry.current))
            try:
                self.manager.activate(name).start()
            except ExtensionError as error:
                log.error("extension %s: %s", name, error)


def _identify(archive: str, statement: Optional[bytes]):
    """The extension's name (and version) before verification, to find its counter."""
    if statement is not None:
        from qga.ext.statement import parse_statement

        parsed = parse_statement(statement)
        return parsed.name, parsed.version
    from qga.ext.bundle import read_manifest

    manifest = read_manifest(archive)
    return manifest.name, manifest.version
