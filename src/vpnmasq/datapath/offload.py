"""Kernel fast path for established flows: nftables maps that rewrite statelessly.

Python decides, the kernel forwards. Once the engine has associated an ESP SPI pair or a
PPTP call's Call IDs, or (userspace mode) translated a TCP/UDP/ICMP echo session each way,
:class:`Offloader` puts it into maps in vpnmasq's own table ``ip vpnmasq`` (their rules,
:func:`offload_rules`, open its prerouting chain and have a postrouting chain); the kernel
then rewrites later packets of that flow itself, in both directions, before they would reach
the queue. Packets whose key is in no map do not match and take the queue as before, so the
engine still sees every packet it has not understood (new SPIs, rekeys, unknown calls, new
remotes, TCP SYN/FIN/RST, ICMP errors, anything from another address), and stays the source
of truth: the kernel's counters are credited back to its entries, whose timeouts still rule.

Design notes, kernel facts and measurements: docs/internals/datapath-offload.md.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vpnmasq.conntrack.table import F_FAST_IN, F_FAST_OUT, PERMANENT, Entry
from vpnmasq.datapath.rules import NFT_TABLE, ExtraRules
from vpnmasq.helpers.esp import Assoc, EspState
from vpnmasq.helpers.pptp import Call, CallState
from vpnmasq.packet.ipv4 import PROTO_NAMES, PROTO_TCP, PROTO_UDP, int_to_ip, ip_to_int

__all__ = [
    "OFFLOAD_TABLE",
    "SYNC_INTERVAL_S",
    "Element",
    "OffloadError",
    "Offloader",
    "SyncReport",
    "desired_elements",
    "element_commands",
    "parse_elements",
    "pre_copy",
    "legacy_table_removal",
    "offload_rules",
]

#: the maps live in vpnmasq's own table (see offload_rules)
OFFLOAD_TABLE = NFT_TABLE
#: earlier versions kept them in a table of their own: removed at start if found
LEGACY_TABLE = "vpnmasq_offload"
#: how often the daemon syncs: the maps' counters refresh engine entries (whose timeouts are
#: minutes: esp 4200 s, gre 7440 s), ended flows leave the maps at the latest this late
SYNC_INTERVAL_S = 1.0
#: enhanced GRE v1 carrying PPP (RFC 2637 4.1): K and version 1 set, protocol 0x880B; the
#: mask ignores the S and A bits (libalias / nf_conntrack_proto_gre use the same test)
GRE_V1_MASK = 0xEF7FFFFF
GRE_V1_VALUE = 0x2001880B

# map / set name -> (has a value, has counters)
_SETS: dict[str, tuple[bool, bool]] = {
    "esp_in": (True, True),
    "esp_out": (False, True),
    "gre_in_addr": (True, True),
    "gre_in_call": (True, False),
    "gre_out": (False, True),
    "esp_out_pre": (False, False),
    "gre_out_pre": (False, False),
    # userspace mode: plain NAPT sessions (TCP/UDP) and ICMP echo
    "napt_out": (True, True),
    "napt_out_pre": (False, False),
    "napt_in_addr": (True, True),
    "napt_in_port": (True, False),
    "icmp_out": (True, True),
    "icmp_out_pre": (False, False),
    "icmp_in_addr": (True, True),
    "icmp_in_id": (True, False),
}
_NAPT_OUT = "type inet_proto . ipv4_addr . inet_service . ipv4_addr . inet_service"
#: inbound NAPT key per filtering behaviour (RFC 4787 section 5): what a packet from the
#: remote must match to be let in; the key is ``ip protocol . th dport`` (the alias port)
#: followed by these fields of the remote
NAPT_IN_KEYS: dict[str, tuple[str, ...]] = {
    "address-port-dependent": ("ip saddr", "th sport"),
    "address-dependent": ("ip saddr",),
    "endpoint-independent": (),
}
_NFT_TYPE = {"ip saddr": "ipv4_addr", "th sport": "inet_service"}
_DECL = {
    "esp_in": "typeof ip saddr . esp spi : ip daddr",
    "esp_out": "typeof ip saddr . ip daddr . esp spi",
    "gre_in_addr": "typeof ip saddr . @th,48,16 : ip daddr",
    "gre_in_call": "typeof ip saddr . @th,48,16 : @th,48,16",
    "gre_out": "typeof ip saddr . ip daddr . @th,48,16",
    "esp_out_pre": "typeof ip saddr . ip daddr . esp spi",
    "gre_out_pre": "typeof ip saddr . ip daddr . @th,48,16",
    "napt_out": _NAPT_OUT + " : inet_service",
    "napt_out_pre": _NAPT_OUT,
    # napt_in_addr, napt_in_port: by filtering, see _napt_in_decl
    "icmp_out": "typeof ip saddr . icmp id . ip daddr : icmp id",
    "icmp_out_pre": "typeof ip saddr . icmp id . ip daddr",
    "icmp_in_addr": "typeof ip saddr . icmp id : ip daddr",
    "icmp_in_id": "typeof ip saddr . icmp id : icmp id",
}
#: the sets of each feature: ESP/GRE (both modes), NAPT and ICMP echo (userspace mode)
_VPN_SETS = ("esp_in", "esp_out", "gre_in_addr", "gre_in_call", "gre_out", "esp_out_pre", "gre_out_pre")
_NAPT_SETS = tuple(n for n in _SETS if n not in _VPN_SETS)
#: outbound set -> its uncounted copy looked up in prerouting (derived by sync, see above)
_PRE_COPY = {
    "esp_out": "esp_out_pre",
    "gre_out": "gre_out_pre",
    "napt_out": "napt_out_pre",
    "icmp_out": "icmp_out_pre",
}
#: which way the traffic counted by an element goes (for crediting the engine entry)
_DIRECTION = {
    "esp_in": "in",
    "esp_out": "out",
    "gre_in_addr": "in",
    "gre_out": "out",
    "napt_out": "out",
    "napt_in_addr": "in",
    "icmp_out": "out",
    "icmp_in_addr": "in",
}
#: key positions holding an IPv4 address, per set (the rest are numbers)
_ADDR_AT: dict[str, frozenset[int]] = {
    "esp_in": frozenset({0}),
    "gre_in_addr": frozenset({0}),
    "gre_in_call": frozenset({0}),
    "esp_out": frozenset({0, 1}),
    "gre_out": frozenset({0, 1}),
    "esp_out_pre": frozenset({0, 1}),
    "gre_out_pre": frozenset({0, 1}),
    "napt_out": frozenset({1, 3}),
    "napt_out_pre": frozenset({1, 3}),
    "napt_in_addr": frozenset({2}),
    "napt_in_port": frozenset({2}),
    "icmp_out": frozenset({0, 2}),
    "icmp_out_pre": frozenset({0, 2}),
    "icmp_in_addr": frozenset({0}),
    "icmp_in_id": frozenset({0}),
}
#: maps whose value is an address
_VALUE_ADDR = frozenset({"esp_in", "gre_in_addr", "napt_in_addr", "icmp_in_addr"})
#: NAPT keys start with the protocol; nft lists it by name
_PROTO_NAMES = {"tcp": 6, "udp": 17}
#: a credited entry's deadline gets this much on top of its class timeout: traffic the
#: kernel forwarded since the last read is credited up to one (adaptive) sync interval
#: late, and a mapping must never expire earlier than its timeout after its last packet
CREDIT_MARGIN_S = 10.0
#: the longest the daemon waits between two reads of the counters (see SYNC_INTERVAL_S)
MAX_SYNC_INTERVAL_S = CREDIT_MARGIN_S / 2
#: the counters of what the kernel forwarded (:attr:`Offloader.forwarded`)
FORWARDED = ("offload_packets_out", "offload_packets_in", "offload_bytes_out", "offload_bytes_in")
#: how soon newly eligible NAPT sessions are added (batched: one nft run per interval)
ADD_INTERVAL_S = 0.05
#: sessions waiting for that at most (more are found by the periodic sync)
PENDING_MAX = 65536


def _napt_in_decl(filtering: str, value: str) -> str:
    key = ["inet_proto", "inet_service"] + [_NFT_TYPE[f] for f in NAPT_IN_KEYS[filtering]]
    return "type " + " . ".join(key) + " : " + value


class OffloadError(RuntimeError):
    """nft refused a command (stderr in the message)."""


@dataclass(frozen=True, slots=True)
class Element:
    """One element of one of our maps or sets: ``key`` is the tuple of its concatenation
    (addresses as ints), ``value`` its map value (None in a set)."""

    set: str
    key: tuple[int, ...]
    value: int | None = None

    def nft(self) -> str:
        addrs = _ADDR_AT[self.set]
        parts = [int_to_ip(k) if i in addrs else str(k) for i, k in enumerate(self.key)]
        text = " . ".join(parts)
        if self.value is not None:
            v = int_to_ip(self.value) if self.set in _VALUE_ADDR else str(self.value)
            text += f" : {v}"
        return text


# ------------------------------------------------------------------ pure: what to offload
def _esp_elements(e: Entry) -> list[Element] | None:
    a = e.ext
    if (
        not isinstance(a, Assoc)
        or a.state is not EspState.ESTABLISHED
        or a.tentative
        or a.out_spi is None
        or a.in_spi is None
    ):
        return None
    return [
        Element("esp_in", (e.remote_ip, a.in_spi), e.inside_ip),
        Element("esp_out", (e.inside_ip, e.remote_ip, a.out_spi)),
    ]


def _gre_elements(e: Entry) -> list[Element] | None:
    c = e.ext
    if not isinstance(c, Call) or c.state is not CallState.ESTABLISHED or c.peer_id is None:
        return None
    return [
        Element("gre_in_addr", (c.remote_ip, c.outside_id), c.inside_ip),
        Element("gre_in_call", (c.remote_ip, c.outside_id), c.inside_id),
        Element("gre_out", (c.inside_ip, c.remote_ip, c.peer_id)),
    ]


def _napt_elements(e: Entry, filtering: str) -> list[Element]:
    """What a plain NAPT session (or a forward's session) may have offloaded now: each
    direction once the engine translated a packet of it and found it eligible for its own
    fast path (``F_FAST_OUT``/``F_FAST_IN``: no payload helper; TCP only while established,
    and the rules leave SYN, FIN and RST to the engine anyway). Inbound keys follow the
    filtering; a forward's sessions are let in per session only (a forward may be limited to
    some remotes, and its binding is shared by everyone who reaches it). A hairpinned leg
    (the remote is the public address itself: a LAN host reaching another through it) never
    crosses the outside interface the maps work on, so the engine keeps every packet of it."""
    if e.alg is not None or e.proto not in (PROTO_TCP, PROTO_UDP) or e.remote_ip == e.alias_ip:
        return []
    if e.proto == PROTO_TCP and e.tclass != "tcp_established":
        return []
    out: list[Element] = []
    f = e.flags
    if f & F_FAST_OUT:
        okey = (e.proto, e.inside_ip, e.inside_port, e.remote_ip, e.remote_port)
        out.append(Element("napt_out", okey, e.alias_port))
    if f & F_FAST_IN and (e.kind == "napt" or filtering == "address-port-dependent"):
        remote = (e.remote_ip, e.remote_port)[: len(NAPT_IN_KEYS[filtering])]
        key = (e.proto, e.alias_port, *remote)
        out.append(Element("napt_in_addr", key, e.inside_ip))
        out.append(Element("napt_in_port", key, e.inside_port))
    return out


def _icmp_elements(e: Entry) -> list[Element]:
    """ICMP echo: the query way once a request went out, the reply way once a reply came
    back through the engine (replies are filtered per remote, as the engine does)."""
    out: list[Element] = []
    if e.flags & F_FAST_OUT:
        out.append(Element("icmp_out", (e.inside_ip, e.inside_port, e.remote_ip), e.alias_port))
    if e.flags & F_FAST_IN:
        key = (e.remote_ip, e.alias_port)
        out.append(Element("icmp_in_addr", key, e.inside_ip))
        out.append(Element("icmp_in_id", key, e.inside_port))
    return out


def entry_elements(e: Entry, filtering: str | None) -> list[Element]:
    """The elements entry ``e`` calls for now (none if it is not eligible); NAPT and ICMP
    only when ``filtering`` is given (userspace mode)."""
    kind = e.kind
    if kind == "esp":
        return _esp_elements(e) or []
    if kind == "gre":
        return _gre_elements(e) or []
    if filtering is None:
        return []
    if kind == "napt" or kind == "fwd":
        return _napt_elements(e, filtering)
    if kind == "icmp":
        return _icmp_elements(e)
    return []


#: sets whose elements several entries may share (the same binding's sessions, when the
#: filtering does not tell remotes apart)
_SHAREABLE = frozenset({"napt_in_addr", "napt_in_port"})


def pre_copy(el: Element) -> Element:
    """The uncounted copy of an outbound element that prerouting looks up (see the module
    docstring: offloaded outbound packets are untracked there)."""
    return Element(_PRE_COPY[el.set], el.key)


def desired_elements(
    entries: Iterable[Entry], now: float, filtering: str | None = None
) -> dict[Element, list[Entry]]:
    """Every map element the live, eligible entries call for, with the entries that want it
    (the first one owns it; several only in :data:`_SHAREABLE` sets).

    When two entries want the same key otherwise (two LAN hosts that picked the same inbound
    SPI with one remote, 1 in 2**32), neither is offloaded: the engine keeps deciding those
    packets.
    """
    out: dict[Element, list[Entry]] = {}
    keys: dict[tuple[str, tuple[int, ...]], Element | None] = {}
    for e in entries:
        if not e.live or e.expires_at <= now:
            continue
        for el in entry_elements(e, filtering):
            k = (el.set, el.key)
            if k in keys:
                other = keys[k]
                if other == el and el.set in _SHAREABLE:
                    out[el].append(e)
                    continue
                if other is not None:
                    out.pop(other, None)
                keys[k] = None
                continue
            keys[k] = el
            out[el] = [e]
    return out


# ------------------------------------------------------------------ pure: nft text
def offload_rules(  # long: the maps and rules as text, rule by rule
    public: str, outside_if: str, mark: int, filtering: str | None = None
) -> ExtraRules:
    """The maps and rules of the kernel fast path, for vpnmasq's own table (``RuleSpec.extra``:
    the rewrites open its prerouting chain, the outbound source rewrite gets a postrouting
    chain of its own). With ``filtering`` (userspace mode) also the NAPT and ICMP echo maps and
    rules, their inbound keys shaped by the filtering (:data:`NAPT_IN_KEYS`). A table
    replaced by ``rules`` starts with empty maps: :meth:`Offloader.forget`, then a sync, fills
    them again."""
    pub = int_to_ip(ip_to_int(public))  # validates
    if not outside_if or '"' in outside_if or len(outside_if) > 15:
        raise ValueError(f"invalid interface name: {outside_if!r}")
    if filtering is not None and filtering not in NAPT_IN_KEYS:
        raise ValueError(f"invalid filtering: {filtering!r}")
    decl = dict(_DECL)
    names = list(_VPN_SETS)
    if filtering is not None:
        decl["napt_in_addr"] = _napt_in_decl(filtering, "ipv4_addr")
        decl["napt_in_port"] = _napt_in_decl(filtering, "inet_service")
        names += _NAPT_SETS
    decls = []
    for name in names:
        has_value, counted = _SETS[name]
        decls.append(
            f"{'map' if has_value else 'set'} {name} {{ {decl[name]};"
            + (" counter;" if counted else "")
            + " }"
        )
    gre = f"ip protocol gre @th,0,32 & {GRE_V1_MASK:#x} == {GRE_V1_VALUE:#x}"
    into = f'iifname "{outside_if}" ip daddr {pub}'
    not_in = f'iifname != "{outside_if}"'
    m = f"meta mark set {mark:#x}"
    pre: list[str] = []
    post: list[str] = []
    if filtering is not None:  # most traffic: first
        kin = " . ".join(("ip protocol", "th dport", *NAPT_IN_KEYS[filtering]))
        kout = "ip protocol . ip saddr . th sport . ip daddr . th dport"
        tcp = "ip protocol tcp tcp flags & (fin | syn | rst) == 0"  # SYN/FIN/RST: the engine's
        # a datagram without checksum (0, RFC 768) keeps none: nftables would write one
        # computed from 0, which the receiver drops (measured), so the engine takes those
        udp = "ip protocol udp udp checksum != 0"
        pre += [
            f"{into} {tcp} ip daddr set {kin} map @napt_in_addr"
            f" tcp dport set {kin} map @napt_in_port notrack {m} return",
            f"{into} {udp} ip daddr set {kin} map @napt_in_addr"
            f" udp dport set {kin} map @napt_in_port notrack {m} return",
            f"{not_in} ip protocol {{ tcp, udp }} {kout} @napt_out_pre notrack return",
        ]
        post += [
            f"{tcp} tcp sport set {kout} map @napt_out ip saddr set {pub} return",
            f"{udp} udp sport set {kout} map @napt_out ip saddr set {pub} return",
        ]
    pre += [
        f"{into} ip protocol esp ip daddr set ip saddr . esp spi map @esp_in notrack {m} return",
        f"{into} {gre} ip daddr set ip saddr . @th,48,16 map @gre_in_addr"
        f" @th,48,16 set ip saddr . @th,48,16 map @gre_in_call notrack {m} return",
        f"{not_in} ip protocol esp ip saddr . ip daddr . esp spi @esp_out_pre notrack return",
        f"{not_in} {gre} ip saddr . ip daddr . @th,48,16 @gre_out_pre notrack return",
    ]
    post += [
        f"ip protocol esp ip saddr . ip daddr . esp spi @esp_out ip saddr set {pub} return",
        f"{gre} ip saddr . ip daddr . @th,48,16 @gre_out ip saddr set {pub}"
        + (" return" if filtering is not None else ""),
    ]
    if filtering is not None:
        echo_key = "ip saddr . icmp id"
        pre += [
            f"{into} icmp type echo-reply ip daddr set {echo_key} map @icmp_in_addr"
            f" icmp id set {echo_key} map @icmp_in_id notrack {m} return",
            f"{not_in} icmp type echo-request {echo_key} . ip daddr @icmp_out_pre notrack return",
        ]
        post.append(
            f"icmp type echo-request icmp id set {echo_key} . ip daddr map @icmp_out"
            f" ip saddr set {pub}"
        )
    # what does not leave through wan (inbound and LAN-to-LAN packets) ends the chain at its
    # first rule: each rule an offloaded packet crosses costs it, and so does each base chain
    # (measured: 20 more base chains of one rule each cost offloaded ESP about 0.25 of the
    # kernel's rate, 0.013 per chain)
    post.insert(0, f'oifname != "{outside_if}" accept')
    return ExtraRules(tuple(decls), tuple(pre), tuple(post))


def legacy_table_removal() -> str:
    """``nft -f`` input deleting the separate offload table of earlier versions, if any."""
    return f"table ip {LEGACY_TABLE} {{}}\ndelete table ip {LEGACY_TABLE}\n"


def element_commands(add: Iterable[Element], delete: Iterable[Element]) -> str:
    """``nft -f`` input deleting then adding elements (one transaction)."""
    lines = [
        f"delete element ip {OFFLOAD_TABLE} {el.set} {{ {_key_text(el)} }}" for el in delete
    ]
    lines += [f"add element ip {OFFLOAD_TABLE} {el.set} {{ {el.nft()} }}" for el in add]
    return "\n".join(lines) + ("\n" if lines else "")


def _key_text(el: Element) -> str:
    return Element(el.set, el.key).nft()


def parse_elements(nft_json: str) -> dict[Element, tuple[int, int]]:
    """Our elements in ``nft -j list table ip vpnmasq`` output, with their counters
    (packets, bytes; zeros for uncounted sets)."""
    out: dict[Element, tuple[int, int]] = {}
    data = json.loads(nft_json)
    for obj in data.get("nftables", []):
        s = obj.get("set") or obj.get("map")
        if not isinstance(s, dict) or s.get("table") != OFFLOAD_TABLE or s.get("name") not in _SETS:
            continue
        name = s["name"]
        for item in s.get("elem", []):
            value: Any = None
            if isinstance(item, list) and len(item) == 2:  # map: [key, value]
                item, value = item
            counters = (0, 0)
            if isinstance(item, dict) and "elem" in item:
                c = item["elem"].get("counter") or {}
                counters = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
                item = item["elem"].get("val")
            if isinstance(item, dict) and "concat" in item:
                parts = item["concat"]
            else:
                continue
            key = tuple(_as_int(p) for p in parts)
            out[Element(name, key, None if value is None else _as_int(value))] = counters
    return out


def _as_int(v: object) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        if v in _PROTO_NAMES:
            return _PROTO_NAMES[v]
        return ip_to_int(v) if "." in v else int(v, 0)
    raise ValueError(f"unexpected element part {v!r}")


# ------------------------------------------------------------------ the I/O shell
Runner = Callable[[list[str], str | None], str]


def _default_runner(netns: str | None) -> Runner:
    def run(argv: list[str], stdin: str | None) -> str:
        full = (["ip", "netns", "exec", netns] if netns else []) + argv
        try:
            r = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OffloadError(f"{' '.join(argv)}: {exc}") from exc
        if r.returncode != 0:
            raise OffloadError(f"{' '.join(argv)} failed: {r.stderr.strip()}\n{stdin or ''}")
        return r.stdout

    return run


@dataclass
class SyncReport:
    added: int = 0
    removed: int = 0
    credited: int = 0  # entries refreshed by kernel-forwarded traffic
    offloaded: int = 0  # elements in the maps after the sync


@dataclass
class Offloader:
    """Keeps the offload maps in vpnmasq's table in step with an engine. Not thread-safe; the
    daemon's loop owns it: its :meth:`rules` go into the rules the daemon installs (and
    replaces: then :meth:`forget`), :meth:`attach` to the engine's table, :meth:`quick` after
    every loop step, :meth:`sync` every :attr:`interval` seconds (and when ESP/GRE entries
    end). The maps go with the rules.

    ``filtering`` (userspace mode: the engine's ``Config.filtering``) turns on the NAPT and
    ICMP echo maps. Their sessions come and go much faster than VPN associations, so they
    do not wait for the periodic sync: the table tells the offloader when the engine finds
    a session eligible one more way and when one ends (:meth:`eligible`, :meth:`removed`, as
    its :class:`~vpnmasq.conntrack.table.TableObserver`), and :meth:`quick` adds the new
    elements (batched, every :data:`ADD_INTERVAL_S`) and deletes those of ended sessions at
    once (before the engine can give their alias port to another host)."""

    public: str
    outside_if: str
    mark: int
    netns: str | None = None
    runner: Runner | None = None
    filtering: str | None = None
    #: last counters seen per element (baseline for crediting)
    seen: dict[Element, tuple[int, int]] = field(default_factory=dict)
    #: offloaded element -> the entries it serves (the first owns it)
    offloaded: dict[Element, list[Entry]] = field(default_factory=dict)
    errors: int = 0
    last_error: str | None = None
    syncs: int = 0
    #: what the kernel forwarded through the maps since start, as read back by the syncs
    #: (``offload_packets_out`` ...: the daemon's counters, next to the engine's own)
    forwarded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FORWARDED, 0))
    #: seconds between two reads of the counters (adapts to what a read costs)
    interval: float = SYNC_INTERVAL_S
    last_read_s: float = 0.0  # CPU time of the last read (nft and parsing)

    def __post_init__(self) -> None:
        self._run: Runner = self.runner or _default_runner(self.netns)
        self._offloaded_ids: set[int] = set()
        self._of_entry: dict[int, list[Element]] = {}
        self._pending: deque[Entry] = deque()
        self._ended: list[Entry] = []
        self._next_add = 0.0

    # --- lifecycle ---------------------------------------------------------------------
    def rules(self) -> ExtraRules:
        """The maps and rules this offloader fills, for ``RuleSpec.extra`` (they live in
        vpnmasq's table and come and go with its rules)."""
        return offload_rules(self.public, self.outside_if, self.mark, self.filtering)

    def forget(self) -> None:
        """The table was (re-)created with empty maps (rules installed or replaced), or the
        engine was replaced (a reload): the next sync adds every element the table calls for
        again, with fresh counter baselines. Sessions waiting for :meth:`quick` are dropped
        too (the sync finds them; after a reload they may be the old table's)."""
        self.seen.clear()
        self.offloaded.clear()
        self._offloaded_ids = set()
        self._of_entry = {}
        self._pending.clear()
        self._ended = []

    def attach(self, table: Any) -> None:
        """Follow ``table`` (a MasqTable) entry by entry (NAPT offload needs it)."""
        table.observer = self

    # --- TableObserver -------------------------------------------------------------------
    def eligible(self, entry: Entry) -> None:
        if self.filtering is not None and entry.kind in _WATCHED and len(self._pending) < PENDING_MAX:
            self._pending.append(entry)

    def removed(self, entry: Entry) -> None:
        if id(entry) in self._offloaded_ids:
            self._ended.append(entry)

    # --- between syncs -------------------------------------------------------------------
    def next_add(self) -> float | None:
        """When :meth:`quick` has sessions to look at next (None: none watched)."""
        return self._next_add if self._pending else None

    def quick(self, now: float) -> SyncReport | None:
        """Delete the elements of entries that ended; every :data:`ADD_INTERVAL_S`, add
        those of watched sessions that became eligible. None when nothing was to be done."""
        delete = self._drop_ended() if self._ended else []
        add: list[Element] = []
        if self._pending and now >= self._next_add:
            self._next_add = now + ADD_INTERVAL_S
            add = self._newly_eligible(now)
        if not delete and not add:
            return None
        rep = SyncReport(removed=sum(1 for el in delete if el.set not in _PRE_ONLY))
        copies = [pre_copy(el) for el in add if el.set in _PRE_COPY]
        try:
            self._run(["nft", "-f", "-"], element_commands([*add, *copies], delete))
        except OffloadError as exc:
            self._failed(exc)
            for el in add:  # not in the kernel: the next sync adds them
                self._unlink(el)
            return rep
        rep.added = len(add)
        rep.offloaded = len(self.offloaded)
        return rep

    def _drop_ended(self) -> list[Element]:
        """Unlink ended entries from their elements: those no other entry shares go."""
        delete: list[Element] = []
        for e in self._ended:
            for el in self._of_entry.pop(id(e), ()):
                users = self.offloaded.get(el)
                if users is None:
                    continue
                users[:] = [u for u in users if u is not e]
                if not users:
                    del self.offloaded[el]
                    self.seen.pop(el, None)
                    delete.append(el)
                    if el.set in _PRE_COPY:
                        delete.append(pre_copy(el))
            self._offloaded_ids.discard(id(e))
        self._ended = []
        return delete

    def _newly_eligible(self, now: float) -> list[Element]:
        add: list[Element] = []
        filtering = self.filtering
        pending, self._pending = self._pending, deque()
        for e in pending:
            if not e.live or e.expires_at <= now:
                continue
            for el in entry_elements(e, filtering):
                users = self.offloaded.get(el)
                if users is None:
                    self.offloaded[el] = [e]
                    self.seen[el] = (0, 0)
                    add.append(el)
                elif any(u is e for u in users):
                    continue
                else:  # shared (same binding, filtering without the remote)
                    users.append(e)
                self._link(e, el)
        return add

    def _link(self, e: Entry, el: Element) -> None:
        self._of_entry.setdefault(id(e), []).append(el)
        self._offloaded_ids.add(id(e))

    def _unlink(self, el: Element) -> None:
        for e in self.offloaded.pop(el, ()):
            els = self._of_entry.get(id(e))
            if els is not None:
                els[:] = [x for x in els if x != el]
        self.seen.pop(el, None)

    # --- the sync ----------------------------------------------------------------------
    def read(self) -> dict[Element, tuple[int, int]]:
        return parse_elements(self._run(["nft", "-j", "list", "table", "ip", OFFLOAD_TABLE], None))

    def sync(self, engine: Any, now: float) -> SyncReport:
        """Credit kernel-forwarded traffic to entries, then make the maps match the table."""
        rep = SyncReport()
        t0 = _cpu_time()
        try:
            actual = self.read()
        except (OffloadError, ValueError) as exc:
            self._failed(exc)
            return rep
        self.syncs += 1
        self._ended = []  # the table below is the truth
        desired = desired_elements(_candidates(engine.table, self.filtering), now, self.filtering)
        # 1. activity: what the kernel forwarded since the last look refreshes the entries
        credited: set[int] = set()
        for el, (pk, by) in actual.items():
            base = self.seen.get(el)
            # the entries it served until now (a TCP session that just saw its FIN is no
            # longer desired, but what the kernel forwarded for it before is still its own)
            users = [u for u in self.offloaded.get(el, ()) if u.live] or desired.get(el)
            if base is not None and users and pk > base[0]:
                d = _DIRECTION.get(el.set, "")
                if d:
                    self.forwarded["offload_packets_" + d] += pk - base[0]
                    self.forwarded["offload_bytes_" + d] += max(0, by - base[1])
                _credit(engine, users[0], d, pk - base[0], by - base[1], now)
                for other in users[1:]:  # a shared inbound element: each session lives on
                    _credit(engine, other, d, 0, 0, now)
                credited.update(id(u) for u in users)
        rep.credited = len(credited)
        # 2. the maps follow the table (and the prerouting copies follow the outbound sets)
        copies = {pre_copy(el) for el in desired if el.set in _PRE_COPY}
        stale = [el for el in actual if el not in desired and el not in copies]
        new = [el for el in desired if el not in actual]
        new_copies = [el for el in copies if el not in actual]
        if stale or new or new_copies:
            try:
                self._run(["nft", "-f", "-"], element_commands([*new, *new_copies], stale))
            except OffloadError as exc:
                self._failed(exc)
                new = []  # retried next sync; counters below stay consistent
        stale = [el for el in stale if el.set not in _PRE_ONLY]  # report originals
        added = set(new)  # a set: after a refill every element is new (a list made this N**2)
        self.seen = {el: actual.get(el, (0, 0)) for el in desired if el in actual or el in added}
        self.offloaded = {el: desired[el] for el in self.seen}
        self._of_entry = {}
        self._offloaded_ids = set()
        for el, users in self.offloaded.items():
            for u in users:
                self._link(u, el)
        rep.added, rep.removed, rep.offloaded = len(new), len(stale), len(self.offloaded)
        # a read of many elements costs: read less often (never less than the margin allows)
        self.last_read_s = _cpu_time() - t0
        self.interval = min(MAX_SYNC_INTERVAL_S, max(SYNC_INTERVAL_S, 20 * self.last_read_s))
        return rep

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = str(exc).splitlines()[0][:300]

    @staticmethod
    def wants_sync(events: Iterable[object]) -> bool:
        """Whether drained engine events ended an ESP or GRE entry (sync now, not later)."""
        for ev in events:
            row = getattr(ev, "row", None)
            if type(ev).__name__ == "EntryExpired" and getattr(row, "proto", "") in ("esp", "gre"):
                return True
        return False

    # --- status ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        flows: dict[int, dict[str, Any]] = {}
        for el, users in self.offloaded.items():
            e = users[0]
            f = flows.setdefault(
                id(e),
                {
                    "proto": PROTO_NAMES.get(e.proto, e.kind) if e.kind not in ("esp", "gre") else e.kind,
                    "inside": int_to_ip(e.inside_ip),
                    "remote": int_to_ip(e.remote_ip),
                    "kernel_pkts_out": 0,
                    "kernel_pkts_in": 0,
                    "kernel_bytes_out": 0,
                    "kernel_bytes_in": 0,
                },
            )
            if el.set == "esp_in":
                f["spi_in"] = f"0x{el.key[1]:08x}"
            elif el.set == "esp_out":
                f["spi_out"] = f"0x{el.key[2]:08x}"
            elif el.set == "gre_in_call":
                f["call_id_outside"] = el.key[1]
                f["call_id_inside"] = el.value
            elif el.set == "gre_out":
                f["peer_call_id"] = el.key[2]
            elif el.set in ("napt_out", "icmp_out"):
                f["inside"] = f"{int_to_ip(e.inside_ip)}:{e.inside_port}"
                f["outside"] = f"{self.public}:{e.alias_port}"
                if el.set == "napt_out":
                    f["remote"] = f"{int_to_ip(e.remote_ip)}:{e.remote_port}"
            elif el.set == "napt_in_addr" and len(users) > 1:
                f["shared_in"] = len(users)  # the mapping lets in more remotes than this one
            d = _DIRECTION.get(el.set)
            if d is not None:
                pk, by = self.seen.get(el, (0, 0))
                f[f"kernel_pkts_{d}"] += pk
                f[f"kernel_bytes_{d}"] += by
        return {
            "enabled": True,
            "flows": sorted(flows.values(), key=lambda f: (f["proto"], f["inside"], f["remote"])),
            "elements": len(self.offloaded),
            "syncs": self.syncs,
            "interval_s": round(self.interval, 2),
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def is_offloaded(self, entry: Entry) -> bool:
        """O(1): status asks this for every row. Entries listed in ``offloaded`` stay alive
        while listed, so their ids cannot be reused by other entries."""
        return id(entry) in self._offloaded_ids


#: entry kinds the NAPT offload watches from their creation
_WATCHED = frozenset({"napt", "fwd", "icmp"})
#: the uncounted prerouting copies (never reported as offloaded flows)
_PRE_ONLY = frozenset(_PRE_COPY.values())
#: timeout classes holding entries that may be offloaded
_VPN_CLASSES = ("esp", "gre")
_NAPT_CLASSES = ("udp", "tcp_established", "icmp")


def _cpu_time() -> float:
    """CPU seconds of this process and of its finished children: a sync's cost is mostly
    the ``nft`` it runs (listing 20,000 elements: 0.4 s), which ``time.process_time()``
    does not see."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _candidates(table: Any, filtering: str | None = None) -> Iterator[Entry]:
    """The entries of the table that may be offloaded (their timeout classes), without
    walking the whole table."""
    classes = _VPN_CLASSES if filtering is None else _VPN_CLASSES + _NAPT_CLASSES
    for tclass in classes:
        yield from table.entries_of(tclass)


def _credit(engine: Any, e: Entry, direction: str, pkts: int, nbytes: int, now: float) -> None:
    table = engine.table
    table.touch(e, now)
    if e.tclass != PERMANENT:  # see CREDIT_MARGIN_S
        e.expires_at = e.expires_at + CREDIT_MARGIN_S
    if direction == "in":
        e.pkts_in += pkts
        e.bytes_in += max(0, nbytes)
        e.last_in = now
    elif direction == "out":
        e.pkts_out += pkts
        e.bytes_out += max(0, nbytes)
        e.last_out = now
    a = e.ext
    if isinstance(a, Assoc):
        a.last_seen = now
