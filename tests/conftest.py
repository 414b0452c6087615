import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.agents import our_agent, qemu_ga_available, real_qemu_ga


@pytest.fixture
def short_tmp():
    """A temporary directory with a short path (Unix socket paths are < 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qga-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(short_tmp):
    """Our agent on a Unix socket, started fresh for the test."""
    process = our_agent(short_tmp).start()
    yield process
    process.stop()


@pytest.fixture
def qemu_ga(tmp_path_factory):
    """The real qemu-ga on a Unix socket, started fresh for the test."""
    if not qemu_ga_available():
        if os.environ.get("CI"):
            pytest.fail("qemu-ga is not installed; .ci/run installs it")
        pytest.skip("qemu-ga is not installed (apt-get install qemu-guest-agent)")
    workdir = Path(tempfile.mkdtemp(prefix="qemuga-"))
    process = real_qemu_ga(workdir).start()
    yield process
    process.stop()
    shutil.rmtree(workdir, ignore_errors=True)
