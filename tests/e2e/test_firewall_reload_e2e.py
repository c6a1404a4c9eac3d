"""A real PPTP call (pptp-linux to PoPToP on r1, PPP frames echoed through the tunnel) and a
raw-ESP session (encrypted, sequence-checked echoes) through ``vpnmasq run`` while the
gateway's firewall is reloaded the Debian way (``nft flush ruleset; nft -f nftables.conf``)
and then ``iptables -t mangle -F``, in both modes. vpnmasq puts its rules back by itself;
after that no LAN-sourced packet appears on wan0 and both sessions carry on (same call, same
SPI pair). Figures (time to restore, leaks, echoes before/after) are recorded as properties.

The namespace test with probe traffic and the guard lines is
tests/integration/test_firewall_reload.py.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest
from tests.waiting import DEADLINE, wait_until

from vpnmasq_lab.gateway import VpnmasqGateway
from vpnmasq_lab.pcap import read_ipv4
from vpnmasq_lab.pptp_client import PptpClient
from vpnmasq_lab.pptp_server import PptpServer
from vpnmasq_lab.rawpeers import RawEspServer, run_esp_client
from vpnmasq_lab.topology import GW_WAN_IP, LAN_NET

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

NFTABLES_CONF = """flush ruleset
table inet filter {
	chain input { type filter hook input priority filter; policy accept; }
	chain forward { type filter hook forward priority filter; policy accept; }
	chain output { type filter hook output priority filter; policy accept; }
}
"""
SA = (0x1001, 0x2001)
ROUNDS = 5


def test_real_pptp_and_esp_survive_firewall_reloads(
    vgw: VpnmasqGateway, mode: str, require: Any, tmp_path: Path, record_property: Any
) -> None:
    require("pptpd", "pptp", "/usr/sbin/pptpctrl", "tcpdump", "py:scapy", "py:cryptography")
    topo = vgw.topo
    r1 = topo.ip("r1")
    conf = topo.mkdir("fw") / "nftables.conf"
    conf.write_text(NFTABLES_CONF)
    PptpServer(topo, "r1").start()
    esp_srv = RawEspServer(topo, "r1", [SA]).start()
    call = PptpClient(topo, "h1", r1, token="h1").start()

    def pptp_round() -> int:
        before = call.result.verified
        call.exchange(count=ROUNDS, timeout=DEADLINE)
        return call.result.verified - before

    def esp_round() -> dict[str, Any]:
        return run_esp_client(topo, "h2", r1, *SA, count=ROUNDS, timeout=8, resend=True)

    try:
        assert call.wait_up(DEADLINE), call.stderr()
        first = esp_round()
        assert first["ok"], first
        figures = []
        pptp_before, esp_before = pptp_round(), esp_round()
        for name, cmd in (
            ("nft flush ruleset; nft -f nftables.conf", f"nft flush ruleset; nft -f {conf}"),
            ("iptables -t mangle -F", "iptables -t mangle -F"),
        ):
            restored = vgw.counters().get("rules_restored", 0)
            pcap = tmp_path / f"wan0-{len(figures)}.pcap"
            with topo.capture("gw", "wan0", pcap):
                t0 = time.time()
                topo.exec("gw", ["sh", "-c", cmd])
                wait_until(
                    lambda r=restored: vgw.counters().get("rules_restored", 0) > r,
                    DEADLINE,
                    f"vpnmasq to restore its rules after {name}",
                )
                t1 = time.time()
                pptp_after, esp_after = pptp_round(), esp_round()
            pkts = read_ipv4(pcap)
            leaked = [p for p in pkts if ipaddress.ip_address(p.src) in LAN_NET]
            fig = {
                "mode": mode,
                "action": name,
                "restore_seen_s": round(t1 - t0, 3),
                "leaked_in_window": len([p for p in leaked if p.ts <= t1]),
                "leaked_after_restore": len([p for p in leaked if p.ts > t1]),
                "pptp_echoes_before_after": [pptp_before, pptp_after],
                "esp_echoes_before_after": [esp_before["verified"], esp_after["verified"]],
                "esp_resent_after": esp_after.get("resent"),
            }
            figures.append(fig)
            assert fig["leaked_after_restore"] == 0, [p for p in leaked if p.ts > t1][:5]
            assert pptp_after >= ROUNDS, (fig, call.stderr())  # + the probe exchange() sends first
            assert esp_after["ok"] and esp_after["echo_src"] == GW_WAN_IP, esp_after
            pptp_before, esp_before = pptp_after, esp_after
        record_property("figures", figures)
        print(figures)
        assert call.proc is not None and call.proc.poll() is None  # the same call throughout
        assert len(vgw.entries("gre")) == 1 and len(vgw.entries("esp")) == 1
    finally:
        call.stop()
        esp_srv.stop()
