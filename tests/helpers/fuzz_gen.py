"""Frames for the data-plane fuzzer: the config it runs, and a seeded generator.

Frames are assembled from bytes (``struct``), not scapy: scapy costs 100-300
µs a packet, this about 12. Each frame starts as a well-formed packet (to a
service, to a VIP address on a port or protocol it does not serve, to another
address, or not IP at all), then a few mutations are drawn: every header
field the rules read (Ethernet type, 0-3 VLAN tags of either TPID, IPv4
version/IHL/options/total length/fragment bits/protocol, IPv6 version/payload
length/next header and real extension chains, TCP data offset and flags, UDP
length), group destination MACs, bad or absent checksums, Ethernet padding,
truncation at any byte, and random byte flips. Flows are drawn from a pool
half of the time, so established flows (conntrack hits, FIN/RST bookkeeping)
get as much traffic as new ones.

Every forwarding mode has its VIPs: DSR, tunnel (IPv4 in IPv4, IPv6 in
IPv6, IPv4 in IPv6; frames sized around the test device's MTU, with and
without DF), NAT (port remaps, and the backends' replies to pooled NAT
flows, from the right backend or another one) and VIPs announced by ARP/ND
(ARP requests and neighbour solicitations, well-formed or not). ICMP errors
quoting pooled flows (frag-needed / packet-too-big) exercise rule 6.

Everything comes from one ``random.Random(seed)``: the same seed gives the
same frames. Nothing here imports fastlb; the backends' MACs are passed in.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass

from helpers.oracle import Backend, Settings, Vip, checksum, pseudo_header

LB_MAC = bytes.fromhex("020000000002")
CLIENT_MAC = bytes.fromhex("020000000001")

A4, B4, A6 = "198.19.0.100", "198.19.0.101", "2001:db8:ffff::100"
T4, T46, T6 = "198.19.0.110", "198.19.0.111", "2001:db8:ffff::110"       # tunnel VIPs
N4, N6 = "198.19.0.120", "2001:db8:ffff::120"                            # NAT VIPs
ARP4, ARP6 = "198.19.0.130", "2001:db8:ffff::130"                        # announce = "arp"
P4, P6 = "198.19.0.140", "2001:db8:ffff::140"                            # persistence
BACKEND_SIDE_MAC = bytes.fromhex("0200000000fe")   # source MAC of the backends' NAT replies
ROUTER4, ROUTER6 = "198.18.0.254", "2001:db8::fe"  # sources of the ICMP errors


@dataclass(frozen=True)
class Service:
    address: str
    port: int
    protocol: str
    algorithm: str
    backends: tuple[tuple[str, int], ...]   # (address, weight)
    hash: str = "5tuple"
    forwarding: str = "dsr"
    announce: str = "none"
    backend_port: int | None = None         # nat: every backend's port (None: the VIP's)
    persistence: int = 0                    # seconds; 0: off
    persistence_prefix: int | None = None   # None: the config's default


# Three addresses (two IPv4, one IPv6), TCP and UDP, several algorithms, one
# VIP whose backends all have weight 0 and two with one weight-0 backend.
# Backend addresses end in distinct bytes, so their MACs are distinct too.
SERVICES = (
    Service(A4, 80, "tcp", "maglev", (("198.18.0.11", 1), ("198.18.0.12", 2), ("198.18.0.13", 1))),
    Service(A4, 53, "udp", "wrr", (("198.18.0.21", 1), ("198.18.0.22", 1), ("198.18.0.23", 3))),
    Service(A4, 443, "tcp", "lc", (("198.18.0.31", 1), ("198.18.0.32", 1), ("198.18.0.33", 0))),
    Service(B4, 80, "tcp", "maglev", (("198.18.0.41", 0), ("198.18.0.42", 0), ("198.18.0.43", 0))),
    Service(B4, 5353, "udp", "maglev", (("198.18.0.51", 1), ("198.18.0.52", 1), ("198.18.0.53", 1)), "src"),
    Service(A6, 80, "tcp", "maglev", (("2001:db8::61", 1), ("2001:db8::62", 1), ("2001:db8::63", 1))),
    Service(A6, 53, "udp", "rr", (("2001:db8::71", 1), ("2001:db8::72", 0), ("2001:db8::73", 2))),
    # Tunnel: IPv4 in IPv4, IPv4 in IPv6, IPv6 in IPv6.
    Service(T4, 80, "tcp", "maglev", (("198.18.0.81", 1), ("198.18.0.82", 1), ("198.18.0.83", 1)),
            forwarding="tunnel"),
    Service(T4, 53, "udp", "rr", (("198.18.0.84", 1), ("198.18.0.85", 1)), forwarding="tunnel"),
    Service(T46, 80, "tcp", "maglev", (("2001:db8::86", 1), ("2001:db8::87", 1)), forwarding="tunnel"),
    Service(T6, 80, "tcp", "maglev", (("2001:db8::91", 1), ("2001:db8::92", 1)), forwarding="tunnel"),
    Service(T6, 53, "udp", "wrr", (("2001:db8::93", 1), ("2001:db8::94", 2)), forwarding="tunnel"),
    # NAT, with and without a port remap.
    Service(N4, 80, "tcp", "maglev", (("198.18.0.101", 1), ("198.18.0.102", 1)), forwarding="nat",
            backend_port=8080),
    Service(N4, 53, "udp", "rr", (("198.18.0.103", 1), ("198.18.0.104", 1)), forwarding="nat", backend_port=5353),
    Service(N6, 80, "tcp", "lc", (("2001:db8::105", 1), ("2001:db8::106", 1)), forwarding="nat",
            backend_port=8080),
    Service(N6, 53, "udp", "maglev", (("2001:db8::107", 1), ("2001:db8::108", 1)), forwarding="nat"),
    # Announced by ARP / ND.
    Service(ARP4, 80, "tcp", "maglev", (("198.18.0.111", 1),), announce="arp"),
    Service(ARP6, 80, "tcp", "maglev", (("2001:db8::112", 1),), announce="arp"),
    # Persistence: a client prefix keeps its backend across flows (maglev's SYN fast path, rr, lc).
    # CLIENT_NETS' /17 holds 128 IPv4 /24s and 8 /20s; every IPv6 client shares the one /64.
    Service(P4, 80, "tcp", "maglev", (("198.18.0.141", 1), ("198.18.0.142", 1), ("198.18.0.143", 1)),
            persistence=600, persistence_prefix=24),
    Service(P4, 53, "udp", "rr", (("198.18.0.144", 1), ("198.18.0.151", 1), ("198.18.0.152", 1)),
            persistence=600, persistence_prefix=20),
    Service(P6, 80, "tcp", "lc", (("2001:db8::147", 1), ("2001:db8::148", 1)), persistence=600,
            persistence_prefix=64),
)

# Addresses that are not VIP addresses, some chosen to confuse a sloppy
# lookup: the next address up, an IPv4-mapped IPv6 VIP, an IPv6 address
# starting with the IPv4 VIP's bytes, an IPv4 address equal to the IPv6
# VIP's last four bytes.
OTHER4 = ("198.19.0.102", "198.18.0.2", "10.0.0.1", "0.0.1.0", "255.255.255.255", "224.0.0.1")
OTHER6 = ("2001:db8:ffff::101", "::ffff:198.19.0.100", "c613:64::", "2001:db8::2", "ff02::1", "::")
CLIENT_NETS = {4: ipaddress.ip_network("198.18.128.0/17"), 6: ipaddress.ip_network("2001:db8:1::/64")}

# The model has no clock: conntrack timeouts far beyond a run, so no entry expires under it;
# icmp_rate / icmp_burst: an ICMP error budget (a million deep, refilled at a million
# a second per CPU) no fuzz run can spend, so the oracle need not model the bucket's
# clock; tests/bpf/test_packets_modes.py provokes FL_DROP_ICMP_RATE_LIMITED.
CONFIG_SETTINGS = {"ring_size": 1021, "max_vips": 24, "max_backends": 64, "conntrack_size": 1 << 18,
                   "udp_timeout": 86400, "tcp_syn_timeout": 86400, "tcp_timeout": 86400, "tcp_fin_timeout": 86400,
                   "icmp_rate": 1_000_000, "icmp_burst": 1_000_000}
# The tunnel and ICMP sources (strings in the config).
SOURCE_SETTINGS = {"tunnel_source": "198.18.96.0/24", "tunnel_source6": "2001:db8:96::/64",
                   "icmp_source": "198.18.0.2", "icmp_source6": "2001:db8::2"}
# The MTU of the device the fuzzed frames arrive on (tests/helpers/oracle.py: TestDevice).
MTU = 1400


def config_text(services=SERVICES, settings=CONFIG_SETTINGS, sources=SOURCE_SETTINGS) -> str:
    lines = ["[settings]"] + [f"{k} = {v}" for k, v in settings.items()] + \
        [f'{k} = "{v}"' for k, v in sources.items()]
    for s in services:
        lines += ["", "[[vip]]", f'address = "{s.address}"', f"port = {s.port}", f'protocol = "{s.protocol}"',
                  f'algorithm = "{s.algorithm}"', f'hash = "{s.hash}"', f'forwarding = "{s.forwarding}"',
                  f'announce = "{s.announce}"']
        if s.persistence:
            lines.append(f"persistence = {s.persistence}")
        if s.persistence_prefix is not None:
            lines.append(f"persistence_prefix = {s.persistence_prefix}")
        for addr, weight in s.backends:
            lines += ["[[vip.backend]]", f'address = "{addr}"', f"weight = {weight}"]
            if s.backend_port is not None:
                lines.append(f"port = {s.backend_port}")
    return "\n".join(lines) + "\n"


def oracle_vips(mac_of, services=SERVICES) -> list[Vip]:
    """The services as the oracle's plain data; ``mac_of(address) -> "aa:bb:..."``."""
    return [Vip(s.address, s.port, s.protocol,
                tuple(Backend(a, bytes.fromhex(mac_of(a).replace(":", "")), w, s.backend_port)
                      for a, w in s.backends),
                s.algorithm, s.forwarding, s.announce, s.persistence, s.persistence_prefix)
            for s in services]


def oracle_settings(lb_mac: str, mtu: int = MTU, sources=SOURCE_SETTINGS) -> Settings:
    """The [settings] the oracle needs, and the interface's MAC and MTU."""
    return Settings(bytes.fromhex(lb_mac.replace(":", "")), mtu, **sources)


# ---- byte builders ----------------------------------------------------------------

def ethernet(dst: bytes, src: bytes, tags: list[tuple[int, int]], ethertype: int) -> bytes:
    out = bytearray(dst + src)
    for tpid, tci in tags:
        out += struct.pack("!HH", tpid, tci)
    out += struct.pack("!H", ethertype)
    return bytes(out)


def l4_segment(kind: str, family: int, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
               flags: int = 0x10, doff: int | None = None, options: bytes = b"", udp_len: int | None = None,
               csum: str = "good") -> tuple[int, bytes]:
    """(IP protocol, segment bytes); ``csum`` is good, bad or zero (UDP: none)."""
    if kind == "tcp":
        opts = options + b"\0" * (-len(options) % 4)
        off = doff if doff is not None else 5 + len(opts) // 4
        head = struct.pack("!HHIIBBHHH", sport, dport, 0x01020304, 0x0A0B0C0D, (off & 15) << 4, flags & 0xFF,
                           65535, 0, 0) + opts
        seg, proto, at = bytearray(head + payload), 6, 16
    elif kind == "udp":
        length = udp_len if udp_len is not None else 8 + len(payload)
        seg, proto, at = bytearray(struct.pack("!HHHH", sport, dport, length & 0xFFFF, 0) + payload), 17, 6
    else:  # ICMP / ICMPv6 echo: type, code, checksum, id, seq
        proto = 1 if family == 4 else 58
        seg = bytearray(struct.pack("!BBHHH", 8 if family == 4 else 128, 0, 0, 1, 1) + payload)
        at = 2
        if family == 4:
            seg[at:at + 2] = checksum(bytes(seg))
            return proto, _spoil(seg, at, csum)
    seg[at:at + 2] = checksum(pseudo_header(family, src, dst, proto, len(seg)) + bytes(seg))
    if kind == "udp" and seg[at:at + 2] == b"\0\0":
        seg[at:at + 2] = b"\xff\xff"   # RFC 768: a computed zero is sent as all ones
    return proto, _spoil(seg, at, csum)


def _spoil(seg: bytearray, at: int, csum: str) -> bytes:
    if csum == "bad":
        seg[at] ^= 0x5A
    elif csum == "zero":
        seg[at:at + 2] = b"\0\0"
    return bytes(seg)


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, version: int = 4, ihl: int | None = None,
         options: bytes = b"", tot_len: int | None = None, frag: int = 0, csum: str = "good") -> bytes:
    opts = options + b"\0" * (-len(options) % 4)
    ihl_v = ihl if ihl is not None else 5 + len(opts) // 4
    total = tot_len if tot_len is not None else 20 + len(opts) + len(payload)
    head = bytearray(struct.pack("!BBHHHBBH4s4s", (version & 15) << 4 | (ihl_v & 15), 0, total & 0xFFFF,
                                 0x1234, frag & 0xFFFF, 64, proto & 0xFF, 0, src, dst) + opts)
    head[10:12] = checksum(bytes(head))
    return _spoil(head, 10, csum) + payload


def ipv6(src: bytes, dst: bytes, nh: int, payload: bytes, version: int = 6, plen: int | None = None,
         hlim: int = 64) -> bytes:
    length = plen if plen is not None else len(payload)
    return struct.pack("!IHBB16s16s", (version & 15) << 28, length & 0xFFFF, nh & 0xFF, hlim, src, dst) + payload


def ext_header(nh: int, kind: int) -> bytes:
    """An 8-byte IPv6 extension header of type ``kind`` whose next header is ``nh``."""
    if kind == 44:     # fragment: next header, reserved, offset/flags, identification
        return struct.pack("!BBHI", nh, 0, 0, 0xABCD)
    return struct.pack("!BB6s", nh, 0, b"\x01\x04\0\0\0\0")   # PadN options fill the rest


def icmp_error(family: int, src: bytes, dst: bytes, code: int, body: bytes, csum: str = "good") -> tuple[int, bytes]:
    """(IP protocol, message): an ICMP frag-needed (next-hop MTU 1300) or an ICMPv6
    packet-too-big (MTU 1280) with ``code``, quoting ``body``."""
    if family == 4:
        seg = bytearray(struct.pack("!BBHHH", 3, code, 0, 0, 1300) + body)
        seg[2:4] = checksum(bytes(seg))
        return 1, _spoil(seg, 2, csum)
    seg = bytearray(struct.pack("!BBHI", 2, code, 0, 1280) + body)
    seg[2:4] = checksum(pseudo_header(6, src, dst, 58, len(seg)) + bytes(seg))
    return 58, _spoil(seg, 2, csum)


def solicitation(src: bytes, dst: bytes, target: bytes, code: int, lladdr: bytes | None,
                 csum: str = "good") -> tuple[int, bytes]:
    """(58, message): a neighbour solicitation for ``target``, with a source
    link-layer address option when ``lladdr`` is given."""
    seg = bytearray(struct.pack("!BBHI16s", 135, code, 0, 0, target))
    if lladdr is not None:
        seg += struct.pack("!BB6s", 1, 1, lladdr)
    seg[2:4] = checksum(pseudo_header(6, src, dst, 58, len(seg)) + bytes(seg))
    return 58, _spoil(seg, 2, csum)


# ---- the generator ------------------------------------------------------------------

V6_EXT = (0, 43, 44, 50, 51, 60, 135, 139, 140)
OTHER_PROTOS = (1, 2, 4, 41, 47, 50, 51, 58, 89, 103, 112, 132, 136, 255, 0, 43, 44, 60)
NON_IP = (0x0806, 0x88CC, 0x8847, 0x9100, 0x8035, 0x0842, 0x88E5, 0x0000, 0x05DC, 0xFFFF)
BROADCAST = bytes.fromhex("ffffffffffff")
GROUP_MACS = ("ffffffffffff", "01005e000001", "333300000001", "0180c200000e", "030000000000")


@dataclass
class Spec:
    """One frame before it becomes bytes: every field a mutation may touch."""
    family: int
    src: bytes
    dst: bytes
    kind: str                  # tcp, udp, icmp, proto (``proto`` is then the IP protocol), raw (not IP),
                               # toobig (an ICMP error quoting ``quote``), ns (a neighbour solicitation), arp
    sport: int = 0
    dport: int = 0
    proto: int = 0
    dst_mac: bytes = LB_MAC
    src_mac: bytes = CLIENT_MAC
    tags: list | None = None    # (TPID, TCI) pairs
    ethertype: int | None = None
    payload: bytes = b""
    tcp_flags: int = 0x10
    doff: int | None = None
    tcp_options: bytes = b""
    udp_len: int | None = None
    l4_csum: str = "good"
    ip_csum: str = "good"
    version: int | None = None
    ihl: int | None = None
    ip_options: bytes = b""
    tot_len_delta: int = 0
    tot_len: int | None = None
    frag: int = 0
    exts: tuple = ()           # IPv6 extension header types before the L4 header
    nh: int | None = None      # IPv6 next header override
    plen_delta: int = 0
    plen: int | None = None
    hlim: int = 64
    quote: bytes = b""         # toobig: the quoted header and 8 bytes
    icmp_code: int = 0
    target: bytes = b""        # ns: the target; arp: the address asked for
    nd_option: bool = True     # ns: a source link-layer address option
    arp_fields: tuple = (1, 0x0800, 6, 4, 1)   # htype, ptype, hlen, plen, operation


class Generator:
    """Seeded frames for the fuzzer. ``frame()`` returns (bytes, what it was built as)."""

    def __init__(self, seed: int, services=SERVICES, pool_size: int = 2048, mtu: int = MTU):
        self.rnd = random.Random(seed)
        self.services = services
        self.mtu = mtu
        self.pool: list[tuple] = []
        self.pool_size = pool_size
        self.vip_addrs = sorted({(ipaddress.ip_address(s.address).version, ipaddress.ip_address(s.address).packed)
                                 for s in services})
        self.others = [(4, ipaddress.ip_address(a).packed) for a in OTHER4] + \
                      [(6, ipaddress.ip_address(a).packed) for a in OTHER6]
        self.announced = {f: [a for v, a in self.vip_addrs if v == f and any(
            s.announce == "arp" and ipaddress.ip_address(s.address).packed == a for s in services)] for f in (4, 6)}
        self.mutations = [
            (self.m_group_mac, 6), (self.m_vlan, 8), (self.m_ethertype, 3), (self.m_version, 3),
            (self.m_ihl, 4), (self.m_options, 4), (self.m_lengths, 10), (self.m_frag, 5), (self.m_proto, 4),
            (self.m_ext_chain, 4), (self.m_doff, 5), (self.m_flags, 6), (self.m_udp_len, 5),
            (self.m_checksums, 8), (self.m_ports, 4),
        ]
        self.mutation_weights = [w for _, w in self.mutations]

    # -- base frames ---------------------------------------------------------------
    def client(self, family: int) -> bytes:
        net = CLIENT_NETS[family]
        return (net.network_address + self.rnd.randrange(1, net.num_addresses - 1)).packed

    def payload(self) -> bytes:
        r = self.rnd.random()
        n = 0 if r < 0.3 else self.rnd.randrange(1, 64) if r < 0.9 else self.rnd.randrange(64, 1400)
        return self.rnd.randbytes(n)

    def near_mtu(self, family: int, kind: str, svc: Service) -> bytes:
        """A payload that puts the tunnelled packet within a few bytes of the MTU."""
        outer = 20 if ipaddress.ip_address(svc.backends[0][0]).version == 4 else 40
        inner_headers = (20 if family == 4 else 40) + (20 if kind == "tcp" else 8)
        return self.rnd.randbytes(max(0, self.mtu - outer - inner_headers + self.rnd.randrange(-6, 7)))

    def base(self) -> Spec:
        r = self.rnd.random()
        rnd = self.rnd
        if r < 0.44:   # a service: a pooled flow or a new one
            if self.pool and rnd.random() < 0.5:
                family, src, dst, sport, dport, kind, svc = rnd.choice(self.pool)
            else:
                svc = rnd.choice(self.services)
                ip = ipaddress.ip_address(svc.address)
                family, dst, dport, kind = ip.version, ip.packed, svc.port, svc.protocol
                src, sport = self.client(family), rnd.randrange(1024, 65536)
                flow = (family, src, dst, sport, dport, kind, svc)
                if len(self.pool) < self.pool_size:
                    self.pool.append(flow)
                else:
                    self.pool[rnd.randrange(self.pool_size)] = flow
            spec = Spec(family, src, dst, kind, sport, dport)
            if kind == "tcp":
                spec.tcp_flags = rnd.choice((0x02, 0x10, 0x18, 0x10, 0x18, 0x11, 0x04, 0x14, 0x12, 0x01))
            if family == 4 and rnd.random() < 0.5:
                spec.frag = 0x4000   # DF, which decides frag-needed or a drop when a tunnel would be too big
            if svc.forwarding == "tunnel" and rnd.random() < 0.3:
                spec.payload = self.near_mtu(family, kind, svc)
                return self._tagged(spec)
        elif r < 0.50 and self.pool:  # a backend's reply to a pooled NAT flow, from any of its backends
            nat = [f for f in self.pool[-64:] if f[6].forwarding == "nat"]   # recent ones: likely forwarded
            family, client, vip, cport, vport, kind, svc = rnd.choice(nat or self.pool)
            if svc.forwarding != "nat":
                svc = rnd.choice([s for s in self.services if s.forwarding == "nat"])
                family, kind = ipaddress.ip_address(svc.address).version, svc.protocol
                client, cport = self.client(family), rnd.randrange(1024, 65536)
            backend = ipaddress.ip_address(rnd.choice(svc.backends)[0]).packed
            spec = Spec(family, backend, client, kind, svc.backend_port or svc.port, cport,
                        src_mac=BACKEND_SIDE_MAC)
            if rnd.random() < 0.1:  # the VIP's port instead of the backend's
                spec.sport = svc.port
            if kind == "tcp":
                spec.tcp_flags = rnd.choice((0x12, 0x10, 0x18, 0x11, 0x04, 0x19))
        elif r < 0.53 and self.pool:  # an ICMP error quoting a packet from the VIP to a pooled client
            family, client, vip, cport, vport, kind, svc = rnd.choice(self.pool)
            if rnd.random() < 0.15:
                cport = rnd.randrange(1024, 65536)   # about a flow nobody made
            proto = 6 if kind == "tcp" else 17
            ports = struct.pack("!HHI", vport, cport, 0x01020304)
            if family == 4:
                inner = ipv4(vip, client, proto, b"", tot_len=1400, frag=0x4000)[:20]
            else:
                inner = ipv6(vip, client, proto, b"", plen=1360)
            router = ipaddress.ip_address(ROUTER4 if family == 4 else ROUTER6).packed
            spec = Spec(family, router, vip, "toobig", quote=inner + ports)
            spec.icmp_code = 4 if family == 4 else 0
            if rnd.random() < 0.1:
                spec.icmp_code = rnd.randrange(16)
            spec.payload = rnd.randbytes(rnd.choice((0, 0, 0, 8, 40)))
        elif r < 0.55:  # an ARP request
            spec = self.arp_request()
        elif r < 0.57:  # a neighbour solicitation
            spec = self.solicitation()
        elif r < 0.66:  # a VIP address, on a port or protocol that may have no VIP
            family, dst = rnd.choice(self.vip_addrs)
            kind = rnd.choice(("tcp", "udp"))
            ports = [s.port for s in self.services] + [rnd.randrange(0, 65536), 0, 22, 8080]
            spec = Spec(family, self.client(family), dst, kind, rnd.randrange(1024, 65536), rnd.choice(ports))
        elif r < 0.74:  # a VIP address, neither TCP nor UDP
            family, dst = rnd.choice(self.vip_addrs)
            spec = Spec(family, self.client(family), dst, "icmp")
            if rnd.random() < 0.5:
                spec.kind, spec.proto = "proto", rnd.choice(OTHER_PROTOS + (rnd.randrange(256),))
        elif r < 0.92:  # not a VIP address
            family, dst = rnd.choice(self.others)
            kind = rnd.choice(("tcp", "udp", "udp", "icmp", "proto"))
            spec = Spec(family, self.client(family), dst, kind, rnd.randrange(1024, 65536),
                        rnd.choice([s.port for s in self.services] + [rnd.randrange(65536)]),
                        proto=rnd.randrange(256))
        else:  # not IP
            spec = Spec(4, b"", b"", "raw", ethertype=rnd.choice(NON_IP + (rnd.randrange(65536),)))
            if spec.ethertype in (0x0800, 0x86DD, 0x8100, 0x88A8):
                spec.ethertype = 0x0806
            spec.dst_mac = rnd.choice((LB_MAC, bytes.fromhex("ffffffffffff")))
        if spec.kind not in ("toobig", "arp", "ns"):
            spec.payload = self.payload()
        return self._tagged(spec)

    def _tagged(self, spec: Spec) -> Spec:
        if self.rnd.random() < 0.15:
            spec.tags = [(self.rnd.choice((0x8100, 0x88A8)), self.rnd.randrange(65536))
                         for _ in range(self.rnd.randrange(1, 3))]
        return spec

    def _target(self, family: int) -> bytes:
        """An announced VIP address most of the time, else another VIP address or none."""
        rnd = self.rnd
        r = rnd.random()
        if r < 0.6 and self.announced[family]:
            return rnd.choice(self.announced[family])
        if r < 0.85:
            return rnd.choice([a for f, a in self.vip_addrs if f == family])
        return rnd.choice([a for f, a in self.others if f == family])

    def arp_request(self) -> Spec:
        rnd = self.rnd
        target = self._target(4)
        spec = Spec(4, self.client(4), target, "arp", dst_mac=rnd.choice((BROADCAST, LB_MAC)), target=target)
        if rnd.random() < 0.15:   # not an Ethernet/IPv4 request
            spec.arp_fields = tuple(rnd.choice((v, v ^ rnd.choice((1, 2, 0x100)))) for v in spec.arp_fields)
        if rnd.random() < 0.5:
            spec.payload = bytes(18)  # Ethernet padding to 60 bytes
        return spec

    def solicitation(self) -> Spec:
        rnd = self.rnd
        target = self._target(6)
        group = bytes.fromhex("ff0200000000000000000001ff") + target[13:]
        src = bytes(16) if rnd.random() < 0.2 else self.client(6)       # :: is duplicate address detection
        spec = Spec(6, src, rnd.choice((group, group, target)), "ns", target=target, hlim=255,
                    dst_mac=bytes.fromhex("3333ff") + target[13:], nd_option=src != bytes(16))
        if rnd.random() < 0.1:
            spec.hlim = rnd.choice((254, 64, 1, 0))
        if rnd.random() < 0.05:
            spec.icmp_code = rnd.randrange(1, 256)
        if rnd.random() < 0.1:
            spec.nd_option = not spec.nd_option
        return spec

    # -- mutations of fields (each picks among the values that matter to some rule) --
    def m_group_mac(self, s: Spec):
        s.dst_mac = bytes.fromhex(self.rnd.choice(GROUP_MACS)) if self.rnd.random() < 0.8 else \
            bytes([self.rnd.randrange(256) | 1]) + self.rnd.randbytes(5)

    def m_vlan(self, s: Spec):
        s.tags = [(self.rnd.choice((0x8100, 0x88A8)), self.rnd.randrange(65536))
                  for _ in range(self.rnd.choice((0, 1, 2, 2, 3, 3, 4)))]

    def m_ethertype(self, s: Spec):
        s.ethertype = self.rnd.choice((0x0800, 0x86DD, 0x0806, 0x9100, 0x8100, 0x88A8, self.rnd.randrange(65536)))

    def m_version(self, s: Spec):
        s.version = self.rnd.randrange(16)

    def m_ihl(self, s: Spec):
        s.ihl = self.rnd.randrange(16)

    def m_options(self, s: Spec):
        n = self.rnd.randrange(1, 11)
        s.ip_options = bytes([1] * (4 * n - 1) + [0])   # NOPs, then end of options

    def m_lengths(self, s: Spec):
        rnd = self.rnd
        delta = rnd.choice((-1, 1, -2, 2, -4, 4, -8, 8, -20, 20, -40, rnd.randrange(-64, 64)))
        if rnd.random() < 0.2:
            if s.family == 4:
                s.tot_len = rnd.choice((0, 19, 20, 21, 23, 24, 27, 28, 39, 40, rnd.randrange(65536)))
            else:
                s.plen = rnd.choice((0, 1, 7, 8, 19, 20, rnd.randrange(65536)))
        elif s.family == 4:
            s.tot_len_delta = delta
        else:
            s.plen_delta = delta

    def m_frag(self, s: Spec):
        s.frag = self.rnd.choice((0x2000, 0x4000, 0x0001, 0x1FFF, 0x2001, 0x6000, 0x4000, self.rnd.randrange(65536)))

    def m_proto(self, s: Spec):
        if s.family == 6 and self.rnd.random() < 0.5:
            s.nh = self.rnd.choice(V6_EXT + (6, 17, 58, 59, self.rnd.randrange(256)))
        else:
            s.kind, s.proto = "proto", self.rnd.choice(OTHER_PROTOS + (6, 17, self.rnd.randrange(256)))

    def m_ext_chain(self, s: Spec):
        s.exts = tuple(self.rnd.choice(V6_EXT) for _ in range(self.rnd.randrange(1, 4)))

    def m_doff(self, s: Spec):
        s.doff = self.rnd.randrange(16)
        if self.rnd.random() < 0.5:
            s.tcp_options = b"\x01" * (4 * self.rnd.randrange(1, 11))

    def m_flags(self, s: Spec):
        s.tcp_flags = self.rnd.randrange(256)

    def m_udp_len(self, s: Spec):
        n = 8 + len(s.payload)
        s.udp_len = self.rnd.choice((0, 7, 8, 9, n - 1, n + 1, n + 8, self.rnd.randrange(65536)))

    def m_checksums(self, s: Spec):
        s.ip_csum = self.rnd.choice(("good", "bad"))
        s.l4_csum = self.rnd.choice(("bad", "zero", "bad"))

    def m_ports(self, s: Spec):
        s.dport = self.rnd.choice([sv.port for sv in self.services] + [0, 65535])
        s.sport = self.rnd.choice((0, 65535, s.sport))

    # -- bytes ------------------------------------------------------------------------
    def build(self, s: Spec) -> bytes:
        if s.kind == "raw":
            return ethernet(s.dst_mac, s.src_mac, s.tags or [], s.ethertype) + s.payload
        if s.kind == "arp":
            htype, ptype, hlen, plen, oper = s.arp_fields
            body = struct.pack("!HHBBH6s4s6s4s", htype & 0xFFFF, ptype & 0xFFFF, hlen & 0xFF, plen & 0xFF,
                               oper & 0xFFFF, s.src_mac, s.src, bytes(6), s.target)
            return ethernet(s.dst_mac, s.src_mac, s.tags or [], 0x0806 if s.ethertype is None else s.ethertype) \
                + body + s.payload
        if s.kind == "toobig":
            proto, seg = icmp_error(s.family, s.src, s.dst, s.icmp_code, s.quote + s.payload, s.l4_csum)
        elif s.kind == "ns":
            proto, seg = solicitation(s.src, s.dst, s.target, s.icmp_code, s.src_mac if s.nd_option else None,
                                      s.l4_csum)
        elif s.kind in ("tcp", "udp", "icmp"):
            proto, seg = l4_segment(s.kind, s.family, s.src, s.dst, s.sport, s.dport, s.payload, s.tcp_flags,
                                    s.doff, s.tcp_options, s.udp_len, s.l4_csum)
        else:
            proto, seg = s.proto, s.payload
        if s.family == 4:
            tot = s.tot_len
            if tot is None and s.tot_len_delta:
                tot = max(0, 20 + len(s.ip_options) + (-len(s.ip_options) % 4) + len(seg) + s.tot_len_delta)
            l3 = ipv4(s.src, s.dst, proto, seg, 4 if s.version is None else s.version, s.ihl, s.ip_options,
                      tot, s.frag, s.ip_csum)
            natural = 0x0800
        else:
            nh = proto
            for kind in reversed(s.exts):
                seg, nh = ext_header(nh, kind) + seg, kind
            nh = nh if s.nh is None else s.nh
            plen = s.plen
            if plen is None and s.plen_delta:
                plen = max(0, len(seg) + s.plen_delta)
            l3 = ipv6(s.src, s.dst, nh, seg, 6 if s.version is None else s.version, plen, s.hlim)
            natural = 0x86DD
        return ethernet(s.dst_mac, s.src_mac, s.tags or [], natural if s.ethertype is None else s.ethertype) + l3

    def frame(self) -> bytes:
        rnd = self.rnd
        spec = self.base()
        r = rnd.random()
        count = 0 if r < 0.4 else 1 if r < 0.75 else 2 if r < 0.92 else 3
        for m in rnd.choices(self.mutations, self.mutation_weights, k=count):
            m[0](spec)
        data = self.build(spec)
        r = rnd.random()
        if r < 0.08:        # truncated at any byte (BPF_PROG_TEST_RUN refuses frames under 14 bytes)
            data = data[:rnd.randrange(14, max(15, len(data)))]
        elif r < 0.14:      # Ethernet padding / trailing bytes
            data += rnd.randbytes(rnd.randrange(1, 40))
        elif r < 0.18:      # byte flips anywhere
            buf = bytearray(data)
            for _ in range(rnd.randrange(1, 5)):
                buf[rnd.randrange(len(buf))] ^= 1 << rnd.randrange(8)
            data = bytes(buf)
        elif r < 0.19:      # random bytes
            data = rnd.randbytes(rnd.randrange(14, 120))
        return data

    def frames(self, count: int):
        for _ in range(count):
            yield self.frame()


def truncation_sweep(services=SERVICES) -> list[bytes]:
    """Well-formed frames to every service, plain, VLAN-tagged and with IPv4
    options, cut at every length from 14 bytes to the whole frame."""
    out = []
    for i, s in enumerate(services):
        ip = ipaddress.ip_address(s.address)
        src = CLIENT_NETS[ip.version].network_address.packed[:-1] + bytes([i + 1])
        for tags, opts in (([], b""), ([(0x88A8, 5), (0x8100, 6)], b""), ([(0x8100, 7)], b"\x01\x01\x01\x00")):
            spec = Spec(ip.version, src, ip.packed, s.protocol, 40000 + i, s.port, tags=tags, ip_options=opts,
                        payload=b"xyz", tcp_flags=0x18)
            if ip.version == 6 and opts:
                spec.exts = (60,)
            whole = Generator(0).build(spec)
            out += [whole[:n] for n in range(14, len(whole) + 1)]
    gen = Generator(0, services)
    for family, target in sorted({(f, a) for f in (4, 6) for a in gen.announced[f]}):
        for tags in ([], [(0x8100, 7)]):
            if family == 4:
                spec = Spec(4, CLIENT_NETS[4].network_address.packed, target, "arp", dst_mac=BROADCAST,
                            target=target, tags=tags)
            else:
                spec = Spec(6, CLIENT_NETS[6].network_address.packed, bytes.fromhex("ff0200000000000000000001ff")
                            + target[13:], "ns", hlim=255, target=target, tags=tags,
                            dst_mac=bytes.fromhex("3333ff") + target[13:])
            whole = gen.build(spec)
            out += [whole[:n] for n in range(14, len(whole) + 1)]
    return out
