"""The bpf() system call, for the few commands fastlb needs outside BCC.

BCC compiles and loads the program; everything that must work without a
compile (status, stats, detach, and adopting pinned objects) goes through
these thin wrappers: pinning, map access, object info and BPF links.
The attribute blocks mirror ``union bpf_attr`` in include/uapi/linux/bpf.h;
the kernel wants the unused tail zeroed, which ctypes does.

Every failure raises ``OSError`` with the errno; callers turn it into a
FastlbError that names the object.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34

# enum bpf_attach_type / bpf_link_type / bpf_map_type (the ones fastlb uses)
BPF_XDP = 37
BPF_LINK_TYPE_XDP = 6
MAP_TYPES = {1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash",
             10: "lru_percpu_hash", 11: "lpm_trie", 14: "devmap"}

# XDP attach flags (include/uapi/linux/if_link.h)
XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4

BPF_ANY = 0
BPF_NOEXIST = 1

# Map creation flags (include/uapi/linux/bpf.h)
BPF_F_NO_COMMON_LRU = 2


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("map_fd", ctypes.c_uint32), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32), ("path_fd", ctypes.c_int32), ("pad", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint64 * 4)]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("old_prog_fd", ctypes.c_uint32)]


class _LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class MapInfo(ctypes.Structure):
    """The head of ``struct bpf_map_info``."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]

    @property
    def type_name(self) -> str:
        return MAP_TYPES.get(self.type, f"type {self.type}")


class LinkInfo(ctypes.Structure):
    """``struct bpf_link_info`` for an XDP link (the union holds the ifindex)."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("ifindex", ctypes.c_uint32), ("rest", ctypes.c_uint32 * 7)]


@functools.cache
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_int(cmd), ctypes.byref(attr),
                      ctypes.c_uint(ctypes.sizeof(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def _addr(buf) -> int:
    return ctypes.addressof(buf)


# ---- objects in bpffs -------------------------------------------------------

def obj_get(path: str) -> int:
    """Open a pinned object; returns a new fd (close it)."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=_addr(raw)))


def obj_pin(fd: int, path: str) -> None:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=_addr(raw), bpf_fd=fd))


def _info(fd: int, info: ctypes.Structure):
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info)))
    return info


def map_info(fd: int) -> MapInfo:
    return _info(fd, MapInfo())


def link_info(fd: int) -> LinkInfo:
    return _info(fd, LinkInfo())


# ---- maps --------------------------------------------------------------------

def map_lookup(fd: int, key, value) -> bool:
    """Fill ``value`` (a ctypes object) from ``key``; False when absent."""
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value)))
    except FileNotFoundError:
        return False
    return True


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    _bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value), flags=flags))


def map_update_batch(fd: int, keys, values, count: int) -> None:
    """Write ``count`` entries in as few calls as the kernel allows.

    ``keys`` and ``values`` are ctypes arrays of at least ``count`` elements.
    """
    key_size = ctypes.sizeof(keys._type_)
    value_size = ctypes.sizeof(values._type_)
    done = 0
    while done < count:
        attr = _BatchAttr(keys=_addr(keys) + done * key_size, values=_addr(values) + done * value_size,
                          count=count - done, map_fd=fd)
        _bpf(BPF_MAP_UPDATE_BATCH, attr)
        if attr.count == 0:
            raise OSError(5, "BPF_MAP_UPDATE_BATCH wrote nothing")
        done += attr.count


def array_lookup_batch(fd: int, start: int, count: int, value_type) -> list:
    """Read ``count`` consecutive slots of an array map from ``start``.

    The kernel's batch token is the last key already read: a call with token
    k returns the slots after k (no token: from slot 0).
    """
    keys = (ctypes.c_uint32 * count)()
    values = (value_type * count)()
    out: list = []
    token = ctypes.c_uint32(start - 1) if start > 0 else None
    out_token = ctypes.c_uint32()
    while len(out) < count:
        attr = _BatchAttr(in_batch=_addr(token) if token is not None else 0, out_batch=_addr(out_token),
                          keys=_addr(keys), values=_addr(values), count=count - len(out), map_fd=fd)
        try:
            _bpf(BPF_MAP_LOOKUP_BATCH, attr)
        except FileNotFoundError:  # ENOENT: the end of the array
            pass
        if attr.count == 0:
            raise OSError(5, "BPF_MAP_LOOKUP_BATCH read nothing before the requested end")
        # Copies: the next call reuses the buffer that ctypes structures would point into.
        out.extend(_owned(values[i]) for i in range(attr.count))
        token = ctypes.c_uint32(out_token.value)
    return out


def _owned(value):
    return value if isinstance(value, int) else type(value).from_buffer_copy(value)


def map_lookup_batch(fd: int, key_type, value_type, chunk: int = 4096) -> list[tuple]:
    """Every (key, value) of a hash or LRU hash map, read ``chunk`` at a time.

    The batch token of a hash map is a bucket number (u32) that only the
    kernel interprets. A bucket that holds more entries than ``chunk`` gives
    ENOSPC; the chunk is then doubled and the same bucket read again. Entries
    added or removed while the walk runs may or may not be seen (the kernel's
    batch walk is not a snapshot).
    """
    out: list[tuple] = []
    for keys, values, count in _lookup_batches(fd, key_type, value_type, chunk, reuse=False):
        out += [(keys[i], values[i]) for i in range(count)]   # views into each batch's own arrays
    return out


def map_count(fd: int, key_type, value_type, chunk: int = 8192) -> int:
    """How many entries a hash or LRU hash map holds, by the same batch walk
    into one reused buffer: no Python object per entry (the kernel still copies
    each entry once)."""
    return sum(count for _, _, count in _lookup_batches(fd, key_type, value_type, chunk, reuse=True))


def _lookup_batches(fd: int, key_type, value_type, chunk: int, reuse: bool):
    """(keys, values, count) per BPF_MAP_LOOKUP_BATCH call until the walk ends;
    with ``reuse`` the next call overwrites the arrays the last one gave."""
    token_in = ctypes.c_uint64()
    token_out = ctypes.c_uint64()
    first = True
    keys = values = None
    while True:
        if keys is None or not reuse or len(keys) != chunk:
            keys = (key_type * chunk)()
            values = (value_type * chunk)()
        attr = _BatchAttr(in_batch=0 if first else _addr(token_in), out_batch=_addr(token_out),
                          keys=_addr(keys), values=_addr(values), count=chunk, map_fd=fd)
        done = False
        try:
            _bpf(BPF_MAP_LOOKUP_BATCH, attr)
        except FileNotFoundError:  # ENOENT: the walk is over; attr.count entries were still read
            done = True
        except OSError as exc:
            if exc.errno == 28 and chunk < (1 << 20):  # ENOSPC: one bucket is bigger than chunk
                chunk *= 2
                continue
            raise
        yield keys, values, attr.count
        if done:
            return
        token_in.value = token_out.value
        first = False


def map_delete_batch(fd: int, keys, count: int) -> int:
    """Delete ``keys[:count]`` (a ctypes array); returns how many were there and are gone.

    The kernel stops a batch at the first key that is absent (ENOENT): that
    key is skipped and the rest go in the next call.
    """
    key_size = ctypes.sizeof(keys._type_)
    done = deleted = 0
    while done < count:
        attr = _BatchAttr(keys=_addr(keys) + done * key_size, count=count - done, map_fd=fd)
        try:
            _bpf(BPF_MAP_DELETE_BATCH, attr)
        except FileNotFoundError:
            done += attr.count + 1  # the ones before the absent key went, then skip it
            deleted += attr.count
            continue
        done += attr.count
        deleted += attr.count
        if attr.count == 0:
            raise OSError(5, "BPF_MAP_DELETE_BATCH deleted nothing")
    return deleted


def map_delete(fd: int, key) -> bool:
    """Delete ``key``; False when it was absent."""
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key)))
    except FileNotFoundError:
        return False
    return True


def map_keys(fd: int, key_type):
    """Iterate over a hash map's keys (``key_type`` instances)."""
    prev = None
    while True:
        nxt = key_type()
        attr = _MapElemAttr(map_fd=fd, key=_addr(prev) if prev is not None else 0, value=_addr(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except FileNotFoundError:
            return
        yield nxt
        prev = nxt


# ---- XDP links ---------------------------------------------------------------

def link_create_xdp(prog_fd: int, ifindex: int, flags: int) -> int:
    """Attach an XDP program through a BPF link; returns the link fd.

    The kernel refuses (EBUSY) when a program is already attached through
    netlink, and other tools cannot replace a link-attached program, so the
    link is both "attach only if free" and "only I can replace it".
    """
    return _bpf(BPF_LINK_CREATE, _LinkCreateAttr(prog_fd=prog_fd, target_ifindex=ifindex,
                                                 attach_type=BPF_XDP, flags=flags))


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the link's program atomically."""
    _bpf(BPF_LINK_UPDATE, _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd))


def link_detach(link_fd: int) -> None:
    _bpf(BPF_LINK_DETACH, _LinkDetachAttr(link_fd=link_fd))


def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count
