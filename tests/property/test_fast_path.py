"""The engine's fast path (``Engine._fast``) gives exactly the slow path's answers.

Two engines with the same configuration and random seed get the same random traffic: one with
``fast_path`` on (the default), one with it off. Every verdict must be identical, byte for byte
(checksums included, also for UDP without a checksum and for ports that change), and so must
the tables afterwards: every field of every entry, the bindings and the counters. Traffic mixes
TCP handshakes, data, FIN and RST, UDP with and without checksum, both directions, packets the
fast path must leave alone (IP options, fragments, hairpin, unknown flows, UDP 500/4500), the
clock moving past idle timeouts and the public address changing.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.packets import EXT, EXT2, IN, MASQ, OUT, PRV1, PRV2, assert_checksums_ok, make_engine
from vpnmasq.conntrack.table import ENTRY_FIELDS, Entry
from vpnmasq.engine import Engine
from vpnmasq.packet.ipv4 import PROTO_TCP, PROTO_UDP, build_ipv4
from vpnmasq.packet.l4 import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, build_tcp, build_udp
from vpnmasq.verdict import Action

HOSTS = (PRV1, PRV2)
REMOTES = (EXT, EXT2)
PORTS = (500, 4500, 1024, 40000, 40001)
FLAGS = (TCP_ACK, TCP_ACK, TCP_ACK | 0x08, TCP_SYN, TCP_SYN | TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST)
NEW_PUBLIC = MASQ + 1


def engines() -> tuple[Engine, Engine]:
    fast = make_engine(on_address_change="rewrite")
    slow = make_engine(on_address_change="rewrite")
    slow.fast_path = False
    return fast, slow


def count_fast_hits(eng: Engine) -> list[int]:
    """Wrap ``eng._fast`` to count the packets it answered."""
    hits = [0]
    inner = eng._fast

    def wrapped(packet: Any, direction: Any, now: float) -> Any:
        v = inner(packet, direction, now)
        if v is not None:
            hits[0] += 1
        return v

    eng._fast = wrapped  # type: ignore[method-assign]
    return hits


def entry_state(e: Entry) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in ENTRY_FIELDS:
        v = getattr(e, name)
        if name == "binding":
            v = None if v is None else (v.proto, v.inside_ip, v.inside_port, v.alias_port, v.n_sessions)
        elif name in ("ext", "alg"):
            v = type(v).__name__
        out[name] = v
    out["keys"] = sorted(map(repr, e.keys))
    return out


def table_state(eng: Engine) -> object:
    t = eng.table
    entries = sorted((entry_state(e) for e in t), key=repr)
    bindings = sorted((k, b.alias_port, b.n_sessions, dict(b.remotes)) for k, b in t.bindings.items())
    return entries, bindings, sorted(map(repr, t.index)), dict(eng.counters), t.count


def packet(draw: Any, fast: Engine, step: int) -> tuple[bytes, Any]:
    """One packet: outbound from a LAN host, or inbound to the public address (often to a
    live mapping, so that established flows really run both ways)."""
    kind = draw(st.sampled_from(("out", "out", "in", "in", "odd")))
    proto = draw(st.sampled_from((PROTO_TCP, PROTO_UDP)))
    payload = b"p" * draw(st.sampled_from((0, 1, 7, 100)))
    ident = step & 0xFFFF
    pub = fast.public_ip or MASQ
    if kind == "out" or kind == "odd":
        src, dst = draw(st.sampled_from(HOSTS)), draw(st.sampled_from(REMOTES))
        sport, dport = draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))
        if kind == "odd":
            odd = draw(st.sampled_from(("options", "fragment", "hairpin", "short_total")))
            if odd == "hairpin":
                dst = pub
            elif odd in ("options", "fragment", "short_total"):
                seg = (build_tcp if proto == PROTO_TCP else build_udp)(src, dst, sport, dport, payload)
                body = bytes(seg[20:])
                if odd == "options":
                    pkt = build_ipv4(src, dst, proto, body, options=b"\x01\x01\x01\x00", ident=ident)
                elif odd == "fragment":
                    pkt = build_ipv4(src, dst, proto, body, flags_frag=0x2000, ident=ident)
                else:
                    pkt = bytearray(seg) + b"\x00\x00\x00\x00"  # total length < captured
                return bytes(pkt), OUT
        direction = OUT
    else:
        live = [e for e in fast.table if e.proto == proto and e.kind in ("napt", "fwd")]
        if live and draw(st.booleans()):
            e = draw(st.sampled_from(live))
            src, sport, dport = e.remote_ip, e.remote_port, e.alias_port
        else:
            src, sport, dport = (
                draw(st.sampled_from(REMOTES)), draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))
            )
        dst = pub
        direction = IN
    if proto == PROTO_TCP:
        pkt = build_tcp(
            src, dst, sport, dport, payload, flags=draw(st.sampled_from(FLAGS)),
            seq=draw(st.integers(0, 0xFFFFFFFF)), ack=draw(st.integers(0, 0xFFFFFFFF)), ident=ident,
        )
    else:
        pkt = build_udp(src, dst, sport, dport, payload, ident=ident, no_checksum=draw(st.booleans()))
    return bytes(pkt), direction


# no shrinking: a failure prints the packet and direction; shrinking these runs takes minutes
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(st.data())
def test_fast_path_answers_exactly_as_the_slow_path(data: st.DataObject) -> None:
    fast, slow = engines()
    hits = count_fast_hits(fast)
    now = 0.0
    for step in range(data.draw(st.integers(10, 80), label="steps")):
        op = data.draw(st.sampled_from(("pkt",) * 12 + ("tick", "address")), label="op")
        if op == "tick":
            now += data.draw(st.sampled_from((0.5, 31.0, 301.0)), label="dt")
            fast.handle_timer(now)
            slow.handle_timer(now)
            continue
        if op == "address":
            new = NEW_PUBLIC if fast.public_ip == MASQ else MASQ
            fast.set_public_address(new, now)
            slow.set_public_address(new, now)
            continue
        pkt, direction = packet(data.draw, fast, step)
        vf = fast.handle(pkt, direction, now)
        vs = slow.handle(pkt, direction, now)
        assert vf == vs, (direction, pkt.hex())
        if vf.action is Action.ACCEPT and vf.payload is not None:
            assert_checksums_ok(vf.payload)
        now += 0.001
    fast.drain_events()
    slow.drain_events()
    assert table_state(fast) == table_state(slow)
    assert hits[0] <= fast.counters.get("packets_out", 0) + fast.counters.get("packets_in", 0)


def _established_tcp(eng: Engine) -> tuple[bytes, bytes]:
    """A TCP handshake through ``eng``; returns a data segment each way."""
    syn = build_tcp(PRV1, EXT, 40000, 443, flags=TCP_SYN)
    v = eng.handle(syn, OUT, 0.0)
    assert v.payload is not None
    alias = int.from_bytes(v.payload[20:22], "big")
    assert eng.handle(build_tcp(EXT, MASQ, 443, alias, flags=TCP_SYN | TCP_ACK), IN, 0.0).accepted
    assert eng.handle(build_tcp(PRV1, EXT, 40000, 443), OUT, 0.0).accepted
    out = bytes(build_tcp(PRV1, EXT, 40000, 443, b"data" * 100, seq=7, ack=9))
    inn = bytes(build_tcp(EXT, MASQ, 443, alias, b"back" * 100, seq=9, ack=11))
    return out, inn


def test_established_tcp_takes_the_fast_path_both_ways_and_refreshes_the_entry() -> None:
    eng = make_engine()
    hits = count_fast_hits(eng)
    out, inn = _established_tcp(eng)
    assert eng.handle(inn, IN, 1.0).accepted  # first inbound data: marks the inbound side
    before = hits[0]
    vo = eng.handle(out, OUT, 2.0)
    vi = eng.handle(inn, IN, 2.0)
    assert hits[0] == before + 2
    for v in (vo, vi):
        assert v.payload is not None
        assert_checksums_ok(v.payload)
    (e,) = [e for e in eng.table if e.proto == PROTO_TCP]
    assert e.last_ack_out == 9  # the ACK of the outbound data: the RST window check works
    assert e.expires_at == 2.0 + eng.timeouts["tcp_established"]
    assert (e.pkts_out, e.pkts_in) == (3, 3)


def test_fin_rst_syn_and_expired_entries_take_the_slow_path() -> None:
    eng = make_engine()
    hits = count_fast_hits(eng)
    out, inn = _established_tcp(eng)
    eng.handle(inn, IN, 1.0)
    h0 = hits[0]
    for flags in (TCP_FIN | TCP_ACK, TCP_RST, TCP_SYN):
        pkt = build_tcp(PRV1, EXT, 40000, 443, flags=flags)
        eng.handle(pkt, OUT, 1.0)
    assert hits[0] == h0
    # after the RST the session is closed: data no longer takes the fast path
    eng.handle(out, OUT, 1.5)
    assert hits[0] == h0
    # an idle entry is never used late, even by the fast path
    eng2 = make_engine()
    hits2 = count_fast_hits(eng2)
    out2, _ = _established_tcp(eng2)
    late = 1.0 + eng2.timeouts["tcp_transitory"] + eng2.timeouts["tcp_established"]
    v = eng2.handle(out2, OUT, late)
    assert hits2[0] == 0
    assert v.accepted  # a new session (mid-stream pickup), made by the slow path


def test_udp_to_the_ike_ports_never_takes_the_fast_path_inbound() -> None:
    eng = make_engine()
    hits = count_fast_hits(eng)
    for sport in (4500, 1234):
        v = eng.handle(build_udp(PRV1, EXT, sport, sport, b"x"), OUT, 0.0)
        assert v.payload is not None
        alias = int.from_bytes(v.payload[20:22], "big")
        eng.handle(build_udp(EXT, MASQ, sport, alias, b"y"), IN, 0.0)
        h = hits[0]
        eng.handle(build_udp(EXT, MASQ, sport, alias, b"y"), IN, 0.1)
        assert hits[0] == h + (1 if sport == 1234 else 0)
