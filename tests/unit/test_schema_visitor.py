"""The argument visitor: qemu-ga's checks, conversions and exact texts.

The expected texts were measured on the real qemu-ga 7.2;
tests/compat/test_arguments.py replays the wire-level ones against it.
"""

from __future__ import annotations

import pytest

from qga.errors import ParameterError
from qga.schema import LINUX_DEFINES, Schema

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


@pytest.fixture(scope="module")
def schema():
    return Schema.load(defines=LINUX_DEFINES)


def _custom_schema(*definitions):
    return Schema({"pragma": {}, "definitions": list(definitions)}, LINUX_DEFINES)


ACCEPTED = [
    # command, arguments, keyword arguments for the handler
    ("guest-ping", None, {}),
    ("guest-ping", {}, {}),
    ("guest-sync", {"id": 5}, {"id": 5}),
    ("guest-sync", {"id": INT64_MIN}, {"id": INT64_MIN}),
    ("guest-sync", {"id": INT64_MAX}, {"id": INT64_MAX}),
    ("guest-sync", {"id": 0}, {"id": 0}),
    ("guest-set-time", {}, {}),
    ("guest-file-open", {"path": "/x"}, {"path": "/x"}),
    ("guest-file-open", {"mode": "r", "path": "/x"}, {"path": "/x", "mode": "r"}),
    ("guest-file-write", {"handle": 1, "buf-b64": ""}, {"handle": 1, "buf_b64": ""}),
    ("guest-file-seek", {"handle": 1, "offset": -5, "whence": 2}, {"handle": 1, "offset": -5, "whence": 2}),
    ("guest-file-seek", {"handle": 1, "offset": 0, "whence": "end"}, {"handle": 1, "offset": 0, "whence": "end"}),
    ("guest-exec", {"path": "ls", "capture-output": True}, {"path": "ls", "capture_output": True}),
    ("guest-exec", {"path": "ls", "capture-output": "merged"}, {"path": "ls", "capture_output": "merged"}),
    ("guest-exec", {"path": "ls", "arg": [], "env": ["A=1"]}, {"path": "ls", "arg": [], "env": ["A=1"]}),
    ("guest-fsfreeze-freeze-list", {"mountpoints": ["/", "/x"]}, {"mountpoints": ["/", "/x"]}),
    # uint64 takes negative int64 and wraps it, for backward compatibility.
    ("guest-set-memory-blocks", {"mem-blks": [{"phys-index": -1, "online": True}]},
     {"mem_blks": [{"phys-index": (1 << 64) - 1, "online": True}]}),
    ("guest-set-memory-blocks", {"mem-blks": [{"phys-index": (1 << 64) - 1, "online": False, "can-offline": True}]},
     {"mem_blks": [{"phys-index": (1 << 64) - 1, "online": False, "can-offline": True}]}),
    ("guest-set-memory-blocks", {"mem-blks": [{"phys-index": INT64_MIN, "online": True}]},
     {"mem_blks": [{"phys-index": 1 << 63, "online": True}]}),
    ("guest-set-memory-blocks", {"mem-blks": []}, {"mem_blks": []}),
    ("guest-set-vcpus", {"vcpus": [{"online": True, "logical-id": 1}]},
     {"vcpus": [{"logical-id": 1, "online": True}]}),
    ("guest-ssh-add-authorized-keys", {"username": "u", "keys": ["k"], "reset": False},
     {"username": "u", "keys": ["k"], "reset": False}),
]

REJECTED = [
    # command, arguments, qemu-ga's text
    ("guest-sync", None, "Parameter 'id' is missing"),
    ("guest-sync", {}, "Parameter 'id' is missing"),
    ("guest-sync", {"foo": 2}, "Parameter 'id' is missing"),
    ("guest-sync", {"id": 1, "foo": 2}, "Parameter 'foo' is unexpected"),
    ("guest-sync", {"zz": 1, "id": "x"}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-sync", {"id": 1.0}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-sync", {"id": 1e2}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-sync", {"id": float("inf")}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-sync", {"id": INT64_MAX + 1}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-sync", {"id": (1 << 64) - 1}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-sync", {"id": "5"}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-sync", {"id": True}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-sync", {"id": None}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-sync", {"id": []}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-sync", {"id": {}}, "Invalid parameter type for 'id', expected: integer"),
    ("guest-ping", {"a": 1}, "Parameter 'a' is unexpected"),
    # Several unexpected members: the first one GLib's hash table yields.
    ("guest-ping", {"a": 1, "b": 2}, "Parameter 'b' is unexpected"),
    ("guest-ping", {"b": 1, "a": 2, "c": 3}, "Parameter 'b' is unexpected"),
    ("guest-file-open", {"mode": 1}, "Parameter 'path' is missing"),
    ("guest-file-open", {"path": "/x", "mode": 1}, "Invalid parameter type for 'mode', expected: string"),
    ("guest-file-open", {"path": 7}, "Invalid parameter type for 'path', expected: string"),
    ("guest-file-read", {"handle": 1, "count": "1"}, "Invalid parameter type for 'count', expected: integer"),
    ("guest-file-write", {"buf-b64": "", "handle": None}, "Invalid parameter type for 'handle', expected: integer"),
    ("guest-file-write", {"handle": 1}, "Parameter 'buf-b64' is missing"),
    ("guest-file-seek", {"handle": 1, "offset": 0}, "Parameter 'whence' is missing"),
    ("guest-file-seek", {"handle": 1, "offset": 0, "whence": "bogus"}, "Parameter 'whence' does not accept value 'bogus'"),
    ("guest-file-seek", {"handle": 1, "offset": 0, "whence": "SET"}, "Parameter 'whence' does not accept value 'SET'"),
    ("guest-file-seek", {"handle": 1, "offset": 0, "whence": True},
     "Invalid parameter type for 'whence', expected: GuestFileWhence"),
    ("guest-file-seek", {"handle": 1, "offset": 0, "whence": None},
     "Invalid parameter type for 'whence', expected: GuestFileWhence"),
    ("guest-file-seek", {"handle": 1, "offset": 0, "whence": [0]},
     "Invalid parameter type for 'whence', expected: GuestFileWhence"),
    ("guest-file-seek", {"handle": 1, "offset": 0, "whence": 1.5}, "Invalid parameter type for 'whence', expected: integer"),
    ("guest-file-seek", {"handle": 1, "whence": "x"}, "Parameter 'offset' is missing"),
    ("guest-exec", {"path": "x", "arg": ["a", 1]}, "Invalid parameter type for 'arg[1]', expected: string"),
    ("guest-exec", {"path": "x", "arg": [1]}, "Invalid parameter type for 'arg[0]', expected: string"),
    ("guest-exec", {"path": "x", "arg": "a"}, "Invalid parameter type for 'arg', expected: array"),
    ("guest-exec", {"path": "x", "capture-output": "all"}, "Parameter 'capture-output' does not accept value 'all'"),
    ("guest-exec", {"path": "x", "capture-output": 1},
     "Invalid parameter type for 'capture-output', expected: GuestExecCaptureOutput"),
    ("guest-exec", {"path": "x", "capture-output": None},
     "Invalid parameter type for 'capture-output', expected: GuestExecCaptureOutput"),
    ("guest-exec", {"arg": [1]}, "Parameter 'path' is missing"),
    ("guest-set-vcpus", {}, "Parameter 'vcpus' is missing"),
    ("guest-set-vcpus", {"vcpus": {}}, "Invalid parameter type for 'vcpus', expected: array"),
    ("guest-set-vcpus", {"vcpus": [1]}, "Invalid parameter type for 'vcpus[0]', expected: object"),
    ("guest-set-vcpus", {"vcpus": [{"logical-id": 0}]}, "Parameter 'vcpus[0].online' is missing"),
    ("guest-set-vcpus", {"vcpus": [{"logical-id": 0, "online": True}, {"logical-id": "x"}]},
     "Invalid parameter type for 'vcpus[1].logical-id', expected: integer"),
    ("guest-set-vcpus", {"vcpus": [{"logical-id": 0, "online": True, "zz": 1}]},
     "Parameter 'vcpus[0].zz' is unexpected"),
    ("guest-set-vcpus", {"vcpus": [{"logical-id": 0, "online": 1}]},
     "Invalid parameter type for 'vcpus[0].online', expected: boolean"),
    # A nested struct's extras are reported before later top-level members are checked.
    ("guest-set-vcpus", {"zz": 1, "vcpus": [{"logical-id": 0, "online": True, "yy": 1}]},
     "Parameter 'vcpus[0].yy' is unexpected"),
    ("guest-set-memory-blocks", {"mem-blks": [{"phys-index": "x", "online": True}]},
     "Parameter 'mem-blks[0].phys-index' expects uint64"),
    ("guest-set-memory-blocks", {"mem-blks": [{"phys-index": 1.5, "online": True}]},
     "Parameter 'mem-blks[0].phys-index' expects uint64"),
    ("guest-set-memory-blocks", {"mem-blks": [{"phys-index": 1.8446744073709552e19, "online": True}]},
     "Parameter 'mem-blks[0].phys-index' expects uint64"),
    ("guest-set-memory-blocks", {"mem-blks": [{"phys-index": -9.2233720368547758e18 * 1.0000001, "online": True}]},
     "Parameter 'mem-blks[0].phys-index' expects uint64"),
    ("guest-set-memory-blocks", {"mem-blks": [{"online": True}]}, "Parameter 'mem-blks[0].phys-index' is missing"),
    ("guest-fsfreeze-freeze-list", {"mountpoints": None}, "Invalid parameter type for 'mountpoints', expected: array"),
    ("guest-fsfreeze-freeze-list", {"mountpoints": ["/", ["/"]]},
     "Invalid parameter type for 'mountpoints[1]', expected: string"),
    ("guest-fstrim", {"minimum": None}, "Invalid parameter type for 'minimum', expected: integer"),
    ("guest-set-user-password", {"username": "u", "password": "p"}, "Parameter 'crypted' is missing"),
    ("guest-set-user-password", {"username": "u", "password": "p", "crypted": "true"},
     "Invalid parameter type for 'crypted', expected: boolean"),
    ("guest-ssh-add-authorized-keys", {"username": "u", "keys": [None]},
     "Invalid parameter type for 'keys[0]', expected: string"),
]


@pytest.mark.parametrize("command, arguments, expected", ACCEPTED)
def test_accepted_arguments_become_keyword_arguments(schema, command, arguments, expected):
    assert schema.visitor(command)(arguments) == expected


@pytest.mark.parametrize("command, arguments, text", REJECTED)
def test_rejected_arguments_give_qemu_texts(schema, command, arguments, text):
    with pytest.raises(ParameterError) as caught:
        schema.visitor(command)(arguments)
    assert caught.value.desc == text
    assert caught.value.error_class == "GenericError"


def test_visitors_are_built_once(schema):
    assert schema.visitor("guest-exec") is schema.visitor("guest-exec")


def test_input_is_not_modified(schema):
    arguments = {"mem-blks": [{"phys-index": -1, "online": True}]}
    schema.visitor("guest-set-memory-blocks")(arguments)
    assert arguments == {"mem-blks": [{"phys-index": -1, "online": True}]}


def test_members_conditional_on_another_platform_are_unexpected():
    schema = _custom_schema(
        {"command": "x-cmd", "data": {"a": {"type": "int", "if": "CONFIG_WIN32"}, "*b": "str"}})
    with pytest.raises(ParameterError, match="Parameter 'a' is unexpected"):
        schema.visitor("x-cmd")({"a": 1})


@pytest.mark.parametrize("type_name, value, result_or_text", [
    ("int8", 127, 127),
    ("int8", -128, -128),
    ("int8", 128, "Parameter 'v' expects int8"),
    ("int8", 1.0, "Invalid parameter type for 'v', expected: integer"),
    ("uint8", 255, 255),
    ("uint8", -1, "Parameter 'v' expects uint8"),
    ("uint16", 65536, "Parameter 'v' expects uint16"),
    ("uint16", "1", "Parameter 'v' expects uint64"),
    ("int32", -(1 << 31) - 1, "Parameter 'v' expects int32"),
    ("uint32", (1 << 32) - 1, (1 << 32) - 1),
    ("number", 3, 3.0),
    ("number", 2.5, 2.5),
    ("number", True, "Invalid parameter type for 'v', expected: number"),
    ("number", "1", "Invalid parameter type for 'v', expected: number"),
    ("null", None, None),
    ("null", 0, "Invalid parameter type for 'v', expected: null"),
    ("any", {"x": [1]}, {"x": [1]}),
    ("bool", False, False),
    ("bool", 0, "Invalid parameter type for 'v', expected: boolean"),
    ("str", "", ""),
])
def test_builtin_types(type_name, value, result_or_text):
    schema = _custom_schema({"command": "x-cmd", "data": {"v": type_name}})
    visitor = schema.visitor("x-cmd")
    if isinstance(result_or_text, str) and result_or_text.startswith(("Parameter", "Invalid")):
        with pytest.raises(ParameterError) as caught:
            visitor({"v": value})
        assert caught.value.desc == result_or_text
    else:
        result = visitor({"v": value})["v"]
        assert result == result_or_text and type(result) is type(result_or_text)


def test_range_errors_inside_lists_name_the_element_null():
    # qemu's visit_type_uintN() prints the member name, which a list element lacks.
    schema = _custom_schema({"command": "x-cmd", "data": {"v": ["uint8"]}})
    with pytest.raises(ParameterError, match=r"^Parameter 'null' expects uint8$"):
        schema.visitor("x-cmd")({"v": [1, 300]})


def test_flat_union_arguments():
    schema = _custom_schema(
        {"enum": "Kind", "data": ["a", "b"]},
        {"struct": "VariantA", "data": {"x": "int", "*y": "str"}},
        {"union": "U", "base": {"kind": "Kind", "*common": "bool"}, "discriminator": "kind",
         "data": {"a": "VariantA"}},
        {"command": "x-cmd", "data": {"u": "U"}},
    )
    visitor = schema.visitor("x-cmd")
    assert visitor({"u": {"kind": "a", "x": 1}}) == {"u": {"kind": "a", "x": 1}}
    assert visitor({"u": {"kind": "b", "common": True}}) == {"u": {"kind": "b", "common": True}}
    for arguments, text in [
        ({"u": {"kind": "a"}}, "Parameter 'u.x' is missing"),
        ({"u": {"kind": "c"}}, "Parameter 'kind' does not accept value 'c'"),
        ({"u": {"x": 1}}, "Parameter 'u.kind' is missing"),
        ({"u": {"kind": "b", "x": 1}}, "Parameter 'u.x' is unexpected"),
        ({"u": []}, "Invalid parameter type for 'u', expected: object"),
    ]:
        with pytest.raises(ParameterError) as caught:
            visitor(arguments)
        assert caught.value.desc == text


def test_struct_base_members_come_first():
    schema = _custom_schema(
        {"struct": "Base", "data": {"a": "int"}},
        {"struct": "Child", "base": "Base", "data": {"b": "int"}},
        {"command": "x-cmd", "data": "Child"},
    )
    with pytest.raises(ParameterError, match="Parameter 'a' is missing"):
        schema.visitor("x-cmd")({"b": "wrong type, but a is checked first"})
    assert schema.visitor("x-cmd")({"b": 2, "a": 1}) == {"a": 1, "b": 2}


def test_recursive_types():
    schema = _custom_schema(
        {"struct": "Node", "data": {"value": "int", "*children": ["Node"]}},
        {"command": "x-cmd", "data": {"tree": "Node"}},
    )
    tree = {"value": 1, "children": [{"value": 2, "children": [{"value": "x"}]}]}
    with pytest.raises(ParameterError) as caught:
        schema.visitor("x-cmd")({"tree": tree})
    assert caught.value.desc == "Invalid parameter type for 'tree.children[0].children[0].value', expected: integer"
