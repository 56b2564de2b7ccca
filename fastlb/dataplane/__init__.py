"""The data plane's contents: config -> map writes (tables), conntrack flows,
counters (stats) and the userspace model of a packet's path (explain).

May import fastlb.errors, fastlb.config, fastlb.kernel and fastlb.core.
"""
