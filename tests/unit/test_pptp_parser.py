"""The PPTP control parser, bytes in / events and rewrites out: the message table against
RFC 2637 (scapy's PPTP layer as an oracle), framing and validation, the rewrite log keyed by
sequence number, the Call ID pool and the incremental checksum patch."""

from __future__ import annotations

import random
import struct

import pytest
from scapy.layers import pptp as sp

from tests.packets import EXT, MASQ, PRV1, assert_checksums_ok, make_engine
from tests.pptp_wire import (
    ccrq,
    cdn,
    echo_rp,
    echo_rq,
    iccn,
    icrp,
    icrq,
    msg,
    ocrp,
    ocrq,
    sccrp,
    sccrq,
    sli,
    split,
    stopccrp,
    stopccrq,
    u16_at,
    wen,
)
from vpnmasq.conntrack.table import Entry
from vpnmasq.helpers.pptp import (
    CALL_TRANSITIONS,
    MAX_MESSAGE_LEN,
    MESSAGES,
    REWRITE_LOG_MAX,
    SESSION_TRANSITIONS,
    CallIdPool,
    MessageType,
    PptpControl,
    StreamReader,
)
from vpnmasq.packet.ipv4 import IPv4
from vpnmasq.packet.l4 import build_tcp

# --------------------------------------------------------------------------- the table
SCAPY = {
    1: sp.PPTPStartControlConnectionRequest,
    2: sp.PPTPStartControlConnectionReply,
    3: sp.PPTPStopControlConnectionRequest,
    4: sp.PPTPStopControlConnectionReply,
    5: sp.PPTPEchoRequest,
    6: sp.PPTPEchoReply,
    7: sp.PPTPOutgoingCallRequest,
    8: sp.PPTPOutgoingCallReply,
    9: sp.PPTPIncomingCallRequest,
    10: sp.PPTPIncomingCallReply,
    11: sp.PPTPIncomingCallConnected,
    12: sp.PPTPCallClearRequest,
    13: sp.PPTPCallDisconnectNotify,
    14: sp.PPTPWANErrorNotify,
    15: sp.PPTPSetLinkInfo,
}
BUILT = {
    1: sccrq(), 2: sccrp(), 3: stopccrq(), 4: stopccrp(), 5: echo_rq(), 6: echo_rp(),
    7: ocrq(0x1234), 8: ocrp(0x1234, 0x5678), 9: icrq(0x1234), 10: icrp(0x1234, 0x5678),
    11: iccn(0x5678), 12: ccrq(0x1234), 13: cdn(0x1234), 14: wen(0x5678), 15: sli(0x5678),
}


@pytest.mark.parametrize("t", sorted(MESSAGES))
def test_message_lengths_match_rfc_2637_and_the_scapy_oracle(t):
    spec = MESSAGES[t]
    assert len(bytes(SCAPY[t]())) == spec.length
    assert len(BUILT[t]) == spec.length and u16_at(BUILT[t], 0) == spec.length
    assert MessageType(t).name.replace("_", "-").lower() == spec.name.lower()


@pytest.mark.parametrize("t", sorted(MESSAGES))
def test_call_id_offsets_match_the_scapy_oracle(t):
    spec = MESSAGES[t]
    fields = {}
    if spec.own is not None:
        fields["call_id"] = 0x1234
    if spec.peer is not None:
        fields["peer_call_id"] = 0x5678
    raw = bytes(SCAPY[t](**fields))
    if spec.own is not None:
        assert u16_at(raw, spec.own) == 0x1234
    if spec.peer is not None:
        assert u16_at(raw, spec.peer) == 0x5678
    # and our struct-built messages parse in scapy to the same fields
    parsed = sp.PPTP(BUILT[t])
    assert parsed.ctrl_msg_type == t
    for name, value in fields.items():
        assert getattr(parsed, name) == value


def test_who_sends_which_id_per_rfc_2637():
    # PNS -> PAC messages carry the PNS's own ID; PAC -> PNS carry the PAC's own ID or the
    # PNS's ID as "Peer's Call ID"; CDN carries the PAC's own ID (2.13)
    own = {t for t, s in MESSAGES.items() if s.own is not None}
    peer = {t for t, s in MESSAGES.items() if s.peer is not None}
    assert own == {7, 8, 9, 10, 12, 13}
    assert peer == {8, 10, 11, 14, 15}
    assert {t for t, s in MESSAGES.items() if s.sender == "pns"} == {7, 10, 12}
    assert {t for t, s in MESSAGES.items() if s.sender == "pac"} == {8, 9, 11, 13, 14}
    assert MESSAGES[8].result == 16 and MESSAGES[10].result == 16 and MESSAGES[2].result == 14


def test_transition_tables_cover_every_message_once():
    assert set(SESSION_TRANSITIONS).isdisjoint(CALL_TRANSITIONS)
    assert set(SESSION_TRANSITIONS) | set(CALL_TRANSITIONS) | {5, 6} == set(MESSAGES)


# --------------------------------------------------------------------------- reader
class Sink:
    """Maps the LAN host's own Call IDs to ``own_map(value)``; records what it saw."""

    def __init__(self, own_map=lambda v: (v & 0xFF00) | ((v + 1) & 0xFF)):
        self.own_map = own_map
        self.events: list[tuple] = []
        self.problems: list[tuple[str, str]] = []

    def message_begins(self, reader):
        self.events.append(("begin", reader.mtype))

    def field(self, reader, which, value, high_sent):
        self.events.append((which, value))
        if which == "own" and reader.from_lan:
            return self.own_map(value)
        return None

    def message_ready(self, reader):
        self.events.append(("ready", reader.mtype))

    def problem(self, reader, kind, detail):
        self.problems.append((kind, detail))


def run(data: bytes, cuts=(), *, isn: int = 1000, sink=None, reader=None):
    """Feed ``data`` in pieces through a LAN-side reader; return the bytes after rewriting."""
    sink = sink or Sink()
    rd = reader or StreamReader(from_lan=True)
    if not rd.started:
        rd.start(isn)
    out = b""
    seq = rd.next_seq
    for piece in split(data, cuts):
        assert rd.segment(seq, piece, sink)
        buf = bytearray(piece)
        for i, b in rd.rewrites(seq, len(piece)):
            buf[i] = b
        out += bytes(buf)
        seq = (seq + len(piece)) & 0xFFFFFFFF
    return out, sink, rd


STREAM = sccrq() + ocrq(0x1234) + echo_rq() + ocrq(0x12FF) + ccrq(0x1234) + sli(0x55) + icrp(0x0102, 9)
EXPECTED = (
    sccrq() + ocrq(0x1235) + echo_rq() + ocrq(0x1200) + ccrq(0x1235) + sli(0x55) + icrp(0x0103, 9)
)


@pytest.mark.parametrize(
    "cuts",
    [(), tuple(range(1, len(STREAM))), (156 + 13,), (156 + 12, 156 + 14), (3, 157, 400, 401)],
    ids=["whole", "bytewise", "straddle", "around", "odd"],
)
def test_reader_rewrites_do_not_depend_on_segmentation(cuts):
    out, sink, rd = run(STREAM, cuts)
    assert out == EXPECTED
    assert not sink.problems
    assert rd.messages == 7 and rd.pos == 0
    assert [e for e in sink.events if e[0] == "ready"] == [
        ("ready", t) for t in (1, 7, 5, 7, 12, 15, 10)
    ]


def test_reader_reports_the_remote_s_fields_without_rewriting_them():
    sink = Sink()
    rd = StreamReader(from_lan=False)
    out, sink, _ = run(ocrp(0x77, 0x1234) + cdn(0x77), sink=sink, reader=rd)
    assert out == ocrp(0x77, 0x1234) + cdn(0x77)
    assert ("own", 0x77) in sink.events and ("peer", 0x1234) in sink.events


def test_straddled_field_whose_high_byte_would_change_is_reported_not_half_written():
    sink = Sink(own_map=lambda v: v ^ 0x0100)
    out, sink, _ = run(ocrq(0x1234), (13,), sink=sink)
    assert out == ocrq(0x1234)
    assert [k for k, _ in sink.problems] == ["straddle"]
    out, sink, _ = run(ocrq(0x1234), (12,), sink=Sink(own_map=lambda v: v ^ 0x0100))
    assert out == ocrq(0x1334) and not sink.problems


@pytest.mark.parametrize(
    "bad, reason",
    [
        (msg(7, ocrq(1)[12:], magic=0x1A2B3C4E), "magic"),
        (msg(7, ocrq(1)[12:], length=0), "< 12"),
        (msg(7, ocrq(1)[12:], length=MAX_MESSAGE_LEN + 1), f"> {MAX_MESSAGE_LEN}"),
    ],
)
def test_lost_framing_stops_parsing_that_direction(bad, reason):
    out, sink, rd = run(bad + ocrq(0x1234) + ocrq(0x1234), tuple(range(1, 40)))
    assert out == bad + ocrq(0x1234) + ocrq(0x1234)
    assert [k for k, _ in sink.problems] == ["desync"] and reason in sink.problems[0][1]
    assert rd.passive and rd.desync
    assert not [e for e in sink.events if e[0] in ("own", "peer")]


@pytest.mark.parametrize(
    "bad",
    [
        msg(7, b"\0" * 4, length=16),  # shorter than an Outgoing-Call-Request
        msg(16, b"\0" * 20),  # no such control message
        msg(0, b""),
        msg(7, ocrq(1)[12:], ptype=2),  # a management message (none are defined)
    ],
)
def test_bad_message_with_sound_framing_is_skipped_and_the_next_one_parsed(bad):
    out, sink, rd = run(bad + ocrq(0x1234), (5,))
    assert out == bad + ocrq(0x1235)
    assert [k for k, _ in sink.problems] == ["bad-message"]
    assert not rd.passive


def test_longer_than_rfc_message_is_parsed_and_its_tail_skipped():
    padded = msg(7, ocrq(0x1234)[12:] + b"vendor-extra", length=168 + 12)
    out, _, rd = run(padded + ccrq(0x1234))
    assert out == msg(7, ocrq(0x1235)[12:] + b"vendor-extra", length=180) + ccrq(0x1235)
    assert rd.messages == 2


def test_segment_beyond_a_gap_is_refused_and_a_retransmit_replays_the_log():
    rd = StreamReader(from_lan=True)
    rd.start(5000)
    sink = Sink()
    data = ocrq(0x1234)
    assert not rd.segment(5000 + 20, data[20:], sink)  # gap: unconsumed
    assert rd.next_seq == 5000
    assert rd.segment(5000, data[:20], sink)
    assert dict(rd.rewrites(5000, 20)) == {13: 0x35}
    assert rd.segment(5000, data, sink)  # retransmit covering old and new bytes
    assert rd.next_seq == 5000 + 168
    assert dict(rd.rewrites(5000, 168)) == {13: 0x35}
    assert dict(rd.rewrites(5010, 5)) == {3: 0x35}


def test_sequence_numbers_wrap_around():
    isn = 0xFFFFFFFF - 12  # the Call ID lands on both sides of the wrap
    out, sink, rd = run(ocrq(0x1234) + ocrq(0x2233), (7, 14), isn=isn)
    assert out == ocrq(0x1235) + ocrq(0x2234)
    assert rd.next_seq == (isn + 336) & 0xFFFFFFFF
    rd.prune((isn + 14) & 0xFFFFFFFF)
    assert len(rd.log) == 1  # the first ID's byte is acknowledged, the second's is not
    rd.prune((isn + 336) & 0xFFFFFFFF)
    assert not rd.log


def test_rewrite_log_is_bounded():
    data = b"".join(ocrq(i) for i in range(REWRITE_LOG_MAX + 10))
    _, _, rd = run(data)
    assert len(rd.log) == REWRITE_LOG_MAX


# --------------------------------------------------------------------------- Call ID pool
def test_pool_keeps_the_preferred_id_then_its_high_byte_block():
    pool = CallIdPool(1, 65535, random.Random(1))
    assert pool.allocate(EXT, 0x1234) == 0x1234
    again = pool.allocate(EXT, 0x1234)
    assert again != 0x1234 and again >> 8 == 0x12
    assert pool.allocate(EXT + 1, 0x1234) == 0x1234  # per remote
    assert pool.allocate(EXT, 0) >> 8 == 0  # 0 is out of range (1..65535): 1..255


def test_pool_block_exhaustion_falls_back_unless_the_high_byte_is_fixed():
    pool = CallIdPool(1, 65535, random.Random(1))
    for _ in range(256):
        assert pool.allocate(EXT, 0x4400) is not None
    assert pool.allocate(EXT, 0x4400, keep_high=True) is None
    other = pool.allocate(EXT, 0x4400)
    assert other is not None and other >> 8 != 0x44
    pool.release(EXT, 0x4455)
    assert pool.allocate(EXT, 0x4400, keep_high=True) == 0x4455


def test_pool_exhaustion_returns_none():
    pool = CallIdPool(10, 12, random.Random(1))
    assert sorted(pool.allocate(EXT, 10) for _ in range(3)) == [10, 11, 12]
    assert pool.allocate(EXT, 10) is None


# --------------------------------------------------------------------------- checksum patch
@pytest.mark.parametrize("payload_len", [17, 18])
def test_incremental_checksum_patch_handles_odd_offsets_and_the_pad_byte(payload_len):
    eng = make_engine()
    entry = Entry(6, "napt", "tcp_established", PRV1, 40000, EXT, 1723, MASQ, 40000, 0.0)
    ctl = PptpControl(eng, None, entry, 0.0, False)
    pkt = build_tcp(MASQ, EXT, 40000, 1723, bytes(range(payload_len)), seq=100)
    ip = IPv4(bytearray(pkt))
    rd = ctl.lan
    rd.start(100)
    for off in (0, 3, 4, payload_len - 1):  # even, odd, and the zero-padded last byte
        rd.log[(100 + off) & 0xFFFFFFFF] = 0xA0 + off
    ctl._apply(ip, 40, payload_len, 100, rd)
    assert_checksums_ok(ip.buf)
    assert [ip.buf[40 + o] for o in (0, 3, 4, payload_len - 1)] == [
        0xA0, 0xA3, 0xA4, 0xA0 + payload_len - 1
    ]


def test_checksum_patch_with_odd_segment_start():
    # a segment whose first byte is the Call ID's low byte (stream offset 13)
    eng = make_engine()
    entry = Entry(6, "napt", "tcp_established", PRV1, 40000, EXT, 1723, MASQ, 40000, 0.0)
    ctl = PptpControl(eng, None, entry, 0.0, False)
    rd = ctl.lan
    rd.start(0)
    rd.log[13] = 0x99
    pkt = build_tcp(MASQ, EXT, 40000, 1723, ocrq(0x1234)[13:], seq=13)
    ip = IPv4(bytearray(pkt))
    ctl._apply(ip, 40, 168 - 13, 13, rd)
    assert_checksums_ok(ip.buf)
    assert ip.buf[40] == 0x99


def test_header_struct_layout():
    length, ptype, magic, ctype, res = struct.unpack("!HHIHH", ocrq(1)[:12])
    assert (length, ptype, magic, ctype, res) == (168, 1, 0x1A2B3C4D, 7, 0)
