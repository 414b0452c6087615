"""pam_ovirt_cred.so for real: pamtester under pam_wrapper, against the core's
credentials server (qga.ext.credentials) or a fake server that says what a test wants.

``make -C native check`` runs this file with the modules it built.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time

import pytest

from qga.ext.credentials import CredentialsServer, DEFAULT_SOCKET_PATH
from qga.loop import Loop
from tests.support.sso import (NATIVE, FakeServer, PamStack, account_with_password,
                               contrib_stack, pam_modules, require, require_pam_tools,
                               run_pamtester, system_pam_module)

ROOT = os.geteuid() == 0
# pam_strerror texts pamtester prints for the codes the module returns.
USER_UNKNOWN = "User not known to the underlying authentication module"
CRED_UNAVAIL = "Authentication service cannot retrieve user credentials"
SERVICE_ERR = "Error in service module"


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    require_pam_tools()
    return pam_modules(tmp_path_factory.mktemp("pam-build"))


@pytest.fixture
def loop():
    loop = Loop()
    yield loop
    loop.close()


@pytest.fixture
def server(loop, short_tmp):
    server = CredentialsServer(socket_path=str(short_tmp / "sso" / "cred.sock"), loop=loop,
                               allowed_uids={os.geteuid()})
    yield server
    server.close()


def stack_for(directory, modules, socket_path, *arguments):
    """The installed module when we are root (the server is then root too);
    otherwise the test build, told to trust our own uid."""
    if ROOT:
        return PamStack(directory, modules.production, f"socket={socket_path}", *arguments)
    return PamStack(directory, modules.test, f"socket={socket_path}",
                    f"server_uid={os.geteuid()}", *arguments)


@pytest.fixture
def stack(modules, server, short_tmp):
    return stack_for(short_tmp / "pam", modules, server.socket_path)


def blob(user: bytes, password: bytes) -> bytes:
    return struct.pack(">I", len(user)) + user + password + b"\0"


def test_the_right_token_hands_on_user_and_password(loop, server, stack):
    token = server.offer("alice", "s3cret wörd")
    result = run_pamtester(stack, token, loop=loop)
    assert result.succeeded, result.output
    assert "Token?" in result.output
    assert result.handed_on == {"user": "alice", "password": "s3cret wörd"}
    assert not server.pending()


def test_a_login_screen_that_already_names_the_same_user(loop, server, stack):
    token = server.offer("alice", "s3cret")
    result = run_pamtester(stack, token, user="alice", loop=loop)
    assert result.succeeded, result.output
    assert result.handed_on == {"user": "alice", "password": "s3cret"}


def test_a_different_user_already_named_is_refused(loop, server, stack):
    token = server.offer("alice", "s3cret")
    result = run_pamtester(stack, token, user="bob", loop=loop)
    assert not result.succeeded
    assert CRED_UNAVAIL in result.output
    assert "credentials are for alice but this conversation is for bob" in result.stderr
    assert result.handed_on is None


def test_a_wrong_token_is_refused_and_the_right_one_still_works(loop, server, stack):
    token = server.offer("alice", "s3cret")
    wrong = run_pamtester(stack, "A" * len(token), loop=loop)
    assert not wrong.succeeded
    assert USER_UNKNOWN in wrong.output and "the agent refused the token" in wrong.stderr
    assert wrong.handed_on is None
    right = run_pamtester(stack, token, loop=loop)
    assert right.succeeded, right.output


def test_a_replayed_token_is_refused(loop, server, stack):
    token = server.offer("alice", "s3cret")
    assert run_pamtester(stack, token, loop=loop).succeeded
    replay = run_pamtester(stack, token, loop=loop)
    assert not replay.succeeded and USER_UNKNOWN in replay.output
    assert "cannot reach the agent" in replay.stderr  # the socket is gone
    # Also while a newer login waits.
    server.offer("alice", "s3cret")
    replay = run_pamtester(stack, token, loop=loop)
    assert not replay.succeeded and "the agent refused the token" in replay.stderr
    assert replay.handed_on is None


def test_an_expired_token_is_refused(loop, server, stack):
    token = server.offer("alice", "s3cret", ttl=0.2)
    while server.pending():
        loop.run_once(0.05)
    result = run_pamtester(stack, token, loop=loop)
    assert not result.succeeded and USER_UNKNOWN in result.output
    assert result.handed_on is None


def test_no_token_at_all(loop, server, stack):
    server.offer("alice", "s3cret")
    result = run_pamtester(stack, "", loop=loop)
    assert not result.succeeded and USER_UNKNOWN in result.output
    assert "is not a token" in result.stderr
    assert server.pending()  # the module did not even connect


def test_an_overlong_answer_is_not_a_token(loop, server, stack):
    server.offer("alice", "s3cret")
    result = run_pamtester(stack, "x" * 257, loop=loop)
    assert not result.succeeded and "is not a token" in result.stderr


@pytest.mark.parametrize("sent, kept", [
    ("root@example.com", "root"),                          # a local user: domain dropped
    ("no-such-user-qga@example.com", "no-such-user-qga@example.com"),  # SSSD/winbind style
    ("@example.com", "@example.com"),
])
def test_a_local_users_domain_is_dropped(loop, server, stack, sent, kept):
    token = server.offer(sent, "s3cret")
    result = run_pamtester(stack, token, loop=loop)
    assert result.succeeded, result.output
    assert result.handed_on == {"user": kept, "password": "s3cret"}


@pytest.mark.skipif(not ROOT, reason="runs a server as another user")
def test_a_server_that_is_not_root_is_refused(modules, short_tmp):
    fake = FakeServer(short_tmp, blob(b"alice", b"s3cret"), uid=65534)
    try:
        stack = PamStack(short_tmp / "pam", modules.production, f"socket={fake.path}")
        result = run_pamtester(stack, "anything")
        assert not result.succeeded and USER_UNKNOWN in result.output
        assert "refusing a credentials server running as uid 65534" in result.stderr
        assert result.handed_on is None
        assert fake.token_received() == ""  # the token never left the module
    finally:
        fake.stop()


@pytest.mark.skipif(not ROOT, reason="runs a server as another user")
def test_the_test_build_trusts_the_uid_it_is_told(modules, short_tmp):
    fake = FakeServer(short_tmp, blob(b"alice", b"s3cret"), uid=65534)
    try:
        stack = PamStack(short_tmp / "pam", modules.test, f"socket={fake.path}",
                         "server_uid=65534")
        result = run_pamtester(stack, "the-token")
        assert result.succeeded, result.output
        assert fake.token_received() == "the-token"
        assert result.handed_on == {"user": "alice", "password": "s3cret"}
    finally:
        fake.stop()


def test_the_installed_module_refuses_the_test_argument(modules, short_tmp):
    fake = FakeServer(short_tmp, blob(b"alice", b"s3cret"))
    try:
        stack = PamStack(short_tmp / "pam", modules.production, f"socket={fake.path}",
                         f"server_uid={os.geteuid()}")
        result = run_pamtester(stack, "the-token")
        assert not result.succeeded and SERVICE_ERR in result.output
        assert "accepted only by a test build" in result.stderr
        assert "Token?" not in result.output  # failed before asking anything
    finally:
        fake.stop()


def test_unknown_arguments_fail_closed(modules, short_tmp):
    stack = PamStack(short_tmp / "pam", modules.production, "sokcet=/tmp/x")
    result = run_pamtester(stack, "the-token")
    assert not result.succeeded and SERVICE_ERR in result.output
    assert "unknown module argument: sokcet=/tmp/x" in result.stderr


@pytest.mark.parametrize("reply", [
    pytest.param(b"", id="refused"),
    pytest.param(b"\0\0\0", id="shorter-than-the-length"),
    pytest.param(blob(b"alice", b"s3cret")[:-1], id="no-final-nul"),
    pytest.param(struct.pack(">I", 50) + b"alice" + b"s3cret\0", id="length-past-the-end"),
    pytest.param(struct.pack(">I", 0) + b"s3cret\0", id="empty-user"),
    pytest.param(struct.pack(">I", 0xFFFFFFFF) + b"alice\0", id="huge-length"),
    pytest.param(blob(b"ali\0ce", b"s3cret"), id="nul-in-user"),
    pytest.param(blob(b"alice", b"s3\0cret"), id="nul-in-password"),
    pytest.param(blob(b"alice", b"x" * 9000), id="overlong"),
])
def test_malformed_answers_are_refused(modules, short_tmp, reply):
    fake = FakeServer(short_tmp, reply)
    try:
        stack = stack_for(short_tmp / "pam", modules, fake.path)
        result = run_pamtester(stack, "the-token")
        assert not result.succeeded and USER_UNKNOWN in result.output
        assert result.handed_on is None
        assert fake.token_received() == "the-token"
    finally:
        fake.stop()


def test_a_server_that_does_not_answer_times_out_after_three_seconds(modules, short_tmp):
    fake = FakeServer(short_tmp, blob(b"alice", b"s3cret"), delay=6)
    try:
        stack = stack_for(short_tmp / "pam", modules, fake.path)
        result = run_pamtester(stack, "the-token")
        assert not result.succeeded and "no answer from the agent within 3000 ms" in result.stderr
        assert 2.9 <= result.elapsed < 5.5
    finally:
        fake.stop()


def test_no_agent_listening(modules, short_tmp):
    stack = stack_for(short_tmp / "pam", modules, str(short_tmp / "nothing.sock"))
    result = run_pamtester(stack, "the-token")
    assert not result.succeeded and USER_UNKNOWN in result.output
    assert "cannot reach the agent" in result.stderr


def test_the_module_and_the_core_agree_on_the_default_socket(modules):
    with open(modules.production, "rb") as module:
        assert DEFAULT_SOCKET_PATH.encode() + b"\0" in module.read()


def test_setcred_succeeds_and_only_pam_entry_points_are_exported(modules):
    exported = subprocess.run(["nm", "-D", "--defined-only", modules.production],
                              capture_output=True, text=True, check=True).stdout
    names = sorted(line.split()[-1] for line in exported.splitlines() if " T " in line)
    assert names == ["pam_sm_authenticate", "pam_sm_setcred"]
    library = ctypes.CDLL(modules.production)
    assert library.pam_sm_setcred(None, 0, 0, None) == 0  # PAM_SUCCESS


# -- the conversation as a login screen sees it ---------------------------------------

_CONVERSATION = r"""
import ctypes, json, sys

# The global namespace, so pam_wrapper's preloaded pam_start() is the one called.
libpam = ctypes.CDLL(None)

class Message(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]

class Response(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]

CONV = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.POINTER(Message)),
                        ctypes.POINTER(ctypes.POINTER(Response)), ctypes.c_void_p)

class Conv(ctypes.Structure):
    _fields_ = [("conv", CONV), ("appdata_ptr", ctypes.c_void_p)]

libc = ctypes.CDLL(None)
libc.calloc.restype = ctypes.c_void_p
libc.strdup.restype = ctypes.c_void_p
libc.strdup.argtypes = [ctypes.c_char_p]
asked = []

def answer(count, messages, responses, _data):
    array = libc.calloc(count, ctypes.sizeof(Response))
    replies = ctypes.cast(array, ctypes.POINTER(Response))
    for i in range(count):
        asked.append([messages[i].contents.msg_style, messages[i].contents.msg.decode()])
        replies[i].resp = libc.strdup(sys.argv[1].encode())
    responses[0] = replies
    return 0

conversation = Conv(CONV(answer), None)
handle = ctypes.c_void_p()
libpam.pam_start(b"gdm-ovirtcred", None, ctypes.byref(conversation), ctypes.byref(handle))
status = libpam.pam_authenticate(handle, 0)
libpam.pam_end(handle, status)
print(json.dumps({"asked": asked, "status": status}))
"""


def test_the_module_asks_token_with_a_hidden_prompt(loop, server, stack):
    """gnome-shell answers any hidden question of the service with the token;
    the older greeter plugins only the exact prompt "Token?"."""
    token = server.offer("alice", "s3cret")
    env = dict(stack.env(), PAM_WRAPPER_DEBUGLEVEL="0")  # little enough for the pipes
    process = subprocess.Popen([sys.executable, "-c", _CONVERSATION, token],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 20
    while process.poll() is None and time.monotonic() < deadline:
        loop.run_once(0.01)
    if process.poll() is None:
        process.kill()
    out, err = process.communicate()
    result = json.loads(out)
    assert result["asked"] == [[1, "Token?"]], (result, err)  # 1: PAM_PROMPT_ECHO_OFF
    assert result["status"] == 0, err.decode()
    assert stack.handed_on() == {"user": "alice", "password": "s3cret"}


# -- valgrind --------------------------------------------------------------------------

VALGRIND_ERRORS = 99


def valgrind_wrapper(log_dir):
    require(subprocess.run(["sh", "-c", "command -v valgrind"],
                           capture_output=True).returncode == 0, "valgrind")
    return ["valgrind", "--leak-check=full", "--show-leak-kinds=definite,indirect",
            "--errors-for-leak-kinds=definite,indirect", "--keep-debuginfo=yes",
            "--track-origins=yes", f"--error-exitcode={VALGRIND_ERRORS}",
            f"--log-file={log_dir}/valgrind.%p.log"]


@pytest.mark.parametrize("case", ["success", "wrong-token", "other-user", "malformed"])
def test_valgrind_finds_no_leak_and_no_invalid_access(loop, modules, server, short_tmp, case):
    """The whole pamtester process is clean: pamtester and libpam free everything,
    so any leak or bad access would be the module's."""
    log_dir = short_tmp / "valgrind"
    log_dir.mkdir()
    fake = None
    try:
        if case == "malformed":
            fake = FakeServer(short_tmp, blob(b"alice", b"s3cret")[:-1])
            stack = stack_for(short_tmp / "pam", modules, fake.path)
            answer, user = "the-token", ""
        else:
            stack = stack_for(short_tmp / "pam", modules, server.socket_path)
            token = server.offer("alice", "s3cret")
            answer = token if case != "wrong-token" else "A" * len(token)
            user = "bob" if case == "other-user" else ""
        result = run_pamtester(stack, answer, user=user, loop=loop,
                               wrapper=valgrind_wrapper(log_dir), timeout=60,
                               extra_env={"PAM_WRAPPER_DISABLE_DEEPBIND": "1"})
    finally:
        if fake is not None:
            fake.stop()
    # One log per process: pamtester, and the child pam_exec forks (its log
    # stops at exec, with no summary).  Leaks count as errors
    # (--errors-for-leak-kinds), so every summary must say 0.
    logs = [path.read_text() for path in sorted(log_dir.iterdir())]
    summaries = [text for text in logs if "ERROR SUMMARY" in text]
    assert any("HEAP SUMMARY" in text and "Command: pamtester" in text for text in summaries), logs
    assert result.returncode != VALGRIND_ERRORS, logs
    for text in summaries:
        assert "ERROR SUMMARY: 0 errors" in text, text
    assert result.succeeded == (case == "success"), result.output


# -- the service files of contrib/pam.d, with pam_unix and a real account --------------

@pytest.fixture
def account():
    with account_with_password() as name_and_password:
        yield name_and_password


@pytest.mark.skipif(not ROOT, reason="needs a real account (useradd) and the root module")
@pytest.mark.parametrize("flavour", ["debian", "fedora"])
def test_the_service_file_checks_the_real_password(loop, server, modules, short_tmp, account,
                                                    flavour):
    name, password = account
    stack = contrib_stack(short_tmp / "pam", modules.production, server.socket_path, flavour)
    token = server.offer(name, password)
    result = run_pamtester(stack, token, loop=loop)
    assert result.succeeded, result.output
    # A wrong password fails without a second question: the login screen would
    # answer any hidden question with the token again.
    token = server.offer(name, "not-" + password)
    result = run_pamtester(stack, token, loop=loop)
    assert not result.succeeded
    assert "Authentication failure" in result.output
    assert result.output.count("Token?") == 1 and "Password" not in result.output


# -- make install --------------------------------------------------------------------------


def make_install(destdir, *variables):
    require(shutil.which("make") is not None and shutil.which("cc") is not None, "make and cc")
    subprocess.run(["make", "-s", "-C", str(NATIVE), f"BUILDDIR={destdir}/build", "install",
                    f"DESTDIR={destdir}", *variables], check=True, capture_output=True,
                   timeout=120)


def test_make_install_puts_the_module_where_the_distribution_keeps_pam_modules(short_tmp):
    make_install(short_tmp)
    pam_dir = os.path.dirname(system_pam_module("pam_exec.so"))
    module = short_tmp / pam_dir.lstrip("/") / "pam_ovirt_cred.so"
    assert module.is_file() and stat.S_IMODE(module.stat().st_mode) == 0o644
    flavour = ".debian" if os.path.exists("/etc/debian_version") else ""
    assert (short_tmp / "etc/pam.d/gdm-ovirtcred").read_text() == \
        (NATIVE.parent / "contrib/pam.d" / f"gdm-ovirtcred{flavour}").read_text()
    assert (short_tmp / "usr/share/dbus-1/system.d/org.ovirt.vdsm.Credentials.conf").is_file()


def test_make_install_for_fedora_keeps_an_admins_service_file(short_tmp):
    service = short_tmp / "etc/pam.d/gdm-ovirtcred"
    make_install(short_tmp, "LAYOUT=fedora", "PAMDIR=/usr/lib64/security")
    assert (short_tmp / "usr/lib64/security/pam_ovirt_cred.so").is_file()
    assert "password-auth" in service.read_text()
    service.write_text("# the admin's own\n")
    make_install(short_tmp, "LAYOUT=fedora", "PAMDIR=/usr/lib64/security")
    assert service.read_text() == "# the admin's own\n"
