"""Properties of the PPTP ALG and the GRE helper (hypothesis).

* the same control stream gives the same bytes however it is segmented or retransmitted;
* any bytes on TCP 1723 or IP protocol 47 get a verdict (``engine.handle`` never raises);
* no outside Call ID is delivered to two LAN hosts at once;
* every (session state x message) and (call state x message) pair lands in a valid state.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.packets import (
    EXT,
    EXT2,
    IN,
    MASQ,
    OUT,
    PRV1,
    PRV2,
    accepted,
    assert_checksums_ok,
    make_engine,
)
from tests.pptp_wire import (
    ControlLink,
    ccrq,
    cdn,
    echo_rq,
    gre_call_id,
    gre_in,
    gre_out,
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
    tcp_payload,
    u16_at,
    wen,
)
from vpnmasq.config import Timeouts
from vpnmasq.conntrack.table import Entry
from vpnmasq.helpers.pptp import Call, CallState, SessionState
from vpnmasq.packet.ipv4 import build_ipv4, ip_to_int
from vpnmasq.packet.l4 import build_icmp
from vpnmasq.verdict import Action, Verdict

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HELD = (0x0101, 0x0102, 0x01FF, 0x0200)  # held by another client, so the next ones are remapped
CALLS = (0x0101, 0x0102, 0x01FF, 0x0200, 0x0303)
BURST = sccrq() + b"".join(ocrq(c, serial=k) for k, c in enumerate(CALLS)) + echo_rq()
CALL_AT = [156 + 168 * k + 12 for k in range(len(CALLS))]


def _world():
    eng = make_engine(rng_seed=5)
    holder = ControlLink(eng, PRV2, 40000, EXT).open(0.0)
    holder.start_session(0.0)
    for c in HELD:
        holder.outgoing_call(c, 0x100 + (c & 0xFF), 0.0)
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    return eng, link


def _run(cuts_out, cuts_in, resend=()):
    eng, link = _world()
    start = link.lan_seq
    sent = link.lan_sends(BURST, 0.0, cuts_out)
    for a, b in resend:  # retransmits (before the remote acknowledges anything)
        v = link.lan_segment(BURST[a:b], 0.0, seq=start + a)
        assert tcp_payload(v) == sent[a:b]
    outs = [u16_at(sent, off) for off in CALL_AT]
    replies = sccrp() + b"".join(ocrp(0x500 + k, o) for k, o in enumerate(outs))
    got = link.remote_sends(replies, 0.0, cuts_in)
    for k, (inside, outside) in enumerate(zip(CALLS, outs, strict=True)):
        ip = accepted(gre_in(eng, EXT, outside, 0.0))
        assert (ip.dst, gre_call_id(ip)) == (PRV1, inside)
        ip = accepted(gre_out(eng, PRV1, EXT, 0x500 + k, 0.0))
        assert ip.src == MASQ
    return sent, got


REFERENCE = _run((), ())


def _cuts(n):
    return st.lists(st.integers(1, n - 1), max_size=40)


@SETTINGS
@given(
    _cuts(len(BURST)),
    _cuts(156 + 32 * len(CALLS)),
    st.lists(st.tuples(st.integers(0, len(BURST) - 1), st.integers(1, 200)), max_size=5),
)
def test_random_segmentation_and_retransmits_give_the_same_bytes(cuts_out, cuts_in, resend):
    ranges = [(a, min(len(BURST), a + n)) for a, n in resend]
    sent, got = _run(cuts_out, cuts_in, ranges)
    assert (sent, got) == REFERENCE
    ref_sent, ref_got = REFERENCE
    outs = [u16_at(ref_sent, off) for off in CALL_AT]
    assert outs[len(HELD)] == 0x0303  # free: kept
    assert all(o not in HELD and o >> 8 == c >> 8 for o, c in zip(outs, HELD, strict=False))
    assert ref_got == sccrp() + b"".join(ocrp(0x500 + k, c) for k, c in enumerate(CALLS))


# --------------------------------------------------------------------------- never raises
def _verdict_ok(v):
    assert isinstance(v, Verdict)
    if v.action is Action.ACCEPT and v.payload is not None:
        assert_checksums_ok(v.payload)


@SETTINGS
@given(
    st.lists(
        st.tuples(st.booleans(), st.binary(max_size=300), st.integers(-400, 400), st.integers(0, 0x3F)),
        max_size=12,
    )
)
def test_any_bytes_on_tcp_1723_get_a_verdict(segments):
    eng = make_engine()
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    link.start_session(0.0)
    link.outgoing_call(7, 0x70, 0.0)
    now = 0.0
    for from_lan, data, shift, flags in segments:
        now += 0.5
        if from_lan:
            v = link.lan_segment(data, now, seq=link.lan_seq + shift, flags=flags)
            if shift == 0:
                link.lan_seq += len(data)
        else:
            v = link.remote_segment(data, now, seq=link.remote_seq + shift, flags=flags)
            if shift == 0:
                link.remote_seq += len(data)
        _verdict_ok(v)
    eng.handle_timer(now + 10_000.0)  # everything expires cleanly too
    assert len(eng.table) == 0


gre_first_word = st.one_of(
    st.sampled_from([0x3001880B, 0x3081880B, 0x2001880B, 0x2081880B, 0x00000800, 0x3001]),
    st.integers(0, 0xFFFFFFFF),
)


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.booleans(), gre_first_word, st.integers(0, 0xFFFF), st.binary(max_size=40),
            st.sampled_from([EXT, EXT2, ip_to_int("192.0.2.66")]),
        ),
        max_size=15,
    ),
    st.binary(max_size=60),
)
def test_any_bytes_as_gre_get_a_verdict(packets, raw):
    eng = make_engine()
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    link.start_session(0.0)
    outside = link.outgoing_call(7, 0x70, 0.0)
    for outbound, word, cid, tail, remote in packets:
        cid = outside if cid % 3 == 0 else cid
        gre = struct.pack("!IHH", word, 0, cid)[: 4 + len(tail) % 5] + tail
        if outbound:
            v = eng.handle(build_ipv4(PRV1, remote, 47, gre), OUT, 1.0)
        else:
            v = eng.handle(build_ipv4(remote, MASQ, 47, gre), IN, 1.0)
        _verdict_ok(v)
        # the same bytes embedded in an ICMP error
        inner = build_ipv4(MASQ, remote, 47, gre)[:28]
        _verdict_ok(eng.handle(build_icmp(remote, MASQ, 3, 4, 1400, bytes(inner)), IN, 1.0))
    _verdict_ok(eng.handle(build_ipv4(EXT, MASQ, 47, raw), IN, 2.0))
    _verdict_ok(eng.handle(build_ipv4(PRV1, EXT, 47, raw), OUT, 2.0))


# --------------------------------------------------------------------------- no cross-talk
HOSTS = [ip_to_int(f"10.77.0.{30 + i}") for i in range(4)]
SERVERS = [EXT, EXT2]

action = st.one_of(
    st.tuples(st.just("call"), st.integers(0, 3), st.integers(0, 1), st.sampled_from([0, 1, 0x100, 0x1FF])),
    st.tuples(st.just("hangup"), st.integers(0, 3), st.integers(0, 1), st.integers(0, 7)),
    st.tuples(st.just("close"), st.integers(0, 3), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("idle"), st.just(0), st.just(0), st.sampled_from([10, 400, 3000])),
)


def _live_calls(eng, now) -> list[Call]:
    return [e.ext for e in eng.table if e.kind == "gre" and e.expires_at > now and isinstance(e.ext, Call)]


@SETTINGS
@given(st.lists(action, min_size=1, max_size=25), st.lists(st.integers(0, 0x200), max_size=10))
def test_no_call_id_is_delivered_to_two_lan_hosts_at_once(actions, probes):
    eng = make_engine(timeouts=Timeouts(gre=1000.0, pptp_control=2000.0))
    links: dict[tuple[int, int], ControlLink] = {}
    pac_ids = iter(range(0x1000, 0x2000))
    now = 0.0
    for kind, h, s, arg in actions:
        key = (h, s)
        if kind == "idle":
            now += arg
            eng.handle_timer(now)
            continue
        link = links.get(key)
        if kind == "call":
            if link is None or eng.table.get(("o", 6, HOSTS[h], 40000, SERVERS[s], 1723), now) is None:
                link = links[key] = ControlLink(eng, HOSTS[h], 40000, SERVERS[s], lan_isn=int(now)).open(now)
                link.start_session(now)
            sent = link.lan_sends(ocrq(arg), now)
            link.remote_sends(ocrp(next(pac_ids), u16_at(sent, 12)), now)
        elif link is not None and eng.table.get(("o", 6, HOSTS[h], 40000, SERVERS[s], 1723), now):
            if kind == "hangup":
                calls = [c for c in _live_calls(eng, now) if c.control is link_alg(eng, link, now)]
                if calls:
                    c = calls[arg % len(calls)]
                    link.remote_sends(cdn(c.peer_id), now)
            else:
                accepted(link.lan_rst(now))
                del links[key]
        # invariant: every live (server, outside ID) belongs to exactly one call, and
        # inbound GRE for it reaches that call's host with its inside ID
        live = _live_calls(eng, now)
        pairs = [(c.remote_ip, c.outside_id) for c in live]
        assert len(pairs) == len(set(pairs))
        owner = {(c.remote_ip, c.outside_id): c for c in live if c.peer_id is not None}
        for server in SERVERS:
            for cid in {*probes, *(o for (r, o) in owner if r == server)}:
                v = gre_in(eng, server, cid, now)
                c = owner.get((server, cid))
                if c is None:
                    assert v.action is Action.DROP
                else:
                    ip = accepted(v)
                    assert (ip.dst, gre_call_id(ip)) == (c.inside_ip, c.inside_id)


def link_alg(eng, link, now):
    e = eng.table.get(("o", 6, link.lan_ip, link.lan_port, link.remote_ip, link.remote_port), now)
    return e.alg if e is not None else None


# --------------------------------------------------------------------------- state tables
MESSAGES_OF = {
    1: lambda o, p: sccrq(), 2: lambda o, p: sccrp(), 3: lambda o, p: stopccrq(),
    4: lambda o, p: stopccrp(), 5: lambda o, p: echo_rq(),
    7: lambda o, p: ocrq(o), 8: lambda o, p: ocrp(p, o), 9: lambda o, p: icrq(p),
    10: lambda o, p: icrp(o, p), 11: lambda o, p: iccn(o), 12: lambda o, p: ccrq(o),
    13: lambda o, p: cdn(p), 14: lambda o, p: wen(o), 15: lambda o, p: sli(o),
}


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(SessionState)),
    st.sampled_from(list(CallState)),
    st.sampled_from(sorted(MESSAGES_OF)),
    st.booleans(),
)
def test_every_state_and_message_pair_lands_in_a_valid_state(session, call_state, mtype, from_lan):
    eng = make_engine()
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    link.start_session(0.0)
    outside = link.outgoing_call(3, 0x33, 0.0)
    ctl = link_alg(eng, link, 0.0)
    call = ctl.by_inside[3]
    ctl.session = session
    if call_state is CallState.ENDED:
        eng.kind_helpers["gre"].calls.end_call(call, "test")
    else:
        call.state = call_state
    # the LAN side speaks with its own IDs; the remote side with what it knows (outside IDs)
    data = MESSAGES_OF[mtype](3 if from_lan else outside, 0x33)
    if from_lan:
        _verdict_ok(link.lan_segment(data, 1.0))
        link.lan_seq += len(data)
    else:
        _verdict_ok(link.remote_segment(data, 1.0))
        link.remote_seq += len(data)
    assert isinstance(ctl.session, SessionState)
    for c in ctl.by_inside.values():  # indexes only hold live calls with consistent entries
        assert c.state is not CallState.ENDED
        assert ctl.by_outside[c.outside_id] is c
        assert c.entry is None or (c.entry.live and isinstance(c.entry, Entry))
    if call.state is CallState.ENDED:
        assert call not in ctl.by_inside.values()
        assert not call.entry.live
    _verdict_ok(gre_in(eng, EXT, outside, 2.0))
