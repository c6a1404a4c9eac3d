"""What the two gateways of a pair exchange about the table, as pure state machines.

The records are the state file's (``vpnmasq.state``): the active gateway exports its table
with stable ids, and :class:`Publisher` turns successive exports into DELTA bodies (records
that changed, ids that went away) and, every ``full_sync_interval`` or when the standby
asks, FULL bodies (the whole table in parts). :class:`Replica` on the standby applies them
in sequence order and, at takeover, hands :func:`vpnmasq.state.import_state` a state built
from what it holds, each record aged by how long it was held.

A record counts as changed when anything but its clocks and counters changed (times are
the floats; ages, expiry, last-seen and packet counts move with every packet): the full sync
bounds how stale those are on the standby. A missed message (a gap in the sequence numbers,
a new epoch) makes the replica ask for a full sync; until it arrives deltas are still
applied, best effort.

:func:`split_ranges` gives each node its half of every identifier range, so two active
gateways (split brain) never hand the same port, ICMP id or Call ID to two hosts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Set
from typing import Any

from vpnmasq.config import DEFAULT_LOCAL_PORT_RANGE, HYBRID_PORT_RANGE, Config, PortRange
from vpnmasq.conntrack.pool import FIRST_HIGH_PORT
from vpnmasq.conntrack.table import Entry
from vpnmasq.state import STATE_FORMAT, STATE_VERSION
from vpnmasq.sync.codec import Kind, Message, SyncError

#: JSON bytes of records per message before compression; with the header and tag it
#: always fits one datagram (codec.MAX_DATAGRAM), even if nothing compresses
MAX_BODY_RAW = 48_000
#: record fields that move with every packet or with time alone (not a "change")
VOLATILE = frozenset({"age", "expires_in", "last", "pkts", "bytes", "last_ack_out", "held"})


def stable_id(e: Entry) -> int:
    """An id for ``e`` that stays the same while it lives (a recycled object address comes
    with another creation time)."""
    return hash((id(e), e.created)) & ((1 << 62) - 1)


def _half(r: PortRange, node: int) -> PortRange:
    if r.low == r.high:
        return r
    mid = (r.low + r.high) // 2
    return PortRange(r.low, mid) if node == 1 else PortRange(mid + 1, r.high)


def _auto_span(config: Config) -> PortRange:
    """port_range = "auto" as one range that both nodes can halve: hybrid mode's range, or
    in userspace mode the largest block of a default system's pool (below the ephemeral
    range). The rest of the auto pool goes unused on a pair of nodes."""
    if config.mode == "hybrid":
        return HYBRID_PORT_RANGE
    return PortRange(FIRST_HIGH_PORT, DEFAULT_LOCAL_PORT_RANGE.low - 1)


def pair_ranges(config: Config) -> Config:
    """``config`` with the port range the two nodes' halves come from spelled out (what a
    takeover accepts from the peer)."""
    return dataclasses.replace(config, port_range=config.port_range or _auto_span(config))


def split_ranges(config: Config, node: int) -> Config:
    """``config`` with node 1's lower or node 2's upper half of each identifier range."""
    return dataclasses.replace(
        config,
        port_range=_half(config.port_range or _auto_span(config), node),
        low_port_range=_half(config.low_port_range, node),
        icmp_id_range=_half(config.icmp_id_range, node),
        call_id_range=_half(config.call_id_range, node),
        kernel_port_range=_half(config.kernel_port_range, node),
    )


def _strip_floats(v: Any) -> Any:
    t = type(v)
    if t is float:
        return None
    if t is dict:
        return {k: _strip_floats(x) for k, x in v.items()}
    if t is list:
        return [_strip_floats(x) for x in v]
    return v


#: the record fields that hold helper state, where times are floats at any depth (elsewhere
#: the floats are the VOLATILE fields)
_NESTED = frozenset({"ext", "alg"})


def fingerprint(rec: Mapping[str, Any]) -> str:
    """What must match for a record to count as unchanged (the record's field order is
    fixed by the export)."""
    return repr(
        [
            (k, _strip_floats(v) if k in _NESTED and v is not None else v)
            for k, v in rec.items()
            if k not in VOLATILE
        ]
    )


def entry_records(export: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """An export's entries by id, each with its binding inlined (indexes into the export's
    binding list mean nothing in another export)."""
    bindings = export["bindings"]
    out: dict[int, dict[str, Any]] = {}
    for rec in export["entries"]:
        r = dict(rec)
        b = r.get("binding")
        r["binding"] = None if b is None else bindings[b]
        out[r["id"]] = r
    return out


def _chunks(items: list[tuple[str, Any]]) -> list[list[tuple[str, Any]]]:
    """Items (("r", record) or ("x", removed id)) in groups of at most MAX_BODY_RAW bytes."""
    out: list[list[tuple[str, Any]]] = []
    cur: list[tuple[str, Any]] = []
    size = 0
    for item in items:
        n = len(json.dumps(item[1], separators=(",", ":"))) + 1
        if cur and size + n > MAX_BODY_RAW:
            out.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += n
    if cur or not out:
        out.append(cur)
    return out


def _body(part: list[tuple[str, Any]]) -> dict[str, Any]:
    return {
        "records": [v for k, v in part if k == "r"],
        "remove": [v for k, v in part if k == "x"],
    }


class Publisher:
    """The active side: exports in, message bodies out."""

    def __init__(self, full_interval: float) -> None:
        self.full_interval = full_interval
        self.sent: dict[int, str] = {}  # id -> fingerprint the standby has
        self.next_full = 0.0
        self.full_no = 0

    def request_full(self) -> None:
        """The standby asked (or messages were dropped): everything goes at the next tick."""
        self.next_full = 0.0

    def messages(
        self, export: Mapping[str, Any], now: float, present: Set[int] | None = None
    ) -> list[tuple[Kind, dict[str, Any]]]:
        """Bodies for ``export``: the whole table when a full sync is due, else what
        changed. ``present``: the export covers only some entries (the ids of all live
        ones are given, for removals); only a whole-table export can start a full sync."""
        recs = entry_records(export)
        meta = {"public": export["public_address"], "mode": export["mode"]}
        prints = {rid: fingerprint(r) for rid, r in recs.items()}
        if present is None and now >= self.next_full:
            self.next_full = now + self.full_interval
            self.full_no += 1
            self.sent = prints
            parts = _chunks([("r", r) for r in recs.values()])
            return [
                (
                    Kind.FULL,
                    {**meta, "sync": self.full_no, "part": i, "parts": len(parts), **_body(p)},
                )
                for i, p in enumerate(parts)
            ]
        items: list[tuple[str, Any]] = [
            ("r", recs[rid]) for rid, fp in prints.items() if self.sent.get(rid) != fp
        ]
        alive = recs.keys() if present is None else present
        gone = [rid for rid in self.sent if rid not in alive]
        items += [("x", rid) for rid in gone]
        if present is None:
            self.sent = prints
        else:
            for rid in gone:
                del self.sent[rid]
            self.sent.update(prints)
        if not items:
            return []
        return [(Kind.DELTA, {**meta, **_body(p)}) for p in _chunks(items)]


class Replica:
    """The standby side: the peer's table as records, applied in sequence order."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.clear()

    def clear(self) -> None:
        """Forget the table (it was taken over, or this gateway became active)."""
        self.records: dict[int, tuple[dict[str, Any], float]] = {}  # id -> (record, received)
        self.public: str | None = None
        self.mode: str | None = None
        self.synced = False  # a complete full sync and no message missed since
        self.have_table = False  # a full sync arrived at some point
        self.epoch: int | None = None
        self.seq = 0
        self._full: dict[str, Any] | None = None  # the full sync being assembled

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    @property
    def want_full(self) -> bool:
        return not self.synced

    def receive(self, msg: Message, now: float) -> None:
        """Apply one authenticated message; SyncError("sync_malformed") for a body this
        version cannot read (the records held so far stay)."""
        in_order = msg.epoch == self.epoch and msg.seq == self.seq + 1
        if msg.epoch == self.epoch and msg.seq <= self.seq:
            self._count("sync_late")  # reordered behind a newer one: cannot be applied
            self.synced = False
            return
        if not in_order:
            if self.epoch is not None:
                self._count("sync_gap")
            self.synced = False
            self._full = None
        self.epoch, self.seq = msg.epoch, msg.seq
        b = msg.body
        try:
            if msg.kind is Kind.FULL:
                self._on_full(b, now)
            elif msg.kind is Kind.DELTA:
                self._on_delta(b, now)
        except (KeyError, TypeError, ValueError) as exc:
            self._full = None
            self.synced = False
            raise SyncError("sync_malformed", f"{msg.kind.name}: {exc}") from None

    @staticmethod
    def _records(b: Mapping[str, Any]) -> list[dict[str, Any]]:
        recs = b["records"]
        if not isinstance(recs, list) or not all(
            isinstance(r, dict) and type(r.get("id")) is int for r in recs
        ):
            raise ValueError("records must be objects with an integer id")
        return recs

    def _on_full(self, b: Mapping[str, Any], now: float) -> None:
        part, parts, no = int(b["part"]), int(b["parts"]), int(b["sync"])
        if part == 0:
            self._full = {"sync": no, "next": 0, "records": {}}
        f = self._full
        if f is None or f["sync"] != no or f["next"] != part:
            return  # joined in the middle of a full sync: wait for the next one
        for r in self._records(b):
            f["records"][r["id"]] = (r, now)
        f["next"] = part + 1
        if f["next"] == parts:
            self.records = f["records"]
            self.public, self.mode = b["public"], b["mode"]
            self.synced = self.have_table = True
            self._full = None
            self._count("sync_full_applied")

    def _on_delta(self, b: Mapping[str, Any], now: float) -> None:
        if not self.have_table:
            return  # nothing to apply it to: the full sync will bring it
        for r in self._records(b):
            self.records[r["id"]] = (r, now)
        for rid in b["remove"]:
            self.records.pop(int(rid), None)
        self.public, self.mode = b["public"], b["mode"]
        self._count("sync_delta_applied")

    def state(self, now: float, wall: float) -> dict[str, Any]:
        """What this replica holds as a state for ``import_state(engine, s, now, wall)``:
        records with an ALG first (others refer to them), each with ``held``."""
        entries: list[dict[str, Any]] = []
        bindings: list[Any] = []
        bidx: dict[str, int] = {}
        held = sorted(self.records.values(), key=lambda rt: rt[0].get("alg") is None)
        for rec, received in held:
            r = dict(rec)
            b = r.get("binding")
            if b is not None:
                k = json.dumps(b, sort_keys=True)
                if k not in bidx:
                    bidx[k] = len(bindings)
                    bindings.append(b)
                r["binding"] = bidx[k]
            r["held"] = max(0.0, now - received)
            entries.append(r)
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "saved_at": wall,
            "public_address": self.public,
            "mode": self.mode,
            "entries": entries,
            "bindings": bindings,
            "skipped": {},
        }


__all__ = [
    "MAX_BODY_RAW",
    "Publisher",
    "Replica",
    "entry_records",
    "fingerprint",
    "split_ranges",
    "stable_id",
]
