"""Hairpinning of ordinary (dynamic) mappings in the engine, bytes in / bytes out (libalias
12_udp_eim_hairpinning and beyond): PRV1 and PRV2 reach each other through their public
mappings on MASQ, each seeing the other's public address and port (RFC 4787 REQ-9a), with
the configured filtering applied as to a packet from outside, and ICMP errors inside such
flows translated for the other host (RFC 5508 REQ-5 / RFC 5382 REQ-10)."""

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
    accepted,
    build_icmp,
    build_tcp,
    build_udp,
    dropped,
    make_engine,
)
from vpnmasq.datapath.offload import entry_elements
from vpnmasq.engine import Engine
from vpnmasq.packet.checksum import checksum
from vpnmasq.packet.ipv4 import IPv4
from vpnmasq.packet.l4 import TCP_ACK, TCP_SYN
from vpnmasq.verdict import Action, DropReason


def mapping(eng: Engine, host: int, port: int, now: float = 0.0) -> int:
    """``host:port`` sends to EXT (a STUN server, say): its public port on MASQ."""
    return accepted(eng.handle(build_udp(host, EXT, port, 3478, b"binding"), OUT, now)).u16(0)


def hairpin_udp(eng: Engine, src: int, sport: int, dport: int, now: float = 1.0):
    return eng.handle(build_udp(src, MASQ, sport, dport, b"p2p"), OUT, now)


def test_udp_peers_see_each_others_public_mapping_with_endpoint_independent_filtering():
    eng = make_engine(filtering="endpoint-independent")
    a, b = mapping(eng, PRV1, 5000), mapping(eng, PRV2, 6000)
    ip = accepted(hairpin_udp(eng, PRV1, 5000, b))
    assert (ip.src, ip.u16(0), ip.dst, ip.u16(2)) == (MASQ, a, PRV2, 6000)
    back = accepted(hairpin_udp(eng, PRV2, 6000, a))
    assert (back.src, back.u16(0), back.dst, back.u16(2)) == (MASQ, b, PRV1, 5000)
    assert eng.counters["hairpin"] == 2
    # each leg is a session of its own mapping, with the other's public endpoint as remote
    rows = {(r.inside, r.remote) for r in eng.snapshot(1.0)}
    assert ("10.77.0.11:5000", f"198.51.100.1:{b}") in rows
    assert ("10.77.0.12:6000", f"198.51.100.1:{a}") in rows


@pytest.mark.parametrize("filtering", ["address-port-dependent", "address-dependent"])
def test_a_hairpinned_packet_is_filtered_like_one_from_outside(filtering: str):
    eng = make_engine(filtering=filtering)
    a, b = mapping(eng, PRV1, 5000), mapping(eng, PRV2, 6000)
    # PRV1's mapping has only sent to EXT: PRV2's hairpinned packet is refused ...
    v = dropped(hairpin_udp(eng, PRV2, 6000, a), DropReason.FILTERED)
    assert f"mapping of 10.77.0.11:5000 does not accept this remote ({filtering})" in v.detail
    # ... exactly as a packet from another outside host is
    dropped(eng.handle(build_udp(EXT2, MASQ, 6000, a, b"x"), IN, 1.0), DropReason.FILTERED)
    # PRV2's refused packet opened PRV2's mapping for PRV1's public endpoint (its own
    # outbound session), so PRV1's answer passes, and from then on both ways: hole punching
    ip = accepted(hairpin_udp(eng, PRV1, 5000, b))
    assert (ip.src, ip.u16(0), ip.dst) == (MASQ, a, PRV2)
    ip = accepted(hairpin_udp(eng, PRV2, 6000, a))
    assert (ip.src, ip.u16(0), ip.dst, ip.u16(2)) == (MASQ, b, PRV1, 5000)


def test_address_dependent_filtering_accepts_another_port_of_an_address_already_sent_to():
    """The remote the filter sees is MASQ, the shared public address: under address-dependent
    filtering a mapping that sent to one LAN host's public endpoint accepts every hairpinned
    packet (any LAN host is MASQ seen from it), as it would any port of an outside host."""
    eng = make_engine(filtering="address-dependent")
    a, b = mapping(eng, PRV1, 5000), mapping(eng, PRV2, 6000)
    c = mapping(eng, PRV2, 6001)
    dropped(hairpin_udp(eng, PRV2, 6001, a), DropReason.FILTERED)  # PRV1:5000 never sent to MASQ
    dropped(hairpin_udp(eng, PRV1, 5000, b), DropReason.FILTERED)  # nor PRV2:6000
    # ... but PRV1:5000 has now (to PRV2:6000's mapping), so PRV2:6001's packet passes,
    # and PRV2:6001 had sent to MASQ too, so PRV1's packet to it passes
    ip = accepted(hairpin_udp(eng, PRV2, 6001, a))
    assert (ip.src, ip.u16(0), ip.dst) == (MASQ, c, PRV1)
    ip = accepted(hairpin_udp(eng, PRV1, 5000, c))
    assert (ip.src, ip.u16(0), ip.dst, ip.u16(2)) == (MASQ, a, PRV2, 6001)


def test_tcp_connects_to_another_hosts_public_mapping():
    eng = make_engine(filtering="endpoint-independent")
    syn = build_tcp(PRV2, EXT, 7000, 443, flags=TCP_SYN)
    b = accepted(eng.handle(syn, OUT, 0.0)).u16(0)  # PRV2's TCP mapping (open to EXT)
    ip = accepted(eng.handle(build_tcp(PRV1, MASQ, 41000, b, flags=TCP_SYN), OUT, 1.0))
    a = ip.u16(0)
    assert (ip.src, ip.dst, ip.u16(2)) == (MASQ, PRV2, 7000)
    synack = build_tcp(PRV2, MASQ, 7000, a, flags=TCP_SYN | TCP_ACK)
    back = accepted(eng.handle(synack, OUT, 1.1))
    assert (back.src, back.u16(0), back.dst, back.u16(2)) == (MASQ, b, PRV1, 41000)
    ack = accepted(eng.handle(build_tcp(PRV1, MASQ, 41000, b, flags=TCP_ACK), OUT, 1.2))
    assert ack.dst == PRV2
    states = {r.inside: r.state for r in eng.snapshot(1.2) if r.remote.startswith("198.51.100.1:")}
    assert states == {"10.77.0.11:41000": "ESTABLISHED", "10.77.0.12:7000": "ESTABLISHED"}


def test_a_tcp_syn_to_a_mapping_that_never_sent_to_the_sender_is_filtered():
    eng = make_engine()  # address-and-port-dependent, the default
    b = accepted(eng.handle(build_tcp(PRV2, EXT, 7000, 443, flags=TCP_SYN), OUT, 0.0)).u16(0)
    v = eng.handle(build_tcp(PRV1, MASQ, 41000, b, flags=TCP_SYN), OUT, 1.0)
    dropped(v, DropReason.FILTERED)


def test_a_packet_to_a_pool_port_nobody_holds_is_dropped_like_one_from_outside():
    eng = make_engine(filtering="endpoint-independent")
    free = next(p for p in range(61000, 65536) if eng.table.binding_by_alias(17, p) is None)
    dropped(hairpin_udp(eng, PRV1, 5000, free), DropReason.NO_MAPPING)
    dropped(eng.handle(build_udp(EXT, MASQ, 53, free, b"x"), IN, 1.0), DropReason.NO_MAPPING)


def test_pinging_the_public_address_is_left_to_the_gateway():
    """An echo request to the shared address names no other host's mapping: the gateway
    answers it (hairpinned ICMP queries are a Basic NAT requirement, RFC 5508)."""
    eng = make_engine(filtering="endpoint-independent")
    accepted(eng.handle(build_icmp(PRV2, EXT, 8, 0, (77 << 16) | 1, b"out"), OUT, 0.0))
    v = eng.handle(build_icmp(PRV1, MASQ, 8, 0, (77 << 16) | 1, b"hi"), OUT, 1.0)
    assert v.action is Action.ACCEPT and v.payload is None and v.local


def _error_about(quoted: IPv4, src: int) -> bytes:
    """``src``'s ICMP port unreachable about ``quoted`` (the IP header + 28 bytes)."""
    return bytes(build_icmp(src, MASQ, 3, 3, 0, bytes(quoted.buf[:48])))


def _quoted(ip: IPv4) -> IPv4:
    emb = bytearray(ip.buf[ip.ihl + 8 :])
    assert checksum(emb[: (emb[0] & 0x0F) * 4]) == 0, "embedded IP header checksum"
    emb[2:4] = len(emb).to_bytes(2, "big")
    return IPv4(emb)


def test_icmp_errors_inside_a_hairpinned_flow_reach_the_other_host_quoting_its_datagram():
    eng = make_engine(filtering="endpoint-independent")
    a, b = mapping(eng, PRV1, 5000), mapping(eng, PRV2, 6000)
    to_b = accepted(hairpin_udp(eng, PRV1, 5000, b))  # as PRV2 got it: MASQ:a -> PRV2:6000
    err = accepted(eng.handle(_error_about(to_b, PRV2), OUT, 1.5))
    assert (err.src, err.dst) == (MASQ, PRV1)
    q = _quoted(err)
    assert (q.src, q.u16(0), q.dst, q.u16(2)) == (PRV1, 5000, MASQ, b)  # what PRV1 sent
    # and the other way round
    to_a = accepted(hairpin_udp(eng, PRV2, 6000, a, now=2.0))
    err = accepted(eng.handle(_error_about(to_a, PRV1), OUT, 2.5))
    assert (err.src, err.dst) == (MASQ, PRV2)
    q = _quoted(err)
    assert (q.src, q.u16(0), q.dst, q.u16(2)) == (PRV2, 6000, MASQ, a)
    # an error quoting a flow nobody has is dropped, never delivered with a wrong address
    stray = IPv4(build_udp(MASQ, PRV2, a, 6999, b"?"))
    dropped(eng.handle(_error_about(stray, PRV2), OUT, 3.0), DropReason.ICMP_NO_MAPPING)


def test_the_gateways_own_error_about_a_hairpinned_datagram_reaches_the_sender():
    """The gateway cannot deliver a hairpinned datagram to PRV2 (ARP fails): its host
    unreachable quotes MASQ:a -> PRV2:6000 and is addressed to MASQ, itself; it reaches PRV1
    quoting PRV1's own datagram (queued from OUTPUT, see Engine._icmp_error_local)."""
    eng = make_engine(filtering="endpoint-independent")
    a, b = mapping(eng, PRV1, 5000), mapping(eng, PRV2, 6000)
    to_b = accepted(hairpin_udp(eng, PRV1, 5000, b))
    assert (to_b.src, to_b.u16(0), to_b.dst) == (MASQ, a, PRV2)
    err = bytes(build_icmp(MASQ, MASQ, 3, 1, 0, bytes(to_b.buf[:48])))
    ip = accepted(eng.handle(err, OUT, 3.0))
    assert (ip.src, ip.dst) == (MASQ, PRV1)
    q = _quoted(ip)
    assert (q.src, q.u16(0), q.dst, q.u16(2)) == (PRV1, 5000, MASQ, b)


@pytest.mark.parametrize("filtering", ["endpoint-independent", "address-port-dependent"])
def test_hairpinned_legs_are_never_offloaded(filtering: str):
    """The offload maps rewrite what crosses the outside interface; a hairpinned leg never
    does, so the engine keeps it (the status would otherwise call it offloaded)."""
    eng = make_engine(filtering=filtering)
    a, b = mapping(eng, PRV1, 5000), mapping(eng, PRV2, 6000)
    accepted(eng.handle(build_udp(EXT, MASQ, 3478, a, b"r"), IN, 0.5))  # reflector answers
    hairpin_udp(eng, PRV2, 6000, a, 0.8)  # the punch (filtered under address-port-dependent)
    for now in (1.0, 2.0):  # both ways, twice: every leg fast-path eligible
        accepted(hairpin_udp(eng, PRV1, 5000, b, now))
        accepted(hairpin_udp(eng, PRV2, 6000, a, now))
    legs = [e for e in eng.table if e.remote_ip == MASQ]
    assert len(legs) == 2 and all(e.flags for e in legs)
    assert [entry_elements(e, filtering) for e in legs] == [[], []]
    to_ext = next(e for e in eng.table if e.inside_ip == PRV1 and e.remote_ip == EXT)
    assert entry_elements(to_ext, filtering)  # the session through wan0 is offloaded
