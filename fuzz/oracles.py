"""What must hold after every fuzzed packet, beyond "no exception".

* :func:`tests.invariants.check_invariants`: the table's bookkeeping and limits;
* the verdict is a :class:`Verdict`; an accepted datagram parses as IPv4 and is no longer than
  ``MAX_PACKET``; checksums that were right on the way in are right on the way out;
* nothing outbound leaves with a LAN source address (a rewritten packet has the public
  source; an unchanged one came from an address that is not inside);
* an inbound packet reaches a LAN host only if that host had, before the packet, an entry
  with the sender (for an ICMP error: with the destination of the quoted packet), a pending
  ESP claim toward it, or a forward that matches it.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from vpnmasq.engine import MAX_PACKET, Engine
from vpnmasq.packet.checksum import checksum, pseudo_header_sum
from vpnmasq.packet.errors import MalformedPacket
from vpnmasq.packet.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, IPv4
from vpnmasq.packet.l4 import ICMP_ERRORS
from vpnmasq.verdict import Action, Direction, Verdict

__all__ = ["OracleFailure", "Before", "before", "check_verdict", "checksums"]


class OracleFailure(AssertionError):
    pass


def checksums(data: bytes | bytearray) -> tuple[bool, bool | None]:
    """(IP header checksum ok, L4 checksum ok or None when not checkable)."""
    try:
        ip = IPv4(bytearray(data))
    except MalformedPacket:
        return (False, None)
    hdr_ok = checksum(memoryview(ip.buf)[: ip.ihl]) == 0
    if ip.is_fragment:
        return (hdr_ok, None)
    seg = bytes(ip.buf[ip.ihl : ip.total_len])
    if ip.proto == PROTO_TCP and len(seg) >= 20:
        return (hdr_ok, checksum(seg, pseudo_header_sum(ip.src, ip.dst, ip.proto, len(seg))) == 0)
    if ip.proto == PROTO_UDP and len(seg) >= 8:
        if seg[6:8] == b"\x00\x00":
            return (hdr_ok, None)
        if int.from_bytes(seg[4:6], "big") != len(seg):
            return (hdr_ok, None)  # the UDP length disagrees with the IP length: undefined
        return (hdr_ok, checksum(seg, pseudo_header_sum(ip.src, ip.dst, ip.proto, len(seg))) == 0)
    if ip.proto == PROTO_ICMP and len(seg) >= 8:
        return (hdr_ok, checksum(seg) == 0)
    return (hdr_ok, None)


def fingerprint(eng: Engine, now: float) -> dict[int, tuple[object, ...]]:
    """The live (not yet due) entries and what a packet could change about them."""
    return {
        id(e): (e.tclass, e.state_name, e.expires_at, tuple(e.keys), e.inside_ip)
        for e in eng.table
        if e.expires_at > now
    }


class Before:
    """Who could legitimately receive from whom, taken before a packet is handled; and, for
    a packet from a *stranger* (an address no entry has as its remote, with no forward
    configured), the table's fingerprint: a stranger must not change anything."""

    __slots__ = ("pairs", "claims", "forward_hosts", "remotes", "now", "print")

    def __init__(self, eng: Engine, src: int | None = None, now: float | None = None) -> None:
        self.pairs = {(e.inside_ip, e.remote_ip) for e in eng.table}
        self.remotes = {e.remote_ip for e in eng.table}
        esp = eng.helper_by_name.get("esp")
        self.claims: set[tuple[int, int]] = set(getattr(esp, "claims", {}).keys())
        self.forward_hosts = {int(IPv4Address(f.to)) for f in eng.config.forwards}
        self.now = now
        self.print: dict[int, tuple[object, ...]] | None = None
        if src is not None and now is not None and not eng.config.forwards and src not in self.remotes:
            self.print = fingerprint(eng, now)


def before(eng: Engine) -> Before:
    return Before(eng)


def _fail(msg: str) -> None:
    raise OracleFailure(msg)


def check_verdict(  # noqa: C901 - a list of independent invariants of one verdict
    eng: Engine, pkt: bytes | bytearray, direction: Direction, v: Verdict, pre: Before | None
) -> None:
    if not isinstance(v, Verdict):
        _fail(f"handle returned {type(v).__name__}, not a Verdict")
    for _tok, rv in v.released:
        if rv.action is Action.ACCEPT and rv.payload is not None:
            _check_parse(rv.payload)
    if pre is not None and pre.print is not None and pre.now is not None:
        after = fingerprint(eng, pre.now)
        if after != pre.print:
            changed = set(after.items()) ^ set(pre.print.items())
            _fail(f"a packet from a stranger changed the table: {sorted(map(str, changed))[:4]}")
    if v.action is not Action.ACCEPT:
        if v.payload is not None:
            _fail(f"{v.action} verdict carries a payload")
        return
    try:
        src_in = IPv4(bytearray(pkt))
    except MalformedPacket:
        _fail("a datagram the parser rejects was accepted")
        return
    if direction is Direction.OUTBOUND:
        if v.payload is None:
            if v.local and src_in.dst == eng.public_ip:
                return  # to the gateway's own public address: it answers itself
            if eng.is_inside(src_in.src) and not eng.is_exempt(src_in.src):
                _fail(f"outbound from inside {src_in.src:#x} accepted unchanged (address leak)")
            return
        out = _check_parse(v.payload)
        if out.src != eng.public_ip:
            _fail(f"outbound accepted with source {out.src:#x}, not the public address")
        _same_checksums(pkt, v.payload)
        return
    # inbound
    if v.payload is None:
        return  # unchanged: for the gateway itself (local) or not addressed to us
    out = _check_parse(v.payload)
    _same_checksums(pkt, v.payload)
    if not eng.is_inside(out.dst) or pre is None:
        return
    remote = out.src
    if out.proto == PROTO_ICMP and out.l4_len >= 8 + 20 and out.buf[out.ihl] in ICMP_ERRORS:
        inner_off = out.ihl + 8
        remote = int.from_bytes(out.buf[inner_off + 16 : inner_off + 20], "big")
        quoted_src = int.from_bytes(out.buf[inner_off + 12 : inner_off + 16], "big")
        if quoted_src != out.dst:
            _fail(
                f"ICMP error delivered to {out.dst:#x} quotes a packet from {quoted_src:#x}"
            )
    host = out.dst
    if (host, remote) in pre.pairs or (host, remote) in pre.claims or host in pre.forward_hosts:
        return
    _fail(
        f"inbound from {out.src:#x} (flow remote {remote:#x}) delivered to LAN host {host:#x}, "
        "which had no entry with that remote, no ESP claim and no forward"
    )


def _check_parse(payload: bytes) -> IPv4:
    if len(payload) > MAX_PACKET:
        _fail(f"accepted datagram of {len(payload)} bytes > {MAX_PACKET}")
    try:
        ip = IPv4(bytearray(payload))
    except MalformedPacket as exc:
        _fail(f"accepted datagram does not parse: {exc.reason}")
        raise
    return ip


def _same_checksums(before_pkt: bytes | bytearray, after: bytes) -> None:
    h0, l0 = checksums(before_pkt)
    h1, l1 = checksums(after)
    if h0 and not h1:
        _fail("IP header checksum was right and is wrong after translation")
    if l0 and l1 is False:
        _fail("transport checksum was right and is wrong after translation")

