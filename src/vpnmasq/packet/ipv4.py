"""IPv4 header view over a bytearray (RFC 791).

``IPv4.parse(buf)`` validates lengths and gives field access plus in-place rewrites with
incremental checksum updates for the IP header and, when present, the TCP/UDP pseudo-header.
"""

from __future__ import annotations

import ipaddress
import struct

from vpnmasq.packet.checksum import checksum, update16, update32
from vpnmasq.packet.errors import MalformedPacket

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_GRE = 47
PROTO_ESP = 50
PROTO_AH = 51
PROTO_FWZ = 94  # IANA "IPIP" (KA9Q IP-within-IP); reported as Check Point FWZ encapsulation

PROTO_NAMES = {
    PROTO_ICMP: "icmp",
    PROTO_TCP: "tcp",
    PROTO_UDP: "udp",
    PROTO_GRE: "gre",
    PROTO_ESP: "esp",
    PROTO_AH: "ah",
    PROTO_FWZ: "ipip94",
}

MIN_HEADER = 20
_HDR = struct.Struct("!BBHHHBBHII")


def ip_to_int(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


def int_to_ip(value: int) -> str:
    """Dotted quad; ValueError outside 0..2**32-1 (as ``ipaddress``, 5x faster: every new
    mapping formats its addresses for the EntryCreated event)."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{value!r} is not an IPv4 address (0..2**32-1)")
    return f"{value >> 24}.{(value >> 16) & 0xFF}.{(value >> 8) & 0xFF}.{value & 0xFF}"


class IPv4:
    """A parsed IPv4 header. ``buf`` is the whole datagram and is modified in place."""

    __slots__ = (
        "buf",
        "ihl",
        "total_len",
        "ident",
        "frag_offset",
        "more_fragments",
        "ttl",
        "proto",
        "src",
        "dst",
    )

    buf: bytearray
    ihl: int
    total_len: int
    ident: int
    frag_offset: int
    more_fragments: bool
    ttl: int
    proto: int
    src: int
    dst: int

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        if len(buf) < MIN_HEADER:
            raise MalformedPacket(f"ipv4: {len(buf)} bytes, shorter than a header")
        (vihl, _tos, total_len, ident, frag, ttl, proto, _csum, src, dst) = _HDR.unpack_from(buf, 0)
        if vihl >> 4 != 4:
            raise MalformedPacket(f"ipv4: version {vihl >> 4}")
        ihl = (vihl & 0x0F) * 4
        if ihl < MIN_HEADER:
            raise MalformedPacket(f"ipv4: header length {ihl} < 20")
        if total_len < ihl:
            raise MalformedPacket(f"ipv4: total length {total_len} < header length {ihl}")
        if total_len > len(buf):
            raise MalformedPacket(f"ipv4: total length {total_len} > {len(buf)} bytes captured")
        self.ihl = ihl
        self.total_len = total_len
        self.ident = ident
        self.frag_offset = (frag & 0x1FFF) * 8
        self.more_fragments = bool(frag & 0x2000)
        self.ttl = ttl
        self.proto = proto
        self.src = src
        self.dst = dst

    @classmethod
    def parse(cls, buf: bytearray) -> IPv4:
        return cls(buf)

    # --- fragments -------------------------------------------------------------------
    @property
    def is_fragment(self) -> bool:
        return self.more_fragments or self.frag_offset != 0

    @property
    def has_l4_header(self) -> bool:
        """Only an unfragmented datagram or a first fragment carries the L4 header."""
        return self.frag_offset == 0

    @property
    def l4_len(self) -> int:
        return self.total_len - self.ihl

    def l4(self, minimum: int) -> int:
        """Offset of the L4 header after checking ``minimum`` bytes of it are present."""
        if self.frag_offset:
            raise MalformedPacket("ipv4: non-first fragment has no transport header")
        if self.total_len - self.ihl < minimum:
            raise MalformedPacket(
                f"{PROTO_NAMES.get(self.proto, self.proto)}: {self.total_len - self.ihl} bytes, "
                f"header needs {minimum}"
            )
        return self.ihl

    # --- checks ---------------------------------------------------------------------
    def header_checksum_ok(self) -> bool:
        return checksum(memoryview(self.buf)[: self.ihl]) == 0

    # --- rewrites (in place, incremental checksums) ------------------------------------
    def _l4_csum_offset(self) -> int:
        """Offset of the L4 checksum covered by the pseudo-header, or -1."""
        if self.frag_offset:
            return -1
        avail = self.total_len - self.ihl
        if self.proto == PROTO_TCP and avail >= 18:
            return self.ihl + 16
        if self.proto == PROTO_UDP and avail >= 8:
            return self.ihl + 6
        return -1

    def _fix_l4_for_addr(self, old: int, new: int) -> None:
        off = self._l4_csum_offset()
        if off < 0:
            return
        buf = self.buf
        csum = (buf[off] << 8) | buf[off + 1]
        if self.proto == PROTO_UDP:
            if csum == 0:  # no checksum (RFC 768)
                return
            csum = update32(csum, old, new) or 0xFFFF
        else:
            csum = update32(csum, old, new)
        buf[off] = csum >> 8
        buf[off + 1] = csum & 0xFF

    def _set_addr(self, field_off: int, old: int, new: int) -> None:
        buf = self.buf
        struct.pack_into("!I", buf, field_off, new)
        csum = update32((buf[10] << 8) | buf[11], old, new)
        buf[10] = csum >> 8
        buf[11] = csum & 0xFF
        self._fix_l4_for_addr(old, new)

    def set_src(self, new: int) -> None:
        if new != self.src:
            self._set_addr(12, self.src, new)
            self.src = new

    def set_dst(self, new: int) -> None:
        if new != self.dst:
            self._set_addr(16, self.dst, new)
            self.dst = new

    def set_l4_u16(self, rel_off: int, new: int, csum_rel_off: int | None) -> None:
        """Replace a 16-bit L4 field (port, id, Call ID) and fix the L4 checksum if given.

        ``csum_rel_off`` is None for headers without an L4 checksum (GRE v1).
        """
        buf = self.buf
        off = self.ihl + rel_off
        old = (buf[off] << 8) | buf[off + 1]
        if old == new:
            return
        buf[off] = new >> 8
        buf[off + 1] = new & 0xFF
        if csum_rel_off is None:
            return
        coff = self.ihl + csum_rel_off
        if coff + 2 > self.total_len:
            return
        csum = (buf[coff] << 8) | buf[coff + 1]
        if self.proto == PROTO_UDP:
            if csum == 0:
                return
            csum = update16(csum, old, new) or 0xFFFF
        else:
            csum = update16(csum, old, new)
        buf[coff] = csum >> 8
        buf[coff + 1] = csum & 0xFF

    def u16(self, rel_off: int) -> int:
        off = self.ihl + rel_off
        buf = self.buf
        return (buf[off] << 8) | buf[off + 1]

    def u32(self, rel_off: int) -> int:
        off = self.ihl + rel_off
        return int.from_bytes(self.buf[off : off + 4], "big")

    def payload(self) -> memoryview:
        return memoryview(self.buf)[self.ihl : self.total_len]


def describe(ip: IPv4 | None) -> str:
    """One-line flow description for logs: ``udp 10.77.0.11:500 -> 203.0.113.5:500``."""
    if ip is None:
        return ""
    name = PROTO_NAMES.get(ip.proto, f"proto{ip.proto}")
    s, d = int_to_ip(ip.src), int_to_ip(ip.dst)
    try:
        if ip.proto in (PROTO_TCP, PROTO_UDP) and ip.frag_offset == 0 and ip.l4_len >= 4:
            return f"{name} {s}:{ip.u16(0)} -> {d}:{ip.u16(2)}"
    except (IndexError, MalformedPacket):  # pragma: no cover - defensive
        pass
    return f"{name} {s} -> {d}"


def build_ipv4(
    src: int,
    dst: int,
    proto: int,
    payload: bytes,
    *,
    ident: int = 0,
    ttl: int = 64,
    flags_frag: int = 0,
    options: bytes = b"",
    tos: int = 0,
) -> bytearray:
    """Serialize an IPv4 header with a correct checksum in front of ``payload``."""
    if len(options) % 4:
        raise ValueError("IP options must be padded to a multiple of 4 bytes")
    ihl = 20 + len(options)
    total = ihl + len(payload)
    hdr = bytearray(
        _HDR.pack(0x40 | (ihl // 4), tos, total, ident, flags_frag, ttl, proto, 0, src, dst)
    )
    hdr += options
    c = checksum(hdr)
    hdr[10] = c >> 8
    hdr[11] = c & 0xFF
    return hdr + payload
