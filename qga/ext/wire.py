"""The proxy protocol between the core and an extension process.

An extension never talks to the host directly.  The core starts it with
these environment variables (and nothing else of the agent's environment):

``QGA_EXT_NAME``      the extension's name (from its manifest)
``QGA_EXT_SOCKET``    the core's Unix socket for it, ``<rundir>/ext/<name>.sock``
``QGA_EXT_DIR``       the installed, read-only bundle directory
``QGA_EXT_STATE``     a private writable directory that survives upgrades
``QGA_EXT_SETTINGS``  a JSON file: manifest ``settings.defaults`` overlaid
                      with the guest admin's override file
``QGA_EXT_RUNTIME``   a private writable runtime directory (tmpfs), for sockets

Besides these, a fixed ``PATH`` (the system directories), ``LANG=C.UTF-8``
and ``HOME`` (the same directory as ``QGA_EXT_STATE``).

The extension connects to ``QGA_EXT_SOCKET``; the core checks the peer's
credentials (SO_PEERCRED: the extension's uid, and a pid in the process tree
it started).  Every connection starts with one *hello* frame naming its role:

* ``{"hello": "control", "version": 1}``: the control connection (exactly one).
* ``{"hello": "channel", "version": 1}``: channel mode only, after the hello
  the connection carries the raw bytes of the virtio-serial port the manifest
  names, both ways, untouched (the oVirt protocol is newline-delimited JSON of
  its own).  While the host side of the port is absent, bytes written are
  dropped, as on the port itself.

Frames on the control connection are JSON objects, one per line, at most
:data:`MAX_FRAME` bytes each (a longer line closes the connection).

Extension -> core:

``{"type": "ready"}``
    The extension is serving.  It must come within the manifest's
    ``ready-timeout`` or the start (and an install) counts as failed.
``{"type": "event", "name": NAME, "data": OBJECT}``
    An event for the host (validated against the manifest's ``events``,
    queued for ``guest-extension-events``; bounded, rate limited).
``{"type": "reply", "id": ID, "return": VALUE}`` /
``{"type": "reply", "id": ID, "error": {"desc": TEXT}}``
    The answer to a request (``return`` validated against the command's
    ``reply`` schema).
``{"type": "log", "level": "debug"|"info"|"warning"|"error", "message": TEXT}``
    A line for the agent's log, tagged with the extension's name.
``{"type": "primitive", "id": ID, "name": NAME, "arguments": OBJECT}``
    A narrow privileged operation the core performs for an unprivileged
    extension, allowed only by a capability in the manifest (single sign-on's
    root-only credentials socket is the first).  Answered with a
    ``primitive-reply`` frame of the same ``id``.

Core -> extension:

``{"type": "request", "id": ID, "command": NAME, "arguments": OBJECT}``
    A host's ``guest-extension-call``, already validated against the
    command's ``request`` schema.  The extension answers with a ``reply``.
``{"type": "primitive-reply", "id": ID, "return": VALUE}`` /
``{"type": "primitive-reply", "id": ID, "error": {"desc": TEXT}}``
``{"type": "host", "connected": BOOL}``
    Channel mode: the host side of the port came or went (as far as the
    guest can tell).

The extension stops on SIGTERM (then SIGKILL of its whole process tree after
a grace period).
"""

from __future__ import annotations

import json
from typing import Any, Dict

VERSION = 1
MAX_FRAME = 1 << 20  # one frame, newline included

ENV_NAME = "QGA_EXT_NAME"
ENV_SOCKET = "QGA_EXT_SOCKET"
ENV_DIR = "QGA_EXT_DIR"
ENV_STATE = "QGA_EXT_STATE"
ENV_SETTINGS = "QGA_EXT_SETTINGS"
ENV_RUNTIME = "QGA_EXT_RUNTIME"

ROLE_CONTROL = "control"
ROLE_CHANNEL = "channel"

LOG_LEVELS = ("debug", "info", "warning", "error")


class FrameError(ValueError):
    """A frame that is not a JSON object on one line within the size cap."""


def encode(frame: Dict[str, Any]) -> bytes:
    """One frame as a line; compact ASCII JSON, so no frame contains a newline."""
    line = json.dumps(frame, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"
    if len(line) > MAX_FRAME:
        raise FrameError(f"frame of {len(line)} bytes is over the {MAX_FRAME} byte cap")
    return line


def decode(line: bytes) -> Dict[str, Any]:
    """One received line (newline stripped or not) as a frame object."""
    if len(line) > MAX_FRAME:
        raise FrameError(f"frame of {len(line)} bytes is over the {MAX_FRAME} byte cap")
    try:
        frame = json.loads(line)
    except ValueError as error:
        raise FrameError(f"frame is not JSON: {error}") from None
    if not isinstance(frame, dict):
        raise FrameError("frame is not a JSON object")
    return frame


def hello(role: str) -> bytes:
    return encode({"hello": role, "version": VERSION})
