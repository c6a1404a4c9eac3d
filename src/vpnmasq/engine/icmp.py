"""ICMP: queries masqueraded by identifier, errors translated back to the flow they quote.

Owns the ICMP translator of the dispatch table: echo and other queries get an identifier
binding like a port (``icmp_id_range``); errors (RFC 5508) are matched through the header
they quote, which is translated back too (REQ-3, REQ-4), including errors the gateway itself
sends about packets vpnmasq rewrote and errors inside hairpinned flows. Helpers find the
entries of their own protocols (ESP by SPI, GRE by Call ID, IKE by cookies) through the
``icmp_embedded_*`` hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vpnmasq.conntrack.table import F_FAST_IN, F_FAST_OUT, Entry
from vpnmasq.engine.napt import add_session, new_binding
from vpnmasq.packet.checksum import checksum
from vpnmasq.packet.errors import MalformedPacket
from vpnmasq.packet.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, IPv4, describe, int_to_ip
from vpnmasq.packet.l4 import (
    ICMP_CSUM,
    ICMP_ERRORS,
    ICMP_MIN,
    ICMP_QUERIES,
    ICMP_REPLIES,
    TCP_CSUM,
    UDP_CSUM,
)
from vpnmasq.verdict import ACCEPT_LOCAL, ACCEPT_UNCHANGED, Action, DropReason, Verdict, accept

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.engine.core import Engine


class Icmp:
    """The ICMP translator."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.table = eng.table

    # --- queries --------------------------------------------------------------------------
    def outbound(self, ip: IPv4, now: float) -> Verdict:
        eng = self.eng
        off = ip.l4(ICMP_MIN)
        buf = ip.buf
        itype = buf[off]
        if itype in ICMP_ERRORS:
            return self.error_out(ip, off, now)
        if itype not in ICMP_QUERIES:
            if itype in ICMP_REPLIES:  # a reply with no query seen through us
                return eng.drop(
                    DropReason.FILTERED, "icmp reply from inside with no query seen", ip
                )
            return eng.drop(DropReason.FILTERED, f"icmp type {itype} not masqueraded", ip)
        ident = (buf[off + 4] << 8) | buf[off + 5]
        e = self.table.get(("o", PROTO_ICMP, ip.src, ident, ip.dst, 0), now)
        if e is None:
            b = self.table.binding(PROTO_ICMP, ip.src, ident)
            fresh = b is None
            if b is None:
                nb = new_binding(eng, eng.icmp_ids, PROTO_ICMP, ip, ident, "no free ICMP id", now)
                if isinstance(nb, Verdict):
                    return nb
                b = nb
            e0 = Entry(
                PROTO_ICMP, "icmp", "icmp", ip.src, ident, ip.dst, 0, eng.public_ip or 0,
                b.alias_port, now,
            )
            keys = (
                ("o", PROTO_ICMP, ip.src, ident, ip.dst, 0),
                ("i", PROTO_ICMP, b.alias_port, ip.dst, 0),
            )
            r = add_session(eng, eng.icmp_ids, b, fresh, e0, keys, now)
            if isinstance(r, Verdict):
                return r
            e = r
        else:
            self.table.touch(e, now)
        pub = eng.public_ip
        assert pub is not None  # _dispatch drops outbound packets before there is one
        ip.set_src(pub)
        if e.alias_port != ident:
            ip.set_l4_u16(4, e.alias_port, ICMP_CSUM)
        self.table.mark_fast(e, F_FAST_OUT)  # (ICMP: no engine fast path; the offload's signal)
        e.pkts_out += 1
        e.last_out = now
        e.bytes_out += ip.total_len
        return accept(buf)

    def inbound(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(ICMP_MIN)
        buf = ip.buf
        itype = buf[off]
        if itype in ICMP_ERRORS:
            return self.error_in(ip, off, now)
        if itype not in ICMP_REPLIES:
            return ACCEPT_LOCAL  # echo requests etc. are for the gateway itself
        ident = (buf[off + 4] << 8) | buf[off + 5]
        e = self.table.get(("i", PROTO_ICMP, ident, ip.src, 0), now)
        if e is None:
            if self.table.binding_by_alias(PROTO_ICMP, ident) is None:
                return ACCEPT_LOCAL  # maybe the gateway's own ping
            return self.eng.drop(DropReason.FILTERED, "icmp reply from a host not queried", ip)
        self.table.touch(e, now)
        ip.set_dst(e.inside_ip)
        if e.inside_port != ident:
            ip.set_l4_u16(4, e.inside_port, ICMP_CSUM)
        self.table.mark_fast(e, F_FAST_IN)
        e.pkts_in += 1
        e.last_in = now
        e.bytes_in += ip.total_len
        return accept(buf)

    # --- errors ---------------------------------------------------------------------------
    @staticmethod
    def embedded(ip: IPv4, off: int) -> tuple[int, IPv4]:
        """Parse the IP header embedded in an ICMP error (it may be truncated after 8 L4 bytes)."""
        ioff = off + 8
        inner_bytes = bytearray(ip.buf[ioff : ip.total_len])
        if len(inner_bytes) < 20:
            raise MalformedPacket("icmp error: embedded header truncated")
        ihl = (inner_bytes[0] & 0x0F) * 4
        if inner_bytes[0] >> 4 != 4 or ihl < 20 or len(inner_bytes) < ihl + 8:
            raise MalformedPacket("icmp error: embedded header or 8 transport bytes missing")
        # the embedded datagram is usually cut short: let the view cover what we have; the
        # declared length is put back by finish()
        if int.from_bytes(inner_bytes[2:4], "big") > len(inner_bytes):
            inner_bytes[2:4] = len(inner_bytes).to_bytes(2, "big")
        return ioff, IPv4(inner_bytes)

    @staticmethod
    def finish(ip: IPv4, off: int, ioff: int, inner: IPv4, orig_len: int) -> Verdict:
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

    def error_in(self, ip: IPv4, off: int, now: float) -> Verdict:
        """An error from outside about one of our outbound packets (RFC 5508 REQ-3)."""
        eng = self.eng
        buf = ip.buf
        if checksum(buf[off : ip.total_len]) != 0:
            return eng.drop(DropReason.BAD_CHECKSUM, "icmp error with a bad checksum", ip)
        ioff, inner = self.embedded(ip, off)
        orig_len = int.from_bytes(buf[ioff + 2 : ioff + 4], "big")
        if inner.src != eng.public_ip:
            return ACCEPT_LOCAL
        p = inner.proto
        e = self._quoted_outbound(inner, now)
        if e is None:
            if p in (PROTO_TCP, PROTO_UDP, PROTO_ICMP) and self._gateway_own(inner):
                return ACCEPT_LOCAL  # about the gateway's own traffic
            return eng.drop(
                DropReason.ICMP_NO_MAPPING, f"icmp error about {describe(inner)}: no mapping", ip
            )
        # translate the embedded header back, then the outer destination
        ib, l4 = inner.buf, inner.ihl
        inner.set_src(e.inside_ip)
        if p in (PROTO_TCP, PROTO_UDP) and e.inside_port != e.alias_port and e.kind != "isakmp":
            csum_off = TCP_CSUM if p == PROTO_TCP else UDP_CSUM
            inner.set_l4_u16(0, e.inside_port, csum_off if l4 + csum_off + 2 <= len(ib) else None)
        elif p == PROTO_ICMP and e.inside_port != e.alias_port:
            inner.set_l4_u16(4, e.inside_port, ICMP_CSUM)
        kh = eng.kind_helpers.get(e.kind)
        if kh is not None:
            kh.icmp_embedded_inbound_fix(inner, e)
        ip.set_dst(e.inside_ip)
        e.pkts_in += 1
        e.last_in = now
        return self.finish(ip, off, ioff, inner, orig_len)

    def _quoted_outbound(self, inner: IPv4, now: float) -> Entry | None:
        """The entry of our outbound packet (public source) quoted in an inbound error."""
        eng, p, ib, l4 = self.eng, inner.proto, inner.buf, inner.ihl
        if p in (PROTO_TCP, PROTO_UDP):
            sport = (ib[l4] << 8) | ib[l4 + 1]
            dport = (ib[l4 + 2] << 8) | ib[l4 + 3]
            e = self.table.get(("i", p, sport, inner.dst, dport), now)
            if e is None and p == PROTO_UDP:
                uh = eng.udp_helpers.get(sport)
                if uh is not None:
                    e = uh.icmp_embedded_inbound(inner, now)
            return e
        if p == PROTO_ICMP:
            ident = (ib[l4 + 4] << 8) | ib[l4 + 5]
            if ib[l4] in ICMP_QUERIES:
                return self.table.get(("i", PROTO_ICMP, ident, inner.dst, 0), now)
            return None
        ph = eng.proto_helpers.get(p)
        if ph is not None:
            return ph.icmp_embedded_inbound(inner, now)
        return self.table.get(("gi", p, inner.dst), now)

    def _gateway_own(self, inner: IPv4) -> bool:
        """An embedded TCP/UDP/ICMP packet we have no mapping for: the gateway's own flow if its
        source port is outside vpnmasq's ranges (otherwise it was ours and is gone)."""
        if inner.proto == PROTO_ICMP:
            return True
        ib = inner.buf
        sport = (ib[inner.ihl] << 8) | ib[inner.ihl + 1]
        return sport not in self.eng.pool

    def error_out(self, ip: IPv4, off: int, now: float, *, local: bool = False) -> Verdict:
        """A LAN host's ICMP error about a packet it received through us (RFC 5508 REQ-4).

        ``local``: the gateway's own error about such a packet (:meth:`error_local`),
        whose source is a gateway address rather than the LAN host the packet was for."""
        eng = self.eng
        buf = ip.buf
        ioff, inner = self.embedded(ip, off)
        orig_len = int.from_bytes(buf[ioff + 2 : ioff + 4], "big")
        p, ib, l4 = inner.proto, inner.buf, inner.ihl
        e = self._quoted_inbound(inner, local or inner.dst == ip.src, now)
        pub = eng.public_ip
        if e is None or pub is None:
            return eng.drop(
                DropReason.ICMP_NO_MAPPING, f"icmp error from inside about {describe(inner)}", ip
            )
        inner.set_dst(pub)
        if p in (PROTO_TCP, PROTO_UDP) and e.inside_port != e.alias_port:
            csum_off = TCP_CSUM if p == PROTO_TCP else UDP_CSUM
            inner.set_l4_u16(2, e.alias_port, csum_off if l4 + csum_off + 2 <= len(ib) else None)
        elif p == PROTO_ICMP and e.inside_port != e.alias_port:
            inner.set_l4_u16(4, e.alias_port, ICMP_CSUM)
        kh = eng.kind_helpers.get(e.kind)
        if kh is not None:  # e.g. a PPTP call's Call ID
            kh.icmp_embedded_outbound_fix(inner, e)
        ip.set_src(pub)
        e.pkts_out += 1
        e.last_out = now
        return self.finish(ip, off, ioff, inner, orig_len)

    def _quoted_inbound(self, inner: IPv4, to_host: bool, now: float) -> Entry | None:
        """The entry of an inbound packet as delivered (``to_host``: to the error's sender),
        quoted in an error from the LAN side."""
        eng, p, ib, l4 = self.eng, inner.proto, inner.buf, inner.ihl
        if to_host and p in (PROTO_TCP, PROTO_UDP):
            sport = (ib[l4] << 8) | ib[l4 + 1]
            dport = (ib[l4 + 2] << 8) | ib[l4 + 3]
            e = self.table.get(("o", p, inner.dst, dport, inner.src, sport), now)
            if e is None and p == PROTO_UDP:  # e.g. ISAKMP, found by its cookies
                uh = eng.udp_helpers.get(dport)
                if uh is not None:
                    e = uh.icmp_embedded_outbound(inner, now)
            return e
        if to_host and p == PROTO_ICMP:
            ident = (ib[l4 + 4] << 8) | ib[l4 + 5]
            return self.table.get(("o", PROTO_ICMP, inner.dst, ident, inner.src, 0), now)
        e = self.table.get(("go", p, inner.dst, inner.src), now)
        ph = eng.proto_helpers.get(p)
        if e is None and to_host and ph is not None:  # ESP by SPI, GRE by Call ID
            e = ph.icmp_embedded_outbound(inner, now)
        return e

    def error_local(self, ip: IPv4, now: float) -> Verdict:
        """An ICMP error the gateway itself sent, queued from its OUTPUT hook by the rules:
        the only outbound packets from a source that is not inside. One that quotes a packet
        vpnmasq rewrote is translated like anyone else's error (about an inbound packet: as a
        LAN host's, :meth:`error_out`; about an outbound one, which the kernel addressed to
        the public address: as one from outside, :meth:`error_in`; about a hairpinned one:
        :meth:`error_hairpin`). Anything else leaves unchanged, or, if it is not an error or
        addressed to itself from elsewhere than the public address, is dropped as not
        inside. Design notes: docs/internals/engine.md."""
        eng = self.eng
        off = ip.l4(ICMP_MIN)
        if ip.buf[off] not in ICMP_ERRORS:
            return eng.drop(DropReason.NOT_INSIDE, f"source {int_to_ip(ip.src)} is not inside", ip)
        _ioff, inner = self.embedded(ip, off)
        if inner.src == eng.public_ip:
            if ip.src != eng.public_ip:
                return eng.drop(
                    DropReason.NOT_INSIDE, f"source {int_to_ip(ip.src)} is not inside", ip
                )
            eng.count("icmp_local_error_in")
            if eng.is_inside(inner.dst):  # about a hairpinned packet: to the other LAN host
                return self.error_hairpin(ip, off, now, local=True)
            return self.error_in(ip, off, now)
        if eng.is_inside(inner.dst) and not eng.is_inside(inner.src):
            eng.count("icmp_local_error_out")
            return self.error_out(ip, off, now, local=True)
        return ACCEPT_UNCHANGED

    def error_hairpin(self, ip: IPv4, off: int, now: float, *, local: bool = False) -> Verdict:
        """A LAN host's ICMP error about a packet it got through a hairpin: the quoted packet
        came from the public address (both its addresses were translated), so the error is
        translated as a LAN host's error (:meth:`error_out`), then as one arriving at the
        public address (:meth:`error_in`): it reaches the other LAN host quoting that host's
        own packet. ``local``: the gateway's own error about a hairpinned packet."""
        v = self.error_out(ip, off, now, local=local)
        if v.action is not Action.ACCEPT or v.payload is None:
            return v
        self.eng.count("hairpin")
        back = IPv4(bytearray(v.payload))
        return self.error_in(back, back.l4(ICMP_MIN), now)
