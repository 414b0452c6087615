"""Single sign-on from the host, through the real agent: login -> signal -> PAM -> success.

Every part is the real one.  A private system bus (``dbus-daemon`` with the
distribution's system policy and ``contrib/dbus``'s) runs before the agent,
as on a real guest; the agent (root) is told its address as the service
manager would tell it.  The host pushes the signed oVirt bundle over the
agent channel; the agent creates the extension's user, has the bus reload
its policy (which names that user), starts the extension unprivileged, and
relays the ``ovirt-guest-agent.0`` port (a pty here) to it.  VDSM sends
``login`` on that port; the login screen, a subscriber on the bus, receives
``UserAuthenticated(token)`` and hands the token to ``pamtester`` running the
PAM service ``gdm-ovirtcred`` with the installed build of ``native/``'s
module, which fetches the credentials from the core's root-only socket.  With
the service of ``contrib/pam.d``, ``pam_unix`` then checks the password of a
real account.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from qga.host.client import Client
from tests.support.agents import our_agent
from tests.support.ext_hello import agent_config
from tests.support.fake_vdsm import PtyVdsm
from tests.support.ovirt_bundle import NAME, pty_port, signed_bundle
from tests.support.sso import (PamStack, PrivateSystemBus, account_with_password,
                               contrib_stack, pam_modules, require_pam_tools, run_pamtester)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "extensions" / "ovirt_sso"))
from ovirt_agent import dbus  # noqa: E402  (the login screen's client)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the core's credentials socket"
                                " serves root only, and the extension needs its own user")

CREDENTIALS = "org.ovirt.vdsm.Credentials"
SIGNAL_MATCH = (f"type='signal',sender='{CREDENTIALS}',path='/org/ovirt/vdsm/Credentials',"
                f"interface='{CREDENTIALS}',member='UserAuthenticated'")


class Guest:
    """The guest's side: bus, agent with the oVirt extension, login screen, VDSM's port."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.bus = PrivateSystemBus(workdir / "bus")
        self.master = pty_port(workdir)
        bundle = signed_bundle(workdir)
        env = agent_config(workdir, workdir / "trust.d")
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus.address
        self.agent = our_agent(workdir, ["-v"], env=env).start()
        self.client = Client(self.agent.sock, timeout=60)
        self.client.push(str(bundle))
        self.vdsm = PtyVdsm(self.master)
        self.login_screen = dbus.Connection(self.bus.address, timeout=30)
        self.login_screen.add_match(SIGNAL_MATCH, timeout=30)
        self.credentials_socket = str(workdir / "run" / "sso" / "cred.sock")

    def name_owner_uid(self, timeout: float = 30) -> int:
        """The uid of whoever owns the credentials name, once someone does."""
        deadline = time.monotonic() + timeout
        while True:
            self.vdsm.pump(0.1)
            try:
                (owner,) = self._bus_call("GetNameOwner", "s", CREDENTIALS)
                (uid,) = self._bus_call("GetConnectionUnixUser", "s", owner)
                return uid
            except dbus.DBusError:
                if time.monotonic() > deadline:
                    raise

    def _bus_call(self, member: str, signature: str, *arguments):
        return self.login_screen.call_sync(dbus.BUS_NAME, dbus.BUS_PATH, dbus.BUS_NAME, member,
                                           signature, *arguments, timeout=10)

    def login(self, username: str, password: str, timeout: float = 20) -> str:
        """VDSM's ``login``; the token the login screen receives."""
        self.vdsm.forward("login", {"username": username, "password": password})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.vdsm.pump(0.05)       # the extension's reports keep flowing meanwhile
            tokens = [message.body[0] for message in self.login_screen.pending()
                      if message.member == "UserAuthenticated"]
            if tokens:
                [token] = tokens
                return token
        raise AssertionError("no UserAuthenticated signal; agent log:\n" + self.agent.stderr())

    def close(self) -> None:
        self.login_screen.close()
        self.client.close()
        self.agent.stop()
        os.close(self.master)
        self.bus.stop()


@pytest.fixture
def guest(ovirt_workdir):
    require_pam_tools()
    guest = Guest(ovirt_workdir)
    yield guest
    guest.close()


def test_a_login_on_the_ovirt_channel_signs_the_user_in(guest, tmp_path_factory):
    modules = pam_modules(tmp_path_factory.mktemp("pam-build"))
    extension_uid = guest.name_owner_uid()
    status = guest.client.ext_status(NAME)
    assert status["state"] == "running"
    assert extension_uid != 0 and f"Uid:\t{extension_uid}\t" in \
        Path(f"/proc/{status['pid']}/status").read_text()
    assert "reloaded its configuration for the new user" in guest.agent.stderr()

    token = guest.login("alice@example.com", "s3cret wörd")
    stack = PamStack(guest.workdir / "pam", modules.production,
                     f"socket={guest.credentials_socket}")
    result = run_pamtester(stack, token)
    assert result.succeeded, result.output
    assert result.handed_on == {"user": "alice@example.com", "password": "s3cret wörd"}
    again = run_pamtester(PamStack(guest.workdir / "pam-again", modules.production,
                                   f"socket={guest.credentials_socket}"), token)
    assert not again.succeeded and again.handed_on is None

    # The login screen's real service: pam_unix checks the password of a real account.
    flavour = "debian" if os.path.exists("/etc/debian_version") else "fedora"
    with account_with_password() as (name, password):
        token = guest.login(name, password)
        result = run_pamtester(contrib_stack(guest.workdir / "pam-unix", modules.production,
                                             guest.credentials_socket, flavour), token)
        assert result.succeeded, result.output

    log = guest.agent.stderr()
    assert "s3cret" not in log and password not in log and token not in log
    assert "single sign-on: credentials for alice@example.com" in log
    assert guest.client.call("guest-ping") == {}
