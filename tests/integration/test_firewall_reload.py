"""The admin's firewall reload must not turn vpnmasq off: a PPTP call (control connection on
TCP 1723 + GRE) and a raw-ESP session run through ``vpnmasq run`` while the gateway's
firewall is flushed and reloaded the Debian way, its table deleted, ``iptables -t mangle -F``
and ``iptables-restore`` run. A probe thread keeps sending new LAN flows (UDP, ESP, GRE)
the whole time; a capture on wan0 counts the packets that leave with a LAN source.

Checked for every action, in both modes: vpnmasq's rules come back by themselves, no LAN
source appears on the WAN after that, both sessions still pass, the table is kept and the
restore is logged once and counted. Figures (time to restore, leaks in the window, session
packets before/after) are recorded as properties (``-rP`` / junit) and printed.

With the guard lines of README ("Next to your own firewall") in the admin's nftables.conf,
the window closes: no LAN source leaves at all.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import (
    LAN,
    R1,
    Daemon,
    PptpCall,
    Remote,
    Sniffer,
    esp_exchange,
    gre_v0,
    gw_run,
    sock,
    wait_for,
)

from vpnmasq.datapath import rules
from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns

#: Debian 12's /etc/nftables.conf (a filter table only), as nftables.service loads it
NFTABLES_CONF = """#!/usr/sbin/nft -f
flush ruleset
table inet filter {
	chain input { type filter hook input priority filter; policy accept; }
	chain forward { type filter hook forward priority filter; policy accept; }
	chain output { type filter hook output priority filter; policy accept; }
}
"""
#: the two lines README gives admins for their own nftables.conf (outside_interface and
#: inside_networks of the lab's config)
GUARD_LINES = """table inet vpnmasq_guard { chain postrouting { type filter hook postrouting priority 300; policy accept;
	oifname "wan0" ip saddr { 10.77.0.0/24, 10.88.0.0/24 } drop; }; }
"""
SPI = 0x1001
CALL_ID = 7
#: the firewall changes an admin makes, as shell commands in the gateway. All but the first
#: are one transaction each: the guard lines close their window completely; between the two
#: commands of the first, the admin's own flush has taken the guard away too.
ACTIONS: dict[str, str] = {
    "nft flush ruleset; nft -f nftables.conf": "nft flush ruleset; nft -f {conf}",
    "nft -f nftables.conf": "nft -f {conf}",
    "nft delete table ip vpnmasq": "nft delete table ip vpnmasq",
    "iptables -t mangle -F": "iptables -t mangle -F",
    "iptables-restore": "iptables-restore < {ipt}",
}
SESSION_ROUNDS = 5


class Probes:
    """New LAN flows from h1 (UDP from a fresh port, GRE v0) and h2 (ESP with an SPI no
    one answers), one of each every few ms, until stopped."""

    def __init__(self, topo: Topology) -> None:
        self.udp = [sock(topo, "h1", socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
        self.gre = sock(topo, "h1", socket.AF_INET, socket.SOCK_RAW, 47)
        self.esp = sock(topo, "h2", socket.AF_INET, socket.SOCK_RAW, 50)
        self.sent = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.005):
            try:
                self.udp[i % len(self.udp)].sendto(b"probe", (R1, 9))
                self.gre.sendto(gre_v0(b"probe"), (R1, 0))
                self.esp.sendto(struct.pack("!II", 0x7777, i + 1) + b"probe", (R1, 0))
                self.sent += 3
            except OSError:
                pass
            i += 1

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        for s in [*self.udp, self.gre, self.esp]:
            s.close()


def restored(topo: Topology) -> bool:
    """Both halves of vpnmasq's rules are back: its nft table and its mangle jumps."""
    nft = gw_run(topo, "nft", "list", "table", "ip", rules.NFT_TABLE)
    save = gw_run(topo, "iptables-save", "-t", "mangle").stdout
    return nft.returncode == 0 and "-j VPNMASQ_IN" in save and "-j VPNMASQ_OUT" in save


def sessions(call: PptpCall, topo: Topology) -> tuple[int, int]:
    """(PPTP GRE round trips, ESP round trips) out of SESSION_ROUNDS each, through the same
    call and the same SPI pair."""
    gre = sum(call.gre_roundtrip() is not None for _ in range(SESSION_ROUNDS))
    esp = sum(esp_exchange(topo, "h2", SPI, seq=100 + i) for i in range(SESSION_ROUNDS))
    return gre, esp


def reload_once(
    topo: Topology, d: Daemon, wan: Sniffer, call: PptpCall, name: str, cmd: str
) -> dict[str, Any]:
    """Run one firewall change under probe traffic; the figures, and the checks that hold
    in every case (rules back, nothing leaked after that, both sessions pass)."""
    restores = d.counters().get("rules_restored", 0)
    wan.clear()  # before the probes: it settles once nothing crosses wan0
    probes = Probes(topo)
    try:
        t0 = time.time()  # the clock of the capture's kernel timestamps
        r = gw_run(topo, "sh", "-c", cmd)
        assert r.returncode == 0, r.stderr
        # restored: rules back, and (hybrid) the flows that began in the gap unbound
        wait_for(
            lambda: d.counters().get("rules_restored", 0) > restores,
            f"the restore after {name} to be counted",
        )
        t_seen = time.time()
        assert restored(topo)
        mark = probes.sent
        wait_for(lambda: probes.sent >= mark + 150, "50 more rounds of probes")
    finally:
        probes.close()
    leaked = [p for p in wan.seen if p.outgoing and _in_lan(p.src)]
    leaked_after = [p for p in leaked if p.t > t_seen]
    assert leaked_after == [], (name, leaked_after[:5])
    gre, esp = sessions(call, topo)
    assert (gre, esp) == (SESSION_ROUNDS, SESSION_ROUNDS), (name, gre, esp, d.log()[-3000:])
    return {
        "action": name,
        "restore_s_seen_from_outside": round(t_seen - t0, 3),
        "restore_ms_logged": _logged_ms(d.log()),
        "leaked_in_window": len(leaked),
        "leaked_after_restore": len(leaked_after),
        "probes_sent": probes.sent,
        "pptp_gre_after": gre,
        "esp_after": esp,
    }


def run_reloads(
    topo: Topology, d: Daemon, wan: Sniffer, workdir: Path, *, guarded: bool
) -> list[dict[str, Any]]:
    conf = workdir / "nftables.conf"
    conf.write_text(NFTABLES_CONF + (GUARD_LINES if guarded else ""))
    if guarded:
        assert gw_run(topo, "nft", "-f", str(conf)).returncode == 0  # the admin's boot
        wait_for(lambda: restored(topo), "the rules after loading nftables.conf")
    ipt = workdir / "mangle.rules"  # an admin's saved iptables rules, without vpnmasq's
    ipt.write_text(
        "*mangle\n:PREROUTING ACCEPT [0:0]\n"
        "-A PREROUTING -p tcp --dport 25 -j MARK --set-mark 7\nCOMMIT\n"
    )
    call = PptpCall(topo, "h1", call_id=CALL_ID)
    figures = []
    try:
        before = sessions(call, topo)
        assert before == (SESSION_ROUNDS, SESSION_ROUNDS), before
        assert {"gre", "esp"} <= {e["proto"] for e in d.entries()}
        for name, cmd in ACTIONS.items():
            fig = reload_once(topo, d, wan, call, name, cmd.format(conf=conf, ipt=ipt))
            fig["pptp_gre_before"], fig["esp_before"] = before
            figures.append(fig)
            if guarded and ";" not in cmd:  # one transaction: the guard never went away
                assert fig["leaked_in_window"] == 0, fig
        assert {"gre", "esp"} <= {e["proto"] for e in d.entries()}
    finally:
        call.close()
    return figures


def _in_lan(addr: str) -> bool:
    import ipaddress

    return ipaddress.IPv4Address(addr) in LAN or addr.startswith("10.88.")


def _logged_ms(log: str) -> float | None:
    lines = [ln for ln in log.splitlines() if "re-installed in" in ln]
    if not lines:
        return None
    return float(lines[-1].split("re-installed in ")[1].split(" ms")[0])


def _record(record_property: Callable[[str, object], None], figures: list[dict[str, Any]]) -> None:
    record_property("figures", figures)
    out = os.environ.get("VPNMASQ_FIGURES")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(figures) + "\n")
    print(json.dumps(figures, indent=1))


@pytest.mark.parametrize(
    ("mode", "extra"), [("hybrid", "offload = true\n"), ("userspace", "")], ids=["hybrid", "userspace"]
)
def test_firewall_reloads_are_repaired_and_sessions_carry_on(
    topo: Topology, remote: Remote, wan: Sniffer, workdir: Path, mode: str, extra: str,
    record_property: Callable[[str, object], None],
) -> None:
    d = Daemon(topo, mode, workdir, extra=extra).start()
    try:
        figures = run_reloads(topo, d, wan, workdir, guarded=False)
        for f in figures:
            f["mode"] = mode
        _record(record_property, figures)
        log = d.log()
        warnings = [ln for ln in log.splitlines() if "took vpnmasq's rules away" in ln]
        # one warning per action (nft flush + nft -f of a file that flushes again may be two)
        assert len(ACTIONS) <= len(warnings) <= len(ACTIONS) + 1, warnings
        assert any("removed table ip vpnmasq" in w for w in warnings), warnings
        assert any("emptied iptables mangle chain VPNMASQ_IN" in w for w in warnings), warnings
        if mode == "hybrid":  # the offload maps are in vpnmasq's table: refilled with it
            wait_for(lambda: d.status()["offload"]["elements"] > 0, "the offload maps refilled")
        assert d.counters()["rules_restored"] == len(warnings)
    finally:
        assert d.stop() == 0
    assert not rules.installed(netns=topo.ns("gw"))


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_guard_lines_in_nftables_conf_close_the_window(
    topo: Topology, remote: Remote, wan: Sniffer, workdir: Path, mode: str,
    record_property: Callable[[str, object], None],
) -> None:
    d = Daemon(topo, mode, workdir).start()
    try:
        figures = run_reloads(topo, d, wan, workdir, guarded=True)
        for f in figures:
            f["mode"] = mode
            f["guarded"] = True
        _record(record_property, figures)
    finally:
        assert d.stop() == 0
