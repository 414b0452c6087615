"""The wire protocol, sans IO: bytes in -> requests, replies -> bytes.

Nothing here touches a socket, a file or a clock.  See
:mod:`qga.protocol.stream` for input and :mod:`qga.protocol.encode` for
output.
"""

from qga.protocol.encode import AsciiText, encode_reply, encode_reply_chunks, encode_value
from qga.protocol.stream import NEED_DATA, ParseFailure, Parser, Request

# guest-sync-delimited: the host discards everything up to this byte.
DELIMITER = b"\xff"

__all__ = [
    "AsciiText", "DELIMITER", "NEED_DATA", "ParseFailure", "Parser", "Request",
    "encode_reply", "encode_reply_chunks", "encode_value",
]
