"""The smallest config pieces the controller tests build on: one VIP, two backends."""

VIP = """
[[vip]]
address = "198.19.0.100"
port = 80
"""
BACKENDS = """
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
address = "198.18.0.12"
"""
