"""Configs the L7 unit tests share (tests/unit/test_edits.py, test_l7_tier.py)."""

from __future__ import annotations

# An http VIP with a default pool (198.18.0.11) and one route, api.example.com, to 198.18.0.21 and .22.
HTTP_ROUTED = """
[[vip]]
address = "198.19.0.100"
port = 80
protocol = "http"
[[vip.backend]]
address = "198.18.0.11"
[[vip.route]]
host = "api.example.com"
[[vip.route.backend]]
address = "198.18.0.21"
[[vip.route.backend]]
address = "198.18.0.22"
"""
HTTP_ROUTED_VIP = "198.19.0.100:80/http"
