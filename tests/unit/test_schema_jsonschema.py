"""json_schema(): Draft 7 schemas that agree with the visitor.

The property test feeds argument dicts built from the schema (valid ones and
near misses) to both the visitor and a jsonschema Draft 7 validator; they
must accept and reject the same dicts.  The validator is the stock
Draft7Validator with one narrowing (``strict_validator``): ``integer``
excludes floats such as ``1.0``, because qemu never takes a float for an int.
"""

from __future__ import annotations

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qga.errors import ParameterError
from qga.schema import INT64_MAX, INT64_MIN, LINUX_DEFINES, UINT64_MAX, Schema, strict_validator

SCHEMA = Schema.load(defines=LINUX_DEFINES)
COMMANDS_WITH_ARGUMENTS = [name for name in SCHEMA.command_names() if SCHEMA.command_members(name)]

EDGE_INTS = [0, 1, -1, INT64_MIN, INT64_MAX, INT64_MAX + 1, UINT64_MAX, INT64_MIN - 1, 255, 256, -129]
JUNK = st.one_of(
    st.none(), st.booleans(), st.sampled_from(EDGE_INTS), st.integers(),
    st.floats(allow_nan=False), st.sampled_from([1.0, 0.0, -1.0]), st.text(max_size=6),
    st.sampled_from(["set", "end", "merged", "stdout", "bogus"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _value(type_ref, depth=0):
    """Mostly valid values for ``type_ref``, with some junk mixed in."""
    if depth > 3:
        return JUNK
    return st.one_of(_valid(type_ref, depth), JUNK) if depth else st.one_of(_valid(type_ref, depth), _valid(type_ref, depth), JUNK)


def _valid(type_ref, depth):
    if isinstance(type_ref, list):
        return st.lists(_value(type_ref[0], depth + 1), max_size=3)
    if type_ref in ("int", "int64"):
        return st.one_of(st.integers(INT64_MIN, INT64_MAX), st.sampled_from(EDGE_INTS))
    if type_ref == "uint64":
        # Negative input is where uint64 is subtle (qemu wraps it): weigh it.
        return st.one_of(st.integers(INT64_MIN, UINT64_MAX), st.sampled_from(EDGE_INTS),
                         st.sampled_from([-1, -2, INT64_MIN, INT64_MIN - 1, UINT64_MAX + 1]))
    if type_ref == "str":
        return st.text(max_size=8)
    if type_ref == "bool":
        return st.booleans()
    if type_ref == "number":
        return st.one_of(st.floats(allow_nan=False), st.integers())
    if type_ref == "any":
        return JUNK  # every JSON value is valid
    kind = SCHEMA.kind(type_ref)
    if kind == "enum":
        return st.sampled_from(SCHEMA.enum_values(type_ref))
    if kind == "alternate":
        return st.one_of(*[_valid(branch, depth) for _, branch in SCHEMA.alternate_branches(type_ref)])
    if kind == "struct":
        return _object(SCHEMA.members(type_ref), depth + 1)
    raise AssertionError(f"no strategy for {type_ref}")


def _object(members, depth):
    @st.composite
    def build(draw):
        result = {}
        for member in members:
            # Leave out optional members often and mandatory ones rarely.
            if draw(st.integers(0, 9)) < (5 if member.optional else 1):
                continue
            result[member.name] = draw(_value(member.type, depth))
        for extra in draw(st.lists(st.sampled_from(["x", "zz", "id", "online", "path"]), max_size=1)):
            result.setdefault(extra, 1)
        return result
    return build()


@st.composite
def command_and_arguments(draw):
    name = draw(st.sampled_from(COMMANDS_WITH_ARGUMENTS))
    return name, draw(_object(SCHEMA.command_members(name), 0))


VALIDATORS = {name: strict_validator(SCHEMA.arguments_json_schema(name)) for name in SCHEMA.command_names()}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_and_arguments())
@example(("guest-set-memory-blocks", {"mem-blks": [{"phys-index": -1, "online": True}]}))
@example(("guest-sync", {"id": 1.0}))
@example(("guest-file-seek", {"handle": 1, "offset": 0, "whence": True}))
def test_visitor_and_draft7_validator_agree(case):
    name, arguments = case
    try:
        SCHEMA.visitor(name)(arguments)
        visitor_accepts = True
    except ParameterError:
        visitor_accepts = False
    validator_accepts = VALIDATORS[name].is_valid(arguments)
    assert visitor_accepts == validator_accepts, (name, arguments)


@given(st.dictionaries(st.text(max_size=4), JUNK, max_size=3))
def test_no_argument_commands_agree(arguments):
    try:
        SCHEMA.visitor("guest-ping")(arguments)
        accepted = True
    except ParameterError:
        accepted = False
    assert accepted == VALIDATORS["guest-ping"].is_valid(arguments) == (arguments == {})


def test_schemas_are_valid_draft7():
    for name in SCHEMA.command_names():
        jsonschema.Draft7Validator.check_schema(SCHEMA.arguments_json_schema(name))
        jsonschema.Draft7Validator.check_schema(SCHEMA.returns_json_schema(name))


def test_schema_shapes():
    whence = SCHEMA.json_schema("GuestFileWhence")
    assert whence["$ref"] == "#/definitions/GuestFileWhence"
    assert whence["definitions"]["GuestFileWhence"]["anyOf"][0]["type"] == "integer"
    assert SCHEMA.json_schema(["str"])["items"] == {"type": "string"}
    block = SCHEMA.json_schema("GuestMemoryBlock")["definitions"]["GuestMemoryBlock"]
    assert block["required"] == ["phys-index", "online"] and block["additionalProperties"] is False
    assert block["properties"]["phys-index"]["minimum"] == 0
    wrapped = SCHEMA.json_schema("GuestMemoryBlock", input=True)["definitions"]["GuestMemoryBlock"]
    assert wrapped["properties"]["phys-index"]["minimum"] == INT64_MIN


def test_union_schema_dispatches_on_the_discriminator():
    validator = strict_validator(SCHEMA.json_schema("GuestDiskSmart"))
    nvme = {name: 0 for name in (m.name for m in SCHEMA.members("GuestNVMeSmart"))}
    assert validator.is_valid(dict(nvme, type="nvme"))
    assert not validator.is_valid(dict(nvme, type="ide"))  # ide has no extra members
    assert validator.is_valid({"type": "ide"})
    assert not validator.is_valid({"type": "bogus"})


@pytest.mark.parametrize("value, valid", [
    (1, True), (1.0, False), (True, False), (INT64_MAX, True), (INT64_MAX + 1, False),
])
def test_strict_validator_integers(value, valid):
    assert strict_validator(SCHEMA.json_schema("int")).is_valid(value) is valid
