"""guest-set-user-password and the ssh authorized-keys commands, called directly.

The ssh tests work on a throwaway user (tests/support/users.py) and check
the files on disk: contents byte for byte, owner, mode.  The password tests
replace ``chpasswd`` with a script first on PATH that records what it got,
except one that runs the real chpasswd on the throwaway user.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from qga.commands import Context
from qga.commands import accounts
from qga.commands.accounts import qbase64_decode
from qga.config import Config
from qga.errors import CommandError
from tests.support.replies import validate_return
from tests.support.users import throwaway_user  # noqa: F401  (fixture)


@pytest.fixture
def ctx(tmp_path):
    return Context(Config(), state=None)


def b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


# -- base64 as QEMU decodes it -----------------------------------------------------------


@pytest.mark.parametrize("text, decoded", [
    ("YWJj", b"abc"),
    ("YQ==", b"a"),
    ("YWI=", b"ab"),
    ("YWJ", b""),           # an incomplete group is dropped, as GLib does
    ("YWJjZA", b"abc"),
    ("YW\nJj", b"abc"),     # newlines are allowed and skipped
    ("", b""),
])
def test_qbase64_decode(text, decoded):
    assert qbase64_decode(text) == decoded


@pytest.mark.parametrize("text", ["YW Jj", "YWJj!", "YW-J", "YW_J", "\u00e9"])
def test_qbase64_rejects_characters_outside_the_alphabet(text):
    with pytest.raises(CommandError, match="^Base64 data contains invalid characters$"):
        qbase64_decode(text)


# -- set-user-password with a recording chpasswd -------------------------------------------


@pytest.fixture
def fake_chpasswd(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "chpasswd.record"
    script = bindir / "chpasswd"
    script.write_text(f"""#!/bin/sh
sid=$(ps -o sid= -p $$ | tr -d ' ')
{{ echo "args=$*"; echo "session=$([ "$sid" = "$$" ] && echo new || echo old)"; cat; }} > {record}
exit ${{CHPASSWD_EXIT:-0}}
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return record


def test_password_is_piped_to_chpasswd(ctx, fake_chpasswd):
    assert accounts.set_user_password(ctx, username="alice", password=b64(b"s3cret"),
                                      crypted=False) is None
    assert fake_chpasswd.read_text() == "args=\nsession=new\nalice:s3cret\n"


def test_crypted_password_uses_chpasswd_e(ctx, fake_chpasswd):
    crypted = b"$6$salt$hash"
    accounts.set_user_password(ctx, username="bob", password=b64(crypted), crypted=True)
    assert fake_chpasswd.read_text() == "args=-e\nsession=new\nbob:$6$salt$hash\n"


def test_password_stops_at_nul_like_a_c_string(ctx, fake_chpasswd):
    accounts.set_user_password(ctx, username="carol", password=b64(b"ab\0\ncd"), crypted=False)
    assert fake_chpasswd.read_text().endswith("carol:ab\n")


def test_chpasswd_failure(ctx, fake_chpasswd, monkeypatch):
    monkeypatch.setenv("CHPASSWD_EXIT", "1")
    with pytest.raises(CommandError, match="^child process has failed to set user password$"):
        accounts.set_user_password(ctx, username="alice", password=b64(b"x"), crypted=False)


@pytest.mark.parametrize("username, password, text", [
    ("alice", b64(b"a\nb"), "forbidden characters in raw password"),
    ("al:ice", b64(b"ab"), "forbidden characters in username"),
    ("al\nice", b64(b"ab"), "forbidden characters in username"),
    # The password is checked before the user name.
    ("al:ice", b64(b"a\nb"), "forbidden characters in raw password"),
    ("alice", "!!!", "Base64 data contains invalid characters"),
])
def test_password_argument_checks(ctx, fake_chpasswd, username, password, text):
    with pytest.raises(CommandError) as raised:
        accounts.set_user_password(ctx, username=username, password=password, crypted=False)
    assert raised.value.desc == text
    assert not fake_chpasswd.exists()


def test_no_chpasswd_on_path(ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CommandError, match="^cannot find 'passwd' program in PATH$"):
        accounts.set_user_password(ctx, username="alice", password=b64(b"x"), crypted=False)


def test_real_chpasswd_sets_the_throwaway_users_password(ctx, throwaway_user):
    def shadow_hash():
        for line in Path("/etc/shadow").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == throwaway_user.name:
                return fields[1]
        raise AssertionError("user not in /etc/shadow")

    before = shadow_hash()
    accounts.set_user_password(ctx, username=throwaway_user.name, password=b64(b"pw-1"),
                               crypted=False)
    after = shadow_hash()
    assert after != before and after.startswith("$")
    crypted = "$6$abcdefgh$" + "x" * 86
    accounts.set_user_password(ctx, username=throwaway_user.name, password=b64(crypted.encode()),
                               crypted=True)
    assert shadow_hash() == crypted


def test_real_chpasswd_unknown_user(ctx):
    with pytest.raises(CommandError, match="^child process has failed to set user password$"):
        accounts.set_user_password(ctx, username="qga-no-such-user", password=b64(b"x"),
                                   crypted=False)


# -- ssh authorized keys -----------------------------------------------------------------


def keys_file(user) -> Path:
    return user.home / ".ssh" / "authorized_keys"


def assert_owned(path: Path, user, mode: int) -> None:
    info = path.lstat()
    assert (info.st_uid, info.st_gid) == (user.uid, user.gid)
    assert stat.S_IMODE(info.st_mode) == mode


def test_unknown_user(ctx):
    for call in (lambda: accounts.ssh_get_authorized_keys(ctx, username="qga-no-such-user"),
                 lambda: accounts.ssh_add_authorized_keys(ctx, username="qga-no-such-user",
                                                          keys=["k"]),
                 lambda: accounts.ssh_remove_authorized_keys(ctx, username="qga-no-such-user",
                                                             keys=["k"])):
        with pytest.raises(CommandError) as raised:
            call()
        assert raised.value.desc == "failed to lookup user 'qga-no-such-user': Success"


@pytest.mark.parametrize("key", ["#comment", "two\nlines"])
def test_invalid_keys_are_refused_before_the_user_is_looked_up(ctx, key):
    for handler in (accounts.ssh_add_authorized_keys, accounts.ssh_remove_authorized_keys):
        with pytest.raises(CommandError) as raised:
            handler(ctx, username="qga-no-such-user", keys=["good key", key])
        assert raised.value.desc == f"invalid OpenSSH public key: '{key}'"


def test_get_without_file(ctx, throwaway_user):
    path = keys_file(throwaway_user)
    with pytest.raises(CommandError) as raised:
        accounts.ssh_get_authorized_keys(ctx, username=throwaway_user.name)
    assert raised.value.desc == (f"failed to read '{path}': Failed to open file \u201c{path}\u201d: "
                                 "No such file or directory")


def test_add_creates_directory_and_file_owned_by_the_user(ctx, throwaway_user):
    accounts.ssh_add_authorized_keys(ctx, username=throwaway_user.name,
                                     keys=["k1 a", "k2 b", "k1 a"])
    path = keys_file(throwaway_user)
    assert path.read_bytes() == b"k1 a\nk2 b"
    assert_owned(path.parent, throwaway_user, 0o700)
    assert_owned(path, throwaway_user, 0o600)
    assert [name for name in os.listdir(path.parent)] == ["authorized_keys"]
    reply = accounts.ssh_get_authorized_keys(ctx, username=throwaway_user.name)
    validate_return(None, "guest-ssh-get-authorized-keys", reply)
    assert reply == {"keys": ["k2 b", "k1 a"]}  # qemu-ga's reverse order


def test_add_appends_after_existing_lines_and_skips_duplicates(ctx, throwaway_user):
    path = keys_file(throwaway_user)
    path.parent.mkdir(mode=0o755)
    path.write_bytes(b"old 1\nold 2\n")
    accounts.ssh_add_authorized_keys(ctx, username=throwaway_user.name,
                                     keys=["old 2", "new 3"])
    # The file's trailing newline becomes an empty line: qemu-ga joins with "\n".
    assert path.read_bytes() == b"old 1\nold 2\n\nnew 3"
    assert_owned(path, throwaway_user, 0o600)
    # An existing directory keeps its mode.
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755


def test_add_with_reset(ctx, throwaway_user):
    name = throwaway_user.name
    accounts.ssh_add_authorized_keys(ctx, username=name, keys=["k1", "k2"])
    accounts.ssh_add_authorized_keys(ctx, username=name, keys=["k2"], reset=True)
    assert keys_file(throwaway_user).read_bytes() == b"k2"
    accounts.ssh_add_authorized_keys(ctx, username=name, keys=[], reset=True)
    assert keys_file(throwaway_user).read_bytes() == b""
    accounts.ssh_add_authorized_keys(ctx, username=name, keys=[""])
    assert keys_file(throwaway_user).read_bytes() == b""
    assert accounts.ssh_get_authorized_keys(ctx, username=name) == {"keys": []}


def test_remove(ctx, throwaway_user):
    name = throwaway_user.name
    # No file: nothing to do, and nothing is created.
    accounts.ssh_remove_authorized_keys(ctx, username=name, keys=["k1"])
    assert not keys_file(throwaway_user).parent.exists()
    path = keys_file(throwaway_user)
    path.parent.mkdir(mode=0o700)
    contents = b"algo key1 c\nalgo key1 c\n# a comment\nalgo other\n"
    path.write_bytes(contents)
    accounts.ssh_remove_authorized_keys(ctx, username=name, keys=["not there"])
    assert path.read_bytes() == contents
    accounts.ssh_remove_authorized_keys(ctx, username=name, keys=["algo key1 c"])
    assert path.read_bytes() == b"# a comment\nalgo other\n"
    assert_owned(path, throwaway_user, 0o600)


def test_get_strips_and_skips_comments(ctx, throwaway_user):
    path = keys_file(throwaway_user)
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"  algo one c1 \n\n# comment\n\talgo two\r\n   \nalgo \xff three")
    reply = accounts.ssh_get_authorized_keys(ctx, username=throwaway_user.name)
    assert reply == {"keys": ["algo \ufffd three", "algo two", "algo one c1"]}


def test_symlinked_ssh_directory_is_not_followed_for_writes(ctx, throwaway_user, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (throwaway_user.home / ".ssh").symlink_to(victim)
    with pytest.raises(CommandError, match="^failed to write to "):
        accounts.ssh_add_authorized_keys(ctx, username=throwaway_user.name, keys=["k"])
    assert os.listdir(victim) == []


def test_symlinked_keys_file_is_not_copied_to_the_user(ctx, throwaway_user, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"root-only secret")
    secret.chmod(0o600)
    ssh = throwaway_user.home / ".ssh"
    ssh.mkdir(mode=0o700)
    os.chown(ssh, throwaway_user.uid, throwaway_user.gid)
    (ssh / "authorized_keys").symlink_to(secret)
    accounts.ssh_add_authorized_keys(ctx, username=throwaway_user.name, keys=["k"])
    path = ssh / "authorized_keys"
    assert not path.is_symlink()
    assert path.read_bytes() == b"k"
    assert secret.read_bytes() == b"root-only secret"
    with pytest.raises(CommandError):
        (ssh / "authorized_keys").unlink()
        (ssh / "authorized_keys").symlink_to(secret)
        accounts.ssh_remove_authorized_keys(ctx, username=throwaway_user.name, keys=["x"])
    assert (ssh / "authorized_keys").is_symlink()
    assert secret.read_bytes() == b"root-only secret"
