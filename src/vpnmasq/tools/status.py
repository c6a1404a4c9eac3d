"""Rendering of the masquerade table for operators: text columns like ``conntrack -L``,
JSON, and a rich Table for live displays. Pure functions over ``events.Row`` lists; the rows
come from the daemon's status answer (:mod:`vpnmasq.status`, the wire format and filters).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.table import Table

from vpnmasq.events import Row
from vpnmasq.status import DETAIL_COLUMNS, filter_rows, kind_of, rows_to_wire, sort_key

BASE_COLUMNS: tuple[str, ...] = (
    "PROTO",
    "INSIDE",
    "OUTSIDE",
    "REMOTE",
    "STATE",
    "EXPIRES",
    "PKTS OUT/IN",
    "BYTES OUT/IN",
    "LAST OUT/IN",
)


_RIGHT = {"EXPIRES", "PKTS OUT/IN", "BYTES OUT/IN", "LAST OUT/IN"}


def format_expires(seconds: float) -> str:
    """``42s``, ``7m05s``, ``2h04m``, ``3d01h``; ``never`` for permanent entries."""
    if math.isinf(seconds) or math.isnan(seconds):
        return "never"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_ago(seconds: float | None) -> str:
    """Time since a packet: ``never``, ``0s``, ``42s``, ``7m05s``, ... (as format_expires)."""
    if seconds is None:
        return "never"
    return format_expires(seconds)


def format_bytes(n: int) -> str:
    """Compact byte count: ``912``, ``1.5K``, ``23M``, ``4.0G`` (powers of 1024)."""
    value = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            if not unit:
                return str(n)
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _detail_text(row: Row, skip: Sequence[str] = ()) -> str:
    kind = kind_of(row)
    known = [k for k, _ in DETAIL_COLUMNS.get(kind, ())]
    order = [k for k in known if k in row.detail]
    order += sorted(k for k in row.detail if k not in known and k not in ("kind", "alg"))
    return " ".join(f"{k}={row.detail[k]}" for k in order if k not in skip)


def _columns(rows: Sequence[Row]) -> tuple[list[str], list[str]]:
    """(headers, detail keys with their own column). One helper kind -> dedicated columns."""
    kinds = {kind_of(r) for r in rows}
    if len(kinds) == 1:
        (kind,) = kinds
        cols = DETAIL_COLUMNS.get(kind, ())
        if cols:
            keys = [k for k, _ in cols]
            headers = [*BASE_COLUMNS, *(h for _, h in cols)]
            if any(_detail_text(r, keys) for r in rows):
                headers.append("DETAIL")
            return headers, keys
    headers = list(BASE_COLUMNS)
    if any(r.detail for r in rows):
        headers.append("DETAIL")
    return headers, []


def _cells(row: Row, headers: Sequence[str], keys: Sequence[str]) -> list[str]:
    state = row.state + (" [offload]" if row.offloaded else "")
    proto = kind_of(row) if kind_of(row) != row.proto else row.proto
    cells = [
        proto,
        row.inside,
        row.outside,
        row.remote,
        state,
        format_expires(row.expires_in),
        f"{row.pkts_out}/{row.pkts_in}",
        f"{format_bytes(row.bytes_out)}/{format_bytes(row.bytes_in)}",
        f"{format_ago(row.last_seen_out)}/{format_ago(row.last_seen_in)}",
    ]
    cells += [row.detail.get(k, "-") for k in keys]
    if "DETAIL" in headers:
        cells.append(_detail_text(row, keys))
    return cells


# ------------------------------------------------------------------------------ renderers
def sync_line(sync: Mapping[str, Any]) -> str:
    """One line about replication ([sync]): role, what the standby holds, the peer."""
    seen = sync.get("peer_seen_s_ago")
    held = (
        f"replica {sync.get('replica_entries', 0)} entries"
        + (" (synced)" if sync.get("replica_synced") else " (not synced yet)")
        if sync.get("role") == "standby"
        else f"sending every {sync.get('tick_s')} s"
    )
    return (
        f"sync: node {sync.get('node')} {sync.get('role')}"
        + (" (yielding: the peer is active)" if sync.get("yielding") else "")
        + f", {held}, peer {sync.get('peer')} "
        + ("never heard" if seen is None else f"heard {seen} s ago")
    )


def render_text(
    rows: Iterable[Row],
    counters: Mapping[str, int],
    *,
    proto: str | None = None,
    host: str | None = None,
    total: int | None = None,
    sync: Mapping[str, Any] | None = None,
    limits: Sequence[str] = (),
) -> str:
    """The masquerade table as aligned text columns, then ``limits`` (the port pool and the
    per-host limits in force, one line each) and the counters. ``total``: the entries in the
    daemon's table when ``rows`` is already a selection (server-side filters, ``--limit``)."""
    all_rows = list(rows)
    shown = filter_rows(all_rows, proto=proto, host=host)
    lines: list[str] = []
    if shown:
        headers, keys = _columns(shown)
        table = [headers] + [_cells(r, headers, keys) for r in shown]
        widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
        for line in table:
            parts = [
                cell.rjust(w) if h in _RIGHT else cell.ljust(w)
                for cell, w, h in zip(line, widths, headers, strict=True)
            ]
            lines.append("  ".join(parts).rstrip())
    n_all = len(all_rows) if total is None else total
    filtered = proto is not None or host is not None or len(shown) != n_all
    summary = f"{len(shown)} of {n_all} entries shown" if filtered else f"{n_all} entries"
    if lines:
        lines.append("")
    lines.append(summary)
    if sync:
        lines.append(sync_line(sync))
    if limits:
        lines.append("")
        lines += list(limits)
    if counters:
        lines.append("")
        lines.append("counters:")
        width = max(len(k) for k in counters)
        lines += [f"  {k.ljust(width)}  {counters[k]}" for k in sorted(counters)]
    return "\n".join(lines) + "\n"


def render_json(
    rows: Iterable[Row],
    counters: Mapping[str, int],
    *,
    proto: str | None = None,
    host: str | None = None,
    total: int | None = None,
    sync: Mapping[str, Any] | None = None,
    limits: Sequence[str] = (),
) -> str:
    """``{"entries": [...], "counters": {...}}``; ``expires_in`` is null for permanent entries."""
    all_rows = list(rows)
    shown = filter_rows(all_rows, proto=proto, host=host)
    doc = {
        "entries": rows_to_wire(shown),
        "total_entries": len(all_rows) if total is None else total,
        "counters": dict(sorted(counters.items())),
    }
    if sync:
        doc["sync"] = dict(sync)
    if limits:
        doc["limits"] = list(limits)
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def rich_table(rows: Iterable[Row], *, title: str | None = "vpnmasq masquerade table") -> Table:
    """The same columns as :func:`render_text`, as a rich Table (for live displays)."""
    shown = sorted(rows, key=sort_key)
    headers, keys = _columns(shown) if shown else (list(BASE_COLUMNS), [])
    table = Table(title=title, header_style="bold", expand=False)
    body = [_cells(r, headers, keys) for r in shown]
    for i, h in enumerate(headers):
        # identifiers (cookies, SPIs, Call IDs) keep their full width; when space is short
        # the other columns wrap instead
        ident = h not in BASE_COLUMNS and h != "DETAIL"
        width = max((len(cells[i]) for cells in body), default=0) if ident else None
        table.add_column(h, justify="right" if h in _RIGHT else "left", no_wrap=ident,
                         min_width=width or None, overflow="fold")
    for r, cells in zip(shown, body, strict=True):
        table.add_row(*cells, style="dim" if r.offloaded else None)
    return table
