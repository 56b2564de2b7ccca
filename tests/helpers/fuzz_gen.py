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

Everything comes from one ``random.Random(seed)``: the same seed gives the
same frames. Nothing here imports fastlb; the backends' MACs are passed in.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass

from helpers.oracle import Backend, Vip, checksum, pseudo_header

LB_MAC = bytes.fromhex("020000000002")
CLIENT_MAC = bytes.fromhex("020000000001")

A4, B4, A6 = "198.19.0.100", "198.19.0.101", "2001:db8:ffff::100"


@dataclass(frozen=True)
class Service:
    address: str
    port: int
    protocol: str
    algorithm: str
    backends: tuple[tuple[str, int], ...]   # (address, weight)
    hash: str = "5tuple"


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
)

# Addresses that are not VIP addresses, some chosen to confuse a sloppy
# lookup: the next address up, an IPv4-mapped IPv6 VIP, an IPv6 address
# starting with the IPv4 VIP's bytes, an IPv4 address equal to the IPv6
# VIP's last four bytes.
OTHER4 = ("198.19.0.102", "198.18.0.2", "10.0.0.1", "0.0.1.0", "255.255.255.255", "224.0.0.1")
OTHER6 = ("2001:db8:ffff::101", "::ffff:198.19.0.100", "c613:64::", "2001:db8::2", "ff02::1", "::")
CLIENT_NETS = {4: ipaddress.ip_network("198.18.128.0/17"), 6: ipaddress.ip_network("2001:db8:1::/64")}

CONFIG_SETTINGS = {"ring_size": 1021, "max_vips": 8, "max_backends": 32, "conntrack_size": 1 << 18}


def config_text(services=SERVICES, settings=CONFIG_SETTINGS) -> str:
    lines = ["[settings]"] + [f"{k} = {v}" for k, v in settings.items()]
    for s in services:
        lines += ["", "[[vip]]", f'address = "{s.address}"', f"port = {s.port}", f'protocol = "{s.protocol}"',
                  f'algorithm = "{s.algorithm}"', f'hash = "{s.hash}"']
        for addr, weight in s.backends:
            lines += ["[[vip.backend]]", f'address = "{addr}"', f"weight = {weight}"]
    return "\n".join(lines) + "\n"


def oracle_vips(mac_of, services=SERVICES) -> list[Vip]:
    """The services as the oracle's plain data; ``mac_of(address) -> "aa:bb:..."``."""
    return [Vip(s.address, s.port, s.protocol,
                tuple(Backend(a, bytes.fromhex(mac_of(a).replace(":", "")), w) for a, w in s.backends),
                s.algorithm)
            for s in services]


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


def ipv6(src: bytes, dst: bytes, nh: int, payload: bytes, version: int = 6, plen: int | None = None) -> bytes:
    length = plen if plen is not None else len(payload)
    return struct.pack("!IHBB16s16s", (version & 15) << 28, length & 0xFFFF, nh & 0xFF, 64, src, dst) + payload


def ext_header(nh: int, kind: int) -> bytes:
    """An 8-byte IPv6 extension header of type ``kind`` whose next header is ``nh``."""
    if kind == 44:     # fragment: next header, reserved, offset/flags, identification
        return struct.pack("!BBHI", nh, 0, 0, 0xABCD)
    return struct.pack("!BB6s", nh, 0, b"\x01\x04\0\0\0\0")   # PadN options fill the rest


# ---- the generator ------------------------------------------------------------------

V6_EXT = (0, 43, 44, 50, 51, 60, 135, 139, 140)
OTHER_PROTOS = (1, 2, 4, 41, 47, 50, 51, 58, 89, 103, 112, 132, 136, 255, 0, 43, 44, 60)
NON_IP = (0x0806, 0x88CC, 0x8847, 0x9100, 0x8035, 0x0842, 0x88E5, 0x0000, 0x05DC, 0xFFFF)
GROUP_MACS = ("ffffffffffff", "01005e000001", "333300000001", "0180c200000e", "030000000000")


@dataclass
class Spec:
    """One frame before it becomes bytes: every field a mutation may touch."""
    family: int
    src: bytes
    dst: bytes
    kind: str                  # tcp, udp, icmp, proto (``proto`` is then the IP protocol), raw (not IP)
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


class Generator:
    """Seeded frames for the fuzzer. ``frame()`` returns (bytes, what it was built as)."""

    def __init__(self, seed: int, services=SERVICES, pool_size: int = 2048):
        self.rnd = random.Random(seed)
        self.services = services
        self.pool: list[tuple] = []
        self.pool_size = pool_size
        self.vip_addrs = sorted({(ipaddress.ip_address(s.address).version, ipaddress.ip_address(s.address).packed)
                                 for s in services})
        self.others = [(4, ipaddress.ip_address(a).packed) for a in OTHER4] + \
                      [(6, ipaddress.ip_address(a).packed) for a in OTHER6]
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

    def base(self) -> Spec:
        r = self.rnd.random()
        rnd = self.rnd
        if r < 0.50:   # a service: a pooled flow or a new one
            if self.pool and rnd.random() < 0.5:
                family, src, dst, sport, dport, kind = rnd.choice(self.pool)
            else:
                s = rnd.choice(self.services)
                ip = ipaddress.ip_address(s.address)
                family, dst, dport, kind = ip.version, ip.packed, s.port, s.protocol
                src, sport = self.client(family), rnd.randrange(1024, 65536)
                if len(self.pool) < self.pool_size:
                    self.pool.append((family, src, dst, sport, dport, kind))
                else:
                    self.pool[rnd.randrange(self.pool_size)] = (family, src, dst, sport, dport, kind)
            spec = Spec(family, src, dst, kind, sport, dport)
            if kind == "tcp":
                spec.tcp_flags = rnd.choice((0x02, 0x10, 0x18, 0x10, 0x18, 0x11, 0x04, 0x14, 0x12, 0x01))
        elif r < 0.62:  # a VIP address, on a port or protocol that may have no VIP
            family, dst = rnd.choice(self.vip_addrs)
            kind = rnd.choice(("tcp", "udp"))
            ports = [s.port for s in self.services] + [rnd.randrange(0, 65536), 0, 22, 8080]
            spec = Spec(family, self.client(family), dst, kind, rnd.randrange(1024, 65536), rnd.choice(ports))
        elif r < 0.72:  # a VIP address, neither TCP nor UDP
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
        spec.payload = self.payload()
        if rnd.random() < 0.15:
            spec.tags = [(rnd.choice((0x8100, 0x88A8)), rnd.randrange(65536)) for _ in range(rnd.randrange(1, 3))]
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
        if s.kind in ("tcp", "udp", "icmp"):
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
            l3 = ipv6(s.src, s.dst, nh, seg, 6 if s.version is None else s.version, plen)
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
    return out
