"""An independent model of docs/DATAPLANE.md, and the judge that holds the kernel to it.

The fuzzer (tests/bpf/test_fuzz.py, fuzz/run.py) feeds every frame to the real
XDP program and to this model, and counts each difference. The model is
written from the documented rules alone: it parses frame bytes with
``struct``, knows the VIPs only as the plain data the fuzzer configured, and
imports nothing from ``fastlb``. The reason names and numbers come from the
C header itself (``enum fl_reason``), read here by a few lines of regex.

Three parts:

- ``Oracle.predict(frame)``: the reason the rules give (hence the verdict),
  and for a forwarded frame the VIP and whether its flow is new.
- ``Oracle.judge(...)``: compares one observed run (verdict, output bytes,
  counter moves) with the prediction and returns the problems found. It also
  keeps the model's conntrack: the backend each recorded flow went to, and
  the TCP flows each backend should count as active.
- ``Campaign``: drives the real program (BPF_PROG_TEST_RUN, one call per
  frame) and reads the per-CPU counters after each frame with one batch
  lookup per map.

The VIPs are modelled with DSR forwarding and no ``announce`` (tunnel and
NAT VIPs rewrite more than the MACs; the packet tables check those bytes).
ICMP to VIP addresses is modelled in full: echo replies, and errors about a
known flow sent to its backend.

The model's conntrack is exact only while nothing is evicted: with per-CPU
LRU lists one CPU's list holds ``conntrack_size / ncpus`` entries, so the
campaign flushes the kernel's table (and the model forgets its flows) well
before the model has recorded that many.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import re
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# XDP actions (include/uapi/linux/bpf.h, enum xdp_action), by reason prefix.
XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
PREFIX_VERDICT = (("FL_PASS_", XDP_PASS), ("FL_DROP_", XDP_DROP), ("FL_TX_", XDP_TX))

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
VLAN_TPIDS = (ETH_P_8021Q, ETH_P_8021AD)
MAX_VLAN_TAGS = 2
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
ICMP_ECHO = {4: 8, 6: 128}               # echo request types
ICMP_TOO_BIG = {4: (3, 4), 6: (2, None)}  # (type, code) of frag-needed / packet-too-big; None: any code
ND_SOLICIT = 135
IPV6_EXT_HEADERS = frozenset({0, 43, 44, 50, 51, 60, 135, 139, 140})
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
PROTO_NUMBERS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}


def read_reasons(header: Path = ROOT / "bpf" / "fastlb_consts.h") -> dict[str, int]:
    """``enum fl_reason`` from the C header: name -> value, without FL_REASON_MAX."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", header.read_text(), flags=re.S)
    body = re.search(r"enum\s+fl_reason\s*\{(.*?)\}", text, re.S)
    if body is None:
        raise ValueError(f"{header}: no enum fl_reason")
    reasons, value = {}, 0
    for member in filter(None, (m.strip() for m in body.group(1).split(","))):
        name, _, explicit = (p.strip() for p in member.partition("="))
        value = int(explicit, 0) if explicit else value
        reasons[name] = value
        value += 1
    reasons.pop("FL_REASON_MAX", None)
    return reasons


def reason_verdict(reason: str) -> int:
    for prefix, verdict in PREFIX_VERDICT:
        if reason.startswith(prefix):
            return verdict
    raise ValueError(f"{reason}: no verdict prefix")


# ---- checksums (RFC 1071), independent of scapy and of the kernel -----------

def ones_sum(data: bytes) -> int:
    """The folded 16-bit ones' complement sum of ``data``, in native byte order.

    The ones' complement sum commutes with byte swapping, so summing native
    words gives the same validity answers (sum == 0xffff) as big-endian ones,
    and ``~sum`` written back in native order is the right checksum field.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = sum(memoryview(data).cast("H"))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum(data: bytes) -> bytes:
    """The checksum field (2 bytes) that makes ``data`` (with that field zeroed) sum to 0xffff."""
    return struct.pack("=H", ~ones_sum(data) & 0xFFFF)


def pseudo_header(family: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if family == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


@dataclass(frozen=True)
class ChecksumState:
    """Whether each checksum of a well-formed IP/L4 frame holds: True, False, or None (absent)."""
    ip: bool | None
    l4: bool | None


def checksum_state(frame: bytes, parsed: "Parsed") -> ChecksumState:
    f = frame
    ip = None
    if parsed.family == 4:
        ip = ones_sum(f[parsed.l3:parsed.l3 + parsed.ip_header_len]) == 0xFFFF
    segment = f[parsed.l4:parsed.l4 + parsed.l4_len]
    if parsed.proto == IPPROTO_UDP:
        segment = f[parsed.l4:parsed.l4 + parsed.udp_len]
        if parsed.family == 4 and segment[6:8] == b"\0\0":
            return ChecksumState(ip, None)
    pseudo = pseudo_header(parsed.family, parsed.src, parsed.dst, parsed.proto, len(segment))
    return ChecksumState(ip, ones_sum(pseudo + segment) == 0xFFFF)


# ---- the configured services, as plain data ---------------------------------

@dataclass(frozen=True)
class Backend:
    address: str
    mac: bytes          # 6 bytes: what the program writes as destination MAC
    weight: int = 1


@dataclass(frozen=True)
class Vip:
    address: str
    port: int
    protocol: str       # "tcp" | "udp"
    backends: tuple[Backend, ...]
    algorithm: str = "maglev"

    @property
    def key(self) -> tuple:
        ip = ipaddress.ip_address(self.address)
        return (ip.version, ip.packed, self.port, PROTO_NUMBERS[self.protocol])

    @property
    def name(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol}"


# ---- the model ----------------------------------------------------------------

@dataclass
class Parsed:
    """What the rules read from a frame that got as far as the L4 ports."""
    family: int = 0
    l3: int = 0
    ip_header_len: int = 0
    l4: int = 0
    l4_len: int = 0
    udp_len: int = 0
    proto: int = 0
    src: bytes = b""
    dst: bytes = b""
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0


@dataclass
class Prediction:
    reason: str
    rule: str                           # the rule of DATAPLANE.md that decided, for reports
    parsed: Parsed | None = None        # set once the ports were read
    vip: Vip | None = None              # forwarded: the VIP (a new flow) or the flow's VIP (established)
    established: bytes | None = None    # forwarded: the backend MAC the model's conntrack holds
    flow: tuple | None = None
    kind: str = "forward"               # "forward" (rule 12), "echo" or "icmp_error" (rule 6)

    @property
    def verdict(self) -> int:
        return reason_verdict(self.reason)


@dataclass
class FlowState:
    mac: bytes
    vip: Vip
    counted: bool        # TCP, counted in the backend's active connections
    closing: bool        # a FIN or RST has been seen


class Oracle:
    """docs/DATAPLANE.md as a function of the frame, plus the conntrack it implies.

    The rule constants are class attributes so that the tests can build
    deliberately wrong oracles and check that the fuzzer notices.
    """

    max_vlan_tags = MAX_VLAN_TAGS
    ipv6_ext_headers = IPV6_EXT_HEADERS
    fragment_bits = 0x3FFF          # MF and the fragment offset (not DF)

    def __init__(self, vips: list[Vip]):
        self.vips = list(vips)
        self.by_key = {v.key: v for v in self.vips}
        if len(self.by_key) != len(self.vips):
            raise ValueError("two VIPs with the same address, port and protocol")
        self.vip_addresses = {(k[0], k[1]) for k in self.by_key}
        self.eligible = {v.key: frozenset(b.mac for b in v.backends if b.weight > 0) for v in self.vips}
        self.members = {v.key: frozenset(b.mac for b in v.backends) for v in self.vips}
        self.flows: dict[tuple, FlowState] = {}
        self.active: Counter = Counter()     # backend MAC -> TCP flows recorded and not yet closed
        self.vip_slot: dict[tuple, int] = {}  # learned from the first forward, then held to
        self.backend_slot: dict[bytes, int] = {}

    def forget_flows(self) -> None:
        """The kernel's conntrack was flushed: every flow is new again (active counts stay)."""
        self.flows.clear()

    # -- rules 1..12 ----------------------------------------------------------
    def predict(self, frame: bytes) -> Prediction:
        f = frame
        n = len(f)
        # 1. Ethernet and up to two VLAN tags.
        if n < 14:
            return Prediction("FL_DROP_L2_TRUNCATED", "1: shorter than an Ethernet header")
        ethertype = (f[12] << 8) | f[13]
        off = 14
        tags = 0
        while ethertype in VLAN_TPIDS:
            if tags == self.max_vlan_tags:
                return Prediction("FL_PASS_VLAN_DEPTH", "1: a third VLAN tag")
            if n < off + 4:
                return Prediction("FL_DROP_L2_TRUNCATED", "1: ends inside a VLAN tag")
            ethertype = (f[off + 2] << 8) | f[off + 3]
            off += 4
            tags += 1
        left = n - off
        p = Parsed(l3=off)
        # 2, 3, 4, 5. IP.
        if ethertype == ETH_P_IP:
            if left < 20:
                return Prediction("FL_DROP_L3_MALFORMED", "3: IPv4 header cut")
            version, ihl = f[off] >> 4, f[off] & 15
            if version != 4 or ihl < 5:
                return Prediction("FL_DROP_L3_MALFORMED", "3: IPv4 version or IHL")
            hlen = 4 * ihl
            tot_len, frag = struct.unpack_from("!H2xH", f, off + 2)
            if hlen > left or tot_len < hlen or tot_len > left:
                return Prediction("FL_DROP_L3_MALFORMED", "3: IPv4 lengths")
            p.family, p.ip_header_len, p.proto = 4, hlen, f[off + 9]
            p.src, p.dst = f[off + 12:off + 16], f[off + 16:off + 20]
            p.l4, p.l4_len = off + hlen, tot_len - hlen
            to_vip = (4, p.dst) in self.vip_addresses
            if frag & self.fragment_bits:
                return self._miss(to_vip, "FL_DROP_FRAGMENT", "4: IPv4 fragment")
        elif ethertype == ETH_P_IPV6:
            if left < 40:
                return Prediction("FL_DROP_L3_MALFORMED", "3: IPv6 header cut")
            payload_len = (f[off + 4] << 8) | f[off + 5]
            if f[off] >> 4 != 6 or 40 + payload_len > left:
                return Prediction("FL_DROP_L3_MALFORMED", "3: IPv6 version or payload length")
            p.family, p.ip_header_len, p.proto = 6, 40, f[off + 6]
            p.src, p.dst = f[off + 8:off + 24], f[off + 24:off + 40]
            p.l4, p.l4_len = off + 40, payload_len
            to_vip = (6, p.dst) in self.vip_addresses
            if p.proto in self.ipv6_ext_headers:
                return self._miss(to_vip, "FL_DROP_IPV6_EXTHDR", "5: IPv6 extension header")
        else:
            return Prediction("FL_PASS_NOT_IP", "2: not IPv4 or IPv6")
        # 6. ICMP; 6b. neither TCP, UDP nor ICMP.
        if (p.family, p.proto) in ((4, IPPROTO_ICMP), (6, IPPROTO_ICMPV6)):
            return self._icmp(f, p, to_vip)
        if p.proto not in (IPPROTO_TCP, IPPROTO_UDP):
            return self._miss(to_vip, "FL_PASS_VIP_PORT", "6b: neither TCP, UDP nor ICMP")
        # 7. L4 header within the frame and the IP payload.
        in_frame = n - p.l4
        if p.proto == IPPROTO_TCP:
            bad = in_frame < 20 or p.l4_len < 20
            if not bad:
                hlen = 4 * (f[p.l4 + 12] >> 4)
                bad = hlen < 20 or hlen > in_frame or hlen > p.l4_len
        else:
            bad = in_frame < 8 or p.l4_len < 8
            if not bad:
                p.udp_len = (f[p.l4 + 4] << 8) | f[p.l4 + 5]
                bad = p.udp_len < 8 or p.udp_len > p.l4_len
        if bad:
            return self._miss(to_vip, "FL_DROP_L4_MALFORMED", "7: L4 header")
        p.sport, p.dport = struct.unpack_from("!HH", f, p.l4)
        if p.proto == IPPROTO_TCP:
            p.tcp_flags = f[p.l4 + 13]
        # 8. Broadcast or multicast.
        if f[0] & 1:
            return self._miss(to_vip, "FL_PASS_L2_NOT_UNICAST", "8: group destination MAC", p)
        flow = (p.family, p.src, p.dst, p.sport, p.dport, p.proto)
        # 9. Conntrack hit (the model's; the config never changes under the fuzzer).
        state = self.flows.get(flow)
        reopened = (state is not None and state.closing and p.proto == IPPROTO_TCP
                    and p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
        if state is not None and not reopened:
            return Prediction("FL_TX_DSR", "9: conntrack hit", p, state.vip, state.mac, flow)
        # 10. VIP lookup.
        vip = self.by_key.get((p.family, p.dst, p.dport, p.proto))
        if vip is None:
            return self._miss(to_vip, "FL_PASS_VIP_PORT", "10: no VIP on this port/protocol", p)
        # 11. New flow.
        if not self.eligible[vip.key]:
            return Prediction("FL_DROP_NO_BACKEND", "11: no backend of weight > 0", p, vip)
        return Prediction("FL_TX_DSR", "11/12: new flow", p, vip, None, flow)

    def _icmp(self, f: bytes, p: Parsed, to_vip: bool) -> Prediction:
        """Rule 6 (no VIP here announces, so no neighbour solicitation is answered)."""
        whole = len(f) - p.l4 >= 8 and p.l4_len >= 8
        if p.family == 6 and whole and f[p.l4] == ND_SOLICIT:
            return Prediction("FL_PASS_NOT_VIP", "6: neighbour solicitation, not for an announced VIP")
        if not to_vip:
            return Prediction("FL_PASS_NOT_VIP", "6: ICMP, not to a VIP address")
        if f[0] & 1:
            return Prediction("FL_PASS_L2_NOT_UNICAST", "6: ICMP in a group frame")
        if not whole:
            return Prediction("FL_PASS_VIP_PORT", "6: ICMP header cut")
        icmp_type, code = f[p.l4], f[p.l4 + 1]
        if icmp_type == ICMP_ECHO[p.family] and code == 0:
            return Prediction("FL_TX_ICMP_ECHO", "6: echo request", p, kind="echo")
        want_type, want_code = ICMP_TOO_BIG[p.family]
        if icmp_type == want_type and (want_code is None or code == want_code):
            flow = self._quoted_flow(f, p)
            state = self.flows.get(flow) if flow else None
            if state is not None:
                return Prediction("FL_TX_ICMP_TO_BACKEND", "6: too-big about a known flow", p, state.vip,
                                  state.mac, flow, kind="icmp_error")
        return Prediction("FL_PASS_VIP_PORT", "6: other ICMP to a VIP address")

    @staticmethod
    def _quoted_flow(f: bytes, p: Parsed) -> tuple | None:
        """The flow an ICMP error is about: the reverse of its quoted VIP-to-client header."""
        q = p.l4 + 8
        if p.family == 4:
            if len(f) < q + 20 + 4 or f[q] != 0x45:
                return None
            proto, src, dst, ports = f[q + 9], f[q + 12:q + 16], f[q + 16:q + 20], q + 20
        else:
            if len(f) < q + 40 + 4 or f[q] >> 4 != 6:
                return None
            proto, src, dst, ports = f[q + 6], f[q + 8:q + 24], f[q + 24:q + 40], q + 40
        if proto not in (IPPROTO_TCP, IPPROTO_UDP):
            return None
        sport, dport = struct.unpack_from("!HH", f, ports)
        return (p.family, dst, src, dport, sport, proto)

    @staticmethod
    def _miss(to_vip: bool, vip_reason: str, rule: str, parsed: Parsed | None = None) -> Prediction:
        if to_vip:
            return Prediction(vip_reason, rule, parsed)
        return Prediction("FL_PASS_NOT_VIP", rule + " (not a VIP address)", parsed)

    # -- the judge --------------------------------------------------------------
    def judge(self, frame: bytes, pred: Prediction, verdict: int, out: bytes,
              reasons: dict[int, tuple], vips: dict[int, tuple], backends: dict[int, tuple],
              reason_ids: dict[str, int]) -> tuple[list[str], bool]:
        """Compare one run with ``pred``; returns (problems, mis-forwarded).

        ``reasons``/``vips``/``backends`` are the counter slots that moved, as
        slot -> (packets, bytes, new_flows) deltas. A mis-forward is a frame
        the kernel sent out that the rules do not send, or sent to the wrong
        backend, or changed beyond the two MACs.
        """
        problems: list[str] = []
        size = len(frame)
        if verdict != pred.verdict:
            problems.append(f"verdict {verdict}, expected {pred.verdict} ({pred.reason})")
        want = {reason_ids[pred.reason]: (1, size, 0)}
        if reasons != want:
            names = {v: k for k, v in reason_ids.items()}
            moved = {names.get(k, k): d for k, d in reasons.items()}
            problems.append(f"reason counters moved {moved}, expected {{{pred.reason}: (1, {size}, 0)}}")
        misforward = verdict == XDP_TX and pred.verdict != XDP_TX

        if pred.verdict == XDP_PASS and out != frame:
            problems.append("a passed frame was modified: " + _diff(frame, out))
        if pred.verdict != XDP_TX or verdict != XDP_TX or pred.kind != "forward":
            if vips or backends:
                problems.append(f"vip/backend counters moved for a frame not forwarded: {vips} {backends}")
            if verdict == XDP_TX and pred.kind == "echo":
                problems += self._judge_echo(frame, pred.parsed, out)
            elif verdict == XDP_TX and pred.kind == "icmp_error":
                if len(out) != size or out[6:12] != frame[0:6] or out[12:] != frame[12:] \
                        or out[0:6] != pred.established:
                    problems.append("ICMP error not sent to its flow's backend unchanged: " + _diff(frame, out))
                    misforward = True
            return problems, misforward

        # Forwarded: only the two MACs change, to a backend of this VIP.
        vip, mac = pred.vip, out[0:6]
        if len(out) != size or out[6:12] != frame[0:6] or out[12:] != frame[12:]:
            problems.append("forwarded frame changed beyond the two MACs: " + _diff(frame, out))
            misforward = True
        if pred.established is not None:
            allowed, why = {pred.established}, "its conntrack backend"
        else:
            allowed, why = self.eligible[vip.key], "a weight > 0 backend of " + vip.name
        if mac not in allowed:
            member = "a backend of that VIP" if mac in self.members[vip.key] else "not a backend of that VIP"
            problems.append(f"forwarded to {_mac(mac)} ({member}), expected {why}: "
                            + ", ".join(sorted(_mac(m) for m in allowed)))
            misforward = True
        if len(out) == size:  # read from each frame's own bytes
            p = pred.parsed
            before, after = checksum_state(frame, p), checksum_state(out, p)
            if before != after:
                problems.append(f"checksums changed validity: {before} -> {after}")
                misforward = True
        new = 0 if pred.established is not None else 1
        problems += self._check_slot(self.vip_slot, vip.key, vips, (1, size, new), "vip_stats", vip.name)
        problems += self._check_slot(self.backend_slot, mac, backends, (1, size, new), "backend_stats", _mac(mac))
        self._record(pred, mac)  # even a wrong one: it is what the kernel's conntrack now holds
        return problems, misforward

    @staticmethod
    def _judge_echo(frame: bytes, p: Parsed, out: bytes) -> list[str]:
        """The echo reply: MACs and addresses swapped, TTL/hop limit 64, type 0/129,
        every checksum exactly as valid as in the request."""
        if len(out) != len(frame):
            return [f"echo reply of {len(out)} bytes for a request of {len(frame)}"]
        want = bytearray(frame)
        want[0:6], want[6:12] = frame[6:12], frame[0:6]
        a = p.l3
        if p.family == 4:
            want[a + 12:a + 16], want[a + 16:a + 20] = frame[a + 16:a + 20], frame[a + 12:a + 16]
            want[a + 8] = 64
            want[a + 10:a + 12] = out[a + 10:a + 12]  # checksums: judged by validity below
            want[p.l4] = 0
        else:
            want[a + 8:a + 24], want[a + 24:a + 40] = frame[a + 24:a + 40], frame[a + 8:a + 24]
            want[a + 7] = 64
            want[p.l4] = 129
        want[p.l4 + 2:p.l4 + 4] = out[p.l4 + 2:p.l4 + 4]
        problems = []
        if bytes(want) != out:
            problems.append("echo reply differs beyond its checksums: " + _diff(bytes(want), out))

        def valid(fr: bytes) -> tuple:
            msg = fr[p.l4:p.l4 + p.l4_len]
            if p.family == 4:
                return (ones_sum(fr[a:a + p.ip_header_len]) == 0xFFFF, ones_sum(msg) == 0xFFFF)
            src, dst = fr[a + 8:a + 24], fr[a + 24:a + 40]
            return (None, ones_sum(pseudo_header(6, src, dst, IPPROTO_ICMPV6, len(msg)) + msg) == 0xFFFF)
        if valid(frame) != valid(out):
            problems.append(f"echo checksums changed validity: {valid(frame)} -> {valid(out)}")
        return problems

    @staticmethod
    def _check_slot(slots: dict, owner, moved: dict[int, tuple], want: tuple, table: str, name: str) -> list[str]:
        """Exactly one slot moved by ``want``; the same slot as before for this owner, another owner's never."""
        if len(moved) != 1:
            return [f"{table}: {len(moved)} slots moved ({moved}), expected one, for {name}"]
        (slot, delta), = moved.items()
        problems = []
        if delta != want:
            problems.append(f"{table}[{slot}] moved by {delta}, expected {want} for {name}")
        known = slots.get(owner)
        if known is None:
            if slot in slots.values():
                problems.append(f"{table}[{slot}] counted {name}, but it counts another")
            else:
                slots[owner] = slot
        elif known != slot:
            problems.append(f"{table}[{slot}] counted {name}, whose slot is {known}")
        return problems

    def _record(self, pred: Prediction, mac: bytes) -> None:
        """The conntrack rules (9, 11, Counters: backend_active) after a forward."""
        fin_rst = bool(pred.parsed.tcp_flags & (TCP_FIN | TCP_RST)) if pred.parsed.proto == IPPROTO_TCP else False
        state = self.flows.get(pred.flow)
        if state is not None and pred.established is None:  # a SYN reopened a closed flow's entry
            state = None
        if state is None:
            syn_only = pred.parsed.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            counted = pred.parsed.proto == IPPROTO_TCP and not fin_rst and syn_only
            self.flows[pred.flow] = FlowState(mac, pred.vip, counted, fin_rst)
            if counted:
                self.active[mac] += 1
        elif fin_rst and not state.closing:
            state.closing = True
            if state.counted:
                self.active[mac] -= 1


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _diff(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"length {len(a)} -> {len(b)}"
    at = [i for i in range(len(a)) if a[i] != b[i]]
    return f"bytes changed at offsets {at[:16]}{' ...' if len(at) > 16 else ''}"


# ---- reading per-CPU counters fast ----------------------------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
_BPF_MAP_LOOKUP_BATCH = 24
_ENOENT = 2


class _BatchAttr(ctypes.Structure):
    # union bpf_attr, the `batch` member (include/uapi/linux/bpf.h)
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("map_fd", ctypes.c_uint32), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


class CounterMoves:
    """Which slots of a per-CPU ``struct fl_counter`` array moved since the last read.

    One BPF_MAP_LOOKUP_BATCH of the whole array per read; slots are compared
    as raw bytes first, and only the ones that differ are summed.
    """

    def __init__(self, fd: int, slots: int, ncpus: int):
        self.slots, self.ncpus = slots, ncpus
        self.stride = 24 * ncpus                      # packets, bytes, new_flows (u64) per CPU
        self.keys = (ctypes.c_uint32 * slots)()
        self.values = ctypes.create_string_buffer(self.stride * slots)
        self.out_batch = ctypes.c_uint32()
        self.attr = _BatchAttr(out_batch=ctypes.addressof(self.out_batch), keys=ctypes.addressof(self.keys),
                               values=ctypes.addressof(self.values), map_fd=fd)
        self.attr_ref = ctypes.byref(self.attr)
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.last = self._read()

    def _read(self) -> bytes:
        self.attr.count = self.slots
        rc = self.libc.syscall(_SYS_BPF, _BPF_MAP_LOOKUP_BATCH, self.attr_ref, ctypes.sizeof(self.attr))
        if rc < 0:
            err = ctypes.get_errno()
            if err != _ENOENT or self.attr.count != self.slots:
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)} ({self.attr.count} slots)")
        return self.values.raw

    def totals(self, raw: bytes | None = None) -> list[tuple[int, int, int]]:
        raw = self.last if raw is None else raw
        return [self._sum(raw, i) for i in range(self.slots)]

    def _sum(self, raw: bytes, slot: int) -> tuple[int, int, int]:
        words = memoryview(raw)[slot * self.stride:(slot + 1) * self.stride].cast("Q")
        return sum(words[0::3]), sum(words[1::3]), sum(words[2::3])

    def moves(self) -> dict[int, tuple[int, int, int]]:
        raw = self._read()
        last, self.last = self.last, raw
        if raw == last:
            return {}
        out = {}
        s = self.stride
        for i in range(self.slots):
            if raw[i * s:(i + 1) * s] != last[i * s:(i + 1) * s]:
                a, b = self._sum(raw, i), self._sum(last, i)
                out[i] = (a[0] - b[0], a[1] - b[1], a[2] - b[2])
        return out


# ---- the campaign: the real program against the model ------------------------------

@dataclass
class Report:
    seed: int
    packets: int = 0
    disagreements: int = 0
    misforwards: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)         # the oracle's reasons (= the kernel's when all agree)
    rules: Counter = field(default_factory=Counter)
    forwarded: Counter = field(default_factory=Counter)       # new / established, and the checksum states kept
    flushes: int = 0
    active_problems: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)         # the first few, in full

    @property
    def rate(self) -> float:
        return self.packets / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        lines = [f"seed {self.seed}: {self.packets:,} packets fuzzed in {self.seconds:.1f} s "
                 f"({self.rate:,.0f} packets/s)",
                 f"disagreements with the oracle: {self.disagreements}",
                 f"mis-forwards: {self.misforwards}",
                 f"backend_active mismatches: {len(self.active_problems)}",
                 f"conntrack flushes (to stay below eviction): {self.flushes}",
                 "per reason:"]
        lines += [f"  {name:24} {count:>10,}" for name, count in sorted(self.reasons.items())]
        lines.append("forwarded frames:")
        lines += [f"  {name:24} {count:>10,}" for name, count in sorted(self.forwarded.items())]
        lines += self.active_problems[:5] + self.failures
        return "\n".join(lines)


def describe(frame: bytes) -> str:
    """A scapy dissection of ``frame``, for a failure report (scapy is imported only here)."""
    try:
        from scapy.layers.l2 import Ether
        return Ether(frame).show(dump=True)
    except Exception as exc:  # scapy's own dissection can fail on odd bytes; say so, keep the report
        return f"(scapy could not dissect it: {exc!r})"


class Campaign:
    """Feeds frames to a loaded program (fastlb.testing.testbed.Testbed) and judges each one.

    ``bed`` must already hold the config the oracle models, with an empty
    conntrack. Counters are read through their own file descriptors.
    """

    def __init__(self, bed, oracle: Oracle, seed: int, keep_failures: int = 5):
        from fastlb.testing import _testrun  # the compiled BPF_PROG_TEST_RUN call: only the kernel side
        self.run_frame = _testrun.run
        self.bed, self.oracle = bed, oracle
        self.fd = bed.fd
        self.reason_ids = read_reasons()
        ncpus = possible_cpus()
        fds = bed.maps.fds
        self.reasons = CounterMoves(fds["reason_stats"], len(self.reason_ids), ncpus)
        self.vip_counters = CounterMoves(fds["vip_stats"], bed.sizes.max_vips, ncpus)
        self.backend_counters = CounterMoves(fds["backend_stats"], bed.sizes.max_backends, ncpus)
        # One CPU's LRU list holds conntrack_size / ncpus entries: flush at half that.
        self.flow_limit = bed.sizes.conntrack_size // ncpus // 2
        self.active_base = self._active()
        self.report = Report(seed)
        self.keep_failures = keep_failures

    def _active(self) -> list[int]:
        return self.bed.maps.read_u32_slice("backend_active", 0, self.bed.sizes.max_backends)

    def feed(self, frames) -> Report:
        rep, oracle, run, fd = self.report, self.oracle, self.run_frame, self.fd
        start = time.perf_counter()
        for frame in frames:
            if len(oracle.flows) >= self.flow_limit:
                self.flush()
            pred = oracle.predict(frame)
            verdict, out, _ = run(fd, frame)
            problems, misforward = oracle.judge(frame, pred, verdict, out, self.reasons.moves(),
                                                self.vip_counters.moves(), self.backend_counters.moves(),
                                                self.reason_ids)
            rep.packets += 1
            rep.reasons[pred.reason] += 1
            rep.rules[pred.rule] += 1
            if pred.reason == "FL_TX_DSR" and not problems:
                state = checksum_state(frame, pred.parsed)
                rep.forwarded["established" if pred.established else "new flow"] += 1
                rep.forwarded[f"ip csum {'-' if state.ip is None else 'ok' if state.ip else 'bad'}, "
                              f"l4 csum {'none' if state.l4 is None else 'ok' if state.l4 else 'bad'}"] += 1
            if problems:
                rep.disagreements += 1
                rep.misforwards += misforward
                if len(rep.failures) < self.keep_failures:
                    rep.failures.append(self._failure(rep.packets - 1, frame, pred, verdict, out, problems))
        rep.seconds += time.perf_counter() - start
        return rep

    def flush(self) -> None:
        self.check_active()
        self.bed.flush_conntrack()
        self.oracle.forget_flows()
        self.report.flushes += 1

    def check_active(self) -> list[str]:
        """backend_active per backend == the model's open TCP flows (Counters in DATAPLANE.md)."""
        now = self._active()
        slot_of = self.oracle.backend_slot
        problems = []
        for slot in range(len(now)):
            macs = [m for m, s in slot_of.items() if s == slot]
            want = self.active_base[slot] + sum(self.oracle.active[m] for m in macs)
            if now[slot] != want:
                problems.append(f"backend_active[{slot}] ({', '.join(_mac(m) for m in macs) or 'unused'}) "
                                f"is {now[slot]}, the model says {want}")
        self.report.active_problems += problems
        return problems

    def _failure(self, index, frame, pred, verdict, out, problems) -> str:
        return "\n".join([
            f"--- disagreement: seed {self.report.seed}, packet #{index} (in feed order)",
            f"oracle: {pred.reason} by rule {pred.rule}; kernel verdict {verdict}",
            *("  " + p for p in problems),
            f"frame ({len(frame)} bytes): {frame.hex()}",
            f"output: {out.hex()}" if out != frame else "output: unchanged",
            describe(frame)])
