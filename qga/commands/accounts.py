"""User accounts: guest-set-user-password and the guest-ssh-*-authorized-keys commands.

guest-set-user-password decodes the base64 password, refuses a newline in it
and a newline or ``:`` in the user name, then pipes ``user:password`` to
``chpasswd`` (``chpasswd -e`` for a crypted password) found through ``PATH``,
with qemu-ga's error texts.

The ssh-key commands edit ``~user/.ssh/authorized_keys`` as qemu-ga does:
keys are checked first (no leading ``#``, no newline), the user is looked up,
the file is split on ``\\n`` and joined back with ``\\n`` (no trailing
newline is added), new keys are appended unless already present, ``reset``
starts from an empty list, removing a key that is not there is not an error,
and ``get`` lists the non-comment lines stripped, in reverse file order.
A missing ``~/.ssh`` is created 0700; the file ends up 0600; both are owned
by the user.

Because the agent runs as root inside a directory the user controls, writes
are hardened where qemu-ga is not: ``.ssh`` and ``authorized_keys`` are never
followed through symbolic links when the result is a file handed to the user
(otherwise a user could have root copy ``/etc/shadow`` into their own file,
or create files in any directory), and the new file is written to a private
temporary file, given to the user and renamed into place (atomic).
"""

from __future__ import annotations

import os
from typing import List, Optional

from qga.commands import command
from qga.commands.sysutil import run_forked_helper
from qga.commands.system import read_fd
from qga.errors import CommandError

BASE64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")
AUTHORIZED_KEYS = "authorized_keys"


# -- passwords ----------------------------------------------------------------------


@command("guest-set-user-password")
def set_user_password(ctx, username, password, crypted):
    # C strings end at the first NUL: qemu-ga never sees what follows one.
    raw = qbase64_decode(password).split(b"\0", 1)[0]
    if b"\n" in raw:
        raise CommandError("forbidden characters in raw password")
    if "\n" in username or ":" in username:
        raise CommandError("forbidden characters in username")
    import shutil

    chpasswd = shutil.which("chpasswd")
    if chpasswd is None:
        raise CommandError("cannot find 'passwd' program in PATH")
    argv = ["chpasswd", "-e"] if crypted else ["chpasswd"]
    line = username.encode("utf-8", "surrogateescape") + b":" + raw + b"\n"
    status = run_forked_helper(argv, chpasswd, stdin_data=line)
    if not status.exited:
        raise CommandError("child process has terminated abnormally")
    if status.code:
        raise CommandError("child process has failed to set user password")
    return None


def qbase64_decode(text: str) -> bytes:
    """QEMU's qbase64_decode(): a strict alphabet check, then GLib's lenient decoder.

    Only ``A-Z a-z 0-9 + / =`` and newline are allowed.  Decoding then works
    in groups of four characters, ``=`` counting as a zero digit that drops an
    output byte; an incomplete last group is ignored.
    """
    data = text.encode("utf-8", "surrogateescape")
    if not BASE64_ALPHABET.issuperset(data):
        raise CommandError("Base64 data contains invalid characters")
    out = bytearray()
    group = 0
    count = 0
    last = previous = 0
    for char in data:
        if char == 0x0A:
            continue
        previous, last = last, char
        group = (group << 6) | _base64_rank(char)
        count += 1
        if count == 4:
            out.append((group >> 16) & 0xFF)
            if previous != 0x3D:
                out.append((group >> 8) & 0xFF)
            if last != 0x3D:
                out.append(group & 0xFF)
            group = count = 0
    return bytes(out)


def _base64_rank(char: int) -> int:
    if 0x41 <= char <= 0x5A:
        return char - 0x41
    if 0x61 <= char <= 0x7A:
        return char - 0x61 + 26
    if 0x30 <= char <= 0x39:
        return char - 0x30 + 52
    return {0x2B: 62, 0x2F: 63}.get(char, 0)  # '=' counts as zero


# -- ssh keys: the commands ---------------------------------------------------------


@command("guest-ssh-get-authorized-keys")
def ssh_get_authorized_keys(ctx, username):
    user = _lookup_user(username)
    path = _authorized_keys_path(user)
    lines = _read_lines(path, follow=True)
    keys = []
    for line in lines:
        key = line.strip(b" \t\n\v\f\r")
        if key and not key.startswith(b"#"):
            keys.append(key.decode("utf-8", "replace"))
    keys.reverse()  # qemu-ga prepends each key to its list
    return {"keys": keys}


@command("guest-ssh-add-authorized-keys")
def ssh_add_authorized_keys(ctx, username, keys, reset=False):
    new_keys = _checked_keys(keys)
    user = _lookup_user(username)
    editor = _KeysFile(user)
    lines: Optional[List[bytes]] = None
    if not reset:
        try:
            lines = _read_lines(editor.path, follow=False)
        except CommandError:
            lines = None  # unreadable or missing: start a new file
    if lines is None:
        editor.ensure_directory()
        lines = []
    for key in new_keys:
        if key not in lines:
            lines.append(key)
    editor.write(lines)
    return None


@command("guest-ssh-remove-authorized-keys")
def ssh_remove_authorized_keys(ctx, username, keys):
    unwanted = set(_checked_keys(keys))
    user = _lookup_user(username)
    editor = _KeysFile(user)
    if not os.path.exists(editor.path):
        return None
    lines = _read_lines(editor.path, follow=False)
    editor.write([line for line in lines if line not in unwanted])
    return None


# -- ssh keys: helpers --------------------------------------------------------------


def _checked_keys(keys: List[str]) -> List[bytes]:
    for key in keys:
        if key.startswith("#") or "\n" in key:
            raise CommandError(f"invalid OpenSSH public key: '{key}'")
    return [key.encode("utf-8", "surrogateescape") for key in keys]


def _lookup_user(username: str):
    import pwd

    try:
        return pwd.getpwnam(username)
    except (KeyError, ValueError):
        # getpwnam_r() reports "not found" with errno 0, hence the odd text.
        raise CommandError(f"failed to lookup user '{username}': Success") from None


def _authorized_keys_path(user) -> str:
    return os.path.join(user.pw_dir, ".ssh", AUTHORIZED_KEYS)


def _read_lines(path: str, follow: bool) -> List[bytes]:
    """The file split on newlines, like g_strsplit() (an empty file has no lines)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = _open_beneath(path, flags, follow)
    except OSError as error:
        raise _read_error(path, f"Failed to open file \u201c{path}\u201d: {os.strerror(error.errno)}")
    try:
        regular = _is_regular(fd)
        data = read_fd(fd)
    except OSError as error:
        verb = "Failed to read from file" if regular else "Error reading file"
        raise _read_error(path, f"{verb} \u201c{path}\u201d: {os.strerror(error.errno)}")
    finally:
        os.close(fd)
    return data.split(b"\n") if data else []


def _open_beneath(path: str, flags: int, follow: bool) -> int:
    """Open ``path``; unless ``follow``, neither it nor its directory may be a symlink."""
    if follow:
        return os.open(path, flags)
    directory, name = os.path.split(path)
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.open(name, flags, dir_fd=dirfd)
    finally:
        os.close(dirfd)


def _is_regular(fd: int) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def _read_error(path: str, detail: str) -> CommandError:
    return CommandError(f"failed to read '{path}': {detail}")


class _KeysFile:
    """Writes one user's authorized_keys: directory, ownership, mode, atomic rename."""

    def __init__(self, user) -> None:
        self.user = user
        self.ssh_dir = os.path.join(user.pw_dir, ".ssh")
        self.path = os.path.join(self.ssh_dir, AUTHORIZED_KEYS)

    def ensure_directory(self) -> None:
        """Create ``~/.ssh`` (0700, the user's) when it is not a directory yet."""
        if os.path.isdir(self.ssh_dir):
            return
        try:
            os.mkdir(self.ssh_dir, 0o700)
        except OSError as error:
            raise CommandError(f"failed to create directory '{self.ssh_dir}': "
                               f"{os.strerror(error.errno)}") from None
        try:
            fd = os.open(self.ssh_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            raise CommandError(f"failed to set ownership of directory '{self.ssh_dir}': "
                               f"{os.strerror(error.errno)}") from None
        try:
            self._give_to_user(fd, 0o700, f"directory '{self.ssh_dir}'", f"directory '{self.ssh_dir}'")
        finally:
            os.close(fd)

    def write(self, lines: List[bytes]) -> None:
        contents = b"\n".join(lines)
        temp_name = f"{AUTHORIZED_KEYS}.{_random_suffix()}"
        temp_path = os.path.join(self.ssh_dir, temp_name)
        try:
            dirfd = os.open(self.ssh_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            raise self._write_error(f"Failed to create file \u201c{temp_path}\u201d: "
                                    f"{os.strerror(error.errno)}") from None
        try:
            self._write_into(dirfd, temp_name, temp_path, contents)
        finally:
            os.close(dirfd)

    def _write_into(self, dirfd: int, temp_name: str, temp_path: str, contents: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp_name, flags, 0o600, dir_fd=dirfd)
        except OSError as error:
            raise self._write_error(f"Failed to create file \u201c{temp_path}\u201d: "
                                    f"{os.strerror(error.errno)}") from None
        try:
            try:
                _write_all(fd, contents)
                os.fsync(fd)
            except OSError as error:
                raise self._write_error(f"Failed to write file \u201c{temp_path}\u201d: "
                                        f"write() failed: {os.strerror(error.errno)}") from None
            # qemu-ga's texts: its chown() message says "directory" for the file too.
            self._give_to_user(fd, 0o600, f"directory '{self.path}'", f"'{self.path}'")
        except CommandError:
            os.close(fd)
            _unlink_quietly(temp_name, dirfd)
            raise
        os.close(fd)
        try:
            os.rename(temp_name, AUTHORIZED_KEYS, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except OSError as error:
            _unlink_quietly(temp_name, dirfd)
            raise self._write_error(f"Failed to rename file \u201c{temp_path}\u201d to "
                                    f"\u201c{self.path}\u201d: g_rename() failed: "
                                    f"{os.strerror(error.errno)}") from None
        try:
            os.fsync(dirfd)
        except OSError:
            pass  # the rename happened; durability of the directory is best effort

    def _give_to_user(self, fd: int, mode: int, owner_what: str, mode_what: str) -> None:
        try:
            os.fchown(fd, self.user.pw_uid, self.user.pw_gid)
        except OSError as error:
            raise CommandError(f"failed to set ownership of {owner_what}: "
                               f"{os.strerror(error.errno)}") from None
        try:
            os.fchmod(fd, mode)
        except OSError as error:
            raise CommandError(f"failed to set permissions of {mode_what}: "
                               f"{os.strerror(error.errno)}") from None

    def _write_error(self, detail: str) -> CommandError:
        return CommandError(f"failed to write to '{self.path}': {detail}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(name: str, dirfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def _random_suffix() -> str:
    import secrets
    import string

    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(6))
