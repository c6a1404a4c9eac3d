"""Replication between two engines: the active one's table reaches the standby through the
real wire format, and the standby carries the same ESP, PPTP and NAPT sessions after a
takeover. Manual clocks throughout (each engine has its own)."""

from __future__ import annotations

from typing import Any

from tests.packets import (
    EXT,
    IN,
    MASQ,
    OUT,
    PRV1,
    PRV2,
    accepted,
    build_udp,
    esp_packet,
    make_engine,
)
from tests.pptp_wire import ControlLink, gre_call_id, gre_in, gre_out
from vpnmasq import state
from vpnmasq.config import Config, PortRange
from vpnmasq.engine import Engine
from vpnmasq.sync.codec import Kind, Opener, Sealer
from vpnmasq.sync.replica import Publisher, Replica, pair_ranges, split_ranges, stable_id

KEY = b"k" * 32
WALL = 1_700_000_000.0



def node_engine(node: int) -> Engine:
    e = make_engine()
    return Engine(split_ranges(e.config, node), e.public_ip, rng_seed=node)


class Link:
    """Active engine -> Publisher -> Sealer -> (datagrams) -> Opener -> Replica."""

    def __init__(self, active: Engine) -> None:
        self.active = active
        self.pub = Publisher(full_interval=10.0)
        self.seal = Sealer(KEY, node=1, epoch=1)
        self.open = Opener(KEY, own_node=2)
        self.replica = Replica()
        self.lost = 0

    def datagrams(self, now: float) -> list[bytes]:
        exp = state.export_state(self.active, now, WALL + now, stable_id)
        return [self.seal.seal(k, b, WALL + now) for k, b in self.pub.messages(exp, now)]

    def tick(self, now: float, drop: frozenset[int] = frozenset()) -> list[Kind]:
        kinds = []
        for i, d in enumerate(self.datagrams(now)):
            if i in drop:
                self.lost += 1
                continue
            m = self.open.open(d)
            self.replica.receive(m, now + 100.0)  # the standby's clock is elsewhere
            kinds.append(m.kind)
        return kinds

    def take_over(self, standby: Engine, now: float) -> state.RestoreReport:
        data = self.replica.state(now, WALL)
        return state.import_state(standby, data, now, WALL, ranges_of=pair_ranges(make_engine().config))


def vpn_traffic(a: Engine) -> tuple[ControlLink, int]:
    accepted(a.handle(esp_packet(PRV1, EXT, 0x1001), OUT, 1.0))
    assert accepted(a.handle(esp_packet(EXT, MASQ, 0x2001), IN, 1.5)).dst == PRV1
    link = ControlLink(a, PRV1, 1025, EXT).open(1.0)
    link.start_session(1.1)
    out_id = link.outgoing_call(7, 99, 1.2)
    accepted(gre_out(a, PRV1, EXT, 99, 1.3))
    return link, out_id


def test_standby_takes_over_esp_pptp_and_napt_sessions_with_the_same_ids() -> None:
    a = node_engine(1)
    link, out_id = vpn_traffic(a)
    udp = accepted(a.handle(build_udp(PRV2, EXT, 5000, 53, b"q"), OUT, 1.4))
    ln = Link(a)
    assert ln.tick(2.0) == [Kind.FULL]
    assert ln.replica.synced and len(ln.replica.records) == 4  # esp, napt 1723, gre, udp
    assert ln.tick(2.5) == []  # nothing changed (packets alone are not a change)
    accepted(a.handle(esp_packet(PRV1, EXT, 0x1001, 2), OUT, 2.6))
    assert ln.tick(2.7) == []

    b = node_engine(2)
    rep = ln.take_over(b, 200.0)
    assert rep.n_dropped == 0 and rep.restored == {"esp": 1, "napt": 2, "gre": 1}
    # inbound ESP by SPI, GRE by Call ID, and the UDP reply all reach the same hosts
    assert accepted(b.handle(esp_packet(EXT, MASQ, 0x2001, 2), IN, 200.1)).dst == PRV1
    g = accepted(gre_in(b, EXT, out_id, 200.1))
    assert (g.dst, gre_call_id(g)) == (PRV1, 7)
    assert accepted(gre_out(b, PRV1, EXT, 99, 200.2)).src == MASQ
    reply = build_udp(EXT, MASQ, 53, udp.u16(0), b"a")
    assert accepted(b.handle(reply, IN, 200.2)).dst == PRV2
    assert not any(k.startswith("created:") for k in b.counters)
    # the PPTP control connection carries on too: the next call is tracked by B
    link.eng = b
    assert link.outgoing_call(8, 100, 200.3) not in (None, out_id)


def test_changes_and_removals_go_as_deltas() -> None:
    a = node_engine(1)
    vpn_traffic(a)
    ln = Link(a)
    ln.tick(2.0)
    accepted(a.handle(esp_packet(PRV2, EXT, 0x3001), OUT, 3.0))
    accepted(a.handle(esp_packet(EXT, MASQ, 0x4001), IN, 3.5))  # PRV2's SA answered
    assert ln.tick(4.0) == [Kind.DELTA]
    assert sum(r["kind"] == "esp" for r, _ in ln.replica.records.values()) == 2
    a.flush()
    assert ln.tick(5.0) == [Kind.DELTA]
    assert ln.replica.records == {}
    assert ln.replica.counters["sync_delta_applied"] == 2


def test_a_lost_message_makes_the_standby_ask_for_a_full_sync() -> None:
    a = node_engine(1)
    ln = Link(a)
    ln.tick(1.0)
    vpn_traffic(a)
    ln.tick(2.0, drop=frozenset({0}))  # the delta with the new sessions is lost
    accepted(a.handle(esp_packet(PRV2, EXT, 0x3001), OUT, 3.0))
    accepted(a.handle(esp_packet(EXT, MASQ, 0x4001), IN, 3.5))
    ln.tick(4.0)
    assert ln.replica.want_full and ln.replica.counters["sync_gap"] == 1
    assert len(ln.replica.records) == 1  # best effort: the next delta was applied
    ln.pub.request_full()
    assert ln.tick(4.5) == [Kind.FULL]
    assert not ln.replica.want_full and len(ln.replica.records) == 4


def test_a_standby_that_joins_in_the_middle_of_a_full_sync_waits_for_the_next() -> None:
    a = node_engine(1)
    for i in range(300):  # enough for several parts
        accepted(a.handle(build_udp(PRV1, EXT, 2000 + i, 53, b"q"), OUT, 1.0))
    ln = Link(a)
    dgrams = ln.datagrams(2.0)
    assert len(dgrams) > 1
    for d in dgrams[1:]:
        ln.replica.receive(ln.open.open(d), 2.0)
    assert not ln.replica.have_table
    ln.pub.request_full()
    ln.tick(3.0)
    assert ln.replica.synced and len(ln.replica.records) == 300


def test_held_time_ages_the_records_at_takeover() -> None:
    a = node_engine(1)
    accepted(a.handle(build_udp(PRV1, EXT, 5000, 53, b"q"), OUT, 1.0))
    ln = Link(a)
    ln.tick(1.0)  # received at the standby's 101.0 with 300 s left
    b = node_engine(2)
    data = ln.replica.state(351.0, WALL)  # held 250 s
    state.import_state(b, data, 351.0, WALL, ranges_of=pair_ranges(make_engine().config))
    (e,) = list(b.table)
    assert abs(e.expires_at - (351.0 + 50.0)) < 1e-6
    data = ln.replica.state(402.0, WALL)  # held past its lifetime
    c = node_engine(2)
    rep = state.import_state(c, data, 402.0, WALL, ranges_of=pair_ranges(make_engine().config))
    assert rep.dropped == {"expired": 1}


# ------------------------------------------------------------------------------ split brain
def test_split_ranges_halves_every_identifier_range_disjointly() -> None:
    c = Config(port_range=PortRange(61000, 65535))
    one, two = split_ranges(c, 1), split_ranges(c, 2)
    # port_range = "auto" is split as the one range it stands for in that mode
    auto = split_ranges(Config(), 1).port_range
    assert auto is not None and (auto.low, auto.high) == (61000, 63267)
    assert split_ranges(Config(mode="userspace"), 2).port_range == PortRange(16896, 32767)
    for name in (
        "port_range",
        "low_port_range",
        "icmp_id_range",
        "call_id_range",
        "kernel_port_range",
    ):
        r, r1, r2 = getattr(c, name), getattr(one, name), getattr(two, name)
        assert (r1.low, r2.high) == (r.low, r.high) and r1.high + 1 == r2.low, name


def test_split_brain_never_gives_one_call_id_or_port_to_two_hosts() -> None:
    """Both gateways active with the same public address (the sync link is down): each
    hands out identifiers from its own half, so a remote never sees one outside Call ID or
    port for two LAN hosts, whatever the hosts ask for."""
    g1, g2 = node_engine(1), node_engine(2)
    ids: dict[int, set[int]] = {1: set(), 2: set()}
    ports: dict[int, set[int]] = {1: set(), 2: set()}
    for n, g in ((1, g1), (2, g2)):
        for h in range(20):
            host = PRV1 + h if n == 1 else PRV2 + 20 + h
            link = ControlLink(g, host, 1025, EXT).open(1.0)
            link.start_session(1.1)
            for cid in (1, 7, 40000, 65000):  # the same wishes on both gateways
                out = link.outgoing_call(cid, 99, 1.2)
                assert out is not None
                ids[n].add(out)
            u = accepted(g.handle(build_udp(host, EXT, 61500, 53, b"q"), OUT, 1.3))
            ports[n].add(u.u16(0))
    assert ids[1] and ids[2] and not ids[1] & ids[2]
    assert not ports[1] & ports[2]
    assert max(ids[1]) <= 32768 < min(ids[2])


def test_replica_state_is_an_importable_state_file() -> None:
    a = node_engine(1)
    vpn_traffic(a)
    ln = Link(a)
    ln.tick(2.0)
    data: Any = ln.replica.state(3.0, WALL)
    assert state.check_header(data) is data
    assert data["public_address"] == "198.51.100.1" and len(data["bindings"]) == 1


def test_an_auto_port_range_is_halved_and_the_peers_half_accepted_at_takeover() -> None:
    """port_range = "auto" (the default): node 1's mappings come from the lower half of the
    auto span, and node 2 restores them although they are outside its own half."""
    auto = make_engine(port_range=None, mode="hybrid").config
    a = Engine(split_ranges(auto, 1), make_engine().public_ip, rng_seed=1)
    link = ControlLink(a, PRV1, 1025, EXT).open(1.0)  # PPTP control: a NAPT mapping of ours
    link.start_session(1.1)
    ln = Link(a)
    ln.tick(2.0)
    (rec,) = [r for r, _ in ln.replica.records.values() if r["kind"] == "napt"]
    node1, node2 = split_ranges(auto, 1).port_range, split_ranges(auto, 2).port_range
    assert node1 is not None and node2 is not None
    assert node1.low <= rec["alias_port"] <= node1.high < node2.low
    b = Engine(split_ranges(auto, 2), make_engine().public_ip, rng_seed=2)
    data = ln.replica.state(10.0, WALL)
    rep = state.import_state(b, data, 10.0, WALL, ranges_of=pair_ranges(auto))
    assert rep.restored == {"napt": 1} and rep.n_dropped == 0
