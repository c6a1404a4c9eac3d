"""Serving ``status`` from a live engine: server-side filters, --limit, and an answer made
of small slices (each ``next()`` of the stream is one bounded piece of work)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tests.packets import IN, NO_HOST_LIMITS, OUT, PRV1, PRV2, accepted, build_udp, make_engine
from vpnmasq.engine import Engine
from vpnmasq.packet.ipv4 import ip_to_int
from vpnmasq.status import (
    ROWS_PER_SLICE,
    SCAN_PER_SLICE,
    StatusQuery,
    answer_stream,
    rows_from_wire,
)

REMOTE = ip_to_int("203.0.113.9")
OTHER = ip_to_int("203.0.113.77")


def filled(n: int, *, now: float = 1.0) -> Engine:
    """``n`` UDP mappings from PRV1 (ports 20000...) to REMOTE, one more from PRV2 to OTHER."""
    # one host with many mappings at once: without the per-host limits on by default
    eng = make_engine(limits=replace(NO_HOST_LIMITS, max_entries=n + 10))
    for i in range(n):
        accepted(eng.handle(build_udp(PRV1, REMOTE, 20000 + i, 53), OUT, now))
    accepted(eng.handle(build_udp(PRV2, OTHER, 5000, 4444), OUT, now))
    return eng


def serve(eng: Engine, q: StatusQuery, now: float = 2.0) -> tuple[dict[str, object], int]:
    """The answer line parsed, and the number of pieces it came in."""
    pieces = list(
        answer_stream(
            list(eng.table.index.values()), q, lambda e: eng.row(e, now),
            lambda: {"counters": dict(eng.counters)},
        )
    )
    line = b"".join(pieces)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    return json.loads(line), len(pieces)


def test_every_entry_once_although_indexed_twice() -> None:
    eng = filled(50)
    doc, _ = serve(eng, StatusQuery())
    assert doc["ok"] is True
    rows = rows_from_wire(doc["entries"])
    assert len(rows) == 51 == doc["total_entries"] == doc["matched"]
    assert len({r.inside for r in rows}) == 51
    assert doc["counters"]["created:napt"] == 51  # type: ignore[index]


def test_filters_are_applied_by_the_server() -> None:
    eng = filled(30)
    doc, _ = serve(eng, StatusQuery(host="203.0.113.77"))
    assert [r.remote for r in rows_from_wire(doc["entries"])] == ["203.0.113.77:4444"]
    assert doc["total_entries"] == 31 and doc["matched"] == 1
    doc, _ = serve(eng, StatusQuery(proto="esp"))
    assert doc["entries"] == [] and doc["matched"] == 0
    doc, _ = serve(eng, StatusQuery(proto="udp", host="10.77.0.0/24"))
    assert doc["matched"] == 31


def test_limit_keeps_the_most_recently_active() -> None:
    eng = filled(40)
    # replies for two mappings make them the most recent
    for port, t in ((20007, 5.0), (20033, 6.0)):
        out = accepted(eng.handle(build_udp(PRV1, REMOTE, port, 53), OUT, t))
        alias = int.from_bytes(out.buf[out.ihl : out.ihl + 2], "big")
        accepted(eng.handle(build_udp(REMOTE, ip_to_int("198.51.100.1"), 53, alias), IN, t))
    doc, _ = serve(eng, StatusQuery(limit=2), now=7.0)
    assert [r.inside for r in rows_from_wire(doc["entries"])] == [
        "10.77.0.11:20033", "10.77.0.11:20007",
    ]
    assert doc["matched"] == 41


def test_a_removed_entry_is_left_out() -> None:
    eng = filled(10)
    refs = list(eng.table.index.values())
    victim = next(e for e in refs if e.inside_port == 20003)
    eng.table.remove(victim, "flush")
    pieces = answer_stream(refs, StatusQuery(), lambda e: eng.row(e, 2.0), dict)
    doc = json.loads(b"".join(pieces))
    assert "10.77.0.11:20003" not in {r["inside"] for r in doc["entries"]}
    assert doc["total_entries"] == 10


def test_a_big_table_comes_in_bounded_slices() -> None:
    n = 3000
    eng = filled(n)
    doc, pieces = serve(eng, StatusQuery())
    assert doc["matched"] == n + 1
    assert pieces >= (n + 1) // ROWS_PER_SLICE  # at most ROWS_PER_SLICE rows per piece
    doc, pieces = serve(eng, StatusQuery(host="203.0.113.77"))
    assert doc["matched"] == 1
    assert pieces >= 2 * (n + 1) // SCAN_PER_SLICE  # the scan yields too


@pytest.mark.parametrize(
    ("req", "message"),
    [
        ({"host": "10.0.0.300"}, "not an IPv4 address"),
        ({"limit": 0}, "limit"),
        ({"limit": True}, "limit"),
        ({"proto": 7}, "proto"),
    ],
)
def test_bad_requests_are_refused(req: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StatusQuery.from_request(req)


def test_query_round_trips_through_a_request() -> None:
    q = StatusQuery("esp", "10.77.0.0/24", 5)
    assert StatusQuery.from_request(q.to_request()) == q
    assert StatusQuery().to_request() == {"cmd": "status"}

