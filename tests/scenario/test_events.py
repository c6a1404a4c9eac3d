"""The event stream on a manual clock: what ``vpnmasq events`` shows for a TCP connection,
an ESP association, a PPTP call, idle expiry and a drop flood; and its filters."""

from __future__ import annotations

from typing import Any

from tests.packets import (
    EXT,
    MASQ,
    PRV1,
    PRV2,
    accepted,
    build_tcp,
    build_udp,
)
from tests.pptp_wire import ControlLink, cdn
from tests.transcript import Gw
from vpnmasq.eventstream import DROP_BURST, EventFilter, EventStream
from vpnmasq.packet.ipv4 import PROTO_ESP, build_ipv4, ip_to_int
from vpnmasq.packet.l4 import TCP_ACK, TCP_RST, TCP_SYN, build_esp
from vpnmasq.tools.events import render_line

ATTACKER = ip_to_int("192.0.2.66")


class Watch(Gw):
    """The scenario harness plus the stream the daemon would publish."""

    def __init__(self, **cfg: object) -> None:
        super().__init__(**cfg)
        self.now = 1.0
        self.stream = EventStream(self.eng.row)
        self.seen: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        got = self.stream.convert(self.eng.drain_events(), self.now, 1_700_000_000.0 + self.now)
        self.seen += got
        return got

    def advance(self, dt: float) -> None:
        self.now += dt
        self.eng.handle_timer(self.now)


def test_tcp_connection_created_updated_and_removed_by_idle() -> None:
    w = Watch()
    syn = accepted(w.out(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_SYN, seq=1)))
    alias = syn.u16(0)
    w.inn(build_tcp(EXT, MASQ, 80, alias, flags=TCP_SYN | TCP_ACK, seq=9, ack=2))
    w.out(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_ACK, seq=2, ack=10))
    evs = w.drain()
    assert [e["event"] for e in evs] == ["created", "updated", "updated"]
    assert evs[0]["inside"] == "10.77.0.11:40000" and evs[0]["kind"] == "tcp"
    assert [(e["old_state"], e["state"]) for e in evs[1:]] == [
        ("", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"),
    ]
    assert all(isinstance(e["time"], float) for e in evs)
    w.advance(3 * 3600)
    (gone,) = w.drain()
    assert gone["event"] == "removed" and gone["reason"] == "expired" and gone["why"] == "idle"
    assert gone["pkts_out"] == 2 and gone["pkts_in"] == 1
    assert "[DESTROY]" in render_line(gone) and "(expired; pkts 2/1)" in render_line(gone)


def test_a_closed_tcp_connection_is_removed_for_fin_rst_and_a_flush_says_so() -> None:
    w = Watch()
    syn = accepted(w.out(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_SYN, seq=1)))
    alias = syn.u16(0)
    w.inn(build_tcp(EXT, MASQ, 80, alias, flags=TCP_SYN | TCP_ACK, seq=9, ack=2))
    w.out(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_ACK, seq=2, ack=10))
    w.out(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_RST | TCP_ACK, seq=2, ack=10))
    accepted(w.out(build_udp(PRV2, EXT, 5000, 53)))
    w.drain()
    w.advance(200)  # past the closed-TCP timeout, not UDP's
    (gone,) = w.drain()
    assert gone["reason"] == "fin-rst" and gone["inside"] == "10.77.0.11:40000"
    w.eng.flush()
    (flushed,) = w.drain()
    assert flushed["reason"] == "flushed" and flushed["inside"] == "10.77.0.12:5000"


def test_esp_association_says_how_and_a_refusal_says_why() -> None:
    w = Watch()
    accepted(w.out(build_ipv4(PRV1, EXT, PROTO_ESP, build_esp(0xF00D0001, 1))))
    w.drain()
    w.now += 0.1
    accepted(w.inn(build_ipv4(EXT, MASQ, PROTO_ESP, build_esp(0xBEEF0001, 1))))
    (assoc,) = [e for e in w.drain() if e.get("what") == "esp-associated"]
    assert assoc["how"] == "serialized" and assoc["inside"] == "10.77.0.11"
    assert assoc["detail"]["spi_in"] == "0xbeef0001"
    line = render_line(assoc)
    assert "esp associated by serialized" in line and "spi_in=0xbeef0001" in line
    # an SPI from a remote nobody talks to: refused, and the line says so
    w.inn(build_ipv4(ip_to_int("203.0.113.99"), MASQ, PROTO_ESP, build_esp(0x1234, 1)))
    (refused,) = w.drain()
    assert refused["event"] == "drop" and refused["what"] == "esp-refused"
    assert refused["reason"] == "esp-unassociated"
    assert "(esp association refused)" in render_line(refused)


def test_pptp_call_up_and_down() -> None:
    w = Watch()
    link = ControlLink(w.eng, PRV1, 40000, EXT).open(w.now)
    link.start_session(w.now)
    outside = link.outgoing_call(0x77, 0x501, w.now)
    evs = w.drain()
    (up,) = [e for e in evs if e.get("what") == "pptp-call-up"]
    assert up["kind"] == "gre" and up["detail"]["call_id_outside"] == str(outside)
    link.lan_sends(cdn(0x77), w.now)  # the LAN client hangs up
    evs = w.drain()
    (down,) = [e for e in evs if e.get("what") == "pptp-call-down"]
    assert down["event"] == "removed" and down["reason"] == "call-disconnect"
    assert "pptp call down" in render_line(down)


def test_a_drop_flood_is_rate_limited_and_counted() -> None:
    w = Watch()
    for port in range(100):
        w.inn(build_udp(ATTACKER, MASQ, 1000 + port, 7))
    evs = w.drain()
    assert [e["event"] for e in evs] == ["drop"] * DROP_BURST
    assert evs[0]["reason"] == "no-mapping" and evs[0]["flow"].startswith("udp 192.0.2.66:")
    w.now += 1.5
    (summary,) = w.drain()
    assert summary == {
        "event": "drops-suppressed", "reason": "no-mapping", "count": 100 - DROP_BURST,
        "time": summary["time"],
    }


def test_filters_follow_the_status_filters() -> None:
    w = Watch()
    accepted(w.out(build_udp(PRV1, EXT, 5000, 53)))
    accepted(w.out(build_udp(PRV2, EXT, 5001, 53)))
    accepted(w.out(build_ipv4(PRV2, EXT, PROTO_ESP, build_esp(0xAA, 1))))
    w.inn(build_udp(ATTACKER, MASQ, 1, 7))
    evs = w.drain()
    by_host = EventFilter.from_request({"host": "10.77.0.12"})
    assert {e["inside"] for e in evs if by_host(e)} == {"10.77.0.12:5001", "10.77.0.12"}
    esp = EventFilter.from_request({"proto": "ESP"})
    assert [e["kind"] for e in evs if esp(e)] == ["esp"]
    attacker = EventFilter.from_request({"host": "192.0.2.0/24"})
    assert [e["event"] for e in evs if attacker(e)] == ["drop"]
    udp = EventFilter.from_request({"proto": "udp"})
    assert [e["event"] for e in evs if udp(e)] == ["created", "created", "drop"]
