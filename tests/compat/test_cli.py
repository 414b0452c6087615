"""The command line and the key file, compared with the real qemu-ga.

Both programs get the same arguments, the same key file and the same
program name (argv[0]); their stdout, stderr and exit status must match.
What qemu-ga 7.2 lacks is removed from our side before comparing: the
``allow-rpcs=`` line (8.1+) and our ``[qga]`` group in ``-D`` output.
Options 7.2 does not know (``-a``, ``-c``) are not compared here.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import termios
import time

import pytest

from tests.support.agents import QEMU_GA, REPO, qemu_ga_available

pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(not qemu_ga_available(), reason="qemu-ga is not installed"),
]

PROG = "qemu-ga"
OUR_LAUNCHER = (
    "import sys\n"
    f"sys.argv[0] = {PROG!r}\n"
    "from qga.cli import main\n"
    "sys.exit(main())\n"
)


def run_both(args, conf=None, tmp_path=None):
    """Run qemu-ga and qga with ``args``; return ((status, out, err), (status, out, err))."""
    env = dict(os.environ, LC_ALL="C.UTF-8")
    env.pop("POSIXLY_CORRECT", None)
    if conf is None:
        env["QGA_CONF"] = "/nonexistent/qemu-ga.conf"
    else:
        path = tmp_path / "qemu-ga.conf"
        path.write_bytes(conf)
        env["QGA_CONF"] = str(path)
    theirs = subprocess.run([PROG, *args], executable=QEMU_GA, env=env, capture_output=True,
                            timeout=30)
    ours = subprocess.run([sys.executable, "-c", OUR_LAUNCHER, *args],
                          env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, timeout=30)
    return normalize(theirs), normalize(ours, ours=True)


def normalize(result, ours=False):
    out = result.stdout
    if ours:
        out = re.sub(rb"^allow-rpcs=.*\n", b"", out, flags=re.M)
        out = re.sub(rb"\n\[qga\]\n(.*\n)*", b"", out)
    # GLib's message prefix carries a pid and the time of day.
    err = re.sub(rb"\(process:\d+\)", b"(process:PID)", result.stderr)
    err = re.sub(rb"\d\d:\d\d:\d\d\.\d{3}: ", b"HH:MM:SS.mmm: ", err)
    return result.returncode, out.decode(errors="replace"), err.decode(errors="replace")


DUMP_CASES = [
    (None, ["-D"]),
    (None, ["-D", "-v", "-bguest-ping,guest-info", "-b", "a,b", "-b", "c"]),
    (None, ["-D", "-F"]),
    (None, ["-D", "-F/x/hook"]),
    (None, ["-D", "-Fv"]),
    (None, ["-D", "--fsfreeze-hook", "/not/taken"]),
    (None, ["-D", "--fsfreeze-hook=/h"]),
    (None, ["--dump-conf", "--verbose", "--daemonize", "--retry-path", "--statedir", "/t",
            "--pidfile", "/pf", "--logfile", "/lf"]),
    (None, ["--meth=unix-listen", "--pat=/s", "-D"]),
    (None, ["-m", "isa-serial", "-D"]),
    (None, ["-D", "-m", "unix-listen", "-p", " lead\ttab\\back\nnl"]),
    (None, ["-t", "", "-f", "", "-l", "", "-D"]),
    (None, ["-D", "extra", "args", "-v"]),
    (None, ["-D", "--", "-x"]),
    (None, ["-s", "foo", "-D"]),
    (None, ["-D", "--blacklist=guest-ping", "--block-rpcs", "x,,y", "-b", ","]),
    (None, ["-b", "HELP", "-D"]),
    (b"[general]\nmethod = unix-listen  \npath=  /a b  \n", ["-D"]),
    (b"[general]\npath=\\s x\\ty\\nz\\\\w\\r\n", ["-D"]),
    (b"# c\n\n[general]\n  # c2\npath=x\npath=y\n[other]\nk=v\n[general]\nlogfile=l\n", ["-D"]),
    (b"[general]\ndaemon=1\nverbose=0\nretry-path=true \n", ["-D"]),
    (b"[general]\nverbose=false\n", ["-D", "-v"]),
    (b"[general]\nblock-rpcs=guest-ping;guest-get-time\n", ["-D"]),
    (b"[general]\nblock-rpcs=a,b,c\n", ["-D", "-b", "x,y"]),
    (b"[general]\nblacklist=a,b\nblock-rpcs=c\n", ["-D"]),
    (b"[general]\nmethod=unix-listen\npath=/from/file\nstatedir=/sd\n", ["-D", "-m", "isa-serial"]),
    (b"[general]\npath[de]=x\nbad key=y\n[General]\npath=z\n", ["-D"]),
    (b"[general]\r\npath=crlf\r\n", ["-D"]),
    (b"[general]\npath=x\x00y\nfsfreeze-hook=\n", ["-D"]),
    (b"[general]\ndaemonize=true\n", ["-D"]),
    (b"[qga]\nfile-allow-dirs=/srv\n", ["-D"]),
]


@pytest.mark.parametrize("conf, args", DUMP_CASES, ids=[" ".join(a)[:50] for _, a in DUMP_CASES])
def test_dump_conf_matches(tmp_path, conf, args):
    theirs, ours = run_both(args, conf, tmp_path)
    assert theirs[0] == 0
    assert ours == theirs


ERROR_CASES = [
    (None, ["-x"]),
    (None, ["-vDx"]),
    (None, ["--bogus"]),
    (None, ["--bogus=3"]),
    (None, ["-m"]),
    (None, ["-D", "--method"]),
    (None, ["--meth"]),
    (None, ["--p=x", "-D"]),
    (None, ["--d"]),
    (None, ["--help=x"]),
    (None, ["--he=x"]),
    (None, ["-m", "unix-listen", "-D"]),
    (None, ["-m", "", "-D"]),
    (None, ["-m", "vsock-listen"]),
    (b"[general]\nfoo\n", ["-D"]),
    (b"[general]\nfoo\n", ["-V"]),
    (b"[general]\nfoo\n", ["-x"]),
    (b"[general]\npath=a\\qb\n", ["-D"]),
    (b"path=x\n[general]\n", ["-D"]),
    (b"[general]\ndaemon=True\n", ["-D"]),
    (b"[general]\nverbose=maybe\n", ["-D"]),
    (b"[general]\npa[th=x\n", ["-D"]),
    (b"[]\n", ["-D"]),
    (b"[a[b]\n", ["-D"]),
    (b"[general\n", ["-D"]),
    (b"[general]\n=x\n", ["-D"]),
    (b"\xef\xbb\xbf[general]\n", ["-D"]),
    (b"[gen\x01eral]\n", ["-D"]),
    (b"[general]\npath=\xff\n", ["-D"]),
    (b"[general]\nblacklist=guest-exec\n", ["-D"]),  # a warning, then success
]


@pytest.mark.parametrize("conf, args", ERROR_CASES,
                         ids=[f"{(c or b'')[:20]!r} {' '.join(a)}" for c, a in ERROR_CASES])
def test_errors_match(tmp_path, conf, args):
    theirs, ours = run_both(args, conf, tmp_path)
    assert ours == theirs


@pytest.mark.parametrize("where", ["directory", "under a file"])
def test_unreadable_config_matches(tmp_path, where):
    conf = tmp_path
    if where == "under a file":
        (tmp_path / "plain").write_text("")
        conf = tmp_path / "plain" / "qemu-ga.conf"
    env = dict(os.environ, QGA_CONF=str(conf))
    theirs = subprocess.run([PROG, "-D"], executable=QEMU_GA, env=env, capture_output=True, timeout=30)
    ours = subprocess.run([sys.executable, "-c", OUR_LAUNCHER, "-D"],
                          env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, timeout=30)
    assert normalize(ours, ours=True) == normalize(theirs)


def test_version_format(tmp_path):
    theirs, ours = run_both(["-V"])
    pattern = r"QEMU Guest Agent \d+\.\d+\.\d+\n"
    assert re.fullmatch(pattern, theirs[1]) and re.fullmatch(pattern, ours[1])
    assert (ours[0], ours[2]) == (theirs[0], theirs[2]) == (0, "")


def test_help_layout(tmp_path):
    theirs, ours = run_both(["-h"])
    assert ours[0] == theirs[0] == 0
    assert ours[1].splitlines()[0] == theirs[1].splitlines()[0]
    # Every option line of qemu-ga's help is in ours (upstream's text for -b).
    their_options = [line for line in theirs[1].splitlines() if re.match(r"  -\w, --", line)]
    for line in their_options:
        if not line.startswith("  -b, "):
            assert line in ours[1].splitlines()


def test_block_help_lists_qemu_gas_commands(tmp_path):
    theirs, ours = run_both(["-b", "help"])
    assert ours[0] == theirs[0] == 0
    # qemu-ga 7.2 registers guest-get-devices (Windows only) disabled; upstream
    # does not register Windows-only commands on Linux.
    expected = set(theirs[1].split()) - {"guest-get-devices"}
    assert expected <= set(ours[1].split())


def serial_settings_after(open_port):
    """termios of a pty slave after ``open_port(path)`` opened it."""
    master, slave = pty.openpty()
    try:
        attributes = termios.tcgetattr(slave)
        attributes[0] |= termios.ICRNL | termios.IXON | termios.IMAXBEL | termios.BRKINT
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        closer = open_port(os.ttyname(slave), slave)
        try:
            return termios.tcgetattr(slave)
        finally:
            closer()
    finally:
        os.close(master)
        os.close(slave)


def test_isa_serial_settings_match(short_tmp):
    pytest.importorskip("serial")
    from qga.channel.isa import IsaSerialChannel

    def open_with_qemu_ga(path, slave):
        process = subprocess.Popen([QEMU_GA, "-m", "isa-serial", "-p", path, "-t", str(short_tmp)],
                                   env=dict(os.environ, QGA_CONF="/nonexistent"),
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while termios.tcgetattr(slave)[3] != 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # until qemu-ga has applied its settings (lflag 0)

        def stop():
            process.terminate()
            process.wait(5)

        return stop

    def open_with_qga(path, _slave):
        channel = IsaSerialChannel(path)
        channel.open()
        return channel.close

    theirs = serial_settings_after(open_with_qemu_ga)
    ours = serial_settings_after(open_with_qga)
    # pyserial sets CLOCAL (ignore modem control lines); everything else is qemu-ga's.
    ours[2] &= ~termios.CLOCAL
    assert ours[:6] == theirs[:6]
    assert ours[6][termios.VMIN] == theirs[6][termios.VMIN]
    assert ours[6][termios.VTIME] == theirs[6][termios.VTIME]


# -- the channel as the agent opens it ---------------------------------------------------


def run_agent_both(args, short_tmp, wait=None):
    """Start qemu-ga and qga with ``args`` plus a fresh state directory.

    Without ``wait`` each must exit by itself; with it, each is stopped
    (SIGTERM) after ``wait`` seconds.  Returns their (status, stderr lines
    without timestamps or debug lines).
    """
    results = []
    for name, argv, env_extra in (
        ("qemu-ga", [QEMU_GA], {}),
        ("qga", [sys.executable, "-m", "qga"], {"PYTHONPATH": str(REPO)}),
    ):
        statedir = short_tmp / name
        statedir.mkdir()
        env = dict(os.environ, QGA_CONF="/nonexistent", **env_extra)
        process = subprocess.Popen([*argv, *args, "-t", str(statedir)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if wait is not None:
                time.sleep(wait)
                process.terminate()
            _, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        lines = [re.sub(r"^\d+\.\d+: ", "", line) for line in err.decode().splitlines()]
        results.append((process.returncode, [line for line in lines if not line.startswith("debug: ")]))
    return results


@pytest.mark.parametrize("args", [
    ["-m", "isa-serial", "-p", "/nonexistent/ttyS0"],
    ["-m", "virtio-serial", "-p", "/nonexistent/org.qemu.guest_agent.0"],
    ["-m", "unix-listen", "-p", "/nonexistent/dir/qga.sock"],
    ["-m", "vsock-listen", "-p", "foo"],
    ["-m", "vsock-listen", "-p", "2:x"],
    ["-m", "vsock-listen", "-p", "3:1,2"],
    ["-m", "bogus", "-p", "/x"],
], ids=lambda args: " ".join(args))
def test_channel_failures_match(short_tmp, args):
    theirs, ours = run_agent_both(args, short_tmp)
    assert ours == theirs
    assert theirs[0] == 1


def test_retry_path_messages_match(short_tmp):
    args = ["-v", "-r", "-m", "isa-serial", "-p", str(short_tmp / "not-yet")]
    theirs, ours = run_agent_both(args, short_tmp, wait=1.0)
    assert ours[1] == theirs[1] == [
        f"critical: error opening channel '{short_tmp / 'not-yet'}': No such file or directory",
        "critical: failed to create guest agent channel",
        "critical: failed to initialize guest agent channel",
        "warning: agent stopped unexpectedly, restarting...",
        "warning: waiting for channel path...",
    ]
