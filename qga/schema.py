"""The QAPI schema of the agent: commands, types, argument checking.

``qapi-schema.json`` (beside this module, a link to the repository's root
file) holds every command in QAPI's own terms as strict JSON::

    {"pragma": {...}, "definitions": [{"command": ...}, {"struct": ...}, ...]}

A member is written ``"name": "type"`` or ``"name": {"type": ..., "doc": ...,
"since": ..., "if": ...}``; a ``*`` prefix marks it optional; ``["T"]`` is a
list of ``T``.  Definitions, members and enum values may carry an ``if``
condition (``"CONFIG_X"``, ``{"all": [...]}``, ``{"any": [...]}``,
``{"not": ...}``); what does not hold on this platform does not exist, as in
a qemu-ga built for it.

Two ways to check a value against a type live here, on purpose:

* :class:`ArgumentVisitor` is QEMU's QObject input visitor, redone.  The
  agent runs it on every request: it walks members in schema order, stops at
  the first missing or ill-typed one, reports unexpected members only after
  every declared one passed, converts values (uint64 wraps negative input)
  and produces qemu-ga's exact error texts, paths such as
  ``vcpus[0].online`` included.  It is built per command on first use and
  cached.
* :meth:`Schema.json_schema` gives a Draft 7 JSON Schema for any type, used
  to validate replies in tests and to cross-check the visitor.  jsonschema
  cannot be the hot path: it cannot produce qemu's messages or its
  first-error order, and it is slow to import.  Validate with
  :func:`strict_validator`, whose ``integer`` excludes ``1.0`` as qemu does.
"""

from __future__ import annotations

import json
import keyword
import os
import sys
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from qga.errors import ParameterError
from qga.qdict_order import first_unexpected

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qapi-schema.json")

LINUX_DEFINES = frozenset({
    "CONFIG_POSIX", "CONFIG_LINUX", "CONFIG_FSFREEZE", "CONFIG_FSTRIM",
    "HAVE_GETIFADDRS", "HAVE_UTMPX", "CONFIG_LIBUDEV", "CONFIG_GETLOADAVG",
})
"""The build conditions that hold for qemu-ga on Linux (glibc, libudev)."""

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1

_INT_RANGES = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
}
BUILTIN_TYPES = frozenset({
    "str", "int", "int64", "uint64", "size", "number", "bool", "null", "any",
    *_INT_RANGES,
})
_KINDS = ("command", "struct", "enum", "union", "alternate")

TypeRef = Any  # "name" or ["name"]
Path = Tuple[Any, ...]  # member names (str) and list indexes (int)
Converter = Callable[[Any, Path], Any]


def platform_defines(platform: str = sys.platform) -> FrozenSet[str]:
    """The ``if`` conditions that hold on ``platform``."""
    if platform.startswith("linux"):
        return LINUX_DEFINES
    if platform == "win32":
        return frozenset({"CONFIG_WIN32"})
    return frozenset({"CONFIG_POSIX", "HAVE_GETIFADDRS", "HAVE_UTMPX", "CONFIG_GETLOADAVG"})


def condition_holds(condition: Any, defines: FrozenSet[str]) -> bool:
    """Evaluate a QAPI ``if`` condition."""
    if condition is None:
        return True
    if isinstance(condition, str):
        return condition in defines
    if "all" in condition:
        return all(condition_holds(item, defines) for item in condition["all"])
    if "any" in condition:
        return any(condition_holds(item, defines) for item in condition["any"])
    return not condition_holds(condition["not"], defines)


def python_name(name: str) -> str:
    """The keyword a handler receives for QAPI member ``name``."""
    result = name.replace("-", "_")
    return result + "_" if keyword.iskeyword(result) else result


class Member:
    """One member of a struct or of a command's arguments."""

    __slots__ = ("name", "type", "optional", "doc", "since")

    def __init__(self, name: str, type: TypeRef, optional: bool, doc: str = "", since: str = ""):
        self.name = name
        self.type = type
        self.optional = optional
        self.doc = doc
        self.since = since

    def __repr__(self) -> str:
        return f"Member({self.name!r}, {self.type!r}, optional={self.optional})"


class Command:
    """One command of the schema, as this platform has it."""

    __slots__ = ("name", "data", "returns", "success_response", "since", "doc", "features")

    def __init__(self, definition: Dict[str, Any]):
        self.name: str = definition["command"]
        self.data = definition.get("data")  # inline members, a struct name, or None
        self.returns: Optional[TypeRef] = definition.get("returns")
        self.success_response: bool = definition.get("success-response", True)
        self.since: str = definition.get("since", "")
        self.doc: str = definition.get("doc", "")
        self.features: List[str] = list(definition.get("features", ()))

    def __repr__(self) -> str:
        return f"Command({self.name!r})"


class Schema:
    """The commands and types of ``qapi-schema.json`` for one platform."""

    def __init__(self, document: Dict[str, Any], defines: FrozenSet[str] = LINUX_DEFINES):
        self.pragma: Dict[str, Any] = document.get("pragma", {})
        self.defines = defines
        self._types: Dict[str, Dict[str, Any]] = {}
        self._commands: Dict[str, Command] = {}
        self._inactive: List[str] = []
        for definition in document["definitions"]:
            kind = next(kind for kind in _KINDS if kind in definition)
            name = definition[kind]
            if not condition_holds(definition.get("if"), defines):
                if kind == "command":
                    self._inactive.append(name)
                continue
            if kind == "command":
                self._commands[name] = Command(definition)
            else:
                self._types[name] = definition
        self._visitors: Dict[str, ArgumentVisitor] = {}
        self._converters: Dict[str, Converter] = {}

    @classmethod
    def load(cls, path: Optional[str] = None, defines: Optional[FrozenSet[str]] = None) -> "Schema":
        """Read the schema file (default: the one shipped with the package)."""
        with open(path or SCHEMA_PATH, "rb") as stream:
            document = json.load(stream)
        return cls(document, platform_defines() if defines is None else defines)

    # -- lookup ------------------------------------------------------------------

    def command_names(self) -> List[str]:
        """The commands this platform registers, in schema order."""
        return list(self._commands)

    def inactive_command_names(self) -> List[str]:
        """Commands of the schema whose ``if`` does not hold here."""
        return list(self._inactive)

    def command(self, name: str) -> Optional[Command]:
        return self._commands.get(name)

    def type_names(self) -> List[str]:
        return list(self._types)

    def type_definition(self, name: str) -> Dict[str, Any]:
        """The raw definition of a named type (KeyError if unknown here)."""
        return self._types[name]

    def kind(self, name: str) -> str:
        """``builtin``, ``struct``, ``enum``, ``union`` or ``alternate``."""
        if name in BUILTIN_TYPES:
            return "builtin"
        definition = self._types[name]
        return next(kind for kind in _KINDS if kind in definition)

    def members(self, data: Any) -> List[Member]:
        """The members of a struct (by name, with its base) or of inline data."""
        if data is None:
            return []
        if isinstance(data, str):
            definition = self._types[data]
            base = definition.get("base")
            inherited = self.members(base) if base is not None else []
            return inherited + self.members(definition.get("data", {}))
        result = []
        for key, spec in data.items():
            if isinstance(spec, dict):
                if not condition_holds(spec.get("if"), self.defines):
                    continue
                member = Member(key.lstrip("*"), spec["type"], key.startswith("*"),
                                spec.get("doc", ""), spec.get("since", ""))
            else:
                member = Member(key.lstrip("*"), spec, key.startswith("*"))
            result.append(member)
        return result

    def command_members(self, name: str) -> List[Member]:
        return self.members(self._commands[name].data)

    def enum_values(self, name: str) -> List[str]:
        values = []
        for value in self._types[name]["data"]:
            if isinstance(value, str):
                values.append(value)
            elif condition_holds(value.get("if"), self.defines):
                values.append(value["name"])
        return values

    def alternate_branches(self, name: str) -> List[Tuple[str, TypeRef]]:
        branches = []
        for branch, spec in self._types[name]["data"].items():
            if isinstance(spec, dict):
                if not condition_holds(spec.get("if"), self.defines):
                    continue
                spec = spec["type"]
            branches.append((branch, spec))
        return branches

    def union_variants(self, name: str) -> Dict[str, Optional[str]]:
        """Discriminator value -> variant struct (None: no extra members)."""
        definition = self._types[name]
        discriminator = next(m for m in self.union_base(name) if m.name == definition["discriminator"])
        variants: Dict[str, Optional[str]] = {value: None for value in self.enum_values(discriminator.type)}
        for value, spec in definition["data"].items():
            if isinstance(spec, dict):
                if not condition_holds(spec.get("if"), self.defines):
                    continue
                spec = spec["type"]
            if value in variants:
                variants[value] = spec
        return variants

    def union_base(self, name: str) -> List[Member]:
        return self.members(self._types[name]["base"])

    def referenced_types(self, type_ref: TypeRef) -> List[str]:
        """Every named type reachable from ``type_ref`` (for sanity checks)."""
        seen: Dict[str, None] = {}
        self._collect(type_ref, seen)
        return list(seen)

    def _collect(self, type_ref: TypeRef, seen: Dict[str, None]) -> None:
        if isinstance(type_ref, list):
            self._collect(type_ref[0], seen)
            return
        if isinstance(type_ref, dict):
            for member in self.members(type_ref):
                self._collect(member.type, seen)
            return
        if type_ref in BUILTIN_TYPES or type_ref in seen:
            return
        seen[type_ref] = None
        kind = self.kind(type_ref)
        if kind == "struct":
            for member in self.members(type_ref):
                self._collect(member.type, seen)
        elif kind == "union":
            for member in self.union_base(type_ref):
                self._collect(member.type, seen)
            for variant in self.union_variants(type_ref).values():
                if variant is not None:
                    self._collect(variant, seen)
        elif kind == "alternate":
            for _, branch in self.alternate_branches(type_ref):
                self._collect(branch, seen)

    # -- argument checking -------------------------------------------------------

    def visitor(self, command: str) -> "ArgumentVisitor":
        """The argument visitor of ``command``, built on first use."""
        visitor = self._visitors.get(command)
        if visitor is None:
            visitor = self._visitors[command] = ArgumentVisitor(self, command)
        return visitor

    def converter(self, type_ref: TypeRef) -> Converter:
        """A function ``(value, path) -> converted value`` for ``type_ref``."""
        if isinstance(type_ref, list):
            return _list_converter(self.converter(type_ref[0]))
        converter = self._converters.get(type_ref)
        if converter is not None:
            return converter
        if type_ref in BUILTIN_TYPES:
            converter = _builtin_converter(type_ref)
        else:
            kind = self.kind(type_ref)
            if kind == "enum":
                converter = _enum_converter(self.enum_values(type_ref))
            elif kind == "alternate":
                converter = self._alternate_converter(type_ref)
            else:
                # Register a forwarder first so that recursive types resolve.
                slot: List[Converter] = []
                self._converters[type_ref] = lambda value, path: slot[0](value, path)
                if kind == "struct":
                    built = _struct_converter(self._plan(self.members(type_ref)))
                else:
                    built = self._union_converter(type_ref)
                slot.append(built)
                converter = built
        self._converters[type_ref] = converter
        return converter

    def _plan(self, members: Iterable[Member], keys: Optional[List[str]] = None):
        plan = []
        for index, member in enumerate(members):
            out_key = member.name if keys is None else keys[index]
            plan.append((member.name, member.optional, self.converter(member.type), out_key))
        return tuple(plan)

    def _alternate_converter(self, name: str) -> Converter:
        branches: Dict[type, Converter] = {}
        for _, branch in self.alternate_branches(name):
            for python_type in self._json_types(branch):
                branches[python_type] = self.converter(branch)

        def convert(value: Any, path: Path) -> Any:
            branch = branches.get(type(value))
            if branch is None:
                # qemu names the alternate by the member alone, not the path.
                raise ParameterError(f"Invalid parameter type for '{_short(path)}', expected: {name}")
            return branch(value, path)

        return convert

    def _json_types(self, type_ref: TypeRef) -> Tuple[type, ...]:
        """The Python types (parsed JSON) that select an alternate branch."""
        if isinstance(type_ref, list):
            return (list,)
        if type_ref in BUILTIN_TYPES:
            if type_ref == "str":
                return (str,)
            if type_ref == "bool":
                return (bool,)
            if type_ref == "null":
                return (type(None),)
            return (int, float)  # every number type is a QNum
        kind = self.kind(type_ref)
        return (str,) if kind == "enum" else (dict,)

    def _union_converter(self, name: str) -> Converter:
        discriminator = self._types[name]["discriminator"]
        base_plan = self._plan(self.union_base(name))
        variant_plans = {
            value: self._plan(self.members(variant)) if variant is not None else ()
            for value, variant in self.union_variants(name).items()
        }

        def convert(value: Any, path: Path) -> Any:
            if type(value) is not dict:
                raise _type_error(path, "object")
            result: Dict[str, Any] = {}
            # Base members first: their check settles the discriminator value.
            _visit_members(base_plan, value, path, result)
            variant_plan = variant_plans[value[discriminator]]
            _visit_members(variant_plan, value, path, result)
            _check_unexpected(base_plan + variant_plan, value, path, result)
            return result

        return convert

    # -- JSON Schema ---------------------------------------------------------------

    def json_schema(self, type_ref: TypeRef, input: bool = False) -> Dict[str, Any]:
        """A Draft 7 JSON Schema for ``type_ref`` (a name, ``[name]`` or inline members).

        ``input=True`` describes what the visitor accepts (uint64 then takes
        negative int64, which it wraps); otherwise what a reply may hold.
        """
        definitions: Dict[str, Any] = {}
        root = self._json_schema(type_ref, definitions, input)
        document = {"$schema": "http://json-schema.org/draft-07/schema#"}
        document.update(root)
        if definitions:
            document["definitions"] = definitions
        return document

    def arguments_json_schema(self, command: str) -> Dict[str, Any]:
        return self.json_schema(self._commands[command].data or {}, input=True)

    def returns_json_schema(self, command: str) -> Dict[str, Any]:
        returns = self._commands[command].returns
        if returns is None:
            # No 'returns': qemu-ga answers {"return": {}}.
            return {"$schema": "http://json-schema.org/draft-07/schema#",
                    "type": "object", "maxProperties": 0}
        return self.json_schema(returns)

    def _json_schema(self, type_ref: TypeRef, definitions: Dict[str, Any], input: bool) -> Dict[str, Any]:
        if isinstance(type_ref, list):
            return {"type": "array", "items": self._json_schema(type_ref[0], definitions, input)}
        if isinstance(type_ref, dict):
            return self._object_schema(self.members(type_ref), definitions, input)
        if type_ref in BUILTIN_TYPES:
            return _builtin_json_schema(type_ref, input)
        if type_ref not in definitions:
            definitions[type_ref] = {}  # placeholder: recursion stops here
            definitions[type_ref] = self._named_json_schema(type_ref, definitions, input)
        return {"$ref": f"#/definitions/{type_ref}"}

    def _named_json_schema(self, name: str, definitions: Dict[str, Any], input: bool) -> Dict[str, Any]:
        kind = self.kind(name)
        if kind == "enum":
            return {"type": "string", "enum": self.enum_values(name)}
        if kind == "struct":
            return self._object_schema(self.members(name), definitions, input)
        if kind == "alternate":
            return {"anyOf": [self._json_schema(branch, definitions, input)
                              for _, branch in self.alternate_branches(name)]}
        discriminator = self._types[name]["discriminator"]
        variants = []
        for value, variant in self.union_variants(name).items():
            members = self.union_base(name) + (self.members(variant) if variant else [])
            schema = self._object_schema(members, definitions, input)
            schema["properties"][discriminator] = {"const": value}
            variants.append(schema)
        return {"oneOf": variants}

    def _object_schema(self, members: List[Member], definitions: Dict[str, Any], input: bool) -> Dict[str, Any]:
        return {
            "type": "object",
            "properties": {m.name: self._json_schema(m.type, definitions, input) for m in members},
            "required": [m.name for m in members if not m.optional],
            "additionalProperties": False,
        }


class ArgumentVisitor:
    """Checks and converts one command's ``arguments`` exactly like qemu-ga.

    Calling it with the request's ``arguments`` (a dict, or None when absent)
    returns the handler's keyword arguments, or raises
    :class:`~qga.errors.ParameterError` with qemu-ga's text.
    """

    __slots__ = ("command", "_plan")

    def __init__(self, schema: Schema, command: str):
        self.command = command
        members = schema.command_members(command)
        keys = [python_name(member.name) for member in members]
        self._plan = schema._plan(members, keys) if members else None

    def __call__(self, arguments: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        if self._plan is None:
            if arguments:  # guest-ping and friends: nothing to do unless junk
                _raise_unexpected(arguments, (), ())
            return {}
        return _convert_members(self._plan, arguments or {}, ())


# -- converters ------------------------------------------------------------------


def _render(path: Path) -> str:
    """qemu's ``full_name()``: ``vcpus[0].online``.

    qemu says ``<anonymous>`` only when there is no name at all; an empty
    member name (``{"": 1}``) renders as the empty string.
    """
    if not path:
        return "<anonymous>"
    text = ""
    for segment in path:
        if type(segment) is int:
            text += f"[{segment}]"
        elif text:
            text += "." + segment
        else:
            text = segment
    return text


def _short(path: Path) -> str:
    """The bare member name some qemu messages use (``null`` for list items)."""
    return path[-1] if path and type(path[-1]) is str else "null"


def _type_error(path: Path, expected: str) -> ParameterError:
    return ParameterError(f"Invalid parameter type for '{_render(path)}', expected: {expected}")


def _is_int(value: Any) -> bool:
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def _convert_int64(value: Any, path: Path) -> int:
    if _is_int(value) and INT64_MIN <= value <= INT64_MAX:
        return value
    raise _type_error(path, "integer")


def _convert_uint64(value: Any, path: Path) -> int:
    if _is_int(value):
        if 0 <= value <= UINT64_MAX:
            return value
        if INT64_MIN <= value < 0:
            return value + (1 << 64)  # qemu accepts negative input and wraps it
    raise ParameterError(f"Parameter '{_render(path)}' expects uint64")


def _ranged(base: Converter, low: int, high: int, type_name: str) -> Converter:
    def convert(value: Any, path: Path) -> int:
        result = base(value, path)
        if low <= result <= high:
            return result
        raise ParameterError(f"Parameter '{_short(path)}' expects {type_name}")
    return convert


def _convert_number(value: Any, path: Path) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise _type_error(path, "number")


def _simple(python_type: type, expected: str) -> Converter:
    def convert(value: Any, path: Path) -> Any:
        if isinstance(value, python_type):
            return value
        raise _type_error(path, expected)
    return convert


def _convert_any(value: Any, path: Path) -> Any:
    return value


def _builtin_converter(name: str) -> Converter:
    if name in ("int", "int64"):
        return _convert_int64
    if name in ("uint64", "size"):
        return _convert_uint64
    if name in _INT_RANGES:
        low, high = _INT_RANGES[name]
        base = _convert_int64 if low < 0 else _convert_uint64
        return _ranged(base, low, high, name)
    if name == "number":
        return _convert_number
    if name == "str":
        return _simple(str, "string")
    if name == "bool":
        return _simple(bool, "boolean")
    if name == "null":
        return _simple(type(None), "null")
    return _convert_any


def _enum_converter(values: List[str]) -> Converter:
    allowed = frozenset(values)

    def convert(value: Any, path: Path) -> str:
        if not isinstance(value, str):
            raise _type_error(path, "string")
        if value not in allowed:
            raise ParameterError(f"Parameter '{_short(path)}' does not accept value '{value}'")
        return value

    return convert


def _list_converter(item: Converter) -> Converter:
    def convert(value: Any, path: Path) -> list:
        if type(value) is not list:
            raise _type_error(path, "array")
        return [item(element, path + (index,)) for index, element in enumerate(value)]
    return convert


def _struct_converter(plan) -> Converter:
    def convert(value: Any, path: Path) -> dict:
        if type(value) is not dict:
            raise _type_error(path, "object")
        return _convert_members(plan, value, path)
    return convert


def _convert_members(plan, value: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """Visit the members of ``value`` in schema order, then look for extras."""
    result: Dict[str, Any] = {}
    _visit_members(plan, value, path, result)
    _check_unexpected(plan, value, path, result)
    return result


def _visit_members(plan, value: Dict[str, Any], path: Path, result: Dict[str, Any]) -> None:
    for name, optional, convert, out_key in plan:
        if name in value:
            result[out_key] = convert(value[name], path + (name,))
        elif not optional:
            raise ParameterError(f"Parameter '{_render(path + (name,))}' is missing")


def _check_unexpected(plan, value: Dict[str, Any], path: Path, result: Dict[str, Any]) -> None:
    # Every member in ``result`` was consumed; anything else is unexpected.
    if len(value) != len(result):
        consumed = tuple(name for name, _, _, _ in plan if name in value)
        _raise_unexpected(value, consumed, path)


def _raise_unexpected(value: Dict[str, Any], consumed: Tuple[str, ...], path: Path) -> None:
    extra = [key for key in value if key not in consumed]
    # With one extra member there is no order to reproduce.
    key = extra[0] if len(extra) == 1 else first_unexpected(value, consumed)
    raise ParameterError(f"Parameter '{_render(path + (key,))}' is unexpected")


def _builtin_json_schema(name: str, input: bool) -> Dict[str, Any]:
    if name in ("int", "int64"):
        return {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}
    if name in ("uint64", "size"):
        return {"type": "integer", "minimum": INT64_MIN if input else 0, "maximum": UINT64_MAX}
    if name in _INT_RANGES:
        low, high = _INT_RANGES[name]
        return {"type": "integer", "minimum": low, "maximum": high}
    if name == "number":
        return {"type": "number"}
    if name == "str":
        return {"type": "string"}
    if name == "bool":
        return {"type": "boolean"}
    if name == "null":
        return {"type": "null"}
    return {}


def strict_validator(json_schema: Dict[str, Any]):
    """A Draft 7 validator for ``json_schema`` whose integers exclude floats.

    JSON Schema calls ``1.0`` an integer; qemu's JSON model does not (a float
    is never accepted where an int is expected), so the type check is
    narrowed to Python ints.
    """
    import jsonschema  # heavy: only tests and tools validate with it

    checker = jsonschema.Draft7Validator.TYPE_CHECKER.redefine("integer", _is_int_checker)
    validator_class = jsonschema.validators.extend(jsonschema.Draft7Validator, type_checker=checker)
    return validator_class(json_schema)


def _is_int_checker(_checker: Any, instance: Any) -> bool:
    return _is_int(instance)
