/* SPDX-License-Identifier: Apache-2.0 */
/* xdp_pass.c: the smallest useful XDP program. It passes every frame on.
 *
 * It has two jobs:
 *
 * 1. In the namespace lab (fastlb/lab/topology.py) it is attached to the
 *    switch-side end of the load balancer's veth. On veth, a frame that
 *    the LB sends back with XDP_TX is dropped, silently, unless the peer
 *    device has an XDP program of its own (see LAB-NOTES, "veth as a test
 *    NIC"). This program is that XDP program. It changes nothing: the
 *    frame goes on into the switch's bridge as usual.
 *
 * 2. It is the "empty program" baseline in benchmarks. The time of one
 *    BPF_PROG_TEST_RUN call on it is the fixed cost of the call itself,
 *    and benchmarks give it next to the figure for the balancer.
 *
 * For job 2 it must stay empty. It has no maps, reads no packet bytes and
 * has no counter (unlike the balancer, which counts every verdict): anything
 * more here would end up in the baseline.
 *
 * Loaded with BCC: BPF(src_file="bpf/xdp_pass.c").load_func("xdp_pass", BPF.XDP).
 */
#include <uapi/linux/bpf.h>

int xdp_pass(struct xdp_md *ctx)
{
    return XDP_PASS;
}
