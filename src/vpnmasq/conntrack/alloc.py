"""Allocators for outside identifiers: ports, ICMP ids, GRE Call IDs.

RFC 4787 behaviour: port preservation when the port is free and in range, no port
overloading (one alias per inside endpoint at a time, enforced by the caller's bindings),
source ports below 1024 map below 1024. Exhaustion returns None (a counted refusal).
The random source is injected, so tests are deterministic.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Iterator


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


class _Class:
    """Ranges handed out together (the ports for source ports >= 1024, or below): a random
    index over their total size maps to a port, so a pool with holes is probed evenly."""

    __slots__ = ("ranges", "starts", "size", "n")

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges
        self.starts: list[int] = []
        total = 0
        for lo, hi in ranges:
            self.starts.append(total)
            total += hi - lo + 1
        self.size = total
        self.n = 0  # used + reserved ids inside these ranges

    def port(self, k: int) -> int:
        i = bisect_right(self.starts, k) - 1
        return self.ranges[i][0] + k - self.starts[i]

    def __contains__(self, ident: int) -> bool:
        return any(lo <= ident <= hi for lo, hi in self.ranges)


class IdAllocator:
    """Hands out 16-bit identifiers from ranges, preserving the requested one when allowed.

    Ranges entirely below 1024 serve requests for a port below 1024 (RFC 4787 REQ-3), the
    others every other request; with only one kind, it serves all."""

    __slots__ = (
        "ranges", "used", "reserved", "rng", "preserve", "always_preserve", "in_use", "_high", "_low"
    )  # fmt: skip

    def __init__(
        self,
        ranges: list[tuple[int, int]],
        rng: random.Random,
        *,
        preserve: bool = True,
        always_preserve: frozenset[int] = frozenset(),
        in_use: Callable[[int], bool] | None = None,
    ) -> None:
        self.ranges = [r for r in ranges if r[0] <= r[1]]
        self.used = IdSet()  # 64 KB bitmap: no per-mapping cost
        self.reserved: set[int] = set()
        self.rng = rng
        self.preserve = preserve
        self.always_preserve = always_preserve
        #: asked before an identifier is handed out: whether something outside this
        #: allocator holds it now (the daemon: a socket of the gateway bound to the port)
        self.in_use = in_use
        self._high = _Class(sorted(r for r in self.ranges if r[1] >= 1024))
        self._low = _Class(sorted(r for r in self.ranges if r[1] < 1024))

    @property
    def size(self) -> int:
        return self._high.size + self._low.size

    def _count(self, ident: int, delta: int) -> None:
        for c in (self._high, self._low):
            if ident in c:
                c.n += delta
                return

    def _class_for(self, preferred: int | None) -> _Class:
        if preferred is not None and preferred < 1024 and self._low.size:
            return self._low
        return self._high if self._high.size else self._low

    def free(self, ident: int) -> bool:
        return ident not in self.used and ident not in self.reserved

    def _held_elsewhere(self, ident: int) -> bool:
        return self.in_use is not None and self.in_use(ident)

    def _usable(self, ident: int) -> bool:
        return self.free(ident) and not self._held_elsewhere(ident)

    def allocate(self, preferred: int | None = None) -> int | None:
        """An unused identifier, ``preferred`` if allowed and free; None when exhausted.
        Identifiers :attr:`in_use` names are skipped (asked only of candidates free here)."""
        if preferred is not None and self.free(preferred):
            if (
                preferred in self.always_preserve
                or (self.preserve and any(lo <= preferred <= hi for lo, hi in self.ranges))
            ) and not self._held_elsewhere(preferred):
                self.used.add(preferred)
                self._count(preferred, 1)
                return preferred
        c = self._class_for(preferred)
        size = c.size
        if c.n >= size:
            return None  # exhausted: O(1) refusal
        start = self.rng.randrange(size)
        # random probing first (cheap when the pool is sparse), then a full scan
        for _ in range(16):
            cand = c.port(self.rng.randrange(size))
            if self._usable(cand):
                self.used.add(cand)
                c.n += 1
                return cand
        for i in range(size):
            cand = c.port((start + i) % size)
            if self._usable(cand):
                self.used.add(cand)
                c.n += 1
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
