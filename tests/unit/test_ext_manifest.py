"""manifest.json: the closed schema, strict JSON, and the rules a schema cannot say."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from qga.errors import BundleError, ManifestError
from qga.ext.manifest import (
    CAPABILITIES, DEFAULT_LIMITS, SCHEMA, encode_manifest, parse_manifest, version_key,
)
from qga.ext.rules import Limits
from tests.support.ext_bundles import file_item, manifest_value

FILES = {"hello.py": b"print('hello')\n", "bin/run": b"#!/bin/sh\n", "lib/util.py": b"X=1\n"}


def full_manifest():
    value = manifest_value(FILES, modes={"bin/run": "0755"})
    value.update({
        "description": "Says hello",
        "requires-core": {"min": "0.1.0", "below": "1.0.0"},
        "entry-point": {"interpreter": "none", "path": "bin/run", "args": ["--quiet", "-v"]},
        "capabilities": ["events", "root-socket"],
        "limits": {"memory": 64 * 1024 * 1024, "cpu": 50, "nofile": 256, "nproc": 8,
                   "tasks": 16},
        "health": {"ready-timeout": 2.5},
        "mode": "envelope",
        "commands": {"greet": {"request": {"type": "object",
                                           "properties": {"who": {"$ref": "#/definitions/n"}},
                                           "definitions": {"n": {"type": "string"}}},
                               "reply": {"type": "string"}, "timeout": 5}},
        "events": {"greeted": {"type": "object"}},
        "settings": {"schema": {"type": "object", "properties": {"loud": {"type": "boolean"}},
                                "additionalProperties": False},
                     "defaults": {"loud": False}},
    })
    return value


def parse(value, limits=Limits()):
    return parse_manifest(encode_manifest(value), limits)


def test_a_full_manifest_gives_its_typed_view():
    manifest = parse(full_manifest())
    assert (manifest.name, manifest.version, manifest.description) == (
        "hello", "1.0.0", "Says hello")
    assert manifest.entry_point == ("none", "bin/run", ("--quiet", "-v"))
    assert manifest.capabilities == {"events", "root-socket"}
    assert manifest.limits == {"memory": 64 * 1024 * 1024, "cpu": 50, "nofile": 256,
                               "nproc": 8, "tasks": 16}
    assert manifest.ready_timeout == 2.5
    assert manifest.mode == "envelope" and manifest.ports == ()
    assert set(manifest.commands) == {"greet"} and set(manifest.events) == {"greeted"}
    assert manifest.settings_defaults == {"loud": False}
    assert manifest.file("bin/run").mode == 0o755
    assert manifest.file("hello.py").mode == 0o644
    assert manifest.file("nope") is None
    assert manifest.total_size == sum(len(data) for data in FILES.values())


def test_a_minimal_manifest_takes_the_defaults():
    manifest = parse(manifest_value(FILES))
    assert manifest.limits == DEFAULT_LIMITS
    assert manifest.ready_timeout == 30
    assert manifest.mode == "envelope"
    assert manifest.capabilities == frozenset()
    assert manifest.entry_point == ("python3", "hello.py", ())


def test_channel_mode_with_fallback_ports():
    value = manifest_value(FILES, mode="channel", capabilities=["channel"],
                           channel={"ports": ["ovirt-guest-agent.0", "com.redhat.rhevm.vdsm"]})
    manifest = parse(value)
    assert manifest.ports == ("ovirt-guest-agent.0", "com.redhat.rhevm.vdsm")
    assert manifest.remove_notice is None


def test_a_channel_may_leave_a_notice_on_removal():
    notice = '{"__name__": "uninstalled"}\n'
    value = manifest_value(FILES, mode="channel", capabilities=["channel"],
                           channel={"ports": ["p.0"], "on-remove": notice})
    assert parse(value).remove_notice == notice.encode()
    for bad in ("", "x" * 4097, 7):
        value["channel"]["on-remove"] = bad
        with pytest.raises(ManifestError, match="channel/on-remove"):
            parse(value)


def test_the_schema_is_draft7_and_closed():
    import jsonschema

    jsonschema.Draft7Validator.check_schema(SCHEMA)
    stack = [SCHEMA]
    closed = 0
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "properties" in item and item.get("type") == "object":
                assert item.get("additionalProperties") is False, item
                closed += 1
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    assert closed >= 9


def test_every_capability_is_documented():
    assert set(SCHEMA["properties"]["capabilities"]["items"]["enum"]) == set(CAPABILITIES)
    assert all(CAPABILITIES.values())


def test_importing_the_module_loads_no_jsonschema():
    code = ("import sys, qga.ext.manifest, qga.ext.bundle, qga.ext.verify, qga.ext.cli;"
            "print(sorted(m for m in ('jsonschema', 'cryptography') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def edited(path, new_value):
    """full_manifest() with the member at ``path`` (a list of keys) replaced or deleted."""
    value = full_manifest()
    target = value
    for key in path[:-1]:
        target = target[key]
    if new_value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = new_value
    return value


DELETE = object()


@pytest.mark.parametrize("path, new_value, message", [
    (["colour"], "blue", "Additional properties are not allowed ('colour'"),
    (["limits", "swap"], 1, "at limits: Additional properties"),
    (["entry-point", "env"], {}, "at entry-point: Additional properties"),
    (["files", 0, "owner"], "root", "at files/0: Additional properties"),
    (["name"], DELETE, "'name' is a required property"),
    (["files"], DELETE, "'files' is a required property"),
    (["manifest-version"], 2, "at manifest-version"),
    (["name"], "Hello", "at name"),
    (["name"], "1hello", "at name"),
    (["name"], "h" * 65, "at name"),
    (["name"], "hello\n", "at name: 'hello\\n' is not allowed"),
    (["version"], "1.0", "at version"),
    (["version"], "01.0.0", "at version"),
    (["version"], "1.0.0\n", "at version: '1.0.0\\n' is not allowed"),
    (["files", 0, "mode"], "0777", "at files/0/mode"),
    (["files", 0, "mode"], "4755", "at files/0/mode"),
    (["files", 0, "mode"], 420, "at files/0/mode"),
    (["files", 0, "sha256"], "AB" * 32, "at files/0/sha256"),
    (["files", 0, "size"], 1.0, "at files/0/size"),
    (["files", 0, "size"], True, "at files/0/size"),
    (["files", 0, "size"], -1, "at files/0/size"),
    (["files"], [], "at files"),
    (["capabilities"], ["root"], "at capabilities/0"),
    (["capabilities"], ["events", "events"], "at capabilities"),
    (["limits", "memory"], 1024, "at limits/memory"),
    (["health", "ready-timeout"], 0, "at health/ready-timeout"),
    (["mode"], "tunnel", "at mode"),
    (["channel"], {"ports": ["x"]}, "channel"),  # channel only in channel mode
    (["commands", "Greet"], {"request": {}, "reply": {}}, "at commands"),
    (["commands", "greet", "reply"], DELETE, "'reply' is a required property"),
    (["commands", "greet", "request"], "string", "at commands/greet/request"),
    (["entry-point", "args"], ["a\x00b"], "NUL"),
    (["requires-core", "below"], "0.1.0", "'below' 0.1.0 is not above 'min' 0.1.0"),
    (["entry-point", "path"], "missing.py", "entry-point 'missing.py' is not one of the files"),
    (["entry-point", "path"], "hello.py", "mode is not 0755"),  # interpreter none
    (["capabilities"], ["root-socket"], "events are declared without the 'events' capability"),
    (["events", "x"], {"$ref": "http://example.com/s.json"}, "points outside the schema"),
    (["commands", "greet", "reply"], {"$id": "http://example.com/", "type": "string"},
     "$id is not allowed"),
    (["commands", "greet", "reply"], {"type": "strin"}, "commands.greet.reply is not a valid"),
    (["events", "greeted"], {"$schema": "http://json-schema.org/draft-04/schema#"},
     "only Draft 7"),
    (["settings", "defaults"], {"loud": "yes"}, "settings.defaults do not follow"),
])
def test_manifest_violations_are_refused(path, new_value, message):
    with pytest.raises(ManifestError) as refused:
        parse(edited(path, new_value))
    assert message in str(refused.value)


def test_an_embedded_pattern_must_compile():
    # jsonschema >= 4.18 finds it ("not a 'regex'"); 4.10 does not, our own check does.
    with pytest.raises(ManifestError, match="regex|regular expression"):
        parse(edited(["commands", "greet", "reply"], {"type": "string", "pattern": "("}))
    with pytest.raises(ManifestError, match="regex|regular expression"):
        parse(edited(["events", "greeted"], {"patternProperties": {"(": {}}}))


def test_channel_mode_needs_the_channel_capability_and_ports():
    with pytest.raises(ManifestError, match="go together"):
        parse(manifest_value(FILES, mode="channel", channel={"ports": ["p.0"]}))
    with pytest.raises(ManifestError, match="'channel' is a required property"):
        parse(manifest_value(FILES, mode="channel", capabilities=["channel"]))
    with pytest.raises(ManifestError, match="go together"):
        parse(manifest_value(FILES, capabilities=["channel"]))


@pytest.mark.parametrize("data, message", [
    (b'{"name": "a", "name": "b"}', "duplicate key 'name'"),
    (b'{"x": NaN}', "NaN is not JSON"),
    (b'{"x": Infinity}', "Infinity is not JSON"),
    (b'\xff{}', "not UTF-8"),
    (b'{"x": 1,}', "not valid JSON"),
    (b'[' * 100 + b']' * 100, "nested deeper than 64"),
    (b'[' * 100000 + b']' * 100000, "nested deeper than 64"),
    (b'{"x": "\\ud800"}', "lone surrogate"),
    (b'[]', "is not of type 'object'"),
])
def test_strict_json(data, message):
    with pytest.raises(ManifestError) as refused:
        parse_manifest(data)
    assert message in str(refused.value)


def test_oversized_manifest_is_refused_before_parsing():
    data = b" " * (Limits().max_manifest_size + 1)
    with pytest.raises(ManifestError, match="over the 1048576-byte limit"):
        parse_manifest(data)


@pytest.mark.parametrize("paths, message", [
    (["a.py", "a.py"], "appears twice"),
    (["README", "readme"], "collides with 'README'"),
    (["caf\u00e9.py", "cafe\u0301.py"], "Unicode NFKC folding"),
    (["\ufb01le.py", "file.py"], "collides"),
    (["lib", "lib/x.py"], "both a file and a directory"),
    (["Lib/a.py", "lib/b.py"], "collides"),
    (["Manifest.JSON"], "lists itself"),
    (["../x.py"], "a '..' component"),
    (["/etc/passwd"], "an absolute path"),
    (["a\\b.py"], "a backslash"),
    (["a/./b.py"], "a '.' component"),
    (["a//b.py"], "an empty component"),
    (["a\tb.py"], "U+0009"),
    (["a\u202eb.py"], "U+202E"),
    (["x" * 256], "longer than 255 bytes"),
    (["/".join("d" * 17)], "deeper than 16 components"),
])
def test_file_list_rules(paths, message):
    files = {path: b"data" for path in paths}
    value = manifest_value({"main.py": b""})
    value["files"] += [file_item(path, data) for path, data in files.items()]
    if len(set(paths)) < len(paths):
        value["files"].append(file_item(paths[0], b"data"))
    with pytest.raises(BundleError) as refused:
        parse(value)
    assert message in str(refused.value)


def test_caps_on_files():
    value = manifest_value({f"f{i}": b"0123456789" for i in range(5)})
    parse(value, Limits(max_files=5, max_file_size=10, max_total_size=50))
    with pytest.raises(ManifestError, match="lists 5 files, over the limit of 4"):
        parse(value, Limits(max_files=4))
    with pytest.raises(ManifestError, match="'f0' is 10 bytes, over the per-file limit of 9"):
        parse(value, Limits(max_file_size=9))
    with pytest.raises(ManifestError, match="lists 50 bytes of files, over the limit of 49"):
        parse(value, Limits(max_total_size=49))


def test_versions_sort_by_semver_precedence():
    ordered = ["0.9.9", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta",
               "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2.0",
               "1.10.0", "2.0.0"]
    assert sorted(ordered, key=version_key) == ordered
    assert version_key("1.0.0+build.5") == version_key("1.0.0")


def test_core_range():
    manifest = parse(full_manifest())  # >= 0.1.0, < 1.0.0
    assert manifest.supports_core("0.1.0") and manifest.supports_core("0.9.3")
    assert not manifest.supports_core("0.0.9") and not manifest.supports_core("1.0.0")
    assert not manifest.supports_core("0.1.0-rc.1")
    open_ended = parse(manifest_value(FILES))
    assert open_ended.supports_core("99.0.0")


def test_encoding_is_stable():
    value = full_manifest()
    shuffled = json.loads(json.dumps(value), object_pairs_hook=lambda p: dict(reversed(p)))
    assert encode_manifest(shuffled) == encode_manifest(copy.deepcopy(value))
    assert parse(value).sha256 == parse(shuffled).sha256
