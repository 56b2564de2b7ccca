"""The Layer 7 tier: http/https VIPs served by an HAProxy that fastlb runs and steers.

- ``render``: Config -> haproxy.cfg text (pure), with the fastlb key of each line.
- ``haproxy``: the HAProxy process (master-worker, supervised) and its runtime API.
- ``logstream``: HAProxy's per-request log lines from fastlb's UNIX datagram socket.
- ``steering``: lrt, peak-EWMA response times turned into leastconn weights (pure).
- ``tier``: what the controller calls: start, apply a config, live backend changes, stats, stop.

docs/L7.md says how it works and what each key maps to.
"""
