"""The pure-Python twin of :mod:`fastlb.core._core` (msgpack-python's pattern).

Every public function here returns exactly what the compiled module returns,
bit for bit; ``tests/unit/test_core.py`` runs both and checks they agree. The twin
is the readable statement of each algorithm and the fallback when the
extension is not built. Import the public API from :mod:`fastlb.core`, which
picks the implementation.

The compiled module takes its constants, its error reporting (the check_*
helpers, called when its fast-path checks fail) and the weight scaling of
smooth WRR from here, so those cannot drift apart; it reimplements every
hash and every loop. docs/HASH.md states each rule.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections.abc import Sequence

from fastlb.kernel import cdefs

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF

# Linux's JHASH_INITVAL; bpf/fastlb_hash.h calls it FL_JHASH_INITVAL.
JHASH_INITVAL = 0xDEADBEEF

_C = cdefs.load()
HASH_5TUPLE = _C.FL_HASH_5TUPLE
HASH_SRC = _C.FL_HASH_SRC
P2C_SALT = _C.FL_P2C_SALT
P2C_PROBES = _C.FL_P2C_PROBES

EMPTY = -1                  # a ring or sequence slot with no backend (FL_RING_EMPTY in the map)
MAX_WEIGHT = 65535          # backend weights are u16
MIN_RING_SIZE = 3
MAX_RING_SIZE = 1 << 24     # 16,777,216: a turn is packed as tick << 24 | backend
MAX_BACKENDS = 1 << 24      # backends with weight > 0 in one table
# initval salt of the second (skip) hash of a backend key; "mgsk".
MAGLEV_SKIP_SALT = 0x6D67736B
# Maglev turn clock: a backend of weight w takes turn k (k = 0, 1, ...) at tick
# ceil((2k + 1) * TURN_SCALE / (2w)). TURN_SCALE > MAX_WEIGHT, so one backend
# never takes two turns on the same tick.
TURN_SCALE = 65536


# ---------------------------------------------------------------- input checks

def check_u32(name: str, value: int) -> int:
    """``value`` as an int in 0..2**32-1, or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= U32:
        raise ValueError(f"{name}={value} is out of range; it must fit a u32 (0..{U32})")
    return value


def check_weights(weights: Sequence[int]) -> list[int]:
    """Weights as a list of ints in 0..65535, or ValueError naming the bad one."""
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"weights[{i}] must be an int, not {type(w).__name__}")
        if not 0 <= w <= MAX_WEIGHT:
            raise ValueError(f"weights[{i}]={w} is out of range; use 0..{MAX_WEIGHT} (0 leaves the backend out)")
        out.append(w)
    return out


def check_ring_size(size: int) -> int:
    """``size`` if it is a usable Maglev table size (a prime in 3..2**24), else ValueError."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"Maglev table size must be an int, not {type(size).__name__}")
    if not MIN_RING_SIZE <= size <= MAX_RING_SIZE or not is_prime(size):
        hint = next_prime(size) if MIN_RING_SIZE <= size < MAX_RING_SIZE else 65537
        raise ValueError(f"Maglev table size {size} is not a prime in {MIN_RING_SIZE}..{MAX_RING_SIZE}; "
                         f"use a prime such as {hint}")
    return size


def check_keys(keys: Sequence[bytes], n_weights: int) -> list[bytes]:
    """Backend keys as bytes; ValueError on a length mismatch or a duplicate."""
    if len(keys) != n_weights:
        raise ValueError(f"{len(keys)} keys but {n_weights} weights; give one weight per backend")
    out = []
    seen: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        if isinstance(k, str) or not isinstance(k, (bytes, bytearray, memoryview)):
            raise TypeError(f"keys[{i}] must be bytes (e.g. b'198.18.0.11:80'), not {type(k).__name__}")
        k = bytes(k)
        if k in seen:
            raise ValueError(f"keys[{i}]={k!r} repeats keys[{seen[k]}]; backend keys must be unique")
        seen[k] = i
        out.append(k)
    return out


def as_int_array(values: Sequence[int], name: str) -> array:
    """``values`` as an array('i') (no copy if it already is one)."""
    if isinstance(values, array) and values.typecode == "i":
        return values
    try:
        return array("i", values)
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"{name} must be a sequence of int32 values: {exc}") from exc


# ---------------------------------------------------------------------- primes

def is_prime(n: int) -> bool:
    """Deterministic primality by trial division (table sizes are small)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    if n % 3 == 0:
        return n == 3
    f = 5
    while f * f <= n:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


def next_prime(n: int) -> int:
    """The smallest prime >= n."""
    n = max(n, 2)
    while not is_prime(n):
        n += 1
    return n


# ------------------------------------------------------------------- flow hash

def _rol32(x: int, s: int) -> int:
    return ((x << s) | (x >> (32 - s))) & U32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & U32; a ^= _rol32(c, 4);  c = (c + b) & U32
    b = (b - a) & U32; b ^= _rol32(a, 6);  a = (a + c) & U32
    c = (c - b) & U32; c ^= _rol32(b, 8);  b = (b + a) & U32
    a = (a - c) & U32; a ^= _rol32(c, 16); c = (c + b) & U32
    b = (b - a) & U32; b ^= _rol32(a, 19); a = (a + c) & U32
    c = (c - b) & U32; c ^= _rol32(b, 4);  b = (b + a) & U32
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rol32(b, 14)) & U32
    a ^= c; a = (a - _rol32(c, 11)) & U32
    b ^= a; b = (b - _rol32(a, 25)) & U32
    c ^= b; c = (c - _rol32(b, 16)) & U32
    a ^= c; a = (a - _rol32(c, 4)) & U32
    b ^= a; b = (b - _rol32(a, 14)) & U32
    c ^= b; c = (c - _rol32(b, 24)) & U32
    return c


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    """Linux's jhash_3words (fl_jhash_3words in bpf/fastlb_hash.h)."""
    for name, v in (("a", a), ("b", b), ("c", c), ("initval", initval)):
        check_u32(name, v)
    iv = (initval + JHASH_INITVAL + (3 << 2)) & U32
    return _final((a + iv) & U32, (b + iv) & U32, (c + iv) & U32)


def jhash2(words: Sequence[int], initval: int) -> int:
    """Linux's jhash2 over any number of u32 words (fl_jhash_{1word,4words,9words} fix the length)."""
    check_u32("initval", initval)
    k = [check_u32(f"words[{i}]", w) for i, w in enumerate(words)]
    length = len(k)
    a = b = c = (JHASH_INITVAL + (length << 2) + initval) & U32
    i = 0
    while length > 3:
        a = (a + k[i]) & U32
        b = (b + k[i + 1]) & U32
        c = (c + k[i + 2]) & U32
        a, b, c = _mix(a, b, c)
        length -= 3
        i += 3
    if length == 0:
        return c
    if length == 3:
        c = (c + k[i + 2]) & U32
    if length >= 2:
        b = (b + k[i + 1]) & U32
    a = (a + k[i]) & U32
    return _final(a, b, c)


def check_flow(src: bytes, dst: bytes, sport: int, dport: int, proto: int, seed: int, mode: int) -> None:
    """ValueError unless the arguments describe one flow the kernel could hash."""
    for name, addr in (("src", src), ("dst", dst)):
        if not isinstance(addr, (bytes, bytearray, memoryview)):
            raise TypeError(f"{name} must be a packed address (bytes), not {type(addr).__name__}")
    if len(src) not in (4, 16) or len(src) != len(dst):
        raise ValueError(f"src and dst must both be 4 (IPv4) or 16 (IPv6) bytes, got {len(src)} and {len(dst)}")
    for name, v, hi in (("sport", sport, 0xFFFF), ("dport", dport, 0xFFFF), ("proto", proto, 0xFF)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, not {type(v).__name__}")
        if not 0 <= v <= hi:
            raise ValueError(f"{name}={v} is out of range 0..{hi}")
    check_u32("seed", seed)
    if mode not in (HASH_5TUPLE, HASH_SRC):
        raise ValueError(f"hash mode {mode!r} is unknown; use FL_HASH_5TUPLE ({HASH_5TUPLE}) "
                         f"or FL_HASH_SRC ({HASH_SRC})")


def _le_words(addr: bytes) -> list[int]:
    return [int.from_bytes(addr[i:i + 4], "little") for i in range(0, len(addr), 4)]


def flow_hash(src: bytes, dst: bytes, sport: int, dport: int, proto: int, seed: int, mode: int) -> int:
    """The kernel's flow hash of one packet (docs/HASH.md)."""
    check_flow(src, dst, sport, dport, proto, seed, mode)
    s = _le_words(bytes(src))
    if mode == HASH_SRC:
        return jhash2(s, seed)
    d = _le_words(bytes(dst))
    ports = int.from_bytes(sport.to_bytes(2, "big") + dport.to_bytes(2, "big"), "little")
    if len(s) == 1:
        return jhash_3words(s[0], d[0], ports, seed ^ proto)
    return jhash2(s + d + [ports], seed ^ proto)


def jhash(data: bytes, initval: int) -> int:
    """Linux's jhash over a byte string (lookup3's hashlittle, little-endian words)."""
    check_u32("initval", initval)
    k = bytes(data)
    length = len(k)
    a = b = c = (JHASH_INITVAL + length + initval) & U32
    i = 0
    while length > 12:
        a = (a + int.from_bytes(k[i:i + 4], "little")) & U32
        b = (b + int.from_bytes(k[i + 4:i + 8], "little")) & U32
        c = (c + int.from_bytes(k[i + 8:i + 12], "little")) & U32
        a, b, c = _mix(a, b, c)
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = k[i:] + bytes(12 - length)   # zero bytes add nothing, as in the C switch
    a = (a + int.from_bytes(tail[0:4], "little")) & U32
    b = (b + int.from_bytes(tail[4:8], "little")) & U32
    c = (c + int.from_bytes(tail[8:12], "little")) & U32
    return _final(a, b, c)


def p2c_rehash(h: int, seed: int) -> int:
    """The hash that picks the second P2C candidate (fl_p2c_rehash)."""
    return jhash_3words(check_u32("h", h), 0, 0, check_u32("seed", seed) ^ P2C_SALT)


# ---------------------------------------------------------------------- Maglev

def maglev_permutation(key: bytes, size: int, seed: int) -> tuple[int, int]:
    """(offset, skip) of one backend's preference list: its j-th choice is (offset + j*skip) % size.

    offset = jhash(key, seed) % size; skip = jhash(key, seed ^ MAGLEV_SKIP_SALT) % (size - 1) + 1.
    size is prime, so every skip in 1..size-1 visits every slot once.
    """
    offset = jhash(key, seed) % size
    skip = jhash(key, seed ^ MAGLEV_SKIP_SALT) % (size - 1) + 1
    return offset, skip


def maglev_plan(keys: Sequence[bytes], weights: Sequence[int], size: int, seed: int):
    """Checks the inputs and lays out the fill: the backends in it, in key order.

    Returns (positions, weights, offsets, skips) for the backends with weight > 0,
    sorted by key bytes so that the table does not depend on the input order.
    """
    check_ring_size(size)
    check_u32("seed", seed)
    w = check_weights(weights)
    k = check_keys(keys, len(w))
    order = sorted((i for i in range(len(w)) if w[i] > 0), key=lambda i: k[i])
    if len(order) > MAX_BACKENDS:
        raise ValueError(f"{len(order)} backends with weight > 0; one table holds at most {MAX_BACKENDS}")
    positions, ws, offsets, skips = [], [], [], []
    for i in order:
        off, sk = maglev_permutation(k[i], size, seed)
        positions.append(i)
        ws.append(w[i])
        offsets.append(off)
        skips.append(sk)
    return positions, ws, offsets, skips


def turn_tick(k: int, w: int) -> int:
    """The tick of a weight-``w`` backend's turn ``k``: ceil((2k+1) * TURN_SCALE / (2w))."""
    return ((2 * k + 1) * (TURN_SCALE // 2) + w - 1) // w


def maglev_table(keys: Sequence[bytes], weights: Sequence[int], size: int, seed: int) -> array:
    """Weighted Maglev lookup table of backend positions (-1 everywhere if no weight > 0)."""
    positions, ws, offsets, skips = maglev_plan(keys, weights, size, seed)
    n = len(positions)
    table = array("i", [EMPTY]) * size
    if n == 0:
        return table
    cur = list(offsets)
    turns = [0] * n
    heap = [(turn_tick(0, ws[j]), j) for j in range(n)]
    heapq.heapify(heap)
    filled = 0
    while True:
        j = heap[0][1]
        c = cur[j]
        skip = skips[j]
        while table[c] >= 0:
            c += skip
            if c >= size:
                c -= size
        table[c] = j
        filled += 1
        if filled == size:
            break
        c += skip
        if c >= size:
            c -= size
        cur[j] = c
        turns[j] += 1
        heapq.heapreplace(heap, (turn_tick(turns[j], ws[j]), j))
    return array("i", [positions[j] for j in table])


def table_delta(old: Sequence[int], new: Sequence[int]) -> tuple[array, array]:
    """(slots, values): the slots where ``new`` differs from ``old``, and their new values."""
    if len(old) != len(new):
        raise ValueError(f"tables differ in size ({len(old)} and {len(new)}); write the whole new table")
    slots = array("i")
    values = array("i")
    for i, (o, v) in enumerate(zip(old, new)):
        if o != v:
            slots.append(i)
            values.append(v)
    return slots, values


# ----------------------------------------------------------- smooth WRR (nginx)

def swrr_weights(weights: Sequence[int], max_len: int) -> list[int]:
    """The weights the sequence is built from: divided by their gcd, scaled to fit ``max_len``.

    When sum(w/g) > max_len, the weights are apportioned to ``max_len`` turns by
    the largest-remainder method with a floor of one turn: a backend whose
    exact share is under one turn gets one, the others split the rest in
    proportion (remainders ranked high to low, ties to the lower position).
    The result is divided by its gcd again.
    """
    w = check_weights(weights)
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"max_len must be an int, not {type(max_len).__name__}")
    if max_len < 1:
        raise ValueError(f"max_len={max_len}; a sequence needs at least one slot")
    live = [i for i, x in enumerate(w) if x > 0]
    if not live:
        return w
    if len(live) > max_len:
        raise ValueError(f"{len(live)} backends with weight > 0 do not fit a sequence of {max_len} slots; "
                         "raise the sequence size (FASTLB_SEQ_SIZE) or use fewer backends")
    g = 0
    for i in live:
        g = math.gcd(g, w[i])
    w = [x // g for x in w]
    if sum(w) <= max_len:
        return w
    floor1: list[int] = []
    rest = live
    while True:
        seats = max_len - len(floor1)
        total = sum(w[i] for i in rest)
        small = [i for i in rest if w[i] * seats < total]
        if not small:
            break
        floor1 += small
        rest = [i for i in rest if w[i] * seats >= total]
    out = [0] * len(w)
    for i in floor1:
        out[i] = 1
    if rest:
        rem = {}
        for i in rest:
            out[i], rem[i] = divmod(w[i] * seats, total)
        left = seats - sum(out[i] for i in rest)
        for i in sorted(rest, key=lambda i: (-rem[i], i))[:left]:
            out[i] += 1
    g = 0
    for x in out:
        g = math.gcd(g, x)
    return [x // g for x in out]


def swrr_sequence(weights: Sequence[int], max_len: int) -> array:
    """nginx's smooth weighted round robin, unrolled: the positions in the order they are picked.

    Weights 5:1:1 give [0, 0, 1, 0, 2, 0, 0]. Zero weights never appear; equal
    weights give plain round robin.
    """
    w = swrr_weights(weights, max_len)
    total = sum(w)
    seq = array("i")
    live = [i for i, x in enumerate(w) if x > 0]
    current = [0] * len(w)
    for _ in range(total):
        best = -1
        for i in live:
            current[i] += w[i]
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        seq.append(best)
    return seq


# ------------------------------------------------------------ power of two choices

def p2c_candidates(h: int, ring: Sequence[int], seed: int) -> tuple[int, int]:
    """The two candidates the kernel weighs for flow hash ``h`` (docs/HASH.md)."""
    check_u32("h", h)
    check_u32("seed", seed)
    m = len(ring)
    if m == 0:
        raise ValueError("the ring is empty; build it with maglev_table first")
    a = ring[h % m]
    start = p2c_rehash(h, seed) % m
    for i in range(P2C_PROBES):
        b = ring[(start + i) % m]
        if b != a and b != EMPTY:
            return a, b
    return a, a


def check_pick(a: int, b: int, active: Sequence[int], weights: Sequence[int], rtt: Sequence[int] | None) -> None:
    """ValueError unless a, b index every table and the values fit the kernel's types."""
    n = len(active)
    if len(weights) != n or (rtt is not None and len(rtt) != n):
        raise ValueError("active, weights and rtt must have one entry per backend")
    for name, x in (("a", a), ("b", b)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int, not {type(x).__name__}")
        if not 0 <= x < n:
            raise ValueError(f"candidate {name}={x} is not a backend position (0..{n - 1})")
    for x in (a, b):
        check_u32(f"active[{x}]", active[x])
        w = weights[x]
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"weights[{x}] must be an int, not {type(w).__name__}")
        if not 0 <= w <= MAX_WEIGHT:
            raise ValueError(f"weights[{x}]={w} is out of range; use 0..{MAX_WEIGHT}")
        if rtt is not None:
            check_u32(f"rtt[{x}]", rtt[x])


def p2c_pick(a: int, b: int, active: Sequence[int], weights: Sequence[int],
             rtt: Sequence[int] | None = None) -> int:
    """The lower-scored of two candidates; ties go to ``a``.

    lc (rtt is None): b wins iff (active[b]+1) * weights[a] < (active[a]+1) * weights[b].
    lrt: b wins iff rtt[b]*(active[b]+1)*weights[a] < rtt[a]*(active[a]+1)*weights[b].
    Products are u64 and wrap as they do in the kernel.
    """
    check_pick(a, b, active, weights, rtt)
    if rtt is None:
        sb = (active[b] + 1) * weights[a] & U64
        sa = (active[a] + 1) * weights[b] & U64
    else:
        sb = (rtt[b] * (active[b] + 1) & U64) * weights[a] & U64
        sa = (rtt[a] * (active[a] + 1) & U64) * weights[b] & U64
    return b if sb < sa else a


# ----------------------------------------------------------------- peak EWMA

class PeakEwma:
    """Peak-EWMA of a backend's response time, in microseconds (Finagle's load metric).

    A sample above the current estimate replaces it at once (the peak); a
    sample below it is blended in with weight ``1 - exp(-dt / decay_s)``, ``dt``
    being the time since the previous sample, so the estimate falls over about
    ``decay_s`` seconds. Between samples the estimate read by :meth:`score_us`
    decays toward zero the same way, so a backend that once looked slow (and
    so stopped winning flows, and stopped being measured by them) is tried
    again instead of starving.

    With no sample yet, the score is ``default_us`` (1 s unless configured):
    a backend nobody has measured must not attract new flows ahead of
    measured ones. The health checker's connect times give every live
    backend samples within one check interval, so the default only holds
    for backends that have never answered.

    Scores are integers clamped to 1..2**32-1, the kernel's u32: never 0, so
    lrt's ``rtt * (active + 1)`` still counts connections.
    """

    __slots__ = ("decay_s", "default_us", "_cost", "_stamp")

    def __init__(self, decay_s: float = 10.0, default_us: int = 1_000_000):
        if not decay_s > 0:
            raise ValueError(f"decay_s={decay_s}; the decay time must be > 0 seconds")
        check_u32("default_us", default_us)
        self.decay_s = float(decay_s)
        self.default_us = default_us
        self._cost: float | None = None
        self._stamp = 0.0

    @property
    def has_sample(self) -> bool:
        return self._cost is not None

    def _weight(self, now: float) -> float:
        return math.exp(-max(0.0, now - self._stamp) / self.decay_s)

    def observe(self, rtt_us: float, now: float) -> None:
        """Record one response time (microseconds) seen at monotonic time ``now`` (seconds)."""
        if not rtt_us >= 0:
            raise ValueError(f"rtt_us={rtt_us}; a response time is >= 0 microseconds")
        if self._cost is None:
            self._cost = float(rtt_us)
        else:
            w = self._weight(now)
            self._cost = max(float(rtt_us), self._cost * w + rtt_us * (1.0 - w))
        self._stamp = max(self._stamp, now)

    def score_us(self, now: float) -> int:
        """The estimate at ``now`` as the kernel's u32 microseconds."""
        if self._cost is None:
            return max(1, self.default_us)
        value = self._cost * self._weight(now)
        return min(U32, max(1, round(value)))

    def __repr__(self) -> str:
        state = "no sample" if self._cost is None else f"{self._cost:.0f} us at {self._stamp:.3f}"
        return f"PeakEwma(decay_s={self.decay_s}, default_us={self.default_us}: {state})"
