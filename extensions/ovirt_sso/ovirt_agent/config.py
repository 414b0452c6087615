"""The agent's settings: the original ``ovirt-guest-agent.conf`` keys and defaults, and ours.

Where they come from, later wins:

1. :data:`DEFAULTS` (the original's ``default.conf``, and ours);
2. the extension's settings object (the manifest's ``settings.defaults``
   overlaid by the guest admin's override file, handed over by the core);
3. the original agent's INI file (``config_file``, default
   ``/etc/ovirt-guest-agent.conf``) if it exists: its ``[general]`` keys, so
   a guest that ran the original agent keeps its tuning.

Space-separated lists (``applications_list``, ``ignored_fs``,
``ignored_nics``) may be given as one string, as in the original, or as a
JSON list of strings.  ``ignore_zero_size_fs`` is a real boolean here: the
original read it with ``get()``, so ``false`` meant true; nothing on the host
depends on that.
"""

from __future__ import annotations

import configparser
from typing import Any, Dict, Mapping, Optional, Tuple

#: The original's defaults (configurations/default.conf) and our own keys.
DEFAULTS: Dict[str, Any] = {
    # -- the original's [general] keys --
    "heart_beat_rate": 5,
    "report_user_rate": 10,
    "report_num_cpu_rate": 60,
    "report_application_rate": 120,
    "report_disk_usage": 300,
    "applications_list": (
        "kernel ovirt-guest-agent ovirt-guest-agent-common xorg-x11-drv-qxl linux-image"
        " xserver-xorg-video-qxl xf86-video-qxl kernel-desktop kernel-default kernel-trace"
        " kernel-vanilla kernel-debug kernel-ec2 kernel-xen kernel-ppc64 cloud-init"),
    "ignored_fs": (
        "autofs binfmt_misc cgroup cgroup2 configfs debugfs devpts devtmpfs fusectl"
        " fuse.gvfsd-fuse fuse.gvfs-fuse-daemon hugetlbfs mqueue nfsd proc pstore rootfs"
        " rpc_pipefs securityfs selinuxfs sysfs tmpfs tracefs udev usbfs"),
    "ignore_zero_size_fs": True,
    "ignored_nics": "docker0",
    # -- ours --
    # The original agent's configuration file, read if it exists ("" = never).
    "config_file": "/etc/ovirt-guest-agent.conf",
    # Lifecycle hooks: <hooks_dir>/<event type>/<executables>, as the original.
    "hooks_dir": "/etc/ovirt-guest-agent/hooks.d",
    # Seconds one hook may run before it is killed.
    "hook_timeout": 30,
    # Drop the page cache before a migration or hibernation (the original
    # shipped this as the 55_flush-caches hook; it needs the core's help).
    "flush_caches": True,
    # Report session logon/logoff/lock/unlock from systemd-logind (Linux).
    "session_events": True,
    # How power and session actions run: "core" (primitives the core serves
    # for this unprivileged process) or "direct" (run the commands ourselves:
    # an agent running as root outside qga, or commands wrapped with sudo).
    "privileged_actions": "core",
    # The Docker API socket for the containers message (v3).
    "docker_socket": "/var/run/docker.sock",
    # Seconds per scheduler tick (the original's loop sleeps 1 s; tests go faster).
    "tick_interval": 1.0,
    # The lowest level of the lines sent to the agent's log.
    "log_level": "info",
}

_RATES = ("heart_beat_rate", "report_user_rate", "report_num_cpu_rate",
          "report_application_rate", "report_disk_usage")
_LISTS = ("applications_list", "ignored_fs", "ignored_nics")
_BOOLEANS = ("ignore_zero_size_fs", "flush_caches", "session_events")
_NUMBERS = ("hook_timeout", "tick_interval")
_TEXTS = ("config_file", "hooks_dir", "privileged_actions", "docker_socket", "log_level")


class ConfigProblem(ValueError):
    """A setting has a value the agent cannot use."""


class Config:
    """Typed settings; unknown keys are refused so a typo does not pass silently."""

    def __init__(self, values: Mapping[str, Any]):
        unknown = sorted(set(values) - set(DEFAULTS))
        if unknown:
            raise ConfigProblem(f"unknown settings: {', '.join(unknown)}")
        merged = dict(DEFAULTS, **values)
        self.rates: Dict[str, int] = {key: _positive_int(key, merged[key]) for key in _RATES}
        self.applications: Tuple[str, ...] = _words("applications_list",
                                                    merged["applications_list"])
        self.ignored_fs = frozenset(_words("ignored_fs", merged["ignored_fs"]))
        self.ignored_nics = frozenset(_words("ignored_nics", merged["ignored_nics"]))
        for key in _BOOLEANS:
            setattr(self, key, _boolean(key, merged[key]))
        for key in _NUMBERS:
            setattr(self, key, _positive_number(key, merged[key]))
        for key in _TEXTS:
            if not isinstance(merged[key], str):
                raise ConfigProblem(f"{key}: {merged[key]!r} is not a string")
            setattr(self, key, merged[key])
        if self.privileged_actions not in ("core", "direct"):
            raise ConfigProblem(f"privileged_actions: {self.privileged_actions!r} is not"
                                " 'core' or 'direct'")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigProblem(f"log_level: {self.log_level!r} is not debug, info, warning"
                                " or error")

    ignore_zero_size_fs: bool
    flush_caches: bool
    session_events: bool
    hook_timeout: float
    tick_interval: float
    config_file: str
    hooks_dir: str
    privileged_actions: str
    docker_socket: str
    log_level: str


def load(settings: Mapping[str, Any], ini_text: Optional[str] = None) -> Config:
    """The configuration from the extension's settings and the original's INI file.

    ``ini_text`` is the INI file's content when the caller read it already
    (tests); otherwise ``config_file`` is read if it exists.
    """
    values = dict(settings)
    path = values.get("config_file", DEFAULTS["config_file"])
    if ini_text is None and path:
        try:
            with open(path, encoding="utf-8", errors="replace") as stream:
                ini_text = stream.read(1 << 20)
        except FileNotFoundError:
            ini_text = None
        except OSError as error:
            raise ConfigProblem(f"{path}: {error.strerror}") from None
    if ini_text:
        values.update(ini_values(ini_text))
    return Config(values)


def ini_values(text: str) -> Dict[str, Any]:
    """The keys of the original's ``[general]`` section we know, as strings."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error as error:
        raise ConfigProblem(f"the original agent's configuration: {error}") from None
    if not parser.has_section("general"):
        return {}
    known = set(_RATES) | set(_LISTS) | {"ignore_zero_size_fs"}
    return {key: value for key, value in parser.items("general") if key in known}


def _positive_int(key: str, value: Any) -> int:
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1:
        raise ConfigProblem(f"{key}: {value!r} is not a positive whole number of seconds")
    return number


def _positive_number(key: str, value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not number > 0:
        raise ConfigProblem(f"{key}: {value!r} is not a positive number")
    return number


def _words(key: str, value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(word for item in value for word in item.split())
    raise ConfigProblem(f"{key}: {value!r} is neither a string nor a list of strings")


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigProblem(f"{key}: {value!r} is not a boolean")


def as_settings(config: Config) -> Dict[str, Any]:
    """The configuration back as a settings object (for logs and tests)."""
    result: Dict[str, Any] = dict(config.rates)
    result.update(applications_list=" ".join(config.applications),
                  ignored_fs=" ".join(sorted(config.ignored_fs)),
                  ignored_nics=" ".join(sorted(config.ignored_nics)))
    for key in _BOOLEANS + _NUMBERS + _TEXTS:
        result[key] = getattr(config, key)
    return result

