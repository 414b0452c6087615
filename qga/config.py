"""The agent's configuration: qemu-ga's key file and defaults, plus our own keys.

The configuration is read exactly as qemu-ga reads it, so an existing
``qemu-ga.conf`` means the same thing to both agents:

* The file is ``$QGA_CONF`` if that is set, else ``/etc/qemu/qemu-ga.conf``;
  ``-c PATH`` names another one (qemu-ga 9.1+), which then must exist.  A
  missing default file is ignored; any other failure (unreadable, not a
  regular file, a syntax error, a bad boolean) is fatal.
* It is a GLib key file read with GLib's rules (:class:`KeyFile`): ``#``
  comments, ``[group]`` lines, ``key = value`` with blanks around ``=``
  ignored and trailing blanks kept, the escapes ``\\s \\n \\t \\r \\\\``,
  values that must be UTF-8, booleans ``true``/``false``/``1``/``0``.
* The file is read first, the command line second: options given there
  replace scalar values, while the RPC lists accumulate (file items first).
* Lists are split on commas, even in the file.  GLib's own list syntax
  (``block-rpcs=guest-ping;guest-info``) is one odd name and blocks nothing,
  as in qemu-ga.  qemu-ga keeps the items of one list in reverse order (it
  prepends them); we keep that order so ``-D`` prints what qemu-ga prints.

Keys of group ``[general]`` (qemu-ga's):

``daemon``          boolean: become a daemon (``-d``).  (qemu-ga's sample
                    config says ``daemonize``; qemu-ga ignores that key, so
                    do we.)
``method``          ``virtio-serial`` (default), ``isa-serial``,
                    ``unix-listen`` or ``vsock-listen`` (``-m``)
``path``            device or socket path; ``<cid>:<port>`` for vsock.
                    Defaults: virtio-serial ``/dev/virtio-ports/org.qemu.guest_agent.0``,
                    isa-serial ``/dev/ttyS0``; the listening methods need one (``-p``)
``logfile``         log file (appended to); default stderr (``-l``)
``pidfile``         default ``/var/run/qemu-ga.pid``; written only by a daemon (``-f``)
``fsfreeze-hook``   freeze/thaw hook; absent = no hook (``-F``)
``statedir``        state directory, default ``/var/run`` (``-t``)
``verbose``         boolean: log everything; ``false`` does not undo ``-v`` (``-v``)
``retry-path``      boolean: retry opening the channel every 5 s (``-r``)
``block-rpcs``      comma list of commands to disable (``-b``)
``allow-rpcs``      comma list of the only commands to enable (``-a``)
``blacklist``       qemu-ga 7.2's deprecated name of ``block-rpcs``; when
                    present it is used *instead of* ``block-rpcs``, with a warning

When both an allow list and a block list are given the agent follows
qemu-ga 9.1 and later: only allowed commands are enabled, and a command on
both lists is blocked.

Keys of group ``[qga]`` (our own; qemu-ga ignores groups it does not know):

``file-allow-dirs``           comma list of absolute directories; when not
                              empty, ``guest-file-open`` may open only files
                              inside them (``--file-allow-dirs``)
``exec-allow-programs``       comma list of programs; when not empty,
                              ``guest-exec`` may run only those
                              (``--exec-allow-programs``)
``fsfreeze-max-frozen-time``  seconds after which the agent thaws frozen
                              filesystems by itself; 0 = never (default)
                              (``--fsfreeze-max-frozen-time``)
``allow-unsigned-extensions`` boolean: accept extension bundles without a
                              signature (default false: signatures required;
                              see :mod:`qga.ext.verify`); ``-D`` prints it
                              only when true (``--allow-unsigned-extensions``)
``runtime-dir``               where extensions' sockets and runtime files live,
                              default ``/run/qga`` (``--runtime-dir``)
``trust-dirs``                comma list of the directories of keys trusted to
                              sign extensions; empty: ``/etc/qga/trust.d`` then
                              ``/usr/lib/qga/trust.d`` (``--trust-dirs``)
``virtio-ports-dir``          where channel-mode extensions look for their
                              virtio-serial ports, default ``/dev/virtio-ports``
                              (``--virtio-ports-dir``)

``-D`` prints the last three only when they are not the defaults.

Our lists accumulate like qemu-ga's, but keep their order and drop empty items.
"""

from __future__ import annotations

import math
import os
import stat
from typing import Callable, Dict, List, Optional

from qga.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/qemu/qemu-ga.conf"
CONFIG_ENV = "QGA_CONF"

METHODS = ("virtio-serial", "isa-serial", "unix-listen", "vsock-listen")
DEFAULT_METHOD = "virtio-serial"
DEFAULT_VIRTIO_PATH = "/dev/virtio-ports/org.qemu.guest_agent.0"
DEFAULT_SERIAL_PATH = "/dev/ttyS0"
DEFAULT_PIDFILE = "/var/run/qemu-ga.pid"
DEFAULT_STATEDIR = "/var/run"
DEFAULT_FSFREEZE_HOOK = "/etc/qemu/fsfreeze-hook"
DEFAULT_RUNTIME_DIR = "/run/qga"
DEFAULT_VIRTIO_PORTS_DIR = "/dev/virtio-ports"

GENERAL = "general"
OURS = "qga"

# GLib's g_ascii_isspace().
_ASCII_SPACE = b" \t\n\v\f\r"


class Config:
    """Everything the command line and the key file decide.

    ``Config()`` holds qemu-ga's defaults; keyword arguments override them.
    ``path`` stays ``None`` until :meth:`resolve_path` picks the method's
    default device.  ``allow_rpcs`` is ``None`` when no allow list was given
    (an empty list given is no list, as in qemu-ga).  ``listen_fd`` is the
    socket inherited from systemd, if any.  ``config_path`` is the key file
    that was read (or looked for).

    A plain class rather than a dataclass: ``dataclasses`` imports
    ``inspect``, which costs more than the rest of ``qga -V``.
    """

    # The settings, in the order repr() shows them.
    SETTINGS = (
        "method", "path", "logfile", "pidfile", "fsfreeze_hook", "statedir",
        "verbose", "daemonize", "retry_path", "block_rpcs", "allow_rpcs",
        "file_allow_dirs", "exec_allow_programs", "fsfreeze_max_frozen_time",
        "allow_unsigned_extensions", "runtime_dir", "trust_dirs", "virtio_ports_dir",
        "listen_fd", "config_path",
    )

    def __init__(self, **values: object) -> None:
        self.method: str = DEFAULT_METHOD
        self.path: Optional[str] = None
        self.logfile: Optional[str] = None
        self.pidfile: str = DEFAULT_PIDFILE
        self.fsfreeze_hook: Optional[str] = None
        self.statedir: str = DEFAULT_STATEDIR
        self.verbose: bool = False
        self.daemonize: bool = False
        self.retry_path: bool = False
        self.block_rpcs: List[str] = []
        self.allow_rpcs: Optional[List[str]] = None
        self.file_allow_dirs: List[str] = []
        self.exec_allow_programs: List[str] = []
        self.fsfreeze_max_frozen_time: float = 0
        self.allow_unsigned_extensions: bool = False
        self.runtime_dir: str = DEFAULT_RUNTIME_DIR
        self.trust_dirs: List[str] = []  # empty: qga.ext.trust.DEFAULT_TRUST_DIRS
        self.virtio_ports_dir: str = DEFAULT_VIRTIO_PORTS_DIR
        self.listen_fd: Optional[int] = None
        self.config_path: Optional[str] = None
        for name, value in values.items():
            if name not in self.SETTINGS:
                raise TypeError(f"Config has no setting {name!r}")
            setattr(self, name, value)

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.SETTINGS)
        return f"Config({settings})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.SETTINGS)

    # -- lists, the way qemu-ga builds them ------------------------------------

    def add_block_rpcs(self, text: str) -> None:
        self.block_rpcs.extend(split_rpc_list(text))

    def add_allow_rpcs(self, text: str) -> None:
        items = split_rpc_list(text)
        if items:
            self.allow_rpcs = (self.allow_rpcs or []) + items

    def add_file_allow_dirs(self, text: str) -> None:
        for item in split_our_list(text):
            if not item.startswith("/"):
                raise ConfigError(f"file-allow-dirs: '{item}' is not an absolute path")
            self.file_allow_dirs.append(item)

    def add_exec_allow_programs(self, text: str) -> None:
        self.exec_allow_programs.extend(split_our_list(text))

    def set_max_frozen_time(self, text: str) -> None:
        self.fsfreeze_max_frozen_time = parse_seconds(text)

    def set_runtime_dir(self, text: str) -> None:
        self.runtime_dir = _absolute_path(text, "runtime-dir")

    def add_trust_dirs(self, text: str) -> None:
        self.trust_dirs.extend(_absolute_path(item, "trust-dirs")
                               for item in split_our_list(text))

    def set_virtio_ports_dir(self, text: str) -> None:
        self.virtio_ports_dir = _absolute_path(text, "virtio-ports-dir")

    # -- after parsing ---------------------------------------------------------

    def resolve_path(self) -> None:
        """Give the serial methods their default device, as qemu-ga's main() does."""
        if self.path is not None or self.listen_fd is not None:
            return
        if self.method == "virtio-serial":
            self.path = DEFAULT_VIRTIO_PATH
        elif self.method == "isa-serial":
            self.path = DEFAULT_SERIAL_PATH
        else:
            raise ConfigError("must specify a path for this channel")


def split_rpc_list(text: str) -> List[str]:
    """Split like qemu-ga's split_list(): g_strsplit on ',' then prepend each item.

    So ``"a,b"`` gives ``["b", "a"]``, ``""`` gives ``[]`` and ``","`` gives
    two empty names.
    """
    if text == "":
        return []
    return list(reversed(text.split(",")))


def split_our_list(text: str) -> List[str]:
    return [item for item in text.split(",") if item]


def _absolute_path(text: str, key: str) -> str:
    if not text.startswith("/"):
        raise ConfigError(f"{key}: '{text}' is not an absolute path")
    return text


def parse_seconds(text: str) -> float:
    """A non-negative, finite number of seconds; integral values stay ints."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"'{text}' is not a number of seconds") from None
    if value < 0 or not math.isfinite(value):
        raise ConfigError(f"'{text}' is not a number of seconds")
    return int(value) if value.is_integer() else value


# -- the GLib key file ----------------------------------------------------------


class KeyFileError(ConfigError):
    """A key file GLib would refuse; the message is GLib's."""


class KeyFile:
    """The subset of GLib's GKeyFile that qemu-ga's configuration uses.

    Parsing follows g_key_file_load_from_data(): the first bad line stops it
    with GLib's message.  Keys keep their raw (escaped) values; the getters
    decode them the way g_key_file_get_string()/get_boolean() do.  Locale
    variants (``key[de]``) are kept as distinct keys, so they never match.
    """

    def __init__(self) -> None:
        self._groups: Dict[str, Dict[str, bytes]] = {}

    @classmethod
    def load(cls, path: str) -> "KeyFile":
        """Read ``path``; :class:`FileNotFoundError` if missing, KeyFileError otherwise."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as error:
            raise KeyFileError(os.strerror(error.errno)) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise KeyFileError("Not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as stream:
                data = stream.read()
        except OSError as error:
            raise KeyFileError(os.strerror(error.errno)) from None
        finally:
            os.close(fd)
        return cls.parse(data)

    @classmethod
    def parse(cls, data: bytes) -> "KeyFile":
        keyfile = cls()
        group: Optional[Dict[str, bytes]] = None
        for raw_line in data.split(b"\n"):
            line = raw_line.split(b"\0", 1)[0]  # GLib parses C strings
            if line.endswith(b"\r"):
                line = line[:-1]
            line = line.lstrip(_ASCII_SPACE)
            if not line or line.startswith(b"#"):
                continue
            if _is_group_line(line):
                name = line[1:line.index(b"]")]
                if not _is_group_name(name):
                    raise KeyFileError("Invalid group name: " + _text(name))
                group = keyfile._groups.setdefault(_text(name), {})
                continue
            equals = line.find(b"=")
            if equals <= 0:
                raise KeyFileError(
                    "Key file contains line \u201c" + _text(line)
                    + "\u201d which is not a key-value pair, group, or comment")
            key = line[:equals].rstrip(_ASCII_SPACE)
            value = line[equals + 1:].lstrip(_ASCII_SPACE)
            if group is None:
                raise KeyFileError("Key file does not start with a group")
            if not _is_key_name(key):
                raise KeyFileError("Invalid key name: " + _text(key))
            group[_text(key)] = value
        return keyfile

    def has_key(self, group: str, key: str) -> bool:
        return key in self._groups.get(group, {})

    def get_string(self, group: str, key: str) -> str:
        raw = self._groups[group][key]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyFileError(
                f"Key file contains key \u201c{key}\u201d with value \u201c"
                + _text(raw) + "\u201d which is not UTF-8") from None
        try:
            return unescape_value(text)
        except ValueError:
            raise KeyFileError(_uninterpretable(key)) from None

    def get_boolean(self, group: str, key: str) -> bool:
        # g_key_file_parse_value_as_boolean(): the raw value, trailing blanks
        # ignored, exactly one of four spellings.
        word = self._groups[group][key].rstrip(_ASCII_SPACE)
        if word in (b"true", b"1"):
            return True
        if word in (b"false", b"0"):
            return False
        raise KeyFileError(_uninterpretable(key))


def _uninterpretable(key: str) -> str:
    return f"Key file contains key \u201c{key}\u201d which has a value that cannot be interpreted."


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _is_group_line(line: bytes) -> bool:
    # g_key_file_line_is_group(): "[" ... first "]", then only blanks.
    if not line.startswith(b"["):
        return False
    close = line.find(b"]")
    return close > 0 and line[close + 1:].strip(b" \t") == b""


def _is_group_name(name: bytes) -> bool:
    return bool(name) and not any(c in b"[]" or c < 0x20 or c == 0x7F for c in name)


def _is_key_name(key: bytes) -> bool:
    # g_key_file_is_key_name(): no '=', '[' or ']' except one trailing
    # "[locale]" made of alphanumerics and "-_.@".
    bracket = key.find(b"[")
    base, locale = (key, None) if bracket < 0 else (key[:bracket], key[bracket:])
    if not base or b"]" in base or b"=" in base:
        return False
    if locale is None:
        return True
    inner = locale[1:-1] if locale.endswith(b"]") and len(locale) > 1 else None
    return inner is not None and all(chr(c).isalnum() or c in b"-_.@" for c in inner)


_UNESCAPES = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape_value(text: str) -> str:
    """g_key_file_parse_value_as_string(); ValueError on a bad escape."""
    if "\\" not in text:
        return text
    out = []
    chars = iter(text)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        escaped = next(chars, None)
        if escaped is None or escaped not in _UNESCAPES:
            raise ValueError(escaped)
        out.append(_UNESCAPES[escaped])
    return "".join(out)


def escape_value(text: str) -> str:
    """g_key_file_set_string()'s escaping: leading blanks, newlines, CR, backslash."""
    out = []
    leading = True
    for char in text:
        if leading and char == " ":
            out.append("\\s")
        elif leading and char == "\t":
            out.append("\\t")
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\\":
            out.append("\\\\")
        else:
            leading = False
            out.append(char)
    return "".join(out)


# -- loading --------------------------------------------------------------------


def config_file_path(environ: Optional[Dict[str, str]] = None) -> str:
    """The key file qemu-ga reads when no ``-c`` is given."""
    env = os.environ if environ is None else environ
    return env.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_file(config: Config, path: str, required: bool = False,
              warn: Callable[[str], None] = lambda message: None) -> None:
    """Apply the key file at ``path`` to ``config``, as qemu-ga's config_load().

    Raises :class:`ConfigError` with qemu-ga's message.  Like qemu-ga, every
    key is read even after a bad one, and the first error is the one reported.
    """
    config.config_path = path
    try:
        keyfile = KeyFile.load(path)
    except FileNotFoundError:
        if required:
            _fail(path, os.strerror(2))
        return
    except KeyFileError as error:
        _fail(path, str(error))
    errors: List[str] = []

    def read(group: str, key: str, getter: Callable[[str, str], object],
             apply: Callable[[object], None]) -> None:
        if not keyfile.has_key(group, key):
            return
        try:
            value = getter(group, key)
        except KeyFileError as error:
            errors.append(str(error))
            return
        apply(value)

    def assign(name: str) -> Callable[[object], None]:
        return lambda value: setattr(config, name, value)

    read(GENERAL, "daemon", keyfile.get_boolean, assign("daemonize"))
    read(GENERAL, "method", keyfile.get_string, assign("method"))
    read(GENERAL, "path", keyfile.get_string, assign("path"))
    read(GENERAL, "logfile", keyfile.get_string, assign("logfile"))
    read(GENERAL, "pidfile", keyfile.get_string, assign("pidfile"))
    read(GENERAL, "fsfreeze-hook", keyfile.get_string, assign("fsfreeze_hook"))
    read(GENERAL, "statedir", keyfile.get_string, assign("statedir"))
    # verbose=false never turns verbosity off, it just does not turn it on.
    read(GENERAL, "verbose", keyfile.get_boolean,
         lambda value: setattr(config, "verbose", True) if value else None)
    read(GENERAL, "retry-path", keyfile.get_boolean, assign("retry_path"))
    block_key = "block-rpcs"
    if keyfile.has_key(GENERAL, "blacklist"):
        warn("config using deprecated 'blacklist' key, should be replaced"
             " with the 'block-rpcs' key.")
        block_key = "blacklist"
    read(GENERAL, block_key, keyfile.get_string, lambda value: config.add_block_rpcs(value))
    read(GENERAL, "allow-rpcs", keyfile.get_string, lambda value: config.add_allow_rpcs(value))

    read(OURS, "file-allow-dirs", keyfile.get_string,
         _checked(config.add_file_allow_dirs, "file-allow-dirs", errors))
    read(OURS, "exec-allow-programs", keyfile.get_string,
         lambda value: config.add_exec_allow_programs(value))
    read(OURS, "fsfreeze-max-frozen-time", keyfile.get_string,
         _checked(config.set_max_frozen_time, "fsfreeze-max-frozen-time", errors))
    read(OURS, "allow-unsigned-extensions", keyfile.get_boolean,
         assign("allow_unsigned_extensions"))
    read(OURS, "runtime-dir", keyfile.get_string,
         _checked(config.set_runtime_dir, "runtime-dir", errors))
    read(OURS, "trust-dirs", keyfile.get_string,
         _checked(config.add_trust_dirs, "trust-dirs", errors))
    read(OURS, "virtio-ports-dir", keyfile.get_string,
         _checked(config.set_virtio_ports_dir, "virtio-ports-dir", errors))
    if errors:
        _fail(path, errors[0])


def _checked(apply: Callable[[str], None], key: str,
             errors: List[str]) -> Callable[[object], None]:
    """Report a value our own keys refuse the way GLib reports a bad value."""

    def run(value: object) -> None:
        try:
            apply(str(value))
        except ConfigError:
            errors.append(_uninterpretable(key))

    return run


def _fail(path: str, message: str) -> None:
    raise ConfigError(f"error loading configuration from path: {path}, {message}")


# -- dumping (-D) -----------------------------------------------------------------


def dump(config: Config) -> bytes:
    """The key file ``-D`` prints: qemu-ga's ``[general]`` layout, then ``[qga]``.

    Keys appear in qemu-ga's order; ``path``, ``logfile`` and
    ``fsfreeze-hook`` only when set.  ``allow-rpcs`` is printed as qemu-ga
    8.1+ prints it.
    """
    general = [("daemon", _boolean(config.daemonize)), ("method", config.method)]
    if config.path is not None:
        general.append(("path", config.path))
    if config.logfile is not None:
        general.append(("logfile", config.logfile))
    general.append(("pidfile", config.pidfile))
    if config.fsfreeze_hook is not None:
        general.append(("fsfreeze-hook", config.fsfreeze_hook))
    general += [
        ("statedir", config.statedir),
        ("verbose", _boolean(config.verbose)),
        ("retry-path", _boolean(config.retry_path)),
        ("block-rpcs", ",".join(config.block_rpcs)),
        ("allow-rpcs", ",".join(config.allow_rpcs or [])),
    ]
    ours = [
        ("file-allow-dirs", ",".join(config.file_allow_dirs)),
        ("exec-allow-programs", ",".join(config.exec_allow_programs)),
        ("fsfreeze-max-frozen-time", str(config.fsfreeze_max_frozen_time)),
    ]
    if config.allow_unsigned_extensions:
        ours.append(("allow-unsigned-extensions", "true"))
    if config.runtime_dir != DEFAULT_RUNTIME_DIR:
        ours.append(("runtime-dir", config.runtime_dir))
    if config.trust_dirs:
        ours.append(("trust-dirs", ",".join(config.trust_dirs)))
    if config.virtio_ports_dir != DEFAULT_VIRTIO_PORTS_DIR:
        ours.append(("virtio-ports-dir", config.virtio_ports_dir))
    text = _group(GENERAL, general) + "\n" + _group(OURS, ours)
    return text.encode("utf-8", "surrogateescape")


def _group(name: str, items: List[tuple]) -> str:
    lines = [f"[{name}]"] + [f"{key}={escape_value(value)}" for key, value in items]
    return "\n".join(lines) + "\n"


def _boolean(value: bool) -> str:
    return "true" if value else "false"
