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
the window closes: no LAN source leaves at all. They hold through a reload under a flood,
and so does packaging/guard.nft included from nftables.conf (one rule per network: a set of
networks re-created in the reload's transaction matches nothing for an instant).
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
    NFTABLES_CONF,
    R1,
    Daemon,
    PptpCall,
    Remote,
    Seen,
    Sniffer,
    entered,
    esp_exchange,
    gre_v0,
    gw_run,
    sock,
    udp_echo,
    wait_for,
)

from vpnmasq.datapath import rules
from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]


def readme_guard_lines() -> str:
    """The guard lines README ("Next to your own firewall") gives admins for their own
    nftables.conf, as written there (its interface and networks are the lab's)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = text.split("```")[1::2]
    (lines,) = [b.strip("\n") for b in blocks if "table inet vpnmasq_guard" in b]
    return lines + "\n"


GUARD_LINES = readme_guard_lines()
#: the same guard with the networks in one set, as README must not write it
GUARD_WITH_A_SET = """table inet vpnmasq_guard { chain postrouting { type filter hook postrouting priority 300; policy accept;
	oifname "wan0" ip saddr { 10.77.0.0/24, 10.88.0.0/24 } drop; }; }
"""
#: the guards that must hold through reloads of nftables.conf: README's lines, and
#: packaging/guard.nft included (its interface and network are the lab's wan0 and h1's)
GUARDS: dict[str, Callable[[], str]] = {
    "README lines": lambda: GUARD_LINES,
    "packaging/guard.nft": lambda: f'include "{ROOT / "packaging" / "guard.nft"}"\n',
}
FLOOD_RELOADS = 100
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
        self.rounds: list[float] = []  # when each round began (time.time())
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.005):
            self.rounds.append(time.time())
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


class Flood:
    """UDP from h1 to R1, as fast as one thread sends, until closed: one flow, or with
    ``new_flows`` a new socket (a new source port, a new conntrack entry) per packet."""

    def __init__(self, topo: Topology, *, new_flows: bool = False) -> None:
        self.topo = topo
        self.new_flows = new_flows
        self.sent = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        with entered(self.topo, "h1"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            while not self._stop.is_set():
                if self.new_flows:
                    s.close()
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    s.sendto(b"flood", (R1, 9))
                    self.sent += 1
                except OSError:
                    pass
            s.close()

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)


def reloads_under_flood(topo: Topology, wan: Sniffer, conf: Path) -> dict[str, int]:
    """Load ``conf`` in the gateway, then reload it FLOOD_RELOADS times while h1 floods;
    how many LAN-sourced packets left through wan0 (nothing masquerades: each is a leak)."""
    assert gw_run(topo, "nft", "-f", str(conf)).returncode == 0
    wan.clear()
    flood = Flood(topo)
    try:
        mark = flood.sent
        wait_for(lambda: flood.sent > mark + 1000, "the flood to start")
        for _ in range(FLOOD_RELOADS):
            r = gw_run(topo, "nft", "-f", str(conf))
            assert r.returncode == 0, r.stderr
    finally:
        flood.close()
    leaked = [p for p in wan.seen if p.outgoing and _in_lan(p.src)]
    return {"reloads": FLOOD_RELOADS, "flood_packets": flood.sent, "leaked": len(leaked)}


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
        t_done = time.time()
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
        "leaked_first_5": [_summary(p, t0, probes.rounds) for p in leaked[:5]],
        "command_ms": round((t_done - t0) * 1e3, 1),
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


def _summary(p: Seen, t0: float, rounds: list[float]) -> str:
    """One leaked packet: protocol, addresses, when (ms after the command began) and what
    identifies it (ESP SPI and sequence: the probe round; GRE flags and protocol)."""
    ihl = (p.head[0] & 0x0F) * 4 if p.head else 0
    l4 = p.head[ihl:]
    what = f"proto {p.proto}"
    if p.proto in (6, 17):
        what = f"{'tcp' if p.proto == 6 else 'udp'} {p.sport}->{p.dport}"
    elif p.proto == 50 and len(l4) >= 8:
        spi, seq = struct.unpack_from("!II", l4)
        sent = f" sent at {(rounds[seq - 1] - t0) * 1e3:.1f} ms" if 0 < seq <= len(rounds) else ""
        what = f"esp spi {spi:#x} seq {seq}{sent}"
    elif p.proto == 47 and len(l4) >= 4:
        what = f"gre {l4[:8].hex()}"
    return f"{what} {p.src}->{p.dst} at {(p.t - t0) * 1e3:.1f} ms"


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


@pytest.mark.parametrize("guard", list(GUARDS))
def test_guard_holds_through_reloads_under_a_flood(
    topo: Topology, wan: Sniffer, workdir: Path, guard: str,
    record_property: Callable[[str, object], None],
) -> None:
    """The guard (without vpnmasq: nothing masquerades) drops every packet of a LAN flood
    through 100 one-transaction reloads of nftables.conf, which re-create its table. The
    same guard with a set of networks is measured for comparison: the kernel lets a set
    created in the reload's transaction match nothing for an instant."""
    conf = workdir / "nftables.conf"
    conf.write_text(NFTABLES_CONF + GUARDS[guard]())
    fig: dict[str, Any] = {"guard": guard, **reloads_under_flood(topo, wan, conf)}
    if guard == "README lines":
        conf.write_text(NFTABLES_CONF + GUARD_WITH_A_SET)
        fig["leaked_with_a_set_of_networks"] = reloads_under_flood(topo, wan, conf)["leaked"]
    _record(record_property, [fig])
    assert fig["leaked"] == 0, fig


def test_replacing_vpnmasqs_rules_starts_no_flow_unnatted(
    topo: Topology, wan: Sniffer, record_property: Callable[[str, object], None]
) -> None:
    """vpnmasq replaces its own table in one transaction (a restore, a port pool or address
    change, a reload, a handover). New flows from two inside networks start all the while;
    none may leave un-NATed: the masquerade rules name each network, since a set of them
    created by the replacing transaction matches nothing for an instant (a flow starting
    then keeps its null binding for its life)."""
    ns = topo.ns("gw")
    spec = rules.RuleSpec(
        outside_if="wan0", inside_networks=[str(LAN), "10.88.0.0/24"], mode="hybrid"
    )
    rules.install(spec, netns=ns)
    try:
        wan.clear()
        flood = Flood(topo, new_flows=True)
        try:
            mark = flood.sent
            wait_for(lambda: flood.sent > mark + 1000, "the flood to start")
            for _ in range(FLOOD_RELOADS):
                rules.replace(spec, netns=ns)
        finally:
            flood.close()
        leaked = [p for p in wan.seen if p.outgoing and _in_lan(p.src)]
    finally:
        rules.remove(netns=ns)
    fig = {
        "replaces": FLOOD_RELOADS,
        "new_flows": flood.sent,
        "unnatted_packets": len(leaked),
        "unnatted_flows": len({p.sport for p in leaked}),
    }
    _record(record_property, [fig])
    assert leaked == [], fig


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_a_firewall_reload_right_before_a_vpnmasq_reload_is_repaired(
    topo: Topology, remote: Remote, wan: Sniffer, workdir: Path, mode: str
) -> None:
    """What a configuration management run does: the firewall reloaded, then
    ``systemctl reload vpnmasq`` for a changed vpnmasq.toml, in one go. The reload must not
    take the flushed ruleset for its new baseline (then nothing was ever repaired and the
    LAN leaked for good): the rules come back, the new configuration is in force."""
    d = Daemon(topo, mode, workdir).start()
    conf = workdir / "nftables.conf"
    conf.write_text(NFTABLES_CONF)
    try:
        assert udp_echo(topo, "h1")
        d.config_path.write_text(d.config_path.read_text() + "[timeouts]\nudp = 600\n")
        assert d.proc is not None
        cmd = f"nft flush ruleset; nft -f {conf}; kill -HUP {d.proc.pid}"
        assert gw_run(topo, "sh", "-c", cmd).returncode == 0
        wait_for(lambda: "configuration reloaded" in d.log(), "the reload")
        wait_for(lambda: restored(topo), "vpnmasq's rules back")
        assert d.counters()["rules_restored"] >= 1
        assert any("took vpnmasq's rules away" in ln for ln in d.log().splitlines())
        wan.clear()
        assert udp_echo(topo, "h1") and udp_echo(topo, "h2")
        assert [p for p in wan.seen if p.outgoing and _in_lan(p.src)] == []
    finally:
        assert d.stop() == 0
