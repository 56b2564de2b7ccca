"""fastlb: a kernel-assisted Layer 4 load balancer (XDP data plane, Python controller)."""

__version__ = "0.1.0"
