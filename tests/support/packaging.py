"""Build qga's wheel and install the project the way packagers do, for the tests.

Everything goes through the repository's ``Makefile`` (``make wheel``,
``make install``) into temporary directories, so the tests check what
packagers run and the working tree gets no build output.

Building needs setuptools (>= 61) and wheel for some interpreter: Debian's
``/usr/bin/python3`` with python3-setuptools and python3-wheel builds
offline; otherwise the test interpreter's pip builds in an isolated
environment (fetching setuptools from the package index).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tests.support.agents import REPO

DEBIAN_PYTHON = "/usr/bin/python3"


def can_build_offline(python: str) -> bool:
    """``python`` has pip, setuptools >= 61 and wheel."""
    probe = ("import setuptools, wheel, pip; "
             "raise SystemExit(int(setuptools.__version__.split('.')[0]) < 61)")
    try:
        return subprocess.run([python, "-c", probe], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=60).returncode == 0
    except OSError:
        return False


def builder() -> Tuple[str, Dict[str, str]]:
    """The interpreter that builds the wheel and the make variables it needs."""
    for python in (DEBIAN_PYTHON, sys.executable):
        if os.access(python, os.X_OK) and can_build_offline(python):
            return python, {"PYTHON": python}
    return sys.executable, {"PYTHON": sys.executable, "PIP_WHEEL_FLAGS": ""}


def make(targets: List[str], variables: Dict[str, str], timeout: float = 300) -> str:
    if shutil.which("make") is None:
        raise RuntimeError("make is not installed")
    argv = ["make", "-s", "-C", str(REPO)] + targets + [f"{k}={v}" for k, v in variables.items()]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=timeout)
    output = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{output[-4000:]}")
    return output


def build_wheel(build_dir: Path) -> Path:
    """``make wheel`` into ``build_dir``; the path of the wheel."""
    python, variables = builder()
    make(["wheel"], dict(variables, BUILDDIR=str(build_dir)))
    wheels = sorted((build_dir / "wheel").glob("qga-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {build_dir / 'wheel'}, found {wheels}")
    return wheels[0]


def unpack_wheel(wheel: Path, target: Path) -> Path:
    """Install a pure-Python wheel by unzipping it (what pip does, minus scripts)."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def site_dir(root: Path) -> Optional[Path]:
    """The directory under an install root that holds the ``qga`` package."""
    found = sorted(root.glob("**/qga/__init__.py"))
    return found[0].parent.parent if found else None
