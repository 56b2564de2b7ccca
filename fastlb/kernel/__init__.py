"""The kernel side: bpf() syscalls, the C constants and structs, the map layouts,
the one BCC loader, pins in bpffs, XDP links, typed map access, interfaces and
neighbours (netlink).

May import fastlb.errors and fastlb.config only (tests/unit/test_layout.py).
"""
