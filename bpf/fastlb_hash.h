/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_hash.h: the flow hash, shared bit for bit with fastlb/_core.pyx.
 *
 * Bob Jenkins' lookup3 mix (the kernel's jhash), under fastlb's own names:
 * the headers BCC includes already define jhash*, and a copy under the same
 * name fails as a redefinition. The userspace twin is fastlb._core.flow_hash;
 * docs/HASH.md states the rule, and tests check kernel and userspace agree.
 *
 * Words are the packet's bytes read as host-order (little-endian) u32s, the
 * way the program loads them: an IPv4 address is one word, an IPv6 address
 * four, and the ports are the first four bytes of the TCP/UDP header.
 */
#ifndef FASTLB_HASH_H
#define FASTLB_HASH_H

#include "fastlb_consts.h"

#define FL_JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 fl_rol32(__u32 word, unsigned int shift)
{
	return (word << (shift & 31)) | (word >> ((-shift) & 31));
}

#define fl_jhash_mix(a, b, c)                        \
	{                                            \
		a -= c; a ^= fl_rol32(c, 4);  c += b; \
		b -= a; b ^= fl_rol32(a, 6);  a += c; \
		c -= b; c ^= fl_rol32(b, 8);  b += a; \
		a -= c; a ^= fl_rol32(c, 16); c += b; \
		b -= a; b ^= fl_rol32(a, 19); a += c; \
		c -= b; c ^= fl_rol32(b, 4);  b += a; \
	}

#define fl_jhash_final(a, b, c)                    \
	{                                          \
		c ^= b; c -= fl_rol32(b, 14);       \
		a ^= c; a -= fl_rol32(c, 11);       \
		b ^= a; b -= fl_rol32(a, 25);       \
		c ^= b; c -= fl_rol32(b, 16);       \
		a ^= c; a -= fl_rol32(c, 4);        \
		b ^= a; b -= fl_rol32(a, 14);       \
		c ^= b; c -= fl_rol32(b, 24);       \
	}

/* jhash_3words: three words and an initial value. */
static __always_inline __u32 fl_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += FL_JHASH_INITVAL + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	fl_jhash_final(a, b, c);
	return c;
}

/* jhash2 over exactly 9 words (an IPv6 5-tuple: src[4], dst[4], ports). */
static __always_inline __u32 fl_jhash_9words(const __u32 *k, __u32 initval)
{
	__u32 a, b, c;

	a = b = c = FL_JHASH_INITVAL + (9 << 2) + initval;
	a += k[0]; b += k[1]; c += k[2];
	fl_jhash_mix(a, b, c);
	a += k[3]; b += k[4]; c += k[5];
	fl_jhash_mix(a, b, c);
	a += k[6]; b += k[7]; c += k[8];
	fl_jhash_final(a, b, c);
	return c;
}

/* jhash2 over exactly 4 words (an IPv6 address). */
static __always_inline __u32 fl_jhash_4words(const __u32 *k, __u32 initval)
{
	__u32 a, b, c;

	a = b = c = FL_JHASH_INITVAL + (4 << 2) + initval;
	a += k[0]; b += k[1]; c += k[2];
	fl_jhash_mix(a, b, c);
	a += k[3];
	fl_jhash_final(a, b, c);
	return c;
}

/* jhash2 over exactly 1 word (an IPv4 address). */
static __always_inline __u32 fl_jhash_1word(__u32 a0, __u32 initval)
{
	__u32 a, b, c;

	a = b = c = FL_JHASH_INITVAL + (1 << 2) + initval;
	a += a0;
	fl_jhash_final(a, b, c);
	return c;
}

/* The second P2C candidate's hash, derived from the flow hash. */
static __always_inline __u32 fl_p2c_rehash(__u32 flow_hash, __u32 seed)
{
	return fl_jhash_3words(flow_hash, 0, 0, seed ^ FL_P2C_SALT);
}

#include "fastlb_structs.h"

/* The flow hash of docs/HASH.md over the configured fields. */
static __always_inline __u32 flow_hash(struct flow_key *flow, __u8 hash_mode, __u32 seed)
{
	__u32 ports = ((__u32)flow->dport << 16) | flow->sport;
	__u32 k[9];

	if (flow->family == FL_AF_INET) {
		if (hash_mode == FL_HASH_SRC)
			return fl_jhash_1word(flow->src[0], seed);
		return fl_jhash_3words(flow->src[0], flow->dst[0], ports, seed ^ flow->proto);
	}
	if (hash_mode == FL_HASH_SRC)
		return fl_jhash_4words(flow->src, seed);
	k[0] = flow->src[0]; k[1] = flow->src[1]; k[2] = flow->src[2]; k[3] = flow->src[3];
	k[4] = flow->dst[0]; k[5] = flow->dst[1]; k[6] = flow->dst[2]; k[7] = flow->dst[3];
	k[8] = ports;
	return fl_jhash_9words(k, seed ^ flow->proto);
}

#endif /* FASTLB_HASH_H */
