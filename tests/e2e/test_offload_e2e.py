"""The kernel fast path through `vpnmasq run` (offload = true, hybrid mode): once vpnmasq has
associated an ESP SPI pair or a PPTP call, the kernel rewrites later packets itself, and the
table stays the source of truth (traffic is credited back; status shows what is offloaded)."""

from __future__ import annotations

import contextlib
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
    # a clean stop removes the offload table with the rules
    assert "vpnmasq_offload" not in topo.exec("gw", ["nft", "list", "tables"]).stdout
