"""Fuzz targets: ``TARGETS[name](data)`` runs one input; any exception is a finding.

Input format (all targets): byte 0 picks the world variant (:data:`fuzz.world.VARIANTS`),
then *records* ``[flags:1][length:2, big-endian][bytes]`` (a short tail is one record with
what is left). Each record is one packet (or one TCP segment's payload for ``pptp``), handled
on the same engine, so sequences reach deep state. Flag bits:

====  ============================================================================
bit   meaning
====  ============================================================================
0     1 = outbound (from the LAN), 0 = inbound
1-2   advance the clock by (0, 2.5, 61, 301) s before the packet
3     target-specific (see each target)
4     run ``handle_timer(now)`` after advancing (then also check that nothing outlived
      its expiry)
5-6   outside peer: EXT, EXT2, ATTACKER, or a LAN address forged from outside
7     LAN host: PRV1 or PRV2 (``isakmp``: PRV1 or PRV3)
====  ============================================================================

Targets: ``engine`` (whole datagrams; bit 3 set: addresses, lengths and checksums are
fixed up so the fuzzer reaches the protocol code), ``ipv4`` (whole datagrams untouched, plus
the header parser and address rewrites directly), ``tcp``, ``udp``, ``icmp``, ``gre``, ``esp``
(transport/tunnel header and payload; bit 3 set: TCP/UDP/ICMP checksum fixed), ``isakmp``
(the UDP payload, parsed directly and through the engine on port 500, or 4500 behind the
non-ESP marker with bit 3), ``pptp`` (payload bytes on the PPTP control connection of the
world, bit 3: second client; bits 5-6: ACK / PSH / FIN / RST; bit 7: the sequence number
jumps ahead instead of continuing the stream: by 1000 (a gap) for an even payload length,
by 2**30 (a blind segment: a FIN or RST from outside must then change nothing) for an odd).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from tests.invariants import check_invariants
from tests.packets import ATTACKER, EXT, EXT2, MASQ, PRV1, PRV2, PRV3

from fuzz.oracles import Before, OracleFailure, check_verdict, checksums, fingerprint
from fuzz.world import World, fresh_world
from vpnmasq.helpers.isakmp import IsakmpHeader, MalformedIsakmp
from vpnmasq.packet.checksum import checksum, pseudo_header_sum
from vpnmasq.packet.errors import MalformedPacket
from vpnmasq.packet.ipv4 import (
    PROTO_ESP,
    PROTO_GRE,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    IPv4,
    build_ipv4,
)
from vpnmasq.packet.l4 import TCP_ACK, TCP_FIN, TCP_RST, build_tcp
from vpnmasq.verdict import Action, Direction

STEPS = (0.0, 2.5, 61.0, 301.0)
PEERS = (EXT, EXT2, ATTACKER, PRV3)
HOSTS = (PRV1, PRV2)
MAX_RECORDS = 48
F_OUT, F_SPECIAL, F_TIMER, F_HOST = 0x01, 0x08, 0x10, 0x80

Target = Callable[[bytes], None]


# ---------------------------------------------------------------------- input format
def records(data: bytes) -> Iterator[tuple[int, bytes]]:
    i, n = 0, len(data)
    for _ in range(MAX_RECORDS):
        if i >= n:
            return
        flags = data[i]
        if i + 3 <= n:
            length = (data[i + 1] << 8) | data[i + 2]
            start = i + 3
        else:
            length, start = n, i + 1
        chunk = data[start : start + length]
        i = start + len(chunk)
        yield flags, chunk


def encode(variant: int, recs: list[tuple[int, bytes]]) -> bytes:
    """The inverse of :func:`records` (for seeds and regression files)."""
    out = bytearray([variant & 0xFF])
    for flags, chunk in recs:
        out += struct.pack("!BH", flags & 0xFF, len(chunk)) + chunk
    return bytes(out)


def flags_of(*, out: bool, step: int = 0, special: bool = False, timer: bool = False,
             peer: int = 0, host: int = 0) -> int:
    return (
        (F_OUT if out else 0) | (step & 3) << 1 | (F_SPECIAL if special else 0)
        | (F_TIMER if timer else 0) | (peer & 3) << 5 | (F_HOST if host else 0)
    )


# ---------------------------------------------------------------------- the driver
class Driver:
    """A world plus the per-packet oracles."""

    def __init__(self, data: bytes) -> None:
        self.w: World = fresh_world(data[0] if data else 0)
        self.packets = 0

    def clock(self, flags: int) -> None:
        w = self.w
        w.now += STEPS[(flags >> 1) & 3]
        if flags & F_TIMER:
            for _tok, v in w.eng.handle_timer(w.now):
                assert v.action is Action.DROP, f"a timer released {v}"
            check_invariants(w.eng, w.now)

    def send(self, pkt: bytes | bytearray, outbound: bool) -> None:
        eng = self.w.eng
        d = Direction.OUTBOUND if outbound else Direction.INBOUND
        pre = None
        if not outbound:
            src = int.from_bytes(pkt[12:16], "big") if len(pkt) >= 20 else None
            pre = Before(eng, src, self.w.now)
        v = eng.handle(pkt, d, self.w.now, token=self.packets)
        self.packets += 1
        check_verdict(eng, pkt, d, v, pre)
        check_invariants(eng)


def _trim(pkt: bytearray) -> bytearray:
    """The kernel hands over exactly total-length bytes: cut any tail, as it would."""
    if len(pkt) >= 4:
        tl = (pkt[2] << 8) | pkt[3]
        if 20 <= tl < len(pkt):
            del pkt[tl:]
    return pkt


def _fix_l4(pkt: bytearray) -> bytearray:
    try:
        ip = IPv4(pkt)
    except MalformedPacket:
        return pkt
    if ip.is_fragment:
        return pkt
    off, seg_len = ip.ihl, ip.total_len - ip.ihl
    if ip.proto == PROTO_TCP and seg_len >= 20:
        pkt[off + 16 : off + 18] = b"\0\0"
        c = checksum(pkt[off : ip.total_len], pseudo_header_sum(ip.src, ip.dst, PROTO_TCP, seg_len))
        pkt[off + 16 : off + 18] = c.to_bytes(2, "big")
    elif ip.proto == PROTO_UDP and seg_len >= 8:
        pkt[off + 4 : off + 6] = seg_len.to_bytes(2, "big")
        pkt[off + 6 : off + 8] = b"\0\0"
        c = checksum(pkt[off : ip.total_len], pseudo_header_sum(ip.src, ip.dst, PROTO_UDP, seg_len))
        pkt[off + 6 : off + 8] = (c or 0xFFFF).to_bytes(2, "big")
    elif ip.proto == PROTO_ICMP and seg_len >= 4:
        pkt[off + 2 : off + 4] = b"\0\0"
        pkt[off + 2 : off + 4] = checksum(pkt[off : ip.total_len]).to_bytes(2, "big")
    return pkt


def _fix_ip(pkt: bytearray, *, src: int | None, dst: int | None) -> bytearray:
    if len(pkt) < 20:
        return pkt
    pkt[0] = 0x40 | max(5, pkt[0] & 0x0F)
    ihl = (pkt[0] & 0x0F) * 4
    if len(pkt) < ihl:
        pkt[0] = 0x45
        ihl = 20
    pkt[2:4] = len(pkt).to_bytes(2, "big")
    if src is not None:
        pkt[12:16] = src.to_bytes(4, "big")
    if dst is not None:
        pkt[16:20] = dst.to_bytes(4, "big")
    pkt[10:12] = b"\0\0"
    pkt[10:12] = checksum(pkt[:ihl]).to_bytes(2, "big")
    return pkt


def _ends(flags: int, lan: tuple[int, ...] = HOSTS) -> tuple[bool, int, int]:
    """(outbound, source, destination) for a record's flags."""
    out = bool(flags & F_OUT)
    host = lan[1 if flags & F_HOST else 0]
    peer = PEERS[(flags >> 5) & 3]
    return (out, host, peer) if out else (out, peer, MASQ)


# ---------------------------------------------------------------------- targets
def target_engine(data: bytes) -> None:
    d = Driver(data)
    for flags, chunk in records(data[1:]):
        d.clock(flags)
        out, src, dst = _ends(flags)
        pkt = bytearray(chunk)
        if flags & F_SPECIAL:
            pkt = _fix_l4(_fix_ip(pkt, src=src if out else None, dst=None if out else MASQ))
        d.send(_trim(pkt), out)


def target_ipv4(data: bytes) -> None:
    d = Driver(data)
    for flags, chunk in records(data[1:]):
        d.clock(flags)
        buf = _trim(bytearray(chunk))
        try:
            ip = IPv4(bytearray(buf))
        except MalformedPacket:
            ip = None
        if ip is not None:
            # the parser's promises: in-bounds offsets, rewrites keep right checksums right
            assert ip.ihl <= ip.total_len <= len(ip.buf)
            h0, l0 = checksums(ip.buf)
            ip.set_src(PRV1 if ip.src != PRV1 else PRV2)
            ip.set_dst(MASQ if ip.dst != MASQ else EXT)
            h1, l1 = checksums(ip.buf)
            assert not h0 or h1, "set_src/set_dst broke a right IP header checksum"
            if ip.proto in (PROTO_TCP, PROTO_UDP):
                assert not l0 or l1 is not False, "address rewrite broke a right L4 checksum"
        d.send(buf, bool(flags & F_OUT))


def _l4_target(proto: int) -> Target:
    def run(data: bytes) -> None:
        d = Driver(data)
        for flags, chunk in records(data[1:]):
            d.clock(flags)
            out, src, dst = _ends(flags)
            pkt = build_ipv4(src, dst, proto, chunk)
            if flags & F_SPECIAL:
                pkt = _fix_l4(pkt)
            d.send(pkt, out)

    run.__name__ = f"target_proto{proto}"
    return run


NATT_MARKER = b"\0\0\0\0"


def target_isakmp(data: bytes) -> None:
    d = Driver(data)
    for flags, chunk in records(data[1:]):
        for whole in (True, False):
            try:
                IsakmpHeader.parse(chunk, whole=whole)
            except MalformedIsakmp:
                pass
        d.clock(flags)
        out, src, dst = _ends(flags, (PRV1, PRV3))
        port = 4500 if flags & F_SPECIAL else 500
        payload = NATT_MARKER + chunk if port == 4500 else chunk
        seg = struct.pack("!HHHH", port, port, 8 + len(payload), 0) + payload
        d.send(_fix_l4(build_ipv4(src, dst, PROTO_UDP, seg)), out)


def target_pptp(data: bytes) -> None:
    d = Driver(data)
    w = d.w
    for flags, chunk in records(data[1:]):
        d.clock(flags)
        link = w.pptp2 if flags & F_SPECIAL else w.pptp
        assert link is not None
        tcp_flags = (TCP_ACK, TCP_ACK | 0x08, TCP_FIN | TCP_ACK, TCP_RST | TCP_ACK)[(flags >> 5) & 3]
        from_lan = bool(flags & F_OUT)
        base = link.lan_seq if from_lan else link.remote_seq
        # bit 7: a gap; a small one (the ALG drops it until the hole is filled) for an even
        # payload length, else a jump far outside any window (a blind segment)
        blind = bool(flags & F_HOST) and len(chunk) % 2 == 1
        seq = base + ((0x40000000 if blind else 1000) if flags & F_HOST else 0)
        eng = w.eng
        pre = Before(eng, None if from_lan else link.remote_ip, w.now)
        # RFC 5382: a blind RST/FIN from outside changes nothing (no call ends, no timeout
        # shortens); only the TCP-level bookkeeping of the one entry may move
        blind_print = fingerprint(eng, w.now) if blind and not from_lan else None
        # sessions whose LAN side never ACKed anything have no window to check against
        # (e.g. one a forward opened on a stray segment): any segment of their peer counts
        no_window = {id(e) for e in eng.table if e.proto == 6 and e.last_ack_out < 0}
        if from_lan:
            v = link.lan_segment(chunk, w.now, seq=seq, flags=tcp_flags)
        else:
            v = link.remote_segment(chunk, w.now, seq=seq, flags=tcp_flags)
        d.packets += 1
        # the oracles need the packet as sent: rebuild it the way ControlLink did
        if from_lan:
            pkt = build_tcp(link.lan_ip, link.remote_ip, link.lan_port, link.remote_port, chunk,
                            flags=tcp_flags, seq=seq & 0xFFFFFFFF, ack=link.remote_seq & 0xFFFFFFFF)
        else:
            pkt = build_tcp(link.remote_ip, MASQ, link.remote_port, link.public_port, chunk,
                            flags=tcp_flags, seq=seq & 0xFFFFFFFF, ack=link.lan_seq & 0xFFFFFFFF)
        check_verdict(eng, pkt, Direction.OUTBOUND if from_lan else Direction.INBOUND, v, pre)
        check_invariants(eng)
        if blind_print is not None and tcp_flags & (TCP_FIN | TCP_RST):
            after = fingerprint(eng, w.now)
            # a whole-protocol forward may take a segment for a mapping that is gone: that
            # new forwarded session is the forward doing its job, not a change
            fwd = {id(e) for e in eng.table if e.kind == "fwd"} - set(blind_print)
            after = {k: v for k, v in after.items() if k not in fwd and k not in no_window}
            if after != {k: v for k, v in blind_print.items() if k not in no_window}:
                raise OracleFailure(
                    "a blind FIN/RST from the server's address changed the table: "
                    f"{sorted(map(str, set(after.items()) ^ set(blind_print.items())))[:4]}"
                )
        if v.action is Action.ACCEPT and not flags & F_HOST:
            n = len(chunk) + (1 if tcp_flags & TCP_FIN else 0)
            if from_lan:
                link.lan_seq += n
            else:
                link.remote_seq += n


TARGETS: dict[str, Target] = {
    "engine": target_engine,
    "ipv4": target_ipv4,
    "tcp": _l4_target(PROTO_TCP),
    "udp": _l4_target(PROTO_UDP),
    "icmp": _l4_target(PROTO_ICMP),
    "gre": _l4_target(PROTO_GRE),
    "esp": _l4_target(PROTO_ESP),
    "isakmp": target_isakmp,
    "pptp": target_pptp,
}
