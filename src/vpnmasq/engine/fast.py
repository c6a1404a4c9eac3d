"""The fast path: established TCP/UDP flows answered without the parse-dispatch-lookup chain.

One flat function over the table, bound as ``Engine._fast`` (a method, so tests can wrap it):
not a translator of the dispatch table, because a table lookup and two calls per packet cost
more than the rewrite itself. It gives exactly the slow path's bytes (tests/property/
test_fast_path.py checks this on random traffic).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from vpnmasq.conntrack.table import F_FAST_IN, F_FAST_OUT, PERMANENT
from vpnmasq.engine.policy import IKE_UDP_PORTS
from vpnmasq.engine.tcp_state import TCP_ESTABLISHED
from vpnmasq.packet.ipv4 import PROTO_TCP, PROTO_UDP
from vpnmasq.packet.l4 import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from vpnmasq.verdict import Direction, Verdict, _make_accept, accept

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.engine.core import Engine

OUT = Direction.OUTBOUND
#: version/IHL, total length, flags+offset, protocol, source, destination, source port,
#: destination port: one unpack for the fast path's whole parse
_FAST_HDR = struct.Struct("!BxHxxHxBxxIIHH")
_FAST_ACK = struct.Struct("!I")
#: accept() without its wrapper call
_accept_bytes: Callable[[bytes], Verdict] = _make_accept if _make_accept is not None else accept


def fast(  # noqa: C901 - the per-packet fast path: one flat function, no calls
    self: Engine, packet: bytes | bytearray, direction: Direction, now: float
) -> Verdict | None:
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
        if dst != pub or (proto == PROTO_UDP and (dport in IKE_UDP_PORTS or dport in self.udp_helpers)):
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

