"""The fuzzers' checks have teeth: each one fires on the fault it is meant to catch."""

from __future__ import annotations

import pytest
from fuzz.oracles import Before, OracleFailure, check_verdict
from fuzz.world import build_world

from tests.invariants import InvariantViolation, check_invariants
from tests.packets import EXT, EXT2, IN, MASQ, OUT, PRV1, PRV2, PRV3, build_udp
from tests.pptp_wire import gre_packet
from vpnmasq.conntrack.table import Binding
from vpnmasq.packet.ipv4 import IPv4
from vpnmasq.verdict import ACCEPT_UNCHANGED, accept


def test_a_clean_world_passes() -> None:
    check_invariants(build_world(0).eng)


def _corrupt(fault: str) -> object:
    w = build_world(0)
    eng = w.eng
    t = eng.table
    e = next(x for x in t if x.kind == "napt" and x.proto == 17)
    if fault == "count":
        t.count += 1
    elif fault == "per_host":
        t.per_host[PRV1] += 1
    elif fault == "no_expiry":
        e.expires_at = float("inf")
    elif fault == "stale_key":
        t.index[("i", 17, 1, EXT, 53)] = e  # a key the entry does not list
    elif fault == "alias_twice":
        b = e.binding
        assert b is not None
        # another inside endpoint claims the same alias port
        t.alias_bindings[(17, b.alias_port)] = Binding(17, PRV2, 9999, b.alias_port)
    elif fault == "free_alias":
        assert e.binding is not None
        eng.ports[17].release(e.binding.alias_port)
    elif fault == "call_id_twice":
        calls = [x for x in t if x.kind == "gre"]
        calls[1].ext.outside_id = calls[0].ext.outside_id
        calls[1].alias_port = calls[0].alias_port
    elif fault == "spi_twice":
        esp = [x for x in t if x.kind == "esp" and x.ext.in_spi is not None][0]
        clone = [x for x in t if x.kind == "esp" and x.ext.in_spi is None][0]
        clone.ext.in_spi = esp.ext.in_spi
        clone.remote_ip = esp.remote_ip
    elif fault == "pending_count":
        eng.helper_by_name["esp"].pending_per_host[PRV2] = 5
    elif fault == "host_limit":
        t.max_per_host = 2
    elif fault == "dead_in_lru":
        e.live = False
    return eng


@pytest.mark.parametrize(
    "fault",
    ["count", "per_host", "no_expiry", "stale_key", "alias_twice", "free_alias", "call_id_twice",
     "spi_twice", "pending_count", "host_limit", "dead_in_lru"],
)
def test_each_invariant_catches_its_fault(fault: str) -> None:
    eng = _corrupt(fault)
    with pytest.raises(InvariantViolation):
        check_invariants(eng)  # type: ignore[arg-type]


def test_expiry_check_after_the_timer() -> None:
    w = build_world(0)
    w.now += 301  # udp entries are due, but nobody ran the timer
    with pytest.raises(InvariantViolation):
        check_invariants(w.eng, w.now)
    w.eng.handle_timer(w.now)
    check_invariants(w.eng, w.now)


def test_delivery_to_a_host_without_a_flow_is_caught() -> None:
    w = build_world(0)
    pkt = gre_packet(EXT2, MASQ, 5)
    forged = bytearray(gre_packet(EXT2, PRV1, 5))  # as if the engine had delivered it
    with pytest.raises(OracleFailure):
        check_verdict(w.eng, pkt, IN, accept(forged), Before(w.eng))
    # the same to a host that has a flow with that remote is fine
    check_verdict(w.eng, gre_packet(EXT, MASQ, 5), IN, accept(gre_packet(EXT, PRV1, 5)), Before(w.eng))


def test_an_outbound_address_leak_is_caught() -> None:
    w = build_world(0)
    pkt = build_udp(PRV3, EXT, 1, 2, b"x")
    with pytest.raises(OracleFailure):
        check_verdict(w.eng, pkt, OUT, accept(pkt), None)
    with pytest.raises(OracleFailure):
        check_verdict(w.eng, pkt, OUT, ACCEPT_UNCHANGED, None)


def test_a_broken_checksum_is_caught() -> None:
    w = build_world(0)
    pkt = build_udp(PRV1, EXT, 5353, 53, b"q")
    v = w.eng.handle(pkt, OUT, w.now)
    assert v.payload is not None
    bad = bytearray(v.payload)
    bad[26] ^= 0x01  # the UDP checksum
    with pytest.raises(OracleFailure):
        check_verdict(w.eng, pkt, OUT, accept(bad), None)
    bad = bytearray(v.payload)
    bad[10] ^= 0x01  # the IP header checksum
    with pytest.raises(OracleFailure):
        check_verdict(w.eng, pkt, OUT, accept(bad), None)
    assert IPv4(bytearray(v.payload)).src == MASQ


def test_a_stranger_changing_the_table_is_caught() -> None:
    from tests.packets import ATTACKER

    w = build_world(0)
    pkt = gre_packet(ATTACKER, MASQ, 5)
    pre = Before(w.eng, ATTACKER, w.now)
    assert pre.print is not None
    # as if the stranger's packet had ended PRV1's call
    call = next(e for e in w.eng.table if e.kind == "gre")
    w.eng.table.remove(call, "injected")
    from vpnmasq.verdict import DropReason, drop

    with pytest.raises(OracleFailure, match="stranger"):
        check_verdict(w.eng, pkt, IN, drop(DropReason.GRE_UNKNOWN_CALL), pre)
    # a remote the LAN talks to is no stranger: no fingerprint is taken
    assert Before(w.eng, EXT, w.now).print is None
