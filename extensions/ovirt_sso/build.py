"""Build (and sign) the oVirt guest agent extension bundle with ``qga-bundle``.

::

    python3 extensions/ovirt_sso/build.py --key PREFIX.key [--counter N] [-o OUT.qgb]
    python3 extensions/ovirt_sso/build.py --unsigned -o OUT.qgb

The bundle holds ``manifest.json``, ``main.py``, the ``ovirt_agent``
package, ``sso.py`` when it is there, and ``qga_ext_sdk.py``, a copy of
:mod:`qga.ext.sdk`, so the extension runs whatever Python path the guest's
interpreter has.  The files are staged in a temporary directory (only those
listed here: no caches, no build script), then ``qga-bundle build`` and
``qga-bundle sign`` run on it.  The output defaults to
``ovirt-guest-agent-<version>.qgb`` in the current directory; the statement
and signature land beside it (``.statement``, ``.sig``).

``qga-bundle`` is run as ``python3 -m qga.ext.cli`` of the qga tree this
script lives in, so a checkout needs no installation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SDK = os.path.join(ROOT, "qga", "ext", "sdk.py")

#: The bundle's files: path in the bundle -> path in the tree (None: optional).
REQUIRED = ["manifest.json", "main.py"]
OPTIONAL = ["sso.py"]
PACKAGE = "ovirt_agent"


def bundle_files() -> List[tuple]:
    """(path in the bundle, source path) of everything the bundle holds."""
    files = [(name, os.path.join(HERE, name)) for name in REQUIRED]
    files += [(name, os.path.join(HERE, name)) for name in OPTIONAL
              if os.path.isfile(os.path.join(HERE, name))]
    package = os.path.join(HERE, PACKAGE)
    files += [(f"{PACKAGE}/{name}", os.path.join(package, name))
              for name in sorted(os.listdir(package)) if name.endswith(".py")]
    files.append(("qga_ext_sdk.py", SDK))
    return files


def stage(directory: str) -> None:
    for target, source in bundle_files():
        path = os.path.join(directory, target)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(source, path)
        os.chmod(path, 0o644)


def qga_bundle(*arguments: str) -> None:
    environ = dict(os.environ)
    environ["PYTHONPATH"] = ROOT + (os.pathsep + environ["PYTHONPATH"]
                                    if environ.get("PYTHONPATH") else "")
    subprocess.run([sys.executable, "-m", "qga.ext.cli", *arguments], env=environ, check=True)


def build(output: Optional[str], key: Optional[str], counter: Optional[int]) -> str:
    with open(os.path.join(HERE, "manifest.json"), encoding="utf-8") as stream:
        manifest = json.load(stream)
    output = os.path.abspath(output or f"{manifest['name']}-{manifest['version']}.qgb")
    with tempfile.TemporaryDirectory(prefix="ovirt-bundle-") as directory:
        stage(directory)
        qga_bundle("build", directory, "-o", output)
    if key is not None:
        arguments = ["sign", output, "--key", key]
        if counter is not None:
            arguments += ["--counter", str(counter)]
        qga_bundle(*arguments)
    return output


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the oVirt guest agent bundle.")
    parser.add_argument("-o", "--output", help="the bundle (default NAME-VERSION.qgb)")
    signing = parser.add_mutually_exclusive_group(required=True)
    signing.add_argument("--key", help="sign with this private key (qga-bundle keygen)")
    signing.add_argument("--unsigned", action="store_true", help="do not sign")
    parser.add_argument("--counter", type=int, help="the release counter (default: Unix time)")
    args = parser.parse_args(argv)
    try:
        build(args.output, args.key, args.counter)
    except subprocess.CalledProcessError as error:
        return error.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
