"""Network inventory: interfaces with addresses and counters, and the routing table.

``guest-network-get-interfaces`` mirrors qemu-ga, which walks glibc's
``getifaddrs()`` list.  We ask the kernel the same two questions glibc asks,
over one rtnetlink socket (a link dump, then an address dump), and apply
glibc's rules to the answers, so the reply has qemu-ga's order and content:

* every link is an interface, in the kernel's link order; an IPv4 address
  with a label (``eth0:1``) makes an interface of its own, after the links;
* an address is ``IFA_LOCAL`` when present, else ``IFA_ADDRESS``; the prefix
  is the prefix length, capped at 32/128; IPv4 addresses come before IPv6;
* the hardware address is what ``SIOCGIFHWADDR`` returns: the first six
  bytes of the link address, zero-padded (so ``00:00:00:00:00:00`` for
  loopback and tunnels); for a link we read it from the link dump, for a
  label we ask the ioctl as qemu-ga does;
* counters only for interfaces that have an address, as in qemu-ga; it
  reads them from ``/proc/net/dev``, we take the same numbers from the link
  dump (``IFLA_STATS64``), which saves reading and parsing a second file.

``guest-network-get-route`` reads ``/proc/net/route`` and
``/proc/net/ipv6_route`` as upstream qemu-ga (9.1+) does, including its C
integer types: IPv6 metrics, flags and counters are read into 32-bit signed
ints, so a local route's flags ``0x80200001`` come out as a wrapped uint64.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Dict, List, Optional, Tuple

from qga.commands import command
from qga.commands.system import read_file
from qga.errors import CommandError

PROC_NET_ROUTE = "/proc/net/route"
PROC_NET_IPV6_ROUTE = "/proc/net/ipv6_route"

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_addr.h>, <linux/if_link.h>
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_STATS64 = 23
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
SIOCGIFHWADDR = 0x8927

_NLMSGHDR = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFINDEX = struct.Struct("=i")
_STATS64 = struct.Struct("=16Q")
_IFADDRMSG = struct.Struct("=BBBBI")
# A dump the kernel flags as interrupted (links or addresses changed
# meanwhile) is taken again, a few times at most.
DUMP_ATTEMPTS = 3
RECV_TIMEOUT = 5  # seconds
# Room for a whole dump batch; the kernel fills at most this much per read.
_RECV_SIZE = 1 << 16


def _errno_text(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else "Success"


# -- rtnetlink --------------------------------------------------------------------


def _dump(sock: socket.socket, request_type: int, sequence: int) -> Tuple[list, bool]:
    """Send one dump request (family AF_UNSPEC, as glibc does) and collect the messages.

    Returns ``(type, buffer, payload offset, message end)`` for each message,
    and whether the kernel flagged the dump as interrupted by a change (glibc
    then starts over).
    """
    request = _NLMSGHDR.pack(20, request_type, NLM_F_REQUEST | NLM_F_DUMP, sequence, 0) + b"\0" * 4
    sock.sendto(request, (0, 0))
    messages = []
    interrupted = False
    while True:
        data = sock.recv(_RECV_SIZE)
        offset = 0
        while offset + 16 <= len(data):
            length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < 16 or offset + length > len(data):
                break
            if seq == sequence:
                if kind == NLMSG_DONE:
                    return messages, interrupted
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + 16)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                else:
                    interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                    messages.append((kind, data, offset + 16, offset + length))
            offset += (length + 3) & ~3


def _mac_text(raw: bytes) -> str:
    return (raw + b"\0" * 6)[:6].hex(":")


def _ioctl_hardware_address(sock: socket.socket, name: str) -> Optional[str]:
    import fcntl

    request = struct.pack("16s24x", name.encode("utf-8", "surrogateescape")[:15])
    try:
        reply = fcntl.ioctl(sock, SIOCGIFHWADDR, request)
    except OSError:
        return None  # qemu-ga only logs this
    return _mac_text(reply[18:24])


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class RouteSocket:
    """The agent's rtnetlink socket, opened on first use and kept.

    A fresh netlink socket costs more than the dumps themselves, so one
    socket serves every ``guest-network-get-interfaces``.  Replies of an
    abandoned dump are told apart by their sequence numbers.
    """

    def __init__(self, ctx=None) -> None:
        self._sock: Optional[socket.socket] = None
        self._sequence = 0

    def dumps(self) -> Tuple[socket.socket, list, list]:
        """A consistent (link dump, address dump) pair and the socket for ioctls."""
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 socket.NETLINK_ROUTE)
            try:
                sock.bind((0, 0))
                # The kernel answers a dump at once; a bound on the wait
                # keeps the single-threaded agent safe all the same, without
                # the extra poll() a Python-level timeout costs per read.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", RECV_TIMEOUT, 0))
            except OSError:
                sock.close()
                raise
            self._sock = sock
        try:
            for _attempt in range(DUMP_ATTEMPTS):
                links, links_interrupted = _dump(self._sock, RTM_GETLINK, self._next())
                addresses, addresses_interrupted = _dump(self._sock, RTM_GETADDR, self._next())
                if not (links_interrupted or addresses_interrupted):
                    break
        except OSError:
            self.close()
            raise
        return self._sock, links, addresses

    def _next(self) -> int:
        self._sequence = self._sequence % 0x7FFFFFFF + 1
        return self._sequence

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def read_interfaces(ctx) -> List[dict]:
    """``guest-network-get-interfaces``: see the module documentation."""
    try:
        sock, links, addresses = ctx.service(RouteSocket).dumps()
    except OSError as error:
        raise CommandError("getifaddrs failed: " + _errno_text(error)) from None
    return _build_interfaces(sock, links, addresses)


def _link_attributes(data: bytes, offset: int, end: int) -> Tuple[Optional[bytes], bytes, Optional[bytes]]:
    """IFLA_IFNAME, IFLA_ADDRESS (b"" when absent) and IFLA_STATS64 of a link message.

    A link message carries some forty attributes; the ones wanted come
    early, so the scan stops once it has them all.
    """
    name = stats = None
    address = b""
    unpack = _RTATTR.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            break
        if kind == IFLA_IFNAME:
            name = data[offset + 4:offset + length]
        elif kind == IFLA_ADDRESS:
            address = data[offset + 4:offset + length]
        elif kind == IFLA_STATS64:
            stats = data[offset + 4:offset + length]
            if name is not None:
                break  # the address, if any, comes before the counters
        offset += (length + 3) & ~3
    return name, address, stats


def _statistics(raw: Optional[bytes]) -> Optional[dict]:
    """The reply's counters from a ``struct rtnl_link_stats64``.

    These are the numbers ``/proc/net/dev`` prints (both come from
    ``dev_get_stats()``), where qemu-ga reads them: its receive "drop"
    column is ``rx_dropped + rx_missed_errors``.
    """
    if raw is None or len(raw) < 128:
        return None
    values = _STATS64.unpack_from(raw)
    return {
        "rx-bytes": values[2], "rx-packets": values[0],
        "rx-errs": values[4], "rx-dropped": (values[6] + values[15]) % 2**64,
        "tx-bytes": values[3], "tx-packets": values[1],
        "tx-errs": values[5], "tx-dropped": values[7],
    }


def _build_interfaces(sock, links, addresses) -> List[dict]:
    # name -> [hardware address, ip-addresses, statistics], in getifaddrs order
    interfaces: Dict[str, list] = {}
    link_names: Dict[int, str] = {}
    link_stats: Dict[str, Optional[bytes]] = {}
    for kind, data, offset, end in links:
        if kind != RTM_NEWLINK:
            continue
        index = _IFINDEX.unpack_from(data, offset + 4)[0]
        raw_name, address, stats = _link_attributes(data, offset + _IFINFOMSG.size, end)
        if raw_name is None:
            continue
        name = _name(raw_name)
        link_names[index] = name
        if name not in interfaces:
            interfaces[name] = [_mac_text(address), [], None]
            link_stats[name] = stats

    unpack = _RTATTR.unpack_from
    inet_ntop = socket.inet_ntop
    for kind, data, offset, end in addresses:
        if kind != RTM_NEWADDR:
            continue
        family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(data, offset)
        if index not in link_names:
            continue  # glibc drops addresses of links it has not seen
        local = address = label = None
        position = offset + _IFADDRMSG.size
        while position + 4 <= end:
            length, attr = unpack(data, position)
            if length < 4:
                break
            if attr == IFA_ADDRESS:
                address = data[position + 4:position + length]
            elif attr == IFA_LOCAL:
                local = data[position + 4:position + length]
            elif attr == IFA_LABEL:
                label = data[position + 4:position + length]
                break  # the kernel puts the label after both addresses
            position += (length + 3) & ~3
        name = _name(label) if label is not None else link_names[index]
        interface = interfaces.get(name)
        if interface is None:
            interface = interfaces[name] = [None, [], None]
        if interface[0] is None:
            interface[0] = _ioctl_hardware_address(sock, name)
        raw = local if local is not None else address
        if raw is None:
            continue
        if family == socket.AF_INET and len(raw) >= 4:
            interface[1].append({"ip-address": inet_ntop(family, raw[:4]), "ip-address-type": "ipv4",
                                 "prefix": min(prefixlen, 32)})
        elif family == socket.AF_INET6 and len(raw) >= 16:
            interface[1].append({"ip-address": inet_ntop(family, raw[:16]), "ip-address-type": "ipv6",
                                 "prefix": min(prefixlen, 128)})
        else:
            continue
        if interface[2] is None:
            # Counters exist for link names only, as /proc/net/dev lists
            # links and not labels.
            interface[2] = _statistics(link_stats.get(name))
    reply = []
    for name, (hardware_address, ip_addresses, statistics) in interfaces.items():
        entry: dict = {"name": name}
        if hardware_address is not None:
            entry["hardware-address"] = hardware_address
        if ip_addresses:
            entry["ip-addresses"] = ip_addresses
        if statistics is not None:
            entry["statistics"] = statistics
        reply.append(entry)
    return reply


@command("guest-network-get-interfaces")
def get_interfaces(ctx) -> list:
    return read_interfaces(ctx)


# -- guest-network-get-route ----------------------------------------------------------


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _ipv4_text(value: int) -> str:
    # The kernel prints the address as a host-order (little-endian) number.
    return "%u.%u.%u.%u" % (value & 0xFF, value >> 8 & 0xFF, value >> 16 & 0xFF, value >> 24 & 0xFF)


def _ipv6_text(hexdigits: bytes) -> Optional[str]:
    if len(hexdigits) != 32:
        return None
    try:
        return socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexdigits.decode("ascii")))
    except ValueError:
        return None


def parse_ipv4_routes(text: bytes) -> List[dict]:
    routes = []
    for line in text.split(b"\n")[1:]:  # the first line is the header
        fields = line.split()
        if len(fields) < 11:
            continue
        try:
            destination, gateway, flags = (int(field, 16) for field in fields[1:4])
            refcnt, use, metric = (int(field) for field in fields[4:7])
            mask = int(fields[7], 16)
            mtu, window, irtt = (int(field) for field in fields[8:11])
        except ValueError:
            continue
        routes.append({
            "iface": fields[0].decode("utf-8", "replace"),
            "destination": _ipv4_text(destination),
            "metric": _int32(metric),
            "gateway": _ipv4_text(gateway),
            "mask": _ipv4_text(mask),
            "irtt": _int32(irtt),
            "flags": flags & 0xFFFFFFFF,
            "refcnt": _int32(refcnt),
            "use": _int32(use),
            "window": _int32(window),
            "mtu": _int32(mtu),
            "version": 4,
        })
    return routes


def parse_ipv6_routes(text: bytes) -> List[dict]:
    routes = []
    for line in text.split(b"\n"):
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            prefixlen, src_prefixlen = int(fields[1], 16), int(fields[3], 16)
            metric, refcnt, use, flags = (_int32(int(field, 16)) for field in fields[5:9])
        except ValueError:
            continue
        destination = _ipv6_text(fields[0])
        if destination is None:
            continue
        route = {"iface": fields[9].decode("utf-8", "replace"), "destination": destination,
                 "metric": metric, "flags": flags % 2**64, "refcnt": refcnt, "use": use}
        for member, value in (("desprefixlen", str(_int32(prefixlen))), ("source", _ipv6_text(fields[2])),
                              ("srcprefixlen", str(_int32(src_prefixlen))),
                              ("nexthop", _ipv6_text(fields[4]))):
            if value is not None:
                route[member] = value
        route["version"] = 6
        routes.append(route)
    return routes


@command("guest-network-get-route")
def get_route(ctx) -> list:
    routes: List[dict] = []
    failure: Optional[str] = None
    for path, parse in ((PROC_NET_ROUTE, parse_ipv4_routes), (PROC_NET_IPV6_ROUTE, parse_ipv6_routes)):
        try:
            text = read_file(path)
        except OSError as error:
            # qemu-ga notes the failure, goes on with the other table, then fails.
            failure = failure or f'open("{path}"): {_errno_text(error)}'
            continue
        routes.extend(parse(text))
    if failure is not None:
        raise CommandError(failure)
    return routes
