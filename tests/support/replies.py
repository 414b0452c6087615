"""Check reply values against ``qapi-schema.json``.

Every engineer's tests call :func:`validate_return` on the ``"return"``
value a command produced (through the dispatcher, an agent process, or a
handler called directly), so a reply that drifts from the schema fails
the test that produced it::

    from tests.support.replies import validate_return
    validate_return(schema, "guest-file-read", reply["return"])

``schema`` may be a :class:`qga.schema.Schema` or None (the packaged schema).
Integers are checked the qemu way: ``1.0`` is not an int.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from qga.schema import Schema, strict_validator

_DEFAULT: Dict[str, Schema] = {}
_VALIDATORS: Dict[Tuple[int, str], Any] = {}


def default_schema() -> Schema:
    if "schema" not in _DEFAULT:
        _DEFAULT["schema"] = Schema.load()
    return _DEFAULT["schema"]


def return_validator(schema: Optional[Schema], command: str):
    """A cached Draft 7 validator for the ``return`` value of ``command``."""
    schema = schema or default_schema()
    key = (id(schema), command)
    validator = _VALIDATORS.get(key)
    if validator is None:
        if schema.command(command) is None:
            raise AssertionError(f"{command} is not a command of the schema on this platform")
        validator = _VALIDATORS[key] = strict_validator(schema.returns_json_schema(command))
    return validator


def validate_return(schema: Optional[Schema], command: str, value: Any) -> None:
    """Raise AssertionError unless ``value`` is a valid return of ``command``."""
    errors = sorted(return_validator(schema, command).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        lines = [f"{command} returned a value that does not match the schema:"]
        for error in errors[:10]:
            where = "/".join(str(part) for part in error.path) or "(top)"
            lines.append(f"  at {where}: {error.message}")
        raise AssertionError("\n".join(lines))


def validate_reply(schema: Optional[Schema], command: str, reply: Dict[str, Any]) -> None:
    """Check a whole success reply ``{"return": ..., ["id": ...]}``."""
    if "return" not in reply or set(reply) - {"return", "id"}:
        raise AssertionError(f"{command}: not a success reply: {reply!r}")
    validate_return(schema, command, reply["return"])
