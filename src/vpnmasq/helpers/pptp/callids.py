"""Outside PPTP Call IDs: unique per remote, keeping the LAN host's own ID (or at least its
high byte) where free, so a Call ID straddling two TCP segments only ever changes its low byte.
"""

from __future__ import annotations

import random


class CallIdPool:
    """Outside Call IDs, unique per remote address (the public address is one at a time).

    ``allocate`` keeps the preferred ID when it is free and in range, otherwise picks one
    with the same high byte (so straddled fields need no change to an already-sent byte),
    and only then, unless ``keep_high``, anything free in range.
    """

    __slots__ = ("low", "high", "rng", "used")

    def __init__(self, low: int, high: int, rng: random.Random) -> None:
        self.low = low
        self.high = high
        self.rng = rng
        self.used: dict[int, set[int]] = {}

    def in_use(self, remote: int, cid: int) -> bool:
        return cid in self.used.get(remote, ())

    def allocate(self, remote: int, preferred: int, keep_high: bool = False) -> int | None:
        used = self.used.setdefault(remote, set())
        lo, hi = self.low, self.high
        if lo <= preferred <= hi and preferred not in used:
            used.add(preferred)
            return preferred
        base = preferred & 0xFF00
        block = [c for c in range(max(lo, base), min(hi, base | 0xFF) + 1) if c not in used]
        if block:
            cid: int = self.rng.choice(block)
            used.add(cid)
            return cid
        if keep_high:
            return None
        size = hi - lo + 1
        for _ in range(16):
            cand = lo + self.rng.randrange(size)
            if cand not in used:
                used.add(cand)
                return cand
        start = self.rng.randrange(size)
        for i in range(size):
            cand = lo + (start + i) % size
            if cand not in used:
                used.add(cand)
                return cand
        return None

    def claim(self, remote: int, cid: int) -> bool:
        """Take exactly ``cid`` for ``remote`` (a call restored from saved state). Any
        Call ID but 0 is accepted, in range or not: a standby restores the calls its peer
        numbered from the other half of call_id_range (``[sync] node``)."""
        used = self.used.setdefault(remote, set())
        if cid in used or not 1 <= cid <= 0xFFFF:
            return False
        used.add(cid)
        return True

    def release(self, remote: int, cid: int) -> None:
        used = self.used.get(remote)
        if used is not None:
            used.discard(cid)
            if not used:
                del self.used[remote]


