"""guest-extension-*: push, install, run and talk to extensions (our own commands).

The handlers are thin: the work is :class:`qga.ext.manager.Extensions`'s.
Every refusal of the extension machinery (an :class:`~qga.errors.ExtensionError`:
a bad signature, a bundle that breaks a rule, an extension not running)
reaches the host as a ``GenericError`` whose text says why.

Two commands may answer later (a :class:`~qga.commands.Deferred`):
``guest-extension-call`` (the extension's reply, or a timeout) and
``guest-extension-events`` with ``wait`` (the next event, or the end of the
wait).  The agent holds the host's next requests meanwhile, so a host
sees replies in order; the agent itself keeps serving everything else.

Like every command but six, these are refused while the guest is frozen.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from qga.commands import command
from qga.errors import CommandError, ExtensionError, ParameterError

MAX_CALL_TIMEOUT = 3600.0


def _extensions(ctx):
    from qga.ext.manager import Extensions

    try:
        return ctx.service(Extensions)
    except ExtensionError as error:
        raise CommandError(str(error)) from None


def _run(function, *args):
    try:
        return function(*args)
    except ExtensionError as error:
        raise CommandError(str(error)) from None


@command("guest-extension-upload")
def extension_upload(ctx, upload: Optional[str] = None, size: Optional[int] = None,
                     offset: Optional[int] = None, data: Optional[str] = None) -> Dict[str, Any]:
    uploads = _run(lambda: _extensions(ctx).uploads)
    if upload is None:
        if size is None:
            raise ParameterError("a new upload needs its total 'size'")
        if offset not in (None, 0):
            raise ParameterError("a new upload starts at offset 0")
        upload = _run(uploads.start, size)
        offset = 0
        if data is None:
            return _run(uploads.status, upload)
    elif size is not None:
        raise ParameterError("'size' is given only when an upload starts")
    if data is None:
        return _run(uploads.status, upload)
    if offset is None:
        raise ParameterError("a chunk needs its 'offset'")
    from qga.ext.install import decode_base64

    return _run(uploads.write, upload, offset, decode_base64(data, "data"))


@command("guest-extension-install")
def extension_install(ctx, upload: str, statement: Optional[str] = None,
                      signature: Optional[str] = None) -> Dict[str, Any]:
    extensions = _extensions(ctx)
    return _run(lambda: extensions.installer.install(upload, statement, signature))


@command("guest-extension-remove")
def extension_remove(ctx, name: str) -> None:
    _run(_extensions(ctx).remove, name)


@command("guest-extension-list")
def extension_list(ctx) -> Any:
    return _run(_extensions(ctx).list)


@command("guest-extension-status")
def extension_status(ctx, name: str) -> Dict[str, Any]:
    return _run(_extensions(ctx).status, name)


@command("guest-extension-start")
def extension_start(ctx, name: str) -> None:
    _run(_extensions(ctx).start_extension, name)


@command("guest-extension-stop")
def extension_stop(ctx, name: str) -> None:
    _run(_extensions(ctx).stop_extension, name)


@command("guest-extension-call")
def extension_call(ctx, name: str, command: str, arguments: Any = None,
                   timeout: Optional[float] = None) -> Any:
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ParameterError("'arguments' must be an object")
    if timeout is not None and not 0 < timeout <= MAX_CALL_TIMEOUT:
        raise ParameterError(f"'timeout' must be above 0 and at most {MAX_CALL_TIMEOUT:g}")
    return _run(_extensions(ctx).call, name, command, arguments, timeout)


@command("guest-extension-events")
def extension_events(ctx, name: str, cursor: Optional[str] = None, max: int = 100,
                     wait: float = 0) -> Any:
    from qga.ext.events import MAX_WAIT

    if not 1 <= max <= 1000:
        raise ParameterError("'max' must be between 1 and 1000")
    if not 0 <= wait <= MAX_WAIT:
        raise ParameterError(f"'wait' must be between 0 and {MAX_WAIT:g}")
    return _run(_extensions(ctx).events, name, cursor, max, wait)
