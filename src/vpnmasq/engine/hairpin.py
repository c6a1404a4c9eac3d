"""Hairpinning: a LAN host reaching a LAN host through the public address (RFC 4787 REQ-9).

The packet is translated as outbound by its protocol's translator (the source becomes the
public address), then as inbound by the same translator (the destination becomes the LAN
host behind the mapping or forward). TCP, UDP and GRE (PPTP: the control connection gets an
ALG per leg, each with its own outside Call ID) hairpin; ICMP errors inside hairpinned flows
go through :meth:`.icmp.Icmp.error_hairpin`; pings to the public address are the gateway's.
Known limit: ESP does not hairpin (its inbound leg would be associated with the sender
itself); NAT-T does, as UDP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vpnmasq.packet.ipv4 import PROTO_GRE, PROTO_ICMP, PROTO_TCP, PROTO_UDP, IPv4
from vpnmasq.packet.l4 import ICMP_ERRORS, ICMP_MIN
from vpnmasq.verdict import ACCEPT_LOCAL, Action, DropReason, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.engine.core import Engine


def hairpin(eng: Engine, ip: IPv4, now: float) -> Verdict:
    """Translate the source as for any outbound packet, then the destination as inbound."""
    p = ip.proto
    if p == PROTO_ICMP:
        off = ip.l4(ICMP_MIN)
        if ip.buf[off] in ICMP_ERRORS:  # about a hairpinned packet
            return eng.icmp.error_hairpin(ip, off, now)
        return ACCEPT_LOCAL  # pinging our own public address: the gateway answers
    if p == PROTO_TCP or p == PROTO_UDP or (p == PROTO_GRE and p in eng.proto_helpers):
        t = eng.translators[p]
    else:
        return eng.drop(DropReason.FILTERED, f"no hairpin for protocol {p}", ip)
    v = t.outbound(ip, now)
    if v.action is not Action.ACCEPT or v.payload is None:
        return v
    eng.count("hairpin")
    return t.inbound(IPv4(bytearray(v.payload)), now)
