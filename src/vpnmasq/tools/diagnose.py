"""``vpnmasq diagnose``: the HOWTO's troubleshooting checklist (its chapter 5), automated.

Two halves, as the rest of vpnmasq:

* :class:`Facts` is everything looked at, gathered once by :func:`gather` (the only code
  here that touches the system: /proc/sys, ``ip -j``, ``iptables-save``, ``nft list
  ruleset``, the daemon's control socket);
* the checks are pure functions ``Facts -> list[Finding]`` (:data:`CHECKS`), tested on
  fixture facts. :func:`run_checks` runs them all; :func:`render` prints one line per
  finding, each saying what to fix.

Design notes, kernel facts and measurements: docs/internals/tools-diagnose.md.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vpnmasq.config import HYBRID_PORT_RANGE, Config, upstream_nat_reason, upstream_nat_warning
from vpnmasq.datapath.rules import (
    NFT_TABLE,
    forward_mark_hint,
    mark_rule_in_ruleset,
    ours_in_ruleset,
)
from vpnmasq.events import Row
from vpnmasq.status import kind_of, rows_from_wire
from vpnmasq.tools.status import format_ago

__all__ = [
    "CHECKS",
    "Facts",
    "Finding",
    "Level",
    "exit_code",
    "gather",
    "render",
    "run_checks",
]

#: Ethernet's MTU; a smaller outside MTU (PPPoE 1492, some DSL/LTE links) needs MSS clamping
ETHERNET_MTU = 1500
#: IPv4 + TCP headers without options: MSS = MTU - 40
TCP_IP_HEADERS = 40


class Level(enum.IntEnum):
    OK = 0
    INFO = 1
    WARN = 2
    FAIL = 3

    @property
    def tag(self) -> str:
        return {0: "ok", 1: "info", 2: "WARN", 3: "FAIL"}[self.value]


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    check: str  # short name: "forwarding", "rp_filter", "host" ...
    message: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> fix: {self.fix}" if self.fix else ""
        return f"[{self.level.tag:>4}] {self.check}: {self.message}{fix}"

    def as_dict(self) -> dict[str, str]:
        return {"level": self.level.tag.lower(), "check": self.check, "message": self.message,
                "fix": self.fix}


@dataclass
class Facts:
    """Everything the checks look at. Missing knowledge is ``None`` (the check says so)."""

    config: Config
    sysctl: dict[str, str] = field(default_factory=dict)  # "net.ipv4.ip_forward" -> "1"
    addresses: dict[str, list[str]] = field(default_factory=dict)  # ifname -> IPv4 addresses
    down: set[str] = field(default_factory=set)  # interfaces that are not administratively up
    mtu: dict[str, int] = field(default_factory=dict)  # ifname -> MTU
    inside_ifaces: list[str] = field(default_factory=list)
    kernel: dict[str, bool | None] = field(default_factory=dict)  # nfqueue, conntrack
    iptables: str | None = None  # iptables-save of every variant, concatenated
    nft: str | None = None  # nft list ruleset
    daemon: dict[str, Any] | None = None  # status payload from the control socket
    daemon_error: str | None = None
    local_consumers: frozenset[str] | None = None  # from datapath.routes
    routes: dict[str, str] = field(default_factory=dict)  # network -> "via X dev Y" present
    host: str | None = None
    is_root: bool = True


CheckFn = Callable[[Facts], list[Finding]]


# ============================================================================ helpers
def _eff_sysctl(f: Facts, name: str, iface: str) -> int | None:
    """rp_filter & co: the kernel uses max(conf/all, conf/<iface>)."""
    vals = [f.sysctl.get(f"net.ipv4.conf.{s}.{name}") for s in ("all", iface)]
    ints = [int(v) for v in vals if v is not None and v.strip().lstrip("-").isdigit()]
    return max(ints) if ints else None


def _rows(f: Facts) -> list[Row]:
    if not f.daemon:
        return []
    try:
        return rows_from_wire(f.daemon.get("entries", []))
    except ValueError:
        return []


def _counters(f: Facts) -> dict[str, int]:
    c = (f.daemon or {}).get("counters", {})
    return {str(k): int(v) for k, v in c.items() if isinstance(v, int)}


def _public(f: Facts) -> list[str]:
    if f.config.public_address:
        return [f.config.public_address]
    return f.addresses.get(f.config.outside_interface, [])


def _nat_rules(f: Facts) -> list[str]:
    """The admin's own masquerade/SNAT rules (iptables nat table, nft outside our table)."""
    found: list[str] = []
    table = None
    for line in (f.iptables or "").splitlines():
        s = line.strip()
        if s.startswith("*"):
            table = s[1:]
        elif table == "nat" and s.startswith("-A POSTROUTING") and re.search(
            r"-j (MASQUERADE|SNAT)\b", s
        ):
            found.append(f"iptables -t nat {s}")
    for tname, body in _nft_tables(f.nft or ""):
        if tname == f"ip {NFT_TABLE}":
            continue
        for s in body:
            if re.search(r"\b(masquerade|snat)\b", s) and "ip6" not in tname:
                found.append(f"nft table {tname}: {s}")
    return found


def _nft_tables(text: str) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    cur: list[str] | None = None
    for raw in text.splitlines():
        s = raw.strip()
        m = re.match(r"^table (\S+ \S+) \{", s)
        if m and not raw.startswith(("\t", " ")):
            cur = []
            out.append((m.group(1), cur))
        elif cur is not None and s:
            cur.append(s)
    return out


def _pptp_helper_rules(f: Facts) -> list[str]:
    found: list[str] = []
    for line in (f.iptables or "").splitlines():
        if "--helper pptp" in line:
            found.append(f"iptables -t raw {line.strip()}")
    for tname, body in _nft_tables(f.nft or ""):
        for s in body:
            if re.search(r'type "pptp"', s):
                found.append(f"nft table {tname}: ct helper of type pptp")
    if f.sysctl.get("net.netfilter.nf_conntrack_helper") == "1":
        found.append("net.netfilter.nf_conntrack_helper = 1 (automatic helper assignment)")
    return found


def _chain_policy_drop(f: Facts, chain: str) -> list[str]:
    """Where the filter ``chain`` (FORWARD/INPUT) drops by default, in iptables or nft."""
    hits: list[str] = []
    table = None
    for line in (f.iptables or "").splitlines():
        s = line.strip()
        if s.startswith("*"):
            table = s[1:]
        elif table == "filter" and s.startswith(f":{chain} ") and s.split()[1] == "DROP":
            hits.append(f"iptables {chain} policy DROP")
        elif (
            table == "filter"
            and s.startswith(f"-A {chain} ")
            and re.search(r"-j (DROP|REJECT)$", s)
            and " -m " not in s
            and " -p " not in s
            and " -s " not in s
            and " -d " not in s
        ):
            hits.append(f"iptables rule '{s}'")
    hook = chain.lower()
    for tname, body in _nft_tables(f.nft or ""):
        for s in body:
            if f"hook {hook} " in s and "policy drop" in s:
                hits.append(f"nft table {tname}: {hook} chain with policy drop")
    return hits


# ============================================================================ checks
def check_daemon(f: Facts) -> list[Finding]:
    sock = f.config.control_socket
    if f.daemon is None:
        return [
            Finding(
                Level.FAIL,
                "daemon",
                f"vpnmasq is not answering on {sock} ({f.daemon_error or 'no answer'}): "
                "nothing is masqueraded by it",
                "start it (systemctl start vpnmasq, or vpnmasq run -c CONFIG) and check its "
                "log (journalctl -u vpnmasq)",
            )
        ]
    out = [Finding(Level.OK, "daemon", f"vpnmasq answers on {sock} "
                   f"({len(f.daemon.get('entries', []))} mappings)")]
    if f.iptables is not None and f.nft is not None and not ours_in_ruleset(f.iptables, f.nft):
        out.append(
            Finding(
                Level.FAIL,
                "rules",
                "vpnmasq runs but none of its netfilter rules (VPNMASQ_* chains) are present; "
                "something flushed the firewall after it started",
                "restart vpnmasq after loading your firewall (order the units: "
                "After=nftables.service iptables.service)",
            )
        )
    return out


def check_forwarding(f: Facts) -> list[Finding]:
    v = f.sysctl.get("net.ipv4.ip_forward")
    if v is None:
        return [Finding(Level.INFO, "forwarding", "could not read net.ipv4.ip_forward")]
    if v.strip() != "1":
        return [
            Finding(
                Level.FAIL,
                "forwarding",
                f"net.ipv4.ip_forward is {v.strip()}: the gateway forwards nothing (HOWTO 5.1 "
                "step 2: plain masquerade must work first)",
                "sysctl -w net.ipv4.ip_forward=1 and set it in /etc/sysctl.d/",
            )
        ]
    return [Finding(Level.OK, "forwarding", "IPv4 forwarding is on")]


def check_rp_filter(f: Facts) -> list[Finding]:
    out: list[Finding] = []
    # strict rp_filter only hurts asymmetric paths: [[route]] networks, tunnels on the gateway
    asym = bool(f.config.routes) or bool(f.local_consumers)
    for iface in [f.config.outside_interface, *f.inside_ifaces]:
        v = _eff_sysctl(f, "rp_filter", iface)
        if v == 1 and asym:
            out.append(
                Finding(
                    Level.WARN,
                    "rp_filter",
                    f"strict reverse-path filtering on {iface} (max of conf/all and "
                    f"conf/{iface} is 1): packets arriving on a path the gateway would not use "
                    "to answer are dropped: [[route]] networks behind a LAN router, tunnels on "
                    "the gateway itself",
                    f"sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{iface}.rp_filter=2 "
                    "(loose)",
                )
            )
    if not out:
        out.append(Finding(Level.OK, "rp_filter", "reverse-path filtering does not get in the way"))
    return out


def check_kernel(f: Facts) -> list[Finding]:
    out: list[Finding] = []
    needs = {
        "nfqueue": ("netfilter queue to userspace (nfnetlink_queue, xt_NFQUEUE)",
                    "modprobe nfnetlink_queue xt_NFQUEUE (CONFIG_NETFILTER_NETLINK_QUEUE, "
                    "CONFIG_NETFILTER_XT_TARGET_NFQUEUE)"),
        "conntrack": ("connection tracking (needed for defragmentation and hybrid mode)",
                      "modprobe nf_conntrack (CONFIG_NF_CONNTRACK)"),
    }
    for key, (what, fix) in needs.items():
        have = f.kernel.get(key)
        if have is False:
            out.append(Finding(Level.FAIL, "kernel", f"missing {what}", fix))
        elif have is None:
            out.append(Finding(Level.INFO, "kernel", f"could not tell whether the kernel has {what}"))
    if not out:
        out.append(Finding(Level.OK, "kernel", "NFQUEUE and conntrack are available"))
    return out


def check_competing_nat(f: Facts) -> list[Finding]:
    if f.iptables is None and f.nft is None:
        return [Finding(Level.INFO, "own-nat", "could not read the firewall (needs root)")]
    rules = _nat_rules(f)
    out: list[Finding] = []
    if rules:
        kr = f.config.kernel_port_range
        pr = f.config.port_range or HYBRID_PORT_RANGE
        how = (
            f"in hybrid mode vpnmasq's own nft table already masquerades ordinary traffic into "
            f"ports {kr.low}-{kr.high}; a second masquerade may hand out ports in vpnmasq's range "
            f"{pr.low}-{pr.high}, whose replies vpnmasq then claims"
            if f.config.mode == "hybrid"
            else "in userspace mode vpnmasq masquerades everything itself; this rule only adds "
            "confusion (it never sees vpnmasq's untracked packets)"
        )
        out.append(
            Finding(
                Level.WARN,
                "own-nat",
                f"your own masquerade/SNAT rule competes with vpnmasq: {rules[0]}"
                + (f" (+{len(rules) - 1} more)" if len(rules) > 1 else "")
                + f"; {how}",
                "remove it (vpnmasq does the masquerading), or limit it to other source networks",
            )
        )
    helpers = _pptp_helper_rules(f)
    if helpers:
        out.append(
            Finding(
                Level.WARN,
                "pptp-helper",
                f"the kernel's PPTP helper is assigned ({helpers[0]}): it rewrites Call IDs "
                "of flows vpnmasq does not own and allows one call per control connection; "
                "vpnmasq translates PPTP itself",
                "remove the ct helper / CT --helper pptp rule",
            )
        )
    if not out:
        out.append(Finding(Level.OK, "own-nat", "no competing masquerade or PPTP helper rules"))
    return out


def check_outside_interface(f: Facts) -> list[Finding]:
    """The outside interface exists and is up (``run`` waits for it otherwise)."""
    name = f.config.outside_interface
    if not f.addresses:  # the interface list could not be read
        return []
    if name not in f.addresses:
        return [
            Finding(
                Level.WARN,
                "outside-interface",
                f"outside_interface {name} does not exist on this machine: vpnmasq run "
                "waits for it to appear before it masquerades anything",
                "check the name (ip link), or ignore this if the link comes up later "
                "(PPP, VLAN, a USB modem)",
            )
        ]
    if name in f.down:
        return [
            Finding(
                Level.WARN,
                "outside-interface",
                f"outside_interface {name} is down: vpnmasq run waits for it to come up",
                f"ip link set {name} up",
            )
        ]
    return [Finding(Level.OK, "outside-interface", f"outside_interface {name} is up")]


def check_forward_policy(f: Facts) -> list[Finding]:
    if f.iptables is None and f.nft is None:
        return []
    drops = _chain_policy_drop(f, "FORWARD")
    mark = f.config.mark
    present = mark_rule_in_ruleset(f.iptables or "", f.nft or "", mark)
    if drops and not present:
        return [
            Finding(
                Level.FAIL,
                "forward-mark",
                f"FORWARD drops by default ({drops[0]}) and no rule accepts vpnmasq's mark "
                f"{mark:#x}: its packets are untracked, so 'ct state established' never "
                "matches them and inbound VPN traffic (GRE, ESP, IKE replies) is dropped",
                forward_mark_hint(mark),
            )
        ]
    if drops:
        return [Finding(Level.OK, "forward-mark", f"FORWARD drops by default and accepts mark {mark:#x}")]
    return [Finding(Level.OK, "forward-mark", "FORWARD accepts by default")]


def check_outside_address(f: Facts) -> list[Finding]:
    pubs = _public(f)
    out_if = f.config.outside_interface
    if not pubs:
        if out_if not in f.addresses:
            return [
                Finding(
                    Level.FAIL,
                    "outside",
                    f"outside_interface {out_if} does not exist",
                    "set outside_interface to the interface facing the Internet (ip -br link)",
                )
            ]
        return [
            Finding(
                Level.FAIL,
                "outside",
                f"{out_if} has no IPv4 address: vpnmasq drops outbound packets "
                "(no-public-address) until it gets one",
                "check the uplink (DHCP/PPPoE) first: HOWTO 5.1 step 1",
            )
        ]
    out: list[Finding] = []
    for a in pubs:
        why = upstream_nat_reason(a)
        if why is not None:
            out.append(Finding(Level.WARN, "upstream-nat", upstream_nat_warning(a, why)))
    if f.config.public_address and f.addresses.get(out_if) is not None:
        if f.config.public_address not in f.addresses[out_if]:
            out.append(
                Finding(
                    Level.WARN,
                    "outside",
                    f"public_address {f.config.public_address} is not on {out_if} "
                    f"({', '.join(f.addresses[out_if]) or 'no address'}): replies will not "
                    "reach the gateway",
                    "remove public_address to follow the interface, or correct it",
                )
            )
    if not out:
        out.append(Finding(Level.OK, "outside", f"{out_if} has public address {', '.join(pubs)}"))
    return out


def check_mtu(f: Facts) -> list[Finding]:
    mtu = f.mtu.get(f.config.outside_interface)
    if mtu is None or mtu >= ETHERNET_MTU:
        return []
    mss = mtu - TCP_IP_HEADERS
    if f.config.mss_clamp and f.config.mss_clamp <= mss:
        return [Finding(Level.OK, "mtu", f"outside MTU {mtu}, TCP MSS clamped to {f.config.mss_clamp}")]
    return [
        Finding(
            Level.WARN,
            "mtu",
            f"{f.config.outside_interface} has MTU {mtu} (PPPoE is 1492): LAN hosts assume 1500 "
            "and TCP stalls wherever ICMP 'fragmentation needed' is filtered on the path",
            f"mss_clamp = {mss}",
        )
    ]


def check_local_vpn(f: Facts) -> list[Finding]:
    cons = f.local_consumers
    if not cons:
        return []
    names = ", ".join(sorted(cons))
    pol = f.config.local_vpn
    out: list[Finding] = []
    if pol == "never":
        out.append(
            Finding(
                Level.WARN,
                "local-vpn",
                f"a VPN endpoint runs on the gateway itself ({names}) but local_vpn = \"never\": "
                "inbound packets for it that no LAN host claims are dropped",
                'local_vpn = "auto"',
            )
        )
    else:
        out.append(Finding(Level.INFO, "local-vpn", f"VPN endpoint on the gateway itself: {names} "
                           f"(local_vpn = \"{pol}\")"))
    drops = _chain_policy_drop(f, "INPUT")
    if drops:
        out.append(
            Finding(
                Level.WARN,
                "local-vpn",
                f"INPUT drops by default ({drops[0]}); vpnmasq leaves the local endpoint's "
                "packets untracked, so 'ct state established' does not accept them",
                f"iptables -I INPUT -i {f.config.outside_interface} -p udp -m multiport "
                "--dports 500,4500 -j ACCEPT (and -p esp / -p gre as needed)",
            )
        )
    return out


def check_routes(f: Facts) -> list[Finding]:
    out: list[Finding] = []
    for r in f.config.routes:
        net = str(ipaddress.IPv4Network(r.network, strict=False))
        have = f.routes.get(net)
        if have is None:
            out.append(
                Finding(
                    Level.FAIL,
                    "route",
                    f"no route to {net}: traffic for the remote network goes out "
                    f"{f.config.outside_interface} instead of to the LAN router {r.via}",
                    f"ip route replace {net} via {r.via} (vpnmasq installs it when it starts)",
                )
            )
        elif r.via not in have:
            out.append(Finding(Level.WARN, "route", f"{net} is routed {have}, not via {r.via}"))
        else:
            out.append(Finding(Level.OK, "route", f"{net} {have}"))
    return out


#: drop counters worth explaining to an operator: reason -> (meaning, fix)
DROP_EXPLANATIONS: dict[str, tuple[str, str]] = {
    "ah-cannot-be-masqueraded": (
        "IPsec AH seen: its checksum covers the addresses, so no NAT can pass it (HOWTO 2.2)",
        "configure the VPN for ESP (with NAT-T) instead of AH",
    ),
    "fwz-cannot-be-masqueraded": (
        "Check Point FWZ encapsulation seen: cannot be masqueraded (HOWTO 2.4)",
        "switch the VPN to IKE mode",
    ),
    "esp-unassociated": (
        "inbound ESP with an SPI no LAN host is waiting for",
        "keep traffic flowing through idle tunnels (HOWTO 2.6) or raise timeouts.esp above "
        "the rekey interval (HOWTO 5.7)",
    ),
    "isakmp-zero-cookie": (
        "ISAKMP with a zero initiator cookie (the HOWTO 5.7 symptom)",
        "raise timeouts.isakmp above the IKE SA lifetime",
    ),
    "isakmp-ambiguous-remote-initiated": (
        "a remote started a new IKE exchange and several LAN hosts could own it",
        'ambiguous_ike = "most-recent", or let the LAN hosts initiate their rekeys',
    ),
    "gre-unknown-call": (
        "GRE with a Call ID of no known PPTP call",
        "check that TCP 1723 of the same call passes vpnmasq (hybrid mode queues it)",
    ),
    "not-inside": (
        "packets from a source outside inside_networks reached vpnmasq",
        "add the network to inside_networks (or exempt_networks)",
    ),
    "no-public-address": (
        "outbound packets while the outside interface had no address",
        "check the uplink",
    ),
    "table-full": ("the masquerade table was full", "raise limits.max_entries"),
    "ports-exhausted": ("no free outside port", "widen port_range"),
}


def check_counters(f: Facts) -> list[Finding]:
    c = _counters(f)
    out: list[Finding] = []
    for reason, (what, fix) in DROP_EXPLANATIONS.items():
        n = c.get("drop:" + reason, 0)
        if n:
            out.append(Finding(Level.WARN, "drops", f"{n} dropped: {what}", fix))
    nfq = c.get("nfq_dropped", 0) + c.get("nfq_queue_dropped", 0)
    if nfq:
        out.append(Finding(Level.WARN, "queue", f"the kernel dropped {nfq} packets at the queue "
                           "(vpnmasq too slow or not reading)", "see vpnmasq status counters"))
    return out


# ---------------------------------------------------------------------------- per host
def _endpoint_ip(s: str) -> str:
    return s.split(":")[0].split(" ")[0]


def _ago(r: Row) -> str:
    return f"last out {format_ago(r.last_seen_out)} ago, last in {format_ago(r.last_seen_in)} ago" \
        .replace("never ago", "never")


def _host_row(r: Row) -> Finding | None:  # noqa: C901 - a decision table: one finding per host situation
    kind = kind_of(r)
    remote = _endpoint_ip(r.remote)
    counts = f"{r.pkts_out} out / {r.pkts_in} in; {_ago(r)}"
    if kind == "isakmp":
        if r.detail.get("rcookie", "-") == "-" and r.pkts_in == 0:
            return Finding(
                Level.FAIL,
                "host",
                f"IKE (UDP 500) to {remote}: sent {r.pkts_out}, never answered",
                "UDP 500 is blocked on the path or at the remote, the address is wrong, or the "
                "server is down (HOWTO 5.2)",
            )
        return Finding(Level.OK, "host", f"IKE with {remote} ({r.detail.get('version', '')} "
                       f"{r.detail.get('exchange', '')}): {counts}".replace("  ", " "))
    if kind == "natt":
        what = r.detail.get("natt", "")
        if r.pkts_out and not r.pkts_in:
            return Finding(Level.FAIL, "host", f"NAT-T (UDP 4500) to {remote}: {counts}: nothing back",
                           "UDP 4500 is blocked on the path or at the remote")
        if "esp" not in what:
            return Finding(Level.WARN, "host", f"NAT-T with {remote} carries {what or 'nothing'} "
                           f"but no ESP-in-UDP yet: {counts}",
                           "the IKE negotiation has not completed (check the VPN client's log)")
        return Finding(Level.OK, "host", f"NAT-T with {remote} ({what}): {counts}")
    if r.proto == "esp":
        assoc = r.detail.get("assoc", r.state)
        if r.pkts_out and not r.pkts_in:
            return Finding(
                Level.FAIL,
                "host",
                f"ESP out, nothing back from {remote} (SPI {r.detail.get('spi_out', '?')}, "
                f"{assoc}): {counts}",
                "protocol 50 is dropped upstream or by the remote's firewall (HOWTO 5.2: "
                "routers must pass protocol 50), or the outside address is behind another NAT: "
                "use NAT-T (UDP 4500, 'encap' in the client)",
            )
        if r.pkts_in and not r.pkts_out:
            return Finding(Level.WARN, "host", f"ESP from {remote} arrives but the host sends none: {counts}",
                           "the host has not installed its SA (check the VPN client)")
        if assoc.upper() in ("WAITING", "PENDING"):
            return Finding(Level.WARN, "host", f"ESP to {remote} is {assoc.lower()} for association: "
                           f"{counts}", "another LAN host's tunnel to the same remote is starting; "
                           "it should clear within seconds (HOWTO 6.2)")
        return Finding(Level.OK, "host", f"ESP with {remote} ({assoc}, SPIs "
                       f"{r.detail.get('spi_out', '?')}/{r.detail.get('spi_in', '?')}): {counts}")
    if r.proto == "gre":
        if r.pkts_out and not r.pkts_in:
            return Finding(
                Level.FAIL,
                "host",
                f"GRE out, nothing back from {remote}: {counts}",
                "protocol 47 is dropped upstream or by the remote's firewall (HOWTO 5.2: the "
                "RASMON lower light stays dark), or the outside address is behind another NAT",
            )
        if r.pkts_in and not r.pkts_out:
            return Finding(Level.WARN, "host", f"GRE from {remote} arrives but the host sends none: "
                           f"{counts}", "PPP negotiation on the client is failing (check its log)")
        if not r.pkts_in and not r.pkts_out:
            return Finding(Level.WARN, "host", f"PPTP call with {remote} set up "
                           f"(Call ID {r.detail.get('call_id_inside', '?')}), no GRE yet",
                           "wait a second; if it stays, the client's PPP does not start")
        return Finding(Level.OK, "host", f"GRE with {remote}: {counts}")
    if kind == "pptp" or (r.proto == "tcp" and r.remote.endswith(":1723")):
        if r.pkts_out and not r.pkts_in:
            return Finding(Level.FAIL, "host", f"PPTP control (TCP 1723) to {remote}: no answer: {counts}",
                           "TCP 1723 is blocked or the server is down (HOWTO 5.1 step 3: telnet "
                           "SERVER 1723)")
        return Finding(Level.OK, "host", f"PPTP control with {remote} ({r.state}): {counts}")
    return None


def check_host(f: Facts) -> list[Finding]:
    if not f.host:
        return []
    try:
        net = ipaddress.IPv4Network(f.host, strict=False)
    except ValueError:
        return [Finding(Level.FAIL, "host", f"{f.host!r} is not an IPv4 address")]
    inside = f.config.inside_nets()
    if not any(net.subnet_of(n) for n in inside):
        return [
            Finding(
                Level.FAIL,
                "host",
                f"{f.host} is not inside any inside network ({', '.join(f.config.inside_networks)}): "
                "vpnmasq will not masquerade it",
                "add its network to inside_networks",
            )
        ]
    if f.daemon is None:
        return [Finding(Level.INFO, "host", f"cannot follow {f.host}: the daemon does not answer")]
    rows = [r for r in _rows(f) if ipaddress.IPv4Address(_endpoint_ip(r.inside)) in net]
    if not rows:
        return [
            Finding(
                Level.WARN,
                "host",
                f"no mapping for {f.host}: none of its traffic reached vpnmasq (or it all idled "
                "out)",
                "check the host's default gateway, then try plain traffic first (HOWTO 5.1); "
                "in hybrid mode only VPN protocols are queued",
            )
        ]
    out = [f2 for f2 in (_host_row(r) for r in rows) if f2 is not None]
    kinds = {kind_of(r) for r in rows} | {r.proto for r in rows}
    control = [r for r in rows if kind_of(r) == "pptp" or r.remote.endswith(":1723")]
    if control and "gre" not in kinds:
        r = control[0]
        out.append(
            Finding(
                Level.WARN,
                "host",
                f"PPTP control with {_endpoint_ip(r.remote)} but no call (no GRE mapping)",
                "the call was refused or never requested: check the client's credentials and "
                "the server's log (HOWTO 5.2)",
            )
        )
    ike = [r for r in rows if kind_of(r) == "isakmp" and r.pkts_in]
    if ike and not ({"esp", "natt"} & kinds):
        out.append(
            Finding(
                Level.WARN,
                "host",
                f"IKE with {_endpoint_ip(ike[0].remote)} works but no ESP or NAT-T was seen "
                "(HOWTO 5.3: 'UDP but no ESP')",
                "phase 2 failed (proposals, traffic selectors: see the client's log) or the "
                "client floats to UDP 4500 that is blocked",
            )
        )
    if not out:
        out.append(Finding(Level.INFO, "host", f"{f.host} has {len(rows)} mappings, none of them VPN"))
    return out


CHECKS: tuple[CheckFn, ...] = (
    check_daemon,
    check_forwarding,
    check_outside_interface,
    check_rp_filter,
    check_kernel,
    check_competing_nat,
    check_forward_policy,
    check_outside_address,
    check_mtu,
    check_local_vpn,
    check_routes,
    check_counters,
    check_host,
)


#: What ``check-config`` asks of this machine (without --offline): the same checks, so the
#: two commands never disagree.
CONFIG_CHECKS: tuple[CheckFn, ...] = (check_outside_interface, check_forward_policy)


def run_checks(facts: Facts, checks: Sequence[CheckFn] = CHECKS) -> list[Finding]:
    out: list[Finding] = []
    if not facts.is_root:
        out.append(Finding(Level.INFO, "root", "not running as root: firewall rules and the "
                           "control socket may be unreadable", "run vpnmasq diagnose as root"))
    for c in checks:
        out.extend(c(facts))
    return out


def render(findings: Sequence[Finding], *, verbose: bool = True) -> str:
    """One line per finding; ``verbose`` False leaves out the OK lines."""
    lines = [fd.line() for fd in findings if verbose or fd.level > Level.OK]
    fails = sum(1 for fd in findings if fd.level is Level.FAIL)
    warns = sum(1 for fd in findings if fd.level is Level.WARN)
    lines.append(f"{fails} problem{'s' if fails != 1 else ''}, {warns} warning{'s' if warns != 1 else ''}")
    return "\n".join(lines) + "\n"


def render_json(findings: Sequence[Finding]) -> str:
    return json.dumps({"findings": [fd.as_dict() for fd in findings]}, indent=2) + "\n"


def exit_code(findings: Sequence[Finding]) -> int:
    """0 all well, 1 a FAIL finding (so scripts and monitoring can act on it)."""
    return 1 if any(fd.level is Level.FAIL for fd in findings) else 0


# ============================================================================ gatherer
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv6.conf.all.forwarding",
    "net.netfilter.nf_conntrack_helper",
)


def _run(argv: list[str]) -> str | None:
    import subprocess

    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def gather_host(config: Config) -> Facts:
    """The interfaces and the firewall rules (what :data:`CONFIG_CHECKS` look at)."""
    import os

    facts = Facts(config=config, is_root=os.geteuid() == 0)
    try:
        links = json.loads(_run(["ip", "-j", "addr", "show"]) or "[]")
    except ValueError:
        links = []
    for link in links:
        name = str(link.get("ifname"))
        facts.addresses[name] = [
            str(a.get("local")) for a in link.get("addr_info", []) if a.get("family") == "inet"
        ]
        if "UP" not in link.get("flags", []):
            facts.down.add(name)
        if isinstance(link.get("mtu"), int):
            facts.mtu[name] = int(link["mtu"])
    from vpnmasq.tools.trace import inside_interfaces

    facts.inside_ifaces = inside_interfaces(config.inside_networks, links)
    saves = [s for s in (_run(["iptables-save"]), _run(["iptables-legacy-save"])) if s is not None]
    facts.iptables = "\n".join(saves) if saves else None
    facts.nft = _run(["nft", "list", "ruleset"])
    return facts


def gather(
    config: Config,
    *,
    host: str | None = None,
    socket_path: str | None = None,
    query: Callable[[str, str], Mapping[str, Any]] | None = None,
) -> Facts:
    """Read the running system (no changes). Every source that fails leaves ``None``."""

    def read(path: str) -> str | None:
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                return fh.read().strip()
        except OSError:
            return None

    facts = gather_host(config)
    facts.host = host
    for key in SYSCTLS:
        v = read("/proc/sys/" + key.replace(".", "/"))
        if v is not None:
            facts.sysctl[key] = v
    for iface in ["all", config.outside_interface, *facts.inside_ifaces]:
        for name in ("rp_filter", "send_redirects"):
            key = f"net.ipv4.conf.{iface}.{name}"
            v = read("/proc/sys/" + key.replace(".", "/"))
            if v is not None:
                facts.sysctl[key] = v
    facts.kernel["nfqueue"] = _present(
        "/proc/net/netfilter/nfnetlink_queue", "CONFIG_NETFILTER_NETLINK_QUEUE", "nfnetlink_queue"
    )
    facts.kernel["conntrack"] = _present(
        "/proc/sys/net/netfilter/nf_conntrack_max", "CONFIG_NF_CONNTRACK", "nf_conntrack"
    )
    try:
        rj = json.loads(_run(["ip", "-j", "route", "show"]) or "[]")
    except ValueError:
        rj = []
    for r in rj:
        dst = r.get("dst")
        if dst and dst != "default":
            net = str(ipaddress.IPv4Network(dst, strict=False)) if "/" in dst else f"{dst}/32"
            facts.routes[net] = f"via {r.get('gateway', '-')} dev {r.get('dev', '?')}"
    try:
        from vpnmasq.datapath.routes import local_vpn_consumers

        pubs = _public(facts)
        facts.local_consumers = local_vpn_consumers(pubs[0] if pubs else None)
    except Exception:  # advisory only
        facts.local_consumers = None
    path = socket_path or config.control_socket
    if query is None:
        from vpnmasq.datapath.control import ControlError
        from vpnmasq.datapath.control import query as q

        try:
            facts.daemon = dict(q(path, "status"))
        except ControlError as e:
            facts.daemon_error = str(e)
    else:
        try:
            facts.daemon = dict(query(path, "status"))
        except Exception as e:  # a test double
            facts.daemon_error = str(e)
    return facts


def _present(proc_path: str, config_opt: str, module: str) -> bool | None:
    """True/False if known from /proc, /proc/config.gz or the module lists; else None."""
    import gzip
    import os

    if os.path.exists(proc_path):
        return True
    try:
        with gzip.open("/proc/config.gz", "rt") as fh:
            text = fh.read()
        return f"\n{config_opt}=y" in text or f"\n{config_opt}=m" in text
    except OSError:
        pass
    release = os.uname().release
    for name in ("modules.builtin", "modules.dep"):
        try:
            with open(f"/lib/modules/{release}/{name}", encoding="ascii", errors="replace") as fh:
                if f"/{module}.ko" in fh.read():
                    return True
        except OSError:
            continue
    return None
