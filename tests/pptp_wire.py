"""PPTP test vocabulary: RFC 2637 control messages built with struct, a TCP control link
driven through the engine on a manual clock, and GRE packet helpers.

Message layouts follow RFC 2637 section 2 (lengths: SCCRQ/SCCRP 156, StopCCRQ/RP 16,
Echo 16/20, OCRQ 168, OCRP 32, ICRQ 220, ICRP 24, ICCN 28, CCRQ 16, CDN 148, WEN 40, SLI 24).
"""

from __future__ import annotations

import struct

from tests.packets import IN, MASQ, OUT, accepted
from vpnmasq.engine import Engine
from vpnmasq.packet.ipv4 import IPv4, build_ipv4
from vpnmasq.packet.l4 import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, build_gre_v1, build_tcp
from vpnmasq.verdict import Verdict

MAGIC = 0x1A2B3C4D


def msg(ctype: int, body: bytes, *, length: int | None = None, magic: int = MAGIC, ptype: int = 1) -> bytes:
    n = 12 + len(body) if length is None else length
    return struct.pack("!HHIHH", n, ptype, magic, ctype, 0) + body


def sccrq() -> bytes:
    body = struct.pack("!HHIIHH", 0x0100, 0, 1, 1, 0, 1) + b"client".ljust(64, b"\0") + b"v".ljust(64, b"\0")
    return msg(1, body)


def sccrp(result: int = 1) -> bytes:
    body = struct.pack("!HBBIIHH", 0x0100, result, 0, 1, 1, 0, 1) + b"server".ljust(64, b"\0") + b"v".ljust(64, b"\0")
    return msg(2, body)


def stopccrq() -> bytes:
    return msg(3, struct.pack("!BBH", 1, 0, 0))


def stopccrp(result: int = 1) -> bytes:
    return msg(4, struct.pack("!BBH", result, 0, 0))


def echo_rq(ident: int = 7) -> bytes:
    return msg(5, struct.pack("!I", ident))


def echo_rp(ident: int = 7) -> bytes:
    return msg(6, struct.pack("!IBBH", ident, 1, 0, 0))


def ocrq(call_id: int, serial: int = 1) -> bytes:
    body = struct.pack("!HHIIIIHHHH", call_id, serial, 300, 100000000, 3, 3, 64, 0, 0, 0)
    return msg(7, body + b"\0" * 64 + b"\0" * 64)


def ocrp(call_id: int, peer_call_id: int, result: int = 1) -> bytes:
    body = struct.pack("!HHBBHIHHI", call_id, peer_call_id, result, 0, 0, 100000000, 64, 0, 0)
    return msg(8, body)


def icrq(call_id: int, serial: int = 1) -> bytes:
    body = struct.pack("!HHIIHH", call_id, serial, 1, 0, 0, 0)
    return msg(9, body + b"\0" * 192)


def icrp(call_id: int, peer_call_id: int, result: int = 1) -> bytes:
    return msg(10, struct.pack("!HHBBHHH", call_id, peer_call_id, result, 0, 64, 0, 0))


def iccn(peer_call_id: int) -> bytes:
    return msg(11, struct.pack("!HHIHHI", peer_call_id, 0, 100000000, 64, 0, 3))


def ccrq(call_id: int) -> bytes:
    return msg(12, struct.pack("!HH", call_id, 0))


def cdn(call_id: int, result: int = 3) -> bytes:
    return msg(13, struct.pack("!HBBHH", call_id, result, 0, 0, 0) + b"\0" * 128)


def wen(peer_call_id: int) -> bytes:
    return msg(14, struct.pack("!HHIIIIII", peer_call_id, 0, 0, 0, 0, 0, 0, 0))


def sli(peer_call_id: int) -> bytes:
    return msg(15, struct.pack("!HHII", peer_call_id, 0, 0xFFFFFFFF, 0xFFFFFFFF))


def u16_at(data: bytes, off: int) -> int:
    return int(struct.unpack_from("!H", data, off)[0])


def tcp_payload(v: Verdict) -> bytes:
    ip = accepted(v)  # also checks the IP and TCP checksums
    seg = bytes(ip.payload())
    return seg[(seg[12] >> 4) * 4 :]


def split(data: bytes, cuts: tuple[int, ...] | list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, deduplicated, empty pieces dropped)."""
    pts = sorted({c for c in cuts if 0 < c < len(data)})
    out, prev = [], 0
    for p in [*pts, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


class ControlLink:
    """One TCP connection through the engine between a LAN end and a remote end.

    ``lan_opens`` True: a LAN client connects to ``remote``:1723 (PPTP client inside).
    False: the remote connects to the public address (a forwarded LAN server).
    ``lan_sends`` / ``remote_sends`` send data cut at ``cuts`` and return what the other
    end receives (every segment accepted with good checksums and the right addresses).
    """

    def __init__(
        self,
        eng: Engine,
        lan_ip: int,
        lan_port: int,
        remote_ip: int,
        remote_port: int = 1723,
        *,
        lan_opens: bool = True,
        public_port: int | None = None,
        lan_isn: int = 1000,
        remote_isn: int = 500000,
    ) -> None:
        self.eng = eng
        self.lan_ip, self.lan_port = lan_ip, lan_port
        self.remote_ip, self.remote_port = remote_ip, remote_port
        self.lan_opens = lan_opens
        self.public_port = public_port if public_port is not None else lan_port
        self.lan_seq = lan_isn
        self.remote_seq = remote_isn

    # --- raw segments -------------------------------------------------------------------
    def lan_segment(
        self, payload: bytes, now: float, *, seq: int | None = None, flags: int = TCP_ACK,
        ack: int | None = None,
    ) -> Verdict:
        s = self.lan_seq if seq is None else seq
        a = self.remote_seq if ack is None else ack
        pkt = build_tcp(
            self.lan_ip, self.remote_ip, self.lan_port, self.remote_port, payload,
            flags=flags, seq=s & 0xFFFFFFFF, ack=a & 0xFFFFFFFF,
        )
        return self.eng.handle(pkt, OUT, now)

    def remote_segment(
        self, payload: bytes, now: float, *, seq: int | None = None, flags: int = TCP_ACK,
        ack: int | None = None,
    ) -> Verdict:
        s = self.remote_seq if seq is None else seq
        a = self.lan_seq if ack is None else ack
        pkt = build_tcp(
            self.remote_ip, MASQ, self.remote_port, self.public_port, payload,
            flags=flags, seq=s & 0xFFFFFFFF, ack=a & 0xFFFFFFFF,
        )
        return self.eng.handle(pkt, IN, now)

    def _check_out(self, v: Verdict) -> IPv4:
        ip = accepted(v)
        assert (ip.src, ip.dst) == (MASQ, self.remote_ip)
        assert (ip.u16(0), ip.u16(2)) == (self.public_port, self.remote_port)
        return ip

    def _check_in(self, v: Verdict) -> IPv4:
        ip = accepted(v)
        assert (ip.src, ip.dst) == (self.remote_ip, self.lan_ip)
        assert (ip.u16(0), ip.u16(2)) == (self.remote_port, self.lan_port)
        return ip

    # --- connection ---------------------------------------------------------------------
    def open(self, now: float) -> ControlLink:
        if self.lan_opens:
            v = self.lan_segment(b"", now, flags=TCP_SYN)
            ip = accepted(v)
            self.public_port = ip.u16(0)
            self._check_out(v)
            self.lan_seq += 1
            self._check_in(self.remote_segment(b"", now, flags=TCP_SYN | TCP_ACK))
            self.remote_seq += 1
            self._check_out(self.lan_segment(b"", now))
        else:
            self._check_in(self.remote_segment(b"", now, flags=TCP_SYN))
            self.remote_seq += 1
            self._check_out(self.lan_segment(b"", now, flags=TCP_SYN | TCP_ACK))
            self.lan_seq += 1
            self._check_in(self.remote_segment(b"", now))
        return self

    def lan_sends(self, data: bytes, now: float, cuts: tuple[int, ...] | list[int] = ()) -> bytes:
        got = b""
        for piece in split(data, cuts):
            v = self.lan_segment(piece, now)
            self._check_out(v)
            got += tcp_payload(v)
            self.lan_seq += len(piece)
        return got

    def remote_sends(self, data: bytes, now: float, cuts: tuple[int, ...] | list[int] = ()) -> bytes:
        got = b""
        for piece in split(data, cuts):
            v = self.remote_segment(piece, now)
            self._check_in(v)
            got += tcp_payload(v)
            self.remote_seq += len(piece)
        return got

    def lan_fin(self, now: float) -> Verdict:
        v = self.lan_segment(b"", now, flags=TCP_FIN | TCP_ACK)
        self.lan_seq += 1
        return v

    def remote_fin(self, now: float) -> Verdict:
        v = self.remote_segment(b"", now, flags=TCP_FIN | TCP_ACK)
        self.remote_seq += 1
        return v

    def lan_rst(self, now: float) -> Verdict:
        return self.lan_segment(b"", now, flags=TCP_RST | TCP_ACK)

    def remote_rst(self, now: float) -> Verdict:
        return self.remote_segment(b"", now, flags=TCP_RST | TCP_ACK)

    # --- PPTP shortcuts -----------------------------------------------------------------
    def start_session(self, now: float) -> None:
        """Start-Control-Connection from the PNS side, reply from the PAC."""
        if self.lan_opens:
            assert self.lan_sends(sccrq(), now) == sccrq()
            assert self.remote_sends(sccrp(), now) == sccrp()
        else:
            assert self.remote_sends(sccrq(), now) == sccrq()
            assert self.lan_sends(sccrp(), now) == sccrp()

    def outgoing_call(self, call_id: int, pac_call_id: int, now: float) -> int:
        """LAN PNS places a call; returns the outside Call ID the PAC saw."""
        sent = self.lan_sends(ocrq(call_id), now)
        outside = u16_at(sent, 12)
        got = self.remote_sends(ocrp(pac_call_id, outside), now)
        assert u16_at(got, 12) == pac_call_id and u16_at(got, 14) == call_id
        return outside


def gre_packet(src: int, dst: int, call_id: int, payload: bytes = b"\xff\x03\xc0\x21ppp", **kw: object) -> bytearray:
    return build_ipv4(src, dst, 47, build_gre_v1(call_id, payload, **kw))  # type: ignore[arg-type]


def gre_out(eng: Engine, src: int, dst: int, call_id: int, now: float, payload: bytes = b"\xff\x03data") -> Verdict:
    return eng.handle(gre_packet(src, dst, call_id, payload), OUT, now)


def gre_in(eng: Engine, src: int, call_id: int, now: float, payload: bytes = b"\xff\x03data") -> Verdict:
    return eng.handle(gre_packet(src, MASQ, call_id, payload), IN, now)


def gre_call_id(ip: IPv4) -> int:
    return ip.u16(6)
