"""ISAKMP header codec and the UDP 500 / 4500 helpers, bytes in and bytes out.

scapy is used only as an oracle for the header layout (it is a dev dependency).
"""

from __future__ import annotations

import pytest

from tests.packets import (
    EXT,
    EXT2,
    IN,
    MASQ,
    OUT,
    PRV1,
    PRV2,
    accepted,
    build_udp,
    dropped,
    l4_ports,
    make_engine,
)
from vpnmasq.config import Timeouts
from vpnmasq.helpers.esp import TRANSITIONS, EspState, transition
from vpnmasq.helpers.isakmp import (
    HEADER_LEN,
    OUTSTANDING_TIMEOUT,
    SPECS,
    IsakmpHeader,
    MalformedIsakmp,
    build_header,
)
from vpnmasq.packet.errors import MalformedPacket
from vpnmasq.packet.ipv4 import build_ipv4
from vpnmasq.verdict import Action, DropReason

IC = 0x0102030405060708
RC = 0x1112131415161718


# ---------------------------------------------------------------------- the codec
def test_build_then_parse_ikev1() -> None:
    raw = build_header(IC, RC, 32, flags=1, message_id=0xDEADBEEF, next_payload=8, body=b"x" * 12)
    h = IsakmpHeader.parse(raw)
    assert (h.icookie, h.rcookie, h.major, h.minor) == (IC, RC, 1, 0)
    assert (h.exchange, h.flags, h.message_id, h.length) == (32, 1, 0xDEADBEEF, 40)
    assert h.next_payload == 8 and h.exchange_name == "quick" and h.creates_child_sa
    assert h.version == "IKEv1"


def test_layout_matches_scapy_isakmp() -> None:
    isakmp = pytest.importorskip("scapy.layers.isakmp")
    raw = build_header(IC, RC, 2, flags=1, message_id=7, body=b"\x00" * 4)
    p = isakmp.ISAKMP(raw)
    assert p.init_cookie == IC.to_bytes(8, "big") and p.resp_cookie == RC.to_bytes(8, "big")
    assert p.exch_type == 2 and p.id == 7 and p.length == HEADER_LEN + 4 and p.version == 0x10
    built = bytes(
        isakmp.ISAKMP(
            init_cookie=IC.to_bytes(8, "big"), resp_cookie=RC.to_bytes(8, "big"), exch_type=32,
            next_payload=0, id=5,
        )
    )
    h = IsakmpHeader.parse(built)
    assert (h.icookie, h.rcookie, h.exchange, h.message_id, h.length) == (IC, RC, 32, 5, 28)


def test_layout_matches_scapy_ikev2() -> None:
    ikev2 = pytest.importorskip("scapy.contrib.ikev2")
    raw = build_header(IC, 0, 34, major=2, flags=0x08, message_id=0)
    p = ikev2.IKEv2(raw)
    assert p.init_SPI == IC.to_bytes(8, "big") and p.resp_SPI == b"\x00" * 8
    assert p.exch_type == 34 and p.version == 0x20
    h = IsakmpHeader.parse(bytes(ikev2.IKEv2(init_SPI=IC.to_bytes(8, "big"), exch_type=36, id=3)))
    assert (h.major, h.exchange, h.exchange_name, h.message_id) == (2, 36, "CREATE_CHILD_SA", 3)


@pytest.mark.parametrize(
    ("major", "exch", "name", "child"),
    [
        (1, 2, "main", False),
        (1, 4, "aggressive", False),
        (1, 5, "informational", False),
        (1, 32, "quick", True),
        (2, 34, "IKE_SA_INIT", False),
        (2, 35, "IKE_AUTH", True),
        (2, 36, "CREATE_CHILD_SA", True),
        (2, 37, "INFORMATIONAL", False),
        (2, 99, "type-99", False),
    ],
)
def test_exchange_names_and_child_sa_signal(major: int, exch: int, name: str, child: bool) -> None:
    h = IsakmpHeader.parse(build_header(IC, RC, exch, major=major))
    assert h.exchange_name == name and h.creates_child_sa is child


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "header needs 28"),
        (build_header(IC)[:27], "header needs 28"),
        (bytes(17) + b"\x30" + bytes(10), "unknown version"),
        (build_header(IC)[:24] + (20).to_bytes(4, "big"), "length field 20 < 28"),
        (build_header(IC)[:24] + (64).to_bytes(4, "big"), "length field 64 > 28"),
    ],
)
def test_malformed_headers(data: bytes, why: str) -> None:
    with pytest.raises(MalformedIsakmp, match=why):
        IsakmpHeader.parse(data)
    assert issubclass(MalformedIsakmp, MalformedPacket)


def test_first_fragment_may_carry_part_of_a_long_message() -> None:
    raw = build_header(IC)[:24] + (3000).to_bytes(4, "big")
    assert IsakmpHeader.parse(raw, whole=False).length == 3000


def test_ikev2_exchange_ids() -> None:
    req = IsakmpHeader.parse(build_header(IC, RC, 36, major=2, flags=0x08, message_id=4))
    resp = IsakmpHeader.parse(build_header(IC, RC, 36, major=2, flags=0x20, message_id=4))
    # a request from the LAN host and its response from the remote are one exchange
    assert req.exchange_id(sender_is_lan=True) == resp.exchange_id(sender_is_lan=False)
    # the remote's own request with the same message ID is another one
    assert req.exchange_id(sender_is_lan=True) != req.exchange_id(sender_is_lan=False)
    a1 = IsakmpHeader.parse(build_header(IC, RC, 35, major=2, message_id=1))
    a3 = IsakmpHeader.parse(build_header(IC, RC, 35, major=2, message_id=3))
    assert a1.exchange_id(True) == a3.exchange_id(False)  # EAP rounds: one child SA


def test_specs() -> None:
    by_name = {s.name: s for s in SPECS}
    assert (by_name["isakmp"].kind, by_name["isakmp"].proto, by_name["isakmp"].port) == (
        "udp-port", 17, 500,
    )
    assert (by_name["natt"].kind, by_name["natt"].port) == ("udp-port", 4500)


# ---------------------------------------------------------------------- the helper
def ike(src: int, dst: int, ic: int, rc: int = 0, exch: int = 2, **kw: int) -> bytearray:
    return build_udp(src, dst, 500, 500, build_header(ic, rc, exch, **kw))


def test_source_port_500_is_kept_and_checksums_fixed() -> None:
    eng = make_engine()
    v = eng.handle(ike(PRV1, EXT, IC), OUT, 0.0)
    ip = accepted(v)  # checks IP and UDP checksums
    assert ip.src == MASQ and l4_ports(v) == (500, 500)
    v = eng.handle(ike(EXT, MASQ, IC, RC), IN, 0.1)
    assert accepted(v).dst == PRV1 and l4_ports(v) == (500, 500)


def test_an_unanswered_exchange_is_forgotten_after_the_outstanding_timeout() -> None:
    eng = make_engine()
    accepted(eng.handle(ike(PRV1, EXT, IC), OUT, 0.0))
    (row,) = eng.snapshot(0.0)
    assert row.state == "OUTSTANDING" and row.expires_in == OUTSTANDING_TIMEOUT
    eng.handle_timer(OUTSTANDING_TIMEOUT + 1)
    assert eng.snapshot(OUTSTANDING_TIMEOUT + 1) == []
    # its cookie no longer blocks another host
    accepted(eng.handle(ike(PRV2, EXT, IC), OUT, OUTSTANDING_TIMEOUT + 2))


def test_answered_exchange_gets_the_long_isakmp_lifetime() -> None:
    eng = make_engine()
    accepted(eng.handle(ike(PRV1, EXT, IC), OUT, 0.0))
    accepted(eng.handle(ike(EXT, MASQ, IC, RC), IN, 1.0))
    (row,) = eng.snapshot(1.0)
    assert row.state == "ESTABLISHED" and row.expires_in == Timeouts().isakmp


def test_shared_initiator_cookie_with_an_unknown_responder_cookie_is_a_collision() -> None:
    eng = make_engine()
    accepted(eng.handle(ike(PRV1, EXT, IC), OUT, 0.0))
    accepted(eng.handle(ike(EXT, MASQ, IC, 0x1), IN, 0.1))
    accepted(eng.handle(ike(PRV2, EXT, IC), OUT, 0.2))
    accepted(eng.handle(ike(EXT, MASQ, IC, 0x2), IN, 0.3))
    v = dropped(eng.handle(ike(EXT, MASQ, IC, 0x3), IN, 0.4), DropReason.ISAKMP_COLLISION)
    assert "the remote" in v.detail


def test_a_new_responder_cookie_for_one_hosts_cookie_goes_to_that_host() -> None:
    eng = make_engine()
    accepted(eng.handle(ike(PRV1, EXT, IC), OUT, 0.0))
    accepted(eng.handle(ike(EXT, MASQ, IC, 0x1), IN, 0.1))
    assert accepted(eng.handle(ike(EXT, MASQ, IC, 0x9), IN, 0.2)).dst == PRV1
    assert accepted(eng.handle(ike(EXT, MASQ, IC, 0x9), IN, 0.3)).dst == PRV1


def test_lan_host_reusing_anothers_established_cookie_pair_is_refused() -> None:
    eng = make_engine()
    accepted(eng.handle(ike(PRV1, EXT, IC), OUT, 0.0))
    accepted(eng.handle(ike(EXT, MASQ, IC, RC), IN, 0.1))
    dropped(eng.handle(ike(PRV2, EXT, IC, RC), OUT, 0.2), DropReason.ISAKMP_COLLISION)


def test_isakmp_to_our_own_address_is_left_to_napt() -> None:
    eng = make_engine()
    v = eng.handle(ike(PRV1, MASQ, IC), OUT, 0.0)
    assert v.action in (Action.ACCEPT, Action.DROP)  # hairpin rules, not the helper
    assert all(r.state != "OUTSTANDING" for r in eng.snapshot(0.0))


def test_ike_fragment_first_part_is_tracked() -> None:
    eng = make_engine()
    body = build_header(IC, RC, 2)[:24] + (1600).to_bytes(4, "big") + b"\x00" * 100
    seg = build_udp(PRV1, EXT, 500, 500, body)[20:]
    frag = build_ipv4(PRV1, EXT, 17, bytes(seg), ident=7, flags_frag=0x2000)
    v = eng.handle(frag, OUT, 0.0)
    assert v.action is Action.ACCEPT and l4_ports(v) == (500, 500)


def test_isakmp_rows_show_cookies_and_remote() -> None:
    eng = make_engine()
    accepted(eng.handle(ike(PRV1, EXT2, IC), OUT, 0.0))
    (row,) = eng.snapshot(0.0)
    assert row.inside == "10.77.0.11:500" and row.outside == "198.51.100.1:500"
    assert row.remote == "203.0.113.21:500"
    assert row.detail["icookie"] == "0102030405060708" and row.detail["rcookie"] == "-"


def test_natt_other_payloads_are_counted_not_refused() -> None:
    eng = make_engine()
    v = eng.handle(build_udp(PRV1, EXT, 4500, 4500, b"\x01\x02"), OUT, 0.0)
    assert accepted(v).u16(0) == 4500
    (row,) = eng.snapshot(0.0)
    assert row.detail["other"] == "1/0"


# ---------------------------------------------------------------------- ESP state table
@pytest.mark.parametrize("state", [None, *EspState])
@pytest.mark.parametrize("event", ["init-turn", "init-wait", "inbound-first", "turn", "yield", "reply", "outbound"])
def test_esp_transitions_are_a_table(state: EspState | None, event: str) -> None:
    if (state, event) in TRANSITIONS:
        assert transition(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(LookupError, match="can't handle"):
            transition(state, event)
