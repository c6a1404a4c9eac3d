"""The masquerade table: entries indexed by hashable keys, expired in LRU order per class.

Every entry belongs to one *timeout class* (``"udp"``, ``"tcp_established"``, ``"esp"`` ...).
All entries of a class share one idle timeout. Expiry is lazy (a packet must not
touch list neighbours): using an entry only moves its ``expires_at`` forward (one shared float
per class and ``now``), and it keeps its place. Each class keeps a list in link order, which is
deadline order (``now`` only grows), and a heap (:class:`LruList`). Expiry and
:meth:`MasqTable.next_deadline` look at the heads only: a head whose ``expires_at`` is later
than the deadline it was filed with was used since, and is filed again in the heap under its
real deadline (at most once per use, so amortized O(log n) per packet, paid at expiry time);
once neither head is stale, the smaller is the exact next deadline of its class.
``next_deadline()`` is the minimum over the classes (few). A lookup also refuses an entry
whose time is up, so an entry is never used late even if ``expire()`` has not run yet
(libalias-style HouseKeeping is only an optimisation of memory).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterator, Mapping
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Protocol

from vpnmasq.conntrack.record import Saved
from vpnmasq.events import Row
from vpnmasq.packet.ipv4 import PROTO_NAMES, int_to_ip

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.packet.ipv4 import IPv4
    from vpnmasq.verdict import Verdict

PERMANENT = "permanent"
#: interned addresses kept at most (a dict entry costs ~50 bytes; each sharing saves 32)
INTERN_MAX = 1 << 16
#: one shared int object per 16-bit value (ports, ICMP ids, Call IDs): 1.8 MB once per
#: process instead of 28 bytes per port per mapping
_PORTS: tuple[int, ...] = tuple(range(0x10000))
#: ``Entry.flags`` bits of the engine's fast path (``Engine._fast``): the slow path translated
#: a packet of this flow in that direction and found it eligible. An entry enters a table
#: without them (a restored entry is re-checked by its first packet each way).
F_FAST_OUT = 16
F_FAST_IN = 32
#: kinds filed under :func:`standard_keys`
_NAPT_KINDS = frozenset({"napt", "fwd", "icmp"})


def standard_keys(e: Entry) -> tuple[Hashable, ...] | None:
    """The index keys an entry of this kind is filed under by the engine, or None.

    ``("o", proto, inside ip, inside port, remote ip, remote port)`` finds it outbound,
    ``("i", proto, alias port, remote ip, remote port)`` inbound (ICMP: ids, remote port 0);
    generic protocols: ``("go", proto, inside ip, remote ip)`` and ``("gi", proto, remote ip)``.
    The fields these keys are made of must not change while the entry is in a table.
    """
    kind = e.kind
    if kind in _NAPT_KINDS:
        p, rip, rport = e.proto, e.remote_ip, e.remote_port
        return (("o", p, e.inside_ip, e.inside_port, rip, rport), ("i", p, e.alias_port, rip, rport))
    if kind == "generic":
        return (("go", e.proto, e.inside_ip, e.remote_ip), ("gi", e.proto, e.remote_ip))
    return None


class Binding:
    """An endpoint-independent mapping (RFC 4787 EIM): inside addr:port <-> alias port.

    Sessions (one per remote endpoint) hang off it; it lives while it has sessions, or
    forever when ``static`` (an inbound forward).

    Memory: most bindings carry exactly one session, so a lone session is kept in a slot and
    the two dictionaries (sessions by remote endpoint, session count by remote address) exist
    only from the second session on (about 450 bytes saved per mapping). ``sessions`` and
    ``remotes`` still read as dictionaries; change them only through :class:`MasqTable`.
    """

    __slots__ = ("proto", "inside_ip", "inside_port", "alias_port", "static", "_one", "_many", "_remotes")

    def __init__(
        self, proto: int, inside_ip: int, inside_port: int, alias_port: int, static: bool = False
    ) -> None:
        self.proto = proto
        self.inside_ip = inside_ip
        self.inside_port = inside_port
        self.alias_port = alias_port
        self.static = static
        self._one: Entry | None = None  # the only session (while _many is None)
        self._many: dict[tuple[int, int], Entry] | None = None  # from the 2nd session on
        self._remotes: dict[int, int] | None = None  # remote ip -> sessions, with _many

    def __repr__(self) -> str:
        return (
            f"Binding(proto={self.proto}, inside={int_to_ip(self.inside_ip)}:{self.inside_port}, "
            f"alias={self.alias_port}, static={self.static}, sessions={self.n_sessions})"
        )

    @property
    def sessions(self) -> Mapping[tuple[int, int], Entry]:
        """Sessions by remote endpoint (read-only view)."""
        if self._many is not None:
            return self._many
        one = self._one
        return {} if one is None else {(one.remote_ip, one.remote_port): one}

    @property
    def remotes(self) -> Mapping[int, int]:
        """Remote address -> number of sessions to it (read-only view)."""
        if self._remotes is not None:
            return self._remotes
        one = self._one
        return {} if one is None else {one.remote_ip: 1}

    @property
    def n_sessions(self) -> int:
        if self._many is not None:
            return len(self._many)
        return 0 if self._one is None else 1

    def has_remote(self, ip: int) -> bool:
        """Some session of this binding goes to ``ip`` (address-dependent filtering)."""
        if self._remotes is not None:
            return ip in self._remotes
        return self._one is not None and self._one.remote_ip == ip

    def session(self, remote_ip: int, remote_port: int) -> Entry | None:
        if self._many is not None:
            return self._many.get((remote_ip, remote_port))
        one = self._one
        if one is not None and one.remote_ip == remote_ip and one.remote_port == remote_port:
            return one
        return None

    def _add(self, e: Entry) -> None:
        many = self._many
        if many is None:
            one = self._one
            if one is None or (one.remote_ip, one.remote_port) == (e.remote_ip, e.remote_port):
                self._one = e
                return
            many = self._many = {(one.remote_ip, one.remote_port): one}
            self._remotes = {one.remote_ip: 1}
            self._one = None
        remotes = self._remotes
        assert remotes is not None
        rk = (e.remote_ip, e.remote_port)
        if rk not in many:
            remotes[e.remote_ip] = remotes.get(e.remote_ip, 0) + 1
        many[rk] = e

    def _remove(self, e: Entry) -> None:
        many = self._many
        if many is None:
            if self._one is e:
                self._one = None
            return
        rk = (e.remote_ip, e.remote_port)
        if many.get(rk) is not e:
            return
        del many[rk]
        remotes = self._remotes
        assert remotes is not None
        c = remotes.get(e.remote_ip, 1) - 1
        if c:
            remotes[e.remote_ip] = c
        else:
            remotes.pop(e.remote_ip, None)
        if len(many) == 1:  # back to the compact form
            (self._one,) = many.values()
            self._many = self._remotes = None


class EntryExt:
    """Base of the helper state an entry of a helper's kind carries (``Entry.ext``): an ESP
    association, an IKE session, a PPTP call. Each helper reads its own with a typed getter."""

    __slots__ = ()


class EntryAlg:
    """A payload helper attached to one session (``Entry.alg``): sees every packet after the
    addresses are translated. None from ``outbound``/``inbound`` accepts the (possibly
    rewritten) packet; a Verdict overrides it."""

    __slots__ = ()

    def outbound(self, ip: IPv4, entry: Entry, payload_off: int, now: float) -> Verdict | None:
        return None

    def inbound(self, ip: IPv4, entry: Entry, payload_off: int, now: float) -> Verdict | None:
        return None

    def detail(self, entry: Entry, now: float) -> dict[str, str]:
        return {}

    def on_remove(self, entry: Entry, why: str) -> None:
        return None

    def export_state(
        self, ago: Callable[[float], float], ref: Callable[[object], int | None]
    ) -> Saved | None:
        """Its state for the state file (with ``"helper"``: the spec that restores it)."""
        return None


#: Entry's constructor fields in signature order (its repr lists them in this order)
ENTRY_FIELDS = (
    "proto", "kind", "tclass", "inside_ip", "inside_port", "remote_ip", "remote_port",
    "alias_ip", "alias_port", "created", "expires_at", "state", "state_name", "binding",
    "_keys", "ext", "alg", "pkts_out", "pkts_in", "bytes_out", "bytes_in", "last_out",
    "last_in", "last_ack_out", "flags", "live",
)


class Entry:
    """One masqueraded flow (a session under a binding, or a VPN association).

    A plain slotted class, not a dataclass, so that the slots are laid out apart from the
    constructor's order: what a packet reads and writes on the engine's fast path
    comes first, next to the object header (which the packet touches anyway, for the
    reference count), so an established packet touches two or three cache lines of its entry
    instead of four. Over a large table the cost of a packet is mostly such misses.
    Equality is identity."""

    __slots__ = (
        # hot: the fast path, both directions
        "flags", "expires_at", "tclass", "state", "alias_port", "inside_ip", "inside_port",
        "pkts_out", "bytes_out", "last_out", "last_ack_out", "pkts_in", "bytes_in", "last_in",
        # the class list of MasqTable: neighbours, and the deadline it was linked with
        "_lprev", "_lnext", "_ldl",
        # cold
        "proto", "kind", "remote_ip", "remote_port", "alias_ip", "created", "state_name",
        "binding", "_keys", "ext", "alg", "live",
    )

    proto: int
    kind: str  # napt | fwd | icmp | generic | esp | gre | isakmp | hairpin
    tclass: str
    inside_ip: int
    inside_port: int
    remote_ip: int
    remote_port: int
    alias_ip: int
    alias_port: int
    created: float
    expires_at: float
    state: int
    state_name: str
    binding: Binding | None
    # index keys; None: the standard keys of its kind, recomputed from the fields (saves a
    # container per mapping; see standard_keys). Read them as ``entry.keys``.
    _keys: tuple[Hashable, ...] | None
    ext: EntryExt | None  # helper state of its kind
    alg: EntryAlg | None  # payload helper attached (e.g. PPTP control parser)
    pkts_out: int
    pkts_in: int
    bytes_out: int
    bytes_in: int
    last_out: float | None  # ``now`` of the last packet counted each way (status,
    last_in: float | None  # diagnose: "GRE out 2 s ago, nothing back")
    last_ack_out: int  # TCP: last ACK number the inside host sent (RST window check)
    flags: int
    live: bool
    _lprev: Any  # Entry | LruList | None (None: in no list)
    _lnext: Any
    _ldl: float

    def __init__(
        self,
        proto: int,
        kind: str,
        tclass: str,
        inside_ip: int,
        inside_port: int,
        remote_ip: int,
        remote_port: int,
        alias_ip: int,
        alias_port: int,
        created: float,
        expires_at: float = 0.0,
        state: int = 0,
        state_name: str = "",
        binding: Binding | None = None,
        _keys: tuple[Hashable, ...] | None = (),
        ext: EntryExt | None = None,
        alg: EntryAlg | None = None,
        pkts_out: int = 0,
        pkts_in: int = 0,
        bytes_out: int = 0,
        bytes_in: int = 0,
        last_out: float | None = None,
        last_in: float | None = None,
        last_ack_out: int = -1,
        flags: int = 0,
        live: bool = True,
    ) -> None:
        self.flags = flags
        self.expires_at = expires_at
        self.tclass = tclass
        self.state = state
        self.alias_port = alias_port
        self.inside_ip = inside_ip
        self.inside_port = inside_port
        self.pkts_out = pkts_out
        self.bytes_out = bytes_out
        self.last_out = last_out
        self.last_ack_out = last_ack_out
        self.pkts_in = pkts_in
        self.bytes_in = bytes_in
        self.last_in = last_in
        self._lprev = self._lnext = None
        self._ldl = expires_at
        self.proto = proto
        self.kind = kind
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.alias_ip = alias_ip
        self.created = created
        self.state_name = state_name
        self.binding = binding
        self._keys = _keys
        self.ext = ext
        self.alg = alg
        self.live = live

    def __repr__(self) -> str:
        return "Entry(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in ENTRY_FIELDS) + ")"

    @property
    def keys(self) -> tuple[Hashable, ...]:
        """The index keys this entry is filed under."""
        ks = self._keys
        if ks is None:
            std = standard_keys(self)
            assert std is not None
            return std
        return ks

    def endpoint(self, ip: int, port: int, with_port: bool = True) -> str:
        return f"{int_to_ip(ip)}:{port}" if with_port else int_to_ip(ip)

    def row(self, now: float, detail: Mapping[str, str] | None = None) -> Row:
        with_port = self.proto in (6, 17)
        if self.proto == 1:
            inside = f"{int_to_ip(self.inside_ip)} id={self.inside_port}"
            outside = f"{int_to_ip(self.alias_ip)} id={self.alias_port}"
        else:
            inside = self.endpoint(self.inside_ip, self.inside_port, with_port)
            outside = self.endpoint(self.alias_ip, self.alias_port, with_port)
        remote = self.endpoint(self.remote_ip, self.remote_port, with_port)
        left = float("inf") if self.tclass == PERMANENT else max(0.0, self.expires_at - now)
        return Row(
            proto=PROTO_NAMES.get(self.proto, str(self.proto)),
            inside=inside,
            outside=outside,
            remote=remote,
            state=self.state_name or self.kind,
            expires_in=left,
            pkts_out=self.pkts_out,
            pkts_in=self.pkts_in,
            bytes_out=self.bytes_out,
            bytes_in=self.bytes_in,
            detail=dict(detail or {}),
            last_seen_out=None if self.last_out is None else max(0.0, now - self.last_out),
            last_seen_in=None if self.last_in is None else max(0.0, now - self.last_in),
        )


_INF = float("inf")
_EXPIRES = attrgetter("expires_at")


class LruList:
    """The entries of one timeout class, in two parts whose heads give the earliest deadline:

    * a circular doubly linked list through the entries' own ``_lprev``/``_lnext`` slots
      (this object is the sentinel), in the order they were linked, which is the order of
      the deadlines they were linked with (``_ldl``: ``now`` only grows). No container entry
      per mapping (an OrderedDict node and its dict slot cost about 100 bytes), O(1) unlink;
    * a heap of the entries that were used after they were linked and then reached the head
      (:meth:`settle`): keyed by their deadline when moved, ``[deadline, seq, entry]``
      items, an item whose entry left is blanked (heapq's "mark as removed").

    Both heads are lower bounds of every deadline behind them, so once neither is stale the
    smaller one is the class's exact next deadline. Iterating gives a snapshot. Changed only
    by :class:`MasqTable`."""

    __slots__ = ("tclass", "n", "_lprev", "_lnext", "heap", "_seq")

    def __init__(self, tclass: str) -> None:
        self.tclass = tclass
        self.n = 0  # entries of the class, in the list and in the heap
        # Any: an Entry or this sentinel (both carry _lprev/_lnext); walks stop at self
        self._lprev: Any = self
        self._lnext: Any = self
        self.heap: list[list[Any]] = []
        self._seq = 0

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def __iter__(self) -> Iterator[Entry]:
        out: list[Entry] = []
        e = self._lnext
        while e is not self:
            out.append(e)
            e = e._lnext
        out.extend(item[2] for item in self.heap if item[2] is not None)
        return iter(out)

    def __repr__(self) -> str:
        return f"LruList({self.tclass!r}, {self.n} entries, {len(self.heap)} in the heap)"

    def append(self, e: Entry, deadline: float) -> None:
        """Link ``e`` at the tail; ``deadline`` is its expiry now (the order of the list)."""
        tail = self._lprev
        e._lprev = tail
        e._lnext = self
        tail._lnext = e
        self._lprev = e
        e._ldl = deadline
        self.n += 1

    def unlink(self, e: Entry) -> None:
        p, n = e._lprev, e._lnext
        if n is None:
            raise KeyError(e)  # in no list (an OrderedDict raised the same)
        if p is None:  # in the heap: blank its item
            n[2] = None
        else:
            p._lnext = n
            n._lprev = p
        e._lprev = e._lnext = None
        self.n -= 1

    def relink(self, e: Entry) -> None:
        """Move ``e`` to the tail, its current ``expires_at`` as its linked deadline."""
        self.unlink(e)
        self.append(e, e.expires_at)

    def _push(self, e: Entry) -> None:
        self._seq += 1
        item = [e.expires_at, self._seq, e]
        e._lprev = None
        e._lnext = item
        e._ldl = e.expires_at
        heapq.heappush(self.heap, item)

    def settle(self) -> Entry | None:
        """The entry with the earliest deadline, after moving what was used since it was
        linked or pushed (its ``expires_at`` is later than its key) into the heap, keyed by
        its real deadline. Amortized O(log n) per use of an entry, paid here, not per packet."""
        heap = self.heap
        while True:
            h = self._lnext
            if h is not self and h.expires_at > h._ldl:
                p, n = h._lprev, h._lnext  # stale list head: into the heap
                p._lnext = n
                n._lprev = p
                self._push(h)
                continue
            while heap:
                item = heap[0]
                e = item[2]
                if e is None:
                    heapq.heappop(heap)
                elif e.expires_at > item[0]:
                    heapq.heappop(heap)
                    self._push(e)
                else:
                    break
            head: Entry | None = None if h is self else h
            if not heap:
                return head
            top: Entry = heap[0][2]
            if head is None or top.expires_at < head.expires_at:
                return top
            return head


class TableObserver(Protocol):
    """What :attr:`MasqTable.observer` is told (the kernel offload keeps its maps in step):
    an entry became eligible for the fast path one more way (:meth:`MasqTable.mark_fast`),
    an entry left the table."""

    def eligible(self, entry: Entry) -> None: ...

    def removed(self, entry: Entry) -> None: ...


class TableFull(Exception):
    """Raised internally; the engine turns it into a counted TABLE_FULL drop."""


class MasqTable:
    """Keyed entries, per-class LRU expiry, bindings, per-host counts and a hard limit."""

    def __init__(
        self,
        timeouts: Mapping[str, float],
        max_entries: int,
        max_per_host: int = 0,
        on_remove: Callable[[Entry, str], None] | None = None,
    ) -> None:
        self.timeouts = dict(timeouts)
        self.max_entries = max_entries
        self.max_per_host = max_per_host
        self.index: dict[Hashable, Entry] = {}
        self.bindings: dict[tuple[int, int, int], Binding] = {}  # (proto, inside ip, port)
        self.alias_bindings: dict[tuple[int, int], Binding] = {}  # (proto, alias port)
        #: (proto, inside ip) -> outside ports (ICMP: ids) its dynamic bindings hold
        self.host_ports: dict[tuple[int, int], int] = {}
        self._lru: dict[str, LruList] = {}
        self.per_host: dict[int, int] = {}
        self.count = 0
        #: live entries by (IP protocol, kind) (metrics read it from another thread: never
        #: walk the lists there)
        self.by_proto_kind: dict[tuple[int, str], int] = {}
        self._ints: dict[int, int] = {}  # interned addresses (see _intern)
        self.on_remove = on_remove
        #: told when an entry becomes eligible for the fast path and when one is removed,
        #: after the table's own bookkeeping (the datapath's kernel offload follows the table
        #: through it); None: nobody listens
        self.observer: TableObserver | None = None
        # deadline(): ``now + timeout`` per class as one float object shared while ``now``
        # stays the same (a batch): no float allocated per packet, and no cold one freed
        self._exp_now: float | None = None
        self._exp: dict[str, float] = {}

    def deadline(self, tclass: str, now: float) -> float:
        """``now`` plus the idle timeout of ``tclass`` (inf when permanent)."""
        if now != self._exp_now:
            self._exp.clear()
            self._exp_now = now
        d = self._exp.get(tclass)
        if d is None:
            d = self._exp[tclass] = _INF if tclass == PERMANENT else now + self.timeouts[tclass]
        return d

    def _list(self, tclass: str) -> LruList:
        lst = self._lru.get(tclass)
        if lst is None:
            lst = self._lru[tclass] = LruList(tclass)
        return lst

    # --- entries --------------------------------------------------------------------
    def add(self, entry: Entry, now: float, keys: tuple[Hashable, ...] = ()) -> None:
        """Insert ``entry`` (timeout from its class) under ``keys``; TableFull when full."""
        if self.count >= self.max_entries:
            raise TableFull("table full")
        if self.max_per_host and entry.tclass != PERMANENT:
            if self.per_host.get(entry.inside_ip, 0) >= self.max_per_host:
                raise TableFull("host limit")
        d = self.deadline(entry.tclass, now)
        entry.expires_at = d
        self._list(entry.tclass).append(entry, d)
        self.count += 1
        pk = (entry.proto, entry.kind)
        self.by_proto_kind[pk] = self.by_proto_kind.get(pk, 0) + 1
        self.per_host[entry.inside_ip] = self.per_host.get(entry.inside_ip, 0) + 1
        self._intern(entry)
        entry.flags &= ~(F_FAST_OUT | F_FAST_IN)
        self._file(entry, keys)

    def _file(self, entry: Entry, keys: tuple[Hashable, ...]) -> None:
        index = self.index
        if keys and not entry._keys:
            std = standard_keys(entry)
            if std is not None and std == keys:
                # filed under the keys of its kind: rebuilt from the (interned) fields, so
                # neither the caller's tuples nor a per-entry list of them are kept
                for k in std:
                    index[k] = entry
                entry._keys = None
                return
        for k in keys:
            index[k] = entry
        entry._keys = entry.keys + tuple(keys) if entry.keys else tuple(keys)

    def _intern(self, entry: Entry) -> None:
        """Share the int objects of addresses and ports between entries and their keys
        (64 bytes per mapping): ports from one table of 65536 ints, addresses from a bounded
        dict (cleared when full; a cleared value only stops being shared)."""
        ints = self._ints
        if len(ints) >= INTERN_MAX:
            ints.clear()
        a = entry.inside_ip
        entry.inside_ip = ints.setdefault(a, a)
        a = entry.remote_ip
        entry.remote_ip = ints.setdefault(a, a)
        ports = _PORTS
        p = entry.inside_port
        if 0 <= p <= 0xFFFF:
            entry.inside_port = ports[p]
        p = entry.remote_port
        if 0 <= p <= 0xFFFF:
            entry.remote_port = ports[p]
        p = entry.alias_port
        if 0 <= p <= 0xFFFF:
            entry.alias_port = ports[p]

    def add_key(self, entry: Entry, key: Hashable) -> None:
        self.index[key] = entry
        entry._keys = (*entry.keys, key)

    def remove_key(self, entry: Entry, key: Hashable) -> None:
        if self.index.get(key) is entry:
            del self.index[key]
        if key in entry.keys:
            ks = list(entry.keys)
            ks.remove(key)
            entry._keys = tuple(ks)

    def holds(self, entry: Entry) -> bool:
        """``entry`` is in this table (added and not removed)."""
        return entry.live and entry._lnext is not None

    def get(self, key: Hashable, now: float) -> Entry | None:
        e = self.index.get(key)
        if e is not None and e.expires_at <= now:
            self.remove(e, "idle")
            return None
        return e

    def touch(self, entry: Entry, now: float) -> None:
        """``entry`` was used at ``now``: its deadline moves, its place in its list does not
        (lazy LRU, see the module docstring; ``Engine._fast`` does the same inline)."""
        tclass = entry.tclass
        if tclass == PERMANENT:
            return
        d = self._exp.get(tclass) if now == self._exp_now else None
        if d is None:
            d = self.deadline(tclass, now)
        entry.expires_at = d
        if d < entry._ldl and entry._lnext is not None:
            # an earlier ``now`` than the one it was linked with: to the tail at once, as an
            # eager LRU list would do (a head is trusted only if not re-linked later)
            self._lru[tclass].relink(entry)

    def mark_fast(self, entry: Entry, flag: int) -> None:
        """The engine found ``entry`` eligible for its fast path one way (``F_FAST_OUT`` or
        ``F_FAST_IN``): set the flag, and tell the observer the first time."""
        if not entry.flags & flag:
            entry.flags |= flag
            if self.observer is not None:
                self.observer.eligible(entry)

    def set_class(self, entry: Entry, tclass: str, now: float) -> None:
        if entry.tclass != tclass:
            self._lru[entry.tclass].unlink(entry)
            entry.tclass = tclass
            d = self.deadline(tclass, now)
            entry.expires_at = d
            self._list(tclass).append(entry, d)
        else:
            self.touch(entry, now)

    def remove(self, entry: Entry, why: str = "removed") -> None:
        if not entry.live:
            return
        entry.live = False
        self._lru[entry.tclass].unlink(entry)
        self.count -= 1
        self.by_proto_kind[(entry.proto, entry.kind)] -= 1
        n = self.per_host.get(entry.inside_ip, 1) - 1
        if n:
            self.per_host[entry.inside_ip] = n
        else:
            self.per_host.pop(entry.inside_ip, None)
        for k in entry.keys:
            if self.index.get(k) is entry:
                del self.index[k]
        b = entry.binding
        if b is not None:
            b._remove(entry)
        if self.on_remove is not None:
            self.on_remove(entry, why)
        if self.observer is not None:
            self.observer.removed(entry)

    # --- expiry ---------------------------------------------------------------------
    def expire(self, now: float) -> int:
        """Remove the entries due at ``now``, earliest deadline first across all classes (so
        removal events come out in the order the entries timed out)."""
        n = 0
        while True:
            due: Entry | None = None
            for lst in self._lru.values():
                e = lst.settle() if lst.n else None
                if e is not None and e.expires_at <= now and (due is None or e.expires_at < due.expires_at):
                    due = e
            if due is None:
                return n
            self.remove(due, "idle")
            n += 1

    def next_deadline(self) -> float | None:
        """The earliest ``expires_at`` of a non-permanent entry, or None (exact)."""
        best: float | None = None
        for tclass, lst in self._lru.items():
            if not lst.n or tclass == PERMANENT:
                continue
            e = lst.settle()
            if e is not None and (best is None or e.expires_at < best):
                best = e.expires_at
        return best

    def entries_of(self, tclass: str) -> list[Entry]:
        """The entries of one timeout class, least recently used first (a snapshot)."""
        lst = self._lru.get(tclass)
        if not lst:
            return []
        out = list(lst)
        out.sort(key=_EXPIRES)
        return out

    def __iter__(self) -> Iterator[Entry]:
        for lst in list(self._lru.values()):
            yield from lst

    def __len__(self) -> int:
        return self.count

    # --- bindings (EIM) ---------------------------------------------------------------
    def binding(self, proto: int, inside_ip: int, inside_port: int) -> Binding | None:
        return self.bindings.get((proto, inside_ip, inside_port))

    def binding_by_alias(self, proto: int, alias_port: int) -> Binding | None:
        return self.alias_bindings.get((proto, alias_port))

    def add_binding(self, b: Binding) -> None:
        ints = self._ints
        if len(ints) >= INTERN_MAX:
            ints.clear()
        b.inside_ip = ints.setdefault(b.inside_ip, b.inside_ip)
        if 0 <= b.inside_port <= 0xFFFF:
            b.inside_port = _PORTS[b.inside_port]
        if 0 <= b.alias_port <= 0xFFFF:
            b.alias_port = _PORTS[b.alias_port]
        key = (b.proto, b.inside_ip, b.inside_port)
        old = self.bindings.get(key)
        if old is not None and old is not b:
            self._count_port(old, -1)
        if old is not b:
            self._count_port(b, 1)
        self.bindings[key] = b
        self.alias_bindings[(b.proto, b.alias_port)] = b

    def _count_port(self, b: Binding, delta: int) -> None:
        if b.static:
            return
        key = (b.proto, b.inside_ip)
        n = self.host_ports.get(key, 0) + delta
        if n > 0:
            self.host_ports[key] = n
        else:
            self.host_ports.pop(key, None)

    def drop_binding(self, b: Binding) -> None:
        if self.bindings.get((b.proto, b.inside_ip, b.inside_port)) is b:
            del self.bindings[(b.proto, b.inside_ip, b.inside_port)]
            self._count_port(b, -1)
        if self.alias_bindings.get((b.proto, b.alias_port)) is b:
            del self.alias_bindings[(b.proto, b.alias_port)]

    def attach(self, entry: Entry, b: Binding) -> None:
        entry.binding = b
        b._add(entry)
