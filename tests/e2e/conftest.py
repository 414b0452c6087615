"""Fixtures for the end-to-end tests: the guest image, work directories, the timing report.

Every test here boots a real virtual machine (``@pytest.mark.e2e``).  When
something they need is missing the tests are skipped with the reason, or
fail with it under CI (``CI`` set), where ``tests/run`` installs it all.
The times measured (boot, reconnect, transfer rates, shutdown) are printed
in pytest's terminal summary.  ``QGA_E2E_KEEP=1`` keeps the work directories
(consoles, libvirt logs, ``outcomes.json``) for a look after the run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.guest_image import ImageError, build_guest_image

MEASUREMENTS = pytest.StashKey[dict]()


def unavailable(reason: str) -> None:
    """Skip (or, under CI, fail) every test that needs what is missing."""
    if os.environ.get("CI"):
        pytest.fail(f"end-to-end tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"end-to-end tests cannot run: {reason}")


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def guest_image(request):
    """The cached guest image (built on first use: about 30 s with the downloads)."""
    from tests.support.vm import qemu_missing_reason

    reason = qemu_missing_reason()
    if reason:
        unavailable(reason)
    started = time.monotonic()
    try:
        image = build_guest_image(
            log=lambda message: print(f"e2e image: {message}", file=sys.stderr, flush=True))
    except ImageError as error:
        unavailable(f"cannot build the guest image: {error}")
    record(request.config, "guest image ready, built or cached (s)", time.monotonic() - started)
    return image


def record(config, name: str, value) -> None:
    """Keep a measurement for the terminal summary."""
    if isinstance(value, float):
        value = round(value, 4)
    config.stash.setdefault(MEASUREMENTS, {})[name] = value


@pytest.fixture(scope="session")
def measure(request):
    """``measure(name, value)``: record a measurement for the summary."""
    return lambda name, value: record(request.config, name, value)


def make_workdir(prefix: str) -> Path:
    """A short, world-traversable directory (QEMU and socket paths live here)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def module_workdir():
    path = make_workdir("qga-e2e-")
    yield path
    if not os.environ.get("QGA_E2E_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, config):
    found = config.stash.get(MEASUREMENTS, None)
    if not found:
        return
    terminalreporter.section("end-to-end measurements (TCG guest)")
    for name, value in found.items():
        terminalreporter.write_line(f"{name:60} {value}")
