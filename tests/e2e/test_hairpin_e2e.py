"""Hairpinning with real peers through ``vpnmasq run``, in both modes (issues 2 and 8): LAN
hosts reach a LAN server published with ``[[forward]]`` through the public address.

* PPTP (hairpin for VPN protocols): PoPToP on srv (10.77.0.5), published with
  ``tcp 1723`` + ``gre``; pptp-linux on h1 and h2 dials 198.51.100.1 while h3 calls the
  PoPToP on r1. Every call's frames come back verified, PoPToP on srv sees the calls come
  from the public address, and nothing of the hairpinned calls appears on wan0.
* IPsec: strongSwan (kernel-libipsec) responder on srv behind ``udp 500`` +
  ``udp 4500``, initiator on h1 dialing 198.51.100.1: NAT is detected, ESP runs in UDP 4500
  and hairpins as UDP (raw ESP cannot: the engine refuses it, see Engine._hairpin).
* TCP and UDP: the lab's echo servers on srv behind ``tcp 8080 -> 7`` and ``udp 5353``.

Topology (``vtopo``): h1 10.77.0.11, h2 .12, h3 .13, srv 10.77.0.5 -- gw (lan0 10.77.0.1,
wan0 198.51.100.1, vpnmasq) -- r1 198.51.100.20, r2 198.51.100.21.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vpnmasq_lab.pcap import PROTO_GRE, read_ipv4
from vpnmasq_lab.pptp_client import PptpClient
from vpnmasq_lab.pptp_server import PptpServer
from vpnmasq_lab.strongswan import CHARON, Charon, IpsecResponder, initiator_conf
from vpnmasq_lab.topology import GW_WAN_IP, LAN_SERVER_IP, Topology

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

T = TypeVar("T")
R = TypeVar("R")
PPTP_FORWARDS = [
    {"protocol": "tcp", "port": 1723, "to": LAN_SERVER_IP},
    {"protocol": "gre", "to": LAN_SERVER_IP},
]


def _parallel(fn: Callable[[T], R], items: list[T]) -> list[R]:
    with ThreadPoolExecutor(max(1, len(items))) as ex:
        return list(ex.map(fn, items))


def test_lan_pptp_clients_call_a_lan_pptp_server_through_the_public_address(
    vtopo: Topology, mode: str, require: Any, tmp_path: Path, record_property: Any
) -> None:
    require("pptpd", "pptp", "/usr/sbin/pptpctrl")
    topo = vtopo
    gw = topo.gateway_vpnmasq(mode, forwards=PPTP_FORWARDS)
    lan_srv = PptpServer(topo, "srv").start()
    out_srv = PptpServer(topo, "r1").start()
    wan_pcap, lan_pcap = tmp_path / "wan0.pcap", tmp_path / "lan0.pcap"
    with (
        topo.capture("gw", "wan0", wan_pcap, "proto gre or tcp port 1723"),
        topo.capture("gw", "lan0", lan_pcap, "proto gre"),
    ):
        hairpin = [PptpClient(topo, h, GW_WAN_IP, token=h).start() for h in ("h1", "h2")]
        outside = PptpClient(topo, "h3", topo.ip("r1"), token="h3").start()
        clients = [*hairpin, outside]
        results = _parallel(lambda c: c.exchange(count=5, timeout=10), clients)
    record_property("pptp", [r.as_dict() for r in results])
    record_property("status", gw.status_text())
    for c, r in zip(clients, results, strict=True):
        assert r.ok, (r.as_dict(), c.stderr(), gw.log_tail())
    # PoPToP on srv: two calls, both from the public address, each stub saw one token
    assert {c["ipparam"] for c in lan_srv.calls()} == {GW_WAN_IP}
    assert len(lan_srv.calls()) == 2 and sorted(lan_srv.tokens()) == ["h1", "h2"]
    assert set(out_srv.tokens()) == {"h3"}
    views = [r.server_views for r in results[:2]]
    assert views[0].isdisjoint(views[1]) and all(v.endswith(f"peer={GW_WAN_IP}") for v in views[0])
    # the table: each hairpinned call has a caller leg (lan-pns) and a server leg (lan-pac)
    control = gw.entries("pptp")
    roles = sorted(e["detail"].get("role") for e in control)
    assert roles == ["lan-pac", "lan-pac", "lan-pns", "lan-pns", "lan-pns"], control
    assert gw.counters().get("hairpin", 0) > 0
    # on the wire: hairpinned PPTP stays on the LAN (wan0 only carries h3's call to r1);
    # srv's GRE goes to the public address and comes from it
    r1 = topo.ip("r1")
    assert {p.src for p in read_ipv4(wan_pcap)} <= {GW_WAN_IP, r1}
    assert {p.dst for p in read_ipv4(wan_pcap)} <= {GW_WAN_IP, r1}
    lan = [p for p in read_ipv4(lan_pcap) if p.proto == PROTO_GRE]
    to_srv = {p.src for p in lan if p.dst == LAN_SERVER_IP}
    from_srv = {p.dst for p in lan if p.src == LAN_SERVER_IP}
    assert to_srv == {GW_WAN_IP} and from_srv == {GW_WAN_IP}, (to_srv, from_srv)
    for c in clients:
        c.stop()
    assert gw.stop() == 0 and gw.rules_removed


def test_lan_ipsec_client_reaches_a_lan_ipsec_server_through_the_public_address(
    vtopo: Topology, mode: str, require: Any, record_property: Any
) -> None:
    require(CHARON, "swanctl")
    topo = vtopo
    gw = topo.gateway_vpnmasq(
        mode,
        forwards=[
            {"protocol": "udp", "port": 500, "to": LAN_SERVER_IP},
            {"protocol": "udp", "port": 4500, "to": LAN_SERVER_IP},
        ],
    )
    srv = IpsecResponder(topo, "srv").start()
    client = Charon(topo, "h1", name="charon-h1-hairpin").start()
    # dial the public address, authenticate the server by its own identity (its LAN address)
    conf = initiator_conf(local_ip=topo.ip("h1"), remote_ip=GW_WAN_IP, inner_net=srv.inner_net)
    client.load(conf.replace(f"id = {GW_WAN_IP}", f"id = {LAN_SERVER_IP}"))
    client.initiate("net", "home", timeout=15)
    py = lambda *a: topo.py("vpnmasq_lab.plain", *a)  # noqa: E731
    echo = topo.run_json("h1", py("udp-echo-client", srv.inner_ip, 7, "--count", 3, "--token", "h1"))
    record_property("udp_through_tunnel", echo)
    record_property("status", gw.status_text())
    assert echo["ok"], (echo, gw.log_tail())
    assert [p.split(":")[0] for p in srv.peers_seen()] == [topo.ip("h1")]  # inner address
    sas = srv.charon.list_sas()
    assert "ESTABLISHED" in sas and "TUNNEL-in-UDP" in sas, sas
    assert f"@ {GW_WAN_IP}[" in sas  # the server's peer: the public address
    natt = gw.entries("natt")
    # one NAT-T mapping for the client's leg, one for the forwarded server's
    assert {e["inside"] for e in natt} == {f"{LAN_SERVER_IP}:4500", f"{topo.ip('h1')}:4500"}, natt
    assert gw.counters().get("hairpin", 0) > 0
    client.stop()
    assert gw.stop() == 0 and gw.rules_removed


def test_lan_hosts_reach_forwarded_tcp_and_udp_servers_through_the_public_address(
    vtopo: Topology, mode: str, record_property: Any
) -> None:
    topo = vtopo
    gw = topo.gateway_vpnmasq(
        mode,
        forwards=[
            {"protocol": "tcp", "port": 8080, "to": LAN_SERVER_IP, "to_port": 7},
            {"protocol": "udp", "port": 5353, "to": LAN_SERVER_IP},
        ],
    )
    py = lambda *a: topo.py("vpnmasq_lab.plain", *a)  # noqa: E731
    tcp = topo.start_json("srv", py("tcp-echo-server", "--port", 7))
    udp = topo.start_json("srv", py("udp-echo-server", "--port", 5353))
    hosts = ["h1", "h2"]

    def traffic(h: str) -> list[dict[str, Any]]:
        return [
            topo.run_json(h, py("tcp-echo-client", GW_WAN_IP, 8080, "--token", h, "--count", 3)),
            topo.run_json(h, py("udp-echo-client", GW_WAN_IP, 5353, "--token", h, "--count", 3)),
        ]

    results = _parallel(traffic, hosts)
    record_property("results", results)
    for per_host in results:
        for r in per_host:
            assert r["ok"], (r, gw.log_tail())
    for server in (tcp, udp):
        peers = [ev["peer"] for ev in server.where(event="peer")]
        assert len(set(peers)) == 2 and all(p.startswith(f"{GW_WAN_IP}:") for p in peers), peers
    assert gw.counters().get("hairpin", 0) >= 2 * 2 * 3
    assert gw.stop() == 0 and gw.rules_removed
