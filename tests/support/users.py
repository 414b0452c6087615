"""A throwaway local user account with its home in a temporary directory.

Tests of the ssh-key and password commands need a user that is not anyone
real.  :func:`throwaway_user` creates one with ``useradd`` (root only), and
removes it with ``userdel`` afterwards; its home directory is a temporary
directory that is deleted too.  ``useradd`` takes a lock on /etc/passwd, so
creation is retried briefly when another process holds it.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest


class User(NamedTuple):
    name: str
    uid: int
    gid: int
    home: Path


def _run_locked(argv) -> subprocess.CompletedProcess:
    for _ in range(50):
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if result.returncode != 10 and b"lock" not in result.stderr:
            return result
        time.sleep(0.1)  # another useradd/userdel holds /etc/passwd
    return result


def create_user() -> User:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to create a throwaway user")
    name = "qgat" + secrets.token_hex(4)
    base = Path(tempfile.mkdtemp(prefix="qga-user-"))
    os.chmod(base, 0o755)
    home = base / name
    result = _run_locked(["useradd", "-m", "-d", str(home), "-s", "/usr/sbin/nologin", name])
    if result.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"useradd failed: {result.stderr.decode(errors='replace')}")
    entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, entry.pw_gid, home)


def delete_user(user: User) -> None:
    _run_locked(["userdel", "-f", user.name])
    shutil.rmtree(user.home.parent, ignore_errors=True)


@pytest.fixture
def throwaway_user() -> Iterator[User]:
    user = create_user()
    try:
        yield user
    finally:
        delete_user(user)
