"""The core's single sign-on credentials socket, on a real event loop, with real clients.

Clients run in threads (blocking sockets, as the PAM module is); the test's
own thread runs the agent's loop, so the server sees only one thread.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import threading
import time

import pytest

from qga.errors import CommandError, CredentialsError, ParameterError
from qga.ext import credentials
from qga.ext.credentials import CredentialsServer, build_blob, offer_credentials
from qga.loop import Loop


class Ctx:
    """Just what the primitive needs of qga.commands.Context: a loop and services."""

    def __init__(self, server):
        self.loop = server._loop
        self._server = server

    def service(self, cls):
        assert cls is CredentialsServer
        return self._server


@pytest.fixture
def loop():
    loop = Loop()
    yield loop
    loop.close()


@pytest.fixture
def sock_path(short_tmp):
    return str(short_tmp / "sso" / "cred.sock")


@pytest.fixture
def server(loop, sock_path):
    server = CredentialsServer(socket_path=sock_path, loop=loop, allowed_uids={os.geteuid()})
    yield server
    server.close()


def fetch(loop, path, token, half_close=True, timeout=5.0):
    """Run a PAM-module-like client in a thread while the loop runs; its answer."""
    result = {}

    def client():
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(path)
                sock.sendall(token.encode() if isinstance(token, str) else token)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                data = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                result["data"] = data
        except OSError as error:
            result["error"] = error

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + timeout + 1
    while thread.is_alive() and time.monotonic() < deadline:
        loop.run_once(0.02)
    thread.join()
    return result


def refused(answer):
    """Closed without a byte (a reset or a broken pipe when the server closed first)."""
    return answer.get("data") == b"" or isinstance(answer.get("error"),
                                                   (ConnectionResetError, BrokenPipeError))


def parse_blob(blob):
    (user_len,) = struct.unpack(">I", blob[:4])
    assert blob[-1:] == b"\0"
    return blob[4:4 + user_len].decode(), blob[4 + user_len:-1].decode()


def test_the_blob_is_the_original_agents_format():
    blob = build_blob("alice@example.com", "pä$$")
    assert bytes(blob) == b"\x00\x00\x00\x11alice@example.comp\xc3\xa4$$\x00"


def test_the_right_token_gets_the_credentials_once(loop, server, sock_path):
    token = server.offer("alice", "s3cret", "example.com")
    assert len(token) >= 43 and token.isascii()
    info = os.lstat(sock_path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(os.path.dirname(sock_path)).st_mode) == 0o700

    answer = fetch(loop, sock_path, token)
    assert parse_blob(answer["data"]) == ("alice@example.com", "s3cret")
    # Forgotten at once: no offer, no socket; the same token again finds nothing.
    assert not server.pending()
    assert not os.path.exists(sock_path)
    assert isinstance(fetch(loop, sock_path, token).get("error"), FileNotFoundError)


def test_a_replayed_token_is_refused_while_a_newer_offer_waits(loop, server, sock_path):
    first = server.offer("alice", "one")
    assert parse_blob(fetch(loop, sock_path, first)["data"]) == ("alice", "one")
    second = server.offer("bob", "two")
    assert fetch(loop, sock_path, first) == {"data": b""}
    assert parse_blob(fetch(loop, sock_path, second)["data"]) == ("bob", "two")


def test_a_wrong_token_gets_nothing_and_the_offer_stays(loop, server, sock_path):
    token = server.offer("alice", "s3cret")
    assert fetch(loop, sock_path, "not-the-token") == {"data": b""}
    assert fetch(loop, sock_path, token[:-1]) == {"data": b""}
    assert fetch(loop, sock_path, token + "x") == {"data": b""}
    assert server.pending()
    assert parse_blob(fetch(loop, sock_path, token)["data"]) == ("alice", "s3cret")


def test_a_newer_offer_replaces_the_older(loop, server, sock_path):
    old = server.offer("alice", "old")
    old_blob = server._offer.blob
    new = server.offer("alice", "new")
    assert old != new
    assert old_blob == bytearray(len(old_blob))  # wiped when replaced
    assert fetch(loop, sock_path, old) == {"data": b""}
    assert parse_blob(fetch(loop, sock_path, new)["data"]) == ("alice", "new")


def test_an_offer_expires_and_the_socket_goes_away(loop, server, sock_path):
    token = server.offer("alice", "s3cret", ttl=0.2)
    blob = server._offer.blob
    deadline = time.monotonic() + 2
    while server.pending() and time.monotonic() < deadline:
        loop.run_once(0.05)
    assert not server.pending()
    assert blob == bytearray(len(blob))
    assert not os.path.exists(sock_path)
    assert isinstance(fetch(loop, sock_path, token).get("error"), FileNotFoundError)


def test_an_expired_offer_is_refused_even_before_its_timer_runs(loop, sock_path):
    now = [1000.0]
    server = CredentialsServer(socket_path=sock_path, loop=loop,
                               allowed_uids={os.geteuid()}, clock=lambda: now[0])
    try:
        token = server.offer("alice", "s3cret", ttl=30)
        now[0] += 30
        assert fetch(loop, sock_path, token) == {"data": b""}
    finally:
        server.close()


def test_the_blob_is_wiped_once_served(loop, server, sock_path):
    token = server.offer("alice", "s3cret")
    blob = server._offer.blob
    assert b"s3cret" in blob
    fetch(loop, sock_path, token)
    assert blob == bytearray(len(blob))


def test_a_peer_of_another_uid_is_refused(loop, sock_path):
    server = CredentialsServer(socket_path=sock_path, loop=loop, allowed_uids={0xFFFF0})
    try:
        token = server.offer("alice", "s3cret")
        assert refused(fetch(loop, sock_path, token))
        assert server.pending()  # a refused peer does not use up the offer
    finally:
        server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_only_root_may_connect_by_default(loop, sock_path, short_tmp):
    server = CredentialsServer(socket_path=sock_path, loop=loop)  # root only
    try:
        token = server.offer("alice", "s3cret")
        # Opened up on purpose, so the peer check itself is what refuses.
        os.chmod(short_tmp, 0o711)
        os.chmod(os.path.dirname(sock_path), 0o711)
        os.chmod(sock_path, 0o666)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: nobody, tries to fetch
            status = 3
            try:
                os.close(read_fd)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(sock_path)
                    try:
                        sock.sendall(token.encode())
                        sock.shutdown(socket.SHUT_WR)
                        answer = sock.recv(4096)
                    except (BrokenPipeError, ConnectionResetError):
                        answer = b""  # closed on us: refused
                    os.write(write_fd, b"got:" + answer)
                status = 0
            except BaseException as error:  # reported through the pipe
                os.write(write_fd, repr(error).encode())
            finally:
                os._exit(status)
        os.close(write_fd)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            loop.run_once(0.02)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        output = os.read(read_fd, 4096)
        os.close(read_fd)
        assert done and os.waitstatus_to_exitcode(status) == 0, output
        assert output == b"got:"
        assert server.pending()
    finally:
        server.close()


def test_an_overlong_token_is_dropped(loop, server, sock_path):
    server.offer("alice", "s3cret")
    answer = fetch(loop, sock_path, "x" * (credentials.MAX_TOKEN_LENGTH + 1), half_close=False)
    assert refused(answer)
    assert server.pending()


def test_a_silent_client_is_dropped(loop, server, sock_path, monkeypatch):
    monkeypatch.setattr(credentials, "CONNECTION_TIMEOUT", 0.2)
    server.offer("alice", "s3cret")
    started = time.monotonic()
    answer = fetch(loop, sock_path, b"", half_close=False)
    assert answer == {"data": b""}
    assert time.monotonic() - started < 2
    assert server.pending()


def test_the_directory_must_be_closed_to_others(loop, short_tmp):
    directory = short_tmp / "open"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    server = CredentialsServer(socket_path=str(directory / "cred.sock"), loop=loop)
    with pytest.raises(CredentialsError, match="open to others"):
        server.offer("alice", "s3cret")
    assert not server.pending()


def test_the_directory_must_not_be_a_link(loop, short_tmp):
    real = short_tmp / "real"
    real.mkdir(mode=0o700)
    (short_tmp / "link").symlink_to(real)
    server = CredentialsServer(socket_path=str(short_tmp / "link" / "cred.sock"), loop=loop)
    with pytest.raises(CredentialsError, match="not a directory"):
        server.offer("alice", "s3cret")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_the_directory_must_be_the_agents(loop, short_tmp):
    directory = short_tmp / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    server = CredentialsServer(socket_path=str(directory / "cred.sock"), loop=loop)
    with pytest.raises(CredentialsError, match="owned by uid 65534"):
        server.offer("alice", "s3cret")


def test_a_stale_socket_is_replaced_but_not_a_file(loop, sock_path):
    os.makedirs(os.path.dirname(sock_path), mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()
    server = CredentialsServer(socket_path=sock_path, loop=loop, allowed_uids={os.geteuid()})
    token = server.offer("alice", "s3cret")
    assert parse_blob(fetch(loop, sock_path, token)["data"]) == ("alice", "s3cret")

    with open(sock_path, "w") as file:
        file.write("not a socket")
    with pytest.raises(CredentialsError, match="cannot listen"):
        server.offer("alice", "s3cret")
    assert open(sock_path).read() == "not a socket"


def test_an_offer_needs_the_loop(sock_path):
    with pytest.raises(CredentialsError, match="event loop"):
        CredentialsServer(socket_path=sock_path).offer("alice", "s3cret")


def test_close_forgets_and_removes(loop, server, sock_path):
    server.offer("alice", "s3cret")
    blob = server._offer.blob
    server.close()
    assert blob == bytearray(len(blob))
    assert not os.path.exists(sock_path)


def test_the_primitive(loop, server, sock_path):
    ctx = Ctx(server)
    reply = offer_credentials(ctx, {"user": "alice", "password": "s3cret",
                                    "domain": "example.com", "token-ttl": 10})
    assert set(reply) == {"token"}
    assert parse_blob(fetch(loop, sock_path, reply["token"])["data"]) == \
        ("alice@example.com", "s3cret")
    reply = offer_credentials(ctx, {"user": "bob@corp", "password": ""})
    assert parse_blob(fetch(loop, sock_path, reply["token"])["data"]) == ("bob@corp", "")


@pytest.mark.parametrize("arguments, message", [
    ([], "must be an object"),
    ({"password": "x"}, "'user' must be a string"),
    ({"user": "", "password": "x"}, "must not be empty"),
    ({"user": "alice"}, "'password' must be a string"),
    ({"user": "alice", "password": 5}, "'password' must be a string"),
    ({"user": "al\0ice", "password": "x"}, "NUL"),
    ({"user": "alice", "password": "x\0y"}, "NUL"),
    ({"user": "alice", "password": "x", "domain": 3}, "'domain' must be a string"),
    ({"user": "alice", "password": "x", "token-ttl": 0}, "token-ttl"),
    ({"user": "alice", "password": "x", "token-ttl": 61}, "token-ttl"),
    ({"user": "alice", "password": "x", "token-ttl": True}, "token-ttl"),
    ({"user": "alice", "password": "x", "token-ttl": "5"}, "token-ttl"),
    ({"user": "alice", "password": "x", "extra": 1}, "unexpected argument 'extra'"),
    ({"user": "alice", "password": "x" * 5000}, "exceed"),
])
def test_the_primitive_refuses_bad_arguments(loop, server, arguments, message):
    with pytest.raises(ParameterError, match=message):
        offer_credentials(Ctx(server), arguments)
    assert not server.pending()


def test_tokens_and_passwords_never_reach_the_log(loop, server, sock_path, caplog):
    caplog.set_level(logging.DEBUG, logger="qga")
    password = "pw-that-must-not-leak"
    tokens = [server.offer("alice", password, ttl=0.1)]
    time.sleep(0.15)
    loop.run_once(0.05)                           # expired
    tokens.append(server.offer("alice", password))
    fetch(loop, sock_path, "wrong")               # wrong token
    fetch(loop, sock_path, tokens[-1])            # served
    text = caplog.text
    assert "alice" in text and "expired" in text and "wrong token" in text
    assert password not in text
    for token in tokens:
        assert token not in text


def test_the_socket_lives_below_the_configured_runtime_dir(loop, short_tmp):
    from qga.config import Config

    class AgentCtx:
        config = Config()
        def __init__(self):
            self.loop = loop
            self.config.runtime_dir = str(short_tmp / "run")
            self._services = {}
        def service(self, cls):
            return self._services.setdefault(cls, cls(self))

    ctx = AgentCtx()
    reply = offer_credentials(ctx, {"user": "alice", "password": "s3cret"})
    server = ctx.service(CredentialsServer)
    try:
        assert server.socket_path == str(short_tmp / "run" / "sso" / "cred.sock")
        assert parse_blob(fetch(loop, server.socket_path, reply["token"])["data"]) == \
            ("alice", "s3cret")
    finally:
        server.close()
    assert CredentialsServer().socket_path == credentials.DEFAULT_SOCKET_PATH
    assert Config().runtime_dir + "/sso/cred.sock" == credentials.DEFAULT_SOCKET_PATH


def test_a_socket_that_cannot_be_set_up_is_a_command_error(loop, short_tmp, caplog):
    directory = short_tmp / "open"
    directory.mkdir()
    os.chmod(directory, 0o777)
    server = CredentialsServer(socket_path=str(directory / "cred.sock"), loop=loop)
    with pytest.raises(CommandError, match="single sign-on: .* is open to others"):
        offer_credentials(Ctx(server), {"user": "alice", "password": "s3cret"})
    assert "open to others" in caplog.text
