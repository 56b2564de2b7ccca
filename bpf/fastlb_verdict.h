/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_verdict.h: the XDP verdict of each reason (enum fl_reason). */
#ifndef FASTLB_VERDICT_H
#define FASTLB_VERDICT_H

#include "fastlb_consts.h"

/* The XDP verdict of a reason; the FL_PASS_/FL_DROP_/FL_TX_ prefix says the
 * same (userspace derives it from the names). */
static __always_inline int reason_verdict(__u32 reason)
{
	if (reason <= FL_TX_ND_ADVERT)  /* the FL_TX_ reasons come first */
		return XDP_TX;
	if (reason == FL_PASS_NOT_IP || reason == FL_PASS_NOT_VIP ||
	    reason == FL_PASS_VIP_PORT || reason == FL_PASS_VLAN_DEPTH ||
	    reason == FL_PASS_L2_NOT_UNICAST)
		return XDP_PASS;
	return XDP_DROP;
}

#endif /* FASTLB_VERDICT_H */
