"""ESP (IP protocol 50): associate each LAN host's outbound SPI with the remote's inbound SPI.

The SPIs are chosen inside encrypted IKE payloads, so the gateway cannot read them (HOWTO 2.6).
Outbound is easy (the source address says who sent it); a *new* inbound SPI has to be placed.
Per remote, a FIFO of claims (one per LAN host, made by the IKE helper's child-SA signal or an
initial outbound packet) decides who takes the next new inbound SPI; the turn passes after
``timeouts.esp_pending``. Precedence: established association > head claim > ``[[forward]]``
of ESP > single-host guess (``esp.guess_single_host``) > drop ``ESP_UNASSOCIATED``.

Known limit (HOWTO 6.1/6.2): with several claims, a remote that answers late or sends first
on a new SA can still be misassociated (harmless to confidentiality, RFC 4303 3.4.2).

Design notes: docs/internals/helpers-esp.md.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vpnmasq.conntrack.record import Record, Saved
from vpnmasq.conntrack.table import Entry, EntryExt
from vpnmasq.helpers.base import (
    Ago,
    At,
    EngineView,
    HelperSpec,
    ProtoHelper,
    Ref,
    Resolve,
    deliver_in,
    send_out,
)
from vpnmasq.packet.ipv4 import PROTO_ESP, IPv4, int_to_ip, ip_to_int
from vpnmasq.packet.l4 import ESP_MIN
from vpnmasq.verdict import DropReason, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.helpers.isakmp import IsakmpHelper

#: how long after its last message a child-SA exchange still claims the remote's next new SPI
SIGNAL_WINDOW = 30.0
#: child-SA exchanges already served are remembered this long / this many, so a late
#: retransmission of their last message does not claim again
DONE_MAX = 4096
#: safety valve for :meth:`EspHelper._advance` after a very long gap between calls
MAX_ROTATIONS = 10_000
INF = math.inf


class EspState(enum.Enum):
    WAITING = "waiting"  # initial packet queued behind another host's claim
    PENDING = "pending"  # its turn: initial packets pass, waiting for the remote's new SPI
    INBOUND_ONLY = "inbound-only"  # inbound SPI placed, the host's outbound SPI not seen yet
    ESTABLISHED = "established"


class How(enum.Enum):
    NONE = "-"
    IKE_SIGNAL = "ike-signal"
    SERIALIZED = "serialized"
    GUESS = "guess"
    FORWARD = "forward"


#: the association state machine, (state, event) -> new state; anything else is a bug
TRANSITIONS: dict[tuple[EspState | None, str], EspState] = {
    (None, "init-turn"): EspState.PENDING,
    (None, "init-wait"): EspState.WAITING,
    (None, "inbound-first"): EspState.INBOUND_ONLY,
    (EspState.WAITING, "turn"): EspState.PENDING,
    (EspState.PENDING, "yield"): EspState.WAITING,
    (EspState.PENDING, "reply"): EspState.ESTABLISHED,
    (EspState.INBOUND_ONLY, "outbound"): EspState.ESTABLISHED,
}


def transition(state: EspState | None, event: str) -> EspState:
    new = TRANSITIONS.get((state, event))
    if new is None:
        raise LookupError(f"esp: can't handle {event!r} in state {state}")
    return new


@dataclass(slots=True, eq=False)
class Expect:
    """One new inbound SPI a claim is waiting for."""

    entry: Entry | None  # the initial outbound association, once the host has sent one
    xid: Hashable | None  # the IKE exchange that announced it, if any
    since: float
    until: float  # a bare signal's validity; INF once an entry carries it


@dataclass(slots=True, eq=False)
class Claim:
    """A LAN host's place in a remote's FIFO."""

    host: int
    remote: int
    queued_at: float
    expects: list[Expect] = field(default_factory=list)
    head_since: float | None = None
    sent_at: float | None = None  # first initial packet that passed during this turn
    yields: int = 0


@dataclass(slots=True, eq=False)
class Assoc(EntryExt):
    """Helper state of one ESP entry (``entry.ext``): an outbound/inbound SPI pair."""

    state: EspState
    out_spi: int | None
    in_spi: int | None
    created: float
    how: How = How.NONE
    tentative: bool = False
    claim: Claim | None = None
    expect: Expect | None = None
    associated_at: float | None = None
    last_seen: float = 0.0
    yields: int = 0


def assoc(e: Entry) -> Assoc:
    """The association an ESP entry carries."""
    a = e.ext
    assert isinstance(a, Assoc), "an esp entry without its association"
    return a


class EspHelper(ProtoHelper):
    """IP protocol 50. See the module docstring for the algorithm."""

    kinds: tuple[str, ...] = ("esp",)

    def __init__(self, engine: EngineView) -> None:
        super().__init__(engine)
        #: the IKE helper (wired by the registry): its sessions make a host plausible
        self.ike: IsakmpHelper | None = None
        t = engine.config.timeouts
        self.timeout_classes: dict[str, float] = {"esp_wait": t.esp_wait_max}
        self.pending_turn: float = t.esp_pending
        self.policy = engine.config.esp
        self.signal_window = SIGNAL_WINDOW
        self.queues: dict[int, deque[Claim]] = {}
        self.claims: dict[tuple[int, int], Claim] = {}
        self.by_remote: dict[int, dict[Entry, None]] = {}
        self.inbound_only: dict[tuple[int, int], list[Entry]] = {}
        self.pending_per_host: dict[int, int] = {}
        self.done: OrderedDict[Hashable, float] = OrderedDict()
        self._now = -INF

    # ------------------------------------------------------------------ packets
    def outbound(self, ip: IPv4, now: float) -> Verdict:
        ip.l4(ESP_MIN)
        spi = ip.u32(0)
        host, remote = ip.src, ip.dst
        self._clock(now)
        if spi == 0:
            return self._spi_zero(ip, f"LAN host {int_to_ip(host)}")
        eng = self.engine
        e: Entry | None = eng.table.get(("esp-o", host, remote, spi), now)
        if e is None or (a := assoc(e)).state is not EspState.ESTABLISHED:
            # only initial packets need the FIFO brought up to date (established ones are the
            # per-packet fast path: one lookup)
            self._advance(remote, now)
            if e is not None and not e.live:
                e = None  # it aged out just now
            if e is None:
                r = self._new_outbound(ip, host, remote, spi, now)
                if isinstance(r, Verdict):
                    return r
                e = r
            a = assoc(e)
        if a.state is EspState.WAITING:
            return self._waiting(ip, e)
        if a.state is EspState.PENDING:
            c = a.claim
            if c is not None and c.sent_at is None:
                c.sent_at = now
        else:
            eng.table.touch(e, now)
            a.last_seen = now
        return send_out(eng, ip, e, now)

    def inbound(self, ip: IPv4, now: float) -> Verdict:
        ip.l4(ESP_MIN)
        spi = ip.u32(0)
        remote = ip.src
        self._clock(now)
        if spi == 0:
            return self._spi_zero(ip, f"remote {int_to_ip(remote)}")
        eng = self.engine
        e: Entry | None = eng.table.get(("esp-i", remote, spi), now)
        if e is not None and assoc(e).tentative and not self._guess_holds(e, now):
            eng.count("esp:guess_withdrawn")
            eng.notice(
                "esp-guess",
                f"inbound SPI 0x{spi:08x} from {int_to_ip(remote)} was guessed to be "
                f"{int_to_ip(e.inside_ip)}'s, but that host is no longer the only plausible "
                "one; placing it afresh",
            )
            eng.table.remove(e, "contradicted")
            e = None
        if e is None:
            self._advance(remote, now)
            r = self._place(ip, remote, spi, now)
            if isinstance(r, Verdict):
                return r
            e = r
        else:
            eng.table.touch(e, now)
        assoc(e).last_seen = now
        return deliver_in(ip, e, now)

    def icmp_embedded_inbound(self, inner: IPv4, now: float) -> Entry | None:
        """Our outbound ESP (public -> remote) quoted in an ICMP error (e.g. fragmentation
        needed): the quoted SPI is the LAN host's outbound SPI."""
        ib = inner.buf
        spi = int.from_bytes(ib[inner.ihl : inner.ihl + 4], "big")
        e: Entry | None = self.engine.table.get(("esp-x", inner.dst, spi), now)
        if e is None or assoc(e).state is EspState.WAITING:
            return None  # a waiter's packets never left
        return e

    def icmp_embedded_outbound(self, inner: IPv4, now: float) -> Entry | None:
        """Inbound ESP as delivered (remote -> LAN host) quoted in an ICMP error from the LAN
        side or the gateway itself: the quoted SPI is the LAN host's inbound SPI,
        the association's only if it belongs to that host."""
        ib = inner.buf
        spi = int.from_bytes(ib[inner.ihl : inner.ihl + 4], "big")
        e: Entry | None = self.engine.table.get(("esp-i", inner.src, spi), now)
        return e if e is not None and e.inside_ip == inner.dst else None

    # ------------------------------------------------------------------ signals and queries
    def child_exchange(self, host: int, remote: int, xid: Hashable, now: float) -> None:
        """The IKE helper saw ``host`` and ``remote`` run an exchange that creates child SAs."""
        self._clock(now)
        if xid in self.done:
            return
        self._advance(remote, now)
        claim = self.claims.get((host, remote))
        if claim is None:
            q = self.queues.get(remote)
            if q is not None and len(q) >= self.policy.max_waiting_per_remote:
                self.engine.count("esp:signal_ignored_queue_full")
                return
            claim = self._new_claim(host, remote, now)
        for x in claim.expects:
            if x.xid == xid:
                if x.entry is None:
                    x.until = now + self.signal_window
                return
        claim.expects.append(Expect(None, xid, now, now + self.signal_window))
        self.engine.count("esp:ike_signal")

    def holders(self, remote: int, now: float) -> dict[int, float]:
        """LAN hosts with an inbound-placed association with ``remote`` -> last packet time."""
        out: dict[int, float] = {}
        for e in self.by_remote.get(remote, {}):
            a = assoc(e)
            if e.live and e.expires_at > now and a.in_spi is not None and not a.tentative:
                if a.last_seen > out.get(e.inside_ip, -INF):
                    out[e.inside_ip] = a.last_seen
        return out

    def worst_case_wait(self, hosts: int) -> float:
        """Upper bound, in seconds, from a host's first initial packet to its association when
        ``hosts`` LAN hosts (one new SA each) start toward the same remote at once.

        Each of the other hosts holds the turn at most 2 x esp_pending (esp_pending to send,
        then esp_pending for the reply) and then goes behind us; in our own turn we send within
        esp_pending and the reply comes within esp_pending. Assumes hosts send at least once per
        esp_pending while waiting, the remote answers within esp_pending, and
        2 x (hosts - 1) x esp_pending < esp_wait_max (else waiters leave the queue).
        """
        return 2.0 * hosts * self.pending_turn

    def next_deadline(self) -> float | None:
        best = INF
        for q in self.queues.values():
            head = q[0]
            if len(q) > 1 and head.head_since is not None:
                best = min(best, self._deadline(head))
            for c in q:
                for x in c.expects:
                    if x.entry is None:
                        best = min(best, x.until)
        return None if best == INF else best

    def handle_timer(self, now: float) -> None:
        self._clock(now)
        for remote in list(self.queues):
            self._advance(remote, now)
        while self.done:
            xid, until = next(iter(self.done.items()))
            if until > now:
                break
            del self.done[xid]

    def detail(self, entry: Entry, now: float) -> dict[str, str]:
        a = assoc(entry)
        d = {
            "spi_out": f"0x{a.out_spi:08x}" if a.out_spi is not None else "-",
            "spi_in": f"0x{a.in_spi:08x}" if a.in_spi is not None else "-",
            "assoc": a.state.value,
            "how": a.how.value,
        }
        if a.tentative:
            d["tentative"] = "yes"
        c = a.claim
        if c is not None:
            q = self.queues.get(c.remote)
            if q is not None and c in q:
                pos = list(q).index(c)
                d["queue"] = f"{pos + 1}/{len(q)}"
                if pos == 0 and c.head_since is not None and len(q) > 1:
                    d["turn_left"] = f"{max(0.0, self._deadline(c) - now):.1f}s"
        if a.yields:
            d["yields"] = str(a.yields)
        return d

    def on_remove(self, entry: Entry, why: str) -> None:
        a = assoc(entry)
        d = self.by_remote.get(entry.remote_ip)
        if d is not None:
            d.pop(entry, None)
            if not d:
                del self.by_remote[entry.remote_ip]
        if a.state in (EspState.WAITING, EspState.PENDING):
            self._pending_dec(entry.inside_ip)
        elif a.state is EspState.INBOUND_ONLY:
            k = (entry.inside_ip, entry.remote_ip)
            lst = self.inbound_only.get(k)
            if lst is not None and entry in lst:
                lst.remove(entry)
                if not lst:
                    del self.inbound_only[k]
        if a.claim is not None and a.expect is not None:
            t = entry.expires_at if why == "idle" else self._now
            self._drop_expect(a.claim, a.expect, t)
            a.claim = a.expect = None

    # ------------------------------------------------------------------ persistence
    def export_entry(self, entry: Entry, ago: Ago, ref: Ref) -> Saved | None:
        """State of an association for ``vpnmasq.state``; None for a pending init (WAITING or
        PENDING: its claim on the remote's next SPI is not carried over a restart)."""
        a = assoc(entry)
        if a.state not in (EspState.ESTABLISHED, EspState.INBOUND_ONLY):
            return None
        return {
            "state": a.state.value,
            "out_spi": a.out_spi,
            "in_spi": a.in_spi,
            "created": ago(a.created),
            "how": a.how.value,
            "tentative": a.tentative,
            "associated_at": None if a.associated_at is None else ago(a.associated_at),
            "last_seen": ago(a.last_seen),
            "yields": a.yields,
        }

    def import_entry(self, entry: Entry, data: Record, at: At, resolve: Resolve) -> bool:
        """Re-attach a saved association to ``entry`` (its keys are restored by the caller).
        False if the data is not an association this version can carry on."""
        try:
            state = EspState(data.as_str("state"))
            out_spi, in_spi = data.opt_int("out_spi"), data.opt_int("in_spi")
            if state is EspState.ESTABLISHED:
                ok = out_spi is not None and in_spi is not None
            elif state is EspState.INBOUND_ONLY:
                ok = out_spi is None and in_spi is not None
            else:
                ok = False
            if not ok:
                return False
            assoc_at = data.opt_num("associated_at")
            a = Assoc(
                state,
                out_spi,
                in_spi,
                at(data.as_num("created")),
                how=How(data.as_str("how")),
                tentative=data.as_bool("tentative"),
                associated_at=None if assoc_at is None else at(assoc_at),
                last_seen=at(data.as_num("last_seen")),
                yields=data.as_int("yields"),
            )
        except (KeyError, TypeError, ValueError):
            return False
        entry.ext = a
        entry.state_name = state.name
        self.by_remote.setdefault(entry.remote_ip, {})[entry] = None
        if state is EspState.INBOUND_ONLY:
            self.inbound_only.setdefault((entry.inside_ip, entry.remote_ip), []).append(entry)
        return True

    # ------------------------------------------------------------------ outbound internals
    def _new_outbound(
        self, ip: IPv4, host: int, remote: int, spi: int, now: float
    ) -> Entry | Verdict:
        """An initial packet: pair it, or claim the remote's next new SPI (HOWTO 6.2 step 1)."""
        eng = self.engine
        lst = self.inbound_only.get((host, remote))
        if lst:
            e = lst.pop(0)
            if not lst:
                del self.inbound_only[(host, remote)]
            a = assoc(e)
            self._set_state(e, "outbound")
            a.out_spi = spi
            if a.tentative:
                a.tentative = False
                eng.count("esp:guess_confirmed")
            eng.table.add_key(e, ("esp-o", host, remote, spi))
            self._add_icmp_key(e, remote, spi)
            return e
        if not self.policy.parallel_sessions:
            other = self._other_host(host, remote, now)
            if other is not None:
                v: Verdict = eng.drop(
                    DropReason.ESP_SERIALIZED,
                    f"{int_to_ip(other)} already has IPsec with {int_to_ip(remote)} and "
                    "parallel sessions to one remote are off (esp.parallel_sessions = false)",
                    ip,
                )
                return v
        if self.pending_per_host.get(host, 0) >= self.policy.max_pending_per_host:
            v = eng.drop(
                DropReason.HOST_LIMIT,
                f"{int_to_ip(host)} already has {self.policy.max_pending_per_host} ESP "
                "initial packets waiting for an answer (esp.max_pending_per_host)",
                ip,
            )
            return v
        claim = self.claims.get((host, remote))
        new_claim = claim is None
        if claim is None:
            q = self.queues.get(remote)
            if q is not None and len(q) >= self.policy.max_waiting_per_remote:
                v = eng.drop(
                    DropReason.ESP_WAITING,
                    f"{len(q)} LAN hosts already wait to start ESP with {int_to_ip(remote)} "
                    "(esp.max_waiting_per_remote)",
                    ip,
                )
                return v
            claim = self._new_claim(host, remote, now)
        head = self.queues[remote][0] is claim
        e = Entry(PROTO_ESP, "esp", "esp_wait", host, 0, remote, 0, eng.public_ip or 0, 0, now)
        state = transition(None, "init-turn" if head else "init-wait")
        a = Assoc(state, spi, None, now, claim=claim, last_seen=now)
        e.ext = a
        e.state_name = state.name
        v2: Verdict | None = eng.add_entry(e, now, (("esp-o", host, remote, spi),))
        if v2 is not None:
            if new_claim:
                self._remove_claim(claim, now)
            return v2
        self._add_icmp_key(e, remote, spi)
        self.by_remote.setdefault(remote, {})[e] = None
        self.pending_per_host[host] = self.pending_per_host.get(host, 0) + 1
        for x in claim.expects:
            if x.entry is None:  # fulfils the host's own IKE signal
                x.entry = e
                x.until = INF
                break
        else:
            x = Expect(e, None, now, INF)
            claim.expects.append(x)
        a.expect = x
        return e

    def _waiting(self, ip: IPv4, e: Entry) -> Verdict:
        a = assoc(e)
        q = self.queues.get(e.remote_ip)
        assert q is not None and a.claim is not None
        head = q[0]
        pos = list(q).index(a.claim) + 1
        v: Verdict = self.engine.drop(
            DropReason.ESP_WAITING,
            f"waiting for pending init of {int_to_ip(head.host)} to {int_to_ip(e.remote_ip)} "
            f"(place {pos} of {len(q)}; a turn passes after {self.pending_turn:g} s without "
            "an answer)",
            ip,
        )
        return v

    def _other_host(self, host: int, remote: int, now: float) -> int | None:
        for e in self.by_remote.get(remote, {}):
            if e.inside_ip != host and e.live and e.expires_at > now:
                return e.inside_ip
        for c in self.queues.get(remote, ()):
            if c.host != host:
                return c.host
        return None

    # ------------------------------------------------------------------ inbound internals
    def _place(self, ip: IPv4, remote: int, spi: int, now: float) -> Entry | Verdict:
        """A new inbound SPI: the head claim, then the forward, then the guess (see module)."""
        eng = self.engine
        q = self.queues.get(remote)
        if q:
            claim = q[0]
            x = next((x for x in claim.expects if x.entry is not None), claim.expects[0])
            how = How.IKE_SIGNAL if (x.xid is not None and len(q) == 1) else How.SERIALIZED
            if x.xid is not None:
                self._mark_done(x.xid, now)
            e = x.entry
            if e is not None:
                a = assoc(e)
                self._set_state(e, "reply")
                a.in_spi = spi
                a.how = how
                a.associated_at = now
                a.claim = a.expect = None
                self._pending_dec(e.inside_ip)
                eng.table.add_key(e, ("esp-i", remote, spi))
                eng.table.set_class(e, "esp", now)
                self._consume(claim, x, now)
            else:
                self._consume(claim, x, now)
                r = self._inbound_only(claim.host, remote, spi, how, now)
                if isinstance(r, Verdict):
                    return r
                e = r
            eng.count("esp:associated:" + how.value)
            return e
        fwd = eng.match_forward(PROTO_ESP, None, remote)
        if fwd is not None:
            eng.count("esp:associated:forward")
            return self._inbound_only(ip_to_int(fwd.to), remote, spi, How.FORWARD, now)
        what = f"inbound SPI 0x{spi:08x} from {int_to_ip(remote)}"
        if self.policy.guess_single_host:
            hosts = self._plausible(remote, now)
            if len(hosts) == 1:
                (host,) = hosts
                eng.count("esp:associated:guess")
                eng.notice(
                    "esp-guess",
                    f"{what} matches no association; guessed {int_to_ip(host)}, the only LAN "
                    "host with IPsec to that remote (tentative, esp.guess_single_host)",
                )
                return self._inbound_only(host, remote, spi, How.GUESS, now, tentative=True)
        eng.count("esp:unassociated")
        v: Verdict = eng.drop(
            DropReason.ESP_UNASSOCIATED,
            f"{what} matches no association and no LAN host is waiting for one from there; "
            "not guessed (esp.guess_single_host is "
            f"{'on, but no single host is plausible' if self.policy.guess_single_host else 'off'})",
            ip,
        )
        return v

    def _inbound_only(
        self, host: int, remote: int, spi: int, how: How, now: float, *, tentative: bool = False
    ) -> Entry | Verdict:
        eng = self.engine
        e = Entry(PROTO_ESP, "esp", "esp", host, 0, remote, 0, eng.public_ip or 0, 0, now)
        state = transition(None, "inbound-first")
        e.ext = Assoc(
            state, None, spi, now, how=how, tentative=tentative, associated_at=now, last_seen=now
        )
        e.state_name = state.name
        v: Verdict | None = eng.add_entry(e, now, (("esp-i", remote, spi),))
        if v is not None:
            return v
        self.by_remote.setdefault(remote, {})[e] = None
        self.inbound_only.setdefault((host, remote), []).append(e)
        return e

    def _plausible(self, remote: int, now: float) -> set[int]:
        hosts = set(self.holders(remote, now))
        if self.ike is not None:
            hosts.update(self.ike.holders(remote, now))
        hosts.update(c.host for c in self.queues.get(remote, ()))
        return hosts

    def _guess_holds(self, e: Entry, now: float) -> bool:
        self._advance(e.remote_ip, now)
        return self._plausible(e.remote_ip, now) <= {e.inside_ip}

    # ------------------------------------------------------------------ the FIFO
    def _new_claim(self, host: int, remote: int, now: float) -> Claim:
        claim = Claim(host, remote, now)
        q = self.queues.setdefault(remote, deque())
        q.append(claim)
        self.claims[(host, remote)] = claim
        if len(q) == 1:
            self._promote(claim, now)
        else:  # a lone head's turn may be long over: now that someone waits, it passes on
            self._advance(remote, now)
        return claim

    def _deadline(self, c: Claim) -> float:
        start = c.sent_at if c.sent_at is not None else c.head_since
        assert start is not None
        return start + self.pending_turn

    def _promote(self, c: Claim, t: float) -> None:
        c.head_since = max(t, c.queued_at)
        c.sent_at = None
        for x in c.expects:
            e = x.entry
            if e is not None and assoc(e).state is EspState.WAITING:
                self._set_state(e, "turn")
                # a waiter's age limit (esp_wait_max) restarts when it gets the turn, unless
                # it ran out already (then expiry removes it and the turn moves on)
                if e.expires_at > c.head_since:
                    self.engine.table.touch(e, max(self._now, c.head_since))

    def _demote(self, c: Claim) -> None:
        c.head_since = c.sent_at = None
        c.yields += 1
        for x in c.expects:
            e = x.entry
            if e is not None and assoc(e).state is EspState.PENDING:
                self._set_state(e, "yield")
                assoc(e).yields += 1

    def _advance(self, remote: int, now: float) -> None:
        """Bring ``remote``'s FIFO up to ``now``: drop stale claims, pass expired turns on."""
        q = self.queues.get(remote)
        if not q:
            return
        for c in list(q):
            self._prune(c, now)
        for _ in range(MAX_ROTATIONS):
            q = self.queues.get(remote)
            if not q or len(q) == 1:
                return
            head = q[0]
            if self._prune(head, now):
                continue
            dl = self._deadline(head)
            if dl > now:
                return
            q.rotate(-1)
            self._demote(head)
            self._promote(q[0], dl)
            self.engine.count("esp:turn_passed")
            self.engine.notice(
                "esp-turn",
                f"{int_to_ip(head.host)} got no new SPI from {int_to_ip(remote)} within "
                f"{self.pending_turn:g} s; the turn passes to {int_to_ip(q[0].host)}",
            )

    def _prune(self, c: Claim, now: float) -> bool:
        """Drop expired expectations of ``c`` (a claim left empty leaves its FIFO)."""
        changed = False
        for x in list(c.expects):
            e = x.entry
            if e is None:
                if x.until <= now:
                    self._drop_expect(c, x, x.until)
                    changed = True
            elif not e.live or e.expires_at <= now:
                self.engine.table.remove(e, "idle")  # on_remove drops the expectation
                changed = True
        return changed

    def _consume(self, c: Claim, x: Expect, now: float) -> None:
        """``x`` got its inbound SPI: the claim leaves, or keeps the turn for its next one."""
        if x in c.expects:
            c.expects.remove(x)
        if not c.expects:
            self._remove_claim(c, now)
        else:
            c.head_since = now
            c.sent_at = None

    def _drop_expect(self, c: Claim, x: Expect, t: float) -> None:
        if x in c.expects:
            c.expects.remove(x)
        if not c.expects:
            self._remove_claim(c, t)

    def _remove_claim(self, c: Claim, t: float) -> None:
        key = (c.host, c.remote)
        if self.claims.get(key) is c:
            del self.claims[key]
        q = self.queues.get(c.remote)
        if q is None or c not in q:
            return
        was_head = q[0] is c
        q.remove(c)
        if not q:
            del self.queues[c.remote]
        elif was_head:
            self._promote(q[0], max(t, c.head_since if c.head_since is not None else t))

    # ------------------------------------------------------------------ small things
    def _clock(self, now: float) -> None:
        if now > self._now:
            self._now = now

    def _set_state(self, e: Entry, event: str) -> None:
        a = assoc(e)
        a.state = transition(a.state, event)
        self.engine.set_state(e, a.state.name)

    def _pending_dec(self, host: int) -> None:
        n = self.pending_per_host.get(host, 0) - 1
        if n > 0:
            self.pending_per_host[host] = n
        else:
            self.pending_per_host.pop(host, None)

    def _add_icmp_key(self, e: Entry, remote: int, spi: int) -> None:
        k = ("esp-x", remote, spi)
        owner = self.engine.table.index.get(k)
        if owner is None or not owner.live:
            self.engine.table.add_key(e, k)

    def _mark_done(self, xid: Hashable, now: float) -> None:
        self.done[xid] = now + self.signal_window
        self.done.move_to_end(xid)
        while len(self.done) > DONE_MAX:
            self.done.popitem(last=False)

    def _spi_zero(self, ip: IPv4, who: str) -> Verdict:
        v: Verdict = self.engine.drop(
            DropReason.ESP_SPI_ZERO,
            f"ESP with SPI 0 from {who}: the value is reserved and never sent (RFC 4303 2.1)",
            ip,
        )
        return v


SPECS: tuple[HelperSpec, ...] = (
    HelperSpec(
        "esp",
        "proto",
        PROTO_ESP,
        None,
        EspHelper,
        "ESP (IP protocol 50): inbound SPIs associated by IKE signal, else serialized per remote",
    ),
)
