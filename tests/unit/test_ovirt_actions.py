"""Actions: primitives asked of the core, single sign-on handed to sso.py, outcomes kept."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extensions" / "ovirt_sso"))

from ovirt_agent import actions, config  # noqa: E402
from qga.ext import sdk  # noqa: E402
from qga.ext.manifest import CAPABILITIES  # noqa: E402


class Extension:
    """What Actions needs of the SDK's Extension: primitive() answering at once."""

    def __init__(self, errors=None):
        self.loop = sdk.Loop()
        self.asked = []
        self.errors = errors or {}

    def primitive(self, name, arguments, callback):
        self.asked.append((name, arguments))
        error = self.errors.get(name)
        callback(None if error else {}, error)


class SsoModule:
    def __init__(self):
        self.logins = []
        self.started = []

    def handle_login(self, credentials, context):
        self.logins.append((credentials, context))

    def start(self, context):
        self.started.append(context)


def make(settings=None, errors=None, sso=None):
    extension = Extension(errors)

    def loader():
        if sso is None:
            raise ImportError("no sso here")
        return sso

    return actions.Actions(config.Config(settings or {}), extension.loop, extension,
                           sso_loader=loader), extension


def test_power_and_session_primitives():
    acts, extension = make(errors={"suspend": "not supported here"})
    acts.shutdown(3, 'say "hi"', reboot=False)
    acts.shutdown(5000, "x" * 2000, reboot=True)
    acts.hibernate("disk")
    acts.lock_screen()
    acts.log_off()
    done = []
    acts.drop_caches(lambda: done.append(True))
    assert extension.asked == [
        ("shutdown", {"mode": "powerdown", "delay": 3, "message": '"say "hi""'}),
        ("shutdown", {"mode": "reboot", "delay": 1440, "message": ('"' + "x" * 2000)[:1024]}),
        ("suspend", {"state": "disk"}), ("lock-sessions", {}), ("log-off", {}),
        ("drop-caches", {})]
    assert done == [True]
    assert ("suspend", "not supported here") in acts.outcomes
    assert {actions.PRIMITIVES[name] for name, _ in extension.asked} <= set(CAPABILITIES)
    extension.loop.close()


def test_lifecycle_runs_the_built_in_flush_through_the_core(tmp_path):
    acts, extension = make({"hooks_dir": str(tmp_path)})
    finished = []
    acts.lifecycle("before_hibernation", lambda: finished.append("before"))
    acts.lifecycle("after_hibernation", lambda: finished.append("after"))
    assert extension.loop.run_until(lambda: len(finished) == 2, 5)
    assert extension.asked == [("drop-caches", {})]
    no_flush, other = make({"hooks_dir": str(tmp_path), "flush_caches": False})
    no_flush.lifecycle("before_migration", lambda: finished.append("again"))
    assert other.loop.run_until(lambda: "again" in finished, 5) and other.asked == []
    extension.loop.close()
    other.loop.close()


def test_login_goes_to_sso_with_the_extension_as_context():
    sso = SsoModule()
    acts, extension = make(sso=sso)
    acts.start_sso()
    acts.login({"username": "alice@example.com", "password": "secret"})
    assert sso.started == [extension]
    assert sso.logins == [({"username": "alice@example.com", "password": "secret"},
                           extension)]
    extension.loop.close()


def test_login_without_sso_is_ignored(caplog):
    acts, extension = make(sso=None)
    acts.start_sso()
    acts.login({"username": "alice", "password": "secret"})
    assert "single sign-on is not part of this bundle" in caplog.text
    assert "secret" not in caplog.text
    extension.loop.close()


def test_without_a_core_connection_nothing_runs():
    loop = sdk.Loop()
    acts = actions.Actions(config.Config({}), loop, None, sso_loader=SsoModule)
    acts.lock_screen()
    done = []
    acts.drop_caches(lambda: done.append(True))
    assert acts.outcomes == [("lock-sessions", "no core connection"),
                             ("drop-caches", "no core connection")] and done == [True]
    loop.close()
