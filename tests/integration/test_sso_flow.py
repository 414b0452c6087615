"""Single sign-on, the extension's side against the core's primitive: login -> signal -> PAM.

The whole flow through the real agent is ``test_sso_host_flow.py``.  Here the
core's end of the extension's control connection is a stand-in that speaks
qga.ext.wire and serves ``sso-offer-credentials`` with
qga.ext.credentials in the test's own loop, so each case drives one login
directly: a second login superseding the first, a login the core refuses,
the real password check, without an agent and a push per case.  The
extension is its own process, from a directory laid out as a bundle would be
(sso.py beside ovirt_agent/dbus.py and a copy of the SDK), and runs
unprivileged (as nobody) when the test runs as root; the core side and
pamtester run as root; the login screen is a subscriber on a private system
bus that hands the token to pamtester, as gnome-shell hands it to the PAM
service.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import subprocess
import time
from pathlib import Path

import pytest

from qga.errors import CredentialsError, ParameterError
from qga.ext import wire
from qga.ext.credentials import PRIMITIVE, CredentialsServer, offer_credentials
from qga.loop import Loop
from tests.support.sso import (PamStack, PrivateSystemBus, account_with_password,
                               contrib_stack, pam_modules, require_pam_tools, run_pamtester)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "extensions" / "ovirt_sso"))
from ovirt_agent import dbus  # noqa: E402  (the login screen's client)

ROOT = os.geteuid() == 0
SIGNAL_MATCH = ("type='signal',sender='org.ovirt.vdsm.Credentials',"
                "path='/org/ovirt/vdsm/Credentials',interface='org.ovirt.vdsm.Credentials',"
                "member='UserAuthenticated'")

EXTENSION_MAIN = r"""
import json, os, sys
import sdk, sso

extension = sdk.Extension()
extension.connect()
login = json.loads(sys.stdin.readline())   # the host's "login" arguments
outcome = []
sso.handle_login(login, extension, on_done=outcome.append)
extension.loop.run_until(lambda: outcome, timeout=15)
print(json.dumps({"outcome": outcome, "uid": os.geteuid()}), flush=True)
"""


class CoreStandIn:
    """The core's end of an extension's control connection, on the agent's loop:
    answers ``sso-offer-credentials`` with the credentials server."""

    def __init__(self, loop: Loop, directory: Path, credentials: CredentialsServer):
        self.loop = loop
        self._credentials = credentials
        self.path = str(directory / "ext.sock")
        self.frames = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        os.chmod(self.path, 0o666)
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._connection = None
        self._buffer = b""
        loop.add_reader(self._listener.fileno(), self._accept)

    def service(self, cls):  # what offer_credentials needs of qga.commands.Context
        assert cls is CredentialsServer
        return self._credentials

    def _accept(self, _events):
        self._connection, _ = self._listener.accept()
        self.loop.add_reader(self._connection.fileno(), self._read)

    def _read(self, _events):
        data = self._connection.recv(65536)
        if not data:
            self.loop.remove(self._connection.fileno())
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            frame = wire.decode(line)
            self.frames.append(frame)
            if frame.get("type") == "primitive" and frame.get("name") == PRIMITIVE:
                try:
                    reply = {"return": offer_credentials(self, frame["arguments"])}
                except (ParameterError, CredentialsError) as error:
                    reply = {"error": {"desc": str(error)}}
                self._connection.sendall(wire.encode(
                    dict({"type": "primitive-reply", "id": frame["id"]}, **reply)))

    def close(self):
        if self._connection is not None:
            self.loop.remove(self._connection.fileno())
            self._connection.close()
        self.loop.remove(self._listener.fileno())
        self._listener.close()


def install_extension(directory: Path) -> Path:
    """sso.py, the SDK and an entry point, readable by the extension's user."""
    bundle = directory / "bundle"
    bundle.mkdir(parents=True)
    shutil.copy(REPO / "extensions" / "ovirt_sso" / "sso.py", bundle / "sso.py")
    (bundle / "ovirt_agent").mkdir()  # sso.py's D-Bus client, as the bundle has it
    for name in ("__init__.py", "dbus.py"):
        shutil.copy(REPO / "extensions" / "ovirt_sso" / "ovirt_agent" / name,
                    bundle / "ovirt_agent" / name)
    shutil.copy(REPO / "qga" / "ext" / "sdk.py", bundle / "sdk.py")
    (bundle / "main.py").write_text(EXTENSION_MAIN)
    for path in (directory, *bundle.rglob("*"), bundle):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return bundle


def run_extension(bundle: Path, socket_path: str, bus_address: str, login: dict,
                  loop: Loop) -> dict:
    """The extension process handles one login while the loop serves the core's side."""
    # nobody cannot reach a Python under /root; the distribution's can be used.
    python = "/usr/bin/python3" if ROOT and os.path.exists("/usr/bin/python3") else sys.executable
    as_user = {"user": 65534, "group": 65534, "extra_groups": []} if ROOT else {}
    process = subprocess.Popen(
        [python, str(bundle / "main.py")], cwd=str(bundle),
        env={wire.ENV_NAME: "ovirt_sso", wire.ENV_SOCKET: socket_path,
             "DBUS_SYSTEM_BUS_ADDRESS": bus_address, "PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **as_user)
    process.stdin.write(json.dumps(login).encode() + b"\n")
    process.stdin.close()
    deadline = time.monotonic() + 20
    while process.poll() is None and time.monotonic() < deadline:
        loop.run_once(0.02)
    if process.poll() is None:
        process.kill()
    process.wait()
    out, err = process.stdout.read(), process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    assert process.returncode == 0, err.decode()
    return json.loads(out)


@pytest.fixture
def rig(short_tmp, tmp_path_factory):
    require_pam_tools()
    os.chmod(short_tmp, 0o755)
    modules = pam_modules(tmp_path_factory.mktemp("pam-build"))
    with contextlib.ExitStack() as cleanup:
        bus = PrivateSystemBus(short_tmp / "bus", extension_user="nobody" if ROOT else None)
        cleanup.callback(bus.stop)
        loop = Loop()
        cleanup.callback(loop.close)
        credentials = CredentialsServer(socket_path=str(short_tmp / "run" / "sso" / "cred.sock"),
                                        loop=loop, allowed_uids={os.geteuid()})
        cleanup.callback(credentials.close)
        core = CoreStandIn(loop, short_tmp, credentials)
        cleanup.callback(core.close)
        login_screen = dbus.Connection(bus.address, timeout=30)
        cleanup.callback(login_screen.close)
        login_screen.add_match(SIGNAL_MATCH, timeout=30)
        yield type("Rig", (), dict(modules=modules, bus=bus, loop=loop, credentials=credentials,
                                   core=core, bundle=install_extension(short_tmp / "ext"),
                                   login_screen=login_screen, directory=short_tmp))


def tokens_announced(login_screen):
    # A round trip: everything dispatched before now has arrived.
    login_screen.call_sync(dbus.BUS_NAME, dbus.BUS_PATH, dbus.BUS_NAME, "GetId", timeout=10)
    return [message.body[0] for message in login_screen.pending()
            if message.member == "UserAuthenticated"]


def login_from_host(rig, username, password):
    """VDSM's login arguments reach the extension; the token it announces."""
    result = run_extension(rig.bundle, rig.core.path, rig.bus.address,
                           {"username": username, "password": password}, rig.loop)
    assert result == {"outcome": [None], "uid": 65534 if ROOT else os.geteuid()}
    [token] = tokens_announced(rig.login_screen)
    return token


def pam_stack(rig, directory):
    if ROOT:
        return PamStack(directory, rig.modules.production,
                        f"socket={rig.credentials.socket_path}")
    return PamStack(directory, rig.modules.test, f"socket={rig.credentials.socket_path}",
                    f"server_uid={os.geteuid()}")


def test_a_host_login_signs_the_user_in(rig):
    token = login_from_host(rig, "alice@example.com", "s3cret wörd")
    [primitive] = [frame for frame in rig.core.frames if frame.get("type") == "primitive"]
    assert primitive["name"] == "sso-offer-credentials"
    assert primitive["arguments"]["user"] == "alice@example.com"

    result = run_pamtester(pam_stack(rig, rig.directory / "pam"), token, loop=rig.loop)
    assert result.succeeded, result.output
    assert result.handed_on == {"user": "alice@example.com", "password": "s3cret wörd"}

    # The token was good once.
    again = run_pamtester(pam_stack(rig, rig.directory / "pam2"), token, loop=rig.loop)
    assert not again.succeeded and again.handed_on is None


def test_a_second_login_supersedes_the_first(rig):
    first = login_from_host(rig, "alice", "one")
    second = login_from_host(rig, "bob", "two")
    stale = run_pamtester(pam_stack(rig, rig.directory / "pam1"), first, loop=rig.loop)
    assert not stale.succeeded
    fresh = run_pamtester(pam_stack(rig, rig.directory / "pam2"), second, loop=rig.loop)
    assert fresh.succeeded and fresh.handed_on == {"user": "bob", "password": "two"}


@pytest.mark.skipif(not ROOT, reason="needs a real account (useradd) and the installed module")
def test_the_login_screen_service_checks_the_real_password(rig):
    flavour = "debian" if os.path.exists("/etc/debian_version") else "fedora"
    with account_with_password() as (name, password):
        token = login_from_host(rig, name, password)
        stack = contrib_stack(rig.directory / "pam", rig.modules.production,
                              rig.credentials.socket_path, flavour)
        result = run_pamtester(stack, token, loop=rig.loop)
        assert result.succeeded, result.output

        token = login_from_host(rig, name, "wrong-" + password)
        stack = contrib_stack(rig.directory / "pam-wrong", rig.modules.production,
                              rig.credentials.socket_path, flavour)
        result = run_pamtester(stack, token, loop=rig.loop)
        assert not result.succeeded and "Authentication failure" in result.output


def test_a_login_the_core_refuses_announces_nothing(rig):
    result = run_extension(rig.bundle, rig.core.path, rig.bus.address,
                           {"username": "alice", "password": "nul\0inside"}, rig.loop)
    [error] = result["outcome"]
    assert "the core cannot hold the credentials" in error and "NUL" in error
    assert tokens_announced(rig.login_screen) == []
    assert not rig.credentials.pending()
