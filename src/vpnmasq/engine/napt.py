"""NAPT for TCP and UDP: endpoint-independent bindings, sessions under them, forwards.

Owns the two translators of the dispatch table for TCP and UDP, and what they share: opening
a session under a binding (and giving a fresh binding back if the table refuses the session),
filtering of unsolicited inbound packets and the forwards behind them, and the tail every
translated packet goes through (address and port rewrite, counters, the fast-path mark, the
session's ALG). TCP adds state tracking and the MSS clamp (:mod:`.tcp_state`); UDP lets its
port helpers (IKE, NAT-T) claim packets first. Established flows usually never get here: the
fast path (:mod:`.fast`) answers them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vpnmasq.conntrack.alloc import IdAllocator
from vpnmasq.conntrack.table import F_FAST_IN, F_FAST_OUT, Binding, Entry, EntryAlg
from vpnmasq.engine.tcp_state import TCP_ESTABLISHED, blind, clamp_mss, track
from vpnmasq.packet.ipv4 import PROTO_NAMES, PROTO_TCP, PROTO_UDP, IPv4, int_to_ip, ip_to_int
from vpnmasq.packet.l4 import (
    TCP_ACK,
    TCP_CSUM,
    TCP_FIN,
    TCP_MIN,
    TCP_RST,
    TCP_SYN,
    UDP_CSUM,
    UDP_MIN,
)
from vpnmasq.verdict import DropReason, Verdict, accept

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.engine.core import Engine

#: entry kinds the fast path may answer (plain NAPT and forwards, no payload helper)
FAST_KINDS = frozenset({"napt", "fwd"})


def new_binding(
    eng: Engine, alloc: IdAllocator, proto: int, ip: IPv4, port: int, what: str, now: float
) -> Binding | Verdict:
    """A fresh endpoint-independent binding for (proto, ip.src, port), or the drop (the
    host holds its share of the pool, or the pool is exhausted)."""
    refused = eng.port_share_left(proto, ip.src, now)
    if refused is not None:
        return refused
    alias = alloc.allocate(port)
    if alias is None:
        return eng.drop(DropReason.PORTS_EXHAUSTED, what, ip)
    b = Binding(proto, ip.src, port, alias)
    eng.table.add_binding(b)
    return b


def add_session(
    eng: Engine,
    alloc: IdAllocator,
    b: Binding,
    fresh: bool,
    e: Entry,
    keys: tuple[tuple[object, ...], ...],
    now: float,
) -> Entry | Verdict:
    """Add session ``e`` under ``b``. If the table refuses it, a binding made for it
    (``fresh``) is given back: a refused packet must not keep a port taken for good."""
    v = eng.add_entry(e, now, keys)
    if v is not None:
        if fresh:
            eng.table.drop_binding(b)
            alloc.release(b.alias_port)
        return v
    eng.table.attach(e, b)
    return e


class Napt:
    """What the TCP and UDP translators share. ``proto``, ``csum`` (the checksum's offset)
    and ``tclass`` (a new session's timeout class) are set by the subclass."""

    proto: int
    csum: int
    tclass: str

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.table = eng.table
        self.alloc = eng.ports[self.proto]

    # --- sessions -----------------------------------------------------------------------
    def new_session(self, ip: IPv4, sport: int, dport: int, now: float) -> Entry | Verdict:
        """Outbound packet with no session: find or create the EIM binding, add a session."""
        eng, proto, src, dst = self.eng, self.proto, ip.src, ip.dst
        b = self.table.binding(proto, src, sport)
        fresh = b is None
        if b is None:
            what = f"no free {PROTO_NAMES[proto]} port for {int_to_ip(src)}:{sport}"
            nb = new_binding(eng, self.alloc, proto, ip, sport, what, now)
            if isinstance(nb, Verdict):
                return nb
            b = nb
        e = Entry(
            proto, "fwd" if b.static else "napt", self.tclass, src, sport, dst, dport,
            eng.public_ip or 0, b.alias_port, now,
        )
        keys = (("o", proto, src, sport, dst, dport), ("i", proto, b.alias_port, dst, dport))
        r = add_session(eng, self.alloc, b, fresh, e, keys, now)
        if isinstance(r, Entry):
            r.alg = self.attach(r, sport, dport, now, server_inside=False)
        return r

    def inbound_new(
        self, ip: IPv4, sport: int, dport: int, now: float
    ) -> Entry | Verdict:
        """Inbound packet with no session: filtering policy, then forwards (most specific)."""
        eng, proto, src = self.eng, self.proto, ip.src
        b = self.table.binding_by_alias(proto, dport)
        if b is not None and not b.static:
            filt = eng.config.filtering
            if filt == "endpoint-independent" or (
                filt == "address-dependent" and src in b.remotes
            ):
                return self.inbound_session(ip, b, False, sport, now, "napt")
            return eng.drop(
                DropReason.FILTERED,
                f"{PROTO_NAMES[proto]} {int_to_ip(src)}:{sport} -> port {dport}: mapping of "
                f"{int_to_ip(b.inside_ip)}:{b.inside_port} does not accept this remote ({filt})",
                ip,
            )
        fwd = eng.match_forward(proto, dport, src)
        if fwd is None:
            return eng.drop(
                DropReason.NO_MAPPING,
                f"unsolicited {PROTO_NAMES[proto]} from {int_to_ip(src)}:{sport} to port {dport}",
                ip,
            )
        fb = eng.fwd_bindings.get(fwd)
        fresh = False
        if fb is None:  # whole-protocol forward: a dynamic binding to the same port
            fb = self.table.binding(proto, ip_to_int(fwd.to), dport)
            if fb is None:
                if not self.alloc.take(dport):
                    return eng.drop(DropReason.PORTS_EXHAUSTED, f"port {dport} in use", ip)
                fb = Binding(proto, ip_to_int(fwd.to), dport, dport)
                self.table.add_binding(fb)
                fresh = True
        return self.inbound_session(ip, fb, fresh, sport, now, "fwd")

    def inbound_session(
        self, ip: IPv4, b: Binding, fresh: bool, sport: int, now: float, kind: str
    ) -> Entry | Verdict:
        proto, src = self.proto, ip.src
        e = Entry(
            proto, kind, self.tclass, b.inside_ip, b.inside_port, src, sport,
            self.eng.public_ip or 0, b.alias_port, now,
        )
        keys = (
            ("o", proto, b.inside_ip, b.inside_port, src, sport),
            ("i", proto, b.alias_port, src, sport),
        )
        r = add_session(self.eng, self.alloc, b, fresh, e, keys, now)
        if isinstance(r, Entry):
            r.alg = self.attach(r, b.inside_port, sport, now, server_inside=True)
        return r

    def attach(
        self, e: Entry, inside_port: int, remote_port: int, now: float, *, server_inside: bool
    ) -> EntryAlg | None:
        """The session's ALG (``entry.alg``), or None."""
        raise NotImplementedError

    # --- the tail every translated packet takes -----------------------------------------
    def finish(
        self, ip: IPv4, e: Entry, off: int, out: bool, port: int, fast_ok: bool, now: float,
        clamp: bool = False,
    ) -> Verdict:
        """The tail of every translated packet: address and port rewrite (outbound: the
        public address and alias port; inbound: the inside host's), the MSS clamp of a SYN
        (``clamp``), counters, the fast-path mark (a plain flow, no ALG), the session's ALG."""
        n = ip.total_len
        if out:
            pub = self.eng.public_ip
            assert pub is not None  # _dispatch drops outbound packets before there is one
            ip.set_src(pub)
            if e.alias_port != port:
                ip.set_l4_u16(0, e.alias_port, self.csum)
            if clamp:
                self._clamp(ip, off)
            e.pkts_out += 1
            e.last_out = now
            e.bytes_out += n
        else:
            ip.set_dst(e.inside_ip)
            if e.inside_port != port:
                ip.set_l4_u16(2, e.inside_port, self.csum)
            if clamp:
                self._clamp(ip, off)
            e.pkts_in += 1
            e.last_in = now
            e.bytes_in += n
        alg = e.alg
        if alg is None:
            if fast_ok:
                self.table.mark_fast(e, F_FAST_OUT if out else F_FAST_IN)
            return accept(ip.buf)
        poff = self.payload_off(ip, off)
        if poff < 0:
            return self.eng.drop(DropReason.MALFORMED, "tcp: bad data offset", ip)
        v = alg.outbound(ip, e, poff, now) if out else alg.inbound(ip, e, poff, now)
        return accept(ip.buf) if v is None else v

    def _clamp(self, ip: IPv4, off: int) -> None:
        mss = self.eng.mss_clamp
        if mss and clamp_mss(ip, off, mss):
            self.eng.count("mss_clamped")

    def payload_off(self, ip: IPv4, off: int) -> int:
        """Where the payload starts; negative if the header says nonsense."""
        raise NotImplementedError


class TcpNapt(Napt):
    proto = PROTO_TCP
    csum = TCP_CSUM
    tclass = "tcp_transitory"

    def outbound(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(TCP_MIN)
        buf = ip.buf
        sport = (buf[off] << 8) | buf[off + 1]
        dport = (buf[off + 2] << 8) | buf[off + 3]
        e = self.table.get(("o", PROTO_TCP, ip.src, sport, ip.dst, dport), now)
        if e is None:
            r = self.new_session(ip, sport, dport, now)
            if isinstance(r, Verdict):
                return r
            e = r
        tflags = buf[off + 13]
        e.last_ack_out = int.from_bytes(buf[off + 8 : off + 12], "big") if tflags & TCP_ACK else -1
        track(self.eng, e, tflags, True, now)
        fast_ok = e.state == TCP_ESTABLISHED and e.kind in FAST_KINDS
        return self.finish(ip, e, off, True, sport, fast_ok, now, bool(tflags & TCP_SYN))

    def inbound(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(TCP_MIN)
        buf = ip.buf
        sport = (buf[off] << 8) | buf[off + 1]
        dport = (buf[off + 2] << 8) | buf[off + 3]
        e = self.table.get(("i", PROTO_TCP, dport, ip.src, sport), now)
        tflags = buf[off + 13]
        if e is None:
            r = self.inbound_new(ip, sport, dport, now)
            if isinstance(r, Verdict):
                return r
            e = r
        if tflags & (TCP_RST | TCP_FIN):  # RST or FIN: believed only near the inside host's ACK
            # (also once closed: a blind RST must not keep a dead mapping alive either)
            why = blind(e, tflags, int.from_bytes(buf[off + 4 : off + 8], "big"))
            if why is not None:
                self.eng.count(why)
                flag = "RST" if tflags & TCP_RST else "FIN"
                return self.eng.drop(
                    DropReason.FILTERED, f"tcp {flag} outside the window ignored", ip
                )
        track(self.eng, e, tflags, False, now)
        fast_ok = e.state == TCP_ESTABLISHED and e.kind in FAST_KINDS
        return self.finish(ip, e, off, False, dport, fast_ok, now, bool(tflags & TCP_SYN))

    def attach(
        self, e: Entry, inside_port: int, remote_port: int, now: float, *, server_inside: bool
    ) -> EntryAlg | None:
        factory = self.eng.tcp_algs.get(inside_port if server_inside else remote_port)
        return None if factory is None else factory.attach(e, now, server_inside=server_inside)

    def payload_off(self, ip: IPv4, off: int) -> int:
        doff = (ip.buf[off + 12] >> 4) * 4
        return -1 if doff < TCP_MIN or off + doff > ip.total_len else off + doff


class UdpNapt(Napt):
    proto = PROTO_UDP
    csum = UDP_CSUM
    tclass = "udp"

    def outbound(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(UDP_MIN)
        buf = ip.buf
        sport = (buf[off] << 8) | buf[off + 1]
        dport = (buf[off + 2] << 8) | buf[off + 3]
        e = self.table.get(("o", PROTO_UDP, ip.src, sport, ip.dst, dport), now)
        if e is None or (e.kind != "napt" and e.kind != "fwd"):
            h = self.eng.udp_helpers.get(sport)  # IKE keeps port 500, by cookies
            if h is not None:
                hv = h.outbound(ip, sport, dport, now)
                if hv is not None:
                    return hv
            if e is None:
                r = self.new_session(ip, sport, dport, now)
                if isinstance(r, Verdict):
                    return r
                e = r
        self.table.touch(e, now)
        return self.finish(ip, e, off, True, sport, e.kind in FAST_KINDS, now)

    def inbound(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(UDP_MIN)
        buf = ip.buf
        sport = (buf[off] << 8) | buf[off + 1]
        dport = (buf[off + 2] << 8) | buf[off + 3]
        h = self.eng.udp_helpers.get(dport)
        if h is not None:
            hv = h.inbound(ip, sport, dport, now)
            if hv is not None:
                return hv
        e = self.table.get(("i", PROTO_UDP, dport, ip.src, sport), now)
        if e is None:
            r = self.inbound_new(ip, sport, dport, now)
            if isinstance(r, Verdict):
                return r
            e = r
        self.table.touch(e, now)  # inbound refresh (RFC 4787 REQ-6 MAY)
        return self.finish(ip, e, off, False, dport, e.kind in FAST_KINDS, now)

    def attach(
        self, e: Entry, inside_port: int, remote_port: int, now: float, *, server_inside: bool
    ) -> EntryAlg | None:
        """A udp-port helper may watch plain NAPT sessions on its port (NAT-T on 4500 labels
        IKE, ESP-in-UDP and keepalives); ``entry.alg`` then sees every packet."""
        for port in (inside_port, remote_port):
            h = self.eng.udp_helpers.get(port)
            if h is not None:
                return h.attach(e, now, server_inside=server_inside)
        return None

    def payload_off(self, ip: IPv4, off: int) -> int:
        return off + UDP_MIN
