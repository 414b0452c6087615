"""The host side of qga: talk to a guest agent (qemu-ga or qga) from outside the VM.

:class:`Client` connects to the Unix socket behind the guest's agent channel,
synchronises with ``guest-sync-delimited`` and calls commands; ``qga-client``
(:mod:`qga.host.cli`) is its command line.  Nothing heavy is imported.
"""

from qga.errors import AgentError, BadReply, ClientError, ConnectionLost, ReplyTimeout, SyncError
from qga.host.client import Client, ExecResult

__all__ = ["Client", "ExecResult", "ClientError", "AgentError", "BadReply", "ConnectionLost",
           "ReplyTimeout", "SyncError"]
