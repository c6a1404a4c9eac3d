"""Netfilter rules for vpnmasq: generated as text by pure functions, applied by thin ones.

Owns the iptables queue chains (``VPNMASQ_IN``/``OUT``/``HP`` in mangle) and the nft table
``ip vpnmasq`` (untracking, local-source guard, mark, hybrid-mode timeouts, MSS clamp and
kernel masquerade). Install and remove are symmetric (sshuttle style) and touch only what
vpnmasq owns; :func:`remove` works from what is present, so it cleans up after a crash;
:func:`replace` swaps rules atomically for a handover. Seam: :class:`RuleSpec` in, text out,
``iptables-restore``/``nft -f`` the only I/O. Known limit: a packet untracked in raw but
routed elsewhere than the outside interface leaves un-NATed (and untracked).

Design notes, kernel facts and measurements: docs/internals/datapath-rules.md.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vpnmasq.config import Mode, interface_name_problem
from vpnmasq.packet.ipv4 import (
    PROTO_AH,
    PROTO_ESP,
    PROTO_GRE,
    PROTO_ICMP,
    PROTO_NAMES,
    PROTO_TCP,
    PROTO_UDP,
)
from vpnmasq.packet.l4 import ISAKMP_PORT, NATT_PORT, PPTP_PORT

__all__ = [
    "CHAINS",
    "DEFAULT_MARK",
    "LOCAL_SOCKET",
    "ExtraRules",
    "HAIRPIN_CHAINS",
    "NFT_TABLE",
    "RuleError",
    "RuleSpec",
    "forward_mark_hint",
    "forward_mark_rule_present",
    "hairpins",
    "install",
    "installed",
    "iptables_is_legacy",
    "interfaces_towards",
    "ipv4_conf_get",
    "ipv4_conf_set",
    "main_routes",
    "rp_filter_blocks_hairpin",
    "iptables_removal",
    "iptables_replacement",
    "iptables_rules",
    "mark_rule_in_ruleset",
    "nft_removal",
    "nft_rules",
    "ours_in_ruleset",
    "port_range_warnings",
    "remove",
    "replace",
]

ForwardProto = Literal["tcp", "udp", "gre", "esp"]

DEFAULT_MARK = 0x564D  # "VM"
NFT_TABLE = "vpnmasq"
CHAIN_PREFIX = "VPNMASQ_"
#: iptables table -> our chains, in the order they are declared (only the queue rules live
#: in iptables; older versions also had VPNMASQ_RAW* in raw and VPNMASQ_MARK in mangle, which
#: remove() and replace() still clean up: they go by the VPNMASQ_ prefix)
CHAINS: dict[str, tuple[str, ...]] = {
    "mangle": ("VPNMASQ_IN", "VPNMASQ_OUT"),
}
#: iptables table -> our hairpin chain, declared only when the spec hairpins
HAIRPIN_CHAINS: dict[str, str] = {"mangle": "VPNMASQ_HP"}
PROTO_NUM = {PROTO_NAMES[p]: p for p in (PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_GRE, PROTO_ESP, PROTO_AH)}
#: ICMP errors the engine may have to translate: unreachable, source quench, time exceeded,
#: parameter problem.
ICMP_ERROR_TYPES = (3, 4, 11, 12)
#: RFC 4787 REQ-5: UDP mappings must live >= 2 min (5 min recommended); Linux defaults are
#: 30 s (unreplied) / 120 s (replied).
UDP_TIMEOUTS = {"unreplied": 120, "replied": 300}
#: RFC 5382 REQ-5: transitory (half-open or closing) TCP idle timeout >= 4 min. Linux's
#: established timeout (5 days) already exceeds the 2 h 4 min minimum; states not listed keep
#: the kernel defaults.
TCP_TIMEOUTS = {
    "syn_sent": 240,
    "syn_recv": 240,
    "fin_wait": 240,
    "close_wait": 240,
    "last_ack": 240,
}


#: nft: the packet belongs to a socket of the gateway, in any state: listening, connected,
#: bound to 0.0.0.0 and unconnected (a resolver's query socket), time-wait, transparent or
#: not. The ``socket`` expression looks the socket up itself at prerouting and does not
#: match when there is none; ``transparent`` is the one key every kind of socket has
#: (``wildcard`` and ``mark`` need a full socket). iptables' ``-m socket`` would need
#: ``--nowildcard`` to see sockets bound to 0.0.0.0.
LOCAL_SOCKET = "socket transparent { 0, 1 }"


class RuleError(RuntimeError):
    """Applying or removing rules failed (the tool's stderr is in the message)."""


def _check_range(name: str, r: tuple[int, int]) -> tuple[int, int]:
    lo, hi = r
    if not (1 <= lo <= hi <= 65535):
        raise ValueError(f"{name}: invalid port range {lo}-{hi}")
    return (lo, hi)


@dataclass(frozen=True)
class ExtraRules:
    """nft text another datapath module puts into vpnmasq's table (the kernel offload's maps
    and rules, :func:`vpnmasq.datapath.offload.offload_rules`): one table, so that an
    offloaded packet crosses one base chain per hook of vpnmasq's fewer."""

    #: set and map declarations (table body text)
    declarations: tuple[str, ...] = ()
    #: the first rules of the prerouting chain ``raw`` (after the local source guard)
    prerouting: tuple[str, ...] = ()
    #: a filter chain ``post`` at postrouting, priority mangle - 10 (before the queue rules)
    postrouting: tuple[str, ...] = ()


#: priority of the chain of ExtraRules.postrouting (before iptables' mangle POSTROUTING)
EXTRA_POST_PRIORITY = "mangle - 10"


@dataclass(frozen=True)
class RuleSpec:
    """What to install. Validated on construction (values end up in rule text)."""

    outside_if: str
    inside_networks: Sequence[str]
    public_address: str | None = None
    mode: Mode = "hybrid"
    queue_num: int = 0
    fail_open: bool = False
    mark: int = DEFAULT_MARK
    #: ports vpnmasq allocates on the public address; keep it outside
    #: net.ipv4.ip_local_port_range (default 32768-60999), see port_range_warnings()
    alias_port_range: tuple[int, int] = (61000, 65535)
    #: ports kernel masquerade may use (hybrid mode); must not overlap alias_port_range
    kernel_port_range: tuple[int, int] = (1024, 60999)
    #: where vpnmasq maps inside source ports below 1024 (Config.low_port_range); replies
    #: to those aliases are owned like replies to alias_port_range. None: not used.
    low_port_range: tuple[int, int] | None = None
    #: every range the engine allocates TCP/UDP ports from (PortPool.alias_ranges, the
    #: one home of that pool); empty: alias_port_range and low_port_range. Inbound and
    #: hairpinned packets to these ports are the ones vpnmasq owns.
    alias_ranges: Sequence[tuple[int, int]] = field(default_factory=tuple)
    forwards: Sequence[tuple[str, int | None]] = field(default_factory=tuple)
    #: (tcp|udp, port) a forwarded LAN server answers from when it differs from the public
    #: port (a forward with ``to_port``). Hybrid mode must own those replies: kernel
    #: conntrack never saw the NOTRACKed request, so it would call the reply INVALID and
    #: let it out un-masqueraded. Forwards with a port cover their own port already.
    forward_reply_ports: Sequence[tuple[str, int]] = field(default_factory=tuple)
    #: [[route]] networks behind a LAN VPN router: traffic from the inside networks to them
    #: is left to kernel routing (not NOTRACKed, never queued), like LAN-to-LAN traffic
    routed_networks: Sequence[str] = field(default_factory=tuple)
    #: hybrid mode: clamp the TCP MSS of SYNs forwarded through outside_if to this (0: off);
    #: userspace mode clamps in the engine (Config.mss_clamp)
    mss_clamp: int = 0
    #: hairpinning (a LAN host reaching a forward through the public address, see the module
    #: docstring): the forwards it applies to, as (protocol, public port, LAN server port);
    #: tcp/udp with both ports, gre with neither. Empty: LAN packets to the public address
    #: are left to the kernel (delivered to the gateway itself).
    hairpin_forwards: Sequence[tuple[str, int | None, int | None]] = field(default_factory=tuple)
    #: the public address LAN hosts hairpin to, when ``public_address`` is None (the daemon
    #: passes the outside interface's current address and replaces the rules when it
    #: changes). No hairpin rules without an address.
    hairpin_address: str | None = None
    #: interfaces on which unicast packets with a local source address are dropped in raw:
    #: the daemon turns ``accept_local`` on there for hairpinning, and this puts back the
    #: martian check for everything but the packets vpnmasq itself rewrites (see the module
    #: docstring)
    local_source_guard: Sequence[str] = field(default_factory=tuple)
    # --- the gateway's own ICMP errors about packets vpnmasq rewrote ------------------------------
    #: queue the ICMP errors the gateway itself sends (mangle OUTPUT, chain
    #: ``VPNMASQ_LOCAL``) when conntrack cannot relate them (INVALID/UNTRACKED: they quote a
    #: packet vpnmasq owns), except those to an inside or routed network: the engine
    #: translates the quoted header back (see :func:`_local_icmp_errors`). Off by default so
    #: the generated text is unchanged for callers that do not ask; the daemon turns it on.
    local_icmp_errors: bool = False
    #: with hairpinning: also queue LAN hosts' ICMP errors to the public address that
    #: conntrack cannot relate (about hairpinned, untracked flows; chain ``VPNMASQ_HP``),
    #: which the engine translates for the other LAN host (see :func:`_hairpin_icmp_errors`)
    hairpin_icmp_errors: bool = False
    # --- end of the gateway's own ICMP errors -----------------------------------------------------
    #: maps and rules of the kernel offload in this table (None: no offload)
    extra: ExtraRules | None = None

    def __post_init__(self) -> None:  # noqa: C901 - one validation per RuleSpec field
        if interface_name_problem(self.outside_if) is not None:
            raise ValueError(f"invalid interface name: {self.outside_if!r}")
        nets = tuple(str(ipaddress.IPv4Network(n, strict=False)) for n in self.inside_networks)
        if not nets:
            raise ValueError("at least one inside network is required")
        object.__setattr__(self, "inside_networks", tuple(dict.fromkeys(nets)))
        if self.public_address is not None:
            object.__setattr__(
                self, "public_address", str(ipaddress.IPv4Address(self.public_address))
            )
        if self.mode not in ("hybrid", "userspace"):
            raise ValueError(f"invalid mode: {self.mode!r}")
        if not 0 <= self.queue_num <= 65535:
            raise ValueError(f"queue number out of range: {self.queue_num}")
        if not 0 < self.mark <= 0xFFFFFFFF:
            raise ValueError(f"mark must be a non-zero 32-bit value: {self.mark}")
        a = _check_range("alias_port_range", tuple(self.alias_port_range))  # type: ignore[arg-type]
        k = _check_range("kernel_port_range", tuple(self.kernel_port_range))  # type: ignore[arg-type]
        object.__setattr__(self, "alias_port_range", a)
        object.__setattr__(self, "kernel_port_range", k)
        if self.mode == "hybrid" and not (a[1] < k[0] or k[1] < a[0]):
            raise ValueError(f"alias port range {a} overlaps kernel port range {k}")
        if self.low_port_range is not None:
            lo = _check_range("low_port_range", tuple(self.low_port_range))  # type: ignore[arg-type]
            object.__setattr__(self, "low_port_range", lo)
            if self.mode == "hybrid" and not (lo[1] < k[0] or k[1] < lo[0]):
                raise ValueError(f"low port range {lo} overlaps kernel port range {k}")
        pool = [_check_range("alias_ranges", tuple(r)) for r in self.alias_ranges]  # type: ignore[arg-type]
        if not pool:
            pool = [a] if self.low_port_range is None else [a, self.low_port_range]
        for r in pool:
            if self.mode == "hybrid" and not (r[1] < k[0] or k[1] < r[0]):
                raise ValueError(f"alias port range {r} overlaps kernel port range {k}")
        object.__setattr__(self, "alias_ranges", tuple(dict.fromkeys(pool)))
        fwds: list[tuple[str, int | None]] = []
        for proto, port in self.forwards:
            if proto in ("tcp", "udp"):
                if port is None or not 1 <= port <= 65535:
                    raise ValueError(f"forward {proto} needs a port 1-65535, got {port}")
            elif proto in ("gre", "esp"):
                if port is not None:
                    raise ValueError(f"forward {proto} takes no port")
            else:
                raise ValueError(f"invalid forward protocol: {proto!r}")
            fwds.append((proto, port))
        object.__setattr__(self, "forwards", tuple(dict.fromkeys(fwds)))
        replies: list[tuple[str, int]] = []
        for proto, port in self.forward_reply_ports:
            if proto not in ("tcp", "udp") or not 1 <= port <= 65535:
                raise ValueError(f"invalid forward reply port: {proto} {port}")
            replies.append((proto, port))
        object.__setattr__(self, "forward_reply_ports", tuple(dict.fromkeys(replies)))
        routed = tuple(str(ipaddress.IPv4Network(n, strict=False)) for n in self.routed_networks)
        object.__setattr__(self, "routed_networks", tuple(dict.fromkeys(routed)))
        if not 0 <= self.mss_clamp <= 65535:
            raise ValueError(f"mss_clamp out of range: {self.mss_clamp}")
        hairpins: list[tuple[str, int | None, int | None]] = []
        for proto, port, server_port in self.hairpin_forwards:
            if proto in ("tcp", "udp"):
                if port is None or server_port is None or not (
                    1 <= port <= 65535 and 1 <= server_port <= 65535
                ):
                    raise ValueError(f"hairpin {proto} needs two ports 1-65535: {port}, {server_port}")
            elif proto == "gre":
                if port is not None or server_port is not None:
                    raise ValueError("hairpin gre takes no ports")
            else:  # ESP: the engine cannot hairpin it (use NAT-T: UDP 4500 hairpins as UDP)
                raise ValueError(f"invalid hairpin protocol: {proto!r}")
            hairpins.append((proto, port, server_port))
        object.__setattr__(self, "hairpin_forwards", tuple(dict.fromkeys(hairpins)))
        if self.hairpin_address is not None:
            object.__setattr__(
                self, "hairpin_address", str(ipaddress.IPv4Address(self.hairpin_address))
            )
        for ifname in self.local_source_guard:
            if interface_name_problem(ifname) is not None or ifname in ("lo", self.outside_if):
                raise ValueError(f"invalid interface for the local source guard: {ifname!r}")
        object.__setattr__(
            self, "local_source_guard", tuple(dict.fromkeys(self.local_source_guard))
        )


# --- pure rule generation --------------------------------------------------------------


def _range(r: tuple[int, int]) -> str:
    return f"{r[0]}:{r[1]}" if r[0] != r[1] else str(r[0])


def _aliases(spec: RuleSpec) -> list[str]:
    """The engine's port pool (:attr:`RuleSpec.alias_ranges`) as match arguments."""
    return [_range(r) for r in spec.alias_ranges]


def _inbound_owned(spec: RuleSpec) -> list[str]:
    """Matches for inbound packets (already known to be for the public address) that
    vpnmasq owns: NOTRACKed in raw and queued in mangle."""
    aliases = _aliases(spec)
    m: list[str] = []
    if spec.mode == "userspace":
        for alias in aliases:
            m += [f"-p tcp --dport {alias}", f"-p udp --dport {alias}"]
        m += [f"-p udp -m multiport --dports {ISAKMP_PORT},{NATT_PORT}", "-p 1"]
    else:
        m.append(f"-p udp --dport {ISAKMP_PORT}")
        for alias in aliases:
            m += [
                f"-p udp --sport {ISAKMP_PORT} --dport {alias}",
                f"-p tcp --sport {PPTP_PORT} --dport {alias}",
            ]
    m += ["-p 47", "-p 50", "-p 51"]
    for proto, port in spec.forwards:
        m.append(f"-p {proto} --dport {port}" if port is not None else f"-p {PROTO_NUM[proto]}")
    return list(dict.fromkeys(m))


def _to_pool(spec: RuleSpec, matches: Sequence[str]) -> list[str]:
    """Those of ``matches`` that name a destination port of the engine's pool: where a
    socket of the gateway's own (a port a program chose or bound itself) and a mapping can
    meet, so where :data:`LOCAL_SOCKET` is asked before a packet is untracked."""
    pool = {f"--dport {a}" for a in _aliases(spec)}
    out = []
    for m in matches:
        toks = m.split()
        if any(" ".join(toks[i : i + 2]) in pool for i in range(len(toks) - 1)):
            out.append(m)
    return out


def _local_socket_returns(spec: RuleSpec, matches: Sequence[str]) -> list[str]:
    """nft rules leaving to the kernel (tracked, so never queued) the packets to pool ports
    that a local socket owns: a resolver or NTP client sending from a port of its own
    choosing, a connect() from an explicitly bound port. Asked only for pool ports, after
    the port match, so other packets pay no socket lookup."""
    return [f"{_nft_match(m)} {LOCAL_SOCKET} return" for m in _to_pool(spec, matches)]


def hairpins(mode: Mode, hairpin_forwards: Sequence[object]) -> bool:
    """Whether vpnmasq hairpins anything: every mapping in userspace mode (the engine owns
    them all), only forwards in hybrid mode (plain traffic's mappings are the kernel's)."""
    return mode == "userspace" or bool(hairpin_forwards)


def _hairpin_to(spec: RuleSpec) -> str | None:
    """The address hairpinned packets are sent to, or None when there is no hairpinning."""
    if not hairpins(spec.mode, spec.hairpin_forwards):
        return None
    return spec.public_address or spec.hairpin_address


def _hairpin_owned(spec: RuleSpec) -> list[str]:
    """Matches for packets from an inside network to the public address that vpnmasq
    hairpins. Userspace mode: TCP/UDP to any port of the engine's pool (every mapping,
    RFC 4787 REQ-9, RFC 5382 REQ-7; a forwarded LAN server's answers go there too) and to
    the forwarded ports. Hybrid mode: a LAN client's packets to a forwarded port (or GRE)
    and the forwarded LAN server's answers to the client's alias port."""
    aliases = _aliases(spec)
    userspace = spec.mode == "userspace"
    m: list[str] = []
    if userspace:
        m += [f"-p {proto} --dport {alias}" for alias in aliases for proto in ("tcp", "udp")]
    for proto, port, server_port in spec.hairpin_forwards:
        if proto == "gre":
            m.append(f"-p {PROTO_NUM['gre']}")
            continue
        m.append(f"-p {proto} --dport {port}")
        if not userspace:
            m += [f"-p {proto} --sport {server_port} --dport {alias}" for alias in aliases]
    return list(dict.fromkeys(m))


def _outbound_owned(spec: RuleSpec) -> list[str]:
    """Matches for forwarded packets from inside networks that vpnmasq owns."""
    if spec.mode == "userspace":
        return [""]
    m = [
        "-p 47",
        "-p 50",
        "-p 51",
        f"-p udp --sport {ISAKMP_PORT}",
        f"-p udp --dport {ISAKMP_PORT}",
        f"-p tcp --dport {PPTP_PORT}",
    ]
    # Replies of forwarded LAN servers (e.g. a PPTP server's SYN-ACK from port 1723): the
    # request was NOTRACKed and handled by vpnmasq, so the reply must be too.
    replies = [(p, port) for p, port in spec.forwards if p in ("tcp", "udp") and port]
    for proto, port in [*replies, *spec.forward_reply_ports]:
        m.append(f"-p {proto} --sport {port}")
    return list(dict.fromkeys(m))


def _icmp_errors_unrelated() -> list[str]:
    return [
        f"-p icmp --icmp-type {t} -m conntrack --ctstate INVALID,UNTRACKED"
        for t in ICMP_ERROR_TYPES
    ]


# --- the gateway's own ICMP errors about packets vpnmasq rewrote -------------------------
#: mangle chain for them, jumped to from OUTPUT (RuleSpec.local_icmp_errors)
LOCAL_ICMP_CHAIN = "VPNMASQ_LOCAL"


def _local_icmp_errors(spec: RuleSpec, queue: str) -> list[str]:
    """Rules queueing the gateway's own ICMP errors about packets vpnmasq owns.

    When the gateway's kernel cannot forward a packet vpnmasq rewrote (fragmentation needed
    because the LAN link is narrower, TTL exceeded, host unreachable after ARP fails), its
    ICMP error quotes the rewritten header: an inbound packet now addressed to a LAN host,
    or an outbound one now from the public address (the kernel then addresses the error to
    the public address, itself). Conntrack cannot relate these errors (the quoted packet
    was NOTRACKed), so they are INVALID; errors about flows the kernel tracks (kernel
    masquerade in hybrid mode, the gateway's own sockets) are RELATED and stay with it.

    They are queued in mangle OUTPUT, the only place where a rewritten destination is routed
    again (``nf_reroute`` after the verdict, for LOCAL_OUT only): an error about an outbound
    packet goes back to the LAN host. Errors to an inside or routed network are left alone:
    they quote a LAN host's packet as it sent it (outbound packets are rewritten after the
    forward path's MTU and TTL checks), so PMTUD for the LAN never waits for the daemon.
    """
    chain = LOCAL_ICMP_CHAIN
    nets = (*spec.inside_networks, *spec.routed_networks)
    out = [_rule(chain, f"-d {net}", "-j RETURN") for net in nets]
    out += [
        _rule(chain, f"-p icmp --icmp-type {t} -m conntrack --ctstate INVALID,UNTRACKED", queue)
        for t in ICMP_ERROR_TYPES
    ]
    out.append(f"-I OUTPUT 1 -j {chain}")
    return out


def _hairpin_icmp_errors(spec: RuleSpec, queue: str) -> list[str]:
    """Rules queueing, in the mangle hairpin chain, a LAN host's ICMP errors about packets
    it got through a hairpin (a forwarded LAN server's "port unreachable" for a LAN client,
    or the other way round). Without them the error, addressed to the public address, is
    delivered to the gateway itself and lost. They are not NOTRACKed: only errors conntrack
    cannot relate (INVALID: the quoted flow was untracked) are queued; errors about the
    gateway's own traffic are RELATED and stay local."""
    chain = HAIRPIN_CHAINS["mangle"]
    return [
        _rule(
            chain,
            f"-s {net} -p icmp --icmp-type {t} -m conntrack --ctstate INVALID,UNTRACKED",
            queue,
        )
        for net in spec.inside_networks
        for t in ICMP_ERROR_TYPES
    ]


# --- end of the gateway's own ICMP errors ---------------------------------------------------------


def _queue_target(spec: RuleSpec) -> str:
    t = f"-j NFQUEUE --queue-num {spec.queue_num}"
    return t + " --queue-bypass" if spec.fail_open else t


def _rule(chain: str, match: str, target: str) -> str:
    return " ".join(p for p in ("-A", chain, match, target) if p)


def _to_public(spec: RuleSpec) -> str:
    if spec.public_address is not None:
        return f"-d {spec.public_address}/32"
    return "-m addrtype --dst-type LOCAL --limit-iface-in"


def _not_to_public(spec: RuleSpec) -> str:
    if spec.public_address is not None:
        return f"! -d {spec.public_address}/32"
    return "-m addrtype ! --dst-type LOCAL --limit-iface-in"


def iptables_rules(spec: RuleSpec) -> str:
    """``iptables-restore --noflush`` input that installs vpnmasq's queue chains and jumps.

    Only the NFQUEUE rules live here (this kernel has no nft ``queue``): untracking, the
    mark and kernel NAT are native rules of :func:`nft_rules`. Declaring a chain in a
    ``--noflush`` restore flushes it if it exists, so the text is also correct over a
    partial earlier install (but :func:`install` removes first anyway).
    """
    out_if = spec.outside_if
    queue = _queue_target(spec)
    untracked = "-m conntrack --ctstate UNTRACKED"
    hp_to = _hairpin_to(spec)
    mangle: list[str] = ["*mangle"]
    mangle += [f":{c} - [0:0]" for c in CHAINS["mangle"]]
    mangle.append(_rule("VPNMASQ_IN", _not_to_public(spec), "-j RETURN"))
    inbound = [f"{m} {untracked}" for m in _inbound_owned(spec)]
    if spec.mode == "hybrid":
        inbound += _icmp_errors_unrelated()
    for m in inbound:
        mangle.append(_rule("VPNMASQ_IN", m, queue))
    outbound = [f"{m} {untracked}".strip() for m in _outbound_owned(spec)]
    if spec.mode == "hybrid":
        outbound += _icmp_errors_unrelated()
    for m in outbound:  # the jumps test the inside source (module docstring)
        mangle.append(_rule("VPNMASQ_OUT", m, queue))
    if hp_to is not None:
        hp = HAIRPIN_CHAINS["mangle"]
        mangle.insert(mangle.index(f":{CHAINS['mangle'][-1]} - [0:0]") + 1, f":{hp} - [0:0]")
        mangle.append(_rule(hp, "-m addrtype --src-type LOCAL", "-j RETURN"))
        for net in spec.inside_networks:
            for m in _hairpin_owned(spec):
                mangle.append(_rule(hp, f"-s {net} {m} {untracked}", queue))
        mangle.append(f"-I PREROUTING 1 ! -i {out_if} -d {hp_to}/32 -j {hp}")
    # packets carrying the mark were offloaded (or already had their verdict): never queued
    mangle.append(f"-I PREROUTING 1 -i {out_if} -m mark ! --mark {spec.mark:#x} -j VPNMASQ_IN")
    for net in reversed(spec.inside_networks):  # inserted first, so in the networks' order
        mangle.append(f"-I POSTROUTING 1 -o {out_if} -s {net} -j VPNMASQ_OUT")
    if spec.local_icmp_errors:  # the gateway's own ICMP errors
        last_decl = max(i for i, ln in enumerate(mangle) if ln.startswith(":"))
        mangle.insert(last_decl + 1, f":{LOCAL_ICMP_CHAIN} - [0:0]")
        mangle += _local_icmp_errors(spec, queue)
    if spec.hairpin_icmp_errors and hp_to is not None:  # LAN hosts' errors about hairpinned flows
        mangle += _hairpin_icmp_errors(spec, queue)
    mangle.append("COMMIT")
    return "\n".join(mangle) + "\n"


#: nft names of ICMP_ERROR_TYPES (the forward chain marks unrelated errors by type)
_ICMP_ERROR_NAMES = {
    3: "destination-unreachable",
    4: "source-quench",
    11: "time-exceeded",
    12: "parameter-problem",
}


def _nft_match(match: str) -> str:
    """The native nft form of one of the iptables matches of :func:`_inbound_owned`,
    :func:`_outbound_owned` and :func:`_hairpin_owned` (``-p``, ``--sport``/``--dport`` with
    a port or ``lo:hi``, ``-m multiport --dports a,b``, ``--icmp-type``; ``""`` matches
    everything). Untracking (nft) and queueing (iptables) are generated from the same list,
    so they cannot drift apart."""
    toks = match.split()
    proto: str | None = None
    ports: list[str] = []
    icmp_type: int | None = None
    i = 0
    while i < len(toks):
        tok, arg = toks[i], toks[i + 1] if i + 1 < len(toks) else ""
        if tok == "-p":
            proto = arg
        elif tok in ("--sport", "--dport"):
            ports.append(f"{tok[2:]} {arg.replace(':', '-')}")
        elif tok == "-m" and arg == "multiport":
            pass
        elif tok == "--dports":
            ports.append("dport { " + ", ".join(arg.split(",")) + " }")
        elif tok == "--icmp-type":
            icmp_type = int(arg)
        else:
            raise ValueError(f"no nft form for {match!r}")
        i += 2
    if icmp_type is not None:
        return f"icmp type {_ICMP_ERROR_NAMES.get(icmp_type, str(icmp_type))}"
    if proto is None:
        return ""
    if ports:
        return " ".join(f"{proto} {p}" for p in ports)
    return f"meta l4proto {PROTO_NUM.get(proto, proto)}"


def _nft_matches(matches: Sequence[str]) -> list[str]:
    """:func:`_nft_match` of each, with the bare protocol matches (``-p 47``, ``-p 50``, ...)
    merged into one set lookup where the first of them stood."""
    placeholder = "\0"  # where the merged protocol rule goes
    out: list[str] = []
    protos: list[str] = []
    for m in matches:
        n = _nft_match(m)
        if n.startswith("meta l4proto "):
            if not protos:
                out.append(placeholder)
            protos.append(n.removeprefix("meta l4proto "))
        else:
            out.append(n)
    if protos:
        uniq = list(dict.fromkeys(protos))
        merged = uniq[0] if len(uniq) == 1 else "{ " + ", ".join(uniq) + " }"
        out[out.index(placeholder)] = f"meta l4proto {merged}"
    return list(dict.fromkeys(out))


def _per_net(nets: Iterable[str], rule: str) -> list[str]:
    """``rule`` once per network (``{net}`` in it), never one set of them: a set of
    prefixes created in the transaction that replaces the table matches nothing for an
    instant after the new rules are live, so a flow starting then would go un-NATed for
    its life (measured: docs/internals/datapath-rules.md)."""
    return [rule.format(net=net) for net in dict.fromkeys(nets)]


def _chain(name: str, rules: Sequence[str], hook: str | None = None) -> str:
    body = [f"\t\t{hook}; policy accept;"] if hook else []
    body += [f"\t\t{r}" for r in rules]
    return "\t" + f"chain {name} {{\n" + "\n".join(body) + "\n\t}"


def nft_rules(spec: RuleSpec) -> str:
    """``nft -f`` input for the ``ip vpnmasq`` table (every mode). Replaces an existing
    table of that name atomically. See the module docstring for the chains and why they
    are ordered as they are: an offloaded packet leaves each chain at its first rule or
    two."""
    out_if = spec.outside_if
    inside = spec.inside_networks
    mark = f"meta mark set {spec.mark:#x}"
    hp_to = _hairpin_to(spec)
    raw = [  # before anything: the kernel's martian check (RuleSpec.local_source_guard)
        f'iifname "{ifname}" fib saddr type local meta pkttype host drop'
        for ifname in spec.local_source_guard
    ]
    if spec.extra is not None:  # the offload's rewrites: an offloaded packet stops here
        raw += spec.extra.prerouting
    raw += ["ct state untracked return", f'iifname "{out_if}" goto raw_in']
    if hp_to is not None:  # before raw_out, which returns on local destinations
        raw += _per_net(inside, f"ip saddr {{net}} ip daddr {hp_to} goto raw_hp")
    raw += _per_net(inside, "ip saddr {net} goto raw_out")
    # FIB lookups (``fib``) only after the protocol matches: in hybrid mode most packets are
    # the kernel's (plain TCP/UDP), which then pay a few compares and no lookup
    raw_out = _per_net((*inside, *spec.routed_networks), "ip daddr {net} return")
    raw_out += [
        f"{m} fib daddr type != {{ local, broadcast, multicast }} notrack".lstrip()
        for m in _nft_matches(_outbound_owned(spec))
    ]
    chains = [
        _chain("raw", raw, "type filter hook prerouting priority raw - 1"),
        _chain("raw_in", _nft_raw_in(spec)),
        _chain("raw_out", raw_out),
    ]
    if hp_to is not None:
        raw_hp = ["fib saddr type local return"]
        raw_hp += _local_socket_returns(spec, _hairpin_owned(spec))
        raw_hp += [f"{m} notrack" for m in _nft_matches(_hairpin_owned(spec))]
        chains.append(_chain("raw_hp", raw_hp))
    forward = _nft_mss(spec)
    forward += [f'oifname != "{out_if}" return', " ".join(f"ip saddr != {n}" for n in inside) + " return"]
    forward += [  # return: nothing below applies to an untracked packet
        f"{m} ct state untracked {mark} return".lstrip()
        for m in _nft_matches(_outbound_owned(spec))
    ]
    head = ""
    if spec.mode == "hybrid":
        icmp = ", ".join(_ICMP_ERROR_NAMES[t] for t in ICMP_ERROR_TYPES)
        forward.append(f"icmp type {{ {icmp} }} ct state {{ invalid, untracked }} {mark}")
        forward.append('ct state new meta l4proto udp ct timeout set "udp_rfc4787"')
        forward.append('ct state new meta l4proto tcp ct timeout set "tcp_rfc5382"')
        udp = ", ".join(f"{k} : {v}" for k, v in UDP_TIMEOUTS.items())
        tcp = ", ".join(f"{k} : {v}" for k, v in TCP_TIMEOUTS.items())
        head = (
            f"\tct timeout udp_rfc4787 {{\n\t\tprotocol udp; l3proto ip;\n"
            f"\t\tpolicy = {{ {udp} }};\n\t}}\n"
            f"\tct timeout tcp_rfc5382 {{\n\t\tprotocol tcp; l3proto ip;\n"
            f"\t\tpolicy = {{ {tcp} }};\n\t}}\n"
        )
        klo, khi = spec.kernel_port_range
        match = f'oifname "{out_if}" ip saddr {{net}}'
        nat = [
            *_per_net(inside, f"{match} meta l4proto {{{{ tcp, udp }}}} masquerade to :{klo}-{khi}"),
            *_per_net(inside, f"{match} masquerade"),
        ]
        chains.append(_chain("postrouting", nat, "type nat hook postrouting priority srcnat"))
    chains.append(_chain("forward", forward, "type filter hook forward priority mangle - 1"))
    if spec.extra is not None:
        head += "".join(f"\t{d}\n" for d in spec.extra.declarations)
        if spec.extra.postrouting:
            chains.append(_chain("post", spec.extra.postrouting,
                                 f"type filter hook postrouting priority {EXTRA_POST_PRIORITY}"))  # fmt: skip
    return (
        f"table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\ntable ip {NFT_TABLE} {{\n"
        + head
        + "\n".join(chains)
        + "\n}\n"
    )


def _nft_raw_in(spec: RuleSpec) -> list[str]:
    """Chain ``raw_in``: untrack what vpnmasq owns of the packets to the public address,
    but not what a socket of the gateway owns."""
    inbound = _nft_matches(_inbound_owned(spec))
    raw_in = [] if spec.public_address is None else [f"ip daddr != {spec.public_address} return"]
    raw_in += _local_socket_returns(spec, _inbound_owned(spec))  # the gateway's own
    if spec.public_address is not None:
        return raw_in + [f"{m} notrack" for m in inbound]
    # an address of outside_if (addrtype LOCAL --limit-iface-in)
    return raw_in + [f"{m} fib daddr . iif type local notrack" for m in inbound]


def _nft_mss(spec: RuleSpec) -> list[str]:
    """Hybrid mode MSS clamp: SYNs forwarded through outside_if, either way."""
    if not spec.mss_clamp or spec.mode != "hybrid":
        return []
    m = spec.mss_clamp
    syn = f"tcp flags syn / syn,rst tcp option maxseg size > {m} tcp option maxseg size set {m}"
    return [f'oifname "{spec.outside_if}" {syn}', f'iifname "{spec.outside_if}" {syn}']


def nft_removal() -> str:
    """``nft -f`` input deleting our table whether or not it exists (one transaction)."""
    return f"table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n"


def _split_tables(save_text: str) -> dict[str, list[str]]:
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in save_text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif line == "COMMIT":
            current = None
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    return tables


def _jump_target(tokens: list[str]) -> str | None:
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


def _is_ours(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIX)


def _ours_and_jumps(lines: list[str]) -> tuple[list[str], list[str]]:
    """Our chains declared in one table of ``iptables-save`` output, and ``-D`` lines for
    every jump to one of them from a chain that is not ours."""
    ours = [ln[1:].split()[0] for ln in lines if ln.startswith(":") and _is_ours(ln[1:])]
    deletes = []
    for ln in lines:
        if not ln.startswith("-A "):
            continue
        try:
            tokens = shlex.split(ln)
        except ValueError:
            continue
        chain, target = tokens[1], _jump_target(tokens)
        if not _is_ours(chain) and target is not None and _is_ours(target):
            deletes.append("-D " + ln[3:])
    return ours, deletes


def iptables_removal(save_text: str) -> str:
    """``iptables-restore --noflush`` input removing every vpnmasq chain and every jump to
    one found in ``save_text`` (``iptables-save`` output). Empty if there is nothing."""
    blocks: list[str] = []
    for table, lines in _split_tables(save_text).items():
        ours, deletes = _ours_and_jumps(lines)
        if not ours and not deletes:
            continue
        blocks.append(f"*{table}")
        blocks += deletes
        blocks += [f"-F {c}" for c in ours]
        blocks += [f"-X {c}" for c in ours]
        blocks.append("COMMIT")
    return "\n".join(blocks) + "\n" if blocks else ""


def iptables_replacement(save_text: str, spec: RuleSpec) -> str:
    """``iptables-restore --noflush`` input that swaps whatever vpnmasq rules ``save_text``
    shows for ``spec``'s, one transaction per table (see the module docstring).

    Per table: our chain declarations (creating or flushing them), ``-D`` of the old jumps,
    the new rules and jumps, then ``-F``/``-X`` of our chains the new spec does not declare.
    Tables where only old pieces exist get a plain removal block.
    """
    existing = _split_tables(save_text)
    new = _split_tables(iptables_rules(spec))
    blocks: list[str] = []
    for table in dict.fromkeys([*new, *existing]):
        ours, deletes = _ours_and_jumps(existing.get(table, []))
        lines = new.get(table)
        if lines is None:
            if not ours and not deletes:
                continue
            body = deletes + [f"-F {c}" for c in ours] + [f"-X {c}" for c in ours]
        else:
            decls = [ln for ln in lines if ln.startswith(":")]
            declared = {ln[1:].split()[0] for ln in decls}
            stale = [c for c in ours if c not in declared]
            body = (
                decls
                + deletes
                + [ln for ln in lines if not ln.startswith(":")]
                + [f"-F {c}" for c in stale]
                + [f"-X {c}" for c in stale]
            )
        blocks += [f"*{table}", *body, "COMMIT"]
    return "\n".join(blocks) + "\n"


def _nft_has_table(nft_text: str) -> bool:
    return re.search(rf"^table ip {NFT_TABLE} \{{", nft_text, re.M) is not None


def ours_in_ruleset(save_text: str, nft_text: str) -> bool:
    """Whether any vpnmasq chain, jump or table appears in the given listings."""
    return bool(iptables_removal(save_text)) or _nft_has_table(nft_text)


_IPT_MARK = re.compile(r"\s-m mark --mark (0x[0-9a-fA-F]+|\d+)(?:/(0x[0-9a-fA-F]+|\d+))?")
_NFT_MARK = re.compile(r"\bmark (0x[0-9a-fA-F]+|\d+)\b")


def mark_rule_in_ruleset(save_text: str, nft_text: str, mark: int = DEFAULT_MARK) -> bool:
    """Whether a FORWARD rule accepts packets carrying ``mark``.

    Looks for ``-A FORWARD ... -m mark --mark MARK[/MASK] ... -j ACCEPT`` in the filter table
    of ``iptables-save`` output, and for a rule ``... mark MARK ... accept`` in an nft chain
    hooked at ``forward`` (any table). Rules in user chains jumped to from FORWARD are not
    followed (a warning based on this is advisory).
    """
    for ln in _split_tables(save_text).get("filter", []):
        if not ln.startswith("-A FORWARD ") or " ! -m mark" in ln or "! --mark" in ln:
            continue
        try:
            tokens = shlex.split(ln)
        except ValueError:
            continue
        if _jump_target(tokens) != "ACCEPT":
            continue
        m = _IPT_MARK.search(ln)
        if m:
            value = int(m.group(1), 0)
            mask = int(m.group(2), 0) if m.group(2) else 0xFFFFFFFF
            if value == mark & mask:
                return True
    in_forward = False
    depth = 0
    for raw_line in nft_text.splitlines():
        line = raw_line.strip()
        if line.startswith("chain ") and line.endswith("{"):
            in_forward = False
            depth = 1
            continue
        if depth and line.startswith("type ") and " hook forward " in f" {line} ":
            in_forward = True
            continue
        if line == "}":
            depth = 0
            in_forward = False
            continue
        if in_forward and line.endswith("accept") and "mark != " not in line:
            m2 = _NFT_MARK.search(line)
            if m2 and int(m2.group(1), 0) == mark:
                return True
    return False


def forward_mark_hint(mark: int = DEFAULT_MARK) -> str:
    """The rule README asks admins to add when FORWARD filters untracked packets, and where.

    The mark means "vpnmasq's own traffic", the counterpart of ``ct state established`` for
    untracked packets, so it goes next to that rule: below any rule that blocks hosts.
    """
    return (
        f"iptables -A FORWARD -m mark --mark {mark:#x} -j ACCEPT  # next to your "
        "ESTABLISHED,RELATED accept rule, below rules that block LAN hosts "
        f"(nft: meta mark {mark:#x} accept)"
    )


def port_range_warnings(spec: RuleSpec, local_port_range: tuple[int, int]) -> list[str]:
    """Warnings about port ranges (pure; pass ``net.ipv4.ip_local_port_range``).

    The kernel picks ephemeral ports without knowing the engine's mappings, so a local
    connection could take a port a mapping holds (its replies reach its socket,
    :data:`LOCAL_SOCKET`; the mapping loses those the socket owns). Reserving the range
    (``net.ipv4.ip_local_reserved_ports``) avoids this.
    """
    warnings = []
    loc = local_port_range
    for a in spec.alias_ranges:
        if not (a[1] < loc[0] or loc[1] < a[0]):
            warnings.append(
                f"alias port range {a[0]}-{a[1]} overlaps net.ipv4.ip_local_port_range "
                f"{loc[0]}-{loc[1]}: set net.ipv4.ip_local_reserved_ports={a[0]}-{a[1]}"
            )
    return warnings


# --- thin appliers -----------------------------------------------------------------------


def _prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _run(argv: list[str], netns: str | None, stdin: str | None = None) -> str:
    full = _prefix(netns) + argv
    try:
        r = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuleError(f"{' '.join(argv)}: {e}") from e
    if r.returncode != 0:
        detail = r.stderr.strip() or r.stdout.strip()
        raise RuleError(
            f"{' '.join(argv)} failed ({r.returncode}): {detail}\n--- input ---\n{stdin or ''}"
        )
    return r.stdout


def _save(iptables: str, netns: str | None) -> str:
    return _run([f"{iptables}-save"], netns)


def _nft_list(netns: str | None) -> str:
    try:
        return _run(["nft", "list", "ruleset"], netns)
    except RuleError:
        return ""


def _remove_iptables(iptables: str, netns: str | None) -> None:
    text = iptables_removal(_save(iptables, netns))
    if text:
        _run([f"{iptables}-restore", "--noflush"], netns, text)


def install(spec: RuleSpec, *, netns: str | None = None, iptables: str = "iptables") -> None:
    """Remove any previous vpnmasq rules, then install ``spec``'s. On failure, whatever was
    installed is removed again before the error is raised.

    ``iptables`` names the tool family (``iptables``, ``iptables-nft``, ``iptables-legacy``);
    ``netns`` runs the tools in a named network namespace (tests).
    """
    remove(netns=netns, iptables=iptables)
    try:  # nft first: the queue rules only take packets its raw chain untracked
        _run(["nft", "-f", "-"], netns, nft_rules(spec))
        _run([f"{iptables}-restore", "--noflush"], netns, iptables_rules(spec))
    except RuleError:
        remove(netns=netns, iptables=iptables)
        raise


def replace(spec: RuleSpec, *, netns: str | None = None, iptables: str = "iptables") -> None:
    """Swap whatever vpnmasq rules are installed (none, an older version's, another spec's)
    for ``spec``'s without a moment in which owned packets are not queued: one
    ``iptables-restore`` transaction per table (:func:`iptables_replacement`) and one ``nft -f``
    transaction. On failure the previous rules stay as they were (a handover must not open a
    gap) and :class:`RuleError` is raised.

    The nft table goes first: replacing an older version's rules, whose untracking was in
    iptables raw, the new table untracks (and marks) the same packets before the old chains
    go, so the old queue rules keep taking them until the new ones replace them.
    """
    _run(["nft", "-f", "-"], netns, nft_rules(spec))
    _run(
        [f"{iptables}-restore", "--noflush"],
        netns,
        iptables_replacement(_save(iptables, netns), spec),
    )


def remove(*, netns: str | None = None, iptables: str = "iptables") -> None:
    """Remove every vpnmasq chain, jump and table present; a no-op when there is none.

    Built-in tables and chains that iptables created on demand for our jumps (e.g. an
    iptables-nft ``table ip raw`` with an empty PREROUTING) stay: they are shared with
    whatever else uses iptables, and deleting them could race with another tool adding a
    rule. They are empty, with policy ACCEPT, so they change nothing.
    """
    _remove_iptables(iptables, netns)
    if _nft_has_table(_nft_list(netns)):
        _run(["nft", "-f", "-"], netns, nft_removal())


def iptables_is_legacy(iptables: str = "iptables") -> bool:
    """Whether ``iptables`` is iptables-legacy (which sends no nftables notifications)."""
    try:
        return "legacy" in _run([iptables, "-V"], None)
    except RuleError:
        return False


def installed(*, netns: str | None = None, iptables: str = "iptables") -> bool:
    """Whether any piece of vpnmasq's rules is present (what :func:`remove` would remove)."""
    return ours_in_ruleset(_save(iptables, netns), _nft_list(netns))


def forward_mark_rule_present(
    mark: int = DEFAULT_MARK,
    *,
    netns: str | None = None,
    iptables_variants: Iterable[str] = ("iptables", "iptables-legacy"),
) -> bool:
    """Whether some FORWARD rule accepts ``mark`` (iptables of any variant, or nftables)."""
    saves = []
    for variant in iptables_variants:
        try:
            saves.append(_save(variant, netns))
        except RuleError:
            continue
    return mark_rule_in_ruleset("\n".join(saves), _nft_list(netns), mark)


# --- hairpin sysctls (pure part, then thin appliers) ----------------------------------------


def interfaces_towards(
    routes: Sequence[dict[str, Any]], inside_networks: Iterable[str], outside_if: str
) -> list[str]:
    """The interfaces ``routes`` (``ip -j -4 route show table main``) send into the inside
    networks: where LAN hosts hairpin from, so where ``accept_local`` is needed. Default
    routes, ``outside_if`` and ``lo`` are left out; sorted, without duplicates."""
    nets = [ipaddress.IPv4Network(n, strict=False) for n in inside_networks]
    out: set[str] = set()
    for r in routes:
        dst, dev = r.get("dst"), r.get("dev")
        if not isinstance(dst, str) or not isinstance(dev, str) or dst == "default":
            continue
        if dev in (outside_if, "lo") or r.get("type", "unicast") != "unicast":
            continue
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if any(net.overlaps(n) for n in nets):
            out.add(dev)
    return sorted(out)


def rp_filter_blocks_hairpin(all_value: str | None, dev_value: str | None) -> bool:
    """Whether reverse-path filtering drops hairpinned packets arriving on an interface.

    The kernel uses the larger of ``conf/all`` and ``conf/<dev>``. Strict mode (1) drops a
    packet whose source (here the public address, after vpnmasq's rewrite) is not routed
    back out of the interface it came in on; loose mode (2) and 0 let it through (measured:
    ``TcpExtIPReversePathFilter`` counts the drops)."""

    def num(v: str | None) -> int:
        try:
            return int(v or 0)
        except ValueError:
            return 0

    return max(num(all_value), num(dev_value)) == 1


def main_routes(*, netns: str | None = None) -> list[dict[str, Any]]:
    """``ip -j -4 route show table main`` (empty on failure)."""
    try:
        data = json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "main"], netns) or "[]")
    except (RuleError, ValueError):
        return []
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _conf_key(ifname: str, key: str) -> str:
    if interface_name_problem(ifname) is not None or not re.fullmatch(r"[a-z_]+", key):
        raise ValueError(f"invalid sysctl: {ifname!r} {key!r}")
    return f"net/ipv4/conf/{ifname}/{key}"  # slashes: interface names may contain dots


def ipv4_conf_get(ifname: str, key: str, *, netns: str | None = None) -> str | None:
    """``net.ipv4.conf.<ifname>.<key>``, or None if it cannot be read."""
    path = "/proc/sys/" + _conf_key(ifname, key)
    if netns is None:
        try:
            with open(path, encoding="ascii") as f:
                return f.read().strip() or None
        except OSError:
            return None
    try:
        return _run(["cat", path], netns).strip() or None
    except RuleError:
        return None


def ipv4_conf_set(ifname: str, key: str, value: str, *, netns: str | None = None) -> None:
    """Set ``net.ipv4.conf.<ifname>.<key>`` (RuleError on failure)."""
    if not re.fullmatch(r"-?[0-9]+", value):
        raise ValueError(f"invalid sysctl value: {value!r}")
    _run(["sysctl", "-q", "-w", f"{_conf_key(ifname, key)}={value}"], netns)
