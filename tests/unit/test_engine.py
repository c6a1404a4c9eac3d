"""Plain masquerade, bytes in / bytes out, named for behaviour (libalias 2_natout/3_natin cases
plus TCP state timeouts, ICMP errors, fragments and address changes)."""

from __future__ import annotations

import pytest

from tests.packets import (
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
    build_icmp,
    build_tcp,
    build_udp,
    dropped,
    make_engine,
)
from vpnmasq.config import Forward, PortRange, Timeouts
from vpnmasq.events import AddressChanged, EntryCreated, EntryExpired, PacketDropped
from vpnmasq.packet.ipv4 import build_ipv4, ip_to_int
from vpnmasq.packet.l4 import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from vpnmasq.verdict import Action, DropReason


def udp_out(eng, src, sport, dst=EXT, dport=53, now=0.0, payload=b"q"):
    return eng.handle(build_udp(src, dst, sport, dport, payload), OUT, now)


def udp_in(eng, dport, src=EXT, sport=53, now=0.0, payload=b"r"):
    return eng.handle(build_udp(src, MASQ, sport, dport, payload), IN, now)


# ---------------------------------------------------------------- generic masq (1_simplemasq)
def test_generic_protocol_from_any_inside_host_gets_public_source():
    eng = make_engine(inside_networks=("10.0.0.0/8", "172.16.0.0/12", "100.64.0.0/10"))
    for i, src in enumerate(("10.0.222.173", "172.16.222.173", "100.64.222.173")):
        pkt = build_ipv4(ip_to_int(src), ip_to_int(f"18.52.86.{120 + i}"), 254, b"x" * 44)
        ip = accepted(eng.handle(pkt, OUT, 0.0))
        assert ip.src == MASQ


def test_outbound_from_outside_inside_networks_is_dropped_not_leaked():
    eng = make_engine()
    v = eng.handle(build_udp(ip_to_int("192.168.9.9"), EXT, 1000, 53), OUT, 0.0)
    dropped(v, DropReason.NOT_INSIDE)


def test_exempt_network_is_routed_untouched():
    eng = make_engine(inside_networks=("10.77.0.0/24",), exempt_networks=("192.0.2.0/28",))
    pkt = build_ipv4(ip_to_int("192.0.2.3"), EXT, 51, b"\x32\x04" + b"\x00" * 22)
    v = eng.handle(pkt, OUT, 0.0)
    assert v.action is Action.ACCEPT and v.payload is None


# ---------------------------------------------------------------- UDP (4_udp, 5_sameport)
def test_udp_reply_restores_inside_endpoint():
    eng = make_engine()
    ip = accepted(udp_out(eng, PRV1, 40000))
    assert ip.src == MASQ
    alias = ip.u16(0)
    back = accepted(udp_in(eng, alias))
    assert (back.dst, back.u16(2)) == (PRV1, 40000)


def test_udp_port_preserved_when_free_and_second_host_same_port_gets_another():
    eng = make_engine(port_range=PortRange(1024, 65535))
    a = accepted(udp_out(eng, PRV1, 40000))
    b = accepted(udp_out(eng, PRV2, 40000))
    assert a.u16(0) == 40000
    assert b.u16(0) != 40000
    assert accepted(udp_in(eng, a.u16(0))).dst == PRV1
    assert accepted(udp_in(eng, b.u16(0))).dst == PRV2


def test_no_port_preservation_when_disabled():
    eng = make_engine(port_range=PortRange(1024, 65535), preserve_ports=False)
    ports = {accepted(udp_out(eng, PRV1, 40000 + i)).u16(0) for i in range(20)}
    assert ports != {40000 + i for i in range(20)}


def test_default_range_port_outside_range_is_remapped_into_range():
    eng = make_engine()
    ip = accepted(udp_out(eng, PRV1, 40000))
    assert 61000 <= ip.u16(0) <= 65535


def test_low_source_port_maps_below_1024():
    eng = make_engine(port_range=PortRange(1024, 65535))
    accepted(udp_out(eng, PRV1, 700))
    ip = accepted(udp_out(eng, PRV2, 700))
    assert ip.u16(0) < 1024 and ip.u16(0) != 700


# ---------------------------------------------------------------- EIM (9_udp_eim_mapping)
def test_mapping_is_endpoint_independent():
    eng = make_engine()
    p1 = accepted(udp_out(eng, PRV1, 5000, EXT, 53)).u16(0)
    p2 = accepted(udp_out(eng, PRV1, 5000, EXT, 54)).u16(0)
    p3 = accepted(udp_out(eng, PRV1, 5000, EXT2, 53)).u16(0)
    assert p1 == p2 == p3


# ---------------------------------------------------------------- filtering (10_, 11_)
def test_default_filtering_drops_inbound_from_other_endpoint():
    eng = make_engine()
    alias = accepted(udp_out(eng, PRV1, 5000, EXT, 53)).u16(0)
    dropped(udp_in(eng, alias, EXT, 54), DropReason.FILTERED)
    dropped(udp_in(eng, alias, EXT2, 53), DropReason.FILTERED)
    accepted(udp_in(eng, alias, EXT, 53))


def test_endpoint_independent_filtering_accepts_any_remote():
    eng = make_engine(filtering="endpoint-independent")
    alias = accepted(udp_out(eng, PRV1, 5000, EXT, 53)).u16(0)
    assert accepted(udp_in(eng, alias, EXT2, 9999)).dst == PRV1
    # and the reply to that new remote uses the same mapping
    assert accepted(udp_out(eng, PRV1, 5000, EXT2, 9999)).u16(0) == alias


def test_address_dependent_filtering_accepts_other_port_of_same_host_only():
    eng = make_engine(filtering="address-dependent")
    alias = accepted(udp_out(eng, PRV1, 5000, EXT, 53)).u16(0)
    accepted(udp_in(eng, alias, EXT, 1234))
    dropped(udp_in(eng, alias, EXT2, 53), DropReason.FILTERED)


def test_unsolicited_inbound_is_dropped_with_reason():
    eng = make_engine()
    dropped(udp_in(eng, 61234), DropReason.NO_MAPPING)
    ev = [e for e in eng.drain_events() if isinstance(e, PacketDropped)]
    assert ev and "unsolicited" in ev[0].detail


def test_inbound_icmp_echo_request_is_left_to_the_gateway():
    eng = make_engine()
    v = eng.handle(build_icmp(EXT, MASQ, 8, 0, (7 << 16) | 1, b"ping"), IN, 0.0)
    assert v.action is Action.ACCEPT and v.local and v.payload is None


# ---------------------------------------------------------------- hairpinning (12_)
def test_udp_hairpin_carries_external_source():
    eng = make_engine(filtering="endpoint-independent")
    a2 = accepted(udp_out(eng, PRV2, 6000, EXT, 53)).u16(0)
    a1 = accepted(udp_out(eng, PRV1, 5000, EXT, 53)).u16(0)
    ip = accepted(eng.handle(build_udp(PRV1, MASQ, 5000, a2, b"hp"), OUT, 1.0))
    assert (ip.src, ip.u16(0)) == (MASQ, a1)  # RFC 4787 REQ-9a
    assert (ip.dst, ip.u16(2)) == (PRV2, 6000)


def test_tcp_hairpin_to_forwarded_server():
    eng = make_engine(forwards=(Forward("tcp", "10.77.0.5", 8080),))
    syn = build_tcp(PRV1, MASQ, 40000, 8080, flags=TCP_SYN)
    ip = accepted(eng.handle(syn, OUT, 0.0))
    assert (ip.src, ip.dst, ip.u16(2)) == (MASQ, SRV_LAN, 8080)
    alias = ip.u16(0)
    synack = build_tcp(SRV_LAN, MASQ, 8080, alias, flags=TCP_SYN | TCP_ACK)
    back = accepted(eng.handle(synack, OUT, 0.1))
    assert (back.src, back.u16(0)) == (MASQ, 8080)
    assert (back.dst, back.u16(2)) == (PRV1, 40000)


# ---------------------------------------------------------------- table clear (6_cleartable)
def test_address_change_flushes_table_and_old_reply_is_refused():
    eng = make_engine(port_range=PortRange(1024, 65535))
    alias = accepted(udp_out(eng, PRV1, 40000)).u16(0)
    new = ip_to_int("198.51.100.99")
    eng.set_public_address(new, 1.0)
    assert any(isinstance(e, AddressChanged) and e.entries_dropped == 1 for e in eng.drain_events())
    v = eng.handle(build_udp(EXT, MASQ, 53, alias), IN, 1.1)
    assert v.local  # the old address is not ours any more
    v = eng.handle(build_udp(EXT, new, 53, alias), IN, 1.2)
    dropped(v, DropReason.NO_MAPPING)
    # the freed port is reused by the next host
    ip = accepted(udp_out(eng, PRV2, 40000, now=2.0))
    assert (ip.src, ip.u16(0)) == (new, 40000)


def test_address_change_rewrite_policy_keeps_sessions():
    eng = make_engine(on_address_change="rewrite")
    alias = accepted(udp_out(eng, PRV1, 40000)).u16(0)
    new = ip_to_int("198.51.100.99")
    eng.set_public_address(new, 1.0)
    ip = accepted(eng.handle(build_udp(EXT, new, 53, alias), IN, 1.1))
    assert ip.dst == PRV1


# ---------------------------------------------------------------- range (8_portrange)
def test_two_port_range_exhausts_on_third_flow_with_counted_refusal():
    eng = make_engine(port_range=PortRange(4000, 4001))
    accepted(udp_out(eng, PRV1, 30000))
    accepted(udp_out(eng, PRV2, 30000))
    dropped(udp_out(eng, PRV3, 30000), DropReason.PORTS_EXHAUSTED)
    assert eng.counters["drop:ports-exhausted"] == 1


def test_expired_mapping_frees_its_port():
    eng = make_engine(port_range=PortRange(4000, 4000))
    accepted(udp_out(eng, PRV1, 30000, now=0.0))
    dropped(udp_out(eng, PRV2, 30000, now=1.0), DropReason.PORTS_EXHAUSTED)
    eng.handle_timer(301.0)
    accepted(udp_out(eng, PRV2, 30000, now=301.0))


def test_table_limit_is_a_counted_refusal():
    from vpnmasq.config import Limits

    eng = make_engine(limits=Limits(max_entries=2))
    accepted(udp_out(eng, PRV1, 1))
    accepted(udp_out(eng, PRV1, 2))
    dropped(udp_out(eng, PRV1, 3), DropReason.TABLE_FULL)


def test_per_host_limit_protects_other_hosts():
    from vpnmasq.config import Limits

    eng = make_engine(limits=Limits(max_entries_per_host=2))
    accepted(udp_out(eng, PRV1, 1))
    accepted(udp_out(eng, PRV1, 2))
    dropped(udp_out(eng, PRV1, 3), DropReason.HOST_LIMIT)
    accepted(udp_out(eng, PRV2, 3))


# ---------------------------------------------------------------- timeouts (manual clock)
def test_udp_mapping_lives_its_timeout_then_expires():
    eng = make_engine(timeouts=Timeouts(udp=120.0))
    alias = accepted(udp_out(eng, PRV1, 40000, now=0.0)).u16(0)
    assert eng.next_deadline() == 120.0
    accepted(udp_in(eng, alias, now=119.9))  # inbound refresh
    eng.handle_timer(239.8)
    assert len(eng.table) == 1
    eng.handle_timer(240.0)
    assert len(eng.table) == 0
    assert any(isinstance(e, EntryExpired) for e in eng.drain_events())
    dropped(udp_in(eng, alias, now=240.1), DropReason.NO_MAPPING)


def test_entries_with_different_timeouts_expire_in_order():
    eng = make_engine()
    accepted(udp_out(eng, PRV1, 1, now=0.0))  # udp: 300 s
    accepted(eng.handle(build_icmp(PRV1, EXT, 8, 0, (9 << 16) | 1), OUT, 0.0))  # icmp: 60 s
    accepted(eng.handle(build_tcp(PRV1, EXT, 2, 80, flags=TCP_SYN), OUT, 0.0))  # 240 s
    assert eng.next_deadline() == 60.0
    eng.handle_timer(60.0)
    assert {r.proto for r in eng.snapshot(60.0)} == {"udp", "tcp"}
    assert eng.next_deadline() == 240.0


def test_lookup_never_uses_an_expired_entry_even_before_the_timer():
    eng = make_engine()
    alias = accepted(udp_out(eng, PRV1, 40000, now=0.0)).u16(0)
    dropped(udp_in(eng, alias, now=300.0), DropReason.NO_MAPPING)


def _tcp_handshake(eng, now=0.0):
    syn = accepted(eng.handle(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_SYN, seq=100, ack=0), OUT, now))
    alias = syn.u16(0)
    accepted(eng.handle(build_tcp(EXT, MASQ, 80, alias, flags=TCP_SYN | TCP_ACK, seq=500, ack=101), IN, now + 0.01))
    accepted(eng.handle(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_ACK, seq=101, ack=501), OUT, now + 0.02))
    return alias


def test_tcp_established_lives_2h4m_and_syn_only_lives_4min():
    eng = make_engine()
    alias = _tcp_handshake(eng)
    (row,) = eng.snapshot(0.02)
    assert row.state == "ESTABLISHED" and row.expires_in == pytest.approx(7440.0)
    accepted(eng.handle(build_tcp(EXT, MASQ, 80, alias, seq=501, ack=101), IN, 7440.0))
    eng2 = make_engine()
    accepted(eng2.handle(build_tcp(PRV1, EXT, 1, 80, flags=TCP_SYN), OUT, 0.0))
    eng2.handle_timer(239.9)
    assert len(eng2.table) == 1
    eng2.handle_timer(240.0)
    assert len(eng2.table) == 0


def test_tcp_fin_both_ways_makes_connection_transitory():
    eng = make_engine()
    alias = _tcp_handshake(eng)
    accepted(eng.handle(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_FIN | TCP_ACK, seq=101, ack=501), OUT, 1.0))
    accepted(eng.handle(build_tcp(EXT, MASQ, 80, alias, flags=TCP_FIN | TCP_ACK, seq=501, ack=102), IN, 1.1))
    (row,) = eng.snapshot(1.1)
    assert row.state == "CLOSING" and row.expires_in == pytest.approx(240.0)


def test_in_window_rst_closes_quickly_but_blind_rst_does_not():
    eng = make_engine()
    alias = _tcp_handshake(eng)
    blind = build_tcp(EXT, MASQ, 80, alias, flags=TCP_RST, seq=501 + (1 << 30), ack=0)
    dropped(eng.handle(blind, IN, 1.0), DropReason.FILTERED)
    assert eng.snapshot(1.0)[0].state == "ESTABLISHED"
    good = build_tcp(EXT, MASQ, 80, alias, flags=TCP_RST, seq=501, ack=0)
    accepted(eng.handle(good, IN, 2.0))
    (row,) = eng.snapshot(2.0)
    assert row.state == "CLOSED" and row.expires_in == pytest.approx(10.0)


def test_tcp_simultaneous_open_with_eif():
    eng = make_engine(filtering="endpoint-independent")
    syn = accepted(eng.handle(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_SYN), OUT, 0.0))
    alias = syn.u16(0)
    ip = accepted(eng.handle(build_tcp(EXT2, MASQ, 80, alias, flags=TCP_SYN), IN, 0.1))
    assert (ip.dst, ip.u16(2)) == (PRV1, 40000)


# ---------------------------------------------------------------- ICMP
def test_icmp_echo_ids_are_masqueraded_per_host():
    eng = make_engine()
    a = accepted(eng.handle(build_icmp(PRV1, EXT, 8, 0, (7 << 16) | 1, b"a"), OUT, 0.0))
    b = accepted(eng.handle(build_icmp(PRV2, EXT, 8, 0, (7 << 16) | 1, b"b"), OUT, 0.0))
    ida, idb = a.u16(4), b.u16(4)
    assert ida != idb
    ra = accepted(eng.handle(build_icmp(EXT, MASQ, 0, 0, (ida << 16) | 1, b"a"), IN, 0.1))
    rb = accepted(eng.handle(build_icmp(EXT, MASQ, 0, 0, (idb << 16) | 1, b"b"), IN, 0.1))
    assert (ra.dst, ra.u16(4)) == (PRV1, 7)
    assert (rb.dst, rb.u16(4)) == (PRV2, 7)


def _frag_needed(outer_src, outer_dst, embedded: bytes, mtu=1400):
    return build_icmp(outer_src, outer_dst, 3, 4, mtu, embedded[:28])


def test_icmp_error_from_outside_translates_embedded_udp_header():
    eng = make_engine()
    out = accepted(udp_out(eng, PRV1, 40000, EXT, 53, payload=b"x" * 100))
    err = _frag_needed(ip_to_int("203.0.113.1"), MASQ, bytes(out.buf))
    ip = accepted(eng.handle(err, IN, 0.5))
    assert ip.dst == PRV1
    emb = ip.buf[ip.ihl + 8 :]
    assert int.from_bytes(emb[12:16], "big") == PRV1
    assert int.from_bytes(emb[20:22], "big") == 40000
    from vpnmasq.packet.checksum import checksum

    assert checksum(emb[:20]) == 0, "embedded IP header checksum"


def test_icmp_error_with_bad_checksum_is_dropped():
    eng = make_engine()
    out = accepted(udp_out(eng, PRV1, 40000))
    err = bytearray(_frag_needed(EXT, MASQ, bytes(out.buf)))
    err[22] ^= 0xFF
    dropped(eng.handle(err, IN, 0.5), DropReason.BAD_CHECKSUM)


def test_icmp_error_about_unknown_flow_in_our_range_is_dropped():
    eng = make_engine()
    fake = build_udp(MASQ, EXT, 61111, 53, b"zz")
    dropped(eng.handle(_frag_needed(EXT, MASQ, bytes(fake)), IN, 0.0), DropReason.ICMP_NO_MAPPING)


def test_icmp_error_from_inside_host_reverts_embedded_header():
    eng = make_engine(forwards=(Forward("udp", "10.77.0.5", 5353),))
    inb = accepted(eng.handle(build_udp(EXT, MASQ, 999, 5353, b"q"), IN, 0.0))
    err = build_icmp(SRV_LAN, EXT, 3, 3, 0, bytes(inb.buf)[:28])
    ip = accepted(eng.handle(err, OUT, 0.1))
    assert ip.src == MASQ
    emb = ip.buf[ip.ihl + 8 :]
    assert int.from_bytes(emb[16:20], "big") == MASQ


def test_icmp_error_in_icmp_error_translates_echo_id():
    eng = make_engine()
    out = accepted(eng.handle(build_icmp(PRV1, EXT, 8, 0, (77 << 16) | 1, b"p" * 20), OUT, 0.0))
    err = build_icmp(ip_to_int("203.0.113.1"), MASQ, 11, 0, 0, bytes(out.buf)[:28])
    ip = accepted(eng.handle(err, IN, 0.1))
    assert ip.dst == PRV1 and int.from_bytes(ip.buf[ip.ihl + 8 + 24 : ip.ihl + 8 + 26], "big") == 77


# ---------------------------------------------------------------- forwarding (3_natin)
def test_port_forward_reaches_lan_server_and_reply_keeps_the_port():
    eng = make_engine(forwards=(Forward("tcp", "10.77.0.5", 1723),))
    ip = accepted(eng.handle(build_tcp(EXT, MASQ, 5555, 1723, flags=TCP_SYN), IN, 0.0))
    assert (ip.dst, ip.u16(2)) == (SRV_LAN, 1723)
    back = accepted(eng.handle(build_tcp(SRV_LAN, EXT, 1723, 5555, flags=TCP_SYN | TCP_ACK), OUT, 0.1))
    assert (back.src, back.u16(0)) == (MASQ, 1723)


def test_forward_to_other_port():
    eng = make_engine(forwards=(Forward("udp", "10.77.0.5", 1194, to_port=11940),))
    ip = accepted(eng.handle(build_udp(EXT, MASQ, 5555, 1194), IN, 0.0))
    assert (ip.dst, ip.u16(2)) == (SRV_LAN, 11940)


def test_more_specific_forward_wins():
    eng = make_engine(
        forwards=(
            Forward("tcp", "10.77.0.12", None),
            Forward("tcp", "10.77.0.13", 22, remote="203.0.113.0/24"),
            Forward("tcp", "10.77.0.11", 22),
        )
    )
    assert accepted(eng.handle(build_tcp(EXT, MASQ, 1, 22, flags=TCP_SYN), IN, 0.0)).dst == PRV3
    other = ip_to_int("192.0.2.7")
    assert accepted(eng.handle(build_tcp(other, MASQ, 1, 22, flags=TCP_SYN), IN, 0.0)).dst == PRV1
    assert accepted(eng.handle(build_tcp(other, MASQ, 1, 8443, flags=TCP_SYN), IN, 0.0)).dst == PRV2


def test_forwarded_port_is_never_allocated_to_a_client():
    eng = make_engine(port_range=PortRange(4000, 4001), forwards=(Forward("udp", "10.77.0.5", 4000),))
    assert accepted(udp_out(eng, PRV1, 4000)).u16(0) == 4001
    dropped(udp_out(eng, PRV2, 4000), DropReason.PORTS_EXHAUSTED)


# ---------------------------------------------------------------- fragments
def _fragments(pkt: bytes, split: int):
    """Split an unfragmented datagram into two fragments at ``split`` payload bytes."""
    from vpnmasq.packet.ipv4 import IPv4

    ip = IPv4(bytearray(pkt))
    payload = bytes(ip.payload())
    f1 = build_ipv4(ip.src, ip.dst, ip.proto, payload[:split], ident=4242, flags_frag=0x2000)
    f2 = build_ipv4(ip.src, ip.dst, ip.proto, payload[split:], ident=4242, flags_frag=split // 8)
    return f1, f2


def test_fragments_follow_first_fragment_mapping():
    eng = make_engine()
    f1, f2 = _fragments(build_udp(PRV1, EXT, 40000, 53, b"y" * 200), 96)
    a = eng.handle(f1, OUT, 0.0)
    assert a.action is Action.ACCEPT
    b = eng.handle(f2, OUT, 0.0)
    assert b.action is Action.ACCEPT and b.payload is not None
    from tests.packets import ip_of

    assert ip_of(b).src == MASQ and ip_of(b).header_checksum_ok()


def test_out_of_order_fragment_is_held_then_released():
    eng = make_engine()
    f1, f2 = _fragments(build_udp(PRV1, EXT, 40000, 53, b"y" * 200), 96)
    held = eng.handle(f2, OUT, 0.0, token="second")
    assert held.action is Action.HOLD
    first = eng.handle(f1, OUT, 0.1, token="first")
    assert first.action is Action.ACCEPT
    ((tok, v),) = first.released
    assert tok == "second" and v.action is Action.ACCEPT
    from tests.packets import ip_of

    assert ip_of(v).src == MASQ


def test_orphan_fragment_times_out_as_counted_drop():
    eng = make_engine()
    _, f2 = _fragments(build_udp(PRV1, EXT, 40000, 53, b"y" * 200), 96)
    assert eng.handle(f2, OUT, 0.0, token=1).action is Action.HOLD
    assert eng.next_deadline() == 30.0
    ((tok, v),) = eng.handle_timer(30.0)
    assert tok == 1 and v.reason is DropReason.FRAGMENT_TIMEOUT


def test_an_engine_being_replaced_gives_its_held_fragments_a_verdict():
    eng = make_engine()
    _, f2 = _fragments(build_udp(PRV1, EXT, 40000, 53, b"y" * 200), 96)
    assert eng.handle(f2, OUT, 0.0, token=7).action is Action.HOLD
    ((tok, v),) = eng.release_held()  # a configuration reload builds a new engine
    assert tok == 7 and v.action is Action.DROP and v.reason is DropReason.FRAGMENT_TIMEOUT
    assert eng.release_held() == [] and eng.next_deadline() is None  # nothing left to time out


# ---------------------------------------------------------------- malformed input
@pytest.mark.parametrize(
    "data",
    [b"", b"\x45", b"\x45" + b"\x00" * 18, b"\x65" + b"\x00" * 30, bytes(build_udp(PRV1, EXT, 1, 2))[:25]],
)
def test_truncated_or_inconsistent_headers_are_counted_drops(data):
    eng = make_engine()
    dropped(eng.handle(data, OUT, 0.0), DropReason.MALFORMED)
    assert eng.counters["drop:malformed"] == 1


def test_events_report_creation_and_drop_reason():
    eng = make_engine()
    accepted(udp_out(eng, PRV1, 40000))
    ev = eng.drain_events()
    assert any(isinstance(e, EntryCreated) and e.row.inside == "10.77.0.11:40000" for e in ev)
    assert eng.drain_events() == []


# ---------------------------------------------------------------- AH / FWZ refusal
def _ah_packet(src=PRV1, dst=EXT):
    ah = bytes([50, 4, 0, 0]) + (0x1234).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x00" * 12
    return build_ipv4(src, dst, 51, ah + b"payload")


def test_ah_is_refused_with_reason_reported_once_per_flow():
    from vpnmasq.events import Notice

    eng = make_engine()
    for _ in range(3):
        dropped(eng.handle(_ah_packet(), OUT, 0.0), DropReason.AH_UNSUPPORTED)
    notices = [e for e in eng.drain_events() if isinstance(e, Notice)]
    assert len(notices) == 1 and "cannot be masqueraded" in notices[0].message
    assert eng.counters["drop:ah-cannot-be-masqueraded"] == 3


def test_ah_icmp_prohibited_asks_for_one_icmp_back_per_flow():
    eng = make_engine(ah_icmp_prohibited=True)
    first = eng.handle(_ah_packet(), OUT, 0.0)
    again = eng.handle(_ah_packet(), OUT, 0.1)
    assert first.icmp_back == (3, 13) and again.icmp_back is None
    assert make_engine().handle(_ah_packet(), OUT, 0.0).icmp_back is None


def test_fwz_protocol_94_is_refused_with_reason():
    eng = make_engine()
    v = eng.handle(build_ipv4(PRV1, EXT, 94, b"\x45" + b"\x00" * 30), OUT, 0.0)
    dropped(v, DropReason.FWZ_UNSUPPORTED)
    assert "FWZ" in v.detail


def test_ah_from_exempt_network_is_routed():
    eng = make_engine(exempt_networks=("192.0.2.0/28",))
    v = eng.handle(_ah_packet(src=ip_to_int("192.0.2.3")), OUT, 0.0)
    assert v.action is Action.ACCEPT and v.payload is None


def test_stress_random_flows_all_replies_restore_their_host():
    """libalias 7_stress: rounds of random UDP flows out, replies shuffled, all de-NATed."""
    import random

    rng = random.Random(0x0B61)  # fixed seed, to reproduce
    eng = make_engine(port_range=PortRange(1024, 65535), filtering="endpoint-independent")
    for rnd in range(5):
        flows = []
        for _ in range(1200):
            src = ip_to_int("10.77.0.0") + rng.randrange(1, 255)
            sport = rng.randrange(1024, 65536)
            dst = ip_to_int("203.0.113.0") + rng.randrange(1, 255)
            dport = rng.randrange(1, 65536)
            out = accepted(eng.handle(build_udp(src, dst, sport, dport, b"s"), OUT, float(rnd)))
            flows.append((src, sport, dst, dport, out.u16(0)))
        rng.shuffle(flows)
        for src, sport, dst, dport, alias in flows:
            back = accepted(eng.handle(build_udp(dst, MASQ, dport, alias, b"r"), IN, rnd + 0.5))
            assert (back.dst, back.u16(2)) == (src, sport)


def test_forward_follows_the_public_address():
    """libalias 3_redirectany: a forward is bound to whatever the public address is."""
    eng = make_engine(forwards=(Forward("tcp", "10.77.0.5", 1723),))
    new = ip_to_int("198.51.100.77")
    eng.set_public_address(new, 5.0)
    ip = accepted(eng.handle(build_tcp(EXT, new, 5555, 1723, flags=TCP_SYN), IN, 6.0))
    assert (ip.dst, ip.u16(2)) == (SRV_LAN, 1723)


def test_snapshot_marks_exactly_the_entries_the_datapath_says_are_offloaded():
    eng = make_engine()
    accepted(udp_out(eng, PRV1, 40000, EXT, 53))
    accepted(udp_out(eng, PRV1, 40000, EXT, 54))  # same host and remote, another session
    first = next(iter(eng.table))
    rows = eng.snapshot(0.0, offloaded=lambda e: e is first)
    assert sorted(r.offloaded for r in rows) == [False, True]
    assert not any(r.offloaded for r in eng.snapshot(0.0))
