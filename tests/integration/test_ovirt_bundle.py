"""Building the oVirt extension bundle: signed with qga-bundle, verified, unpacked, run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from qga.ext.trust import TrustStore
from qga.ext.verify import extract_bundle, read_detached, verify_bundle
from tests.support.fake_vdsm import ExtensionProcess, FakeCore, FakeVdsm, validate

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "extensions" / "ovirt_sso" / "build.py"
sys.path.insert(0, str(ROOT / "extensions" / "ovirt_sso"))

from ovirt_agent import config  # noqa: E402


def run(*argv, cwd):
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_build_sign_verify_unpack_and_run(tmp_path):
    run("-m", "qga.ext.cli", "keygen", tmp_path / "vendor", "--names", "ovirt-guest-agent",
        cwd=tmp_path)
    trust = tmp_path / "trust"
    trust.mkdir(mode=0o755)
    (tmp_path / "vendor.json").rename(trust / "vendor.json")
    run(BUILD, "--key", tmp_path / "vendor.key", "--counter", "7", cwd=tmp_path)
    archive = tmp_path / "ovirt-guest-agent-1.0.0.qgb"
    statement, signature = read_detached(str(archive))
    verified = verify_bundle(str(archive), statement, signature,
                             TrustStore.load([str(trust)]))
    assert verified.signed and verified.counter == 7
    manifest = verified.manifest
    assert (manifest.name, manifest.mode, manifest.ports) == (
        "ovirt-guest-agent", "channel", ("ovirt-guest-agent.0", "com.redhat.rhevm.vdsm"))
    assert manifest.settings_defaults == config.DEFAULTS
    paths = {entry.path for entry in manifest.files}
    assert {"main.py", "qga_ext_sdk.py", "ovirt_agent/logic.py",
            "ovirt_agent/messages.py"} <= paths
    assert not [path for path in paths if "__pycache__" in path or path == "build.py"]
    sdk_entry = manifest.file("qga_ext_sdk.py")
    assert sdk_entry.sha256 == hashlib.sha256((ROOT / "qga" / "ext" / "sdk.py")
                                              .read_bytes()).hexdigest()

    # The same sources build the same archive.
    run(BUILD, "--unsigned", "-o", tmp_path / "again.qgb", cwd=tmp_path)
    assert (tmp_path / "again.qgb").read_bytes() == archive.read_bytes()
    with tarfile.open(archive) as tar:
        assert tar.getnames()[0] == "manifest.json"

    # Unpacked as the core installs it, it runs with nothing of this tree on its path.
    installed = extract_bundle(verified, str(archive), str(tmp_path), "installed")
    core = FakeCore(str(tmp_path))
    vdsm = FakeVdsm(core.host_path)
    environ = core.environ({"tick_interval": 0.05, "config_file": "", "session_events": False},
                           bundle_dir=installed)
    process = ExtensionProcess(installed, environ, str(tmp_path / "extension.log"))
    try:
        vdsm.wait_for("os-info")
        assert vdsm.effective_api_version == 3
        for _, name, args in vdsm.messages:
            assert validate(name, args) == []
        assert process.stop() == 0
        vdsm.wait_for("session-shutdown")
    finally:
        process.kill()
        vdsm.close()
        core.close()
    assert "Traceback" not in process.output()


def test_the_manifest_template_is_valid_and_complete():
    value = json.loads((ROOT / "extensions" / "ovirt_sso" / "manifest.json").read_text())
    assert "files" not in value                       # qga-bundle build fills them in
    settings = value["settings"]
    assert settings["defaults"] == config.DEFAULTS
    assert set(settings["schema"]["properties"]) == set(config.DEFAULTS)
    from qga.ext.manifest import strict_validator
    assert list(strict_validator(settings["schema"]).iter_errors(settings["defaults"])) == []
    assert list(strict_validator(settings["schema"]).iter_errors({"heart_beat_rate": 0}))
