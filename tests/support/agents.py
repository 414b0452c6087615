"""Start agents (ours and the real qemu-ga) on Unix sockets and talk raw bytes to them.

Tests use these to send the *same bytes* to both agents and compare what
comes back.  Every process started here is killed by PID when the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
QEMU_GA = shutil.which("qemu-ga") or "/usr/sbin/qemu-ga"


def qemu_ga_available() -> bool:
    return os.access(QEMU_GA, os.X_OK)


class AgentProcess:
    """An agent listening on a Unix socket in ``workdir``."""

    def __init__(self, argv: Sequence[str], workdir: Path, sock: Path, env: Optional[dict] = None):
        self.argv = list(argv)
        self.workdir = workdir
        self.sock = sock
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.log = workdir / "agent.stderr"

    def start(self, timeout: float = 10.0) -> "AgentProcess":
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("QGA_CONF", "/nonexistent")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=env, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.stderr()}")
            if self.sock.exists():
                try:
                    with socket.socket(socket.AF_UNIX) as probe:
                        probe.connect(str(self.sock))
                    return self
                except OSError:
                    pass
            time.sleep(0.01)
        raise RuntimeError(f"agent did not listen on {self.sock}: {self.stderr()}")

    def stderr(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 5.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def connect(self, timeout: float = 5.0) -> "RawConnection":
        return RawConnection(self.sock, timeout)


def our_agent(workdir: Path, extra: Sequence[str] = (), env: Optional[dict] = None) -> AgentProcess:
    """``python -m qga`` from this repository, or, when ``$QGA_AGENT_PYTHON`` and
    ``$QGA_AGENT_PYTHONPATH`` say so, another interpreter and installation
    (tests/integration/test_distro_python.py runs the compat suite that way)."""
    statedir = workdir / "state"
    statedir.mkdir(exist_ok=True)
    sock = workdir / "qga.sock"
    python = os.environ.get("QGA_AGENT_PYTHON") or sys.executable
    package_path = os.environ.get("QGA_AGENT_PYTHONPATH") or str(REPO)
    argv = [python, "-m", "qga", "-m", "unix-listen", "-p", str(sock), "-t", str(statedir), *extra]
    run_env = dict(os.environ if env is None else env)
    run_env["PYTHONPATH"] = package_path + os.pathsep + run_env.get("PYTHONPATH", "")
    return AgentProcess(argv, workdir, sock, run_env)


def real_qemu_ga(workdir: Path, extra: Sequence[str] = (), env: Optional[dict] = None) -> AgentProcess:
    statedir = workdir / "state"
    statedir.mkdir(exist_ok=True)
    sock = workdir / "qga.sock"
    argv = [QEMU_GA, "-m", "unix-listen", "-p", str(sock), "-t", str(statedir), *extra]
    return AgentProcess(argv, workdir, sock, env)


class RawConnection:
    """A byte-level client: send anything, read reply lines."""

    def __init__(self, path: Path, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self, timeout: float = 5.0) -> bytes:
        """One reply line including its newline; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply line; have {self.buffer[:200]!r}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                raise TimeoutError(f"no reply line; have {self.buffer[:200]!r}") from None
            if not data:
                raise ConnectionError(f"closed; have {self.buffer[:200]!r}")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read_lines(self, count: int, timeout: float = 5.0) -> List[bytes]:
        return [self.read_line(timeout) for _ in range(count)]

    def read_quiet(self, wait: float = 0.3) -> bytes:
        """Everything that arrives within ``wait`` seconds (to check for silence)."""
        self.sock.settimeout(wait)
        data = self.buffer
        self.buffer = b""
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, BlockingIOError):
            pass
        return data

    def call(self, execute: str, arguments: Optional[dict] = None, timeout: float = 10.0) -> dict:
        request = {"execute": execute}
        if arguments is not None:
            request["arguments"] = arguments
        self.send(json.dumps(request).encode() + b"\n")
        return json.loads(self.read_line(timeout))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
