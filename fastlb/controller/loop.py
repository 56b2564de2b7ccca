"""The controller behind ``fastlb attach``: health checks drive the maps, live changes, timers.

One thread (the caller's) writes the maps and runs :meth:`Controller.run`, a
loop over one event queue. The metrics thread (fastlb.controller.metrics)
reads them: at each scrape it looks up the counters and the VIP and backend
tables (fastlb.dataplane.stats), a read the kernel makes atomic per entry; it
never writes. Other threads only put events on the queue:

- the signal thread: SIGHUP reloads the config, SIGINT/SIGTERM stop;
- the prober (fastlb.controller.health): one result per probe;
- the neighbour watcher (fastlb.controller.neighbour_watch): a backend's MAC changed;
- the control socket (fastlb.controller.control_socket): a command, answered once applied.

Events are taken in batches; when a batch changed anything, the planner
(fastlb.controller.planner, pure) says once what the tables should hold, and
only their differences are written (fastlb.dataplane.tables.apply). Live
config changes are pure functions in fastlb.config.edits. The controller does no
work per conntrack entry: the data plane expires entries and keeps the active
counts itself (docs/DATAPLANE.md). Two timers remain: every ``sweep_interval``
an unreachable BIRD is tried again, and while a backend ramps (slow start)
its weight steps every RAMP_STEP.

Each transition is logged as one line of ``key=value`` pairs on stderr:
``backend_up``, ``backend_down``, ``table_rebuilt`` (with the slots
changed), ``flows_moved``, ``vip_no_healthy_backend``, ``config_reloaded``,
``config_reload_failed``, ``neighbour_changed``;
with ``[bgp]`` (fastlb.controller.bgp): ``route_announced``, ``route_withdrawn``,
``bgp_speaker_error``, ``bgp_speaker_ok``, ``bgp_withdrawn_for_detach``.

A failed backend of a VIP with ``expire_nodest_conn`` (the default) keeps
its slot but loses the slot's valid flag: its flows' next packets go to a
live backend, and when it comes back up its slot gets a new generation, so
that none of them returns to it. Without it, it only
leaves the tables (weight 0), and its flows stay on it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import queue
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone

from fastlb.config import Config, ConfigError, edits, l4_view, load_config, render_config, validate
from fastlb.controller import attachment, bgp, control_socket, health, neighbour_watch, planner, state
from fastlb.controller.files import write_atomic
from fastlb.controller.planner import NO_MAC, Key
from fastlb.core import PeakEwma
from fastlb.dataplane import flows, identity, response, stats, tables
from fastlb.dataplane.tables import lrt_score
from fastlb.errors import FastlbError, NeighbourError, require_root
from fastlb.kernel import neighbours, pins, structs, xdp
from fastlb.kernel.layout import Sizes
from fastlb.kernel.maps import PinnedMaps

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
RAMP_STEP = 0.5         # seconds between two weight steps of a slow start
RESPONSES_EVERY = 0.25  # seconds between two reads of the response times the data plane measured (NAT lrt)
COUNT_BUDGET = 0.005    # metrics: the share of a core that counting conntrack may take
SIGNALS = STOP_SIGNALS | {signal.SIGHUP}
COMMAND_TIMEOUT = 60.0


def measures_responses(vip: Vip) -> bool:
    """lrt under nat: replies cross this box, so the data plane times responses and lrt uses those
    (fastlb.dataplane.response); elsewhere (dsr, tunnel) lrt uses the health checks' RTT."""
    return vip.algorithm == "lrt" and vip.forwarding == "nat"


class View:
    """What the controller knows of one backend of one VIP."""

    __slots__ = ("verdict", "ewma", "passed", "failed", "rtt_written", "asked", "ramp_from")

    def __init__(self, st: str):
        self.verdict = health.Verdict(st)
        self.ramp_from: float | None = None   # slow start: time.monotonic() when it (re)entered the table
        self.asked: tuple[int | None, int | None] = (None, None)  # exec's weight, agent's percent
        self.ewma = PeakEwma()
        self.passed = 0
        self.failed = 0
        self.rtt_written = 0


class _Call:
    """A control-socket command waiting for the main loop."""

    def __init__(self, request: dict):
        self.request = request
        self.done = threading.Event()
        self.reply: dict | None = None
        self.error: FastlbError | None = None


def _fmt(value) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class Controller:
    """Attach, then keep the maps right until told to stop."""

    def __init__(self, ifname: str, config_path: str, config: Config, *, xdp_mode: str = "auto",
                 keep: bool = False, metrics: tuple[str, int] | None = None, out=None, extra_ifaces=()):
        self.ifname = ifname
        self.extra_ifaces = tuple(extra_ifaces)   # two-arm: the backends' side(s)
        self.config_path = config_path
        self.config = config
        self.sizes = Sizes.from_settings(config.settings)
        self.xdp_mode = xdp_mode
        self.keep = keep
        self.metrics_listen = metrics
        self.out = out or sys.stderr
        self.events: queue.Queue = queue.Queue()
        self.views: dict[Key, View] = {}
        self.macs: dict[str, str] = {}                 # backend address -> its next hop's MAC
        self.hops: dict[str, str] = {}                 # backend address -> next hop
        self.memory = planner.Memory()                   # what the last plan remembers (all_down)
        self.slots: dict[Key, int] = {}
        self.responses = response.Meter()               # NAT lrt: response times the data plane measured
        self.maps: PinnedMaps | None = None
        self.prober: health.Prober | None = None
        self.server: control_socket.Server | None = None
        self.metrics = None
        self.watcher: neighbour_watch.Watcher | None = None
        self._members: tuple[Config | None, dict] = (None, {})
        self._counted: int | None = None                 # metrics: conntrack's entries at the last count
        self._count_due = 0.0                            # time.monotonic() when they may be counted again
        self.reloads = {"ok": 0, "failed": 0}
        self.announcer: bgp.Announcer | None = None   # [bgp]: the VIPs' routes in BIRD
        self.l7 = None                                 # http/https VIPs: fastlb.controller.l7.tier.Tier

    # ---- logging ------------------------------------------------------------

    def log(self, event: str, **fields) -> None:
        ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [f"ts={ts}", f"event={event}"] + [f"{k}={_fmt(v)}" for k, v in fields.items()]
        print("fastlb: " + " ".join(parts), file=self.out, flush=True)

    # ---- start --------------------------------------------------------------

    def start(self) -> attachment.AttachResult:
        """Attach (or adopt the attachment), then start the threads. Returns the attach result."""
        require_root("attach")
        iface = neighbours.interface(self.ifname)
        pin_dir = pins.attachment_dir(self.ifname, pins.ensure_bpffs())
        self.ifaces = [iface] + [neighbours.interface(n) for n in self.extra_ifaces]
        for i, each in enumerate(self.ifaces):
            xdp.refuse_foreign(each, pin_dir, primary=i == 0)
        self.iface = iface
        # The socket first: it refuses a second controller for this interface before anything changes.
        self.server = control_socket.Server(self.ifname, self._submit)
        try:
            if self.metrics_listen is not None:
                self.metrics = self._serve_metrics()
            adopting = xdp.is_ours(iface, pin_dir)
            self._sync_views(state.load(self.ifname) if adopting else {})
            self.hops = self._next_hops(self.config)
            self.macs = neighbour_watch.resolve(self.ifaces, self.hops)
            if adopting:
                self._macs_from_maps(pin_dir)
            self._require_macs_for_unchecked()
            self.prober = health.Prober(self._on_results)
            self._first_probes()
            self.announcer = bgp.Announcer(self.ifname, self.log)
            self._l7_apply(self.config, reload=True)   # HAProxy listens before XDP passes it packets
            plan = self._plan()
            result = attachment.attach(self.ifname, plan.effective, self.xdp_mode,
                                     macs=plan.macs, down=plan.down, extra_ifaces=self.extra_ifaces)
            self.maps = PinnedMaps(result.pin_dir)
            self._after_build(plan, result.written, before=set(), first=True)
            if adopting:
                result.notes.append(f"adopted the running attachment of {self.ifname}: its maps, conntrack "
                                    "and last known health")
        except BaseException:
            self._close_threads()
            if self.l7 is not None:
                self.l7.stop(keep=False)
            raise
        self.prober.start()
        self.prober.set_targets(self._targets())
        self.watcher = neighbour_watch.Watcher(self.ifaces, lambda addr, mac: self.events.put(("neigh", addr, mac)))
        self.watcher.watch(set(self.hops.values()))
        self.watcher.start()
        self.server.start()
        threading.Thread(target=self._signals, name="fastlb-signals", daemon=True).start()
        _sd_notify("READY=1")
        return result

    def _serve_metrics(self):
        from fastlb.controller.metrics import MetricsServer
        addr, port = self.metrics_listen
        try:
            return MetricsServer(addr, port, self._metrics_source)
        except OSError as exc:
            raise FastlbError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}",
                              fix="pick another with --metrics ADDR:PORT, or --metrics off") from exc

    def _signals(self) -> None:
        while True:
            sig = signal.sigwait(SIGNALS)
            self.events.put(("signal", sig))
            if sig in STOP_SIGNALS:
                return

    def _addresses(self) -> set[str]:
        return {str(b.address) for v in l4_view(self.config).vips for b in v.backends}

    def _next_hops(self, config: Config, only=None) -> dict[str, str]:
        config = l4_view(config)   # http VIPs' backends are HAProxy's, reached through the stack
        on_link = {str(b.address) for v in config.vips if v.forwarding == "dsr" for b in v.backends}
        addresses = {str(b.address) for v in config.vips for b in v.backends}
        return neighbour_watch.next_hops(self.ifaces, addresses if only is None else only, on_link)

    def _two_arm(self, config: Config) -> dict:
        """tables.apply's interface arguments: none one-arm; the slots and each
        backend's egress interface two-arm (a backend added live gets its own)."""
        if not self.extra_ifaces:
            return {}
        addresses = {str(b.address) for v in config.vips for b in v.backends}
        return {"ifaces": [(i.index, i.mac) for i in self.ifaces], "egress": neighbours.egress(self.ifaces, addresses)}

    def _macs_from_maps(self, pin_dir) -> None:
        """Adopting: a backend that does not resolve now keeps the MAC the maps hold."""
        with PinnedMaps(pin_dir) as maps:
            for slot in identity.backends(maps).values():
                addr, mac = str(slot.address), structs.mac_str(slot.entry.mac)
                if addr in self._addresses() and addr not in self.macs and mac != NO_MAC:
                    self.macs[addr] = mac

    def _require_macs_for_unchecked(self) -> None:
        """A backend without a health check must resolve: nothing else would take it out."""
        missing = sorted({str(b.address) for v in l4_view(self.config).vips for b in v.backends
                          if v.check_of(b).kind == "none" and str(b.address) not in self.macs})
        if missing:
            raise NeighbourError(
                f"no MAC address for backend(s) {', '.join(missing)} on {self.ifname} after "
                f"{neighbour_watch.RESOLVE_TIMEOUT:g} s",
                fix="check that the backends are up and on this segment (they must answer ARP/ND for "
                    "their own address), or give them a [vip.health] check so that they can start down")

    def _first_probes(self) -> None:
        """Backends with no known state get one probe before the first table (their first result decides)."""
        targets = [t for k, t in self._targets().items() if self.views[k].verdict.state == health.UNKNOWN]
        if not targets:
            return
        for result in self.prober.probe_all(targets).values():
            self._on_result_main(result)

    # ---- views, targets and the effective config ------------------------------

    def _member(self, key: Key) -> tuple[Vip | None, object]:
        """(VIP, backend) of a view's key, from an index of the running config (one lookup a result)."""
        if self._members[0] is not self.config:
            self._members = (self.config, {k: (vip, b) for vip, b, k in self._backends()})
        return self._members[1].get(key, (None, None))

    def _backends(self):
        for vip in l4_view(self.config).vips:
            for b in vip.backends:
                yield vip, b, (vip.name, b.key)

    def _sync_views(self, known: dict[Key, str]) -> None:
        """One view per configured backend: kept ones keep theirs, new ones start from ``known``."""
        wanted = {}
        for vip, b, key in self._backends():
            view = self.views.get(key)
            if view is None:
                st = health.UP if vip.check_of(b).kind == "none" else known.get(key, health.UNKNOWN)
                view = View(st)
                if st == health.UP and vip.slow_start and self.maps is not None:
                    view.ramp_from = time.monotonic()   # added while running, with no check to pass first
            elif vip.check_of(b).kind == "none":
                view.verdict.state = health.UP
            if vip.check_of(b).kind not in ("exec", "agent"):
                view.asked = (None, None)   # only these kinds ask for a weight
            wanted[key] = view
        self.views = wanted

    def _targets(self) -> dict[Key, health.Target]:
        out = {}
        for vip, b, key in self._backends():
            check = vip.check_of(b)
            if check.kind != "none":
                out[key] = health.Target(key, str(b.address), check.port or b.port, check)
        return out

    def _weights(self) -> dict[planner.Key, int]:
        """Each backend's weight where it differs from its configured one: as its check asks
        (exec's ``weight N``, the agent's share), and stepped by a slow start."""
        now = time.monotonic()
        out = {}
        for vip in self.config.vips:
            views = [self.views.get((vip.name, b.key)) for b in vip.backends]
            weights = [b.weight if v is None else planner.asked_weight(b.weight, v.asked)
                       for b, v in zip(vip.backends, views)]
            ramps = self._ramps(vip, now)
            if ramps:
                weights = planner.ramped(weights, [ramps.get(b.key) for b in vip.backends])
            for b, weight in zip(vip.backends, weights):
                if weight != b.weight:
                    out[(vip.name, b.key)] = weight
        return out

    def _ramps(self, vip: Vip, now: float) -> dict[bytes, float]:
        """Slow start: the VIP's ramping backends and how far along (0..1); finished ramps are cleared."""
        out = {}
        for b in vip.backends:
            view = self.views.get((vip.name, b.key))
            if view is None or view.ramp_from is None:
                continue
            done = (now - view.ramp_from) / vip.slow_start if vip.slow_start else 1.0
            if done >= 1.0:
                view.ramp_from = None
                self.log("slow_start_done", vip=vip.name, backend=b.key.decode())
            else:
                out[b.key] = max(0.0, done)
        return out

    def _start_ramp(self, vip: Vip, backend) -> None:
        if vip.slow_start and self.maps is not None:   # not at the first start: nothing ramps against
            self.views[(vip.name, backend.key)].ramp_from = time.monotonic()
            self.log("slow_start_begins", vip=vip.name, backend=backend.key.decode(), seconds=vip.slow_start)

    def ramping(self) -> bool:
        return any(v.ramp_from is not None for v in self.views.values())

    def _plan(self) -> planner.Plan:
        """Ask the planner once, remember what it remembers, log its transitions."""
        plan = planner.plan(self.config, {k: v.verdict.state for k, v in self.views.items()}, self.macs,
                            self.memory, self._weights())
        self.memory = plan.memory
        for event, fields in plan.transitions:
            self.log(event, **fields)
        return plan

    # ---- building the tables --------------------------------------------------

    def _valid_slots(self) -> set[int]:
        return tables.valid_slots(self.maps)

    def _rebuild(self) -> None:
        before = self._valid_slots()
        plan = self._plan()
        written = tables.apply(self.maps, plan.effective, plan.macs, self.sizes, down=plan.down,
                               **self._two_arm(plan.effective))
        self._after_build(plan, written, before)

    def _after_build(self, plan: planner.Plan, written: dict, before: set[int], first: bool = False) -> None:
        effective = plan.effective
        placement = tables.place(effective, self.maps, self.sizes)
        self.slots = {(vip.name, b.key): placement.backend_ids[(vip.name, pos)]
                      for vip in effective.vips for pos, b in enumerate(vip.backends)}
        for vip in effective.vips:
            changed = written.get("ring_slots_by_vip", {}).get(vip.name, 0)
            if changed or first:
                self.log("table_rebuilt", vip=vip.name, slots_changed=changed, backends_in_table=plan.in_table(vip),
                         backends=len(vip.backends))
        left = before - self._valid_slots()
        if left and not first:
            # The kernel re-picks their flows at their next packet (the slot is no longer
            # valid, or holds a new generation); nothing walks conntrack.
            unbound = flows.unbind_backends(self.maps, left)
            if unbound:
                self.log("clients_unbound", backend_slots=",".join(map(str, sorted(left))), bindings=unbound,
                         why="persistence ends with its backend: their next connections pick again")
            self.log("flows_moved", backend_slots=",".join(map(str, sorted(left))),
                     why="their backend failed or was removed (expire_nodest_conn)")
        for key in self.views:
            self._write_rtt(key, force=True)
        self._save_state()
        self._announce()

    def _announce(self) -> None:
        """BGP: announce the VIPs that have a healthy backend, withdraw the others (fastlb.controller.bgp).

        An http VIP's backends are HAProxy's: healthy while one of its servers is up (fastlb.controller.l7)."""
        if self.announcer is not None:
            healthy = {v.name for v in self.config.vips if not v.is_l7 and v.name not in self.memory.empty}
            if self.l7 is not None:
                healthy |= self.l7.serving_vips()
            self.announcer.update(self.config, healthy)

    def _save_state(self) -> None:
        try:
            state.save(self.ifname, {k: v.verdict.state for k, v in self.views.items()})
        except OSError as exc:
            self.log("state_not_saved", error=f"{exc.strerror or exc}", path=state.path(self.ifname))

    def _write_rtt(self, key: Key, force: bool = False, unmeasured_us: float | None = None) -> None:
        """lrt VIPs: write the backend's peak-EWMA score when it moved enough; ``unmeasured_us``: the
        score of a backend with no sample yet, in place of the estimate's default."""
        vip = self._member(key)[0]
        be_id = self.slots.get(key)
        view = self.views.get(key)
        if vip is None or vip.algorithm != "lrt" or be_id is None or view is None:
            return   # with no sample yet, score_us is default_us: load counts from the first connection
        now = time.monotonic()
        score = lrt_score(view.ewma.score_us(now) if view.ewma.has_sample or unmeasured_us is None
                          else unmeasured_us)
        old = view.rtt_written
        if not force and score == old:
            return
        entry = self.maps.lookup("backends", ctypes.c_uint32(be_id))
        if entry is None or not entry.family or entry.rtt_us == score:
            view.rtt_written = score
            return
        entry.rtt_us = score
        self.maps.update("backends", ctypes.c_uint32(be_id), entry)
        view.rtt_written = score

    # ---- events ------------------------------------------------------------------

    def _on_results(self, results: list[health.Result]) -> None:
        self.events.put(("results", results))

    def _on_result_main(self, result: health.Result) -> bool:
        """Count a probe result; True when the backend's state changed."""
        view = self.views.get(result.key)
        vip, backend = self._member(result.key)
        if view is None or backend is None:
            return False  # a result for a backend that has since gone
        if result.ok:
            view.passed += 1
            if result.latency_s is not None and not measures_responses(vip):   # then those, not the RTT
                view.ewma.observe(result.latency_s * 1e6, result.at)
        else:
            view.failed += 1
        check = vip.check_of(backend)
        reweighted = False
        if result.ok and (result.weight, result.percent) != view.asked:
            self.log("backend_weight_asked", vip=vip.name, backend=backend.key.decode(), check=check.kind,
                     weight="-" if result.weight is None else result.weight,
                     percent="-" if result.percent is None else result.percent, detail=result.detail)
            view.asked = (result.weight, result.percent)
            reweighted = True
        was = view.verdict.state
        new = view.verdict.feed(result, check.rise, check.fall)
        if new is None:
            if self.maps is not None and not reweighted:
                self._write_rtt(result.key)
            return reweighted
        in_a_row = view.verdict.successes if new == health.UP else view.verdict.failures
        if new == health.UP:
            self._start_ramp(vip, backend)
        else:
            view.ramp_from = None
        self.log(f"backend_{new}", vip=vip.name, backend=backend.key.decode(), was=was,
                 checks_in_a_row=in_a_row, check=check.kind, detail=result.detail)
        return True

    def _on_neigh(self, hop: str, mac: str | None) -> bool:
        if mac is None:
            return False  # the watcher probes it again; the health checks decide meanwhile
        changed = False
        for addr in sorted(a for a, h in self.hops.items() if h == hop):
            old = self.macs.get(addr)
            if old != mac:
                self.macs[addr] = mac
                self.log("neighbour_changed", backend=addr, next_hop=hop, mac=mac, was=old or "unresolved")
                changed = True
        return changed

    def run(self) -> None:
        """Handle events until SIGINT or SIGTERM."""
        retry_every = self.config.settings.sweep_interval   # the key's name from when it timed a conntrack sweep
        next_retry = time.monotonic() + retry_every
        next_ramp = next_responses = time.monotonic()
        while True:
            wake = min(next_retry, next_ramp) if self.ramping() else next_retry
            if self._measured_vips():
                wake = min(wake, next_responses)
            try:
                batch = [self.events.get(timeout=max(0.0, wake - time.monotonic()))]
            except queue.Empty:
                batch = []
            while True:
                try:
                    batch.append(self.events.get_nowait())
                except queue.Empty:
                    break
            dirty = False
            calls = []
            for event in batch:
                kind = event[0]
                if kind == "signal":
                    if event[1] in STOP_SIGNALS:
                        for call in calls:      # the commands that came before it are answered
                            self._run_call(call)
                        return
                    self._reload()  # applied, or logged and ignored
                    retry_every = self.config.settings.sweep_interval
                elif kind == "results":
                    for result in event[1]:
                        dirty = self._on_result_main(result) or dirty
                elif kind == "neigh":
                    dirty = self._on_neigh(event[1], event[2]) or dirty
                elif kind == "call":
                    calls.append(event[1])
                elif kind == "l7_health":
                    self._announce()     # HAProxy's servers of an http VIP all went down, or one came back
            if self.ramping() and time.monotonic() >= next_ramp:
                dirty = True            # slow start: the next weight step (only changed slots are written)
                next_ramp = time.monotonic() + RAMP_STEP
            if time.monotonic() >= next_responses and self._measured_vips():
                self._read_responses()
                next_responses = time.monotonic() + RESPONSES_EVERY
            if dirty:
                self._rebuild()
            # Commands after the rebuild: a reply (status, stats) never shows a health state
            # that the maps do not hold yet.
            for call in calls:
                self._run_call(call)
            if time.monotonic() >= next_retry:
                if self.announcer is not None:
                    self.announcer.retry()   # BIRD was unreachable: try again
                next_retry = time.monotonic() + retry_every

    def _measured_vips(self) -> list[Vip]:
        """lrt VIPs whose replies cross this box (nat): the data plane times their responses."""
        return [v for v in self.config.vips if measures_responses(v)] if self.maps is not None else []

    def _read_responses(self) -> None:
        """Feed each NAT lrt backend's new first-response times (their mean) to its lrt estimate,
        in place of its health check's RTT, and write the score where it moved."""
        keys = {self.slots[(v.name, b.key)]: (v.name, b.key) for v in self._measured_vips() for b in v.backends
                if (v.name, b.key) in self.slots}
        now = time.monotonic()
        for be_id, (mean_us, _) in self.responses.update(response.read(self.maps, keys)).items():
            view = self.views.get(keys[be_id])
            if view is not None:
                view.ewma.observe(mean_us, now)
                self._write_rtt(keys[be_id])
        # A backend no connection has measured yet scores as its VIP's mean: it gets tried (and
        # measured) alongside the others, where the default (1 s) would keep it out.
        for vip in self._measured_vips():
            views = [(k, self.views.get(k)) for k in ((vip.name, b.key) for b in vip.backends)]
            scores = [v.ewma.score_us(now) for _, v in views if v is not None and v.ewma.has_sample]
            for key, view in views if scores else ():
                if view is not None and not view.ewma.has_sample:
                    self._write_rtt(key, unmeasured_us=sum(scores) / len(scores))

    # ---- config changes --------------------------------------------------------------

    def _reload(self) -> bool:
        _sd_notify("RELOADING=1")
        try:
            new = load_config(self.config_path)
            self._check_same_sizes(new)
            self._l7_check(new)
        except FastlbError as exc:
            self.reloads["failed"] += 1
            self.log("config_reload_failed", path=self.config_path, error=str(exc),
                     effect="the running config stays")
            _sd_notify("READY=1")
            return False
        self._adopt_config(new)
        self._first_probes()
        self._rebuild()
        self._l7_apply(new, reload=True)
        self.reloads["ok"] += 1
        self.log("config_reloaded", path=self.config_path, vips=len(new.vips),
                 backends=sum(len(v.backends) for v in new.vips))
        _sd_notify("READY=1")
        return True

    def _check_same_sizes(self, new: Config) -> None:
        if Sizes.from_settings(new.settings) != self.sizes:
            raise FastlbError("the [settings] that size the maps or seed the hash changed (ring_size, "
                              "conntrack_size, max_vips, max_backends, hash_seed, swrr_size, max_vip_ports)",
                              fix=f"these need a new attach: fastlb detach {self.ifname}, then attach "
                                  "(this drops conntrack)")

    def _adopt_config(self, new: Config, resolve_now: bool = True) -> None:
        """Make ``new`` the running config (the caller rebuilds the tables)."""
        self.hops = self._next_hops(new)
        added = {a: h for a, h in self.hops.items() if a not in self.macs}
        self.config = new
        if added and resolve_now:
            self.macs.update(neighbour_watch.resolve(self.ifaces, added))
        self._sync_views({})
        targets = self._targets()
        fresh = frozenset(k for k in targets if self.views[k].verdict.state == health.UNKNOWN)
        self.prober.set_targets(targets, now=fresh)
        self.watcher.watch(set(self.hops.values()))

    # ---- the L7 tier (fastlb.controller.l7): http/https VIPs -------------------------------------

    def _l7_check(self, new: Config) -> None:
        """Render and ``haproxy -c`` the http VIPs of ``new`` before anything changes."""
        if any(v.is_l7 for v in new.vips):
            from .l7 import tier
            (self.l7 or tier.Tier(self.ifname, self.log)).check(new)

    def _l7_apply(self, new: Config, reload: bool) -> str | None:
        """Have HAProxy serve ``new``'s http VIPs: started, changed live, reloaded, or stopped."""
        if not any(v.is_l7 for v in new.vips):
            if self.l7 is not None:
                self.l7.stop(keep=False)
                self.l7 = None
            return None
        if self.l7 is None:
            from .l7 import tier
            self.l7 = tier.Tier(self.ifname, self.log, on_health=lambda: self.events.put(("l7_health",)))
            self.l7.start(new)
            return "started"
        return self.l7.apply(new, reload=reload)

    # ---- control socket ------------------------------------------------------------

    def _submit(self, request: dict) -> dict:
        """Runs on the socket's thread: queue the command, wait until the main loop applied it."""
        call = _Call(request)
        self.events.put(("call", call))
        if not call.done.wait(COMMAND_TIMEOUT):
            raise control_socket.ControlError(f"the controller did not apply {request['cmd']} within "
                                       f"{COMMAND_TIMEOUT:g} s", fix="see its log")
        if call.error is not None:
            raise call.error
        return call.reply or {}

    def _run_call(self, call: _Call) -> None:
        try:
            call.reply = self._command(call.request)
        except FastlbError as exc:
            call.error = exc
        except Exception as exc:  # a bug must not kill the controller: say it to the caller and the log
            self.log("command_failed", cmd=call.request.get("cmd"), error=repr(exc))
            call.error = FastlbError(f"{call.request.get('cmd')} failed inside the controller: {exc!r}",
                                     fix="see the controller's log")
        finally:
            call.done.set()

    def _command(self, req: dict) -> dict:
        cmd = req["cmd"]
        if cmd == "stats":
            return {"stats": self.stats()}
        if cmd == "reload":
            if not self._reload():
                raise FastlbError(f"{self.config_path} was not reloaded", fix="see the controller's log line "
                                  "config_reload_failed for the error")
            return {"message": f"reloaded {self.config_path}"}
        if cmd == "save":
            return {"message": self._save()}
        if cmd not in edits.COMMANDS:
            raise FastlbError(f"unknown command {cmd!r}", fix=f"use one of: stats, reload, save, "
                              f"{', '.join(edits.COMMANDS)}")
        new, message = edits.COMMANDS[cmd](self.config, req, self.ifname)
        new = self._validated(new)
        self._l7_check(new)
        added = {a: h for a, h in self._next_hops(new).items() if a not in self.macs}
        if added:
            found = neighbour_watch.resolve(self.ifaces, added)
            if set(found) != added:
                raise NeighbourError(f"no MAC address for {', '.join(sorted(added - set(found)))} on "
                                     f"{self.ifname} after {neighbour_watch.RESOLVE_TIMEOUT:g} s",
                                     fix="check that the backend is up and on this segment (it must answer "
                                         "ARP/ND for its own address)")
            self.macs.update(found)
        self._adopt_config(new, resolve_now=False)
        self._first_probes()
        self._rebuild()
        if self._l7_apply(new, reload=False) == "runtime":
            message += " (through HAProxy's runtime API, no reload)"
        self.log("config_changed", cmd=cmd, change=message, saved=bool(req.get("save")))
        if req.get("save"):
            message += "; " + self._save()
        else:
            message += f" (not saved: lost at restart; --save writes it to {self.config_path})"
        return {"message": message}

    def _validated(self, new: Config) -> Config:
        self._check_same_sizes(new)
        try:
            return validate(dataclasses.replace(new, path=self.config_path))
        except ConfigError as exc:
            raise FastlbError(f"refused: the change would make an invalid config: {exc.message}",
                              fix=exc.fix) from exc

    def _save(self) -> str:
        text = render_config(self.config)
        path = self.config_path
        try:
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            mode = 0o644
        try:
            write_atomic(path, text, mode)
        except OSError as exc:
            raise FastlbError(f"cannot write {path}: {exc.strerror or exc}",
                              fix="check the file's folder and permissions") from exc
        self.log("config_saved", path=path)
        return f"saved to {path}"

    # ---- what others read -----------------------------------------------------------

    def _health_view(self) -> dict:
        """The health views, read on the socket or metrics thread when one asks: the loop publishes
        nothing itself (1,000 backends send 1,000 results a second). The loop swaps ``config`` and
        ``views`` whole and changes a view's fields one by one, so a reader sees each field as of
        some moment, never a torn value."""
        now = time.monotonic()
        out = {}
        views = self.views
        for vip, b, key in self._backends():
            view = views.get(key)
            if view is None:
                continue
            last = view.verdict.last
            out[key] = {"health": view.verdict.state, "check": vip.check_of(b).kind,
                        "configured_weight": b.weight, "drained": b.weight == 0,
                        "weight_asked": planner.asked_weight(b.weight, view.asked) if any(
                            x is not None for x in view.asked) else None,
                        "latency_ms": round(last.latency_s * 1000, 3) if last and last.ok and
                        last.latency_s is not None else None,
                        "last_check_s_ago": round(now - last.at, 3) if last else None,
                        "last_detail": last.detail if last else None,
                        "checks_passed": view.passed, "checks_failed": view.failed}
        return out

    def stats(self, count_flows: bool = True) -> dict:
        data = stats.collect(self.maps, self._health_view(), count_flows=count_flows)
        data.update(interface=self.ifname, controller=True, pid=os.getpid(), config=self.config_path,
                    reloads=dict(self.reloads))
        if self.l7 is not None:
            data["l7"] = self.l7.stats()
            # the maps know an http VIP by its TCP key: give it its config name
            names = {v.name.rsplit("/", 1)[0] + "/tcp": v.name for v in self.config.vips if v.is_l7}
            for vip in data.get("vips", []):
                vip["vip"] = names.get(vip["vip"], vip["vip"])
        return data

    def _metrics_source(self) -> dict:
        """What a scrape reports. Conntrack's entries are counted by batch lookups (kernel
        work per entry, none in Python), at most as often as keeps that under
        COUNT_BUDGET of a core: a count that took 0.26 s (1M entries) waits 52 s."""
        data = self.stats(count_flows=False)
        now = time.monotonic()
        if now >= self._count_due:
            started = time.thread_time()
            self._counted = flows.count(self.maps)
            self._count_due = now + (time.thread_time() - started) / COUNT_BUDGET
        if self._counted is not None:
            data["conntrack"]["entries"] = self._counted
        return data

    # ---- stop --------------------------------------------------------------------------

    def _close_threads(self) -> None:
        for closer in (lambda: self.prober and self.prober.stop(), lambda: self.watcher and self.watcher.stop(),
                       lambda: self.server and self.server.close(), lambda: self.metrics and self.metrics.close()):
            try:
                closer()
            except OSError:
                pass
        if self.maps is not None:
            self.maps.close()
            self.maps = None

    def stop(self) -> bool:
        """Stop the threads; detach unless --keep. True when detached.

        Without --keep, the VIPs' BGP routes are withdrawn before anything
        else, and the program stays attached until ``bgp.detach_delay`` has
        passed since then (closing the threads counts towards it).
        """
        _sd_notify("STOPPING=1")
        delay, withdrawn = 0.0, time.monotonic()
        if not self.keep:
            delay, note = bgp.withdraw_for_detach(self.ifname)
            if note:
                self.log("bgp_withdrawn_for_detach", detail=note)
        self._close_threads()
        if self.l7 is not None:
            self.l7.stop(keep=self.keep)   # --keep: HAProxy goes on serving; the next attach adopts it
        if self.keep:
            return False
        time.sleep(max(0.0, delay - (time.monotonic() - withdrawn)))
        attachment.detach(self.ifname)   # nothing is announced any more: it detaches at once
        return True


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness and reloads; nothing outside systemd."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), target)
    except OSError:
        pass
