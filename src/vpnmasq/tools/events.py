"""``vpnmasq events``: the daemon's live event stream as text lines (like ``conntrack -E``)
or JSON lines. The daemon filters (``--proto``, ``--host``); this module renders.

Text: one line per event, ``TIME [TAG] proto inside -> remote ...``; tags ``NEW``,
``UPDATE``, ``DESTROY`` for entries, ``DROP`` (rate-limited by the daemon), ``NOTICE``,
``ADDRESS``, and ``LOST`` when this reader fell behind and the daemon dropped its events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

TAGS = {
    "created": "NEW",
    "updated": "UPDATE",
    "removed": "DESTROY",
    "drop": "DROP",
    "drops-suppressed": "DROP",
    "notice": "NOTICE",
    "address-changed": "ADDRESS",
    "lost": "LOST",
}
#: the state a row shows before it has one of its own (its kind)
_NO_STATE = frozenset({"napt", "fwd", "icmp", "generic", "hairpin", None})
#: detail keys worth a place on an event line (the rest are in --json)
_DETAIL = ("spi_out", "spi_in", "icookie", "rcookie", "call_id_inside", "call_id_outside",
           "peer_call_id", "call_ids", "natt")


def _clock(t: object) -> str:
    if not isinstance(t, int | float):
        return "--:--:--.---"
    lt = time.localtime(t)
    return time.strftime("%H:%M:%S", lt) + f".{int((t % 1) * 1000):03d}"


def render_line(obj: Mapping[str, Any]) -> str:
    """One event as a text line."""
    ev = str(obj.get("event", "?"))
    tag = f"[{TAGS.get(ev, ev.upper())}]".ljust(9)
    head = f"{_clock(obj.get('time'))} {tag}"
    if ev in ("created", "updated", "removed"):
        kind = str(obj.get("kind") or obj.get("proto"))
        parts = [kind.ljust(6), f"{obj.get('inside')} -> {obj.get('remote')}",
                 f"as {obj.get('outside')}"]
        if ev == "updated":
            old = obj.get("old_state")
            parts.append(f"{old}>{obj.get('state')}" if old else str(obj.get("state")))
        elif obj.get("state") not in _NO_STATE:
            parts.append(str(obj.get("state", "")))
        if ev == "removed":
            parts.append(f"({obj.get('reason')}; pkts {obj.get('pkts_out', 0)}/"
                         f"{obj.get('pkts_in', 0)})")
        what = obj.get("what")
        if what:
            parts.append(what.replace("-", " ") + (f" by {obj['how']}" if obj.get("how") else ""))
        detail = obj.get("detail") or {}
        parts += [f"{k}={detail[k]}" for k in _DETAIL if k in detail]
        return f"{head} " + " ".join(p for p in parts if p)
    if ev == "drop":
        what = " (esp association refused)" if obj.get("what") == "esp-refused" else ""
        return f"{head} {obj.get('reason')}: {obj.get('flow') or '-'}{what}: {obj.get('detail')}"
    if ev == "drops-suppressed":
        return f"{head} {obj.get('reason')}: {obj.get('count')} more in the last second (not shown)"
    if ev == "notice":
        return f"{head} {obj.get('topic')}: {obj.get('message')}"
    if ev == "address-changed":
        return (f"{head} public address {obj.get('old') or 'none'} -> {obj.get('new') or 'none'}"
                f" ({obj.get('entries_dropped', 0)} entries dropped)")
    if ev == "lost":
        return (f"{_clock(time.time())} [LOST]   {obj.get('count')} events dropped by the "
                "daemon: this reader was too slow")
    return f"{head} {json.dumps(dict(obj), sort_keys=True)}"


def follow(
    items: Iterable[Mapping[str, Any]],
    write: Callable[[str], None],
    *,
    as_json: bool = False,
    count: int | None = None,
) -> int:
    """Write each event (text or a JSON line) until ``items`` ends or ``count`` were
    written (``lost`` notices do not count); returns how many were written."""
    n = 0
    for obj in items:
        write(json.dumps(dict(obj), sort_keys=True) if as_json else render_line(obj))
        if obj.get("event") != "lost":
            n += 1
        if count is not None and n >= count:
            break
    return n
