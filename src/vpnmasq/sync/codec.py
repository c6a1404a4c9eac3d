"""The sync wire format: framing, authentication and replay protection. Pure: bytes in and
out, the sender's wall clock passed in; the socket lives in ``vpnmasq.datapath.syncsock``.

One message is one UDP datagram::

    header (32 bytes, network order, HEADER)
      magic "VMSY" | version u8 | kind u8 | node u8 | reserved u8
      epoch u64 (random per sender run) | seq u64 (1, 2, ... within an epoch)
      sent_ms u64 (the sender's wall clock in milliseconds)
    body   zlib-compressed JSON object (at most MAX_BODY bytes once inflated)
    tag    HMAC-SHA256(key, header + body), 32 bytes

The receiver (:class:`Opener`) checks, in this order: size and magic, version, the tag
(constant-time), that the sender is the other node (a reflected copy of our own message is
refused), then freshness: within the current epoch a sliding window of
:data:`REPLAY_WINDOW` sequence numbers (RFC 4303 3.4.3 style) drops duplicates and anything
older than the window; a new epoch (the peer restarted) is accepted only if it is stamped
later than everything seen from the previous one, so recorded messages of an old run cannot
be replayed. Every refusal is a :class:`SyncError` whose ``reason`` is a counter name.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAGIC = b"VMSY"
VERSION = 1
#: magic, version, kind, node, reserved, epoch, seq, sent_ms (u64)
HEADER = struct.Struct("!4sBBBxQQQ")
TAG_LEN = hashlib.sha256().digest_size
#: a UDP datagram carries at most 65507 bytes of payload (IPv4); stay well below it
MAX_DATAGRAM = 65000
#: a body inflates to at most this (bodies are built smaller than this before compression)
MAX_BODY = 1 << 20
#: the shared key must have at least 128 bits (RFC 2104 section 3: at least L/2 for SHA-256)
MIN_KEY_LEN = 16
#: sequence numbers remembered behind the highest one (RFC 4303 uses 32 or 64)
REPLAY_WINDOW = 64


class Kind(enum.IntEnum):
    HELLO = 1  # role, sync status, "send me everything"
    FULL = 2  # one part of a full table
    DELTA = 3  # changed and removed entries since the last message


class SyncError(Exception):
    """A datagram that is not accepted; ``reason`` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    node: int
    epoch: int
    seq: int
    sent_ms: int
    body: Mapping[str, Any]


def check_key(key: bytes) -> bytes:
    """``key`` stripped of surrounding whitespace (a key file may end with a newline); a
    ValueError if it is too short."""
    k = key.strip()
    if len(k) < MIN_KEY_LEN:
        raise ValueError(f"the sync key must be at least {MIN_KEY_LEN} bytes (got {len(k)})")
    return k


def _tag(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def encode_body(body: Mapping[str, Any]) -> bytes:
    return zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 1)


class Sealer:
    """Builds this node's messages: one epoch per run, sequence numbers from 1."""

    def __init__(self, key: bytes, node: int, epoch: int) -> None:
        self.key = check_key(key)
        self.node = node
        self.epoch = epoch
        self.seq = 0

    def seal(self, kind: Kind, body: Mapping[str, Any], wall: float) -> bytes:
        """The datagram for ``body``; ValueError if it does not fit in one."""
        packed = encode_body(body)
        if HEADER.size + len(packed) + TAG_LEN > MAX_DATAGRAM:
            raise ValueError(f"sync message too large ({len(packed)} bytes compressed)")
        self.seq += 1
        head = HEADER.pack(MAGIC, VERSION, kind, self.node, self.epoch, self.seq, int(wall * 1000))
        return head + packed + _tag(self.key, head + packed)


class ReplayWindow:
    """Sequence numbers of one epoch: the highest seen plus a bitmap of the ones behind it."""

    __slots__ = ("top", "bits")

    def __init__(self) -> None:
        self.top = 0
        self.bits = 0  # bit i: top - i was seen

    def check(self, seq: int) -> str | None:
        """None if ``seq`` is new (not recorded yet: call :meth:`accept` after the tag
        checked out), else the reason it is refused."""
        if seq <= 0:
            return "sync_malformed"
        if seq > self.top:
            return None
        off = self.top - seq
        if off >= REPLAY_WINDOW:
            return "sync_too_old"
        return "sync_replayed" if self.bits >> off & 1 else None

    def accept(self, seq: int) -> None:
        if seq > self.top:
            shift = seq - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.top = seq
        else:
            self.bits |= 1 << (self.top - seq)


class Opener:
    """Checks and decodes the peer's messages (see the module docstring)."""

    def __init__(self, key: bytes, own_node: int) -> None:
        self.key = check_key(key)
        self.own_node = own_node
        self.epoch: int | None = None
        self.window = ReplayWindow()
        self.newest_ms = 0  # the latest sent_ms accepted (any epoch)

    def open(self, datagram: bytes) -> Message:
        if len(datagram) < HEADER.size + TAG_LEN or datagram[:4] != MAGIC:
            raise SyncError("sync_malformed", "not a vpnmasq sync message")
        head = datagram[: HEADER.size]
        _, version, kind, node, epoch, seq, sent_ms = HEADER.unpack(head)
        if version != VERSION:
            raise SyncError("sync_version", f"version {version}, this one speaks {VERSION}")
        body_raw, tag = datagram[HEADER.size : -TAG_LEN], datagram[-TAG_LEN:]
        if not hmac.compare_digest(tag, _tag(self.key, head + body_raw)):
            raise SyncError("sync_bad_auth", "HMAC does not match (another key?)")
        if node == self.own_node:
            raise SyncError("sync_own_node", f"sent by node {node}, which is this node")
        if epoch == self.epoch:
            why = self.window.check(seq)
            if why is not None:
                raise SyncError(why, f"seq {seq}, highest {self.window.top}")
        elif sent_ms <= self.newest_ms:
            raise SyncError("sync_stale_epoch", "an older run of the peer (replayed?)")
        try:
            kind_v = Kind(kind)
            inflater = zlib.decompressobj()
            raw = inflater.decompress(body_raw, MAX_BODY)
            if inflater.unconsumed_tail:
                raise SyncError("sync_malformed", "body too large")
            body = json.loads(raw)
        except (ValueError, zlib.error) as exc:
            raise SyncError("sync_malformed", str(exc)) from None
        if not isinstance(body, dict):
            raise SyncError("sync_malformed", "body is not an object")
        if epoch != self.epoch:  # accepted: the peer's new run
            self.epoch = epoch
            self.window = ReplayWindow()
        self.window.accept(seq)
        self.newest_ms = max(self.newest_ms, sent_ms)
        return Message(kind_v, node, epoch, seq, sent_ms, body)


__all__ = [
    "HEADER",
    "MAX_DATAGRAM",
    "REPLAY_WINDOW",
    "Kind",
    "Message",
    "Opener",
    "ReplayWindow",
    "Sealer",
    "SyncError",
    "check_key",
    "encode_body",
]
