"""The command line: glibc getopt_long() rules, qemu-ga's options, exits and messages."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import qga
from qga import cli
from qga.cli import ERROR, getopt_long, main, socket_activation_count, socket_activation_method
from qga.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


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
    assert f"CRITICAL **: " in err
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


def run_cli(args, activate=()):
    """``python -m qga args``; ``activate``: sockets passed as systemd passes them (fd 3...)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), QGA_CONF="/nonexistent")
    env.pop("LISTEN_PID", None)
    env.pop("LISTEN_FDS", None)
    argv = [sys.executable, "-m", "qga", *args]
    if activate:
        # Move the sockets to fd 3, 4... and set LISTEN_PID to the pid that
        # then execs the agent, as systemd does.
        fds = ",".join(str(sock.fileno()) for sock in activate)
        launcher = (
            "import os, sys\n"
            f"for target, fd in enumerate([{fds}], 3): os.dup2(fd, target)\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            f"os.environ['LISTEN_FDS'] = '{len(activate)}'\n"
            "os.execv(sys.executable, [sys.executable, '-m', 'qga'] + sys.argv[1:])\n"
        )
        argv = [sys.executable, "-c", launcher, *args]
    return subprocess.run(argv, env=env, pass_fds=[s.fileno() for s in activate],
                          capture_output=True, timeout=30)


@pytest.fixture
def listening_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "activated.sock"))
    sock.listen(1)
    yield sock
    sock.close()


def test_socket_activation_sets_the_method(listening_socket):
    result = run_cli(["-D", "-m", "isa-serial", "-p", "/dev/ttyS9"], activate=[listening_socket])
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "method=unix-listen\n" in out and "\npath=" not in out


def test_socket_activation_with_two_sockets_is_fatal(listening_socket):
    with socket.socket(socket.AF_UNIX) as second:
        result = run_cli(["-D"], activate=[listening_socket, second])
    assert result.returncode == 1
    assert result.stderr.decode().endswith(": qemu-ga only supports listening on one socket\n")


def test_socket_activation_of_another_family_is_fatal():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
        result = run_cli(["-D"], activate=[inet])
    assert result.returncode == 1
    assert result.stderr.decode().endswith(": unsupported listen fd type\n")


def test_python_m_qga_prints_version_quickly():
    result = run_cli(["-V"])
    assert result.returncode == 0
    assert result.stdout == f"QEMU Guest Agent {qga.QEMU_GA_VERSION}\n".encode()
    modules = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qga", "-V"], capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(REPO), QGA_CONF="/nonexistent"), timeout=30,
    ).stderr.decode()
    for heavy in ("psutil", "jsonschema", "cryptography", "serial", "dataclasses", "logging"):
        assert f" {heavy}\n" not in modules, f"-V imports {heavy}"


def test_program_name(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/lib/python3/qga/__main__.py"])
    assert cli.program_name() == "qga"
    monkeypatch.setattr(sys, "argv", ["/usr/sbin/qga"])
    assert cli.program_name() == "/usr/sbin/qga"


# -- daemon and pid file ----------------------------------------------------------------


def lock_from_another_process(path):
    """Read ``path`` and try to lock it as a second agent would: (content, error text or '').

    Another process does it: a POSIX lock is lost when its owner closes
    *any* descriptor of the file, so this process must not open it.
    """
    code = ("import sys\nfrom qga.daemon import write_pidfile\n"
            "print(repr(open(sys.argv[1]).read()))\n"
            "try:\n    write_pidfile(sys.argv[1])\nexcept Exception as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=30)
    content, _, error = result.stdout.decode().partition("\n")
    return eval(content), error.strip()


def test_pidfile_is_written_and_locked(tmp_path):
    from qga.daemon import write_pidfile

    path = tmp_path / "qga.pid"
    path.write_text("12345678\nstale\n")
    fd = write_pidfile(str(path))
    try:
        assert lock_from_another_process(path) == (
            f"{os.getpid()}\n", "Cannot lock pid file: Resource temporarily unavailable")
    finally:
        os.close(fd)
    content, error = lock_from_another_process(path)
    assert error == ""


def test_new_pidfile_mode(tmp_path):
    from qga.daemon import write_pidfile

    path = tmp_path / "qga.pid"
    fd = write_pidfile(str(path))
    os.close(fd)
    assert path.stat().st_mode & 0o777 == 0o600 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_pidfile_errors(tmp_path):
    from qga.daemon import write_pidfile
    from qga.errors import StateError

    with pytest.raises(StateError, match=r"^Could not create '/nonexistent/d/qga.pid': "
                                         r"No such file or directory$"):
        write_pidfile("/nonexistent/d/qga.pid")
    with pytest.raises(StateError, match=r"Is a directory$"):
        write_pidfile(str(tmp_path))


DAEMON_PROBE = """
import json, os, sys
from qga.daemon import become_daemon
fd = become_daemon(sys.argv[1] or None)
mask = os.umask(0)
info = {"pid": os.getpid(), "sid": os.getsid(0), "cwd": os.getcwd(), "umask": mask,
        "stdio": [os.readlink(f"/proc/self/fd/{n}") for n in (0, 1, 2)], "lock_fd": fd}
with open(sys.argv[2] + ".tmp", "w") as out:
    json.dump(info, out)
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
"""


def run_daemon_probe(pidfile, report, expect_report=True):
    import json
    import time

    result = subprocess.run([sys.executable, "-c", DAEMON_PROBE, str(pidfile or ""), str(report)],
                            capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            timeout=30)
    # run() returns once the child dropped the pipes (stdio to /dev/null, or exit).
    deadline = time.monotonic() + (10 if expect_report else 0)
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return result, (json.loads(report.read_text()) if report.exists() else None)


def test_become_daemon(tmp_path):
    pidfile = tmp_path / "qga.pid"
    result, info = run_daemon_probe(pidfile, tmp_path / "report.json")
    assert result.returncode == 0 and result.stderr == b""
    assert info is not None
    assert info["sid"] == info["pid"]  # a session of its own
    assert info["cwd"] == "/"
    assert info["umask"] == 0o077
    assert info["stdio"] == ["/dev/null"] * 3
    assert info["lock_fd"] is not None
    assert pidfile.read_text() == f"{info['pid']}\n"


def test_second_daemon_refuses_a_locked_pidfile(tmp_path):
    from qga.daemon import write_pidfile

    pidfile = tmp_path / "qga.pid"
    fd = write_pidfile(str(pidfile))
    try:
        result, info = run_daemon_probe(pidfile, tmp_path / "report.json", expect_report=False)
    finally:
        os.close(fd)
    # The parent returned 0 before the child failed, as qemu-ga's does; the
    # child's message reached the stderr the parent was started with.
    assert result.returncode == 0
    assert info is None
    assert result.stderr.decode().endswith(
        ": critical: Cannot lock pid file: Resource temporarily unavailable\n")
