/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_verdict.h: the XDP verdict of each reason (enum fl_reason). */
#ifndef FASTLB_VERDICT_H
#define FASTLB_VERDICT_H

#include "fastlb_consts.h"

/* The XDP verdict of a reason; the FL_PASS_/FL_DROP_/FL_TX_/FL_REDIRECT_
 * prefix says the same (userspace derives it from the names). */
static __always_inline int reason_verdict(__u32 reason)
{
	if (reason <= FL_TX_ND_ADVERT)  /* the FL_TX_ reasons come first */
		return XDP_TX;
	if (reason <= FL_REDIRECT_ICMP_TO_BACKEND)  /* then the FL_REDIRECT_ ones */
		return XDP_REDIRECT;
	if (reason == FL_PASS_NOT_IP || reason == FL_PASS_NOT_VIP ||
	    reason == FL_PASS_VIP_PORT || reason == FL_PASS_VLAN_DEPTH ||
	    reason == FL_PASS_L2_NOT_UNICAST || reason == FL_PASS_L7)
		return XDP_PASS;
	return XDP_DROP;
}

/* The FL_REDIRECT_ twin of a forwarding FL_TX_ reason (the reason itself when
 * it has none). */
static __always_inline __u32 redirect_reason(__u32 reason)
{
	if (reason == FL_TX_DSR)
		return FL_REDIRECT_DSR;
	if (reason == FL_TX_TUNNEL)
		return FL_REDIRECT_TUNNEL;
	if (reason == FL_TX_NAT)
		return FL_REDIRECT_NAT;
	if (reason == FL_TX_NAT_REPLY)
		return FL_REDIRECT_NAT_REPLY;
	if (reason == FL_TX_ICMP_TO_BACKEND)
		return FL_REDIRECT_ICMP_TO_BACKEND;
	return reason;
}

#endif /* FASTLB_VERDICT_H */
