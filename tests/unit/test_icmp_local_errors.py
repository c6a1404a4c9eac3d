"""The gateway's own ICMP errors about packets vpnmasq rewrote, bytes in / bytes out.

The rules queue ICMP errors the gateway itself sends (OUTPUT hook) to the engine as outbound
packets whose source is a gateway address, not an inside one. The engine translates the
quoted header back to what the peer sent (an inbound packet rewritten to a LAN host), or
delivers an error about a rewritten outbound packet, which the kernel addressed to the public
address (itself), to the LAN host. The lab test is tests/integration/test_icmp_local_errors.py.
"""

from __future__ import annotations

import pytest

from tests.packets import (
    EXT,
    IN,
    MASQ,
    OUT,
    PRV1,
    PRV2,
    SRV_LAN,
    accepted,
    build_esp,
    build_icmp,
    build_udp,
    dropped,
    make_engine,
)
from tests.pptp_wire import ControlLink, gre_in
from vpnmasq.config import Forward
from vpnmasq.helpers.isakmp import build_header
from vpnmasq.packet.checksum import checksum
from vpnmasq.packet.ipv4 import PROTO_ESP, IPv4, build_ipv4, ip_to_int
from vpnmasq.verdict import Action, DropReason


def _error(src: int, dst: int, quoted: bytes, icmp_type: int = 3, code: int = 4) -> bytes:
    """An ICMP error as the kernel builds it: the quoted datagram cut to 28+ bytes."""
    rest = 1280 if (icmp_type, code) == (3, 4) else 0
    return bytes(build_icmp(src, dst, icmp_type, code, rest, quoted[:48]))


def _quoted(ip: IPv4) -> IPv4:
    emb = bytearray(ip.buf[ip.ihl + 8 :])
    assert checksum(emb[: (emb[0] & 0x0F) * 4]) == 0, "embedded IP header checksum"
    emb[2:4] = len(emb).to_bytes(2, "big")  # the view covers what was quoted
    return IPv4(emb)


def test_gateway_error_about_inbound_forwarded_udp_quotes_what_the_remote_sent():
    eng = make_engine(forwards=(Forward("udp", "10.77.0.5", 4500, to_port=14500),))
    sent = build_udp(EXT, MASQ, 4500, 4500, b"x" * 200)
    inb = accepted(eng.handle(sent, IN, 0.0))
    assert (inb.dst, inb.u16(2)) == (SRV_LAN, 14500)
    # the LAN link is narrower: the gateway's kernel answers the remote with frag-needed
    err = _error(MASQ, EXT, bytes(inb.buf))
    ip = accepted(eng.handle(err, OUT, 0.1))
    assert (ip.src, ip.dst) == (MASQ, EXT)
    q = _quoted(ip)
    assert (q.src, q.dst, q.u16(0), q.u16(2)) == (EXT, MASQ, 4500, 4500)
    # the quoted UDP checksum is the remote's own again
    assert bytes(q.buf[q.ihl + 6 : q.ihl + 8]) == bytes(sent[26:28])
    assert eng.counters["icmp_local_error_out"] == 1


def test_gateway_error_from_another_of_its_addresses_leaves_with_the_public_one():
    """The kernel may pick another address of the gateway (a secondary one on the outside
    link) as the source of a time-exceeded; it must leave with the public address."""
    eng = make_engine()
    out = accepted(eng.handle(build_udp(PRV1, EXT, 40000, 7, b"q"), OUT, 0.0))
    inb = accepted(eng.handle(build_udp(EXT, MASQ, 7, out.u16(0), b"r" * 100), IN, 0.1))
    err = _error(ip_to_int("192.0.2.1"), EXT, bytes(inb.buf), 11, 0)
    ip = accepted(eng.handle(err, OUT, 0.2))
    assert ip.src == MASQ
    q = _quoted(ip)
    assert (q.dst, q.u16(2)) == (MASQ, out.u16(0))


def test_gateway_error_about_inbound_esp_restores_the_public_destination():
    eng = make_engine()
    host_out = build_ipv4(PRV1, EXT, PROTO_ESP, build_esp(0x1001, 1))
    accepted(eng.handle(host_out, OUT, 0.0))
    inb = accepted(eng.handle(build_ipv4(EXT, MASQ, PROTO_ESP, build_esp(0x2001, 1, b"e" * 1300)), IN, 0.1))
    assert inb.dst == PRV1
    ip = accepted(eng.handle(_error(MASQ, EXT, bytes(inb.buf)), OUT, 0.2))
    q = _quoted(ip)
    assert (q.src, q.dst, q.u32(0)) == (EXT, MASQ, 0x2001)


def test_gateway_error_about_inbound_isakmp_is_found_by_its_cookies():
    """A certificate-sized IKE_AUTH too big for the LAN link: the remote's kernel can only
    lower its path MTU (and IKE fragment) if the error quotes the public address."""
    eng = make_engine()
    ic, rc = 0x1111222233334444, 0x5555666677778888
    accepted(eng.handle(build_udp(PRV1, EXT, 500, 500, build_header(ic, 0, 34)), OUT, 0.0))
    big = build_udp(EXT, MASQ, 500, 500, build_header(ic, rc, 35) + b"c" * 1300)
    inb = accepted(eng.handle(big, IN, 0.1))
    assert inb.dst == PRV1
    ip = accepted(eng.handle(_error(MASQ, EXT, bytes(inb.buf)), OUT, 0.2))
    q = _quoted(ip)
    assert (q.src, q.dst, q.u16(0), q.u16(2)) == (EXT, MASQ, 500, 500)
    # another host's quoted cookies are not enough
    other = build_udp(EXT, PRV2, 500, 500, build_header(ic, rc, 35) + b"c" * 100)
    dropped(eng.handle(_error(MASQ, EXT, bytes(other)), OUT, 0.3), DropReason.ICMP_NO_MAPPING)


def test_gateway_error_about_inbound_pptp_gre_restores_the_outside_call_id():
    eng = make_engine()
    calls = []
    for host in (PRV1, PRV2):  # both LAN hosts use Call ID 0: distinct outside IDs
        link = ControlLink(eng, host, 40000, EXT).open(0.0)
        link.start_session(0.0)
        calls.append((host, link.outgoing_call(0, 0x4000, 0.0)))
    for host, outside in calls:
        inb = accepted(gre_in(eng, EXT, outside, 0.1, b"\xff\x03" + b"p" * 1300))
        assert inb.dst == host
        ip = accepted(eng.handle(_error(MASQ, EXT, bytes(inb.buf)), OUT, 0.2))
        q = _quoted(ip)
        assert (q.src, q.dst, q.u16(6)) == (EXT, MASQ, outside)
    # a Call ID no call of that host has: dropped, never quoting the LAN address
    stray = bytearray(inb.buf)
    stray[inb.ihl + 6 : inb.ihl + 8] = b"\x77\x77"
    dropped(eng.handle(_error(MASQ, EXT, bytes(stray)), OUT, 0.3), DropReason.ICMP_NO_MAPPING)


def test_gateway_error_about_outbound_rewritten_udp_goes_to_the_lan_host():
    """Host unreachable (ARP failed for the next hop) about a packet already masqueraded:
    the kernel sends it to the packet's source, the public address; RFC 5508 wants it at
    the LAN host, quoting the LAN host's own packet."""
    eng = make_engine()
    out = accepted(eng.handle(build_udp(PRV1, EXT, 40000, 9999, b"lost"), OUT, 0.0))
    assert out.src == MASQ
    err = _error(MASQ, MASQ, bytes(out.buf), 3, 1)
    ip = accepted(eng.handle(err, OUT, 3.0))
    assert (ip.src, ip.dst) == (MASQ, PRV1)
    q = _quoted(ip)
    assert (q.src, q.u16(0), q.dst, q.u16(2)) == (PRV1, 40000, EXT, 9999)
    assert eng.counters["icmp_local_error_in"] == 1


def test_gateway_error_about_a_lan_hosts_untranslated_packet_is_left_alone():
    """PMTUD for the LAN: frag-needed from the forward path quotes the LAN host's packet as
    sent (outbound packets are rewritten only after routing) and needs no translation."""
    eng = make_engine()
    err = _error(MASQ, PRV1, bytes(build_udp(PRV1, EXT, 40000, 9, b"big" * 100)))
    v = eng.handle(err, OUT, 0.0)
    assert v.action is Action.ACCEPT and v.payload is None


def test_gateway_error_about_its_own_traffic_is_left_alone():
    eng = make_engine()
    own = build_udp(MASQ, EXT, 5353, 53, b"q")  # source port outside vpnmasq's ranges
    v = eng.handle(_error(MASQ, MASQ, bytes(own), 3, 3), OUT, 0.0)
    assert v.action is Action.ACCEPT and v.payload is None


def test_gateway_error_about_an_unknown_inbound_flow_never_leaks_the_lan_address():
    eng = make_engine()
    stray = build_udp(EXT, PRV1, 7, 40000, b"?")
    dropped(eng.handle(_error(MASQ, EXT, bytes(stray)), OUT, 0.0), DropReason.ICMP_NO_MAPPING)


def test_other_icmp_from_a_source_that_is_not_inside_is_still_dropped():
    eng = make_engine()
    echo = build_icmp(ip_to_int("192.168.9.9"), EXT, 8, 0, (5 << 16) | 1, b"ping")
    dropped(eng.handle(echo, OUT, 0.0), DropReason.NOT_INSIDE)


def test_a_lan_host_still_cannot_send_errors_about_another_hosts_flow():
    eng = make_engine()
    out = accepted(eng.handle(build_udp(PRV1, EXT, 40000, 7, b"q"), OUT, 0.0))
    inb = accepted(eng.handle(build_udp(EXT, MASQ, 7, out.u16(0), b"r"), IN, 0.1))
    forged = _error(PRV2, EXT, bytes(inb.buf), 3, 3)
    dropped(eng.handle(forged, OUT, 0.2), DropReason.ICMP_NO_MAPPING)
    # ... while the host the packet was for may (RFC 5508 REQ-4), as before
    ok = accepted(eng.handle(_error(PRV1, EXT, bytes(inb.buf), 3, 3), OUT, 0.3))
    assert ok.src == MASQ


# ---------------------------------------------------------------- hairpinned flows ---------
def _hairpin_udp():
    """An engine forwarding MASQ:5353 to SRV_LAN:15353, and PRV1:40000 -> MASQ:5353 through
    it; (engine, client's packet as the server got it, the server's answer as the client
    got it)."""
    eng = make_engine(forwards=(Forward("udp", "10.77.0.5", 5353, to_port=15353),))
    to_srv = accepted(eng.handle(build_udp(PRV1, MASQ, 40000, 5353, b"q" * 60), OUT, 0.0))
    assert (to_srv.src, to_srv.dst, to_srv.u16(2)) == (MASQ, SRV_LAN, 15353)
    reply = build_udp(SRV_LAN, MASQ, 15353, to_srv.u16(0), b"r" * 60)
    to_cli = accepted(eng.handle(reply, OUT, 0.1))
    assert (to_cli.src, to_cli.u16(0), to_cli.dst, to_cli.u16(2)) == (MASQ, 5353, PRV1, 40000)
    return eng, to_srv, to_cli


@pytest.mark.parametrize(
    ("err_src", "code", "now"),
    [
        # port unreachable from the server
        pytest.param(SRV_LAN, 3, 0.2, id="server-error"),
        # the gateway cannot deliver a hairpinned datagram to the LAN server (ARP fails): its
        # host unreachable quotes public:alias -> server and goes to the public address
        pytest.param(MASQ, 1, 3.0, id="gateway-error"),
    ],
)
def test_error_about_a_hairpinned_packet_reaches_the_client_quoting_its_packet(err_src, code, now):
    """An error about the client's datagram as the server got it (public:alias -> server)
    belongs to the LAN client, quoting the client's own datagram."""
    eng, to_srv, _ = _hairpin_udp()
    err = _error(err_src, MASQ, bytes(to_srv.buf), 3, code)
    ip = accepted(eng.handle(err, OUT, now))
    assert (ip.src, ip.dst) == (MASQ, PRV1)
    q = _quoted(ip)
    assert (q.src, q.u16(0), q.dst, q.u16(2)) == (PRV1, 40000, MASQ, 5353)


def test_client_error_in_a_hairpinned_flow_reaches_the_server_quoting_its_packet():
    eng, to_srv, to_cli = _hairpin_udp()
    err = _error(PRV1, MASQ, bytes(to_cli.buf), 3, 3)
    ip = accepted(eng.handle(err, OUT, 0.2))
    assert (ip.src, ip.dst) == (MASQ, SRV_LAN)
    q = _quoted(ip)
    assert (q.src, q.u16(0), q.dst, q.u16(2)) == (SRV_LAN, 15353, MASQ, to_srv.u16(0))


def test_hairpin_error_about_an_unknown_flow_is_dropped_and_pings_stay_local():
    eng = make_engine(forwards=(Forward("udp", "10.77.0.5", 5353),))
    stray = build_udp(MASQ, SRV_LAN, 61234, 5353, b"?")
    dropped(eng.handle(_error(SRV_LAN, MASQ, bytes(stray), 3, 3), OUT, 0.0), DropReason.ICMP_NO_MAPPING)
    ping = eng.handle(build_icmp(PRV1, MASQ, 8, 0, (9 << 16) | 1, b"hi"), OUT, 0.0)
    assert ping.action is Action.ACCEPT and ping.payload is None


def test_the_daemons_own_error_about_an_inbound_ah_packet_passes_unchanged():
    """send_icmp_error answers a dropped AH packet quoting it as it arrived (remote -> public
    address): nothing to translate."""
    eng = make_engine()
    ah = build_ipv4(EXT, MASQ, 51, b"\x32\x04" + b"\x00" * 22)
    v = eng.handle(_error(MASQ, EXT, bytes(ah), 3, 13), OUT, 0.0)
    assert v.action is Action.ACCEPT and v.payload is None
