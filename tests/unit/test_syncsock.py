"""The sync socket on loopback: an active and a standby endpoint, the bounded send queue,
and refusals counted by reason."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.packets import (
    EXT,
    IN,
    MASQ,
    NO_HOST_LIMITS,
    OUT,
    PRV1,
    PRV2,
    accepted,
    build_udp,
    esp_packet,
    make_engine,
)
from tests.pptp_wire import ControlLink
from vpnmasq import state
from vpnmasq.config import Sync
from vpnmasq.datapath.syncsock import PEER_CLAIM_S, ROLL_PER_TICK, SyncEndpoint, read_key
from vpnmasq.engine import Engine
from vpnmasq.sync.replica import split_ranges

KEY = b"a-key-of-at-least-16-bytes"
WALL = 1_700_000_000.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pair() -> Iterator[tuple[SyncEndpoint, SyncEndpoint]]:
    pa, pb = free_port(), free_port()
    a = SyncEndpoint(Sync(f"127.0.0.1:{pb}", f"127.0.0.1:{pa}", "/k", node=1), KEY, epoch=1)
    b = SyncEndpoint(Sync(f"127.0.0.1:{pa}", f"127.0.0.1:{pb}", "/k", node=2), KEY, epoch=2)
    yield a, b
    a.close()
    b.close()



def busy_engine(n: int) -> Engine:
    e = make_engine(limits=NO_HOST_LIMITS)  # n mappings from one host at once
    eng = Engine(split_ranges(e.config, 1), e.public_ip)
    for i in range(n):
        accepted(eng.handle(build_udp(PRV1, EXT, 2000 + i, 53, b"q"), OUT, 1.0))
    return eng


def drain(ep: SyncEndpoint, active: bool, now: float, until: Callable[[], bool]) -> None:
    """Read what arrives until ``until()`` (the datagrams are on loopback already)."""
    deadline = time.monotonic() + 5.0
    while not until() and time.monotonic() < deadline:
        ep.on_readable(active, now)
        time.sleep(0.005)
    assert until()


def test_the_standby_gets_the_table_and_takes_it_over(pair: tuple[SyncEndpoint, SyncEndpoint]) -> None:
    a, b = pair
    eng = busy_engine(5)
    a.tick(eng, True, 2.0, WALL, time.monotonic)  # HELLO + FULL
    drain(b, False, 50.0, lambda: b.replica.synced)
    assert b.replica.synced and len(b.replica.records) == 5
    assert b.peer_active
    standby = Engine(split_ranges(make_engine().config, 2), None)
    standby.set_public_address(MASQ, 60.0)
    rep = b.take_over(standby, 60.0, WALL, make_engine().config)
    assert rep is not None and rep.restored == {"napt": 5}
    assert not b.replica.have_table  # consumed


def test_a_standby_that_asks_gets_a_full_sync_at_once(pair: tuple[SyncEndpoint, SyncEndpoint]) -> None:
    a, b = pair
    eng = busy_engine(3)
    a.tick(eng, True, 2.0, WALL, time.monotonic)
    a.publisher.next_full = 1e9  # (no periodic full sync in this test)
    b.tick(make_engine(), False, 2.0, WALL, time.monotonic)  # HELLO want_full, lost: b was not up yet
    drain(a, True, 2.1, lambda: a.publisher.next_full == 0.0)
    a.tick(eng, True, 2.5, WALL, time.monotonic)
    drain(b, False, 2.6, lambda: b.replica.synced)
    assert b.replica.synced and len(b.replica.records) == 3


class BlockedSocket:
    """A socket whose send buffer is full."""

    def sendto(self, data: bytes, addr: object) -> int:
        raise BlockingIOError

    def close(self) -> None:
        pass


def test_a_full_queue_drops_counts_and_asks_for_a_full_resync(
    pair: tuple[SyncEndpoint, SyncEndpoint],
) -> None:
    a, b = pair
    real = a.sock
    a.sock = BlockedSocket()  # type: ignore[assignment]
    a.cfg = Sync(a.cfg.peer, a.cfg.listen, "/k", node=1, queue=3)
    eng = busy_engine(600)  # several FULL parts
    t0 = time.monotonic()
    a.tick(eng, True, 2.0, WALL, time.monotonic)
    assert time.monotonic() - t0 < 1.0  # never waits for the peer
    assert len(a.queue) == 3
    assert a.counters["sync_send_dropped"] >= 1 and a.counters["sync_send_blocked"] >= 1
    assert a.publisher.next_full == 0.0  # everything goes again
    a.sock = real
    a.queue.clear()
    a.tick(eng, True, 2.0 + a.tick_interval, WALL, time.monotonic)  # the next tick
    drain(b, False, 9.0, lambda: b.replica.synced)
    assert b.replica.synced and len(b.replica.records) == 600


def test_messages_with_another_key_are_refused_and_counted(
    pair: tuple[SyncEndpoint, SyncEndpoint],
) -> None:
    a, b = pair
    b.opener.key = b"another-key-of-16-bytes"
    a.tick(busy_engine(1), True, 2.0, WALL, time.monotonic)
    drain(b, False, 2.0, lambda: bool(b.counters.get("sync_bad_auth")))
    assert b.counters["sync_bad_auth"] >= 1 and not b.replica.records


def test_read_key_warns_about_a_readable_key_file(tmp_path: Path) -> None:
    k = tmp_path / "sync.key"
    k.write_bytes(b"0123456789abcdef0123\n")
    k.chmod(0o644)
    key, warn = read_key(str(k))
    assert key == b"0123456789abcdef0123" and warn and "0644" in warn
    k.chmod(0o600)
    assert read_key(str(k))[1] is None
    k.write_bytes(b"short")
    with pytest.raises(ValueError):
        read_key(str(k))


def test_node_2_yields_while_node_1_says_it_is_active(
    pair: tuple[SyncEndpoint, SyncEndpoint],
) -> None:
    a, b = pair  # a is node 1, b node 2
    a.tick(busy_engine(1), True, 2.0, WALL, time.monotonic)  # HELLO active + FULL
    drain(b, True, 10.0, lambda: b.peer_active)
    assert b.must_yield(10.0) and b.must_yield(10.0 + PEER_CLAIM_S - 0.01)
    assert not b.must_yield(10.0 + PEER_CLAIM_S)  # node 1 went quiet: dead
    b.tick(busy_engine(1), True, 2.0, WALL, time.monotonic)  # node 2 says active too
    drain(a, True, 10.0, lambda: a.peer_active)
    assert not a.must_yield(10.0)  # node 1 never yields
    a.stand_by()  # node 1 lost the address: says so at its next tick, at once
    a.tick(make_engine(), False, 2.1, WALL, time.monotonic)
    drain(b, True, 11.0, lambda: not b.peer_active)
    assert not b.must_yield(11.0)


def test_a_delta_tick_exports_vpn_entries_new_ones_and_a_slice_of_the_rest(
    pair: tuple[SyncEndpoint, SyncEndpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    eng = busy_engine(600)
    link = ControlLink(eng, PRV2, 1025, EXT).open(1.0)
    link.start_session(1.1)
    link.outgoing_call(7, 99, 1.2)
    a.tick(eng, True, 2.0, WALL, time.monotonic)  # full
    drain(b, False, 2.0, lambda: b.replica.synced)
    n_full = len(b.replica.records)
    exported: list[int] = []
    real = state.export_state

    def spy(*args: Any, **kw: Any) -> dict[str, Any]:
        out = real(*args, **kw)
        exported.append(len(out["entries"]))
        return out

    monkeypatch.setattr(state, "export_state", spy)
    accepted(eng.handle(esp_packet(PRV1, EXT, 0x1001), OUT, 2.1))
    accepted(eng.handle(esp_packet(EXT, MASQ, 0x2001), IN, 2.2))  # a new association
    eng.table.remove(next(e for e in eng.table if e.kind == "napt" and e.inside_port == 2000), "flush")
    a.tick(eng, True, a.next_tick, WALL, time.monotonic)
    # the control connection + its call + the new association, and 256 plain ones in turn
    assert exported == [3 + ROLL_PER_TICK]
    drain(b, False, 3.0, lambda: b.replica.counters.get("sync_delta_applied", 0) >= 1)
    assert len(b.replica.records) == n_full  # +1 esp, -1 napt
    kinds = [r["kind"] for r, _ in b.replica.records.values()]
    assert kinds.count("esp") == 1 and b.replica.synced


def test_a_takeover_that_cannot_use_the_replica_starts_empty_and_says_why(
    pair: tuple[SyncEndpoint, SyncEndpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    a.tick(busy_engine(3), True, 2.0, WALL, time.monotonic)
    drain(b, False, 2.0, lambda: b.replica.synced)

    def broken(*args: Any, **kw: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'low'")

    monkeypatch.setattr(state, "import_state", broken)
    standby = Engine(split_ranges(make_engine().config, 2), MASQ)
    assert b.take_over(standby, 3.0, WALL, make_engine().config) is None
    assert len(standby.table) == 0 and b.counters["sync_takeover_failed"] == 1
    assert b.last_error is not None and "no attribute 'low'" in b.last_error
