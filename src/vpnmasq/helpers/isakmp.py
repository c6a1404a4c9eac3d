"""ISAKMP / IKE on UDP 500 (IKEv1 RFC 2408/2409, IKEv2 RFC 7296) and NAT-T on UDP 4500 (RFC 3948).

ISAKMP: every LAN host keeps source port 500 (HOWTO 2.10); sessions are told apart by the
full 64+64-bit cookies, one entry per IKE SA. A child-SA exchange signals the ESP helper
(its typed peer) that this host may take the remote's next new SPI. Remote-initiated
sessions go to the one LAN host it could be, or per ``ambiguous_ike``.

NAT-T: plain NAPT does the translating (4500 kept where free); :class:`NattWatch` labels
keepalives, IKE and ESP-in-UDP for status.

Design notes: docs/internals/helpers-isakmp.md.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpnmasq.conntrack.record import Record, Saved
from vpnmasq.conntrack.table import Entry, EntryAlg, EntryExt
from vpnmasq.helpers.base import (
    Ago,
    At,
    EngineView,
    HelperSpec,
    Ref,
    Resolve,
    UdpPortHelper,
    deliver_in,
    send_out,
)
from vpnmasq.packet.errors import MalformedPacket
from vpnmasq.packet.ipv4 import PROTO_UDP, IPv4, int_to_ip, ip_to_int
from vpnmasq.packet.l4 import ISAKMP_PORT, NATT_PORT, UDP_MIN
from vpnmasq.verdict import ACCEPT_LOCAL, DropReason, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.helpers.esp import EspHelper

#: RFC 2408 3.1 / RFC 7296 3.1: the fixed header is 28 octets
HEADER_LEN = 28
_HDR = struct.Struct("!QQBBBBII")

#: RFC 2408 3.1 / RFC 2409 / RFC 4306: exchange type numbers
V1_EXCHANGES = {
    0: "none",
    1: "base",
    2: "main",
    3: "auth-only",
    4: "aggressive",
    5: "informational",
    32: "quick",
    33: "new-group",
}
#: RFC 7296 3.1 (+ RFC 5723 resumption, RFC 9242 IKE_INTERMEDIATE, RFC 9370 IKE_FOLLOWUP_KE)
V2_EXCHANGES = {
    34: "IKE_SA_INIT",
    35: "IKE_AUTH",
    36: "CREATE_CHILD_SA",
    37: "INFORMATIONAL",
    38: "IKE_SESSION_RESUME",
    43: "IKE_INTERMEDIATE",
    44: "IKE_FOLLOWUP_KE",
}
QUICK_MODE = 32
IKE_AUTH = 35
CREATE_CHILD_SA = 36
#: IKEv2 header flags (RFC 7296 3.1)
V2_FLAG_INITIATOR = 0x08
V2_FLAG_RESPONSE = 0x20

#: An exchange nobody answered (no responder cookie yet) is forgotten after this long. IKE
#: implementations give up well within it (strongSwan's default retransmission schedule
#: totals 165 s); it also bounds how long a lost exchange blocks its cookie (collisions).
OUTSTANDING_TIMEOUT = 180.0
#: NAT-keepalive (RFC 3948 2.3) and the non-ESP marker (RFC 3948 2.2)
NATT_KEEPALIVE = b"\xff"
NON_ESP_MARKER = b"\x00\x00\x00\x00"

OUT = "out"
IN = "in"


class MalformedIsakmp(MalformedPacket):
    """An ISAKMP header we cannot use (short, bad version, inconsistent length)."""


@dataclass(frozen=True, slots=True)
class IsakmpHeader:
    """The fixed 28-octet header shared by IKEv1 and IKEv2 (cookies == IKE SA SPIs in v2)."""

    icookie: int
    rcookie: int
    next_payload: int
    major: int
    minor: int
    exchange: int
    flags: int
    message_id: int
    length: int

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, *, whole: bool = True) -> IsakmpHeader:
        """Parse ``data`` (the UDP payload). ``whole`` False for a first IP fragment, whose
        message continues in later fragments, so the length field may exceed ``data``."""
        if len(data) < HEADER_LEN:
            raise MalformedIsakmp(f"isakmp: {len(data)} bytes, header needs {HEADER_LEN}")
        ic, rc, np, ver, exch, flags, msgid, length = _HDR.unpack_from(data, 0)
        major, minor = ver >> 4, ver & 0x0F
        if major not in (1, 2):
            raise MalformedIsakmp(f"isakmp: unknown version {major}.{minor}")
        if length < HEADER_LEN:
            raise MalformedIsakmp(f"isakmp: length field {length} < {HEADER_LEN}")
        if whole and length > len(data):
            raise MalformedIsakmp(f"isakmp: length field {length} > {len(data)} bytes received")
        return cls(ic, rc, np, major, minor, exch, flags, msgid, length)

    @property
    def exchange_name(self) -> str:
        table = V1_EXCHANGES if self.major == 1 else V2_EXCHANGES
        return table.get(self.exchange, f"type-{self.exchange}")

    @property
    def creates_child_sa(self) -> bool:
        """An exchange that negotiates ESP SAs (their SPIs are in encrypted payloads)."""
        if self.major == 1:
            return self.exchange == QUICK_MODE
        return self.exchange in (IKE_AUTH, CREATE_CHILD_SA)

    @property
    def version(self) -> str:
        return f"IKEv{self.major}"

    def exchange_id(self, sender_is_lan: bool) -> Hashable:
        """Identifies one child-SA exchange, for the ESP helper's signal bookkeeping.

        IKEv1 Quick Modes have random message IDs. IKEv2 counts message IDs per requester, so
        the requester's side is part of the id; all IKE_AUTH rounds (EAP) of one IKE SA are one
        exchange (one child SA comes out of them).
        """
        if self.major == 1:
            return ("v1", self.icookie, self.rcookie, self.message_id)
        if self.exchange == IKE_AUTH:
            return ("v2-auth", self.icookie)
        requester_is_lan = sender_is_lan != bool(self.flags & V2_FLAG_RESPONSE)
        return ("v2", self.icookie, self.rcookie, self.message_id, requester_is_lan)


def build_header(
    icookie: int,
    rcookie: int = 0,
    exchange: int = 2,
    *,
    major: int = 1,
    flags: int = 0,
    message_id: int = 0,
    next_payload: int = 1,
    body: bytes = b"",
) -> bytes:
    """An ISAKMP message: the header with the right length, then ``body`` (for tests, lab)."""
    return (
        _HDR.pack(
            icookie, rcookie, next_payload, major << 4, exchange, flags, message_id,
            HEADER_LEN + len(body),
        )
        + body
    )


@dataclass(slots=True, eq=False)
class IkeSession(EntryExt):
    """Helper state of one ISAKMP entry (``entry.ext``)."""

    icookie: int
    rcookie: int
    version: int
    initiator: str  # "lan" | "remote" | "unknown" (picked up mid-way)
    via: str  # "client" | "forward" | "remote-initiated" | "most-recent"
    exchange: str = ""
    last_seen: float = 0.0
    child_exchanges: int = 0


def ike_session(e: Entry) -> IkeSession:
    """The IKE SA an isakmp entry carries."""
    s = e.ext
    assert isinstance(s, IkeSession), "an isakmp entry without its session"
    return s


class IsakmpHelper(UdpPortHelper):
    """UDP 500: keep port 500 for every LAN host and route by cookies. See the module doc."""

    kinds: tuple[str, ...] = ("isakmp",)

    def __init__(self, engine: EngineView) -> None:
        super().__init__(engine)
        #: the ESP helper (wired by the registry): told of child-SA exchanges
        self.esp: EspHelper | None = None
        self.timeout_classes = {
            "isakmp_outstanding": min(OUTSTANDING_TIMEOUT, engine.config.timeouts.isakmp)
        }
        #: The gateway's own IKE daemon: deliver inbound ISAKMP that matches
        #: nothing to the gateway itself (ACCEPT_LOCAL) instead of dropping ISAKMP_UNKNOWN.
        #: Kept in step with ``config.local_vpn`` by ``Engine.set_local_consumers``.
        self.deliver_unknown_locally: bool = engine.config.local_vpn == "always"
        self.by_icookie: dict[tuple[int, int], list[Entry]] = {}
        self.by_remote: dict[int, dict[Entry, None]] = {}

    def set_local_delivery(self, on: bool) -> None:
        self.deliver_unknown_locally = on

    # ------------------------------------------------------------------ packet paths
    def outbound(self, ip: IPv4, sport: int, dport: int, now: float) -> Verdict | None:
        eng = self.engine
        if ip.dst == eng.public_ip:
            return None  # hairpin to our own address: plain NAPT and the forwards
        hdr = self._parse(ip)
        if isinstance(hdr, Verdict):
            return hdr
        host, remote = ip.src, ip.dst
        ic, rc = hdr.icookie, hdr.rcookie
        if ic == 0:
            return self._zero_cookie(ip, hdr, f"LAN host {int_to_ip(host)}")
        e: Entry | None = eng.table.get(("ike-o", host, remote, ic), now)
        if e is None:
            other = self._owner(remote, ic, rc, now)
            if other is not None and other.inside_ip != host:
                return self._collision(ip, hdr, host, other)
            r = self._create(host, remote, dport, hdr, "lan" if rc == 0 else "unknown", "client", now)
            if isinstance(r, Verdict):
                return r
            e = r
        elif rc and rc != ike_session(e).rcookie:
            owner = eng.table.get(("ike-ir", remote, ic, rc), now)
            if owner is not None and owner is not e:
                return self._collision(ip, hdr, host, owner)
            self._learn(e, rc, now)
        elif e.tclass == "isakmp_outstanding" and ike_session(e).rcookie:
            # the LAN host answers an exchange the remote started: now it lives for hours
            eng.table.set_class(e, "isakmp", now)
        else:
            eng.table.touch(e, now)
        self._seen(e, hdr, OUT, now)
        return send_out(eng, ip, e, now)

    def inbound(self, ip: IPv4, sport: int, dport: int, now: float) -> Verdict | None:
        eng = self.engine
        if ip.src == eng.public_ip:
            return None  # hairpinned: the engine handles it as NAPT/forward
        hdr = self._parse(ip)
        if isinstance(hdr, Verdict):
            return hdr
        remote = ip.src
        ic, rc = hdr.icookie, hdr.rcookie
        if ic == 0:
            return self._zero_cookie(ip, hdr, f"remote {int_to_ip(remote)}")
        e: Entry | None = None
        if rc:
            e = eng.table.get(("ike-ir", remote, ic, rc), now)
        if e is None:
            known = self._live(remote, ic, now)
            outstanding = [x for x in known if ike_session(x).rcookie == 0]
            if outstanding:
                e = outstanding[0]
            elif known:
                hosts = {x.inside_ip for x in known}
                if len(hosts) > 1:
                    return self._collision(ip, hdr, None, known[0])
                # the same host's IKE SA, answered with a responder cookie we have not seen
                e = max(known, key=lambda x: ike_session(x).last_seen)
            if e is not None and rc and rc != ike_session(e).rcookie:
                self._learn(e, rc, now, from_lan=False)
            elif e is not None:
                eng.table.touch(e, now)
        else:
            eng.table.touch(e, now)
        if e is None:
            r = self._remote_initiated(ip, hdr, sport, dport, now)
            if not isinstance(r, _Created):
                return r
            e = r.entry
        self._seen(e, hdr, IN, now)
        return deliver_in(ip, e, now)

    def icmp_embedded_inbound(self, inner: IPv4, now: float) -> Entry | None:
        """Our outbound ISAKMP (public:500 -> remote) quoted in an ICMP error: match the
        cookies when quoted; when only the 8 UDP octets are (RFC 792 minimum), the remote's
        only LAN host, if there is exactly one."""
        ib = inner.buf
        po = inner.ihl + UDP_MIN
        remote = inner.dst
        if len(ib) >= po + 16:
            ic = int.from_bytes(ib[po : po + 8], "big")
            rc = int.from_bytes(ib[po + 8 : po + 16], "big")
            if rc:
                e: Entry | None = self.engine.table.get(("ike-ir", remote, ic, rc), now)
                if e is not None:
                    return e
            known = self._live(remote, ic, now)
            if len({x.inside_ip for x in known}) == 1:
                return max(known, key=lambda x: ike_session(x).last_seen)
            return None
        entries = [x for x in self.by_remote.get(remote, {}) if x.live and x.expires_at > now]
        if len({x.inside_ip for x in entries}) == 1:
            return max(entries, key=lambda x: ike_session(x).last_seen)
        return None

    def icmp_embedded_outbound(self, inner: IPv4, now: float) -> Entry | None:
        """Inbound ISAKMP as delivered (remote:500 -> LAN host:500) quoted in an ICMP error
        from the gateway itself or the LAN (e.g. a certificate-sized IKE_AUTH too
        big for the LAN link): the session both cookies name, if it is that host's."""
        ib = inner.buf
        po = inner.ihl + UDP_MIN
        if len(ib) < po + 16:
            return None
        ic = int.from_bytes(ib[po : po + 8], "big")
        rc = int.from_bytes(ib[po + 8 : po + 16], "big")
        e: Entry | None = self.engine.table.get(("ike-ir", inner.src, ic, rc), now) if rc else None
        return e if e is not None and e.inside_ip == inner.dst else None

    # ------------------------------------------------------------------ queries
    def holders(self, remote: int, now: float) -> dict[int, float]:
        """LAN hosts holding an IKE session with ``remote`` -> time of their last message."""
        out: dict[int, float] = {}
        for e in self.by_remote.get(remote, {}):
            if e.live and e.expires_at > now and ike_session(e).rcookie:
                t = ike_session(e).last_seen
                if t > out.get(e.inside_ip, float("-inf")):
                    out[e.inside_ip] = t
        return out

    def detail(self, entry: Entry, now: float) -> dict[str, str]:
        s = ike_session(entry)
        return {
            "version": f"IKEv{s.version}",
            "icookie": f"{s.icookie:016x}",
            "rcookie": f"{s.rcookie:016x}" if s.rcookie else "-",
            "initiator": s.initiator,
            "via": s.via,
            "exchange": s.exchange,
            "child_sa_exchanges": str(s.child_exchanges),
        }

    def on_remove(self, entry: Entry, why: str) -> None:
        s = ike_session(entry)
        k = (entry.remote_ip, s.icookie)
        lst = self.by_icookie.get(k)
        if lst is not None:
            if entry in lst:
                lst.remove(entry)
            if not lst:
                del self.by_icookie[k]
        d = self.by_remote.get(entry.remote_ip)
        if d is not None:
            d.pop(entry, None)
            if not d:
                del self.by_remote[entry.remote_ip]

    # ------------------------------------------------------------------ persistence
    def export_entry(self, entry: Entry, ago: Ago, ref: Ref) -> Saved | None:
        """State of an IKE session for ``vpnmasq.state`` (its keys are saved by the caller)."""
        s = ike_session(entry)
        return {
            "icookie": s.icookie,
            "rcookie": s.rcookie,
            "version": s.version,
            "initiator": s.initiator,
            "via": s.via,
            "exchange": s.exchange,
            "last_seen": ago(s.last_seen),
            "child_exchanges": s.child_exchanges,
        }

    def import_entry(self, entry: Entry, data: Record, at: At, resolve: Resolve) -> bool:
        """Re-attach a saved IKE session to ``entry`` and index it by cookie and remote."""
        try:
            ic = data.as_int("icookie", 1, (1 << 64) - 1)
            rc = data.as_int("rcookie", 0, (1 << 64) - 1)
            s = IkeSession(
                ic,
                rc,
                data.as_int("version"),
                data.as_str("initiator"),
                data.as_str("via"),
                data.as_str("exchange"),
                at(data.as_num("last_seen")),
                data.as_int("child_exchanges"),
            )
        except (KeyError, TypeError, ValueError):
            return False
        entry.ext = s
        self.by_icookie.setdefault((entry.remote_ip, ic), []).append(entry)
        self.by_remote.setdefault(entry.remote_ip, {})[entry] = None
        return True

    # ------------------------------------------------------------------ internals
    def _parse(self, ip: IPv4) -> IsakmpHeader | Verdict:
        off = ip.l4(UDP_MIN) + UDP_MIN
        data = memoryview(ip.buf)[off : ip.total_len]
        try:
            return IsakmpHeader.parse(data, whole=not ip.more_fragments)
        except MalformedIsakmp as exc:
            self.engine.count("isakmp:malformed")
            v: Verdict = self.engine.drop(
                DropReason.MALFORMED,
                f"{exc.reason}: not an ISAKMP message; port 500 is reserved for IKE, whose "
                "cookies keep every LAN host on source port 500",
                ip,
            )
            return v

    def _zero_cookie(self, ip: IPv4, hdr: IsakmpHeader, who: str) -> Verdict:
        self.engine.count("isakmp:zero_cookie")
        v: Verdict = self.engine.drop(
            DropReason.ISAKMP_ZERO_COOKIE,
            f"{hdr.version} {hdr.exchange_name} from {who} has a zero initiator cookie, which "
            "RFC 2408/7296 forbid; nothing can route it (HOWTO 5.7 shows this symptom when an "
            "entry has expired)",
            ip,
        )
        return v

    def _collision(
        self, ip: IPv4, hdr: IsakmpHeader, host: int | None, other: Entry
    ) -> Verdict:
        self.engine.count("isakmp:collision")
        who = f"LAN host {int_to_ip(host)}" if host is not None else "the remote"
        v: Verdict = self.engine.drop(
            DropReason.ISAKMP_COLLISION,
            f"initiator cookie {hdr.icookie:016x} from {who} collides with the exchange of "
            f"{int_to_ip(other.inside_ip)} with {int_to_ip(other.remote_ip)}; the newcomer is "
            "dropped until the first is answered (HOWTO 6.1)",
            ip,
        )
        return v

    def _live(self, remote: int, ic: int, now: float) -> list[Entry]:
        return [
            x for x in self.by_icookie.get((remote, ic), ()) if x.live and x.expires_at > now
        ]

    def _owner(self, remote: int, ic: int, rc: int, now: float) -> Entry | None:
        """The entry another message with these cookies would be routed to, if any."""
        if rc:
            e: Entry | None = self.engine.table.get(("ike-ir", remote, ic, rc), now)
            if e is not None:
                return e
        for x in self._live(remote, ic, now):
            if ike_session(x).rcookie == 0:
                return x
        return None

    def _create(
        self,
        host: int,
        remote: int,
        remote_port: int,
        hdr: IsakmpHeader,
        initiator: str,
        via: str,
        now: float,
    ) -> Entry | Verdict:
        eng = self.engine
        ic, rc = hdr.icookie, hdr.rcookie
        # an exchange the remote started (or whose cookies are all it has to show) stays
        # short-lived until the LAN host answers it: otherwise whoever can send as the
        # remote would make us keep an hours-long entry per made-up cookie pair
        tclass = "isakmp" if rc and initiator != "remote" else "isakmp_outstanding"
        e = Entry(
            PROTO_UDP, "isakmp", tclass, host, ISAKMP_PORT,
            remote, remote_port, eng.public_ip or 0, ISAKMP_PORT, now,
        )
        e.ext = IkeSession(ic, rc, hdr.major, initiator, via, hdr.exchange_name, now)
        e.state_name = "ESTABLISHED" if rc else "OUTSTANDING"
        keys: tuple[Hashable, ...] = (("ike-o", host, remote, ic),)
        if rc:
            keys += (("ike-ir", remote, ic, rc),)
        v: Verdict | None = eng.add_entry(e, now, keys)
        if v is not None:
            return v
        self.by_icookie.setdefault((remote, ic), []).append(e)
        self.by_remote.setdefault(remote, {})[e] = None
        return e

    def _learn(self, e: Entry, rc: int, now: float, from_lan: bool = True) -> None:
        """The responder cookie of ``e`` is now known (or changed): route by both cookies.
        An exchange the remote started stays short-lived until the LAN host has sent on it."""
        eng = self.engine
        s = ike_session(e)
        old = ("ike-ir", e.remote_ip, s.icookie, s.rcookie)
        if s.rcookie:
            eng.table.remove_key(e, old)
        s.rcookie = rc
        eng.table.add_key(e, ("ike-ir", e.remote_ip, s.icookie, rc))
        eng.set_state(e, "ESTABLISHED")
        if from_lan or e.pkts_out or s.initiator != "remote":
            eng.table.set_class(e, "isakmp", now)
        else:
            eng.table.touch(e, now)

    def _seen(self, e: Entry, hdr: IsakmpHeader, direction: str, now: float) -> None:
        s = ike_session(e)
        s.last_seen = now
        s.exchange = hdr.exchange_name
        s.version = hdr.major
        if hdr.creates_child_sa:
            s.child_exchanges += 1
            if self.esp is not None:
                self.esp.child_exchange(
                    e.inside_ip, e.remote_ip, hdr.exchange_id(direction == OUT), now
                )

    def _remote_initiated(
        self, ip: IPv4, hdr: IsakmpHeader, sport: int, dport: int, now: float
    ) -> _Created | Verdict | None:
        """Cookies we have never seen, from outside: a new exchange started by the remote."""
        eng = self.engine
        remote = ip.src
        # a plain-NAPT forward session (forward to another port) already owns this endpoint
        fs = eng.table.get(("i", PROTO_UDP, dport, remote, sport), now)
        if fs is not None:
            return None
        if self.deliver_unknown_locally and hdr.major == 2 and hdr.flags & V2_FLAG_RESPONSE:
            # an IKEv2 response to a request no LAN host sent: the gateway's own IKE daemon
            # asked (its requests leave from the gateway and are never seen here)
            eng.count("local_vpn:ike")
            return ACCEPT_LOCAL
        cands = self.holders(remote, now)
        if self.esp is not None:
            for h, t in self.esp.holders(remote, now).items():
                if t > cands.get(h, float("-inf")):
                    cands[h] = t
        what = f"{hdr.version} {hdr.exchange_name} from {int_to_ip(remote)} (new cookie {hdr.icookie:016x})"
        via = "remote-initiated"
        if not cands:
            fwd = eng.match_forward(PROTO_UDP, dport, remote)
            if fwd is not None:
                if fwd.to_port not in (None, dport):
                    return None  # a forward to another port: plain NAPT does it
                host = ip_to_int(fwd.to)
                via = "forward"
            elif self.deliver_unknown_locally:
                eng.count("local_vpn:ike")
                return ACCEPT_LOCAL
            else:
                self.engine.count("isakmp:unknown")
                v: Verdict = eng.drop(
                    DropReason.ISAKMP_UNKNOWN,
                    f"{what}: no LAN host holds an IKE session with this remote and no forward "
                    "of UDP 500 matches it",
                    ip,
                )
                return v
        elif len(cands) == 1:
            (host,) = cands
        else:
            names = ", ".join(int_to_ip(h) for h in sorted(cands))
            policy = eng.config.ambiguous_ike
            eng.count("isakmp:ambiguous")
            if policy == "most-recent":
                host = max(cands, key=lambda h: (cands[h], h))
                eng.notice(
                    "isakmp-ambiguous",
                    f"{what}: LAN hosts {names} all hold IKE sessions with this remote; "
                    f"ambiguous_ike = most-recent sends it to {int_to_ip(host)}",
                )
                via = "most-recent"
            else:
                eng.notice(
                    "isakmp-ambiguous",
                    f"{what}: LAN hosts {names} all hold IKE sessions with this remote, so "
                    "nobody can tell whose rekey this is; dropped (ambiguous_ike = drop; "
                    "'most-recent' picks the most recently active host)",
                )
                v = eng.drop(
                    DropReason.ISAKMP_AMBIGUOUS,
                    f"{what}: several LAN hosts ({names}) could own it",
                    ip,
                )
                return v
        if via != "forward" and eng.match_forward(PROTO_UDP, dport, remote) is not None:
            eng.notice(
                "isakmp-precedence",
                f"{what}: goes to LAN host {int_to_ip(host)}, which holds an IKE session with "
                "this remote, rather than to the UDP 500 forward",
            )
        r = self._create(host, remote, sport, hdr, "remote", via, now)
        if isinstance(r, Verdict):
            return r
        eng.count("isakmp:" + via)
        return _Created(r)


@dataclass(frozen=True, slots=True)
class _Created:
    entry: Entry


# ---------------------------------------------------------------------- NAT-T (UDP 4500)
class NattWatch:
    """Per NAPT session on UDP 4500: counts what kind of datagrams pass, for status."""

    __slots__ = ("keepalive", "ike", "esp", "other", "spi_out", "spi_in", "exchange")

    def __init__(self) -> None:
        # [outbound, inbound] counts
        self.keepalive = [0, 0]
        self.ike = [0, 0]
        self.esp = [0, 0]
        self.other = [0, 0]
        self.spi_out: int | None = None
        self.spi_in: int | None = None
        self.exchange = ""

    def _see(self, ip: IPv4, entry: Entry, off: int, d: int, engine: EngineView) -> None:
        p = ip.buf[off : ip.total_len]
        if p == NATT_KEEPALIVE:
            self.keepalive[d] += 1
            engine.count("natt:keepalive")
        elif len(p) >= 4 and p[:4] == NON_ESP_MARKER:
            self.ike[d] += 1
            engine.count("natt:ike")
            try:
                self.exchange = IsakmpHeader.parse(p[4:], whole=False).exchange_name
            except MalformedIsakmp:
                pass
        elif len(p) >= 8:
            self.esp[d] += 1
            engine.count("natt:esp")
            spi = int.from_bytes(p[:4], "big")
            if d == 0:
                self.spi_out = spi
            else:
                self.spi_in = spi
        else:
            self.other[d] += 1
            engine.count("natt:other")
        label = "NATT"
        if self.ike[0] or self.ike[1]:
            label += "_IKE"
        if self.esp[0] or self.esp[1]:
            label += "_ESP"
        engine.set_state(entry, label if label != "NATT" else "NATT_KEEPALIVE")


class NattHelper(UdpPortHelper):
    """UDP 4500: NAPT does the translating (returns None); sessions get a :class:`NattWatch`."""


    def __init__(self, engine: EngineView) -> None:
        super().__init__(engine)

    def outbound(self, ip: IPv4, sport: int, dport: int, now: float) -> Verdict | None:
        return None

    def inbound(self, ip: IPv4, sport: int, dport: int, now: float) -> Verdict | None:
        return None

    def icmp_embedded_inbound(self, inner: IPv4, now: float) -> Entry | None:
        return None  # NAPT entries are found by the engine's own lookup

    def attach(self, entry: Entry, now: float, *, server_inside: bool) -> _NattAlg:
        return _NattAlg(self.engine)

    def restore_alg(self, entry: Entry, data: Record, at: At) -> _NattAlg | None:
        """A session's watch from ``vpnmasq.state`` (counts only; a bad record starts fresh)."""
        alg = _NattAlg(self.engine)
        w = alg.watch
        try:
            w.keepalive = list(data.as_pair("keepalive"))
            w.ike = list(data.as_pair("ike"))
            w.esp = list(data.as_pair("esp"))
            w.other = list(data.as_pair("other"))
            w.spi_out = data.opt_int("spi_out")
            w.spi_in = data.opt_int("spi_in")
            w.exchange = data.as_str("exchange")
        except (KeyError, TypeError, ValueError):
            return _NattAlg(self.engine)
        return alg

    def detail(self, entry: Entry, now: float) -> dict[str, str]:
        return {}

    def on_remove(self, entry: Entry, why: str) -> None:
        return None


class _NattAlg(EntryAlg):
    """The per-session object the engine calls as ``entry.alg`` (never changes a packet)."""

    __slots__ = ("engine", "watch")

    def __init__(self, engine: EngineView) -> None:
        self.engine = engine
        self.watch = NattWatch()

    def outbound(self, ip: IPv4, entry: Entry, payload_off: int, now: float) -> Verdict | None:
        self.watch._see(ip, entry, payload_off, 0, self.engine)
        return None

    def inbound(self, ip: IPv4, entry: Entry, payload_off: int, now: float) -> Verdict | None:
        self.watch._see(ip, entry, payload_off, 1, self.engine)
        return None

    def detail(self, entry: Entry, now: float) -> dict[str, str]:
        w = self.watch
        d = {
            "natt": "keepalive" if not (any(w.ike) or any(w.esp)) else
            "+".join(n for n, c in (("ike", w.ike), ("esp-in-udp", w.esp)) if any(c)),
            "keepalives": f"{w.keepalive[0]}/{w.keepalive[1]}",
            "ike": f"{w.ike[0]}/{w.ike[1]}",
            "esp": f"{w.esp[0]}/{w.esp[1]}",
        }
        if w.spi_out is not None:
            d["spi_out"] = f"0x{w.spi_out:08x}"
        if w.spi_in is not None:
            d["spi_in"] = f"0x{w.spi_in:08x}"
        if w.exchange:
            d["exchange"] = w.exchange
        if any(w.other):
            d["other"] = f"{w.other[0]}/{w.other[1]}"
        return d

    def on_remove(self, entry: Entry, why: str) -> None:
        return None

    def export_state(self, ago: Ago, ref: Ref) -> Saved:
        w = self.watch
        return {
            "helper": "natt",
            "keepalive": list(w.keepalive),
            "ike": list(w.ike),
            "esp": list(w.esp),
            "other": list(w.other),
            "spi_out": w.spi_out,
            "spi_in": w.spi_in,
            "exchange": w.exchange,
        }


SPECS: tuple[HelperSpec, ...] = (
    HelperSpec(
        "isakmp",
        "udp-port",
        PROTO_UDP,
        ISAKMP_PORT,
        IsakmpHelper,
        "IKE on UDP 500: every LAN host keeps port 500; sessions are told apart by cookies",
    ),
    HelperSpec(
        "natt",
        "udp-port",
        PROTO_UDP,
        NATT_PORT,
        NattHelper,
        "NAT-T on UDP 4500: plain NAPT keeping 4500 where free; labels keepalives, IKE and "
        "ESP-in-UDP",
    ),
)
