"""What the engine answers for each packet: a small, frozen value."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, fields


class Direction(enum.Enum):
    OUTBOUND = "out"  # from an inside network, to be masqueraded (source rewrite)
    INBOUND = "in"  # arriving on the outside interface (destination rewrite)


class Action(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"
    HOLD = "hold"  # verdict deferred: released later through Engine.handle_* results


class DropReason(enum.Enum):
    MALFORMED = "malformed"
    BAD_CHECKSUM = "bad-checksum"
    NO_MAPPING = "no-mapping"  # unsolicited inbound
    FILTERED = "filtered"  # mapping exists, remote not allowed by the filtering policy
    TABLE_FULL = "table-full"
    HOST_LIMIT = "host-limit"
    PORTS_EXHAUSTED = "ports-exhausted"
    NOT_INSIDE = "not-inside"  # outbound from an address outside the inside networks
    AH_UNSUPPORTED = "ah-cannot-be-masqueraded"
    FWZ_UNSUPPORTED = "fwz-cannot-be-masqueraded"
    ESP_SPI_ZERO = "esp-spi-zero"
    ESP_WAITING = "esp-waiting-for-pending-init"
    ESP_UNASSOCIATED = "esp-unassociated"
    ESP_SERIALIZED = "esp-parallel-sessions-disabled"
    GRE_UNKNOWN_CALL = "gre-unknown-call"
    GRE_NOT_PPTP = "gre-not-pptp"
    ISAKMP_ZERO_COOKIE = "isakmp-zero-cookie"
    ISAKMP_UNKNOWN = "isakmp-unknown-session"
    ISAKMP_AMBIGUOUS = "isakmp-ambiguous-remote-initiated"
    ISAKMP_COLLISION = "isakmp-cookie-collision"
    PPTP_OUT_OF_ORDER = "pptp-out-of-order"  # control segment beyond a gap; resent in order
    FRAGMENT_TIMEOUT = "fragment-timeout"
    FRAGMENT_OVERFLOW = "fragment-buffer-full"
    TOO_BIG = "too-big"  # longer than the queue copy range (the daemon counts it)
    ICMP_NO_MAPPING = "icmp-error-no-mapping"
    NO_ADDRESS = "no-public-address"
    GENERIC_BUSY = "generic-protocol-remote-in-use"


@dataclass(frozen=True, slots=True)
class Verdict:
    """ACCEPT with ``payload`` None means "unchanged"; otherwise the rewritten datagram.

    ``local`` marks an inbound packet that is not ours and is left to the gateway itself.
    ``released`` carries verdicts for packets held earlier (out-of-order fragments), as
    (token, Verdict) pairs, to be issued by the datapath now.
    ``icmp_back`` asks the datapath to answer the sender of a dropped packet with this ICMP
    error (type, code), quoting the packet (RFC 5508 REQ-8: administratively prohibited).
    """

    action: Action
    payload: bytes | None = None
    reason: DropReason | None = None
    detail: str = ""
    local: bool = False
    released: tuple[tuple[object, Verdict], ...] = ()
    icmp_back: tuple[int, int] | None = None

    @property
    def accepted(self) -> bool:
        return self.action is Action.ACCEPT


ACCEPT_UNCHANGED = Verdict(Action.ACCEPT)
ACCEPT_LOCAL = Verdict(Action.ACCEPT, local=True)
HOLD = Verdict(Action.HOLD)


def _accept_maker() -> Callable[[bytes], Verdict] | None:
    """A constructor for accept verdicts that fills the slots directly: ``accept`` runs once
    per translated packet, and a frozen dataclass ``__init__`` (one ``object.__setattr__``
    per field) costs twice as much (docs/BENCHMARKS.md). None, so that ``accept`` falls back
    to the plain constructor, if the fields are not the ones this was written for."""
    fs = fields(Verdict)
    if tuple(f.name for f in fs) != (
        "action", "payload", "reason", "detail", "local", "released", "icmp_back"
    ):
        return None
    d = {f.name: f.default for f in fs}
    put = {f.name: Verdict.__dict__[f.name].__set__ for f in fs}
    s_action, s_payload, s_reason = put["action"], put["payload"], put["reason"]
    s_detail, s_local, s_released, s_icmp = (
        put["detail"], put["local"], put["released"], put["icmp_back"]
    )
    reason, detail, local, released, icmp = (
        d["reason"], d["detail"], d["local"], d["released"], d["icmp_back"]
    )
    new = object.__new__
    ok = Action.ACCEPT

    def make(payload: bytes) -> Verdict:
        v: Verdict = new(Verdict)
        s_action(v, ok)
        s_payload(v, payload)
        s_reason(v, reason)
        s_detail(v, detail)
        s_local(v, local)
        s_released(v, released)
        s_icmp(v, icmp)
        return v

    return make


_make_accept = _accept_maker()


def accept(payload: bytes | bytearray) -> Verdict:
    if _make_accept is not None:
        return _make_accept(bytes(payload))
    return Verdict(Action.ACCEPT, bytes(payload))


def drop(reason: DropReason, detail: str = "") -> Verdict:
    return Verdict(Action.DROP, None, reason, detail)
