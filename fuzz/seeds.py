"""Seed corpus: real packets from the scenario tests' builders, framed for each target.

:func:`script` plays short conversations against a scratch :class:`fuzz.world.World` (so the
ports, Call IDs and SPIs are the ones a fuzzed world really has) and records every datagram
with its direction; ICMP errors quote the datagrams the engine actually sent. :func:`seeds`
cuts that script into inputs for one target: whole datagrams for ``engine``/``ipv4``, the
transport bytes for ``tcp``/``udp``/``icmp``/``gre``/``esp``, UDP payloads for ``isakmp`` and
control-message byte streams (from ``tests/pptp_wire.py``) for ``pptp``.
"""

from __future__ import annotations

from tests.packets import ATTACKER, EXT, EXT2, MASQ, PRV1, PRV2, PRV3, SRV_LAN
from tests.pptp_wire import (
    ccrq,
    cdn,
    echo_rp,
    echo_rq,
    gre_packet,
    iccn,
    icrp,
    icrq,
    ocrp,
    ocrq,
    sccrp,
    sccrq,
    sli,
    stopccrp,
    stopccrq,
    wen,
)

from fuzz.targets import PEERS, encode, flags_of
from fuzz.world import MAIN, QUICK, SA_INIT, VARIANTS, build_world
from vpnmasq.helpers.isakmp import build_header
from vpnmasq.packet.ipv4 import PROTO_ESP, IPv4, build_ipv4
from vpnmasq.packet.l4 import (
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    build_esp,
    build_icmp,
    build_tcp,
    build_udp,
)
from vpnmasq.verdict import Action

Step = tuple[bool, bytes]  # (outbound, datagram)


def _router_error(quoted: bytes, icmp_type: int = 3, code: int = 3, cut: int = 28) -> bytes:
    return bytes(build_icmp(ATTACKER, MASQ, icmp_type, code, 1400 if code == 4 else 0, quoted[:cut]))


def script(variant: int = 0) -> list[list[Step]]:  # long: the PPTP/IKE transcript seeds, message by message
    """Conversations (lists of steps) against the world of ``variant``."""
    w = build_world(variant)
    tport, uport, icmp_id = w.aliases["tcp"], w.aliases["udp"], w.aliases["icmp"]
    call_out = w.outside_call_ids["pptp"]
    convs: list[list[Step]] = []

    def sent(pkt: bytes | bytearray, out: bool) -> bytes:
        v = w.send(pkt, out)
        return bytes(v.payload) if v.action is Action.ACCEPT and v.payload else b""

    # plain flows, replies, closes
    convs.append([
        (False, bytes(build_tcp(EXT, MASQ, 80, tport, b"HTTP/1.0 200 OK\r\n", seq=901, ack=101))),
        (True, bytes(build_tcp(PRV1, EXT, 40000, 80, b"GET / HTTP/1.0\r\n\r\n", seq=101, ack=918))),
        (False, bytes(build_tcp(EXT, MASQ, 80, tport, flags=TCP_FIN | TCP_ACK, seq=918, ack=119))),
        (True, bytes(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_FIN | TCP_ACK, seq=119, ack=919))),
    ])
    convs.append([
        (False, bytes(build_tcp(EXT, MASQ, 80, tport, flags=TCP_RST | TCP_ACK, seq=901, ack=101))),
        (False, bytes(build_tcp(ATTACKER, MASQ, 80, tport, flags=TCP_RST, seq=0x7777, ack=0))),
        (False, bytes(build_tcp(EXT, MASQ, 80, tport, flags=TCP_RST, seq=0x80000000, ack=0))),
    ])
    convs.append([
        (True, bytes(build_tcp(PRV2, EXT2, 33000, 443, flags=TCP_SYN, seq=5, ack=0))),
        (False, bytes(build_tcp(EXT2, MASQ, 443, 33000, flags=TCP_SYN | TCP_ACK, seq=9, ack=6))),
        (False, bytes(build_tcp(ATTACKER, MASQ, 1234, 8080, flags=TCP_SYN, seq=1, ack=0))),
        (True, bytes(build_tcp(PRV2, MASQ, 33001, 8080, flags=TCP_SYN, seq=1, ack=0))),
    ])
    convs.append([
        (False, bytes(build_udp(EXT, MASQ, 53, uport, b"late answer"))),
        (False, bytes(build_udp(EXT2, MASQ, 53, uport, b"other remote"))),
        (False, bytes(build_udp(ATTACKER, MASQ, 5060, 5060, b"INVITE sip:x SIP/2.0\r\n"))),
        (True, bytes(build_udp(PRV2, EXT2, 5353, 53, b"q", no_checksum=True))),
    ])
    convs.append([
        (True, bytes(build_icmp(PRV2, EXT, 8, 0, (77 << 16) | 2, b"ping"))),
        (False, bytes(build_icmp(EXT, MASQ, 0, 0, (icmp_id << 16) | 2, b"ping"))),
        (False, bytes(build_icmp(ATTACKER, MASQ, 8, 0, (1 << 16) | 1, b"probe"))),
        (False, bytes(build_icmp(EXT2, MASQ, 0, 0, (icmp_id << 16) | 2, b"ping"))),
    ])
    # ICMP errors quoting what the engine really sent, and a LAN host's own error
    tcp_q = sent(build_tcp(PRV1, EXT, 40000, 80, b"x", seq=119, ack=918), True)
    udp_q = sent(build_udp(PRV1, EXT, 5353, 53, b"again"), True)
    esp_q = sent(build_ipv4(PRV1, EXT, PROTO_ESP, build_esp(0x1001, 2)), True)
    gre_q = sent(gre_packet(PRV1, EXT, 0x4000), True)
    ike_q = sent(build_udp(PRV1, EXT, 500, 500, build_header(0x11, 0x22, 5, flags=1, message_id=9)), True)
    echo_q = sent(build_icmp(PRV2, EXT, 8, 0, (77 << 16) | 3, b"ping"), True)
    errs: list[Step] = []
    for q in (tcp_q, udp_q, esp_q, gre_q, ike_q, echo_q):
        if q:
            errs.append((False, _router_error(q)))
            errs.append((False, _router_error(q, 3, 4, cut=len(q))))
            errs.append((False, _router_error(q, 11, 0)))
    inbound_udp = bytes(build_udp(EXT, PRV1, 53, 5353, b"answer"))
    errs.append((True, bytes(build_icmp(PRV1, EXT, 3, 3, 0, inbound_udp[:28]))))
    convs.append(errs)
    # PPTP data and control (as whole datagrams)
    convs.append([
        (True, bytes(gre_packet(PRV1, EXT, 0x4000))),
        (False, bytes(gre_packet(EXT, MASQ, call_out))),
        (False, bytes(gre_packet(EXT, MASQ, (call_out + 1) & 0xFFFF))),
        (False, bytes(gre_packet(ATTACKER, MASQ, call_out))),
        (True, bytes(gre_packet(PRV2, EXT2, 0x99, seq=None, ack=3))),
        (False, bytes(build_ipv4(EXT2, MASQ, 47, b"\x00\x00\x08\x00" + b"v0 gre"))),
    ])
    link = w.pptp
    assert link is not None
    convs.append([
        (True, bytes(build_tcp(PRV1, EXT, 1025, 1723, ocrq(9), seq=link.lan_seq, ack=link.remote_seq))),
        (False, bytes(build_tcp(EXT, MASQ, 1723, link.public_port, cdn(0x4000), seq=link.remote_seq, ack=link.lan_seq))),
        (True, bytes(build_tcp(PRV1, EXT, 1025, 1723, stopccrq(), seq=link.lan_seq, ack=link.remote_seq))),
    ])
    # IKE and ESP
    convs.append([
        (True, bytes(build_udp(PRV1, EXT, 500, 500, build_header(0x11, 0x22, QUICK, flags=1, message_id=6)))),
        (False, bytes(build_udp(EXT, MASQ, 500, 500, build_header(0x11, 0x22, QUICK, flags=1, message_id=6)))),
        (False, bytes(build_udp(EXT, MASQ, 500, 500, build_header(0x99, 0, MAIN)))),
        (False, bytes(build_udp(ATTACKER, MASQ, 500, 500, build_header(0x11, 0x22, 5, flags=1)))),
        (False, bytes(build_udp(EXT2, MASQ, 500, 500, build_header(0x33, 0x44, SA_INIT, major=2, flags=0x20)))),
        (True, bytes(build_udp(PRV3, EXT2, 500, 500, build_header(0x33, 0x44, 35, major=2, flags=8, message_id=1)))),
        (True, bytes(build_udp(PRV1, EXT, 4500, 4500, b"\0\0\0\0" + build_header(0x11, 0x22, QUICK, flags=1)))),
        (True, bytes(build_udp(PRV1, EXT, 4500, 4500, b"\xff"))),
    ])
    convs.append([
        (True, bytes(build_ipv4(PRV1, EXT, PROTO_ESP, build_esp(0x1001, 3)))),
        (False, bytes(build_ipv4(EXT, MASQ, PROTO_ESP, build_esp(0x2001, 3)))),
        (False, bytes(build_ipv4(EXT2, MASQ, PROTO_ESP, build_esp(0x4001, 1)))),
        (False, bytes(build_ipv4(ATTACKER, MASQ, PROTO_ESP, build_esp(0x4001, 1)))),
        (True, bytes(build_ipv4(PRV3, EXT2, PROTO_ESP, build_esp(0x5001, 1)))),
        (False, bytes(build_ipv4(EXT, MASQ, PROTO_ESP, build_esp(0, 1)))),
        (False, bytes(build_ipv4(EXT, MASQ, 51, b"\x32\x04\0\0" + b"\0\0\x10\x01" + b"\0" * 16))),
    ])
    # fragments of a UDP datagram, the second first
    big = build_udp(PRV1, EXT, 5353, 53, bytes(range(64)))
    first = bytearray(build_ipv4(PRV1, EXT, 17, bytes(big[20:44]), ident=0x77, flags_frag=0x2000))
    second = bytearray(build_ipv4(PRV1, EXT, 17, bytes(big[44:]), ident=0x77, flags_frag=3))
    convs.append([(True, bytes(second)), (True, bytes(first))])
    # a LAN server behind forwards (variant 1), hairpin
    convs.append([
        (False, bytes(build_tcp(EXT2, MASQ, 5555, 1723, flags=TCP_SYN, seq=1, ack=0))),
        (True, bytes(build_tcp(SRV_LAN, EXT2, 1723, 5555, flags=TCP_SYN | TCP_ACK, seq=70, ack=2))),
        (False, bytes(build_ipv4(EXT2, MASQ, 47, bytes(gre_packet(EXT2, MASQ, 5)[20:])))),
        (False, bytes(build_udp(EXT2, MASQ, 4000, 5060, b"REGISTER"))),
    ])
    return convs


def _peer_index(addr: int) -> int:
    return PEERS.index(addr) if addr in PEERS else 2


def _flags(out: bool, ip: IPv4, step: int = 0, special: bool = False) -> int:
    if out:
        return flags_of(out=True, step=step, special=special, host=int(ip.src == PRV2),
                        peer=_peer_index(ip.dst))
    return flags_of(out=False, step=step, special=special, peer=_peer_index(ip.src))


PPTP_STREAMS: list[list[tuple[bool, bytes]]] = [
    [(True, ocrq(8)), (False, ocrp(0x5000, 8)), (True, sli(0x5000)), (False, cdn(0x5000))],
    [(False, icrq(0x6000)), (True, icrp(11, 0x6000)), (False, iccn(11)), (True, ccrq(11))],
    [(True, echo_rq()), (False, echo_rp()), (False, wen(7)), (True, stopccrq()), (False, stopccrp())],
    [(True, sccrq()), (False, sccrp()), (True, ocrq(7)), (False, ocrp(0x4000, 7))],
]


def seeds(target: str) -> list[bytes]:  # noqa: C901 - the seed table of every fuzz target, one branch each
    """Inputs for ``target`` (see :mod:`fuzz.targets`), several per variant."""
    out: list[bytes] = []
    for variant in range(len(VARIANTS)):
        convs = script(variant)
        for conv in convs:
            recs: list[tuple[int, bytes]] = []
            for i, (outbound, pkt) in enumerate(conv):
                ip = IPv4(bytearray(pkt))
                payload = bytes(ip.buf[ip.ihl : ip.total_len])
                step = 1 if i == len(conv) - 1 else 0
                if target in ("engine", "ipv4"):
                    recs.append((_flags(outbound, ip, step), pkt))
                elif target == "isakmp":
                    if ip.proto == 17 and len(payload) > 8:
                        body = payload[8:]
                        natt = payload[0:2] == b"\x11\x94"
                        if natt:
                            body = body[4:]
                        f = _flags(outbound, ip, step, special=natt)
                        if outbound and ip.src == PRV3:
                            f |= 0x80
                        recs.append((f, body))
                elif target != "pptp" and ip.proto == {
                    "tcp": 6, "udp": 17, "icmp": 1, "gre": 47, "esp": 50,
                }[target]:
                    recs.append((_flags(outbound, ip, step, special=True), payload))
            if recs:
                out.append(encode(variant, recs))
        if target == "pptp":
            for stream in PPTP_STREAMS:
                recs = []
                for from_lan, m in stream:
                    recs.append((flags_of(out=from_lan), m))
                # the same stream cut in odd places
                cut: list[tuple[int, bytes]] = []
                for from_lan, m in stream:
                    for a, b in ((0, 5), (5, 13), (13, len(m))):
                        cut.append((flags_of(out=from_lan), m[a:b]))
                out.append(encode(variant, recs))
                out.append(encode(variant, cut))
            out.append(encode(variant, [(flags_of(out=False, peer=3), b"\x00\x10\x00\x01" + b"junk")]))
    return out


def write_corpus(target: str, directory: str) -> int:
    """Write the seeds of ``target`` into ``directory``; returns how many."""
    import hashlib
    import os

    os.makedirs(directory, exist_ok=True)
    n = 0
    for s in seeds(target):
        name = hashlib.sha1(s).hexdigest()[:16]
        with open(os.path.join(directory, f"seed-{name}"), "wb") as f:
            f.write(s)
        n += 1
    return n


__all__ = ["script", "seeds", "write_corpus", "EXT2", "PRV3"]
