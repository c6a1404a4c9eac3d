"""The masquerade table: entries indexed by hashable keys, expired in LRU order per class.

Every entry belongs to one *timeout class* (``"udp"``, ``"tcp_established"``, ``"esp"`` ...).
All entries of a class share one idle timeout, so one insertion-ordered list per class is
sorted by expiry: touching an entry moves it to the tail, expiry pops from the heads. Cost per
packet is O(1); ``next_deadline()`` is the minimum over the class heads (few classes). A lookup
also refuses an entry whose time is up, so an entry is never used late even if ``expire()``
has not run yet (libalias-style HouseKeeping is only an optimisation of memory).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vpnmasq.events import Row
from vpnmasq.packet.ipv4 import PROTO_NAMES, int_to_ip

PERMANENT = "permanent"


@dataclass(slots=True, eq=False)
class Binding:
    """An endpoint-independent mapping (RFC 4787 EIM): inside addr:port <-> alias port.

    Sessions (one per remote endpoint) hang off it; it lives while it has sessions, or
    forever when ``static`` (an inbound forward).
    """

    proto: int
    inside_ip: int
    inside_port: int
    alias_port: int
    static: bool = False
    sessions: dict[tuple[int, int], Entry] = field(default_factory=dict)
    remotes: dict[int, int] = field(default_factory=dict)  # remote ip -> session count


@dataclass(slots=True, eq=False)
class Entry:
    """One masqueraded flow (a session under a binding, or a VPN association)."""

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
    expires_at: float = 0.0
    state: int = 0
    state_name: str = ""
    binding: Binding | None = None
    keys: list[Hashable] = field(default_factory=list)
    ext: Any = None  # helper state
    alg: Any = None  # payload helper attached (e.g. PPTP control parser)
    pkts_out: int = 0
    pkts_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    last_ack_out: int = -1  # TCP: last ACK number the inside host sent (RST window check)
    flags: int = 0
    live: bool = True

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
        )


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
        self._lru: dict[str, OrderedDict[Entry, None]] = {}
        self.per_host: dict[int, int] = {}
        self.count = 0
        self.on_remove = on_remove

    # --- entries --------------------------------------------------------------------
    def add(self, entry: Entry, now: float, keys: tuple[Hashable, ...] = ()) -> None:
        """Insert ``entry`` (timeout from its class) under ``keys``; TableFull when full."""
        if self.count >= self.max_entries:
            raise TableFull("table full")
        if self.max_per_host and entry.tclass != PERMANENT:
            if self.per_host.get(entry.inside_ip, 0) >= self.max_per_host:
                raise TableFull("host limit")
        lru = self._lru.get(entry.tclass)
        if lru is None:
            lru = self._lru[entry.tclass] = OrderedDict()
        lru[entry] = None
        entry.expires_at = (
            float("inf") if entry.tclass == PERMANENT else now + self.timeouts[entry.tclass]
        )
        self.count += 1
        self.per_host[entry.inside_ip] = self.per_host.get(entry.inside_ip, 0) + 1
        for k in keys:
            self.index[k] = entry
            entry.keys.append(k)

    def add_key(self, entry: Entry, key: Hashable) -> None:
        self.index[key] = entry
        entry.keys.append(key)

    def remove_key(self, entry: Entry, key: Hashable) -> None:
        if self.index.get(key) is entry:
            del self.index[key]
        try:
            entry.keys.remove(key)
        except ValueError:
            pass

    def get(self, key: Hashable, now: float) -> Entry | None:
        e = self.index.get(key)
        if e is not None and e.expires_at <= now:
            self.remove(e, "idle")
            return None
        return e

    def touch(self, entry: Entry, now: float) -> None:
        lru = self._lru[entry.tclass]
        lru.move_to_end(entry)
        entry.expires_at = now + self.timeouts[entry.tclass] if entry.tclass != PERMANENT else entry.expires_at

    def set_class(self, entry: Entry, tclass: str, now: float) -> None:
        if entry.tclass != tclass:
            del self._lru[entry.tclass][entry]
            entry.tclass = tclass
            lru = self._lru.get(tclass)
            if lru is None:
                lru = self._lru[tclass] = OrderedDict()
            lru[entry] = None
            entry.expires_at = float("inf") if tclass == PERMANENT else now + self.timeouts[tclass]
        else:
            self.touch(entry, now)

    def remove(self, entry: Entry, why: str = "removed") -> None:
        if not entry.live:
            return
        entry.live = False
        del self._lru[entry.tclass][entry]
        self.count -= 1
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
            rk = (entry.remote_ip, entry.remote_port)
            if b.sessions.get(rk) is entry:
                del b.sessions[rk]
                c = b.remotes.get(entry.remote_ip, 1) - 1
                if c:
                    b.remotes[entry.remote_ip] = c
                else:
                    b.remotes.pop(entry.remote_ip, None)
        if self.on_remove is not None:
            self.on_remove(entry, why)

    # --- expiry ---------------------------------------------------------------------
    def expire(self, now: float) -> int:
        n = 0
        for lru in list(self._lru.values()):
            while lru:
                e = next(iter(lru))
                if e.expires_at > now:
                    break
                self.remove(e, "idle")
                n += 1
        return n

    def next_deadline(self) -> float | None:
        best: float | None = None
        for tclass, lru in self._lru.items():
            if not lru or tclass == PERMANENT:
                continue
            d = next(iter(lru)).expires_at
            if best is None or d < best:
                best = d
        return best

    def __iter__(self) -> Iterator[Entry]:
        for lru in self._lru.values():
            yield from list(lru)

    def __len__(self) -> int:
        return self.count

    # --- bindings (EIM) ---------------------------------------------------------------
    def binding(self, proto: int, inside_ip: int, inside_port: int) -> Binding | None:
        return self.bindings.get((proto, inside_ip, inside_port))

    def binding_by_alias(self, proto: int, alias_port: int) -> Binding | None:
        return self.alias_bindings.get((proto, alias_port))

    def add_binding(self, b: Binding) -> None:
        self.bindings[(b.proto, b.inside_ip, b.inside_port)] = b
        self.alias_bindings[(b.proto, b.alias_port)] = b

    def drop_binding(self, b: Binding) -> None:
        if self.bindings.get((b.proto, b.inside_ip, b.inside_port)) is b:
            del self.bindings[(b.proto, b.inside_ip, b.inside_port)]
        if self.alias_bindings.get((b.proto, b.alias_port)) is b:
            del self.alias_bindings[(b.proto, b.alias_port)]

    def attach(self, entry: Entry, b: Binding) -> None:
        entry.binding = b
        b.sessions[(entry.remote_ip, entry.remote_port)] = entry
        b.remotes[entry.remote_ip] = b.remotes.get(entry.remote_ip, 0) + 1
