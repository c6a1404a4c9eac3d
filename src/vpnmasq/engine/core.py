"""The engine: wiring and dispatch. Bytes in, verdict out, ``now`` passed in.

Driven by three inputs (aioquic style): ``handle(packet, direction, now)`` for each packet,
``handle_timer(now)`` when ``next_deadline()`` passes, and operator calls (``flush``,
``set_public_address``, ``set_local_consumers``, ``snapshot``). It never reads a clock, logs
or does I/O; what happened is reported through ``counters`` and ``drain_events()``.

A packet takes the fast path (:mod:`.fast`) if it belongs to an established plain flow;
otherwise it is parsed, checked against the policy (:mod:`.policy`), and handed to the
translator of its protocol from one table, ``protocol -> translator``: TCP and UDP
(:mod:`.napt`), ICMP (:mod:`.icmp`), the helpers' protocols (ESP, GRE, AH, FWZ), and
:mod:`.generic` for the rest. Hairpinned packets and fragments go through :mod:`.hairpin`
and :mod:`.fragments` first. Helpers see the engine only as ``helpers.base.EngineView``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable
from dataclasses import replace
from functools import partial

from vpnmasq.config import Config, Forward
from vpnmasq.conntrack.alloc import IdAllocator
from vpnmasq.conntrack.hostlimits import LimitHits, host_limits
from vpnmasq.conntrack.pool import PortPool, port_pool
from vpnmasq.conntrack.table import PERMANENT, Binding, Entry, MasqTable, TableFull
from vpnmasq.engine.fast import fast
from vpnmasq.engine.fragments import Fragments
from vpnmasq.engine.generic import Generic
from vpnmasq.engine.hairpin import hairpin
from vpnmasq.engine.icmp import Icmp
from vpnmasq.engine.napt import TcpNapt, UdpNapt
from vpnmasq.engine.policy import (
    LOCAL_DELIVERY_REASONS,
    LocalVpn,
    Networks,
    NewMappingRate,
    net,
)
from vpnmasq.events import (
    AddressChanged,
    EntryCreated,
    EntryExpired,
    EntryUpdated,
    Event,
    HostLimited,
    Notice,
    PacketDropped,
    Row,
)
from vpnmasq.helpers import default_registry
from vpnmasq.helpers.base import Helper, ProtoHelper, TcpAlgFactory, Translator, UdpPortHelper
from vpnmasq.helpers.registry import HelperRegistry
from vpnmasq.packet.errors import MalformedPacket
from vpnmasq.packet.ipv4 import (
    PROTO_ICMP,
    PROTO_NAMES,
    PROTO_TCP,
    PROTO_UDP,
    IPv4,
    describe,
    int_to_ip,
    ip_to_int,
)
from vpnmasq.packet.l4 import ISAKMP_PORT, NATT_PORT
from vpnmasq.verdict import ACCEPT_LOCAL, ACCEPT_UNCHANGED, Direction, DropReason, Verdict, drop

OUT = Direction.OUTBOUND
#: Largest datagram the engine will return modified (NFQUEUE copy range maximum).
MAX_PACKET = 65531


class Engine:
    """The pure masquerading engine. See the module docstring."""

    def __init__(  # long: wires every part (table, allocators, limits, translators, helpers)
        self,
        config: Config,
        public_ip: int | None = None,
        *,
        rng_seed: int | None = None,
        registry: HelperRegistry | None = None,
        pool: PortPool | None = None,
        port_in_use: Callable[[int, int], bool] | None = None,
    ) -> None:
        self.config = config
        #: (protocol, port) -> whether a socket of the gateway holds it now: such a port is
        #: never handed out (the daemon's probe; None: nothing outside the engine is asked)
        self.port_in_use = port_in_use
        self.pool = pool if pool is not None else port_pool(config)  # None: a default system
        self.host_limits = host_limits(config, self.pool)
        self.limit_hits = LimitHits()
        if public_ip is None and config.public_address:
            public_ip = ip_to_int(config.public_address)
        self.public_ip = public_ip
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
            self.host_limits.max_entries,
            on_remove=self._on_remove,
        )
        self.rng = random.Random(rng_seed)
        ranges = list(self.pool.alias_ranges)
        def held(proto: int) -> Callable[[int], bool] | None:
            return None if port_in_use is None else partial(port_in_use, proto)

        self.ports: dict[int, IdAllocator] = {
            PROTO_TCP: IdAllocator(
                ranges, self.rng, preserve=config.preserve_ports, in_use=held(PROTO_TCP)
            ),
            PROTO_UDP: IdAllocator(
                ranges,
                self.rng,
                preserve=config.preserve_ports,
                always_preserve=frozenset({NATT_PORT}) if "natt" in config.helpers else frozenset(),
                in_use=held(PROTO_UDP),
            ),
        }
        ir = config.icmp_id_range
        self.icmp_ids = IdAllocator([(ir.low, ir.high)], self.rng, preserve=config.preserve_ports)
        self.counters: dict[str, int] = {}
        #: take the fast path for established TCP/UDP flows (tests compare it with the slow path)
        self.fast_path = True
        self._fast_pub: tuple[int | None, bytes, int] = (None, b"", 0)
        self.events: list[Event] = []
        self.nets = Networks(config)
        self.is_inside = self.nets.is_inside
        self.is_exempt = self.nets.is_exempt
        self.is_routed = self.nets.is_routed
        self.rate = NewMappingRate(self.host_limits.new_per_second)
        # source of the outbound packet being handled: the host new entries are charged to
        self._charge_to: int | None = None
        self.mss_clamp = config.mss_clamp
        self.local = LocalVpn(config.local_vpn)
        self._local_kind: str | None = None  # set while an inbound VPN packet is handled
        self._wire_forwards(config.forwards)
        self._wire_helpers(registry if registry is not None else default_registry())
        self._sync_local()
        # the dispatch table: built-in translators, then the helpers' protocols
        self.tcp = TcpNapt(self)
        self.udp = UdpNapt(self)
        self.icmp = Icmp(self)
        self.generic = Generic(self)
        self.translators: dict[int, Translator] = {
            PROTO_TCP: self.tcp,
            PROTO_UDP: self.udp,
            PROTO_ICMP: self.icmp,
            **self.proto_helpers,
        }
        self.frags = Fragments(self, self._dispatch)

    def _wire_forwards(self, forwards: Iterable[Forward]) -> None:
        """Static bindings for port forwards, rules (most specific first) for the others."""
        self.forwards: list[Forward] = sorted(
            forwards, key=lambda f: (f.port is None, f.remote is None)
        )
        self._fwd_nets: dict[Forward, tuple[int, int] | None] = {
            f: (net(f.remote) if f.remote else None) for f in self.forwards
        }
        self.fwd_bindings: dict[Forward, Binding] = {}
        for f in self.forwards:
            pn = f.proto_number
            if f.port is not None and pn in self.ports:
                self.ports[pn].reserve(f.port)
                b = Binding(pn, ip_to_int(f.to), f.to_port or f.port, f.port, static=True)
                self.fwd_bindings[f] = b
                if self.table.binding(pn, b.inside_ip, b.inside_port) is None:
                    self.table.bindings[(pn, b.inside_ip, b.inside_port)] = b

    def _wire_helpers(self, reg: HelperRegistry) -> None:
        """The helpers the config names, by how they claim packets."""
        self.proto_helpers: dict[int, ProtoHelper] = {}
        self.udp_helpers: dict[int, UdpPortHelper] = {}
        self.tcp_algs: dict[int, TcpAlgFactory] = {}
        self.kind_helpers: dict[str, Helper] = {}
        self.helper_by_name: dict[str, Helper] = {}
        for spec, inst in reg.build(self.config.helpers, self):
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

    # ------------------------------------------------------------------ the helpers' view
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

    def add_entry(self, entry: Entry, now: float, keys: tuple[Hashable, ...]) -> Verdict | None:
        """Insert a new entry; a drop Verdict if the table (or the host's share) is full, or
        if the inside host that sent the packet opens new mappings faster than
        ``limits.max_new_per_host_per_second`` (entries a packet from outside creates, such as
        forwarded sessions, are not charged to the inside host: outsiders cannot spend it)."""
        rate = self.rate
        charged = rate.rate > 0 and entry.inside_ip == self._charge_to
        what = PROTO_NAMES.get(entry.proto, entry.proto)
        if charged and not rate.has_token(entry.inside_ip, now):
            self.count("rate_limited")
            return self.host_limit(
                entry.inside_ip,
                "rate",
                f"opens new mappings faster than limits.max_new_per_host_per_second = "
                f"{rate.rate:g}: no new {what} flow to {int_to_ip(entry.remote_ip)}",
                now,
            )
        try:
            self.table.add(entry, now, keys)
        except TableFull as exc:
            if "host" in str(exc):
                return self.host_limit(
                    entry.inside_ip,
                    "entries",
                    f"holds {self.table.max_per_host} entries (limits.max_entries_per_host): "
                    f"no new {what} flow",
                    now,
                )
            return self.drop(
                DropReason.TABLE_FULL,
                f"{exc}: {self.table.count} entries, no new {what}"
                f" flow for {int_to_ip(entry.inside_ip)}",
            )
        if charged:
            rate.spend(entry.inside_ip)
        self.created(entry, now)
        return None

    def host_limit(self, host: int, limit: str, detail: str, now: float) -> Verdict:
        """Drop a packet because ``host`` hit a per-host ``limit`` (hostlimits.LIMIT_NAMES):
        counted per host, reported once per host and interval (HostLimited)."""
        drops = self.limit_hits.hit(host, limit, now)
        if drops is not None:
            self.events.append(HostLimited(int_to_ip(host), limit, detail, drops))
        return self.drop(DropReason.HOST_LIMIT, f"{int_to_ip(host)} {detail}")

    def port_share_left(self, proto: int, host: int, now: float) -> Verdict | None:
        """None if ``host`` may take one more outside port (ICMP: id) of ``proto``, else the
        drop (limits.max_ports_per_host)."""
        cap = self.host_limits.max_icmp_ids if proto == PROTO_ICMP else self.host_limits.max_ports
        if not cap or self.table.host_ports.get((proto, host), 0) < cap:
            return None
        return self.host_limit(
            host,
            "ports",
            f"holds {cap} {PROTO_NAMES[proto]} {'ids' if proto == PROTO_ICMP else 'ports'} "
            "(limits.max_ports_per_host): no new mapping",
            now,
        )

    def exclude_ports(self, ports: Iterable[int]) -> list[int]:
        """Operator input (the daemon, from what listens on the gateway): no new mapping gets
        these TCP/UDP ports. Returns those that were in the pool."""
        wanted = sorted(set(ports))
        pool = self.pool.without(wanted)
        gone = [p for p in wanted if p in self.pool and p not in pool]
        for p in gone:
            for alloc in self.ports.values():
                alloc.reserve(p)
        self.pool = pool
        return gone

    def created(self, entry: Entry, now: float) -> None:
        self.count("created:" + entry.kind)
        self.events.append(EntryCreated(self.row(entry, now)))

    def match_forward(self, proto: int, port: int | None, remote: int) -> Forward | None:
        """The most specific forward for (proto, port) from ``remote``: port+remote, port,
        protocol+remote, protocol."""
        for f in self.forwards:
            if f.proto_number != proto:
                continue
            if f.port is not None and f.port != port:
                continue
            nw = self._fwd_nets[f]
            if nw is not None and remote & nw[1] != nw[0]:
                continue
            return f
        return None

    # ------------------------------------------------------------------ inputs
    _fast = fast

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
                if self.local.any and ip.dst == self.public_ip:
                    self._local_kind = self.local.kind_of(ip)
            if ip.frag_offset or ip.more_fragments:
                return self.frags.handle(ip, direction, now, token)
            return self._dispatch(ip, direction, now)
        except MalformedPacket as exc:
            return self.drop(DropReason.MALFORMED, exc.reason)
        finally:
            self._charge_to = None
            self._local_kind = None

    def _dispatch(self, ip: IPv4, direction: Direction, now: float) -> Verdict:
        """Policy, then the translator of the packet's protocol."""
        pub = self.public_ip
        if direction is OUT:
            src = ip.src
            if not self.is_inside(src):
                if self.is_exempt(src):
                    return ACCEPT_UNCHANGED
                if ip.proto == PROTO_ICMP:  # the gateway's own ICMP errors
                    return self.icmp.error_local(ip, now)
                return self.drop(DropReason.NOT_INSIDE, f"source {int_to_ip(src)} is not inside", ip)
            if self.nets.exempt and self.is_exempt(src):
                return ACCEPT_UNCHANGED
            if self.nets.routed and self.is_routed(ip.dst):
                self.count("routed")
                return ACCEPT_UNCHANGED  # to a [[route]] network: routed, never masqueraded
            if pub is None:
                return self.drop(DropReason.NO_ADDRESS, "no public address yet", ip)
            if ip.dst == pub:
                return hairpin(self, ip, now)
            return self.translators.get(ip.proto, self.generic).outbound(ip, now)
        if pub is None or ip.dst != pub:
            return ACCEPT_LOCAL
        return self.translators.get(ip.proto, self.generic).inbound(ip, now)

    def handle_timer(self, now: float) -> list[tuple[object, Verdict]]:
        """Expire idle entries and stale fragment state; return verdicts for held packets."""
        self.table.expire(now)
        for h in self.helper_by_name.values():
            h.handle_timer(now)
        return self.frags.expire(now)

    def release_held(self) -> list[tuple[object, Verdict]]:
        """For an engine about to be replaced (a configuration reload): verdicts for the
        packets it holds (fragments waiting for their first), which must still get one."""
        return self.frags.release_all("configuration reloaded")

    def next_deadline(self) -> float | None:
        cands = [self.table.next_deadline(), self.frags.next_deadline()]
        for h in self.helper_by_name.values():
            cands.append(h.next_deadline())
        vals = [c for c in cands if c is not None]
        return min(vals) if vals else None

    # ------------------------------------------------------------------ operator calls
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
            self.frags.clear()
        else:
            for e in self.table:
                e.alias_ip = ip
        self.events.append(
            AddressChanged(int_to_ip(old) if old else None, int_to_ip(ip) if ip else None, dropped)
        )

    def set_local_consumers(self, kinds: Iterable[str]) -> None:
        """Which VPN protocols have a local consumer on the gateway ("ike", "esp", "gre"),
        from the daemon. Used by ``local_vpn = "auto"``."""
        self.local.set_consumers(kinds)
        self._sync_local()

    def delivers_locally(self, kind: str) -> bool:
        """Whether unclaimed inbound traffic of ``kind`` goes to the gateway itself."""
        return self.local.delivers(kind)

    @property
    def local_consumers(self) -> frozenset[str]:
        return self.local.consumers

    def _sync_local(self) -> None:
        ike = self.helper_by_name.get("isakmp")
        if ike is not None:
            ike.set_local_delivery(self.local.delivers("ike"))

    def flush(self) -> int:
        n = 0
        for e in list(self.table):
            if e.tclass != PERMANENT:
                self.table.remove(e, "flush")
                n += 1
        return n

    def drain_events(self) -> list[Event]:
        ev, self.events = self.events, []
        return ev

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
