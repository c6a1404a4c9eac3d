"""Internet checksum (RFC 1071) and incremental update (RFC 1624, eqn. 3).

The full sum uses the identity ``sum of 16-bit words == int(data) mod 0xffff`` (because
2**16 == 1 mod 0xffff), which lets CPython do the arithmetic in C.
"""

from __future__ import annotations


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """One's-complement sum of ``data`` (padded with a zero octet if odd) plus ``initial``.

    Returns a value in 0..0xffff; 0xffff stands for "negative zero" (any non-zero input whose
    sum wraps), 0 only for all-zero input.
    """
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    n += initial
    if n == 0:
        return 0
    s = n % 0xFFFF
    return s if s else 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 checksum of ``data``: the one's complement of :func:`ones_sum`."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: int, dst: int, proto: int, length: int) -> int:
    """One's-complement partial sum of the IPv4 pseudo-header (RFC 793/768)."""
    s = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + proto + length
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def update16(csum: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for one 16-bit field."""
    s = (~csum & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def update32(csum: int, old: int, new: int) -> int:
    """RFC 1624 update for a 32-bit field (e.g. an IPv4 address)."""
    s = (
        (~csum & 0xFFFF)
        + (~(old >> 16) & 0xFFFF)
        + (~old & 0xFFFF)
        + (new >> 16)
        + (new & 0xFFFF)
    )
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def delta32(old: int, new: int) -> int:
    """Precomputable one's-complement delta for replacing a 32-bit value."""
    s = (~(old >> 16) & 0xFFFF) + (~old & 0xFFFF) + (new >> 16) + (new & 0xFFFF)
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def apply_delta(csum: int, delta: int) -> int:
    """Apply a delta from :func:`delta32` (or a sum of deltas) to a checksum."""
    s = (~csum & 0xFFFF) + delta
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
