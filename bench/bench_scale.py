"""Scaling: per-packet cost and forwarded rate as VIPs, backends per VIP and conntrack entries grow.

One ``fastlb attach`` in a lab (IPv4, three sink backends: bench/pktrate.py),
built once with room for every point (the sizes are compile-time), so that
only the swept quantity changes from point to point:

- *VIPs* 1 to 1,000, three backends each; the traffic goes to one of them;
- *backends* of one VIP, 3 to 1,000. Backends beyond the lab's three get
  addresses in a second prefix of the LB's segment whose neighbour entries
  point at the three sinks' MACs, so every backend forwards to a real sink;
- *conntrack entries*, 1,000 to 1,000,000: the table is filled by the data
  plane itself (BPF_PROG_TEST_RUN on the attached program, one new UDP flow
  per call) before each point.

The VIP and backend points are reached by rewriting the config and SIGHUP
(the controller's reload). At each point:

- per-packet cost, with fastlb.testing._testrun.time_calls on the attached
  program as bench_packets does (calls of repeat=1 from a compiled loop,
  kernel ns per call, gross): an established flow, and a new flow on every
  call. For the conntrack points, "established" cycles through every entry
  of the table, so the working set is the table;
- forwarded rate through the lab: 1,000 flows (for conntrack points, as many
  flows as entries up to the generator's 64,512), established after a
  warm-up burst, in forwarded packets per CPU second and per wall second.

The empty XDP_PASS program and the MAC-swap XDP_TX program are timed in
the same run as floors. Plots go to docs/bench/scale-*.png.

Run alone: sudo .venv/bin/python bench/bench_scale.py [--quick]
"""

from __future__ import annotations

import ipaddress
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, "") and __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))

import bench_packets  # noqa: E402
import cputime  # noqa: E402
import pktrate  # noqa: E402
from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from fastlb.dataplane import flows  # noqa: E402
from fastlb.kernel import bpfsys  # noqa: E402
from fastlb.kernel.maps import PinnedMaps  # noqa: E402
from fastlb.lab import lb_process  # noqa: E402
from fastlb.lab.netns import LabError  # noqa: E402
from fastlb.lab.topology import NUD_PERMANENT, Lab  # noqa: E402
from fastlb.testing import _testrun  # noqa: E402
from fastlb.testing.testbed import XDP_VERDICTS  # noqa: E402

SETTINGS = {"max_vips": 1024, "max_backends": 4096, "ring_size": 4099,
            "sweep_interval": 3600}     # the controller does not walk (or expire) conntrack meanwhile
# conntrack_size per entry of the largest point: the LRU lists are per CPU, and one CPU fills the
# table, so it holds half; the rest is room for the new-flow and rate runs' own flows.
CT_ROOM = 2.8
BURN_IN = 4                                         # fill-and-flush cycles before the first point
FULL = {"vips": (1, 10, 100, 1000), "backends": (3, 10, 100, 1000),
        "conntrack": (1_000, 10_000, 100_000, 1_000_000)}
QUICK = {"vips": (1, 100), "backends": (3, 100), "conntrack": (1_000, 100_000)}
LABELS = {"vips": "VIPs", "backends": "backends of the VIP", "conntrack": "conntrack entries"}
EXTRA_NET = ipaddress.ip_network("198.18.4.0/22")   # more backends, on the LB's segment
OTHER_VIPS = ipaddress.ip_network("10.100.0.0/16")  # the VIPs no traffic goes to
SRC_OFFSET = 14 + 12                                # the IPv4 source address: a 4-byte flow counter
CPU = pktrate.GENERATOR_CPU     # conntrack fills from here too, into that CPU's LRU list
RELOAD_TIMEOUT = 240.0   # the controller resolves every backend's neighbour at a reload


def frame(lab: Lab, src: str) -> bytes:
    """A 64-byte UDP frame from ``src`` to the lab's VIP, as the generator's."""
    f = Ether(src=lab.mac("client"), dst=lab.mac("lb")) / IP(src=src, dst=lab.vip4) / UDP(
        sport=40000, dport=lab.udp_port)
    return bytes(f / Raw(b"\0" * max(0, 60 - len(f))))


def settings(points: dict) -> dict[str, int]:
    return dict(SETTINGS, conntrack_size=int(CT_ROOM * max(points["conntrack"])))


def config_text(lab: Lab, sizes: dict[str, int], vips: int = 1, backends: int = 3) -> str:
    lines = ["[settings]"] + [f"{k} = {v}" for k, v in sizes.items()] + [""]
    hot = [lab.addr(b) for b in lab.backend_names] + [str(EXTRA_NET[2 + i]) for i in range(backends - 3)]
    addresses = [lab.vip4] + [str(OTHER_VIPS[1 + i]) for i in range(vips - 1)]
    for n, vip in enumerate(addresses):
        lines += ["[[vip]]", f'address = "{vip}"', f"port = {lab.udp_port}", 'protocol = "udp"']
        for b in hot if n == 0 else hot[:3]:
            lines += ["[[vip.backend]]", f'address = "{b}"']
        lines.append("")
    return "\n".join(lines)


def add_extra_prefix(lab: Lab) -> None:
    """A second prefix on the LB's eth0, for backends beyond the lab's three."""
    with lab.ipr("lb") as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address=str(EXTRA_NET[1]), prefixlen=EXTRA_NET.prefixlen)


def add_backend_neighbours(lab: Lab, start: int, stop: int) -> None:
    """Static neighbours for the extra backends start..stop-1, pointing at the sinks' MACs."""
    with lab.ipr("lb") as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        for i in range(start, stop):
            sink = lab.backend_names[i % len(lab.backend_names)]
            ipr.neigh("add", dst=str(EXTRA_NET[2 + i]), lladdr=lab.mac(sink), ifindex=eth0, state=NUD_PERMANENT)


class Attached:
    """The attached balancer: reloads, its program fd and maps, and per-packet timing."""

    def __init__(self, lab: Lab, folder: Path, sizes: dict[str, int], calls: int, runs: int):
        self.lab, self.sizes, self.calls, self.runs = lab, sizes, calls, runs
        self.config = folder / "fastlb.toml"
        self.config.write_text(config_text(lab, sizes))
        self.bal = lb_process.start(lab, self.config, folder / "attach.log")
        self.fd = bpfsys.obj_get(str(cputime.attachment_prog(lab.ns("lb"))))
        self.maps = PinnedMaps(cputime.attachment_dir(lab.ns("lb")))
        self.block = 11              # first octet of the next fresh source range for new flows

    def close(self) -> None:
        self.maps.close()
        os.close(self.fd)
        lb_process.stop(self.lab, self.bal)

    def reload(self, text: str) -> float:
        """Write the config, SIGHUP the controller and wait until it says it reloaded; the seconds taken."""
        started = time.monotonic()
        self.config.write_text(text)
        done = self.bal.output().count("event=config_reload")
        os.kill(self.bal.pid, signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while time.monotonic() < deadline:
            out = self.bal.output()
            if out.count("event=config_reload") > done:
                last = out.rsplit("event=config_reload", 1)[1]   # "ed ..." or "_failed ..."
                if last.startswith("_failed"):
                    raise LabError(f"fastlb's reload failed: {last.splitlines()[0]}")
                return time.monotonic() - started
            time.sleep(0.02)
        tail = " | ".join(self.bal.output().strip().splitlines()[-3:])
        raise LabError(f"fastlb did not reload within {RELOAD_TIMEOUT:g} s: {tail}")

    def flush(self) -> None:
        flows.delete(self.maps, [key for key, _ in flows.read(self.maps)])

    def _time(self, data: bytes, calls: int, vary: int = -1) -> tuple[float, int]:
        ns, _wall, verdict = _testrun.time_calls(self.fd, data, calls, vary)
        return ns, verdict

    def established(self) -> float:
        data = frame(self.lab, "100.64.0.1")
        _testrun.run(self.fd, data)            # the flow enters conntrack
        times = []
        for _ in range(self.runs):
            ns, verdict = self._time(data, self.calls)
            check(verdict, "established")
            times.append(ns)
        return statistics.median(times)

    def new_flows(self) -> float:
        times = []
        for _ in range(self.runs):
            ns, verdict = self._time(frame(self.lab, f"{self.block}.0.0.0"), self.calls, SRC_OFFSET)
            self.block += 1
            check(verdict, "new flow")
            times.append(ns)
        return statistics.median(times)

    def fill(self, base: str, start: int, count: int) -> None:
        """Insert flows ``base + start + 1 ..`` + count (new UDP flows from those sources)."""
        if count > 0:
            src = str(ipaddress.ip_address(base) + start)
            _, verdict = self._time(frame(self.lab, src), count, SRC_OFFSET)
            check(verdict, "conntrack fill")

    def cycle(self, base: str, entries: int) -> float:
        """Established cost with the working set spread over ``entries`` flows (all in the table)."""
        data = frame(self.lab, base)
        times = []
        for _ in range(self.runs):
            total, done = 0.0, 0
            while done < self.calls:
                ns, verdict = self._time(data, entries, SRC_OFFSET)
                check(verdict, "established, cycling")
                total += ns * entries
                done += entries
            times.append(total / done)
        return statistics.median(times)


def check(verdict: int, what: str) -> None:
    if verdict != XDP_VERDICTS["tx"]:
        raise LabError(f"{what}: fastlb's verdict was {verdict}, not XDP_TX")


def sweep(lab: Lab, att: Attached, client: pktrate.Client, points: dict, seconds: float,
          bursts: int, warmup: float) -> dict[str, list[dict]]:
    generators: dict[int, object] = {}

    def rate(n_flows: int) -> list[pktrate.Sample]:
        if n_flows not in generators:
            generators[n_flows] = client.generator(lab.vip4, n_flows)
        return client.measure(generators[n_flows], lab.backend_names, seconds, bursts, warmup)

    results: dict[str, list[dict]] = {"vips": [], "backends": [], "conntrack": []}
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CPU})          # every insert takes a node of this CPU's LRU list
    try:
        # An LRU's insert cost depends on its history: on a fresh table the first new flows ran
        # at about 60 % of the cost seen after a few fill-and-flush cycles, where it levels off.
        # Burn in first, so that every point is timed in that level state.
        for _ in range(BURN_IN):
            att.new_flows()
            att.flush()
        for dim in ("vips", "backends"):
            for x in points[dim]:
                if dim == "backends":
                    add_backend_neighbours(lab, max(0, results[dim][-1]["x"] - 3) if results[dim] else 0, x - 3)
                took = att.reload(config_text(lab, att.sizes, **{dim: x}))
                point = {"x": x, "reload": took, "established": att.established(), "new": att.new_flows(),
                         "rate": rate(1000)}
                results[dim].append(point)
                att.flush()                 # every point starts from an empty table
        att.reload(config_text(lab, att.sizes))
        held = 0
        base = "100.0.0.0"
        for x in points["conntrack"]:
            att.fill(base, held, x - held)
            held = x
            point = {"x": x, "established": att.cycle(base, x), "new": att.new_flows(),
                     "rate": rate(min(x, 64512))}
            results["conntrack"].append(point)
    finally:
        os.sched_setaffinity(0, previous)
    return results


def floors(lab: Lab, calls: int, runs: int) -> dict[str, float]:
    data = frame(lab, "100.64.0.1")
    out = {}
    for name, source, function in (("XDP_PASS (empty)", "xdp_pass.c", "xdp_pass"),
                                   ("MAC swap (XDP_TX)", "xdp_macswap.c", "xdp_macswap")):
        bpf, fd = bench_packets.load_plain(source, function)
        try:
            out[name] = bench_packets.measure(fd, data, calls, runs)[0]
        finally:
            bpf.cleanup()
    return out


def run(quick: bool = False) -> str:
    points = QUICK if quick else FULL
    calls, runs, seconds, bursts, warmup = (2_000, 3, 0.2, 1, 0.1) if quick else (200_000, 3, 1.0, 2, 0.3)
    plots = Path(tempfile.gettempdir()) / "fastlb-bench-quick" if quick else HERE.parent / "docs" / "bench"
    with Lab(backends=3, ipv6=False, servers=False) as lab, tempfile.TemporaryDirectory() as tmp:
        pktrate.prepare(lab)
        add_extra_prefix(lab)
        base = floors(lab, calls, runs)
        sizes = settings(points)
        att = Attached(lab, Path(tmp), sizes, calls, runs)
        try:
            with pktrate.Client(lab) as client:
                results = sweep(lab, att, client, points, seconds, bursts, warmup)
        finally:
            att.close()
    images = plot(results, base, plots, relative=not quick)
    return render(results, base, images, sizes, calls, runs, seconds, bursts, quick)


def plot(results, base: dict[str, float], folder: Path, relative: bool) -> dict[str, str]:
    """One PNG per dimension; returns the Markdown link target of each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    links = {}
    for dim, points in results.items():
        xs = [p["x"] for p in points]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        left.plot(xs, [p["established"] for p in points], "o-", label="established flow")
        left.plot(xs, [p["new"] for p in points], "s-", label="new flow each packet")
        for (name, ns), style in zip(base.items(), (":", "--")):
            left.axhline(ns, color="grey", linestyle=style, label=name)
        left.set(xscale="log", xlabel=LABELS[dim], ylabel="kernel ns per packet (gross)", ylim=(0, None),
                 title="per-packet cost (BPF_PROG_TEST_RUN)")
        left.legend(fontsize="small")
        right.plot(xs, [pktrate.median(p["rate"], "mpps_per_core") for p in points], "o-",
                   label="per CPU second")
        right.plot(xs, [pktrate.median(p["rate"], "mpps") for p in points], "s--", label="per wall second")
        right.set(xscale="log", xlabel=LABELS[dim], ylabel="forwarded Mpps", ylim=(0, None),
                  title="forwarded rate through the veth lab")
        right.legend(fontsize="small")
        fig.suptitle(f"fastlb as {LABELS[dim]} grow")
        fig.tight_layout()
        path = folder / f"scale-{dim}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        links[dim] = f"bench/{path.name}" if relative else str(path)
    return links


def render(results, base, images, sizes, calls, runs, seconds, bursts, quick) -> str:
    out = ["## Scaling: VIPs, backends and conntrack entries", ""]
    if quick:
        out += ["*Quick run: two points per sweep and tiny runs, the figures mean nothing.*", ""]
    out += ["One `fastlb attach` in the lab, built once for every point ("
            + ", ".join(f"`{k} = {v}`" for k, v in sizes.items()) + "); the VIP and backend "
            "points are reached by a config reload, the conntrack points by filling the table through the "
            "data plane. Per-packet cost: kernel ns per call, gross, "
            f"{calls:,} calls of repeat=1 from a compiled loop on the attached program, median of {runs} "
            "(the new-flow rows give every call a new source address). Rate: forwarded packets through the "
            f"lab to 3 sinks, median of {bursts} burst(s) of {seconds:g} s after a warm-up; per CPU second is "
            "robust to this shared machine's other load, per wall second is not (bench/pktrate.py). "
            "Floors in the same run: " + "; ".join(f"{k} {v:.0f} ns" for k, v in base.items()) + ".", ""]
    notes = {"vips": "Three backends each; all traffic goes to one VIP, so what grows is the VIP hash map and "
                     "the rings in memory, not the hot path's working set.",
             "backends": "One VIP. New flows land on backends all over the ring, so their entries and "
                         "counters are the working set; an established flow keeps one.",
             "conntrack": "Three backends. *Established* cycles through every entry of the table (the "
                          "working set is the table); the new-flow and rate columns run with the table that "
                          "full (with room left: no eviction). The rate uses as many flows as entries, up to "
                          "the generator's 64,512."}
    for dim, points in results.items():
        first = points[0]
        first_rate = pktrate.median(first["rate"], "mpps_per_core")
        reloads = "reload" in first
        out += [f"### As {LABELS[dim]} grow", "", notes[dim], "",
                f"![fastlb as {LABELS[dim]} grow]({images[dim]})", "",
                f"| {LABELS[dim]} | established ns | × first | new flow ns | × first | × MAC swap (est.) | "
                "Mpps per CPU s | × first | Mpps (wall) |" + (" reload s |" if reloads else ""),
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if reloads else "")]
        swap = base["MAC swap (XDP_TX)"]
        for p in points:
            per_core = pktrate.median(p["rate"], "mpps_per_core")
            out.append(f"| {p['x']:,} | {p['established']:.0f} | {p['established'] / first['established']:.2f} | "
                       f"{p['new']:.0f} | {p['new'] / first['new']:.2f} | {p['established'] / swap:.2f} | "
                       f"{per_core:.3f} | {per_core / first_rate:.2f} | {pktrate.median(p['rate'], 'mpps'):.3f} |"
                       + (f" {p['reload']:.1f} |" if reloads else ""))
        out.append("")
        if reloads:
            out += ["*Reload s*: from SIGHUP to the controller's `config_reloaded` (it resolves every backend's "
                    "next hop and writes the changed slots).", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv[1:]))
