"""Fixtures shared by the extension tests that run hello or the oVirt extension in the agent."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from qga.ext.launch import user_name
from tests.support.ext_hello import NAME, HelloBundles


@pytest.fixture(scope="module")
def bundles(request):
    """Signed hello bundles built on demand, in a directory the extension user can read."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    workdir = Path(tempfile.mkdtemp(prefix=f"qga-{module}-"))
    os.chmod(workdir, 0o755)
    yield HelloBundles(workdir, name=NAME)
    shutil.rmtree(workdir, ignore_errors=True)
    if os.geteuid() == 0:
        # The agent creates the extension's system user when it runs as root.
        subprocess.run(["userdel", user_name(NAME)], capture_output=True)


@pytest.fixture(scope="module")
def ovirt_bundle_dir(tmp_path_factory):
    """The oVirt extension's files as a bundle lays them out (no signature: run directly)."""
    from tests.support.ovirt_bundle import stage
    directory = tmp_path_factory.mktemp("ovirt-bundle")
    stage(str(directory))
    return str(directory)


@pytest.fixture
def ovirt_workdir():
    """A work directory for an agent running the oVirt extension (reachable by its user)."""
    from tests.support.ovirt_bundle import NAME as OVIRT
    workdir = Path(tempfile.mkdtemp(prefix="qga-ovirt-"))
    os.chmod(workdir, 0o755)     # the extension's user must reach its code below it
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)
    if os.geteuid() == 0:
        subprocess.run(["userdel", user_name(OVIRT)], capture_output=True)
