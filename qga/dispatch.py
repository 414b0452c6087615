"""From a parsed request to a reply: shape checks, policy, arguments, handler.

:class:`Dispatcher` is qemu's ``qmp_dispatch()`` for the agent.  In order:

1. the request must be a JSON object (else no ``id`` is echoed);
2. its members are checked in QDict order (the first offender wins):
   ``execute`` must be a string, ``arguments`` an object, ``id`` anything,
   nothing else allowed; then ``execute`` must be there;
3. the command must be registered (``The command X has not been found``)
   and enabled (``Command X has been disabled[: reason]``), both before any
   argument is looked at;
4. the arguments go through the schema's visitor (qemu's exact texts);
5. the handler runs; :class:`~qga.errors.CommandError` becomes an error
   reply, any other exception a ``GenericError`` and a logged traceback (a
   handler bug never takes the agent down).

Every reply after step 1 echoes the request's ``id``.  Commands declared
``success-response: false`` (shutdown, suspend) reply nothing on success.

Why a command is disabled, most important first: frozen filesystems (only
:data:`FROZEN_SAFE_COMMANDS` run), ``--block-rpcs``, no handler on this
agent, not on the ``--allow-rpcs`` list.  All of them answer class
``CommandNotFound``, which libvirt takes for "not supported".
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional

from qga.commands import DeferredHandler
from qga.errors import CommandError, CommandDisabled, CommandNotFound, InputError
from qga.qdict_order import qdict_order

log = logging.getLogger(__name__)

FROZEN_SAFE_COMMANDS = frozenset({
    "guest-ping", "guest-info", "guest-sync", "guest-sync-delimited",
    "guest-fsfreeze-status", "guest-fsfreeze-thaw",
})
"""The only commands qemu-ga runs while filesystems are frozen."""

# Reasons appended to "Command X has been disabled" (qemu-ga 7.2/8.x texts).
REASON_BLOCKED = ""
REASON_NOT_ALLOWED = ": the command is not allowed"
REASON_FROZEN = ": the agent is in frozen state"

_REQUEST_MEMBERS = frozenset({"execute", "arguments", "id"})
_ABSENT = object()


class Policy:
    """Which commands the guest administrator lets the host run.

    ``blocked``: ``--block-rpcs``.  ``allowed``: ``--allow-rpcs``; when it is
    not None only those commands are enabled (guest-sync and guest-info
    included).  A command on both lists is blocked.
    """

    __slots__ = ("blocked", "allowed")

    def __init__(self, blocked: Iterable[str] = (), allowed: Optional[Iterable[str]] = None):
        self.blocked: FrozenSet[str] = frozenset(blocked)
        self.allowed: Optional[FrozenSet[str]] = None if allowed is None else frozenset(allowed)

    @classmethod
    def from_config(cls, config: Any) -> "Policy":
        return cls(getattr(config, "block_rpcs", None) or (), getattr(config, "allow_rpcs", None))

    def static_reason(self, name: str, has_handler: bool) -> Optional[str]:
        """Why ``name`` is disabled regardless of freezing (None: it is not)."""
        if name in self.blocked or not has_handler:
            return REASON_BLOCKED
        if self.allowed is not None and name not in self.allowed:
            return REASON_NOT_ALLOWED
        return None


class _Entry:
    """A registered command: its handler, policy verdict, argument visitor."""

    __slots__ = ("name", "handler", "reason", "frozen_safe", "success_response", "has_returns", "visitor")

    def __init__(self, name: str, handler: Optional[Callable[..., Any]], reason: Optional[str],
                 success_response: bool, has_returns: bool):
        self.name = name
        self.handler = handler
        self.reason = reason
        self.frozen_safe = name in FROZEN_SAFE_COMMANDS
        self.success_response = success_response
        self.has_returns = has_returns
        self.visitor: Optional[Callable[[Any], Dict[str, Any]]] = None


class Dispatcher:
    """Turns one parsed request into one reply dict (or None)."""

    def __init__(self, schema: Any, handlers: Dict[str, Callable[..., Any]], ctx: Any,
                 policy: Optional[Policy] = None):
        self.schema = schema
        self.ctx = ctx
        self.policy = policy or Policy()
        self._entries: Dict[str, _Entry] = {}
        for name in schema.command_names():
            command = schema.command(name)
            handler = handlers.get(name)
            self._entries[name] = _Entry(name, handler, self.policy.static_reason(name, handler is not None),
                                         command.success_response, command.returns is not None)
        for name in handlers:
            if name not in self._entries:
                log.warning("handler for %s ignored: the schema has no such command here", name)
        if getattr(ctx, "dispatcher", None) is None:
            ctx.dispatcher = self

    # -- the request path ----------------------------------------------------------

    def dispatch(self, request: Any) -> Optional[Dict[str, Any]]:
        """The reply to ``request`` (any parsed JSON value); None for no reply."""
        if type(request) is not dict:
            return self.error_reply(InputError("QMP input must be a JSON object"))
        request_id = request.get("id", _ABSENT)
        try:
            reply = self._run(request)
        except CommandError as error:
            body = {"class": error.error_class, "desc": error.desc}
            # qemu-ga writes these two members in this order (QDict order).
            if request_id is _ABSENT:
                return {"error": body}
            return {"id": _copy_id(request_id), "error": body}
        if reply is not None and request_id is not _ABSENT:
            reply["id"] = _copy_id(request_id)
        return reply

    def _run(self, request: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        name = request.get("execute")
        arguments = request.get("arguments", _ABSENT)
        if type(name) is not str or (arguments is not _ABSENT and type(arguments) is not dict) \
                or not _REQUEST_MEMBERS.issuperset(request):
            _check_request_members(request)
        if arguments is _ABSENT:
            arguments = None
        entry = self._entries.get(name)
        if entry is None:
            raise CommandNotFound(f"The command {name} has not been found")
        reason = entry.reason
        if not entry.frozen_safe and self._frozen():
            reason = REASON_FROZEN
        if reason is not None:
            raise CommandDisabled(f"Command {name} has been disabled{reason}")
        visitor = entry.visitor
        if visitor is None:  # the command's first call: build what it needs
            visitor = entry.visitor = self.schema.visitor(name)
            if isinstance(entry.handler, DeferredHandler):
                entry.handler = entry.handler.load()
        kwargs = visitor(arguments)
        try:
            result = entry.handler(self.ctx, **kwargs)
        except CommandError:
            raise
        except Exception as error:
            log.exception("command %s failed", name)
            raise CommandError(f"internal error in {name}: {type(error).__name__}") from error
        if not entry.success_response:
            return None
        if result is None and not entry.has_returns:
            result = {}
        return {"return": result}

    def _frozen(self) -> bool:
        state = getattr(self.ctx, "state", None)
        return state is not None and state.is_frozen()

    # -- helpers for the agent and guest-info ----------------------------------------

    def error_reply(self, error: CommandError) -> Dict[str, Any]:
        """The reply for an error outside any request (parse failures): no id."""
        return {"error": {"class": error.error_class, "desc": error.desc}}

    def is_enabled(self, name: str) -> bool:
        entry = self._entries.get(name)
        if entry is None or entry.reason is not None:
            return False
        return entry.frozen_safe or not self._frozen()

    def command_infos(self) -> List[Dict[str, Any]]:
        """guest-info's ``supported_commands``, in qemu-ga's order.

        qemu-ga walks its command list in registration (schema) order and
        prepends each entry, so the list comes out in reverse schema order.
        """
        frozen = self._frozen()
        infos = []
        for entry in reversed(list(self._entries.values())):
            enabled = entry.reason is None and (entry.frozen_safe or not frozen)
            infos.append({"name": entry.name, "enabled": enabled,
                          "success-response": entry.success_response})
        return infos


def _check_request_members(request: Dict[str, Any]) -> None:
    """qmp_dispatch_check_obj(): the first bad member in QDict order wins."""
    for key in qdict_order(request):
        value = request[key]
        if key == "execute":
            if type(value) is not str:
                raise InputError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if type(value) is not dict:
                raise InputError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise InputError(f"QMP input member '{key}' is unexpected")
    if "execute" not in request:
        raise InputError("QMP input lacks member 'execute'")


def _copy_id(value: Any) -> Any:
    # Scalars are immutable; containers are copied so a reply never aliases input.
    if type(value) is dict or type(value) is list:
        return copy.deepcopy(value)
    return value
