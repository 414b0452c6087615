"""``manifest.json``: what an extension is, needs, speaks and contains.

The manifest is strict JSON (UTF-8, no duplicate keys, no NaN/Infinity, at
most 64 levels deep, at most ``Limits.max_manifest_size`` bytes, 1 MiB) checked
against :data:`SCHEMA`, a closed JSON Schema (``additionalProperties: false``
on every object we define) that uses Draft 7 features only, then against
the rules a schema cannot say (:func:`_check_semantics`).  Example::

    {
      "manifest-version": 1,
      "name": "hello",
      "version": "1.0.0",
      "description": "Says hello",
      "requires-core": {"min": "0.1.0", "below": "1.0.0"},
      "entry-point": {"interpreter": "python3", "path": "hello.py", "args": ["--quiet"]},
      "capabilities": ["events"],
      "limits": {"memory": 67108864, "cpu": 50, "nofile": 256, "nproc": 64, "tasks": 64},
      "health": {"ready-timeout": 10},
      "mode": "envelope",
      "commands": {"greet": {"request": {"type": "object"}, "reply": {"type": "string"},
                             "timeout": 5}},
      "events": {"greeted": {"type": "object"}},
      "settings": {"schema": {"type": "object"}, "defaults": {}},
      "files": [{"path": "hello.py", "size": 812, "mode": "0755", "sha256": "9f86d0..."}]
    }

Members:

``manifest-version``  ``1``, this format.
``name``              the extension's identifier, ``^[a-z][a-z0-9_-]{0,63}$``; also the
                      name trust keys are scoped to and the name of its socket and user.
``version``           ``MAJOR.MINOR.PATCH`` with optional semver ``-pre`` and ``+build``.
``requires-core``     the qga core versions it runs on: ``min`` (inclusive) and optional
                      ``below`` (exclusive), compared with semver precedence.
``entry-point``       what to run: ``path`` (one of ``files``), ``args`` (its argv after
                      the path) and ``interpreter``: ``python3`` (the guest's, the file
                      may be 0644) or ``none`` (the file itself is run: it must be 0755).
``capabilities``      what the extension asks the core for, beyond a plain supervised
                      process in envelope mode (see :data:`CAPABILITIES`).
``limits``            resources: ``memory`` (bytes, address space / MemoryMax),
                      ``cpu`` (percent of one CPU, CPUQuota), ``nofile`` (open files),
                      ``nproc`` (processes of its user, RLIMIT_NPROC), ``tasks``
                      (TasksMax).  Missing ones take :data:`DEFAULT_LIMITS`.
``health``            ``ready-timeout``: seconds the extension has to say it is ready
                      after it starts (default 30).
``mode``              ``envelope`` (default: the host talks to it with
                      ``guest-extension-call``/``-events``) or ``channel`` (the core relays
                      a virtio-serial port; ``channel.ports`` names it, first found wins,
                      e.g. ``["ovirt-guest-agent.0", "com.redhat.rhevm.vdsm"]``;
                      ``channel.on-remove``, optional, is a line the core writes to the
                      port, without waiting, when the extension is removed: the notice
                      a package's uninstaller would leave the host).
``commands``          host requests it serves: name -> ``request`` and ``reply`` JSON
                      Schemas (Draft 7) and an optional ``timeout`` in seconds.
``events``            events it emits: name -> JSON Schema of the event's data.
``settings``          admin settings: a JSON Schema for them and ``defaults`` that must
                      validate against it.
``files``             every file of the bundle but the manifest: ``path`` (see
                      :mod:`qga.ext.rules`), ``size``, ``mode`` (``"0644"`` or ``"0755"``,
                      nothing else: no setuid, setgid or sticky bits) and ``sha256``.

Embedded JSON Schemas may only refer inside themselves (``$ref`` starting
with ``#``; no ``$id``), so validating a request never fetches anything.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Dict, FrozenSet, List, NamedTuple, Optional, Tuple

from qga.errors import BundleError, ManifestError
from qga.ext.rules import MANIFEST_NAME, Limits, PathSet, check_path, fold

MAX_DEPTH = 64

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
VERSION_PATTERN = (r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})"
                   r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$")
MESSAGE_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,63}$"
PORT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
MAX_REMOVE_NOTICE = 4096  # channel.on-remove: one short line, written without waiting
SHA256_PATTERN = r"^[0-9a-f]{64}$"

#: What an extension may ask for.  Each is a narrow grant the core honours:
CAPABILITIES = {
    # The core opens the manifest's virtio-serial port (channel.ports) and
    # relays lines between it and the extension.  Required by mode "channel".
    "channel": "relay a virtio-serial port named in channel.ports",
    # The extension may emit events; the core queues them (bounded, rate
    # limited) for guest-extension-events.  Required by a non-empty "events".
    "events": "emit events the host reads with guest-extension-events",
    # The core keeps a credential behind a one-time token on a socket only
    # root may connect to (the primitive sso-offer-credentials): the SSO PAM
    # module fetches it, and the extension never runs as root.
    "root-socket": "hand a credential to root-only clients through the core (sso-offer-credentials)",
    # The sandbox lets the extension reach the D-Bus system bus.
    "system-bus": "connect to the D-Bus system bus",
    # The sandbox lets the extension open IP sockets (denied otherwise).
    "network": "open AF_INET/AF_INET6 sockets",
    # Primitives "shutdown" {mode: powerdown|reboot, delay: minutes, message},
    # "suspend" {state: disk|mem} and "drop-caches" {}: the host's power and
    # migration requests (the oVirt agent's shutdown, hibernate, flush-caches).
    "power": "ask the core to shut down, reboot or suspend the guest, or drop caches",
    # Primitives "lock-sessions" {} and "log-off" {} (the session active on
    # seat0): the oVirt agent's lock-screen and log-off.
    "sessions": "ask the core to lock the sessions or end the active one",
}

DEFAULT_LIMITS = {"memory": 256 * 1024 * 1024, "cpu": 100, "nofile": 1024, "nproc": 64,
                  "tasks": 64}
DEFAULT_READY_TIMEOUT = 30

_SCHEMA_VALUE = {"type": ["object", "boolean"]}  # an embedded JSON Schema
_VERSION = {"type": "string", "maxLength": 64, "pattern": VERSION_PATTERN}


def _integer(minimum: int, maximum: int) -> Dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


#: The manifest's closed JSON Schema (Draft 7 features only).
SCHEMA: Dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "qga extension manifest",
    "type": "object",
    "additionalProperties": False,
    "required": ["manifest-version", "name", "version", "requires-core", "entry-point",
                 "files"],
    "properties": {
        "manifest-version": {"const": 1},
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "version": _VERSION,
        "description": {"type": "string", "maxLength": 1024},
        "requires-core": {
            "type": "object", "additionalProperties": False, "required": ["min"],
            "properties": {"min": _VERSION, "below": _VERSION},
        },
        "entry-point": {
            "type": "object", "additionalProperties": False,
            "required": ["interpreter", "path"],
            "properties": {
                "interpreter": {"enum": ["python3", "none"]},
                "path": {"type": "string", "minLength": 1, "maxLength": 255},
                "args": {"type": "array", "maxItems": 64,
                         "items": {"type": "string", "maxLength": 4096}},
            },
        },
        "capabilities": {"type": "array", "uniqueItems": True,
                         "items": {"enum": sorted(CAPABILITIES)}},
        "limits": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "memory": _integer(16 * 1024 * 1024, 64 * 1024 ** 3),
                "cpu": _integer(1, 100 * 1024),
                "nofile": _integer(16, 1024 * 1024),
                "nproc": _integer(1, 65536),
                "tasks": _integer(1, 65536),
            },
        },
        "health": {
            "type": "object", "additionalProperties": False,
            "properties": {"ready-timeout": {"type": "number", "exclusiveMinimum": 0,
                                             "maximum": 600}},
        },
        "mode": {"enum": ["envelope", "channel"]},
        "channel": {
            "type": "object", "additionalProperties": False, "required": ["ports"],
            "properties": {"ports": {"type": "array", "minItems": 1, "maxItems": 8,
                                     "uniqueItems": True,
                                     "items": {"type": "string", "pattern": PORT_PATTERN}},
                           "on-remove": {"type": "string", "minLength": 1,
                                         "maxLength": MAX_REMOVE_NOTICE}},
        },
        "commands": {
            "type": "object", "maxProperties": 256,
            "propertyNames": {"pattern": MESSAGE_NAME_PATTERN},
            "additionalProperties": {
                "type": "object", "additionalProperties": False,
                "required": ["request", "reply"],
                "properties": {
                    "request": _SCHEMA_VALUE,
                    "reply": _SCHEMA_VALUE,
                    "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
                },
            },
        },
        "events": {
            "type": "object", "maxProperties": 256,
            "propertyNames": {"pattern": MESSAGE_NAME_PATTERN},
            "additionalProperties": _SCHEMA_VALUE,
        },
        "settings": {
            "type": "object", "additionalProperties": False, "required": ["schema"],
            "properties": {"schema": _SCHEMA_VALUE, "defaults": {"type": "object"}},
        },
        "files": {
            "type": "array", "minItems": 1, "maxItems": 65536,
            "items": {
                "type": "object", "additionalProperties": False,
                "required": ["path", "size", "mode", "sha256"],
                "properties": {
                    "path": {"type": "string", "minLength": 1},  # rules.check_path
                    "size": _integer(0, 2 ** 40),
                    "mode": {"enum": ["0644", "0755"]},
                    "sha256": {"type": "string", "pattern": SHA256_PATTERN},
                },
            },
        },
    },
    # "channel" is there exactly when the mode is channel.
    "if": {"required": ["mode"], "properties": {"mode": {"const": "channel"}}},
    "then": {"required": ["channel"]},
    "else": {"not": {"required": ["channel"]}},
}


class FileEntry(NamedTuple):
    """One file the manifest lists."""

    path: str
    size: int
    mode: int      # 0o644 or 0o755
    sha256: str    # lower-case hex


class EntryPoint(NamedTuple):
    interpreter: str   # "python3" or "none"
    path: str
    args: Tuple[str, ...]


class Manifest:
    """A checked manifest: its exact bytes, its parsed value, and typed views of it."""

    def __init__(self, data: bytes, value: Dict[str, Any]):
        self.data = data
        self.value = value
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.name: str = value["name"]
        self.version: str = value["version"]
        self.description: str = value.get("description", "")
        core = value["requires-core"]
        self.core_min: str = core["min"]
        self.core_below: Optional[str] = core.get("below")
        entry = value["entry-point"]
        self.entry_point = EntryPoint(entry["interpreter"], entry["path"],
                                      tuple(entry.get("args", ())))
        self.capabilities: FrozenSet[str] = frozenset(value.get("capabilities", ()))
        self.limits: Dict[str, int] = dict(DEFAULT_LIMITS, **value.get("limits", {}))
        self.ready_timeout: float = value.get("health", {}).get("ready-timeout",
                                                                DEFAULT_READY_TIMEOUT)
        self.mode: str = value.get("mode", "envelope")
        self.ports: Tuple[str, ...] = tuple(value.get("channel", {}).get("ports", ()))
        notice = value.get("channel", {}).get("on-remove")
        self.remove_notice: Optional[bytes] = notice.encode() if notice else None
        self.commands: Dict[str, Dict[str, Any]] = value.get("commands", {})
        self.events: Dict[str, Any] = value.get("events", {})
        settings = value.get("settings", {})
        self.settings_schema: Any = settings.get("schema", {"type": "object"})
        self.settings_defaults: Dict[str, Any] = settings.get("defaults", {})
        self.files: Tuple[FileEntry, ...] = tuple(
            FileEntry(item["path"], item["size"], int(item["mode"], 8), item["sha256"])
            for item in value["files"])
        self._by_path = {entry.path: entry for entry in self.files}

    def file(self, path: str) -> Optional[FileEntry]:
        return self._by_path.get(path)

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    def supports_core(self, core_version: str) -> bool:
        """Whether the core version is in ``requires-core``'s range."""
        key = version_key(core_version)
        if key < version_key(self.core_min):
            return False
        return self.core_below is None or key < version_key(self.core_below)

    def __repr__(self) -> str:
        return f"Manifest({self.name!r}, {self.version!r}, {len(self.files)} files)"


# -- parsing ---------------------------------------------------------------------------


def parse_manifest(data: bytes, limits: Limits = Limits()) -> Manifest:
    """Check ``data`` as a manifest: :class:`ManifestError` (a BundleError) if it is not one."""
    if len(data) > limits.max_manifest_size:
        raise ManifestError(f"{MANIFEST_NAME} is {len(data)} bytes, over the"
                            f" {limits.max_manifest_size}-byte limit")
    value = strict_json(data, MANIFEST_NAME)
    _validate(value)
    _check_semantics(value, limits)
    return Manifest(data, value)


def encode_manifest(value: Dict[str, Any]) -> bytes:
    """The bytes ``qga-bundle build`` writes: sorted keys, 2-space indent, UTF-8, newline."""
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def strict_json(data: bytes, what: str) -> Any:
    """Parse JSON refusing what JSON parsers disagree on: duplicate keys, NaN, bad UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ManifestError(f"{what} is not UTF-8 (byte {error.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_object_without_duplicates,
                           parse_constant=_refuse_constant)
    except RecursionError:
        raise ManifestError(f"{what} is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:
        raise ManifestError(f"{what} is not valid JSON: {error}") from None
    _check_shape(value, what)
    return value


def _object_without_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    for key, item in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = item
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_shape(value: Any, what: str) -> None:
    """Depth within MAX_DEPTH; every string encodable (no lone surrogates from escapes)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ManifestError(f"{what} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            for key, member in item.items():
                _check_string(key, what)
                stack.append((member, depth + 1))
        elif isinstance(item, list):
            stack.extend((member, depth + 1) for member in item)
        elif isinstance(item, str):
            _check_string(item, what)


def _check_string(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{what} has a string with a lone surrogate") from None


def _validate(value: Any) -> None:
    validator = strict_validator(SCHEMA)
    errors = list(validator.iter_errors(value))
    if errors:
        from jsonschema.exceptions import best_match

        raise ManifestError(f"{MANIFEST_NAME}: {describe_error(best_match(errors))}")


def describe_error(error: Any) -> str:
    """A jsonschema error as ``at files/2/mode: <message>``, the instance kept short."""
    where = "/".join(str(part) for part in error.absolute_path) or "the top level"
    message = error.message
    if len(message) > 240:  # a huge instance in the message: keep both ends
        message = message[:120] + " ... " + message[-100:]
    return f"at {where}: {message}"


def strict_validator(schema: Any) -> Any:
    """A Draft 7 validator whose integers are ints only (``1.0`` and ``true`` are not).

    Built with the API jsonschema 4.10 (Debian 12) has; jsonschema is
    imported here, on first use.
    """
    import jsonschema

    def is_integer(_checker: Any, instance: Any) -> bool:
        return isinstance(instance, int) and not isinstance(instance, bool)

    checker = jsonschema.Draft7Validator.TYPE_CHECKER.redefine("integer", is_integer)
    validator_class = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                                   type_checker=checker)
    return validator_class(schema)


# -- what the schema cannot say --------------------------------------------------------


def _check_semantics(value: Dict[str, Any], limits: Limits) -> None:
    _check_identifiers(value)
    _check_core_range(value)
    _check_files(value["files"], limits)
    _check_entry_point(value)
    _check_capabilities(value)
    for where, schema in _embedded_schemas(value):
        check_embedded_schema(schema, where)
    settings = value.get("settings")
    if settings is not None and "defaults" in settings:
        errors = list(strict_validator(settings["schema"]).iter_errors(settings["defaults"]))
        if errors:
            raise ManifestError(f"{MANIFEST_NAME}: settings.defaults do not follow"
                                f" settings.schema: {describe_error(errors[0])}")


def _check_identifiers(value: Dict[str, Any]) -> None:
    # JSON Schema's "$" also matches before a final newline in Python's re:
    # check the identifiers again, whole.
    names = [("name", value["name"], NAME_PATTERN), ("version", value["version"],
                                                       VERSION_PATTERN)]
    names += [("requires-core", version, VERSION_PATTERN)
              for version in value["requires-core"].values()]
    names += [("commands", name, MESSAGE_NAME_PATTERN) for name in value.get("commands", {})]
    names += [("events", name, MESSAGE_NAME_PATTERN) for name in value.get("events", {})]
    names += [("channel.ports", port, PORT_PATTERN)
              for port in value.get("channel", {}).get("ports", ())]
    for where, name, pattern in names:
        if not re.fullmatch(pattern[1:-1], name):
            raise ManifestError(f"{MANIFEST_NAME}: at {where}: {name!r} is not allowed")


def _check_core_range(value: Dict[str, Any]) -> None:
    core = value["requires-core"]
    if "below" in core and version_key(core["below"]) <= version_key(core["min"]):
        raise ManifestError(f"{MANIFEST_NAME}: requires-core: 'below' {core['below']}"
                            f" is not above 'min' {core['min']}")


def _check_files(files: List[Dict[str, Any]], limits: Limits) -> None:
    if len(files) > limits.max_files:
        raise ManifestError(f"{MANIFEST_NAME} lists {len(files)} files, over the limit"
                            f" of {limits.max_files}")
    seen = PathSet("manifest file")
    seen.add_file(MANIFEST_NAME)
    total = 0
    for item in files:
        try:
            path = check_path(item["path"], "manifest file", limits)
            if fold(path) == fold(MANIFEST_NAME):
                raise ManifestError(f"{MANIFEST_NAME} lists itself ('{path}')")
            seen.add_file(path)
        except BundleError as error:
            raise ManifestError(str(error)) from None
        if item["size"] > limits.max_file_size:
            raise ManifestError(f"manifest file '{path}' is {item['size']} bytes, over the"
                                f" per-file limit of {limits.max_file_size}")
        total += item["size"]
    if total > limits.max_total_size:
        raise ManifestError(f"{MANIFEST_NAME} lists {total} bytes of files, over the"
                            f" limit of {limits.max_total_size}")


def _check_entry_point(value: Dict[str, Any]) -> None:
    entry = value["entry-point"]
    listed = {item["path"]: item for item in value["files"]}
    if entry["path"] not in listed:
        raise ManifestError(f"{MANIFEST_NAME}: entry-point '{entry['path']}' is not one of"
                            " the files")
    if entry["interpreter"] == "none" and listed[entry["path"]]["mode"] != "0755":
        raise ManifestError(f"{MANIFEST_NAME}: entry-point '{entry['path']}' is run"
                            " directly (interpreter 'none') but its mode is not 0755")
    for arg in entry.get("args", ()):
        if "\x00" in arg:
            raise ManifestError(f"{MANIFEST_NAME}: entry-point args: a NUL character")


def _check_capabilities(value: Dict[str, Any]) -> None:
    capabilities = set(value.get("capabilities", ()))
    channel_mode = value.get("mode") == "channel"
    if channel_mode != ("channel" in capabilities):
        raise ManifestError(f"{MANIFEST_NAME}: mode 'channel' and capability 'channel'"
                            " go together")
    if value.get("events") and "events" not in capabilities:
        raise ManifestError(f"{MANIFEST_NAME}: events are declared without the"
                            " 'events' capability")


def _embedded_schemas(value: Dict[str, Any]):
    for name, command in value.get("commands", {}).items():
        yield f"commands.{name}.request", command["request"]
        yield f"commands.{name}.reply", command["reply"]
    for name, schema in value.get("events", {}).items():
        yield f"events.{name}", schema
    if "settings" in value:
        yield "settings.schema", value["settings"]["schema"]


def check_embedded_schema(schema: Any, where: str) -> None:
    """A Draft 7 schema that refers only inside itself and whose regexes compile."""
    import jsonschema

    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ManifestError(f"{MANIFEST_NAME}: {where} is not a valid JSON Schema:"
                            f" {describe_error(error)}") from None
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        for key, member in item.items():
            problem = _keyword_problem(key, member)
            if problem:
                raise ManifestError(f"{MANIFEST_NAME}: {where}: {problem}")
            if key == "patternProperties" and isinstance(member, dict):
                for pattern in member:
                    _check_regex(pattern, where)
            stack.append(member)


def _keyword_problem(key: str, member: Any) -> str:
    if key == "$ref" and not (isinstance(member, str) and member.startswith("#")):
        return f"$ref {member!r} points outside the schema"
    if key == "$id":
        return "$id is not allowed (it would change where $ref points)"
    if key == "$schema" and member != "http://json-schema.org/draft-07/schema#":
        return f"$schema {member!r}: only Draft 7 is supported"
    if key == "pattern" and isinstance(member, str):
        try:
            re.compile(member)
        except re.error as error:
            return f"pattern {member!r} is not a regular expression ({error})"
    return ""


def _check_regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ManifestError(f"{MANIFEST_NAME}: {where}: pattern {pattern!r} is not a"
                            f" regular expression ({error})") from None


# -- versions --------------------------------------------------------------------------


def version_key(version: str) -> Tuple[Any, ...]:
    """A sort key with semver precedence: 1.0.0-rc.1 < 1.0.0 < 1.0.1; build metadata ignored."""
    release, _, pre = version.split("+", 1)[0].partition("-")
    numbers = tuple(int(part) for part in release.split("."))
    if not pre:
        return numbers + ((1,),)
    identifiers = tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                        for part in pre.split("."))
    return numbers + ((0,) + identifiers,)
