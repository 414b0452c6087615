"""The dispatcher: request shapes, policy, frozen gate, errors, replies."""

from __future__ import annotations

import logging

import pytest

from qga import QEMU_GA_VERSION
from qga.commands import Context, command, module_handlers
from qga.dispatch import FROZEN_SAFE_COMMANDS, Dispatcher, Policy
from qga.errors import CommandError, JSONParseError, Unsupported
from qga.schema import LINUX_DEFINES, Schema
from tests.support.replies import validate_return

SCHEMA = Schema.load(defines=LINUX_DEFINES)


class FakeState:
    """Only the frozen flag, which is all the dispatcher reads."""

    def __init__(self, frozen: bool = False):
        self.frozen = frozen
        self.calls = 0

    def is_frozen(self) -> bool:
        self.calls += 1
        return self.frozen


class Recorder:
    """Handlers that record their calls and return something schema-valid."""

    RETURNS = {
        "guest-get-time": 123, "guest-file-open": 1000, "guest-fsfreeze-thaw": 0,
        "guest-file-read": {"count": 0, "buf-b64": "", "eof": True},
        "guest-set-memory-blocks": [],
    }

    def __init__(self):
        self.calls = []

    def handlers(self, names):
        return {name: self._make(name) for name in names}

    def _make(self, name):
        def handler(ctx, **kwargs):
            self.calls.append((name, kwargs))
            return self.RETURNS.get(name)
        return handler


def make(handlers=None, policy=None, frozen=False):
    recorder = Recorder()
    table = dict(module_handlers("qga.commands.core"))
    table.update(recorder.handlers(handlers or ["guest-get-time", "guest-file-open", "guest-file-read",
                                                "guest-shutdown", "guest-fsfreeze-thaw", "guest-set-memory-blocks",
                                                "guest-fsfreeze-status"]))
    ctx = Context(config=None, state=FakeState(frozen))
    return Dispatcher(SCHEMA, table, ctx, policy), recorder, ctx


def error(text, cls="GenericError", **extra):
    reply = dict(extra)
    reply["error"] = {"class": cls, "desc": text}
    return reply


# -- request shapes ------------------------------------------------------------------

@pytest.mark.parametrize("request_value, reply", [
    (42, error("QMP input must be a JSON object")),
    ("guest-ping", error("QMP input must be a JSON object")),
    ([{"execute": "guest-ping"}], error("QMP input must be a JSON object")),
    (None, error("QMP input must be a JSON object")),
    (True, error("QMP input must be a JSON object")),
    ({}, error("QMP input lacks member 'execute'")),
    ({"id": 1}, error("QMP input lacks member 'execute'", id=1)),
    ({"arguments": {}}, error("QMP input lacks member 'execute'")),
    ({"execute": 1}, error("QMP input member 'execute' must be a string")),
    ({"execute": None, "id": "x"}, error("QMP input member 'execute' must be a string", id="x")),
    ({"execute": "guest-ping", "arguments": []}, error("QMP input member 'arguments' must be an object")),
    ({"execute": "guest-ping", "arguments": None}, error("QMP input member 'arguments' must be an object")),
    ({"execute": "guest-ping", "arguments": "x"}, error("QMP input member 'arguments' must be an object")),
    ({"execute": "guest-ping", "exec-oob": "guest-ping"}, error("QMP input member 'exec-oob' is unexpected")),
    ({"execute": "guest-ping", "foo": 1, "id": 7}, error("QMP input member 'foo' is unexpected", id=7)),
    ({"exec-oob": "guest-ping"}, error("QMP input member 'exec-oob' is unexpected")),
    # Several problems: the first member in QDict order decides.
    ({"arguments": [], "foo": 1, "execute": "x"}, error("QMP input member 'arguments' must be an object")),
    ({"foo": 1, "execute": 5}, error("QMP input member 'execute' must be a string")),
    ({"zzz": 1, "arguments": 5}, error("QMP input member 'zzz' is unexpected")),
])
def test_request_shape_errors(request_value, reply):
    dispatcher, recorder, _ = make()
    assert dispatcher.dispatch(request_value) == reply
    assert recorder.calls == []


def test_ids_of_any_type_are_echoed_as_copies():
    dispatcher, _, _ = make()
    for request_id in [None, 0, -1.5, "s", True, [1, {"a": None}], {"nested": [1, 2]}]:
        request = {"execute": "guest-ping", "id": request_id}
        reply = dispatcher.dispatch(request)
        assert reply == {"return": {}, "id": request_id}
        if isinstance(request_id, (list, dict)):
            assert reply["id"] is not request_id
    assert dispatcher.dispatch({"execute": "nope", "id": None}) == error(
        "The command nope has not been found", "CommandNotFound", id=None)


def test_reply_member_order_is_qemus():
    dispatcher, _, _ = make()
    assert list(dispatcher.dispatch({"execute": "guest-ping", "id": 1})) == ["return", "id"]
    assert list(dispatcher.dispatch({"execute": "nope", "id": 1})) == ["id", "error"]


def test_error_reply_for_parse_failures_has_no_id():
    dispatcher, _, _ = make()
    assert dispatcher.error_reply(JSONParseError("expecting value")) == error("JSON parse error, expecting value")


# -- commands ----------------------------------------------------------------------------

def test_core_commands():
    dispatcher, _, ctx = make()
    assert dispatcher.dispatch({"execute": "guest-ping"}) == {"return": {}}
    assert dispatcher.dispatch({"execute": "guest-sync", "arguments": {"id": 99}}) == {"return": 99}
    assert ctx.take_delimit_flag() is False
    assert dispatcher.dispatch({"execute": "guest-sync-delimited", "arguments": {"id": -5}}) == {"return": -5}
    assert ctx.take_delimit_flag() is True
    # A failed sync-delimited is not delimited.
    dispatcher.dispatch({"execute": "guest-sync-delimited", "arguments": {"id": "x"}})
    assert ctx.take_delimit_flag() is False


def test_unknown_command_and_case_sensitivity():
    dispatcher, _, _ = make()
    assert dispatcher.dispatch({"execute": "GUEST-PING"}) == error(
        "The command GUEST-PING has not been found", "CommandNotFound")
    # Windows-only upstream: not registered at all on Linux.
    assert dispatcher.dispatch({"execute": "guest-get-devices"}) == error(
        "The command guest-get-devices has not been found", "CommandNotFound")


def test_commands_without_handler_are_disabled_and_listed_so():
    dispatcher, _, _ = make()
    assert dispatcher.dispatch({"execute": "guest-get-vcpus", "arguments": {"junk": 1}}) == error(
        "Command guest-get-vcpus has been disabled", "CommandNotFound")
    infos = {info["name"]: info for info in dispatcher.command_infos()}
    assert infos["guest-get-vcpus"]["enabled"] is False
    assert infos["guest-ping"]["enabled"] is True


def test_arguments_are_checked_and_converted_before_the_handler():
    dispatcher, recorder, _ = make()
    assert dispatcher.dispatch({"execute": "guest-file-open", "arguments": {"mode": "r"}, "id": 3}) == error(
        "Parameter 'path' is missing", id=3)
    assert recorder.calls == []
    assert dispatcher.dispatch({"execute": "guest-file-open", "arguments": {"path": "/x"}}) == {"return": 1000}
    assert dispatcher.dispatch({"execute": "guest-set-memory-blocks",
                                "arguments": {"mem-blks": [{"phys-index": -1, "online": True}]}}) == {"return": []}
    assert recorder.calls == [("guest-file-open", {"path": "/x"}),
                              ("guest-set-memory-blocks", {"mem_blks": [{"phys-index": (1 << 64) - 1, "online": True}]})]


def test_commands_without_returns_answer_an_empty_object():
    dispatcher, _, _ = make(handlers=["guest-file-close"])
    assert dispatcher.dispatch({"execute": "guest-file-close", "arguments": {"handle": 1}}) == {"return": {}}


def test_success_response_false_replies_nothing_on_success_but_errors_on_failure():
    dispatcher, recorder, _ = make()
    assert dispatcher.dispatch({"execute": "guest-shutdown", "arguments": {"mode": "halt"}, "id": 1}) is None
    assert recorder.calls == [("guest-shutdown", {"mode": "halt"})]
    assert dispatcher.dispatch({"execute": "guest-shutdown", "arguments": {"mode": 1}, "id": 1}) == error(
        "Invalid parameter type for 'mode', expected: string", id=1)


def test_command_errors_keep_their_class_and_text():
    def failing(ctx):
        raise Unsupported()

    def generic(ctx, path, mode="r"):
        raise CommandError(f"failed to open file '{path}' (mode: '{mode}'): No such file or directory")

    dispatcher = Dispatcher(SCHEMA, {"guest-get-time": failing, "guest-file-open": generic},
                            Context(None, FakeState()))
    assert dispatcher.dispatch({"execute": "guest-get-time", "id": 2}) == error(
        "this feature or command is not currently supported", id=2)
    assert dispatcher.dispatch({"execute": "guest-file-open", "arguments": {"path": "/n"}}) == error(
        "failed to open file '/n' (mode: 'r'): No such file or directory")


def test_handler_bugs_become_generic_errors_and_are_logged(caplog):
    def buggy(ctx):
        return {}["missing"]

    dispatcher = Dispatcher(SCHEMA, {"guest-get-time": buggy}, Context(None, FakeState()))
    with caplog.at_level(logging.ERROR, logger="qga.dispatch"):
        reply = dispatcher.dispatch({"execute": "guest-get-time", "id": 1})
    assert reply == error("internal error in guest-get-time: KeyError", id=1)
    assert "Traceback" in caplog.text and "KeyError" in caplog.text
    # The dispatcher still works afterwards.
    assert dispatcher.dispatch({"execute": "guest-get-time", "id": 2})["id"] == 2


def test_handlers_for_commands_outside_the_schema_are_ignored(caplog):
    @command("guest-made-up")
    def made_up(ctx):
        return 1

    with caplog.at_level(logging.WARNING, logger="qga.dispatch"):
        dispatcher = Dispatcher(SCHEMA, {"guest-made-up": made_up}, Context(None, None))
    assert "guest-made-up" in caplog.text
    assert dispatcher.dispatch({"execute": "guest-made-up"})["error"]["class"] == "CommandNotFound"


# -- policy -------------------------------------------------------------------------------

def test_blocked_commands():
    dispatcher, recorder, _ = make(policy=Policy(blocked=["guest-get-time", "guest-info", "no-such-command"]))
    assert dispatcher.dispatch({"execute": "guest-get-time"}) == error(
        "Command guest-get-time has been disabled", "CommandNotFound")
    assert dispatcher.dispatch({"execute": "guest-info", "id": 1}) == error(
        "Command guest-info has been disabled", "CommandNotFound", id=1)
    assert recorder.calls == []
    assert dispatcher.is_enabled("guest-ping") and not dispatcher.is_enabled("guest-get-time")


def test_allow_list_enables_only_listed_commands():
    dispatcher, _, _ = make(policy=Policy(allowed=["guest-ping", "guest-get-time"]))
    assert dispatcher.dispatch({"execute": "guest-get-time"}) == {"return": 123}
    for name in ("guest-sync", "guest-info", "guest-file-open"):
        assert dispatcher.dispatch({"execute": name}) == error(
            f"Command {name} has been disabled: the command is not allowed", "CommandNotFound")
    # Unknown stays unknown; disabled is decided before the arguments are looked at.
    assert dispatcher.dispatch({"execute": "nope"})["error"]["desc"] == "The command nope has not been found"
    assert dispatcher.dispatch({"execute": "guest-sync", "arguments": {"bad": 1}})["error"]["class"] == "CommandNotFound"


def test_blocked_wins_over_allowed():
    dispatcher, _, _ = make(policy=Policy(blocked=["guest-get-time"], allowed=["guest-get-time"]))
    assert dispatcher.dispatch({"execute": "guest-get-time"})["error"]["desc"] == \
        "Command guest-get-time has been disabled"


def test_policy_from_config():
    class Config:
        block_rpcs = ["guest-ping"]
        allow_rpcs = None

    policy = Policy.from_config(Config())
    assert policy.blocked == {"guest-ping"} and policy.allowed is None


# -- frozen state --------------------------------------------------------------------------

def test_only_six_commands_run_while_frozen():
    dispatcher, recorder, ctx = make(frozen=True)
    assert FROZEN_SAFE_COMMANDS == {"guest-ping", "guest-info", "guest-sync", "guest-sync-delimited",
                                    "guest-fsfreeze-status", "guest-fsfreeze-thaw"}
    assert dispatcher.dispatch({"execute": "guest-ping"}) == {"return": {}}
    assert dispatcher.dispatch({"execute": "guest-fsfreeze-thaw"}) == {"return": 0}
    assert dispatcher.dispatch({"execute": "guest-file-open", "arguments": {}, "id": 4}) == error(
        "Command guest-file-open has been disabled: the agent is in frozen state", "CommandNotFound", id=4)
    assert recorder.calls == [("guest-fsfreeze-thaw", {})]
    infos = {info["name"]: info["enabled"] for info in dispatcher.command_infos()}
    assert infos["guest-file-open"] is False and infos["guest-fsfreeze-thaw"] is True
    ctx.state.frozen = False
    assert dispatcher.dispatch({"execute": "guest-file-open", "arguments": {"path": "/x"}}) == {"return": 1000}


def test_frozen_reason_wins_but_blocked_safe_commands_stay_blocked():
    dispatcher, _, _ = make(policy=Policy(blocked=["guest-get-time", "guest-fsfreeze-status"]), frozen=True)
    assert dispatcher.dispatch({"execute": "guest-get-time"})["error"]["desc"] == \
        "Command guest-get-time has been disabled: the agent is in frozen state"
    assert dispatcher.dispatch({"execute": "guest-fsfreeze-status"})["error"]["desc"] == \
        "Command guest-fsfreeze-status has been disabled"


def test_ping_does_not_ask_for_the_frozen_state():
    dispatcher, _, ctx = make(frozen=True)
    dispatcher.dispatch({"execute": "guest-ping"})
    dispatcher.dispatch({"execute": "guest-sync", "arguments": {"id": 1}})
    assert ctx.state.calls == 0


# -- guest-info -----------------------------------------------------------------------------

def test_guest_info_lists_every_registered_command_in_qemu_order():
    dispatcher, _, _ = make()
    reply = dispatcher.dispatch({"execute": "guest-info"})
    validate_return(SCHEMA, "guest-info", reply["return"])
    info = reply["return"]
    assert info["version"] == QEMU_GA_VERSION
    names = [entry["name"] for entry in info["supported_commands"]]
    assert names == list(reversed(SCHEMA.command_names()))
    silent = {entry["name"] for entry in info["supported_commands"] if not entry["success-response"]}
    assert silent == {"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"}


def test_dispatcher_registers_itself_on_the_context():
    ctx = Context(None, None)
    dispatcher = Dispatcher(SCHEMA, {}, ctx)
    assert ctx.dispatcher is dispatcher


def test_ping_writes_qemu_gas_audit_line(caplog):
    dispatcher, _, _ = make()
    with caplog.at_level(logging.INFO, logger="qga.audit"):
        dispatcher.dispatch({"execute": "guest-ping"})
        dispatcher.dispatch({"execute": "guest-sync", "arguments": {"id": 1}})
    assert [record.getMessage() for record in caplog.records if record.name == "qga.audit"] == ["guest-ping called"]
