"""The agent process on each kind of channel: serial ports on ptys, -r, -d, socket activation.

A pty stands in for the virtio-serial and isa-serial ports: the agent opens
the slave side by path, the test is the host on the master side.  Closing
the master hangs the slave up for good, which is what an absent host looks
like to the agent (POLLHUP without end, reads of 0 bytes): the test then
measures the CPU the agent burns while the host is away.  Reconnecting to
the same port is tested on the channel itself in
tests/unit/test_channel_virtio.py.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
import tty

import pytest

from tests.support.agents import REPO

pytestmark = pytest.mark.skipif(
    not (REPO / "qga" / "agent.py").exists(), reason="the agent is not built yet")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class AgentProcess:
    def __init__(self, args, workdir, env_extra=None, launcher=None, pass_fds=()):
        self.statedir = workdir / "state"
        self.statedir.mkdir(exist_ok=True)
        self.log = workdir / "agent.log"
        env = dict(os.environ, PYTHONPATH=str(REPO), QGA_CONF="/nonexistent", **(env_extra or {}))
        argv = [sys.executable, "-m", "qga", *args, "-t", str(self.statedir)]
        if launcher is not None:
            argv = [sys.executable, "-c", launcher, *args, "-t", str(self.statedir)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, pass_fds=pass_fds)

    def cpu_seconds(self):
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def agents():
    started = []

    def start(*args, **kwargs):
        agent = AgentProcess(*args, **kwargs)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def open_pty():
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    tty.setraw(slave)
    os.close(slave)
    return master, name


def wait_until_open(agent, path, timeout=10.0):
    """Wait until the agent holds ``path`` open (isa-serial drops input sent before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited: {agent.log.read_text()}")
        if _fd_of(agent.proc.pid, path) is not None:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never opened: {agent.log.read_text()}")


def call_over_fd(fd, request, timeout=10.0):
    os.write(fd, json.dumps(request).encode())
    data = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while b"\n" not in data and time.monotonic() < deadline:
        try:
            data += os.read(fd, 4096)
        except (BlockingIOError, OSError):  # EIO: nobody has the slave side open yet
            time.sleep(0.005)
    return json.loads(data.split(b"\n")[0]) if b"\n" in data else None


@pytest.mark.parametrize("method", ["virtio-serial", "isa-serial"])
def test_serial_port_and_absent_host(agents, short_tmp, method):
    if method == "isa-serial":
        pytest.importorskip("serial")
    master, name = open_pty()
    try:
        agent = agents(["-m", method, "-p", name], short_tmp)
        wait_until_open(agent, name)
        assert call_over_fd(master, {"execute": "guest-sync", "arguments": {"id": 7}}) == {"return": 7}
    finally:
        os.close(master)  # the host goes away: the port hangs up for good
    time.sleep(0.2)
    before = agent.cpu_seconds()
    time.sleep(1.0)
    spent = agent.cpu_seconds() - before
    assert agent.proc.poll() is None  # still running, port still open
    assert spent < 0.05, f"{spent:.3f} s of CPU in 1 s while the host is absent"
    assert _fd_of(agent.proc.pid, name) is not None  # the port stays open
    assert agent.stop() == 0


def _fd_of(pid, path):
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            # A hung-up pty's node is gone: "/dev/pts/N (deleted)".
            if os.readlink(f"/proc/{pid}/fd/{fd}") in (path, path + " (deleted)"):
                return fd
        except OSError:
            pass
    return None


def test_port_does_not_become_the_controlling_terminal(agents, short_tmp):
    master, name = open_pty()
    try:
        launcher = "import os, runpy, sys\nos.setsid()\nsys.argv[0] = 'qga'\nrunpy.run_module('qga', run_name='__main__')\n"
        agent = agents(["-m", "virtio-serial", "-p", name], short_tmp, launcher=launcher)
        wait_until_open(agent, name)
        assert call_over_fd(master, {"execute": "guest-ping"}) == {"return": {}}
        tty_nr = int(open(f"/proc/{agent.proc.pid}/stat").read().rsplit(")", 1)[1].split()[4])
        assert tty_nr == 0
    finally:
        os.close(master)
    time.sleep(0.2)
    assert agent.proc.poll() is None  # no SIGHUP when the port hung up


def test_retry_path_waits_for_the_device(agents, short_tmp):
    link = short_tmp / "org.qemu.guest_agent.0"
    agent = agents(["-r", "-m", "virtio-serial", "-p", str(link)], short_tmp)
    time.sleep(0.3)
    assert agent.proc.poll() is None
    master, name = open_pty()
    try:
        link.symlink_to(name)  # the port appears: picked up at the next attempt (5 s)
        wait_until_open(agent, name, timeout=8)
        reply = call_over_fd(master, {"execute": "guest-ping"})
        assert reply == {"return": {}}
    finally:
        os.close(master)


def test_missing_device_without_retry_exits_1(agents, short_tmp):
    agent = agents(["-m", "virtio-serial", "-p", str(short_tmp / "none")], short_tmp)
    assert agent.proc.wait(10) == 1
    assert "failed to initialize guest agent channel" in agent.log.read_text()


def connect_unix(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def call_socket(sock, request):
    sock.sendall(json.dumps(request).encode())
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return json.loads(data)


def test_daemonize(short_tmp):
    sock_path = short_tmp / "qga.sock"
    pidfile = short_tmp / "qga.pid"
    statedir = short_tmp / "state"
    statedir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), QGA_CONF="/nonexistent")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "qga", "-d", "-m", "unix-listen", "-p",
                             str(sock_path), "-t", str(statedir), "-f", str(pidfile)],
                            env=env, capture_output=True, timeout=30)
    assert result.returncode == 0 and result.stdout == result.stderr == b""
    assert time.monotonic() - started < 5
    daemon_pid = None
    try:
        with connect_unix(sock_path) as sock:
            assert call_socket(sock, {"execute": "guest-ping"}) == {"return": {}}
        daemon_pid = int(pidfile.read_text())
        assert os.readlink(f"/proc/{daemon_pid}/cwd") == "/"
    finally:
        if daemon_pid is None and pidfile.exists():
            daemon_pid = int(pidfile.read_text())
        if daemon_pid is not None:
            os.kill(daemon_pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{daemon_pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{daemon_pid}")
    assert not pidfile.exists()  # removed at exit
    assert sock_path.exists()  # the socket file stays, as qemu-ga leaves it


def test_socket_activation(agents, short_tmp):
    sock_path = short_tmp / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    launcher = (
        "import os, sys\n"
        f"os.dup2({listener.fileno()}, 3)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.environ['LISTEN_FDS'] = '1'\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'qga'] + sys.argv[1:])\n"
    )
    try:
        # -m/-p are overridden by the inherited socket, as in qemu-ga.
        agents(["-m", "isa-serial", "-p", "/nonexistent"], short_tmp, launcher=launcher,
               pass_fds=(listener.fileno(),))
        with connect_unix(sock_path) as sock:
            assert call_socket(sock, {"execute": "guest-sync", "arguments": {"id": 3}}) == {"return": 3}
    finally:
        listener.close()
