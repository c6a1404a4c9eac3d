"""The daemon's packet loop (Gateway.on_packets / step) on a fake netlink socket: which
direction each queued packet is translated in, what verdicts go out (rewritten payload and
the ownership mark, in one send per batch), too-big packets, and that a lone packet is
verdicted within the step that received it. No root or kernel needed."""

from __future__ import annotations

import selectors
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.packets import EXT, MASQ, PRV1, build_udp
from tests.unit.test_daemon_unit import config
from tests.unit.test_nfqueue_wire import FakeSock, packet_msg
from vpnmasq import daemon
from vpnmasq.datapath.nfqueue import NF_ACCEPT, NF_DROP, NfQueue
from vpnmasq.packet.ipv4 import IPv4
from vpnmasq.verdict import Direction

WAN, LAN = 3, 2  # ifindexes
POST, PRE = 4, 0  # hooks


class Rig:
    """A Gateway (not started) whose queue reads from a FakeSock."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(socket, "if_nametoindex", lambda name: WAN)
        self.gw = daemon.Gateway(config(tmp_path))
        self.gw.outside_index = WAN
        self.sock = FakeSock()
        self.gw.nfq = NfQueue.over(self.sock)
        self.directions: list[Direction] = []
        handle = self.gw.engine.handle

        def spy(pkt: bytes, direction: Direction, now: float, token: object = None) -> Any:
            self.directions.append(direction)
            return handle(pkt, direction, now, token)

        self.gw.engine.handle = spy  # type: ignore[method-assign,assignment]
        self.pid = 0

    def queue(self, payload: bytes, **kw: Any) -> int:
        self.pid += 1
        self.sock.inbox.append(packet_msg(self.pid, payload, **kw))
        return self.pid

    def run_batch(self, now: float = 100.0) -> list[tuple[int, int, int, int | None, bytes]]:
        """One batch through on_packets + flush; the verdict messages sent, as (type, id,
        verdict, mark, payload), in order."""
        q = self.gw.nfq
        assert q is not None
        before = len(self.sock.sent)
        self.gw.on_packets(q.recv_batch(256), now)
        q.flush()
        return [m for data in self.sock.sent[before:] for m in verdicts(data)]


def verdicts(data: bytes) -> Iterator[tuple[int, int, int, int | None, bytes]]:
    off = 0
    while off < len(data):
        nlen, ntype = struct.unpack_from("=IH", data, off)
        verdict, pid = struct.unpack_from(">II", data, off + 24)
        mark: int | None = None
        payload = b""
        a = off + 32
        while a < off + nlen:
            alen, atype = struct.unpack_from("=HH", data, a)
            if atype == 3:
                (mark,) = struct.unpack_from(">I", data, a + 4)
            elif atype == 10:
                payload = data[a + 4 : a + alen]
            a += (alen + 3) & ~3
        yield ntype & 0xFF, pid, verdict, mark, payload
        off += nlen


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rig:
    return Rig(tmp_path, monkeypatch)


def test_a_batch_is_translated_both_ways_and_verdicted_in_one_send(rig: Rig) -> None:
    mark = rig.gw.config.mark
    out = bytes(build_udp(PRV1, EXT, 40000, 53, b"query"))
    rig.queue(out, hook=POST, indev=LAN, outdev=WAN)
    (sent,) = rig.run_batch()
    typ, pid, verdict, vmark, payload = sent
    assert (typ, pid, verdict, vmark) == (1, 1, NF_ACCEPT, mark)
    ip = IPv4(bytearray(payload))
    assert ip.src == MASQ and ip.dst == EXT
    alias = struct.unpack_from(">H", payload, 20)[0]
    # the reply (PREROUTING on the outside interface), an unsolicited packet (dropped), and
    # another outbound one: one batch, one send
    rig.queue(bytes(build_udp(EXT, MASQ, 53, alias, b"answer")), hook=PRE, indev=WAN, outdev=None)
    rig.queue(bytes(build_udp(EXT, MASQ, 53, 9, b"scan")), hook=PRE, indev=WAN, outdev=None)
    rig.queue(out, hook=POST, indev=LAN, outdev=WAN)
    sends = len(rig.sock.sent)
    back, unsolicited, again = rig.run_batch()
    assert len(rig.sock.sent) == sends + 1
    assert back[:4] == (1, 2, NF_ACCEPT, mark)
    ip = IPv4(bytearray(back[4]))
    assert ip.src == EXT and ip.dst == PRV1 and struct.unpack_from(">H", back[4], 22) == (40000,)
    assert unsolicited[:3] == (1, 3, NF_DROP) and unsolicited[4] == b""
    assert again[:4] == (1, 4, NF_ACCEPT, mark) and again[4] == payload
    assert rig.directions == [
        Direction.OUTBOUND, Direction.INBOUND, Direction.INBOUND, Direction.OUTBOUND,
    ]  # fmt: skip
    assert rig.gw.nfq is not None and rig.gw.nfq.outstanding == 0


def test_prerouting_from_a_lan_interface_is_outbound_and_a_new_outside_index_is_followed(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkt = bytes(build_udp(PRV1, MASQ, 40000, 80, b"hairpin"))
    rig.queue(pkt, hook=PRE, indev=LAN, outdev=None)  # a LAN host to the public address
    rig.run_batch()
    assert rig.directions == [Direction.OUTBOUND]
    # the outside interface came back with another index: the first packet on it says so
    monkeypatch.setattr(socket, "if_nametoindex", lambda name: 7)
    rig.queue(bytes(build_udp(EXT, MASQ, 53, 9, b"x")), hook=PRE, indev=7, outdev=None)
    rig.queue(bytes(build_udp(EXT, MASQ, 53, 9, b"y")), hook=PRE, indev=7, outdev=None)
    rig.run_batch()
    assert rig.directions[1:] == [Direction.INBOUND, Direction.INBOUND]
    assert rig.gw.outside_index == 7


def test_a_packet_cut_by_the_copy_range_is_dropped_untranslated(rig: Rig) -> None:
    big = bytes(build_udp(PRV1, EXT, 40000, 53, b"z" * 100))
    rig.queue(big, hook=POST, indev=LAN, outdev=WAN, orig=70000)
    rig.queue(big, hook=POST, indev=LAN, outdev=WAN)
    cut, whole = rig.run_batch()
    assert cut[:3] == (1, 1, NF_DROP)
    assert whole[:3] == (1, 2, NF_ACCEPT) and whole[4]
    assert rig.directions == [Direction.OUTBOUND]  # the engine never saw the cut one
    assert rig.gw.engine.counters.get("drop:too-big") == 1


def test_a_lone_packet_is_verdicted_in_the_step_that_received_it(rig: Rig) -> None:
    """No waiting for a fuller batch: step() reads what is there, verdicts and flushes."""
    a, b = socket.socketpair()
    try:
        rig.gw.sel.register(a.fileno(), selectors.EVENT_READ, "nfq")
        b.send(b"!")  # the queue's descriptor is readable
        rig.queue(bytes(build_udp(PRV1, EXT, 40000, 53, b"lone")), hook=POST, indev=LAN, outdev=WAN)
        rig.gw.last_addr_check = float("inf")  # no address or local-VPN probing here
        rig.gw.step(None)
        assert [v[:3] for s in rig.sock.sent for v in verdicts(s)] == [(1, 1, NF_ACCEPT)]
        assert rig.gw.queue_batches == 1
    finally:
        a.close()
        b.close()
