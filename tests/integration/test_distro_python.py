"""The wheel on Debian's own Python, with Debian's libraries, passes the compat suite.

A guest that installs qga from a package runs it with ``/usr/bin/python3``
and the distribution's python3-psutil, python3-jsonschema,
python3-cryptography and python3-serial, not with what pip would fetch.
The wheel is built (``make wheel``), installed by unzipping it into a
directory (no package index, no dependencies), and the wire-compatibility
suite ``tests/compat/test_protocol.py`` is run against the agent started by
``/usr/bin/python3`` from that directory (``$QGA_AGENT_PYTHON`` and
``$QGA_AGENT_PYTHONPATH``, honoured by ``tests/support/agents.py``).

tests/run installs the four Debian packages; without them (or without
Debian's Python) the test skips and says why.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.agents import REPO, our_agent
from tests.support.packaging import build_wheel, unpack_wheel

DEBIAN_PYTHON = "/usr/bin/python3"
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
DEPENDENCIES = ("psutil", "jsonschema", "cryptography", "serial")


@pytest.fixture(scope="module")
def debian_python():
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        print(f"skipped: {DEBIAN_PYTHON} is not installed")
        pytest.skip(f"{DEBIAN_PYTHON} is not installed")
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import " + ", ".join(DEPENDENCIES)],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        reason = ("Debian's python3-psutil python3-jsonschema python3-cryptography "
                  f"python3-serial are not all installed: {probe.stderr.strip()[-200:]}")
        if os.environ.get("CI"):
            pytest.fail(reason + " (tests/run installs them)")
        print("skipped: " + reason)
        pytest.skip(reason)
    return DEBIAN_PYTHON


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="module")
def installation(wheel, tmp_path_factory):
    return unpack_wheel(wheel, tmp_path_factory.mktemp("site"))


def test_schema_is_a_real_file_in_the_wheel(wheel):
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo("qga/qapi-schema.json")
        mode = info.external_attr >> 16
        assert not stat.S_ISLNK(mode)
        assert archive.read(info) == (REPO / "qapi-schema.json").read_bytes()
        names = archive.namelist()
    for module in ("qga/__main__.py", "qga/cli.py", "qga/sdnotify.py", "qga/ctl.py"):
        assert module in names
    assert not any("__pycache__" in name or name.startswith("tests/") for name in names)


def test_imports_come_from_the_installation_and_debian(debian_python, installation):
    code = ("import json, qga, " + ", ".join(DEPENDENCIES) + "\n"
            "print(json.dumps({name: __import__(name).__file__ for name in "
            + repr(("qga",) + DEPENDENCIES) + "}))")
    result = subprocess.run([debian_python, "-c", code], env=_env(installation),
                            capture_output=True, text=True, cwd="/", timeout=60)
    assert result.returncode == 0, result.stderr
    import json

    files = json.loads(result.stdout)
    assert files["qga"].startswith(str(installation) + "/")
    for name in DEPENDENCIES:
        assert files[name].startswith(DEBIAN_DIST_PACKAGES + "/"), (name, files[name])


def test_agent_runs_on_debian_python(debian_python, installation, short_tmp, monkeypatch):
    monkeypatch.setenv("QGA_AGENT_PYTHON", debian_python)
    monkeypatch.setenv("QGA_AGENT_PYTHONPATH", str(installation))
    agent = our_agent(short_tmp).start()
    try:
        exe = os.path.realpath(f"/proc/{agent.pid}/exe")
        assert exe == os.path.realpath(debian_python)
        with agent.connect() as connection:
            info = connection.call("guest-info")["return"]
            assert len(info["supported_commands"]) > 30
            assert connection.call("guest-get-osinfo")["return"]["kernel-release"]
    finally:
        agent.stop()


def test_compat_suite_passes_on_debian_python(debian_python, installation):
    env = dict(os.environ, QGA_AGENT_PYTHON=debian_python,
               QGA_AGENT_PYTHONPATH=str(installation))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "tests/compat/test_protocol.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary = result.stdout.strip().splitlines()[-1:] or [""]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary[0] and "failed" not in summary[0], summary


def _env(installation: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installation)
    return env
