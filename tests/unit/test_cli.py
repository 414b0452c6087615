"""The command line in-process: glibc getopt_long() rules, qemu-ga's options, exits, messages.

The command line as a process (daemons, socket activation) is tested in
tests/integration/test_cli_process.py, against the real qemu-ga in
tests/compat/test_cli.py.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

import qga
from qga import cli
from qga.cli import ERROR, getopt_long, main, socket_activation_count, socket_activation_method
from qga.errors import ConfigError



def opts(*args, posixly_correct=False):
    return list(getopt_long(list(args), posixly_correct=posixly_correct))


# -- getopt_long --------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["-v"], [("v", None)]),
    (["-Dv"], [("D", None), ("v", None)]),
    (["-bguest-ping"], [("b", "guest-ping")]),
    (["-vbguest-ping", "-D"], [("v", None), ("b", "guest-ping"), ("D", None)]),
    (["-vb", "guest-ping"], [("v", None), ("b", "guest-ping")]),
    (["-b", "-D"], [("b", "-D")]),  # a required argument may look like an option
    (["-F"], [("F", None)]),
    (["-F/x/hook"], [("F", "/x/hook")]),
    (["-Fv"], [("F", "v")]),
    (["-vF"], [("v", None), ("F", None)]),
    (["-F", "/x"], [("F", None)]),  # the optional argument must be attached
    (["--fsfreeze-hook"], [("F", None)]),
    (["--fsfreeze-hook=/h"], [("F", "/h")]),
    (["--fsfreeze-hook", "/h"], [("F", None)]),
    (["--method=unix-listen"], [("m", "unix-listen")]),
    (["--method", "unix-listen"], [("m", "unix-listen")]),
    (["--meth=unix-listen", "--pat=/s"], [("m", "unix-listen"), ("p", "/s")]),
    (["--pa=x"], [("p", "x")]),
    (["--blacklist=guest-ping"], [("b", "guest-ping")]),
    (["--b=x"], [("b", "x")]),  # block-rpcs and blacklist are the same option
    (["--path="], [("p", "")]),
    (["x", "-v", "y", "-D"], [("v", None), ("D", None)]),  # non-options are skipped
    (["-", "-v"], [("v", None)]),
    (["-D", "--", "-x"], [("D", None)]),
    (["-s", "foo", "-D"], [("s", "foo"), ("D", None)]),
    (["--file-allow-dirs=/srv", "--exec-allow-programs", "/bin/true"],
     [("file-allow-dirs", "/srv"), ("exec-allow-programs", "/bin/true")]),
])
def test_getopt_accepts(args, expected):
    assert opts(*args) == expected


@pytest.mark.parametrize("args, message", [
    (["-x"], "invalid option -- 'x'"),
    (["-:"], "invalid option -- ':'"),
    (["--bogus"], "unrecognized option '--bogus'"),
    (["--bogus=3"], "unrecognized option '--bogus=3'"),
    (["-m"], "option requires an argument -- 'm'"),
    (["--method"], "option '--method' requires an argument"),
    (["--meth"], "option '--method' requires an argument"),
    (["--help=x"], "option '--help' doesn't allow an argument"),
    (["--he=x"], "option '--help' doesn't allow an argument"),
    (["--p=x"], "option '--p=x' is ambiguous; possibilities: '--pidfile' '--path'"),
    (["--d"], "option '--d' is ambiguous; possibilities: '--dump-conf' '--daemonize'"),
])
def test_getopt_errors(args, message):
    assert opts(*args)[0] == (ERROR, message)


def test_getopt_goes_on_after_an_error():
    assert opts("-x", "-c", "/f") == [(ERROR, "invalid option -- 'x'"), ("c", "/f")]
    assert opts("-vxD") == [("v", None), (ERROR, "invalid option -- 'x'"), ("D", None)]


def test_posixly_correct_stops_at_first_non_option():
    assert opts("-D", "x", "-v", posixly_correct=True) == [("D", None)]


# -- main() -------------------------------------------------------------------------


@pytest.fixture
def no_config(monkeypatch, tmp_path):
    monkeypatch.setenv("QGA_CONF", str(tmp_path / "absent.conf"))
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    return tmp_path


def run_main(capfdbinary, *args):
    status = main(list(args), prog="qemu-ga")
    out, err = capfdbinary.readouterr()
    return status, out.decode(), err.decode()


def test_version(no_config, capfdbinary):
    assert run_main(capfdbinary, "-V") == (0, f"QEMU Guest Agent {qga.QEMU_GA_VERSION}\n", "")
    assert run_main(capfdbinary, "--version", "-x")[0] == 0  # exits before seeing -x


def test_help(no_config, capfdbinary):
    status, out, err = run_main(capfdbinary, "-h")
    assert status == 0 and err == ""
    assert out.startswith("Usage: qemu-ga [-m <method> -p <path>] [<options>]\n")
    for option in ("--method", "--allow-rpcs", "--config", "--file-allow-dirs",
                   "--fsfreeze-max-frozen-time", "--exec-allow-programs"):
        assert option in out


@pytest.mark.parametrize("args, message", [
    (["-x"], "qemu-ga: invalid option -- 'x'\n"),
    (["--bogus"], "qemu-ga: unrecognized option '--bogus'\n"),
    (["-D", "-m"], "qemu-ga: option requires an argument -- 'm'\n"),
])
def test_bad_option_exits_1(no_config, capfdbinary, args, message):
    assert run_main(capfdbinary, *args) == (
        1, "Unknown option, try 'qemu-ga --help' for more information.\n", message)


def test_dump_conf(no_config, capfdbinary):
    status, out, err = run_main(capfdbinary, "-D", "-v", "-bguest-ping,guest-info", "-b", "c",
                                "-m", "isa-serial", "-d", "-r", "-F")
    assert (status, err) == (0, "")
    assert out == (
        "[general]\ndaemon=true\nmethod=isa-serial\npath=/dev/ttyS0\n"
        "pidfile=/var/run/qemu-ga.pid\nfsfreeze-hook=/etc/qemu/fsfreeze-hook\n"
        "statedir=/var/run\nverbose=true\nretry-path=true\n"
        "block-rpcs=guest-info,guest-ping,c\nallow-rpcs=\n\n"
        "[qga]\nfile-allow-dirs=\nexec-allow-programs=\nfsfreeze-max-frozen-time=0\n")


def test_command_line_follows_the_file(no_config, capfdbinary):
    conf = no_config / "c.conf"
    conf.write_text("[general]\nmethod=unix-listen\npath=/from/file\nblock-rpcs=a,b\n"
                    "[qga]\nfile-allow-dirs=/srv\n")
    status, out, _ = run_main(capfdbinary, "-c", str(conf), "-D", "-m", "isa-serial", "-b", "x",
                              "--file-allow-dirs=/tmp,/var")
    assert status == 0
    assert "method=isa-serial\npath=/from/file\n" in out
    assert "block-rpcs=b,a,x\n" in out
    assert "file-allow-dirs=/srv,/tmp,/var\n" in out


def test_allow_and_block_together_are_accepted(no_config, capfdbinary):
    # qemu-ga 8.1-9.0 refused this; 9.1 and later accept it (block wins).
    status, out, _ = run_main(capfdbinary, "-D", "-a", "guest-ping,guest-info", "-b", "guest-info")
    assert status == 0
    assert "block-rpcs=guest-info\nallow-rpcs=guest-info,guest-ping\n" in out


def test_config_option_requires_the_file(no_config, capfdbinary):
    missing = no_config / "missing.conf"
    status, out, err = run_main(capfdbinary, "-c", str(missing), "-V")
    assert status == 1 and out == ""
    assert "CRITICAL **: " in err
    assert err.endswith(f"error loading configuration from path: {missing}, No such file or directory\n")


def test_broken_default_file_is_fatal_before_options(no_config, monkeypatch, capfdbinary):
    conf = no_config / "bad.conf"
    conf.write_bytes(b"[general]\nfoo\n")
    monkeypatch.setenv("QGA_CONF", str(conf))
    status, out, err = run_main(capfdbinary, "-V")
    assert (status, out) == (1, "")
    assert err.startswith(f"\n** (process:{os.getpid()}): CRITICAL **: ")
    assert err.endswith(f"error loading configuration from path: {conf}, Key file contains line"
                        " ?foo? which is not a key-value pair, group, or comment\n")


def test_blacklist_warning(no_config, monkeypatch, capfdbinary):
    conf = no_config / "old.conf"
    conf.write_text("[general]\nblacklist=guest-exec\n")
    monkeypatch.setenv("QGA_CONF", str(conf))
    status, out, err = run_main(capfdbinary, "-D")
    assert status == 0 and "block-rpcs=guest-exec\n" in out
    assert "WARNING **: " in err and "config using deprecated 'blacklist' key" in err


def test_listening_method_needs_a_path(no_config, capfdbinary):
    status, out, err = run_main(capfdbinary, "-m", "unix-listen", "-D")
    assert (status, out) == (1, "")
    assert err.endswith("CRITICAL **: " + err.split("CRITICAL **: ")[1])
    assert err.endswith(": must specify a path for this channel\n")


@pytest.mark.parametrize("args, message", [
    (["--fsfreeze-max-frozen-time=soon"],
     "qemu-ga: option '--fsfreeze-max-frozen-time': 'soon' is not a number of seconds\n"),
    (["--file-allow-dirs=relative"],
     "qemu-ga: option '--file-allow-dirs': file-allow-dirs: 'relative' is not an absolute path\n"),
])
def test_bad_values_of_our_options(no_config, capfdbinary, args, message):
    assert run_main(capfdbinary, "-D", *args) == (1, "", message)


def test_block_help_lists_the_schema_commands(no_config, capfdbinary):
    schema = pytest.importorskip("qga.schema")
    names = schema.Schema.load().command_names()
    for args in (["-b", "help"], ["--block-rpcs=?"], ["--allow-rpcs=help"], ["-ahelp"]):
        status, out, err = run_main(capfdbinary, *args)
        assert (status, err) == (0, "")
        assert out.splitlines() == list(names)
    assert "guest-ping" in names


# -- socket activation ------------------------------------------------------------------


def test_socket_activation_count():
    pid = str(os.getpid())
    assert socket_activation_count({}) == 0
    assert socket_activation_count({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == 0
    assert socket_activation_count({"LISTEN_PID": pid, "LISTEN_FDS": "x"}) == 0
    assert socket_activation_count({"LISTEN_PID": pid, "LISTEN_FDS": "0"}) == 0
    with socket.socket(socket.AF_UNIX) as sock:
        os.set_inheritable(sock.fileno(), True)
        env = {"LISTEN_PID": pid, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "qga"}
        assert socket_activation_count(env, first_fd=sock.fileno()) == 1
        assert env == {}  # cleared for our children
        assert not os.get_inheritable(sock.fileno())
    closed = socket.socket(socket.AF_UNIX)
    closed.close()
    env = {"LISTEN_PID": pid, "LISTEN_FDS": "1"}
    assert socket_activation_count(env, first_fd=closed.fileno() if closed.fileno() >= 0 else 1000) == 0


def test_socket_activation_method_from_family():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert socket_activation_method(unix.fileno()) == "unix-listen"
        assert unix.fileno() >= 0  # still open: the probe does not close it
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
        with pytest.raises(ConfigError, match="^unsupported listen fd type$"):
            socket_activation_method(inet.fileno())


def test_program_name(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/lib/python3/qga/__main__.py"])
    assert cli.program_name() == "qga"
    monkeypatch.setattr(sys, "argv", ["/usr/sbin/qga"])
    assert cli.program_name() == "/usr/sbin/qga"
