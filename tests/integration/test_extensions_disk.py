"""The store on a small loop filesystem: a full disk is refused cleanly, and a real
freeze holds an install back until the thaw.

The agent's state directory is a 32 MiB ext4 loop mount (tests/support/loopfs.py);
the agent is fenced to it (QGA_TEST_MOUNTPOINTS), so the freeze can reach
nothing else.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from qga.errors import AgentError
from qga.ext.install import RESERVE_BYTES
from tests.integration.test_extensions_e2e import Guest
from tests.integration.test_extensions_faults import SLOW_READY, check_consistent
from tests.support.ext_hello import NAME
from tests.support.loopfs import fence_env, freeze_list_request, loopfs  # noqa: F401

MiB = 1 << 20


@pytest.fixture
def guest(bundles, loopfs):  # noqa: F811
    running = Guest(bundles)
    os.chmod(loopfs.base, 0o755)  # extension users reach their code through it
    os.chmod(loopfs.path, 0o755)
    (running.workdir / "state").symlink_to(loopfs.path)
    running.env = fence_env(loopfs, running.env)
    running.start()
    yield running
    print(running.log()[-3000:])
    loopfs.thaw()
    running.close()


def free_bytes(path):
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def test_a_full_disk_is_refused_and_leaves_nothing(guest, bundles, loopfs):  # noqa: F811
    client = guest.client
    assert client.push(bundles.build("1.0.0", counter=10))["state"] == "done"
    free = free_bytes(loopfs.path)
    with pytest.raises(AgentError, match="not enough free space"):
        client.call("guest-extension-upload", {"size": free})
    # An archive that fits, whose files do not fit beside it.
    blob = int(0.75 * (free - RESERVE_BYTES))
    bundle = bundles.build("2.0.0", counter=20, extra_files={"blob": os.urandom(blob)})
    with pytest.raises(AgentError, match="not enough free space in .*extensions"):
        client.push(bundle)
    store = Path(loopfs.path) / "extensions"
    assert os.listdir(store / "staging") == []
    assert len(os.listdir(store / NAME / "versions")) == 1
    install = client.ext_status(NAME)["install"]
    assert (install["version"], install["state"]) == ("2.0.0", "failed")
    assert "not enough free space" in install["error"]
    check_consistent(guest, "1.0.0")


def test_a_frozen_state_directory_holds_the_install_until_the_thaw(guest, bundles,
                                                                  loopfs):  # noqa: F811
    client = guest.client
    client.push(bundles.build("1.0.0", counter=10))
    slow = bundles.build("1.1.0", counter=11, script=SLOW_READY)
    assert client.push(slow, wait=False)["state"] == "installing"
    index = Path(loopfs.path) / "extensions" / "index.json"
    assert json.loads(index.read_text())["extensions"][NAME]["install"]["state"] == "switched"
    request = freeze_list_request(loopfs)
    assert client.call(request["execute"], request["arguments"]) == 1
    try:
        with pytest.raises(AgentError, match="frozen state"):
            client.ext_status(NAME)
        time.sleep(4.0)  # the new version said ready after 3 s: its confirmation waits
        assert json.loads(index.read_text())["extensions"][NAME]["install"]["state"] \
            == "switched"
        client.ping()
    finally:
        assert client.call("guest-fsfreeze-thaw") == 1
    record = client.wait_install(NAME, timeout=10)
    assert record["state"] == "done"
    assert json.loads(index.read_text())["extensions"][NAME]["install"]["state"] == "done"
    assert client.ext_status(NAME)["state"] == "running"
