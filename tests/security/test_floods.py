"""Floods and exhaustion on the pure engine: established sessions of other hosts survive, the
state stays within the configured limits, and every refusal is counted.

Each test floods the world of :func:`fuzz.world.build_world` (sessions of PRV1 and PRV2:
TCP, UDP, ICMP, PPTP calls, IKE, ESP) on a manual clock, then checks that those sessions
still pass both ways (:func:`assert_sessions_alive`) and that
:func:`tests.invariants.check_invariants` holds.
"""

from __future__ import annotations

import random

from fuzz.world import MAIN, World, build_world

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
    accepted,
    build_esp,
    build_icmp,
    build_tcp,
    build_udp,
    dropped,
    make_engine,
)
from tests.pptp_wire import ControlLink, gre_packet, ocrq, u16_at
from vpnmasq.config import EspPolicy, Limits
from vpnmasq.engine import NEW_MAPPING_BURST_S
from vpnmasq.helpers.isakmp import build_header
from vpnmasq.packet.ipv4 import PROTO_ESP, ip_to_int
from vpnmasq.packet.l4 import TCP_SYN
from vpnmasq.verdict import Action, DropReason


def assert_sessions_alive(w: World) -> None:
    """Every session of the world still passes, both ways, to the right host."""
    t, u, i = w.aliases["tcp"], w.aliases["udp"], w.aliases["icmp"]
    send = w.send
    assert accepted(send(build_tcp(PRV1, EXT, 40000, 80, b"more", seq=101, ack=901), True)).src == MASQ
    assert accepted(send(build_tcp(EXT, MASQ, 80, t, b"data", seq=901, ack=105), False)).dst == PRV1
    assert accepted(send(build_udp(PRV1, EXT, 5353, 53, b"q"), True)).src == MASQ
    assert accepted(send(build_udp(EXT, MASQ, 53, u, b"a"), False)).dst == PRV1
    assert accepted(send(build_icmp(PRV2, EXT, 8, 0, (77 << 16) | 5, b"p"), True)).src == MASQ
    assert accepted(send(build_icmp(EXT, MASQ, 0, 0, (i << 16) | 5, b"p"), False)).dst == PRV2
    for host, pac, name in ((PRV1, 0x4000, "pptp"), (PRV2, 0x4001, "pptp2")):
        assert accepted(send(gre_packet(host, EXT, pac), True)).src == MASQ
        ip = accepted(send(gre_packet(EXT, MASQ, w.outside_call_ids[name]), False))
        assert (ip.dst, ip.u16(6)) == (host, 7)
    assert accepted(send(build_ipv4_esp(PRV1, EXT, 0x1001), True)).src == MASQ
    assert accepted(send(build_ipv4_esp(EXT, MASQ, 0x2001), False)).dst == PRV1
    ike = build_header(0x11, 0x22, 5, flags=1, message_id=77)
    assert accepted(send(build_udp(EXT, MASQ, 500, 500, ike), False)).dst == PRV1


def build_ipv4_esp(src: int, dst: int, spi: int, seq: int = 9) -> bytearray:
    from vpnmasq.packet.ipv4 import build_ipv4

    return build_ipv4(src, dst, PROTO_ESP, build_esp(spi, seq))


def structure_sizes(w: World) -> dict[str, int]:
    """Everything that could grow with a flood, for before/after comparisons."""
    eng = w.eng
    esp = eng.helper_by_name["esp"]
    ike = eng.helper_by_name["isakmp"]
    gre = eng.helper_by_name["gre"]
    return {
        "entries": eng.table.count,
        "index": len(eng.table.index),
        "bindings": len(eng.table.bindings),
        "esp_queues": sum(len(q) for q in esp.queues.values()),
        "esp_done": len(esp.done),
        "ike_cookies": sum(len(v) for v in ike.by_icookie.values()),
        "gre_ids": sum(len(s) for s in gre.calls.pool.used.values()),
        "frags": len(eng.frags.states) + eng.frags.held_count,
        "buckets": len(eng.rate.buckets),
    }


# ---------------------------------------------------------------------- outside floods
def test_outside_flood_of_random_esp_gre_and_ike_changes_nothing() -> None:
    w = build_world(0)
    rng = random.Random(1)
    before = structure_sizes(w)
    eng = w.eng
    n = 0
    for k in range(30_000):
        src = ip_to_int(f"192.0.{rng.randrange(2, 255)}.{rng.randrange(1, 255)}")
        kind = k % 3
        if kind == 0:
            pkt = build_ipv4_esp(src, MASQ, rng.getrandbits(32) | 1, rng.getrandbits(32))
        elif kind == 1:
            pkt = gre_packet(src, MASQ, rng.getrandbits(16))
        else:
            hdr = build_header(rng.getrandbits(64) | 1, rng.getrandbits(64) * rng.randrange(2), MAIN)
            pkt = build_udp(src, MASQ, 500, 500, hdr)
        v = eng.handle(pkt, IN, w.now)
        assert v.action is Action.DROP
        n += 1
        if k % 1000 == 0:
            w.now += 0.1
            eng.handle_timer(w.now)
            eng.drain_events()
    assert structure_sizes(w) == before
    c = eng.counters
    assert c["drop:esp-unassociated"] + c["drop:gre-unknown-call"] + c["drop:isakmp-unknown-session"] >= n
    check_invariants(eng)
    assert_sessions_alive(w)


def test_flood_spoofing_the_remotes_address_is_bounded_by_the_per_host_limit() -> None:
    """Someone who can send as EXT itself (out of reach of any NAT, docs/SECURITY.md) makes
    the gateway create remote-initiated IKE entries for PRV1, which holds IKE with EXT; the
    per-host limit bounds them, they live only isakmp_outstanding (180 s) unless PRV1
    answers, and PRV1's established sessions are untouched."""
    w = build_world(0)
    w.eng.table.max_per_host = 40
    rng = random.Random(2)
    for _ in range(1000):
        ic = rng.getrandbits(64) | 1
        for rc in (rng.getrandbits(64) | 1, rng.getrandbits(64) | 1):  # a second, other rc
            v = w.send(build_udp(EXT, MASQ, 500, 500, build_header(ic, rc, MAIN)), False)
            assert v.action is Action.DROP or accepted(v).dst == PRV1
    assert w.eng.table.per_host[PRV1] <= 40
    assert w.eng.counters["drop:host-limit"] > 0
    check_invariants(w.eng)
    assert_sessions_alive(w)
    spoofed = [e for e in w.eng.table if e.kind == "isakmp" and e.ext.via == "remote-initiated"]
    assert spoofed and all(e.tclass == "isakmp_outstanding" for e in spoofed)
    w.now += 181
    w.eng.handle_timer(w.now)
    assert not [e for e in w.eng.table if e.kind == "isakmp" and e.ext.via == "remote-initiated"]
    check_invariants(w.eng, w.now)


def test_remote_initiated_exchange_the_lan_host_answers_lives_for_hours() -> None:
    w = build_world(0)
    accepted(w.send(build_udp(EXT, MASQ, 500, 500, build_header(0x99, 0x98, MAIN)), False))
    e = next(x for x in w.eng.table if x.kind == "isakmp" and x.ext.icookie == 0x99)
    assert e.tclass == "isakmp_outstanding"
    accepted(w.send(build_udp(PRV1, EXT, 500, 500, build_header(0x99, 0x98, MAIN)), True))
    assert e.tclass == "isakmp"
    w.now += 3600
    assert accepted(w.send(build_udp(EXT, MASQ, 500, 500, build_header(0x99, 0x98, 5)), False)).dst == PRV1


# ---------------------------------------------------------------------- inside floods
LIMITED = Limits(max_entries=2000, max_entries_per_host=200, max_new_per_host_per_second=50.0)


def flood_world(limits: Limits = LIMITED, esp: EspPolicy | None = None) -> World:
    w = build_world(0)
    eng = w.eng
    # same sessions, new limits (the world is built with the defaults)
    cfg = eng.config
    object.__setattr__(cfg, "limits", limits)  # frozen dataclass: tests only
    if esp is not None:
        object.__setattr__(cfg, "esp", esp)
        eng.helper_by_name["esp"].policy = esp
    eng.table.max_entries = limits.max_entries
    eng.table.max_per_host = limits.max_entries_per_host
    eng.rate.rate = limits.max_new_per_host_per_second
    eng.rate.burst = max(1.0, eng.rate.rate * NEW_MAPPING_BURST_S)
    return w


def inside_flood(w: World, host: int, seconds: float, per_tick: int, tick: float = 0.01) -> int:
    """``host`` opens new TCP, UDP, ICMP and ESP mappings as fast as it can; returns how many
    packets it sent."""
    rng = random.Random(host)
    eng = w.eng
    sent = 0
    end = w.now + seconds
    while w.now < end:
        for _ in range(per_tick):
            remote = ip_to_int(f"203.0.113.{rng.randrange(30, 250)}")
            sport = rng.randrange(1024, 65535)
            kind = sent % 4
            if kind == 0:
                pkt = build_tcp(host, remote, sport, 443, flags=TCP_SYN, seq=1, ack=0)
            elif kind == 1:
                pkt = build_udp(host, remote, sport, 53, b"q")
            elif kind == 2:
                pkt = build_icmp(host, remote, 8, 0, (sport << 16) | 1, b"p")
            else:
                pkt = build_ipv4_esp(host, remote, rng.getrandbits(32) | 1, 1)
            eng.handle(pkt, OUT, w.now)
            sent += 1
        w.now += tick
        eng.handle_timer(w.now)
        eng.drain_events()
    return sent


def test_inside_host_flooding_new_mappings_is_held_to_its_rate_and_share() -> None:
    w = flood_world()
    eng = w.eng
    sent = inside_flood(w, PRV3, seconds=4.0, per_tick=20)  # 2000 new flows per second
    assert sent >= 7000
    created = eng.table.per_host.get(PRV3, 0)
    # the bucket: a one-second burst plus the rate, whatever was sent
    assert created <= 50 * NEW_MAPPING_BURST_S + 50 * 4.0 + 1
    c = eng.counters
    # every refused new flow is counted: by the rate, or by the pending-ESP cap (also
    # host-limit), the per-host share never being reached
    assert c["rate_limited"] > 0.5 * sent
    assert c["drop:host-limit"] >= c["rate_limited"]
    assert c.get("drop:table-full", 0) == 0
    check_invariants(eng)
    assert_sessions_alive(w)
    # other hosts still get new mappings at once
    v = w.send(build_tcp(PRV2, EXT2, 33333, 443, flags=TCP_SYN, seq=1, ack=0), True)
    assert accepted(v).src == MASQ


def test_inside_flood_without_a_rate_stops_at_the_hosts_share() -> None:
    w = flood_world(Limits(max_entries=2000, max_entries_per_host=150))
    eng = w.eng
    inside_flood(w, PRV3, seconds=1.0, per_tick=50)
    assert eng.table.per_host[PRV3] == 150
    assert eng.counters["drop:host-limit"] > 1000
    check_invariants(eng)
    assert_sessions_alive(w)
    assert accepted(w.send(build_udp(PRV2, EXT2, 4444, 53, b"q"), True)).src == MASQ


def test_a_full_table_pushes_out_no_established_session() -> None:
    """With only the global limit, a flooding host fills the table: other hosts' new flows
    are refused (counted table-full), but nothing established is evicted."""
    w = flood_world(Limits(max_entries=300))
    eng = w.eng
    inside_flood(w, PRV3, seconds=1.0, per_tick=50)
    assert eng.table.count == 300
    assert eng.counters["drop:table-full"] > 1000
    check_invariants(eng)
    assert_sessions_alive(w)
    dropped(w.send(build_udp(PRV2, EXT2, 4444, 53, b"q"), True), DropReason.TABLE_FULL)


def test_pending_esp_inits_per_host_and_waiters_per_remote_are_capped() -> None:
    w = flood_world(esp=EspPolicy(max_pending_per_host=4, max_waiting_per_remote=3))
    eng = w.eng
    esp = eng.helper_by_name["esp"]
    rng = random.Random(5)
    # one host, many new SPIs to many remotes
    for _ in range(500):
        remote = ip_to_int(f"203.0.113.{rng.randrange(30, 250)}")
        eng.handle(build_ipv4_esp(PRV3, remote, rng.getrandbits(32) | 1), OUT, w.now)
    assert esp.pending_per_host[PRV3] == 4
    # many hosts, one remote (EXT2, where PRV2 already waits)
    for k in range(40):
        host = ip_to_int(f"10.77.0.{100 + k}")
        eng.handle(build_ipv4_esp(host, EXT2, 0x7000 + k), OUT, w.now)
    assert len(esp.queues[EXT2]) == 3
    assert eng.counters["drop:host-limit"] >= 496 and eng.counters["drop:esp-waiting-for-pending-init"] >= 37
    check_invariants(eng)
    assert_sessions_alive(w)
    # PRV2's pending init is still first in line and completes
    assert accepted(w.send(build_ipv4_esp(EXT2, MASQ, 0x3002), False)).dst == PRV2


def test_call_id_flood_on_one_control_connection_is_capped() -> None:
    from vpnmasq.helpers.pptp import MAX_CALLS_WITHOUT_GRE, REFUSED_CALL_ID

    w = flood_world(Limits(max_entries=5000, max_entries_per_host=300))
    eng = w.eng
    gre = eng.helper_by_name["gre"]
    link = ControlLink(eng, PRV3, 1030, EXT).open(w.now)
    link.start_session(w.now)
    room = 300 - eng.table.per_host[PRV3]  # GRE entries PRV3 still has room for
    used_before = len(gre.calls.pool.used[EXT])
    on_wire = [u16_at(link.lan_sends(ocrq(cid), w.now), 12) for cid in range(1, 1500)]
    c = eng.counters
    assert eng.table.per_host[PRV3] == 300
    assert c["pptp_call_without_gre"] == MAX_CALLS_WITHOUT_GRE
    assert c["pptp_call_refused"] == 1499 - room - MAX_CALLS_WITHOUT_GRE
    # the server is told Call ID 0 for every refused call: never an outside ID of anyone
    assert on_wire.count(REFUSED_CALL_ID) == c["pptp_call_refused"]
    assert len(gre.calls.pool.used[EXT]) - used_before == room + MAX_CALLS_WITHOUT_GRE
    check_invariants(eng)
    assert_sessions_alive(w)
    # another host's new call to the same server still gets an ID and works
    other = ControlLink(eng, ip_to_int("10.77.0.50"), 1031, EXT).open(w.now)
    other.start_session(w.now)
    out_id = other.outgoing_call(7, 0x4444, w.now)
    ip = accepted(eng.handle(gre_packet(EXT, MASQ, out_id), IN, w.now))
    assert ip.dst == ip_to_int("10.77.0.50")


def test_a_host_cannot_use_up_a_servers_call_ids_over_many_control_connections() -> None:
    """Regression: calls without a GRE entry kept their outside Call IDs without bound (up to
    1024 per control connection), so one host with a few control connections could use up a
    server's Call IDs and every other host's new calls went out untranslated."""
    from vpnmasq.config import PortRange

    eng = make_engine(
        limits=Limits(max_entries_per_host=40), call_id_range=PortRange(1, 1000)
    )
    links = [ControlLink(eng, PRV3, 2000 + k, EXT).open(0.0) for k in range(20)]
    for link in links:
        link.start_session(0.0)
    for link in links:  # 2000 calls: twice the Call IDs there are
        for cid in range(1, 101):
            link.lan_sends(ocrq(cid), 0.0)
    gre = eng.helper_by_name["gre"]
    assert len(gre.calls.pool.used[EXT]) <= (40 - 20) + 20 * 16
    check_invariants(eng)
    victim = ControlLink(eng, PRV1, 3000, EXT).open(0.0)
    victim.start_session(0.0)
    out_id = victim.outgoing_call(0x0707, 0x5555, 0.0)
    assert out_id != 0
    ip = accepted(eng.handle(gre_packet(EXT, MASQ, out_id), IN, 0.0))
    assert (ip.dst, ip.u16(6)) == (PRV1, 0x0707)


def test_rate_limit_applies_per_host_and_refills_with_time() -> None:
    eng = make_engine(limits=Limits(max_new_per_host_per_second=10.0))
    now = 0.0
    ok = [
        eng.handle(build_udp(PRV1, EXT, 2000 + k, 53, b"q"), OUT, now).action is Action.ACCEPT
        for k in range(15)
    ]
    assert ok == [True] * 10 + [False] * 5  # the burst is one second's worth
    # another host has its own bucket
    assert eng.handle(build_udp(PRV2, EXT, 2000, 53, b"q"), OUT, now).action is Action.ACCEPT
    # packets of existing mappings are never limited
    for _ in range(100):
        assert eng.handle(build_udp(PRV1, EXT, 2000, 53, b"q"), OUT, now).action is Action.ACCEPT
    now += 0.5  # five tokens back
    ok = [
        eng.handle(build_udp(PRV1, EXT, 3000 + k, 53, b"q"), OUT, now).action is Action.ACCEPT
        for k in range(7)
    ]
    assert ok == [True] * 5 + [False] * 2
    v = eng.handle(build_udp(PRV1, EXT, 4000, 53, b"q"), OUT, now)
    dropped(v, DropReason.HOST_LIMIT)
    assert "max_new_per_host_per_second" in v.detail
    assert eng.counters["rate_limited"] == 8


def test_rate_limit_is_not_spent_by_outsiders_reaching_a_forward() -> None:
    from vpnmasq.config import Forward

    eng = make_engine(
        limits=Limits(max_new_per_host_per_second=2.0),
        forwards=(Forward("udp", "10.77.0.5", port=5060),),
    )
    for k in range(50):  # fifty outside clients of the LAN server
        v = eng.handle(build_udp(ip_to_int(f"192.0.2.{k + 1}"), MASQ, 5060, 5060, b"x"), IN, 0.0)
        assert v.action is Action.ACCEPT
    # the server's own new outbound flows still have their tokens
    for k in range(2):
        v = eng.handle(build_udp(ip_to_int("10.77.0.5"), EXT, 7000 + k, 53, b"q"), OUT, 0.0)
        assert v.action is Action.ACCEPT


def test_memory_of_the_rate_limiter_is_bounded() -> None:
    from vpnmasq.engine import policy as engine_mod

    eng = make_engine(inside_networks=("10.0.0.0/8",), limits=Limits(max_new_per_host_per_second=5.0))
    cap = 500
    old = engine_mod.MAX_RATE_BUCKETS
    engine_mod.MAX_RATE_BUCKETS = cap
    try:
        for k in range(2000):  # a LAN host forging many inside source addresses
            src = (10 << 24) | (k + 1)
            eng.handle(build_udp(src, EXT, 5000, 53, b"q"), OUT, 0.0)
    finally:
        engine_mod.MAX_RATE_BUCKETS = old
    assert len(eng.rate.buckets) <= cap
    check_invariants(eng)


def test_flood_drops_are_visible_in_counters_and_events() -> None:
    w = flood_world()
    eng = w.eng
    eng.drain_events()
    for k in range(200):
        eng.handle(build_udp(PRV3, EXT2, 10000 + k, 53, b"q"), OUT, w.now)
    events = eng.drain_events()
    from vpnmasq.events import PacketDropped

    limited = [e for e in events if isinstance(e, PacketDropped) and e.reason == "host-limit"]
    assert len(limited) == 200 - 50
    assert "10.77.0.13" in limited[0].detail
    assert eng.counters["drop:host-limit"] == 150 and eng.counters["rate_limited"] == 150
    _ = ATTACKER, PRV1  # roles used by the other tests of this module


def test_refused_packets_to_a_whole_protocol_forward_take_no_port() -> None:
    """Regression: with a forward of all UDP ports and the table (or the server's share)
    full, each refused inbound packet to a new port left a binding behind and its port taken
    for good; an outsider sweeping the alias range could then starve every LAN host of
    ports."""
    from vpnmasq.config import Forward, PortRange

    eng = make_engine(
        limits=Limits(max_entries=200, max_entries_per_host=5),
        forwards=(Forward("udp", "10.77.0.5"),),
        port_range=PortRange(61000, 61099),
    )
    for port in range(61000, 61100):  # the whole alias range, from outside
        eng.handle(build_udp(ATTACKER, MASQ, 4000, port, b"x"), IN, 0.0)
    assert eng.table.per_host[ip_to_int("10.77.0.5")] == 5
    check_invariants(eng)
    assert len(eng.ports[17].used) == 5
    # LAN hosts still get ports from the range: 95 are free
    for k in range(95):
        host = ip_to_int(f"10.77.0.{100 + k // 5}")
        v = eng.handle(build_udp(host, EXT, 5000 + k, 53, b"q"), OUT, 0.0)
        assert 61000 <= accepted(v).u16(0) <= 61099


def test_a_flood_of_first_fragments_does_not_grow_memory() -> None:
    """Regression: every first fragment was remembered for timeouts.fragment (30 s) without
    bound; an outside flood of them grew the engine by ~150 bytes each."""
    from vpnmasq.engine import fragments as engine_mod
    from vpnmasq.packet.ipv4 import build_ipv4

    eng = make_engine()
    old = engine_mod.MAX_FRAGMENT_STATES
    engine_mod.MAX_FRAGMENT_STATES = 1000
    try:
        for i in range(5000):
            src = (192 << 24) | (2 << 8) | (i >> 8 & 0xFF) << 16 | (i & 0xFF)
            p = build_ipv4(src, MASQ, PROTO_ESP, build_esp(i + 1, 1)[:8] + bytes(8),
                           ident=i & 0xFFFF, flags_frag=0x2000)
            assert eng.handle(p, IN, 0.0).action is Action.DROP
        assert len(eng.frags.states) == 1000
        assert eng.counters["fragment_states_evicted"] == 4000
    finally:
        engine_mod.MAX_FRAGMENT_STATES = old
    # a LAN host's fragmented datagram still goes through in order
    big = build_udp(PRV1, EXT, 5353, 53, bytes(range(64)))
    from vpnmasq.packet.ipv4 import build_ipv4 as b4

    first = b4(PRV1, EXT, 17, bytes(big[20:44]), ident=0x77, flags_frag=0x2000)
    second = b4(PRV1, EXT, 17, bytes(big[44:]), ident=0x77, flags_frag=3)
    assert accepted(eng.handle(first, OUT, 0.0)).src == MASQ
    assert accepted(eng.handle(second, OUT, 0.0)).src == MASQ
    check_invariants(eng)
