"""A fake VDSM that reads the oVirt channel exactly as VDSM's ``guestagent.py`` does.

:class:`VdsmReader` is the sans-IO part, VDSM's reader and message handler
line for line: ``recv(65536)`` chunks split on ``\\n``, a partial line
thrown away once it reaches ``MAX_MESSAGE_SIZE`` (1 MiB) and the rest of that
line skipped, UTF-8 decoded with replacement, ``json.loads``, the XML-char
filter applied to every string after decoding, ``__name__`` popped; a
``ValueError`` drops the line, a ``KeyError``/``TypeError`` escapes (VDSM's
channel listener logs it and the rest of that chunk is lost: recorded in
:attr:`VdsmReader.exceptions`).  The API version negotiation is VDSM's
``_handleAPIVersion``, and ``guest_info`` is updated as ``_handleMessage`` does.

:class:`FakeVdsm` adds the socket: it connects to the host side of the
channel (as VDSM connects to libvirt's bind-mode chardev socket), sends
``refresh {apiVersion: 3}`` on every connect, and records every message with
the time it arrived.

:func:`validate` is the original agent's ``tests/message_validator.py``: the
field types every agent -> host message must have.

:class:`FakeCore` stands in for the qga core's side of an extension: the
``QGA_EXT_SOCKET`` listener (hello, control frames, primitives answered as
told), and in channel mode the relay between the extension's channel
connection and a host-side Unix socket a :class:`FakeVdsm` connects to,
with ``host`` frames when that side comes and goes.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

MAX_SUPPORTED_API_VERSION = 3
IMPLICIT_API_VERSION_ZERO = 0
MESSAGE_API_VERSION_LOOKUP = {"set-number-of-cpus": 1, "lifecycle-event": 3}

_FILTERED = re.compile("[\u0000-\u0008\u000b-\u000c\u000e-\u001f\u007f-\u0084\u0086-\u009f"
                       "\ud800-\udfff\ufffe-\uffff]")


def filter_object(value: Any) -> Any:
    """VDSM's _filterObject: the XML-char filter on every string, dict keys included."""
    if isinstance(value, dict):
        return {filter_object(key): filter_object(member) for key, member in value.items()}
    if isinstance(value, list):
        return [filter_object(member) for member in value]
    if isinstance(value, str):
        return _FILTERED.sub("\ufffd", value)
    return value


class Unsupported(Exception):
    """VDSM's GuestAgentUnsupportedMessage: the command needs a higher API version."""


class VdsmReader:
    """VDSM's GuestAgent reading side, without the socket."""

    MAX_MESSAGE_SIZE = 1 << 20

    def __init__(self, api_version: int = 0, send: Optional[Callable[[bytes], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        # The effective version VDSM kept in the VM's metadata.
        self.effective_api_version = min(api_version, MAX_SUPPORTED_API_VERSION)
        self._send = send or (lambda data: None)
        self.clock = clock
        self.guest_info: Dict[str, Any] = {
            "username": "Unknown", "memUsage": 0, "guestCPUCount": -1, "guestIPs": "",
            "guestFQDN": "", "session": "Unknown", "appsList": (), "disksUsage": [],
            "netIfaces": [], "memoryStats": {}}
        self.disk_mapping: Dict[str, Any] = {}
        self.guest_status: Optional[str] = None
        self.messages: List[Tuple[float, str, Dict[str, Any]]] = []  # (when, name, args)
        self.sent: List[Tuple[str, Dict[str, Any]]] = []           # what VDSM forwarded
        self.errors: List[str] = []        # lines VDSM logged as errors (ValueError, unknown)
        self.exceptions: List[BaseException] = []  # what escaped to the channel listener
        self.too_big = 0
        self.completions: List[Any] = []
        self.agent_timestamp = 0.0
        self._buffer: List[bytes] = []
        self._buffer_size = 0
        self._too_big_state = False

    # -- VDSM's _handleData / _processMessage / _parseLine --

    def clear(self) -> None:
        """What VDSM does on (re)connect: an empty buffer, normal state."""
        self._buffer = []
        self._buffer_size = 0
        self._too_big_state = False

    def handle_chunk(self, data: bytes) -> None:
        """One ``recv`` result; an escaping exception is recorded and ends the chunk."""
        try:
            self._handle_data(data)
        except (KeyError, TypeError, AttributeError) as error:
            self.exceptions.append(error)

    def _handle_data(self, data: bytes) -> None:
        while b"\n" in data:
            line, data = data.split(b"\n", 1)
            line = b"".join(self._buffer) + line
            self._buffer = []
            self._buffer_size = 0
            if self._too_big_state:
                self._too_big_state = False
                self.too_big += 1
            else:
                self._process_message(line)
        self._buffer.append(data)
        self._buffer_size += len(data)
        if self._buffer_size >= self.MAX_MESSAGE_SIZE:
            self._too_big_state = True
            self._buffer = []
            self._buffer_size = 0

    def _process_message(self, line: bytes) -> None:
        try:
            name, args = self._parse_line(line)
            self.agent_timestamp = self.clock()
            self._handle_message(name, args)
        except ValueError as error:
            self.errors.append(f"{error}: {line!r}")

    @staticmethod
    def _parse_line(line: bytes) -> Tuple[str, Dict[str, Any]]:
        args = json.loads(line.decode("utf8", "replace"))
        args = filter_object(args)
        name = args["__name__"]
        del args["__name__"]
        return name, args

    # -- VDSM's _handleMessage and _handleAPIVersion --

    def _handle_message(self, name: str, args: Dict[str, Any]) -> None:
        self.messages.append((self.clock(), name, json.loads(json.dumps(args))))
        info = self.guest_info
        if name == "heartbeat":
            info["memUsage"] = int(args["free-ram"])
            if "memory-stat" in args:
                for key in ("mem_total", "mem_unused", "mem_buffers", "mem_cached", "swap_in",
                            "swap_out", "pageflt", "majflt"):
                    if key not in args["memory-stat"]:
                        continue
                    info["memoryStats"][key] = str(args["memory-stat"][key])
                    if key == "mem_unused":
                        info["memoryStats"]["mem_free"] = str(args["memory-stat"]["mem_unused"])
            if "apiVersion" in args:
                self._handle_api_version(args["apiVersion"])
            elif self.effective_api_version != IMPLICIT_API_VERSION_ZERO:
                self.effective_api_version = IMPLICIT_API_VERSION_ZERO
            self.guest_status = "Up"
        elif name == "host-name":
            info["guestName"] = args["name"]
        elif name == "os-version":
            info["guestOs"] = args["version"]
        elif name == "os-info":
            info["guestOsInfo"] = args
        elif name == "timezone":
            info["guestTimezone"] = args
        elif name == "network-interfaces":
            interfaces = []
            old_ips = ""
            for iface in args["interfaces"]:
                iface["inet"] = iface.get("inet", [])
                iface["inet6"] = iface.get("inet6", [])
                interfaces.append(iface)
                old_ips += " ".join(iface["inet"]) + " "
            info["netIfaces"] = interfaces
            info["guestIPs"] = old_ips.strip()
        elif name == "applications":
            info["appsList"] = tuple(args["applications"])
        elif name == "active-user":
            current = args["name"]
            if current != info["username"] and not (current == "Unknown"
                                                    and info["username"] == "None"):
                info["username"] = current
                info["lastLogin"] = time.time()
        elif name == "session-logon":
            info["session"] = "UserLoggedOn"
        elif name == "session-lock":
            info["session"] = "Locked"
        elif name == "session-unlock":
            info["session"] = "Active"
        elif name == "session-logoff":
            info["session"] = "LoggedOff"
        elif name == "uninstalled":
            info["appsList"] = ()
        elif name in ("session-startup", "session-shutdown"):
            pass
        elif name == "fqdn":
            info["guestFQDN"] = args["fqdn"]
        elif name == "containers":
            info["guestContainers"] = args["list"]
        elif name == "disks-usage":
            disks = []
            for disk in args["disks"]:
                disk["total"] = str(disk["total"])
                disk["used"] = str(disk["used"])
                disks.append(disk)
            info["disksUsage"] = disks
            self.disk_mapping = args.get("mapping", {})
        elif name == "number-of-cpus":
            info["guestCPUCount"] = int(args["count"])
        elif name == "completion":
            self.completions.append(args.pop("reply_id", None))
        else:
            self.errors.append(f"Unknown message type {name}")

    def _handle_api_version(self, version: Any) -> None:
        try:
            common = int(version)
        except ValueError:
            common = IMPLICIT_API_VERSION_ZERO
        else:
            common = min(max(common, IMPLICIT_API_VERSION_ZERO), MAX_SUPPORTED_API_VERSION)
        if common != self.effective_api_version:
            self.effective_api_version = common
            if common != IMPLICIT_API_VERSION_ZERO:
                self.forward("api-version", {"apiVersion": common})

    # -- VDSM's _forward --

    def forward(self, command: str, args: Optional[Dict[str, Any]] = None) -> None:
        needed = MESSAGE_API_VERSION_LOOKUP.get(command, IMPLICIT_API_VERSION_ZERO)
        if needed > self.effective_api_version:
            raise Unsupported(f"{command} needs version {needed}, effective is"
                              f" {self.effective_api_version}")
        args = dict(args or {})
        args["__name__"] = command
        self.sent.append((command, args))
        self._send((json.dumps(args) + "\n").encode("utf8"))

    # -- for the tests --

    def names(self, since: int = 0) -> List[str]:
        return [name for _, name, _ in self.messages[since:]]

    def of(self, name: str) -> List[Dict[str, Any]]:
        return [args for _, message, args in self.messages if message == name]

    def is_responsive(self) -> bool:
        return self.clock() - self.agent_timestamp < 120


class FakeVdsm(VdsmReader):
    """:class:`VdsmReader` on a real socket: connects to the channel's host side."""

    def __init__(self, path: str, api_version: int = 0, connect: bool = True):
        super().__init__(api_version, send=self._send_bytes)
        self.path = path
        self.sock: Optional[socket.socket] = None
        self.connects = 0
        if connect:
            self.connect()

    def connect(self, timeout: float = 10.0) -> None:
        """Connect (retrying until ``timeout``), then send refresh like VDSM's _connect."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.setblocking(False)
        self.sock = sock
        self.connects += 1
        self.clear()
        self.forward("refresh", {"apiVersion": MAX_SUPPORTED_API_VERSION})

    def disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _send_bytes(self, data: bytes) -> None:
        assert self.sock is not None, "not connected"
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def send_raw(self, data: bytes) -> None:
        """Bytes VDSM would never send (malformed lines), straight onto the channel."""
        self._send_bytes(data)

    def pump(self, timeout: float = 0.0) -> bool:
        """Read what arrives within ``timeout``; False when the guest side closed."""
        assert self.sock is not None, "not connected"
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ)
        try:
            while selector.select(timeout):
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    break
                except ConnectionResetError:
                    data = b""
                if not data:
                    return False
                self.handle_chunk(data)
                timeout = 0.0
        finally:
            selector.close()
        return True

    def pump_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not self.pump(min(left, 0.05)):
                return condition()
        return True

    def wait_for(self, name: str, count: int = 1, timeout: float = 10.0) -> List[Dict[str, Any]]:
        """Pump until ``count`` messages ``name`` have arrived; their arguments."""
        if not self.pump_until(lambda: len(self.of(name)) >= count, timeout):
            raise AssertionError(f"{count} x {name} did not arrive within {timeout} s;"
                                 f" got {self.names()}")
        return self.of(name)

    def close(self) -> None:
        self.disconnect()


class PtyVdsm(VdsmReader):
    """:class:`VdsmReader` on the host end of a pty that stands in for the virtio port.

    The guest side (the agent under test) opens the pty's slave as the port;
    the test holds the master here, as QEMU holds the host side.  On creation
    it sends ``refresh`` as VDSM does when it connects.
    """

    def __init__(self, master_fd: int, api_version: int = 0):
        super().__init__(api_version, send=self._send_bytes)
        self.fd = master_fd
        os.set_blocking(master_fd, False)
        self.forward("refresh", {"apiVersion": MAX_SUPPORTED_API_VERSION})

    def _send_bytes(self, data: bytes) -> None:
        while data:
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            data = data[written:]

    def pump(self, timeout: float = 0.0) -> bool:
        selector = selectors.DefaultSelector()
        selector.register(self.fd, selectors.EVENT_READ)
        try:
            while selector.select(timeout):
                try:
                    data = os.read(self.fd, 65536)
                except BlockingIOError:
                    break
                except OSError:          # EIO: the guest side is closed
                    return False
                if not data:
                    return False
                self.handle_chunk(data)
                timeout = 0.0
        finally:
            selector.close()
        return True

    pump_until = FakeVdsm.pump_until
    wait_for = FakeVdsm.wait_for


# -- the original agent's message validator ----------------------------------------------


def _integral(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, str):
        try:
            int(value)
        except ValueError:
            return False
        return True
    return False


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


MEMORY_KEYS = ("majflt", "mem_free", "mem_total", "mem_unused", "mem_buffers", "mem_cached",
               "pageflt", "swap_in", "swap_out")


def validate(name: str, args: Dict[str, Any]) -> List[str]:
    """The problems the original's message_validator finds in one message (empty: valid)."""
    problems: List[str] = []

    def need(condition: bool, what: str) -> None:
        if not condition:
            problems.append(f"{name}: {what}")

    if name in ("session-lock", "session-unlock", "session-logon", "session-logoff",
                "session-startup", "session-shutdown"):
        need(args == {}, "must carry nothing but __name__")
    elif name == "active-user":
        need(isinstance(args.get("name"), str), "name is not a string")
    elif name == "applications":
        need(_strings(args.get("applications")), "applications is not a list of strings")
    elif name == "fqdn":
        need(isinstance(args.get("fqdn"), str), "fqdn is not a string")
    elif name == "host-name":
        need(isinstance(args.get("name"), str), "name is not a string")
    elif name == "os-version":
        need(isinstance(args.get("version"), str), "version is not a string")
    elif name == "number-of-cpus":
        need(_integral(args.get("count")), "count is not integral")
    elif name == "network-interfaces":
        interfaces = args.get("interfaces")
        need(isinstance(interfaces, list), "interfaces is not a list")
        for item in interfaces or []:
            need(isinstance(item.get("hw"), str) and isinstance(item.get("name"), str)
                 and _strings(item.get("inet")) and _strings(item.get("inet6")),
                 f"bad interface {item!r}")
    elif name == "disks-usage":
        need(isinstance(args.get("disks"), list), "disks is not a list")
        for disk in args.get("disks") or []:
            need(isinstance(disk.get("fs"), str) and isinstance(disk.get("path"), str)
                 and _integral(disk.get("total")) and _integral(disk.get("used")),
                 f"bad disk {disk!r}")
    elif name == "memory-stats":
        memory = args.get("memory", {})
        need(all(_integral(memory.get(key)) for key in MEMORY_KEYS), "memory keys")
    elif name == "os-info":
        keys = ("version", "distribution", "codename", "arch", "type", "kernel")
        need(all(isinstance(args.get(key), str) for key in keys), "a key is not a string")
        need(all(args.get(key) for key in ("arch", "version", "type")),
             "arch, version or type is empty")
    elif name == "timezone":
        need(isinstance(args.get("zone"), str) and _integral(args.get("offset")),
             "zone/offset")
    elif name == "containers":
        items = args.get("list")
        need(isinstance(items, list), "list is not a list")
        for item in items or []:
            need(all(isinstance(item.get(key), str) for key in ("id", "status", "image",
                                                                 "command"))
                 and _strings(item.get("names")), f"bad container {item!r}")
    elif name in ("heartbeat", "echo", "completion"):
        pass  # the original validator has none for these
    else:
        problems.append(f"{name}: not a message the agent sends")
    return problems


# -- the core's side of an extension ------------------------------------------------------


class FakeCore:
    """The qga core's extension proxy, just enough to run an extension process against.

    Listens on ``<dir>/ext.sock`` (``QGA_EXT_SOCKET``); a ``control`` hello
    gets frames recorded in :attr:`frames` (primitives answered from
    :attr:`primitive_results`: name -> ``("return", value)`` or
    ``("error", text)``); a ``channel`` hello is relayed to the host-side
    listener ``<dir>/host.sock``, where one :class:`FakeVdsm` at a time
    connects.  Runs in a thread until :meth:`close`.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.socket_path = os.path.join(directory, "ext.sock")
        self.host_path = os.path.join(directory, "host.sock")
        self.frames: List[Dict[str, Any]] = []
        self.primitive_results: Dict[str, Tuple[str, Any]] = {}
        self.replies: Dict[Any, Dict[str, Any]] = {}
        self.hellos: List[str] = []
        self.channel_connections = 0
        self._lock = threading.RLock()
        self._selector = selectors.DefaultSelector()
        self._control: Optional[socket.socket] = None
        self._channel: Optional[socket.socket] = None
        self._host: Optional[socket.socket] = None
        self._pending: Dict[socket.socket, bytearray] = {}
        self._control_buffer = bytearray()
        self._running = True
        self._ids = 0
        self._listeners = []
        for path, accept in ((self.socket_path, self._accept_extension),
                             (self.host_path, self._accept_host)):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(8)
            listener.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ, accept)
            self._listeners.append(listener)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._outbox: List[Tuple[str, bytes]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def environ(self, settings: Dict[str, Any], name: str = "ovirt-guest-agent",
                bundle_dir: str = "") -> Dict[str, str]:
        """The environment the core gives the extension (settings written to a file)."""
        settings_path = os.path.join(self.directory, "settings.json")
        with open(settings_path, "w") as stream:
            json.dump(settings, stream)
        for sub in ("state", "run"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        return {"QGA_EXT_NAME": name, "QGA_EXT_SOCKET": self.socket_path,
                "QGA_EXT_DIR": bundle_dir, "QGA_EXT_STATE": os.path.join(self.directory, "state"),
                "QGA_EXT_SETTINGS": settings_path,
                "QGA_EXT_RUNTIME": os.path.join(self.directory, "run"),
                # Never the machine's system bus (single sign-on would own a name there).
                "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=" + os.path.join(self.directory,
                                                                       "no-system-bus")}

    # -- the thread --

    def _run(self) -> None:
        while self._running:
            for key, _ in self._selector.select(0.5):
                key.data(key.fileobj)

    def _on_wake(self, sock: socket.socket) -> None:
        sock.recv(4096)
        with self._lock:
            outbox, self._outbox = self._outbox, []
        for target, data in outbox:
            connection = self._control if target == "control" else self._host
            if connection is not None:
                try:
                    connection.sendall(data)
                except OSError:
                    pass

    def _post(self, target: str, data: bytes) -> None:
        with self._lock:
            self._outbox.append((target, data))
        self._wake_w.send(b"x")

    def _accept_extension(self, listener: socket.socket) -> None:
        sock, _ = listener.accept()
        self._pending[sock] = bytearray()
        self._selector.register(sock, selectors.EVENT_READ, self._on_hello)

    def _on_hello(self, sock: socket.socket) -> None:
        data = sock.recv(65536)
        if not data:
            self._drop(sock)
            return
        buffer = self._pending[sock]
        buffer += data
        if b"\n" not in buffer:
            return
        line, rest = bytes(buffer).split(b"\n", 1)
        del self._pending[sock]
        role = json.loads(line).get("hello")
        self.hellos.append(role)
        self._selector.unregister(sock)
        if role == "control":
            self._control = sock
            self._selector.register(sock, selectors.EVENT_READ, self._on_control)
            if rest:
                self._control_frames(rest)
            if self._host is not None:
                self._send_control({"type": "host", "connected": True})
        else:
            if self._channel is not None:
                self._channel.close()
            self._channel = sock
            self.channel_connections += 1
            self._selector.register(sock, selectors.EVENT_READ, self._on_channel)
            if rest and self._host is not None:
                self._host.sendall(rest)

    def _on_control(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            self._control = None
            return
        self._control_frames(data)

    def _control_frames(self, data: bytes) -> None:
        self._control_buffer += data
        while b"\n" in self._control_buffer:
            line, rest = bytes(self._control_buffer).split(b"\n", 1)
            self._control_buffer = bytearray(rest)
            frame = json.loads(line)
            with self._lock:
                self.frames.append(frame)
            if frame.get("type") == "primitive":
                kind, value = self.primitive_results.get(frame["name"], ("return", {}))
                reply: Dict[str, Any] = {"type": "primitive-reply", "id": frame["id"]}
                if kind == "error":
                    reply["error"] = {"desc": value}
                else:
                    reply["return"] = value
                self._send_control(reply)
            elif frame.get("type") == "reply":
                with self._lock:
                    self.replies[frame["id"]] = frame

    def _send_control(self, frame: Dict[str, Any]) -> None:
        if self._control is not None:
            self._control.sendall(json.dumps(frame).encode() + b"\n")

    def _on_channel(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            if self._channel is sock:
                self._channel = None
            return
        if self._host is not None:  # no host: dropped, as on the port itself
            try:
                self._host.sendall(data)
            except OSError:
                pass

    def _accept_host(self, listener: socket.socket) -> None:
        sock, _ = listener.accept()
        if self._host is not None:
            self._drop(self._host)
        self._host = sock
        self._selector.register(sock, selectors.EVENT_READ, self._on_host_data)
        self._send_control({"type": "host", "connected": True})

    def _on_host_data(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            if self._host is sock:
                self._host = None
                self._send_control({"type": "host", "connected": False})
            return
        if self._channel is not None:
            self._channel.sendall(data)

    def _drop(self, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        self._pending.pop(sock, None)
        sock.close()

    # -- for the tests --

    def call(self, command: str, arguments: Dict[str, Any], timeout: float = 10.0) -> Any:
        """A host's guest-extension-call: the reply frame of the extension."""
        with self._lock:
            self._ids += 1
            request_id = self._ids
        self._post("control", json.dumps({"type": "request", "id": request_id,
                                          "command": command,
                                          "arguments": arguments}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if request_id in self.replies:
                    return self.replies.pop(request_id)
            time.sleep(0.01)
        raise AssertionError(f"no reply to {command} within {timeout} s")

    def of_type(self, kind: str) -> List[Dict[str, Any]]:
        with self._lock:
            return [frame for frame in self.frames if frame.get("type") == kind]

    def wait_frame(self, predicate: Callable[[Dict[str, Any]], bool],
                   timeout: float = 10.0) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for frame in self.frames:
                    if predicate(frame):
                        return frame
            time.sleep(0.01)
        raise AssertionError(f"no such frame within {timeout} s; frames: {self.frames}")

    def close(self) -> None:
        if not self._running:
            return
        self._running = False
        self._wake_w.send(b"x")
        self._thread.join(5)
        for sock in [self._control, self._channel, self._host, *self._pending,
                     *self._listeners, self._wake_r, self._wake_w]:
            if sock is not None:
                sock.close()
        self._selector.close()


# -- the extension as a process ----------------------------------------------------------


class ExtensionProcess:
    """The oVirt extension run as the core would: ``python3 main.py`` with only its
    environment (plus what the test adds), stdout and stderr kept in a file."""

    def __init__(self, bundle_dir: str, environ: Dict[str, str], log_path: str):
        import subprocess
        import sys

        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, os.path.join(bundle_dir, "main.py")],
                                        cwd=bundle_dir, env=environ, stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        with open(self.log_path, "rb") as stream:
            return stream.read().decode("utf-8", "replace")

    def stop(self, signum: int = 15, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


class FakeAgentClient:
    """What :mod:`qga.host.ovirt` needs of :class:`qga.host.Client`, served by a
    :class:`FakeCore`: ``guest-extension-call`` and ``guest-extension-events``
    (sequence numbers, a cursor that acknowledges, ``wait``)."""

    def __init__(self, core: FakeCore):
        self.core = core
        self.calls: List[Tuple[str, Dict[str, Any]]] = []

    def call(self, execute: str, arguments: Dict[str, Any]) -> Any:
        from qga.errors import AgentError

        self.calls.append((execute, arguments))
        if execute == "guest-extension-call":
            reply = self.core.call(arguments["command"], arguments.get("arguments", {}))
            if "error" in reply:
                raise AgentError("GenericError", reply["error"]["desc"])
            return reply["return"]
        assert execute == "guest-extension-events", execute
        after = int(arguments.get("cursor", "0"))
        deadline = time.monotonic() + float(arguments.get("wait", 0))
        while True:
            events = [dict(seq=seq, name=frame["name"], data=frame["data"], time=0.0)
                      for seq, frame in enumerate(self.core.of_type("event"), 1)
                      if seq > after][:arguments.get("max", 100)]
            if events or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        cursor = events[-1]["seq"] if events else after
        return {"events": events, "cursor": str(cursor), "dropped": 0}
