"""The detached statement of a bundle, and its Ed25519 signature.

A signer does not sign the archive directly but a short *statement* about
it, so the guest can check trust, scope and counter before touching a byte
of the archive, and the archive's identity is a hash::

    {"archive-sha256":"<64 hex>","archive-size":12345,"counter":1700000000,
     "format":"qga-bundle-statement/1","key-id":"<32 hex>","name":"hello",
     "version":"1.0.0"}

The statement's bytes are *canonical JSON*: exactly those seven members,
keys sorted, no white space, ASCII only, integers in decimal, no trailing
newline.  A reader parses them and re-encodes the result; anything but the
same bytes is refused, so one statement has one byte form and the signature
covers exactly what is checked.  ``counter`` is a positive integer that
grows with every release of the extension (``qga-bundle sign`` defaults to
the Unix time); the guest refuses a counter not above the installed one.
``key-id`` is the first 16 bytes of the SHA-256 of the raw 32-byte public
key, in hex.

Files beside ``NAME-VERSION.qgb``: ``.statement`` (the statement's bytes)
and ``.sig`` (the raw 64-byte Ed25519 signature over those bytes).
Private keys are PKCS#8 PEM; public keys are written ``ed25519:<base64 of
the raw 32 bytes>`` (see :mod:`qga.ext.trust`).

``cryptography`` is imported on first use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any, Dict, NamedTuple

from qga.errors import SignatureError
from qga.ext.manifest import NAME_PATTERN, VERSION_PATTERN

FORMAT = "qga-bundle-statement/1"
STATEMENT_SUFFIX = ".statement"
SIGNATURE_SUFFIX = ".sig"
MAX_STATEMENT_SIZE = 4096
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
PUBLIC_KEY_PREFIX = "ed25519:"
MAX_INTEGER = 2 ** 63 - 1

_KEYS = ("archive-sha256", "archive-size", "counter", "format", "key-id", "name", "version")


class Statement(NamedTuple):
    """What a signer states about one archive."""

    name: str
    version: str
    counter: int
    archive_sha256: str
    archive_size: int
    key_id: str

    def encode(self) -> bytes:
        """The canonical bytes (what is signed)."""
        return canonical_json({
            "archive-sha256": self.archive_sha256,
            "archive-size": self.archive_size,
            "counter": self.counter,
            "format": FORMAT,
            "key-id": self.key_id,
            "name": self.name,
            "version": self.version,
        })


def canonical_json(value: Dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False).encode("ascii")


def parse_statement(data: bytes) -> Statement:
    """The statement in ``data``; :class:`SignatureError` unless it is well formed and canonical."""
    if len(data) > MAX_STATEMENT_SIZE:
        raise SignatureError(f"the statement is {len(data)} bytes, over the"
                             f" {MAX_STATEMENT_SIZE}-byte limit")
    try:
        value = json.loads(data.decode("ascii"), object_pairs_hook=_pairs,
                           parse_constant=_refuse)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SignatureError(f"the statement is not valid JSON: {error}") from None
    if not isinstance(value, dict) or sorted(value) != sorted(_KEYS):
        raise SignatureError("the statement must have exactly the members "
                             + ", ".join(_KEYS))
    if value["format"] != FORMAT:
        raise SignatureError(f"the statement's format is {value['format']!r},"
                             f" not {FORMAT!r}")
    _expect(value, "name", str, NAME_PATTERN)
    _expect(value, "version", str, VERSION_PATTERN)
    _expect(value, "archive-sha256", str, r"^[0-9a-f]{64}$")
    _expect(value, "key-id", str, r"^[0-9a-f]{32}$")
    _expect(value, "counter", int, "")
    _expect(value, "archive-size", int, "")
    if not 1 <= value["counter"] <= MAX_INTEGER:
        raise SignatureError("the statement's counter must be between 1 and 2^63-1")
    if not 0 <= value["archive-size"] <= MAX_INTEGER:
        raise SignatureError("the statement's archive-size is out of range")
    statement = Statement(value["name"], value["version"], value["counter"],
                          value["archive-sha256"], value["archive-size"], value["key-id"])
    if statement.encode() != data:
        raise SignatureError("the statement is not in canonical form")
    return statement


def _pairs(pairs):
    result = {}
    for key, item in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = item
    return result


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _expect(value: Dict[str, Any], key: str, kind: type, pattern: str) -> None:
    item = value[key]
    if not isinstance(item, kind) or isinstance(item, bool):
        raise SignatureError(f"the statement's {key} is not a {kind.__name__}")
    if pattern and not re.fullmatch(pattern[1:-1], item):
        raise SignatureError(f"the statement's {key} {item!r} is not allowed")


# -- keys and signatures ----------------------------------------------------------------


def key_id(public_raw: bytes) -> str:
    """The id of a public key: 16 bytes of the SHA-256 of its raw form, in hex."""
    return hashlib.sha256(public_raw).hexdigest()[:32]


def encode_public_key(public_raw: bytes) -> str:
    return PUBLIC_KEY_PREFIX + base64.b64encode(public_raw).decode("ascii")


def decode_public_key(text: str) -> bytes:
    """The raw 32 bytes of ``ed25519:<base64>``; ValueError if it is not that."""
    if not isinstance(text, str) or not text.startswith(PUBLIC_KEY_PREFIX):
        raise ValueError(f"a public key is written '{PUBLIC_KEY_PREFIX}<base64>'")
    try:
        raw = base64.b64decode(text[len(PUBLIC_KEY_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the public key is not valid base64") from None
    if len(raw) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, not {len(raw)}")
    return raw


def generate_private_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def private_key_pem(private_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def load_private_key(data: bytes) -> Any:
    """An Ed25519 private key from PKCS#8 PEM; SignatureError for anything else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise SignatureError(f"not a usable private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("the private key is not an Ed25519 key")
    return key


def public_raw(private_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                 serialization.PublicFormat.Raw)


def sign(statement: bytes, private_key: Any) -> bytes:
    return private_key.sign(statement)


def verify_signature(statement: bytes, signature: bytes, public_key_raw: bytes) -> None:
    """Check an Ed25519 signature over the statement's exact bytes; SignatureError if bad."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(signature) != SIGNATURE_SIZE:
        raise SignatureError(f"the signature is {len(signature)} bytes; an Ed25519"
                             f" signature is {SIGNATURE_SIZE}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, statement)
    except InvalidSignature:
        raise SignatureError("the signature does not match the statement") from None
