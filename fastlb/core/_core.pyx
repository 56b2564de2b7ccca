# cython: language_level=3
"""The selection core, compiled: flow hash, weighted Maglev, smooth WRR, P2C.

Pure functions that return arrays or deltas. ``fastlb/core/_pure.py`` is the
twin that gives the same answer for every input; import the public API from
:mod:`fastlb.core`, which picks one of the two. docs/HASH.md states each rule.

Inputs are checked on a fast path here; anything unusual (a bytearray key, a
weight out of range) goes through the twin's checker, so both raise the same
error with the same message. The Maglev permutation and fill, the smooth-WRR
walk and table deltas run in C without the GIL. Bounds checking is off in
the normal build; ``FASTLB_DEBUG_BUILD=1`` turns it back on.
"""

from cpython.array cimport array, clone
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcmp, memset

from fastlb.core import _pure
from fastlb.core._pure import PeakEwma, is_prime, next_prime  # no loop worth compiling

__all__ = [
    "IMPLEMENTATION", "PeakEwma", "flow_hash", "is_prime", "jhash", "jhash2", "jhash_3words",
    "maglev_table", "next_prime", "p2c_candidates", "p2c_pick", "p2c_rehash", "swrr_sequence",
    "table_delta",
]

IMPLEMENTATION = "cython"

cdef uint32_t JHASH_INITVAL = _pure.JHASH_INITVAL
cdef uint32_t P2C_SALT = _pure.P2C_SALT
cdef int P2C_PROBES = _pure.P2C_PROBES
cdef int HASH_5TUPLE = _pure.HASH_5TUPLE
cdef int HASH_SRC = _pure.HASH_SRC
cdef uint32_t MAGLEV_SKIP_SALT = _pure.MAGLEV_SKIP_SALT
cdef uint64_t TURN_HALF = _pure.TURN_SCALE // 2
cdef int64_t MAX_RING_SIZE = _pure.MAX_RING_SIZE
cdef int64_t MAX_BACKENDS = _pure.MAX_BACKENDS
cdef int MAX_WEIGHT = _pure.MAX_WEIGHT
cdef uint64_t TURN_SHIFT = 24          # a heap entry is tick << 24 | backend
cdef uint64_t TURN_MASK = (1 << 24) - 1

assert _pure.MAX_RING_SIZE <= 1 << 24 and _pure.MAX_BACKENDS <= 1 << 24

cdef array _INT_TEMPLATE = array("i")

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil


# ------------------------------------------------------------------ the hash

cdef inline uint32_t _rol32(uint32_t w, unsigned int s) noexcept nogil:
    return (w << s) | (w >> (32 - s))


cdef inline void _mix(uint32_t *a, uint32_t *b, uint32_t *c) noexcept nogil:
    a[0] -= c[0]; a[0] ^= _rol32(c[0], 4);  c[0] += b[0]
    b[0] -= a[0]; b[0] ^= _rol32(a[0], 6);  a[0] += c[0]
    c[0] -= b[0]; c[0] ^= _rol32(b[0], 8);  b[0] += a[0]
    a[0] -= c[0]; a[0] ^= _rol32(c[0], 16); c[0] += b[0]
    b[0] -= a[0]; b[0] ^= _rol32(a[0], 19); a[0] += c[0]
    c[0] -= b[0]; c[0] ^= _rol32(b[0], 4);  b[0] += a[0]


cdef inline uint32_t _final(uint32_t a, uint32_t b, uint32_t c) noexcept nogil:
    c ^= b; c -= _rol32(b, 14)
    a ^= c; a -= _rol32(c, 11)
    b ^= a; b -= _rol32(a, 25)
    c ^= b; c -= _rol32(b, 16)
    a ^= c; a -= _rol32(c, 4)
    b ^= a; b -= _rol32(a, 14)
    c ^= b; c -= _rol32(b, 24)
    return c


cdef inline uint32_t _jhash_3words(uint32_t a, uint32_t b, uint32_t c, uint32_t initval) noexcept nogil:
    initval += JHASH_INITVAL + (3 << 2)
    return _final(a + initval, b + initval, c + initval)


cdef uint32_t _jhash2(const uint32_t *k, Py_ssize_t length, uint32_t initval) noexcept nogil:
    cdef uint32_t a, b, c
    a = b = c = JHASH_INITVAL + (<uint32_t>length << 2) + initval
    while length > 3:
        a += k[0]; b += k[1]; c += k[2]
        _mix(&a, &b, &c)
        length -= 3
        k += 3
    if length == 0:
        return c
    if length == 3:
        c += k[2]
    if length >= 2:
        b += k[1]
    a += k[0]
    return _final(a, b, c)


cdef inline uint32_t _le32(const unsigned char *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef uint32_t _jhash_bytes(const unsigned char *k, Py_ssize_t length, uint32_t initval) noexcept nogil:
    cdef uint32_t a, b, c
    cdef unsigned char tail[12]
    cdef Py_ssize_t i
    a = b = c = JHASH_INITVAL + <uint32_t>length + initval
    while length > 12:
        a += _le32(k); b += _le32(k + 4); c += _le32(k + 8)
        _mix(&a, &b, &c)
        length -= 12
        k += 12
    if length == 0:
        return c
    memset(tail, 0, 12)
    for i in range(length):
        tail[i] = k[i]
    a += _le32(tail); b += _le32(tail + 4); c += _le32(tail + 8)
    return _final(a, b, c)


cdef inline bint _is_u32(object v):
    return type(v) is int and 0 <= v <= 0xFFFFFFFF


cdef inline uint32_t _u32(str name, object v) except? 0xFFFFFFFF:
    if not _is_u32(v):
        _pure.check_u32(name, v)   # raises the twin's TypeError / ValueError
    return <uint32_t>v


def jhash_3words(a, b, c, initval):
    """Linux's jhash_3words (fl_jhash_3words in bpf/fastlb_hash.h)."""
    return _jhash_3words(_u32("a", a), _u32("b", b), _u32("c", c), _u32("initval", initval))


def jhash2(words, initval):
    """Linux's jhash2 over any number of u32 words."""
    cdef uint32_t iv = _u32("initval", initval)
    cdef Py_ssize_t n = len(words), i
    cdef uint32_t *k = <uint32_t *>malloc((n if n > 0 else 1) * sizeof(uint32_t))
    if k == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            k[i] = _u32(f"words[{i}]", words[i])
        return _jhash2(k, n, iv)
    finally:
        free(k)


def jhash(data, initval):
    """Linux's jhash over a byte string (lookup3's hashlittle, little-endian words)."""
    cdef uint32_t iv = _u32("initval", initval)
    cdef bytes k = data if type(data) is bytes else bytes(data)
    return _jhash_bytes(<const unsigned char *>k, len(k), iv)


def flow_hash(src, dst, sport, dport, proto, seed, mode):
    """The kernel's flow hash of one packet (docs/HASH.md)."""
    cdef uint32_t w[9]
    cdef const unsigned char *s
    cdef const unsigned char *d
    cdef Py_ssize_t alen, i
    cdef uint32_t ports, iv
    if not (type(src) is bytes and type(dst) is bytes and len(src) == len(dst)
            and (len(src) == 4 or len(src) == 16)
            and type(sport) is int and 0 <= sport <= 0xFFFF
            and type(dport) is int and 0 <= dport <= 0xFFFF
            and type(proto) is int and 0 <= proto <= 0xFF
            and _is_u32(seed) and (mode == HASH_5TUPLE or mode == HASH_SRC)):
        _pure.check_flow(src, dst, sport, dport, proto, seed, mode)   # raises unless merely unusual
        src, dst = bytes(src), bytes(dst)
    s = src
    d = dst
    alen = len(src) // 4
    iv = <uint32_t>seed
    for i in range(alen):
        w[i] = _le32(s + 4 * i)
    if mode == HASH_SRC:
        return _jhash2(w, alen, iv)
    # The first four bytes of the TCP/UDP header (big-endian ports) read as a LE u32.
    ports = ((<uint32_t>sport >> 8) | ((<uint32_t>sport & 0xFF) << 8)
             | ((<uint32_t>dport >> 8) << 16) | ((<uint32_t>dport & 0xFF) << 24))
    iv ^= <uint32_t>proto
    if alen == 1:
        return _jhash_3words(w[0], _le32(d), ports, iv)
    for i in range(4):
        w[4 + i] = _le32(d + 4 * i)
    w[8] = ports
    return _jhash2(w, 9, iv)


def p2c_rehash(h, seed):
    """The hash that picks the second P2C candidate (fl_p2c_rehash)."""
    return _jhash_3words(_u32("h", h), 0, 0, _u32("seed", seed) ^ P2C_SALT)


# ---------------------------------------------------------------------- Maglev

cdef struct _Key:
    const unsigned char *p
    Py_ssize_t n
    int32_t pos


cdef int _key_cmp(const void *x, const void *y) noexcept nogil:
    """bytes ordering: memcmp over the common prefix, then the shorter first."""
    cdef const _Key *a = <const _Key *>x
    cdef const _Key *b = <const _Key *>y
    cdef int r = memcmp(a.p, b.p, a.n if a.n < b.n else b.n)
    if r != 0:
        return r
    if a.n != b.n:
        return -1 if a.n < b.n else 1
    return (a.pos > b.pos) - (a.pos < b.pos)


cdef bint _c_is_prime(int64_t n) noexcept nogil:
    cdef int64_t f = 5
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    if n % 3 == 0:
        return n == 3
    while f * f <= n:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


cdef inline uint64_t _tick(uint64_t k, uint64_t w) noexcept nogil:
    # the tick of turn k of a weight-w backend: ceil((2k+1) * TURN_SCALE / (2w))
    return ((2 * k + 1) * TURN_HALF + w - 1) // w


cdef inline void _sift_down(uint64_t *heap, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    cdef uint64_t x = heap[i]
    cdef Py_ssize_t c
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n:
            c += <Py_ssize_t>(heap[c + 1] < heap[c])   # branch-free: the pick is a coin toss
        if heap[c] >= x:
            break
        heap[i] = heap[c]
        i = c
    heap[i] = x


cdef inline void _sift_up(uint64_t *heap, Py_ssize_t i) noexcept nogil:
    cdef uint64_t x = heap[i]
    cdef Py_ssize_t p
    while i > 0:
        p = (i - 1) // 2
        if heap[p] <= x:
            break
        heap[i] = heap[p]
        i = p
    heap[i] = x


cdef int _u64_cmp(const void *x, const void *y) noexcept nogil:
    cdef uint64_t a = (<const uint64_t *>x)[0]
    cdef uint64_t b = (<const uint64_t *>y)[0]
    return (a > b) - (a < b)


cdef struct _Fill:
    int32_t *table          # out: backend index 0..n-1 per slot
    uint64_t *used          # size/64 + 1 words: slot taken
    uint32_t *cur           # per backend: next slot of its permutation
    const uint32_t *skip    # per backend: permutation step
    uint32_t m              # table size
    Py_ssize_t filled


cdef inline bint _take_turn(_Fill *f, uint32_t j) noexcept nogil:
    """Backend j claims its next free preferred slot; True once the table is full."""
    cdef uint32_t c = f.cur[j], sk = f.skip[j], m = f.m
    while f.used[c >> 6] & (<uint64_t>1 << (c & 63)):
        c += sk
        if c >= m:
            c -= m
    f.used[c >> 6] |= <uint64_t>1 << (c & 63)
    f.table[c] = <int32_t>j
    c += sk
    if c >= m:
        c -= m
    f.cur[j] = c
    f.filled += 1
    return f.filled == m


cdef int _maglev_fill(_Fill *f, Py_ssize_t n, const uint32_t *weight) noexcept nogil:
    """Fill f.table from backends 0..n-1 (n >= 1, key order) taking weighted turns.

    Turns run in (tick, backend) order, as in the twin's heap. Backends of one
    weight share every tick, so the heap holds one entry per distinct weight
    (tick << 24 | group) and a group's members take their turns in index
    order; when several groups share a tick their members are merged by index
    through a bitmap. Returns -1 if memory runs out.
    """
    cdef uint64_t *member = <uint64_t *>malloc(n * sizeof(uint64_t))     # weight << 32 | j, sorted
    cdef Py_ssize_t *gstart = <Py_ssize_t *>malloc((n + 1) * sizeof(Py_ssize_t))
    cdef uint32_t *gweight = <uint32_t *>malloc(n * sizeof(uint32_t))
    cdef uint64_t *gturn = <uint64_t *>malloc(n * sizeof(uint64_t))
    cdef uint64_t *heap = <uint64_t *>malloc(n * sizeof(uint64_t))
    cdef Py_ssize_t *due = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
    cdef uint64_t *mark = <uint64_t *>calloc(n // 64 + 1, sizeof(uint64_t))
    cdef Py_ssize_t i, g, ng = 0, hn, nd, lo, hi, wd
    cdef uint64_t tick, bits
    cdef int rc = 0
    if member == NULL or gstart == NULL or gweight == NULL or gturn == NULL or heap == NULL \
            or due == NULL or mark == NULL:
        rc = -1
    else:
        for i in range(n):
            member[i] = (<uint64_t>weight[i] << 32) | <uint64_t>i
        qsort(member, n, sizeof(uint64_t), _u64_cmp)
        for i in range(n):
            if ng == 0 or <uint32_t>(member[i] >> 32) != gweight[ng - 1]:
                gstart[ng] = i
                gweight[ng] = <uint32_t>(member[i] >> 32)
                gturn[ng] = 0
                heap[ng] = (_tick(0, gweight[ng]) << TURN_SHIFT) | <uint64_t>ng
                ng += 1
            member[i] &= <uint64_t>0xFFFFFFFF
        gstart[ng] = n
        hn = ng
        for i in range(hn // 2 - 1, -1, -1):
            _sift_down(heap, hn, i)
        while True:
            tick = heap[0] >> TURN_SHIFT
            if hn == 1 or (heap[1] >> TURN_SHIFT) != tick and (hn == 2 or (heap[2] >> TURN_SHIFT) != tick):
                # One group due (the usual case): its members in order, then replace the top.
                g = <Py_ssize_t>(heap[0] & TURN_MASK)
                for i in range(gstart[g], gstart[g + 1]):
                    if _take_turn(f, <uint32_t>member[i]):
                        break
                if f.filled == f.m:
                    break
                gturn[g] += 1
                heap[0] = (_tick(gturn[g], gweight[g]) << TURN_SHIFT) | <uint64_t>g
                _sift_down(heap, hn, 0)
                continue
            # Several groups due at this tick: pop them all, merge their members by index.
            nd = 0
            while hn > 0 and (heap[0] >> TURN_SHIFT) == tick:
                due[nd] = <Py_ssize_t>(heap[0] & TURN_MASK)
                nd += 1
                hn -= 1
                heap[0] = heap[hn]
                _sift_down(heap, hn, 0)
            lo = n
            hi = 0
            for wd in range(nd):
                g = due[wd]
                for i in range(gstart[g], gstart[g + 1]):
                    mark[member[i] >> 6] |= <uint64_t>1 << (member[i] & 63)
                lo = min(lo, <Py_ssize_t>(member[gstart[g]] >> 6))
                hi = max(hi, <Py_ssize_t>(member[gstart[g + 1] - 1] >> 6))
            for wd in range(lo, hi + 1):
                bits = mark[wd]
                mark[wd] = 0
                while bits and f.filled < f.m:
                    _take_turn(f, <uint32_t>(wd * 64 + __builtin_ctzll(bits)))
                    bits &= bits - 1
            if f.filled == f.m:
                break
            for wd in range(nd):
                g = due[wd]
                gturn[g] += 1
                heap[hn] = (_tick(gturn[g], gweight[g]) << TURN_SHIFT) | <uint64_t>g
                _sift_up(heap, hn)
                hn += 1
    free(member)
    free(gstart)
    free(gweight)
    free(gturn)
    free(heap)
    free(due)
    free(mark)
    return rc


def maglev_table(keys, weights, size, seed):
    """Weighted Maglev lookup table of backend positions (-1 everywhere if no weight > 0)."""
    cdef Py_ssize_t nk, n, i, live
    cdef int64_t m
    cdef uint32_t sd
    cdef object w
    cdef _Key *order = NULL
    cdef uint32_t *wt = NULL
    cdef uint32_t *buf = NULL
    cdef uint64_t *used = NULL
    cdef uint32_t *cur
    cdef uint32_t *skip
    cdef uint32_t *lw
    cdef _Fill fill
    cdef int rc = 0
    cdef int32_t *pos
    cdef array table
    cdef int32_t *t

    if not (type(size) is int and 3 <= size <= MAX_RING_SIZE and _c_is_prime(size)):
        _pure.check_ring_size(size)
    m = size
    sd = _u32("seed", seed)
    if type(keys) is not list:
        keys = list(keys)
    if type(weights) is not list:
        weights = list(weights)
    nk = len(keys)
    n = len(weights)
    if nk != n:
        _pure.check_keys(keys, n)
    for i in range(nk):
        if type(keys[i]) is not bytes:
            keys = _pure.check_keys(keys, n)
            break
    order = <_Key *>malloc((n if n > 0 else 1) * sizeof(_Key))
    wt = <uint32_t *>malloc((n if n > 0 else 1) * sizeof(uint32_t))
    try:
        if order == NULL or wt == NULL:
            raise MemoryError()
        live = 0
        for i in range(n):
            w = weights[i]
            if not (type(w) is int and 0 <= w <= MAX_WEIGHT):
                _pure.check_weights(weights)
            wt[i] = <uint32_t>w
            order[i].p = <const unsigned char *><bytes>keys[i]
            order[i].n = len(<bytes>keys[i])
            order[i].pos = <int32_t>i
            if wt[i] > 0:
                live += 1
        qsort(order, n, sizeof(_Key), _key_cmp)
        for i in range(1, n):
            if order[i].n == order[i - 1].n and memcmp(order[i].p, order[i - 1].p, order[i].n) == 0:
                _pure.check_keys(keys, n)   # names the duplicate and raises
        if live > MAX_BACKENDS:
            raise ValueError(f"{live} backends with weight > 0; one table holds at most {MAX_BACKENDS}")

        table = clone(_INT_TEMPLATE, m, False)
        t = <int32_t *>table.data.as_ints
        if live == 0:
            for i in range(m):
                t[i] = -1
            return table

        # Per live backend, in key order: weight, cursor (from the offset), skip, position.
        buf = <uint32_t *>malloc(4 * live * sizeof(uint32_t))
        used = <uint64_t *>calloc(m // 64 + 1, sizeof(uint64_t))
        if buf == NULL or used == NULL:
            raise MemoryError()
        lw = buf
        cur = buf + live
        skip = buf + 2 * live
        pos = <int32_t *>(buf + 3 * live)
        with nogil:
            live = 0
            for i in range(n):
                if wt[order[i].pos] == 0:
                    continue
                lw[live] = wt[order[i].pos]
                cur[live] = _jhash_bytes(order[i].p, order[i].n, sd) % <uint32_t>m
                skip[live] = _jhash_bytes(order[i].p, order[i].n, sd ^ MAGLEV_SKIP_SALT) % <uint32_t>(m - 1) + 1
                pos[live] = order[i].pos
                live += 1
            fill.table = t
            fill.used = used
            fill.cur = cur
            fill.skip = skip
            fill.m = <uint32_t>m
            fill.filled = 0
            rc = _maglev_fill(&fill, live, lw)
            if rc == 0:
                for i in range(m):
                    t[i] = pos[t[i]]
        if rc != 0:
            raise MemoryError()
        return table
    finally:
        free(order)
        free(wt)
        free(buf)
        free(used)


def table_delta(old, new):
    """(slots, values): the slots where ``new`` differs from ``old``, and their new values."""
    cdef const int[:] o = _pure.as_int_array(old, "old")
    cdef const int[:] v = _pure.as_int_array(new, "new")
    cdef Py_ssize_t n = o.shape[0], i, k = 0
    cdef array slots, values
    cdef int *ps
    cdef int *pv
    if v.shape[0] != n:
        raise ValueError(f"tables differ in size ({n} and {v.shape[0]}); write the whole new table")
    with nogil:
        for i in range(n):
            if o[i] != v[i]:
                k += 1
    slots = clone(_INT_TEMPLATE, k, False)
    values = clone(_INT_TEMPLATE, k, False)
    ps = slots.data.as_ints
    pv = values.data.as_ints
    k = 0
    with nogil:
        for i in range(n):
            if o[i] != v[i]:
                ps[k] = <int>i
                pv[k] = v[i]
                k += 1
    return slots, values


# ----------------------------------------------------------- smooth WRR (nginx)

def swrr_sequence(weights, max_len):
    """nginx's smooth weighted round robin, unrolled: the positions in the order they are picked.

    The weights are reduced and scaled by the twin's ``swrr_weights`` (shared,
    so both agree on the approximation); the walk runs in C.
    """
    cdef list w = _pure.swrr_weights(weights, max_len)
    cdef Py_ssize_t n = len(w), i, step, best, live = 0
    cdef int64_t total = 0
    cdef array seq
    cdef int *out
    cdef int64_t *cw = NULL
    cdef int64_t *cur = NULL
    cdef int32_t *idx = NULL
    for i in range(n):
        if w[i] > 0:
            live += 1
            total += <int64_t>w[i]
    seq = clone(_INT_TEMPLATE, total, False)
    if total == 0:
        return seq
    out = seq.data.as_ints
    cw = <int64_t *>malloc(live * sizeof(int64_t))
    cur = <int64_t *>malloc(live * sizeof(int64_t))
    idx = <int32_t *>malloc(live * sizeof(int32_t))
    try:
        if cw == NULL or cur == NULL or idx == NULL:
            raise MemoryError()
        live = 0
        for i in range(n):
            if w[i] > 0:
                cw[live] = w[i]
                cur[live] = 0
                idx[live] = <int32_t>i
                live += 1
        with nogil:
            for step in range(total):
                best = 0
                cur[0] += cw[0]
                for i in range(1, live):
                    cur[i] += cw[i]
                    if cur[i] > cur[best]:
                        best = i
                cur[best] -= total
                out[step] = idx[best]
        return seq
    finally:
        free(cw)
        free(cur)
        free(idx)


# ------------------------------------------------------------ power of two choices

def p2c_candidates(h, ring, seed):
    """The two candidates the kernel weighs for flow hash ``h`` (docs/HASH.md)."""
    cdef uint32_t hh = _u32("h", h)
    cdef uint32_t sd = _u32("seed", seed)
    cdef const int[:] r = _pure.as_int_array(ring, "ring")
    cdef uint32_t m = <uint32_t>r.shape[0], start
    cdef int a, b, i
    if m == 0:
        raise ValueError("the ring is empty; build it with maglev_table first")
    a = r[hh % m]
    start = _jhash_3words(hh, 0, 0, sd ^ P2C_SALT) % m
    for i in range(P2C_PROBES):
        b = r[(<uint64_t>start + i) % m]
        if b != a and b != -1:
            return a, b
    return a, a


def p2c_pick(a, b, active, weights, rtt=None):
    """The lower-scored of two candidates; ties go to ``a`` (u64 cross-multiplication)."""
    cdef uint64_t sa, sb
    _pure.check_pick(a, b, active, weights, rtt)
    if rtt is None:
        sb = (<uint64_t>active[b] + 1) * <uint64_t>weights[a]
        sa = (<uint64_t>active[a] + 1) * <uint64_t>weights[b]
    else:
        sb = <uint64_t>rtt[b] * (<uint64_t>active[b] + 1) * <uint64_t>weights[a]
        sa = <uint64_t>rtt[a] * (<uint64_t>active[a] + 1) * <uint64_t>weights[b]
    return b if sb < sa else a
