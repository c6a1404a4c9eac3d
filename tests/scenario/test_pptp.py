"""PPTP through the gateway, as transcripts on the scenario harness (``tests.transcript.Gw``).

LAN clients (PNS) reach outside servers (PAC); a LAN server is reached through a forward.
Every delivered packet is checked for its IP/TCP checksums (``accepted``).
"""

from __future__ import annotations

import struct

import pytest

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
    build_icmp,
    dropped,
)
from tests.pptp_wire import (
    ControlLink,
    ccrq,
    cdn,
    echo_rp,
    echo_rq,
    gre_call_id,
    gre_in,
    gre_out,
    gre_packet,
    iccn,
    icrp,
    icrq,
    msg,
    ocrp,
    ocrq,
    sccrq,
    sli,
    stopccrp,
    stopccrq,
    tcp_payload,
    u16_at,
    wen,
)
from tests.transcript import Gw
from vpnmasq.config import Forward, Limits, Timeouts
from vpnmasq.events import Notice
from vpnmasq.packet.ipv4 import build_ipv4, ip_to_int
from vpnmasq.verdict import DropReason

LAN_HOSTS = [ip_to_int(f"10.77.0.{20 + i}") for i in range(8)]


def pptp_rows(eng, now):
    return [r for r in eng.snapshot(now) if r.proto == "gre"]


def assert_gre_reaches(eng, remote, outside_id, host, inside_id, now):
    ip = accepted(gre_in(eng, remote, outside_id, now))
    assert (ip.src, ip.dst, gre_call_id(ip)) == (remote, host, inside_id)


def assert_gre_leaves(eng, host, remote, pac_id, now):
    ip = accepted(gre_out(eng, host, remote, pac_id, now))
    assert (ip.src, ip.dst, gre_call_id(ip)) == (MASQ, remote, pac_id)


# ------------------------------------------------------------------ many clients, one server
@pytest.mark.parametrize("clients", [2, 8])
def test_clients_with_the_same_call_id_get_distinct_outside_ids_and_no_crosstalk(clients):
    gw = Gw()
    eng = gw.eng
    calls = []
    for i, host in enumerate(LAN_HOSTS[:clients]):
        link = gw.pptp(host, 40000, EXT)
        link.start_session(gw.now)
        outside = link.outgoing_call(0, 0x4000 + i, gw.now)  # every client uses Call ID 0
        calls.append((host, outside, 0x4000 + i))
        gw.tick(1.0)
    outs = [c[1] for c in calls]
    assert len(set(outs)) == clients
    assert all(o >> 8 == 0 for o in outs)  # the high byte of the inside ID is kept
    for host, outside, pac_id in calls:
        assert_gre_leaves(eng, host, EXT, pac_id, gw.now)
        assert_gre_reaches(eng, EXT, outside, host, 0, gw.now)
    # and again, in reverse order: still no cross-talk
    for host, outside, _ in reversed(calls):
        assert_gre_reaches(eng, EXT, outside, host, 0, gw.now)
    rows = pptp_rows(eng, gw.now)
    assert len(rows) == clients and all(r.detail["call_state"] == "established" for r in rows)


def test_first_client_keeps_its_call_id_when_free():
    gw = Gw()
    eng = gw.eng
    a = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    b = ControlLink(eng, PRV2, 40000, EXT).open(0.0)
    a.start_session(0.0)
    b.start_session(0.0)
    assert a.outgoing_call(0x1234, 0x77, 0.0) == 0x1234
    other = b.outgoing_call(0x1234, 0x78, 0.0)
    assert other != 0x1234 and other >> 8 == 0x12
    # the same Call ID to another server is no conflict at all
    c = ControlLink(eng, PRV3, 40000, EXT2).open(0.0)
    c.start_session(0.0)
    assert c.outgoing_call(0x1234, 0x77, 0.0) == 0x1234


def test_two_calls_on_one_control_connection():
    gw = Gw()
    eng = gw.eng
    a = gw.pptp(PRV1, 40000, EXT)
    b = gw.pptp(PRV2, 40001, EXT)
    a.start_session(gw.now)
    b.start_session(gw.now)
    a1 = a.outgoing_call(1, 0x501, gw.now)
    a2 = a.outgoing_call(2, 0x502, gw.now)
    b1 = b.outgoing_call(1, 0x601, gw.now)
    b2 = b.outgoing_call(2, 0x602, gw.now)
    assert len({a1, a2, b1, b2}) == 4
    for host, outside, inside, pac in (
        (PRV1, a1, 1, 0x501), (PRV1, a2, 2, 0x502), (PRV2, b1, 1, 0x601), (PRV2, b2, 2, 0x602)
    ):
        assert_gre_leaves(eng, host, EXT, pac, gw.now)
        assert_gre_reaches(eng, EXT, outside, host, inside, gw.now)
    ctl = [r for r in eng.snapshot(gw.now) if r.proto == "tcp" and r.inside.startswith("10.77.0.11")]
    assert ctl[0].detail["calls"] == "2"
    # clearing one call leaves the other working
    gw.tick(5)
    assert u16_at(a.lan_sends(ccrq(2), gw.now), 12) == a2
    assert a.remote_sends(cdn(0x502), gw.now) == cdn(0x502)
    dropped(gw.gre_in(EXT, a2), DropReason.GRE_UNKNOWN_CALL)
    assert_gre_reaches(eng, EXT, a1, PRV1, 1, gw.now)


# ------------------------------------------------------------------ segmentation
def _second_client(eng, now):
    """A client that holds Call ID 0x0101 at EXT, so the next one must be remapped."""
    first = ControlLink(eng, PRV1, 40000, EXT).open(now)
    first.start_session(now)
    assert first.outgoing_call(0x0101, 0x900, now) == 0x0101
    link = ControlLink(eng, PRV2, 40000, EXT).open(now)
    link.start_session(now)
    return link


@pytest.mark.parametrize(
    "cuts",
    [
        (),  # one message per segment
        (13,),  # the Call ID straddles: high byte in one segment, low byte in the next
        (12,),  # cut just before the Call ID
        (14,),  # cut just after it
        (1, 2, 3, 9, 11),  # header in pieces, odd offsets (odd-aligned checksum words)
        tuple(range(1, 168)),  # one byte per segment
    ],
    ids=["whole", "straddle", "before", "after", "header-pieces", "bytewise"],
)
def test_split_control_messages_give_the_same_bytes_as_unsplit(cuts):
    gw = Gw()
    eng = gw.eng
    link = _second_client(eng, gw.now)
    sent = link.lan_sends(ocrq(0x0101), gw.now, cuts)
    outside = u16_at(sent, 12)
    assert outside != 0x0101 and outside >> 8 == 0x01
    assert sent == ocrq(outside)
    # the reply's Peer's Call ID (@14) straddles too, and is restored
    rcuts = tuple(c + 2 for c in cuts if c + 2 < 32)
    got = link.remote_sends(ocrp(0x902, outside), gw.now, rcuts)
    assert got == ocrp(0x902, 0x0101)
    assert_gre_reaches(eng, EXT, outside, PRV2, 0x0101, gw.now)
    assert_gre_leaves(eng, PRV2, EXT, 0x902, gw.now)


def test_unsplit_and_split_runs_choose_the_same_outside_id():
    results = set()
    for cuts in ((), (13,), tuple(range(1, 168))):
        gw = Gw(rng_seed=7)
        eng = gw.eng
        link = _second_client(eng, 0.0)
        results.add(link.lan_sends(ocrq(0x0101), 0.0, cuts))
    assert len(results) == 1


def test_coalesced_messages_in_one_segment_are_all_rewritten():
    gw = Gw()
    eng = gw.eng
    link = _second_client(eng, gw.now)
    burst = echo_rq(1) + ocrq(0x0101) + ocrq(0x0102, serial=2) + echo_rq(2)
    sent = link.lan_sends(burst, gw.now)
    o1, o2 = u16_at(sent, 16 + 12), u16_at(sent, 16 + 168 + 12)
    assert o1 != 0x0101 and o2 == 0x0102
    assert sent == echo_rq(1) + ocrq(o1) + ocrq(0x0102, serial=2) + echo_rq(2)
    # both replies in one segment, cut in the middle of the second one's Peer's Call ID
    replies = echo_rp(1) + ocrp(0xA1, o1) + ocrp(0xA2, o2)
    got = link.remote_sends(replies, gw.now, (20 + 32 + 15,))
    assert got == echo_rp(1) + ocrp(0xA1, 0x0101) + ocrp(0xA2, 0x0102)
    assert_gre_reaches(eng, EXT, o1, PRV2, 0x0101, gw.now)
    assert_gre_reaches(eng, EXT, o2, PRV2, 0x0102, gw.now)


def test_retransmitted_segment_gets_identical_rewrite():
    gw = Gw()
    eng = gw.eng
    link = _second_client(eng, gw.now)
    start = link.lan_seq
    data = ocrq(0x0101)
    first = link.lan_sends(data, gw.now, (13,))
    outside = u16_at(first, 12)
    # retransmit the first piece, the second piece, then all of it coalesced
    gw.tick(1.0)
    again = tcp_payload(link.lan_segment(data[:13], gw.now, seq=start))
    again += tcp_payload(link.lan_segment(data[13:], gw.now, seq=start + 13))
    assert again == first
    assert tcp_payload(link.lan_segment(data, gw.now, seq=start)) == first
    # a retransmit overlapping new data: old part replayed, new part parsed
    more = ccrq(0x0101)
    mixed = tcp_payload(link.lan_segment(data[100:] + more, gw.now, seq=start + 100))
    assert mixed == first[100:] + ccrq(outside)
    link.lan_seq = start + len(data) + len(more)
    # the PAC refuses the call (the call ends) before acknowledging the request: a late
    # retransmit still carries the same bytes
    refusal = ocrp(0x902, outside, result=2)
    v = link.remote_segment(refusal, gw.now, ack=start)
    assert tcp_payload(v) == ocrp(0x902, 0x0101, result=2)
    link.remote_seq += len(refusal)
    assert [r.inside for r in pptp_rows(eng, gw.now)] == ["10.77.0.11"]
    assert tcp_payload(link.lan_segment(data, gw.now, seq=start)) == first
    # once acknowledged, the receiver discards copies anyway: the log is pruned
    accepted(link.remote_segment(b"", gw.now))
    ctl = eng.table.get(("o", 6, PRV2, 40000, EXT, 1723), gw.now)
    assert ctl is not None and not ctl.alg.lan.log


def test_out_of_order_control_segment_is_dropped_until_the_gap_is_filled():
    gw = Gw()
    eng = gw.eng
    link = _second_client(eng, 0.0)
    data = ocrq(0x0101)
    start = link.lan_seq
    late = link.lan_segment(data[20:], 0.0, seq=start + 20)  # arrives before its predecessor
    dropped(late, DropReason.PPTP_OUT_OF_ORDER)
    head = tcp_payload(link.lan_segment(data[:20], 0.0, seq=start))
    tail = tcp_payload(link.lan_segment(data[20:], 0.0, seq=start + 20))  # the retransmit
    outside = u16_at(head, 12)
    assert head + tail == ocrq(outside) and outside != 0x0101


# ------------------------------------------------------------------ call endings
def test_call_disconnect_notify_ends_the_call_and_later_gre_is_dropped():
    gw = Gw()
    eng = gw.eng
    link = gw.pptp(PRV1, 40000, EXT)
    link.start_session(gw.now)
    outside = link.outgoing_call(5, 0x333, gw.now)
    assert_gre_reaches(eng, EXT, outside, PRV1, 5, gw.now)
    gw.tick(60)
    # the PAC hangs up: CDN carries the PAC's own Call ID (RFC 2637 2.13), left untouched
    assert link.remote_sends(cdn(0x333), gw.now) == cdn(0x333)
    assert pptp_rows(eng, gw.now) == []
    gw.tick(1)
    dropped(gw.gre_in(EXT, outside), DropReason.GRE_UNKNOWN_CALL)
    dropped(gw.gre_out(PRV1, EXT, 0x333), DropReason.GRE_UNKNOWN_CALL)
    assert eng.counters["drop:gre-unknown-call"] == 2


def test_failed_outgoing_call_reply_ends_the_call():
    gw = Gw()
    eng = gw.eng
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    link.start_session(0.0)
    outside = u16_at(link.lan_sends(ocrq(9), 0.0), 12)
    got = link.remote_sends(ocrp(0, outside, result=3), 0.0)  # Busy
    assert u16_at(got, 14) == 9
    assert pptp_rows(eng, 0.0) == []
    dropped(gre_in(eng, EXT, outside, 0.0), DropReason.GRE_UNKNOWN_CALL)


@pytest.mark.parametrize("how", ["lan-rst", "remote-rst", "lan-fin", "remote-fin", "expiry"])
def test_end_of_the_control_connection_ends_its_calls(how):
    gw = Gw(timeouts=Timeouts(pptp_control=100.0, gre=1000.0))
    eng = gw.eng
    link = gw.pptp(PRV1, 40000, EXT)
    link.start_session(gw.now)
    o1 = link.outgoing_call(1, 0x11, gw.now)
    o2 = link.outgoing_call(2, 0x12, gw.now)
    other = gw.pptp(PRV2, 40000, EXT)
    other.start_session(gw.now)
    o3 = other.outgoing_call(1, 0x13, gw.now)
    gw.tick(50)
    assert_gre_reaches(eng, EXT, o1, PRV1, 1, gw.now)
    if how == "lan-rst":
        accepted(link.lan_rst(gw.now))
    elif how == "remote-rst":
        accepted(link.remote_rst(gw.now))
    elif how == "lan-fin":
        accepted(link.lan_fin(gw.now))
    elif how == "remote-fin":
        accepted(link.remote_fin(gw.now))
    else:
        # GRE keeps flowing, but the control connection idles out: its calls go with it
        for _ in range(3):
            gw.now += 20  # the clock only: no timer runs until the one below
            assert_gre_reaches(eng, EXT, o1, PRV1, 1, gw.now)
            other.lan_sends(echo_rq(), gw.now)  # the other control connection stays alive
        gw.tick(41)
        eng.handle_timer(gw.now)
    for o in (o1, o2):
        dropped(gw.gre_in(EXT, o), DropReason.GRE_UNKNOWN_CALL)
    assert_gre_reaches(eng, EXT, o3, PRV2, 1, gw.now)  # another connection's call lives on
    assert [r.inside for r in pptp_rows(eng, gw.now)] == ["10.77.0.12"]


def test_stop_control_connection_ends_all_calls_and_frees_their_ids():
    gw = Gw()
    link = gw.pptp(PRV1, 40000, EXT)
    link.start_session(gw.now)
    o = link.outgoing_call(0x0101, 0x21, gw.now)
    assert o == 0x0101
    link.lan_sends(stopccrq(), gw.now)
    link.remote_sends(stopccrp(), gw.now)
    dropped(gw.gre_in(EXT, o), DropReason.GRE_UNKNOWN_CALL)
    # the outside ID is free again: another client keeps 0x0101
    b = gw.pptp(PRV2, 40000, EXT)
    b.start_session(gw.now)
    assert b.outgoing_call(0x0101, 0x22, gw.now) == 0x0101


def test_gre_entry_idle_timeout_ends_the_call():
    gw = Gw(timeouts=Timeouts(gre=300.0))
    eng = gw.eng
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    link.start_session(0.0)
    o = link.outgoing_call(3, 0x44, 0.0)
    gw.at(301.0)
    eng.handle_timer(gw.now)
    dropped(gw.gre_in(EXT, o), DropReason.GRE_UNKNOWN_CALL)
    # the control connection notices: a CCRQ for the dead call is passed untranslated
    assert u16_at(link.lan_sends(ccrq(3), gw.now), 12) == 3
    assert eng.counters["pptp_unknown_call_id"] >= 1


# ------------------------------------------------------------------ incoming calls, other messages
def test_incoming_call_from_the_pac_to_a_lan_pns():
    gw = Gw()
    eng = gw.eng
    holder = gw.pptp(PRV2, 40000, EXT)
    holder.start_session(gw.now)
    assert holder.outgoing_call(0x0200, 0x70, gw.now) == 0x0200
    link = gw.pptp(PRV1, 40000, EXT)
    link.start_session(gw.now)
    assert link.remote_sends(icrq(0x71), gw.now) == icrq(0x71)  # PAC's own ID: untouched
    sent = link.lan_sends(icrp(0x0200, 0x71), gw.now)  # the PNS accepts with its own ID 0x200
    outside = u16_at(sent, 12)
    assert outside != 0x0200 and sent == icrp(outside, 0x71)
    assert link.remote_sends(iccn(outside), gw.now) == iccn(0x0200)
    assert_gre_reaches(eng, EXT, outside, PRV1, 0x0200, gw.now)
    assert_gre_leaves(eng, PRV1, EXT, 0x71, gw.now)
    # PAC -> PNS messages carrying the PNS's ID are restored; PNS -> PAC SLI is left alone
    assert link.remote_sends(wen(outside), gw.now) == wen(0x0200)
    assert link.remote_sends(sli(outside), gw.now) == sli(0x0200)
    assert link.lan_sends(sli(0x71), gw.now) == sli(0x71)
    row = next(r for r in pptp_rows(eng, gw.now) if r.inside == "10.77.0.11")
    assert row.detail["call_state"] == "established"


def test_inbound_gre_before_the_call_is_connected_is_dropped():
    gw = Gw()
    eng = gw.eng
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    link.start_session(0.0)
    outside = u16_at(link.lan_sends(ocrq(4), 0.0), 12)
    dropped(gre_in(eng, EXT, outside, 0.0), DropReason.GRE_UNKNOWN_CALL)
    link.remote_sends(ocrp(0x55, outside), 0.0)
    assert_gre_reaches(eng, EXT, outside, PRV1, 4, 0.0)


def test_unknown_inbound_gre_is_dropped_silently_and_counted():
    gw = Gw()
    eng = gw.eng
    for cid in (0, 1, 0xFFFF):
        v = gre_in(eng, ATTACKER, cid, 0.0)
        dropped(v, DropReason.GRE_UNKNOWN_CALL)
    assert eng.counters["drop:gre-unknown-call"] == 3
    dropped(gre_out(eng, PRV1, EXT, 7, 0.0), DropReason.GRE_UNKNOWN_CALL)


def test_gre_v0_is_masqueraded_by_address_one_lan_host_per_remote():
    gw = Gw()
    eng = gw.eng
    v0 = struct.pack("!HH", 0, 0x0800) + b"inner-ip-packet"
    ip = accepted(eng.handle(build_ipv4(PRV1, EXT, 47, v0), OUT, 0.0))
    assert ip.src == MASQ
    back = accepted(eng.handle(build_ipv4(EXT, MASQ, 47, v0), IN, 1.0))
    assert back.dst == PRV1
    dropped(eng.handle(build_ipv4(PRV2, EXT, 47, v0), OUT, 2.0), DropReason.GENERIC_BUSY)
    assert accepted(eng.handle(build_ipv4(PRV2, EXT2, 47, v0), OUT, 2.0)).src == MASQ
    dropped(eng.handle(build_ipv4(ATTACKER, MASQ, 47, v0), IN, 2.0), DropReason.NO_MAPPING)
    bad = struct.pack("!HH", 0x2002, 0x880B) + b"\0" * 8  # "version 2"
    dropped(eng.handle(build_ipv4(PRV1, EXT, 47, bad), OUT, 2.0), DropReason.GRE_NOT_PPTP)


def test_enhanced_gre_with_wrong_protocol_is_not_pptp():
    gw = Gw()
    eng = gw.eng
    bad = struct.pack("!HHHH", 0x3001, 0x0800, 0, 1) + b"\0" * 4
    dropped(eng.handle(build_ipv4(EXT, MASQ, 47, bad), IN, 0.0), DropReason.GRE_NOT_PPTP)


# ------------------------------------------------------------------ LAN server + LAN clients
def _server_gw(*forwards: Forward) -> Gw:
    return Gw(
        forwards=forwards
        or (Forward("tcp", "10.77.0.5", port=1723), Forward("gre", "10.77.0.5"))
    )


def test_lan_pptp_server_reached_from_outside_while_lan_clients_use_an_outside_server():
    gw = _server_gw()
    eng = gw.eng
    # an outside PNS (EXT2) dials in to the forwarded LAN PAC
    srv = ControlLink(eng, SRV_LAN, 1723, EXT2, 50000, lan_opens=False, public_port=1723).open(gw.now)
    srv.start_session(gw.now)
    assert srv.remote_sends(ocrq(7), gw.now) == ocrq(7)  # the remote PNS's own ID: untouched
    reply = srv.lan_sends(ocrp(1, 7), gw.now)  # the LAN PAC answers with its own Call ID 1
    s_out = u16_at(reply, 12)
    assert reply == ocrp(s_out, 7) and s_out == 1  # free for EXT2: kept
    # meanwhile LAN clients call out: one to EXT, one to EXT2 (the same remote!)
    gw.tick(1)
    c1 = gw.pptp(PRV1, 40000, EXT)
    c1.start_session(gw.now)
    o1 = c1.outgoing_call(1, 0x800, gw.now)
    c2 = ControlLink(eng, PRV2, 40000, EXT2, 1723).open(gw.now)
    c2.start_session(gw.now)
    o2 = c2.outgoing_call(1, 0x801, gw.now)
    assert o1 == 1  # another remote: no conflict
    assert o2 != s_out  # EXT2 already knows our Call ID 1 (the LAN server's)
    # GRE both ways for all three calls, no cross-talk
    gw.tick(1)
    assert_gre_reaches(eng, EXT2, s_out, SRV_LAN, 1, gw.now)
    assert_gre_leaves(eng, SRV_LAN, EXT2, 7, gw.now)
    assert_gre_reaches(eng, EXT, o1, PRV1, 1, gw.now)
    assert_gre_leaves(eng, PRV1, EXT, 0x800, gw.now)
    assert_gre_reaches(eng, EXT2, o2, PRV2, 1, gw.now)
    assert_gre_leaves(eng, PRV2, EXT2, 0x801, gw.now)
    # GRE matching no call is not forwarded: the LAN server's calls are all tracked
    dropped(gw.gre_in(EXT2, 0x4242), DropReason.GRE_UNKNOWN_CALL)
    dropped(gw.gre_in(ATTACKER, 1), DropReason.GRE_UNKNOWN_CALL)
    # status: the forwarded server's call shows it is the PAC
    row = next(r for r in pptp_rows(eng, gw.now) if r.inside == "10.77.0.5")
    assert row.detail["lan_role"] == "pac" and row.detail["server"] == "10.77.0.5"
    assert row.detail["pac_call_id"] == "1" and row.detail["peer_call_id"] == "7"
    # the remote PNS clears; the LAN PAC's CDN carries its own ID, masqueraded
    gw.tick(10)
    assert srv.remote_sends(ccrq(7), gw.now) == ccrq(7)
    assert srv.lan_sends(cdn(1), gw.now) == cdn(s_out)
    dropped(gw.gre_in(EXT2, s_out), DropReason.GRE_UNKNOWN_CALL)
    assert_gre_reaches(eng, EXT2, o2, PRV2, 1, gw.now)


def test_lan_server_incoming_call_and_set_link_info_from_the_pns():
    gw = _server_gw()
    eng = gw.eng
    # a LAN client already uses outside ID 0x0300 towards EXT2
    c = gw.pptp(PRV1, 40000, EXT2)
    c.start_session(gw.now)
    assert c.outgoing_call(0x0300, 0x10, gw.now) == 0x0300
    srv = ControlLink(eng, SRV_LAN, 1723, EXT2, 50000, lan_opens=False, public_port=1723).open(gw.now)
    srv.start_session(gw.now)
    sent = srv.lan_sends(icrq(0x0300), gw.now)  # the LAN PAC reports an incoming call
    s_out = u16_at(sent, 12)
    assert s_out != 0x0300 and s_out >> 8 == 0x03 and sent == icrq(s_out)
    assert srv.remote_sends(icrp(0x66, s_out), gw.now) == icrp(0x66, 0x0300)
    assert srv.lan_sends(iccn(0x66), gw.now) == iccn(0x66)  # the PNS's ID: untouched
    assert srv.remote_sends(sli(s_out), gw.now) == sli(0x0300)  # PNS -> PAC: restored
    assert_gre_reaches(eng, EXT2, s_out, SRV_LAN, 0x0300, gw.now)
    assert_gre_leaves(eng, SRV_LAN, EXT2, 0x66, gw.now)
    assert_gre_reaches(eng, EXT2, 0x0300, PRV1, 0x0300, gw.now)


def test_gre_forward_alone_delivers_by_address_but_a_client_call_wins():
    gw = _server_gw(Forward("gre", "10.77.0.5"))
    eng = gw.eng
    link = gw.pptp(PRV1, 40000, EXT)
    link.start_session(gw.now)
    o = link.outgoing_call(9, 0x99, gw.now)
    assert_gre_reaches(eng, EXT, o, PRV1, 9, gw.now)  # the client's call wins
    ip = accepted(gw.gre_in(EXT, 0x1234))  # anything else: the forward, untouched
    assert (ip.dst, gre_call_id(ip)) == (SRV_LAN, 0x1234)
    ip = accepted(gw.gre_out(SRV_LAN, EXT, 0x4321))
    assert (ip.src, gre_call_id(ip)) == (MASQ, 0x4321)
    row = next(r for r in eng.snapshot(gw.now) if r.inside == "10.77.0.5")
    assert row.detail == {"mode": "address-only", "gre": "forward"}


# ------------------------------------------------------------------ ICMP errors about GRE
def _frag_needed_about(eng, pac_id, now, mtu=1400):
    inner = gre_packet(MASQ, EXT, pac_id, b"\xff\x03" + b"x" * 40)
    router = ip_to_int("192.0.2.1")
    return eng.handle(build_icmp(router, MASQ, 3, 4, mtu, bytes(inner[:28])), IN, now)


def test_icmp_frag_needed_embedding_gre_reaches_the_right_host():
    gw = Gw()
    eng = gw.eng
    for host, pac in ((PRV1, 0x100), (PRV2, 0x101)):
        link = gw.pptp(host, 40000, EXT)
        link.start_session(gw.now)
        link.outgoing_call(0, pac, gw.now)
    for host, pac in ((PRV1, 0x100), (PRV2, 0x101)):
        ip = accepted(_frag_needed_about(eng, pac, gw.now))
        assert ip.dst == host
        icmp = bytes(ip.payload())
        inner_src = int.from_bytes(icmp[8 + 12 : 8 + 16], "big")
        assert inner_src == host
        assert u16_at(icmp, 8 + 20 + 6) == pac  # the embedded Call ID is the PAC's
    dropped(_frag_needed_about(eng, 0x555, gw.now), DropReason.ICMP_NO_MAPPING)


def test_icmp_error_about_gre_with_ambiguous_call_is_not_delivered():
    gw = Gw()
    eng = gw.eng
    for host in (PRV1, PRV2):  # a PAC that reuses its Call ID per control connection
        link = ControlLink(eng, host, 40000, EXT).open(0.0)
        link.start_session(0.0)
        link.outgoing_call(0, 0x100, 0.0)
    dropped(_frag_needed_about(eng, 0x100, 0.0), DropReason.ICMP_NO_MAPPING)
    assert eng.counters["gre_icmp_ambiguous"] == 1


# ------------------------------------------------------------------ hostile input
HOSTILE = {
    "bad-magic": (msg(7, ocrq(1)[12:], magic=0xDEADBEEF), "pptp_desync"),
    "length-0": (msg(7, ocrq(1)[12:], length=0), "pptp_desync"),
    "length-short-of-header": (msg(7, ocrq(1)[12:], length=11), "pptp_desync"),
    "length-huge": (msg(7, ocrq(1)[12:], length=0xFFFF), "pptp_desync"),
    "length-short-for-type": (msg(7, ocrq(1)[12:16], length=16), "pptp_bad_message"),
    "unknown-type": (msg(99, b"\0" * 8), "pptp_bad_message"),
    "management-type": (msg(1, b"\0" * 144, ptype=2), "pptp_bad_message"),
    "zero-type": (msg(0, b"\0" * 4), "pptp_bad_message"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_control_messages_are_counted_passed_and_never_crash(name):
    data, counter = HOSTILE[name]
    gw = Gw()
    eng = gw.eng
    holder = ControlLink(eng, PRV2, 40000, EXT).open(0.0)
    holder.start_session(0.0)
    holder.outgoing_call(0x0101, 0x1, 0.0)
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    link.start_session(0.0)
    assert link.lan_sends(data, 0.0, (5,)) == data  # passed through untouched
    assert eng.counters[counter] == 1
    assert any(isinstance(e, Notice) and e.topic == "pptp" for e in eng.drain_events())
    after = link.lan_sends(ocrq(0x0101), 0.0)
    if counter == "pptp_desync":  # framing lost: the rest of the stream passes unparsed
        assert after == ocrq(0x0101)
        assert link.lan_sends(ocrq(0x0101), 0.0) == ocrq(0x0101)
        ctl = next(r for r in eng.snapshot(0.0) if r.inside == "10.77.0.11:40000")
        assert "desync_lan" in ctl.detail
    else:  # framing intact: the next message is still translated
        assert u16_at(after, 12) != 0x0101
    # the remote direction is unaffected either way, and nothing else broke
    assert link.remote_sends(echo_rq(), 0.0) == echo_rq()
    assert_gre_reaches(eng, EXT, 0x0101, PRV2, 0x0101, 0.0)


def test_garbage_on_a_pptp_control_stream_from_the_remote():
    gw = Gw()
    eng = gw.eng
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    junk = bytes(range(256)) * 3
    assert link.remote_sends(junk, 0.0, (100, 101, 513)) == junk
    assert eng.counters["pptp_desync"] == 1
    assert link.lan_sends(sccrq(), 0.0) == sccrq()  # the other direction still parses
    assert eng.counters["pptp_messages"] == 1


def test_a_message_trickling_in_over_time_is_translated_when_complete():
    gw = Gw()
    eng = gw.eng
    link = _second_client(eng, gw.now)
    data = ocrq(0x0101)
    got = b""
    for piece in (data[:7], data[7:13], data[13:90], data[90:]):
        gw.tick(0.2)  # delayed ACKs, Nagle: the PNS's request arrives in dribs
        got += link.lan_sends(piece, gw.now)
    outside = u16_at(got, 12)
    assert got == ocrq(outside) and outside not in (0x0101,)
    assert link.remote_sends(ocrp(0x77, outside), gw.now) == ocrp(0x77, 0x0101)


def test_midstream_pickup_at_a_message_boundary_still_translates():
    # the gateway restarted: no SYN seen, the first segment starts a message
    gw = Gw()
    eng = gw.eng
    link = ControlLink(eng, PRV1, 40000, EXT)
    sent = tcp_payload(link.lan_segment(ocrq(3), 0.0))
    link.public_port = accepted(link.lan_segment(b"", 0.0)).u16(0)
    link.lan_seq += 168
    assert sent == ocrq(3)  # free: kept
    assert link.remote_sends(ocrp(0x31, 3), 0.0) == ocrp(0x31, 3)
    assert_gre_reaches(eng, EXT, 3, PRV1, 3, 0.0)
    assert eng.counters["pptp_midstream_pickup"] == 2  # once per direction


def test_without_the_gre_helper_control_messages_pass_untranslated():
    gw = Gw(helpers=("pptp",))
    eng = gw.eng
    a = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    a.start_session(0.0)
    assert a.lan_sends(ocrq(0x0101), 0.0) == ocrq(0x0101)
    notices = [e for e in eng.drain_events() if isinstance(e, Notice)]
    assert any("without the gre helper" in n.message for n in notices)


def test_table_full_call_keeps_its_outside_id_but_has_no_gre():
    gw = Gw(limits=Limits(max_entries=2))
    eng = gw.eng
    a = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    a.start_session(0.0)
    oa = a.outgoing_call(0x0101, 0x11, 0.0)  # the second table entry: fits
    b = ControlLink(eng, PRV2, 40000, EXT)
    b.public_port = 40000
    dropped(b.lan_segment(b"", 0.0, flags=0x02), DropReason.TABLE_FULL)  # no room at all
    sent = a.lan_sends(ocrq(0x0102), 0.0)  # a second call: no room for its GRE entry
    ob = u16_at(sent, 12)
    assert ob not in (oa,) and eng.counters["pptp_call_without_gre"] == 1
    a.remote_sends(ocrp(0x12, ob), 0.0)
    dropped(gre_in(eng, EXT, ob, 0.0), DropReason.GRE_UNKNOWN_CALL)
    assert_gre_reaches(eng, EXT, oa, PRV1, 0x0101, 0.0)
    ctl = eng.table.get(("o", 6, PRV1, 40000, EXT, 1723), 0.0)
    assert ctl.alg.detail(ctl, 0.0)["calls"] == "2"
    assert eng.kind_helpers["gre"].calls.pool.in_use(EXT, ob)
    a.remote_sends(cdn(0x12), 0.0)  # the call ends: its ID is free again
    assert not eng.kind_helpers["gre"].calls.pool.in_use(EXT, ob)
