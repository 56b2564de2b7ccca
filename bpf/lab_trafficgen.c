/* SPDX-License-Identifier: Apache-2.0 */
/* lab_trafficgen.c: the namespace lab's line-rate UDP generator.
 *
 * fastlb/lab/linerate.py runs this program with BPF_PROG_TEST_RUN in
 * live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES, batch_size 64), inside the
 * lab's client namespace. The kernel then hands it one frame after another
 * and really sends what it redirects: a traffic generator. For each frame
 * the program
 *
 *   1. writes the whole template frame over it (Ethernet, IP, UDP,
 *      payload). A live frame's page comes back from the redirect target
 *      with whatever was written into it on the way (the load balancer
 *      rewrites MACs), so nothing in it may be trusted;
 *   2. gives it the source port of flow (seq % flows), seq being a per-CPU
 *      frame counter, and updates the UDP checksum for the new port
 *      (RFC 1624, so the template's checksum stays valid for IPv4 and IPv6);
 *   3. redirects it out of the configured interface.
 *
 * The template comes from scapy through the tg_config map. Its length and
 * the UDP header's offset are compile-time macros (TG_FRAME_LEN,
 * TG_UDP_OFFSET) that the loader sets for the template it built, so every
 * packet access has a constant bound.
 *
 * Loaded with BCC: BPF(src_file="bpf/lab_trafficgen.c", cflags=[...])
 *                  .load_func("xdp_trafficgen", BPF.XDP)
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/udp.h>

#ifndef TG_FRAME_LEN
#define TG_FRAME_LEN 64             /* bytes in the template frame */
#endif
#ifndef TG_UDP_OFFSET
#define TG_UDP_OFFSET 34            /* Ethernet (14) + IPv4 (20) */
#endif

_Static_assert(TG_UDP_OFFSET + sizeof(struct udphdr) <= TG_FRAME_LEN,
	       "the UDP header must lie inside the template frame");

/* What became of each frame the kernel handed the program. */
enum tg_stat {
	TG_SENT,                    /* rewritten and redirected */
	TG_ABORT_SHORT,             /* shorter than the template: the loader gave a wrong length */
	TG_ABORT_NO_CONFIG,         /* map lookup failed (cannot happen for an array) */
	TG_STAT_MAX,
};

struct tg_config {
	__u32 ifindex;              /* bpf_redirect(ifindex, 0): the client's eth0 */
	__u32 flows;                /* source ports used, base_port .. base_port + flows - 1 */
	__u16 base_port;            /* host byte order; the template carries this port */
	__u16 pad;
	__u8 frame[TG_FRAME_LEN];   /* the template (flow 0), built by scapy */
};

/* 0 -> the generator's settings and template frame. Written by linerate.py before a run. */
BPF_ARRAY(tg_config, struct tg_config, 1);

/* 0 -> frames generated on this CPU so far; picks the flow. Written by the program. */
BPF_PERCPU_ARRAY(tg_seq, __u32, 1);

/* enum tg_stat -> frames. Written by the program, read by linerate.py. */
BPF_PERCPU_ARRAY(tg_stats, __u64, TG_STAT_MAX);

static __always_inline int tg_count(__u32 stat, int verdict)
{
	__u64 *c = tg_stats.lookup(&stat);

	if (c)
		*c += 1;
	return verdict;
}

/* RFC 1624, eqn. 3: the checksum after one 16-bit word changes from old
 * to new, HC' = ~(~HC + ~m + m'). Byte order does not matter as long as
 * all three are in the same one. */
static __always_inline __u16 tg_csum_replace(__u16 check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~check + (__u16)~old + (__u32)new;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

int xdp_trafficgen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct tg_config *cfg;
	struct udphdr *udp;
	__u32 zero = 0;
	__u32 *seq;
	__u32 flow = 0;
	__u16 port, check;

	cfg = tg_config.lookup(&zero);
	seq = tg_seq.lookup(&zero);
	if (!cfg || !seq)
		return tg_count(TG_ABORT_NO_CONFIG, XDP_ABORTED);
	if (data + TG_FRAME_LEN > data_end)
		return tg_count(TG_ABORT_SHORT, XDP_ABORTED);

	__builtin_memcpy(data, cfg->frame, TG_FRAME_LEN);

	if (cfg->flows > 1)
		flow = *seq % cfg->flows;
	*seq += 1;
	udp = data + TG_UDP_OFFSET;
	if ((void *)(udp + 1) > data_end)   /* implied by the check above; kept for the reader */
		return tg_count(TG_ABORT_SHORT, XDP_ABORTED);
	port = bpf_htons((__u16)(cfg->base_port + flow));
	if (udp->check) {           /* 0: an IPv4 datagram without checksum stays so */
		check = tg_csum_replace(udp->check, udp->source, port);
		udp->check = check ? check : 0xffff;   /* 0 would mean "no checksum" */
	}
	udp->source = port;
	tg_count(TG_SENT, 0);
	return bpf_redirect(cfg->ifindex, 0);
}
