"""Prometheus text exposition of the controller's figures (prometheus-client).

Served on 127.0.0.1:9469 by default (``fastlb attach --metrics ADDR:PORT``,
or ``--metrics off``). Every scrape reads the maps afresh through the
controller's ``source()`` (the same figures as ``fastlb stats --json``), so
counters are the kernel's own, never cached. Names follow the Prometheus
conventions: ``_total`` for counters, base units (seconds, bytes)::

    fastlb_backend_packets_total{interface="eth0",tier="l4",vip="198.19.0.100:80/tcp",backend="198.18.0.11:80"} 1200
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

DEFAULT = "127.0.0.1:9469"


def parse_listen(text: str) -> tuple[str, int] | None:
    """``ADDR:PORT`` (IPv6 in brackets) -> (addr, port); ``off`` -> None. Raises ValueError."""
    if text.strip().lower() == "off":
        return None
    host, colon, port = text.strip().rpartition(":")
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not ADDR:PORT; write e.g. 127.0.0.1:9469, [::1]:9469 or off")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"{host!r} in {text!r} is not an IP address; write e.g. 127.0.0.1:9469") from exc
    return host, int(port)


class StatsCollector:
    """Turns ``source()`` (``{"interface", "vips", "reasons", "conntrack", ...}``) into metric families."""

    def __init__(self, source: Callable[[], dict]):
        self.source = source

    def describe(self):
        return []  # families are built per scrape; nothing to describe up front

    def collect(self):
        data = self.source()
        iface = data["interface"]
        vip_l = ["interface", "tier", "vip"]       # tier: "l4" (XDP) or "l7" (HAProxy, fastlb.controller.l7)
        be_l = ["interface", "tier", "vip", "backend"]
        fams = {
            "vip_packets": CounterMetricFamily("fastlb_vip_packets", "Packets forwarded for the VIP.", labels=vip_l),
            "vip_bytes": CounterMetricFamily("fastlb_vip_bytes", "Bytes (whole frames) forwarded for the VIP.",
                                             labels=vip_l),
            "vip_new_flows": CounterMetricFamily("fastlb_vip_new_flows", "New flows the VIP's algorithm placed.",
                                                 labels=vip_l),
            "vip_active": GaugeMetricFamily("fastlb_vip_active_connections",
                                            "Open TCP connections of the VIP, as the kernel counts them.",
                                            labels=vip_l),
            "vip_healthy": GaugeMetricFamily("fastlb_vip_healthy_backends", "Backends passing their checks.",
                                             labels=vip_l),
            "be_packets": CounterMetricFamily("fastlb_backend_packets", "Packets forwarded to the backend.",
                                              labels=be_l),
            "be_bytes": CounterMetricFamily("fastlb_backend_bytes", "Bytes (whole frames) forwarded to the backend.",
                                            labels=be_l),
            "be_new_flows": CounterMetricFamily("fastlb_backend_new_flows", "New flows given to the backend.",
                                                labels=be_l),
            "be_active": GaugeMetricFamily("fastlb_backend_active_connections",
                                           "Open TCP connections to the backend, as the kernel counts them.",
                                           labels=be_l),
            "be_up": GaugeMetricFamily("fastlb_backend_up", "1 when the backend passes its health check.",
                                       labels=be_l),
            "be_weight": GaugeMetricFamily("fastlb_backend_weight", "The backend's weight in the tables now.",
                                           labels=be_l),
            "be_latency": GaugeMetricFamily("fastlb_backend_probe_latency_seconds",
                                            "Latency of the last successful health probe.", labels=be_l),
            "be_checks": CounterMetricFamily("fastlb_backend_health_checks", "Health probes run, by result.",
                                             labels=be_l + ["result"]),
        }
        fams.update({
            "vip_requests": CounterMetricFamily("fastlb_vip_requests", "HTTP requests the VIP received (l7).",
                                                labels=vip_l),
            "vip_responses": CounterMetricFamily("fastlb_vip_responses", "HTTP responses by status class (l7).",
                                                 labels=vip_l + ["class"]),
            "be_requests": CounterMetricFamily("fastlb_backend_requests", "HTTP requests sent to the backend (l7).",
                                               labels=be_l),
            "be_response": GaugeMetricFamily("fastlb_backend_response_time_seconds",
                                             "HAProxy's average response time over its last 1024 requests (l7).",
                                             labels=be_l),
            "be_estimate": GaugeMetricFamily("fastlb_backend_latency_estimate_seconds",
                                             "lrt's peak-EWMA response-time estimate (l7).", labels=be_l),
        })
        for vip in data.get("l7", {}).get("vips", []):
            v = [iface, "l7", vip["vip"]]
            fams["vip_requests"].add_metric(v, vip["requests"])
            for cls, n in vip["responses"].items():
                fams["vip_responses"].add_metric(v + [cls], n)
            fams["vip_healthy"].add_metric(v, sum(1 for p in vip["pools"] for s in p["backends"]
                                                  if s["status"].startswith("UP") or s["status"] == "no check"))
            for pool in vip["pools"]:
                prefix = "" if pool["pool"] == vip["pools"][0]["pool"] else pool["pool"].rsplit("_", 1)[1] + "/"
                for s in pool["backends"]:
                    b = v + [prefix + s["backend"]]
                    fams["be_requests"].add_metric(b, s["requests"])
                    fams["be_active"].add_metric(b, s["active"])
                    fams["be_up"].add_metric(b, 1 if s["status"].startswith("UP") or s["status"] == "no check" else 0)
                    fams["be_weight"].add_metric(b, s["weight"])
                    fams["be_response"].add_metric(b, s["response_ms"] / 1000.0)
                    if s.get("latency_estimate_ms") is not None:
                        fams["be_estimate"].add_metric(b, s["latency_estimate_ms"] / 1000.0)
        for vip in data.get("vips", []):
            v = [iface, "l4", vip["vip"]]
            fams["vip_packets"].add_metric(v, vip["packets"])
            fams["vip_bytes"].add_metric(v, vip["bytes"])
            fams["vip_new_flows"].add_metric(v, vip["new_flows"])
            fams["vip_active"].add_metric(v, vip["active"])
            fams["vip_healthy"].add_metric(v, vip["healthy_backends"])
            for be in vip["backends"]:
                b = v + [be["backend"]]
                fams["be_packets"].add_metric(b, be["packets"])
                fams["be_bytes"].add_metric(b, be["bytes"])
                fams["be_new_flows"].add_metric(b, be["new_flows"])
                fams["be_active"].add_metric(b, be["active"])
                fams["be_up"].add_metric(b, 1 if be.get("health") == "up" else 0)
                fams["be_weight"].add_metric(b, be["weight"] if be["in_table"] else 0)
                if be.get("latency_ms") is not None:
                    fams["be_latency"].add_metric(b, be["latency_ms"] / 1000.0)
                for result in ("passed", "failed"):
                    fams["be_checks"].add_metric(b + [result], be.get(f"checks_{result}", 0))
        yield from fams.values()
        packets = CounterMetricFamily("fastlb_packets", "Frames seen by the XDP program, by verdict reason.",
                                      labels=["interface", "reason", "verdict"])
        nbytes = CounterMetricFamily("fastlb_bytes", "Bytes seen by the XDP program, by verdict reason.",
                                     labels=["interface", "reason", "verdict"])
        for reason, r in data.get("reasons", {}).items():
            packets.add_metric([iface, reason, r["verdict"]], r["packets"])
            nbytes.add_metric([iface, reason, r["verdict"]], r["bytes"])
        yield packets
        yield nbytes
        events = CounterMetricFamily("fastlb_events", "Data-plane events that no verdict shows: new flows the "
                                     "guard forwarded unrecorded, conntrack refusals, mid-flow TCP placed by the "
                                     "ring, expired entries met.", labels=["interface", "event"])
        for event, n in data.get("events", {}).items():
            events.add_metric([iface, event], n)
        yield events
        ct = data.get("conntrack", {})
        if "entries" in ct:
            g = GaugeMetricFamily("fastlb_conntrack_entries", "Entries in the conntrack map, counted at the scrape (stale ones too, until the LRU reclaims them).",
                                  labels=["interface"])
            g.add_metric([iface], ct["entries"])
            yield g
        g = GaugeMetricFamily("fastlb_conntrack_size", "Entries the conntrack map can hold.", labels=["interface"])
        g.add_metric([iface], ct.get("size", 0))
        yield g
        reloads = CounterMetricFamily("fastlb_config_reloads", "Config reloads, by result.",
                                      labels=["interface", "result"])
        for result, n in data.get("reloads", {}).items():
            reloads.add_metric([iface, result], n)
        yield reloads
        proc = data.get("l7", {}).get("haproxy")
        if proc:
            for name, key, what in (("fastlb_haproxy_restarts", "restarts", "HAProxy restarts after it died"),
                                    ("fastlb_haproxy_reloads", "reloads", "Seamless HAProxy reloads")):
                c = CounterMetricFamily(name, what + " (l7).", labels=["interface"])
                c.add_metric([iface], proc[key] or 0)
                yield c


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - no line per scrape
        pass


class MetricsServer:
    """The HTTP endpoint; ``close()`` stops it.

    prometheus-client's WSGI app in a threaded wsgiref server of our own:
    ``start_http_server`` returns the server only from prometheus-client 0.17
    on, and Debian 12 has 0.16.
    """

    def __init__(self, addr: str, port: int, source: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(source))
        server_class = _Server6 if ipaddress.ip_address(addr).version == 6 else _Server
        self.server = make_server(addr, port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="fastlb-metrics", daemon=True)
        self.thread.start()
        self.addr, self.port = addr, port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
