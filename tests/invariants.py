"""Invariants of the engine's state, checked after every packet by the fuzzers and the
security/flood tests (shared test vocabulary).

``check_invariants(engine, now)`` raises :class:`InvariantViolation` naming the first broken
rule. The rules, each one a way the gateway could leak or lose traffic:

* the table's bookkeeping: ``count`` equals the entries in the per-class LRU lists, each entry
  is in the list of its own class, ``per_host`` equals the entries per inside host;
* every index key points at a live entry that lists that key (a stale key would route
  packets of a dead flow to whoever holds the key next);
* no entry without an expiry: finite ``expires_at`` unless the class is permanent;
* no alias mapped to two inside endpoints: every binding is the one its alias port resolves
  to, and its alias is held by the allocator; every session hangs off its own binding;
* no PPTP outside Call ID given to two calls (per remote), every call's ID held by the pool;
* no inbound SPI from one remote placed with two LAN hosts; the ESP helper's pending
  bookkeeping matches the entries and honours ``esp.max_pending_per_host`` and
  ``esp.max_waiting_per_remote``;
* the configured limits hold: ``max_entries``, ``max_entries_per_host``, ``fragment_buffer``,
  and the engine's own bounds on first-fragment states and rate-limiter buckets.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from vpnmasq.conntrack.table import PERMANENT, Entry
from vpnmasq.engine import Engine

__all__ = ["InvariantViolation", "check_invariants", "table_size"]


class InvariantViolation(AssertionError):
    """A rule of the engine's state does not hold."""


def _fail(msg: str) -> None:
    raise InvariantViolation(msg)


def table_size(engine: Engine) -> int:
    """Entries in the table (for memory-bound assertions)."""
    return sum(1 for _ in engine.table)


def check_invariants(engine: Engine, now: float | None = None) -> None:  # noqa: C901 - a list of independent invariants
    """Check every rule in the module docstring; ``now`` also checks that nothing is kept
    past its expiry once ``handle_timer(now)`` has run (pass it only right after that)."""
    t = engine.table
    entries: list[Entry] = []
    for tclass, lru in t._lru.items():
        for e in lru:
            if e.tclass != tclass:
                _fail(f"entry {e.kind} {e.inside_ip:#x} is in LRU {tclass!r} but has class {e.tclass!r}")
            if not e.live:
                _fail(f"dead entry {e.kind} still in LRU {tclass!r}")
            entries.append(e)
    ids = {id(e) for e in entries}
    if len(ids) != len(entries):
        _fail("an entry is in two LRU lists")
    if t.count != len(entries):
        _fail(f"table.count {t.count} != {len(entries)} entries")
    if t.count > t.max_entries:
        _fail(f"{t.count} entries > max_entries {t.max_entries}")

    per_host = Counter(e.inside_ip for e in entries)
    if dict(per_host) != t.per_host:
        _fail(f"per_host {t.per_host} != counted {dict(per_host)}")
    if t.max_per_host:
        limited = Counter(e.inside_ip for e in entries if e.tclass != PERMANENT)
        for host, n in limited.items():
            if n > t.max_per_host:
                _fail(f"host {host:#x} holds {n} entries > max_entries_per_host {t.max_per_host}")

    for e in entries:
        if e.tclass == PERMANENT:
            continue
        if not math.isfinite(e.expires_at):
            _fail(f"entry {e.kind} of {e.inside_ip:#x} has no expiry ({e.expires_at})")
        if e.tclass not in t.timeouts:
            _fail(f"entry {e.kind} has unknown timeout class {e.tclass!r}")
        if now is not None and e.expires_at <= now:
            _fail(f"entry {e.kind} of {e.inside_ip:#x} outlived its expiry {e.expires_at} <= {now}")

    for k, e in t.index.items():
        if id(e) not in ids:
            _fail(f"index key {k!r} points at an entry not in the table")
        if k not in e.keys:
            _fail(f"index key {k!r} points at an entry that does not list it")

    _check_bindings(engine, entries)
    _check_pptp(engine, entries)
    _check_esp(engine, entries)
    _check_fragments(engine)


def _check_bindings(engine: Engine, entries: list[Entry]) -> None:  # noqa: C901 - a list of independent invariants
    t = engine.table
    for key, b in t.bindings.items():
        if key != (b.proto, b.inside_ip, b.inside_port):
            _fail(f"binding filed under {key} is {b.proto}/{b.inside_ip:#x}:{b.inside_port}")
        owner = t.alias_bindings.get((b.proto, b.alias_port))
        if b.static and owner is None:
            pass  # a port forward's binding is found through its forward, not by alias
        elif owner is not b:
            _fail(
                f"alias port {b.alias_port}/{b.proto} of {b.inside_ip:#x}:{b.inside_port} "
                f"resolves to another inside endpoint"
            )
        if not b.static:
            alloc = engine.icmp_ids if b.proto == 1 else engine.ports.get(b.proto)
            if alloc is not None and b.alias_port not in alloc.used:
                _fail(f"alias {b.alias_port}/{b.proto} in use but free in the allocator")
            if not b.sessions:
                _fail(f"dynamic binding {b.inside_ip:#x}:{b.inside_port} without sessions kept")
        for (rip, rport), s in b.sessions.items():
            if not s.live or s.binding is not b:
                _fail(f"binding {b.alias_port} lists a dead or foreign session")
            if (s.remote_ip, s.remote_port) != (rip, rport):
                _fail("session filed under another remote endpoint")
        if sum(b.remotes.values()) != len(b.sessions):
            _fail(f"binding {b.alias_port}: remotes {b.remotes} vs {len(b.sessions)} sessions")
    for key, b in t.alias_bindings.items():
        if t.bindings.get((b.proto, b.inside_ip, b.inside_port)) is not b:
            _fail(f"alias binding {key} is not the binding of its inside endpoint")
    for e in entries:
        b = e.binding
        if b is not None and b.sessions.get((e.remote_ip, e.remote_port)) is not e:
            _fail(f"entry {e.kind} {e.inside_ip:#x}:{e.inside_port} is not a session of its binding")
        if b is not None and (b.inside_ip, b.inside_port) != (e.inside_ip, e.inside_port):
            _fail("entry hangs off a binding of another inside endpoint")
    # one alias (proto, alias port, remote endpoint) -> one inside endpoint
    seen: dict[tuple[int, int, int, int], tuple[int, int]] = {}
    for e in entries:
        if e.kind in ("napt", "fwd", "icmp"):
            k = (e.proto, e.alias_port, e.remote_ip, e.remote_port)
            who = (e.inside_ip, e.inside_port)
            if seen.setdefault(k, who) != who:
                _fail(f"alias {k} mapped to two inside endpoints {seen[k]} and {who}")


def _check_pptp(engine: Engine, entries: list[Entry]) -> None:
    gre: Any = engine.helper_by_name.get("gre")
    if gre is None:
        return
    from vpnmasq.helpers.pptp import Call

    seen: dict[tuple[int, int], Call] = {}
    for e in entries:
        c = e.ext
        if e.kind != "gre" or not isinstance(c, Call):
            continue
        if c.entry is not e:
            _fail("GRE entry's call points at another entry")
        if not c.live:
            _fail(f"ended call {c.inside_id}->{c.outside_id} still has a live GRE entry")
        k = (c.remote_ip, c.outside_id)
        if k in seen:
            _fail(f"outside Call ID {c.outside_id} to {c.remote_ip:#x} given to two calls")
        seen[k] = c
        if not gre.calls.pool.in_use(c.remote_ip, c.outside_id):
            _fail(f"outside Call ID {c.outside_id} of a live call is free in the pool")
        if e.inside_ip != c.inside_ip or e.alias_port != c.outside_id:
            _fail("GRE entry disagrees with its call")


def _check_esp(engine: Engine, entries: list[Entry]) -> None:  # noqa: C901 - a list of independent invariants
    esp: Any = engine.helper_by_name.get("esp")
    if esp is None:
        return
    from vpnmasq.helpers.esp import EspState

    inbound: dict[tuple[int, int], int] = {}
    pending: Counter[int] = Counter()
    for e in entries:
        if e.kind != "esp":
            continue
        a = e.ext
        if a.in_spi is not None:
            k = (e.remote_ip, a.in_spi)
            if inbound.setdefault(k, e.inside_ip) != e.inside_ip:
                _fail(f"inbound SPI {a.in_spi:#x} from {e.remote_ip:#x} placed with two hosts")
        if a.state in (EspState.WAITING, EspState.PENDING):
            pending[e.inside_ip] += 1
            if a.in_spi is not None:
                _fail("a pending ESP association already has an inbound SPI")
        elif a.in_spi is None:
            _fail(f"ESP association in state {a.state} without an inbound SPI")
    if dict(pending) != esp.pending_per_host:
        _fail(f"esp.pending_per_host {esp.pending_per_host} != counted {dict(pending)}")
    pol = engine.config.esp
    for host, n in pending.items():
        if n > pol.max_pending_per_host:
            _fail(f"host {host:#x} has {n} pending ESP inits > {pol.max_pending_per_host}")
    for remote, q in esp.queues.items():
        if not q:
            _fail(f"empty ESP queue kept for {remote:#x}")
        if len(q) > pol.max_waiting_per_remote:
            _fail(f"{len(q)} claims wait for {remote:#x} > {pol.max_waiting_per_remote}")
        hosts = [c.host for c in q]
        if len(set(hosts)) != len(hosts):
            _fail(f"a host has two claims in the queue of {remote:#x}")


def _check_fragments(engine: Engine) -> None:
    held = sum(len(v) for v in engine.frags.held.values())
    if held != engine.frags.held_count:
        _fail(f"held fragments {held} != _held_count {engine.frags.held_count}")
    if held > engine.config.limits.fragment_buffer:
        _fail(f"{held} fragments held > fragment_buffer {engine.config.limits.fragment_buffer}")
    from vpnmasq import engine as engine_mod

    if len(engine.frags.states) > engine_mod.MAX_FRAGMENT_STATES:
        _fail(f"{len(engine.frags.states)} first-fragment states > {engine_mod.MAX_FRAGMENT_STATES}")
    if len(engine.rate.buckets) > engine_mod.MAX_RATE_BUCKETS:
        _fail(f"{len(engine.rate.buckets)} rate buckets > {engine_mod.MAX_RATE_BUCKETS}")
