"""ctypes twins of the map keys and values in bpf/fastlb_structs.h.

tests/bpf/test_structs.py checks every field's name, offset and size against
the layouts BCC generates from the C, so the two cannot drift apart.
Addresses are stored in network byte order: IPv4 in ``addr[0]`` with the
other words zero, IPv6 in all four words.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

from fastlb.kernel import cdefs

U32x4 = ctypes.c_uint32 * 4


class VipKey(ctypes.Structure):
    _fields_ = [("addr", U32x4), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("family", ctypes.c_uint8)]


class VipMeta(ctypes.Structure):
    _fields_ = [("gen", ctypes.c_uint32), ("algorithm", ctypes.c_uint8),
                ("forwarding", ctypes.c_uint8), ("hash_mode", ctypes.c_uint8),
                ("flags", ctypes.c_uint8), ("seq_len", ctypes.c_uint32),
                ("ring_size", ctypes.c_uint32)]


class Backend(ctypes.Structure):
    _fields_ = [("addr", U32x4), ("mac", ctypes.c_uint8 * 6), ("family", ctypes.c_uint8),
                ("flags", ctypes.c_uint8), ("port", ctypes.c_uint16), ("weight", ctypes.c_uint16),
                ("vip_id", ctypes.c_uint32), ("rtt_us", ctypes.c_uint32),
                ("egress_ifindex", ctypes.c_uint32), ("egress_slot", ctypes.c_uint32),
                ("gen", ctypes.c_uint32)]


class Iface(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16)]


class FlowKey(ctypes.Structure):
    _fields_ = [("src", U32x4), ("dst", U32x4), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint16)]


class CtValue(ctypes.Structure):
    _fields_ = [("backend_id", ctypes.c_uint32), ("vip_id", ctypes.c_uint32),
                ("vip_gen", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("last_seen_ns", ctypes.c_uint64), ("backend_gen", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class Unrecorded(ctypes.Structure):
    _fields_ = [("seen_ns", ctypes.c_uint64), ("hash", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class NatRev(ctypes.Structure):
    _fields_ = [("vip", U32x4), ("vip_port", ctypes.c_uint16), ("client_mac", ctypes.c_uint8 * 6),
                ("vip_id", ctypes.c_uint32), ("client_port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class SrcKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("family", ctypes.c_uint32), ("addr", U32x4)]


class PersistKey(ctypes.Structure):
    _fields_ = [("addr", U32x4), ("vip_id", ctypes.c_uint32), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class PersistValue(ctypes.Structure):
    _fields_ = [("backend_id", ctypes.c_uint32), ("vip_gen", ctypes.c_uint32), ("last_seen_ns", ctypes.c_uint64),
                ("backend_gen", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class VipPersist(ctypes.Structure):
    _fields_ = [("timeout_ns", ctypes.c_uint64), ("mask", U32x4)]


class Settings(ctypes.Structure):
    _fields_ = [("icmp_src4", ctypes.c_uint32), ("icmp_src6", U32x4),
                ("tunnel_src4", ctypes.c_uint32), ("tunnel_host4", ctypes.c_uint32),
                ("tunnel_src6", U32x4), ("tunnel_host6", ctypes.c_uint32),
                ("nat_vips", ctypes.c_uint32), ("lb_mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16),
                ("new_flow_rate", ctypes.c_uint32), ("udp_timeout_s", ctypes.c_uint32),
                ("tcp_syn_timeout_s", ctypes.c_uint32), ("tcp_timeout_s", ctypes.c_uint32),
                ("tcp_fin_timeout_s", ctypes.c_uint32), ("icmp_rate", ctypes.c_uint32),
                ("icmp_burst", ctypes.c_uint32), ("pad2", ctypes.c_uint32)]


class Flood(ctypes.Structure):
    _fields_ = [("window_start_ns", ctypes.c_uint64), ("new_flows", ctypes.c_uint64)]


class Counter(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("new_flows", ctypes.c_uint64)]


# C struct name -> ctypes twin (the structs test walks this).
C_STRUCTS = {
    "vip_key": VipKey,
    "vip_meta": VipMeta,
    "backend": Backend,
    "flow_key": FlowKey,
    "ct_value": CtValue,
    "fl_counter": Counter,
    "nat_rev": NatRev,
    "fl_settings": Settings,
    "fl_flood": Flood,
    "fl_iface": Iface,
    "fl_src_key": SrcKey,
    "fl_unrecorded": Unrecorded,
}


def family_of(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return cdefs.FL_AF_INET if addr.version == 4 else cdefs.FL_AF_INET6


def pack_addr(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> U32x4:
    """The address as the kernel stores it: network-order bytes in u32 words."""
    raw = addr.packed.ljust(16, b"\0")
    return U32x4.from_buffer_copy(raw)


def unpack_addr(words: U32x4, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes(words)
    if family == cdefs.FL_AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


def port_be(port: int) -> int:
    """A port as the u16 the kernel loads from the packet (network order)."""
    return socket.htons(port)


def port_host(port_be_value: int) -> int:
    return socket.ntohs(port_be_value)


def vip_key(address, port: int, proto: int) -> VipKey:
    return VipKey(addr=pack_addr(address), port=port_be(port), proto=proto, family=family_of(address))


def addr_marker_key(address) -> VipKey:
    """The address-only entry that tells "VIP address, wrong port" from "not a VIP"."""
    return VipKey(addr=pack_addr(address), port=cdefs.FL_VIP_ADDR_PORT,
                  proto=cdefs.FL_VIP_ADDR_PROTO, family=family_of(address))


def mac_bytes(mac: str) -> bytes:
    raw = bytes(int(part, 16) for part in mac.split(":"))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return raw


def mac_str(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))
