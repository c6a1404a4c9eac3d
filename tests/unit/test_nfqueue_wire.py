"""NfQueue's receive loop and verdict writer on a fake netlink socket (no kernel needed).

The receive loop decodes datagrams of a learnt layout with one struct; every packet it
returns must equal what the generic attribute walk makes of the same bytes. ``flush`` writes
verdicts straight into a preallocated buffer; the bytes it sends must equal the reference
encoder (``_encode``) applied to ``plan_verdicts``, split at the send limit, and a rejected
send must be retried message by message.
"""

from __future__ import annotations

import errno
import random
import socket
import struct

import pytest

from vpnmasq.datapath import nfqueue as nq
from vpnmasq.datapath.nfqueue import (
    NF_ACCEPT,
    NF_DROP,
    NLMSG_ERROR,
    NfQueue,
    QueuedPacket,
    plan_verdicts,
)

MARK = 0x564D


def nla(t: int, d: bytes) -> bytes:
    n = 4 + len(d)
    return struct.pack("=HH", n, t) + d + b"\0" * (-n & 3)


def packet_msg(
    pid: int,
    payload: bytes,
    *,
    hook: int = 4,
    mark: int | None = None,
    indev: int | None = 2,
    outdev: int | None = 3,
    orig: int | None = None,
    skb_info: int | None = None,
    extra: bool = False,
) -> bytes:
    """One NFQNL_MSG_PACKET datagram, attributes in the kernel's order, payload last."""
    a = nla(1, struct.pack(">IHB", pid, 0x0800, hook) + b"\0")
    if mark is not None:
        a += nla(3, struct.pack(">I", mark))
    if indev is not None:
        a += nla(5, struct.pack(">I", indev))
    if outdev is not None:
        a += nla(6, struct.pack(">I", outdev))
    if extra:
        a += nla(11, b"\x01" * 20)  # NFQA_CT: not decoded, skipped
    if orig is not None:
        a += nla(13, struct.pack(">I", orig))  # NFQA_CAP_LEN: the original length
    if skb_info is not None:
        a += nla(14, struct.pack(">I", skb_info))
    a += struct.pack("=HH", 4 + len(payload), 10) + payload  # the kernel does not pad it
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(0)) + a
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | 0, 0, 0, 0) + body


def error_msg(err: int, seq: int) -> bytes:
    return struct.pack("=IHHIIi", 36, NLMSG_ERROR, 0, seq, 0, -err) + b"\0" * 16


class FakeSock:
    """Hands out prepared datagrams, then EAGAIN; records what is sent."""

    def __init__(self) -> None:
        self.inbox: list[bytes] = []
        self.sent: list[bytes] = []
        self.fail_above: int | None = None  # send() of more bytes than this: ENOMEM

    def recv_into(self, buf: bytearray, n: int, flags: int = 0) -> int:
        if not self.inbox:
            raise BlockingIOError(errno.EAGAIN, "empty")
        d = self.inbox.pop(0)
        buf[: len(d)] = d
        return len(d)

    def send(self, data: bytes | memoryview) -> int:
        data = bytes(data)
        if self.fail_above is not None and len(data) > self.fail_above:
            raise OSError(errno.ENOMEM, "too much")
        self.sent.append(data)
        return len(data)

    def fileno(self) -> int:
        return -1


def reference(q: NfQueue, data: bytes) -> QueuedPacket | None:
    """The generic walk over one packet message (the oracle for the fast path)."""
    buf = bytearray(len(data) + 16)
    buf[: len(data)] = data
    saved = q._buf, q._view
    q._buf, q._view = buf, memoryview(buf)
    try:
        return q._parse_packet(20, len(data))
    finally:
        q._buf, q._view = saved


def test_fast_path_decodes_like_the_generic_walk_and_follows_layout_changes() -> None:
    rng = random.Random(6)
    sock = FakeSock()
    q = NfQueue.over(sock)
    variants = [
        {},
        {"mark": 7},
        {"hook": 0, "outdev": None, "indev": 3},
        {"orig": 70000, "extra": True},
        {"skb_info": 1, "mark": 0xFFFFFFFF},
        {"indev": None},
    ]
    msgs = []
    for pid in range(1, 400):
        kw = variants[rng.randrange(len(variants))] if rng.random() < 0.3 else variants[0]
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([1, 20, 63, 64, 1400])))
        msgs.append(packet_msg(pid, payload, **kw))  # type: ignore[arg-type]
    sock.inbox = list(msgs)
    got = q.recv_batch(1000)
    assert [p.packet_id for p in got] == list(range(1, 400))
    for data, pkt in zip(msgs, got, strict=True):
        assert pkt == reference(q, data)
        assert type(pkt) is QueuedPacket
    # most were decoded by the learnt layout (its cache knows their lengths)
    assert q._layout is not None and q._layout.expected
    truncated = [p for p in got if p.truncated]
    assert truncated and all(p.orig_len == 70000 for p in truncated)
    assert q.counters.received == 399 and q.counters.truncated == len(truncated)
    assert q.outstanding == 399


def test_datagrams_outside_the_layout_take_the_generic_walk() -> None:
    sock = FakeSock()
    q = NfQueue.over(sock)
    first = packet_msg(1, b"a" * 30)
    cut = packet_msg(2, b"b" * 30)[:-5]  # message shorter than its nlmsg_len says
    two = packet_msg(3, b"c" * 30)
    two += b"\0" * (-len(two) & 3) + packet_msg(4, b"d" * 30)  # two in one datagram
    padded = packet_msg(5, b"e" * 30)  # nlmsg_len covers trailing bytes: payload not last
    padded = struct.pack("=I", len(padded) + 4) + padded[4:] + b"\0" * 4
    # cut by the copy range: one more attribute, and longer than any payload attribute of
    # the learnt layout could be
    big = packet_msg(7, b"g" * nq.MAX_COPY_RANGE, orig=65535)
    sock.inbox = [first, cut, error_msg(errno.EINVAL, 77), two, padded, packet_msg(6, b"f"), big]
    got = q.recv_batch()
    assert [(p.packet_id, p.payload[:3]) for p in got] == [
        (1, b"aaa"), (3, b"ccc"), (4, b"ddd"), (5, b"eee"), (6, b"f"), (7, b"ggg"),
    ]  # fmt: skip
    assert got[-1].truncated and got[-1].orig_len == 65535
    assert q.counters.recv_errors == 1  # the cut one
    assert q.counters.send_errors == 1 and q.last_error == (errno.EINVAL, 77)


def test_recv_batch_stops_at_max_packets_and_keeps_the_rest_queued() -> None:
    sock = FakeSock()
    q = NfQueue.over(sock)
    sock.inbox = [packet_msg(i, b"x" * 40) for i in range(1, 11)]
    assert [p.packet_id for p in q.recv_batch(4)] == [1, 2, 3, 4]
    assert [p.packet_id for p in q.recv_batch(100)] == list(range(5, 11))
    assert q.recv_batch() == []


def _verdicts(q: NfQueue, sock: FakeSock, rng: random.Random, n: int) -> None:
    """Receive ``n`` packets and give each a random verdict (some held back)."""
    base = q.counters.received
    sock.inbox = [packet_msg(base + i + 1, b"p" * 20) for i in range(n)]
    for p in q.recv_batch(n):
        r = rng.random()
        if r < 0.3:
            size = rng.choice([0, 1, 2, 3, 19, 64, 1400, 9000])
            payload = bytes(rng.randrange(256) for _ in range(size))
            q.accept(p.packet_id, payload, rng.choice([None, MARK]))
        elif r < 0.6:
            q.accept(p.packet_id, None, rng.choice([None, MARK, MARK]))
        elif r < 0.9:
            q.drop(p.packet_id)
        # else: held (no verdict yet)


@pytest.mark.parametrize("seed", range(8))
def test_flush_sends_what_the_reference_encoder_encodes(seed: int) -> None:
    rng = random.Random(seed)
    sock = FakeSock()
    q = NfQueue.over(sock, queue_num=3, send_limit=rng.choice([300, 4096, 1 << 18]))
    ref = NfQueue.over(FakeSock(), queue_num=3)
    for _round in range(4):
        _verdicts(q, sock, rng, rng.randrange(1, 120))
        pending, outstanding = dict(q._pending), list(q._outstanding)
        held = [pid for pid in outstanding if pid not in pending]
        ref._seq = q._seq
        expect = b"".join(ref._encode(m) for m in plan_verdicts(pending, outstanding))
        sent_before = len(sock.sent)
        assert q.flush() == len(pending)
        chunks = sock.sent[sent_before:]
        assert b"".join(chunks) == expect
        # each send fits the limit, or is one message that alone exceeds it
        assert all(
            len(c) <= q._send_limit or struct.unpack_from("=I", c)[0] == len(c) for c in chunks
        )
        assert list(q._outstanding) == held and q.pending == 0
    c = q.counters
    assert c.sends == len(sock.sent) and c.send_errors == 0
    assert c.accepted + c.dropped + q.outstanding == c.received


def test_a_rejected_send_is_retried_message_by_message() -> None:
    sock = FakeSock()
    q = NfQueue.over(sock)
    sock.inbox = [packet_msg(i, b"x" * 20) for i in range(1, 7)]
    pkts = q.recv_batch()
    q.accept(1, b"y" * 100, MARK)
    q.accept(2, b"z" * 101, MARK)
    q.drop(3)
    for p in pkts[3:]:
        q.accept(p.packet_id, None, MARK)  # 4..6: one batch message
    sock.fail_above = 200  # the whole buffer is refused, each message alone fits
    assert q.flush() == 6
    assert [struct.unpack_from("=IH", m) for m in sock.sent] == [
        (144, (3 << 8) | 1), (148, (3 << 8) | 1), (32, (3 << 8) | 1), (40, (3 << 8) | 3),
    ]  # fmt: skip
    assert struct.unpack_from(">II", sock.sent[3], 24) == (NF_ACCEPT, 6)
    c = q.counters
    assert (c.accepted, c.dropped, c.verdict_msgs, c.batch_msgs) == (5, 1, 3, 1)
    assert c.send_errors == 1 and c.sends == 4


def test_a_single_rejected_message_is_counted_once() -> None:
    sock = FakeSock()
    q = NfQueue.over(sock)
    sock.inbox = [packet_msg(1, b"x" * 20)]
    q.recv_batch()
    q.accept(1, b"y" * 300, None)
    sock.fail_above = 100
    assert q.flush() == 1
    assert sock.sent == [] and q.counters.send_errors == 1 and q.counters.accepted == 0


def test_accept_still_refuses_what_the_kernel_cannot_take() -> None:
    sock = FakeSock()
    q = NfQueue.over(sock)
    sock.inbox = [packet_msg(1, b"x" * 20, orig=70000), packet_msg(2, b"x" * 20)]
    q.recv_batch()
    with pytest.raises(ValueError, match="truncated"):
        q.accept(1, b"new")
    q.accept(1)  # unchanged is fine
    with pytest.raises(ValueError, match="already has a verdict"):
        q.accept(1)
    with pytest.raises(ValueError, match="not waiting"):
        q.drop(99)
    with pytest.raises(ValueError, match="exceeds"):
        q.accept(2, b"\0" * (nq.MAX_COPY_RANGE + 1))
    with pytest.raises(ValueError, match="mark out of range"):
        q.accept(2, None, 1 << 32)
    q.accept(2, b"ba", MARK)
    assert q._pending[2] == (NF_ACCEPT, MARK, b"ba")
    assert q.flush() == 2 and q.counters.accepted == 2 and NF_DROP == 0
