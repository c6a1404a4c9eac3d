"""The live event stream (``vpnmasq events``): engine events as JSON-ready objects, with
their filter and the drop rate limit. Pure: the daemon feeds it events, ``now`` and the
wall-clock time, and hands the objects to the control socket's subscribers.

One object per event, ``"event"`` saying which: ``created``, ``updated`` (state change,
``old_state`` -> ``state``), ``removed`` (``reason``: expired, fin-rst, flushed, replaced,
address-changed, reload (a reloaded configuration no longer holds it), or the helper's own
such as call-disconnect; ``why``: the engine's word),
``drop`` (``reason``, ``detail``, ``flow``; at most :data:`DROP_BURST` per reason and
second, then one ``drops-suppressed`` with the count), ``notice``, ``address-changed``; the
control socket adds ``lost`` for a reader that fell behind. Entry events carry the row
(``proto``, ``kind``, ``inside``, ``outside``, ``remote``, ``state``, ``detail``...) and,
where it means something for a VPN, ``what``: ``esp-associated`` (with ``how``:
ike-signal, serialized, guess, forward), ``esp-refused`` (a drop: no host to associate the
SPI with, or parallel sessions off), ``pptp-call-up``, ``pptp-call-down``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vpnmasq.eventlog import LOG_BURST, LOG_WINDOW_S
from vpnmasq.events import (
    AddressChanged,
    EntryCreated,
    EntryExpired,
    EntryUpdated,
    Event,
    Notice,
    PacketDropped,
    Row,
)
from vpnmasq.status import KIND_IP_PROTO, kind_of, parse_host, row_matches, rows_to_wire

#: drop events per reason and window, as the log writes them; the rest are counted in a
#: ``drops-suppressed``
DROP_BURST = LOG_BURST
DROP_WINDOW_S = LOG_WINDOW_S
#: drops that refuse an ESP association (``what: esp-refused``)
ESP_REFUSALS = frozenset({"esp-unassociated", "esp-parallel-sessions-disabled"})
#: ESP states in which an SPI pair is associated (the engine's EspState names)
_ESP_JOINED = frozenset({"ESTABLISHED", "INBOUND_ONLY"})
_ADDR = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


#: the engine's word for a removal -> the stream's (others, e.g. PPTP's call-disconnect,
#: control-fin, are passed on as they are)
REMOVAL_REASONS = {
    "idle": "expired",
    "flush": "flushed",
    "contradicted": "replaced",  # a guessed ESP association another host's traffic disproved
    "address-change": "address-changed",
}
#: TCP states after a FIN or RST: such an entry expiring went away because the flow closed
_TCP_CLOSING = frozenset({"FIN_WAIT", "CLOSING", "CLOSED"})


def removal_reason(row: Row, why: str) -> str:
    if why == "idle" and row.proto == "tcp" and row.state in _TCP_CLOSING:
        return "fin-rst"
    return REMOVAL_REASONS.get(why, why)


def _what(ev: str, row: Row, old: str | None = None) -> dict[str, str]:
    kind = kind_of(row)
    if kind == "esp" and row.detail.get("spi_in", "-") != "-" and row.state in _ESP_JOINED:
        if ev == "created" or (ev == "updated" and old not in _ESP_JOINED):
            return {"what": "esp-associated", "how": row.detail.get("how", "-")}
    if kind == "gre":
        if ev == "updated" and row.state == "established":
            return {"what": "pptp-call-up"}
        if ev == "removed":
            return {"what": "pptp-call-down"}
    return {}


def entry_object(ev: str, row: Row, **extra: Any) -> dict[str, Any]:
    """An entry event: the row's fields, ``kind``, ``what`` where it applies, ``extra``."""
    (obj,) = rows_to_wire([row])
    obj = {"event": ev, "kind": kind_of(row), **obj, **extra}
    obj.update(_what(ev, row, extra.get("old_state")))
    return obj


@dataclass(slots=True)
class _Window:
    start: float
    shown: int = 0
    suppressed: int = 0


class EventStream:
    """Turns engine events into stream objects; keeps the drop windows between calls."""

    def __init__(self, row_of: Callable[[Any, float], Row]) -> None:
        """``row_of(entry, now)`` renders an entry (for state changes: built only here,
        when someone listens)."""
        self.row_of = row_of
        self.windows: dict[str, _Window] = {}

    def convert(self, events: Iterable[Event], now: float, wall: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for reason, w in list(self.windows.items()):
            if now - w.start >= DROP_WINDOW_S:
                self._end(reason, w, out)
        for ev in events:
            obj = self._one(ev, now, out)
            if obj is not None:
                out.append(obj)
        for obj in out:
            obj.setdefault("time", round(wall, 6))
        return out

    def _end(self, reason: str, w: _Window, out: list[dict[str, Any]]) -> None:
        del self.windows[reason]
        if w.suppressed:
            out.append({"event": "drops-suppressed", "reason": reason, "count": w.suppressed})

    def _one(self, ev: Event, now: float, out: list[dict[str, Any]]) -> dict[str, Any] | None:
        if isinstance(ev, PacketDropped):
            w = self.windows.get(ev.reason)
            if w is not None and now - w.start >= DROP_WINDOW_S:
                self._end(ev.reason, w, out)
                w = None
            if w is None:
                w = self.windows[ev.reason] = _Window(now)
            if w.shown >= DROP_BURST:
                w.suppressed += 1
                return None
            w.shown += 1
            obj: dict[str, Any] = {
                "event": "drop", "reason": ev.reason, "detail": ev.detail, "flow": ev.flow,
            }
            if ev.reason in ESP_REFUSALS:
                obj["what"] = "esp-refused"
            return obj
        if isinstance(ev, EntryCreated):
            return entry_object("created", ev.row)
        if isinstance(ev, EntryUpdated):
            if not ev.entry.live:
                return None  # gone in the same batch: its removal follows
            row = self.row_of(ev.entry, now)
            return entry_object("updated", row, old_state=ev.old, state=ev.new)
        if isinstance(ev, EntryExpired):
            return entry_object("removed", ev.row, reason=removal_reason(ev.row, ev.why),
                                why=ev.why)
        if isinstance(ev, Notice):
            return {"event": "notice", "topic": ev.topic, "message": ev.message}
        if isinstance(ev, AddressChanged):
            return {
                "event": "address-changed", "old": ev.old, "new": ev.new,
                "entries_dropped": ev.entries_dropped,
            }
        return None


@dataclass(frozen=True, slots=True)
class EventFilter:
    """``--proto`` / ``--host`` for the stream: entry events as ``status`` filters rows;
    drops by the protocol and addresses of their flow; other events only unfiltered."""

    proto: str | None = None
    host: ipaddress.IPv4Network | None = None

    @classmethod
    def from_request(cls, req: Mapping[str, Any]) -> EventFilter:
        proto, host = req.get("proto"), req.get("host")
        if proto is not None and (not isinstance(proto, str) or not proto.strip()):
            raise ValueError("proto: expected a protocol or helper name")
        if host is not None and not isinstance(host, str):
            raise ValueError("host: expected an address or network")
        return cls(proto.strip().lower() if proto else None, parse_host(host) if host else None)

    def __call__(self, obj: Mapping[str, Any]) -> bool:
        if self.proto is None and self.host is None:
            return True
        ev = obj.get("event")
        if ev in ("created", "updated", "removed"):
            return row_matches(_row_view(obj), self.proto, self.host)
        if ev == "drop":
            flow = str(obj.get("flow", ""))
            if self.proto is not None:
                want = KIND_IP_PROTO.get(self.proto, self.proto)  # a helper: its IP protocol
                if flow.split(" ", 1)[0].lower() != want:
                    return False
            if self.host is not None:
                return any(ipaddress.IPv4Address(a) in self.host for a in _ADDR.findall(flow))
            return True
        if ev == "drops-suppressed":
            return self.host is None
        return False


def _row_view(obj: Mapping[str, Any]) -> Row:
    return Row(
        str(obj.get("proto", "")), str(obj.get("inside", "")), str(obj.get("outside", "")),
        str(obj.get("remote", "")), str(obj.get("state", "")), 0.0,
        detail={k: str(v) for k, v in dict(obj.get("detail") or {}).items()},
    )
