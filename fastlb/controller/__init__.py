"""The running balancer: attach/detach (attachment, decap), the controller loop,
health checks, the neighbour watch, the control socket, state, BGP and metrics.

Imports every layer below it (errors, config, core, kernel, dataplane), never the lab.
"""
