"""Network interfaces and routes: this machine against ``ip`` and /proc, and hand-made netlink messages.

``tests/compat/test_inventory.py`` compares both commands with qemu-ga in a
network namespace with labels, peers, tunnels and taps.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess

import pytest

from qga.commands import Context
from qga.commands import network
from qga.errors import CommandError
from tests.support.replies import validate_return


@pytest.fixture
def ctx():
    context = Context(config=None, state=None)
    yield context
    context.close()


def proc_net_dev():
    counters = {}
    with open("/proc/net/dev") as stream:
        for line in stream.readlines()[2:]:
            name, _, values = line.partition(":")
            counters[name.strip()] = [int(value) for value in values.split()]
    return counters


def expected_mac(link: dict) -> str:
    """What SIOCGIFHWADDR gives: six bytes of the link address, zero-padded."""
    text = link.get("address") or ""
    if not text:
        raw = b""
    elif all(len(part) == 2 for part in text.split(":")):
        raw = bytes.fromhex(text.replace(":", ""))
    elif "." in text:
        raw = socket.inet_aton(text)  # IPv4 tunnels print their address this way
    else:
        raw = socket.inet_pton(socket.AF_INET6, text)
    return ":".join("%02x" % byte for byte in (raw + b"\0" * 6)[:6])


def test_interfaces_of_this_machine_match_ip(ctx):
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    reply = network.get_interfaces(ctx)
    links = json.loads(subprocess.run(["ip", "-j", "addr"], check=True, capture_output=True,
                                      text=True).stdout)
    expected = []
    labels = []
    for link in links:
        entry = {"name": link["ifname"], "hardware-address": expected_mac(link), "ip-addresses": []}
        expected.append(entry)
        for info in link.get("addr_info", []):
            family = {"inet": "ipv4", "inet6": "ipv6"}.get(info["family"])
            if family is None:
                continue
            item = {"ip-address": info["local"], "ip-address-type": family, "prefix": info["prefixlen"]}
            if info.get("label", link["ifname"]) != link["ifname"]:
                labels.append((info["label"], item))
            else:
                entry["ip-addresses"].append(item)
    for label, item in labels:
        entry = next((entry for entry in expected if entry["name"] == label), None)
        if entry is None:
            link = next((entry for entry in expected if entry["name"] == label.split(":")[0]), None)
            entry = {"name": label, "hardware-address": link and link["hardware-address"],
                     "ip-addresses": []}
            expected.append(entry)
        entry["ip-addresses"].append(item)

    assert [entry["name"] for entry in reply] == [entry["name"] for entry in expected]
    counters = proc_net_dev()
    for entry, want in zip(reply, expected):
        if want["hardware-address"] is not None:
            assert entry["hardware-address"] == want["hardware-address"]
        assert entry.get("ip-addresses", []) == want["ip-addresses"]
        if entry.get("ip-addresses") and entry["name"] in counters:
            values = counters[entry["name"]]
            stats = entry["statistics"]
            assert 0 <= values[0] - stats["rx-bytes"] < 1 << 24  # counters only grow
            assert 0 <= values[8] - stats["tx-bytes"] < 1 << 24
            assert stats["rx-errs"] <= values[2] and stats["tx-dropped"] <= values[11]
        else:
            assert "statistics" not in entry
        assert list(entry) == list([key for key in ("name", "hardware-address", "ip-addresses",
                                                           "statistics") if key in entry])
    validate_return(None, "guest-network-get-interfaces", reply)


def test_the_netlink_socket_is_kept_and_reopened(ctx):
    first = network.get_interfaces(ctx)
    service = ctx.existing_service(network.RouteSocket)
    assert service is not None and service._sock is not None
    kept = service._sock
    assert [entry["name"] for entry in network.get_interfaces(ctx)] == [entry["name"] for entry in first]
    assert service._sock is kept
    service.close()
    assert [entry["name"] for entry in network.get_interfaces(ctx)] == [entry["name"] for entry in first]


# -- hand-made netlink messages ----------------------------------------------------------------


def attribute(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def link_message(index: int, name: str, address: bytes = None, stats: tuple = None):
    body = struct.pack("=BxHiII", 0, 1, index, 0, 0)
    body += attribute(network.IFLA_IFNAME, name.encode() + b"\0")
    body += attribute(13, struct.pack("=I", 1000))  # IFLA_TXQLEN, to be skipped
    if address is not None:
        body += attribute(network.IFLA_ADDRESS, address)
    if stats is not None:
        body += attribute(network.IFLA_STATS64, struct.pack("=24Q", *stats))
    return (network.RTM_NEWLINK, body, 0, len(body))


def address_message(family: int, prefixlen: int, index: int, address: bytes = None, local: bytes = None,
                    label: str = None):
    body = struct.pack("=BBBBI", family, prefixlen, 0, 0, index)
    if address is not None:
        body += attribute(network.IFA_ADDRESS, address)
    if local is not None:
        body += attribute(network.IFA_LOCAL, local)
    if label is not None:
        body += attribute(network.IFA_LABEL, label.encode() + b"\0")
    body += attribute(8, struct.pack("=I", 0))  # IFA_FLAGS
    return (network.RTM_NEWADDR, body, 0, len(body))


def ipv4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def ipv6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def test_interfaces_from_netlink_messages_follow_getifaddrs_rules():
    stats = tuple(range(1, 25))  # rx_packets=1, tx_packets=2, rx_bytes=3, ...
    links = [
        link_message(1, "lo", b"\0" * 6, stats),
        link_message(3, "eth0", bytes.fromhex("525400123456"), stats),
        link_message(4, "tun0", None, stats),  # no link address at all
        link_message(5, "ib0", bytes(range(20)), stats),  # long (InfiniBand) address
    ]
    addresses = [
        address_message(socket.AF_INET, 8, 1, ipv4("127.0.0.1"), ipv4("127.0.0.1"), "lo"),
        address_message(socket.AF_INET, 24, 3, ipv4("10.0.0.2"), ipv4("10.0.0.2"), "eth0"),
        address_message(socket.AF_INET, 32, 3, ipv4("10.9.9.9"), ipv4("10.0.0.5"), "eth0"),  # peer
        address_message(socket.AF_INET, 16, 1, ipv4("127.1.0.1"), ipv4("127.1.0.1"), "lo:7"),
        address_message(socket.AF_INET, 40, 3, ipv4("10.1.1.1"), ipv4("10.1.1.1"), "eth0"),
        address_message(socket.AF_INET, 24, 9, ipv4("10.7.7.7"), ipv4("10.7.7.7"), "gone"),
        address_message(socket.AF_INET6, 64, 3, ipv6("fe80::1")),
        address_message(socket.AF_INET6, 128, 3, ipv6("2001:db8::9"), ipv6("2001:db8::1")),
        address_message(socket.AF_INET6, 64, 4, None),  # no address: no entry
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        reply = network._build_interfaces(sock, links, addresses)
    counters = {"rx-bytes": 3, "rx-packets": 1, "rx-errs": 5, "rx-dropped": 7 + 16,
                "tx-bytes": 4, "tx-packets": 2, "tx-errs": 6, "tx-dropped": 8}
    assert reply == [
        {"name": "lo", "hardware-address": "00:00:00:00:00:00", "statistics": counters,
         "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}]},
        {"name": "eth0", "hardware-address": "52:54:00:12:34:56", "statistics": counters,
         "ip-addresses": [
             {"ip-address": "10.0.0.2", "ip-address-type": "ipv4", "prefix": 24},
             {"ip-address": "10.0.0.5", "ip-address-type": "ipv4", "prefix": 32},
             {"ip-address": "10.1.1.1", "ip-address-type": "ipv4", "prefix": 32},
             {"ip-address": "fe80::1", "ip-address-type": "ipv6", "prefix": 64},
             {"ip-address": "2001:db8::1", "ip-address-type": "ipv6", "prefix": 128}]},
        {"name": "tun0", "hardware-address": "00:00:00:00:00:00"},
        {"name": "ib0", "hardware-address": "00:01:02:03:04:05"},
        # A label is an interface of its own, without counters; the ioctl
        # finds the hardware address of the link behind the label.
        {"name": "lo:7", "hardware-address": "00:00:00:00:00:00",
         "ip-addresses": [{"ip-address": "127.1.0.1", "ip-address-type": "ipv4", "prefix": 16}]},
    ]
    assert [list(entry) for entry in reply][1] == list(["name", "hardware-address", "ip-addresses",
                                                               "statistics"])
    assert list(reply[1]["statistics"]) == list(["rx-bytes", "rx-packets", "rx-errs", "rx-dropped",
                                                        "tx-bytes", "tx-packets", "tx-errs", "tx-dropped"])
    for item in reply[1]["ip-addresses"]:
        assert list(item) == list(["ip-address", "ip-address-type", "prefix"])
    validate_return(None, "guest-network-get-interfaces", reply)


# -- routes ------------------------------------------------------------------------------------------

IPV4_ROUTES = (
    b"Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    b"eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
    b"eth0\t000200C0\t00000000\t0001\t0\t7\t0\t00FFFFFF\t1500\t0\t0\n"
    b"broken line\n"
)
IPV6_ROUTES = (
    b"fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
    b"00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
    b"00000000000000000000000000000001 80 00000000000000000000000000000000 00 "
    b"00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo\n"
    b"00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    b"00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n"
    b"zz 00 00 00 00 0 0 0 0 x\n"
)


def test_ipv4_routes():
    routes = network.parse_ipv4_routes(IPV4_ROUTES)
    assert routes == [
        {"iface": "eth0", "destination": "0.0.0.0", "metric": 100, "gateway": "192.0.2.1",
         "mask": "0.0.0.0", "irtt": 0, "flags": 3, "refcnt": 0, "use": 0, "window": 0, "mtu": 0,
         "version": 4},
        {"iface": "eth0", "destination": "192.0.2.0", "metric": 0, "gateway": "0.0.0.0",
         "mask": "255.255.255.0", "irtt": 0, "flags": 1, "refcnt": 0, "use": 7, "window": 0,
         "mtu": 1500, "version": 4},
    ]
    validate_return(None, "guest-network-get-route", routes)


def test_ipv6_routes_keep_qemu_ga_integer_types():
    routes = network.parse_ipv6_routes(IPV6_ROUTES)
    assert routes[0] == {"iface": "eth0", "destination": "fd00::", "metric": 256, "flags": 1,
                         "refcnt": 1, "use": 0, "desprefixlen": "64", "source": "::",
                         "srcprefixlen": "0", "nexthop": "::", "version": 6}
    # RTF_LOCAL sets the top bit: qemu-ga reads flags into an int, then a uint64.
    assert routes[1]["flags"] == 2**64 - 0x7FDFFFFF
    assert routes[1]["desprefixlen"] == "128"
    # The metric of an unreachable route is 0xffffffff, an int -1 in qemu-ga.
    assert routes[2]["metric"] == -1
    assert len(routes) == 3
    assert list(routes[0]) == list(["iface", "destination", "metric", "flags", "refcnt", "use",
                                           "desprefixlen", "source", "srcprefixlen", "nexthop", "version"])
    validate_return(None, "guest-network-get-route", routes)


def test_routes_of_this_machine(ctx):
    routes = network.get_route(ctx)
    with open("/proc/net/route") as stream:
        ipv4_lines = [line for line in stream.readlines()[1:] if line.strip()]
    try:
        with open("/proc/net/ipv6_route") as stream:
            ipv6_lines = [line for line in stream if line.strip()]
    except FileNotFoundError:
        pytest.skip("IPv6 is disabled here (qemu-ga then fails the command)")
    assert [route["version"] for route in routes] == [4] * len(ipv4_lines) + [6] * len(ipv6_lines)
    assert [route["iface"] for route in routes] == [line.split()[0] for line in ipv4_lines] + \
        [line.split()[9] for line in ipv6_lines]
    validate_return(None, "guest-network-get-route", routes)


def test_missing_route_table_fails_with_the_first_error(ctx, monkeypatch, tmp_path):
    monkeypatch.setattr(network, "PROC_NET_IPV6_ROUTE", str(tmp_path / "ipv6_route"))
    with pytest.raises(CommandError) as caught:
        network.get_route(ctx)
    assert caught.value.desc == f'open("{tmp_path}/ipv6_route"): No such file or directory'
