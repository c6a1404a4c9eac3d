"""Properties of the IPsec helpers (hypothesis).

* any bytes on UDP 500 / 4500 and IP protocol 50, either way, give a Verdict (never raise);
* no inbound SPI is ever delivered to two LAN hosts at once;
* unassociated inbound ESP never reaches a LAN host;
* an outsider (another address) cannot complete a pending association, nor disturb the FIFO.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.packets import ATTACKER, EXT, EXT2, IN, MASQ, OUT, PRV1, PRV2, PRV3, make_engine
from vpnmasq.config import EspPolicy, Forward
from vpnmasq.engine import Engine
from vpnmasq.helpers.esp import EspHelper
from vpnmasq.helpers.isakmp import build_header
from vpnmasq.packet.ipv4 import PROTO_ESP, PROTO_UDP, build_ipv4, ip_to_int
from vpnmasq.packet.l4 import build_esp, build_icmp, build_udp
from vpnmasq.verdict import Action, DropReason, Verdict

LAN = [PRV1, PRV2, PRV3, ip_to_int("10.77.0.14")]
OUTSIDE = [EXT, EXT2, ATTACKER]
QUICK = 32
#: raise for a soak run, e.g. VPNMASQ_PROP_EXAMPLES=5000
MAX_EXAMPLES = int(os.environ.get("VPNMASQ_PROP_EXAMPLES", "300"))

SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def seeded(**cfg: Any) -> Engine:
    """An engine with some IPsec state, so garbage meets more than empty tables."""
    eng = make_engine(**cfg)
    eng.handle(build_udp(PRV1, EXT, 500, 500, build_header(0x11, 0)), OUT, 0.0)
    eng.handle(build_udp(EXT, MASQ, 500, 500, build_header(0x11, 0x22)), IN, 0.1)
    eng.handle(build_udp(PRV1, EXT, 500, 500, build_header(0x11, 0x22, QUICK, message_id=5)), OUT, 0.2)
    eng.handle(build_ipv4(PRV1, EXT, PROTO_ESP, build_esp(0x100, 1)), OUT, 0.3)
    eng.handle(build_ipv4(PRV2, EXT, PROTO_ESP, build_esp(0x200, 1)), OUT, 0.3)
    eng.handle(build_udp(PRV3, EXT, 4500, 4500, b"\xff"), OUT, 0.4)
    return eng


def raw_ip(src: int, dst: int, proto: int, payload: bytes) -> bytearray:
    return build_ipv4(src, dst, proto, payload)


@SETTINGS
@given(
    payload=st.binary(max_size=96),
    kind=st.sampled_from(["udp", "esp"]),
    port=st.sampled_from([500, 4500]),
    sport_same=st.booleans(),
    outbound=st.booleans(),
    lan=st.sampled_from(LAN),
    remote=st.sampled_from(OUTSIDE),
    guess=st.booleans(),
    now=st.floats(min_value=0.5, max_value=50_000.0),
)
def test_any_bytes_on_ipsec_ports_give_a_verdict(
    payload: bytes, kind: str, port: int, sport_same: bool, outbound: bool, lan: int,
    remote: int, guess: bool, now: float,
) -> None:
    eng = seeded(esp=EspPolicy(guess_single_host=guess), forwards=(Forward("esp", "10.77.0.5"),))
    src, dst = (lan, remote) if outbound else (remote, MASQ)
    if kind == "udp":
        sport = port if sport_same else 33333
        pkt = build_udp(src, dst, sport, port, payload)
    else:
        pkt = raw_ip(src, dst, PROTO_ESP, payload)
    v = eng.handle(pkt, OUT if outbound else IN, now)
    assert isinstance(v, Verdict)
    eng.handle_timer(now + 1)
    eng.snapshot(now + 1)  # status rendering never raises either


@SETTINGS
@given(data=st.binary(min_size=0, max_size=120), outbound=st.booleans())
def test_any_datagram_bytes_give_a_verdict(data: bytes, outbound: bool) -> None:
    eng = seeded()
    # force the protocol byte to ESP or UDP so garbage reaches the helpers' parsers
    for proto in (PROTO_ESP, PROTO_UDP):
        buf = bytearray(data)
        if len(buf) > 9:
            buf[9] = proto
        assert isinstance(eng.handle(buf, OUT if outbound else IN, 1.0), Verdict)


@SETTINGS
@given(quoted=st.binary(max_size=64), proto=st.sampled_from([PROTO_ESP, PROTO_UDP]))
def test_icmp_errors_quoting_anything_give_a_verdict(quoted: bytes, proto: int) -> None:
    eng = seeded()
    inner = bytearray(raw_ip(MASQ, EXT, proto, quoted))
    icmp = build_icmp(EXT, MASQ, 3, 4, 1400, bytes(inner))
    assert isinstance(eng.handle(icmp, IN, 1.0), Verdict)


# ---------------------------------------------------------------------- association runs
op = st.one_of(
    st.tuples(st.just("qm"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("out"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("in"), st.integers(0, 2), st.integers(1, 24)),
    st.tuples(st.just("tick"), st.floats(0.0, 6.0), st.just(0)),
)


class Run:
    """Drives an engine with LAN hosts that only ever talk IPsec to EXT."""

    def __init__(self, guess: bool = False) -> None:
        self.eng = make_engine(esp=EspPolicy(guess_single_host=guess))
        esp = self.eng.helper_by_name["esp"]
        assert isinstance(esp, EspHelper)
        self.esp = esp
        self.now = 0.0
        self.delivered: dict[tuple[int, int], int] = {}
        self.msgid = 0

    def step(self, o: tuple[str, Any, Any]) -> None:
        kind, a, b = o
        eng = self.eng
        if kind == "tick":
            self.now += a
            eng.handle_timer(self.now)
        elif kind == "qm":
            host = LAN[a]
            self.msgid += 1
            ic = 0x1000 + a
            for pkt, d in (
                (build_udp(host, EXT, 500, 500, build_header(ic, 0x2000 + a, QUICK, message_id=self.msgid)), OUT),
                (build_udp(EXT, MASQ, 500, 500, build_header(ic, 0x2000 + a, QUICK, message_id=self.msgid)), IN),
            ):
                eng.handle(pkt, d, self.now)
        elif kind == "out":
            spi = 0x100 * (a + 1) + b  # each host its own SPIs
            v = eng.handle(build_ipv4(LAN[a], EXT, PROTO_ESP, build_esp(spi, 1)), OUT, self.now)
            assert v.action is Action.ACCEPT or v.reason in (
                DropReason.ESP_WAITING, DropReason.HOST_LIMIT,
            ), v
        else:
            self.inbound(OUTSIDE[a], b)

    def queue_state(self) -> object:
        return {
            r: [(c.host, len(c.expects), c.head_since, c.sent_at) for c in q]
            for r, q in self.esp.queues.items()
        }

    def inbound(self, remote: int, spi: int) -> None:
        eng = self.eng
        eng.handle_timer(self.now)  # whatever is due (expired claims) is done first
        known = (remote, spi) in self.delivered
        waiting = bool(self.esp.queues.get(remote))
        before = self.queue_state()
        v = eng.handle(build_ipv4(remote, MASQ, PROTO_ESP, build_esp(spi, 1)), IN, self.now)
        if remote != EXT:
            # nobody on the LAN ever talked to these: never delivered, nothing disturbed
            assert v.action is Action.DROP and v.reason is DropReason.ESP_UNASSOCIATED
            assert self.queue_state() == before
            return
        if v.action is not Action.ACCEPT:
            assert v.reason is DropReason.ESP_UNASSOCIATED
            assert not waiting  # a waiting claim always takes a new SPI from its remote
            return
        assert v.payload is not None
        host = int.from_bytes(v.payload[16:20], "big")
        assert host in LAN
        # unassociated inbound never reaches a LAN host: it was placed before, or claimed
        assert known or waiting or self.eng.config.esp.guess_single_host
        prev = self.delivered.get((remote, spi))
        if prev is not None and prev != host:
            # only a withdrawn guess may move an SPI, and never to two hosts at once
            assert self.eng.counters.get("esp:guess_withdrawn", 0) > 0
        self.delivered[(remote, spi)] = host

    def check_table(self) -> None:
        """At any moment each (remote, inbound SPI) names one live association."""
        seen: dict[tuple[int, int], int] = {}
        for e in self.eng.table:
            if e.kind != "esp" or not e.live or e.expires_at <= self.now:
                continue
            if e.ext.in_spi is not None:
                k = (e.remote_ip, e.ext.in_spi)
                assert k not in seen, f"SPI {k} held by two hosts"
                seen[k] = e.inside_ip


@SETTINGS
@given(ops=st.lists(op, max_size=60))
def test_no_spi_to_two_hosts_and_no_unassociated_delivery(ops: list[tuple[str, Any, Any]]) -> None:
    run = Run(guess=False)
    for o in ops:
        run.step(o)
        run.check_table()
    # without guessing, an SPI never moves: each stays with the first host it reached
    assert run.eng.counters.get("esp:guess_withdrawn", 0) == 0


@SETTINGS
@given(ops=st.lists(op, max_size=60))
def test_with_guessing_an_spi_is_still_never_held_twice(ops: list[tuple[str, Any, Any]]) -> None:
    run = Run(guess=True)
    for o in ops:
        run.step(o)
        run.check_table()


@SETTINGS
@given(
    ops=st.lists(op, max_size=30),
    outsider=st.sampled_from([ATTACKER, EXT2]),
    spis=st.lists(st.integers(1, 2**32 - 1), min_size=1, max_size=8),
)
def test_an_outsider_cannot_complete_a_pending_association(
    ops: list[tuple[str, Any, Any]], outsider: int, spis: list[int]
) -> None:
    run = Run()
    for o in ops:
        run.step(o)
    # a host is waiting for EXT's answer
    run.step(("out", 3, 3))
    pending_before = run.queue_state()
    for spi in spis:
        v = run.eng.handle(build_ipv4(outsider, MASQ, PROTO_ESP, build_esp(spi, 1)), IN, run.now)
        assert v.action is Action.DROP
    assert run.queue_state() == pending_before
    # the real remote still completes it
    run.eng.handle_timer(run.now)
    if run.esp.queues.get(EXT):
        head = run.esp.queues[EXT][0].host
        v = run.eng.handle(build_ipv4(EXT, MASQ, PROTO_ESP, build_esp(0xFEED0001, 1)), IN, run.now)
        assert v.action is Action.ACCEPT and v.payload is not None
        assert int.from_bytes(v.payload[16:20], "big") == head
