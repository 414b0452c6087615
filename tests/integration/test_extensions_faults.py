"""Extensions that misbehave, and an agent killed in the middle of an install.

Each fault is a small script that replaces hello.py in a bundle otherwise
the example's.  Throughout, the agent must keep answering guest-ping; after
a SIGKILL at any step of an install, the restarted agent must be in a
consistent state: the index names exactly the versions on disk, the
version before the unconfirmed one runs, nothing else of the extension's
does.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import pytest

from qga.errors import AgentError
from qga.ext.launch import user_name
from tests.integration.test_extensions_e2e import ROOT, Guest, alive
from tests.support.ext_hello import NAME, detached

SDK_PRELUDE = "import os, sys, time\nimport qga_ext_sdk as sdk\nextension = sdk.Extension()\n"

CRASHES_AFTER_READY = SDK_PRELUDE + """
extension.loop.call_later(0.1, lambda: os._exit(4))
sys.exit(extension.run())
"""

HANGS = SDK_PRELUDE + """
import signal
@extension.command("greet", deferred=True)
def greet(arguments, responder):
    pass                      # never answered
@extension.command("echo")
def echo(arguments):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)          # the whole process stops serving, and ignores SIGTERM
sys.exit(extension.run())
"""

FLOODS = SDK_PRELUDE + """
def flood():
    for n in range(500):
        extension.emit("tick", {"n": n})
    extension.loop.call_later(0.001, flood)
extension.loop.call_later(0.05, flood)
sys.exit(extension.run())
"""

OVERSIZED = """
import os, socket, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(os.environ["QGA_EXT_SOCKET"])
sock.sendall(b'{"hello": "control", "version": 1}\\n{"type": "ready"}\\n')
time.sleep(0.2)
sock.sendall(b'{"type": "log", "level": "info", "message": "' + b"x" * (2 << 20) + b'"}\\n')
time.sleep(3600)
"""

SLOW_READY = SDK_PRELUDE + """
extension.loop.call_later(3.0, extension.ready)
sys.exit(extension.run(ready=False))
"""


@pytest.fixture
def guest(bundles):
    running = Guest(bundles).start()
    yield running
    print(running.log()[-4000:])  # shown when the test fails
    running.close()


# "Keeps answering" means a ping comes back while the extension misbehaves, not
# that it is fast: on a loaded 2-core CI machine (a TCG guest may hold one
# core) a healthy agent's ping can take a few hundred ms, a starved one never
# comes back.
ANSWERING = 2.0  # seconds


def ping_time(client):
    started = time.monotonic()
    client.ping()
    return time.monotonic() - started


def test_a_crash_loop_ends_in_failed_and_the_agent_keeps_answering(guest, bundles):
    client = guest.client
    assert client.push(bundles.build("1.0.0", counter=10, script=CRASHES_AFTER_READY))[
        "state"] == "done"
    latencies = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and guest.status()["state"] != "failed":
        latencies.append(ping_time(client))
        time.sleep(0.02)
    status = guest.status()
    assert status["state"] == "failed", status
    assert status["restarts"] == 4 and "gave up after 5 failures" in status["last-error"]
    assert "was killed" not in status["last-error"] and "status 4" in status["last-error"]
    assert max(latencies) < ANSWERING
    with pytest.raises(AgentError, match=f"extension {NAME} is failed"):
        client.ext_call(NAME, "greet")
    client.ext_start(NAME)  # the host may try again
    assert guest.status()["state"] in ("starting", "running", "restarting")


def test_a_hung_extension_times_out_and_is_killed(guest, bundles):
    client = guest.client
    client.push(bundles.build("1.0.0", counter=10, script=HANGS,
                              manifest={"commands": {
                                  "greet": {"request": {"type": "object"},
                                            "reply": {"type": "object"}, "timeout": 1},
                                  "echo": {"request": {"type": "object"},
                                           "reply": {"type": "object"}, "timeout": 1}}}))
    started = time.monotonic()
    with pytest.raises(AgentError, match="did not answer 'greet' within 1 s"):
        client.ext_call(NAME, "greet")
    assert 0.9 < time.monotonic() - started < 3
    with pytest.raises(AgentError, match="within 0.2 s"):
        client.ext_call(NAME, "greet", timeout=0.2)
    assert ping_time(client) < ANSWERING
    with pytest.raises(AgentError, match="did not answer 'echo'"):
        client.ext_call(NAME, "echo")  # now the process is stuck for good
    assert ping_time(client) < ANSWERING
    pid = guest.status()["pid"]
    started = time.monotonic()
    client.ext_stop(NAME)  # SIGTERM is ignored: SIGKILL after the grace time
    guest.wait_state("stopped", timeout=10)
    assert not alive(pid)
    assert time.monotonic() - started >= 2.5


def test_an_event_flood_is_bounded_and_the_agent_keeps_answering(guest, bundles):
    client = guest.client
    client.push(bundles.build("1.0.0", counter=10, script=FLOODS))
    latencies = [ping_time(client) for _ in range(5)]
    time.sleep(1.0)
    latencies += [ping_time(client) for _ in range(20)]
    print(f"guest-ping under a flood: max {max(latencies) * 1000:.1f} ms")
    assert max(latencies) < ANSWERING, latencies
    status = guest.status()
    assert status["state"] == "running"
    assert status["events-dropped"] > 0
    assert status["events-queued"] <= 10000
    batch = client.ext_events(NAME, maximum=1000)
    assert len(batch["events"]) == 1000 and batch["dropped"] >= status["events-dropped"]
    assert all(event["name"] == "tick" for event in batch["events"])


def test_an_oversized_frame_restarts_the_extension(guest, bundles):
    client = guest.client
    client.push(bundles.build("1.0.0", counter=10, script=OVERSIZED))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and guest.status()["restarts"] == 0:
        time.sleep(0.05)
    status = guest.status()
    assert status["restarts"] >= 1
    assert "broke the protocol: a frame longer than 1048576 bytes" in guest.log()
    assert ping_time(client) < ANSWERING


# -- SIGKILL of the agent during an install --------------------------------------------------


def check_consistent(guest, running_version):
    """The index names exactly what is on disk, and the right version runs, once."""
    store = guest.workdir / "state" / "extensions"
    index = json.loads((store / "index.json").read_text())["extensions"]
    assert not [name for name in os.listdir(store) if name.startswith("index.json.")]
    entry = index[NAME]
    named = {version for version in (entry["current"], entry["previous"]) if version}
    on_disk = set(os.listdir(store / NAME / "versions"))
    assert on_disk == named, (on_disk, entry)
    for version in named:
        assert (store / NAME / "versions" / version / "bundle" / "hello.py").exists()
        assert (store / NAME / "versions" / version / "manifest.json").exists()
    status = guest.wait_state("running")
    assert status["version"] == running_version
    if ROOT:
        import pwd

        uid = pwd.getpwnam(user_name(NAME)).pw_uid
        theirs = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                  if _owner(pid) == uid and alive(pid)]
        assert theirs == [status["pid"]], theirs
    return status


def _owner(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def raw_install(guest, upload, bundle):
    """Send guest-extension-install and return at once (the reply is not awaited)."""
    guest.client.close()  # the agent serves one client at a time
    statement, signature = detached(bundle)
    request = {"execute": "guest-extension-install", "arguments": {
        "upload": upload, "statement": base64.b64encode(statement).decode(),
        "signature": base64.b64encode(signature).decode()}}
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(guest.agent.sock))
    sock.sendall(json.dumps(request).encode() + b"\n")
    return sock


def upload_all(client, bundle, chunk=4 << 20):
    data = bundle.read_bytes()
    upload = client.call("guest-extension-upload", {"size": len(data)})["upload"]
    for offset in range(0, len(data), chunk):
        client.call("guest-extension-upload", {
            "upload": upload, "offset": offset,
            "data": base64.b64encode(data[offset:offset + chunk]).decode()})
    return upload


# Verifying and unpacking the 8 MiB bundle takes about 70 ms here; the new
# version then takes 3 s to say it is ready.  The kills land before, during
# and after the switch.
DELAYS = [0.0, 0.015, 0.03, 0.05, 0.15]


@pytest.fixture(scope="module")
def big(bundles):
    """Bundles with 8 MiB of incompressible data, slow to be ready."""
    blob = {"data/blob.bin": os.urandom(8 << 20)}
    return [bundles.build(f"2.0.{n}", counter=100 + n, extra_files=blob, script=SLOW_READY)
            for n in range(len(DELAYS) + 1)]


@pytest.mark.parametrize("delay", DELAYS)
def test_sigkill_during_verification_extraction_or_switch(guest, bundles, big, delay):
    guest.client.push(bundles.build("1.0.0", counter=10))
    bundle = big[DELAYS.index(delay)]
    upload = upload_all(guest.client, bundle)
    sock = raw_install(guest, upload, bundle)
    time.sleep(delay)
    guest.kill()
    sock.close()
    guest.start()
    store = guest.workdir / "state" / "extensions"
    index = json.loads((store / "index.json").read_text())["extensions"][NAME]
    # Before the switch the new version never counted; after it, the restart rolled it back.
    check_consistent(guest, "1.0.0")
    assert index["current"].endswith("-1.0.0")
    install = index["install"]
    assert install["state"] == "done" and install["version"] == "1.0.0" \
        or install["state"] == "rolled-back" and "interrupted" in install["error"], install
    print(f"killed after {delay} s: install record {install['state']} {install['version']}")
    assert guest.client.ext_call(NAME, "greet", {"who": "x"})["count"] == 1


def test_sigkill_before_the_new_version_is_ready(guest, bundles):
    client = guest.client
    client.push(bundles.build("1.0.0", counter=10))
    client.ext_call(NAME, "greet", {"who": "x"})
    record = client.push(bundles.build("1.1.0", counter=11, script=SLOW_READY), wait=False)
    assert record["state"] == "installing"
    time.sleep(0.5)
    assert guest.status()["version"] == "1.1.0"
    guest.kill()
    guest.start()
    status = check_consistent(guest, "1.0.0")
    assert status["install"]["state"] == "rolled-back"
    assert "interrupted" in status["install"]["error"]
    assert status["counter"] == 11
    assert guest.client.ext_call(NAME, "greet", {"who": "x"})["count"] == 2


def test_sigkill_during_the_upload_then_resume(guest, bundles, big):
    client = guest.client
    client.push(bundles.build("1.0.0", counter=10))
    bundle = big[-1]
    data = bundle.read_bytes()
    upload = client.call("guest-extension-upload", {"size": len(data)})["upload"]
    chunk = 4 << 20
    client.call("guest-extension-upload", {"upload": upload, "offset": 0,
                                           "data": base64.b64encode(data[:chunk]).decode()})
    guest.kill()
    guest.start()
    check_consistent(guest, "1.0.0")
    client = guest.client
    offset = client.call("guest-extension-upload", {"upload": upload})["offset"]
    assert offset == chunk
    while offset < len(data):
        offset = client.call("guest-extension-upload", {
            "upload": upload, "offset": offset,
            "data": base64.b64encode(data[offset:offset + chunk]).decode()})["offset"]
    statement, signature = detached(bundle)
    client.call("guest-extension-install", {
        "upload": upload, "statement": base64.b64encode(statement).decode(),
        "signature": base64.b64encode(signature).decode()})
    assert client.wait_install(NAME)["state"] == "done"
    check_consistent(guest, f"2.0.{len(DELAYS)}")


def test_an_agent_restarted_frozen_leaves_the_store_alone_until_the_thaw(guest, bundles):
    client = guest.client
    client.push(bundles.build("1.0.0", counter=10))
    assert client.push(bundles.build("1.1.0", counter=11, script=SLOW_READY),
                       wait=False)["state"] == "installing"
    guest.kill()
    index_path = guest.workdir / "state" / "extensions" / "index.json"
    before = index_path.read_bytes()
    (guest.workdir / "state" / "qga.state.isfrozen").touch()  # as after a crash while frozen
    guest.start()
    time.sleep(1.0)
    assert index_path.read_bytes() == before  # nothing written while frozen
    with pytest.raises(AgentError, match="has been disabled: the agent is in frozen state"):
        guest.client.ext_status(NAME)
    assert guest.client.call("guest-fsfreeze-thaw") == 0
    status = check_consistent(guest, "1.0.0")  # now the interrupted switch is rolled back
    assert status["install"]["state"] == "rolled-back"
