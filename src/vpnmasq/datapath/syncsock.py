"""The sync socket between the two gateways of a pair (``[sync]``, docs/HA.md).

One UDP socket per gateway, bound to ``listen`` (and ``interface``), sending to ``peer``.
The gateway that holds the public address is *active*: every :data:`TICK_S` it exports its
table and sends what changed (:class:`vpnmasq.sync.replica.Publisher`). The other is the
*standby*: it keeps what arrives (:class:`~vpnmasq.sync.replica.Replica`) and, at takeover,
imports it. Both send a HELLO every :data:`HELLO_S` (role, whether a full sync is wanted),
and at once when their role changes.

Split brain with the sync link up: when both hold the public address, node 2 yields (it
masquerades nothing, fail closed) while node 1 says it is active, and for
:data:`PEER_CLAIM_S` after node 1's last word; the identifier halves (``[sync] node``)
cover the case where the two cannot hear each other.

The packet path never waits for the peer: datagrams go out non-blocking from a queue of at
most ``[sync] queue``; what does not fit is dropped and counted, and the next tick sends
the whole table again. A tick exports only what may have changed (:meth:`SyncEndpoint._changes`);
ticks and full syncs are spaced to keep their cost under :data:`MAX_EXPORT_SHARE` of the time.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
from collections import deque
from collections.abc import Callable
from typing import Any

from vpnmasq import state
from vpnmasq.config import Config, Sync
from vpnmasq.engine import Engine
from vpnmasq.sync.codec import Kind, Opener, Sealer, SyncError, check_key
from vpnmasq.sync.replica import Publisher, Replica, pair_ranges, stable_id

#: the active gateway sends changes this often (a change is on the standby within a tick)
TICK_S = 0.2
#: plain mappings (already on the standby) re-checked per tick, in turn
ROLL_PER_TICK = 256
#: HELLO interval (role, "send me a full sync")
HELLO_S = 0.25
#: the peer counts as active this long after its last message saying so (several HELLOs, and
#: less than VRRP takes to notice a dead master, so a failover never waits for it)
PEER_CLAIM_S = 1.0
#: export time / tick interval at most this (a big table is sent less often)
MAX_EXPORT_SHARE = 0.05
#: receive and send buffers (a full sync of a large table is a burst of datagrams)
SOCKET_BUFFER = 4 << 20


def _host_port(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "0.0.0.0", int(port)


def read_key(path: str) -> tuple[bytes, str | None]:
    """The shared key and a warning if others may read the file. OSError/ValueError if it
    cannot be used."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = check_key(f.read(4096))
    warn = None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn = f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); use 0600"
    return key, warn


class SyncEndpoint:
    def __init__(self, cfg: Sync, key: bytes, *, epoch: int | None = None) -> None:
        assert cfg.peer is not None and cfg.listen is not None
        self.cfg = cfg
        self.peer = _host_port(cfg.peer)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                self.sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            if cfg.interface:
                self.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_BINDTODEVICE, cfg.interface.encode()
                )
            self.sock.bind(_host_port(cfg.listen))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.sealer = Sealer(key, cfg.node, epoch if epoch is not None else secrets.randbits(63))
        self.opener = Opener(key, cfg.node)
        self.publisher = Publisher(cfg.full_sync_interval)
        self.replica = Replica()
        self.queue: deque[bytes] = deque()
        self.counters: dict[str, int] = {}
        self.next_tick = 0.0
        self.next_hello = 0.0
        self.tick_interval = TICK_S
        self.roll = 0  # where the next tick's re-check of plain mappings starts
        self.peer_seen: float | None = None  # monotonic time of the last accepted message
        self.peer_active = False
        self.peer_active_until = 0.0  # monotonic: the peer claims the public address until
        self.last_error: str | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # ------------------------------------------------------------------ receive
    def on_readable(self, active: bool, now: float) -> None:
        for _ in range(1024):
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ECONNREFUSED from an earlier send
                self.last_error = str(exc)
                return
            try:
                msg = self.opener.open(data)
            except SyncError as exc:
                self.count(exc.reason)
                self.last_error = str(exc)
                continue
            self.count("sync_received")
            self.peer_seen = now
            if msg.kind is Kind.HELLO:
                self.peer_active = bool(msg.body.get("active"))
                if active and msg.body.get("want_full"):
                    self.publisher.request_full()
            else:
                self.peer_active = True  # only the active side sends the table
            self.peer_active_until = now + PEER_CLAIM_S if self.peer_active else 0.0
            if active:
                continue  # (split brain: both active) the table here is the live one
            try:
                self.replica.receive(msg, now)
            except SyncError as exc:
                self.count(exc.reason)
                self.last_error = str(exc)

    # ------------------------------------------------------------------ send
    def _enqueue(self, dgram: bytes) -> None:
        if len(self.queue) >= self.cfg.queue:
            self.flush()
        if len(self.queue) >= self.cfg.queue:
            self.count("sync_send_dropped")
            self.publisher.request_full()  # the standby will see a gap; resend everything
            return
        self.queue.append(dgram)

    def _send(self, kind: Kind, body: dict[str, Any], wall: float) -> None:
        try:
            self._enqueue(self.sealer.seal(kind, body, wall))
        except ValueError as exc:  # one record larger than a datagram
            self.count("sync_too_large")
            self.last_error = str(exc)

    def flush(self) -> None:
        while self.queue:
            try:
                self.sock.sendto(self.queue[0], self.peer)
            except (BlockingIOError, InterruptedError):
                self.count("sync_send_blocked")
                return
            except OSError as exc:
                # the peer is down (ECONNREFUSED, EHOSTUNREACH...): drop, it resyncs later
                if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self.last_error = str(exc)
                self.count("sync_send_failed")
            else:
                self.count("sync_sent")
            self.queue.popleft()

    def tick(
        self, engine: Engine, active: bool, now: float, wall: float, clock: Callable[[], float]
    ) -> None:
        """Send what is due: HELLO, and on the active side the table's changes."""
        if now >= self.next_hello:
            self.next_hello = now + HELLO_S
            want = not active and self.replica.want_full
            self._send(
                Kind.HELLO,
                {
                    "active": active,
                    "want_full": want,
                    "synced": self.replica.synced,
                    "entries": len(engine.table) if active else len(self.replica.records),
                },
                wall,
            )
        if active and now >= self.next_tick:
            t0 = clock()
            full = now >= self.publisher.next_full
            if full:
                export = state.export_state(engine, now, wall, stable_id)
                msgs = self.publisher.messages(export, now)
            else:
                msgs = self._changes(engine, now, wall)
            took = clock() - t0
            if full:  # a big table is sent whole less often
                self.publisher.next_full = max(
                    self.publisher.next_full, now + took / MAX_EXPORT_SHARE
                )
            else:
                self.tick_interval = max(TICK_S, took / MAX_EXPORT_SHARE)
            self.next_tick = now + self.tick_interval
            for kind, body in msgs:  # (a full queue asks for the next full sync at once)
                self._send(kind, body, wall)
        self.flush()

    def _changes(
        self, engine: Engine, now: float, wall: float
    ) -> list[tuple[Kind, dict[str, Any]]]:
        """One pass over the table (ids only), then an export of what may have changed:
        every VPN entry (helper kinds, ALGs: few, and what a takeover needs exactly), every
        entry the standby does not have yet, and the next :data:`ROLL_PER_TICK` plain
        mappings in turn (their TCP state; clocks are the full sync's)."""
        sent = self.publisher.sent
        present: set[int] = set()
        owners: dict[int, int] = {}
        subset = []
        plain = []
        for e in engine.table:
            if not e.live or e.expires_at <= now:
                continue
            sid = stable_id(e)
            present.add(sid)
            if e.alg is not None:
                owners[id(e.alg)] = sid
            if e.alg is not None or e.kind not in state.ENGINE_KINDS or sid not in sent:
                subset.append(e)
            else:
                plain.append(e)
        if plain:
            start = self.roll % len(plain)
            subset += plain[start : start + ROLL_PER_TICK]
            self.roll = start + ROLL_PER_TICK
        export = state.export_state(engine, now, wall, stable_id, entries=subset, refs=owners)
        return self.publisher.messages(export, now, present)

    def next_deadline(self, active: bool) -> float:
        dl = min(self.next_hello, self.next_tick) if active else self.next_hello
        return min(dl, self.peer_active_until) if self.peer_active_until else dl

    def must_yield(self, now: float) -> bool:
        """Node 2 does not masquerade while node 1 says it does (split brain, link up)."""
        return self.cfg.node == 2 and now < self.peer_active_until

    # ------------------------------------------------------------------ roles
    def take_over(
        self, engine: Engine, now: float, wall: float, full_config: Config
    ) -> state.RestoreReport | None:
        """This gateway just became active: import the replicated table (None if it never
        received one, or could not use it: ``last_error`` says why, and the table is left
        empty rather than half restored). The replica is emptied; this side now publishes."""
        rep = None
        if self.replica.have_table:
            if len(engine.table):
                engine.flush()
            try:
                rep = state.import_state(
                    engine,
                    self.replica.state(now, wall),
                    now,
                    wall,
                    ranges_of=pair_ranges(full_config),
                )
            except Exception as exc:  # a takeover must never stop the datapath
                engine.flush()
                self.count("sync_takeover_failed")
                self.last_error = f"takeover: {type(exc).__name__}: {exc}"
        self.replica.clear()
        self.publisher.request_full()
        self.next_tick = 0.0
        self.next_hello = 0.0
        return rep

    def stand_by(self) -> None:
        """This gateway lost the public address: wait for the peer's table."""
        self.replica.clear()
        self.next_hello = 0.0

    def counters_all(self) -> dict[str, int]:
        return {**self.replica.counters, **self.counters}

    def status(self, active: bool, now: float) -> dict[str, Any]:
        return {
            "role": "active" if active else "standby",
            "node": self.cfg.node,
            "peer": self.cfg.peer,
            "peer_seen_s_ago": None if self.peer_seen is None else round(now - self.peer_seen, 1),
            "peer_active": self.peer_active,
            "yielding": self.must_yield(now),  # (node 2 would: the peer says it is active)
            "replica_entries": len(self.replica.records),
            "replica_synced": self.replica.synced,
            "queue": len(self.queue),
            "tick_s": round(self.tick_interval, 3),
            "counters": self.counters_all(),
        }


__all__ = ["HELLO_S", "PEER_CLAIM_S", "TICK_S", "SyncEndpoint", "read_key"]
