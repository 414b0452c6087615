"""qgactl's parts: finding the agent's arguments, config provenance, state, trust files."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from qga import ctl
from qga.config import Config, dump
from qga.state import COUNTER_FILE, FROZEN_MARKER


# -- finding the agent's command line ------------------------------------------------


@pytest.mark.parametrize("cmdline, expected", [
    (["/usr/bin/python3", "/usr/bin/qga", "-t", "/var/lib/qga"], ["-t", "/var/lib/qga"]),
    (["python3", "-m", "qga", "-m", "unix-listen"], ["-m", "unix-listen"]),
    (["/usr/bin/python3", "-X", "dev", "-m", "qga"], []),
    (["/usr/local/bin/qga", "-v"], ["-v"]),
    (["python3", "-m", "pytest", "qga"], None),
    (["/usr/bin/python3", "/usr/bin/qgactl", "status"], None),
    (["/usr/sbin/qemu-ga", "-m", "unix-listen"], None),
    (["bash", "/home/me/qga", "-v"], None),
])
def test_agent_arguments(cmdline, expected):
    assert ctl.agent_arguments(cmdline) == expected


SYSTEMCTL_SHOW = """\
LoadState=loaded
ActiveState=active
SubState=running
MainPID=4321
StatusText=
ExecStart={ path=/usr/bin/qga ; argv[]=/usr/bin/qga --statedir=/var/lib/qga -b "guest-exec,guest-exec-status" ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }
Environment=QGA_CONF=/etc/qga/qga.conf "EXTRA=a b"
FragmentPath=/lib/systemd/system/qga.service
"""


def test_systemctl_show_parsing():
    unit = ctl.parse_systemctl_show(SYSTEMCTL_SHOW)
    assert unit["MainPID"] == "4321" and unit["StatusText"] == ""
    assert ctl.exec_start_argv(unit["ExecStart"]) == [
        "/usr/bin/qga", "--statedir=/var/lib/qga", "-b", "guest-exec,guest-exec-status"]
    assert ctl.unit_environment(unit["Environment"]) == {
        "QGA_CONF": "/etc/qga/qga.conf", "EXTRA": "a b"}
    assert ctl.exec_start_argv("") == []


def test_read_process_sees_our_own_argv_and_environment(monkeypatch):
    cmdline, environ = ctl.read_process(os.getpid())
    with open("/proc/self/cmdline", "rb") as stream:
        assert cmdline == [os.fsdecode(p) for p in stream.read().split(b"\0")[:-1]]
    assert environ.get("PATH") == os.environ.get("PATH")


def test_read_pidfile(tmp_path):
    path = tmp_path / "pid"
    path.write_text("1234\n")
    assert ctl.read_pidfile(str(path)) == 1234
    path.write_text("garbage")
    assert ctl.read_pidfile(str(path)) is None
    assert ctl.read_pidfile(str(tmp_path / "absent")) is None


# -- configuration provenance --------------------------------------------------------


@pytest.fixture
def conf_file(tmp_path):
    path = tmp_path / "qga.conf"
    path.write_text("[general]\nstatedir=/srv/state\nblock-rpcs=guest-exec\nverbose=true\n"
                    "[qga]\nexec-allow-programs=/bin/true\n")
    return str(path)


def test_sources_of_every_setting(conf_file):
    sourced = ctl.sourced_config(
        ["-m", "unix-listen", "-p", "/run/x.sock", "-b", "guest-ping", "-v"],
        {"QGA_CONF": conf_file})
    config, sources = sourced.config, sourced.sources
    assert sourced.file_path == conf_file and sourced.file_error is None
    assert config.statedir == "/srv/state" and sources["statedir"] == conf_file
    assert config.method == "unix-listen" and sources["method"] == "command line"
    assert sources["path"] == "command line"
    # Lists accumulate: both sources count.
    assert config.block_rpcs == ["guest-exec", "guest-ping"]
    assert sources["block_rpcs"] == f"{conf_file} + command line"
    # A scalar given in both places comes from the command line.
    assert sources["verbose"] == "command line"
    assert sources["exec_allow_programs"] == conf_file
    assert sources["pidfile"] == "default" and sources["daemonize"] == "default"


def test_every_setting_has_a_key_and_an_option():
    """A new setting of qga.config must be taught to qgactl's provenance."""
    from qga.cli import LONG_OPTIONS

    assert sorted(set(ctl._FILE_KEYS.values())) == sorted(ctl._SOURCED)
    assert sorted(set(ctl._OPTION_ATTRIBUTES.values())) == sorted(ctl._SOURCED)
    codes = {option.code for option in LONG_OPTIONS}
    assert set(ctl._OPTION_ATTRIBUTES) <= codes


def test_dash_c_names_the_file_and_the_default_path_is_a_default(conf_file):
    sourced = ctl.sourced_config(["-c", conf_file], {})
    assert sourced.file_path == conf_file
    assert sourced.config.path == "/dev/virtio-ports/org.qemu.guest_agent.0"
    assert sourced.sources["path"] == "default"


def test_a_broken_file_is_reported_not_fatal(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("[general]\nverbose=maybe\n")
    sourced = ctl.sourced_config(["-t", "/x"], {"QGA_CONF": str(bad)})
    assert "verbose" in sourced.file_error
    assert sourced.config.statedir == "/x"


def test_options_qga_would_refuse_are_skipped(capsys):
    sourced = ctl.sourced_config(["--file-allow-dirs=relative", "--bogus", "-t", "/y"],
                                 {"QGA_CONF": "/nonexistent"})
    assert sourced.config.file_allow_dirs == [] and sourced.config.statedir == "/y"
    assert capsys.readouterr().err == ""


def test_annotated_dump_is_qga_dash_d_plus_comments(conf_file):
    sourced = ctl.sourced_config(["-t", "/var/lib/qga"], {"QGA_CONF": conf_file})
    text = ctl.annotated_dump(sourced)
    without_comments = "".join(line + "\n" for line in text.split("\n")[:-1]
                               if not line.startswith("#"))
    assert without_comments.encode() == dump(sourced.config)
    lines = text.split("\n")
    assert lines[lines.index("statedir=/var/lib/qga") - 1] == "# command line"
    assert lines[lines.index("exec-allow-programs=/bin/true") - 1] == f"# {conf_file}"
    assert lines[lines.index("daemon=false") - 1] == "# default"


def test_annotated_dump_reads_back_as_the_same_configuration(conf_file, tmp_path):
    from qga.config import load_file

    sourced = ctl.sourced_config(["-t", "/var/lib/qga", "-a", "guest-ping"],
                                 {"QGA_CONF": conf_file})
    copy = tmp_path / "copy.conf"
    copy.write_text(ctl.annotated_dump(sourced))
    reread = Config()
    load_file(reread, str(copy), required=True)
    assert dump(reread) == dump(sourced.config)


# -- state -----------------------------------------------------------------------------


def test_state_summary(tmp_path):
    summary = ctl.state_summary(str(tmp_path))
    assert summary["frozen"] is False and summary["next_handle"] is None
    (tmp_path / COUNTER_FILE).write_text("[global]\nfd_counter=1234\n")
    (tmp_path / FROZEN_MARKER).write_text("")
    summary = ctl.state_summary(str(tmp_path))
    assert summary["frozen"] is True and summary["next_handle"] == 1234
    assert abs(summary["frozen_since"] - time.time()) < 60
    (tmp_path / COUNTER_FILE).write_text("not a key file\n")
    assert "counter_error" in ctl.state_summary(str(tmp_path))


def test_boot_time_is_in_the_past():
    booted = ctl.boot_time()
    assert 0 < booted < time.time()


def test_a_marker_from_before_the_boot_is_removed(tmp_path):
    marker = tmp_path / FROZEN_MARKER
    marker.write_text("")
    booted = ctl.boot_time()
    os.utime(marker, (booted - 3600, booted - 3600))
    assert ctl.clear_stale_freeze(str(tmp_path)) == str(marker)
    assert not marker.exists()
    assert ctl.clear_stale_freeze(str(tmp_path)) is None


def test_a_marker_from_this_boot_stays(tmp_path):
    marker = tmp_path / FROZEN_MARKER
    marker.write_text("")
    assert ctl.clear_stale_freeze(str(tmp_path)) is None
    assert marker.exists()


def test_clear_stale_freeze_command(tmp_path, capsys):
    marker = tmp_path / FROZEN_MARKER
    marker.write_text("")
    os.utime(marker, (1, 1))
    assert ctl.main(["clear-stale-freeze", "--statedir", str(tmp_path)]) == 0
    assert "removed" in capsys.readouterr().out and not marker.exists()
    assert ctl.main(["clear-stale-freeze", "--statedir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""


# -- trust files -----------------------------------------------------------------------


def trust_json(names=("hello",), seed=b"k"):
    """A trust file as qga-bundle keygen writes it (any 32 bytes are a well-formed key)."""
    from qga.ext.trust import trust_file

    import hashlib
    return trust_file(hashlib.sha256(seed).digest(), list(names))


@pytest.fixture
def trust(tmp_path):
    root = tmp_path / "trust"
    root.mkdir(mode=0o755)
    vendor = root / "vendor"
    vendor.mkdir(mode=0o755)
    (vendor / "distro.json").write_bytes(trust_json(["distro-*"], b"vendor"))
    os.chmod(vendor / "distro.json", 0o644)
    return ctl.TrustFiles(str(root / "admin"), str(vendor))


def trust_cli(files, *args):
    return ctl.main(["trust", "--admin-trust-dir", files.admin_dir,
                     "--vendor-trust-dir", files.vendor_dir, *args])


def listed(files, capsys):
    capsys.readouterr()
    status = trust_cli(files, "list", "--json")
    report = json.loads(capsys.readouterr().out)
    return status, report


def test_trust_add_list_remove(trust, tmp_path, capsys):
    from qga.ext.statement import key_id

    key = tmp_path / "ops.json"
    key.write_bytes(trust_json(["ops", "ops-*"], b"ops"))
    os.chmod(key, 0o600)
    assert trust_cli(trust, "add", str(key)) == 0
    assert "may sign: ops ops-*" in capsys.readouterr().out
    installed = os.path.join(trust.admin_dir, "ops.json")
    assert open(installed, "rb").read() == key.read_bytes()
    assert stat.S_IMODE(os.stat(installed).st_mode) == 0o644
    assert sorted(os.listdir(trust.admin_dir)) == ["ops.json"]  # no temporary left

    status, report = listed(trust, capsys)
    assert status == 0 and report["error"] is None
    import hashlib
    assert [(f["origin"], f["name"], f["status"], f.get("key_id")) for f in report["files"]] == [
        ("admin", "ops.json", "trusted", key_id(hashlib.sha256(b"ops").digest())),
        ("vendor", "distro.json", "trusted", key_id(hashlib.sha256(b"vendor").digest())),
    ]
    # What the agent itself trusts now.
    assert {k.names for k in trust.load().keys} == {("ops", "ops-*"), ("distro-*",)}

    assert trust_cli(trust, "remove", "ops.json") == 0
    assert os.listdir(trust.admin_dir) == []


def test_a_key_from_qga_bundle_keygen_is_trusted_for_its_names(trust, tmp_path, capsys):
    from qga.ext.cli import main as bundle_main

    prefix = str(tmp_path / "acme")
    assert bundle_main(["keygen", prefix, "--names", "acme-*"]) == 0
    assert trust_cli(trust, "add", prefix + ".json") == 0
    (key,) = [k for k in trust.load().keys if k.source.startswith(trust.admin_dir)]
    assert key.may_sign("acme-tools") and not key.may_sign("other")


def test_trust_add_refuses_what_the_agent_would_refuse(trust, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"key": "ed25519:AAAA", "names": ["x"]}')
    assert trust_cli(trust, "add", str(bad)) == 1
    err = capsys.readouterr().err
    assert "32 bytes" in err and str(bad) in err
    wrong_name = tmp_path / "key.pub"
    wrong_name.write_bytes(trust_json())
    assert trust_cli(trust, "add", str(wrong_name)) == 1
    assert "*.json" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    assert trust_cli(trust, "add", str(empty)) == 1
    assert not os.path.exists(trust.admin_dir) or os.listdir(trust.admin_dir) == []
    assert trust_cli(trust, "add", str(wrong_name), "--name", "renamed.json") == 0


def test_trust_add_refuses_to_replace_without_asking(trust, tmp_path, capsys):
    key = tmp_path / "k.json"
    key.write_bytes(trust_json(["one"]))
    assert trust_cli(trust, "add", str(key)) == 0
    first = key.read_bytes()
    key.write_bytes(trust_json(["two"]))
    assert trust_cli(trust, "add", str(key)) == 1
    assert "exists" in capsys.readouterr().err
    assert open(os.path.join(trust.admin_dir, "k.json"), "rb").read() == first
    assert trust_cli(trust, "add", str(key), "--replace") == 0
    assert open(os.path.join(trust.admin_dir, "k.json"), "rb").read() == key.read_bytes()


@pytest.mark.parametrize("name", ["../evil.json", ".hidden.json", "a/b.json"])
def test_trust_names_are_plain_file_names(trust, tmp_path, name):
    key = tmp_path / "k.json"
    key.write_bytes(trust_json())
    assert trust_cli(trust, "add", str(key), "--name", name) == 1
    assert not os.path.exists(trust.admin_dir) or os.listdir(trust.admin_dir) == []


def test_a_vendor_key_is_masked_not_removed(trust, capsys):
    assert trust_cli(trust, "remove", "distro.json") == 1
    assert "--mask" in capsys.readouterr().err
    assert trust_cli(trust, "remove", "--mask", "distro.json") == 0
    assert os.path.getsize(os.path.join(trust.admin_dir, "distro.json")) == 0
    assert trust.load().keys == ()  # the agent trusts it no more
    status, report = listed(trust, capsys)
    assert [f["status"] for f in report["files"]] == ["masks the vendor's", "masked by the admin"]
    assert trust_cli(trust, "remove", "distro.json") == 0
    assert "applies again" in capsys.readouterr().out
    assert len(trust.load().keys) == 1
    assert trust_cli(trust, "remove", "nothing.json") == 1


def test_trust_list_reports_what_makes_the_agent_refuse(trust, capsys):
    path = os.path.join(trust.vendor_dir, "distro.json")
    os.chmod(path, 0o666)
    status, report = listed(trust, capsys)
    assert status == 1 and "writable by group or others" in report["error"]
    assert trust_cli(trust, "list") == 1
    assert "ERROR: the agent refuses every bundle" in capsys.readouterr().out


def test_trust_list_shows_files_the_agent_ignores(trust, capsys):
    with open(os.path.join(trust.vendor_dir, "notes.txt"), "w") as stream:
        stream.write("x")
    status, report = listed(trust, capsys)
    assert status == 0
    assert ("notes.txt", "ignored (not *.json)") in [(f["name"], f["status"])
                                                    for f in report["files"]]


def test_ext_without_a_store_lists_nothing(tmp_path, capsys):
    assert ctl.main(["ext", "--statedir", str(tmp_path), "list"]) == 0
    assert capsys.readouterr().out == ""
    assert not os.path.exists(tmp_path / "extensions")  # read only: nothing created


def test_status_of_no_agent(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QGA_CONF", str(tmp_path / "none.conf"))
    status = ctl.main(["--pidfile", str(tmp_path / "no.pid"), "status", "--json"])
    report = json.loads(capsys.readouterr().out)
    if report["found_by"].startswith("systemd"):
        pytest.skip("a qga.service exists on this machine")
    assert status == 3 and report["running"] is False
    assert report["config_file"] == str(tmp_path / "none.conf")
    assert report["config_file_exists"] is False
