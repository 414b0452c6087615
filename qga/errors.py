"""The one error tree of the project.

Every exception qga raises on purpose derives from :class:`QgaError`.  The
tree is split the way h11 splits it: errors the *peer* caused (a host that
sent bad bytes or a bad command) and errors of *our* side (configuration,
channel, state directory).  Only :class:`CommandError` and its subclasses
ever reach the wire, and they carry the two error classes qemu-ga sends.

::

    QgaError
    ├── CommandError            -> {"error": {"class": "GenericError", ...}}
    │   ├── CommandNotFound     -> class "CommandNotFound" (unknown command)
    │   │   └── CommandDisabled -> class "CommandNotFound", "... has been disabled"
    │   ├── ParameterError      -> a bad argument (missing, unexpected, wrong type)
    │   ├── Unsupported         -> "this feature or command is not currently supported"
    │   └── InputError          -> a request that is not a well-formed QMP request
    │       ├── JSONParseError  -> bytes that are not JSON ("JSON parse error, ...")
    │       └── JSONLimitError  -> a message over the nesting/token limits
    ├── ConfigError             -> bad command line or config file (exit status 1)
    ├── ChannelError            -> the transport cannot be opened or failed
    ├── StateError              -> the state directory cannot be read or written
    ├── ExtensionError          -> an extension bundle is refused (host commands send
    │   │                          the message as a GenericError desc)
    │   ├── BundleError         -> the archive is malformed, unsafe, too big, or disagrees
    │   │   │                      with its manifest; extraction failed (disk full)
    │   │   └── ManifestError   -> manifest.json is not valid JSON or breaks its schema
    │   ├── TrustError          -> the trust store is unusable (insecure permissions, a bad
    │   │                          key file) or no trusted key may sign this extension
    │   ├── SignatureError      -> the signature or statement is missing, malformed or does
    │   │                          not match; or an unsigned bundle while those are refused
    │   ├── RollbackError       -> the statement's counter is not above the installed one
    │   ├── StoreError          -> the extension store's index cannot be read or trusted
    │   │                          (nothing is started or deleted then)
    │   └── ExtensionRunError   -> an installed extension cannot be started, reached or
    │                              called (no user, spawn failed, not running, timed out)
    ├── CredentialsError        -> single sign-on: the root-only credentials socket cannot
    │                              be set up (the extension then emits no token)
    └── ClientError             -> host side (qga.host): talking to an agent
        ├── AgentError          -> the agent answered with an error reply
        ├── ConnectionLost      -> the socket closed or broke
        ├── SyncError           -> no sync reply within the time allowed
        ├── ReplyTimeout        -> no reply within the time allowed
        └── BadReply            -> a reply line that is not a reply (garbage, too long)
"""

from __future__ import annotations


class QgaError(Exception):
    """Root of every error qga raises on purpose."""


# -- errors that become error replies on the wire ----------------------------


class CommandError(QgaError):
    """A request failed; ``desc`` is sent to the host verbatim."""

    error_class = "GenericError"

    def __init__(self, desc: str):
        super().__init__(desc)
        self.desc = desc


class CommandNotFound(CommandError):
    """The command does not exist (or is disabled, see the subclass)."""

    error_class = "CommandNotFound"


class CommandDisabled(CommandNotFound):
    """The command exists but policy or state disables it.

    qemu-ga sends the same class as for an unknown command, and libvirt
    relies on that to skip unsupported information types.
    """


class ParameterError(CommandError):
    """An argument is missing, unexpected, of the wrong type or value."""


class Unsupported(CommandError):
    """The guest cannot do this at all (no hardware, no platform support)."""

    def __init__(self, desc: str = "this feature or command is not currently supported"):
        super().__init__(desc)


class InputError(CommandError):
    """The input is not a well-formed QMP request (not an object, no execute...)."""


class JSONParseError(InputError):
    """The bytes from the host are not valid JSON."""

    def __init__(self, detail: str):
        super().__init__("JSON parse error, " + detail)
        self.detail = detail


class JSONLimitError(InputError):
    """A message exceeds the parser's nesting, token count or size limit."""


# -- errors of our own side ---------------------------------------------------


class ConfigError(QgaError):
    """The command line or the configuration file is wrong."""


class ChannelError(QgaError):
    """The transport to the host cannot be opened or has failed."""


class StateError(QgaError):
    """The state directory cannot be read or written."""


# -- extension bundles ---------------------------------------------------------


class ExtensionError(QgaError):
    """An extension bundle, its statement or its trust is refused; the message says why."""


class BundleError(ExtensionError):
    """The archive is malformed, unsafe, over a cap, or disagrees with its manifest.

    Also raised when extraction fails (no space left): the partial directory
    is removed first.
    """


class ManifestError(BundleError):
    """``manifest.json`` is not strict JSON or does not follow the manifest schema."""


class TrustError(ExtensionError):
    """The trust store cannot be used, or no trusted key is allowed to sign this extension."""


class SignatureError(ExtensionError):
    """The statement or signature is missing, malformed or does not verify."""


class RollbackError(ExtensionError):
    """The bundle's counter is not higher than the installed one (a replay or a downgrade)."""


# -- single sign-on -------------------------------------------------------------


class CredentialsError(QgaError):
    """The credentials socket of single sign-on cannot be set up (unsafe directory, bind)."""


class StoreError(ExtensionError):
    """The extension store's index is unreadable or malformed; nothing is started or deleted."""


class ExtensionRunError(ExtensionError):
    """An installed extension cannot be started, reached or called; the message says why."""


# -- host side -----------------------------------------------------------------


class ClientError(QgaError):
    """Base of the errors a host-side client sees."""


class AgentError(ClientError):
    """The agent answered with an error reply."""

    def __init__(self, error_class: str, desc: str, command: str | None = None):
        where = f" ({command})" if command else ""
        super().__init__(f"{error_class}{where}: {desc}")
        self.error_class = error_class
        self.desc = desc
        self.command = command


class ConnectionLost(ClientError):
    """The connection to the agent closed or broke."""


class SyncError(ClientError):
    """The agent did not answer the synchronisation in time."""


class ReplyTimeout(ClientError):
    """The agent did not answer a command in time."""


class BadReply(ClientError):
    """The agent sent a line that is not a valid reply (not JSON, too long)."""
