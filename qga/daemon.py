"""Becoming a daemon (``-d``) and the locked pid file, as qemu-ga does them.

:func:`become_daemon` forks; the parent exits 0 at once, the child writes the
pid file, sets umask 077, starts a new session, moves to ``/`` and puts
/dev/null on its standard streams.  The pid file is qemu's
``qemu_write_pidfile()``: created 0600, locked with a POSIX write lock
(lockf) that lives as long as the process, re-created if another process
replaced it meanwhile, then truncated and given ``<pid>\\n``.  A second agent
with the same pid file cannot take the lock and stops with qemu-ga's
message.

The pid file is the one file not written through ``atomic_write``: the
lock belongs to the inode, and renaming a new file over it would let a
second agent lock a different inode under the same name.

When the agent starts frozen, qemu-ga does not touch the pid file (it may be
on a frozen filesystem) until the thaw: the daemon then starts without one
and the agent calls :func:`write_pidfile` after thawing.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from qga.errors import StateError


def write_pidfile(path: str) -> int:
    """Create, lock and fill ``path``; return the fd that holds the lock.

    Keep the fd open for as long as the process should own the file.  Raises
    :class:`StateError` with qemu's message when that fails.
    """
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise StateError(f"Could not create '{path}': {os.strerror(error.errno)}") from None
        try:
            opened = os.fstat(fd)
        except OSError as error:
            os.close(fd)
            raise StateError(f"Cannot stat file: {os.strerror(error.errno)}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            raise StateError(f"Cannot lock pid file: {os.strerror(error.errno)}") from None
        # The name may now belong to another file (a racing agent removed
        # and re-created it): then the lock we hold protects nothing.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
    except OSError as error:
        _give_up(fd, path)
        raise StateError(f"Failed to truncate pid file: {os.strerror(error.errno)}") from None
    data = f"{os.getpid()}\n".encode()
    try:
        written = os.write(fd, data)
    except OSError:
        written = -1
    if written != len(data):
        _give_up(fd, path)
        raise StateError("Failed to write pid file")
    return fd


def _give_up(fd: int, path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def remove_pidfile(path: str) -> None:
    """Unlink the pid file at exit (qemu-ga does, whatever happened)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def become_daemon(pidfile: Optional[str]) -> Optional[int]:
    """Fork into the background; return (in the child) the pid file's lock fd.

    The parent exits with status 0 without returning.  If the pid file
    cannot be written the child reports it on stderr (still the caller's at
    that point) and exits with status 1, as qemu-ga does.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
    lock_fd = None
    if pidfile is not None:
        try:
            lock_fd = write_pidfile(pidfile)
        except StateError as error:
            _critical(str(error))
            os._exit(1)
    os.umask(0o077)
    try:
        os.setsid()
        os.chdir("/")
    except OSError:
        if pidfile is not None:
            remove_pidfile(pidfile)
        _critical("failed to daemonize")
        os._exit(1)
    _stdio_to_null()
    return lock_fd


def _stdio_to_null() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _critical(message: str) -> None:
    import logging
    import time

    from qga.log import format_line

    sys.stderr.write(format_line(time.time(), logging.CRITICAL, message) + "\n")
    sys.stderr.flush()
