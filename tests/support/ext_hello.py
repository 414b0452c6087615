"""Build and sign the example extension (``extensions/hello``) as a host would, for tests.

:class:`HelloBundles` makes a throwaway key with ``qga-bundle keygen`` and
puts its trust file in a private trust directory; :meth:`HelloBundles.build`
stages ``extensions/hello`` (with a copy of the SDK, as a bundle ships it),
optionally changed (another version, another script, manifest members), and
runs ``qga-bundle build`` and ``qga-bundle sign`` as processes.  Tests build it
under :data:`NAME`, unique to the test run.

:func:`agent_config` writes the configuration an agent under test needs:
the trust directory, a runtime directory of its own, a ports directory.
The work directory must be reachable by extension users (0755), since the
agent's state directory is below it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "extensions" / "hello"
# The name tests install hello under: its own per test run, so that runs side
# by side on one machine do not share (and kill) each other's extension users.
NAME = f"hello-{os.getpid()}"
SDK = REPO / "qga" / "ext" / "sdk.py"


def bundle_tool(*args: Any, cwd: Optional[Path] = None) -> str:
    """``qga-bundle ARGS`` (as ``python -m qga.ext.cli`` of this tree); its stdout."""
    result = subprocess.run([sys.executable, "-m", "qga.ext.cli", *map(str, args)], cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"qga-bundle {args[0]} failed: {result.stderr}")
    return result.stdout


class HelloBundles:
    """A signing key trusted for ``hello*`` and bundles of the example extension."""

    def __init__(self, workdir: Path, names: str = "hello,hello-*", name: str = "hello"):
        self.workdir = workdir
        self.name = name
        self.trust_dir = workdir / "trust.d"
        self.trust_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.trust_dir, 0o755)
        self.key = workdir / "signer.key"
        bundle_tool("keygen", workdir / "signer", "--names", names)
        shutil.copy(workdir / "signer.json", self.trust_dir / "signer.json")
        os.chmod(self.trust_dir / "signer.json", 0o644)
        self._serial = 0

    def build(self, version: str = "1.0.0", counter: Optional[int] = 10,
              script: Optional[str] = None, manifest: Optional[Dict[str, Any]] = None,
              extra_files: Optional[Dict[str, bytes]] = None, sign: bool = True) -> Path:
        """A bundle (``.statement`` and ``.sig`` beside it when signed); its path."""
        self._serial += 1
        stage = self.workdir / f"stage-{self._serial}"
        stage.mkdir()
        value = json.loads((HELLO / "manifest.json").read_text())
        value["name"] = self.name
        value["version"] = version
        value.update(manifest or {})
        (stage / "manifest.json").write_text(json.dumps(value))
        (stage / "hello.py").write_text(script if script is not None
                                        else (HELLO / "hello.py").read_text())
        shutil.copy(SDK, stage / "qga_ext_sdk.py")
        for path, data in (extra_files or {}).items():
            (stage / path).parent.mkdir(parents=True, exist_ok=True)
            (stage / path).write_bytes(data)
        output = self.workdir / f"{value['name']}-{version}-{self._serial}.qgb"
        bundle_tool("build", stage, "-o", output)
        if sign:
            bundle_tool("sign", output, "--key", self.key, "--counter", counter)
        return output


def detached(bundle: Path) -> Tuple[Optional[bytes], Optional[bytes]]:
    """The statement and signature beside ``bundle`` (None where absent)."""
    found = []
    for suffix in (".statement", ".sig"):
        path = Path(str(bundle) + suffix)
        found.append(path.read_bytes() if path.exists() else None)
    return found[0], found[1]


def agent_config(workdir: Path, trust_dir: Path, extra: str = "") -> Dict[str, str]:
    """An environment whose QGA_CONF points the agent at ``trust_dir`` and private dirs."""
    (workdir / "ports").mkdir(exist_ok=True)
    config = workdir / "qga.conf"
    config.write_text(f"[qga]\ntrust-dirs={trust_dir}\nruntime-dir={workdir / 'run'}\n"
                      f"virtio-ports-dir={workdir / 'ports'}\n{extra}")
    return dict(os.environ, QGA_CONF=str(config))
