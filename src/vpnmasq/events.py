"""Past-tense events the engine reports; the daemon logs and counts them. Pure values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the masquerade table, as status shows it (like ``conntrack -L``)."""

    proto: str
    inside: str  # "10.77.0.11:1234" or "10.77.0.11"
    outside: str  # public side as seen by the remote, "198.51.100.1:61001"
    remote: str
    state: str
    expires_in: float
    pkts_out: int = 0
    pkts_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    detail: dict[str, str] = field(default_factory=dict)
    offloaded: bool = False
    #: seconds since the last packet each way (None: none yet); for diagnose and status
    last_seen_out: float | None = None
    last_seen_in: float | None = None


@dataclass(frozen=True, slots=True)
class EntryCreated:
    row: Row


@dataclass(frozen=True, slots=True)
class EntryExpired:
    row: Row
    why: str = "idle"


@dataclass(frozen=True, slots=True)
class EntryUpdated:
    """A live entry changed state (TCP established, ESP associated, PPTP call connected...).
    ``entry`` is the table entry itself (its row is built only if someone listens: the
    daemon's event stream); ``old`` and ``new`` are the state names at the change."""

    entry: Any
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class PacketDropped:
    reason: str
    detail: str
    flow: str  # "udp 10.77.0.11:500 -> 203.0.113.5:500"


@dataclass(frozen=True, slots=True)
class Notice:
    """Something a person should know that is not a drop (e.g. AH seen, ambiguous IKE)."""

    topic: str
    message: str


@dataclass(frozen=True, slots=True)
class HostLimited:
    """An inside host hit a per-host limit (reported once per host and interval; ``drops``
    counts the drops since the last report, this one included)."""

    host: str
    limit: str  # "ports", "entries", "rate", "esp-pending"
    detail: str
    drops: int


@dataclass(frozen=True, slots=True)
class AddressChanged:
    old: str | None
    new: str | None
    entries_dropped: int


Event = (
    EntryCreated | EntryUpdated | EntryExpired | PacketDropped | Notice | HostLimited | AddressChanged
)
