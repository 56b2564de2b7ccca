"""Tests of the namespace lab (fastlb.lab): topology, servers, clients, clean-up.

The tests marked ``netns``/``root`` build real network namespaces and need
root. Forwarding through the VIP needs the XDP balancer and is tested with it;
here every request goes to a backend's own address, or to the VIP over a route
that bypasses the LB.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
import tomllib

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from fastlb.lab import Lab, LabError, cleanup_stale, http_get, netns, tcp_requests, udp_by_source, udp_requests
from fastlb.lab.topology import MAX_BACKENDS, python_env

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="builds network namespaces: needs root")


def host_links() -> set[str]:
    """Link names in the test process's own (the host's) namespace."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def host_xdp_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if " xdp" in line]


def alive(pid: int) -> bool:
    return netns.process_start_time(pid) is not None


def assert_gone(runid: str, namespaces: list[str], pids: list[int]) -> None:
    """Nothing of the run is left: namespaces, state file, processes."""
    left = set(namespaces) & set(netns.list_namespaces())
    assert not left, f"namespaces left behind: {left}"
    assert not any(n.startswith(f"flb-{runid}-") for n in netns.list_namespaces())
    assert not (netns.STATE_DIR / f"{runid}.json").exists()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "lab processes survived"


@pytest.fixture(scope="module")
def lab():
    """One lab with 3 backends, shared by the tests that only read it."""
    with Lab(backends=3) as shared:
        yield shared


# ---- no root needed --------------------------------------------------------------------


def test_config_text_follows_the_contract():
    lab = Lab(backends=2, runid="unit1")
    cfg = tomllib.loads(lab.config_text(weights={"b2": 3}))
    got = [(v["address"], v["port"], v["protocol"]) for v in cfg["vip"]]
    assert got == [("198.19.0.100", 80, "tcp"), ("198.19.0.100", 9000, "udp"),
                   ("2001:db8:ffff::100", 80, "tcp"), ("2001:db8:ffff::100", 9000, "udp")]
    for vip in cfg["vip"]:
        assert set(vip) == {"address", "port", "protocol", "algorithm", "forwarding", "backend"}
        assert (vip["algorithm"], vip["forwarding"]) == ("maglev", "dsr")
        family = 6 if ":" in vip["address"] else 4
        assert vip["backend"] == [{"address": lab.addr("b1", family), "weight": 1},
                                  {"address": lab.addr("b2", family), "weight": 3}]


def test_config_text_is_accepted_by_the_config_parser():
    from fastlb.config import parse_config

    lab = Lab(backends=3, runid="unit4")
    config = parse_config(lab.config_text(weights={"b3": 2}))
    assert [v.name for v in config.vips] == ["198.19.0.100:80/tcp", "198.19.0.100:9000/udp",
                                             "[2001:db8:ffff::100]:80/tcp",
                                             "[2001:db8:ffff::100]:9000/udp"]
    for vip in config.vips:
        assert [(str(b.address), b.weight) for b in vip.backends] == \
            [(lab.addr(n, vip.family), 2 if n == "b3" else 1) for n in lab.backend_names]


def test_config_text_with_health_checks_is_accepted_by_the_config_parser():
    from fastlb.config import parse_config
    from fastlb.lab.topology import HEALTH_HTTP

    lab = Lab(backends=2, runid="unit7")
    config = parse_config(lab.config_text(health=HEALTH_HTTP))
    for vip in config.vips:  # the UDP VIPs too: their servers share the process
        assert (vip.health.kind, vip.health.port, vip.health.path) == ("http", 80, "/health")
        assert vip.health.interval == HEALTH_HTTP["interval"] and vip.health.fall == HEALTH_HTTP["fall"]
    assert all(vip.health.kind == "none" for vip in parse_config(lab.config_text()).vips)


def test_config_text_ipv4_only_and_choices():
    lab = Lab(backends=3, ipv6=False, runid="unit2")
    cfg = tomllib.loads(lab.config_text(algorithm="wrr", services=(("tcp", 8080),), backends=["b3"]))
    assert cfg == {"vip": [{"address": "198.19.0.100", "port": 8080, "protocol": "tcp",
                            "algorithm": "wrr", "forwarding": "dsr",
                            "backend": [{"address": "198.18.0.13", "weight": 1}]}]}


def test_names_addresses_and_macs():
    lab = Lab(backends=MAX_BACKENDS, runid="abc123")
    assert lab.ns("b7") == "flb-abc123-b7"
    assert lab.roles[:3] == ["switch", "client", "lb"] and lab.backend_names[-1] == f"b{MAX_BACKENDS}"
    assert (lab.addr("client"), lab.addr("lb", 6), lab.addr("b1"), lab.addr("b1", 6)) == \
        ("198.18.0.1", "2001:db8::2", "198.18.0.11", "2001:db8::11")
    assert lab.mac("b1") == "02:00:c6:12:00:0b"
    assert len({lab.mac(h) for h in lab.hosts}) == len(lab.hosts)
    links = [lab.bridge] + [lab.switch_port(h) for h in lab.hosts]
    assert len(set(links)) == len(links)
    assert all(n.startswith("flb-abc123-") and len(n) <= 15 for n in links)  # IFNAMSIZ - 1


@pytest.mark.parametrize("kwargs", [{"backends": 0}, {"backends": MAX_BACKENDS + 1},
                                    {"runid": "UPPER"}, {"runid": "toolong7"}, {"runid": "a/b"}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(LabError, match="Fix:"):
        Lab(**kwargs)


def test_up_needs_root(monkeypatch):
    from fastlb.errors import PrivilegeError

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    lab = Lab(backends=1, runid="unit5")
    with pytest.raises(PrivilegeError, match="sudo"):
        lab.up()
    assert not lab.is_up


def test_unknown_role_is_refused():
    lab = Lab(backends=2, runid="unit3")
    with pytest.raises(LabError, match="b3"):
        lab.ns("b3")
    with pytest.raises(LabError):
        lab.addr("switch")
    with pytest.raises(LabError):
        lab.addr("b1", 5)


# ---- namespaces: build and remove ------------------------------------------------------


@pytest.mark.parametrize("ipv6", [True, False])
@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_up_down_leaves_nothing_behind(ipv6):
    links_before = host_links()
    lab = Lab(backends=2, ipv6=ipv6)
    with lab:
        assert set(lab.namespaces) <= set(netns.list_namespaces())
        state = json.loads((netns.STATE_DIR / f"{lab.runid}.json").read_text())
        assert state["pid"] == os.getpid() and set(state["namespaces"]) == set(lab.namespaces)
        pids = [lab.server_pid(b) for b in lab.backend_names]
        assert all(alive(p) for p in pids)
        # something else running in the lab is removed with it
        pids.append(lab.exec("client", ["sleep", "60"]).pid)
        assert host_links() == links_before, "the lab created links in the host namespace"
    assert not lab.is_up
    assert_gone(lab.runid, lab.namespaces, pids)
    assert host_links() == links_before
    assert not host_xdp_links()
    lab.down()  # a second down() is harmless


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_down_asks_processes_to_exit_before_killing_them(tmp_path):
    """A program in the lab (fastlb attach, say) gets SIGTERM and time to clean up."""
    polite = tmp_path / "polite"
    with Lab(backends=1, servers=False) as lab:
        procs = [
            lab.exec("lb", ["sh", "-c", f"trap 'echo bye > {polite}; exit 0' TERM; "
                                        "while :; do sleep 0.05; done"]),
            lab.exec("client", ["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"]),
        ]
        time.sleep(0.3)  # let the shells set their traps
        start = time.monotonic()
    took = time.monotonic() - start
    assert polite.read_text() == "bye\n"
    assert 3.0 <= took < 10, "the SIGTERM-deaf shell should be SIGKILLed after the 3 s grace"
    for proc in procs:
        proc.wait(5)
    assert_gone(lab.runid, lab.namespaces, [p.pid for p in procs])


@pytest.mark.netns
@pytest.mark.root
@needs_root
@pytest.mark.parametrize("where, error, message", [
    ("_attach_xdp_pass", LabError("injected failure"), "injected failure"),
    ("_configure_host", NetlinkError(errno.EEXIST, "File exists"), "configuring client failed: EEXIST"),
])
def test_failed_up_removes_what_it_built(monkeypatch, where, error, message):
    lab = Lab(backends=1)

    def broken(self, *args):
        raise error

    monkeypatch.setattr(Lab, where, broken)
    with pytest.raises(LabError, match=message):
        lab.up()
    assert not lab.is_up
    assert_gone(lab.runid, lab.namespaces, [])


CRASHING_LAB = """
import json, time
from fastlb.lab import Lab
lab = Lab(backends=2).up()
print(json.dumps({"runid": lab.runid, "namespaces": lab.namespaces,
                  "pids": [lab.server_pid(b) for b in lab.backend_names]}), flush=True)
time.sleep(120)
"""


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_cleanup_stale_removes_a_crashed_lab():
    child = subprocess.Popen([sys.executable, "-c", CRASHING_LAB], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=python_env())
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready, "the child lab did not come up"
        line = child.stdout.readline()
        assert line, child.stderr.read()
        info = json.loads(line)
        with Lab(backends=1) as other:  # a live lab that cleanup_stale must not touch
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            assert set(info["namespaces"]) <= set(netns.list_namespaces())
            assert all(alive(p) for p in info["pids"]), "servers should outlive a SIGKILLed lab"
            removed = cleanup_stale()
            assert set(removed) == set(info["namespaces"])
            assert_gone(info["runid"], info["namespaces"], info["pids"])
            assert set(other.namespaces) <= set(netns.list_namespaces())
            assert tcp_requests(other, other.addr("b1"), 80, count=2) == {"b1": 2}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        cleanup_stale()


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_cleanup_stale_touches_only_listed_namespaces_of_dead_owners():
    dead = subprocess.Popen(["true"])
    dead.wait()
    runid = netns.new_runid()
    ours_unlisted = netns.ns_name(runid, "x")   # our prefix, but in no state file
    foreign = f"notflb-{runid}"                 # listed, but without the run's prefix
    listed = netns.ns_name(runid, "y")          # listed and ours: removed
    try:
        for name in (ours_unlisted, foreign, listed):
            netns.create(name)
        netns.State(runid=runid, pid=dead.pid, start_time=1, namespaces=[foreign, listed]).save()
        assert cleanup_stale() == [listed]
        present = netns.list_namespaces()
        assert ours_unlisted in present and foreign in present and listed not in present
        assert not (netns.STATE_DIR / f"{runid}.json").exists()
    finally:
        for name in (ours_unlisted, foreign, listed):
            netns.destroy(name)
        netns.State(runid=runid, pid=0, start_time=0).remove()


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_a_run_id_in_use_is_refused_and_left_alone():
    with Lab(backends=1) as first:
        second = Lab(backends=1, runid=first.runid)
        with pytest.raises(LabError, match="in use"):
            second.up()
        assert set(first.namespaces) <= set(netns.list_namespaces())
        assert tcp_requests(first, first.addr("b1"), 80, count=1) == {"b1": 1}
    assert_gone(first.runid, first.namespaces, [])


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_two_labs_at_once_have_distinct_names():
    links_before = host_links()
    with Lab(backends=1) as a, Lab(backends=1) as b:
        assert a.runid != b.runid
        assert not set(a.namespaces) & set(b.namespaces)
        links = {lab: set(lab.run("switch", ["ip", "-o", "link", "show"]).stdout.split()) for lab in (a, b)}
        assert a.bridge in links[a] and b.bridge in links[b]
        assert a.bridge not in links[b] and b.bridge not in links[a]
        for lab in (a, b):
            assert tcp_requests(lab, lab.addr("b1"), 80, count=3) == {"b1": 3}
    assert_gone(a.runid, a.namespaces, [])
    assert_gone(b.runid, b.namespaces, [])
    assert host_links() == links_before


# ---- the shared lab: topology as specified ---------------------------------------------


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_hosts_have_their_addresses_and_macs(lab):
    for role in lab.hosts:
        with lab.ipr(role) as ipr:
            eth0 = ipr.link("get", index=ipr.link_lookup(ifname="eth0")[0])[0]
            assert eth0.get("IFLA_ADDRESS") == lab.mac(role)
            addrs = {a.get("IFA_ADDRESS") for a in ipr.get_addr()}
        assert {lab.addr(role, 4), lab.addr(role, 6)} <= addrs
        vips_here = {lab.vip4, lab.vip6} & addrs
        assert vips_here == ({lab.vip4, lab.vip6} if role in lab.backend_names else set()), role


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_switch_port_of_the_lb_has_xdp_pass_and_gro(lab):
    port = lab.switch_port("lb")
    detail = lab.run("switch", ["ip", "-d", "link", "show", "dev", port]).stdout
    assert " xdp " in detail and "prog/xdp id" in detail, detail   # native mode, not xdpgeneric
    assert "generic-receive-offload: on" in lab.run("switch", ["ethtool", "-k", port]).stdout
    other = lab.run("switch", ["ip", "-d", "link", "show", "dev", lab.switch_port("b1")]).stdout
    assert "prog/xdp" not in other


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_client_and_backends_have_tx_checksum_offload_off(lab):
    for role in ["client", *lab.backend_names]:
        features = lab.run(role, ["ethtool", "-k", "eth0"]).stdout
        assert "tx-checksumming: off" in features, role


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_backends_have_the_dsr_sysctls(lab):
    for backend in lab.backend_names:
        for dev in ("all", "default", "eth0"):
            values = lab.run(backend, ["cat", f"/proc/sys/net/ipv4/conf/{dev}/arp_ignore",
                                       f"/proc/sys/net/ipv4/conf/{dev}/arp_announce",
                                       f"/proc/sys/net/ipv4/conf/{dev}/rp_filter"]).stdout.split()
            assert values == ["1", "2", "0"], (backend, dev)


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_client_routes_the_vips_via_the_lb(lab):
    for family, vip in ((4, lab.vip4), (6, lab.vip6)):
        route = lab.run("client", ["ip", f"-{family}", "route", "get", vip]).stdout
        assert f"via {lab.addr('lb', family)} " in route, route


# ---- the shared lab: servers answer ----------------------------------------------------


@pytest.mark.netns
@pytest.mark.root
@needs_root
@pytest.mark.parametrize("family", [4, 6])
def test_tcp_to_each_backend_directly(lab, family):
    for backend in lab.backend_names:
        assert tcp_requests(lab, lab.addr(backend, family), 80, count=5) == {backend: 5}


@pytest.mark.netns
@pytest.mark.root
@needs_root
@pytest.mark.parametrize("family", [4, 6])
def test_udp_echo_to_each_backend_directly(lab, family):
    for backend in lab.backend_names:
        assert udp_requests(lab, lab.addr(backend, family), 9000, count=5) == {backend: 5}
    by_source = udp_by_source(lab, lab.addr("b2", family), 9000, count=6, sources=3)
    assert len(by_source) == 3 and all(c == {"b2": 2} for c in by_source.values())


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_health_endpoint_and_errors(lab):
    assert http_get(lab, lab.addr("b1"), 80, "/health") == "ok"
    with pytest.raises(LabError, match="404"):
        http_get(lab, lab.addr("b1"), 80, "/nothing")
    with pytest.raises(LabError, match="refused"):
        tcp_requests(lab, lab.addr("b1"), 81, count=1)


KEEPALIVE = """
import http.client, sys
conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=2)
names, ports = [], set()
for i in range(3):
    conn.request("GET", "/")
    r = conn.getresponse()
    names.append(r.read().decode().strip())
    assert r.getheader("Connection") is None and conn.sock is not None, "keep-alive expected"
    ports.add(conn.sock.getsockname()[1])
    if i == 0:
        spare = conn.sock.dup()  # outlives http.client's close, to see the server's FIN
assert len(ports) == 1, "the connection was not kept"
conn.request("GET", "/", headers={"Connection": "close"})
r = conn.getresponse()
names.append(r.read().decode().strip())
assert r.getheader("Connection") == "close"
spare.settimeout(2)
assert spare.recv(1) == b"", "the server did not close"
print(" ".join(names))
"""


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_http_keep_alive_and_close(lab):
    out = lab.run("client", [sys.executable, "-c", KEEPALIVE, lab.addr("b3")], timeout=20)
    assert out.stdout.split() == ["b3"] * 4


# ---- labs of their own: changes to servers and routes ----------------------------------


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_latency_stop_and_start():
    with Lab(backends=2, ipv6=False, latency_ms=0) as lab:
        lab.set_latency("b1", 300)
        start = time.monotonic()
        assert tcp_requests(lab, lab.addr("b1"), 80, count=2) == {"b1": 2}
        assert time.monotonic() - start >= 0.6
        lab.set_latency("b1", 0)
        lab.stop_server("b1")
        assert lab.server_pid("b1") is None
        with pytest.raises(LabError, match="request 1/3"):
            tcp_requests(lab, lab.addr("b1"), 80, count=3)
        assert tcp_requests(lab, lab.addr("b2"), 80, count=2) == {"b2": 2}
        lab.start_server("b1")
        assert tcp_requests(lab, lab.addr("b1"), 80, count=2) == {"b1": 2}


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_backend_answers_the_vip_from_the_vip():
    """Bypass the LB with a client route to one backend: DSR answers must come from the VIP."""
    with Lab(backends=2) as lab:
        lab.add_vip("198.19.0.101")
        with lab.ipr("client") as ipr:
            for vip in (lab.vip4, "198.19.0.101"):
                ipr.route("add", dst=f"{vip}/32", gateway=lab.addr("b2", 4))
            ipr.route("add", dst=f"{lab.vip6}/128", gateway=lab.addr("b2", 6))
        for vip in (lab.vip4, lab.vip6, "198.19.0.101"):
            assert tcp_requests(lab, vip, 80, count=3) == {"b2": 3}
            # the client checks that each answer's source is the VIP it asked
            assert udp_requests(lab, vip, 9000, count=3) == {"b2": 3}


RELEASING_LAB = """
import json
from fastlb.lab import Lab
lab = Lab(backends=1, run_dir=True).up()
lab.release()
print(json.dumps({"runid": lab.runid, "namespaces": lab.namespaces,
                  "run_dir": str(lab.run_dir)}), flush=True)
"""


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_a_released_lab_outlives_its_process_until_remove_lab():
    res = subprocess.run([sys.executable, "-c", RELEASING_LAB], capture_output=True, text=True,
                         env=python_env(), timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    state = netns.read_state(info["runid"])
    try:
        assert state is not None and state.persistent and not state.owner_alive()
        assert not state.stale
        assert state.params == {"backends": 1, "ipv6": True}
        assert (netns.STATE_DIR / info["runid"] / "b1.log").is_file()
        cleanup_stale()
        assert set(info["namespaces"]) <= set(netns.list_namespaces())
        lab = Lab.existing(info["runid"])
        assert not lab.is_up and lab.namespaces == info["namespaces"]
        assert tcp_requests(lab, lab.addr("b1"), 80, count=2) == {"b1": 2}
        lab.down()  # does not own it: a no-op
        assert set(info["namespaces"]) <= set(netns.list_namespaces())
    finally:
        removed = netns.remove_lab(state)
    assert set(removed) == set(info["namespaces"])
    assert_gone(info["runid"], info["namespaces"], [])
    assert not os.path.exists(info["run_dir"])
    with pytest.raises(LabError, match="no lab"):
        Lab.existing(info["runid"])


@pytest.mark.netns
@pytest.mark.root
@needs_root
def test_run_dir_holds_the_server_logs_and_goes_with_the_lab():
    with Lab(backends=1, ipv6=False, run_dir=True) as lab:
        assert lab.run_dir == netns.STATE_DIR / lab.runid
        assert json.loads((netns.STATE_DIR / f"{lab.runid}.json").read_text())["run_dir"] == str(lab.run_dir)
        assert (lab.run_dir / "b1.log").is_file()
    assert not lab.run_dir.exists()
    assert_gone(lab.runid, lab.namespaces, [])


def test_a_state_file_naming_a_foreign_folder_is_refused(tmp_path):
    state = netns.State(runid="unit6", pid=0, start_time=0, run_dir=str(tmp_path))
    with pytest.raises(LabError, match="not removing it"):
        netns.remove_run_dir(state)
    assert tmp_path.exists()
