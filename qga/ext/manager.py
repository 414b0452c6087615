"""The extension runtime as one agent service: installed extensions, running.

:class:`Extensions` is what the host commands (:mod:`qga.commands.extensions`)
and the agent use: ``ctx.service(Extensions)``.  It holds the store
(:mod:`qga.ext.store`), the uploads and the installer (:mod:`qga.ext.install`)
and one :class:`Runtime` per installed extension, which joins its supervised
process (:mod:`qga.ext.supervisor`), its proxy socket (:mod:`qga.ext.proxy`),
its event queue (:mod:`qga.ext.events`) and, in channel mode, its port relay
(:mod:`qga.ext.relay`).  It needs the agent's loop.

At agent start (:meth:`Extensions.start`) every installed, enabled
extension is started; :meth:`Extensions.close` (from ``ctx.close()``) stops
them all, their whole process trees.

Files of a running extension, under the runtime directory (``runtime-dir``,
``/run/qga``)::

    ext/                    0750, group qga-ext: only extension users reach in
    ext/<name>.sock         its proxy socket, 0600, its user's
    ext/<name>/             QGA_EXT_RUNTIME, 0700, its user's
    ext/<name>.settings.json   QGA_EXT_SETTINGS, 0400, its user's

The directories above the installed bundles (the state directory too) must
be searchable by others (0711 is enough) when extensions run as their own
users; a start says so when they are not.

The settings are the manifest's ``settings.defaults`` overlaid (member by
member) with the admin's ``/etc/qga/extensions/<name>.json`` if it exists,
and must follow the manifest's ``settings.schema``, else the start fails.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional

from qga.errors import ExtensionError, ExtensionRunError, StateError
from qga.ext import launch
from qga.ext.events import EventQueue
from qga.ext.store import Store, remove_path, version_of
from qga.ext.supervisor import RUNNING, STARTING, Supervisor
from qga.state import atomic_write

log = logging.getLogger(__name__)

SETTINGS_DIR = "/etc/qga/extensions"
FROZEN_POLL = 0.25
SOCKET_DIR = "ext"


class Runtime:
    """One installed extension version, running or not."""

    def __init__(self, manager: "Extensions", name: str, version_id: str, manifest: Any):
        self.manager = manager
        self.name = name
        self.version_id = version_id
        self.manifest = manifest
        loop = manager.loop
        ext_dir = manager.socket_dir
        self.socket_path = os.path.join(ext_dir, f"{name}.sock")
        self.runtime_dir = os.path.join(ext_dir, name)
        self.settings_path = os.path.join(ext_dir, f"{name}.settings.json")
        self.events = manager.event_queue(name)
        self.relay = None
        if manifest.mode == "channel":
            from qga.ext.relay import PortRelay

            self.relay = PortRelay(name, loop, manifest.ports, manager.config.virtio_ports_dir,
                                   manager.is_frozen, self._on_host)
        self.supervisor = Supervisor(name, loop, self._prepare, manifest.ready_timeout,
                                     manager.is_frozen, manager.use_systemd, self._on_change)
        from qga.ext.proxy import Proxy

        self.proxy = Proxy(name, loop, manifest, self.socket_path, self.supervisor.owns,
                           self.supervisor.ready, self.supervisor.fail, self.events, self.relay,
                           self._primitive)

    @property
    def version(self) -> str:
        return version_of(self.version_id)

    def start(self, health: Optional[Callable[[Optional[str]], None]] = None) -> None:
        self.supervisor.start(health)

    def stop(self, callback: Optional[Callable[[], None]] = None,
             removing: bool = False) -> None:
        """Stop the process tree; then the socket and the port go too.

        ``removing``: the extension is being removed; its port first gets the
        manifest's ``channel.on-remove`` notice, if it has one."""
        def stopped() -> None:
            self.proxy.close(f"extension {self.name} stopped")
            if self.relay is not None:
                if removing and self.manifest.remove_notice:
                    self.relay.farewell(self.manifest.remove_notice)
                self.relay.close()
            if callback is not None:
                callback()

        self.supervisor.stop(stopped)

    def close(self) -> None:
        """At agent exit: synchronous."""
        self.supervisor.close()
        self.proxy.close(f"extension {self.name} stopped")
        if self.relay is not None:
            self.relay.close()

    # -- before each start -------------------------------------------------------------------

    def _prepare(self) -> launch.LaunchSpec:
        manager = self.manager
        identity = launch.identity_for(self.name, self.manifest.capabilities)
        state_dir = manager.store.state_dir(self.name)
        bundle_dir = manager.store.bundle_dir(self.name, self.version_id)
        if identity.own_user:
            _check_reachable(bundle_dir)
        try:
            manager.make_socket_dir()
            _private_directory(state_dir, identity)
            _private_directory(self.runtime_dir, identity)
            self._write_settings(identity)
        except OSError as error:
            raise ExtensionRunError(f"cannot prepare extension {self.name}:"
                                    f" {error.strerror or error}") from None
        self.proxy.listen(identity.uid, identity.gid)
        if self.relay is not None and self.relay.port is None:
            self.relay.open()
        env = launch.build_env(self.name, self.socket_path, bundle_dir, state_dir,
                               self.settings_path, self.runtime_dir, self.manifest.capabilities)
        argv = launch.build_argv(self.manifest.entry_point, bundle_dir, manager.python)
        return launch.LaunchSpec(self.name, argv, env, bundle_dir, identity,
                                 self.manifest.limits, self.manifest.capabilities,
                                 (state_dir, self.runtime_dir))

    def _write_settings(self, identity: launch.Identity) -> None:
        settings = dict(self.manifest.settings_defaults)
        override_path = os.path.join(self.manager.settings_dir, f"{self.name}.json")
        try:
            with open(override_path, "rb") as stream:
                override = json.loads(stream.read(1024 * 1024))
        except FileNotFoundError:
            override = {}
        except (OSError, ValueError) as error:
            raise ExtensionRunError(f"settings of extension {self.name}: {override_path}:"
                                    f" {error}") from None
        if not isinstance(override, dict):
            raise ExtensionRunError(f"settings of extension {self.name}: {override_path} is"
                                    " not a JSON object")
        settings.update(override)
        from qga.ext.manifest import describe_error, strict_validator

        error = next(iter(strict_validator(self.manifest.settings_schema)
                          .iter_errors(settings)), None)
        if error is not None:
            raise ExtensionRunError(f"settings of extension {self.name} do not follow its"
                                    f" schema: {describe_error(error)}")
        data = json.dumps(settings, sort_keys=True).encode() + b"\n"
        atomic_write(self.settings_path, data, 0o400)
        if identity.own_user:
            os.chown(self.settings_path, identity.uid, identity.gid)

    # -- events from the parts -----------------------------------------------------------------

    def _on_change(self, supervisor: Supervisor) -> None:
        if supervisor.state not in (STARTING, RUNNING):
            self.proxy.drop_connections(f"extension {self.name} is {supervisor.state}")

    def _primitive(self, primitive: Any, arguments: Any) -> Any:
        from qga.ext.primitives import perform

        return perform(self.manager.ctx, self.name, self.manifest.capabilities, primitive,
                       arguments)

    def _on_host(self, connected: bool) -> None:
        self.proxy.send_host(connected)

    # -- the status -------------------------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        supervisor = self.supervisor
        result: Dict[str, Any] = {"state": supervisor.state, "mode": self.manifest.mode,
                                  "restarts": supervisor.restarts,
                                  "connected": self.proxy.connected}
        if supervisor.pid is not None:
            result["pid"] = supervisor.pid
        if supervisor.started_at is not None:
            result["started"] = round(supervisor.started_at, 3)
        if supervisor.last_error:
            result["last-error"] = supervisor.last_error
        if self.relay is not None and self.relay.host_connected is not None:
            result["host-connected"] = self.relay.host_connected
        return result


class Extensions:
    """The agent's extension service; see the module docstring."""

    def __init__(self, ctx: Any):
        if ctx.loop is None:
            raise ExtensionRunError("the extension runtime needs the agent's event loop")
        self.ctx = ctx
        self.loop = ctx.loop
        self.config = ctx.config
        self.python = launch.find_python()
        self.use_systemd = launch.systemd_available()
        self.settings_dir = SETTINGS_DIR
        self.socket_dir = os.path.join(self.config.runtime_dir, SOCKET_DIR)
        self.runtimes: Dict[str, Runtime] = {}
        self._queues: Dict[str, EventQueue] = {}
        self._store: Optional[Store] = None
        self._uploads = None
        self._installer = None

    # -- the parts -----------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            try:
                self._store = Store.open(self.ctx.state.path)
            except StateError as error:
                raise ExtensionRunError(f"the extension store cannot be used: {error}"
                                        ) from None
        return self._store

    @property
    def uploads(self):
        if self._uploads is None:
            from qga.ext.install import Uploads

            self._uploads = Uploads(self.store.staging)
        return self._uploads

    @property
    def installer(self):
        if self._installer is None:
            from qga.ext.install import Installer

            self._installer = Installer(self)
        return self._installer

    def is_frozen(self) -> bool:
        state = self.ctx.state
        return state is not None and state.is_frozen()

    def event_queue(self, name: str) -> EventQueue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = EventQueue(self.loop)
        return queue

    def make_socket_dir(self) -> None:
        """``<runtime-dir>/ext``: 0750, group qga-ext when we are root."""
        os.makedirs(self.config.runtime_dir, 0o755, exist_ok=True)
        try:
            os.mkdir(self.socket_dir, 0o750)
        except FileExistsError:
            pass
        group = launch.runtime_group()
        info = os.stat(self.socket_dir)
        if group is not None and (info.st_uid, info.st_gid) != (0, group):
            os.chown(self.socket_dir, 0, group)
        if info.st_mode & 0o7777 != 0o750:
            os.chmod(self.socket_dir, 0o750)

    # -- life cycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """At agent start: every installed and enabled extension (errors are logged).

        Opening the store may finish an interrupted install (it writes), so an
        agent that starts while the guest is frozen waits for the thaw.
        """
        if self.is_frozen():
            self.loop.call_later(FROZEN_POLL, self.start)
            return
        try:
            entries = list(self.store.installed())
        except ExtensionError as error:
            log.error("%s; no extension is started", error)
            return
        self.uploads.expire()
        for entry in entries:
            if not entry.enabled:
                continue
            try:
                self.activate(entry.name).start()
            except ExtensionError as error:
                log.error("extension %s: %s", entry.name, error)

    def activate(self, name: str) -> Runtime:
        """A runtime for the store's current version of ``name`` (not started)."""
        entry = self.store.entry(name)
        if entry is None or not entry.installed:
            raise ExtensionRunError(f"extension {name} is not installed")
        manifest = self.store.read_manifest(name, entry.current)
        runtime = Runtime(self, name, entry.current, manifest)
        self.runtimes[name] = runtime
        return runtime

    def replace(self, name: str, then: Callable[[], None], removing: bool = False) -> None:
        """Stop the running runtime of ``name`` (if any), forget it, then call ``then()``."""
        runtime = self.runtimes.pop(name, None)
        if runtime is None:
            then()
        else:
            runtime.stop(then, removing)

    def runtime(self, name: str) -> Runtime:
        runtime = self.runtimes.get(name)
        if runtime is None:
            entry = self.store.entry(name)
            if entry is None or not entry.installed:
                raise ExtensionRunError(f"extension {name} is not installed")
            runtime = self.activate(name)
        return runtime

    def close(self) -> None:
        # SIGTERM to all first, so their grace periods run side by side.
        for runtime in self.runtimes.values():
            process = runtime.supervisor.process
            if process is not None:
                process.terminate()
        for runtime in list(self.runtimes.values()):
            try:
                runtime.close()
            except Exception:  # one broken extension must not keep the others running
                log.exception("extension %s: closing failed", runtime.name)
        self.runtimes.clear()
        for queue in self._queues.values():
            queue.close()

    # -- what the host commands do --------------------------------------------------------------------

    def list(self) -> List[Dict[str, Any]]:
        result = []
        for entry in self.store.installed():
            runtime = self.runtimes.get(entry.name)
            state = runtime.supervisor.state if runtime is not None else "stopped"
            mode = runtime.manifest.mode if runtime is not None else \
                self.store.read_manifest(entry.name, entry.current).mode
            result.append({"name": entry.name, "version": version_of(entry.current),
                           "state": state, "enabled": entry.enabled, "mode": mode})
        return result

    def status(self, name: str) -> Dict[str, Any]:
        entry = self.store.entry(name)
        if entry is None:
            raise ExtensionRunError(f"extension {name} is not installed")
        result: Dict[str, Any] = {"name": name, "enabled": entry.enabled}
        if entry.installed:
            result["version"] = version_of(entry.current)
            runtime = self.runtimes.get(name)
            if runtime is not None and runtime.version_id == entry.current:
                result.update(runtime.status())
            else:
                result.update({"state": "stopped", "restarts": 0, "connected": False,
                               "mode": self.store.read_manifest(name, entry.current).mode})
        else:
            result.update({"state": "not-installed", "restarts": 0, "connected": False})
        if entry.previous is not None:
            result["previous-version"] = version_of(entry.previous)
        if entry.counter is not None:
            result["counter"] = entry.counter
        queue = self._queues.get(name)
        runtime = self.runtimes.get(name)
        result["events-queued"] = len(queue) if queue is not None else 0
        result["events-dropped"] = queue.dropped if queue is not None else 0
        result["events-rejected"] = runtime.proxy.rejected if runtime is not None else 0
        install = self.installer.describe(name, entry.install)
        if install is not None:
            result["install"] = install
        return result

    def start_extension(self, name: str) -> None:
        self.store.set_enabled(name, True)
        self.runtime(name).start()

    def stop_extension(self, name: str) -> None:
        runtime = self.runtime(name)
        self.store.set_enabled(name, False)
        runtime.stop()

    def remove(self, name: str) -> None:
        self.installer.check_idle(name)
        entry = self.store.entry(name)
        if entry is None or not entry.installed:
            raise ExtensionRunError(f"extension {name} is not installed")
        self.store.remove(name)

        def forget() -> None:
            remove_path(os.path.join(self.socket_dir, name))
            remove_path(os.path.join(self.socket_dir, f"{name}.settings.json"))
            queue = self._queues.pop(name, None)
            if queue is not None:
                queue.close()

        self.replace(name, forget, removing=True)

    def call(self, name: str, command: str, arguments: Dict[str, Any],
             timeout: Optional[float]) -> Any:
        runtime = self.runtimes.get(name)
        if runtime is None:
            self.runtime(name)  # "not installed" when it is not
            raise ExtensionRunError(f"extension {name} is not running")
        if runtime.supervisor.state != RUNNING:
            raise ExtensionRunError(f"extension {name} is {runtime.supervisor.state}")
        return runtime.proxy.call(command, arguments, timeout)

    def events(self, name: str, cursor: Optional[str], maximum: int, wait: float) -> Any:
        entry = self.store.entry(name)
        if entry is None or not entry.installed:
            raise ExtensionRunError(f"extension {name} is not installed")
        return self.event_queue(name).read_or_wait(cursor, maximum, wait)


def _check_reachable(path: str) -> None:
    """Refuse, with the reason, a bundle its user could not reach (a 0700 state directory)."""
    parent = os.path.dirname(os.path.realpath(path))  # the directories really traversed
    while parent and parent != "/":
        if not os.stat(parent).st_mode & 0o001:
            raise ExtensionRunError(f"extension users cannot reach {path}: {parent} is not"
                                    " searchable by others (the state directory and those"
                                    " above it need at least mode 0711)")
        parent = os.path.dirname(parent)


def _private_directory(path: str, identity: launch.Identity) -> None:
    """A 0700 directory of the extension's user."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    if identity.own_user:
        os.chown(path, identity.uid, identity.gid)
    os.chmod(path, 0o700)
