"""Saving and restoring the masquerade table: opt-in ``state_file``, and ``run --handover``.

:func:`export_state` / :func:`import_state` turn an engine's table into a JSON-able dict and
back; they are pure (``now`` and ``wall`` are passed in). :func:`write_state` /
:func:`read_state` put that dict in a file, atomically, mode 0600, format and version
checked (:class:`StateError` otherwise). Helper state crosses through the helper interface's
``export_entry``/``import_entry`` and the ALGs' ``export_state``; what no longer applies on
restore is dropped and counted by reason in :class:`RestoreReport`.

Format and the restore reasons: docs/internals/state.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vpnmasq.conntrack.record import Record, as_int, as_num
from vpnmasq.conntrack.table import PERMANENT, Binding, Entry, standard_keys
from vpnmasq.engine import Engine
from vpnmasq.packet.ipv4 import PROTO_ICMP, int_to_ip, ip_to_int

STATE_FORMAT = "vpnmasq-state"
STATE_VERSION = 1
#: the table never comes close (200 000 entries are about 80 MB of JSON); a bigger file is
#: not ours
MAX_STATE_BYTES = 1 << 30
#: kinds the engine itself creates (no helper state)
ENGINE_KINDS = frozenset({"napt", "fwd", "icmp", "generic"})
_BINDING_KINDS = frozenset({"napt", "fwd", "icmp"})


class StateError(Exception):
    """The state file cannot be used (unreadable, corrupt, another format or version).
    The message is meant for the operator; vpnmasq then starts with an empty table."""


@dataclass
class RestoreReport:
    """What :func:`import_state` did."""

    restored: dict[str, int] = field(default_factory=dict)  # kind -> entries
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> entries
    saved_at: float = 0.0
    elapsed: float = 0.0
    saved_public: str | None = None

    @property
    def n_restored(self) -> int:
        return sum(self.restored.values())

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def summary(self) -> str:
        def parts(d: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items()))

        s = f"restored {self.n_restored} entries"
        if self.restored:
            s += f" ({parts(self.restored)})"
        s += f" saved {self.elapsed:.1f} s ago"
        if self.dropped:
            s += f"; dropped {self.n_dropped} ({parts(self.dropped)})"
        return s


# ------------------------------------------------------------------------------ export
def export_state(
    engine: Engine,
    now: float,
    wall: float,
    stable_id: Callable[[Entry], int] | None = None,
    *,
    entries: Iterable[Entry] | None = None,
    refs: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """The engine's table as a JSON-able dict (see the module docstring). Records are
    numbered 0, 1, ... unless ``stable_id`` gives each entry an id that stays the same
    from one export to the next (replication sends only what changed). Replication may
    export only some ``entries``; ``refs`` then gives the ids of objects records refer to
    that are not among them (``id(alg)`` -> the stable id of its entry)."""
    live = [
        e for e in (engine.table if entries is None else entries) if e.live and e.expires_at > now
    ]
    # entries with an ALG first: helpers' records (a call's GRE entry) refer to them
    live.sort(key=lambda e: e.alg is None)
    ids: dict[int, int] = {}  # id(entry or its alg) -> saved id
    bindings: dict[int, int] = {}  # id(binding) -> index
    out_bindings: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}

    def ago(t: float) -> float:
        return now - t

    def ref(obj: object) -> int | None:
        rid = ids.get(id(obj))
        return refs.get(id(obj)) if rid is None and refs is not None else rid

    for e in live:
        rec, why = _export_entry(engine, e, now, ago, ref)
        if rec is None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        b = e.binding
        if b is not None:
            bi = bindings.get(id(b))
            if bi is None:
                bi = bindings[id(b)] = len(out_bindings)
                out_bindings.append(
                    {
                        "proto": b.proto,
                        "inside": int_to_ip(b.inside_ip),
                        "inside_port": b.inside_port,
                        "alias_port": b.alias_port,
                        "static": b.static,
                    }
                )
            rec["binding"] = bi
        rec["id"] = len(out) if stable_id is None else stable_id(e)
        ids[id(e)] = rec["id"]
        if e.alg is not None:
            ids[id(e.alg)] = rec["id"]
        out.append(rec)
    pub = engine.public_ip
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "saved_at": wall,
        "public_address": None if pub is None else int_to_ip(pub),
        "mode": engine.config.mode,
        "entries": out,
        "bindings": out_bindings,
        "skipped": skipped,
    }


_PLAIN = (int, str)


def _plain_key(k: Hashable) -> list[int | str] | None:
    if type(k) is not tuple or not k:
        return None
    for part in k:
        if type(part) not in _PLAIN:  # (bool is not int here)
            return None
    return list(k)



def _export_entry(
    engine: Engine,
    e: Entry,
    now: float,
    ago: Callable[[float], float],
    ref: Callable[[object], int | None],
) -> tuple[dict[str, Any] | None, str]:
    ext: Any = None
    helper = engine.kind_helpers.get(e.kind)
    if helper is not None:
        ext = helper.export_entry(e, ago, ref)
        if ext is None:
            return None, "not-saved"  # e.g. a pending ESP init
    elif e.ext is not None or e.kind not in ENGINE_KINDS:
        return None, "unsupported"
    alg: Any = None
    if e.alg is not None:
        alg = e.alg.export_state(ago, ref)
    own = tuple(e.keys)
    keys: list[list[int | str] | None] | None = None  # None: the standard keys of its kind
    if not own or own != standard_keys(e):
        keys = [_plain_key(k) for k in own]
        if not keys or any(k is None for k in keys):
            return None, "unsupported"
    last_out, last_in = e.last_out, e.last_in
    rec: dict[str, Any] = {
        "proto": e.proto,
        "kind": e.kind,
        "tclass": e.tclass,
        "inside": int_to_ip(e.inside_ip),
        "inside_port": e.inside_port,
        "remote": int_to_ip(e.remote_ip),
        "remote_port": e.remote_port,
        "alias_port": e.alias_port,
        "age": now - e.created,
        "expires_in": None if e.tclass == PERMANENT else e.expires_at - now,
        "state": e.state,
        "state_name": e.state_name,
        "flags": e.flags,
        "last_ack_out": e.last_ack_out,
        "pkts": [e.pkts_out, e.pkts_in],
        "bytes": [e.bytes_out, e.bytes_in],
        "last": [
            None if last_out is None else now - last_out,
            None if last_in is None else now - last_in,
        ],
        "keys": keys,
        "binding": None,
        "ext": ext,
        "alg": alg,
    }
    return rec, ""


# ------------------------------------------------------------------------------ import
@dataclass
class _Cand:
    rec: Mapping[str, Any]
    entry: Entry
    expires_at: float
    keys: tuple[Hashable, ...]
    binding: int | None


def check_header(data: object, where: str = "state") -> Mapping[str, Any]:
    """``data`` if it is a state this version reads, else :class:`StateError`."""
    if not isinstance(data, dict):
        raise StateError(f"{where}: not a vpnmasq state (a JSON object was expected)")
    if data.get("format") != STATE_FORMAT:
        raise StateError(f"{where}: not a vpnmasq state (format {data.get('format')!r})")
    version = data.get("version")
    if version != STATE_VERSION:
        newer = (
            isinstance(version, int) and not isinstance(version, bool) and version > STATE_VERSION
        )
        raise StateError(
            f"{where}: state format version {version!r} "
            + ("was written by a newer vpnmasq; " if newer else "is not supported; ")
            + f"this one reads version {STATE_VERSION}"
        )
    saved_at = data.get("saved_at")
    if isinstance(saved_at, bool) or not isinstance(saved_at, int | float):
        raise StateError(f"{where}: saved_at missing or not a number")
    pub = data.get("public_address")
    if pub is not None:
        try:
            ip_to_int(pub)
        except (TypeError, ValueError, OSError):
            raise StateError(f"{where}: public_address {pub!r} is not an IPv4 address") from None
    for key in ("entries", "bindings"):
        if not isinstance(data.get(key), list):
            raise StateError(f"{where}: {key} missing or not a list")
    return data


def import_state(  # noqa: C901 - the restore steps 1-5 in order, each commented
    engine: Engine,
    data: object,
    now: float,
    wall: float,
    *,
    ranges_of: Any = None,
) -> RestoreReport:
    """Restore a saved table into ``engine``, whose table must still be empty.

    Raises :class:`StateError` if ``data`` is not a state this version reads; individual
    records that do not fit are dropped and counted (see the module docstring).

    Replication (``vpnmasq.sync``) adds two things: a record may carry ``"held"``, the
    seconds a standby kept it before this import (added to its age like ``elapsed``), and
    ``ranges_of`` (a Config) widens the port and ICMP id ranges a restored binding may use
    to that config's: the peer hands out the other half of the ranges this engine uses.
    """
    d = check_header(data)
    if len(engine.table):
        raise StateError("state: can only be restored into an empty table")
    rep = RestoreReport(saved_at=float(d["saved_at"]), saved_public=d["public_address"])
    elapsed = max(0.0, wall - rep.saved_at)
    rep.elapsed = elapsed
    recs: list[Any] = d["entries"]
    brecs: list[Any] = d["bindings"]
    if not recs:
        return rep
    pub = engine.public_ip
    if pub is None:
        rep.drop("no-public-address", len(recs))
        return rep
    saved_pub = d["public_address"]
    if (saved_pub is None or ip_to_int(saved_pub) != pub) and (
        engine.config.on_address_change == "flush"
    ):
        rep.drop("address-changed", len(recs))
        return rep

    def held(rec: Mapping[str, Any]) -> float:
        h = rec.get("held", 0.0)
        return max(0.0, float(h)) if isinstance(h, int | float) and not isinstance(h, bool) else 0.0

    # 1. records -> candidate entries
    cands: list[_Cand] = []
    taken: set[Hashable] = set(engine.table.index)
    for rec in recs:
        try:
            c = _build(engine, rec, now, elapsed + held(rec), pub)
        except (KeyError, TypeError, ValueError, OSError, AttributeError):
            rep.drop("malformed")
            continue
        if isinstance(c, str):
            rep.drop(c)
            continue
        if any(k in taken for k in c.keys) or len(set(c.keys)) != len(c.keys):
            rep.drop("conflict")
            continue
        taken.update(c.keys)
        cands.append(c)

    # 2. capacity: keep the entries with the most time left
    cands = _fit(engine, cands, rep)

    # 3. bindings (claim the outside port/id again), and sessions without theirs go
    bound: dict[int, Binding] = {}
    fresh: set[int] = set()
    by_binding: dict[int, list[_Cand]] = {}
    kept: list[_Cand] = []
    for c in cands:
        if c.entry.kind in _BINDING_KINDS:
            if c.binding is None:
                rep.drop("malformed")
                continue
            by_binding.setdefault(c.binding, []).append(c)
        elif c.binding is not None:
            rep.drop("malformed")
            continue
        kept.append(c)
    lost: set[int] = set()
    for bi, sessions in by_binding.items():
        try:
            b, is_new = _claim_binding(engine, brecs[bi], sessions, ranges_of)
        except (IndexError, KeyError, TypeError, ValueError, OSError):
            b, is_new = None, False
        if b is None:
            lost.add(bi)
            rep.drop("binding", len(sessions))
            continue
        bound[bi] = b
        if is_new:
            fresh.add(bi)
    cands = [c for c in kept if c.binding not in lost]

    # 4. ALGs and helper state, in file order (a record may refer to an earlier one)
    by_id: dict[int, Entry] = {}

    def ref(i: int) -> Entry | None:
        return by_id.get(i)

    ready: list[_Cand] = []
    for c in cands:
        e, rec = c.entry, c.rec
        ago_base = elapsed + held(rec)

        def at(ago: float, base: float = ago_base) -> float:
            return now - ago - base

        alg = rec.get("alg")
        if isinstance(alg, Mapping):
            factory = engine.helper_by_name.get(str(alg.get("helper")))
            e.alg = factory.restore_alg(e, Record(alg), at) if factory is not None else None
        helper = engine.kind_helpers.get(e.kind)
        if helper is not None:
            ext = rec.get("ext")
            if not isinstance(ext, Mapping) or not helper.import_entry(e, Record(ext), at, ref):
                rep.drop("helper-refused")
                continue
        rid = rec.get("id")
        if type(rid) is int:
            by_id[rid] = e
        ready.append(c)

    # 5. into the table, sorted by expiry (each timeout class is an LRU list: its head
    #    must be the entry that expires first)
    ready.sort(key=lambda c: c.expires_at)
    table = engine.table
    for c in ready:
        e = c.entry
        table.add(e, now, c.keys)
        e.expires_at = c.expires_at
        if c.binding is not None:
            b = bound[c.binding]
            if c.binding in fresh:
                table.add_binding(b)
                fresh.discard(c.binding)
            table.attach(e, b)
        rep.restored[e.kind] = rep.restored.get(e.kind, 0) + 1
        engine.count("restored:" + e.kind)
    return rep


def _ip(v: object) -> int:
    if not isinstance(v, str):
        raise TypeError("address must be a string")
    return _parse_ip(v)


@functools.lru_cache(maxsize=4096)
def _parse_ip(v: str) -> int:  # a table has few distinct addresses; parsing them is slow
    return ip_to_int(v)


def _int(v: object, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    return as_int(v, lo, hi)  # counters and ports: never negative unless told


def _build(engine: Engine, rec: Any, now: float, elapsed: float, pub: int) -> _Cand | str:
    """A candidate entry from one record, or the reason it is dropped."""
    if not isinstance(rec, Mapping):
        return "malformed"
    kind = rec["kind"]
    tclass = rec["tclass"]
    if not isinstance(kind, str) or not isinstance(tclass, str):
        return "malformed"
    timeouts = engine.table.timeouts
    if tclass != PERMANENT and tclass not in timeouts:
        return "helper-disabled"
    if kind in ENGINE_KINDS:
        if rec.get("ext") is not None:
            return "malformed"
    else:
        if kind not in engine.kind_helpers:
            return "helper-disabled"
    inside = _ip(rec["inside"])
    if not engine.is_inside(inside):
        return "not-inside"
    if tclass == PERMANENT:
        expires = float("inf")
    else:
        left = as_num(rec["expires_in"]) - elapsed
        if left <= 0:
            return "expired"
        expires = now + min(left, timeouts[tclass])
    raw_keys = rec["keys"]
    e = Entry(
        _int(rec["proto"], 0, 255),
        kind,
        tclass,
        inside,
        _int(rec["inside_port"], 0, 0xFFFF),
        _ip(rec["remote"]),
        _int(rec["remote_port"], 0, 0xFFFF),
        pub,
        _int(rec["alias_port"], 0, 0xFFFF),
        now - as_num(rec["age"]) - elapsed,
    )
    e.state = _int(rec["state"], 0, 255)
    name = rec["state_name"]
    e.state_name = name if isinstance(name, str) else ""
    e.flags = _int(rec["flags"], 0, 0xFFFF)
    e.last_ack_out = _int(rec["last_ack_out"], -1, 0xFFFFFFFF)
    e.pkts_out, e.pkts_in = (_int(x) for x in rec["pkts"])
    e.bytes_out, e.bytes_in = (_int(x) for x in rec["bytes"])
    last = rec.get("last")
    if isinstance(last, list) and len(last) == 2:
        lo, li = last
        e.last_out = None if lo is None else now - as_num(lo) - elapsed
        e.last_in = None if li is None else now - as_num(li) - elapsed
    if raw_keys is None:  # the standard keys of its kind, from the fields just read
        std = standard_keys(e)
        if std is None:
            return "malformed"
        keys: tuple[Hashable, ...] = std
    else:
        keys = tuple(_key(k) for k in raw_keys)
    if not keys:
        return "malformed"
    b = rec.get("binding")
    return _Cand(rec, e, expires, keys, None if b is None else _int(b, 0, 1 << 31))


def _key(k: object) -> tuple[int | str, ...]:
    if type(k) is not list or not k:
        raise ValueError("bad key")
    for part in k:
        if type(part) not in _PLAIN:
            raise ValueError("bad key part")
    return tuple(k)


def _fit(engine: Engine, cands: list[_Cand], rep: RestoreReport) -> list[_Cand]:
    """Drop what the table limits do not allow, least time left first."""
    table = engine.table
    room = table.max_entries - len(table)
    per_host = table.max_per_host
    order = sorted(range(len(cands)), key=lambda i: -cands[i].expires_at)
    keep: set[int] = set()
    hosts: dict[int, int] = {}
    for i in order:
        c = cands[i]
        if len(keep) >= room:
            rep.drop("table-full")
            continue
        h = c.entry.inside_ip
        if per_host and c.entry.tclass != PERMANENT and hosts.get(h, 0) >= per_host:
            rep.drop("table-full")
            continue
        hosts[h] = hosts.get(h, 0) + 1
        keep.add(i)
    return [c for i, c in enumerate(cands) if i in keep]


def _claim_binding(
    engine: Engine, brec: Any, sessions: list[_Cand], ranges_of: Any = None
) -> tuple[Binding | None, bool]:
    """The binding for restored sessions: the config's static one, or a dynamic one whose
    outside port/id is claimed again in the allocator. (None, False) if that is not possible."""
    if not isinstance(brec, Mapping):
        return None, False
    proto = _int(brec["proto"], 0, 255)
    inside = _ip(brec["inside"])
    port = _int(brec["inside_port"], 0, 0xFFFF)
    alias = _int(brec["alias_port"], 0, 0xFFFF)
    static = brec["static"]
    for c in sessions:
        e = c.entry
        if (e.proto, e.inside_ip, e.inside_port, e.alias_port) != (proto, inside, port, alias):
            return None, False
    table = engine.table
    existing = table.binding(proto, inside, port)
    if static is True:
        if existing is None or not existing.static or existing.alias_port != alias:
            return None, False  # the forward was removed or changed
        return existing, False
    if static is not False or existing is not None:
        return None, False
    if table.binding_by_alias(proto, alias) is not None:
        return None, False
    alloc = engine.icmp_ids if proto == PROTO_ICMP else engine.ports.get(proto)
    if alloc is None:
        return None, False
    in_range = any(lo <= alias <= hi for lo, hi in alloc.ranges) or alias in alloc.always_preserve
    if ranges_of is not None and not in_range:
        wide = (
            [ranges_of.icmp_id_range]
            if proto == PROTO_ICMP
            else [ranges_of.port_range, ranges_of.low_port_range]
        )
        in_range = any(r is not None and r.low <= alias <= r.high for r in wide)
    if not in_range and not all(_forwarded(engine, c.entry, alias) for c in sessions):
        return None, False
    if not alloc.take(alias):
        return None, False
    return Binding(proto, inside, port, alias), True


def _forwarded(engine: Engine, e: Entry, alias: int) -> bool:
    """A whole-protocol forward's dynamic binding (the engine keeps the public port)."""
    if e.kind != "fwd" or e.inside_port != alias:
        return False
    f = engine.match_forward(e.proto, alias, e.remote_ip)
    return f is not None and f.port is None and ip_to_int(f.to) == e.inside_ip


# ------------------------------------------------------------------------------ files
def write_state(path: str, data: Mapping[str, Any]) -> int:
    """Write ``data`` to ``path`` atomically, mode 0600; returns the bytes written.

    A temporary file in the same directory is written, flushed and fsynced, then renamed
    over ``path`` and the directory fsynced: a crash leaves the old file or the new one,
    never a mix. The directory is created (mode 0700) if missing.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    fd, tmp = tempfile.mkstemp(prefix=".vpnmasq-state.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return len(blob)


def read_state(path: str) -> Mapping[str, Any] | None:
    """The state saved at ``path``; None if there is no such file. :class:`StateError` if it
    cannot be read, is not JSON, or is not a state this version reads."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"{path}: larger than {MAX_STATE_BYTES} bytes; not a vpnmasq state")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise StateError(f"{path}: corrupt (not JSON: {e})") from None
    return check_header(data, path)


__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "RestoreReport",
    "StateError",
    "check_header",
    "export_state",
    "import_state",
    "read_state",
    "write_state",
]
