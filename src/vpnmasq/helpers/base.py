"""The helper interface: how protocol helpers (ALGs) plug into the engine.

Owns the seam between the engine and its protocols, declared once and type-checked:

* :class:`EngineView`, the narrow view of the engine a helper gets (the table, add/remove
  entries, forwards, drop/count/notice), never the engine itself;
* :class:`Helper`, every hook with a no-op default (timers, ICMP-embedded lookups and fixes in
  both directions, the state file, timeout classes, the entry kinds it owns), so the engine
  and the state file call hooks without ``getattr``;
* the three ways a helper claims packets: :class:`ProtoHelper` (a whole IP protocol),
  :class:`UdpPortHelper` (UDP on a port, before NAPT) and :class:`TcpAlgFactory` (an ALG
  attached to TCP sessions to a port, :class:`~vpnmasq.conntrack.table.EntryAlg`);
* :class:`HelperSpec`, what the registry knows about a helper before building it.

Helpers are pure: the parsed packet and ``now`` in, a Verdict (or None: "not mine") out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from vpnmasq.conntrack.record import Record, Saved
from vpnmasq.conntrack.table import Entry, EntryAlg, MasqTable
from vpnmasq.packet.ipv4 import IPv4
from vpnmasq.verdict import DropReason, Verdict, accept

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.config import Config, Forward

HelperKind = Literal["proto", "udp-port", "tcp-alg"]
#: ``ago(t)``: a monotonic instant as seconds before the save (state file records)
Ago = Callable[[float], float]
#: ``at(seconds_before_save)``: back to an instant on this run's monotonic clock
At = Callable[[float], float]
#: ``ref(entry or alg)``: the saved id of an object saved earlier in the same file
Ref = Callable[[object], "int | None"]
#: ``resolve(saved id)``: the restored entry of that id
Resolve = Callable[[int], "Entry | None"]


class EngineView(Protocol):
    """What a helper may see and do of the engine."""

    @property
    def config(self) -> Config: ...

    @property
    def table(self) -> MasqTable: ...

    @property
    def rng(self) -> random.Random: ...

    @property
    def public_ip(self) -> int | None: ...

    def add_entry(self, entry: Entry, now: float, keys: tuple[Hashable, ...]) -> Verdict | None:
        """Insert a new entry (limits and rate applied); a drop Verdict if refused."""
        ...

    def created(self, entry: Entry, now: float) -> None:
        """Report an entry the helper put in the table itself (counter and event)."""
        ...

    def match_forward(self, proto: int, port: int | None, remote: int) -> Forward | None: ...

    def drop(self, reason: DropReason, detail: str, ip: IPv4 | None = None) -> Verdict: ...

    def count(self, name: str, n: int = 1) -> None: ...

    def notice(self, topic: str, message: str) -> None: ...

    def set_state(self, entry: Entry, name: str) -> None:
        """Name an entry's state; a change of an entry in the table is reported."""
        ...


class Translator(Protocol):
    """An entry of the engine's dispatch table, ``protocol -> translator``: the built-in
    translators (TCP, UDP, ICMP, generic) and every :class:`ProtoHelper`."""

    def outbound(self, ip: IPv4, now: float) -> Verdict: ...

    def inbound(self, ip: IPv4, now: float) -> Verdict: ...


class Helper:
    """Every hook a helper may implement, each with a no-op default."""

    #: entry kinds this helper owns: their status detail, removal and state-file records
    kinds: tuple[str, ...] = ()

    def __init__(self, engine: EngineView) -> None:
        self.engine = engine
        #: timeout classes of its own (e.g. ``"esp_wait"``); the config's value wins
        self.timeout_classes: dict[str, float] = {}

    # --- time -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        return None

    # --- operator input ---------------------------------------------------------------
    def set_local_delivery(self, on: bool) -> None:
        """Whether unclaimed inbound traffic of this protocol goes to the gateway itself."""
        return None

    # --- ICMP errors quoting a packet of this helper's protocol -------------------------
    def icmp_embedded_inbound(self, inner: IPv4, now: float) -> Entry | None:
        """The entry of our outbound packet (already translated) quoted in an inbound error."""
        return None

    def icmp_embedded_outbound(self, inner: IPv4, now: float) -> Entry | None:
        """The entry of an inbound packet as delivered, quoted in a LAN host's error."""
        return None

    def icmp_embedded_inbound_fix(self, inner: IPv4, entry: Entry) -> None:
        """Translate helper fields of the quoted packet back (after the engine's part)."""
        return None

    def icmp_embedded_outbound_fix(self, inner: IPv4, entry: Entry) -> None:
        """Translate helper fields of the quoted packet outwards (e.g. a PPTP Call ID)."""
        return None

    # --- entries of its kinds -----------------------------------------------------------
    def detail(self, entry: Entry, now: float) -> dict[str, str]:
        return {}

    def on_remove(self, entry: Entry, why: str) -> None:
        return None

    # --- the state file -----------------------------------------------------------------
    def export_entry(self, entry: Entry, ago: Ago, ref: Ref) -> Saved | None:
        """The helper state of one of its entries; None: not saved."""
        return None

    def import_entry(self, entry: Entry, data: Record, at: At, resolve: Resolve) -> bool:
        """Put saved helper state back on a restored entry; False: refused."""
        return False

    def restore_alg(self, entry: Entry, data: Record, at: At) -> EntryAlg | None:
        """A saved session ALG (``EntryAlg.export_state``) back; None: start without."""
        return None


class ProtoHelper(Helper):
    """Owns one IP protocol: called for every packet of it."""

    def outbound(self, ip: IPv4, now: float) -> Verdict:
        raise NotImplementedError

    def inbound(self, ip: IPv4, now: float) -> Verdict:
        raise NotImplementedError


class UdpPortHelper(Helper):
    """Claims UDP packets on a port before NAPT; None lets NAPT handle the packet."""

    def outbound(self, ip: IPv4, sport: int, dport: int, now: float) -> Verdict | None:
        return None

    def inbound(self, ip: IPv4, sport: int, dport: int, now: float) -> Verdict | None:
        return None

    def attach(self, entry: Entry, now: float, *, server_inside: bool) -> EntryAlg | None:
        """A watcher for a plain NAPT session on its port (``entry.alg``), or None."""
        return None


class TcpAlgFactory(Helper):
    """Attaches an ALG to each TCP session to (or, forwarded, from) its port."""

    def attach(self, entry: Entry, now: float, *, server_inside: bool) -> EntryAlg:
        raise NotImplementedError


def send_out(engine: EngineView, ip: IPv4, e: Entry, now: float) -> Verdict:
    """The tail of an address-only outbound translation: the source becomes the public
    address, the entry counts the packet, the packet is accepted."""
    pub = engine.public_ip
    assert pub is not None  # the engine drops outbound packets before it has one
    ip.set_src(pub)
    e.pkts_out += 1
    e.last_out = now
    e.bytes_out += ip.total_len
    return accept(ip.buf)


def deliver_in(ip: IPv4, e: Entry, now: float) -> Verdict:
    """The tail of an address-only inbound translation: to the entry's inside host, counted."""
    ip.set_dst(e.inside_ip)
    e.pkts_in += 1
    e.last_in = now
    e.bytes_in += ip.total_len
    return accept(ip.buf)


@dataclass(frozen=True, slots=True)
class HelperSpec:
    """A helper: its config name, kind, what it matches and how to build it."""

    name: str
    kind: HelperKind
    proto: int
    port: int | None
    factory: Callable[[EngineView], Helper]
    description: str = ""
