"""Engine events as log lines, rate-limited per kind (journald-friendly).

Owns :class:`RateLimitedLog`: at most ``burst`` lines per key (``drop:<reason>``,
``created``, ``expired``, ``notice:<topic>``) in each window of ``window_s`` seconds; the
other events of the window are counted, and that count is written as one line ("drop:x: 37
more like this suppressed") when the window ends or at stop, whichever comes first. So for
every key, the lines plus the suppressed counts add up to the events, e.g. to a drop
counter of ``vpnmasq status``. Drops because a LAN host hit a per-host limit are the
exception: one line per host and interval (``HostLimited``, with the drops since the last
one), and exact counts per host in ``vpnmasq status``. The clock is passed in (``now``); the caller calls
:meth:`RateLimitedLog.flush_due` when :meth:`RateLimitedLog.next_deadline` has passed and
:meth:`RateLimitedLog.close` at stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vpnmasq.conntrack.hostlimits import HOST_LIMIT_LOG_INTERVAL_S
from vpnmasq.events import (
    AddressChanged,
    EntryCreated,
    EntryExpired,
    Event,
    HostLimited,
    Notice,
    PacketDropped,
)
from vpnmasq.verdict import DropReason

#: drops of this reason are reported per host (HostLimited), once per interval
HOST_LIMIT = DropReason.HOST_LIMIT.value

#: log at most this many lines per key and window; the rest are counted and summarised
LOG_BURST = 5
LOG_WINDOW_S = 1.0


@dataclass(slots=True)
class _Window:
    start: float
    level: int
    lines: int = 0
    suppressed: int = 0


class RateLimitedLog:
    """One line per event, at most ``burst`` lines per key and window (see the module
    docstring)."""

    def __init__(
        self, logger: logging.Logger, *, burst: int = LOG_BURST, window_s: float = LOG_WINDOW_S
    ) -> None:
        self.log = logger
        self.burst = burst
        self.window_s = window_s
        self._windows: dict[str, _Window] = {}
        #: when the earliest window holding a suppressed count ends (None: none holds one)
        self._due: float | None = None

    def emit(self, key: str, level: int, msg: str, now: float) -> None:
        w = self._windows.get(key)
        if w is not None and now - w.start >= self.window_s:
            self._end(key, w)
            w = None
        if w is None:
            w = self._windows[key] = _Window(now, level)
        if w.lines < self.burst:
            w.lines += 1
            self.log.log(level, "%s", msg)
            return
        w.suppressed += 1
        w.level = level
        end = w.start + self.window_s
        if self._due is None or end < self._due:
            self._due = end

    def _end(self, key: str, w: _Window) -> None:
        del self._windows[key]
        if w.suppressed:
            self.log.log(w.level, "%s: %d more like this suppressed", key, w.suppressed)

    def next_deadline(self) -> float | None:
        """When a window holding a suppressed count ends (:meth:`flush_due` writes it)."""
        return self._due

    def flush_due(self, now: float) -> None:
        """Write the suppressed count of every window that has ended by ``now``."""
        if self._due is None or now < self._due:
            return
        due: float | None = None
        for key, w in list(self._windows.items()):
            end = w.start + self.window_s
            if now >= end:
                self._end(key, w)
            elif w.suppressed and (due is None or end < due):
                due = end
        self._due = due

    def close(self) -> None:
        """At stop: write every suppressed count not yet written."""
        for key, w in list(self._windows.items()):
            self._end(key, w)
        self._due = None

    def event(self, ev: Event, now: float) -> None:
        if isinstance(ev, PacketDropped) and ev.reason == HOST_LIMIT:
            return  # reported per host and interval (HostLimited), counted per host
        if isinstance(ev, HostLimited):
            self.log.warning(
                "host %s hit its %s limit: %s (%d drop%s since the last report; the next "
                "report comes %g s later at the earliest)",
                ev.host, ev.limit, ev.detail, ev.drops, "" if ev.drops == 1 else "s",
                HOST_LIMIT_LOG_INTERVAL_S,
            )
        elif isinstance(ev, PacketDropped):
            self.emit(
                "drop:" + ev.reason, logging.INFO, f"drop {ev.reason}: {ev.flow} ({ev.detail})", now
            )
        elif isinstance(ev, EntryCreated):
            r = ev.row
            extra = " ".join(f"{k}={v}" for k, v in r.detail.items())
            self.emit(
                "created",
                logging.DEBUG,
                f"new {r.proto} {r.inside} -> {r.remote} as {r.outside} {extra}".rstrip(),
                now,
            )
        elif isinstance(ev, EntryExpired):
            r = ev.row
            self.emit(
                "expired",
                logging.DEBUG,
                f"end {r.proto} {r.inside} -> {r.remote} ({ev.why}; {r.pkts_out} out, "
                f"{r.pkts_in} in)",
                now,
            )
        elif isinstance(ev, Notice):
            self.emit("notice:" + ev.topic, logging.WARNING, f"{ev.topic}: {ev.message}", now)
        elif isinstance(ev, AddressChanged):
            self.log.warning(
                "public address %s -> %s (%d entries dropped)", ev.old, ev.new, ev.entries_dropped
            )
