"""The table's lazy LRU lists: using an entry moves only its deadline, never its
place in its class list, yet expiry and ``next_deadline()`` stay exact.

Checked against a plain model (a dict of deadlines): after any sequence of adds, uses, class
changes, removals and clock steps, ``next_deadline()`` is the earliest deadline, ``expire(now)``
removes exactly the entries due, earliest first, and iteration lists every live entry once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.packets import EXT, IN, MASQ, OUT, PRV1, build_udp, l4_ports, make_engine
from vpnmasq.conntrack.table import PERMANENT, Entry, MasqTable, standard_keys

TIMEOUTS = {"udp": 30.0, "tcp_established": 100.0, "tcp_transitory": 10.0}


def entry(port: int, tclass: str = "udp") -> Entry:
    return Entry(17, "napt", tclass, PRV1, port, EXT, 53, MASQ, port, 0.0)


def table(**kw: object) -> tuple[MasqTable, list[tuple[Entry, str]]]:
    removed: list[tuple[Entry, str]] = []
    t = MasqTable(TIMEOUTS, 1000, on_remove=lambda e, why: removed.append((e, why)), **kw)  # type: ignore[arg-type]
    return t, removed


def test_a_used_head_does_not_hide_the_next_deadline() -> None:
    t, _ = table()
    a, b = entry(1000), entry(1001)
    t.add(a, 0.0, standard_keys(a))  # type: ignore[arg-type]
    t.add(b, 10.0, standard_keys(b))  # type: ignore[arg-type]
    order = list(t._lru["udp"])
    t.touch(a, 20.0)  # a now expires at 50, after b (40)
    assert list(t._lru["udp"]) == order  # nothing moved on use
    assert a.expires_at == 50.0
    assert t.next_deadline() == 40.0
    assert list(t._lru["udp"]) == [b, a]  # the stale head was filed again, behind b


def test_an_entry_leaving_from_the_heap_is_released_at_once() -> None:
    t, removed = table()
    a, b = entry(1000), entry(1001)
    t.add(a, 0.0, standard_keys(a))  # type: ignore[arg-type]
    t.add(b, 1.0, standard_keys(b))  # type: ignore[arg-type]
    t.touch(a, 5.0)
    assert t.next_deadline() == 31.0  # a moved to the heap under 35
    lst = t._lru["udp"]
    assert [item[2] for item in lst.heap] == [a]
    t.remove(a)
    assert lst.heap[0][2] is None  # blanked: the table keeps no reference to a
    assert list(lst) == [b] and len(lst) == 1
    t.set_class(b, "tcp_established", 6.0)
    assert t.next_deadline() == 106.0 and not t._lru["udp"]
    assert t.expire(200.0) == 1 and [e for e, _ in removed] == [a, b]


def test_expire_removes_exactly_what_is_due_earliest_first() -> None:
    t, removed = table()
    es = [entry(1000 + i) for i in range(4)]
    for i, e in enumerate(es):
        t.add(e, float(i), standard_keys(e))  # type: ignore[arg-type]
    t.touch(es[0], 5.0)  # 35: later than es[1..3] (31..33)
    t.touch(es[2], 4.0)  # 34
    assert t.expire(33.0) == 2
    assert [e for e, _ in removed] == [es[1], es[3]]
    assert all(why == "idle" for _, why in removed)
    assert t.next_deadline() == 34.0
    assert t.expire(35.0) == 2
    assert [e for e, _ in removed][2:] == [es[2], es[0]]
    assert len(t) == 0 and t.next_deadline() is None and t.index == {}


def test_a_clock_that_goes_back_relinks_at_once() -> None:
    t, _ = table()
    a, b = entry(1000), entry(1001)
    t.add(a, 10.0, standard_keys(a))  # type: ignore[arg-type]
    t.add(b, 12.0, standard_keys(b))  # type: ignore[arg-type]
    t.touch(a, 5.0)  # earlier than it was linked with: to the tail, as an eager list did
    assert a.expires_at == 35.0
    assert list(t._lru["udp"]) == [b, a]


def test_expiry_floats_are_shared_per_class_and_instant() -> None:
    t, _ = table()
    a, b = entry(1000), entry(1001)
    t.add(a, 1.5, standard_keys(a))  # type: ignore[arg-type]
    t.add(b, 1.5, standard_keys(b))  # type: ignore[arg-type]
    assert a.expires_at == b.expires_at == 31.5
    assert a.expires_at is b.expires_at  # one object per (class, now): no float per packet
    t.set_class(b, "tcp_established", 1.5)
    assert b.expires_at == 101.5


def test_the_fast_path_leaves_list_neighbours_alone() -> None:
    eng = make_engine()
    flows = []
    for port in (40000, 40001, 40002):
        v = eng.handle(build_udp(PRV1, EXT, port, 53, b"q"), OUT, 0.0)
        flows.append(l4_ports(v)[0])
    for port, alias in zip((40000, 40001, 40002), flows, strict=True):
        assert eng.handle(build_udp(EXT, MASQ, 53, alias, b"r"), IN, 1.0).accepted
        assert eng.handle(build_udp(PRV1, EXT, port, 53, b"q"), OUT, 1.0).accepted
    lst = eng.table._lru["udp"]
    before = list(lst)
    hits = 0
    inner = eng._fast
    for t in (2.0, 3.0):
        pkt = build_udp(PRV1, EXT, 40000, 53, b"q")
        if inner(pkt, OUT, t) is not None:
            hits += 1
    assert hits == 2
    assert list(lst) == before  # used, not moved
    first = before[0]
    assert first.expires_at == 3.0 + eng.timeouts["udp"]
    # the others were last used at 1.0: the next deadline is theirs, and it is exact
    assert eng.table.next_deadline() == 1.0 + eng.timeouts["udp"]
    eng.handle_timer(1.0 + eng.timeouts["udp"])
    assert list(eng.table._lru["udp"]) == [first]


def test_entries_of_lists_least_recently_used_first() -> None:
    t, _ = table()
    es = [entry(1000 + i) for i in range(3)]
    for e in es:
        t.add(e, 0.0, standard_keys(e))  # type: ignore[arg-type]
    t.touch(es[0], 2.0)
    t.touch(es[1], 1.0)
    assert t.entries_of("udp") == [es[2], es[1], es[0]]
    assert t.entries_of("nothing") == []


OPS = st.lists(
    st.tuples(
        st.sampled_from(("add", "touch", "class", "remove", "advance", "expire", "deadline")),
        st.integers(0, 11),
        st.sampled_from(("udp", "tcp_established", "tcp_transitory", PERMANENT)),
        st.floats(0.0, 40.0, allow_nan=False),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_lazy_lists_agree_with_a_model_of_deadlines(ops: list[tuple[str, int, str, float]]) -> None:
    t, removed = table()
    live: dict[int, Entry] = {}
    now = 0.0
    for op, i, tclass, dt in ops:
        e = live.get(i)
        if op == "add" and e is None:
            e = entry(1000 + i, tclass)
            t.add(e, now, standard_keys(e))  # type: ignore[arg-type]
            live[i] = e
        elif op == "touch" and e is not None:
            old = e.expires_at
            t.touch(e, now)
            assert e.expires_at == (old if e.tclass == PERMANENT else now + TIMEOUTS[e.tclass])
        elif op == "class" and e is not None:
            t.set_class(e, tclass, now)
        elif op == "remove" and e is not None:
            t.remove(e)
            del live[i]
        elif op == "advance":
            now += dt
        elif op == "expire":
            due = sorted((x.expires_at, k) for k, x in live.items() if x.expires_at <= now)
            del removed[:]
            assert t.expire(now) == len(due)
            assert sorted(e.expires_at for e, _ in removed) == [d for d, _ in due]
            assert [e.expires_at for e, _ in removed] == sorted(e.expires_at for e, _ in removed)
            for _, k in due:
                assert not live.pop(k).live
        finite = [x.expires_at for x in live.values() if x.tclass != PERMANENT]
        assert t.next_deadline() == (min(finite) if finite else None)
        assert sorted(map(id, t)) == sorted(map(id, live.values()))
        assert len(t) == len(live) == sum(len(lst) for lst in t._lru.values())
        for tc, lst in t._lru.items():
            assert all(x.tclass == tc and x.live for x in lst)


def test_expire_removes_in_deadline_order_across_classes() -> None:
    """A udp entry (30 s) and a transitory TCP entry (10 s) added together and both due: the
    one that timed out first is removed first, whatever the order of the class lists."""
    t, removed = table()
    for i, tclass in enumerate(("udp", "tcp_transitory")):
        e = entry(1000 + i, tclass)
        t.add(e, 0.0, standard_keys(e))  # type: ignore[arg-type]
    assert t.expire(30.0) == 2
    assert [e.expires_at for e, _ in removed] == [10.0, 30.0]
