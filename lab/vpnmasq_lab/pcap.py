"""Read what tcpdump wrote on the gateway's interfaces: the outside view a test asserts on.

Only what the lab produces is supported: classic pcap (tcpdump ``-w``), Ethernet link type
(veth), IPv4. :func:`read_ipv4` yields one :class:`Pkt` per IPv4 packet with the fields tests
look at: addresses, protocol, ports (TCP/UDP), the ESP SPI, the PPTP GRE Call ID.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LINKTYPE_ETHERNET = 1
_MAGIC = {
    0xA1B2C3D4: ("<", 1e-6),
    0xD4C3B2A1: (">", 1e-6),
    0xA1B23C4D: ("<", 1e-9),
    0x4D3CB2A1: (">", 1e-9),
}
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
PROTO_TCP, PROTO_UDP, PROTO_GRE, PROTO_ESP, PROTO_AH = 6, 17, 47, 50, 51


@dataclass(frozen=True, slots=True)
class Pkt:
    ts: float
    src: str
    dst: str
    proto: int
    sport: int | None = None
    dport: int | None = None
    spi: int | None = None  # ESP / AH
    call_id: int | None = None  # enhanced GRE (PPTP, RFC 2637 4.1): the key's low 16 bits
    length: int = 0


class PcapError(ValueError):
    pass


def _records(data: bytes) -> Iterator[tuple[float, bytes]]:
    if len(data) < 24:
        return
    magic = struct.unpack("<I", data[:4])[0]
    if magic not in _MAGIC:
        raise PcapError(f"not a classic pcap file (magic {magic:#x})")
    end, scale = _MAGIC[magic]
    linktype = struct.unpack(end + "I", data[20:24])[0]
    if linktype != LINKTYPE_ETHERNET:
        raise PcapError(f"link type {linktype} is not Ethernet")
    rec = struct.Struct(end + "IIII")
    off = 24
    while off + rec.size <= len(data):
        sec, frac, incl, _orig = rec.unpack_from(data, off)
        off += rec.size
        yield sec + frac * scale, data[off : off + incl]
        off += incl


def parse_ipv4(ts: float, ip: bytes) -> Pkt | None:
    if len(ip) < 20 or ip[0] >> 4 != 4:
        return None
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    frag = struct.unpack("!H", ip[6:8])[0] & 0x1FFF
    proto = ip[9]
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    l4 = ip[ihl:] if frag == 0 else b""
    sport = dport = spi = call_id = None
    if proto in (PROTO_TCP, PROTO_UDP) and len(l4) >= 4:
        sport, dport = struct.unpack("!HH", l4[:4])
    elif proto == PROTO_ESP and len(l4) >= 4:
        spi = struct.unpack("!I", l4[:4])[0]
    elif proto == PROTO_AH and len(l4) >= 8:
        spi = struct.unpack("!I", l4[4:8])[0]
    elif proto == PROTO_GRE and len(l4) >= 8:
        flags, ptype = struct.unpack("!HH", l4[:4])
        if flags & 0x2000 and flags & 0x7 == 1 and ptype == 0x880B:  # key present, version 1
            call_id = struct.unpack("!H", l4[6:8])[0]
    return Pkt(ts, src, dst, proto, sport, dport, spi, call_id, total)


def read_ipv4(path: str | Path) -> list[Pkt]:
    """Every IPv4 packet in an Ethernet pcap, in capture order."""
    out: list[Pkt] = []
    for ts, frame in _records(Path(path).read_bytes()):
        off = 12
        etype = struct.unpack("!H", frame[off : off + 2])[0] if len(frame) >= 14 else 0
        if etype == ETH_P_8021Q and len(frame) >= 18:
            off += 4
            etype = struct.unpack("!H", frame[off : off + 2])[0]
        if etype != ETH_P_IP:
            continue
        p = parse_ipv4(ts, frame[off + 2 :])
        if p is not None:
            out.append(p)
    return out
