"""Single sign-on: the core hands a host's login credentials to the PAM module, once.

The oVirt extension runs unprivileged, but the login screen's PAM worker
(root) must fetch the user name and password from somewhere only root can
reach.  So the extension asks the core for the narrow primitive
:data:`PRIMITIVE` (a ``primitive`` frame of :mod:`qga.ext.wire`)::

    {"type": "primitive", "id": 7, "name": "sso-offer-credentials",
     "arguments": {"user": "alice@example.com", "password": "...",
                   "domain": "", "token-ttl": 5}}
    -> {"type": "primitive-reply", "id": 7, "return": {"token": "..."}}

``user`` and ``password`` are required strings; ``domain`` (optional) is
appended as ``user@domain`` when not empty (oVirt already sends
``user@domain`` as the user); ``token-ttl`` (optional, seconds, default
:data:`DEFAULT_TOKEN_TTL`, at most :data:`MAX_TOKEN_TTL`) is how long the
offer lives.  The extension then broadcasts the token on the D-Bus system bus
and the login screen's PAM module (``native/pam_ovirt_cred.c``) trades it:

1. it connects to ``<runtime-dir>/sso/cred.sock`` (:data:`DEFAULT_SOCKET_PATH`
   with the default ``runtime-dir``; the PAM module's compiled-in default, else
   its ``socket=`` argument), a socket file in a directory only root may
   enter, bound before the token is returned and closed again once no offer
   is pending;
2. the core checks the peer (SO_PEERCRED: uid 0 only), the module checks the
   core the same way;
3. the module sends the token and half-closes; the core compares it in
   constant time and, if it is the pending offer's and not expired, answers
   the original agent's blob (4-byte big-endian length of the UTF-8 user
   name, the user name, the UTF-8 password, one NUL byte) and forgets the
   offer; otherwise it closes without a byte.

Hardened against what the original agent did (a 6-digit token from a
non-cryptographic PRNG; an abstract socket anyone could squat): the token is
:data:`TOKEN_BYTES` bytes from :mod:`secrets`, one-time and short-lived; a
newer offer replaces an older one; tokens and passwords never reach a log;
the password lives in a :class:`bytearray` that is zeroed when the offer is
served, expires, is replaced or the agent stops (Python may still hold copies
of the original ``str``: that much it does not let us wipe).

Everything runs on the agent's event loop (:class:`qga.loop.Loop`); the
server needs one (``ctx.loop``), and says so if it has none.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import stat
import struct
import time
from typing import Any, Callable, Dict, Iterable, Optional

from qga.errors import CommandError, CredentialsError, ParameterError

log = logging.getLogger(__name__)

PRIMITIVE = "sso-offer-credentials"

# native/Makefile compiles the same path into the PAM module (SOCKET_PATH).
DEFAULT_SOCKET_PATH = "/run/qga/sso/cred.sock"
SOCKET_NAME = os.path.join("sso", "cred.sock")  # below the configured runtime-dir

DEFAULT_TOKEN_TTL = 5.0   # the original agent's accept window
MAX_TOKEN_TTL = 60.0
TOKEN_BYTES = 32          # 256 bits, sent as 43 URL-safe base64 characters

# The PAM module waits 3 s for the answer; a client that sends nothing for
# that long is dropped.
CONNECTION_TIMEOUT = 3.0
MAX_TOKEN_LENGTH = 256    # the PAM module's own limit
MAX_CREDENTIALS = 4096    # user name + password, UTF-8; the PAM module reads 8 KiB
MAX_CONNECTIONS = 4
LISTEN_BACKLOG = 4

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def build_blob(user: str, password: Any) -> bytearray:
    """The original agent's wire format; ``password`` may be str, bytes or bytearray."""
    user_bytes = user.encode("utf-8")
    secret = bytearray(password, "utf-8") if isinstance(password, str) else bytearray(password)
    try:
        blob = bytearray(struct.pack(">I", len(user_bytes)))
        blob += user_bytes
        blob += secret
        blob.append(0)
        return blob
    finally:
        wipe(secret)


def wipe(buffer: Optional[bytearray]) -> None:
    """Overwrite a mutable buffer with zeros (as far as Python lets us)."""
    if buffer is not None:
        buffer[:] = bytes(len(buffer))


class _Offer:
    """One pending hand-off: the token, the blob, when it stops being valid."""

    __slots__ = ("token", "blob", "user", "deadline", "timer")

    def __init__(self, token: str, blob: bytearray, user: str, deadline: float):
        self.token = token.encode("ascii")
        self.blob = blob
        self.user = user
        self.deadline = deadline
        self.timer: Any = None

    def forget(self) -> None:
        wipe(self.blob)
        self.blob = bytearray()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Connection:
    """A PAM module's connection: collects its token until it half-closes."""

    __slots__ = ("sock", "pid", "received", "timer")

    def __init__(self, sock: socket.socket, pid: int):
        self.sock = sock
        self.pid = pid
        self.received = bytearray()
        self.timer: Any = None


class CredentialsServer:
    """The root-only socket that serves single sign-on credentials once per token.

    Built once per agent with ``ctx.service(CredentialsServer)``: the socket
    is ``sso/cred.sock`` below ``ctx.config.runtime_dir``.  Tests may pass
    their own ``socket_path``, ``loop``, ``allowed_uids`` (default: root only)
    and ``clock``.
    """

    def __init__(self, ctx: Any = None, socket_path: Optional[str] = None,
                 loop: Any = None, allowed_uids: Iterable[int] = (0,),
                 clock: Callable[[], float] = time.monotonic):
        self._loop = loop if loop is not None else getattr(ctx, "loop", None)
        if socket_path is None:
            runtime_dir = getattr(getattr(ctx, "config", None), "runtime_dir", None)
            socket_path = (os.path.join(runtime_dir, SOCKET_NAME) if runtime_dir
                           else DEFAULT_SOCKET_PATH)
        self.socket_path = socket_path
        self._allowed_uids = frozenset(allowed_uids)
        self._clock = clock
        self._listener: Optional[socket.socket] = None
        self._bound_inode: Optional[tuple] = None
        self._offer: Optional[_Offer] = None
        self._connections: Dict[int, _Connection] = {}

    # -- the primitive ----------------------------------------------------------------

    def offer(self, user: str, password: Any, domain: str = "",
              ttl: float = DEFAULT_TOKEN_TTL) -> str:
        """Hold the credentials for one fetch within ``ttl`` seconds; return the token.

        The socket is listening when this returns, so the token can go out at
        once.  A pending older offer is forgotten.
        """
        if self._loop is None:
            raise CredentialsError("single sign-on needs the agent's event loop")
        full_user = f"{user}@{domain}" if domain else user
        blob = build_blob(full_user, password)
        if len(blob) - 5 > MAX_CREDENTIALS:
            wipe(blob)
            raise ParameterError(f"user name and password exceed {MAX_CREDENTIALS} bytes")
        try:
            self._listen()
        except CredentialsError:
            wipe(blob)
            raise
        self._forget_offer()
        token = secrets.token_urlsafe(TOKEN_BYTES)
        offer = _Offer(token, blob, full_user, self._clock() + ttl)
        offer.timer = self._loop.call_later(ttl, lambda: self._expire(offer))
        self._offer = offer
        log.info("single sign-on: credentials for %s held for %g s", full_user, ttl)
        return token

    def pending(self) -> bool:
        """Whether an offer waits to be fetched."""
        return self._offer is not None

    def close(self) -> None:
        """Forget any offer, drop every connection, remove the socket."""
        self._forget_offer()
        for connection in list(self._connections.values()):
            self._drop(connection)
        self._stop_listening()

    # -- the listening socket ---------------------------------------------------------

    def _listen(self) -> None:
        if self._listener is not None:
            return
        self._prepare_directory(os.path.dirname(self.socket_path) or ".")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._remove_stale_socket()
            listener.bind(self.socket_path)
            os.chmod(self.socket_path, 0o600)
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
            info = os.lstat(self.socket_path)
        except OSError as error:
            listener.close()
            raise CredentialsError(
                f"cannot listen on {self.socket_path}: {error.strerror or error}") from None
        self._listener = listener
        self._bound_inode = (info.st_dev, info.st_ino)
        self._loop.add_reader(listener.fileno(), self._on_accept)

    def _prepare_directory(self, directory: str) -> None:
        """The socket's directory: ours, a real directory, closed to everyone else.

        The directory is what makes the socket root-only: nobody else can
        reach the socket file, replace it or bind its name first.
        """
        try:
            os.makedirs(os.path.dirname(directory) or ".", mode=0o755, exist_ok=True)
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            info = os.lstat(directory)
        except OSError as error:
            raise CredentialsError(
                f"cannot create {directory}: {error.strerror or error}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise CredentialsError(f"{directory} is not a directory")
        if info.st_uid != os.geteuid():
            raise CredentialsError(f"{directory} is owned by uid {info.st_uid}, not by the agent")
        if info.st_mode & 0o077:
            raise CredentialsError(
                f"{directory} is open to others (mode {stat.S_IMODE(info.st_mode):04o})")

    def _remove_stale_socket(self) -> None:
        # A socket left by an agent that was killed; anything else is not ours
        # to remove, and bind() then fails with a clear error.
        try:
            info = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(info.st_mode):
            os.unlink(self.socket_path)

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._loop.remove(listener.fileno())
        listener.close()
        try:
            info = os.lstat(self.socket_path)
            if (info.st_dev, info.st_ino) == self._bound_inode:
                os.unlink(self.socket_path)
        except OSError:
            pass
        self._bound_inode = None

    # -- connections ---------------------------------------------------------------------

    def _on_accept(self, _events: int) -> None:
        if self._listener is None:
            return
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            log.warning("single sign-on: accept failed: %s", error.strerror or error)
            return
        pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid not in self._allowed_uids:
            log.warning("single sign-on: refused a connection from uid %d (pid %d)", uid, pid)
            sock.close()
            return
        if len(self._connections) >= MAX_CONNECTIONS:
            log.warning("single sign-on: too many connections; refused pid %d", pid)
            sock.close()
            return
        sock.setblocking(False)
        connection = _Connection(sock, pid)
        self._connections[sock.fileno()] = connection
        connection.timer = self._loop.call_later(CONNECTION_TIMEOUT,
                                                 lambda: self._timed_out(connection))
        self._loop.add_reader(sock.fileno(), lambda _events: self._on_data(connection))

    def _on_data(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(MAX_TOKEN_LENGTH + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(connection)
            return
        if data:
            connection.received += data
            if len(connection.received) > MAX_TOKEN_LENGTH:
                log.warning("single sign-on: pid %d sent an overlong token", connection.pid)
                self._drop(connection)
            return
        self._answer(connection)  # the client half-closed: the token is complete

    def _answer(self, connection: _Connection) -> None:
        offer = self._offer
        presented = bytes(connection.received)
        wipe(connection.received)
        if offer is None or self._clock() >= offer.deadline:
            log.warning("single sign-on: pid %d presented a token, but no offer is pending",
                        connection.pid)
            self._drop(connection)
            return
        if not hmac.compare_digest(presented, offer.token):
            log.warning("single sign-on: pid %d presented a wrong token", connection.pid)
            self._drop(connection)
            return
        try:
            # The blob is at most a few KiB: it fits the socket buffer of a
            # fresh connection whose peer only reads, so this never blocks.
            connection.sock.settimeout(1.0)
            connection.sock.sendall(offer.blob)
            log.info("single sign-on: credentials for %s handed to pid %d",
                     offer.user, connection.pid)
        except OSError as error:
            log.warning("single sign-on: sending the credentials to pid %d failed: %s",
                        connection.pid, error.strerror or error)
        # Served or not, the token was used: one attempt per offer.
        self._forget_offer()
        self._drop(connection)
        self._stop_listening_if_idle()

    def _timed_out(self, connection: _Connection) -> None:
        connection.timer = None
        log.warning("single sign-on: pid %d sent no complete token in %g s",
                    connection.pid, CONNECTION_TIMEOUT)
        self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        wipe(connection.received)
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None
        fileno = connection.sock.fileno()
        if self._connections.pop(fileno, None) is not None:
            self._loop.remove(fileno)
        connection.sock.close()

    # -- offers ------------------------------------------------------------------------

    def _expire(self, offer: _Offer) -> None:
        if self._offer is offer:
            offer.timer = None
            log.info("single sign-on: the credentials for %s expired unused", offer.user)
            self._forget_offer()
            self._stop_listening_if_idle()

    def _forget_offer(self) -> None:
        offer, self._offer = self._offer, None
        if offer is not None:
            offer.forget()

    def _stop_listening_if_idle(self) -> None:
        if self._offer is None:
            self._stop_listening()


def _string_argument(arguments: Dict[str, Any], name: str, required: bool) -> str:
    value = arguments.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ParameterError(f"'{name}' must be a string")
    if "\0" in value:
        raise ParameterError(f"'{name}' must not contain NUL")
    return value


def offer_credentials(ctx: Any, arguments: Dict[str, Any]) -> Dict[str, str]:
    """The :data:`PRIMITIVE` handler: arguments as documented above -> ``{"token": T}``.

    Raises :class:`ParameterError` for bad arguments, and
    :class:`CommandError` when the socket cannot be set up (logged too: the
    admin must fix it); the proxy sends the message as the
    ``primitive-reply`` error.
    """
    if not isinstance(arguments, dict):
        raise ParameterError("arguments must be an object")
    unknown = sorted(set(arguments) - {"user", "password", "domain", "token-ttl"})
    if unknown:
        raise ParameterError(f"unexpected argument '{unknown[0]}'")
    user = _string_argument(arguments, "user", required=True)
    if not user:
        raise ParameterError("'user' must not be empty")
    password = _string_argument(arguments, "password", required=True)
    domain = _string_argument(arguments, "domain", required=False)
    ttl = arguments.get("token-ttl", DEFAULT_TOKEN_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TOKEN_TTL:
        raise ParameterError(f"'token-ttl' must be a number of seconds in (0, {MAX_TOKEN_TTL:g}]")
    try:
        token = ctx.service(CredentialsServer).offer(user, password, domain, float(ttl))
    except CredentialsError as error:
        log.warning("single sign-on: %s", error)
        raise CommandError(f"single sign-on: {error}") from None
    return {"token": token}
