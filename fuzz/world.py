"""An engine that already carries real sessions, so fuzzed packets meet state worth breaking.

Built the same way every time (fixed rng seed, manual clock), in about a millisecond:

=========  ==========================================================================
flow       what is set up
=========  ==========================================================================
tcp        PRV1:40000 -> EXT:80 established (SYN, SYN/ACK, ACK)
udp        PRV1:5353 -> EXT:53 with a reply
icmp       PRV2 echo id 77 -> EXT answered
pptp       PRV1:1025 -> EXT:1723 control session, call 7 (PAC's ID 0x4000) + GRE both ways
pptp2      PRV2:1025 -> EXT:1723, call 7 too (gets another outside ID)
ike        PRV1 <-> EXT IKEv1 main mode + quick mode (cookies 0x11 / 0x22)
esp        PRV1 <-> EXT SPIs 0x1001 out / 0x2001 in, associated
esp-wait   PRV2 -> EXT2 SPI 0x3001 pending (claim at the head of EXT2's queue)
ike2       PRV3 -> EXT2 IKEv2 IKE_SA_INIT outstanding
=========  ==========================================================================

Variants change the configuration: 0 is the default; 1 has small limits (so table-full,
host-limit, rate-limit and fragment-overflow paths are reachable), forwards (tcp 8080, udp
5060, a LAN PPTP server on 1723 + gre) and esp.guess_single_host; 2 uses address-dependent
filtering and ``ambiguous_ike = "most-recent"``; 3 forwards whole protocols (every TCP and
UDP port, and ESP) to the LAN server, with small limits.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

from tests.packets import (
    EXT,
    EXT2,
    IN,
    MASQ,
    OUT,
    PRV1,
    PRV2,
    PRV3,
    make_engine,
)
from tests.pptp_wire import ControlLink, gre_packet

from vpnmasq.config import EspPolicy, Forward, Limits
from vpnmasq.engine import Engine
from vpnmasq.helpers.isakmp import build_header
from vpnmasq.packet.ipv4 import PROTO_ESP, build_ipv4
from vpnmasq.packet.l4 import TCP_ACK, TCP_SYN, build_esp, build_icmp, build_tcp, build_udp
from vpnmasq.verdict import Action, Verdict

QUICK, MAIN, SA_INIT = 32, 2, 34

VARIANTS: tuple[dict[str, Any], ...] = (
    {},
    {
        "limits": Limits(
            max_entries=48,
            max_entries_per_host=20,
            max_new_per_host_per_second=20.0,
            fragment_buffer=6,
        ),
        "esp": EspPolicy(guess_single_host=True, max_pending_per_host=2, max_waiting_per_remote=3),
        "forwards": (
            Forward("tcp", "10.77.0.5", port=8080),
            Forward("udp", "10.77.0.5", port=5060, to_port=5061),
            Forward("tcp", "10.77.0.5", port=1723),
            Forward("gre", "10.77.0.5"),
        ),
    },
    {"filtering": "address-dependent", "ambiguous_ike": "most-recent"},
    {
        "limits": Limits(max_entries=40, max_entries_per_host=12),
        "forwards": (Forward("udp", "10.77.0.5"), Forward("tcp", "10.77.0.5"), Forward("esp", "10.77.0.5")),
    },
)


class SetupFailed(RuntimeError):
    """The fixed setup did not go as the scenario tests say it does (a regression)."""


@dataclass
class World:
    eng: Engine
    now: float = 0.0
    variant: int = 0
    pptp: ControlLink | None = None
    pptp2: ControlLink | None = None
    outside_call_ids: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)  # public port of the tcp/udp flows

    # ------------------------------------------------------------------ driving
    def send(self, pkt: bytes | bytearray, outbound: bool) -> Verdict:
        return self.eng.handle(pkt, OUT if outbound else IN, self.now)

    def expect(self, v: Verdict, what: str) -> Verdict:
        if v.action is not Action.ACCEPT:
            raise SetupFailed(f"setup step {what!r}: {v.action} {v.reason} {v.detail}")
        return v


def _sport(v: Verdict) -> int:
    assert v.payload is not None
    ihl = (v.payload[0] & 0x0F) * 4
    return int.from_bytes(v.payload[ihl : ihl + 2], "big")


def build_world(variant: int = 0) -> World:
    """The world of the module docstring, configuration ``VARIANTS[variant]``."""
    cfg = dict(VARIANTS[variant % len(VARIANTS)])
    w = World(make_engine(**cfg), variant=variant % len(VARIANTS))
    x = w.expect
    # tcp
    v = x(w.send(build_tcp(PRV1, EXT, 40000, 80, flags=TCP_SYN, seq=100, ack=0), True), "tcp syn")
    tport = w.aliases["tcp"] = _sport(v)
    x(w.send(build_tcp(EXT, MASQ, 80, tport, flags=TCP_SYN | TCP_ACK, seq=900, ack=101), False), "tcp syn/ack")
    x(w.send(build_tcp(PRV1, EXT, 40000, 80, seq=101, ack=901), True), "tcp ack")
    # udp
    v = x(w.send(build_udp(PRV1, EXT, 5353, 53, b"query"), True), "udp out")
    uport = w.aliases["udp"] = _sport(v)
    x(w.send(build_udp(EXT, MASQ, 53, uport, b"answer"), False), "udp in")
    # icmp echo
    v = x(w.send(build_icmp(PRV2, EXT, 8, 0, (77 << 16) | 1, b"ping"), True), "echo")
    assert v.payload is not None
    w.aliases["icmp"] = int.from_bytes(v.payload[24:26], "big")
    x(w.send(build_icmp(EXT, MASQ, 0, 0, (w.aliases["icmp"] << 16) | 1, b"ping"), False), "echo reply")
    # pptp: two clients, both using Call ID 7
    now = w.now
    link = ControlLink(w.eng, PRV1, 1025, EXT).open(now)
    link.start_session(now)
    w.outside_call_ids["pptp"] = link.outgoing_call(7, 0x4000, now)
    w.pptp = link
    x(w.send(gre_packet(PRV1, EXT, 0x4000), True), "gre out")
    x(w.send(gre_packet(EXT, MASQ, w.outside_call_ids["pptp"]), False), "gre in")
    link2 = ControlLink(w.eng, PRV2, 1025, EXT).open(now)
    link2.start_session(now)
    w.outside_call_ids["pptp2"] = link2.outgoing_call(7, 0x4001, now)
    w.pptp2 = link2
    # ike + esp
    for pkt, out in (
        (build_udp(PRV1, EXT, 500, 500, build_header(0x11, 0, MAIN)), True),
        (build_udp(EXT, MASQ, 500, 500, build_header(0x11, 0x22, MAIN)), False),
        (build_udp(PRV1, EXT, 500, 500, build_header(0x11, 0x22, QUICK, flags=1, message_id=5)), True),
        (build_udp(EXT, MASQ, 500, 500, build_header(0x11, 0x22, QUICK, flags=1, message_id=5)), False),
    ):
        x(w.send(pkt, out), "ike")
    x(w.send(build_ipv4(PRV1, EXT, PROTO_ESP, build_esp(0x1001, 1)), True), "esp out")
    x(w.send(build_ipv4(EXT, MASQ, PROTO_ESP, build_esp(0x2001, 1)), False), "esp in")
    x(w.send(build_ipv4(PRV2, EXT2, PROTO_ESP, build_esp(0x3001, 1)), True), "esp pending")
    x(w.send(build_udp(PRV3, EXT2, 500, 500, build_header(0x33, 0, SA_INIT, major=2, flags=8)), True), "ike2")
    w.eng.drain_events()
    return w


_PICKLED: dict[int, bytes] = {}


def fresh_world(variant: int = 0) -> World:
    """A new copy of ``build_world(variant)``: built once, then unpickled (4x faster, and
    the copy runs no instrumented code, so coverage counts only what the input reached)."""
    v = variant % len(VARIANTS)
    blob = _PICKLED.get(v)
    if blob is None:
        blob = _PICKLED[v] = pickle.dumps(build_world(v))
    w: World = pickle.loads(blob)
    return w
