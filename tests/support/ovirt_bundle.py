"""The oVirt extension as a host pushes it, and the message sequences VDSM expects of it.

:data:`STARTUP_V0`, :data:`BURST_V0` and :data:`BURST_V3` are the original
agent's startup set and its refresh bursts at API versions 0 and 3, in order.
:func:`stage` lays the bundle's files out in a directory, as
``extensions/ovirt_sso/build.py`` does; :func:`signed_bundle` stages it,
changes the manifest's settings defaults as a test asks (a faster reporting
loop, say), and builds and signs it with a new key whose trust file it puts
in ``<workdir>/trust.d``.  :func:`pty_port` makes the ``ovirt-guest-agent.0``
port out of a pty: its slave is the port in ``<workdir>/ports`` (the agent's
``virtio-ports-dir``), its master the host's end, as QEMU would hold it.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import sys
import tty
from pathlib import Path
from typing import Any, Dict, Optional

from tests.support.ext_hello import bundle_tool

REPO = Path(__file__).resolve().parents[2]
NAME = "ovirt-guest-agent"
PORT = "ovirt-guest-agent.0"

STARTUP_V0 = ["session-startup", "host-name", "os-version", "network-interfaces",
              "active-user", "applications", "fqdn"]
BURST_V0 = ["session-startup", "active-user", "applications", "host-name", "os-version",
            "network-interfaces", "disks-usage", "fqdn"]
BURST_V3 = ["session-startup", "active-user", "applications", "containers", "host-name",
            "os-version", "network-interfaces", "disks-usage", "fqdn", "timezone", "os-info"]


def stage(directory: str) -> None:
    """The bundle's files, manifest included, in ``directory`` (which exists),
    laid out by ``extensions/ovirt_sso/build.py``."""
    path = str(REPO / "extensions" / "ovirt_sso")
    if path not in sys.path:
        sys.path.insert(0, path)
    import build
    build.stage(directory)


def signed_bundle(workdir: Path, defaults: Optional[Dict[str, Any]] = None,
                  counter: int = 3) -> Path:
    """The bundle with ``defaults`` over its settings defaults, signed with a new trusted key."""
    bundle_tool("keygen", workdir / "vendor", "--names", NAME)
    trust = workdir / "trust.d"
    trust.mkdir(mode=0o755, exist_ok=True)
    shutil.move(str(workdir / "vendor.json"), trust / "vendor.json")
    os.chmod(trust / "vendor.json", 0o644)
    staged = workdir / "stage"
    staged.mkdir()
    stage(str(staged))
    manifest = json.loads((staged / "manifest.json").read_text())
    manifest["settings"]["defaults"].update(defaults or {})
    (staged / "manifest.json").write_text(json.dumps(manifest))
    output = workdir / f"{NAME}.qgb"
    bundle_tool("build", staged, "-o", output)
    bundle_tool("sign", output, "--key", workdir / "vendor.key", "--counter", counter)
    return output


def pty_port(workdir: Path) -> int:
    """A pty in the ports directory as the oVirt port; its master (the host end)."""
    master, slave = pty.openpty()
    tty.setraw(slave)              # the settings stay with the pty
    (workdir / "ports").mkdir(exist_ok=True)
    os.symlink(os.ttyname(slave), workdir / "ports" / PORT)
    os.close(slave)
    return master
