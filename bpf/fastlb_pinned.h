/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_pinned.h: how every fastlb program declares a map pinned under FASTLB_PIN_DIR.
 *
 * The loader (fastlb/kernel/loader.py) sets FASTLB_PIN_DIR to the
 * attachment's bpffs folder; each map is pinned there under its own name, so
 * that a restarted controller, `fastlb status` and `fastlb stats` open it.
 */
#ifndef FASTLB_PINNED_H
#define FASTLB_PINNED_H

#ifndef FASTLB_PIN_DIR
#error "FASTLB_PIN_DIR must name the bpffs folder for the maps (the loader sets it)"
#endif

/* BCC's BPF_TABLE_PINNED7, pinned at FASTLB_PIN_DIR/<name>. */
#define FL_MAP(type, key, value, name, entries, flags) \
	BPF_TABLE_PINNED7(type, key, value, name, entries, FASTLB_PIN_DIR "/" #name, flags)

#endif /* FASTLB_PINNED_H */
