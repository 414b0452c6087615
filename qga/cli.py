"""The ``qga`` command line: qemu-ga's options, parsed the way qemu-ga parses them.

qemu-ga uses glibc's ``getopt_long()``; :func:`getopt_long` reproduces it, so
the same argument vectors mean the same things and fail with the same
messages: clustered short options (``-vd``), attached arguments
(``-bguest-ping``), ``-F`` whose optional argument must be attached,
unambiguous abbreviations of long options (``--meth=unix-listen``),
arguments that are not options skipped (``POSIXLY_CORRECT`` stops at the
first one), ``--`` ending the options, and glibc's error texts.

The order of events is qemu-ga's (9.1+):

1. a first, silent pass looks for ``-c PATH``;
2. the key file is loaded (``$QGA_CONF`` or ``/etc/qemu/qemu-ga.conf`` unless
   ``-c`` named one, which then must exist);
3. the second pass applies the options in order; ``-V``, ``-h``, ``-b help``
   and ``-a help`` print and exit at once, a bad option exits 1;
4. systemd socket activation is detected (exactly one inherited socket,
   whose family picks the method), else the channel path gets its default;
5. ``-D`` prints the configuration, otherwise the agent runs (after
   daemonizing with ``-d``).

Our own long options: ``--file-allow-dirs``, ``--exec-allow-programs``,
``--fsfreeze-max-frozen-time``, ``--allow-unsigned-extensions``,
``--runtime-dir``, ``--trust-dirs``, ``--virtio-ports-dir`` (see
:mod:`qga.config`).  They make some abbreviations qemu-ga accepts ambiguous
(``--f``, ``--fsfreeze``, ``--a``, ``--allow``, ``--r``); the full names are
unaffected.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import qga
from qga.config import (
    DEFAULT_CONFIG_PATH, DEFAULT_FSFREEZE_HOOK, DEFAULT_PIDFILE, DEFAULT_SERIAL_PATH,
    DEFAULT_STATEDIR, DEFAULT_VIRTIO_PATH, Config, config_file_path, load_file,
)
from qga.errors import ConfigError, QgaError

# qemu-ga's optstring; "s:" (Windows' --service) is accepted and ignored
# elsewhere, exactly as qemu-ga does on Linux.
SHORT_OPTIONS = "hVvdc:m:p:l:f:F::b:a:s:t:Dr"

NO_ARGUMENT, REQUIRED_ARGUMENT, OPTIONAL_ARGUMENT = 0, 1, 2

# Option codes of our own long options (no short form).
FILE_ALLOW_DIRS = "file-allow-dirs"
EXEC_ALLOW_PROGRAMS = "exec-allow-programs"
MAX_FROZEN_TIME = "fsfreeze-max-frozen-time"
ALLOW_UNSIGNED = "allow-unsigned-extensions"
RUNTIME_DIR = "runtime-dir"
TRUST_DIRS = "trust-dirs"
VIRTIO_PORTS_DIR = "virtio-ports-dir"

SOCKET_ACTIVATION_FD = 3


class LongOption(NamedTuple):
    name: str
    has_arg: int
    code: str


# qemu-ga's table, in its order (the order glibc lists ambiguous matches in).
LONG_OPTIONS = (
    LongOption("help", NO_ARGUMENT, "h"),
    LongOption("version", NO_ARGUMENT, "V"),
    LongOption("config", REQUIRED_ARGUMENT, "c"),
    LongOption("dump-conf", NO_ARGUMENT, "D"),
    LongOption("logfile", REQUIRED_ARGUMENT, "l"),
    LongOption("pidfile", REQUIRED_ARGUMENT, "f"),
    LongOption("fsfreeze-hook", OPTIONAL_ARGUMENT, "F"),
    LongOption("verbose", NO_ARGUMENT, "v"),
    LongOption("method", REQUIRED_ARGUMENT, "m"),
    LongOption("path", REQUIRED_ARGUMENT, "p"),
    LongOption("daemonize", NO_ARGUMENT, "d"),
    LongOption("block-rpcs", REQUIRED_ARGUMENT, "b"),
    LongOption("blacklist", REQUIRED_ARGUMENT, "b"),  # deprecated alias (7.2)
    LongOption("allow-rpcs", REQUIRED_ARGUMENT, "a"),
    LongOption("statedir", REQUIRED_ARGUMENT, "t"),
    LongOption("retry-path", NO_ARGUMENT, "r"),
    LongOption(FILE_ALLOW_DIRS, REQUIRED_ARGUMENT, FILE_ALLOW_DIRS),
    LongOption(EXEC_ALLOW_PROGRAMS, REQUIRED_ARGUMENT, EXEC_ALLOW_PROGRAMS),
    LongOption(MAX_FROZEN_TIME, REQUIRED_ARGUMENT, MAX_FROZEN_TIME),
    LongOption(ALLOW_UNSIGNED, NO_ARGUMENT, ALLOW_UNSIGNED),
    LongOption(RUNTIME_DIR, REQUIRED_ARGUMENT, RUNTIME_DIR),
    LongOption(TRUST_DIRS, REQUIRED_ARGUMENT, TRUST_DIRS),
    LongOption(VIRTIO_PORTS_DIR, REQUIRED_ARGUMENT, VIRTIO_PORTS_DIR),
)

ERROR = "?"  # the code getopt_long() returns for a bad option


# -- getopt_long ------------------------------------------------------------------


def getopt_long(args: Sequence[str], short: str = SHORT_OPTIONS,
                longopts: Sequence[LongOption] = LONG_OPTIONS,
                posixly_correct: Optional[bool] = None) -> Iterator[Tuple[str, Optional[str]]]:
    """Yield ``(code, argument)`` pairs as glibc's getopt_long() returns them.

    A bad option yields ``("?", message)`` with glibc's message (without the
    program name) and parsing goes on, as it does in C.
    """
    if posixly_correct is None:
        posixly_correct = "POSIXLY_CORRECT" in os.environ
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            return
        if arg.startswith("--"):
            result, index = _long_option(arg, args, index, longopts)
            yield result
        elif arg.startswith("-") and arg != "-":
            cluster = arg[1:]
            while cluster:
                result, cluster, index = _short_option(cluster, args, index, short)
                yield result
        elif posixly_correct:
            return
        # else: not an option; GNU getopt moves it aside and carries on


def _long_option(arg: str, args: Sequence[str], index: int,
                 longopts: Sequence[LongOption]) -> Tuple[Tuple[str, Optional[str]], int]:
    text = arg[2:]
    name, has_value, value = text.partition("=")
    found = next((option for option in longopts if option.name == name), None)
    if found is None:
        matches = [option for option in longopts if option.name.startswith(name)]
        if not matches:
            return (ERROR, f"unrecognized option '{arg}'"), index
        found = matches[0]
        ambiguous = [option for option in matches[1:]
                     if (option.has_arg, option.code) != (found.has_arg, found.code)]
        if ambiguous:
            names = "".join(f" '--{option.name}'" for option in [found] + ambiguous)
            return (ERROR, f"option '{arg}' is ambiguous; possibilities:{names}"), index
    if has_value:
        if found.has_arg == NO_ARGUMENT:
            return (ERROR, f"option '--{found.name}' doesn't allow an argument"), index
        return (found.code, value), index
    if found.has_arg == REQUIRED_ARGUMENT:
        if index >= len(args):
            return (ERROR, f"option '--{found.name}' requires an argument"), index
        return (found.code, args[index]), index + 1
    return (found.code, None), index


def _short_option(cluster: str, args: Sequence[str], index: int,
                  short: str) -> Tuple[Tuple[str, Optional[str]], str, int]:
    char, rest = cluster[0], cluster[1:]
    position = short.find(char)
    if position < 0 or char in ":;":
        return (ERROR, f"invalid option -- '{char}'"), rest, index
    colons = short[position + 1:position + 3]
    if not colons.startswith(":"):
        return (char, None), rest, index
    if colons == "::":  # optional argument: only if attached
        return (char, rest or None), "", index
    if rest:
        return (char, rest), "", index
    if index >= len(args):
        return (ERROR, f"option requires an argument -- '{char}'"), "", index
    return (char, args[index]), "", index + 1


# -- main -------------------------------------------------------------------------


class Exit(Exception):
    """Leave main() with ``status`` (what qemu-ga does with exit())."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run qga with ``argv`` (the arguments, without the program name)."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog or program_name()
    config = Config()
    try:
        dump_requested = parse(args, prog, config)
        finish(config)
        if dump_requested:
            from qga.config import dump

            sys.stdout.flush()
            sys.stdout.buffer.write(dump(config))
            sys.stdout.flush()
            return 0
        return run(config)
    except Exit as leave:
        return leave.status
    except ConfigError as error:
        critical(str(error))
        return 1


def program_name() -> str:
    """argv[0] as qemu-ga prints it; ``qga`` when started with ``python -m qga``."""
    name = sys.argv[0] if sys.argv and sys.argv[0] else "qga"
    return "qga" if os.path.basename(name) == "__main__.py" else name


def parse(args: List[str], prog: str, config: Config) -> bool:
    """Load the key file and apply the options; return True when -D was given."""
    config_path = config_file_path()
    required = False
    for code, value in getopt_long(args):
        if code == "c":
            config_path, required = value, True
    load_file(config, config_path, required, warn=lambda message: warning(message))

    dump_requested = False
    for code, value in getopt_long(args):
        if code == ERROR:
            sys.stderr.write(f"{prog}: {value}\n")
            sys.stderr.flush()
            print(f"Unknown option, try '{prog} --help' for more information.")
            raise Exit(1)
        if code == "D":
            dump_requested = True
        else:
            apply_option(code, value, prog, config)
    return dump_requested


def apply_option(code: str, value: Optional[str], prog: str, config: Config) -> None:
    """One option of the second pass, as qemu-ga's config_parse() applies it."""
    scalars = {"m": "method", "p": "path", "l": "logfile", "f": "pidfile", "t": "statedir"}
    if code in scalars:
        setattr(config, scalars[code], value)
    elif code == "F":
        config.fsfreeze_hook = DEFAULT_FSFREEZE_HOOK if value is None else value
    elif code == "v":
        config.verbose = True
    elif code == "d":
        config.daemonize = True
    elif code == "r":
        config.retry_path = True
    elif code == "V":
        print(f"QEMU Guest Agent {qga.QEMU_GA_VERSION}")
        raise Exit(0)
    elif code == "h":
        sys.stdout.write(usage(prog))
        raise Exit(0)
    elif code in ("b", "a"):
        if value in ("help", "?"):
            print_commands()
            raise Exit(0)
        if code == "b":
            config.add_block_rpcs(value)
        else:
            config.add_allow_rpcs(value)
    elif code == ALLOW_UNSIGNED:
        config.allow_unsigned_extensions = True
    elif code in (FILE_ALLOW_DIRS, EXEC_ALLOW_PROGRAMS, MAX_FROZEN_TIME, RUNTIME_DIR,
                  TRUST_DIRS, VIRTIO_PORTS_DIR):
        apply_our_option(code, value, prog, config)
    # "c" was handled by the first pass; "s" is Windows-only and ignored.


def apply_our_option(code: str, value: str, prog: str, config: Config) -> None:
    setters = {
        FILE_ALLOW_DIRS: config.add_file_allow_dirs,
        EXEC_ALLOW_PROGRAMS: config.add_exec_allow_programs,
        MAX_FROZEN_TIME: config.set_max_frozen_time,
        RUNTIME_DIR: config.set_runtime_dir,
        TRUST_DIRS: config.add_trust_dirs,
        VIRTIO_PORTS_DIR: config.set_virtio_ports_dir,
    }
    try:
        setters[code](value)
    except ConfigError as error:
        sys.stderr.write(f"{prog}: option '--{code}': {error}\n")
        raise Exit(1) from None


def print_commands() -> None:
    """``-b help``: every registered command, one per line, in schema order."""
    from qga.schema import Schema

    sys.stdout.write("".join(name + "\n" for name in Schema.load().command_names()))
    sys.stdout.flush()


def finish(config: Config) -> None:
    """What qemu-ga's main() does between parsing and running."""
    count = socket_activation_count()
    if count > 1:
        raise ConfigError("qemu-ga only supports listening on one socket")
    if count == 1:
        config.method = socket_activation_method(SOCKET_ACTIVATION_FD)
        config.path = None
        config.listen_fd = SOCKET_ACTIVATION_FD
    else:
        config.resolve_path()


def socket_activation_count(environ: Optional[dict] = None,
                            first_fd: int = SOCKET_ACTIVATION_FD) -> int:
    """systemd's LISTEN_PID/LISTEN_FDS, read and cleared as qemu's check_socket_activation()."""
    env = os.environ if environ is None else environ
    try:
        if int(env.get("LISTEN_PID", ""), 10) != os.getpid():
            return 0
        count = int(env.get("LISTEN_FDS", ""), 10)
    except ValueError:
        return 0
    # Not for the children we start (hooks, guest-exec).
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    for fd in range(first_fd, first_fd + max(count, 0)):
        try:
            os.set_inheritable(fd, False)
        except OSError:
            return 0  # not an open fd: socket activation failed
    return max(count, 0)


def socket_activation_method(fd: int) -> str:
    import socket

    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        raise ConfigError("unsupported listen fd type") from None
    try:
        family = sock.family
    finally:
        sock.detach()
    if family == socket.AF_UNIX:
        return "unix-listen"
    if family == getattr(socket, "AF_VSOCK", None):
        return "vsock-listen"
    raise ConfigError("unsupported listen fd type")


def run(config: Config) -> int:
    """Daemonize if asked, then hand over to the agent; return its exit status."""
    lock_fd = None
    if config.daemonize:
        from qga.daemon import become_daemon

        # A frozen agent leaves the pid file alone until the thaw (it may
        # sit on a frozen filesystem): the agent writes it then.
        lock_fd = become_daemon(None if starts_frozen(config) else config.pidfile)
    try:
        from qga.agent import Agent

        return Agent(config).run()
    except QgaError as error:
        # Set-up failed (state directory, log file): qemu-ga's two lines.
        log_critical(str(error))
        log_critical("error initializing guest agent")
        return 1
    finally:
        if config.daemonize:
            from qga.daemon import remove_pidfile

            remove_pidfile(config.pidfile)
        if lock_fd is not None:
            os.close(lock_fd)


def starts_frozen(config: Config) -> bool:
    from qga.state import FROZEN_MARKER

    return os.path.exists(os.path.join(config.statedir, FROZEN_MARKER))


# -- messages -----------------------------------------------------------------------


def critical(message: str) -> None:
    from qga.log import glib_message

    glib_message("critical", message)


def log_critical(message: str) -> None:
    """A critical line in qemu-ga's log format, on stderr (logging is not set up)."""
    import logging
    import time

    from qga.log import format_line

    sys.stderr.write(format_line(time.time(), logging.CRITICAL, message) + "\n")
    sys.stderr.flush()


def warning(message: str) -> None:
    from qga.log import glib_message

    glib_message("warning", message)


def usage(prog: str) -> str:
    return f"""\
Usage: {prog} [-m <method> -p <path>] [<options>]
QEMU Guest Agent {qga.QEMU_GA_VERSION} (qga {qga.__version__})
A guest agent compatible with QEMU's qemu-ga

  -c, --config=PATH configuration file path (default is
                    {DEFAULT_CONFIG_PATH}
                    unless overridden by the QGA_CONF environment variable)
  -m, --method      transport method: one of unix-listen, virtio-serial,
                    isa-serial, or vsock-listen (virtio-serial is the default)
  -p, --path        device/socket path (the default for virtio-serial is:
                    {DEFAULT_VIRTIO_PATH},
                    the default for isa-serial is:
                    {DEFAULT_SERIAL_PATH}).
                    Socket addresses for vsock-listen are written as
                    <cid>:<port>.
  -l, --logfile     set logfile path, logs to stderr by default
  -f, --pidfile     specify pidfile (default is {DEFAULT_PIDFILE})
  -F, --fsfreeze-hook
                    enable fsfreeze hook. Accepts an optional argument that
                    specifies script to run on freeze/thaw. Script will be
                    called with 'freeze'/'thaw' arguments accordingly.
                    (default is {DEFAULT_FSFREEZE_HOOK})
                    If using -F with an argument, do not follow -F with a
                    space.
                    (for example: -F/var/run/fsfreezehook.sh)
  -t, --statedir    specify dir to store state information (absolute paths
                    only, default is {DEFAULT_STATEDIR})
  -v, --verbose     log extra debugging information
  -V, --version     print version information and exit
  -d, --daemonize   become a daemon
  -b, --block-rpcs  comma-separated list of RPCs to disable (no spaces,
                    use "--block-rpcs=help" to list available RPCs)
  -a, --allow-rpcs  comma-separated list of RPCs to enable (no spaces,
                    use "--allow-rpcs=help" to list available RPCs)
  -D, --dump-conf   dump a qemu-ga config file based on current config
                    options / command-line parameters to stdout
  -r, --retry-path  attempt re-opening path if it's unavailable or closed
                    due to an error which may be recoverable in the future
                    (virtio-serial driver re-install, serial device hot
                    plug/unplug, etc.)
  -h, --help        display this help and exit

Options of qga only (also keys of the [qga] group of the config file):
      --file-allow-dirs=DIRS
                    comma-separated absolute directories; guest-file-open
                    may only open files inside them
      --exec-allow-programs=PROGRAMS
                    comma-separated programs; guest-exec may only run these
      --fsfreeze-max-frozen-time=SECONDS
                    thaw filesystems by ourselves after this long (0 = never)
      --allow-unsigned-extensions
                    accept extension bundles that are not signed
      --runtime-dir=DIR
                    extensions' sockets and runtime files (default /run/qga)
      --trust-dirs=DIRS
                    comma-separated directories of keys trusted to sign
                    extensions (default /etc/qga/trust.d,/usr/lib/qga/trust.d)
      --virtio-ports-dir=DIR
                    where channel-mode extensions find their ports
                    (default /dev/virtio-ports)

"""
