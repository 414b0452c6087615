"""Test support for single sign-on: the PAM module for real, under pam_wrapper.

* :func:`pam_modules` builds ``native/`` into a temporary directory (or takes
  the modules ``make check`` built, from ``$QGA_PAM_MODULE`` and
  ``$QGA_PAM_TEST_MODULE``).
* :class:`PamStack` writes a pam_wrapper service directory with the service
  ``gdm-ovirtcred``: our module, then ``pam_exec.so expose_authtok`` running
  ``native/tests/pam_probe.sh``, which records the PAM_USER and PAM_AUTHTOK
  the module handed on.
* :func:`run_pamtester` runs the real ``pamtester`` with pam_wrapper
  preloaded, answers the conversation on stdin, and meanwhile turns the
  agent's loop so a :class:`qga.ext.credentials.CredentialsServer` in the
  test's process can serve it.
* :class:`FakeServer` is a credentials server that answers whatever bytes a
  test wants, as any uid, in its own process.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
NATIVE = REPO / "native"
PROBE = NATIVE / "tests" / "pam_probe.sh"
SERVICE = "gdm-ovirtcred"

PAM_MODULE_DIRS = ("/lib/x86_64-linux-gnu/security", "/usr/lib/x86_64-linux-gnu/security",
                   "/usr/lib64/security", "/lib64/security", "/lib/security",
                   "/usr/lib/security")


def require(condition: bool, what: str) -> None:
    """Skip without the tools, except in CI, where tests/run installs them."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing; tests/run installs it")
        pytest.skip(f"{what} is missing (apt-get install libpam0g-dev pamtester "
                    "libpam-wrapper valgrind gcc make)")


def system_pam_module(name: str) -> str:
    for directory in PAM_MODULE_DIRS + tuple(glob.glob("/lib/*-linux-gnu*/security")):
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    require(False, name)
    return ""


def require_pam_tools() -> None:
    require(shutil.which("pamtester") is not None, "pamtester")
    require(ctypes.util.find_library("pam_wrapper") is not None, "libpam_wrapper")


class PamModules:
    """The module as installed (``production``) and its test build (``test``)."""

    def __init__(self, production: str, test: str):
        self.production = production
        self.test = test


def pam_modules(build_dir: Path) -> PamModules:
    production = os.environ.get("QGA_PAM_MODULE")
    test = os.environ.get("QGA_PAM_TEST_MODULE")
    if production and test:
        return PamModules(production, test)
    require(shutil.which("make") is not None and shutil.which("cc") is not None, "make and cc")
    require(os.path.exists("/usr/include/security/pam_modules.h"), "libpam0g-dev")
    subprocess.run(["make", "-s", "-C", str(NATIVE), f"BUILDDIR={build_dir}", "all",
                    "test-module"], check=True, capture_output=True, timeout=120)
    return PamModules(str(build_dir / "pam_ovirt_cred.so"),
                      str(build_dir / "test" / "pam_ovirt_cred.so"))


class PamStack:
    """A pam_wrapper service directory: our module, then the probe.

    ``service_text`` replaces that stack with a service file of one's own
    (``{module}`` in it becomes the module with its arguments); ``files``
    adds other service files, for ``include``/``substack``.
    """

    def __init__(self, directory: Path, module: str, *arguments: str,
                 service_text: Optional[str] = None, files: Optional[Dict[str, str]] = None):
        self.directory = directory
        self.services = directory / "services"
        self.services.mkdir(parents=True, exist_ok=True)
        self.probe_output = directory / "probe.out"
        pam_deny = system_pam_module("pam_deny.so")
        module_line = " ".join((module,) + arguments)
        if service_text is None:
            pam_exec = system_pam_module("pam_exec.so")
            service_text = (
                "auth requisite {module}\n"
                f"auth required {pam_exec} expose_authtok quiet {PROBE} {self.probe_output}\n")
        (self.services / SERVICE).write_text(service_text.replace("{module}", module_line))
        (self.services / "other").write_text(f"auth required {pam_deny}\n")
        for name, text in (files or {}).items():
            (self.services / name).write_text(text)

    def env(self) -> Dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LD_PRELOAD": "libpam_wrapper.so",
            "PAM_WRAPPER": "1",
            "PAM_WRAPPER_SERVICE_DIR": str(self.services),
            # Every pam_syslog line of the module goes to stderr, so tests can
            # check why it refused.
            "PAM_WRAPPER_DEBUGLEVEL": "3",
        }

    def handed_on(self) -> Optional[Dict[str, str]]:
        """What the module put in PAM_USER and PAM_AUTHTOK, if the probe ran."""
        try:
            text = self.probe_output.read_text()
        except FileNotFoundError:
            return None
        self.probe_output.unlink()
        lines = dict(line.split("=", 1) for line in text.splitlines())
        return {"user": lines["user"], "password": lines["authtok"]}


class PamResult:
    def __init__(self, returncode: int, stdout: str, stderr: str, elapsed: float,
                 handed_on: Optional[Dict[str, str]]):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.elapsed = elapsed
        self.handed_on = handed_on

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and "successfully authenticated" in self.output


def run_pamtester(stack: PamStack, answer: str, user: str = "", loop=None,
                  timeout: float = 20.0, wrapper: Optional[list] = None,
                  extra_env: Optional[Dict[str, str]] = None) -> PamResult:
    """``pamtester -v gdm-ovirtcred USER authenticate``, answering ``answer``.

    ``user`` "" leaves PAM_USER empty, as a login screen that does not know
    the user yet.  ``wrapper`` runs pamtester under another program (valgrind).
    """
    env = stack.env()
    env.update(extra_env or {})
    command = list(wrapper or []) + ["pamtester", "-v", SERVICE, user, "authenticate"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                   env=env)
        try:
            process.stdin.write(answer.encode() + b"\n")
            process.stdin.close()
            deadline = started + timeout
            while process.poll() is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"pamtester did not finish in {timeout} s")
                if loop is not None:
                    loop.run_once(0.01)
                else:
                    time.sleep(0.01)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        elapsed = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        return PamResult(process.returncode, out.read().decode(errors="replace"),
                         err.read().decode(errors="replace"), elapsed, stack.handed_on())


class FakeServer:
    """A credentials server in a child process that answers ``reply`` to anyone.

    ``uid`` runs it as another user (root only): its socket then lives in a
    directory that user owns, and it listens as that user, which is what
    SO_PEERCRED reports to the module.  ``delay`` holds the answer back.
    """

    def __init__(self, directory: Path, reply: bytes, uid: Optional[int] = None,
                 delay: float = 0.0):
        self.socket_dir = directory / "fake"
        self.socket_dir.mkdir(mode=0o700)
        if uid is not None:
            os.chmod(directory, 0o711)
            os.chown(self.socket_dir, uid, uid)
        self.path = str(self.socket_dir / "cred.sock")
        read_fd, write_fd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read_fd)
            self._serve(write_fd, reply, uid, delay)  # never returns
        os.close(write_fd)
        self._events = os.fdopen(read_fd, "r")
        assert self._events.readline().strip() == "ready"

    def _serve(self, events_fd: int, reply: bytes, uid: Optional[int], delay: float) -> None:
        status = 1
        try:
            events = os.fdopen(events_fd, "w", buffering=1)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.path)
            listener.listen(1)
            events.write("ready\n")
            connection, _ = listener.accept()
            token = b""
            while True:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                token += chunk
            events.write("token=" + token.decode(errors="replace") + "\n")
            time.sleep(delay)
            try:
                connection.sendall(reply)
            except OSError:
                pass  # the module gave up first
            connection.close()
            status = 0
        finally:
            os._exit(status)

    def token_received(self) -> Optional[str]:
        line = self._events.readline().strip()
        return line[len("token="):] if line.startswith("token=") else None

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        self._events.close()


# -- the service files of contrib/pam.d --------------------------------------------------

CONTRIB_PAM = REPO / "contrib" / "pam.d"

# What authselect's minimal profile puts in Fedora's password-auth and postlogin,
# enough for the auth phase.
FEDORA_PASSWORD_AUTH = """\
auth        required      pam_env.so
auth        sufficient    pam_unix.so nullok try_first_pass
auth        required      pam_deny.so
account     required      pam_unix.so
password    sufficient    pam_unix.so yescrypt shadow nullok use_authtok
password    required      pam_deny.so
session     required      pam_unix.so
"""
FEDORA_POSTLOGIN = "session optional pam_lastlog.so silent noupdate showfailed\n"


def contrib_stack(directory: Path, module: str, socket_path: str, flavour: str) -> PamStack:
    """contrib/pam.d's service file for ``flavour`` (debian or fedora), with ``module``
    for pam_ovirt_cred.so.  Debian's includes are the machine's own common-*;
    Fedora's password-auth and postlogin are authselect's minimal ones."""
    if flavour == "debian":
        text = (CONTRIB_PAM / "gdm-ovirtcred.debian").read_text()
        files = {name: Path("/etc/pam.d", name).read_text()
                 for name in ("common-account", "common-session", "common-password")
                 if Path("/etc/pam.d", name).exists()}
    else:
        text = (CONTRIB_PAM / "gdm-ovirtcred").read_text()
        files = {"password-auth": FEDORA_PASSWORD_AUTH, "postlogin": FEDORA_POSTLOGIN}
        # pam_wrapper moves the service, not what it includes: name those by path.
        for name in files:
            text = re.sub(rf"(?m)(\s){name}$", rf"\g<1>{directory}/services/{name}", text)
    text, count = re.subn(r"(?m)^(auth\s+requisite\s+)pam_ovirt_cred\.so$", r"\1{module}", text)
    assert count == 1
    return PamStack(directory, module, f"socket={socket_path}", service_text=text, files=files)


@contextlib.contextmanager
def account_with_password() -> Iterator[Tuple[str, str]]:
    """A throwaway local user (root only) and its password, for pam_unix."""
    from tests.support.users import create_user, delete_user
    user = create_user()
    try:
        password = "Sso-" + user.name
        subprocess.run(["chpasswd"], input=f"{user.name}:{password}\n", text=True,
                       check=True, capture_output=True)
        yield user.name, password
    finally:
        delete_user(user)


# -- a private system bus ------------------------------------------------------------

SYSTEM_BUS_CONFIG = Path("/usr/share/dbus-1/system.conf")
POLICY = REPO / "contrib" / "dbus" / "org.ovirt.vdsm.Credentials.conf"
EXTENSION_USER = "qga-ext-ovirt-guest-agent"


class PrivateSystemBus:
    """A dbus-daemon with the distribution's system bus policy and ours, on a private socket.

    The system configuration is taken as it is, less what would touch the
    machine (its user, pid file, socket, syslog, service activation and the
    machine's other policy files).  ``extension_user`` stands in for
    ``qga-ext-ovirt-guest-agent`` in our policy, so a test can be that user.
    """

    def __init__(self, directory: Path, extension_user: Optional[str] = None):
        require(shutil.which("dbus-daemon") is not None and SYSTEM_BUS_CONFIG.exists(),
                "dbus-daemon")
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o755)
        policy = POLICY.read_text()
        if extension_user is not None:
            policy = policy.replace(f'user="{EXTENSION_USER}"', f'user="{extension_user}"')
        (directory / "policy.conf").write_text(policy)
        config = SYSTEM_BUS_CONFIG.read_text()
        config = re.sub(r"(?s)<!--.*?-->", "", config)
        config = re.sub(r"(?m)^\s*<(user|pidfile|listen|servicehelper|includedir)>.*?</\1>\s*$",
                        "", config)
        config = re.sub(r"(?m)^\s*<(fork|syslog|standard_system_servicedirs)/>\s*$", "", config)
        config = re.sub(r"(?s)<include\b[^>]*>.*?</include>", "", config)
        self.socket_path = directory / "system_bus_socket"
        config = config.replace(
            "</busconfig>",
            f"  <listen>unix:path={self.socket_path}</listen>\n"
            f"  <include>{directory / 'policy.conf'}</include>\n</busconfig>")
        (directory / "system.conf").write_text(config)
        self.process = subprocess.Popen(
            ["dbus-daemon", f"--config-file={directory / 'system.conf'}", "--nofork",
             "--nopidfile", "--print-address"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline().strip()
        if not line:
            self.stop()
            raise AssertionError("dbus-daemon did not start: " + self.process.stderr.read())
        self.address = line

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()
