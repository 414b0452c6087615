"""Installed extensions on disk: versions, the anti-rollback counter, a journal.

Everything lives under ``<statedir>/extensions/``::

    index.json               the one index of the store (rewritten atomically)
    staging/                 uploads in progress (private, 0700; see qga.ext.install)
    <name>/                  one extension
        versions/<id>/       one installed version; ``id`` is ``<sequence>-<version>``
            bundle/          the extracted bundle, read-only (``QGA_EXT_DIR``)
            manifest.json    the verified manifest's exact bytes
            statement        the signed statement and its signature, as uploaded
            signature        (absent for an unsigned bundle)
        state/               the extension's own data, kept across upgrades
                             (``QGA_EXT_STATE``, owned by the extension's user)

The store and the extension directories are 0755: an extension's user must
reach its code, so the state directory above must be traversable by others
(0711 is enough).  Only ``state/`` of each extension is writable by it.

**The index** is the single source of truth::

    {"format": 1,
     "extensions": {"hello": {"current": "3-1.0.1", "previous": "2-1.0.0",
                              "counter": 11, "enabled": true, "install": {...}}}}

``current`` is what runs, ``previous`` the one version kept for rollback,
``counter`` the highest statement counter ever switched to (kept when the
extension is removed, so removing it cannot open the way to a downgrade),
``enabled`` false after ``guest-extension-stop``, and ``install`` the last
install's record (shown by ``guest-extension-status``).

**The journal.**  An upgrade from A (keeping P) to B is two index writes:

1. *switch*: ``current`` B, ``previous`` A, ``install`` ``{"state": "switched",
   "from": A, "drop": P, ...}``, counter raised; then B starts;
2. *commit* (B said it is ready): ``install`` ``{"state": "done"}``, then P is
   deleted; or *roll back* (B failed): ``current`` A, ``previous`` P,
   ``install`` ``{"state": "rolled-back", "error": ...}``, then B is deleted.

Extraction happens before the switch into a directory nothing refers to
yet.  So whenever the agent is killed, :meth:`Store.open` finds either an
index without the new version (its directory is garbage, collected), or a
switch never confirmed (rolled back: a version that never said it was
ready is not trusted to run), or a finished state with a directory left to
delete (collected).  Directories the index does not name are removed at
every start; every write goes through :func:`qga.state.atomic_write`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Dict, Iterator, List, Optional

from qga.errors import ExtensionError, StateError, StoreError
from qga.state import atomic_write

log = logging.getLogger(__name__)

STORE_DIR = "extensions"
INDEX_FILE = "index.json"
STAGING_DIR = "staging"
VERSIONS_DIR = "versions"
STATE_DIR = "state"
BUNDLE_DIR = "bundle"
MANIFEST_FILE = "manifest.json"
STATEMENT_FILE = "statement"
SIGNATURE_FILE = "signature"
FORMAT = 1

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_VERSION_ID = re.compile(r"([1-9][0-9]{0,17})-[0-9A-Za-z.+-]{1,64}")


def has_store(statedir: str) -> bool:
    """Whether an extension store exists in ``statedir`` (cheap: one stat)."""
    return os.path.exists(os.path.join(statedir, STORE_DIR, INDEX_FILE))


class Entry:
    """One extension's record in the index."""

    __slots__ = ("name", "current", "previous", "counter", "enabled", "install")

    def __init__(self, name: str, current: Optional[str] = None,
                 previous: Optional[str] = None, counter: Optional[int] = None,
                 enabled: bool = True, install: Optional[Dict[str, Any]] = None):
        self.name = name
        self.current = current
        self.previous = previous
        self.counter = counter
        self.enabled = enabled
        self.install = install

    @property
    def installed(self) -> bool:
        return self.current is not None

    def versions(self) -> List[str]:
        return [item for item in (self.current, self.previous) if item is not None]

    def to_json(self) -> Dict[str, Any]:
        return {"current": self.current, "previous": self.previous, "counter": self.counter,
                "enabled": self.enabled, "install": self.install}

    @classmethod
    def from_json(cls, name: str, value: Any) -> "Entry":
        if not isinstance(value, dict):
            raise StoreError(f"index entry of '{name}' is not an object")
        entry = cls(name, value.get("current"), value.get("previous"), value.get("counter"),
                    bool(value.get("enabled", True)), value.get("install"))
        for version_id in entry.versions():
            if not isinstance(version_id, str) or not _VERSION_ID.fullmatch(version_id):
                raise StoreError(f"index entry of '{name}' names a bad version {version_id!r}")
        if entry.counter is not None and type(entry.counter) is not int:
            raise StoreError(f"index entry of '{name}' has a bad counter")
        if entry.install is not None and not isinstance(entry.install, dict):
            raise StoreError(f"index entry of '{name}' has a bad install record")
        return entry


def version_of(version_id: str) -> str:
    """The extension version a version id names (``3-1.0.1`` -> ``1.0.1``)."""
    return version_id.split("-", 1)[1]


class Store:
    """The extension store of one state directory; :meth:`open` it."""

    def __init__(self, root: str):
        self.root = root
        self.index_path = os.path.join(root, INDEX_FILE)
        self.staging = os.path.join(root, STAGING_DIR)
        self._entries: Dict[str, Entry] = {}

    # -- opening and recovery ----------------------------------------------------------

    @classmethod
    def inspect(cls, statedir: str) -> "Store":
        """The store as it is, read only: no recovery, nothing created or deleted (qgactl)."""
        store = cls(os.path.join(statedir, STORE_DIR))
        if os.path.exists(store.index_path):
            store._load()
        return store

    @classmethod
    def open(cls, statedir: str) -> "Store":
        """Create or load the store, finish what a killed agent left, collect garbage."""
        store = cls(os.path.join(statedir, STORE_DIR))
        store._make_directories()
        store._load()
        store._recover()
        store._collect_garbage()
        return store

    def _make_directories(self) -> None:
        try:
            _make_directory(self.root, 0o755)
            _make_directory(self.staging, 0o700)
        except OSError as error:
            raise StoreError(f"cannot create the extension store in {self.root}:"
                             f" {error.strerror}") from None

    def _load(self) -> None:
        try:
            with open(self.index_path, "rb") as stream:
                data = stream.read()
        except FileNotFoundError:
            self._write()  # its existence is what tells the agent to start the store
            return
        except OSError as error:
            raise StoreError(f"cannot read {self.index_path}: {error.strerror}") from None
        try:
            value = json.loads(data)
        except ValueError as error:
            raise StoreError(f"{self.index_path} is not valid JSON: {error}") from None
        if not isinstance(value, dict) or value.get("format") != FORMAT \
                or not isinstance(value.get("extensions"), dict):
            raise StoreError(f"{self.index_path} is not an extension index of format {FORMAT}")
        for name, item in value["extensions"].items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise StoreError(f"{self.index_path} names a bad extension {name!r}")
            self._entries[name] = Entry.from_json(name, item)

    def _recover(self) -> None:
        """A switch that never said ready is rolled back (see the module docstring)."""
        changed = False
        for entry in self._entries.values():
            install = entry.install or {}
            if install.get("state") == "switched":
                log.warning("extension %s: the agent stopped before version %s said it was"
                            " ready; back to the version before", entry.name,
                            install.get("version"))
                self._apply_rollback(entry, "interrupted: the agent stopped before the new"
                                            " version said it was ready")
                changed = True
        if changed:
            self._write()

    def _collect_garbage(self) -> None:
        """Remove what the index does not name: half-extracted or dropped versions, leftovers."""
        for name in _listdir(self.root):
            path = os.path.join(self.root, name)
            if name in (INDEX_FILE, STAGING_DIR):
                continue
            if name.startswith(INDEX_FILE + "."):
                remove_path(path)  # a temporary file of an interrupted index write
                continue
            entry = self._entries.get(name)
            if entry is None or not entry.installed:
                remove_path(path)
                continue
            versions = os.path.join(path, VERSIONS_DIR)
            for version_id in _listdir(versions):
                if version_id not in entry.versions():
                    remove_path(os.path.join(versions, version_id))
        for name, entry in list(self._entries.items()):
            if not entry.installed and entry.counter is None and entry.install is None:
                del self._entries[name]

    # -- reading -----------------------------------------------------------------------

    def names(self) -> List[str]:
        return sorted(self._entries)

    def installed(self) -> Iterator[Entry]:
        for name in self.names():
            entry = self._entries[name]
            if entry.installed:
                yield entry

    def entry(self, name: str) -> Optional[Entry]:
        return self._entries.get(name)

    def counter(self, name: str) -> Optional[int]:
        """The anti-rollback counter of ``name`` (None: never a signed install)."""
        entry = self._entries.get(name)
        return None if entry is None else entry.counter

    def version_dir(self, name: str, version_id: str) -> str:
        return os.path.join(self.root, name, VERSIONS_DIR, version_id)

    def bundle_dir(self, name: str, version_id: str) -> str:
        return os.path.join(self.version_dir(name, version_id), BUNDLE_DIR)

    def state_dir(self, name: str) -> str:
        return os.path.join(self.root, name, STATE_DIR)

    def read_manifest(self, name: str, version_id: str) -> Any:
        """The installed version's manifest, parsed and checked again."""
        from qga.ext.manifest import parse_manifest

        path = os.path.join(self.version_dir(name, version_id), MANIFEST_FILE)
        try:
            with open(path, "rb") as stream:
                return parse_manifest(stream.read())
        except OSError as error:
            raise StoreError(f"cannot read {path}: {error.strerror}") from None

    def verify(self, name: str, version_id: str) -> List[str]:
        """Problems of an installed version's files against its manifest ([] if none).

        Every file the manifest lists must be a regular file (not a link) of
        its size, mode and SHA-256, and nothing else may be in the bundle.
        """
        import hashlib
        import stat

        try:
            manifest = self.read_manifest(name, version_id)
        except (StoreError, ExtensionError) as error:
            return [str(error)]
        root = self.bundle_dir(name, version_id)
        problems = []
        listed = {entry.path for entry in manifest.files}
        for entry in manifest.files:
            path = os.path.join(root, entry.path)
            try:
                info = os.lstat(path)
            except OSError as error:
                problems.append(f"{entry.path}: {error.strerror}")
                continue
            if not stat.S_ISREG(info.st_mode):
                problems.append(f"{entry.path}: not a regular file")
                continue
            if stat.S_IMODE(info.st_mode) != entry.mode:
                problems.append(f"{entry.path}: mode {stat.S_IMODE(info.st_mode):04o}, the"
                                f" manifest says {entry.mode:04o}")
            if info.st_size != entry.size:
                problems.append(f"{entry.path}: {info.st_size} bytes, the manifest says"
                                f" {entry.size}")
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != entry.sha256:
                problems.append(f"{entry.path}: its SHA-256 differs from the manifest's")
        for directory, subdirectories, files in os.walk(root):
            for file_name in files + [d for d in subdirectories
                                      if os.path.islink(os.path.join(directory, d))]:
                relative = os.path.relpath(os.path.join(directory, file_name), root)
                if relative not in listed:
                    problems.append(f"{relative}: not in the manifest")
        return problems

    # -- a new version -------------------------------------------------------------------

    def new_version(self, name: str, version: str) -> str:
        """Prepare ``<name>/versions/`` and return a version id not used there yet."""
        versions = os.path.join(self.root, name, VERSIONS_DIR)
        try:
            _make_directory(os.path.join(self.root, name), 0o755)
            _make_directory(versions, 0o755)
        except OSError as error:
            raise StoreError(f"cannot create {versions}: {error.strerror}") from None
        used = [int(match.group(1)) for match in map(_VERSION_ID.fullmatch, _listdir(versions))
                if match]
        return f"{max(used, default=0) + 1}-{version}"

    def switch(self, name: str, version_id: str, counter: Optional[int]) -> Entry:
        """Journal step 1: make ``version_id`` current, keep the current one as previous."""
        entry = self._entries.get(name) or Entry(name)
        install = {"state": "switched", "version": version_of(version_id), "counter": counter,
                   "from": entry.current, "to": version_id, "drop": entry.previous,
                   "time": int(time.time())}
        updated = Entry(name, version_id, entry.current,
                        _highest(entry.counter, counter), True, install)
        self._commit_entry(updated)
        return updated

    def confirm(self, name: str) -> None:
        """Journal step 2: the new version said it is ready; drop the older previous."""
        entry = self._entries[name]
        install = dict(entry.install or {}, state="done")
        drop = install.pop("drop", None)
        install.pop("from", None)
        self._commit_entry(Entry(name, entry.current, entry.previous, entry.counter,
                                 entry.enabled, install))
        if drop is not None and drop not in (entry.current, entry.previous):
            remove_path(self.version_dir(name, drop))

    def roll_back(self, name: str, error: str) -> Entry:
        """Journal step 2, failed: the version before is current again, the new one goes."""
        entry = self._entries[name]
        updated = self._apply_rollback(entry, error)
        self._write()
        return updated

    def _apply_rollback(self, entry: Entry, error: str) -> Entry:
        install = dict(entry.install or {})
        failed = install.get("to")
        updated = Entry(entry.name, install.get("from"), install.get("drop"), entry.counter,
                        entry.enabled, {"state": "rolled-back" if install.get("from")
                                        else "failed", "version": install.get("version"),
                                        "counter": install.get("counter"), "error": error,
                                        "time": int(time.time())})
        self._entries[entry.name] = updated
        if not updated.installed:  # a first install: nothing of it stays
            remove_path(os.path.join(self.root, entry.name))
        elif failed is not None and failed not in updated.versions():
            remove_path(self.version_dir(entry.name, failed))
        return updated

    def record_failure(self, name: str, version: str, error: str) -> None:
        """An install refused before any switch: remembered for guest-extension-status."""
        entry = self._entries.get(name) or Entry(name)
        self._commit_entry(Entry(name, entry.current, entry.previous, entry.counter,
                                 entry.enabled, {"state": "failed", "version": version,
                                                 "error": error, "time": int(time.time())}))

    def discard(self, name: str, version_id: str) -> None:
        """Remove a version directory the index does not name (an extraction not switched to)."""
        entry = self._entries.get(name)
        if entry is None or version_id not in entry.versions():
            remove_path(self.version_dir(name, version_id))

    # -- enabling and removing -------------------------------------------------------------

    def set_enabled(self, name: str, enabled: bool) -> None:
        entry = self._entries[name]
        if entry.enabled != enabled:
            self._commit_entry(Entry(name, entry.current, entry.previous, entry.counter,
                                     enabled, entry.install))

    def remove(self, name: str) -> None:
        """Forget every version and the extension's data; the counter stays."""
        entry = self._entries[name]
        if entry.counter is None:
            del self._entries[name]
            self._write()
        else:
            self._commit_entry(Entry(name, counter=entry.counter))
        remove_path(os.path.join(self.root, name))

    # -- writing -----------------------------------------------------------------------------

    def _commit_entry(self, entry: Entry) -> None:
        before = self._entries.get(entry.name)
        self._entries[entry.name] = entry
        try:
            self._write()
        except StateError:
            if before is None:
                del self._entries[entry.name]
            else:
                self._entries[entry.name] = before
            raise

    def _write(self) -> None:
        value = {"format": FORMAT,
                 "extensions": {name: entry.to_json() for name, entry in
                                sorted(self._entries.items())}}
        data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
        atomic_write(self.index_path, data, 0o600)


# -- helpers -------------------------------------------------------------------------------


def _highest(first: Optional[int], second: Optional[int]) -> Optional[int]:
    if first is None:
        return second
    if second is None:
        return first
    return max(first, second)


def _make_directory(path: str, mode: int) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    # Whatever the umask (the unit sets 0077); only when needed: no write at all
    # when everything is in place.
    if os.stat(path).st_mode & 0o7777 != mode:
        os.chmod(path, mode)


def _listdir(path: str) -> List[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_path(path: str) -> None:
    """Remove a file or a whole tree without following links; log what cannot go."""
    from qga.ext.bundle import remove_tree_at

    parent, name = os.path.split(path)
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as error:
        log.warning("cannot remove %s: %s", path, error.strerror)
        return
    try:
        remove_tree_at(fd, name)
    except OSError as error:
        log.warning("cannot remove %s: %s", path, error.strerror)
    finally:
        os.close(fd)
