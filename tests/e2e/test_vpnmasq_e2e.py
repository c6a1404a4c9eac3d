"""Real VPN peers through ``vpnmasq run``, in both modes (hybrid and userspace).

The same peers as tests/e2e/test_peers_kernel_nat.py, with vpnmasq in the gateway instead of
the kernel's NAT. Each test asserts on what the peers received (echoes verified, nothing of
another client's session delivered) and on what the outside saw (the server's view of the
source, or a capture on wan0). Where the kernel is known to fail, the test here is the
counterpart of the kernel test that asserts the failure (see ``KERNEL_COUNTERPARTS``), so a
regression on either side shows.

Topology (``vtopo``): h1 10.77.0.11, h2 .12, h3 .13, srv 10.77.0.5 -- gw (lan0 10.77.0.1,
wan0 198.51.100.1, vpnmasq) -- r1 198.51.100.20, r2 198.51.100.21.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tests.waiting import ANSWER_TIMEOUT, DEADLINE, wait_until

from vpnmasq_lab.gateway import VpnmasqGateway
from vpnmasq_lab.pcap import PROTO_GRE, PROTO_UDP, read_ipv4
from vpnmasq_lab.pptp_client import PptpClient
from vpnmasq_lab.pptp_server import PptpServer
from vpnmasq_lab.rawpeers import (
    IsakmpServer,
    RawEspServer,
    esp_client_argv,
    run_esp_client,
    run_isakmp_client,
)
from vpnmasq_lab.strongswan import CHARON, IpsecInitiator, IpsecResponder
from vpnmasq_lab.topology import GW_WAN_IP, LAN_SERVER_IP, Topology

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

T = TypeVar("T")
R = TypeVar("R")

#: kernel-NAT test (asserting a known kernel failure) -> its vpnmasq counterpart here
KERNEL_COUNTERPARTS = {
    "test_raw_esp_two_clients_one_remote_kernel_drops_second": (
        "test_raw_esp_three_clients_one_remote"
    ),
    "test_raw_esp_remote_sends_first_kernel_blocks_client": (
        "test_raw_esp_remote_sends_first_is_held_and_does_not_block",
        "test_raw_esp_remote_sends_first_after_ike_reaches_client",
    ),
    "test_isakmp_second_host_source_port_remapped": "test_isakmp_three_hosts_keep_port_500",
    "test_isakmp_remote_sends_first_takes_port_500": "test_isakmp_remote_sends_first_port_500_kept",
    "test_pptp_two_calls_one_control_connection": "test_pptp_two_calls_one_control_connection",
}


def test_every_known_kernel_failure_has_a_vpnmasq_counterpart() -> None:
    kernel_tests = {
        n.name
        for n in ast.parse(Path(__file__).with_name("test_peers_kernel_nat.py").read_text()).body
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    }
    assert set(KERNEL_COUNTERPARTS) <= kernel_tests
    for ours in KERNEL_COUNTERPARTS.values():
        for name in (ours,) if isinstance(ours, str) else ours:
            assert callable(globals().get(name)), name


def _parallel(fn: Callable[[T], R], items: list[T]) -> list[R]:
    with ThreadPoolExecutor(max(1, len(items))) as ex:
        return list(ex.map(fn, items))


def _py(topo: Topology, *args: object) -> list[str]:
    return topo.py("vpnmasq_lab.plain", *args)


# -------------------------------------------------------------------------------- plain
def test_plain_tcp_udp_icmp_two_hosts(vgw: VpnmasqGateway, mode: str, record_property: Any) -> None:
    """ICMP, UDP and TCP from two hosts reach r1 from the public address, echoes verified.
    Userspace mode does it in vpnmasq (entries in its table); hybrid leaves it to the
    kernel's masquerade (conntrack entries, none in vpnmasq's table)."""
    topo = vgw.topo
    r1 = topo.ip("r1")
    udp = topo.start_json("r1", _py(topo, "udp-echo-server", "--port", 7))
    tcp = topo.start_json("r1", _py(topo, "tcp-echo-server", "--port", 7))
    hosts = topo.hosts[:2]

    def traffic(h: str) -> list[dict[str, Any]]:
        return [
            topo.run_json(h, _py(topo, "ping", r1, "--count", 2, "--interval", 0.05)),
            topo.run_json(h, _py(topo, "udp-echo-client", r1, 7, "--token", h, "--count", 3)),
            topo.run_json(h, _py(topo, "tcp-echo-client", r1, 7, "--token", h, "--count", 3)),
        ]

    results = _parallel(traffic, hosts)
    record_property("results", results)
    for per_host in results:
        for r in per_host:
            assert r["ok"], r
    udp_peers = [ev["peer"] for ev in udp.where(event="peer")]
    tcp_peers = [ev["peer"] for ev in tcp.where(event="peer")]
    for peers in (udp_peers, tcp_peers):
        assert len(peers) == 2 and len(set(peers)) == 2
        assert all(p.startswith(f"{GW_WAN_IP}:") for p in peers)
    ours = [e for e in vgw.status()["entries"] if e["remote"].startswith(f"{r1}")]
    plain = [e for e in ours if e["proto"] in ("tcp", "udp", "icmp")]
    ct = [ln for ln in topo.conntrack() if "dport=7 " in ln]
    record_property("vpnmasq_entries", plain)
    record_property("conntrack", ct)
    if mode == "userspace":
        assert {e["proto"] for e in plain} == {"tcp", "udp", "icmp"}
        assert {e["outside"] for e in plain if e["proto"] == "udp"} == set(udp_peers)
        assert not ct
    else:
        assert plain == []
        assert len([ln for ln in ct if ln.startswith("udp")]) == 2


# --------------------------------------------------------------------------------- PPTP
@pytest.fixture
def pptpd_r1(vgw: VpnmasqGateway, require: Any) -> PptpServer:
    require("pptpd", "pptp", "/usr/sbin/pptpctrl")
    return PptpServer(vgw.topo, "r1").start()


def _inbound_gre_call_ids(pcap: Path, server: str) -> set[int]:
    """Call IDs the server put in its GRE towards the public address (captured on wan0)."""
    return {
        p.call_id
        for p in read_ipv4(pcap)
        if p.proto == PROTO_GRE and p.src == server and p.dst == GW_WAN_IP and p.call_id is not None
    }


def test_pptp_three_clients_one_server(
    vgw: VpnmasqGateway, pptpd_r1: PptpServer, tmp_path: Path, record_property: Any
) -> None:
    """Three hosts, one PPTP server: every call verified, no cross-talk, and the Call IDs the
    server uses towards the public address are distinct (status and a wan0 capture agree)."""
    topo = vgw.topo
    pcap = tmp_path / "wan0.pcap"
    with topo.capture("gw", "wan0", pcap, "proto gre"):
        clients = [PptpClient(topo, h, topo.ip("r1"), token=h).start() for h in topo.hosts]
        results = _parallel(lambda c: c.exchange(count=5, timeout=10), clients)
    record_property("pptp", [r.as_dict() for r in results])
    for c, r in zip(clients, results, strict=True):
        assert r.ok, (r.as_dict(), c.stderr())
        assert r.server_views and all(v.endswith(f"peer={GW_WAN_IP}") for v in r.server_views)
    views = [r.server_views for r in results]
    assert all(a.isdisjoint(b) for i, a in enumerate(views) for b in views[i + 1 :])
    calls = pptpd_r1.calls()
    assert len(calls) == 3 and {c["ipparam"] for c in calls} == {GW_WAN_IP}
    assert sorted(pptpd_r1.tokens()) == sorted(topo.hosts)  # each stub saw only its token
    gre = vgw.entries("gre")
    record_property("gre_entries", gre)
    assert sorted(e["inside"] for e in gre) == sorted(topo.ip(h) for h in topo.hosts)
    outside_ids = {int(e["detail"]["call_id_outside"]) for e in gre}
    assert len(outside_ids) == 3
    on_wire = _inbound_gre_call_ids(pcap, topo.ip("r1"))
    record_property("gre_call_ids_on_wan0", sorted(on_wire))
    assert on_wire == outside_ids


def test_pptp_two_calls_one_control_connection(
    vgw: VpnmasqGateway, pptpd_r1: PptpServer, tmp_path: Path, record_property: Any
) -> None:
    """Counterpart of the kernel test of the same name. Two pptp processes share one call
    manager: one control connection, two calls (PoPToP then closes the first call on its
    side, "one call per control connection", so only the second can be exchanged on after).
    The kernel gives both calls the same NAT Call ID and delivers call 2's GRE to call 1.
    vpnmasq gives each call its own outside Call ID: call 2's echoes come back to call 2 and
    nothing of it reaches call 1."""
    topo = vgw.topo
    shared_run = topo.mkdir("pptp-shared-run")
    pcap = tmp_path / "wan0.pcap"
    with topo.capture("gw", "wan0", pcap, "proto gre"):
        c0 = PptpClient(topo, "h1", topo.ip("r1"), token="call0", run_dir=shared_run).start()
        assert c0.wait_up(DEADLINE), c0.result.as_dict()
        c1 = PptpClient(topo, "h1", topo.ip("r1"), token="call1", run_dir=shared_run).start()
        r1 = c1.exchange(count=3, timeout=DEADLINE)
        c0.poll(0.3)
    record_property("call0", c0.result.as_dict())
    record_property("call1", r1.as_dict())
    control = vgw.entries("pptp")
    record_property("pptp_entries", control)
    assert len(control) == 1 and control[0]["detail"].get("calls") == "2"  # one control conn
    assert len(pptpd_r1.calls()) == 2
    assert r1.ok, r1.as_dict()  # the second call works ...
    assert not c0.result.crosstalk  # ... and none of its frames reach the first
    gre = vgw.entries("gre")
    outside_ids = {int(e["detail"]["call_id_outside"]) for e in gre}
    assert len(gre) == 2 and len(outside_ids) == 2
    assert _inbound_gre_call_ids(pcap, topo.ip("r1")) <= outside_ids


def test_lan_pptp_server_forwarded_while_lan_clients_use_outside_server(
    vtopo: Topology, mode: str, require: Any, record_property: Any
) -> None:
    """srv (10.77.0.5) runs PoPToP, published with [[forward]] tcp 1723 + gre; r2 calls it
    through the public address while h1 and h2 call the PoPToP on r1. All three calls work,
    and each server sees only its own clients' frames."""
    require("pptpd", "pptp", "/usr/sbin/pptpctrl")
    topo = vtopo
    gw = topo.gateway_vpnmasq(
        mode,
        forwards=[
            {"protocol": "tcp", "port": 1723, "to": LAN_SERVER_IP},
            {"protocol": "gre", "to": LAN_SERVER_IP},
        ],
    )
    lan_srv = PptpServer(topo, "srv").start()
    out_srv = PptpServer(topo, "r1").start()
    clients = [PptpClient(topo, h, topo.ip("r1"), token=h).start() for h in topo.hosts[:2]]
    inbound = PptpClient(topo, "r2", GW_WAN_IP, token="r2").start()
    results = _parallel(lambda c: c.exchange(count=5, timeout=10), [*clients, inbound])
    record_property("pptp", [r.as_dict() for r in results])
    for c, r in zip([*clients, inbound], results, strict=True):
        assert r.ok, (r.as_dict(), c.stderr(), gw.log_tail())
    assert results[2].server_views == {f"pid={lan_srv.calls()[0]['pid']} peer={topo.ip('r2')}"}
    assert set(lan_srv.tokens()) == {"r2"}
    assert set(out_srv.tokens()) == {"h1", "h2"}
    assert {c["ipparam"] for c in out_srv.calls()} == {GW_WAN_IP}
    roles = {e["detail"].get("role") for e in gw.entries("pptp")}
    assert roles == {"lan-pac", "lan-pns"}


# ------------------------------------------------------------------------------ raw ESP
def test_raw_esp_three_clients_one_remote(
    vgw: VpnmasqGateway, require: Any, record_property: Any
) -> None:
    """Counterpart of test_raw_esp_two_clients_one_remote_kernel_drops_second. Three hosts
    start raw ESP to one remote at the same moment. vpnmasq lets one host's first packets
    through at a time until the remote's reply associates its inbound SPI (the others'
    first packets are held back and retried, HOWTO 6.2), then all three run in parallel:
    every echo verified, no other client's SPI received, SPIs distinct on the outside."""
    require("py:scapy", "py:cryptography")
    topo = vgw.topo
    r1 = topo.ip("r1")
    sas = [(0x1001 + i, 0x2001 + i) for i in range(3)]
    srv = RawEspServer(topo, "r1", sas).start()
    first = _parallel(
        lambda i: run_esp_client(topo, topo.hosts[i], r1, *sas[i], count=5, timeout=8, resend=True),
        [0, 1, 2],
    )
    # steady state: the associations exist now, so nothing needs resending
    again = _parallel(
        lambda i: run_esp_client(topo, topo.hosts[i], r1, *sas[i], count=5, timeout=ANSWER_TIMEOUT),
        [0, 1, 2],
    )
    summary = srv.stop()
    record_property("first", first)
    record_property("again", again)
    record_property("server", summary)
    for r in first + again:
        assert r["ok"] and r["echo_src"] == GW_WAN_IP, r
        assert not r["foreign"] and not r["crosstalk"], r
    assert all(r["resent"] == 0 for r in again)
    assert summary["peers"] == {f"{a:#x}": GW_WAN_IP for a, _ in sas}
    assert not summary["unknown_spi"] and summary["bad"] == 0
    esp = vgw.entries("esp")
    record_property("esp_entries", esp)
    by_host = {e["inside"]: (e["detail"]["spi_out"], e["detail"]["spi_in"]) for e in esp}
    assert by_host == {
        topo.ip(h): (f"0x{a:08x}", f"0x{b:08x}") for h, (a, b) in zip(topo.hosts, sas, strict=True)
    }
    assert all(e["detail"]["assoc"] == "established" for e in esp)


def test_raw_esp_remote_sends_first_is_held_and_does_not_block(
    vgw: VpnmasqGateway, require: Any, record_property: Any
) -> None:
    """Counterpart of test_raw_esp_remote_sends_first_kernel_blocks_client, same scenario:
    r1 sends ESP to the public address before any LAN host did. vpnmasq cannot know whose it
    is, so it hands it to nobody (dropped, counted). Unlike the kernel's UNREPLIED entry,
    that blocks nothing: h1's own ESP then works at once."""
    require("py:scapy", "py:cryptography")
    topo = vgw.topo
    srv = RawEspServer(
        topo, "r1", [(0x1001, 0x2001)], send_first=GW_WAN_IP, first_count=2, first_interval=0.1
    ).start()
    srv.jp.wait_for(lambda ev: ev.get("event") == "sent-first" and ev["n"] >= 2, DEADLINE)
    vgw_counters = _wait_counter(vgw, "drop:esp-unassociated", 2)
    r = run_esp_client(topo, "h1", topo.ip("r1"), 0x1001, 0x2001, count=3, timeout=ANSWER_TIMEOUT)
    summary = srv.stop()
    record_property("client", r)
    record_property("counters", vgw_counters)
    assert r["server_first"] == 0  # never handed to a host that cannot be known to want it
    assert r["ok"] and r["verified"] == 3 and summary["received"] == 3


def test_raw_esp_remote_sends_first_after_ike_reaches_client(
    vgw: VpnmasqGateway, require: Any, record_property: Any
) -> None:
    """The IKE signal path: h1 runs ISAKMP Main Mode + Quick Mode with r1 (cleartext
    exchange types tell vpnmasq that h1 is negotiating ESP SAs with r1). r1 then sends ESP
    first, before h1 sent any: vpnmasq gives it to h1, and the exchange continues."""
    require("py:scapy", "py:cryptography")
    topo = vgw.topo
    r1 = topo.ip("r1")
    ike_srv = IsakmpServer(topo, "r1").start()
    ike = run_isakmp_client(topo, "h1", r1, version=1, token="h1", child=1)
    assert ike["ok"] and ike["child_verified"] == 1, ike
    client = topo.start_json(
        "h1",
        esp_client_argv(
            topo, r1, 0x1001, 0x2001, token="h1", count=3, listen_first=5.0, first_wanted=2
        ),
        ready="listening",
    )
    esp_srv = RawEspServer(
        topo, "r1", [(0x1001, 0x2001)], send_first=GW_WAN_IP, first_count=2, first_interval=0.1
    ).start()
    r = client.wait_event("summary", 60)
    summary = esp_srv.stop()
    ike_srv.stop()
    record_property("client", r)
    record_property("server", summary)
    assert r["server_first"] == 2  # the remote's first packets reached h1 ...
    assert r["ok"] and r["verified"] == 3  # ... and its own ESP is echoed
    (esp,) = vgw.entries("esp")
    record_property("esp_entry", esp)
    assert esp["inside"] == topo.ip("h1")
    assert esp["detail"]["how"] == "ike-signal"
    assert esp["detail"]["spi_in"] == "0x00002001" and esp["detail"]["spi_out"] == "0x00001001"


def _wait_counter(
    gw: VpnmasqGateway, key: str, at_least: int, timeout: float = DEADLINE
) -> dict[str, int]:
    def reached() -> dict[str, int] | None:
        c = gw.counters()
        return c if c.get(key, 0) >= at_least else None

    return wait_until(reached, timeout, f"counter {key} >= {at_least}")


# ------------------------------------------------------------------------------- ISAKMP
def test_isakmp_three_hosts_keep_port_500(
    vgw: VpnmasqGateway, tmp_path: Path, record_property: Any
) -> None:
    """Counterpart of test_isakmp_second_host_source_port_remapped. Three hosts send ISAKMP
    (IKEv1, IKEv2, IKEv1) from port 500 to r1:500: on the outside all three keep source port
    500 (the server's view and a wan0 capture), and every cookie comes back to its host."""
    topo = vgw.topo
    r1 = topo.ip("r1")
    srv = IsakmpServer(topo, "r1").start()
    pcap = tmp_path / "wan0.pcap"
    with topo.capture("gw", "wan0", pcap, "udp port 500"):
        results = _parallel(
            lambda hv: run_isakmp_client(topo, hv[0], r1, version=hv[1], token=hv[0], child=1),
            list(zip(topo.hosts, (1, 2, 1), strict=True)),
        )
    peers = srv.peers()
    srv.stop()
    record_property("clients", results)
    record_property("server_saw", peers)
    for r in results:
        assert r["ok"] and not r["crosstalk"], r
        assert r["seen_as"] == f"{GW_WAN_IP}:500"
    assert len({r["icookie"] for r in results}) == 3
    assert peers == {h: f"{GW_WAN_IP}:500" for h in topo.hosts}
    out = [p for p in read_ipv4(pcap) if p.proto == PROTO_UDP and p.dst == r1]
    assert out and {(p.src, p.sport) for p in out} == {(GW_WAN_IP, 500)}
    sessions = vgw.entries("isakmp")
    assert sorted(e["inside"] for e in sessions) == sorted(f"{topo.ip(h)}:500" for h in topo.hosts)
    assert {e["outside"] for e in sessions} == {f"{GW_WAN_IP}:500"}


def test_isakmp_remote_sends_first_port_500_kept(vgw: VpnmasqGateway, record_property: Any) -> None:
    """Counterpart of test_isakmp_remote_sends_first_takes_port_500: r1 sends ISAKMP to
    public:500 before any LAN host talks to it. vpnmasq drops it (no LAN host holds a
    session with r1, no forward), and h1's exchange afterwards still keeps port 500."""
    topo = vgw.topo
    srv = IsakmpServer(topo, "r1", send_first=GW_WAN_IP).start()
    srv.jp.wait_event("sent-first", DEADLINE)
    counters = _wait_counter(vgw, "drop:isakmp-unknown-session", 1)
    r = run_isakmp_client(topo, "h1", topo.ip("r1"), version=1, token="h1")
    peers = srv.peers()
    srv.stop()
    record_property("server_saw", peers)
    record_property("counters", counters)
    assert r["ok"], r
    assert peers["h1"] == f"{GW_WAN_IP}:500"


# ----------------------------------------------------------------------- strongSwan
@pytest.mark.parametrize("version", [2, 1], ids=["ikev2", "ikev1-main"])
def test_strongswan_two_natt_clients_one_remote(
    vgw: VpnmasqGateway, mode: str, version: int, require: Any, record_property: Any
) -> None:
    """strongSwan (kernel-libipsec, NAT-T) on h1 and h2 to one responder on r1: both tunnels
    up, UDP and TCP echoes through them verified, the inner addresses arrive untranslated.
    IKE on port 500 keeps its source port for both hosts (vpnmasq's ISAKMP helper)."""
    require(CHARON, "swanctl")
    topo = vgw.topo
    srv = IpsecResponder(topo, "r1", version=version).start()
    clients = [IpsecInitiator(topo, h, srv).start() for h in topo.hosts[:2]]
    _parallel(lambda c: c.connect(timeout=60), clients)
    record_property("connect_s", [c.connect_s for c in clients])
    udp = _parallel(lambda c: c.udp_echo(count=5), clients)
    tcp = _parallel(lambda c: c.tcp_echo(count=3), clients)
    record_property("udp", udp)
    for r in udp + tcp:
        assert r["ok"], r
    assert sorted(p.split(":")[0] for p in srv.peers_seen()) == ["10.77.0.11", "10.77.0.12"]
    sas = srv.charon.list_sas()
    assert sas.count("ESTABLISHED") == 2 and sas.count("TUNNEL-in-UDP") == 2, sas
    ike = vgw.entries("isakmp")
    record_property("isakmp_entries", ike)
    assert sorted(e["inside"] for e in ike) == ["10.77.0.11:500", "10.77.0.12:500"]
    assert {e["outside"] for e in ike} == {f"{GW_WAN_IP}:500"}
    if mode == "userspace":  # NAT-T (UDP 4500) goes through vpnmasq too, one mapping each
        natt = vgw.entries("natt")
        record_property("natt_entries", natt)
        assert sorted(e["inside"] for e in natt) == ["10.77.0.11:4500", "10.77.0.12:4500"]
        assert len({e["outside"] for e in natt}) == 2


# ----------------------------------------------------------------------------------- AH
def test_ah_refused_with_reason_in_log(vgw: VpnmasqGateway, record_property: Any) -> None:
    """AH cannot be masqueraded (its ICV covers the addresses). vpnmasq drops it rather
    than sending packets the remote must discard, and says why in its log."""
    topo = vgw.topo
    r1 = topo.ip("r1")
    listener = topo.start_json(
        "r1", topo.py("vpnmasq_lab.rawpeers", "raw-listen", "--proto", 51, "--bind", r1)
    )
    sent = topo.run_json("h1", topo.py("vpnmasq_lab.rawpeers", "ah-send", "--dst", r1))
    counters = _wait_counter(vgw, "drop:ah-cannot-be-masqueraded", sent["sent"])
    line = vgw.wait_log(r"ah-cannot-be-masqueraded: LAN host 10\.77\.0\.11 <-> 198\.51\.100\.20")
    listener.stop()
    (heard,) = listener.where(event="summary")
    record_property("counters", counters)
    record_property("log_line", line.string)
    assert heard["received"] == 0
    assert "integrity check covers the IP addresses" in line.string
