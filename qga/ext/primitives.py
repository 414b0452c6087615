"""Privileged primitives: narrow operations the core performs for an unprivileged extension.

An extension asks with a ``primitive`` frame (:mod:`qga.ext.wire`); the
proxy answers with a ``primitive-reply``.  Each primitive is allowed only
by a capability in the extension's manifest:

=========================  ==============  =============================================
primitive                  capability      what the core does
=========================  ==============  =============================================
``shutdown``               ``power``       ``shutdown -h|-r +DELAY MESSAGE``; arguments
                                           ``mode`` (``powerdown`` | ``reboot``),
                                           ``delay`` (whole minutes, 0..1440, default 0),
                                           ``message`` (at most 1024 characters)
``suspend``                ``power``       ``state`` ``disk`` | ``mem``: as
                                           guest-suspend-disk / guest-suspend-ram do
``drop-caches``            ``power``       ``sync``, then ``3`` into
                                           ``/proc/sys/vm/drop_caches``
``lock-sessions``          ``sessions``    ``loginctl lock-sessions``
``log-off``                ``sessions``    ends the session active on ``seat0``
                                           (``loginctl terminate-session ID``)
``sso-offer-credentials``  ``root-socket`` holds a login for the PAM module
                                           (:mod:`qga.ext.credentials`)
=========================  ==============  =============================================

Each returns ``{}`` (``sso-offer-credentials``: ``{"token": ...}``) or fails
with a text for the extension.  A handler is ``handler(ctx, arguments)``;
every program it runs is bounded by :data:`PROGRAM_TIMEOUT`, since it runs
on the agent's one loop.  Every use is logged.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Tuple

from qga.errors import CommandError, ParameterError

log = logging.getLogger(__name__)

PROGRAM_TIMEOUT = 10.0
MAX_MESSAGE = 1024
MAX_DELAY = 1440
SEAT = "seat0"

Handler = Callable[[Any, Dict[str, Any]], Any]


def _only(arguments: Dict[str, Any], allowed) -> None:
    if not isinstance(arguments, dict):
        raise ParameterError("arguments must be an object")
    unknown = sorted(set(arguments) - set(allowed))
    if unknown:
        raise ParameterError(f"unexpected argument '{unknown[0]}'")


def _run(argv, what: str) -> str:
    """Run a system program with a bounded wait; its stdout, or CommandError."""
    import subprocess

    from qga.ext.launch import SAFE_PATH

    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=PROGRAM_TIMEOUT, check=False,
                                env={"PATH": os.environ.get("PATH") or SAFE_PATH, "LANG": "C"})
    except subprocess.TimeoutExpired:
        raise CommandError(f"{what}: {argv[0]} took more than {PROGRAM_TIMEOUT:g} s") from None
    except OSError as error:
        raise CommandError(f"{what}: {argv[0]}: {error.strerror}") from None
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise CommandError(f"{what}: {argv[0]} failed" + (f": {detail[-1]}" if detail else ""))
    return result.stdout.decode("utf-8", "replace")


def shutdown(ctx: Any, arguments: Dict[str, Any]) -> Dict[str, Any]:
    from qga.commands.power import SHUTDOWN
    from qga.commands.sysutil import system_path

    _only(arguments, ("mode", "delay", "message"))
    mode = arguments.get("mode", "powerdown")
    flags = {"powerdown": "-h", "reboot": "-r"}
    if mode not in flags:
        raise ParameterError("'mode' must be 'powerdown' or 'reboot'")
    delay = arguments.get("delay", 0)
    if type(delay) is not int or not 0 <= delay <= MAX_DELAY:
        raise ParameterError(f"'delay' must be whole minutes from 0 to {MAX_DELAY}")
    message = arguments.get("message", "")
    if not isinstance(message, str) or len(message) > MAX_MESSAGE or "\0" in message:
        raise ParameterError(f"'message' must be text of at most {MAX_MESSAGE} characters")
    argv = [system_path(SHUTDOWN), flags[mode], f"+{delay}"] + ([message] if message else [])
    _run(argv, "shutdown")
    return {}


def suspend(ctx: Any, arguments: Dict[str, Any]) -> Dict[str, Any]:
    from qga.commands.power import DISK, RAM, guest_suspend

    _only(arguments, ("state",))
    modes = {"disk": DISK, "mem": RAM}
    state = arguments.get("state")
    if state not in modes:
        raise ParameterError("'state' must be 'disk' or 'mem'")
    guest_suspend(modes[state])
    return {}


def drop_caches(ctx: Any, arguments: Dict[str, Any]) -> Dict[str, Any]:
    from qga.commands.sysutil import system_path

    _only(arguments, ())
    os.sync()
    path = system_path("/proc/sys/vm/drop_caches")
    try:
        with open(path, "w") as stream:
            stream.write("3\n")
    except OSError as error:
        raise CommandError(f"drop-caches: {path}: {error.strerror}") from None
    return {}


def lock_sessions(ctx: Any, arguments: Dict[str, Any]) -> Dict[str, Any]:
    _only(arguments, ())
    _run(["loginctl", "lock-sessions"], "lock-sessions")
    return {}


def log_off(ctx: Any, arguments: Dict[str, Any]) -> Dict[str, Any]:
    _only(arguments, ())
    session = _run(["loginctl", "show-seat", SEAT, "--property=ActiveSession", "--value"],
                   "log-off").strip()
    if not session:
        raise CommandError(f"log-off: no session is active on {SEAT}")
    _run(["loginctl", "terminate-session", session], "log-off")
    return {}


def offer_credentials(ctx: Any, arguments: Dict[str, Any]) -> Any:
    from qga.ext.credentials import offer_credentials as offer

    return offer(ctx, arguments)


#: name -> (the capability that allows it, its handler)
PRIMITIVES: Dict[str, Tuple[str, Handler]] = {
    "shutdown": ("power", shutdown),
    "suspend": ("power", suspend),
    "drop-caches": ("power", drop_caches),
    "lock-sessions": ("sessions", lock_sessions),
    "log-off": ("sessions", log_off),
    "sso-offer-credentials": ("root-socket", offer_credentials),
}


def perform(ctx: Any, extension: str, capabilities, name: Any, arguments: Any) -> Any:
    """Run primitive ``name`` for ``extension``; its value, or CommandError/ExtensionError."""
    entry = PRIMITIVES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise CommandError(f"the core offers no primitive {str(name)[:64]!r}")
    capability, handler = entry
    if capability not in capabilities:
        raise CommandError(f"primitive '{name}' needs the '{capability}' capability")
    log.info("extension %s: primitive %s", extension, name)
    return handler(ctx, arguments if arguments is not None else {})
