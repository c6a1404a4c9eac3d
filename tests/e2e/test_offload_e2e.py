"""The kernel fast path through `vpnmasq run` (offload = true, hybrid mode): once vpnmasq has
associated an ESP SPI pair or a PPTP call, the kernel rewrites later packets itself, and the
table stays the source of truth (traffic is credited back; status shows what is offloaded)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from tests.waiting import ANSWER_TIMEOUT, wait_until

from vpnmasq_lab.pptp_client import PptpClient
from vpnmasq_lab.pptp_server import PptpServer
from vpnmasq_lab.rawpeers import RawEspServer, run_esp_client
from vpnmasq_lab.topology import GW_WAN_IP, Topology


def test_established_esp_and_pptp_are_offloaded_to_the_kernel(vtopo: Topology, require: Any) -> None:
    require("pptpd", "pptp", "py:scapy", "py:cryptography")
    topo = vtopo
    gw = topo.gateway_vpnmasq("hybrid", config_overrides={"offload": True})
    r1 = topo.ip("r1")
    sas = [(0x1001, 0x2001), (0x1002, 0x2002)]
    esp_srv = RawEspServer(topo, "r1", sas).start()
    pptp_srv = PptpServer(topo, "r1").start()
    client = PptpClient(topo, "h3", r1, token="h3").start()
    try:
        for i, (a, b) in enumerate(sas):  # associate (slow path)
            r = run_esp_client(topo, topo.hosts[i], r1, a, b, count=3, timeout=8, resend=True)
            assert r["ok"], r
        assert client.exchange(count=3, timeout=10).ok
        # wait for the sync that moves the associations into the kernel's maps
        offloaded: list[dict[str, Any]] = []

        def synced() -> bool:
            offloaded[:] = [e for e in gw.status()["entries"] if e.get("offloaded")]
            return len({e["proto"] for e in offloaded}) == 2 and len(offloaded) >= 3

        with contextlib.suppress(AssertionError):  # the assertion below says what is missing
            wait_until(synced, what="the offload sync")
        assert {e["proto"] for e in offloaded} == {"esp", "gre"}, gw.status_text()
        queued_before = gw.counters().get("nfq_received", 0)
        # steady state: the kernel forwards; the peers still verify every echo
        for i, (a, b) in enumerate(sas):
            r = run_esp_client(topo, topo.hosts[i], r1, a, b, count=5, timeout=ANSWER_TIMEOUT)
            assert r["ok"] and r["echo_src"] == GW_WAN_IP and not r["crosstalk"], r
        res = client.exchange(count=5, timeout=10)
        assert res.ok and not res.crosstalk
        queued_esp_gre = gw.counters().get("nfq_received", 0) - queued_before
        # PPTP control (TCP 1723) echoes still pass the queue; ESP and GRE data do not
        assert queued_esp_gre < 5, queued_esp_gre  # the slow path would queue >= 30
        # the kernel's per-element counters are credited back at the next sync
        flows: list[dict[str, Any]] = []

        def credited() -> bool:
            flows[:] = gw.status()["offload"]["flows"]
            return sum(f["kernel_pkts_out"] for f in flows) >= 10

        with contextlib.suppress(AssertionError):
            wait_until(credited, what="the kernel's counters credited")
        assert sum(f["kernel_pkts_out"] for f in flows) >= 10, flows
        print("queued during the offloaded phase:", queued_esp_gre)
    finally:
        client.stop()
        esp_srv.stop()
        pptp_srv.stop()
        gw.stop()
    # a clean stop removes the offload maps with the rules
    assert "table ip vpnmasq" not in topo.exec("gw", ["nft", "list", "tables"]).stdout


def test_userspace_mode_offloads_established_tcp_and_udp(vtopo: Topology, require: Any) -> None:
    """Userspace mode with offload = true: after the handshake (through the engine) an
    iperf3 bulk transfer runs in the kernel; the engine saw only its first packets, the
    FINs, and is credited with the rest."""
    require("iperf3")
    topo = vtopo
    gw = topo.gateway_vpnmasq("userspace", config_overrides={"offload": True})
    r1 = topo.ip("r1")
    srv = topo.popen("r1", ["iperf3", "-s", "-1", "-B", r1])
    try:
        topo.wait_listen("r1", 5201)
        before = gw.counters().get("nfq_received", 0)
        r = topo.exec("h1", ["iperf3", "-c", r1, "-t", "2", "-J"], timeout=60)
        report = json.loads(r.stdout)
        segments = report["end"]["sum_sent"]["bytes"] // 1448
        queued = gw.counters().get("nfq_received", 0) - before
        # the slow path would have queued every segment and every ACK
        assert queued < segments / 10, (queued, segments)
        sent = report["end"]["sum_sent"]["bytes"]

        def credited() -> int:  # within a sync interval (or at once, when a read is cheap)
            rows = gw.status()["entries"]
            return sum(e["bytes_out"] for e in rows if e["proto"] == "tcp" and e["remote"].endswith(":5201"))

        wait_until(lambda: credited() >= sent, what="the kernel's bytes credited to the session")
        print(f"queued {queued} packets for {segments} segments;",
              f"{report['end']['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s")
    finally:
        topo.stop(srv)
        gw.stop()
