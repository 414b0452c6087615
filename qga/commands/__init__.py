"""Command handlers, one module per command family.

A handler is a plain function decorated with :func:`command`.  It receives
the :class:`Context` and the validated arguments as keyword arguments, with
QAPI names turned into Python names (``buf-b64`` -> ``buf_b64``).  Optional
arguments the host did not send are *not* passed, so the handler's defaults
apply and "absent" stays distinguishable from any value.  A handler returns
the reply value (``None`` for commands without ``returns``) or raises a
:class:`qga.errors.CommandError`.  It knows nothing of the wire.

Families keep their state in *services*: small classes built once per agent
on first use with ``ctx.service(FileTable)``.  There are no module-level
mutable globals.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Iterable, Optional, Type, TypeVar

T = TypeVar("T")

# Modules whose decorated functions form the command table.  Each module
# must keep its top-level imports light; heavy ones load inside handlers.
COMMAND_MODULES = (
    "qga.commands.core",
    "qga.commands.files",
    "qga.commands.exec",
    "qga.commands.system",
    "qga.commands.network",
    "qga.commands.storage",
    "qga.commands.hardware",
    "qga.commands.fsfreeze",
    "qga.commands.clock",
    "qga.commands.resources",
    "qga.commands.accounts",
    "qga.commands.power",
)

Handler = Callable[..., Any]


def command(name: str) -> Callable[[Handler], Handler]:
    """Mark a function as the handler of the QAPI command ``name``."""

    def mark(function: Handler) -> Handler:
        function.qapi_command = name  # type: ignore[attr-defined]
        return function

    return mark


def collect_handlers(modules: Iterable[str] = COMMAND_MODULES) -> Dict[str, Handler]:
    """Import the command modules and map command names to handlers."""
    handlers: Dict[str, Handler] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # a family not built yet: its commands stay unimplemented
        for value in vars(module).values():
            name = getattr(value, "qapi_command", None)
            if name is not None:
                if name in handlers:
                    raise RuntimeError(f"two handlers for {name}")
                handlers[name] = value
    return handlers


class Context:
    """What a handler may use: configuration, state, the loop, services.

    ``config`` is a :class:`qga.config.Config`, ``state`` a
    :class:`qga.state.StateDir`, ``loop`` a :class:`qga.loop.Loop` (or None in
    tests that do not need one), ``dispatcher`` the
    :class:`qga.dispatch.Dispatcher` (for ``guest-info``).
    """

    def __init__(self, config: Any, state: Any, loop: Any = None, dispatcher: Any = None):
        self.config = config
        self.state = state
        self.loop = loop
        self.dispatcher = dispatcher
        self._services: Dict[type, Any] = {}
        self._delimit_next_reply = False

    def service(self, cls: Type[T]) -> T:
        """The agent's single instance of ``cls``, built as ``cls(ctx)`` on first use."""
        instance = self._services.get(cls)
        if instance is None:
            instance = self._services[cls] = cls(self)
        return instance

    def existing_service(self, cls: Type[T]) -> Optional[T]:
        """The instance of ``cls`` if one was built, without building it."""
        return self._services.get(cls)

    # guest-sync-delimited asks for one 0xFF before the next reply written.
    def delimit_next_reply(self) -> None:
        self._delimit_next_reply = True

    def take_delimit_flag(self) -> bool:
        flag, self._delimit_next_reply = self._delimit_next_reply, False
        return flag

    def close(self) -> None:
        """Let every service release what it holds (files, children)."""
        for service in list(self._services.values()):
            close = getattr(service, "close", None)
            if close is not None:
                close()
        self._services.clear()
