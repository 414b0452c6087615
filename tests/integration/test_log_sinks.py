"""Where log lines go, seen from outside the process: stderr, journald priorities, syslog."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^\d+\.\d{6}: (\w+): (.*)$")


STDERR_PROBE = """
import logging, sys
from qga.config import Config
from qga.log import setup_logging
setup_logging(Config(verbose=True), lambda: False, use_syslog=False)
log = logging.getLogger("qga.probe")
log.critical("critical line")
log.warning("two\\nlines")
log.debug("debug line")
"""


def run_stderr_probe(tmp_path, journal):
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("JOURNAL_STREAM", None)
        if journal:
            info = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        subprocess.run([sys.executable, "-c", STDERR_PROBE], stderr=err, env=env, timeout=30,
                       check=True)
    return err_path.read_text().splitlines()


def test_stderr_lines(tmp_path):
    output = run_stderr_probe(tmp_path, journal=False)
    assert [LINE.match(line).groups() if LINE.match(line) else line for line in output] == [
        ("critical", "critical line"), ("warning", "two"), "lines", ("debug", "debug line")]


def test_journald_priorities(tmp_path):
    output = run_stderr_probe(tmp_path, journal=True)
    assert [line[:3] for line in output] == ["<2>", "<4>", "<4>", "<7>"]
    assert LINE.match(output[0][3:]).groups() == ("critical", "critical line")


AUDIT_PROBE = """
import socket
sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sink.bind("/dev/log")
sink.settimeout(5)
from qga.config import Config
from qga.log import audit, setup_logging
frozen = [False]
setup_logging(Config(), lambda: frozen[0])
audit("guest-ping called")
frozen[0] = True
audit("hidden while frozen")
frozen[0] = False
audit("guest-file-open called, filepath: /tmp/f, mode: w")
print(sink.recv(4096).decode())
print(sink.recv(4096).decode())
sink.settimeout(0.2)
try:
    print(sink.recv(4096).decode())
except socket.timeout:
    pass
"""


@pytest.mark.root
def test_audit_goes_to_syslog(tmp_path):
    """Audit lines reach syslog as qemu-ga's do: "<14>... qemu-ga: info: ...".

    The probe runs in a private mount namespace with a tmpfs on /dev, where it
    binds its own /dev/log: the machine's syslog is never touched.
    """
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private /dev/log")
    script = tmp_path / "probe.py"
    script.write_text(AUDIT_PROBE)
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs tmpfs /dev && exec "{sys.executable}" "{script}"'],
        capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=30)
    if result.returncode != 0 and b"unshare" in result.stderr:
        pytest.skip(f"no private mount namespace here: {result.stderr.decode().strip()}")
    assert result.returncode == 0, result.stderr
    messages = result.stdout.decode().splitlines()
    assert len(messages) == 2
    assert re.fullmatch(r"<14>\w{3} [ \d]\d \d\d:\d\d:\d\d qemu-ga: info: guest-ping called", messages[0])
    assert messages[1].endswith(" qemu-ga: info: guest-file-open called, filepath: /tmp/f, mode: w")
