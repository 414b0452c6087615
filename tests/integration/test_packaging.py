"""What `make install` puts where, and whether systemd, udev, man and the agent accept it.

The project is installed into temporary roots for the Debian and the Fedora
layouts; the checks run the real tools (systemd-analyze, systemd-escape,
man) on the installed files and skip, saying why, where a tool is missing.
qgactl is checked against a running agent.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qga import ctl
from qga.config import Config, KeyFile, dump, load_file
from qga.schema import LINUX_DEFINES, Schema
from tests.support.agents import REPO, our_agent
from tests.support.packaging import builder, make, site_dir

CONTRIB = REPO / "contrib"
UNIT = CONTRIB / "qga.service"
RULE = CONTRIB / "udev" / "99-qga.rules"
SAMPLE_CONFIG = CONTRIB / "qga.conf"
AGENT_PORT = "/dev/virtio-ports/org.qemu.guest_agent.0"
DEBIAN_QEMU_GA_UNIT = Path("/lib/systemd/system/qemu-guest-agent.service")
DEBIAN_QEMU_GA_RULE = Path("/lib/udev/rules.d/60-qemu-guest-agent.rules")

LAYOUTS = {
    "debian": {"unit": "lib/systemd/system/qga.service", "rule": "lib/udev/rules.d/99-qga.rules"},
    "fedora": {"unit": "usr/lib/systemd/system/qga.service",
               "rule": "usr/lib/udev/rules.d/99-qga.rules"},
}
MAN_PAGES = ["man8/qga.8", "man8/qgactl.8", "man5/qga.conf.5", "man1/qga-client.1",
             "man1/qga-bundle.1", "man7/qga-ref.7"]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def installed(build_dir, tmp_path_factory):
    """Install roots by layout, from one wheel build."""
    _, variables = builder()
    roots = {}
    for layout in LAYOUTS:
        root = tmp_path_factory.mktemp(f"root-{layout}")
        make(["install"], dict(variables, BUILDDIR=str(build_dir), DESTDIR=str(root),
                               LAYOUT=layout))
        roots[layout] = root
    return roots


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        print(f"skipped: {name} is not installed")
        pytest.skip(f"{name} is not installed")
    return path


# -- make install ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_files_land_where_the_layout_wants_them(installed, layout):
    root = installed[layout]
    expected = [LAYOUTS[layout]["unit"], LAYOUTS[layout]["rule"], "etc/qga/qga.conf",
                "usr/bin/qga", "usr/bin/qgactl", "usr/bin/qga-client", "usr/bin/qga-bundle"]
    expected += [f"usr/share/man/{page}" for page in MAN_PAGES]
    for relative in expected:
        assert (root / relative).is_file(), relative
    for directory in ("etc/qga/trust.d", "usr/lib/qga/trust.d"):
        assert (root / directory).is_dir(), directory
    for relative in ("usr/bin/qga", "usr/bin/qgactl"):
        assert os.access(root / relative, os.X_OK)
    assert stat.S_IMODE((root / LAYOUTS[layout]["unit"]).stat().st_mode) == 0o644
    assert (root / LAYOUTS[layout]["unit"]).read_bytes() == UNIT.read_bytes()
    assert (root / "etc/qga/qga.conf").read_bytes() == SAMPLE_CONFIG.read_bytes()
    assert site_dir(root) is not None


def test_debian_layout_uses_the_distribution_python_path(installed):
    python, _ = builder()
    if python != "/usr/bin/python3":
        pytest.skip("the wheel was not installed with Debian's python3")
    assert site_dir(installed["debian"]) == installed["debian"] / "usr/lib/python3/dist-packages"


def test_installed_package_carries_the_schema_as_a_real_file(installed):
    package = site_dir(installed["debian"]) / "qga"
    schema = package / "qapi-schema.json"
    assert schema.is_file() and not schema.is_symlink()
    assert schema.read_bytes() == (REPO / "qapi-schema.json").read_bytes()
    for module in ("sdnotify.py", "ctl.py", "docs.py", "cli.py"):
        assert (package / module).is_file()


def test_installed_commands_run(installed):
    root = installed["debian"]
    env = dict(os.environ, PYTHONPATH=str(site_dir(root)), QGA_CONF="/nonexistent")
    version = subprocess.run([str(root / "usr/bin/qga"), "-V"], env=env, capture_output=True,
                             timeout=60)
    assert version.returncode == 0 and version.stdout.startswith(b"QEMU Guest Agent ")
    for script in ("qgactl", "qga-client", "qga-bundle"):
        result = subprocess.run([str(root / "usr/bin" / script), "--help"], env=env,
                                capture_output=True, timeout=60)
        assert result.returncode == 0 and b"usage:" in result.stdout, result.stderr


def test_other_prefixes_are_written_into_the_unit(tmp_path, build_dir):
    _, variables = builder()
    make(["install-data"], dict(variables, BUILDDIR=str(build_dir), DESTDIR=str(tmp_path),
                                PREFIX="/usr/local", SYSCONFDIR="/usr/local/etc",
                                UNITDIR="/etc/systemd/system", UDEVDIR="/etc/udev/rules.d"))
    unit = (tmp_path / "etc/systemd/system/qga.service").read_text()
    assert "ExecStart=/usr/local/bin/qga --statedir=/var/lib/qga" in unit
    assert "ExecStartPre=-/usr/local/bin/qgactl clear-stale-freeze" in unit
    assert "Environment=QGA_CONF=/usr/local/etc/qga/qga.conf" in unit
    assert "/usr/bin/" not in unit
    assert (tmp_path / "etc/udev/rules.d/99-qga.rules").is_file()
    assert (tmp_path / "usr/local/share/man/man8/qga.8").is_file()
    assert (tmp_path / "usr/local/lib/qga/trust.d").is_dir()


def test_usr_local_gets_the_package_and_the_commands(tmp_path, build_dir):
    _, variables = builder()
    make(["install-python"], dict(variables, BUILDDIR=str(build_dir), DESTDIR=str(tmp_path),
                                  PREFIX="/usr/local"))
    assert (tmp_path / "usr/local/bin/qgactl").is_file()
    package = site_dir(tmp_path)
    assert package is not None and package.relative_to(tmp_path).parts[:2] == ("usr", "local")
    assert not (tmp_path / "usr/local/local").exists()


def test_an_admins_config_survives_reinstall(tmp_path, build_dir):
    _, variables = builder()
    config = tmp_path / "etc/qga/qga.conf"
    config.parent.mkdir(parents=True)
    config.write_text("[general]\nverbose=true\n")
    make(["install-data"], dict(variables, BUILDDIR=str(build_dir), DESTDIR=str(tmp_path)))
    assert config.read_text() == "[general]\nverbose=true\n"


def test_an_unknown_layout_is_refused(tmp_path, build_dir):
    with pytest.raises(RuntimeError, match="LAYOUT must be debian or fedora"):
        make(["install-data"], {"BUILDDIR": str(build_dir), "DESTDIR": str(tmp_path),
                                "LAYOUT": "arch"})


# -- the systemd unit ------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # keys are case-sensitive
    parser.read(path)
    return parser


def test_unit_settings():
    unit = read_unit(UNIT)
    device = unit["Unit"]["BindsTo"]
    assert unit["Unit"]["After"] == device
    assert unit["Unit"]["Conflicts"] == "qemu-guest-agent.service"
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["WatchdogSec"]
    assert service["UMask"] == "0077"
    assert service["Restart"] == "always"
    assert service["StateDirectory"] == "qga" and service["RuntimeDirectory"] == "qga"
    assert service["ExecStart"] == "/usr/bin/qga --statedir=/var/lib/qga"
    assert service["Environment"] == "QGA_CONF=/etc/qga/qga.conf"
    assert dict(unit["Install"]) == {}


def test_unit_binds_to_the_agent_ports_device():
    escape = need_tool("systemd-escape")
    device = subprocess.run([escape, "--path", "--suffix=device", AGENT_PORT],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert read_unit(UNIT)["Unit"]["BindsTo"] == device
    if DEBIAN_QEMU_GA_UNIT.exists():
        assert read_unit(DEBIAN_QEMU_GA_UNIT)["Unit"]["BindsTo"] == device


def test_systemd_analyze_verify_accepts_the_installed_unit(installed, tmp_path):
    analyze = need_tool("systemd-analyze")
    root = installed["debian"]
    # The unit names /usr/bin; point it at the installed copies, which must
    # exist and be executable for verify.
    unit = (root / LAYOUTS["debian"]["unit"]).read_text()
    (tmp_path / "qga.service").write_text(unit.replace("/usr/bin/", f"{root}/usr/bin/"))
    env = dict(os.environ, MANPATH=str(root / "usr/share/man"))
    result = subprocess.run([analyze, "verify", "./qga.service"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    assert result.stdout.strip() == ""


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    analyze = need_tool("systemd-analyze")
    (tmp_path / "qga.service").write_text(UNIT.read_text().replace(
        "Type=notify", "Type=notifyy").replace("/usr/bin/", "/bin/"))
    result = subprocess.run([analyze, "verify", "--man=no", "./qga.service"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert "notifyy" in result.stderr


# -- the udev rule ------------------------------------------------------------------------

_RULE_TOKEN = re.compile(r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(,|$)')


def rule_tokens(text: str):
    """(key, attribute, operator, value) of every rule line, continuations joined."""
    rules = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens, position = [], 0
        while position < len(line):
            match = _RULE_TOKEN.match(line, position)
            assert match, f"cannot parse udev rule at {line[position:]!r}"
            tokens.append(match.groups()[:4])
            position = match.end()
        rules.append(tokens)
    return rules


def test_udev_rule_matches_the_port_and_wants_the_unit():
    (rule,) = rule_tokens(RULE.read_text())
    assert ("SUBSYSTEM", None, "==", "virtio-ports") in rule
    assert ("ATTR", "name", "==", "org.qemu.guest_agent.0") in rule
    assert ("TAG", None, "+=", "systemd") in rule
    # "=" (not "+=") replaces qemu-guest-agent's wish: one agent per port.
    assert ("ENV", "SYSTEMD_WANTS", "=", "qga.service") in rule
    assert RULE.name > DEBIAN_QEMU_GA_RULE.name  # applied after qemu-guest-agent's rule


def test_udev_rule_matches_what_qemu_guest_agent_matches():
    if not DEBIAN_QEMU_GA_RULE.exists():
        pytest.skip("qemu-guest-agent's udev rule is not installed")
    (ours,) = rule_tokens(RULE.read_text())
    (theirs,) = rule_tokens(DEBIAN_QEMU_GA_RULE.read_text())
    matches = lambda tokens: [token for token in tokens if token[2] in ("==", "!=")]
    assert matches(ours) == matches(theirs)
    assert [t[:3] for t in ours if t[2] not in ("==", "!=")] == \
        [t[:3] for t in theirs if t[2] not in ("==", "!=")]


def test_udevadm_verify_accepts_the_rule():
    udevadm = need_tool("udevadm")
    probe = subprocess.run([udevadm, "verify", "--help"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        print("skipped: this udevadm has no 'verify' (systemd < 254)")
        pytest.skip("this udevadm has no 'verify' (systemd < 254)")
    result = subprocess.run([udevadm, "verify", str(RULE)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# -- man pages ---------------------------------------------------------------------------


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_pages_render_without_warnings(installed, page):
    man = need_tool("man")
    path = installed["debian"] / "usr/share/man" / page
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    result = subprocess.run([man, "--warnings", "-l", str(path)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert result.stderr == "", result.stderr
    assert "NAME" in result.stdout and "SEE ALSO" in result.stdout


def test_man_catches_a_broken_page(tmp_path):
    man = need_tool("man")
    page = tmp_path / "broken.8"
    page.write_text((CONTRIB / "man/qga.8").read_text().replace(".SH NAME", ".SH NAME\n.NOSUCHMACRO"))
    result = subprocess.run([man, "--warnings", "-l", str(page)], env=dict(os.environ, MANWIDTH="80"),
                            capture_output=True, text=True, timeout=60)
    assert result.stderr != ""


def test_reference_page_lists_every_command(installed):
    page = (installed["debian"] / "usr/share/man/man7/qga-ref.7").read_text()
    commands = Schema.load(defines=LINUX_DEFINES).command_names()
    assert len(commands) > 30
    headings = re.findall(r"^\.SS (\S+)$", page, re.MULTILINE)
    assert [h.replace("\\-", "-") for h in headings[:len(commands)]] == commands


# -- the sample configuration -----------------------------------------------------------------


def every_key_dump() -> str:
    # Keys -D prints only when set are set.
    config = Config(path="/p", logfile="/l", fsfreeze_hook="/h", allow_unsigned_extensions=True)
    return dump(config).decode()


def test_sample_config_documents_every_key():
    sample = SAMPLE_CONFIG.read_text()
    group = None
    documented = set()
    for line in sample.splitlines():
        if line.startswith("["):
            group = line.strip("[]")
        match = re.match(r"#([a-z-]+)=", line)
        if match:
            documented.add((group, match.group(1)))
    group = None
    for line in every_key_dump().splitlines():
        if line.startswith("["):
            group = line.strip("[]")
        elif "=" in line:
            assert (group, line.split("=")[0]) in documented, line


def test_sample_config_shows_the_real_defaults(tmp_path):
    """Uncommented, the sample's values are the defaults (examples of optional keys aside)."""
    lines = []
    for line in SAMPLE_CONFIG.read_text().splitlines():
        match = re.match(r"#([a-z-]+=.*)$", line)
        if match and not match.group(1).startswith("fsfreeze-hook="):
            line = match.group(1)
            if line.endswith("="):
                continue  # an empty list or an unset path
        lines.append(line)
    uncommented = tmp_path / "qga.conf"
    uncommented.write_text("\n".join(lines) + "\n")
    config = Config()
    load_file(config, str(uncommented), required=True)
    defaults = Config()
    defaults.resolve_path()
    assert dump(config) == dump(defaults)
    assert KeyFile.load(str(SAMPLE_CONFIG)) is not None


# -- qgactl against a running agent ----------------------------------------------------------


@pytest.fixture
def logging_agent(short_tmp):
    agent = our_agent(short_tmp, ["-l", str(short_tmp / "agent.log"), "-v", "-b", "guest-exec"])
    agent.start()
    yield agent
    agent.stop()


def test_qgactl_status_of_a_running_agent(logging_agent, short_tmp, capsys):
    pidfile = short_tmp / "agent.pid"
    pidfile.write_text(f"{logging_agent.pid}\n")
    with logging_agent.connect() as connection:
        handle = connection.call("guest-file-open", {"path": str(short_tmp / "f"), "mode": "w"})
        connection.call("guest-file-close", {"handle": handle["return"]})
    # Found through the pid file (no systemd here) or named with --pid.
    for how in (["--pidfile", str(pidfile)], ["--pid", str(logging_agent.pid)]):
        if how[0] == "--pidfile" and ctl.systemd_running():
            continue
        assert ctl.main(how + ["status", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["running"] is True and report["pid"] == logging_agent.pid
        assert report["statedir"] == str(short_tmp / "state")
        assert report["method"] == "unix-listen" and report["path"] == str(logging_agent.sock)
        assert report["frozen"] is False
        assert report["next_handle"] == handle["return"] + 1
    (short_tmp / "state" / "qga.state.isfrozen").write_text("")
    try:
        assert ctl.main(["--pid", str(logging_agent.pid), "status"]) == 0
        out = capsys.readouterr().out
        assert "frozen:       yes" in out and f"pid {logging_agent.pid}" in out
    finally:
        (short_tmp / "state" / "qga.state.isfrozen").unlink()


def test_qgactl_show_config_of_a_running_agent(logging_agent, capsys):
    assert ctl.main(["--pid", str(logging_agent.pid), "show-config"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[lines.index("block-rpcs=guest-exec") - 1] == "# command line"
    assert lines[lines.index("daemon=false") - 1] == "# default"
    assert ctl.main(["--pid", str(logging_agent.pid), "show-config", "--plain"]) == 0


def test_qgactl_show_config_plain_is_qga_dash_d(logging_agent):
    """The same bytes as the agent's own -D with the same arguments."""
    args = ctl.agent_arguments(ctl.read_process(logging_agent.pid)[0])
    env = dict(os.environ, PYTHONPATH=str(REPO), QGA_CONF="/nonexistent")
    own = subprocess.run([sys.executable, "-m", "qga", *args, "-D"], env=env,
                         capture_output=True, timeout=60).stdout
    shown = subprocess.run([sys.executable, "-m", "qga.ctl", "--pid", str(logging_agent.pid),
                            "show-config", "--plain"], env=env, capture_output=True,
                           timeout=60).stdout
    assert shown == own and own.startswith(b"[general]\n")


def test_qgactl_logs_reads_the_log_file(logging_agent, short_tmp):
    with logging_agent.connect() as connection:
        connection.call("guest-ping")
    (short_tmp / "agent.log").write_text("first\nsecond\nthird\n")  # known content
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "qga.ctl", "--pid", str(logging_agent.pid),
                             "logs", "-n", "2"], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout == b"second\nthird\n"


def test_qgactl_refuses_a_process_that_is_not_qga(capsys):
    assert ctl.main(["--pid", str(os.getpid()), "status"]) == 1
    assert "is not qga" in capsys.readouterr().err


# -- readiness, as Type=notify needs it ----------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_agent_tells_systemd_it_is_ready(short_tmp, abstract):
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"qga-ready-{os.getpid()}-{os.urandom(4).hex()}"
        listener.bind(b"\0" + name.encode())
        address = "@" + name
    else:
        address = str(short_tmp / "notify")
        listener.bind(address)
    listener.settimeout(10)
    agent = our_agent(short_tmp, env=dict(os.environ, NOTIFY_SOCKET=address))
    try:
        agent.start()
        assert listener.recv(4096).split(b"\n")[0] == b"READY=1"
        with agent.connect() as connection:  # ready means serving
            assert connection.call("guest-ping") == {"return": {}}
    finally:
        agent.stop()
        listener.close()
