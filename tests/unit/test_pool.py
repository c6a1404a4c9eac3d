"""The port pool (userspace mode's "auto": every port the gateway does not use itself), the
allocator over a pool with holes, and the per-host limits sized from the pool."""

from __future__ import annotations

import random

import pytest

from tests.packets import EXT, EXT2, MASQ, OUT, PRV1, PRV2, accepted, build_icmp, build_udp, dropped
from vpnmasq.config import Config, Forward, Limits, PortRange, load_config
from vpnmasq.conntrack.alloc import IdAllocator
from vpnmasq.conntrack.hostlimits import HOST_LIMIT_LOG_INTERVAL_S, LimitHits, host_limits
from vpnmasq.conntrack.pool import port_pool, subtract
from vpnmasq.engine import Engine
from vpnmasq.events import HostLimited
from vpnmasq.verdict import DropReason

LAN = ("10.77.0.0/24",)


def cfg(**kw: object) -> Config:
    base: dict[str, object] = {"inside_networks": LAN, "public_address": "198.51.100.1"}
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the pool
def test_userspace_auto_pool_is_every_port_but_the_gateways_own() -> None:
    pool = port_pool(cfg(mode="userspace"))  # a default system: ephemeral 32768-60999
    assert pool.ranges == ((1024, 32767), (61000, 65535))
    assert pool.size == 36280 and pool.low == (600, 1023)
    c = cfg(
        mode="userspace",
        forwards=(Forward("tcp", "10.77.0.5", port=8080), Forward("gre", "10.77.0.5")),
    )
    pool = port_pool(c, local_port_range=(40000, 50000), listening=[22, 53, 5353, 3000, 65535])
    assert pool.ranges == ((1024, 2999), (3001, 5352), (5354, 8079), (8081, 39999), (50001, 65534))
    assert 8080 not in pool and 3000 not in pool and 45000 not in pool and 700 in pool
    assert pool.size == (65535 - 1024 + 1) - 10001 - 4  # ephemeral range; 3000, 5353, 8080, 65535
    assert "ip_local_port_range 40000-50000" in pool.describe()
    assert "3 listening ports" in pool.describe()  # 22 and 53 are below the pool anyway


def test_hybrid_auto_and_explicit_ranges_are_taken_as_they_are() -> None:
    assert port_pool(cfg()).ranges == ((61000, 65535),)
    explicit = cfg(mode="userspace", port_range=PortRange(62000, 63000))
    assert port_pool(explicit, listening=[62500]).ranges == ((62000, 63000),)


def test_subtract_merges_and_cuts() -> None:
    assert subtract([(1, 10)], [3, (5, 6), 10]) == ((1, 2), (4, 4), (7, 9))
    assert subtract([(1, 10), (11, 20)], []) == ((1, 20),)
    assert subtract([(5, 5)], [(1, 9)]) == ()


def test_the_allocator_spreads_over_every_range_of_a_pool_with_holes() -> None:
    ranges = [(1024, 1030), (2000, 2002), (600, 601)]
    a = IdAllocator(ranges, random.Random(1), preserve=False)
    got = [a.allocate(5000) for _ in range(10)]
    assert sorted(p for p in got if p is not None) == [*range(1024, 1031), 2000, 2001, 2002]
    assert a.allocate(5000) is None  # the high pool is exhausted; low ports stay for < 1024
    assert a.allocate(80) in (600, 601)
    a.release(2001)
    assert a.allocate(5000) == 2001


def test_20000_bindings_fit_the_default_userspace_pool() -> None:
    """The 4,537th binding used to be refused (port_range 61000-65535 in userspace mode)."""
    eng = Engine(cfg(mode="userspace", limits=Limits(max_new_per_host_per_second=0)), rng_seed=3)
    hosts = [PRV1 + i for i in range(4)]  # each within its share of the pool
    for i in range(20000):
        v = eng.handle(build_udp(hosts[i % 4], EXT, 10000 + i // 4, 53, b"q"), OUT, 1.0)
        assert accepted(v).src == MASQ
    assert len(eng.table.bindings) == 20000
    assert eng.counters.get("drop:ports-exhausted", 0) == 0


# ------------------------------------------------------------------------------ limits
def test_auto_limits_are_sized_from_the_pool_and_the_table() -> None:
    us = host_limits(cfg(mode="userspace"), port_pool(cfg(mode="userspace")))
    assert us.max_ports == (36280 + 424) // 4 and us.max_icmp_ids == 65535 // 4
    assert us.max_entries == 25000 and us.new_per_second == 500.0
    hy = host_limits(cfg(), port_pool(cfg()))
    assert hy.max_ports == (4536 + 424) // 4
    small = host_limits(cfg(limits=Limits(max_entries=50)), port_pool(cfg()))
    assert small.max_entries == 50  # a small table is not cut into shares
    off = Limits(max_entries_per_host=0, max_ports_per_host=0, max_new_per_host_per_second=0)
    none = host_limits(cfg(limits=off), port_pool(cfg()))
    assert (none.max_entries, none.max_ports, none.new_per_second) == (0, 0, 0.0)
    assert "unlimited ports" in none.describe()


def test_a_host_holds_at_most_its_share_of_ports_and_others_still_get_theirs() -> None:
    limits = Limits(max_ports_per_host=100, max_new_per_host_per_second=0)
    eng = Engine(cfg(mode="userspace", limits=limits), rng_seed=5)
    for port in range(20000, 20100):
        accepted(eng.handle(build_udp(PRV1, EXT, port, 53, b"q"), OUT, 1.0))
    v = dropped(eng.handle(build_udp(PRV1, EXT, 20100, 53, b"q"), OUT, 1.0), DropReason.HOST_LIMIT)
    assert "max_ports_per_host" in v.detail
    # more sessions on a port it holds are no new port: endpoint-independent mapping
    accepted(eng.handle(build_udp(PRV1, EXT2, 20000, 53, b"q"), OUT, 1.0))
    # TCP is a pool of its own, and the other host is not affected
    assert accepted(eng.handle(build_udp(PRV2, EXT, 20000, 53, b"q"), OUT, 1.0)).src == MASQ
    assert eng.table.host_ports[(17, PRV1)] == 100
    # expiry gives the ports back to the host's share
    eng.handle_timer(1000.0)
    assert (17, PRV1) not in eng.table.host_ports
    accepted(eng.handle(build_udp(PRV1, EXT, 20100, 53, b"q"), OUT, 1000.0))


def test_icmp_ids_are_held_to_the_share_too() -> None:
    eng = Engine(cfg(mode="userspace", limits=Limits(max_ports_per_host=3)), rng_seed=5)
    for ident in range(3):
        accepted(eng.handle(build_icmp(PRV1, EXT, 8, 0, rest=ident << 16), OUT, 1.0))
    dropped(eng.handle(build_icmp(PRV1, EXT, 8, 0, rest=9 << 16), OUT, 1.0), DropReason.HOST_LIMIT)


def test_a_host_at_a_limit_is_reported_once_per_interval_and_counted() -> None:
    limits = Limits(max_ports_per_host=1, max_new_per_host_per_second=0)
    eng = Engine(cfg(mode="userspace", limits=limits), rng_seed=5)
    accepted(eng.handle(build_udp(PRV1, EXT, 1000, 53, b"q"), OUT, 1.0))
    eng.drain_events()
    for i in range(50):
        eng.handle(build_udp(PRV1, EXT, 2000 + i, 53, b"q"), OUT, 1.0 + i)
    reports = [e for e in eng.drain_events() if isinstance(e, HostLimited)]
    assert len(reports) == 1 and reports[0].host == "10.77.0.11" and reports[0].limit == "ports"
    assert reports[0].drops == 1
    eng.handle(build_udp(PRV1, EXT, 3000, 53, b"q"), OUT, 1.0 + HOST_LIMIT_LOG_INTERVAL_S)
    later = [e for e in eng.drain_events() if isinstance(e, HostLimited)]
    assert len(later) == 1 and later[0].drops == 50  # 49 unreported + this one
    assert eng.limit_hits.snapshot() == {PRV1: {"ports": 51}}


def test_the_rate_limit_is_on_by_default_and_named_in_the_report() -> None:
    eng = Engine(cfg(mode="userspace"), rng_seed=5)
    ok = sum(
        eng.handle(build_udp(PRV1, EXT, 10000 + i, 53, b"q"), OUT, 1.0).payload is not None
        for i in range(2000)
    )
    assert ok == 500  # the one-second burst, then nothing until the bucket refills
    reports = [e for e in eng.drain_events() if isinstance(e, HostLimited)]
    assert [r.limit for r in reports] == ["rate"]
    assert eng.limit_hits.snapshot()[PRV1]["rate"] == 1500
    assert accepted(eng.handle(build_udp(PRV2, EXT, 10000, 53, b"q"), OUT, 1.0)).src == MASQ


def test_limit_hits_remember_a_bounded_number_of_hosts() -> None:
    from vpnmasq.conntrack.hostlimits import MAX_LIMITED_HOSTS

    hits = LimitHits()
    for h in range(MAX_LIMITED_HOSTS + 10):
        hits.hit(h, "rate", 0.0)
    snap = hits.snapshot()
    assert len(snap) == MAX_LIMITED_HOSTS and 0 not in snap and MAX_LIMITED_HOSTS + 9 in snap


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_check_config_and_the_engine_agree_on_the_default_pool(mode: str) -> None:
    c = load_config(f'mode = "{mode}"\ninside_networks = ["10.77.0.0/24"]\noutside_interface = "wan0"\n')
    eng = Engine(c, MASQ)
    assert eng.pool == port_pool(c)
    size = eng.ports[17].size
    assert size == eng.pool.size + 424


def test_a_service_that_starts_listening_later_is_taken_out_of_the_pool() -> None:
    eng = Engine(cfg(mode="userspace", preserve_ports=True), rng_seed=5)
    size = eng.pool.size
    assert eng.exclude_ports([22, 8443, 8443, 40000]) == [8443]  # 22: below; 40000: ephemeral
    assert 8443 not in eng.pool and eng.pool.size == size - 1
    assert "since: 8443" in eng.pool.describe()
    # a LAN host's source port 8443 is no longer kept on the outside (the service owns it)
    v = accepted(eng.handle(build_udp(PRV1, EXT, 8443, 53, b"q"), OUT, 1.0))
    assert v.u16(0) != 8443
    assert eng.exclude_ports([8443]) == []  # already out


def test_a_port_a_local_socket_holds_is_never_handed_out() -> None:
    """The daemon's probe (``port_in_use``) is asked per protocol before a port is handed
    out: a held port is neither kept (port preservation) nor picked at random, and a port
    the table already holds or that is not eligible for preservation costs no probe."""
    asked: list[tuple[int, int]] = []
    held = {(17, 20053), (6, 20054)} | {(17, p) for p in range(1024, 20053)}

    def in_use(proto: int, port: int) -> bool:
        asked.append((proto, port))
        return (proto, port) in held

    eng = Engine(cfg(mode="userspace", preserve_ports=True), rng_seed=5, port_in_use=in_use)
    v = accepted(eng.handle(build_udp(PRV1, EXT, 20053, 53, b"q"), OUT, 1.0))
    assert v.u16(0) != 20053 and (17, v.u16(0)) not in held and (17, 20053) in asked
    # TCP 20053 is not held: kept; UDP 20054 is not held either
    v = accepted(eng.handle(build_udp(PRV1, EXT, 20054, 53, b"q"), OUT, 1.0))
    assert v.u16(0) == 20054
    asked.clear()
    v = accepted(eng.handle(build_udp(PRV2, EXT2, 40000, 53, b"q"), OUT, 1.0))  # ephemeral
    assert (17, 40000) not in asked and (17, v.u16(0)) not in held
    # the allocator alone: only candidates free in its own table are asked about
    seen: list[int] = []

    def outside(port: int) -> bool:
        seen.append(port)
        return port != 2003

    alloc = IdAllocator([(2000, 2003)], random.Random(1), in_use=outside)
    alloc.take(2000)
    assert alloc.allocate() == 2003 and 2000 not in seen
    assert alloc.allocate() is None  # 2001 and 2002 held outside, 2003 handed out
