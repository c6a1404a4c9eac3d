"""Transport and tunnel header layouts (offsets relative to the L4 header) and builders.

TCP (RFC 9293), UDP (RFC 768), ICMP (RFC 792), enhanced GRE (RFC 2637 4.1, GRE v0 RFC 2784),
ESP (RFC 4303), AH (RFC 4302).
"""

from __future__ import annotations

import struct

from vpnmasq.packet.checksum import checksum, pseudo_header_sum
from vpnmasq.packet.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, build_ipv4

#: well-known ports of the VPN protocols vpnmasq handles (IANA)
ISAKMP_PORT = 500  # IKE (RFC 7296 2.)
NATT_PORT = 4500  # IKE and ESP-in-UDP behind NAT (RFC 3948)
PPTP_PORT = 1723  # PPTP control connection (RFC 2637 2.)

TCP_MIN = 20
TCP_CSUM = 16
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

UDP_MIN = 8
UDP_CSUM = 6

ICMP_MIN = 8
ICMP_CSUM = 2
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_SOURCE_QUENCH = 4
ICMP_REDIRECT = 5
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAM_PROBLEM = 12
ICMP_TIMESTAMP = 13
ICMP_TIMESTAMP_REPLY = 14
ICMP_INFO_REQUEST = 15
ICMP_INFO_REPLY = 16
ICMP_ADDRESS = 17
ICMP_ADDRESS_REPLY = 18
ICMP_ERRORS = frozenset({ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_TIME_EXCEEDED, ICMP_PARAM_PROBLEM})
#: query request type -> reply type
ICMP_QUERIES = {
    ICMP_ECHO_REQUEST: ICMP_ECHO_REPLY,
    ICMP_TIMESTAMP: ICMP_TIMESTAMP_REPLY,
    ICMP_INFO_REQUEST: ICMP_INFO_REPLY,
    ICMP_ADDRESS: ICMP_ADDRESS_REPLY,
}
ICMP_REPLIES = {v: k for k, v in ICMP_QUERIES.items()}

GRE_MIN_V1 = 8
GRE_PPP = 0x880B
#: libalias/RFC 2637 validity test for enhanced GRE v1 carrying PPP: K set, v1, proto 0x880B
GRE_V1_MASK = 0xEF7FFFFF
GRE_V1_VALUE = 0x2001880B
GRE_CALL_ID = 6

ESP_MIN = 8
AH_MIN = 12


def l4_checksum(src: int, dst: int, proto: int, segment: bytes | bytearray) -> int:
    return checksum(segment, pseudo_header_sum(src, dst, proto, len(segment)))


def build_tcp(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    flags: int = TCP_ACK,
    seq: int = 1,
    ack: int = 1,
    window: int = 65535,
    ident: int = 0,
    ttl: int = 64,
) -> bytearray:
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0))
    seg += payload
    c = l4_checksum(src, dst, PROTO_TCP, seg)
    struct.pack_into("!H", seg, TCP_CSUM, c)
    return build_ipv4(src, dst, PROTO_TCP, bytes(seg), ident=ident, ttl=ttl)


def build_udp(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    ident: int = 0,
    ttl: int = 64,
    no_checksum: bool = False,
) -> bytearray:
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)) + payload
    if not no_checksum:
        c = l4_checksum(src, dst, PROTO_UDP, seg) or 0xFFFF
        struct.pack_into("!H", seg, UDP_CSUM, c)
    return build_ipv4(src, dst, PROTO_UDP, bytes(seg), ident=ident, ttl=ttl)


def build_icmp(
    src: int,
    dst: int,
    icmp_type: int,
    code: int = 0,
    rest: int = 0,
    payload: bytes = b"",
    *,
    ident: int = 0,
    ttl: int = 64,
) -> bytearray:
    """ICMP message; ``rest`` is the 32-bit second word (id<<16|seq for queries)."""
    msg = bytearray(struct.pack("!BBHI", icmp_type, code, 0, rest)) + payload
    struct.pack_into("!H", msg, ICMP_CSUM, checksum(msg))
    return build_ipv4(src, dst, PROTO_ICMP, bytes(msg), ident=ident, ttl=ttl)


def build_gre_v1(
    call_id: int, payload: bytes = b"", *, seq: int | None = 1, ack: int | None = None
) -> bytes:
    """Enhanced GRE (PPTP) header + payload; ``call_id`` is the receiver's (peer's) Call ID."""
    flags = 0x2000 | 0x0001  # K, version 1
    tail = b""
    if seq is not None:
        flags |= 0x1000
        tail += struct.pack("!I", seq)
    if ack is not None:
        flags |= 0x0080
        tail += struct.pack("!I", ack)
    return struct.pack("!HHHH", flags, GRE_PPP, len(payload), call_id) + tail + payload


def build_esp(spi: int, seq: int, payload: bytes = b"\x00" * 24) -> bytes:
    return struct.pack("!II", spi, seq) + payload
