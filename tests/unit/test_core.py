"""The selection core: fastlb.core._core (Cython) and fastlb.core._pure (its twin).

Every behaviour test runs against both implementations; hypothesis checks
that they agree on arbitrary inputs; the flow hash is checked against the
kernel's own C (bpf/fastlb_hash.h) compiled at test time.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import shutil
import subprocess
import sys
from array import array
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlb import core
from fastlb.core import _core, _pure
from fastlb.kernel import cdefs

IMPLS = [pytest.param(_core, id="cython"), pytest.param(_pure, id="python")]
U32 = 2**32 - 1
REPO = Path(__file__).resolve().parents[2]
BPF = cdefs.bpf_dir()
GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is not installed (apt-get install gcc)")

FIVE_TUPLE = cdefs.FL_HASH_5TUPLE
SRC_ONLY = cdefs.FL_HASH_SRC
PROBES = cdefs.FL_P2C_PROBES

agree = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def backend_keys(n: int, port: int = 80) -> list[bytes]:
    return [f"198.18.{i // 250}.{i % 250}:{port}".encode() for i in range(n)]


def by_key(table, keys) -> list[bytes | None]:
    return [keys[p] if p >= 0 else None for p in table]


# --------------------------------------------------------------------------
# The kernel's hash, compiled from bpf/fastlb_hash.h

KERNEL_HASH_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
#undef __always_inline
#define __always_inline inline __attribute__((always_inline))
#include "fastlb_hash.h"

/* One request per line on stdin, one u32 per line on stdout:
 *   3 a b c initval | 1 a initval | 4 initval k0..k3 | 9 initval k0..k8 | p h seed
 *   f SRCHEX DSTHEX sport dport proto seed mode: the kernel's flow_hash() over a
 *     struct flow_key filled as the XDP program fills it (addresses and ports in
 *     network byte order, copied from the packet's bytes)
 */
static void unhex(const char *s, unsigned char *out, size_t n)
{
	for (size_t i = 0; i < n; i++)
		sscanf(s + 2 * i, "%2hhx", &out[i]);
}

int main(void)
{
	char op[4], sh[40], dh[40];
	__u32 k[9], a, b, c, iv;
	unsigned sport, dport, proto, mode;
	while (scanf("%3s", op) == 1) {
		if (!strcmp(op, "3")) {
			if (scanf("%u %u %u %u", &a, &b, &c, &iv) != 4) return 2;
			printf("%u\n", fl_jhash_3words(a, b, c, iv));
		} else if (!strcmp(op, "1")) {
			if (scanf("%u %u", &a, &iv) != 2) return 2;
			printf("%u\n", fl_jhash_1word(a, iv));
		} else if (!strcmp(op, "4") || !strcmp(op, "9")) {
			int n = op[0] - '0';
			if (scanf("%u", &iv) != 1) return 2;
			for (int i = 0; i < n; i++)
				if (scanf("%u", &k[i]) != 1) return 2;
			printf("%u\n", n == 4 ? fl_jhash_4words(k, iv) : fl_jhash_9words(k, iv));
		} else if (!strcmp(op, "p")) {
			if (scanf("%u %u", &a, &iv) != 2) return 2;
			printf("%u\n", fl_p2c_rehash(a, iv));
		} else if (!strcmp(op, "f")) {
			struct flow_key flow;
			unsigned char l4[4];
			if (scanf("%39s %39s %u %u %u %u %u", sh, dh, &sport, &dport, &proto, &iv, &mode) != 7) return 2;
			size_t alen = strlen(sh) / 2;
			memset(&flow, 0, sizeof(flow));
			unhex(sh, (unsigned char *)flow.src, alen);
			unhex(dh, (unsigned char *)flow.dst, alen);
			l4[0] = sport >> 8; l4[1] = sport; l4[2] = dport >> 8; l4[3] = dport;
			memcpy(&flow.sport, l4, 2);
			memcpy(&flow.dport, l4 + 2, 2);
			flow.proto = proto;
			flow.family = alen == 4 ? FL_AF_INET : FL_AF_INET6;
			printf("%u\n", flow_hash(&flow, mode, iv));
		} else {
			return 2;
		}
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def kernel_hash(tmp_path_factory):
    """Runs request lines through the kernel's hash code; returns the answers."""
    if GCC is None:
        pytest.skip("gcc is not installed (apt-get install gcc)")
    d = tmp_path_factory.mktemp("kernel_hash")
    (d / "kat.c").write_text(KERNEL_HASH_C)
    cc = subprocess.run([GCC, "-O2", "-Wall", "-Werror", "-I", str(BPF), "-o", str(d / "kat"), str(d / "kat.c")],
                        capture_output=True, text=True)
    assert cc.returncode == 0, f"bpf/fastlb_hash.h does not compile as plain C:\n{cc.stderr}"

    def run(lines: list[str]) -> list[int]:
        out = subprocess.run([str(d / "kat")], input="\n".join(lines) + "\n", capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        values = [int(x) for x in out.stdout.split()]
        assert len(values) == len(lines)
        return values

    return run


@pytest.fixture(scope="module")
def rng():
    return random.Random(0xFA57)


def _u32s(rng, n):
    # Mix uniform words with edge values: the carries and rotations live there.
    edge = [0, 1, 0x7FFFFFFF, 0x80000000, U32, 0xDEADBEEF]
    return [rng.choice(edge) if rng.random() < 0.1 else rng.getrandbits(32) for _ in range(n)]


@needs_gcc
@pytest.mark.parametrize("impl", IMPLS)
def test_jhash_matches_the_kernel(impl, kernel_hash, rng):
    lines, expect = [], []
    for _ in range(1500):
        a, b, c, iv = _u32s(rng, 4)
        lines.append(f"3 {a} {b} {c} {iv}")
        expect.append(impl.jhash_3words(a, b, c, iv))
        lines.append(f"1 {a} {iv}")
        expect.append(impl.jhash2([a], iv))
        k4, k9 = _u32s(rng, 4), _u32s(rng, 9)
        lines.append(f"4 {iv} " + " ".join(map(str, k4)))
        expect.append(impl.jhash2(k4, iv))
        lines.append(f"9 {iv} " + " ".join(map(str, k9)))
        expect.append(impl.jhash2(k9, iv))
        lines.append(f"p {a} {b}")
        expect.append(impl.p2c_rehash(a, b))
    assert kernel_hash(lines) == expect


@needs_gcc
@pytest.mark.parametrize("impl", IMPLS)
def test_flow_hash_matches_the_kernel(impl, kernel_hash, rng):
    lines, expect = [], []
    for i in range(2000):
        alen = 4 if i % 2 else 16
        src, dst = rng.randbytes(alen), rng.randbytes(alen)
        sport, dport, proto = rng.getrandbits(16), rng.getrandbits(16), rng.choice([6, 17, rng.getrandbits(8)])
        seed = _u32s(rng, 1)[0]
        mode = FIVE_TUPLE if i % 4 < 2 else SRC_ONLY
        lines.append(f"f {src.hex()} {dst.hex()} {sport} {dport} {proto} {seed} {mode}")
        expect.append(impl.flow_hash(src, dst, sport, dport, proto, seed, mode))
    assert kernel_hash(lines) == expect


@pytest.mark.parametrize("impl", IMPLS)
def test_jhash_bytes_known_answers(impl):
    # Bob Jenkins' published lookup3 vectors (hashlittle == Linux jhash).
    assert impl.jhash(b"", 0) == 0xDEADBEEF
    assert impl.jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert impl.jhash(b"Four score and seven years ago", 1) == 0xCD628161


@pytest.mark.parametrize("impl", IMPLS)
def test_flow_hash_modes(impl):
    v4 = (bytes([10, 0, 0, 1]), bytes([198, 51, 100, 7]))
    h = impl.flow_hash(*v4, 40000, 443, 6, 7, FIVE_TUPLE)
    assert h == impl.jhash_3words(int.from_bytes(v4[0], "little"), int.from_bytes(v4[1], "little"),
                                  int.from_bytes(bytes([0x9C, 0x40, 0x01, 0xBB]), "little"), 7 ^ 6)
    assert impl.flow_hash(*v4, 40000, 443, 17, 7, FIVE_TUPLE) != h, "the protocol is part of the 5-tuple"
    # Source-address affinity ignores everything but the source.
    s = impl.flow_hash(*v4, 40000, 443, 6, 7, SRC_ONLY)
    assert s == impl.flow_hash(v4[0], bytes(4), 1, 2, 17, 7, SRC_ONLY) == impl.jhash2([0x0100000A], 7)
    v6 = bytes(range(16))
    assert impl.flow_hash(v6, v6, 1, 2, 6, 0, SRC_ONLY) == impl.jhash2(
        [int.from_bytes(v6[i:i + 4], "little") for i in range(0, 16, 4)], 0)
    assert impl.flow_hash(bytearray(v4[0]), memoryview(v4[1]), 40000, 443, 6, 7, FIVE_TUPLE) == h


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args, exc, match", [
    ((b"\0" * 4, b"\0" * 16, 1, 2, 6, 0, 0), ValueError, "4 .IPv4. or 16"),
    ((b"\0" * 5, b"\0" * 5, 1, 2, 6, 0, 0), ValueError, "4 .IPv4. or 16"),
    ((b"\0" * 4, b"\0" * 4, 65536, 2, 6, 0, 0), ValueError, "sport=65536"),
    ((b"\0" * 4, b"\0" * 4, 1, -1, 6, 0, 0), ValueError, "dport=-1"),
    ((b"\0" * 4, b"\0" * 4, 1, 2, 256, 0, 0), ValueError, "proto=256"),
    ((b"\0" * 4, b"\0" * 4, 1, 2, 6, 2**32, 0), ValueError, "seed=4294967296"),
    ((b"\0" * 4, b"\0" * 4, 1, 2, 6, 0, 2), ValueError, "hash mode 2"),
    (("10.0.0.1", b"\0" * 4, 1, 2, 6, 0, 0), TypeError, "src must be a packed address"),
])
def test_flow_hash_rejects(impl, args, exc, match):
    with pytest.raises(exc, match=match):
        impl.flow_hash(*args)


# --------------------------------------------------------------------------
# Maglev

@pytest.mark.parametrize("impl", IMPLS)
def test_maglev_shape(impl):
    keys = backend_keys(7)
    t = impl.maglev_table(keys, [1, 2, 0, 3, 1, 0, 5], 1009, 42)
    assert isinstance(t, array) and t.typecode == "i" and len(t) == 1009
    assert set(t) == {0, 1, 3, 4, 6}, "every weight > 0 backend is in, weight 0 ones are out"
    assert list(impl.maglev_table(keys, [0] * 7, 13, 1)) == [-1] * 13
    assert list(impl.maglev_table([], [], 13, 1)) == [-1] * 13
    assert list(impl.maglev_table([b"only"], [9], 5, 1)) == [0] * 5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [0, 1, 2, 4, 65536, 65535, -7, 2**24 + 43])
def test_maglev_size_must_be_prime(impl, size):
    with pytest.raises(ValueError, match=rf"size {size} is not a prime"):
        impl.maglev_table([b"a"], [1], size, 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("keys, weights, seed, exc, match", [
    ([b"a", b"b"], [1], 0, ValueError, "2 keys but 1 weights"),
    ([b"a", b"a"], [1, 0], 0, ValueError, r"keys\[1\]=b'a' repeats keys\[0\]"),
    ([b"a", "b"], [1, 1], 0, TypeError, r"keys\[1\] must be bytes"),
    ([b"a", b"b"], [1, 65536], 0, ValueError, r"weights\[1\]=65536"),
    ([b"a", b"b"], [-1, 1], 0, ValueError, r"weights\[0\]=-1"),
    ([b"a", b"b"], [1, 1.5], 0, TypeError, r"weights\[1\] must be an int"),
    ([b"a", b"b"], [1, 1], -1, ValueError, "seed=-1"),
])
def test_maglev_rejects(impl, keys, weights, seed, exc, match):
    with pytest.raises(exc, match=match):
        impl.maglev_table(keys, weights, 13, seed)


def test_prime_helpers():
    primes = [n for n in range(200) if all(n % d for d in range(2, int(n ** 0.5) + 1)) and n > 1]
    assert [n for n in range(200) if core.is_prime(n)] == primes
    assert core.is_prime(65537) and core.is_prime(655373) and core.is_prime(1048573)
    assert not core.is_prime(65539 * 65543)
    assert core.next_prime(65536) == 65537 and core.next_prime(655360) == 655373
    assert core.next_prime(1048572) == 1048573 and core.next_prime(0) == 2


def test_large_tables():
    keys = backend_keys(50)
    weights = [1 + i % 7 for i in range(50)]
    for size in (655373, 1048573):
        t = _core.maglev_table(keys, weights, size, 3)
        assert len(t) == size and min(t) == 0 and max(t) == 49
    # The twin agrees at full size too (the property tests below use small tables).
    assert _pure.maglev_table(keys, weights, 655373, 3) == _core.maglev_table(keys, weights, 655373, 3)


def test_large_tables_agree_at_production_size():
    keys = backend_keys(1000)
    rnd = random.Random(5)
    for weights in ([1] * 1000, [rnd.randint(1, 100) for _ in range(1000)],
                    [rnd.randint(0, 65535) for _ in range(1000)]):
        assert _pure.maglev_table(keys, weights, 65537, 11) == _core.maglev_table(keys, weights, 65537, 11)


GOLDEN = [
    # Everyday weights.
    ([f"198.18.0.{i}:80".encode() for i in range(10, 30)], [(i * 37) % 100 + 1 for i in range(20)], 65537,
     0x5EED, "2016003b352a32d71addd3ba90771ab448408788d321af3a15ed36570611a126"),
    # Weights near the top, whose turns collide on the tick clock and so pin its rounding.
    ([f"10.9.{i}.1:443".encode() for i in range(12)],
     [65535, 65534, 65533, 65000, 40000, 32768, 32767, 1000, 999, 3, 2, 1], 4099,
     0xC0FFEE, "682f4c9ce21192bf56ee1cf7018665b6783c23370a6789b37954444507803e3f"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("keys, weights, size, seed, digest", GOLDEN)
def test_maglev_table_is_stable_across_releases(impl, keys, weights, size, seed, digest):
    """A fleet of balancers must build the same table; changing a digest breaks mixed versions."""
    t = impl.maglev_table(keys, weights, size, seed)
    assert hashlib.sha256(",".join(map(str, t)).encode()).hexdigest() == digest


def test_maglev_is_deterministic_across_processes():
    code = ("import hashlib; from fastlb.core import _core, _pure\n"
            "keys = [b'%d' % i for i in range(40)]; w = [i % 5 for i in range(40)]\n"
            "for m in (_core, _pure):\n"
            "    print(hashlib.sha256(m.maglev_table(keys, w, 4099, 9).tobytes()).hexdigest())\n")
    keys = [b"%d" % i for i in range(40)]
    here = hashlib.sha256(_core.maglev_table(keys, [i % 5 for i in range(40)], 4099, 9).tobytes()).hexdigest()
    for hashseed in ("1", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hashseed}).stdout.split()
        assert out == [here, here]


@pytest.mark.parametrize("impl", IMPLS)
def test_maglev_does_not_depend_on_input_order(impl):
    keys = backend_keys(30)
    weights = [1 + (i * 7) % 13 for i in range(30)]
    base = by_key(impl.maglev_table(keys, weights, 4099, 5), keys)
    order = list(range(30))
    random.Random(1).shuffle(order)
    shuffled = [keys[i] for i in order]
    t = impl.maglev_table(shuffled, [weights[i] for i in order], 4099, 5)
    assert by_key(t, shuffled) == base
    assert by_key(impl.maglev_table(keys, weights, 4099, 6), keys) != base, "the seed changes the table"


def _check_balance(impl, keys, weights, size=65537):
    t = impl.maglev_table(keys, weights, size, 77)
    counts = Counter(t)
    total = sum(weights)
    worst = 0.0
    for i, w in enumerate(weights):
        ideal = size * w / total
        # +-5% of the ideal, or +-2 slots where 5% is less than the integer rounding allows.
        assert abs(counts[i] - ideal) <= max(0.05 * ideal, 2), (i, w, counts[i], ideal)
        worst = max(worst, abs(counts[i] - ideal))
    return worst


@pytest.mark.parametrize("impl", IMPLS)
def test_maglev_honours_weights(impl):
    rnd = random.Random(21)
    for n in (2, 10, 37, 100):
        keys = backend_keys(n)
        _check_balance(impl, keys, [rnd.randint(1, 100) for _ in range(n)])
        _check_balance(impl, keys, [rnd.choice((1, 100)) for _ in range(n)])
    keys = backend_keys(100)
    _check_balance(impl, keys, [1] + [100] * 99)
    _check_balance(impl, keys, [100] + [1] * 99)
    assert _check_balance(impl, keys, [1] * 100) < 1, "equal weights differ by one slot at most"


def _disruption(keys, weights, removed, size=65537):
    old = by_key(_core.maglev_table(keys, weights, size, 1), keys)
    gone = {keys[i] for i in removed}
    keep = [i for i in range(len(keys)) if i not in removed]
    new = by_key(_core.maglev_table([keys[i] for i in keep], [weights[i] for i in keep], size, 1),
                 [keys[i] for i in keep])
    own = sum(1 for o in old if o in gone)
    moved = sum(1 for o, n in zip(old, new) if o != n and o not in gone)
    assert all(n not in gone for n in new)
    return own, moved / (size - own)


@pytest.mark.parametrize("weights", ["equal", "random"])
def test_maglev_minimal_disruption(weights):
    rnd = random.Random(99)
    keys = backend_keys(1000)
    w = [1] * 1000 if weights == "equal" else [rnd.randint(1, 100) for _ in range(1000)]
    for victim in rnd.sample(range(1000), 5):
        own, others = _disruption(keys, w, {victim})
        assert own > 0
        assert others <= 0.01, f"removing backend {victim} moved {others:.2%} of the other backends' slots"


@pytest.mark.parametrize("impl", IMPLS)
def test_table_delta(impl):
    keys = backend_keys(20)
    old = impl.maglev_table(keys, [1] * 20, 1009, 0)
    new = impl.maglev_table(keys, [1] * 19 + [0], 1009, 0)
    slots, values = impl.table_delta(old, new)
    assert slots.typecode == values.typecode == "i"
    assert len(slots) == len(values) > 0
    assert list(slots) == sorted(slots)
    patched = array("i", old)
    for s, v in zip(slots, values):
        patched[s] = v
    assert patched == new
    assert set(slots) >= {i for i, p in enumerate(old) if p == 19}
    assert impl.table_delta(new, new) == (array("i"), array("i"))
    assert impl.table_delta([1, 2, 3], [1, 5, 3]) == (array("i", [1]), array("i", [5]))
    with pytest.raises(ValueError, match="differ in size"):
        impl.table_delta([1, 2], [1, 2, 3])


# --------------------------------------------------------------------------
# Smooth weighted round robin

@pytest.mark.parametrize("impl", IMPLS)
def test_swrr_known_sequences(impl):
    assert list(impl.swrr_sequence([5, 1, 1], 1024)) == [0, 0, 1, 0, 2, 0, 0]     # a a b a c a a
    assert list(impl.swrr_sequence([50, 10, 10], 1024)) == [0, 0, 1, 0, 2, 0, 0]  # divided by the gcd
    assert list(impl.swrr_sequence([3, 2, 1], 1024)) == [0, 1, 0, 2, 1, 0]
    assert list(impl.swrr_sequence([4, 4, 4, 4], 1024)) == [0, 1, 2, 3]            # rr
    assert list(impl.swrr_sequence([0, 2, 0, 1], 1024)) == [1, 3, 1]
    assert list(impl.swrr_sequence([], 1024)) == []
    assert list(impl.swrr_sequence([0, 0], 1024)) == []
    assert impl.swrr_sequence([1], 1).typecode == "i"


@pytest.mark.parametrize("impl", IMPLS)
def test_swrr_scales_to_fit(impl):
    weights = [50, 30, 0, 20, 7]
    seq = impl.swrr_sequence(weights, 40)
    assert len(seq) == 40
    assert Counter(seq) == {0: 19, 1: 11, 3: 7, 4: 3}            # largest remainders of 40 * w / 107
    seq = impl.swrr_sequence([65535, 1, 1, 1], 16)
    assert len(seq) == 16 and Counter(seq) == {0: 13, 1: 1, 2: 1, 3: 1}   # small ones keep one turn
    rnd = random.Random(8)
    for _ in range(20):
        w = [rnd.choice((0, 1, rnd.randint(1, 65535))) for _ in range(rnd.randint(1, 60))]
        live = sum(1 for x in w if x)
        cap = rnd.randint(max(live, 1), 300)
        seq = impl.swrr_sequence(w, cap)
        counts = Counter(seq)
        assert len(seq) <= cap
        assert set(counts) == {i for i, x in enumerate(w) if x}
        if sum(w) and sum(x // math.gcd(*[y for y in w if y]) for x in w) > cap:
            # Scaled: every share within one turn of exact, except the floor-of-one backends.
            for i, x in enumerate(w):
                if x and counts[i] > 1:
                    assert abs(Fraction(counts[i], len(seq)) - Fraction(x, sum(w))) <= Fraction(
                        sum(1 for c in counts.values() if c == 1) + 1, len(seq))


@pytest.mark.parametrize("impl", IMPLS)
def test_swrr_rejects(impl):
    with pytest.raises(ValueError, match="3 backends with weight > 0 do not fit a sequence of 2"):
        impl.swrr_sequence([1, 1, 1], 2)
    with pytest.raises(ValueError, match="max_len=0"):
        impl.swrr_sequence([1], 0)
    with pytest.raises(ValueError, match=r"weights\[1\]=70000"):
        impl.swrr_sequence([1, 70000], 10)


# --------------------------------------------------------------------------
# Power of two choices

@pytest.mark.parametrize("impl", IMPLS)
def test_p2c_candidates_walk_the_probe_window(impl):
    m, seed = 11, 0xABCDEF
    h = next(h for h in range(1000)
             if (impl.p2c_rehash(h, seed) % m + PROBES) % m != h % m
             and all((impl.p2c_rehash(h, seed) % m + i) % m != h % m for i in range(PROBES + 1)))
    start = impl.p2c_rehash(h, seed) % m
    ring = [0] * m
    assert impl.p2c_candidates(h, ring, seed) == (0, 0), "a one-backend ring gives the same backend twice"
    ring[(start + PROBES) % m] = 1
    assert impl.p2c_candidates(h, ring, seed) == (0, 0), "the slot just past the window is not probed"
    ring[(start + PROBES - 1) % m] = 2
    assert impl.p2c_candidates(h, ring, seed) == (0, 2)
    ring[(start + 1) % m] = -1
    ring[(start + 2) % m] = 3
    assert impl.p2c_candidates(h, array("i", ring), seed) == (0, 3), "empty slots are skipped"
    ring[h % m] = 3
    assert impl.p2c_candidates(h, ring, seed)[0] == 3
    assert impl.p2c_candidates(h, [-1] * m, seed) == (-1, -1)
    with pytest.raises(ValueError, match="ring is empty"):
        impl.p2c_candidates(h, [], seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_p2c_candidates_on_a_maglev_ring(impl):
    keys = backend_keys(10)
    ring = impl.maglev_table(keys, [1] * 10, 1009, 4)
    rnd = random.Random(3)
    pairs = [impl.p2c_candidates(rnd.getrandbits(32), ring, 4) for _ in range(500)]
    assert all(0 <= a < 10 and 0 <= b < 10 and a != b for a, b in pairs)
    assert len({b for _, b in pairs}) == 10


@pytest.mark.parametrize("impl", IMPLS)
def test_p2c_pick(impl):
    w = [1, 1, 2, 0]
    assert impl.p2c_pick(0, 1, [3, 3, 0, 0], w) == 0, "ties go to a"
    assert impl.p2c_pick(0, 1, [3, 2, 0, 0], w) == 1
    assert impl.p2c_pick(0, 2, [3, 7, 7, 0], w) == 0   # (3+1)/1 < (7+1)/2 is false: 4 == 4, tie
    assert impl.p2c_pick(0, 2, [4, 7, 7, 0], w) == 2   # 5/1 > 8/2
    assert impl.p2c_pick(0, 3, [9, 0, 0, 0], w) == 0, "a weight-0 backend never wins"
    rtt = [100, 300, 100, 1]
    assert impl.p2c_pick(0, 1, [3, 0, 0, 0], w, rtt) == 1   # 300*1 < 100*4
    assert impl.p2c_pick(0, 1, [2, 0, 0, 0], w, rtt) == 0   # 300*1 == 100*3: tie to a
    assert impl.p2c_pick(1, 0, [0, 0, 0, 0], w, rtt) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_p2c_pick_wraps_like_the_kernel(impl):
    # rtt * (active + 1) * weight exceeds 64 bits here; the kernel's u64 wraps, and so do we.
    active, weights, rtt = [U32, 0], [65535, 1], [U32, 1]
    sb = (rtt[1] * (active[1] + 1) * weights[0]) % 2**64
    sa = (rtt[0] * (active[0] + 1) * weights[1]) % 2**64
    assert sa == (U32 * 2**32) % 2**64 and sa > sb
    assert impl.p2c_pick(0, 1, active, weights, rtt) == (1 if sb < sa else 0) == 1
    active, rtt = [U32, U32], [U32, U32]
    weights = [65535, 65534]
    sb = (rtt[1] * (active[1] + 1) * weights[0]) % 2**64
    sa = (rtt[0] * (active[0] + 1) * weights[1]) % 2**64
    assert impl.p2c_pick(0, 1, active, weights, rtt) == (1 if sb < sa else 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args, exc, match", [
    ((0, 5, [0, 0], [1, 1], None), ValueError, "candidate b=5"),
    ((-1, 0, [0, 0], [1, 1], None), ValueError, "candidate a=-1"),
    ((0, 1, [0, 0], [1], None), ValueError, "one entry per backend"),
    ((0, 1, [0, 0], [1, 1], [5]), ValueError, "one entry per backend"),
    ((0, 1, [0, -2], [1, 1], None), ValueError, r"active\[1\]=-2"),
    ((0, 1, [0, 0], [1, 1], [0, 2**32]), ValueError, r"rtt\[1\]=4294967296"),
    ((0, 1, [0, 0], [1, 70000], None), ValueError, r"weights\[1\]=70000"),
])
def test_p2c_pick_rejects(impl, args, exc, match):
    with pytest.raises(exc, match=match):
        impl.p2c_pick(*args)


# --------------------------------------------------------------------------
# Peak EWMA

def test_peak_ewma():
    e = core.PeakEwma(decay_s=10.0, default_us=500_000)
    assert not e.has_sample and e.score_us(0.0) == 500_000
    e.observe(1000, now=1.0)
    assert e.score_us(1.0) == 1000
    e.observe(5000, now=1.1)
    assert e.score_us(1.1) == 5000, "a peak is taken at once"
    e.observe(1000, now=1.1 + 10.0)          # one decay time later: 1/e of the old value remains
    assert e.score_us(11.1) == round(5000 / math.e + 1000 * (1 - 1 / math.e))
    # With no new sample the estimate decays toward zero, so a backend that looked slow gets tried again.
    s = e.score_us(11.1)
    assert e.score_us(11.1 + 10 * math.log(2)) == round(s / 2)
    assert e.score_us(10_000.0) == 1, "never 0: lrt still counts connections"
    assert e.score_us(5.0) == s, "a clock that went backwards does not raise the score"
    big = core.PeakEwma()
    big.observe(2**40, now=0.0)
    assert big.score_us(0.0) == U32 and core.PeakEwma().score_us(0.0) == 1_000_000
    with pytest.raises(ValueError, match="decay_s"):
        core.PeakEwma(decay_s=0)
    with pytest.raises(ValueError, match="rtt_us"):
        e.observe(-1, now=12.0)


# --------------------------------------------------------------------------
# The two implementations agree

primes = st.sampled_from([3, 5, 7, 11, 13, 31, 101, 251, 1009, 4099])
u32 = st.integers(0, U32)


@st.composite
def backends(draw, max_n=40, max_weight=65535):
    keys = draw(st.lists(st.binary(max_size=24), unique=True, max_size=max_n))
    weights = draw(st.lists(st.integers(0, max_weight), min_size=len(keys), max_size=len(keys)))
    return keys, weights


@agree
@given(st.lists(u32, max_size=20), u32, st.binary(max_size=40))
def test_agree_jhash(words, initval, data):
    assert _core.jhash2(words, initval) == _pure.jhash2(words, initval)
    assert _core.jhash(data, initval) == _pure.jhash(data, initval)
    if len(words) >= 3:
        assert _core.jhash_3words(*words[:3], initval) == _pure.jhash_3words(*words[:3], initval)


@agree
@given(st.sampled_from([4, 16]).flatmap(lambda n: st.tuples(st.binary(min_size=n, max_size=n),
                                                            st.binary(min_size=n, max_size=n))),
       st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 255), u32,
       st.sampled_from([FIVE_TUPLE, SRC_ONLY]))
def test_agree_flow_hash(addrs, sport, dport, proto, seed, mode):
    src, dst = addrs
    assert _core.flow_hash(src, dst, sport, dport, proto, seed, mode) == \
        _pure.flow_hash(src, dst, sport, dport, proto, seed, mode)


@agree
@given(backends(), primes, u32, st.data())
def test_agree_maglev_and_delta(bk, size, seed, data):
    keys, weights = bk
    t = _core.maglev_table(keys, weights, size, seed)
    assert t == _pure.maglev_table(keys, weights, size, seed)
    assert set(t) <= {i for i, w in enumerate(weights) if w} or set(t) == {-1}
    # Change some weights, then the deltas agree and patch old into new.
    w2 = [w if data.draw(st.booleans()) else data.draw(st.integers(0, 65535)) for w in weights]
    t2 = _pure.maglev_table(keys, w2, size, seed)
    delta = _core.table_delta(t, t2)
    assert delta == _pure.table_delta(t, t2)
    patched = array("i", t)
    for s, v in zip(*delta):
        patched[s] = v
    assert patched == t2


@agree
@given(st.lists(st.integers(0, 65535) | st.integers(0, 5), max_size=30), st.integers(1, 400))
def test_agree_swrr(weights, max_len):
    try:
        expect = _pure.swrr_sequence(weights, max_len)
    except ValueError as exc:
        with pytest.raises(ValueError, match=re.escape(str(exc))):
            _core.swrr_sequence(weights, max_len)
        return
    assert _core.swrr_sequence(weights, max_len) == expect
    assert len(expect) <= max_len


@agree
@given(backends(max_n=12, max_weight=20), primes, u32, u32)
def test_agree_p2c_candidates(bk, size, h, seed):
    keys, weights = bk
    ring = _pure.maglev_table(keys, weights, size, seed)
    assert _core.p2c_candidates(h, ring, seed) == _pure.p2c_candidates(h, ring, seed)
    assert _core.p2c_rehash(h, seed) == _pure.p2c_rehash(h, seed)


@agree
@given(st.integers(0, 2**24), st.integers(0, 2**24), st.integers(0, 65535), st.integers(0, 65535),
       st.none() | st.tuples(st.integers(0, 2**23), st.integers(0, 2**23)))
def test_agree_p2c_pick_and_the_loaded_one_never_wins(act_a, act_b, w_a, w_b, rtts):
    active, weights = [act_a, act_b], [w_a, w_b]
    rtt = list(rtts) if rtts else None
    picked = _core.p2c_pick(0, 1, active, weights, rtt)
    assert picked == _pure.p2c_pick(0, 1, active, weights, rtt)
    # No overflow at these sizes, so exact scores decide: b only when strictly better.
    ra, rb = (rtt or [1, 1])
    score_a, score_b = ra * (act_a + 1) * w_b, rb * (act_b + 1) * w_a   # cross-multiplied
    assert picked == (1 if score_b < score_a else 0)


@agree
@given(st.sampled_from(["maglev_table", "swrr_sequence", "p2c_pick", "jhash2", "flow_hash"]), st.data())
def test_agree_on_errors(fn, data):
    bad = st.one_of(st.integers(-5, -1), st.integers(2**32, 2**33), st.just(70000), st.just(1.0),
                    st.just("x"), st.none())
    if fn == "maglev_table":
        args = ([b"a", b"b"], [1, data.draw(bad)], 13, 0)
    elif fn == "swrr_sequence":
        args = ([data.draw(bad), 1], 10)
    elif fn == "p2c_pick":
        args = (0, 1, [data.draw(bad), 0], [1, 1], None)
    elif fn == "jhash2":
        args = ([1, data.draw(bad)], 0)
    else:
        args = (b"\0" * 4, b"\0" * 4, 1, data.draw(bad), 6, 0, 0)
    errors = []
    for impl in (_core, _pure):
        try:
            getattr(impl, fn)(*args)
        except (TypeError, ValueError) as exc:
            errors.append((type(exc), str(exc)))
        else:
            errors.append(None)
    assert errors[0] == errors[1]


# --------------------------------------------------------------------------
# Choosing the implementation

def _implementation(env_value: str | None, prelude: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k != "FASTLB_PURE_PYTHON"}
    if env_value is not None:
        env["FASTLB_PURE_PYTHON"] = env_value
    code = prelude + "import fastlb.core as c; print(c.IMPLEMENTATION, c.IMPORT_ERROR, c.maglev_table.__module__)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env, cwd=REPO).stdout.strip()


def test_core_picks_the_compiled_module():
    assert core.IMPLEMENTATION == ("python" if os.environ.get("FASTLB_PURE_PYTHON") == "1" else "cython")
    assert _implementation(None) == "cython None fastlb.core._core"
    assert _implementation("0") == "cython None fastlb.core._core"


def test_core_falls_back_to_the_twin():
    assert _implementation("1") == "python FASTLB_PURE_PYTHON=1 fastlb.core._pure"
    # A missing or broken build falls back too, and says why.
    out = _implementation(None, prelude="import sys; sys.modules['fastlb.core._core'] = None\n")
    assert out.startswith("python ModuleNotFoundError: import of fastlb.core._core halted") and out.endswith("fastlb.core._pure")
