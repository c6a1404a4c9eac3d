"""The masquerading engine: bytes in, verdict out, ``now`` passed in.

Driven by three inputs (aioquic style): ``handle(packet, direction, now)`` for each packet,
``handle_timer(now)`` when ``next_deadline()`` passes, and operator calls (``flush``,
``set_public_address``, ``snapshot``). It never reads a clock, logs or does I/O; what happened
is reported through ``counters`` and ``drain_events()``.

Plain masquerade lives here (TCP, UDP, ICMP queries and errors, other protocols by address
pair, forwards, hairpinning, fragments). VPN protocols are helpers (``vpnmasq.helpers``)
plugged in by the explicit registry.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

from vpnmasq.config import Config, Forward
from vpnmasq.conntrack.alloc import IdAllocator
from vpnmasq.conntrack.table import (
    F_FAST_IN,
    F_FAST_OUT,
    PERMANENT,
    Binding,
    Entry,
    EntryAlg,
    MasqTable,
    TableFull,
)
from vpnmasq.events import (
    AddressChanged,
    EntryCreated,
    EntryExpired,
    EntryUpdated,
    Event,
    Notice,
    PacketDropped,
    Row,
)
from vpnmasq.helpers import default_registry
from vpnmasq.helpers.base import Helper, ProtoHelper, TcpAlgFactory, UdpPortHelper
from vpnmasq.helpers.registry import HelperRegistry
from vpnmasq.packet.checksum import checksum, update16
from vpnmasq.packet.errors import MalformedPacket
from vpnmasq.packet.ipv4 import (
    PROTO_ESP,
    PROTO_GRE,
    PROTO_ICMP,
    PROTO_NAMES,
    PROTO_TCP,
    PROTO_UDP,
    IPv4,
    int_to_ip,
    ip_to_int,
)
from vpnmasq.packet.l4 import (
    ICMP_CSUM,
    ICMP_ERRORS,
    ICMP_MIN,
    ICMP_QUERIES,
    ICMP_REPLIES,
    ISAKMP_PORT,
    NATT_PORT,
    TCP_ACK,
    TCP_CSUM,
    TCP_FIN,
    TCP_MIN,
    TCP_RST,
    TCP_SYN,
    UDP_CSUM,
    UDP_MIN,
)
from vpnmasq.verdict import (
    ACCEPT_LOCAL,
    ACCEPT_UNCHANGED,
    Action,
    Direction,
    DropReason,
    Verdict,
    _make_accept,
    accept,
    drop,
)

OUT = Direction.OUTBOUND
IN = Direction.INBOUND

# TCP session states
TCP_SYN_SENT = 1
TCP_ESTABLISHED = 2
TCP_FIN_WAIT = 3
TCP_CLOSING = 4
TCP_CLOSED = 5
TCP_STATE_NAMES = {
    TCP_SYN_SENT: "SYN_SENT",
    TCP_ESTABLISHED: "ESTABLISHED",
    TCP_FIN_WAIT: "FIN_WAIT",
    TCP_CLOSING: "CLOSING",
    TCP_CLOSED: "CLOSED",
}
F_SYN_OUT = 1
F_SYN_IN = 2
F_FIN_OUT = 4
F_FIN_IN = 8

#: An inbound RST is believed only if its sequence number lies this close after the last
#: ACK the inside host sent (RFC 5382 / RFC 5961 spirit: blind RSTs must not kill mappings).
RST_WINDOW = 1 << 20
#: Largest datagram the engine will return modified (NFQUEUE copy range maximum).
MAX_PACKET = 65531
_FAST_KINDS = frozenset({"napt", "fwd"})
#: UDP ports whose inbound packets always take the slow path (IKE, NAT-T: helpers, local VPN)
_SLOW_UDP_PORTS = frozenset({ISAKMP_PORT, NATT_PORT})
#: version/IHL, total length, flags+offset, protocol, source, destination, source port,
#: destination port: one unpack for the fast path's whole parse
_FAST_HDR = struct.Struct("!BxHxxHxBxxIIHH")
_FAST_ACK = struct.Struct("!I")
#: accept() without its wrapper call, for the fast path
_accept_bytes: Callable[[bytes], Verdict] = _make_accept if _make_accept is not None else accept
#: limits.max_new_per_host_per_second is a token bucket per inside host; it holds this many
#: seconds' worth of tokens (at least one), so a burst such as a web page opening its
#: connections at once passes while a sustained flood is held to the rate.
NEW_MAPPING_BURST_S = 1.0
#: Token buckets kept at most (least recently used dropped first; a dropped bucket is simply
#: full again). Bounds the memory a LAN host forging many inside source addresses can take.
MAX_RATE_BUCKETS = 65536
#: First-fragment states kept (each maps later fragments of one datagram). A first fragment
#: is remembered for timeouts.fragment; this bounds what a flood of them can take (about
#: 150 bytes each, so some 10 MB).
MAX_FRAGMENT_STATES = 65536
#: Drops that mean "nobody on the LAN wants this inbound VPN packet": with ``local_vpn`` it
#: goes to the gateway's own VPN endpoint instead (see :meth:`Engine.drop`).
LOCAL_DELIVERY_REASONS = frozenset(
    {
        DropReason.NO_MAPPING,
        DropReason.FILTERED,
        DropReason.ESP_UNASSOCIATED,
        DropReason.GRE_UNKNOWN_CALL,
        DropReason.GRE_NOT_PPTP,
        DropReason.ISAKMP_UNKNOWN,
    }
)
#: Local VPN consumer kinds (``Engine.set_local_consumers``): IKE on UDP 500/4500 (NAT-T
#: ESP-in-UDP included), ESP (protocol 50), GRE (protocol 47).
LOCAL_VPN_KINDS = ("ike", "esp", "gre")
TCP_OPT_MSS = 2


@dataclass(slots=True)
class _FragState:
    new_src: int
    new_dst: int
    ok: bool
    expires_at: float


def _net(n: str) -> tuple[int, int]:
    net = ipaddress.IPv4Network(n, strict=False)
    return int(net.network_address), int(net.netmask)


class Engine:
    """The pure masquerading engine. See the module docstring."""

    def __init__(
        self,
        config: Config,
        public_ip: int | None = None,
        *,
        rng_seed: int | None = None,
        registry: HelperRegistry | None = None,
    ) -> None:
        self.config = config
        if public_ip is None and config.public_address:
            public_ip = ip_to_int(config.public_address)
        self.public_ip = public_ip
        self._inside = [_net(n) for n in config.inside_networks]
        self._exempt = [_net(n) for n in config.exempt_networks]
        t = config.timeouts
        self.timeouts: dict[str, float] = {
            "udp": t.udp,
            "tcp_established": t.tcp_established,
            "tcp_transitory": t.tcp_transitory,
            "tcp_closed": t.tcp_closed,
            "icmp": t.icmp,
            "generic": t.generic,
            "isakmp": t.isakmp,
            "esp": t.esp,
            "esp_pending": t.esp_pending,
            "gre": t.gre,
            "pptp_control": t.pptp_control,
            "fragment": t.fragment,
        }
        self.table = MasqTable(
            self.timeouts,
            config.limits.max_entries,
            config.limits.max_entries_per_host,
            on_remove=self._on_remove,
        )
        self.rng = random.Random(rng_seed)
        ranges = list(config.alias_port_ranges)
        self.ports: dict[int, IdAllocator] = {
            PROTO_TCP: IdAllocator(ranges, self.rng, preserve=config.preserve_ports),
            PROTO_UDP: IdAllocator(
                ranges,
                self.rng,
                preserve=config.preserve_ports,
                always_preserve=frozenset({NATT_PORT}) if "natt" in config.helpers else frozenset(),
            ),
        }
        ir = config.icmp_id_range
        self.icmp_ids = IdAllocator([(ir.low, ir.high)], self.rng, preserve=config.preserve_ports)
        self.counters: dict[str, int] = {}
        #: take :meth:`_fast` for established TCP/UDP flows (tests compare it with the slow path)
        self.fast_path = True
        self._fast_pub: tuple[int | None, bytes, int] = (None, b"", 0)
        self.events: list[Event] = []
        self._frags: OrderedDict[tuple[Any, ...], _FragState] = OrderedDict()
        self._held: dict[tuple[Any, ...], list[tuple[object, bytes, float]]] = {}
        self._held_count = 0
        self._held_order: OrderedDict[tuple[Any, ...], float] = OrderedDict()
        # limits.max_new_per_host_per_second: host -> (tokens, time of the last refill)
        self._buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()
        self._new_rate = float(config.limits.max_new_per_host_per_second)
        self._new_burst = max(1.0, self._new_rate * NEW_MAPPING_BURST_S)
        # source of the outbound packet being handled: the host new entries are charged to
        self._charge_to: int | None = None

        # forwards: static bindings for port forwards, rules for protocol forwards
        self.forwards: list[Forward] = sorted(
            config.forwards, key=lambda f: (f.port is None, f.remote is None)
        )
        self._fwd_nets: dict[Forward, tuple[int, int] | None] = {
            f: (_net(f.remote) if f.remote else None) for f in self.forwards
        }
        self._fwd_bindings: dict[Forward, Binding] = {}
        for f in self.forwards:
            pn = f.proto_number
            if f.port is not None and pn in self.ports:
                self.ports[pn].reserve(f.port)
                b = Binding(pn, ip_to_int(f.to), f.to_port or f.port, f.port, static=True)
                self._fwd_bindings[f] = b
                if self.table.binding(pn, b.inside_ip, b.inside_port) is None:
                    self.table.bindings[(pn, b.inside_ip, b.inside_port)] = b

        # helpers, explicitly selected by name
        reg = registry if registry is not None else default_registry()
        self.proto_helpers: dict[int, ProtoHelper] = {}
        self.udp_helpers: dict[int, UdpPortHelper] = {}
        self.tcp_algs: dict[int, TcpAlgFactory] = {}
        self.kind_helpers: dict[str, Helper] = {}
        self.helper_by_name: dict[str, Helper] = {}
        for spec, inst in reg.build(config.helpers, self):
            self.helper_by_name[spec.name] = inst
            # a helper may declare timeout classes of its own (e.g. "esp_wait"); config wins
            for tclass, secs in inst.timeout_classes.items():
                self.timeouts.setdefault(tclass, secs)
                self.table.timeouts.setdefault(tclass, secs)
            if isinstance(inst, ProtoHelper):
                self.proto_helpers[spec.proto] = inst
            elif isinstance(inst, UdpPortHelper):
                assert spec.port is not None
                self.udp_helpers[spec.port] = inst
                if spec.port == ISAKMP_PORT:
                    self.ports[PROTO_UDP].reserve(ISAKMP_PORT)
            elif isinstance(inst, TcpAlgFactory):
                assert spec.port is not None
                self.tcp_algs[spec.port] = inst
            for kind in inst.kinds:
                self.kind_helpers[kind] = inst

        # [[route]] networks are routed, never masqueraded; MSS clamping; inbound
        # VPN packets nobody on the LAN wants may go to the gateway's own VPN endpoint
        self._routed = [_net(r.network) for r in config.routes]
        self.mss_clamp = config.mss_clamp
        self.local_consumers: frozenset[str] = frozenset()
        self._local_kind: str | None = None  # set while an inbound VPN packet is handled
        self._local_any = False  # some kind is delivered locally (cheap test per packet)
        self._sync_local()

    # ------------------------------------------------------------------ utilities
    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def drop(self, reason: DropReason, detail: str, ip: IPv4 | None = None) -> Verdict:
        if self._local_kind is not None and reason in LOCAL_DELIVERY_REASONS:
            # an inbound VPN packet no LAN host or forward claims, and the gateway has its
            # own endpoint for the protocol (local_vpn): let the kernel deliver it locally
            self.count("local_vpn:" + self._local_kind)
            return ACCEPT_LOCAL
        self.counters["dropped"] = self.counters.get("dropped", 0) + 1
        key = "drop:" + reason.value
        self.counters[key] = self.counters.get(key, 0) + 1
        self.events.append(PacketDropped(reason.value, detail, describe(ip) if ip else ""))
        return drop(reason, detail)

    def set_state(self, entry: Entry, name: str) -> None:
        """Name ``entry``'s state; a change of an entry in the table is reported
        (:class:`EntryUpdated`). Helpers name states through here."""
        old = entry.state_name
        if name != old:
            entry.state_name = name
            if self.table.holds(entry):
                self.events.append(EntryUpdated(entry, old, name))

    def notice(self, topic: str, message: str) -> None:
        self.events.append(Notice(topic, message))

    def drain_events(self) -> list[Event]:
        ev, self.events = self.events, []
        return ev

    def is_inside(self, addr: int) -> bool:
        for net, mask in self._inside:
            if addr & mask == net:
                return True
        return False

    def is_routed(self, addr: int) -> bool:
        """``addr`` is in a [[route]] network (behind a LAN VPN router): never masqueraded."""
        for net, mask in self._routed:
            if addr & mask == net:
                return True
        return False

    # --- the gateway's own VPN endpoint (config local_vpn) --------------------------------
    def set_local_consumers(self, kinds: frozenset[str] | set[str] | tuple[str, ...]) -> None:
        """Operator input (the daemon, from what runs on the gateway): which VPN protocols
        have a local consumer ("ike", "esp", "gre"). Used by ``local_vpn = "auto"``."""
        unknown = set(kinds) - set(LOCAL_VPN_KINDS)
        if unknown:
            raise ValueError(f"unknown local VPN kinds {sorted(unknown)}; known: {LOCAL_VPN_KINDS}")
        self.local_consumers = frozenset(kinds)
        self._sync_local()

    def delivers_locally(self, kind: str) -> bool:
        """Whether unclaimed inbound traffic of ``kind`` goes to the gateway itself."""
        policy = self.config.local_vpn
        if policy == "always":
            return True
        return policy == "auto" and kind in self.local_consumers

    def _sync_local(self) -> None:
        self._local_any = any(self.delivers_locally(k) for k in LOCAL_VPN_KINDS)
        ike = self.helper_by_name.get("isakmp")
        if ike is not None:
            ike.set_local_delivery(self.delivers_locally("ike"))

    def _local_vpn_kind(self, ip: IPv4) -> str | None:
        """The local-VPN kind of an inbound packet to the public address, if it is enabled."""
        p = ip.proto
        if p == PROTO_ESP:
            kind = "esp"
        elif p == PROTO_GRE:
            kind = "gre"
        elif p == PROTO_UDP and ip.frag_offset == 0 and ip.l4_len >= 4:
            if ip.u16(2) not in _SLOW_UDP_PORTS:
                return None
            kind = "ike"
        else:
            return None
        return kind if self.delivers_locally(kind) else None

    def is_exempt(self, addr: int) -> bool:
        for net, mask in self._exempt:
            if addr & mask == net:
                return True
        return False

    def add_entry(self, entry: Entry, now: float, keys: tuple[Hashable, ...]) -> Verdict | None:
        """Insert a new entry; a drop Verdict if the table (or the host's share) is full, or
        if the inside host that sent the packet opens new mappings faster than
        ``limits.max_new_per_host_per_second`` (entries a packet from outside creates, such as
        forwarded sessions, are not charged to the inside host: outsiders cannot spend it)."""
        charged = self._new_rate > 0 and entry.inside_ip == self._charge_to
        if charged and not self._bucket_has_token(entry.inside_ip, now):
            self.count("rate_limited")
            return self.drop(
                DropReason.HOST_LIMIT,
                f"{int_to_ip(entry.inside_ip)} opens new mappings faster than "
                f"limits.max_new_per_host_per_second = {self._new_rate:g}: no new "
                f"{PROTO_NAMES.get(entry.proto, entry.proto)} flow to {int_to_ip(entry.remote_ip)}",
            )
        try:
            self.table.add(entry, now, keys)
        except TableFull as exc:
            reason = DropReason.HOST_LIMIT if "host" in str(exc) else DropReason.TABLE_FULL
            return self.drop(
                reason,
                f"{exc}: {self.table.count} entries, no new {PROTO_NAMES.get(entry.proto, entry.proto)}"
                f" flow for {int_to_ip(entry.inside_ip)}",
            )
        if charged:
            tokens, at = self._buckets[entry.inside_ip]
            self._buckets[entry.inside_ip] = (tokens - 1.0, at)
        self.created(entry, now)
        return None

    def created(self, entry: Entry, now: float) -> None:
        self.count("created:" + entry.kind)
        self.events.append(EntryCreated(self.row(entry, now)))

    def _bucket_has_token(self, host: int, now: float) -> bool:
        """Refill ``host``'s token bucket up to ``now``; True if a token is available."""
        b = self._buckets.get(host)
        if b is None:
            tokens = self._new_burst
            if len(self._buckets) >= MAX_RATE_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            tokens = min(self._new_burst, b[0] + max(0.0, now - b[1]) * self._new_rate)
            self._buckets.move_to_end(host)
        self._buckets[host] = (tokens, max(now, b[1]) if b is not None else now)
        return tokens >= 1.0

    def row(self, entry: Entry, now: float) -> Row:
        h = self.kind_helpers.get(entry.kind)
        detail: dict[str, str] = {}
        if h is not None:
            detail = h.detail(entry, now)
        elif entry.alg is not None:
            detail = entry.alg.detail(entry, now)
        return entry.row(now, detail)

    def _on_remove(self, entry: Entry, why: str) -> None:
        b = entry.binding
        if b is not None and not b.sessions and not b.static:
            self.table.drop_binding(b)
            if entry.proto == PROTO_ICMP:
                self.icmp_ids.release(b.alias_port)
            else:
                alloc = self.ports.get(entry.proto)
                if alloc is not None:
                    alloc.release(b.alias_port)
        h = self.kind_helpers.get(entry.kind)
        if h is not None:
            h.on_remove(entry, why)
        if entry.alg is not None:
            entry.alg.on_remove(entry, why)
        self.count("expired:" + entry.kind if why == "idle" else "removed:" + entry.kind)
        self.events.append(EntryExpired(entry.row(0.0 if why != "idle" else entry.expires_at), why))

    # ------------------------------------------------------------------ inputs
    def handle(
        self, packet: bytes | bytearray, direction: Direction, now: float, token: object = None
    ) -> Verdict:
        """Translate one IPv4 datagram. Always returns a Verdict (malformed -> counted drop)."""
        if self.fast_path:
            fv = self._fast(packet, direction, now)
            if fv is not None:
                return fv
        try:
            buf = bytearray(packet)
            self._charge_to = None
            ip = IPv4(buf)
            if direction is OUT:
                self.counters["packets_out"] = self.counters.get("packets_out", 0) + 1
                self._charge_to = ip.src
            else:
                self.counters["packets_in"] = self.counters.get("packets_in", 0) + 1
                if self._local_any and ip.dst == self.public_ip:
                    self._local_kind = self._local_vpn_kind(ip)
            if ip.frag_offset or ip.more_fragments:
                return self._fragment(ip, direction, now, token)
            return self._dispatch(ip, direction, now)
        except MalformedPacket as exc:
            return self.drop(DropReason.MALFORMED, exc.reason)
        finally:
            self._charge_to = None
            self._local_kind = None

    def handle_timer(self, now: float) -> list[tuple[object, Verdict]]:
        """Expire idle entries and stale fragment state; return verdicts for held packets."""
        self.table.expire(now)
        for h in self.helper_by_name.values():
            h.handle_timer(now)
        return self._expire_frags(now)

    def next_deadline(self) -> float | None:
        cands = [self.table.next_deadline()]
        if self._frags:
            cands.append(next(iter(self._frags.values())).expires_at)
        if self._held_order:
            cands.append(next(iter(self._held_order.values())))
        for h in self.helper_by_name.values():
            cands.append(h.next_deadline())
        vals = [c for c in cands if c is not None]
        return min(vals) if vals else None

    def set_public_address(self, ip: int | None, now: float) -> None:
        """Follow a change of the public address (policy ``on_address_change``)."""
        old = self.public_ip
        if ip == old:
            return
        self.public_ip = ip
        dropped = 0
        if self.config.on_address_change == "flush" or ip is None:
            for e in list(self.table):
                if e.tclass != PERMANENT:
                    self.table.remove(e, "address-change")
                    dropped += 1
            self._frags.clear()
        else:
            for e in self.table:
                e.alias_ip = ip
        self.events.append(
            AddressChanged(int_to_ip(old) if old else None, int_to_ip(ip) if ip else None, dropped)
        )

    def flush(self) -> int:
        n = 0
        for e in list(self.table):
            if e.tclass != PERMANENT:
                self.table.remove(e, "flush")
                n += 1
        return n

    def snapshot(
        self, now: float, offloaded: Callable[[Entry], bool] | None = None
    ) -> list[Row]:
        """The live entries as rows; ``offloaded`` (the datapath's answer for an entry the
        kernel now forwards itself) sets Row.offloaded."""
        rows = []
        for e in self.table:
            if e.expires_at > now:
                r = self.row(e, now)
                if offloaded is not None and offloaded(e):
                    r = replace(r, offloaded=True)
                rows.append(r)
        return rows

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, ip: IPv4, direction: Direction, now: float) -> Verdict:
        pub = self.public_ip
        proto = ip.proto
        if direction is OUT:
            src = ip.src
            if not self.is_inside(src):
                if self.is_exempt(src):
                    return ACCEPT_UNCHANGED
                if proto == PROTO_ICMP:  # the gateway's own ICMP errors
                    return self._icmp_error_local(ip, now)
                return self.drop(DropReason.NOT_INSIDE, f"source {int_to_ip(src)} is not inside", ip)
            if self._exempt and self.is_exempt(src):
                return ACCEPT_UNCHANGED
            if self._routed and self.is_routed(ip.dst):
                self.count("routed")
                return ACCEPT_UNCHANGED  # to a [[route]] network: routed, never masqueraded
            if pub is None:
                return self.drop(DropReason.NO_ADDRESS, "no public address yet", ip)
            if ip.dst == pub:
                return self._hairpin(ip, now)
            if proto == PROTO_TCP:
                return self._tcp_out(ip, now)
            if proto == PROTO_UDP:
                return self._udp_out(ip, now)
            if proto == PROTO_ICMP:
                return self._icmp_out(ip, now)
            h = self.proto_helpers.get(proto)
            if h is not None:
                v: Verdict = h.outbound(ip, now)
                return v
            return self._generic_out(ip, now)
        # inbound
        if pub is None or ip.dst != pub:
            return ACCEPT_LOCAL
        if proto == PROTO_TCP:
            return self._tcp_in(ip, now)
        if proto == PROTO_UDP:
            return self._udp_in(ip, now)
        if proto == PROTO_ICMP:
            return self._icmp_in(ip, now)
        h = self.proto_helpers.get(proto)
        if h is not None:
            v = h.inbound(ip, now)
            return v
        return self._generic_in(ip, now)

    # ------------------------------------------------------------------ fast path
    def _fast(self, packet: bytes | bytearray, direction: Direction, now: float) -> Verdict | None:
        """Established TCP/UDP flows, without the parse-dispatch-lookup chain: the verdict the
        slow path would give, or None to take the slow path.

        Only what the slow path marked (``F_FAST_OUT``/``F_FAST_IN`` in ``entry.flags``, set
        after it translated a packet of that flow direction: plain NAPT or a forward, no
        payload helper, TCP established), and only unfragmented datagrams without IP options
        whose TCP segment carries no SYN, FIN or RST (those change state). The rewrite and
        the RFC 1624 checksum updates are the slow path's, applied in the same order, so the
        bytes are identical (tests/property/test_fast_path.py checks this on random traffic).
        """
        n = len(packet)
        if n < 28:
            return None
        vihl, tlen, frag, proto, src, dst, sport, dport = _FAST_HDR.unpack_from(packet)
        if vihl != 0x45 or tlen != n or frag & 0x3FFF:
            return None
        if proto == PROTO_TCP:
            if n < 40:
                return None
            tflags = packet[33]
            if tflags & (TCP_SYN | TCP_FIN | TCP_RST):
                return None
            coff = 36
        elif proto == PROTO_UDP:
            coff = 26
        else:
            return None
        pub = self.public_ip
        if pub is None:
            return None
        table = self.table
        if direction is OUT:
            if dst == pub:
                return None  # hairpin
            e = table.index.get(("o", proto, src, sport, dst, dport))
            if e is None or not e.flags & F_FAST_OUT or e.expires_at <= now:
                return None
            if proto == PROTO_TCP and e.state != TCP_ESTABLISHED:
                return None
            fp = self._fast_pub
            if fp[0] != pub:
                fp = self._fast_pub = (pub, pub.to_bytes(4, "big"), (pub >> 16) + (pub & 0xFFFF))
            x = src ^ 0xFFFFFFFF
            d = (x >> 16) + (x & 0xFFFF) + fp[2]  # RFC 1624: ~old + new, old = src, new = pub
            buf = bytearray(packet)
            buf[12:16] = fp[1]
            old_port, new_port, port_at = sport, e.alias_port, 20
        else:
            if dst != pub or (proto == PROTO_UDP and (dport in _SLOW_UDP_PORTS or dport in self.udp_helpers)):
                return None
            e = table.index.get(("i", proto, dport, src, sport))
            if e is None or not e.flags & F_FAST_IN or e.expires_at <= now:
                return None
            if proto == PROTO_TCP and e.state != TCP_ESTABLISHED:
                return None
            new = e.inside_ip
            x = dst ^ 0xFFFFFFFF
            d = (x >> 16) + (x & 0xFFFF) + (new >> 16) + (new & 0xFFFF)
            buf = bytearray(packet)
            buf[16:20] = new.to_bytes(4, "big")
            old_port, new_port, port_at = dport, e.inside_port, 22
        # IP header checksum (address change)
        s = ((buf[10] << 8) | buf[11]) ^ 0xFFFF
        s += d
        s = (s & 0xFFFF) + (s >> 16)
        s = ((s & 0xFFFF) + (s >> 16)) ^ 0xFFFF
        buf[10] = s >> 8
        buf[11] = s & 0xFF
        # transport checksum: pseudo-header address, then the port (UDP 0 = no checksum)
        c = (buf[coff] << 8) | buf[coff + 1]
        if proto == PROTO_TCP or c:
            s = (c ^ 0xFFFF) + d
            s = (s & 0xFFFF) + (s >> 16)
            c = ((s & 0xFFFF) + (s >> 16)) ^ 0xFFFF
            if proto == PROTO_UDP and not c:
                c = 0xFFFF
            if old_port != new_port:
                s = (c ^ 0xFFFF) + (old_port ^ 0xFFFF) + new_port
                s = (s & 0xFFFF) + (s >> 16)
                c = ((s & 0xFFFF) + (s >> 16)) ^ 0xFFFF
                if proto == PROTO_UDP and not c:
                    c = 0xFFFF
            buf[coff] = c >> 8
            buf[coff + 1] = c & 0xFF
        if old_port != new_port:
            buf[port_at] = new_port >> 8
            buf[port_at + 1] = new_port & 0xFF
        # bookkeeping, as the slow path does it. MasqTable.touch inline: the deadline moves
        # (one shared float per class and ``now``), the entry keeps its place in its list
        counters = self.counters
        tclass = e.tclass
        if tclass != PERMANENT:
            d = table._exp.get(tclass) if now == table._exp_now else None
            if d is None or d < e._ldl:
                table.touch(e, now)
            else:
                e.expires_at = d
        if direction is OUT:
            counters["packets_out"] = counters.get("packets_out", 0) + 1
            if proto == PROTO_TCP:
                e.last_ack_out = _FAST_ACK.unpack_from(buf, 28)[0] if tflags & TCP_ACK else -1
            e.pkts_out += 1
            e.last_out = now
            e.bytes_out += n
        else:
            counters["packets_in"] = counters.get("packets_in", 0) + 1
            e.pkts_in += 1
            e.last_in = now
            e.bytes_in += n
        return _accept_bytes(bytes(buf))

    # ------------------------------------------------------------------ TCP / UDP
    def _tcp_out(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(TCP_MIN)
        buf = ip.buf
        sport = (buf[off] << 8) | buf[off + 1]
        dport = (buf[off + 2] << 8) | buf[off + 3]
        e = self.table.get(("o", PROTO_TCP, ip.src, sport, ip.dst, dport), now)
        if e is None:
            r = self._new_session(ip, PROTO_TCP, sport, dport, now)
            if isinstance(r, Verdict):
                return r
            e = r
        tflags = buf[off + 13]
        e.last_ack_out = int.from_bytes(buf[off + 8 : off + 12], "big") if tflags & TCP_ACK else -1
        self._tcp_track(e, tflags, OUT, now)
        ip.set_src(self.public_ip)  # type: ignore[arg-type]
        if e.alias_port != sport:
            ip.set_l4_u16(0, e.alias_port, TCP_CSUM)
        if self.mss_clamp and tflags & TCP_SYN:
            self.clamp_mss(ip, off)
        e.pkts_out += 1
        e.last_out = now
        e.bytes_out += ip.total_len
        if e.alg is None and e.state == TCP_ESTABLISHED and e.kind in _FAST_KINDS:
            self.table.mark_fast(e, F_FAST_OUT)
        if e.alg is not None:
            doff = (buf[off + 12] >> 4) * 4
            if doff < TCP_MIN or off + doff > ip.total_len:
                return self.drop(DropReason.MALFORMED, "tcp: bad data offset", ip)
            ov = e.alg.outbound(ip, e, off + doff, now)
            if ov is not None:
                return ov
        return accept(buf)

    def _tcp_in(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(TCP_MIN)
        buf = ip.buf
        sport = (buf[off] << 8) | buf[off + 1]
        dport = (buf[off + 2] << 8) | buf[off + 3]
        e = self.table.get(("i", PROTO_TCP, dport, ip.src, sport), now)
        tflags = buf[off + 13]
        if e is None:
            r = self._inbound_new(ip, PROTO_TCP, sport, dport, now, syn=bool(tflags & TCP_SYN))
            if isinstance(r, Verdict):
                return r
            e = r
        if tflags & TCP_RST:
            # (also once closed: a blind RST must not keep a dead mapping alive either)
            seq = int.from_bytes(buf[off + 4 : off + 8], "big")
            if e.last_ack_out >= 0 and (seq - e.last_ack_out) % (1 << 32) >= RST_WINDOW:
                self.count("tcp_rst_out_of_window")
                return self.drop(DropReason.FILTERED, "tcp RST outside the window ignored", ip)
        elif tflags & TCP_FIN and e.last_ack_out >= 0:
            # a blind FIN must not move the session to the short transitory timeout, end a
            # PPTP control connection's calls, or keep a closing mapping alive (RFC 5382). A
            # FIN is believed within RST_WINDOW of the last ACK the inside host sent, either
            # side of it: a retransmitted FIN (or data + FIN) lies just before that ACK
            seq = int.from_bytes(buf[off + 4 : off + 8], "big")
            ahead = (seq - e.last_ack_out) % (1 << 32)
            if ahead >= RST_WINDOW and (1 << 32) - ahead > RST_WINDOW:
                self.count("tcp_fin_out_of_window")
                return self.drop(DropReason.FILTERED, "tcp FIN outside the window ignored", ip)
        self._tcp_track(e, tflags, IN, now)
        ip.set_dst(e.inside_ip)
        if e.inside_port != dport:
            ip.set_l4_u16(2, e.inside_port, TCP_CSUM)
        if self.mss_clamp and tflags & TCP_SYN:
            self.clamp_mss(ip, off)
        e.pkts_in += 1
        e.last_in = now
        e.bytes_in += ip.total_len
        if e.alg is None and e.state == TCP_ESTABLISHED and e.kind in _FAST_KINDS:
            self.table.mark_fast(e, F_FAST_IN)
        if e.alg is not None:
            doff = (buf[off + 12] >> 4) * 4
            if doff < TCP_MIN or off + doff > ip.total_len:
                return self.drop(DropReason.MALFORMED, "tcp: bad data offset", ip)
            iv = e.alg.inbound(ip, e, off + doff, now)
            if iv is not None:
                return iv
        return accept(buf)

    def clamp_mss(self, ip: IPv4, off: int) -> bool:
        """Lower the MSS option of a TCP SYN at ``off`` to ``mss_clamp`` (RFC 1624 update of
        the TCP checksum; a field at an odd offset is summed byte-swapped). True if changed."""
        buf = ip.buf
        doff = (buf[off + 12] >> 4) * 4
        end = min(off + doff, ip.total_len)
        i = off + TCP_MIN
        while i < end:
            kind = buf[i]
            if kind == 0:  # end of option list
                return False
            if kind == 1:  # NOP
                i += 1
                continue
            if i + 1 >= end or buf[i + 1] < 2 or i + buf[i + 1] > end:
                return False  # malformed options: leave them alone
            if kind == TCP_OPT_MSS and buf[i + 1] == 4:
                old = (buf[i + 2] << 8) | buf[i + 3]
                if old <= self.mss_clamp:
                    return False
                new = self.mss_clamp
                buf[i + 2] = new >> 8
                buf[i + 3] = new & 0xFF
                c = off + TCP_CSUM
                csum = (buf[c] << 8) | buf[c + 1]
                if (i + 2 - off) & 1:  # odd offset within the segment
                    old = ((old & 0xFF) << 8) | (old >> 8)
                    new = ((new & 0xFF) << 8) | (new >> 8)
                csum = update16(csum, old, new)
                buf[c] = csum >> 8
                buf[c + 1] = csum & 0xFF
                self.count("mss_clamped")
                return True
            i += buf[i + 1]
        return False

    def _tcp_track(self, e: Entry, tflags: int, direction: Direction, now: float) -> None:
        st = e.state
        if tflags & TCP_RST:
            e.state = TCP_CLOSED
        else:
            if tflags & TCP_SYN:
                e.flags |= F_SYN_OUT if direction is OUT else F_SYN_IN
            if tflags & TCP_FIN:
                e.flags |= F_FIN_OUT if direction is OUT else F_FIN_IN
            f = e.flags
            if f & F_FIN_OUT and f & F_FIN_IN:
                e.state = TCP_CLOSING
            elif f & (F_FIN_OUT | F_FIN_IN):
                e.state = TCP_FIN_WAIT
            elif (f & F_SYN_OUT and f & F_SYN_IN) or (
                st == TCP_SYN_SENT and not f & (F_SYN_OUT | F_SYN_IN) and direction is IN
            ):
                # both SYNs seen, or a mid-stream pickup answered by the remote
                e.state = TCP_ESTABLISHED
            elif st == 0:
                e.state = TCP_SYN_SENT
        if e.state != st:
            self.set_state(e, TCP_STATE_NAMES[e.state])
            if e.state == TCP_ESTABLISHED:
                tclass = "pptp_control" if e.alg is not None else "tcp_established"
            elif e.state == TCP_CLOSED:
                tclass = "tcp_closed"
            else:
                tclass = "tcp_transitory"
            self.table.set_class(e, tclass, now)
        else:
            self.table.touch(e, now)

    def _udp_out(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(UDP_MIN)
        buf = ip.buf
        sport = (buf[off] << 8) | buf[off + 1]
        dport = (buf[off + 2] << 8) | buf[off + 3]
        e = self.table.get(("o", PROTO_UDP, ip.src, sport, ip.dst, dport), now)
        if e is None:
            h = self.udp_helpers.get(sport)
            if h is not None:
                hv: Verdict | None = h.outbound(ip, sport, dport, now)
                if hv is not None:
                    return hv
            r = self._new_session(ip, PROTO_UDP, sport, dport, now)
            if isinstance(r, Verdict):
                return r
            e = r
        elif e.kind != "napt" and e.kind != "fwd":
            h = self.udp_helpers.get(sport)
            if h is not None:
                hv = h.outbound(ip, sport, dport, now)
                if hv is not None:
                    return hv
        self.table.touch(e, now)
        ip.set_src(self.public_ip)  # type: ignore[arg-type]
        if e.alias_port != sport:
            ip.set_l4_u16(0, e.alias_port, UDP_CSUM)
        e.pkts_out += 1
        e.last_out = now
        e.bytes_out += ip.total_len
        if e.alg is None and e.kind in _FAST_KINDS:
            self.table.mark_fast(e, F_FAST_OUT)
        if e.alg is not None:
            ov = e.alg.outbound(ip, e, off + UDP_MIN, now)
            if ov is not None:
                return ov
        return accept(buf)

    def _udp_in(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(UDP_MIN)
        buf = ip.buf
        sport = (buf[off] << 8) | buf[off + 1]
        dport = (buf[off + 2] << 8) | buf[off + 3]
        h = self.udp_helpers.get(dport)
        if h is not None:
            hv: Verdict | None = h.inbound(ip, sport, dport, now)
            if hv is not None:
                return hv
        e = self.table.get(("i", PROTO_UDP, dport, ip.src, sport), now)
        if e is None:
            r = self._inbound_new(ip, PROTO_UDP, sport, dport, now)
            if isinstance(r, Verdict):
                return r
            e = r
        self.table.touch(e, now)  # inbound refresh (RFC 4787 REQ-6 MAY)
        ip.set_dst(e.inside_ip)
        if e.inside_port != dport:
            ip.set_l4_u16(2, e.inside_port, UDP_CSUM)
        e.pkts_in += 1
        e.last_in = now
        e.bytes_in += ip.total_len
        if e.alg is None and e.kind in _FAST_KINDS:
            self.table.mark_fast(e, F_FAST_IN)
        if e.alg is not None:
            iv = e.alg.inbound(ip, e, off + UDP_MIN, now)
            if iv is not None:
                return iv
        return accept(buf)

    def _new_session(
        self, ip: IPv4, proto: int, sport: int, dport: int, now: float
    ) -> Entry | Verdict:
        """Outbound packet with no session: find or create the EIM binding, add a session."""
        src, dst = ip.src, ip.dst
        b = self.table.binding(proto, src, sport)
        new_binding = b is None
        if b is None:
            alloc = self.ports[proto]
            alias = alloc.allocate(sport)
            if alias is None:
                return self.drop(
                    DropReason.PORTS_EXHAUSTED,
                    f"no free {PROTO_NAMES[proto]} port for {int_to_ip(src)}:{sport}",
                    ip,
                )
            b = Binding(proto, src, sport, alias)
            self.table.add_binding(b)
        tclass = "udp" if proto == PROTO_UDP else "tcp_transitory"
        e = Entry(
            proto, "fwd" if b.static else "napt", tclass, src, sport, dst, dport,
            self.public_ip or 0, b.alias_port, now,
        )
        v = self.add_entry(
            e, now, (("o", proto, src, sport, dst, dport), ("i", proto, b.alias_port, dst, dport))
        )
        if v is not None:
            if new_binding:
                self.table.drop_binding(b)
                self.ports[proto].release(b.alias_port)
            return v
        self.table.attach(e, b)
        if proto == PROTO_TCP:
            alg = self.tcp_algs.get(dport)
            if alg is not None:
                e.alg = alg.attach(e, now, server_inside=False)
        else:
            e.alg = self._udp_watch(e, sport, dport, now, server_inside=False)
        return e

    def _udp_watch(
        self, e: Entry, inside_port: int, remote_port: int, now: float, *, server_inside: bool
    ) -> EntryAlg | None:
        """A udp-port helper may watch plain NAPT sessions on its port (NAT-T on 4500 labels
        IKE, ESP-in-UDP and keepalives); ``entry.alg`` then sees every packet."""
        for port in (inside_port, remote_port):
            h = self.udp_helpers.get(port)
            if h is not None:
                return h.attach(e, now, server_inside=server_inside)
        return None

    def _inbound_new(
        self, ip: IPv4, proto: int, sport: int, dport: int, now: float, syn: bool = True
    ) -> Entry | Verdict:
        """Inbound packet with no session: filtering policy, then forwards (most specific)."""
        src = ip.src
        b = self.table.binding_by_alias(proto, dport)
        if b is not None and not b.static:
            filt = self.config.filtering
            if filt == "endpoint-independent" or (
                filt == "address-dependent" and src in b.remotes
            ):
                return self._add_inbound_session(ip, b, proto, sport, dport, now, "napt")
            return self.drop(
                DropReason.FILTERED,
                f"{PROTO_NAMES[proto]} {int_to_ip(src)}:{sport} -> port {dport}: mapping of "
                f"{int_to_ip(b.inside_ip)}:{b.inside_port} does not accept this remote ({filt})",
                ip,
            )
        fwd = self.match_forward(proto, dport, src)
        if fwd is not None:
            fb = self._fwd_bindings.get(fwd)
            new_fb = False
            if fb is None:  # whole-protocol forward: a dynamic binding to the same port
                fb = self.table.binding(proto, ip_to_int(fwd.to), dport)
                if fb is None:
                    if not self.ports[proto].take(dport):
                        return self.drop(DropReason.PORTS_EXHAUSTED, f"port {dport} in use", ip)
                    fb = Binding(proto, ip_to_int(fwd.to), dport, dport)
                    self.table.add_binding(fb)
                    new_fb = True
            r = self._add_inbound_session(ip, fb, proto, sport, dport, now, "fwd")
            if isinstance(r, Verdict) and new_fb:
                # refused (table or host share full): give the port back, or every refused
                # packet to a new port would keep one taken for good
                self.table.drop_binding(fb)
                self.ports[proto].release(dport)
            return r
        return self.drop(
            DropReason.NO_MAPPING,
            f"unsolicited {PROTO_NAMES[proto]} from {int_to_ip(src)}:{sport} to port {dport}",
            ip,
        )

    def _add_inbound_session(
        self, ip: IPv4, b: Binding, proto: int, sport: int, dport: int, now: float, kind: str
    ) -> Entry | Verdict:
        tclass = "udp" if proto == PROTO_UDP else "tcp_transitory"
        e = Entry(
            proto, kind, tclass, b.inside_ip, b.inside_port, ip.src, sport,
            self.public_ip or 0, b.alias_port, now,
        )
        v = self.add_entry(
            e,
            now,
            (
                ("o", proto, b.inside_ip, b.inside_port, ip.src, sport),
                ("i", proto, b.alias_port, ip.src, sport),
            ),
        )
        if v is not None:
            return v
        self.table.attach(e, b)
        if proto == PROTO_TCP:
            alg = self.tcp_algs.get(b.inside_port)
            if alg is not None:
                e.alg = alg.attach(e, now, server_inside=True)
        else:
            e.alg = self._udp_watch(e, b.inside_port, sport, now, server_inside=True)
        return e

    def match_forward(self, proto: int, port: int | None, remote: int) -> Forward | None:
        """The most specific forward for (proto, port) from ``remote``: port+remote, port,
        protocol+remote, protocol."""
        for f in self.forwards:
            if f.proto_number != proto:
                continue
            if f.port is not None and f.port != port:
                continue
            net = self._fwd_nets[f]
            if net is not None and remote & net[1] != net[0]:
                continue
            return f
        return None

    # ------------------------------------------------------------------ ICMP
    def _icmp_out(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(ICMP_MIN)
        buf = ip.buf
        itype = buf[off]
        if itype in ICMP_ERRORS:
            return self._icmp_error_out(ip, off, now)
        if itype not in ICMP_QUERIES:
            if itype in ICMP_REPLIES:  # a reply with no query seen through us
                return self.drop(
                    DropReason.FILTERED, "icmp reply from inside with no query seen", ip
                )
            return self.drop(DropReason.FILTERED, f"icmp type {itype} not masqueraded", ip)
        ident = (buf[off + 4] << 8) | buf[off + 5]
        e = self.table.get(("o", PROTO_ICMP, ip.src, ident, ip.dst, 0), now)
        if e is None:
            b = self.table.binding(PROTO_ICMP, ip.src, ident)
            new_b = b is None
            if b is None:
                alias = self.icmp_ids.allocate(ident)
                if alias is None:
                    return self.drop(DropReason.PORTS_EXHAUSTED, "no free ICMP id", ip)
                b = Binding(PROTO_ICMP, ip.src, ident, alias)
                self.table.add_binding(b)
            e = Entry(
                PROTO_ICMP, "icmp", "icmp", ip.src, ident, ip.dst, 0, self.public_ip or 0,
                b.alias_port, now,
            )
            v = self.add_entry(
                e, now, (("o", PROTO_ICMP, ip.src, ident, ip.dst, 0), ("i", PROTO_ICMP, b.alias_port, ip.dst, 0))
            )
            if v is not None:
                if new_b:
                    self.table.drop_binding(b)
                    self.icmp_ids.release(b.alias_port)
                return v
            self.table.attach(e, b)
        else:
            self.table.touch(e, now)
        ip.set_src(self.public_ip)  # type: ignore[arg-type]
        if e.alias_port != ident:
            ip.set_l4_u16(4, e.alias_port, ICMP_CSUM)
        self.table.mark_fast(e, F_FAST_OUT)  # (ICMP: no engine fast path; the offload's signal)
        e.pkts_out += 1
        e.last_out = now
        e.bytes_out += ip.total_len
        return accept(buf)

    def _icmp_in(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(ICMP_MIN)
        buf = ip.buf
        itype = buf[off]
        if itype in ICMP_ERRORS:
            return self._icmp_error_in(ip, off, now)
        if itype not in ICMP_REPLIES:
            return ACCEPT_LOCAL  # echo requests etc. are for the gateway itself
        ident = (buf[off + 4] << 8) | buf[off + 5]
        e = self.table.get(("i", PROTO_ICMP, ident, ip.src, 0), now)
        if e is None:
            if self.table.binding_by_alias(PROTO_ICMP, ident) is None:
                return ACCEPT_LOCAL  # maybe the gateway's own ping
            return self.drop(DropReason.FILTERED, "icmp reply from a host not queried", ip)
        self.table.touch(e, now)
        ip.set_dst(e.inside_ip)
        if e.inside_port != ident:
            ip.set_l4_u16(4, e.inside_port, ICMP_CSUM)
        self.table.mark_fast(e, F_FAST_IN)
        e.pkts_in += 1
        e.last_in = now
        e.bytes_in += ip.total_len
        return accept(buf)

    def _embedded(self, ip: IPv4, off: int) -> tuple[int, IPv4]:
        """Parse the IP header embedded in an ICMP error (it may be truncated after 8 L4 bytes)."""
        ioff = off + 8
        inner_bytes = bytearray(ip.buf[ioff : ip.total_len])
        if len(inner_bytes) < 20:
            raise MalformedPacket("icmp error: embedded header truncated")
        ihl = (inner_bytes[0] & 0x0F) * 4
        if inner_bytes[0] >> 4 != 4 or ihl < 20 or len(inner_bytes) < ihl + 8:
            raise MalformedPacket("icmp error: embedded header or 8 transport bytes missing")
        # the embedded datagram is usually cut short: let the view cover what we have; the
        # declared length is put back by _finish_icmp_error
        if int.from_bytes(inner_bytes[2:4], "big") > len(inner_bytes):
            inner_bytes[2:4] = len(inner_bytes).to_bytes(2, "big")
        return ioff, IPv4(inner_bytes)

    def _finish_icmp_error(self, ip: IPv4, off: int, ioff: int, inner: IPv4, orig_len: int) -> Verdict:
        """Write the translated inner header back, fix its checksum and the ICMP checksum."""
        buf = ip.buf
        # restore the original (possibly larger) total length field before copying back
        inner.buf[2:4] = orig_len.to_bytes(2, "big")
        inner.buf[10:12] = b"\x00\x00"
        c = checksum(inner.buf[: inner.ihl])
        inner.buf[10:12] = c.to_bytes(2, "big")
        buf[ioff : ioff + len(inner.buf)] = inner.buf
        buf[off + 2 : off + 4] = b"\x00\x00"
        c = checksum(buf[off : ip.total_len])
        buf[off + 2 : off + 4] = c.to_bytes(2, "big")
        return accept(buf)

    def _icmp_error_in(self, ip: IPv4, off: int, now: float) -> Verdict:
        buf = ip.buf
        if checksum(buf[off : ip.total_len]) != 0:
            return self.drop(DropReason.BAD_CHECKSUM, "icmp error with a bad checksum", ip)
        ioff, inner = self._embedded(ip, off)
        orig_len = int.from_bytes(buf[ioff + 2 : ioff + 4], "big")
        if inner.src != self.public_ip:
            return ACCEPT_LOCAL
        p = inner.proto
        e: Entry | None = None
        ib = inner.buf
        l4 = inner.ihl
        if p in (PROTO_TCP, PROTO_UDP):
            sport = (ib[l4] << 8) | ib[l4 + 1]
            dport = (ib[l4 + 2] << 8) | ib[l4 + 3]
            e = self.table.get(("i", p, sport, inner.dst, dport), now)
            if e is None and p == PROTO_UDP:
                uh = self.udp_helpers.get(sport)
                if uh is not None:
                    e = uh.icmp_embedded_inbound(inner, now)
        elif p == PROTO_ICMP:
            ident = (ib[l4 + 4] << 8) | ib[l4 + 5]
            if ib[l4] in ICMP_QUERIES:
                e = self.table.get(("i", PROTO_ICMP, ident, inner.dst, 0), now)
        else:
            h = self.proto_helpers.get(p)
            if h is not None:
                e = h.icmp_embedded_inbound(inner, now)
            else:
                e = self.table.get(("gi", p, inner.dst), now)
        if e is None:
            if p in (PROTO_TCP, PROTO_UDP, PROTO_ICMP) and self._gateway_own(inner):
                return ACCEPT_LOCAL  # about the gateway's own traffic
            return self.drop(
                DropReason.ICMP_NO_MAPPING, f"icmp error about {describe(inner)}: no mapping", ip
            )
        # RFC 5508 REQ-3: translate the embedded header back, then the outer destination
        inner.set_src(e.inside_ip)
        if p in (PROTO_TCP, PROTO_UDP) and e.inside_port != e.alias_port and e.kind != "isakmp":
            csum_off = TCP_CSUM if p == PROTO_TCP else UDP_CSUM
            inner.set_l4_u16(0, e.inside_port, csum_off if l4 + csum_off + 2 <= len(ib) else None)
        elif p == PROTO_ICMP and e.inside_port != e.alias_port:
            inner.set_l4_u16(4, e.inside_port, ICMP_CSUM)
        kh = self.kind_helpers.get(e.kind)
        if kh is not None:
            kh.icmp_embedded_inbound_fix(inner, e)
        ip.set_dst(e.inside_ip)
        e.pkts_in += 1
        e.last_in = now
        return self._finish_icmp_error(ip, off, ioff, inner, orig_len)

    def _gateway_own(self, inner: IPv4) -> bool:
        """An embedded TCP/UDP/ICMP packet we have no mapping for: the gateway's own flow if its
        source port is outside vpnmasq's ranges (otherwise it was ours and is gone)."""
        if inner.proto == PROTO_ICMP:
            return True
        ib = inner.buf
        sport = (ib[inner.ihl] << 8) | ib[inner.ihl + 1]
        return not any(lo <= sport <= hi for lo, hi in self.config.alias_port_ranges)

    def _icmp_error_out(self, ip: IPv4, off: int, now: float, *, local: bool = False) -> Verdict:
        """A LAN host's ICMP error about a packet it received through us (RFC 5508 REQ-4).

        ``local``: the gateway's own error about such a packet (:meth:`_icmp_error_local`),
        whose source is a gateway address rather than the LAN host the packet was for."""
        buf = ip.buf
        ioff, inner = self._embedded(ip, off)
        orig_len = int.from_bytes(buf[ioff + 2 : ioff + 4], "big")
        p = inner.proto
        ib = inner.buf
        l4 = inner.ihl
        e: Entry | None = None
        to_host = local or inner.dst == ip.src
        if to_host and p in (PROTO_TCP, PROTO_UDP):
            sport = (ib[l4] << 8) | ib[l4 + 1]
            dport = (ib[l4 + 2] << 8) | ib[l4 + 3]
            e = self.table.get(("o", p, inner.dst, dport, inner.src, sport), now)
            if e is None and p == PROTO_UDP:  # e.g. ISAKMP, found by its cookies
                uh = self.udp_helpers.get(dport)
                if uh is not None:
                    e = uh.icmp_embedded_outbound(inner, now)
        elif to_host and p == PROTO_ICMP:
            ident = (ib[l4 + 4] << 8) | ib[l4 + 5]
            e = self.table.get(("o", PROTO_ICMP, inner.dst, ident, inner.src, 0), now)
        else:
            e = self.table.get(("go", p, inner.dst, inner.src), now)
            ph = self.proto_helpers.get(p)
            if e is None and to_host and ph is not None:  # ESP by SPI, GRE by Call ID
                e = ph.icmp_embedded_outbound(inner, now)
        if e is None or self.public_ip is None:
            return self.drop(
                DropReason.ICMP_NO_MAPPING, f"icmp error from inside about {describe(inner)}", ip
            )
        inner.set_dst(self.public_ip)
        if p in (PROTO_TCP, PROTO_UDP) and e.inside_port != e.alias_port:
            csum_off = TCP_CSUM if p == PROTO_TCP else UDP_CSUM
            inner.set_l4_u16(2, e.alias_port, csum_off if l4 + csum_off + 2 <= len(ib) else None)
        elif p == PROTO_ICMP and e.inside_port != e.alias_port:
            inner.set_l4_u16(4, e.alias_port, ICMP_CSUM)
        kh = self.kind_helpers.get(e.kind)
        if kh is not None:  # e.g. a PPTP call's Call ID
            kh.icmp_embedded_outbound_fix(inner, e)
        ip.set_src(self.public_ip)
        e.pkts_out += 1
        e.last_out = now
        return self._finish_icmp_error(ip, off, ioff, inner, orig_len)

    def _icmp_error_local(self, ip: IPv4, now: float) -> Verdict:
        """An ICMP error the gateway itself sent, queued from its OUTPUT hook by the
        rules (:mod:`vpnmasq.datapath.rules`): the only outbound packets from a source that
        is not inside. When it quotes a packet vpnmasq rewrote, the quoted header is the
        rewritten one, so it goes through the same translation as anyone else's error:

        * about an inbound packet rewritten to a LAN host (fragmentation needed because the
          LAN link is narrower, TTL exceeded, host unreachable): to the remote, quoting what
          the remote sent (public destination, alias port), as a LAN host's own error would
          be (:meth:`_icmp_error_out`);
        * about an outbound packet rewritten to the public source (e.g. host unreachable when
          the next hop does not answer ARP): the kernel addressed it to the public address,
          itself; it goes to the LAN host with the LAN host's packet quoted, as an error from
          outside would (:meth:`_icmp_error_in`, RFC 5508 REQ-3); about a hairpinned packet,
          to the other LAN host (:meth:`_icmp_error_hairpin`).

        The daemon's own errors (``send_icmp_error``, e.g. for AH) quote packets as they
        arrived, before any translation, and pass unchanged. Anything else (the gateway's
        errors about its own traffic) leaves unchanged; other ICMP from a source that is not
        inside is dropped as before. An error the gateway addressed to itself is only taken
        from the public address: nothing else is turned towards a LAN host."""
        off = ip.l4(ICMP_MIN)
        if ip.buf[off] not in ICMP_ERRORS:
            return self.drop(DropReason.NOT_INSIDE, f"source {int_to_ip(ip.src)} is not inside", ip)
        _ioff, inner = self._embedded(ip, off)
        if inner.src == self.public_ip:
            if ip.src != self.public_ip:
                return self.drop(
                    DropReason.NOT_INSIDE, f"source {int_to_ip(ip.src)} is not inside", ip
                )
            self.count("icmp_local_error_in")
            if self.is_inside(inner.dst):  # about a hairpinned packet: to the other LAN host
                return self._icmp_error_hairpin(ip, off, now, local=True)
            return self._icmp_error_in(ip, off, now)
        if self.is_inside(inner.dst) and not self.is_inside(inner.src):
            self.count("icmp_local_error_out")
            return self._icmp_error_out(ip, off, now, local=True)
        return ACCEPT_UNCHANGED

    # ------------------------------------------------------------------ other protocols
    def _generic_out(self, ip: IPv4, now: float) -> Verdict:
        """Any other protocol: address-only NAT, one LAN host per (protocol, remote)."""
        p = ip.proto
        e = self.table.get(("go", p, ip.src, ip.dst), now)
        if e is None:
            other = self.table.get(("gi", p, ip.dst), now)
            if other is not None:
                return self.drop(
                    DropReason.GENERIC_BUSY,
                    f"protocol {p} to {int_to_ip(ip.dst)} is in use by {int_to_ip(other.inside_ip)}",
                    ip,
                )
            e = Entry(p, "generic", "generic", ip.src, 0, ip.dst, 0, self.public_ip or 0, 0, now)
            v = self.add_entry(e, now, (("go", p, ip.src, ip.dst), ("gi", p, ip.dst)))
            if v is not None:
                return v
        else:
            self.table.touch(e, now)
        ip.set_src(self.public_ip)  # type: ignore[arg-type]
        e.pkts_out += 1
        e.last_out = now
        e.bytes_out += ip.total_len
        return accept(ip.buf)

    def _generic_in(self, ip: IPv4, now: float) -> Verdict:
        e = self.table.get(("gi", ip.proto, ip.src), now)
        if e is None:
            return self.drop(
                DropReason.NO_MAPPING,
                f"unsolicited protocol {ip.proto} from {int_to_ip(ip.src)}",
                ip,
            )
        self.table.touch(e, now)
        ip.set_dst(e.inside_ip)
        e.pkts_in += 1
        e.last_in = now
        e.bytes_in += ip.total_len
        return accept(ip.buf)

    # ------------------------------------------------------------------ hairpin
    def _hairpin(self, ip: IPv4, now: float) -> Verdict:
        """A LAN host reaching a LAN host through the public address (RFC 4787 REQ-9):
        translate the source as for any outbound packet, then the destination as inbound.

        PPTP's GRE hairpins too (a LAN client calling a LAN PPTP server through
        the public address): the control connection gets two ALGs (the client's outbound
        leg and the forwarded server's inbound leg), each with its own outside Call ID, so
        GRE is found as an outbound call of one and an inbound call of the other. ESP does
        not: its inbound leg would be associated with the sender itself (use NAT-T, which
        hairpins as UDP)."""
        p = ip.proto
        h: ProtoHelper | None = None
        if p == PROTO_TCP:
            v = self._tcp_out(ip, now)
        elif p == PROTO_UDP:
            v = self._udp_out(ip, now)
        elif p == PROTO_ICMP:
            off = ip.l4(ICMP_MIN)
            if ip.buf[off] in ICMP_ERRORS:  # about a hairpinned packet
                return self._icmp_error_hairpin(ip, off, now)
            return ACCEPT_LOCAL  # pinging our own public address: the gateway answers
        elif p == PROTO_GRE and (h := self.proto_helpers.get(p)) is not None:
            v = h.outbound(ip, now)
        else:
            return self.drop(DropReason.FILTERED, f"no hairpin for protocol {p}", ip)
        if v.action is not Action.ACCEPT or v.payload is None:
            return v
        self.count("hairpin")
        inner = IPv4(bytearray(v.payload))
        if h is not None:
            hv: Verdict = h.inbound(inner, now)
            return hv
        return self._tcp_in(inner, now) if p == PROTO_TCP else self._udp_in(inner, now)

    def _icmp_error_hairpin(
        self, ip: IPv4, off: int, now: float, *, local: bool = False
    ) -> Verdict:
        """A LAN host's ICMP error about a packet it got through a hairpin: the
        quoted packet came from the public address (both its addresses were translated),
        so the error is translated as a LAN host's error (its leg towards the public
        address, :meth:`_icmp_error_out`), then as an error arriving at the public address
        (the other leg, :meth:`_icmp_error_in`): it reaches the other LAN host quoting that
        host's own packet. The rules queue only errors conntrack cannot relate (about
        untracked, hairpinned flows); errors about the gateway's own traffic stay local.
        ``local``: the gateway's own error about a hairpinned packet (:meth:`_icmp_error_local`)."""
        v = self._icmp_error_out(ip, off, now, local=local)
        if v.action is not Action.ACCEPT or v.payload is None:
            return v
        self.count("hairpin")
        back = IPv4(bytearray(v.payload))
        return self._icmp_error_in(back, back.l4(ICMP_MIN), now)

    # ------------------------------------------------------------------ fragments
    def _fragment(self, ip: IPv4, direction: Direction, now: float, token: object) -> Verdict:
        """Fragments follow the mapping of their first fragment (tracked by IP id)."""
        key = (direction, ip.src, ip.dst, ip.proto, ip.ident)
        if ip.frag_offset == 0:
            v = self._dispatch(ip, direction, now)
            if v.action is Action.ACCEPT:
                out = v.payload
                if out is None:
                    st = _FragState(ip.src, ip.dst, True, now + self.timeouts["fragment"])
                else:
                    st = _FragState(
                        int.from_bytes(out[12:16], "big"),
                        int.from_bytes(out[16:20], "big"),
                        True,
                        now + self.timeouts["fragment"],
                    )
            else:
                st = _FragState(0, 0, False, now + self.timeouts["fragment"])
            self._frags[key] = st
            self._frags.move_to_end(key)
            if len(self._frags) > MAX_FRAGMENT_STATES:
                # a flood of first fragments must not grow memory for timeouts.fragment
                # seconds: forget the oldest (its later fragments wait, then time out)
                self._frags.popitem(last=False)
                self.count("fragment_states_evicted")
            held = self._held.pop(key, None)
            if held:
                self._held_order.pop(key, None)
                self._held_count -= len(held)
                rel = tuple((tok, self._apply_frag(bytearray(data), st)) for tok, data, _ in held)
                return Verdict(v.action, v.payload, v.reason, v.detail, v.local, rel)
            return v
        st0 = self._frags.get(key)
        if st0 is not None and st0.expires_at > now:
            return self._apply_frag(ip.buf, st0)
        if self._held_count >= self.config.limits.fragment_buffer:
            return self.drop(DropReason.FRAGMENT_OVERFLOW, "too many fragments waiting", ip)
        self._held.setdefault(key, []).append((token, bytes(ip.buf), now))
        self._held_order.setdefault(key, now + self.timeouts["fragment"])
        self._held_count += 1
        self.count("fragments_held")
        return Verdict(Action.HOLD)

    def _apply_frag(self, buf: bytearray, st: _FragState) -> Verdict:
        if not st.ok:
            return self.drop(DropReason.FILTERED, "fragment of a dropped datagram")
        ip = IPv4(buf)
        if ip.frag_offset == 0:  # a duplicate first fragment: needs the full treatment
            return self.drop(DropReason.MALFORMED, "duplicate first fragment")
        if ip.src != st.new_src:
            ip.set_src(st.new_src)
        if ip.dst != st.new_dst:
            ip.set_dst(st.new_dst)
        return accept(buf)

    def _expire_frags(self, now: float) -> list[tuple[object, Verdict]]:
        while self._frags:
            k, st = next(iter(self._frags.items()))
            if st.expires_at > now:
                break
            del self._frags[k]
        out: list[tuple[object, Verdict]] = []
        while self._held_order:
            k, dl = next(iter(self._held_order.items()))
            if dl > now:
                break
            del self._held_order[k]
            for tok, _data, _t in self._held.pop(k, []):
                self._held_count -= 1
                out.append(
                    (tok, self.drop(DropReason.FRAGMENT_TIMEOUT, "first fragment never came"))
                )
        return out


def describe(ip: IPv4 | None) -> str:
    """One-line flow description for logs: ``udp 10.77.0.11:500 -> 203.0.113.5:500``."""
    if ip is None:
        return ""
    name = PROTO_NAMES.get(ip.proto, f"proto{ip.proto}")
    s, d = int_to_ip(ip.src), int_to_ip(ip.dst)
    try:
        if ip.proto in (PROTO_TCP, PROTO_UDP) and ip.frag_offset == 0 and ip.l4_len >= 4:
            return f"{name} {s}:{ip.u16(0)} -> {d}:{ip.u16(2)}"
    except (IndexError, MalformedPacket):  # pragma: no cover - defensive
        pass
    return f"{name} {s} -> {d}"


__all__ = ["Engine", "describe"]
