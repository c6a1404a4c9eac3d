"""``vpnmasq top``: a live view of the busiest sessions, refreshed in place (rich ``Live``),
readable in 80 columns over SSH.

Each refresh asks the daemon for the most recently active entries (``status`` with a
``limit``: the daemon picks them between packet batches) and its counters; rates are the
differences between two refreshes. :class:`Sampler` turns answers into a :class:`Frame`
(pure, on the caller's clock), :func:`render` draws a frame; :func:`run` is the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vpnmasq.events import Row
from vpnmasq.status import kind_of, rows_from_wire
from vpnmasq.tools.status import format_bytes

#: sessions asked for per refresh (the most recently active); the screen shows what fits
FETCH_LIMIT = 200
SORT_KEYS = ("pkts", "bytes")


def session_key(r: Row) -> tuple[str, str, str, str]:
    return (r.proto, r.inside, r.outside, r.remote)


def state_of(r: Row) -> str:
    """The association or call state, short: ESP ``by ike-signal`` once associated (else
    its state), a PPTP control connection's ``calls N``, IKE/TCP/GRE states; plain UDP and
    ICMP nothing."""
    kind = kind_of(r)
    d = r.detail
    if kind == "esp":
        assoc, how = d.get("assoc", r.state.lower()), d.get("how", "-")
        return f"by {how}" if assoc == "established" and how != "-" else assoc
    if kind == "pptp":
        control = d.get("control", r.state).lower()
        return f"calls {d.get('calls', '0')}" if control == "established" else control
    if r.state in ("napt", "icmp", "query", "generic", "fwd"):
        return ""
    return r.state.lower()


@dataclass(frozen=True, slots=True)
class Session:
    kind: str
    inside: str
    remote: str
    state: str
    pps_out: float
    pps_in: float
    bps_out: float
    bps_in: float
    offloaded: bool = False


@dataclass(slots=True)
class Frame:
    """What one screen shows."""

    sessions: list[Session] = field(default_factory=list)
    entries: int = 0
    shown_of: int = 0  # sessions fetched (the most recently active)
    by_kind: dict[str, int] = field(default_factory=dict)
    pps_out: float = 0.0
    pps_in: float = 0.0
    drops_ps: float = 0.0
    queue_waiting: int = 0
    kernel_drops: int = 0  # since vpnmasq started (queue full + socket overrun)
    kernel_drops_ps: float = 0.0
    batch_ms: float | None = None  # mean time to handle a queued batch, last interval
    error: str | None = None


def _packets(c: Mapping[str, int], way: str) -> int:
    """Packets forwarded one way: those the engine handled and those the kernel forwarded
    through the offload maps (credited at each offload sync)."""
    return int(c.get("packets_" + way, 0)) + int(c.get("offload_packets_" + way, 0))


def _rate(new: float, old: float, dt: float) -> float:
    return max(0.0, new - old) / dt if dt > 0 else 0.0


class Sampler:
    """Keeps the previous answer; ``update(resp, now)`` gives the frame for a new one."""

    def __init__(self, sort: str = "pkts") -> None:
        if sort not in SORT_KEYS:
            raise ValueError(f"sort: one of {', '.join(SORT_KEYS)}")
        self.sort = sort
        self.prev: dict[tuple[str, str, str, str], tuple[int, int, int, int]] = {}
        self.prev_counters: Mapping[str, int] | None = None
        self.prev_t: float | None = None

    def update(self, resp: Mapping[str, Any], now: float) -> Frame:
        rows = rows_from_wire(resp.get("entries", []))
        c: Mapping[str, int] = resp.get("counters", {}) or {}
        dt = now - self.prev_t if self.prev_t is not None else 0.0
        seen: dict[tuple[str, str, str, str], tuple[int, int, int, int]] = {}
        sessions = []
        for r in rows:
            k = session_key(r)
            cur = (r.pkts_out, r.pkts_in, r.bytes_out, r.bytes_in)
            seen[k] = cur
            # a session new since the last refresh counts from zero; on the first refresh
            # there is no interval yet
            old = self.prev.get(k, (0, 0, 0, 0)) if self.prev_t is not None else cur
            sessions.append(Session(
                kind_of(r), r.inside, r.remote, state_of(r),
                _rate(cur[0], old[0], dt), _rate(cur[1], old[1], dt),
                _rate(cur[2], old[2], dt), _rate(cur[3], old[3], dt), r.offloaded,
            ))
        if self.sort == "bytes":
            sessions.sort(key=lambda s: (-(s.bps_out + s.bps_in), -(s.pps_out + s.pps_in)))
        else:
            sessions.sort(key=lambda s: (-(s.pps_out + s.pps_in), -(s.bps_out + s.bps_in)))
        f = Frame(sessions=sessions, shown_of=len(rows))
        f.entries = int(resp.get("total_entries", len(rows)))
        f.by_kind = {k[len("entries:"):]: v for k, v in c.items() if k.startswith("entries:")}
        f.queue_waiting = int(c.get("kernel_queue_waiting", 0))
        f.kernel_drops = int(c.get("kernel_queue_dropped", 0)) + int(
            c.get("kernel_queue_user_dropped", 0)
        )
        p = self.prev_counters
        if p is not None and dt > 0:
            f.pps_out = _rate(_packets(c, "out"), _packets(p, "out"), dt)
            f.pps_in = _rate(_packets(c, "in"), _packets(p, "in"), dt)
            f.drops_ps = _rate(c.get("dropped", 0), p.get("dropped", 0), dt)
            old_kd = int(p.get("kernel_queue_dropped", 0)) + int(p.get("kernel_queue_user_dropped", 0))
            f.kernel_drops_ps = _rate(f.kernel_drops, old_kd, dt)
            nb = c.get("queue_batches", 0) - p.get("queue_batches", 0)
            if nb > 0:
                busy = c.get("queue_latency_us_total", 0) - p.get("queue_latency_us_total", 0)
                f.batch_ms = busy / nb / 1000.0
        self.prev, self.prev_counters, self.prev_t = seen, c, now
        return f


def _num(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"


def _bps(v: float) -> str:
    return format_bytes(int(v))


def header(f: Frame) -> Group:
    """Two lines (three with an error), each cut to the screen's width."""
    one = Text(no_wrap=True, overflow="ellipsis")
    one.append("vpnmasq top", style="bold")
    one.append(f"  {f.entries} entries")
    kinds = [(k, n) for k, n in sorted(f.by_kind.items(), key=lambda kv: -kv[1]) if n]
    if kinds:
        one.append(": " + " ".join(f"{k} {n}" for k, n in kinds[:5]))
    two = Text(no_wrap=True, overflow="ellipsis")
    two.append(f"pkt/s out {_num(f.pps_out)} in {_num(f.pps_in)}")
    two.append(f"  drops/s {_num(f.drops_ps)}", style="red" if f.drops_ps else None)
    two.append(f"  queue {f.queue_waiting} waiting, kernel drops {f.kernel_drops}",
               style="bold red" if f.kernel_drops_ps else None)
    if f.kernel_drops_ps:
        two.append(f" (+{_num(f.kernel_drops_ps)}/s)", style="bold red")
    two.append(", batch " + (f"{f.batch_ms:.2f} ms" if f.batch_ms is not None else "-"))
    lines: list[RenderableType] = [one, two]
    if f.error:
        lines.append(Text(f.error, style="bold red", no_wrap=True, overflow="ellipsis"))
    return Group(*lines)


def render(f: Frame, height: int = 24) -> RenderableType:
    """Header, then as many sessions as fit ``height`` lines, busiest first."""
    table = Table(box=None, pad_edge=False, expand=True, header_style="bold reverse")
    table.add_column("KIND", no_wrap=True, max_width=6)
    table.add_column("INSIDE", no_wrap=True, overflow="ellipsis", max_width=21)
    table.add_column("REMOTE", no_wrap=True, overflow="ellipsis", max_width=21)
    table.add_column("PKT/S O/I", justify="right", no_wrap=True)
    table.add_column("B/S O/I", justify="right", no_wrap=True)
    table.add_column("STATE", no_wrap=True, overflow="ellipsis", ratio=1)
    room = max(1, height - 4)
    for s in f.sessions[:room]:
        table.add_row(
            s.kind, s.inside, s.remote,
            f"{_num(s.pps_out)}/{_num(s.pps_in)}",
            f"{_bps(s.bps_out)}/{_bps(s.bps_in)}",
            s.state + (" [offl]" if s.offloaded else ""),
            style="dim" if s.offloaded else None,
        )
    return Group(header(f), table)


def run(
    fetch: Callable[[], Mapping[str, Any]],
    console: Console,
    *,
    interval: float = 1.0,
    iterations: int | None = None,
    sort: str = "pkts",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Refresh in place until Ctrl-C or ``iterations``; ``fetch`` asks the daemon (raising
    an exception with a message when it cannot: shown in the header, retried)."""
    sampler = Sampler(sort)
    frame = Frame()
    n = 0
    with Live(render(frame, console.size.height), console=console, screen=console.is_terminal,
              auto_refresh=False, transient=False) as live:
        try:
            while iterations is None or n < iterations:
                try:
                    frame = sampler.update(fetch(), clock())
                except Exception as exc:  # the daemon went away: say so, keep trying
                    frame.error = str(exc)
                live.update(render(frame, console.size.height), refresh=True)
                n += 1
                if iterations is None or n < iterations:
                    sleep(interval)
        except KeyboardInterrupt:
            pass
    if not console.is_terminal:  # a pipe or file gets whole lines (Live leaves the last open)
        console.line()
    return n
