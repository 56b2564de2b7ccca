"""Two fastlb boxes behind a real BGP router with ECMP (fastlb.lab.ecmp), with real TCP.

The router runs BIRD with multipath and an L4 hash policy; each box runs
``fastlb attach`` with the same balancing config and its own BIRD, which
announces the VIP through the include fastlb writes. The backends are
shared (DSR: the boxes, the backends and the router on one segment).

What is shown, each figure measured by the test itself:
- both boxes announce and the router installs a two-way multipath route;
- new connections spread over both boxes, all succeed, and every box
  picked for every flow the backend ``fastlb explain`` names on every box;
- box A detaches: the router's route loses A within 1 s; connections held
  open through A keep working through B on the same backend (maglev, all
  of them), and the ``rr`` VIP's moved connections survive exactly when
  their ring slot names their backend (the documented limit);
- new connections all succeed; A re-attaches: announced again, its share
  comes back, and the held connections survive that move too;
- a controller killed with SIGKILL and started again withdraws nothing, and
  ``fastlb detach`` with no controller running withdraws before detaching;
- a VIP whose last healthy backend fails is withdrawn within 1 s;
- a box that goes dark (link down, no goodbye) is withdrawn by BFD.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

from fastlb.config import load_config
from fastlb.dataplane import explain as model
from fastlb.lab import lb_process
from fastlb.lab.clients import tcp_requests
from fastlb.lab.ecmp import BOXES, EcmpLab
from fastlb.lab.topology import python_env

pytestmark = [pytest.mark.root, pytest.mark.netns]

MAGLEV_VIP = "198.19.0.100"
RR_VIP = "198.19.0.101"
PORT = 80
# Checks quick enough to show a withdrawal, and tolerant of a loaded 2-core machine (a probe may take 0.3 s).
HEALTH = ('[vip.health]\nkind = "http"\npath = "/health"\ninterval = 0.3\ntimeout = 0.3\n'
          "rise = 2\nfall = 3\n")
HELD = 40            # keep-alive connections to the maglev VIP
HELD_RR = 30         # and to the rr VIP
NEW = 200            # new connections per round
WITHDRAW_BUDGET = 1.0


# ---- the set-up -------------------------------------------------------------------------------


def balancing_config(lab: EcmpLab) -> str:
    """The part of the config both boxes share, byte for byte: settings, VIPs, backends."""
    text = "[settings]\nhash_seed = 2718281\nring_size = 65537\n\n"
    for vip, algorithm in ((MAGLEV_VIP, "maglev"), (RR_VIP, "rr")):
        text += (f'[[vip]]\naddress = "{vip}"\nport = {PORT}\nprotocol = "tcp"\nalgorithm = "{algorithm}"\n'
                 f'forwarding = "dsr"\nannounce = "bgp"\n{HEALTH}')
        text += "".join(f'[[vip.backend]]\naddress = "{lab.addr(b)}"\nweight = {i + 1}\n'
                        for i, b in enumerate(lab.backend_names))
        text += "\n"
    return text


class Boxes:
    """``fastlb attach`` in each box's namespace, and what the test reads from them."""

    def __init__(self, lab: EcmpLab):
        self.lab = lab
        self.shared = balancing_config(lab)
        self.configs = {}
        for box in BOXES:
            path = lab.run_dir / f"{box}.toml"
            path.write_text(self.shared + lab.bgp_table(box, detach_delay=1.0))
            self.configs[box] = path
        self.running: dict[str, lb_process.Balancer] = {}

    def attach(self, *boxes: str) -> None:
        with ThreadPoolExecutor(len(boxes)) as pool:  # BCC compiles at each attach: do them side by side
            started = list(pool.map(lambda b: lb_process.start(self.lab, self.configs[b], self.log(b), role=b),
                                    boxes))
        self.running.update(zip(boxes, started))

    def log(self, box: str):
        return self.lab.run_dir / f"{box}-fastlb.log"

    def stop(self, box: str) -> None:
        lb_process.stop(self.lab, self.running.pop(box), role=box)

    def fastlb(self, box: str, *args, check: bool = True) -> subprocess.CompletedProcess:
        return self.lab.run(box, lb_process.fastlb_argv(*args), timeout=60, check=check, env=python_env())

    def status(self, box: str) -> dict:
        data = lb_process.status(self.lab, role=box)
        return data[0] if data else {}

    def counters(self, box: str) -> str:
        """The box's non-zero reasons and events, for failure messages."""
        att = self.status(box)
        reasons = {k: r["packets"] for k, r in att.get("reasons", {}).items() if r["packets"]}
        events = {k: v for k, v in att.get("events", {}).items() if v}
        return f"{box}: reasons {reasons} events {events}"

    def new_flows(self, box: str) -> int:
        att = self.status(box)
        return sum(v["new_flows"] for v in att.get("vips", []) if v["vip"].startswith(MAGLEV_VIP + ":"))

    def conntrack(self, box: str) -> dict[tuple[str, int], str]:
        """(VIP, client port) -> backend address, from the box's conntrack."""
        res = self.fastlb(box, "flows", "list", "--json", check=False)
        if res.returncode != 0:
            return {}
        out = {}
        for f in json.loads(res.stdout)["flows"]:
            host, port = f["client"].rsplit(":", 1)
            out[(f["vip"].split(":")[0], int(port))] = f["backend"].rsplit(":", 1)[0]
        return out

    def wait_all_up(self, timeout: float = 15.0) -> None:
        """Until every box's checks say every backend is up: the boxes' rings agree again."""
        deadline = time.monotonic() + timeout
        while True:
            views = {}
            for box in BOXES:
                data = json.loads(self.fastlb(box, "stats", "--json").stdout)
                views[box] = {(v["vip"], b["backend"]): b.get("health") for att in data for v in att["vips"]
                              for b in v["backends"]}
            if all(h == "up" for view in views.values() for h in view.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not every backend is up on every box after {timeout:g} s: {views}")
            time.sleep(0.1)

    def events(self, box: str, name: str) -> list[dict]:
        """The controller's log lines of one event, as dicts (its whole log: every attach of the run)."""
        out = []
        for line in self.log(box).read_text().splitlines():
            if f"event={name} " in line or line.endswith(f"event={name}"):
                out.append(dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)))
        return out


class Holder:
    """Keep-alive HTTP connections held open from the client (``clients.py hold --requests``)."""

    def __init__(self, lab: EcmpLab, vip: str, count: int):
        self.vip = vip
        self.proc = lab.exec_python("client", "fastlb.lab.client_worker", "hold", "--host", vip, "--port", PORT,
                                    "--count", count, "--requests", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
        first = json.loads(self.proc.stdout.readline())
        assert first == {"held": count}, first

    def detail(self) -> dict[int, tuple[str | None, str | None]]:
        """Client port -> (backend name that answered a GET now, error)."""
        self.proc.stdin.write("detail\n")
        self.proc.stdin.flush()
        rows = json.loads(self.proc.stdout.readline())["connections"]
        return {r["port"]: (r["backend"], r["error"]) for r in rows}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


def wait_nexthops(lab: EcmpLab, vip: str, want: set[str], timeout: float = 15.0) -> float:
    return lab.wait_nexthops(vip, want, timeout, explain=lambda: diagnose(lab))


def diagnose(lab: EcmpLab) -> str:
    """What the router and each box's BIRD and fastlb say, for a failure message."""
    out = []
    for name, b in lab.birds.items():
        for cmd in (("show", "protocols", "all"), ("show", "route", "all")):
            out.append(f"--- {name}: birdc {' '.join(cmd)}\n" + b.birdc(*cmd, check=False))
        out.append(f"--- {name}: BIRD's log\n" + "\n".join(b.log.read_text(errors="replace").splitlines()[-30:]))
    for box in BOXES:
        include = lab.run_dir / f"{box}.d" / "eth0.conf"
        out.append(f"--- {include}\n" + (include.read_text() if include.exists() else "(none)"))
        log = lab.run_dir / f"{box}-fastlb.log"
        out.append(f"--- {log}\n" + ("\n".join(log.read_text().splitlines()[-30:]) if log.exists() else "(none)"))
    return "\n".join(out)


def router_counters(lab: EcmpLab, box: str) -> dict[str, int]:
    """Updates and withdraws the router received from ``box`` (BIRD's channel statistics)."""
    text = lab.birds["router"].birdc("show", "protocols", "all", box)
    out = {}
    for key in ("Import updates", "Import withdraws"):
        m = re.search(rf"{key}:\s+(\d+)", text)
        out[key] = int(m[1])
    return out


def counted(new_flows, connections: int) -> bool:
    """The boxes' new-flow counters account for the connections, each seen by one box only.

    A connection whose 4-tuple repeats an earlier one still in a box's
    conntrack (the client reuses a source port) is a conntrack hit there,
    not a new flow: allow a few.
    """
    return connections * 0.95 <= sum(new_flows) <= connections


def addr_of(lab: EcmpLab) -> dict[str, str]:
    return {b: lab.addr(b) for b in lab.backend_names}


def explained(config, vip: str, port: int) -> tuple[str, str]:
    """(the new-flow pick, the ring slot's backend) for client port ``port``: the model, in process."""
    v = config.find_vip(f"{vip}:{PORT}/tcp")
    e = model.explain(config, v, "198.18.1.1", port)
    return e.backend, e.ring_backend


# ---- the fixture --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab():
    with EcmpLab(backends=3) as lab:
        lab.add_vip(RR_VIP)
        yield lab


@pytest.fixture(scope="module")
def boxes(lab):
    b = Boxes(lab)
    try:
        b.attach(*BOXES)
        yield b
    finally:
        for box in list(b.running):
            b.stop(box)


# ---- the tests ------------------------------------------------------------------------------------


def test_two_boxes_share_the_vips_and_flows_survive_losing_and_adding_a_box(lab, boxes):
    both = {lab.addr(b) for b in BOXES}
    took = wait_nexthops(lab, MAGLEV_VIP, both)
    wait_nexthops(lab, RR_VIP, both)
    boxes.wait_all_up()
    print(f"\nboth boxes announced; two-way multipath route {took:.2f} s after the second attach")
    for box in BOXES:
        text = boxes.configs[box].read_text()
        assert text.startswith(boxes.shared) and "[[vip]]" not in text[len(boxes.shared):]
        st = boxes.status(box)
        assert st["bgp"]["peers"][0]["state"] == "Established", st["bgp"]
        assert {v["vip"]: v["bgp"]["state"] for v in st["vips"]} == {
            f"{MAGLEV_VIP}:80/tcp": "announced", f"{RR_VIP}:80/tcp": "announced"}
        out = boxes.fastlb(box, "status").stdout
        assert "bgp: announced 198.19.0.100/32" in out and "Established" in out, out

    # New connections spread over both boxes, all succeed, and both boxes pick alike.
    configs = [load_config(boxes.configs[box]) for box in BOXES]
    assert len({dataclasses.replace(c, bgp=None, path=None) for c in configs}) == 1
    config = configs[0]
    before = {box: boxes.new_flows(box) for box in BOXES}
    counts = tcp_requests(lab, MAGLEV_VIP, PORT, count=NEW)
    share = {box: boxes.new_flows(box) - before[box] for box in BOXES}
    print(f"{NEW} new connections: backends {dict(counts)}; boxes {share}")
    assert sum(counts.values()) == NEW
    assert counted(share.values(), NEW), (share, [boxes.counters(b) for b in BOXES])
    assert min(share.values()) >= NEW // 4, share
    addr = addr_of(lab)
    for box in BOXES:
        picked = {p: b for (vip, p), b in boxes.conntrack(box).items() if vip == MAGLEV_VIP}
        assert len(picked) >= share[box]
        wrong = {p: b for p, b in picked.items() if b != explained(config, MAGLEV_VIP, p)[0]}
        assert not wrong, f"{box} picked otherwise than explain for {wrong}"
    sample = sorted(p for (vip, p) in boxes.conntrack("lba") if vip == MAGLEV_VIP)[:2]
    for port in sample:
        answers = {box: json.loads(boxes.fastlb(box, "explain", "-c", str(boxes.configs[box]), "--vip",
                                                f"{MAGLEV_VIP}:80/tcp", "--src", f"198.18.1.1:{port}",
                                                "--json").stdout)["backend"] for box in BOXES}
        assert set(answers.values()) == {explained(config, MAGLEV_VIP, port)[0]}, answers

    # Hold keep-alive connections; learn which box each one crosses.
    maglev = Holder(lab, MAGLEV_VIP, HELD)
    rr = Holder(lab, RR_VIP, HELD_RR)
    try:
        before_m, before_r = maglev.detail(), rr.detail()
        assert all(err is None for _, err in [*before_m.values(), *before_r.values()])
        ct = {box: boxes.conntrack(box) for box in BOXES}
        via = {}
        for vip, held in ((MAGLEV_VIP, before_m), (RR_VIP, before_r)):
            for port, (backend, _) in held.items():
                on = [box for box in BOXES if (vip, port) in ct[box]]
                assert len(on) == 1, f"{vip} client port {port} is in the conntrack of {on}"
                assert ct[on[0]][(vip, port)] == addr[backend]
                via[(vip, port)] = on[0]
        through_a = [k for k, box in via.items() if box == "lba"]
        m_through_a = [p for v, p in through_a if v == MAGLEV_VIP]
        assert m_through_a and len(m_through_a) < HELD, "ECMP put every held connection on one box"

        # Box A detaches: its routes go first, measured in the router's table.
        sent, sent_wall = time.monotonic(), time.time()
        boxes.running["lba"]._proc.send_signal(signal.SIGTERM)
        wait_nexthops(lab, MAGLEV_VIP, {lab.addr("lbb")}, timeout=10)
        withdrawn = time.monotonic() - sent
        wait_nexthops(lab, RR_VIP, {lab.addr("lbb")}, timeout=10)
        boxes.stop("lba")
        said = boxes.events("lba", "bgp_withdrawn_for_detach")
        assert said, "the controller did not say it withdrew"
        logged = datetime.fromisoformat(said[-1]["ts"].replace("Z", "+00:00")).timestamp() - sent_wall
        print(f"detach A: the router's route lost A {withdrawn * 1000:.0f} ms after the SIGTERM "
              f"(A's controller logged its withdrawal at +{logged * 1000:.0f} ms)")
        assert withdrawn <= WITHDRAW_BUDGET

        # Connections held through A now reach B, on the same backend (maglev: every one of them).
        after_m, after_r = maglev.detail(), rr.detail()
        survived = [p for p in m_through_a if after_m[p] == before_m[p]]
        print(f"maglev: {len(survived)}/{len(m_through_a)} connections held through A survived on B "
              f"({100 * len(survived) / len(m_through_a):.0f} %); all {HELD} held: "
              f"{sum(1 for p in after_m if after_m[p] == before_m[p])}/{HELD}")
        assert after_m == before_m, {p: (before_m[p], after_m[p]) for p in after_m if after_m[p] != before_m[p]}
        # rr: a connection moved to B survives exactly when its ring slot names its rr backend.
        r_through_a = [p for v, p in through_a if v == RR_VIP]
        expect = {p: explained(config, RR_VIP, p)[1] == addr[before_r[p][0]] for p in r_through_a}
        got = {p: after_r[p] == before_r[p] for p in r_through_a}
        print(f"rr: {sum(got.values())}/{len(r_through_a)} connections held through A survived on B; "
              f"the ring predicted {sum(expect.values())}")
        assert got == expect
        assert all(after_r[p] == before_r[p] for v, p in via if v == RR_VIP and via[(v, p)] == "lbb")

        # New connections all succeed, all through B.
        b_before = boxes.new_flows("lbb")
        counts = tcp_requests(lab, MAGLEV_VIP, PORT, count=NEW // 2)
        assert sum(counts.values()) == NEW // 2
        assert counted([boxes.new_flows("lbb") - b_before], NEW // 2), boxes.counters("lbb")

        # A comes back: announced again, and its share returns.
        start = time.monotonic()
        boxes.attach("lba")
        back = wait_nexthops(lab, MAGLEV_VIP, both)
        print(f"re-attach A: announced again, two-way route {back:.2f} s after its attach returned "
              f"({time.monotonic() - start:.1f} s with the compile)")
        before = {box: boxes.new_flows(box) for box in BOXES}
        counts = tcp_requests(lab, MAGLEV_VIP, PORT, count=NEW)
        share = {box: boxes.new_flows(box) - before[box] for box in BOXES}
        print(f"{NEW} new connections after A's return: boxes {share}")
        assert sum(counts.values()) == NEW
        assert counted(share.values(), NEW), (share, [boxes.counters(b) for b in BOXES])
        assert share["lba"] >= NEW // 4, share
        # The maglev connections moved back to A (no conntrack there) are still on their backends.
        again = maglev.detail()
        assert again == before_m, {p: (before_m[p], again[p]) for p in again if again[p] != before_m[p]}
    finally:
        maglev.close()
        rr.close()


def test_a_killed_controller_and_its_restart_withdraw_nothing(lab, boxes):
    both = {lab.addr(b) for b in BOXES}
    wait_nexthops(lab, MAGLEV_VIP, both)
    counters = router_counters(lab, "lbb")
    bal = boxes.running.pop("lbb")
    seen: list[set[str]] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(lab.router_nexthops(MAGLEV_VIP))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        bal._proc.kill()                      # SIGKILL: nothing runs at exit
        bal._proc.wait(10)
        counts = tcp_requests(lab, MAGLEV_VIP, PORT, count=50)   # the pinned data plane goes on
        assert sum(counts.values()) == 50
        boxes.attach("lbb")                   # adopts the running attachment
        time.sleep(0.5)
    finally:
        done.set()
        watcher.join()
    assert router_counters(lab, "lbb") == counters, "the router heard from B while its controller restarted"
    assert all(hops == both for hops in seen), [h for h in seen if h != both][:3]
    assert "adopted the running attachment" in boxes.log("lbb").read_text()
    print(f"\nkill -9 and restart of B's controller: {len(seen)} looks at the router's route, all two-way; "
          f"BIRD's counters for B unchanged ({counters})")


def test_the_last_healthy_backend_failing_withdraws_the_vip_within_a_second(lab, boxes):
    both = {lab.addr(b) for b in BOXES}
    wait_nexthops(lab, MAGLEV_VIP, both)
    gone_at: dict[str, float] = {}
    try:
        for b in lab.backend_names:
            lab.stop_server(b)
        deadline = time.monotonic() + 10
        while len(gone_at) < len(BOXES) and time.monotonic() < deadline:
            hops = lab.router_nexthops(MAGLEV_VIP)
            for box in BOXES:
                if lab.addr(box) not in hops:
                    gone_at.setdefault(box, time.time())
            time.sleep(0.005)
        assert set(gone_at) == set(BOXES), f"still announced by {set(BOXES) - set(gone_at)}"
        for box in BOXES:
            last_down = max(datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
                            for e in boxes.events(box, "backend_down") if e["vip"] == f"{MAGLEV_VIP}:80/tcp")
            withdrawn = [e for e in boxes.events(box, "route_withdrawn") if e["route"] == f"{MAGLEV_VIP}/32"]
            assert withdrawn and "no healthy backend" in withdrawn[-1]["why"], withdrawn
            lag = gone_at[box] - last_down
            print(f"\n{box}: its last backend marked down -> its route gone from the router: {lag * 1000:.0f} ms")
            assert 0 < lag <= WITHDRAW_BUDGET
            states = {v["vip"]: v["bgp"]["state"] for v in boxes.status(box)["vips"]}
            assert states[f"{MAGLEV_VIP}:80/tcp"] == "withdrawn", states
    finally:
        lab.start_servers()
    wait_nexthops(lab, MAGLEV_VIP, both, timeout=15)
    boxes.wait_all_up()
    assert sum(tcp_requests(lab, MAGLEV_VIP, PORT, count=20).values()) == 20


def test_a_box_that_goes_dark_is_withdrawn_by_bfd(lab, boxes):
    both = {lab.addr(b) for b in BOXES}
    wait_nexthops(lab, MAGLEV_VIP, both)
    boxes.wait_all_up()   # boxes that disagree on health build different rings (docs/SCALEOUT.md)
    held = Holder(lab, MAGLEV_VIP, HELD)
    try:
        before = held.detail()
        on_a = [p for (vip, p) in boxes.conntrack("lba") if vip == MAGLEV_VIP and p in before]
        start = time.monotonic()
        lab.run("lba", ["ip", "link", "set", "eth0", "down"])   # no goodbye: only BFD can tell
        wait_nexthops(lab, MAGLEV_VIP, {lab.addr("lbb")}, timeout=10)
        took = time.monotonic() - start
        after = held.detail()
        print(f"\nbox A dark: withdrawn by BFD after {took * 1000:.0f} ms; "
              f"{sum(1 for p in on_a if after[p] == before[p])}/{len(on_a)} connections held through A survived")
        assert took <= WITHDRAW_BUDGET
        assert "BFD session down" in lab.birds["router"].birdc("show", "protocols", "all", "lba")
        assert after == before
    finally:
        held.close()
        lab.run("lba", ["ip", "link", "set", "eth0", "up"])
    wait_nexthops(lab, MAGLEV_VIP, both, timeout=30)


def test_fastlb_detach_after_a_dead_controller_withdraws_first(lab, boxes):
    """No controller runs (it was killed); ``fastlb detach`` withdraws the routes, waits, then detaches."""
    both = {lab.addr(b) for b in BOXES}
    wait_nexthops(lab, MAGLEV_VIP, both, timeout=30)
    bal = boxes.running.pop("lba")
    bal._proc.kill()
    bal._proc.wait(10)
    assert lab.router_nexthops(MAGLEV_VIP) == both        # a dead controller withdraws nothing
    detach = lab.exec("lba", lb_process.fastlb_argv("detach", "eth0"), env=python_env(), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    sent = time.monotonic()
    wait_nexthops(lab, MAGLEV_VIP, {lab.addr("lbb")}, timeout=10)
    withdrawn = time.monotonic() - sent
    out, err = detach.communicate(timeout=30)
    took = time.monotonic() - sent
    print(f"\nfastlb detach with no controller: route gone {withdrawn * 1000:.0f} ms after the command started; "
          f"detached after {took:.1f} s (detach_delay 1 s)")
    assert detach.returncode == 0, err
    assert "withdrew 198.19.0.100/32, 198.19.0.101/32" in out and "detached from eth0" in out, out
    assert withdrawn <= WITHDRAW_BUDGET        # starting the command (Python, imports) included
    assert took >= 1.0                          # detach_delay: the program stayed attached meanwhile
    assert boxes.status("lba") == {}
    boxes.attach("lba")
    wait_nexthops(lab, MAGLEV_VIP, both)
