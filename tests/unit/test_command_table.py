"""The command table agrees with the handlers and with the schema."""

from qga.commands import COMMAND_MODULES, DeferredHandler, collect_handlers, module_handlers
from qga.schema import Schema


def test_table_lists_exactly_each_modules_handlers():
    for module_name, names in COMMAND_MODULES.items():
        assert sorted(module_handlers(module_name)) == sorted(names), module_name


def test_every_registered_command_has_a_handler_and_no_more():
    registered = set(Schema.load().command_names())
    implemented = [name for names in COMMAND_MODULES.values() for name in names]
    assert len(implemented) == len(set(implemented)), "a command in two modules"
    assert set(implemented) == registered


def test_handlers_are_deferred_until_loaded():
    handlers = collect_handlers()
    deferred = handlers["guest-get-osinfo"]
    assert isinstance(deferred, DeferredHandler)
    real = deferred.load()
    assert real.qapi_command == "guest-get-osinfo"


def test_eager_table_has_the_real_functions():
    handlers = collect_handlers(lazy=False)
    assert not any(isinstance(h, DeferredHandler) for h in handlers.values())
    assert set(handlers) == set(collect_handlers())
