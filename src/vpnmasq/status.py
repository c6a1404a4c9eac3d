"""The status answer: the masquerade table on the control socket, its wire format and filters.

The daemon answers ``status`` on its control socket with :func:`status_payload`
(rows as JSON via :func:`rows_to_wire`); ``vpnmasq status`` turns the answer back into rows
(:func:`rows_from_wire`) and prints them with :mod:`vpnmasq.tools.status`.

Design notes, kernel facts and measurements: docs/internals/tools-status.md.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vpnmasq.conntrack.table import Entry
from vpnmasq.events import Row
from vpnmasq.packet.ipv4 import PROTO_NAMES

# kind -> ((detail key, column header), ...), in display order
DETAIL_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "esp": (("spi_out", "SPI-OUT"), ("spi_in", "SPI-IN"), ("assoc", "ASSOC"), ("how", "HOW")),
    "isakmp": (("icookie", "I-COOKIE"), ("rcookie", "R-COOKIE"), ("version", "VERSION")),
    "gre": (
        ("call_id_inside", "CALL-IN"),
        ("call_id_outside", "CALL-OUT"),
        ("peer_call_id", "PEER-CALL"),
    ),
    "pptp": (("call_ids", "CALL-IDS IN>OUT"), ("control", "CONTROL")),
    "natt": (("natt", "NAT-T"), ("spi_out", "SPI-OUT"), ("spi_in", "SPI-IN")),
}
# detail key that identifies a helper's row when the IP protocol does not (UDP, TCP)
MARKER_KEYS: dict[str, str] = {"icookie": "isakmp", "natt": "natt", "call_ids": "pptp"}

_ADDR = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3})(?::(\d+))?")


# ------------------------------------------------------------------------------ helpers
def kind_of(row: Row) -> str:
    """Which helper's view applies (see the module docstring)."""
    explicit = row.detail.get("kind") or row.detail.get("alg")
    if explicit:
        return explicit
    if row.proto in DETAIL_COLUMNS:
        return row.proto
    for key, kind in MARKER_KEYS.items():
        if key in row.detail:
            return kind
    return row.proto


def _addr(endpoint: str) -> ipaddress.IPv4Address | None:
    m = _ADDR.match(endpoint)
    if not m:
        return None
    try:
        return ipaddress.IPv4Address(m.group(1))
    except ValueError:
        return None


def sort_key(row: Row) -> tuple[Any, ...]:
    def ep(s: str) -> tuple[int, int, str]:
        m = _ADDR.match(s)
        a = _addr(s)
        return (int(a) if a else -1, int(m.group(2)) if m and m.group(2) else -1, s)

    return (row.proto, kind_of(row), ep(row.inside), ep(row.remote), ep(row.outside))


def parse_host(host: str) -> ipaddress.IPv4Network:
    """A host filter: an address or a CIDR network. Raises ValueError with a clear message."""
    try:
        return ipaddress.IPv4Network(host.strip(), strict=False)
    except ValueError:
        raise ValueError(f"'{host}' is not an IPv4 address or network") from None


def row_matches(row: Row, proto: str | None, net: ipaddress.IPv4Network | None) -> bool:
    """``row`` is of protocol (or helper kind) ``proto`` and involves ``net`` on any side."""
    if proto is not None and proto not in (row.proto.lower(), kind_of(row).lower()):
        return False
    if net is not None:
        addrs = (_addr(row.inside), _addr(row.outside), _addr(row.remote))
        if not any(a is not None and a in net for a in addrs):
            return False
    return True


def filter_rows(
    rows: Iterable[Row], *, proto: str | None = None, host: str | None = None
) -> list[Row]:
    """Rows of protocol (or helper kind) ``proto`` that involve ``host`` on any side."""
    net = parse_host(host) if host else None
    want = proto.lower() if proto else None
    return sorted((r for r in rows if row_matches(r, want, net)), key=sort_key)


# ------------------------------------------------------------------------------ wire format
def rows_to_wire(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (``expires_in`` infinity -> null)."""
    out: list[dict[str, Any]] = []
    for r in rows:
        exp = None if math.isinf(r.expires_in) or math.isnan(r.expires_in) else r.expires_in
        out.append(
            {
                "proto": r.proto,
                "inside": r.inside,
                "outside": r.outside,
                "remote": r.remote,
                "state": r.state,
                "expires_in": exp,
                "pkts_out": r.pkts_out,
                "pkts_in": r.pkts_in,
                "bytes_out": r.bytes_out,
                "bytes_in": r.bytes_in,
                "detail": dict(r.detail),
                "offloaded": r.offloaded,
                "last_seen_out": r.last_seen_out,
                "last_seen_in": r.last_seen_in,
            }
        )
    return out


def rows_from_wire(data: object) -> list[Row]:
    """Inverse of :func:`rows_to_wire`. Unknown fields are ignored (newer daemons may add
    some); missing or mistyped ones raise ValueError naming the entry and field."""
    if not isinstance(data, list):
        raise ValueError("entries: expected a list")
    rows: list[Row] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"entries[{i}]: expected an object")

        def get(
            name: str, typ: type | tuple[type, ...], item: dict[str, Any] = item, i: int = i
        ) -> Any:
            if name not in item:
                raise ValueError(f"entries[{i}].{name}: missing")
            v = item[name]
            if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
                raise ValueError(f"entries[{i}].{name}: unexpected {type(v).__name__}")
            return v

        exp = item.get("expires_in")
        if exp is None:
            expires = math.inf
        elif isinstance(exp, int | float) and not isinstance(exp, bool):
            expires = float(exp)
        else:
            raise ValueError(f"entries[{i}].expires_in: unexpected {type(exp).__name__}")
        seen: list[float | None] = []
        for name in ("last_seen_out", "last_seen_in"):  # optional: older daemons lack them
            v = item.get(name)
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool)):
                raise ValueError(f"entries[{i}].{name}: unexpected {type(v).__name__}")
            seen.append(None if v is None else float(v))
        detail = item.get("detail", {})
        if not isinstance(detail, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in detail.items()
        ):
            raise ValueError(f"entries[{i}].detail: expected an object of strings")
        rows.append(
            Row(
                proto=get("proto", str),
                inside=get("inside", str),
                outside=get("outside", str),
                remote=get("remote", str),
                state=get("state", str),
                expires_in=expires,
                pkts_out=get("pkts_out", int),
                pkts_in=get("pkts_in", int),
                bytes_out=get("bytes_out", int),
                bytes_in=get("bytes_in", int),
                detail=dict(detail),
                offloaded=bool(item.get("offloaded", False)),
                last_seen_out=seen[0],
                last_seen_in=seen[1],
            )
        )
    return rows


def status_payload(rows: Iterable[Row], counters: Mapping[str, int]) -> dict[str, Any]:
    """What the daemon's control socket returns for ``status`` (a small table at once)."""
    return {"entries": rows_to_wire(rows), "counters": dict(counters)}


# ------------------------------------------------------------------------------ serving
#: helper kinds whose rows are all of one IP protocol (lets the server skip the others
#: without building their rows)
KIND_IP_PROTO = {"isakmp": "udp", "natt": "udp", "pptp": "tcp"}
_PROTO_NUMBERS = {name: num for num, name in PROTO_NAMES.items()}
#: a slice of a status answer: at most this many rows built, or entries looked at
ROWS_PER_SLICE = 32
SCAN_PER_SLICE = 1024
#: --limit caps what one answer carries
MAX_LIMIT = 1_000_000


@dataclass(frozen=True, slots=True)
class StatusQuery:
    """What a ``status`` request asks for: server-side filters and a row limit.

    ``limit`` keeps the ``limit`` most recently active matching entries (latest packet
    either way; newest first), so ``status --limit 20`` on a table of 100,000 sends 20 rows.
    """

    proto: str | None = None
    host: str | None = None
    limit: int | None = None

    @classmethod
    def from_request(cls, req: Mapping[str, Any]) -> StatusQuery:
        """From the request object; ValueError with a message for the operator."""
        proto, host, limit = req.get("proto"), req.get("host"), req.get("limit")
        if proto is not None and (not isinstance(proto, str) or not proto.strip()):
            raise ValueError("proto: expected a protocol or helper name")
        if host is not None:
            if not isinstance(host, str):
                raise ValueError("host: expected an address or network")
            parse_host(host)
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= MAX_LIMIT
        ):
            raise ValueError(f"limit: expected a whole number from 1 to {MAX_LIMIT}")
        return cls(proto.strip().lower() if proto else None, host, limit)

    def to_request(self) -> dict[str, Any]:
        req: dict[str, Any] = {"cmd": "status"}
        for k in ("proto", "host", "limit"):
            v = getattr(self, k)
            if v is not None:
                req[k] = v
        return req


def _entry_filter(q: StatusQuery) -> Callable[[Entry], bool]:
    """A cheap test on the entry's own fields, true for every entry whose row can match."""
    num = _PROTO_NUMBERS.get(KIND_IP_PROTO.get(q.proto, q.proto)) if q.proto else None
    if q.host is not None:
        net = parse_host(q.host)
        base, mask = int(net.network_address), int(net.netmask)
    else:
        base = mask = -1

    def ok(e: Entry) -> bool:
        if num is not None and e.proto != num:
            return False
        if mask >= 0:
            return (
                e.inside_ip & mask == base or e.remote_ip & mask == base or e.alias_ip & mask == base
            )
        return True

    return ok


def _activity(e: Entry) -> float:
    a, b = e.last_out, e.last_in
    if a is None:
        return e.created if b is None else b
    return a if b is None or a > b else b


def answer_stream(
    entries: Sequence[Entry],
    query: StatusQuery,
    row: Callable[[Entry], Row],
    tail: Callable[[], Mapping[str, Any]],
) -> Iterator[bytes]:
    """The answer to ``status`` as pieces of one JSON line, a slice of work per piece.

    ``entries`` is a copy of the table's references taken at the request (a C-speed list
    copy; an entry appears once per index key, and one removed since is skipped); ``row``
    renders one entry, ``tail`` gives the counters (and whatever else) at the end. The
    caller (the control server) runs one ``next()`` at a time between packet batches, so a
    big table never holds the packet loop for longer than a slice; each piece may be empty.
    The line is ``{"ok":true,"entries":[...],"total_entries":N,"matched":M,<tail>}``.
    """
    want, net = query.proto, parse_host(query.host) if query.host else None
    cheap = _entry_filter(query)
    # an IP protocol name and a host are decided by the entry's fields alone; a helper
    # kind (isakmp, natt, pptp) needs the row
    exact = want is None or want in _PROTO_NUMBERS
    limit = query.limit
    seen: set[int] = set()
    total = matched = scanned = 0
    ranked: list[tuple[float, int, Entry]] = []  # min-heap of the most recent (limit)
    batch: list[Row] = []
    first = True

    def encode(rows: list[Row]) -> bytes:
        nonlocal first
        text = json.dumps(rows_to_wire(rows), separators=(",", ":"), allow_nan=False)[1:-1]
        out = text.encode() if first else b"," + text.encode()
        first = False
        return out

    yield b'{"ok":true,"entries":['
    for e in entries:
        scanned += 1
        if scanned >= SCAN_PER_SLICE:
            scanned = 0
            yield b""
        k = id(e)
        if k in seen or not e.live:
            continue
        seen.add(k)
        total += 1
        if not cheap(e):
            continue
        r = None if exact else row(e)
        if r is not None and not row_matches(r, want, net):
            continue
        matched += 1
        if limit is not None:
            item = (_activity(e), k, e)
            if len(ranked) < limit:
                heapq.heappush(ranked, item)
            elif item[0] > ranked[0][0]:
                heapq.heapreplace(ranked, item)
            continue
        batch.append(r if r is not None else row(e))
        if len(batch) >= ROWS_PER_SLICE:
            yield encode(batch)
            batch = []
            scanned = 0
    for _, _, e in sorted(ranked, key=lambda t: (-t[0], t[1])):
        batch.append(row(e))
        if len(batch) >= ROWS_PER_SLICE:
            yield encode(batch)
            batch = []
    if batch:
        yield encode(batch)
    rest = json.dumps(
        {"total_entries": total, "matched": matched, **tail()},
        separators=(",", ":"),
        allow_nan=False,
    )
    yield b"]," + rest[1:].encode() + b"\n"
