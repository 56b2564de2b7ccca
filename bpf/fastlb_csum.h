/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_csum.h: Internet checksums (RFC 1071) and their incremental
 * update (RFC 1624), for the headers fastlb writes or rewrites.
 *
 * Values are used exactly as loaded from the packet (network byte order in
 * host words): one's complement sums do not depend on the byte order, as
 * long as the checksum field and the data are read the same way.
 */
#ifndef FASTLB_CSUM_H
#define FASTLB_CSUM_H

#include <linux/ip.h>

static __always_inline __u16 fl_csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Recompute an option-less IPv4 header's checksum. */
static __always_inline void fl_ipv4_csum(struct iphdr *iph)
{
	__u16 *words = (__u16 *)iph;
	__u64 sum = 0;
	int i;

	iph->check = 0;
#pragma unroll
	for (i = 0; i < (int)(sizeof(*iph) / 2); i++)
		sum += words[i];
	iph->check = fl_csum_fold(sum);
}

/* A checksum field after a 32-bit word it covers changed from `from` to `to`. */
static __always_inline void fl_csum_replace4(__u16 *check, __u32 from, __u32 to)
{
	__u64 sum = (__u16)~*check;

	sum += (__u16)~from + (__u16)~(from >> 16);
	sum += (__u16)to + (__u16)(to >> 16);
	*check = fl_csum_fold(sum);
}

/* A checksum field after a 16-bit word it covers changed from `from` to `to`. */
static __always_inline void fl_csum_replace2(__u16 *check, __u16 from, __u16 to)
{
	__u64 sum = (__u16)~*check;

	sum += (__u16)~from;
	sum += to;
	*check = fl_csum_fold(sum);
}

/* One's complement sum of `len` bytes at `start`, for the messages fastlb
 * builds. `len` is a constant (even), and the caller has checked that the
 * bytes lie before data_end. */
static __always_inline __u64 fl_csum_partial(const void *start, int len)
{
	const __u16 *w = start;
	__u64 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < len / 2; i++)
		sum += w[i];
	return sum;
}

#endif /* FASTLB_CSUM_H */
