"""The extension's side of single sign-on on a real, private D-Bus system bus.

dbus-daemon runs with the distribution's system bus policy plus
contrib/dbus/org.ovirt.vdsm.Credentials.conf; subscribers are separate
connections (as the login screen is), some as other users.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extensions" / "ovirt_sso"))

import sso  # noqa: E402
from ovirt_agent import dbus  # noqa: E402
from qga.ext.sdk import Loop  # noqa: E402
from tests.support.sso import PrivateSystemBus  # noqa: E402

ROOT = os.geteuid() == 0
MATCH = ("type='signal',sender='org.ovirt.vdsm.Credentials',path='/org/ovirt/vdsm/Credentials',"
         "interface='org.ovirt.vdsm.Credentials',member='UserAuthenticated'")


@pytest.fixture
def bus(short_tmp):
    os.chmod(short_tmp, 0o711)  # other users reach the bus socket
    # When root, "nobody" stands in for the extension's user qga-ext-ovirt-guest-agent.
    bus = PrivateSystemBus(short_tmp / "bus", extension_user="nobody" if ROOT else None)
    yield bus
    bus.stop()


@pytest.fixture
def announcer(bus):
    announcer = sso.CredentialsAnnouncer(address=bus.address)
    yield announcer
    announcer.close()


def bus_call(connection, member, signature="", *arguments):
    """A call to the bus itself; its reply's values."""
    return connection.call_sync(dbus.BUS_NAME, dbus.BUS_PATH, dbus.BUS_NAME, member,
                                signature, *arguments, timeout=10)


def subscriber(bus, rule=MATCH):
    """A login screen's connection: subscribed to the signal from the name."""
    connection = dbus.Connection(bus.address, timeout=10)
    connection.add_match(rule)
    return connection


def signals(connection, member="UserAuthenticated"):
    """The signals ``member`` that reached ``connection`` so far (after a round trip,
    so everything the bus dispatched before now has arrived)."""
    bus_call(connection, "GetId")
    return [message for message in connection.pending()
            if message.kind == dbus.SIGNAL and message.member == member]


def test_the_policy_names_the_user_the_oVirt_extension_runs_as():
    from qga.ext.launch import user_name
    from tests.support.sso import EXTENSION_USER, POLICY

    manifest = json.loads((Path(sso.__file__).parent / "manifest.json").read_text())
    assert user_name(manifest["name"]) == EXTENSION_USER
    assert f'<policy user="{EXTENSION_USER}">' in POLICY.read_text()


def test_the_token_reaches_a_subscriber_of_the_name(bus, announcer):
    login_screen = subscriber(bus)
    announcer.announce("the-token")
    [signal] = signals(login_screen)
    assert signal.path == "/org/ovirt/vdsm/Credentials"
    assert signal.interface == "org.ovirt.vdsm.Credentials"
    assert signal.signature == "s"
    assert signal.body == ("the-token",)
    assert signal.sender == announcer.owner
    login_screen.close()


def test_the_name_stays_owned_between_logins(bus, announcer):
    login_screen = subscriber(bus)
    for token in ("first", "second", "third"):
        announcer.announce(token)
    assert [signal.body[0] for signal in signals(login_screen)] == ["first", "second", "third"]
    assert bus_call(login_screen, "GetNameOwner", "s", sso.BUS_NAME) == (announcer.owner,)
    announcer.close()
    # The bus notices the closed connection on its own time: the name is
    # released soon after, not necessarily before our next call.
    deadline = time.monotonic() + 5
    while bus_call(login_screen, "NameHasOwner", "s", sso.BUS_NAME) != (False,):
        assert time.monotonic() < deadline, "the name stayed owned after the announcer closed"
        time.sleep(0.01)
    login_screen.close()


def test_nothing_is_emitted_when_another_process_owns_the_name(bus):
    squatter = dbus.Connection(bus.address)
    assert bus_call(squatter, "RequestName", "su", sso.BUS_NAME, sso.DO_NOT_QUEUE) == (1,)
    watcher = subscriber(bus, "type='signal',interface='org.ovirt.vdsm.Credentials'")
    announcer = sso.CredentialsAnnouncer(address=bus.address)
    with pytest.raises(dbus.DBusError, match="owned by another process"):
        announcer.announce("the-token")
    assert signals(watcher) == []
    squatter.close()
    watcher.close()


def test_an_unreachable_bus_fails_at_once(short_tmp):
    announcer = sso.CredentialsAnnouncer(address=f"unix:path={short_tmp}/no-bus")
    started = time.monotonic()
    with pytest.raises(dbus.DBusError, match="cannot connect to the bus"):
        announcer.announce("the-token")
    assert time.monotonic() - started < 1


def test_an_address_list_is_tried_in_turn(bus, short_tmp):
    login_screen = subscriber(bus)
    announcer = sso.CredentialsAnnouncer(address=f"unix:path={short_tmp}/no-bus;{bus.address}")
    try:
        announcer.announce("via-the-second-entry")
        assert [signal.body for signal in signals(login_screen)] == [("via-the-second-entry",)]
    finally:
        announcer.close()
        login_screen.close()


def test_the_announcer_comes_back_after_the_bus_restarts(short_tmp):
    first = PrivateSystemBus(short_tmp / "bus")
    announcer = sso.CredentialsAnnouncer(address=first.address)
    try:
        announcer.announce("before")
        first.stop()
        second = PrivateSystemBus(short_tmp / "bus")  # same socket path
        try:
            login_screen = subscriber(second)
            announcer.announce("after")
            assert [signal.body for signal in signals(login_screen)] == [("after",)]
            login_screen.close()
        finally:
            second.stop()
    finally:
        announcer.close()
        first.stop()


def call_in_thread(bus, loop, interface, member):
    """A method call from another connection while ``loop`` serves the announcer."""
    result = {}

    def caller():
        connection = dbus.Connection(bus.address, timeout=5)
        try:
            result["reply"] = connection.call_sync(sso.BUS_NAME, sso.OBJECT_PATH, interface,
                                                   member, timeout=5)
        except dbus.DBusError as error:
            result["error"] = str(error)
        finally:
            connection.close()

    thread = threading.Thread(target=caller)
    thread.start()
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        loop.run_once(0.02)  # a thread's end does not wake the loop: poll
    thread.join()
    return result


def test_while_idle_it_answers_introspection_and_refuses_the_rest(bus):
    loop = Loop()
    announcer = sso.CredentialsAnnouncer(loop=loop, address=bus.address)
    try:
        announcer.connect()
        [xml] = call_in_thread(bus, loop, "org.freedesktop.DBus.Introspectable",
                               "Introspect")["reply"]
        assert '<signal name="UserAuthenticated">' in xml and 'type="s"' in xml
        assert call_in_thread(bus, loop, "org.freedesktop.DBus.Peer", "Ping") == {"reply": ()}
        refused = call_in_thread(bus, loop, "org.freedesktop.DBus.Introspectable", "Nope")
        assert "UnknownMethod" in refused["error"]
        # Calls the policy does not allow never reach us.
        refused = call_in_thread(bus, loop, "org.ovirt.vdsm.Credentials", "Login")
        assert "AccessDenied" in refused["error"]
    finally:
        announcer.close()
        loop.close()


def run_as(uid, function):
    """Run ``function()`` in a child process as ``uid``; its return value (a string)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(write_fd, function().encode())
            status = 0
        except BaseException as error:  # reported to the parent
            os.write(write_fd, f"{type(error).__name__}: {error}".encode())
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        output = pipe.read().decode()
    os.waitpid(pid, 0)
    return output


@pytest.mark.skipif(not ROOT, reason="switches users")
def test_only_the_extensions_user_and_root_may_own_the_name(bus):
    login_screen = subscriber(bus)

    def announce(token):
        def run():
            announcer = sso.CredentialsAnnouncer(address=bus.address)
            announcer.announce(token)
            announcer.close()
            return "announced"
        return run

    assert run_as(65534, announce("from-the-extension-user")) == "announced"
    refused = run_as(1, announce("from-someone-else"))
    assert "AccessDenied" in refused and "RequestName" in refused
    assert [signal.body[0] for signal in signals(login_screen)] == ["from-the-extension-user"]
    login_screen.close()


@pytest.mark.skipif(not ROOT, reason="switches users")
def test_any_user_receives_the_signal(bus, announcer):
    ready_r, ready_w = os.pipe()

    def listen():
        connection = dbus.Connection(bus.address, timeout=10)
        connection.add_match(MATCH)
        os.write(ready_w, b"x")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for message in connection.receive(deadline - time.monotonic()):
                if message.member == "UserAuthenticated":
                    return message.body[0]
        return "no signal"

    result = {}
    thread = threading.Thread(target=lambda: result.update(token=run_as(1, listen)))
    thread.start()
    ready = select.select([ready_r], [], [], 10)[0]
    if ready:
        os.read(ready_r, 1)
        announcer.announce("for-everyone")
    thread.join(15)
    os.close(ready_r)
    os.close(ready_w)
    assert ready and result == {"token": "for-everyone"}, result


@pytest.mark.skipif(shutil.which("gdbus") is None, reason="gdbus (libglib2.0-bin) is not here")
def test_a_gdbus_client_that_follows_the_owner_sees_every_token(bus):
    """GLib's clients (gnome-shell's proxy, gdbus monitor) follow the name's owner."""
    loop = Loop()
    context = type("Context", (), {"loop": loop})()
    context.sso_announcer = sso.CredentialsAnnouncer(loop=loop, address=bus.address)
    sso.start(context)  # owns the name from the extension's start
    monitor = subprocess.Popen(["gdbus", "monitor", "--address", bus.address, "--dest",
                                sso.BUS_NAME, "--object-path", sso.OBJECT_PATH],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert monitor.stdout.readline().startswith("Monitoring signals")
        assert "is owned by" in monitor.stdout.readline()
        # gdbus subscribes to the owner's signals once it has seen the owner,
        # a moment after that line: announce until it reports one.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            context.sso_announcer.announce("probe")
            if select.select([monitor.stdout], [], [], 0.2)[0]:
                break
        assert "('probe',)" in monitor.stdout.readline()
        for token in ("one", "two", "three"):
            context.sso_announcer.announce(token)
        lines = []
        while len(lines) < 3:
            line = monitor.stdout.readline()
            if "('probe',)" not in line:
                lines.append(line)
    finally:
        monitor.kill()
        monitor.wait()
        monitor.stdout.close()
        context.sso_announcer.close()
        loop.close()
    assert lines == [f"{sso.OBJECT_PATH}: org.ovirt.vdsm.Credentials.UserAuthenticated "
                     f"('{token}',)\n" for token in ("one", "two", "three")]


# -- handle_login, with a stand-in for the core's primitive ---------------------------------


class FakeExtension:
    """What handle_login needs of sdk.Extension: a loop and primitive()."""

    def __init__(self, loop, answer):
        self.loop = loop
        self.answer = answer
        self.asked = []

    def primitive(self, name, arguments, callback):
        self.asked.append((name, arguments))
        self.loop.call_soon(lambda: callback(*self.answer))


def login(extension, bus, credentials):
    done = []
    if bus is not None:
        extension.sso_announcer = sso.CredentialsAnnouncer(loop=extension.loop,
                                                           address=bus.address)
    sso.handle_login(credentials, extension, on_done=done.append)
    extension.loop.run_until(lambda: done, timeout=10)
    return done


def test_handle_login_asks_the_core_then_announces(bus, caplog):
    caplog.set_level(logging.DEBUG)
    loop = Loop()
    extension = FakeExtension(loop, ({"token": "core-token"}, None))
    login_screen = subscriber(bus)
    try:
        assert login(extension, bus, {"username": "alice@corp", "password": "pw-secret"}) == [None]
        assert extension.asked == [("sso-offer-credentials", {
            "user": "alice@corp", "password": "pw-secret", "token-ttl": 5})]
        assert [signal.body for signal in signals(login_screen)] == [("core-token",)]
        assert "alice@corp" in caplog.text
        assert "pw-secret" not in caplog.text and "core-token" not in caplog.text
    finally:
        extension.sso_announcer.close()
        login_screen.close()
        loop.close()


@pytest.mark.parametrize("credentials, answer, expected", [
    ({"username": "alice", "password": "pw"}, (None, "permission denied"),
     "the core cannot hold the credentials: permission denied"),
    ({"username": "alice", "password": "pw"}, ({}, None), "the core answered no token"),
    ({"username": "alice", "password": "pw"}, ({"token": ""}, None), "the core answered no token"),
    ({"username": "alice"}, None, "login needs a user name and a password; ignored"),
    ({"username": "", "password": "pw"}, None, "login needs a user name and a password; ignored"),
    ({"username": 5, "password": "pw"}, None, "login needs a user name and a password; ignored"),
])
def test_handle_login_failures_are_reported(credentials, answer, expected, caplog):
    loop = Loop()
    extension = FakeExtension(loop, answer)
    try:
        assert login(extension, None, credentials) == [expected]
        assert expected in caplog.text
        assert bool(extension.asked) == (answer is not None)
    finally:
        loop.close()


def test_handle_login_without_a_bus(short_tmp):
    loop = Loop()
    extension = FakeExtension(loop, ({"token": "core-token"}, None))
    extension.sso_announcer = sso.CredentialsAnnouncer(address=f"unix:path={short_tmp}/no-bus")
    try:
        done = []
        sso.handle_login({"username": "alice", "password": "pw"}, extension, on_done=done.append)
        loop.run_until(lambda: done, timeout=10)
        assert len(done) == 1 and done[0].startswith("cannot announce the login on the system bus")
    finally:
        loop.close()
