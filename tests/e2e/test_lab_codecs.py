"""Pure checks of the lab's own codecs (HDLC/FCS-16, ISAKMP header, ESP SA round trip)."""

from __future__ import annotations

import importlib.util

import pytest

from vpnmasq_lab.pppstub import (
    FCS_GOOD,
    HdlcDecoder,
    encode_frame,
    fcs16,
    parse_test_payload,
    ppp_frame,
    split_ppp,
)
from vpnmasq_lab.rawpeers import isakmp_packet, parse_isakmp

pytestmark = pytest.mark.e2e


def test_fcs16_check_value() -> None:
    # CRC-16/X-25 (= PPP FCS-16) check value for "123456789" (RFC 1662 algorithm)
    assert fcs16(b"123456789") ^ 0xFFFF == 0x906E


def test_hdlc_round_trip_all_bytes_and_split_feeds() -> None:
    frame = ppp_frame(0x0021, bytes(range(256)))
    wire = encode_frame(frame)
    assert wire[0] == wire[-1] == 0x7E and 0x7E not in wire[1:-1]
    assert all(b >= 0x20 or b == 0x7E for b in wire if b != 0x7D)
    whole = HdlcDecoder()
    assert whole.feed(wire) == [frame]
    bytewise = HdlcDecoder()
    out: list[bytes] = []
    for i in range(len(wire)):
        out += bytewise.feed(wire[i : i + 1])
    assert out == [frame]
    raw = frame + bytes(((fcs16(frame) ^ 0xFFFF) & 0xFF, (fcs16(frame) ^ 0xFFFF) >> 8))
    assert fcs16(raw) == FCS_GOOD


def test_hdlc_bad_fcs_is_dropped_and_counted() -> None:
    wire = bytearray(encode_frame(ppp_frame(0x0021, b"VMQ x 1")))
    wire[5] ^= 0x01
    d = HdlcDecoder()
    assert d.feed(bytes(wire)) == []
    assert d.stats.bad_fcs == 1


def test_test_payload_parse() -> None:
    sp = split_ppp(ppp_frame(0x0021, b"VMQ tok 7 ECHO pid=1 peer=198.51.100.1"))
    assert sp is not None and sp[0] == 0x0021
    assert parse_test_payload(sp[1]) == ("tok", 7, "ECHO pid=1 peer=198.51.100.1")


@pytest.mark.parametrize("version", [1, 2])
def test_isakmp_round_trip(version: int) -> None:
    pkt = isakmp_packet(b"I" * 8, b"\0" * 8, version, "h1")
    msg = parse_isakmp(pkt)
    assert msg is not None
    assert msg == {
        **msg,
        "icookie": (b"I" * 8).hex(),
        "version": version,
        "token": "h1",
        "length": len(pkt),
    }
    assert msg["exch"] == (2 if version == 1 else 34)


def test_esp_round_trip_survives_nat_of_outer_header() -> None:
    if importlib.util.find_spec("cryptography") is None:
        pytest.skip("cryptography not installed")
    import socket
    import struct

    from vpnmasq_lab.rawpeers import esp_decrypt, esp_encrypt, make_sa

    sa = make_sa(0x1001)
    esp = esp_encrypt(sa, "10.77.0.11", "198.51.100.20", b"VMQ h1 1")
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(esp),
        1,
        0,
        64,
        50,
        0,
        socket.inet_aton("198.51.100.1"),
        socket.inet_aton("198.51.100.20"),
    )
    assert esp_decrypt(make_sa(0x1001), ip + esp) == b"VMQ h1 1"
    with pytest.raises(Exception):  # noqa: B017 - scapy raises its own integrity error
        esp_decrypt(make_sa(0x1001, seed="other"), ip + esp)
