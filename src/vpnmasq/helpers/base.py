"""The helper interface: how protocol helpers (ALGs) plug into the engine.

Three kinds, each registered explicitly (see :mod:`vpnmasq.helpers.registry`), nothing at import:

* ``proto`` helpers own a whole IP protocol (ESP 50, GRE 47, AH 51, 94): the engine calls
  ``outbound``/``inbound`` for every packet of that protocol;
* ``udp-port`` helpers claim UDP packets by port before plain NAPT (ISAKMP on 500 keeps the
  source port and tracks cookies instead);
* ``tcp-alg`` helpers attach to TCP NAPT sessions to a server port (PPTP on 1723) and inspect
  or rewrite the payload after the addresses are translated.

Helpers are pure: they receive the engine (for its table, allocators, counters and the
``drop``/``notice`` helpers), the parsed packet and ``now``; they return a Verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from vpnmasq.packet.ipv4 import IPv4

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.conntrack.table import Entry
    from vpnmasq.verdict import Verdict

HelperKind = Literal["proto", "udp-port", "tcp-alg"]


class ProtoHelper(Protocol):
    """Owns one IP protocol."""

    def outbound(self, ip: IPv4, now: float) -> Verdict: ...

    def inbound(self, ip: IPv4, now: float) -> Verdict: ...

    def icmp_embedded_inbound(self, inner: IPv4, now: float) -> Entry | None:
        """Entry of an embedded (our outbound, already translated) packet in an ICMP error."""
        ...

    def detail(self, entry: Entry, now: float) -> dict[str, str]: ...

    def on_remove(self, entry: Entry, why: str) -> None: ...


class UdpPortHelper(Protocol):
    """Claims UDP packets on a port before NAPT; returns None to let NAPT handle it."""

    def outbound(self, ip: IPv4, sport: int, dport: int, now: float) -> Verdict | None: ...

    def inbound(self, ip: IPv4, sport: int, dport: int, now: float) -> Verdict | None: ...

    def icmp_embedded_inbound(self, inner: IPv4, now: float) -> Entry | None: ...

    def detail(self, entry: Entry, now: float) -> dict[str, str]: ...

    def on_remove(self, entry: Entry, why: str) -> None: ...


class TcpAlg(Protocol):
    """Attached to one TCP session (entry.alg); sees payload after address translation.

    ``outbound``/``inbound`` return None to accept the (possibly rewritten) packet, or a
    Verdict to override (drop, hold).
    """

    def outbound(self, ip: IPv4, entry: Entry, payload_off: int, now: float) -> Verdict | None: ...

    def inbound(self, ip: IPv4, entry: Entry, payload_off: int, now: float) -> Verdict | None: ...

    def detail(self, entry: Entry, now: float) -> dict[str, str]: ...

    def on_remove(self, entry: Entry, why: str) -> None: ...


@dataclass(frozen=True, slots=True)
class HelperSpec:
    """Describes a helper: its config name, kind, what it matches and how to build it.

    ``factory(engine)`` returns the helper instance (or, for ``tcp-alg``, an object whose
    ``attach(entry, now)`` returns the per-session TcpAlg).
    """

    name: str
    kind: HelperKind
    proto: int
    port: int | None
    factory: Callable[[Any], Any]
    description: str = ""
