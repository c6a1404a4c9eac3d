"""Allocators for outside identifiers: ports, ICMP ids, GRE Call IDs.

RFC 4787 behaviour: port preservation when the port is free and in range, no port
overloading (one alias per inside endpoint at a time, enforced by the caller's bindings),
source ports below 1024 map below 1024. Exhaustion returns None (a counted refusal).
The random source is injected, so tests are deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


class IdSet:
    """A set of 16-bit identifiers as a 64 KB bitmap (one byte per id): fixed memory, where a
    Python ``set`` costs ~110 bytes per member (memory per mapping, docs/BENCHMARKS.md).
    Supports what the allocator and its readers use: ``in``, ``add``, ``discard``, ``len``,
    iteration."""

    __slots__ = ("_bits", "_n")

    def __init__(self) -> None:
        self._bits = bytearray(0x10000)
        self._n = 0

    def __contains__(self, ident: object) -> bool:
        return isinstance(ident, int) and 0 <= ident <= 0xFFFF and self._bits[ident] == 1

    def add(self, ident: int) -> None:
        if not self._bits[ident]:
            self._bits[ident] = 1
            self._n += 1

    def discard(self, ident: int) -> None:
        if 0 <= ident <= 0xFFFF and self._bits[ident]:
            self._bits[ident] = 0
            self._n -= 1

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[int]:
        bits = self._bits
        return (i for i in range(0x10000) if bits[i])

    def __repr__(self) -> str:
        return f"IdSet({sorted(self)!r})"


class IdAllocator:
    """Hands out 16-bit identifiers from ranges, preserving the requested one when allowed."""

    __slots__ = ("ranges", "used", "reserved", "rng", "preserve", "always_preserve", "_in_range")

    def __init__(
        self,
        ranges: list[tuple[int, int]],
        rng: random.Random,
        *,
        preserve: bool = True,
        always_preserve: frozenset[int] = frozenset(),
    ) -> None:
        self.ranges = [r for r in ranges if r[0] <= r[1]]
        self.used = IdSet()  # 64 KB bitmap: no per-mapping cost
        self.reserved: set[int] = set()
        self.rng = rng
        self.preserve = preserve
        self.always_preserve = always_preserve
        self._in_range = [0] * len(self.ranges)  # used + reserved ids per range

    def _count(self, ident: int, delta: int) -> None:
        for i, (lo, hi) in enumerate(self.ranges):
            if lo <= ident <= hi:
                self._in_range[i] += delta

    def _range_for(self, preferred: int | None) -> tuple[int, int]:
        if preferred is not None and preferred < 1024:
            for r in self.ranges:
                if r[1] < 1024:
                    return r
        for r in self.ranges:
            if r[0] >= 1024 or len(self.ranges) == 1:
                return r
        return self.ranges[0]

    def free(self, ident: int) -> bool:
        return ident not in self.used and ident not in self.reserved

    def allocate(self, preferred: int | None = None) -> int | None:
        """An unused identifier, ``preferred`` if allowed and free; None when exhausted."""
        if preferred is not None and self.free(preferred):
            if preferred in self.always_preserve or (
                self.preserve and any(lo <= preferred <= hi for lo, hi in self.ranges)
            ):
                self.used.add(preferred)
                self._count(preferred, 1)
                return preferred
        lo, hi = self._range_for(preferred)
        size = hi - lo + 1
        if self._in_range[self.ranges.index((lo, hi))] >= size:
            return None  # exhausted: O(1) refusal
        start = self.rng.randrange(size)
        # random probing first (cheap when the range is sparse), then a full scan
        for _ in range(16):
            cand = lo + self.rng.randrange(size)
            if self.free(cand):
                self.used.add(cand)
                self._count(cand, 1)
                return cand
        for i in range(size):
            cand = lo + (start + i) % size
            if self.free(cand):
                self.used.add(cand)
                self._count(cand, 1)
                return cand
        return None

    def take(self, ident: int) -> bool:
        """Claim exactly ``ident`` (e.g. ISAKMP keeps 500); False if in use."""
        if not self.free(ident):
            return False
        self.used.add(ident)
        self._count(ident, 1)
        return True

    def reserve(self, ident: int) -> None:
        """Never hand out ``ident`` (owned by a forward)."""
        if ident not in self.reserved and ident not in self.used:
            self._count(ident, 1)
        self.reserved.add(ident)

    def unreserve(self, ident: int) -> None:
        if ident in self.reserved:
            self.reserved.discard(ident)
            if ident not in self.used:
                self._count(ident, -1)

    def release(self, ident: int) -> None:
        if ident in self.used:
            self.used.discard(ident)
            if ident not in self.reserved:
                self._count(ident, -1)
