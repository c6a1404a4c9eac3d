"""Properties of the packet layer and the engine (hypothesis)."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.packets import EXT, IN, MASQ, OUT, assert_checksums_ok, ip_of, make_engine
from vpnmasq.config import PortRange
from vpnmasq.packet.checksum import checksum, update16, update32
from vpnmasq.packet.ipv4 import IPv4, build_ipv4
from vpnmasq.packet.l4 import build_icmp, build_tcp, build_udp
from vpnmasq.verdict import Action, Verdict

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
inside_ip = st.integers(0, 255).map(lambda i: (10 << 24) | (77 << 16) | i)


# RFC 1624 eqn. 3 and a full recompute differ only for all-zero data (+0 vs -0), which no
# real header is (IPv4 has a non-zero version); such data is excluded.
nonzero = st.binary(min_size=2, max_size=200).filter(lambda b: len(b) % 2 == 0 and any(b))


@given(nonzero, st.data())
def test_incremental_16bit_update_equals_full_recompute(data, draw):
    buf = bytearray(data) + b"\x00\x00"  # checksum in the last word
    c = checksum(buf)
    struct.pack_into("!H", buf, len(buf) - 2, c)
    i = draw.draw(st.integers(0, len(data) // 2 - 1)) * 2
    new = draw.draw(u16)
    old = struct.unpack_from("!H", buf, i)[0]
    struct.pack_into("!H", buf, i, new)
    inc = update16(c, old, new)
    struct.pack_into("!H", buf, len(buf) - 2, 0)
    if any(buf):
        assert inc == checksum(buf)


@given(nonzero.filter(lambda b: len(b) >= 8), u32)
def test_incremental_32bit_update_equals_full_recompute(data, new):
    buf = bytearray(data)
    if not any(buf[4:]) and new == 0:
        return  # would be all zero after the update
    old = int.from_bytes(buf[0:4], "big")
    c = checksum(buf)
    buf[0:4] = new.to_bytes(4, "big")
    assert update32(c, old, new) == checksum(buf)


@given(u32, u32, st.integers(0, 255), st.binary(max_size=64), u16, st.integers(1, 255))
def test_ipv4_build_parse_round_trip(src, dst, proto, payload, ident, ttl):
    ip = IPv4(build_ipv4(src, dst, proto, payload, ident=ident, ttl=ttl))
    assert (ip.src, ip.dst, ip.proto, ip.ident, ip.ttl) == (src, dst, proto, ident, ttl)
    assert bytes(ip.payload()) == payload
    assert ip.header_checksum_ok()


@given(st.binary(max_size=120), st.sampled_from([OUT, IN]))
@settings(max_examples=400)
def test_any_bytes_yield_a_verdict(data, direction):
    eng = make_engine()
    assert isinstance(eng.handle(data, direction, 0.0), Verdict)


@given(
    st.integers(1, 255).flatmap(
        lambda proto: st.builds(
            lambda tail: bytes(build_ipv4(0x0A4D000B, EXT, proto, tail)), st.binary(max_size=60)
        )
    ),
    st.sampled_from([OUT, IN]),
)
@settings(max_examples=400)
def test_any_l4_bytes_behind_a_valid_ip_header_yield_a_verdict(pkt, direction):
    eng = make_engine()
    if direction is IN:
        pkt = bytearray(pkt)
        pkt[12:16] = EXT.to_bytes(4, "big")
        pkt[16:20] = MASQ.to_bytes(4, "big")
    assert isinstance(eng.handle(bytes(pkt), direction, 0.0), Verdict)


# ports owned by VPN helpers (IKE 500, NAT-T 4500, PPTP 1723) are not plain NAPT: their own
# scenario and property tests cover them
plain_port = st.integers(1, 65535).filter(lambda p: p not in (500, 1723, 4500))
flows = st.lists(
    st.tuples(inside_ip, plain_port, st.sampled_from([6, 17, 1]), plain_port),
    min_size=1,
    max_size=40,
)


def _pkt(proto, src, dst, sport, dport):
    if proto == 6:
        return build_tcp(src, dst, sport, dport, b"d")
    if proto == 17:
        return build_udp(src, dst, sport, dport, b"d")
    return build_icmp(src, dst, 8, 0, (sport << 16) | 1, b"d")


def _reply(proto, out):
    ip = ip_of(out)
    if proto == 1:
        return build_icmp(ip.dst, ip.src, 0, 0, (ip.u16(4) << 16) | 1, b"d")
    return (build_tcp if proto == 6 else build_udp)(ip.dst, ip.src, ip.u16(2), ip.u16(0), b"d")


@given(flows)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_outbound_then_reply_restores_the_original_tuple(fl):
    eng = make_engine(port_range=PortRange(1024, 65535))
    for src, sport, proto, dport in fl:
        out = eng.handle(_pkt(proto, src, EXT, sport, dport), OUT, 0.0)
        assert out.action is Action.ACCEPT
        assert out.payload is not None
        assert_checksums_ok(out.payload)
        assert ip_of(out).src == MASQ
        back = eng.handle(_reply(proto, out), IN, 0.1)
        assert back.action is Action.ACCEPT and back.payload is not None
        assert_checksums_ok(back.payload)
        ip = ip_of(back)
        assert ip.dst == src
        if proto == 1:
            assert ip.u16(4) == sport
        else:
            assert (ip.u16(2), ip.u16(0)) == (sport, dport)


@given(flows, st.lists(st.floats(0, 400), max_size=10))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_no_alias_is_given_to_two_live_mappings(fl, times):
    eng = make_engine(port_range=PortRange(5000, 5100))
    now = 0.0
    for i, (src, sport, proto, dport) in enumerate(fl):
        if times and i % 4 == 0:
            now += times[i % len(times)]
            eng.handle_timer(now)
        eng.handle(_pkt(proto, src, EXT, sport, dport), OUT, now)
        seen: dict[tuple[int, int], tuple[int, int]] = {}
        for b in eng.table.bindings.values():
            if b.static:
                continue
            key = (b.proto, b.alias_port)
            assert key not in seen, f"alias {key} given to {seen[key]} and {(b.inside_ip, b.inside_port)}"
            seen[key] = (b.inside_ip, b.inside_port)
        for e in eng.table:
            assert e.expires_at > 0  # every entry has an expiry
