"""``qga-bundle``: make keys, build, sign, verify and inspect extension bundles.

::

    qga-bundle keygen PREFIX --names hello,hello-*   # PREFIX.key (private), PREFIX.json (trust)
    qga-bundle build DIR [-o OUT] [--with-sdk]        # DIR/manifest.json + files -> NAME-VERSION.qgb
    qga-bundle sign BUNDLE --key PREFIX.key [--counter N]   # BUNDLE.statement, BUNDLE.sig
    qga-bundle verify BUNDLE [--trust-dir DIR]... [--installed-counter N] [--allow-unsigned]
    qga-bundle inspect BUNDLE [--json]

``PREFIX.json`` is what the guest admin puts in ``/etc/qga/trust.d/``.
``verify`` runs exactly the guest's checks (:func:`qga.ext.verify.verify_bundle`)
against the given trust directories (by default the guest's own).
Exit status: 0 on success, 1 when something is refused or fails, 2 for a
bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

from qga.errors import QgaError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except QgaError as error:
        print(f"qga-bundle: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        print(f"qga-bundle: error:{where}: {error.strerror or error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qga-bundle",
                                     description="Build, sign and verify qga extension bundles.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keygen = commands.add_parser("keygen", help="make an Ed25519 signing key and its trust file")
    keygen.add_argument("prefix", metavar="PREFIX",
                        help="writes PREFIX.key (private, 0600) and PREFIX.json (trust file)")
    keygen.add_argument("--names", required=True,
                        help="comma-separated extension names or patterns (* ?) the key may sign")
    keygen.add_argument("--comment", default="", help="a comment for the trust file")
    keygen.set_defaults(run=run_keygen)

    build = commands.add_parser("build", help="build a bundle from a directory")
    build.add_argument("directory", metavar="DIR", help="holds manifest.json and the files")
    build.add_argument("-o", "--output", help="the bundle to write (default NAME-VERSION.qgb)")
    build.add_argument("--no-compress", action="store_true",
                       help="write a plain tar instead of a gzip-compressed one")
    build.add_argument("--with-sdk", action="store_true",
                       help="add a copy of the extension SDK as qga_ext_sdk.py, so the bundle"
                            " runs on any guest python3 without the core's package")
    build.set_defaults(run=run_build)

    sign = commands.add_parser("sign", help="write the statement and signature of a bundle")
    sign.add_argument("bundle", metavar="BUNDLE")
    sign.add_argument("--key", required=True, help="the private key (PREFIX.key)")
    sign.add_argument("--counter", type=_positive, default=None,
                      help="the release counter, above every earlier one (default: Unix time)")
    _detached_options(sign)
    sign.set_defaults(run=run_sign)

    verify = commands.add_parser("verify", help="verify a bundle as the guest does")
    verify.add_argument("bundle", metavar="BUNDLE")
    verify.add_argument("--trust-dir", action="append", dest="trust_dirs", metavar="DIR",
                        help="a trust directory (repeatable; default: the guest's)")
    verify.add_argument("--installed-counter", type=_positive, default=None,
                        help="the counter of the installed version, for the rollback check")
    verify.add_argument("--allow-unsigned", action="store_true",
                        help="accept a bundle without signature (allow-unsigned-extensions)")
    _detached_options(verify)
    verify.set_defaults(run=run_verify)

    inspect = commands.add_parser("inspect", help="show a bundle's manifest and statement")
    inspect.add_argument("bundle", metavar="BUNDLE")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.set_defaults(run=run_inspect)
    return parser


def _detached_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--statement", help="the statement file (default BUNDLE.statement)")
    parser.add_argument("--signature", help="the signature file (default BUNDLE.sig)")


def _positive(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive")
    return value


# -- commands ----------------------------------------------------------------------------


def run_keygen(args: argparse.Namespace) -> int:
    from qga.ext import statement
    from qga.ext.trust import trust_file

    names = [name for name in args.names.split(",") if name]
    key = statement.generate_private_key()
    public = statement.public_raw(key)
    trust = trust_file(public, names, args.comment)
    for path in (args.prefix + ".key", args.prefix + ".json"):
        if os.path.lexists(path):
            raise FileExistsError(17, "it exists already; not overwriting a key", path)
    _write_new(args.prefix + ".key", statement.private_key_pem(key), 0o600)
    _write_new(args.prefix + ".json", trust, 0o644)
    print(f"key {statement.key_id(public)}: private key {args.prefix}.key,"
          f" trust file {args.prefix}.json (may sign: {' '.join(names)})")
    return 0


SDK_COPY_NAME = "qga_ext_sdk.py"


def run_build(args: argparse.Namespace) -> int:
    import tempfile

    from qga.ext.bundle import build_bundle, sha256_of

    with tempfile.TemporaryDirectory(prefix="qga-bundle-") as staging:
        source = _staged_with_sdk(args.directory, staging) if args.with_sdk else args.directory
        output = args.output
        if output is None:
            # The name comes from the manifest: build into a temporary name first.
            temporary = os.path.join(os.getcwd(), f".qga-bundle-{os.getpid()}.qgb")
            manifest = build_bundle(source, temporary, compress=not args.no_compress)
            output = f"{manifest.name}-{manifest.version}.qgb"
            os.rename(temporary, output)
        else:
            manifest = build_bundle(source, output, compress=not args.no_compress)
    print(f"{output}: {manifest.name} {manifest.version}, {len(manifest.files)} files,"
          f" sha256 {sha256_of(output)}")
    return 0


def _staged_with_sdk(directory: str, staging: str) -> str:
    """A copy of ``directory`` with the SDK beside the extension's files."""
    import shutil

    from qga.ext import sdk

    copy = os.path.join(staging, "source")
    shutil.copytree(directory, copy, symlinks=True)  # links stay links: the build refuses them
    target = os.path.join(copy, SDK_COPY_NAME)
    if os.path.lexists(target):
        from qga.errors import BundleError

        raise BundleError(f"{directory} already has a {SDK_COPY_NAME}: build it without --with-sdk")
    shutil.copyfile(sdk.__file__, target)
    return copy


def run_sign(args: argparse.Namespace) -> int:
    from qga.ext import statement
    from qga.ext.bundle import check_archive, sha256_of
    from qga.state import atomic_write

    with open(args.key, "rb") as stream:
        key = statement.load_private_key(stream.read(64 * 1024))
    manifest = check_archive(args.bundle)
    counter = args.counter if args.counter is not None else int(time.time())
    stated = statement.Statement(
        name=manifest.name, version=manifest.version, counter=counter,
        archive_sha256=sha256_of(args.bundle), archive_size=os.stat(args.bundle).st_size,
        key_id=statement.key_id(statement.public_raw(key)))
    data = stated.encode()
    statement_path, signature_path = _detached_paths(args)
    atomic_write(statement_path, data, 0o644)
    atomic_write(signature_path, statement.sign(data, key), 0o644)
    print(f"{args.bundle}: signed {manifest.name} {manifest.version}, counter {counter},"
          f" key {stated.key_id} -> {statement_path}, {signature_path}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from qga.ext.trust import DEFAULT_TRUST_DIRS, TrustStore
    from qga.ext.verify import read_limited, verify_bundle
    from qga.ext.statement import MAX_STATEMENT_SIZE, SIGNATURE_SIZE

    statement_path, signature_path = _detached_paths(args)
    statement = read_limited(statement_path, MAX_STATEMENT_SIZE)
    signature = read_limited(signature_path, SIGNATURE_SIZE)
    trust = TrustStore.load(args.trust_dirs or DEFAULT_TRUST_DIRS)
    verified = verify_bundle(args.bundle, statement, signature, trust,
                             installed_counter=args.installed_counter,
                             allow_unsigned=args.allow_unsigned)
    manifest = verified.manifest
    if verified.key is not None:
        how = f"counter {verified.counter}, signed by key {verified.key.key_id}" \
              f" ({verified.key.source})"
    else:
        how = "UNSIGNED"
    print(f"{args.bundle}: OK: {manifest.name} {manifest.version}, {how}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from qga.ext.bundle import check_archive, sha256_of
    from qga.ext.statement import MAX_STATEMENT_SIZE, parse_statement
    from qga.ext.verify import read_limited

    manifest = check_archive(args.bundle)
    if args.json:
        sys.stdout.write(json.dumps(manifest.value, indent=2, sort_keys=True) + "\n")
        return 0
    lines: List[str] = [
        f"bundle:       {args.bundle} ({os.stat(args.bundle).st_size} bytes,"
        f" sha256 {sha256_of(args.bundle)})",
        f"extension:    {manifest.name} {manifest.version}",
    ]
    if manifest.description:
        lines.append(f"description:  {manifest.description}")
    core = f">= {manifest.core_min}" + (f", < {manifest.core_below}" if manifest.core_below
                                        else "")
    entry = manifest.entry_point
    lines += [
        f"core:         {core}",
        f"entry point:  {entry.interpreter} {' '.join((entry.path,) + entry.args)}",
        f"mode:         {manifest.mode}" + (f" (ports: {', '.join(manifest.ports)})"
                                            if manifest.ports else ""),
        f"capabilities: {', '.join(sorted(manifest.capabilities)) or '-'}",
        "limits:       " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.limits.items())),
        f"ready within: {manifest.ready_timeout} s",
        f"commands:     {', '.join(sorted(manifest.commands)) or '-'}",
        f"events:       {', '.join(sorted(manifest.events)) or '-'}",
        f"files:        {len(manifest.files)}, {manifest.total_size} bytes",
    ]
    lines += [f"  {entry.mode:04o} {entry.size:>10} {entry.sha256[:16]}  {entry.path}"
              for entry in manifest.files]
    statement_data = read_limited(args.bundle + ".statement", MAX_STATEMENT_SIZE)
    if statement_data is None:
        lines.append("statement:    none")
    else:
        stated = parse_statement(statement_data)
        lines.append(f"statement:    counter {stated.counter}, key {stated.key_id}"
                     " (not verified: use 'qga-bundle verify')")
    print("\n".join(lines))
    return 0


def _detached_paths(args: argparse.Namespace):
    from qga.ext.statement import SIGNATURE_SUFFIX, STATEMENT_SUFFIX

    return (args.statement or args.bundle + STATEMENT_SUFFIX,
            args.signature or args.bundle + SIGNATURE_SUFFIX)


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` (never replacing a file: a key is not overwritten by mistake)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
