"""PPTP's wire schema (RFC 2637): control messages, their Call ID fields, the session and
call state tables, and the stream reader that frames messages out of TCP segments.

:data:`MESSAGES` says, for each control message, where the sender's own Call ID and the
peer's lie; one symmetric rule then serves both roles (see :mod:`.control`).
:class:`StreamReader` tracks one direction of a control connection by TCP sequence number,
keeps only message heads, and logs every byte it rewrote so retransmits carry the same.
Known limit: a segment split by IP fragmentation cannot be read (the direction desyncs and
is passed through).
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

from vpnmasq.conntrack.record import Record, Saved, as_pair

PPTP_MAGIC = 0x1A2B3C4D
PPTP_CONTROL = 1  # PPTP Message Type 1: control message (2, management, has no messages)
HEADER_LEN = 12  # Length, PPTP Message Type, Magic Cookie, Control Message Type, Reserved0
#: Longest message we accept as framed. RFC 2637's longest is 220 (Incoming-Call-Request);
#: leave room for vendor padding, but a length beyond this is garbage (desync).
MAX_MESSAGE_LEN = 4096
#: Bytes of a message kept while parsing: the furthest field read is a result code at 16.
HEAD_KEEP = 17
#: Calls one control connection may hold. RFC 2637 allows 65535; a concentrator rarely has
#: more than a few hundred, and this bounds what one connection can make us allocate.
MAX_CALLS_PER_CONTROL = 1024
#: Calls one control connection may hold without a GRE entry (the table or the host's share
#: was full). Such a call keeps its outside Call ID (no clash) but carries no data, so this
#: bounds the outside IDs a host can hold beyond its entry limit (a LAN host opening
#: calls as fast as it can must not use up a server's Call IDs for everyone).
MAX_CALLS_WITHOUT_GRE = 16
#: The Call ID written into a call the gateway refuses (over a limit, or no outside ID left):
#: never an outside ID (call_id_range starts at 1), so whatever the server sends for that
#: call reaches no LAN host, and the LAN host's own ID cannot clash with another's outside ID.
REFUSED_CALL_ID = 0
#: Rewritten bytes remembered per direction for retransmits; pruned as the peer ACKs them,
#: so this only bounds a peer that never ACKs (each call message logs at most 2 bytes).
REWRITE_LOG_MAX = 2048

_SEQ_MASK = 0xFFFFFFFF
_SEQ_HALF = 1 << 31
_HDR = struct.Struct("!HHIHH")



class MessageType(enum.IntEnum):
    """RFC 2637 control message types (Control Message Type @8)."""

    START_CONTROL_CONNECTION_REQUEST = 1
    START_CONTROL_CONNECTION_REPLY = 2
    STOP_CONTROL_CONNECTION_REQUEST = 3
    STOP_CONTROL_CONNECTION_REPLY = 4
    ECHO_REQUEST = 5
    ECHO_REPLY = 6
    OUTGOING_CALL_REQUEST = 7
    OUTGOING_CALL_REPLY = 8
    INCOMING_CALL_REQUEST = 9
    INCOMING_CALL_REPLY = 10
    INCOMING_CALL_CONNECTED = 11
    CALL_CLEAR_REQUEST = 12
    CALL_DISCONNECT_NOTIFY = 13
    WAN_ERROR_NOTIFY = 14
    SET_LINK_INFO = 15


M = MessageType


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """One control message: RFC 2637 length (a minimum) and where its Call IDs are.

    ``own`` is the offset of the sender's own Call ID, ``peer`` that of the receiver's
    ("Peer's Call ID"), ``result`` that of an 8-bit Result Code whose value 1 means success.
    """

    name: str
    length: int
    sender: Literal["pns", "pac", "either"]
    own: int | None = None
    peer: int | None = None
    result: int | None = None

    @property
    def need(self) -> int:
        """Bytes of the message needed before it can be acted on."""
        ends = [HEADER_LEN]
        for off in (self.own, self.peer):
            if off is not None:
                ends.append(off + 2)
        if self.result is not None:
            ends.append(self.result + 1)
        return max(ends)

    @property
    def fields(self) -> tuple[tuple[Literal["own", "peer"], int], ...]:
        out: list[tuple[Literal["own", "peer"], int]] = []
        if self.own is not None:
            out.append(("own", self.own))
        if self.peer is not None:
            out.append(("peer", self.peer))
        return tuple(sorted(out, key=lambda f: f[1]))


#: RFC 2637 section 2: lengths and Call ID fields (offsets from the message start).
MESSAGES: dict[int, MessageSpec] = {
    M.START_CONTROL_CONNECTION_REQUEST: MessageSpec("Start-Control-Connection-Request", 156, "either"),
    M.START_CONTROL_CONNECTION_REPLY: MessageSpec("Start-Control-Connection-Reply", 156, "either", result=14),
    M.STOP_CONTROL_CONNECTION_REQUEST: MessageSpec("Stop-Control-Connection-Request", 16, "either"),
    M.STOP_CONTROL_CONNECTION_REPLY: MessageSpec("Stop-Control-Connection-Reply", 16, "either", result=12),
    M.ECHO_REQUEST: MessageSpec("Echo-Request", 16, "either"),
    M.ECHO_REPLY: MessageSpec("Echo-Reply", 20, "either", result=16),
    M.OUTGOING_CALL_REQUEST: MessageSpec("Outgoing-Call-Request", 168, "pns", own=12),
    M.OUTGOING_CALL_REPLY: MessageSpec("Outgoing-Call-Reply", 32, "pac", own=12, peer=14, result=16),
    M.INCOMING_CALL_REQUEST: MessageSpec("Incoming-Call-Request", 220, "pac", own=12),
    M.INCOMING_CALL_REPLY: MessageSpec("Incoming-Call-Reply", 24, "pns", own=12, peer=14, result=16),
    M.INCOMING_CALL_CONNECTED: MessageSpec("Incoming-Call-Connected", 28, "pac", peer=12),
    M.CALL_CLEAR_REQUEST: MessageSpec("Call-Clear-Request", 16, "pns", own=12),
    M.CALL_DISCONNECT_NOTIFY: MessageSpec("Call-Disconnect-Notify", 148, "pac", own=12),
    M.WAN_ERROR_NOTIFY: MessageSpec("WAN-Error-Notify", 40, "pac", peer=12),
    M.SET_LINK_INFO: MessageSpec("Set-Link-Info", 24, "either", peer=12),
}


class SessionState(enum.Enum):
    IDLE = "idle"
    REQUESTED = "requested"
    ESTABLISHED = "established"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CLOSED = "closed"  # the TCP connection closed (FIN/RST) or its entry went away


class CallState(enum.Enum):
    OUT_REQUESTED = "out-requested"
    IN_REQUESTED = "in-requested"
    IN_REPLIED = "in-replied"
    ESTABLISHED = "established"
    CLEARING = "clearing"
    ENDED = "ended"


S = SessionState
C = CallState

#: session transitions: message -> (states it is expected in, next on success, next on failure).
#: An unexpected message is counted and still applied (fail open, like Linux "invalid").
SESSION_TRANSITIONS: dict[int, tuple[frozenset[SessionState], SessionState, SessionState]] = {
    M.START_CONTROL_CONNECTION_REQUEST: (frozenset({S.IDLE}), S.REQUESTED, S.REQUESTED),
    M.START_CONTROL_CONNECTION_REPLY: (frozenset({S.REQUESTED}), S.ESTABLISHED, S.IDLE),
    M.STOP_CONTROL_CONNECTION_REQUEST: (
        frozenset({S.ESTABLISHED, S.REQUESTED, S.IDLE}), S.STOPPING, S.STOPPING
    ),
    M.STOP_CONTROL_CONNECTION_REPLY: (frozenset({S.STOPPING}), S.STOPPED, S.STOPPED),
}
#: messages that implicitly clear every call of the control connection (RFC 2637 2.3/2.4)
ENDS_ALL_CALLS = frozenset({M.STOP_CONTROL_CONNECTION_REQUEST, M.STOP_CONTROL_CONNECTION_REPLY})
#: messages whose own Call ID, sent by the LAN host, opens a call (allocates an outside ID)
OPENS_CALL = frozenset(
    {M.OUTGOING_CALL_REQUEST, M.OUTGOING_CALL_REPLY, M.INCOMING_CALL_REQUEST, M.INCOMING_CALL_REPLY}
)
_NEW: CallState | None = None  # "no call yet" in CALL_TRANSITIONS
#: call transitions: message -> (states expected (None: opened by it), next on success or
#: without a result code, next on failure).
CALL_TRANSITIONS: dict[int, tuple[frozenset[CallState | None], CallState | None, CallState | None]] = {
    M.OUTGOING_CALL_REQUEST: (frozenset({_NEW}), C.OUT_REQUESTED, C.OUT_REQUESTED),
    M.OUTGOING_CALL_REPLY: (frozenset({_NEW, C.OUT_REQUESTED}), C.ESTABLISHED, C.ENDED),
    M.INCOMING_CALL_REQUEST: (frozenset({_NEW}), C.IN_REQUESTED, C.IN_REQUESTED),
    M.INCOMING_CALL_REPLY: (frozenset({_NEW, C.IN_REQUESTED}), C.IN_REPLIED, C.ENDED),
    M.INCOMING_CALL_CONNECTED: (frozenset({C.IN_REPLIED}), C.ESTABLISHED, C.ESTABLISHED),
    M.CALL_CLEAR_REQUEST: (
        frozenset({C.OUT_REQUESTED, C.IN_REQUESTED, C.IN_REPLIED, C.ESTABLISHED}),
        C.CLEARING,
        C.CLEARING,
    ),
    M.CALL_DISCONNECT_NOTIFY: (
        frozenset({C.OUT_REQUESTED, C.IN_REQUESTED, C.IN_REPLIED, C.ESTABLISHED, C.CLEARING}),
        C.ENDED,
        C.ENDED,
    ),
    M.WAN_ERROR_NOTIFY: (frozenset({C.ESTABLISHED, C.CLEARING}), None, None),
    M.SET_LINK_INFO: (frozenset({C.IN_REPLIED, C.ESTABLISHED, C.CLEARING}), None, None),
}


def _seq_before(a: int, b: int) -> bool:
    """``a`` precedes ``b`` in 32-bit sequence space (RFC 9293 3.4)."""
    d = (b - a) & _SEQ_MASK
    return 0 < d < _SEQ_HALF


# ---------------------------------------------------------------------------- stream reader
class ReaderSink(Protocol):
    """What a :class:`StreamReader` reports to (the control connection's semantics)."""

    def message_begins(self, reader: StreamReader) -> None: ...

    def field(
        self, reader: StreamReader, which: Literal["own", "peer"], value: int, high_sent: bool
    ) -> int | None:
        """A Call ID field is complete: return its new value, or None to leave it."""
        ...

    def message_ready(self, reader: StreamReader) -> None:
        """All the bytes the message type needs (``spec.need``) are in ``reader.head``."""
        ...

    def problem(self, reader: StreamReader, kind: str, detail: str) -> None:
        """``kind``: "bad-message" (skipped), "desync" (stream given up) or "straddle"."""
        ...


class StreamReader:
    """One direction of a control connection: sequence tracking, framing, rewrite log.

    Sans-IO: ``segment(seq, data, sink)`` takes a segment's payload with its sequence number;
    ``rewrites(seq, n)`` gives the (offset, byte) pairs to apply to a segment; ``prune(ack)``
    forgets what the receiver acknowledged. A field is rewritten when its last byte arrives;
    each rewritten byte is logged by sequence number, so any later copy of it (retransmit,
    other segmentation) gets the same value.
    """

    __slots__ = (
        "from_lan",
        "next_seq",
        "msg_seq",
        "head",
        "pos",
        "want",
        "length",
        "spec",
        "mtype",
        "ready",
        "desync",
        "passive",
        "log",
        "messages",
    )

    def __init__(self, from_lan: bool) -> None:
        self.from_lan = from_lan
        self.next_seq: int | None = None  # sequence number of the next byte not yet parsed
        self.msg_seq = 0  # sequence number of the current message's first byte
        self.head = bytearray()  # the current message's first bytes (at most HEAD_KEEP)
        self.pos = 0  # bytes of the current message seen
        self.want = HEADER_LEN  # bytes to collect into head before the next step
        self.length = 0  # declared length once the header validated, else 0
        self.spec: MessageSpec | None = None  # None while in the header or skipping
        self.mtype = 0
        self.ready = False
        self.desync = ""  # why framing was lost; "" while in sync
        self.passive = False  # no parsing at all (desync or connection closed)
        self.log: OrderedDict[int, int] = OrderedDict()  # seq -> rewritten byte, stream order
        self.messages = 0

    def start(self, seq: int) -> None:
        """The first data byte of this direction will carry ``seq`` (SYN + 1)."""
        self.next_seq = self.msg_seq = seq & _SEQ_MASK
        self._reset_message()

    @property
    def started(self) -> bool:
        return self.next_seq is not None

    @property
    def pristine(self) -> bool:
        return self.messages == 0 and self.pos == 0 and not self.desync

    def _reset_message(self) -> None:
        self.head = bytearray()
        self.pos = 0
        self.want = HEADER_LEN
        self.length = 0
        self.spec = None
        self.mtype = 0
        self.ready = False

    def segment(self, seq: int, data: bytes, sink: ReaderSink) -> bool:
        """Account for one segment's payload. False if it starts beyond a gap (unconsumed)."""
        n = len(data)
        if n == 0:
            return True
        if self.next_seq is None:
            self.start(seq)
        assert self.next_seq is not None
        ahead = (seq - self.next_seq) & _SEQ_MASK
        if ahead and ahead < _SEQ_HALF:
            if not self.passive:
                return False
            self.next_seq = (seq + n) & _SEQ_MASK  # nothing is parsed any more: just follow
            return True
        back = (-ahead) & _SEQ_MASK  # bytes at the front seen before
        if back < n:
            if not self.passive:
                self._parse(data[back:], (seq + back) & _SEQ_MASK, sink)
            self.next_seq = (seq + n) & _SEQ_MASK
        return True

    def export_state(self) -> Saved:
        """Everything needed to carry on parsing after a restart (``vpnmasq.state``)."""
        return {
            "next_seq": self.next_seq,
            "msg_seq": self.msg_seq,
            "head": self.head.hex(),
            "pos": self.pos,
            "want": self.want,
            "length": self.length,
            "mtype": self.mtype if self.spec is not None else None,
            "ready": self.ready,
            "desync": self.desync,
            "passive": self.passive,
            "log": [[seq, b] for seq, b in self.log.items()],
            "messages": self.messages,
        }

    def import_state(self, data: Record) -> None:
        """Inverse of :meth:`export_state`; raises KeyError/ValueError on bad data."""
        nxt = data.opt_int("next_seq")
        self.next_seq = None if nxt is None else nxt & _SEQ_MASK
        self.msg_seq = data.as_int("msg_seq") & _SEQ_MASK
        self.head = bytearray.fromhex(data.as_str("head"))[:HEAD_KEEP]
        self.pos = data.as_int("pos")
        self.want = data.as_int("want")
        self.length = data.as_int("length")
        mtype = data.opt_int("mtype")
        self.spec = None if mtype is None else MESSAGES[mtype]
        self.mtype = 0 if mtype is None else mtype
        self.ready = data.as_bool("ready")
        self.desync = data.as_str("desync")
        self.passive = data.as_bool("passive")
        pairs = (as_pair(x) for x in data.as_list("log"))
        self.log = OrderedDict((sq & _SEQ_MASK, b & 0xFF) for sq, b in pairs)
        self.messages = data.as_int("messages")

    def lose_framing(self, sink: ReaderSink, reason: str) -> None:
        if not self.desync:
            self.desync = reason
            self.passive = True
            sink.problem(self, "desync", reason)

    # --- parsing ----------------------------------------------------------------------
    def _parse(self, data: bytes, seq: int, sink: ReaderSink) -> None:
        seg_start = seq
        i, n = 0, len(data)
        while i < n and not self.passive:
            if self.pos < self.want:
                k = min(self.want - self.pos, n - i)
                before = self.pos
                self.head += data[i : i + k]
                self.pos += k
                i += k
                if self.length == 0:
                    if self.pos < HEADER_LEN:
                        break
                    self._header(sink)
                    if self.passive:
                        break
                else:
                    self._fields(before, seg_start, sink)
                if self.spec is not None and not self.ready and self.pos >= self.want:
                    self.ready = True
                    sink.message_ready(self)
            else:
                k = min(self.length - self.pos, n - i)
                self.pos += k
                i += k
            if self.length and self.pos >= self.length:
                self.msg_seq = (self.msg_seq + self.length) & _SEQ_MASK
                self.messages += 1
                self._reset_message()

    def _header(self, sink: ReaderSink) -> None:
        length, ptype, magic, ctype, _ = _HDR.unpack_from(self.head, 0)
        if magic != PPTP_MAGIC:
            self.lose_framing(sink, f"bad magic cookie 0x{magic:08x}")
            return
        if length < HEADER_LEN:
            self.lose_framing(sink, f"message length {length} < {HEADER_LEN}")
            return
        if length > MAX_MESSAGE_LEN:
            self.lose_framing(sink, f"message length {length} > {MAX_MESSAGE_LEN}")
            return
        self.length = length
        spec = MESSAGES.get(ctype)
        if ptype != PPTP_CONTROL:
            sink.problem(self, "bad-message", f"PPTP message type {ptype} (not control) skipped")
        elif spec is None:
            sink.problem(self, "bad-message", f"unknown control message type {ctype} skipped")
        elif length < spec.length:
            sink.problem(
                self, "bad-message", f"{spec.name}: length {length} < {spec.length}, skipped"
            )
        else:
            self.spec = spec
            self.mtype = ctype
            self.want = min(spec.need, HEAD_KEEP)
            sink.message_begins(self)

    def _fields(self, before: int, seg_start: int, sink: ReaderSink) -> None:
        spec = self.spec
        if spec is None:  # pragma: no cover - fields are only collected for known messages
            return
        head = self.head
        for which, off in spec.fields:
            if not (before < off + 2 <= self.pos):
                continue
            value = (head[off] << 8) | head[off + 1]
            fseq = (self.msg_seq + off) & _SEQ_MASK
            high_sent = _seq_before(fseq, seg_start)
            new = sink.field(self, which, value, high_sent)
            if new is None or new == value:
                continue
            if (new ^ value) >> 8:
                if high_sent:
                    sink.problem(
                        self,
                        "straddle",
                        f"{spec.name}: Call ID {value} straddles segments and its outside "
                        f"ID {new} differs in the high byte already sent; left unchanged",
                    )
                    continue
                self._record(fseq, new >> 8)
            if (new ^ value) & 0xFF:
                self._record((fseq + 1) & _SEQ_MASK, new & 0xFF)

    def _record(self, seq: int, byte: int) -> None:
        self.log[seq] = byte
        if len(self.log) > REWRITE_LOG_MAX:
            self.log.popitem(last=False)

    # --- rewrites ---------------------------------------------------------------------
    def rewrites(self, seq: int, n: int) -> list[tuple[int, int]]:
        """(offset in the segment, byte) for every logged byte in [seq, seq + n)."""
        if not self.log:
            return []
        out = []
        for s, b in self.log.items():
            d = (s - seq) & _SEQ_MASK
            if d < n:
                out.append((d, b))
        return out

    def prune(self, ack: int) -> None:
        """Forget rewrites of bytes the receiver acknowledged (``ack`` is the next it wants)."""
        log = self.log
        while log:
            s = next(iter(log))
            if not _seq_before(s, ack):
                break
            del log[s]


# ---------------------------------------------------------------------------- calls
