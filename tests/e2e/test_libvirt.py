"""libvirt drives the agent in a real guest, and cannot tell ours from qemu-ga.

A private libvirtd (``tests/e2e/libvirt_host.py``) boots the same guest
twice, side by side: once with the real qemu-ga serving the agent channel,
once with our agent.  The same ``virsh`` commands run against both, in the
same order, and each test compares one command's outcome (exit status and
normalised output) between the two.  qemu-ga must succeed too: a check that
fails with the reference agent proves nothing.

What is normalised: the domain name (they differ), and values that change
from run to run (the guest's clock, a password hash's salt).
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Tuple

import pytest

from tests.e2e.conftest import unavailable
from tests.e2e.libvirt_host import PrivateLibvirt, domain_xml, libvirt_missing_reason
from tests.support.guest_image import GUEST_USER, cache_root, guest_initrd
from tests.support.vm import GUEST_DATA_MOUNT, make_data_disk

pytestmark = pytest.mark.e2e

AGENTS = ("qemu-ga", "qga")
AGENT_READY_TIMEOUT = 90.0
SHUTDOWN_TIMEOUT = 30.0
CRYPTED_PASSWORD = "$6$e2esalt$" + "x" * 86

# Checks that fail with qemu-ga too, and must fail the same way with ours.
EXPECTED_FAILURES = {
    "set-user-password for an unknown user",
    # libvirt itself refuses: "specifying mountpoints is not supported" for thaw.
    "domfsthaw --mountpoint",
}


class Outcome(NamedTuple):
    status: int
    output: str

    @property
    def ok(self) -> bool:
        return self.status == 0


Check = Callable[[PrivateLibvirt, str], Outcome]


def _normalise(text: str, domain: str) -> str:
    return text.replace(domain, "DOMAIN").strip()


def virsh_outcome(daemon: PrivateLibvirt, domain: str, *args: str) -> Outcome:
    done = daemon.virsh(*args)
    return Outcome(done.returncode, _normalise(done.stdout + done.stderr, domain))


def agent_command(daemon: PrivateLibvirt, domain: str, execute: str, **arguments) -> Outcome:
    request: Dict[str, object] = {"execute": execute}
    if arguments:
        request["arguments"] = arguments
    return virsh_outcome(daemon, domain, "qemu-agent-command", domain, json.dumps(request))


def guest_run(daemon: PrivateLibvirt, domain: str, script: str) -> Outcome:
    """Run a shell script in the guest through the agent (guest-exec + status polling)."""
    started = agent_command(daemon, domain, "guest-exec", path="/bin/sh", arg=["-c", script],
                            **{"capture-output": True})
    if not started.ok:
        return started
    pid = json.loads(started.output)["return"]["pid"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = agent_command(daemon, domain, "guest-exec-status", pid=pid)
        if not status.ok:
            return status
        reply = json.loads(status.output)["return"]
        if reply["exited"]:
            return Outcome(reply.get("exitcode", -1),
                           base64.b64decode(reply.get("out-data", "")).decode())
        time.sleep(0.05)
    return Outcome(-1, "guest program still running")


def _shadow_entry(daemon: PrivateLibvirt, domain: str) -> Outcome:
    found = guest_run(daemon, domain, f"grep '^{GUEST_USER}:' /etc/shadow")
    fields = found.output.split(":")
    return Outcome(found.status, ":".join(fields[:2]) if len(fields) > 1 else found.output)


def _salted(outcome: Outcome) -> Outcome:
    """``user:$id$salt$hash`` -> ``user:$id$...`` (the salt is random)."""
    return Outcome(outcome.status, re.sub(r"(\$[^$]+\$).*", r"\1...", outcome.output))


def _without_numbers(outcome: Outcome) -> Outcome:
    return Outcome(outcome.status, re.sub(r"\d+", "N", outcome.output))


def _shutdown(daemon: PrivateLibvirt, domain: str) -> Outcome:
    requested = virsh_outcome(daemon, domain, "shutdown", "--mode", "agent", domain)
    if not requested.ok:
        return requested
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT
    while time.monotonic() < deadline:
        if domain not in daemon.domain_names():
            return Outcome(0, requested.output + "\n(domain gone)")
        time.sleep(0.1)
    return Outcome(1, requested.output + f"\n(domain still there after {SHUTDOWN_TIMEOUT} s)")


def _checks() -> List[Tuple[str, Check]]:
    """The checks in the order they run (the freeze checks and shutdown depend on it)."""
    def v(*args: str) -> Check:
        return lambda daemon, domain: virsh_outcome(
            daemon, domain, *(domain if arg == "DOMAIN" else arg for arg in args))

    def agent(execute: str, **arguments) -> Check:
        return lambda daemon, domain: agent_command(daemon, domain, execute, **arguments)

    checks: List[Tuple[str, Check]] = [
        ("qemu-agent-command guest-ping", agent("guest-ping")),
        ("qemu-agent-command guest-get-osinfo", agent("guest-get-osinfo")),
        ("qemu-agent-command guest-get-host-name", agent("guest-get-host-name")),
        ("guestinfo (all types)", v("guestinfo", "DOMAIN")),
    ]
    for kind in ("user", "os", "timezone", "hostname", "filesystem", "disk", "interface"):
        checks.append((f"guestinfo --{kind}", v("guestinfo", "DOMAIN", f"--{kind}")))
    checks += [
        ("domhostname --source agent", v("domhostname", "DOMAIN", "--source", "agent")),
        ("domfsinfo", v("domfsinfo", "DOMAIN")),
        ("domfsfreeze", v("domfsfreeze", "DOMAIN")),
        ("fsfreeze status after domfsfreeze", agent("guest-fsfreeze-status")),
        ("domfsthaw", v("domfsthaw", "DOMAIN")),
        ("fsfreeze status after domfsthaw", agent("guest-fsfreeze-status")),
        ("domfsfreeze --mountpoint", v("domfsfreeze", "DOMAIN", "--mountpoint", GUEST_DATA_MOUNT)),
        ("fsfreeze status after domfsfreeze --mountpoint", agent("guest-fsfreeze-status")),
        ("domfsthaw --mountpoint", v("domfsthaw", "DOMAIN", "--mountpoint", GUEST_DATA_MOUNT)),
        ("domfsthaw after domfsthaw --mountpoint", v("domfsthaw", "DOMAIN")),
        ("domfstrim", v("domfstrim", "DOMAIN")),
        ("domifaddr --source agent", v("domifaddr", "DOMAIN", "--source", "agent")),
        ("domifaddr --source agent --full",
         v("domifaddr", "DOMAIN", "--source", "agent", "--full")),
        ("domtime", lambda d, n: _without_numbers(virsh_outcome(d, n, "domtime", n))),
        ("domtime --now", v("domtime", "DOMAIN", "--now")),
        ("domtime --sync", v("domtime", "DOMAIN", "--sync")),
        ("set-user-password", v("set-user-password", "DOMAIN", GUEST_USER, "e2e-Secret-1")),
        ("shadow entry after set-user-password", lambda d, n: _salted(_shadow_entry(d, n))),
        ("set-user-password --encrypted",
         v("set-user-password", "DOMAIN", GUEST_USER, CRYPTED_PASSWORD, "--encrypted")),
        ("shadow entry after set-user-password --encrypted", _shadow_entry),
        ("set-user-password for an unknown user",
         v("set-user-password", "DOMAIN", "nosuchuser", "e2e-Secret-1")),
        ("guestvcpus", v("guestvcpus", "DOMAIN")),
        ("shutdown --mode agent", _shutdown),
    ]
    return checks


CHECKS = _checks()


def _boot(daemon: PrivateLibvirt, image, workdir: Path, agent: str) -> str:
    directory = workdir / agent
    directory.mkdir()
    initrd = guest_initrd(image, directory)
    disk = make_data_disk(directory / "data.img")
    name = f"qga-e2e-{agent}"
    xml = directory / "domain.xml"
    xml.write_text(domain_xml(name, image.kernel, initrd, disk, directory / "console.log", agent))
    created = daemon.virsh("create", str(xml))
    if created.returncode != 0:
        raise RuntimeError(f"virsh create failed: {created.stderr}\n{daemon.log_tail()}")
    return name


def _wait_until_answering(daemon: PrivateLibvirt, names: Dict[str, str],
                          timeout: float) -> Dict[str, float]:
    """Seconds from now until each domain's agent answers libvirt's guest-ping."""
    started = time.monotonic()
    ready: Dict[str, float] = {}
    while len(ready) < len(names):
        for agent, name in names.items():
            if agent in ready:
                continue
            if agent_command(daemon, name, "guest-ping").ok:
                ready[agent] = time.monotonic() - started
        if time.monotonic() - started > timeout:
            missing = sorted(set(names) - set(ready))
            raise TimeoutError(f"agents {missing} not answering libvirt after {timeout} s")
        time.sleep(0.1)
    return ready


@pytest.fixture(scope="module")
def libvirt(module_workdir):
    reason = libvirt_missing_reason()
    if reason:
        unavailable(reason)
    daemon = PrivateLibvirt(module_workdir / "libvirt", cache_root() / "libvirt-cache")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def outcomes(libvirt, guest_image, module_workdir, measure) -> Dict[str, Dict[str, Outcome]]:
    """Boot both guests side by side, then run every check on each, in order."""
    names = {}
    started = time.monotonic()
    for agent in AGENTS:
        names[agent] = _boot(libvirt, guest_image, module_workdir, agent)
    measure("libvirt: virsh create of both domains (s)", time.monotonic() - started)
    try:
        ready = _wait_until_answering(libvirt, names, AGENT_READY_TIMEOUT)
    except TimeoutError as error:
        consoles = {agent: (module_workdir / agent / "console.log").read_text(errors="replace")
                    for agent in AGENTS}
        raise AssertionError(f"{error}\nconsoles: {consoles}") from None
    for agent, seconds in ready.items():
        measure(f"libvirt: {agent} answers guest-ping, after both creates (s)", seconds)
    results: Dict[str, Dict[str, Outcome]] = {}
    for agent, name in names.items():
        results[agent] = {}
        for check_name, check in CHECKS:
            check_started = time.monotonic()
            results[agent][check_name] = check(libvirt, name)
            if check_name == "shutdown --mode agent":
                measure(f"libvirt: {agent} shutdown --mode agent -> domain gone (s)",
                        time.monotonic() - check_started)
    (module_workdir / "outcomes.json").write_text(json.dumps(results, indent=1))
    return results


@pytest.mark.parametrize("check", [name for name, _ in CHECKS])
def test_virsh_sees_qga_as_it_sees_qemu_ga(outcomes, check):
    reference = outcomes["qemu-ga"][check]
    ours = outcomes["qga"][check]
    expect_failure = check in EXPECTED_FAILURES
    assert reference.ok != expect_failure, f"qemu-ga itself: {reference}"
    assert ours == reference


def test_checks_saw_the_guest(outcomes):
    """The comparisons are not vacuous: the outputs hold what the guest really has."""
    ours = outcomes["qga"]
    assert '"return":{}' in ours["qemu-agent-command guest-ping"].output.replace(" ", "")
    assert GUEST_DATA_MOUNT in ours["domfsinfo"].output
    assert "192.0.2.10/24" in ours["domifaddr --source agent"].output
    assert "Froze 1 filesystem" in ours["domfsfreeze"].output
    assert '"frozen"' in ours["fsfreeze status after domfsfreeze"].output
    assert '"thawed"' in ours["fsfreeze status after domfsthaw"].output
    assert ours["shadow entry after set-user-password --encrypted"].output == \
        f"{GUEST_USER}:{CRYPTED_PASSWORD}"
    assert ours["shadow entry after set-user-password"].output.startswith(f"{GUEST_USER}:$")
    assert "domain gone" in ours["shutdown --mode agent"].output
