"""The outside port pool: which outside ports vpnmasq may hand out.

Pure: the daemon reads the system (``net.ipv4.ip_local_port_range``, the ports local
services listen on) and passes plain numbers to :func:`port_pool`; check-config, replay and
tests get the answer for a default Linux system (:data:`vpnmasq.config.DEFAULT_LOCAL_PORT_RANGE`,
nothing listening). The engine's allocators take :attr:`PortPool.ranges`.

A service that starts listening later is taken out by the daemon (:meth:`PortPool.without`).
Ports the gateway's programs use without listening (a resolver's query ports) stay in the
pool: the rules leave packets a local socket owns to the kernel, and the engine skips a port
a socket holds when it allocates (``Engine(port_in_use=...)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vpnmasq.config import DEFAULT_LOCAL_PORT_RANGE, HYBRID_PORT_RANGE, Config

#: the lowest port of an "auto" pool: below it is low_port_range's business (RFC 4787 REQ-3)
FIRST_HIGH_PORT = 1024
Range = tuple[int, int]


def subtract(ranges: Iterable[Range], holes: Iterable[int | Range]) -> tuple[Range, ...]:
    """``ranges`` without the ports in ``holes`` (single ports or ranges), sorted, merged."""
    cut: list[Range] = sorted((h, h) if isinstance(h, int) else h for h in holes)
    out: list[Range] = []
    for lo, hi in sorted(ranges):
        cur = lo
        for hlo, hhi in cut:
            if hhi < cur or hlo > hi:
                continue
            if hlo > cur:
                out.append((cur, hlo - 1))
            cur = max(cur, hhi + 1)
            if cur > hi:
                break
        if cur <= hi:
            out.append((cur, hi))
    merged: list[Range] = []
    for r in out:
        if merged and r[0] <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], r[1]))
        else:
            merged.append(r)
    return tuple(merged)


def size_of(ranges: Iterable[Range]) -> int:
    return sum(hi - lo + 1 for lo, hi in ranges)


def render_ranges(ranges: Iterable[Range]) -> str:
    return ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ranges) or "none"


@dataclass(frozen=True, slots=True)
class PortPool:
    """The outside ports for source ports >= 1024 (``ranges``) and below (``low``), and
    where they came from (``source``: "port_range" or "auto"; ``excluded``: what an auto
    pool left out, for the start line and status)."""

    ranges: tuple[Range, ...]
    low: Range
    source: str = "port_range"
    excluded: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Ports for source ports >= 1024: what one busy LAN can run out of."""
        return size_of(self.ranges)

    @property
    def alias_ranges(self) -> tuple[Range, ...]:
        """Every range ports are handed out from (low ports last): what the rules queue."""
        return (*self.ranges, self.low)

    def without(self, ports: Iterable[int]) -> PortPool:
        """This pool less ``ports`` (a local service started listening on them)."""
        gone = sorted({p for p in ports if p in self and not self.low[0] <= p <= self.low[1]})
        if not gone:
            return self
        shown = ", ".join(str(p) for p in gone[:5]) + (" ..." if len(gone) > 5 else "")
        return PortPool(
            subtract(self.ranges, gone), self.low, self.source, (*self.excluded, f"since: {shown}")
        )

    def __contains__(self, port: object) -> bool:
        if not isinstance(port, int):
            return False
        if self.low[0] <= port <= self.low[1]:
            return True
        return any(lo <= port <= hi for lo, hi in self.ranges)

    def describe(self) -> str:
        text = f"{self.size} ports ({render_ranges(self.ranges)}; {self.source}"
        if self.excluded:
            text += "; not " + ", ".join(self.excluded)
        return text + f"), low ports {self.low[0]}-{self.low[1]}"

    def as_dict(self) -> dict[str, object]:
        return {
            "size": self.size,
            "ranges": [list(r) for r in self.ranges],
            "low": list(self.low),
            "source": self.source,
            "excluded": list(self.excluded),
        }


def port_pool(
    config: Config,
    *,
    local_port_range: Range | None = None,
    listening: Iterable[int] = (),
) -> PortPool:
    """The pool ``config`` gets on a system whose ephemeral range is ``local_port_range``
    (None: Linux's default) and whose local services listen on ``listening``.

    An explicit ``port_range`` is taken as it is (forwarded ports inside it are reserved by
    the engine). "auto": hybrid mode gets :data:`HYBRID_PORT_RANGE`; userspace mode every
    port from :data:`FIRST_HIGH_PORT` up that is not the gateway's own: not the ephemeral
    range, not a listening port, not a forwarded port (a forward with no port owns none).
    """
    low = (config.low_port_range.low, config.low_port_range.high)
    if config.port_range is not None:
        return PortPool(((config.port_range.low, config.port_range.high),), low)
    if config.mode == "hybrid":
        return PortPool(((HYBRID_PORT_RANGE.low, HYBRID_PORT_RANGE.high),), low, "auto")
    loc = local_port_range or (DEFAULT_LOCAL_PORT_RANGE.low, DEFAULT_LOCAL_PORT_RANGE.high)
    listen = sorted({p for p in listening if FIRST_HIGH_PORT <= p <= 0xFFFF})
    forwarded = sorted({f.port for f in config.forwards if f.port is not None})
    holes: list[int | Range] = [loc, low, *listen, *forwarded]
    ranges = subtract([(FIRST_HIGH_PORT, 0xFFFF)], holes)
    excluded = [f"ip_local_port_range {loc[0]}-{loc[1]}"]
    if listen:
        excluded.append(f"{len(listen)} listening port{'s' if len(listen) != 1 else ''}")
    if any(p >= FIRST_HIGH_PORT for p in forwarded):
        excluded.append("forwarded ports")
    return PortPool(ranges, low, "auto", tuple(excluded))


__all__ = [
    "FIRST_HIGH_PORT",
    "PortPool",
    "port_pool",
    "render_ranges",
    "size_of",
    "subtract",
]
