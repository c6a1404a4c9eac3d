"""Hostile input from outside, on the pure engine: nothing reaches a LAN host that did not ask.

Every test starts from :func:`fuzz.world.build_world` (a gateway already carrying TCP, UDP,
ICMP, two PPTP calls, IKE, an ESP association and a pending ESP init; see its docstring) and
checks :func:`tests.invariants.check_invariants` after the attack. Roles from tests.packets:
MASQ public address, PRV1..3 LAN hosts, EXT/EXT2 remotes the LAN talks to, ATTACKER an
address nobody on the LAN talks to.
"""

from __future__ import annotations

import random
import struct

import pytest
from fuzz.world import MAIN, QUICK, World, build_world

from tests.invariants import check_invariants
from tests.packets import (
    ATTACKER,
    EXT,
    EXT2,
    IN,
    MASQ,
    OUT,
    PRV1,
    PRV2,
    PRV3,
    SRV_LAN,
    accepted,
    build_esp,
    build_icmp,
    build_tcp,
    build_udp,
    dropped,
)
from tests.pptp_wire import gre_packet, ocrp, sccrp
from vpnmasq.helpers.isakmp import build_header
from vpnmasq.packet.ipv4 import PROTO_AH, PROTO_ESP, IPv4, build_ipv4
from vpnmasq.packet.l4 import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from vpnmasq.verdict import Action, DropReason, Verdict

LAN = {PRV1, PRV2, PRV3, SRV_LAN}


def never_to_lan(v: Verdict) -> None:
    """The packet did not go to a LAN host (dropped, or left to the gateway itself)."""
    if v.action is Action.ACCEPT and v.payload is not None:
        dst = IPv4(bytearray(v.payload)).dst
        assert dst not in LAN, f"delivered to LAN host {dst:#x}: {v}"
    else:
        assert v.action is Action.DROP or v.local, v


def table_keys(w: World) -> set[object]:
    return set(w.eng.table.index)


def unsolicited(w: World, src: int) -> list[tuple[str, bytearray]]:
    """Packets a LAN host never asked for: unused ports, ids, SPIs, Call IDs, cookies."""
    rng = random.Random(src)
    t, u = w.aliases["tcp"], w.aliases["udp"]
    pkts: list[tuple[str, bytearray]] = []
    for port in (22, 80, 443, 1723, 8080, 61000, 65535, t + 1, u + 1):
        pkts.append((f"tcp syn :{port}", build_tcp(src, MASQ, 4444, port, flags=TCP_SYN, seq=1, ack=0)))
        pkts.append((f"tcp ack :{port}", build_tcp(src, MASQ, 4444, port, b"data", seq=9, ack=9)))
        pkts.append((f"udp :{port}", build_udp(src, MASQ, 4444, port, b"hello")))
    pkts.append(("udp 500 new cookie", build_udp(src, MASQ, 500, 500, build_header(0xBAD, 0, MAIN))))
    pkts.append(("udp 500 known cookies", build_udp(src, MASQ, 500, 500, build_header(0x11, 0x22, QUICK, flags=1))))
    pkts.append(("udp 4500", build_udp(src, MASQ, 4500, 4500, b"\0\0\0\0" + build_header(0x11, 0x22, 5))))
    pkts.append(("icmp echo reply", build_icmp(src, MASQ, 0, 0, (w.aliases["icmp"] << 16) | 1, b"x")))
    pkts.append(("icmp echo reply other id", build_icmp(src, MASQ, 0, 0, (4242 << 16) | 1, b"x")))
    for spi in (0x2001, 0x1001, 0x3001, rng.getrandbits(32) | 1):
        pkts.append((f"esp {spi:#x}", build_ipv4(src, MASQ, PROTO_ESP, build_esp(spi, 1))))
    for cid in (w.outside_call_ids["pptp"], w.outside_call_ids["pptp2"], 7, 0x4000, rng.getrandbits(16)):
        pkts.append((f"gre call {cid}", gre_packet(src, MASQ, cid)))
    pkts.append(("gre v0", build_ipv4(src, MASQ, 47, b"\x00\x00\x08\x00ipv4 in gre")))
    pkts.append(("ah", build_ipv4(src, MASQ, PROTO_AH, struct.pack("!BBHII", 50, 4, 0, 0x2001, 1) + b"\0" * 12)))
    pkts.append(("sctp", build_ipv4(src, MASQ, 132, b"\0" * 32)))
    return pkts


@pytest.mark.parametrize("variant", [0, 2])
def test_unsolicited_inbound_from_a_stranger_never_reaches_the_lan(variant: int) -> None:
    w = build_world(variant)
    keys = table_keys(w)
    for name, pkt in unsolicited(w, ATTACKER):
        v = w.send(pkt, False)
        never_to_lan(v)
        check_invariants(w.eng)
        assert table_keys(w) == keys, f"{name} changed the table"


def test_unsolicited_inbound_from_a_remote_the_lan_talks_to_never_reaches_the_lan() -> None:
    """EXT2 talks to PRV2 (pending ESP) and PRV3 (IKE); nothing else of it may pass."""
    w = build_world(0)
    for name, pkt in unsolicited(w, EXT2):
        if name.startswith("esp"):
            continue  # EXT2's first new SPI is PRV2's pending answer: tested below
        if name == "udp 500 new cookie":
            continue  # a remote-initiated exchange for PRV3, which holds IKE with it
        v = w.send(pkt, False)
        never_to_lan(v)
        check_invariants(w.eng)


def test_a_forward_delivers_only_to_its_own_target() -> None:
    w = build_world(1)  # tcp 8080, udp 5060 -> 5061, tcp 1723 and gre to SRV_LAN
    ip = accepted(w.send(build_tcp(ATTACKER, MASQ, 4444, 8080, flags=TCP_SYN, seq=1, ack=0), False))
    assert (ip.dst, ip.u16(2)) == (SRV_LAN, 8080)
    ip = accepted(w.send(build_udp(ATTACKER, MASQ, 4444, 5060, b"x"), False))
    assert (ip.dst, ip.u16(2)) == (SRV_LAN, 5061)
    # a LAN client's call still wins over the gre forward for its own Call ID
    ip = accepted(w.send(gre_packet(EXT, MASQ, w.outside_call_ids["pptp"]), False))
    assert ip.dst == PRV1
    # other ports are not forwarded anywhere
    for port in (8081, 5062, 22):
        never_to_lan(w.send(build_tcp(ATTACKER, MASQ, 4444, port, flags=TCP_SYN, seq=1, ack=0), False))
    check_invariants(w.eng)


# ---------------------------------------------------------------------- ESP
def test_an_outsider_cannot_complete_or_take_over_a_pending_esp_association() -> None:
    w = build_world(0)  # PRV2 -> EXT2 SPI 0x3001 is pending
    rng = random.Random(7)
    for _ in range(200):
        spi = rng.getrandbits(32) | 1
        dropped(w.send(build_ipv4(ATTACKER, MASQ, PROTO_ESP, build_esp(spi, 1)), False),
                DropReason.ESP_UNASSOCIATED)
        # from EXT (a remote with an established association, but not the one PRV2 waits for)
        dropped(w.send(build_ipv4(EXT, MASQ, PROTO_ESP, build_esp(spi, 1)), False),
                DropReason.ESP_UNASSOCIATED)
    check_invariants(w.eng)
    esp = w.eng.helper_by_name["esp"]
    assert [c.host for c in esp.queues[EXT2]] == [PRV2]
    # the real remote's answer still completes it, for PRV2
    ip = accepted(w.send(build_ipv4(EXT2, MASQ, PROTO_ESP, build_esp(0x3002, 1)), False))
    assert ip.dst == PRV2
    assert accepted(w.send(build_ipv4(PRV2, EXT2, PROTO_ESP, build_esp(0x3001, 2)), True)).src == MASQ


def test_a_clients_spi_replayed_from_another_address_goes_nowhere() -> None:
    w = build_world(0)  # PRV1 <-> EXT: out 0x1001, in 0x2001
    for src in (ATTACKER, PRV1, PRV3):  # (EXT2: its next new SPI is PRV2's answer)
        for spi in (0x2001, 0x1001):
            v = w.send(build_ipv4(src, MASQ, PROTO_ESP, build_esp(spi, 99)), False)
            never_to_lan(v)
    # a LAN host reusing PRV1's outbound SPI to the same remote gets its own (pending) entry
    # and never PRV1's inbound traffic
    w.send(build_ipv4(PRV3, EXT, PROTO_ESP, build_esp(0x1001, 1)), True)
    ip = accepted(w.send(build_ipv4(EXT, MASQ, PROTO_ESP, build_esp(0x2001, 2)), False))
    assert ip.dst == PRV1
    check_invariants(w.eng)


# ---------------------------------------------------------------------- PPTP
def test_guessing_call_ids_from_another_address_reaches_no_call() -> None:
    w = build_world(0)
    eng = w.eng
    before = eng.counters.get("drop:gre-unknown-call", 0)
    for cid in range(0, 65536):
        v = eng.handle(gre_packet(ATTACKER, MASQ, cid, b"\xff\x03"), IN, w.now)
        assert v.action is Action.DROP
    assert eng.counters["drop:gre-unknown-call"] - before == 65536
    check_invariants(eng)
    # the calls still work
    ip = accepted(w.send(gre_packet(EXT, MASQ, w.outside_call_ids["pptp"]), False))
    assert ip.dst == PRV1


def test_the_real_server_reaches_only_the_call_that_owns_each_id() -> None:
    """Even the remote itself (or whoever spoofs it) reaches a call's host only with that
    call's outside ID, and the Call ID is restored to that host's own."""
    w = build_world(0)
    owners = {w.outside_call_ids["pptp"]: PRV1, w.outside_call_ids["pptp2"]: PRV2}
    for cid in range(0, 65536):
        v = w.eng.handle(gre_packet(EXT, MASQ, cid, b"\xff\x03"), IN, w.now)
        if cid in owners:
            ip = accepted(v)
            assert ip.dst == owners[cid] and ip.u16(6) == 7
        else:
            assert v.action is Action.DROP


def test_injection_into_a_pptp_control_connection_from_another_address() -> None:
    w = build_world(0)
    link = w.pptp
    assert link is not None
    # an Outgoing-Call-Reply that would bind call 9 to a PAC ID of the attacker's choosing
    for src, sport in ((ATTACKER, 1723), (EXT2, 1723), (EXT, 1724)):
        pkt = build_tcp(src, MASQ, sport, link.public_port, ocrp(0x6666, 9) + sccrp(),
                        seq=link.remote_seq, ack=link.lan_seq)
        never_to_lan(w.send(pkt, False))
    ctl = next(e for e in w.eng.table if e.alg is not None and e.inside_ip == PRV1)
    assert ctl.alg.wan.next_seq == link.remote_seq  # the stream reader saw nothing
    check_invariants(w.eng)


# ---------------------------------------------------------------------- ICMP errors
def _router_error(quoted: bytes | bytearray, src: int = ATTACKER) -> bytearray:
    return build_icmp(src, MASQ, 3, 3, 0, bytes(quoted[:28]))


def test_icmp_errors_reach_only_the_host_of_the_embedded_flow() -> None:
    w = build_world(0)
    sent = {
        PRV1: w.send(build_udp(PRV1, EXT, 5353, 53, b"q"), True).payload,
        PRV2: w.send(build_icmp(PRV2, EXT, 8, 0, (77 << 16) | 9, b"p"), True).payload,
    }
    for host, quoted in sent.items():
        assert quoted is not None
        ip = accepted(w.send(_router_error(quoted), False))
        assert ip.dst == host
        assert ip.buf[28 + 12 : 28 + 16] == host.to_bytes(4, "big"), "quote not translated back"
    # the same quote with another remote (a flow PRV1 never had) reaches nobody
    q = bytearray(sent[PRV1] or b"")
    q[16:20] = EXT2.to_bytes(4, "big")
    never_to_lan(w.send(_router_error(q), False))
    # quoting an unused alias port, or the gateway's own address and a LAN port, reaches nobody
    for alias in (w.aliases["udp"] + 1, 5353):
        forged = build_udp(MASQ, EXT, alias, 53, b"q")
        never_to_lan(w.send(_router_error(forged), False))
    # quoting a LAN address directly (as if the gateway had not translated it)
    never_to_lan(w.send(_router_error(build_udp(PRV1, EXT, 5353, 53, b"q")), False))
    check_invariants(w.eng)


def test_icmp_error_with_a_bad_checksum_is_dropped() -> None:
    w = build_world(0)
    quoted = w.send(build_udp(PRV1, EXT, 5353, 53, b"q"), True).payload
    assert quoted is not None
    err = _router_error(quoted)
    err[22] ^= 0xFF  # ICMP checksum
    dropped(w.send(err, False), DropReason.BAD_CHECKSUM)


# ---------------------------------------------------------------------- TCP RST / FIN
def _tcp_entry(w: World) -> object:
    return next(e for e in w.eng.table if e.proto == 6 and e.kind == "napt" and e.remote_port == 80)


def test_blind_rst_outside_the_window_keeps_the_mapping() -> None:
    w = build_world(0)
    t = w.aliases["tcp"]
    e = _tcp_entry(w)
    assert e.state_name == "ESTABLISHED"  # type: ignore[attr-defined]
    for seq in (0, 0x40000000, 0x80000000, 901 - 1, 901 + (1 << 20)):
        dropped(w.send(build_tcp(EXT, MASQ, 80, t, flags=TCP_RST, seq=seq, ack=0), False),
                DropReason.FILTERED)
    assert e.state_name == "ESTABLISHED"  # type: ignore[attr-defined]
    assert w.eng.counters["tcp_rst_out_of_window"] == 5
    # in the window it is believed (and delivered), and the mapping goes soon
    accepted(w.send(build_tcp(EXT, MASQ, 80, t, flags=TCP_RST, seq=905, ack=0), False))
    assert e.state_name == "CLOSED"  # type: ignore[attr-defined]


def test_blind_fin_outside_the_window_does_not_shorten_the_mapping() -> None:
    """RFC 5382: only a FIN the endpoints would accept may move the session to its short
    transitory timeout; a blind one is dropped like a blind RST (regression: it used to
    move the session to FIN_WAIT, 240 s instead of 2 h 4 min)."""
    w = build_world(0)
    t = w.aliases["tcp"]
    e = _tcp_entry(w)
    deadline = e.expires_at  # type: ignore[attr-defined]
    for seq in (0x40000000, 0x80000000, 901 + (1 << 21)):
        dropped(w.send(build_tcp(EXT, MASQ, 80, t, flags=TCP_FIN | TCP_ACK, seq=seq, ack=101), False),
                DropReason.FILTERED)
    assert e.state_name == "ESTABLISHED"  # type: ignore[attr-defined]
    assert e.expires_at >= deadline  # type: ignore[attr-defined]
    assert w.eng.counters["tcp_fin_out_of_window"] == 3
    # idle past the transitory timeout (240 s) but inside the established one: still there
    w.now += 1000
    ip = accepted(w.send(build_tcp(EXT, MASQ, 80, t, b"late", seq=901, ack=101), False))
    assert ip.dst == PRV1
    # the real FIN (in the window) is tracked
    accepted(w.send(build_tcp(EXT, MASQ, 80, t, flags=TCP_FIN | TCP_ACK, seq=905, ack=101), False))
    assert e.state_name == "FIN_WAIT"  # type: ignore[attr-defined]


def test_rst_or_fin_from_another_remote_endpoint_never_touches_the_mapping() -> None:
    w = build_world(0)
    t = w.aliases["tcp"]
    e = _tcp_entry(w)
    for src, sport in ((ATTACKER, 80), (EXT2, 80), (EXT, 81)):
        for fl in (TCP_RST, TCP_FIN | TCP_ACK, TCP_RST | TCP_ACK):
            never_to_lan(w.send(build_tcp(src, MASQ, sport, t, flags=fl, seq=905, ack=101), False))
    assert e.state_name == "ESTABLISHED"  # type: ignore[attr-defined]
    check_invariants(w.eng)


def test_outbound_lan_address_never_leaks() -> None:
    """Whatever a LAN host sends that is accepted leaves with the public source address."""
    w = build_world(0)
    rng = random.Random(3)
    for _ in range(300):
        proto = rng.choice((1, 6, 17, 47, 50, 51, 132))
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        pkt = build_ipv4(rng.choice((PRV1, PRV2, PRV3)), rng.choice((EXT, EXT2, ATTACKER)), proto, body)
        v = w.eng.handle(pkt, OUT, w.now)
        if v.action is Action.ACCEPT:
            assert v.payload is not None, v
            assert IPv4(bytearray(v.payload)).src == MASQ
    check_invariants(w.eng)


def test_tcp_ack_flags_used_in_this_module() -> None:
    # keep the flag vocabulary honest: an ACK-only segment to the mapping is delivered
    w = build_world(0)
    ip = accepted(w.send(build_tcp(EXT, MASQ, 80, w.aliases["tcp"], b"x", flags=TCP_ACK, seq=901, ack=101), False))
    assert ip.dst == PRV1


def test_blind_fin_on_a_pptp_control_connection_does_not_end_its_calls() -> None:
    """Regression: a FIN from the server's address with a made-up sequence number used to
    reach the PPTP ALG, which closed the control connection and ended every call on it."""
    w = build_world(0)
    link = w.pptp
    assert link is not None
    for seq in (link.remote_seq + (1 << 22), link.remote_seq + 0x80000000, link.remote_seq - (1 << 21)):
        pkt = build_tcp(EXT, MASQ, 1723, link.public_port, flags=TCP_FIN | TCP_ACK,
                        seq=seq & 0xFFFFFFFF, ack=link.lan_seq)
        dropped(w.send(pkt, False), DropReason.FILTERED)
    ip = accepted(w.send(gre_packet(EXT, MASQ, w.outside_call_ids["pptp"]), False))
    assert ip.dst == PRV1
    # the real FIN (in sequence) still ends the calls, as before
    accepted(link.remote_fin(w.now))
    dropped(w.send(gre_packet(EXT, MASQ, w.outside_call_ids["pptp"]), False), DropReason.GRE_UNKNOWN_CALL)
    check_invariants(w.eng)


def test_blind_rst_does_not_keep_a_closed_mapping_alive() -> None:
    """Regression (found by the pptp fuzzer): after an in-window RST closed the mapping, a
    RST with any sequence number refreshed its 10 s timeout, again and again."""
    w = build_world(0)
    t = w.aliases["tcp"]
    e = _tcp_entry(w)
    accepted(w.send(build_tcp(EXT, MASQ, 80, t, flags=TCP_RST, seq=905, ack=0), False))
    assert e.state_name == "CLOSED"  # type: ignore[attr-defined]
    deadline = e.expires_at  # type: ignore[attr-defined]
    for k in range(1, 6):
        w.now += 1.5
        dropped(w.send(build_tcp(EXT, MASQ, 80, t, flags=TCP_RST, seq=0x7000_0000 + k, ack=0), False),
                DropReason.FILTERED)
    assert e.expires_at == deadline  # type: ignore[attr-defined]
    w.now = deadline + 0.1
    w.eng.handle_timer(w.now)
    assert not e.live  # type: ignore[attr-defined]


def test_blind_fin_after_a_real_one_does_not_keep_the_mapping_alive() -> None:
    """Regression (found by the pptp fuzzer): once a FIN had been believed, later FINs with
    any sequence number refreshed the transitory timeout; a retransmitted FIN still does."""
    w = build_world(0)
    t = w.aliases["tcp"]
    e = _tcp_entry(w)
    accepted(w.send(build_tcp(EXT, MASQ, 80, t, flags=TCP_FIN | TCP_ACK, seq=901, ack=101), False))
    assert e.state_name == "FIN_WAIT"  # type: ignore[attr-defined]
    # the LAN host ACKs the FIN
    accepted(w.send(build_tcp(PRV1, EXT, 40000, 80, seq=101, ack=902), True))
    w.now += 100
    deadline = e.expires_at  # type: ignore[attr-defined]
    dropped(w.send(build_tcp(EXT, MASQ, 80, t, flags=TCP_FIN | TCP_ACK, seq=0x6000_0000, ack=101), False),
            DropReason.FILTERED)
    assert e.expires_at == deadline  # type: ignore[attr-defined]
    # a retransmission of the real FIN (just before the ACK the host sent) is believed
    accepted(w.send(build_tcp(EXT, MASQ, 80, t, flags=TCP_FIN | TCP_ACK, seq=901, ack=101), False))
    assert e.expires_at > deadline  # type: ignore[attr-defined]
