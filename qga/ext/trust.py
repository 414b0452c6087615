"""Which keys the guest trusts to sign which extensions, and the anti-rollback rule.

Trust is configured on the guest only; nothing the host sends can add to it.

**Where.**  Two directories, the admin's first (:data:`DEFAULT_TRUST_DIRS`):
``/etc/qga/trust.d/`` and ``/usr/lib/qga/trust.d/`` (the vendor's, shipped
by packages).  Every ``*.json`` file in them is a trusted key; other names
(and hidden files) are ignored, so editors and package managers can leave
backups there.  A file in the admin directory replaces the vendor file of
the same name, and an *empty* one masks it (as systemd does with
``/etc`` over ``/usr/lib``).

**What.**  A trust file is JSON, written by ``qga-bundle keygen``::

    {"key": "ed25519:<base64 of the raw 32-byte public key>",
     "names": ["ovirt_sso", "ovirt-*"],
     "comment": "oVirt extensions, vendor key"}

``names`` is the key's scope: the extension names it may sign.  Patterns
may use ``*`` (any run of characters) and ``?`` (one character) and are
matched against the whole name (``fnmatchcase``; no ``[...]`` classes).  A
key with ``"*"`` may sign anything, which is allowed because it is explicit.
``comment`` is optional.  No other member is allowed.

**Fail closed.**  A trust directory or file that group or others can write,
or that is not owned by root (by root or ourselves when we do not run as
root), or whose ancestor directories could let someone else swap it (a
directory writable by others without the sticky bit, or owned by someone
else), is an error for every verification, not a skipped file: the admin
must fix it.  So is a trust file that is a symbolic link, not a regular
file, over 64 KiB, or not valid.  A missing directory simply holds no keys.

**Anti-rollback.**  :func:`check_counter` refuses a statement whose counter
is not *above* the installed one for the same extension: a replayed old
bundle, or the same one again.  The store of installed counters belongs to
the install pipeline; it passes the counter in.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import stat
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from qga.errors import RollbackError, TrustError
from qga.ext.statement import decode_public_key, key_id

ADMIN_TRUST_DIR = "/etc/qga/trust.d"
VENDOR_TRUST_DIR = "/usr/lib/qga/trust.d"
DEFAULT_TRUST_DIRS = (ADMIN_TRUST_DIR, VENDOR_TRUST_DIR)
TRUST_SUFFIX = ".json"
MAX_TRUST_FILE_SIZE = 64 * 1024
NAME_PATTERN_RE = r"[a-z0-9_*?-]{1,64}"
_MEMBERS = {"key", "names", "comment"}


class TrustedKey(NamedTuple):
    """One trust file: a public key and the extension names it may sign."""

    key_id: str
    public_key: bytes       # raw 32 bytes
    names: Tuple[str, ...]  # patterns
    source: str             # the file it came from

    def may_sign(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)


class TrustStore:
    """The trusted keys, loaded from the trust directories by :meth:`load`."""

    def __init__(self, keys: Iterable[TrustedKey] = (), dirs: Sequence[str] = ()):
        self.keys: Tuple[TrustedKey, ...] = tuple(keys)
        self.dirs = tuple(dirs)

    @classmethod
    def load(cls, dirs: Sequence[str] = DEFAULT_TRUST_DIRS,
             euid: Optional[int] = None) -> "TrustStore":
        """Read every trust file of ``dirs`` (earlier directories win); TrustError if unsafe."""
        euid = os.geteuid() if euid is None else euid
        chosen: Dict[str, Tuple[str, Optional[bytes]]] = {}
        for directory in dirs:
            for name, data in _read_directory(directory, euid):
                chosen.setdefault(name, (directory, data))
        keys = [_parse_trust_file(data, os.path.join(directory, name))
                for name, (directory, data) in sorted(chosen.items()) if data]
        return cls(keys, dirs)

    def key_for(self, wanted_id: str, name: str) -> TrustedKey:
        """The trusted key ``wanted_id`` if it may sign ``name``; TrustError otherwise."""
        matching = [key for key in self.keys if key.key_id == wanted_id]
        if not matching:
            where = ", ".join(self.dirs) or "the trust store"
            raise TrustError(f"key {wanted_id} is not trusted (no trust file in {where}"
                             " holds it)")
        for key in matching:
            if key.may_sign(name):
                return key
        scopes = ", ".join(f"{key.source}: {' '.join(key.names)}" for key in matching)
        raise TrustError(f"key {wanted_id} may not sign extension '{name}' ({scopes})")


def check_counter(name: str, counter: int, installed_counter: Optional[int]) -> None:
    """Refuse ``counter`` unless it is above the installed one (None: nothing installed)."""
    if installed_counter is not None and counter <= installed_counter:
        raise RollbackError(f"extension '{name}': counter {counter} is not above the"
                            f" installed counter {installed_counter} (a replay or a"
                            " downgrade)")


# -- reading the directories -------------------------------------------------------------


def _read_directory(directory: str, euid: int) -> List[Tuple[str, bytes]]:
    """(file name, contents) of every trust file of ``directory``, after the safety checks."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise TrustError(f"trust directory {directory}: {error.strerror}") from None
    try:
        _check_secure(directory, os.fstat(fd), euid)
        _check_ancestors(directory, euid)
        files = []
        for name in sorted(os.listdir(fd)):
            if name.startswith(".") or not name.endswith(TRUST_SUFFIX):
                continue
            files.append((name, _read_trust_file(fd, name, os.path.join(directory, name),
                                                 euid)))
        return files
    finally:
        os.close(fd)


def _read_trust_file(dir_fd: int, name: str, path: str, euid: int) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise TrustError(f"trust file {path} is a symbolic link") from None
        raise TrustError(f"trust file {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TrustError(f"trust file {path} is not a regular file")
        _check_secure(path, info, euid)
        data = os.read(fd, MAX_TRUST_FILE_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TRUST_FILE_SIZE:
        raise TrustError(f"trust file {path} is over {MAX_TRUST_FILE_SIZE} bytes")
    return data


def _allowed_owners(euid: int) -> Tuple[int, ...]:
    return (0,) if euid == 0 else (0, euid)


def _check_secure(path: str, info: os.stat_result, euid: int) -> None:
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TrustError(f"{path} is writable by group or others (mode"
                         f" {stat.S_IMODE(info.st_mode):04o}); refusing to trust it")
    if info.st_uid not in _allowed_owners(euid):
        owner = "root" if euid == 0 else f"root or uid {euid}"
        raise TrustError(f"{path} is owned by uid {info.st_uid}, not {owner};"
                         " refusing to trust it")


def _check_ancestors(directory: str, euid: int) -> None:
    """No one else may replace the directory: each parent is ours and safe, or sticky."""
    path = os.path.dirname(os.path.realpath(directory))
    while True:
        info = os.stat(path)
        writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = info.st_mode & stat.S_ISVTX
        if info.st_uid not in _allowed_owners(euid) or (writable and not sticky):
            raise TrustError(f"{path}, above trust directory {directory}, could let someone"
                             " else replace it (owner or permissions); refusing to trust it")
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _parse_trust_file(data: bytes, path: str) -> TrustedKey:
    try:
        value: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise TrustError(f"trust file {path} is not valid JSON: {error}") from None
    if not isinstance(value, dict) or not {"key", "names"} <= set(value) <= _MEMBERS:
        raise TrustError(f"trust file {path} must be an object with 'key', 'names' and"
                         " optionally 'comment'")
    try:
        public_key = decode_public_key(value["key"])
    except ValueError as error:
        raise TrustError(f"trust file {path}: {error}") from None
    names = value["names"]
    if (not isinstance(names, list) or not names
            or not all(isinstance(item, str) and re.fullmatch(NAME_PATTERN_RE, item)
                       for item in names)):
        raise TrustError(f"trust file {path}: 'names' must be a non-empty list of extension"
                         " names or patterns (a-z 0-9 _ - and the wildcards * ?)")
    if not isinstance(value.get("comment", ""), str):
        raise TrustError(f"trust file {path}: 'comment' must be a string")
    return TrustedKey(key_id(public_key), public_key, tuple(names), path)


def trust_file(public_key: bytes, names: Sequence[str], comment: str = "") -> bytes:
    """The contents of a trust file for ``public_key`` scoped to ``names``."""
    from qga.ext.statement import encode_public_key

    value: Dict[str, Any] = {"key": encode_public_key(public_key), "names": list(names)}
    if comment:
        value["comment"] = comment
    for name in names:
        if not re.fullmatch(NAME_PATTERN_RE, name):
            raise TrustError(f"{name!r} is not an extension name or pattern")
    return (json.dumps(value, indent=2) + "\n").encode()
