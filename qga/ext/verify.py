"""From an archive, a statement and a signature to a verified bundle, and then to disk.

:func:`verify_bundle` runs the checks in the order of the install pipeline,
cheapest and most decisive first, and stops at the first failure:

1. a signature is required unless the admin set ``allow-unsigned-extensions``
   (then an unsigned bundle is accepted with a warning in the log; a
   signature that *is* present must still verify);
2. the statement is well formed and canonical (:mod:`qga.ext.statement`);
3. the statement's key is trusted and its scope covers the extension's
   name (:mod:`qga.ext.trust`), and the signature over the statement's
   exact bytes verifies with it;
4. the counter is above the installed one (anti-rollback);
5. the archive's size and SHA-256 are the statement's;
6. the whole archive passes :func:`qga.ext.bundle.check_archive`;
7. the manifest's name and version are the statement's, and the manifest
   accepts this core's version.

Each failure is an :class:`~qga.errors.ExtensionError` whose message says
what was refused and why.  :func:`extract_bundle` then unpacks the verified
bundle into a fresh directory; it checks every byte again against the
verified manifest, so an archive changed after verification fails there
instead of unpacking something unverified.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import BinaryIO, NamedTuple, Optional, Tuple

import qga
from qga.errors import BundleError, SignatureError
from qga.ext import bundle
from qga.ext.manifest import Manifest
from qga.ext.rules import Limits
from qga.ext.statement import (
    MAX_STATEMENT_SIZE, SIGNATURE_SIZE, SIGNATURE_SUFFIX, STATEMENT_SUFFIX, Statement,
    parse_statement, verify_signature,
)
from qga.ext.trust import TrustedKey, TrustStore, check_counter

log = logging.getLogger(__name__)


class VerifiedBundle(NamedTuple):
    """What verification established about a bundle."""

    manifest: Manifest
    statement: Optional[Statement]   # None: unsigned, without a statement
    key: Optional[TrustedKey]        # None: not signed
    archive_sha256: str
    archive_size: int

    @property
    def signed(self) -> bool:
        return self.key is not None

    @property
    def counter(self) -> Optional[int]:
        return None if self.statement is None else self.statement.counter


def verify_bundle(archive: bundle.PathOrFile, statement: Optional[bytes],
                  signature: Optional[bytes], trust: TrustStore, *,
                  installed_counter: Optional[int] = None, allow_unsigned: bool = False,
                  core_version: str = qga.__version__,
                  limits: Limits = Limits()) -> VerifiedBundle:
    """Verify a bundle; ``installed_counter`` is the store's counter for the same name."""
    parsed, key = _check_signature(statement, signature, trust, allow_unsigned)
    if parsed is not None:
        check_counter(parsed.name, parsed.counter, installed_counter)
    with bundle.open_archive(archive) as source:
        size, digest = _measure(source, limits)
        if parsed is not None:
            if size != parsed.archive_size:
                raise BundleError(f"the archive is {size} bytes; the statement says"
                                  f" {parsed.archive_size} (truncated or altered)")
            if digest != parsed.archive_sha256:
                raise BundleError("the archive's SHA-256 differs from the statement's"
                                  " (altered or corrupt)")
        manifest = bundle.check_archive(source, limits)
    _check_manifest(manifest, parsed, core_version)
    if key is None:
        log.warning("accepting unsigned extension bundle '%s' %s: allow-unsigned-extensions"
                    " is set", manifest.name, manifest.version)
    return VerifiedBundle(manifest, parsed, key, digest, size)


def _check_signature(statement: Optional[bytes], signature: Optional[bytes],
                     trust: TrustStore, allow_unsigned: bool
                     ) -> Tuple[Optional[Statement], Optional[TrustedKey]]:
    if signature is None:
        if not allow_unsigned:
            raise SignatureError("the bundle is not signed, and unsigned extensions are"
                                 " not allowed (allow-unsigned-extensions)")
        return (None if statement is None else parse_statement(statement)), None
    if statement is None:
        raise SignatureError("a signature without its statement")
    parsed = parse_statement(statement)
    key = trust.key_for(parsed.key_id, parsed.name)
    verify_signature(statement, signature, key.public_key)
    return parsed, key


def _measure(source: BinaryIO, limits: Limits) -> Tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    source.seek(0)
    while True:
        chunk = source.read(64 * 1024)
        if not chunk:
            return size, digest.hexdigest()
        size += len(chunk)
        if size > limits.max_archive_size:
            raise BundleError(f"the archive is larger than {limits.max_archive_size} bytes")
        digest.update(chunk)


def _check_manifest(manifest: Manifest, statement: Optional[Statement],
                    core_version: str) -> None:
    if statement is not None and (manifest.name, manifest.version) != (statement.name,
                                                                       statement.version):
        raise BundleError(f"the manifest is for '{manifest.name}' {manifest.version}; the"
                          f" statement for '{statement.name}' {statement.version}")
    if not manifest.supports_core(core_version):
        wanted = f">= {manifest.core_min}"
        if manifest.core_below:
            wanted += f", < {manifest.core_below}"
        raise BundleError(f"extension '{manifest.name}' needs qga core {wanted}; this is"
                          f" {core_version}")


def extract_bundle(verified: VerifiedBundle, archive: bundle.PathOrFile, parent: str,
                   name: str, limits: Limits = Limits()) -> str:
    """Unpack a verified bundle into the new directory ``parent/name``; return its path."""
    return bundle.extract_archive(archive, verified.manifest, parent, name, limits)


def read_detached(archive_path: str) -> Tuple[Optional[bytes], Optional[bytes]]:
    """The ``.statement`` and ``.sig`` files beside an archive (None where absent)."""
    return (read_limited(archive_path + STATEMENT_SUFFIX, MAX_STATEMENT_SIZE),
            read_limited(archive_path + SIGNATURE_SUFFIX, SIGNATURE_SIZE))


def read_limited(path: str, limit: int) -> Optional[bytes]:
    """A small file's bytes, None if it does not exist; SignatureError if over ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SignatureError(f"cannot read {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise SignatureError(f"{path} is larger than {limit} bytes")
    return data
