"""The engine harness of the scenario tests: a transcript on a manual clock (aioquic's
``now += TICK``, mitmproxy's playbook). :class:`Gw` is the gateway: the engine, ``now``, packets
out and in, timers fired at their exact deadlines, and drivers for the VPN protocols (IKE and
ESP here, a PPTP control connection through :class:`tests.pptp_wire.ControlLink`).
"""

from __future__ import annotations

from tests.packets import EXT, IN, MASQ, OUT, build_esp, build_udp, make_engine
from tests.pptp_wire import ControlLink, gre_in, gre_out
from vpnmasq.events import Notice
from vpnmasq.helpers.esp import EspHelper
from vpnmasq.helpers.isakmp import IsakmpHelper, build_header
from vpnmasq.packet.ipv4 import PROTO_ESP, build_ipv4
from vpnmasq.verdict import Verdict

MAIN, AGGRESSIVE, INFO, QUICK = 2, 4, 5, 32
SA_INIT, AUTH, CHILD, INFORMATIONAL = 34, 35, 36, 37
V2_I, V2_R = 0x08, 0x20


class Gw:
    """The engine plus a manual clock; ``at``/``tick`` fire timers at their exact deadlines."""

    def __init__(self, **cfg: object) -> None:
        self.eng = make_engine(**cfg)
        self.now = 0.0

    @property
    def esp(self) -> EspHelper:
        h = self.eng.helper_by_name["esp"]
        assert isinstance(h, EspHelper)
        return h

    @property
    def ike(self) -> IsakmpHelper:
        h = self.eng.helper_by_name["isakmp"]
        assert isinstance(h, IsakmpHelper)
        return h

    def at(self, t: float) -> None:
        assert t >= self.now
        for _ in range(10_000):
            d = self.eng.next_deadline()
            if d is None or d > t:
                break
            self.now = max(self.now, d)
            self.eng.handle_timer(self.now)
        self.now = t

    def tick(self, dt: float) -> None:
        self.at(self.now + dt)

    def out(self, pkt: bytes | bytearray) -> Verdict:
        return self.eng.handle(pkt, OUT, self.now)

    def inn(self, pkt: bytes | bytearray) -> Verdict:
        return self.eng.handle(pkt, IN, self.now)

    # IKE, 500 <-> 500 unless told otherwise
    def ike_out(
        self, host: int, ic: int, rc: int = 0, exch: int = MAIN, remote: int = EXT, **kw: int
    ) -> Verdict:
        sport = kw.pop("sport", 500)
        return self.out(build_udp(host, remote, sport, 500, build_header(ic, rc, exch, **kw)))

    def ike_in(
        self, ic: int, rc: int, exch: int = MAIN, remote: int = EXT, **kw: int
    ) -> Verdict:
        sport = kw.pop("sport", 500)
        return self.inn(build_udp(remote, MASQ, sport, 500, build_header(ic, rc, exch, **kw)))

    def esp_out(self, host: int, spi: int, remote: int = EXT, seq: int = 1) -> Verdict:
        return self.out(build_ipv4(host, remote, PROTO_ESP, build_esp(spi, seq)))

    def esp_in(self, spi: int, remote: int = EXT, seq: int = 1) -> Verdict:
        return self.inn(build_ipv4(remote, MASQ, PROTO_ESP, build_esp(spi, seq)))

    def notices(self) -> list[Notice]:
        return [e for e in self.eng.drain_events() if isinstance(e, Notice)]

    def rows(self, proto: str) -> list[dict[str, str]]:
        out = []
        for r in self.eng.snapshot(self.now):
            if r.proto == proto:
                d = dict(r.detail)
                d["inside"] = r.inside
                d["state"] = r.state
                out.append(d)
        return out

    # PPTP: a control connection from a LAN host, and GRE both ways
    def pptp(self, host: int, sport: int = 40000, remote: int = EXT) -> ControlLink:
        return ControlLink(self.eng, host, sport, remote).open(self.now)

    def gre_out(self, host: int, remote: int, call_id: int) -> Verdict:
        return gre_out(self.eng, host, remote, call_id, self.now)

    def gre_in(self, remote: int, call_id: int) -> Verdict:
        return gre_in(self.eng, remote, call_id, self.now)
