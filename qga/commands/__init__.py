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

A handler whose answer comes later from the event loop (an extension's
reply) returns a :class:`Deferred` instead of the value.  The agent then
holds the host's later requests, so replies keep their order, until the
deferred is resolved or fails; the loop meanwhile serves everything else.
Whoever returns a deferred must settle it within a bounded time.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Optional, Tuple, Type, TypeVar

T = TypeVar("T")

# The command table: each module and the commands it implements.  Modules
# are imported on the first call of one of their commands, so the agent
# starts without loading code (and its imports) the host may never use; a
# unit test checks this table against the modules' decorated handlers.
COMMAND_MODULES: Dict[str, Tuple[str, ...]] = {
    "qga.commands.core": ("guest-sync", "guest-sync-delimited", "guest-ping", "guest-info"),
    "qga.commands.files": ("guest-file-open", "guest-file-close", "guest-file-read",
                           "guest-file-write", "guest-file-seek", "guest-file-flush"),
    "qga.commands.exec": ("guest-exec", "guest-exec-status"),
    "qga.commands.system": ("guest-get-host-name", "guest-get-time", "guest-get-load",
                            "guest-get-osinfo", "guest-get-timezone", "guest-get-users"),
    "qga.commands.network": ("guest-network-get-interfaces", "guest-network-get-route"),
    "qga.commands.storage": ("guest-get-fsinfo", "guest-get-disks", "guest-get-diskstats"),
    "qga.commands.hardware": ("guest-get-vcpus", "guest-get-memory-blocks",
                              "guest-get-memory-block-info", "guest-get-cpustats"),
    "qga.commands.fsfreeze": ("guest-fsfreeze-status", "guest-fsfreeze-freeze",
                              "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw", "guest-fstrim"),
    "qga.commands.clock": ("guest-set-time",),
    "qga.commands.resources": ("guest-set-vcpus", "guest-set-memory-blocks"),
    "qga.commands.accounts": ("guest-set-user-password", "guest-ssh-get-authorized-keys",
                              "guest-ssh-add-authorized-keys", "guest-ssh-remove-authorized-keys"),
    "qga.commands.power": ("guest-shutdown", "guest-suspend-disk", "guest-suspend-ram",
                           "guest-suspend-hybrid"),
    "qga.commands.extensions": ("guest-extension-upload", "guest-extension-install",
                                "guest-extension-remove", "guest-extension-list",
                                "guest-extension-status", "guest-extension-start",
                                "guest-extension-stop", "guest-extension-call",
                                "guest-extension-events"),
}

Handler = Callable[..., Any]


def command(name: str) -> Callable[[Handler], Handler]:
    """Mark a function as the handler of the QAPI command ``name``."""

    def mark(function: Handler) -> Handler:
        function.qapi_command = name  # type: ignore[attr-defined]
        return function

    return mark


def module_handlers(module_name: str) -> Dict[str, Handler]:
    """Import one command module and map its command names to handlers."""
    module = importlib.import_module(module_name)
    handlers: Dict[str, Handler] = {}
    for value in vars(module).values():
        name = getattr(value, "qapi_command", None)
        if name is not None:
            if name in handlers:
                raise RuntimeError(f"two handlers for {name}")
            handlers[name] = value
    return handlers


class DeferredHandler:
    """A handler whose module is imported on first use (see :data:`COMMAND_MODULES`).

    The dispatcher calls :meth:`load` once and keeps the real function.
    """

    __slots__ = ("module_name", "command_name")

    def __init__(self, module_name: str, command_name: str):
        self.module_name = module_name
        self.command_name = command_name

    def load(self) -> Handler:
        handler = module_handlers(self.module_name).get(self.command_name)
        if handler is None:
            raise RuntimeError(f"{self.module_name} has no handler for {self.command_name}")
        return handler

    def __call__(self, ctx: Any, **arguments: Any) -> Any:
        return self.load()(ctx, **arguments)


def collect_handlers(modules: Optional[Dict[str, Tuple[str, ...]]] = None,
                     lazy: bool = True) -> Dict[str, Handler]:
    """The command table: names to handlers, deferred unless ``lazy`` is false."""
    table = COMMAND_MODULES if modules is None else modules
    handlers: Dict[str, Handler] = {}
    for module_name, names in table.items():
        if lazy:
            for name in names:
                handlers[name] = DeferredHandler(module_name, name)
        else:
            handlers.update(module_handlers(module_name))
    return handlers


class Deferred:
    """A reply value that the event loop will provide later (see the module docstring).

    Exactly one of :meth:`resolve` and :meth:`fail` settles it; later calls
    are ignored, so a timeout and a late answer cannot both count.
    """

    __slots__ = ("done", "value", "error", "_callbacks")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: Any = None   # a CommandError once failed
        self._callbacks: list = []

    def resolve(self, value: Any) -> None:
        self._settle(value, None)

    def fail(self, error: Any) -> None:
        self._settle(None, error)

    def add_done_callback(self, callback: Callable[["Deferred"], None]) -> None:
        """Call ``callback(self)`` when settled (at once if it is already)."""
        if self.done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def _settle(self, value: Any, error: Any) -> None:
        if self.done:
            return
        self.done, self.value, self.error = True, value, error
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)


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
