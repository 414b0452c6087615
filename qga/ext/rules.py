"""What a bundle may contain: size limits and the rules for paths inside it.

One set of rules serves both the manifest's ``files`` list and the archive's
entries, so the two can only agree on paths that are safe.  A path is
*refused*, never repaired: no stripping of a leading ``/``, no collapsing of
``a//b``, no normalisation.

A path inside a bundle is UTF-8 text of at most 255 bytes (ustar's limit)
and 16 components, split on ``/``, where

* it is not empty, and does not start with ``/`` (absolute);
* no component is empty (``a//b``, a trailing ``/``), ``.`` or ``..``;
* there is no backslash (a separator elsewhere, a trick here);
* there is no character of Unicode category C (controls such as NUL, TAB,
  newline; invisible format characters such as bidi overrides; private use;
  unassigned) and no line or paragraph separator (U+2028, U+2029).

Two different paths that *fold* to the same key are duplicates, refused like
exact duplicates.  The key is NFKC, then case folding, then NFKC again
(Unicode's NFKC_Casefold, as near as :mod:`unicodedata` gets): so ``A`` and
``a``, ``e`` + combining acute and ``é`` (an NFC difference), and the
ligature ``ﬁ`` and ``fi`` (an NFKC difference) all collide.  That makes a
bundle safe to unpack on case-insensitive or normalising filesystems and
keeps look-alike names from hiding one another in listings.
"""

from __future__ import annotations

import unicodedata
from typing import NamedTuple, Union

from qga.errors import BundleError
from qga.ext.ustar import BLOCK, Caps, display

MANIFEST_NAME = "manifest.json"

MiB = 1024 * 1024


class Limits(NamedTuple):
    """Caps a bundle must stay within; ``Limits()`` are the defaults.

    They bound what reading a hostile archive can cost: a file count, a
    per-file and a total size, the manifest's size, and the compression
    ratio (counted while decompressing; the first ``ratio_allowance`` bytes
    are free, since a small bundle of text compresses very well).
    """

    max_files: int = 2048
    max_file_size: int = 64 * MiB
    max_total_size: int = 256 * MiB
    max_manifest_size: int = 1 * MiB  # room for max_files entries and the schemas
    max_ratio: int = 200
    ratio_allowance: int = 4 * MiB
    max_path_bytes: int = 255
    max_depth: int = 16

    @property
    def max_entries(self) -> int:
        """Archive entries allowed: the manifest, the files and as many directories."""
        return 2 * self.max_files + 1

    def caps(self) -> Caps:
        """What reading the archive may cost, derived from the limits above."""
        overhead = (self.max_entries + 1) * 2 * BLOCK + 20 * BLOCK  # headers, padding, record
        tar_size = self.max_total_size + self.max_manifest_size + overhead
        # deflate can expand incompressible data by a fraction of a percent.
        compressed_size = tar_size + tar_size // 100 + 64 * 1024
        return Caps(max_input=compressed_size, max_output=tar_size,
                    max_ratio=self.max_ratio, ratio_allowance=self.ratio_allowance)

    @property
    def max_archive_size(self) -> int:
        """The largest archive file worth reading (the upload cap for the install pipeline)."""
        return self.caps().max_input


def check_path(path: Union[bytes, str], what: str, limits: Limits = Limits()) -> str:
    """``path`` as text if it obeys the rules; :class:`BundleError` naming it otherwise."""
    if isinstance(path, bytes):
        raw = path
        try:
            text = path.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"{what} '{display(path)}': the path is not UTF-8") from None
    else:
        text = path
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:
            raise BundleError(f"{what} {text!r}: the path is not valid Unicode") from None
    reason = _path_problem(text, len(raw), limits)
    if reason:
        raise BundleError(f"{what} '{display(raw)}': {reason}")
    return text


def _path_problem(text: str, size: int, limits: Limits) -> str:
    if not text:
        return "an empty path"
    if text.startswith("/"):
        return "an absolute path"
    if "\\" in text:
        return "a backslash in the path"
    for char in text:
        if unicodedata.category(char).startswith("C") or char in "\u2028\u2029":
            return f"a control or invisible character (U+{ord(char):04X}) in the path"
    components = text.split("/")
    if ".." in components:
        return "a '..' component"
    if "." in components:
        return "a '.' component"
    if "" in components:
        return "an empty component (a '//' or a trailing '/')"
    if size > limits.max_path_bytes:
        return f"longer than {limits.max_path_bytes} bytes"
    if len(components) > limits.max_depth:
        return f"deeper than {limits.max_depth} components"
    return ""


def fold(path: str) -> str:
    """The key two paths collide on (NFKC, case folded, NFKC again)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", path).casefold())


def parents(path: str):
    """The directories above ``path``, outermost first: ``a/b/c`` gives ``a``, ``a/b``."""
    components = path.split("/")
    return ["/".join(components[:depth]) for depth in range(1, len(components))]


class PathSet:
    """Paths seen so far, files and directories, refusing duplicates and folded duplicates.

    A directory may be seen many times (every file below it implies it); a
    file only once; a path may not be both; and no two distinct paths may
    fold to the same key.
    """

    def __init__(self, what: str):
        self._what = what
        self._by_key = {}   # fold key -> [exact path, is a directory, was an entry itself]

    def add_file(self, path: str) -> None:
        for parent in parents(path):
            self._add(parent, directory=True, explicit=False)
        self._add(path, directory=False, explicit=True)

    def add_directory(self, path: str) -> None:
        for parent in parents(path):
            self._add(parent, directory=True, explicit=False)
        self._add(path, directory=True, explicit=True)

    def is_directory(self, path: str) -> bool:
        seen = self._by_key.get(fold(path))
        return seen is not None and seen[0] == path and seen[1]

    def _add(self, path: str, directory: bool, explicit: bool) -> None:
        key = fold(path)
        seen = self._by_key.get(key)
        if seen is None:
            self._by_key[key] = [path, directory, explicit]
            return
        seen_path, seen_directory, seen_explicit = seen
        where = f"{self._what} '{display(path.encode())}'"
        if seen_path != path:
            raise BundleError(f"{where} collides with '{display(seen_path.encode())}'"
                              " (the same name after case and Unicode NFKC folding)")
        if directory != seen_directory:
            raise BundleError(f"{where} is both a file and a directory")
        if explicit and seen_explicit:
            raise BundleError(f"{where} appears twice")
        seen[2] = seen_explicit or explicit
