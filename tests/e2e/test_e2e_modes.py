"""Tunnel and NAT forwarding with real TCP and UDP in a namespace lab.

Tunnel: the backends run `fastlb decap` (no ipip module on these machines)
and keep the VIPs on lo; they answer the client directly. NAT: the backends
serve on other ports with no VIP and no change beyond the LB as their route
to the client (its gateway, as in any NAT deployment).
"""

from __future__ import annotations

import contextlib
import json

import pytest

from fastlb.lab.clients import tcp_requests, udp_by_source, udp_requests
from fastlb.lab.netns import LabError
from fastlb.lab.topology import Lab
from helpers.e2e import attached, run_fastlb

pytestmark = [pytest.mark.root, pytest.mark.netns]

COUNT = 300
TUNNEL_SOURCES = ("198.18.200.0/24", "2001:db8:200::/64")
SETTINGS = f"""[settings]
tunnel_source = "{TUNNEL_SOURCES[0]}"
tunnel_source6 = "{TUNNEL_SOURCES[1]}"
"""


def vip_block(vip, port, proto, mode, backends, bport=None):
    text = f'[[vip]]\naddress = "{vip}"\nport = {port}\nprotocol = "{proto}"\nforwarding = "{mode}"\n'
    for b in backends:
        text += f'[[vip.backend]]\naddress = "{b}"\n' + (f"port = {bport}\n" if bport else "")
    return text + "\n"


def reason_packets(lab, name) -> int:
    res = run_fastlb(lab, "lb", "status", "--json", check=True)
    return json.loads(res.stdout)[0]["reasons"][name]["packets"]


@contextlib.contextmanager
def decap_on(lab, *vips):
    """`fastlb decap` on every backend for the block, for ``vips``, from the LB's tunnel sources."""
    args = [a for v in vips for a in ("--vip", v)] + [a for p in TUNNEL_SOURCES for a in ("--from", p)]
    for b in lab.backend_names:
        run_fastlb(lab, b, "decap", "attach", "eth0", *args, check=True)
    try:
        yield
    finally:
        for b in lab.backend_names:
            run_fastlb(lab, b, "decap", "detach", "eth0")


def spread_ok(lab, counts, total):
    assert sum(counts.values()) == total
    assert set(counts) == set(lab.backend_names), counts


@pytest.fixture(scope="class")
def tunnel_lab(tmp_path_factory):
    config = SETTINGS
    with Lab(backends=3) as lab, decap_on(lab, lab.vip4, lab.vip6):
        for proto, port in (("tcp", 80), ("udp", lab.udp_port)):
            config += vip_block(lab.vip4, port, proto, "tunnel", [lab.addr(b) for b in lab.backend_names])
            config += vip_block(lab.vip6, port, proto, "tunnel", [lab.addr(b, 6) for b in lab.backend_names])
        with attached(lab, tmp_path_factory.mktemp("tun"), config):
            yield lab


class TestTunnel:
    @pytest.fixture
    def lab(self, tunnel_lab):
        return tunnel_lab

    @pytest.mark.parametrize("family", [4, 6])
    def test_tcp(self, lab, family):
        spread_ok(lab, tcp_requests(lab, family=family, count=COUNT), COUNT)

    @pytest.mark.parametrize("family", [4, 6])
    def test_udp(self, lab, family):
        spread_ok(lab, udp_requests(lab, port=lab.udp_port, family=family, count=COUNT), COUNT)

    def test_backends_decapsulated_the_traffic(self, lab):
        for b in lab.backend_names:
            data = json.loads(run_fastlb(lab, b, "decap", "status", "--json", check=True).stdout)
            assert data[0]["attached"] and data[0]["counters"]["ok"] > 0

    def test_a_frame_too_big_once_tunnelled_is_dropped_and_counted(self, lab):
        before = reason_packets(lab, "drop_too_big")
        # 1472 bytes of UDP payload fill a 1500-byte IPv4 packet; 20 more do not fit.
        with pytest.raises(LabError):
            udp_by_source(lab, port=lab.udp_port, count=1, sources=1, size=1472, timeout=0.5)
        assert reason_packets(lab, "drop_too_big") == before + 1
        # A datagram that still fits once tunnelled goes through.
        udp_by_source(lab, port=lab.udp_port, count=1, sources=1, size=1472 - 20, timeout=2)


@pytest.fixture(scope="class")
def tun46_lab(tmp_path_factory):
    with Lab(backends=3) as lab, decap_on(lab, lab.vip4):
        config = SETTINGS + vip_block(lab.vip4, 80, "tcp", "tunnel", [lab.addr(b, 6) for b in lab.backend_names])
        with attached(lab, tmp_path_factory.mktemp("tun46"), config):
            yield lab


class TestTunnelIPv4InIPv6:
    @pytest.fixture
    def lab(self, tun46_lab):
        return tun46_lab

    def test_tcp(self, lab):
        spread_ok(lab, tcp_requests(lab, family=4, count=COUNT), COUNT)


@pytest.fixture(scope="class")
def nat_lab(tmp_path_factory):
    lab = Lab(backends=3)
    lab.http_port = 8080  # plain servers on another port than the VIP's
    with lab:
        for b in lab.backend_names:
            with lab.ipr(b) as ipr:  # the LB is the backends' way to the client
                ipr.route("add", dst=f"{lab.addr('client')}/32", gateway=lab.addr("lb"))
                ipr.route("add", dst=f"{lab.addr('client', 6)}/128", gateway=lab.addr("lb", 6))
        config = ""
        for vip, fam in ((lab.vip4, 4), (lab.vip6, 6)):
            backends = [lab.addr(b, fam) for b in lab.backend_names]
            config += vip_block(vip, 80, "tcp", "nat", backends, bport=8080)
            config += vip_block(vip, lab.udp_port, "udp", "nat", backends)
        for vip in SHARED_NAT_VIPS:  # two NAT VIPs, one backend address:port
            config += vip_block(vip, 80, "tcp", "nat", [lab.addr(lab.backend_names[0])], bport=8080)
        # lrt with no health checks: only the response times the data plane measures steer it
        config += vip_block(LRT_NAT_VIP, 80, "tcp", "nat", [lab.addr(b) for b in lab.backend_names],
                            bport=8080).replace('forwarding = "nat"\n', 'forwarding = "nat"\nalgorithm = "lrt"\n', 1)
        with attached(lab, tmp_path_factory.mktemp("nat"), config):
            yield lab


SHARED_NAT_VIPS = ("198.19.0.110", "198.19.0.111")
LRT_NAT_VIP = "198.19.0.112"

# Run in the client's namespace: one local port, a connection to each VIP from it
# (SO_REUSEADDR on both, as Linux allows toward different destinations), then a
# request on each; prints what each connection got, or its error.
SAME_PORT_CLIENT = """
import json, socket, sys
port, vips, out = int(sys.argv[1]), sys.argv[2:], {}
socks = {}
for vip in vips:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.settimeout(3)
    try:
        s.connect((vip, 80))
        socks[vip] = s
    except OSError as exc:
        out[vip] = "connect: " + str(exc)
for vip, s in socks.items():
    try:
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        out[vip] = data.decode(errors="replace").split("\\r\\n")[0] + " " + data.decode(errors="replace").split("\\r\\n\\r\\n", 1)[-1].strip()
    except OSError as exc:
        out[vip] = "request: " + str(exc)
print(json.dumps(out))
"""


class TestNat:
    @pytest.fixture
    def lab(self, nat_lab):
        return nat_lab

    @pytest.mark.parametrize("family", [4, 6])
    def test_tcp_to_port_80_reaches_servers_on_8080(self, lab, family):
        spread_ok(lab, tcp_requests(lab, family=family, port=80, count=COUNT), COUNT)

    @pytest.mark.parametrize("family", [4, 6])
    def test_udp(self, lab, family):
        spread_ok(lab, udp_requests(lab, port=lab.udp_port, family=family, count=COUNT), COUNT)

    def test_one_client_port_to_two_vips_sharing_a_backend(self, lab):
        """Issue 13 item 2: both connections work, each answered from the VIP it was
        made to (the client's kernel matches replies by the whole 4-tuple), and the
        backend told them apart (netfilter's rule: a clash remaps the source port)."""
        import sys
        res = lab.run("client", [sys.executable, "-c", SAME_PORT_CLIENT, "40555", *SHARED_NAT_VIPS], timeout=30)
        got = json.loads(res.stdout)
        backend = lab.backend_names[0]
        assert got == {vip: f"HTTP/1.1 200 OK {backend}" for vip in SHARED_NAT_VIPS}

    def test_replies_went_back_through_the_lb(self, lab):
        assert reason_packets(lab, "tx_nat_reply") >= 4 * COUNT

    def test_lrt_steers_by_the_response_times_it_measures(self, lab):
        """Issue 16 item 5: nat + lrt and no health checks; b3's server waits 50 ms before it
        answers. The data plane times each connection's first response (request to answer),
        the controller feeds it to lrt, and b3 gets < 15 % of new connections."""
        lab.set_latency("b3", 50)
        try:
            warm = tcp_requests(lab, vip=LRT_NAT_VIP, count=30)   # every backend answers a few
            counts = tcp_requests(lab, vip=LRT_NAT_VIP, count=200)
        finally:
            lab.set_latency("b3", 0)
        print(f"\nnat lrt, b3 50 ms slower, no health checks: warm-up {dict(warm)}, then {dict(counts)}")
        assert sum(counts.values()) == 200 and counts["b3"] < 0.15 * 200, counts


@pytest.fixture(scope="class")
def pmtu_lab(tmp_path_factory):
    with Lab(backends=2) as lab, decap_on(lab, lab.vip4, lab.vip6):
        config = SETTINGS + f'icmp_source = "{lab.addr("lb")}"\nicmp_source6 = "{lab.addr("lb", 6)}"\n'
        config += vip_block(lab.vip4, lab.udp_port, "udp", "tunnel", [lab.addr(b) for b in lab.backend_names])
        config += vip_block(lab.vip6, lab.udp_port, "udp", "tunnel", [lab.addr(b, 6) for b in lab.backend_names])
        with attached(lab, tmp_path_factory.mktemp("pmtu"), config):
            yield lab


class TestTunnelPathMtu:
    """With icmp_source(6) set, a packet too big once tunnelled gets an ICMP error,
    and the client's stack learns the smaller path MTU."""

    @pytest.fixture
    def lab(self, pmtu_lab):
        return pmtu_lab

    @pytest.mark.parametrize("family,payload,learnt", [(4, 1472, 1480), (6, 1452, 1460)])
    def test_the_client_learns_the_path_mtu(self, lab, family, payload, learnt):
        before = reason_packets(lab, "tx_icmp_too_big")
        with pytest.raises(LabError):  # the datagram itself is lost: only the error comes back
            udp_by_source(lab, vip=lab.vip(family), port=lab.udp_port, count=1, sources=1, size=payload,
                          timeout=0.5)
        assert reason_packets(lab, "tx_icmp_too_big") == before + 1
        route = lab.run("client", ["ip", f"-{family}", "route", "get", lab.vip(family)]).stdout
        assert f"mtu {learnt}" in route, route
