"""Per-host limits: their values in force ("auto" sized from the port pool) and an account
of the hosts that hit them.

A LAN host that floods (a scanner, malware, a runaway P2P client) meets a limit and its new
flows are dropped; :class:`LimitHits` counts those drops per host and limit and says when
one is worth a log line (once per host per :data:`HOST_LIMIT_LOG_INTERVAL_S`), so a flood
costs one line a minute, not one per packet. Pure: ``now`` is passed in.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from vpnmasq.config import HOST_ENTRY_SHARE, HOST_PORT_SHARE, Config
from vpnmasq.conntrack.pool import PortPool, size_of

#: a host that keeps hitting a limit is logged again after this long (with the count)
HOST_LIMIT_LOG_INTERVAL_S = 60.0
#: hosts whose hits are remembered (least recently limited forgotten first): bounds what a
#: LAN host forging many source addresses can make us keep
MAX_LIMITED_HOSTS = 1024
#: max_entries_per_host = "auto" is never below this (nor above max_entries)
MIN_AUTO_ENTRIES = 1024
#: the limits a host can hit, as named in status, metrics and logs
LIMIT_NAMES = ("ports", "entries", "rate", "esp-pending")


@dataclass(frozen=True, slots=True)
class HostLimits:
    """The per-host limits in force (0: unlimited), with "auto" resolved."""

    max_entries: int
    max_ports: int
    max_icmp_ids: int
    new_per_second: float

    def describe(self) -> str:
        def n(v: float) -> str:
            return "unlimited" if not v else f"{v:g}"

        return (
            f"per host: {n(self.max_ports)} ports, {n(self.max_icmp_ids)} ICMP ids, "
            f"{n(self.max_entries)} entries, {n(self.new_per_second)} new flows/s"
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "max_entries_per_host": self.max_entries,
            "max_ports_per_host": self.max_ports,
            "max_icmp_ids_per_host": self.max_icmp_ids,
            "max_new_per_host_per_second": self.new_per_second,
        }


def host_limits(config: Config, pool: PortPool) -> HostLimits:
    """``config.limits`` with "auto" sized: ports as :data:`HOST_PORT_SHARE` of the pool
    (low ports included) and of ``icmp_id_range``, entries as :data:`HOST_ENTRY_SHARE` of
    ``max_entries`` (at least :data:`MIN_AUTO_ENTRIES`)."""
    lim = config.limits
    if lim.max_ports_per_host is None:
        ports = max(1, math.floor((pool.size + size_of([pool.low])) * HOST_PORT_SHARE))
        icmp = max(1, math.floor(config.icmp_id_range.size * HOST_PORT_SHARE))
    else:
        ports = icmp = lim.max_ports_per_host
    entries = lim.max_entries_per_host
    if entries is None:  # a small table is shared whole: the share would be too few
        entries = max(math.floor(lim.max_entries * HOST_ENTRY_SHARE), min(lim.max_entries, MIN_AUTO_ENTRIES))
    return HostLimits(entries, ports, icmp, float(lim.max_new_per_host_per_second))


@dataclass(slots=True)
class _Hits:
    counts: dict[str, int] = field(default_factory=dict)
    last_logged: float | None = None
    unlogged: int = 0


class LimitHits:
    """Drops per inside host and limit, and when to log them."""

    def __init__(self) -> None:
        self._hosts: OrderedDict[int, _Hits] = OrderedDict()

    def hit(self, host: int, limit: str, now: float) -> int | None:
        """Count one drop; returns the drops not yet logged (this one included) when a log
        line is due, else None."""
        h = self._hosts.get(host)
        if h is None:
            if len(self._hosts) >= MAX_LIMITED_HOSTS:
                self._hosts.popitem(last=False)
            h = self._hosts[host] = _Hits()
        else:
            self._hosts.move_to_end(host)
        h.counts[limit] = h.counts.get(limit, 0) + 1
        h.unlogged += 1
        if h.last_logged is not None and now - h.last_logged < HOST_LIMIT_LOG_INTERVAL_S:
            return None
        n, h.unlogged, h.last_logged = h.unlogged, 0, now
        return n

    def snapshot(self) -> dict[int, dict[str, int]]:
        """Host -> limit -> drops, for status and metrics."""
        return {host: dict(h.counts) for host, h in list(self._hosts.items())}

    def clear(self) -> None:
        self._hosts.clear()


__all__ = [
    "HOST_LIMIT_LOG_INTERVAL_S",
    "LIMIT_NAMES",
    "MAX_LIMITED_HOSTS",
    "HostLimits",
    "LimitHits",
    "host_limits",
]
