"""The command line as a process: -V start-up cost, socket activation, -d daemons, pid files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import qga

REPO = Path(__file__).resolve().parents[2]


def run_cli(args, activate=()):
    """``python -m qga args``; ``activate``: sockets passed as systemd passes them (fd 3...)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), QGA_CONF="/nonexistent")
    env.pop("LISTEN_PID", None)
    env.pop("LISTEN_FDS", None)
    argv = [sys.executable, "-m", "qga", *args]
    if activate:
        # Move the sockets to fd 3, 4... and set LISTEN_PID to the pid that
        # then execs the agent, as systemd does.
        fds = ",".join(str(sock.fileno()) for sock in activate)
        launcher = (
            "import os, sys\n"
            f"for target, fd in enumerate([{fds}], 3): os.dup2(fd, target)\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            f"os.environ['LISTEN_FDS'] = '{len(activate)}'\n"
            "os.execv(sys.executable, [sys.executable, '-m', 'qga'] + sys.argv[1:])\n"
        )
        argv = [sys.executable, "-c", launcher, *args]
    return subprocess.run(argv, env=env, pass_fds=[s.fileno() for s in activate],
                          capture_output=True, timeout=30)


@pytest.fixture
def listening_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "activated.sock"))
    sock.listen(1)
    yield sock
    sock.close()


def test_socket_activation_sets_the_method(listening_socket):
    result = run_cli(["-D", "-m", "isa-serial", "-p", "/dev/ttyS9"], activate=[listening_socket])
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "method=unix-listen\n" in out and "\npath=" not in out


def test_socket_activation_with_two_sockets_is_fatal(listening_socket):
    with socket.socket(socket.AF_UNIX) as second:
        result = run_cli(["-D"], activate=[listening_socket, second])
    assert result.returncode == 1
    assert result.stderr.decode().endswith(": qemu-ga only supports listening on one socket\n")


def test_socket_activation_of_another_family_is_fatal():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
        result = run_cli(["-D"], activate=[inet])
    assert result.returncode == 1
    assert result.stderr.decode().endswith(": unsupported listen fd type\n")


def test_python_m_qga_prints_version_quickly():
    result = run_cli(["-V"])
    assert result.returncode == 0
    assert result.stdout == f"QEMU Guest Agent {qga.QEMU_GA_VERSION}\n".encode()
    modules = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qga", "-V"], capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(REPO), QGA_CONF="/nonexistent"), timeout=30,
    ).stderr.decode()
    for heavy in ("psutil", "jsonschema", "cryptography", "serial", "dataclasses", "logging"):
        assert f" {heavy}\n" not in modules, f"-V imports {heavy}"



# -- daemon and pid file ----------------------------------------------------------------


def lock_from_another_process(path):
    """Read ``path`` and try to lock it as a second agent would: (content, error text or '').

    Another process does it: a POSIX lock is lost when its owner closes
    *any* descriptor of the file, so this process must not open it.
    """
    code = ("import sys\nfrom qga.daemon import write_pidfile\n"
            "print(repr(open(sys.argv[1]).read()))\n"
            "try:\n    write_pidfile(sys.argv[1])\nexcept Exception as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=30)
    content, _, error = result.stdout.decode().partition("\n")
    return eval(content), error.strip()


def test_pidfile_is_written_and_locked(tmp_path):
    from qga.daemon import write_pidfile

    path = tmp_path / "qga.pid"
    path.write_text("12345678\nstale\n")
    fd = write_pidfile(str(path))
    try:
        assert lock_from_another_process(path) == (
            f"{os.getpid()}\n", "Cannot lock pid file: Resource temporarily unavailable")
    finally:
        os.close(fd)
    content, error = lock_from_another_process(path)
    assert error == ""


def test_new_pidfile_mode(tmp_path):
    from qga.daemon import write_pidfile

    path = tmp_path / "qga.pid"
    fd = write_pidfile(str(path))
    os.close(fd)
    assert path.stat().st_mode & 0o777 == 0o600 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_pidfile_errors(tmp_path):
    from qga.daemon import write_pidfile
    from qga.errors import StateError

    with pytest.raises(StateError, match=r"^Could not create '/nonexistent/d/qga.pid': "
                                         r"No such file or directory$"):
        write_pidfile("/nonexistent/d/qga.pid")
    with pytest.raises(StateError, match=r"Is a directory$"):
        write_pidfile(str(tmp_path))


DAEMON_PROBE = """
import json, os, sys
from qga.daemon import become_daemon
fd = become_daemon(sys.argv[1] or None)
mask = os.umask(0)
info = {"pid": os.getpid(), "sid": os.getsid(0), "cwd": os.getcwd(), "umask": mask,
        "stdio": [os.readlink(f"/proc/self/fd/{n}") for n in (0, 1, 2)], "lock_fd": fd}
with open(sys.argv[2] + ".tmp", "w") as out:
    json.dump(info, out)
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
"""


def run_daemon_probe(pidfile, report, expect_report=True):
    import json
    import time

    result = subprocess.run([sys.executable, "-c", DAEMON_PROBE, str(pidfile or ""), str(report)],
                            capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            timeout=30)
    # run() returns once the child dropped the pipes (stdio to /dev/null, or exit).
    deadline = time.monotonic() + (10 if expect_report else 0)
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return result, (json.loads(report.read_text()) if report.exists() else None)


def test_become_daemon(tmp_path):
    pidfile = tmp_path / "qga.pid"
    result, info = run_daemon_probe(pidfile, tmp_path / "report.json")
    assert result.returncode == 0 and result.stderr == b""
    assert info is not None
    assert info["sid"] == info["pid"]  # a session of its own
    assert info["cwd"] == "/"
    assert info["umask"] == 0o077
    assert info["stdio"] == ["/dev/null"] * 3
    assert info["lock_fd"] is not None
    assert pidfile.read_text() == f"{info['pid']}\n"


def test_second_daemon_refuses_a_locked_pidfile(tmp_path):
    from qga.daemon import write_pidfile

    pidfile = tmp_path / "qga.pid"
    fd = write_pidfile(str(pidfile))
    try:
        result, info = run_daemon_probe(pidfile, tmp_path / "report.json", expect_report=False)
    finally:
        os.close(fd)
    # The parent returned 0 before the child failed, as qemu-ga's does; the
    # child's message reached the stderr the parent was started with.
    assert result.returncode == 0
    assert info is None
    assert result.stderr.decode().endswith(
        ": critical: Cannot lock pid file: Resource temporarily unavailable\n")
