"""PPTP (RFC 2637): the control-connection ALG on TCP 1723 and the GRE protocol helper.

Two specs, one shared call store::

    pptp  tcp-alg  TCP 1723  per control connection: PptpControl (parses, rewrites Call IDs)
    gre   proto    IP 47     GreHelper: enhanced GRE v1 by Call ID, GRE v0 by address pair

One symmetric rule (:data:`MESSAGES`): going out, a message's *own* Call ID field is rewritten
inside -> outside; coming in, its *peer* field is restored. Outside Call IDs come from
:class:`CallIdPool`. Rewrites are keyed by TCP sequence number, so retransmits match.
Known limit: a TCP segment split by IP fragmentation desyncs its direction (passed through).

Design notes: docs/internals/helpers-pptp.md.
"""

from __future__ import annotations

import enum
import random
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from vpnmasq.conntrack.record import Record, Saved, as_int, as_pair, as_rec
from vpnmasq.conntrack.table import Entry, EntryAlg, EntryExt, TableFull
from vpnmasq.helpers.base import (
    Ago,
    At,
    EngineView,
    HelperSpec,
    ProtoHelper,
    Ref,
    Resolve,
    TcpAlgFactory,
)
from vpnmasq.packet.checksum import update16
from vpnmasq.packet.ipv4 import PROTO_GRE, PROTO_TCP, IPv4, int_to_ip, ip_to_int
from vpnmasq.packet.l4 import (
    GRE_CALL_ID,
    GRE_MIN_V1,
    GRE_V1_MASK,
    GRE_V1_VALUE,
    PPTP_PORT,
    TCP_ACK,
    TCP_CSUM,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
)
from vpnmasq.verdict import DropReason, Verdict, accept

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.config import Forward

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

GRE_ADDR_KIND = "gre-addr"


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
class CallIdPool:
    """Outside Call IDs, unique per remote address (the public address is one at a time).

    ``allocate`` keeps the preferred ID when it is free and in range, otherwise picks one
    with the same high byte (so straddled fields need no change to an already-sent byte),
    and only then, unless ``keep_high``, anything free in range.
    """

    __slots__ = ("low", "high", "rng", "used")

    def __init__(self, low: int, high: int, rng: random.Random) -> None:
        self.low = low
        self.high = high
        self.rng = rng
        self.used: dict[int, set[int]] = {}

    def in_use(self, remote: int, cid: int) -> bool:
        return cid in self.used.get(remote, ())

    def allocate(self, remote: int, preferred: int, keep_high: bool = False) -> int | None:
        used = self.used.setdefault(remote, set())
        lo, hi = self.low, self.high
        if lo <= preferred <= hi and preferred not in used:
            used.add(preferred)
            return preferred
        base = preferred & 0xFF00
        block = [c for c in range(max(lo, base), min(hi, base | 0xFF) + 1) if c not in used]
        if block:
            cid: int = self.rng.choice(block)
            used.add(cid)
            return cid
        if keep_high:
            return None
        size = hi - lo + 1
        for _ in range(16):
            cand = lo + self.rng.randrange(size)
            if cand not in used:
                used.add(cand)
                return cand
        start = self.rng.randrange(size)
        for i in range(size):
            cand = lo + (start + i) % size
            if cand not in used:
                used.add(cand)
                return cand
        return None

    def claim(self, remote: int, cid: int) -> bool:
        """Take exactly ``cid`` for ``remote`` (a call restored from saved state). Any
        Call ID but 0 is accepted, in range or not: a standby restores the calls its peer
        numbered from the other half of call_id_range (``[sync] node``)."""
        used = self.used.setdefault(remote, set())
        if cid in used or not 1 <= cid <= 0xFFFF:
            return False
        used.add(cid)
        return True

    def release(self, remote: int, cid: int) -> None:
        used = self.used.get(remote)
        if used is not None:
            used.discard(cid)
            if not used:
                del self.used[remote]


def _lan_role(v: str) -> Literal["pns", "pac"]:
    if v == "pns":
        return "pns"
    if v == "pac":
        return "pac"
    raise ValueError(f"bad lan_role {v!r}")


@dataclass(slots=True, eq=False)
class Call(EntryExt):
    """One PPTP call through the gateway, from the LAN host's point of view."""

    control: PptpControl
    lan_role: Literal["pns", "pac"]
    inside_ip: int
    remote_ip: int
    inside_id: int  # the LAN host's own Call ID
    outside_id: int  # what the remote sees instead
    state: CallState
    created: float
    peer_id: int | None = None  # the remote's own Call ID, once a reply told us
    entry: Entry | None = None  # the GRE table entry (None if the table was full)

    @property
    def live(self) -> bool:
        return self.state is not CallState.ENDED

    @property
    def pac_call_id(self) -> int | None:
        return self.peer_id if self.lan_role == "pns" else self.inside_id


@dataclass(frozen=True, slots=True)
class GreAddr(EntryExt):
    """Helper state of an address-only GRE entry (kind ``gre-addr``): why it is one."""

    mode: str  # "v0" | "untracked" (pptp helper off) | "forward"


def addr_mode(e: Entry) -> str:
    """The mode of an address-only GRE entry; "" for any other entry."""
    a = e.ext
    return a.mode if isinstance(a, GreAddr) else ""


@dataclass(slots=True)
class _Msg:
    """What the control connection learned so far about the message being parsed."""

    call: Call | None = None
    remote_id: int | None = None
    opened: bool = False


class PptpControl(EntryAlg):
    """The ALG of one PPTP control connection (a TCP 1723 entry's ``alg``)."""

    def __init__(
        self, engine: EngineView, store: GreHelper | None, entry: Entry, now: float, server_inside: bool
    ) -> None:
        self.engine = engine
        self.store = store
        self.inside_ip = entry.inside_ip
        self.remote_ip = entry.remote_ip
        self.lan_role: Literal["pns", "pac"] = "pac" if server_inside else "pns"
        self.session = SessionState.IDLE
        self.closed = False
        self.lan = StreamReader(from_lan=True)  # bytes the LAN host sends
        self.wan = StreamReader(from_lan=False)  # bytes the remote sends
        self._msg = {True: _Msg(), False: _Msg()}
        self.by_inside: dict[int, Call] = {}
        self.by_outside: dict[int, Call] = {}
        self.by_peer: dict[int, Call] = {}
        self.counts: dict[str, int] = {}
        self._noticed: set[str] = set()
        self._now = now  # time of the segment being parsed (the sink callbacks need it)
        self._refused = False  # the last _open refused the call (see REFUSED_CALL_ID)

    # --- TcpAlg -----------------------------------------------------------------------
    def outbound(self, ip: IPv4, entry: Entry, payload_off: int, now: float) -> Verdict | None:
        return self._segment(ip, payload_off, now, from_lan=True)

    def inbound(self, ip: IPv4, entry: Entry, payload_off: int, now: float) -> Verdict | None:
        return self._segment(ip, payload_off, now, from_lan=False)

    def detail(self, entry: Entry, now: float) -> dict[str, str]:
        d = {
            "alg": "pptp",
            "role": f"lan-{self.lan_role}",
            "control": self.session.value,
            "calls": str(len(self.by_inside)),
        }
        if self.by_inside:
            ids = sorted(self.by_inside.values(), key=lambda c: c.inside_id)
            d["call_ids"] = " ".join(f"{c.inside_id}>{c.outside_id}" for c in ids[:8]) + (
                " ..." if len(ids) > 8 else ""
            )
        for name, rd in (("lan", self.lan), ("remote", self.wan)):
            if rd.desync:
                d[f"desync_{name}"] = rd.desync
        bad = self.counts.get("pptp_bad_message", 0)
        if bad:
            d["bad_messages"] = str(bad)
        return d

    def on_remove(self, entry: Entry, why: str) -> None:
        self._close(f"control-{why}")

    # --- persistence ------------------------------------------------------------------
    def export_state(self, ago: Ago, ref: Ref) -> Saved:
        """The connection's parser state and its calls, for ``vpnmasq.state``. A GRE entry
        refers back to its call by (this control's entry, inside Call ID)."""

        def msg(m: _Msg) -> Saved:
            return {
                "call": None if m.call is None else m.call.inside_id,
                "remote_id": m.remote_id,
                "opened": m.opened,
            }

        return {
            "helper": "pptp",
            "lan_role": self.lan_role,
            "session": self.session.value,
            "closed": self.closed,
            "lan": self.lan.export_state(),
            "wan": self.wan.export_state(),
            "msg": {"lan": msg(self._msg[True]), "wan": msg(self._msg[False])},
            "calls": [
                {
                    "lan_role": c.lan_role,
                    "inside_id": c.inside_id,
                    "outside_id": c.outside_id,
                    "state": c.state.value,
                    "created": ago(c.created),
                    "peer_id": c.peer_id,
                }
                for c in self.by_inside.values()
            ],
            "counts": dict(self.counts),
        }

    def import_state(self, data: Record, at: At) -> None:
        """Inverse of :meth:`export_state` (before any packet). Calls whose outside ID is taken
        are left out (counted). Raises KeyError/ValueError on bad data."""
        self.lan_role = _lan_role(data.as_str("lan_role"))
        self.session = SessionState(data.as_str("session"))
        self.closed = data.as_bool("closed")
        self.lan.import_state(data.as_rec("lan"))
        self.wan.import_state(data.as_rec("wan"))
        self.counts = {k: as_int(v) for k, v in data.as_rec("counts").items()}
        store = self.store
        if store is not None:
            for cdo in data.as_list("calls"):
                cd = as_rec(cdo)
                c_role = _lan_role(cd.as_str("lan_role"))
                state = CallState(cd.as_str("state"))
                inside_id, outside_id = cd.as_int("inside_id"), cd.as_int("outside_id")
                if state is CallState.ENDED or inside_id in self.by_inside:
                    continue
                if not store.pool.claim(self.remote_ip, outside_id):
                    self._count("pptp_restore_call_id_taken")
                    continue
                call = Call(
                    self, c_role, self.inside_ip, self.remote_ip, inside_id, outside_id, state,
                    at(cd.as_num("created")), cd.opt_int("peer_id"),
                )
                self.by_inside[inside_id] = call
                self.by_outside[outside_id] = call
                if call.peer_id is not None:
                    self.by_peer[call.peer_id] = call
        for key, from_lan in (("lan", True), ("wan", False)):
            md = data.as_rec("msg").as_rec(key)
            cid = md.opt_int("call")
            self._msg[from_lan] = _Msg(
                None if cid is None else self.by_inside.get(cid),
                md.opt_int("remote_id"),
                md.as_bool("opened"),
            )

    # --- per segment ------------------------------------------------------------------
    def _segment(self, ip: IPv4, payload_off: int, now: float, from_lan: bool) -> Verdict | None:
        self._now = now
        buf = ip.buf
        t = ip.ihl
        flags = buf[t + 13]
        seq = int.from_bytes(buf[t + 4 : t + 8], "big")
        rd, other = (self.lan, self.wan) if from_lan else (self.wan, self.lan)
        if flags & TCP_ACK:
            other.prune(int.from_bytes(buf[t + 8 : t + 12], "big"))
        data_seq = seq
        if flags & TCP_SYN:
            data_seq = (seq + 1) & _SEQ_MASK
            if self.closed and flags & TCP_RST == 0:
                self._reopen()
            if rd.pristine:
                rd.start(data_seq)
        n = ip.total_len - payload_off
        if n > 0:
            if not rd.started:
                self._count("pptp_midstream_pickup")
            if ip.more_fragments and not rd.passive:
                rd.lose_framing(self, "control segment split by IP fragmentation")
            data = bytes(buf[payload_off : payload_off + n])
            if not rd.segment(data_seq, data, self):
                return self.engine.drop(
                    DropReason.PPTP_OUT_OF_ORDER,
                    f"pptp control segment beyond a gap (seq {data_seq}, expected "
                    f"{rd.next_seq}); its sender will retransmit in order",
                    ip,
                )
            self._apply(ip, payload_off, n, data_seq, rd)
        if flags & TCP_RST:
            self._close("control-rst")
        elif flags & TCP_FIN:
            self._close("control-fin")
        return None

    def _apply(self, ip: IPv4, payload_off: int, n: int, seq: int, rd: StreamReader) -> None:
        rw = rd.rewrites(seq, n)
        if not rw:
            return
        buf = ip.buf
        t = ip.ihl
        end = ip.total_len
        coff = t + TCP_CSUM
        csum = (buf[coff] << 8) | buf[coff + 1]
        changed = 0
        for i, byte in rw:
            pos = payload_off + i
            if buf[pos] == byte:
                continue
            changed += 1
            w = pos - ((pos - t) & 1)  # start of its 16-bit word, counted from the TCP header
            old = (buf[w] << 8) | (buf[w + 1] if w + 1 < end else 0)
            buf[pos] = byte
            new = (buf[w] << 8) | (buf[w + 1] if w + 1 < end else 0)
            csum = update16(csum, old, new)
        buf[coff] = csum >> 8
        buf[coff + 1] = csum & 0xFF
        self._count("pptp_bytes_rewritten", changed)

    # --- ReaderSink -------------------------------------------------------------------
    def message_begins(self, reader: StreamReader) -> None:
        self._msg[reader.from_lan] = _Msg()

    def field(
        self, reader: StreamReader, which: Literal["own", "peer"], value: int, high_sent: bool
    ) -> int | None:
        if self.store is None:
            return None
        msg = self._msg[reader.from_lan]
        from_lan = reader.from_lan
        if (which == "own") != from_lan:
            # the remote's Call ID: never rewritten; learned from replies, and it finds the
            # call when it is the message's only Call ID (CCRQ/CDN in, ICCN/WEN/SLI out)
            msg.remote_id = value
            spec = reader.spec
            if msg.call is None and spec is not None and len(spec.fields) == 1:
                msg.call = self.by_peer.get(value)
            return None
        if from_lan:  # the LAN host's own ID on its way out: masquerade it
            call = self.by_inside.get(value)
            if call is None and reader.mtype in OPENS_CALL:
                call = self._open(value, high_sent, reader.mtype, reader)
                msg.opened = call is not None
                if call is None and self._refused:
                    self._refused = False
                    return REFUSED_CALL_ID
            if call is None:
                return None
            msg.call = call
            return call.outside_id
        call = self.by_outside.get(value)  # our outside ID coming back: restore it
        if call is None:
            return None  # counted in message_ready
        msg.call = call
        return call.inside_id

    def message_ready(self, reader: StreamReader) -> None:
        spec = reader.spec
        assert spec is not None
        t = reader.mtype
        ok = spec.result is None or reader.head[spec.result] == 1
        self._count("pptp_messages")
        st = SESSION_TRANSITIONS.get(t)
        if st is not None:
            expected, good, bad = st
            if self.session not in expected:
                self._count("pptp_unexpected_message")
            if not self.closed:
                self.session = good if ok else bad
            if t in ENDS_ALL_CALLS:
                self._end_all("stop-control-connection")
            return
        if self.session is not SessionState.ESTABLISHED:
            self._count("pptp_unexpected_message")
        ct = CALL_TRANSITIONS.get(t)
        msg = self._msg[reader.from_lan]
        call = msg.call
        if ct is None or self.store is None:
            return
        if call is None:
            if t not in (M.OUTGOING_CALL_REQUEST, M.INCOMING_CALL_REQUEST):
                self._count("pptp_unknown_call_id")
            return
        expected_c, good_c, bad_c = ct
        if not msg.opened and call.state not in expected_c:
            self._count("pptp_unexpected_message")
        if msg.remote_id is not None and t in (M.OUTGOING_CALL_REPLY, M.INCOMING_CALL_REPLY):
            self._set_peer(call, msg.remote_id)
        nxt = good_c if ok else bad_c
        if call.entry is not None and call.entry.live:
            self.store.engine.table.touch(call.entry, self._now)
        if nxt is CallState.ENDED:
            why = "call-disconnect" if t == M.CALL_DISCONNECT_NOTIFY else "call-refused"
            self.store.end_call(call, why)
        elif nxt is not None:
            call.state = nxt
            if call.entry is not None:
                self.store.engine.set_state(call.entry, nxt.value)

    def problem(self, reader: StreamReader, kind: str, detail: str) -> None:
        side = "LAN host" if reader.from_lan else "remote"
        if kind == "desync":
            self._count("pptp_desync")
        else:
            self._count("pptp_bad_message" if kind == "bad-message" else "pptp_straddle_unfixed")
        key = f"{kind}:{reader.from_lan}"
        if key not in self._noticed:  # once per connection and direction: no log floods
            self._noticed.add(key)
            self.engine.notice(
                "pptp",
                f"control {int_to_ip(self.inside_ip)} <-> {int_to_ip(self.remote_ip)}: "
                f"{side} sent {detail}"
                + ("; this direction is passed through unparsed from now on" if kind == "desync" else ""),
            )

    # --- calls ------------------------------------------------------------------------
    def _open(self, inside_id: int, high_sent: bool, mtype: int, reader: StreamReader) -> Call | None:
        assert self.store is not None
        if self.closed:
            return None
        if len(self.by_inside) >= MAX_CALLS_PER_CONTROL:
            self._count("pptp_call_limit")
            self.problem(reader, "bad-message", f"more than {MAX_CALLS_PER_CONTROL} calls")
            self._refused = True
            return None
        if sum(1 for c in self.by_inside.values() if c.entry is None) >= MAX_CALLS_WITHOUT_GRE:
            self._count("pptp_call_refused")
            self.problem(
                reader,
                "bad-message",
                f"a call while {MAX_CALLS_WITHOUT_GRE} calls already have no GRE mapping "
                f"(table or host limit); refused, Call ID {REFUSED_CALL_ID} sent instead",
            )
            self._refused = True
            return None
        ct = CALL_TRANSITIONS[mtype]
        state = ct[1] or CallState.OUT_REQUESTED
        # RFC 2637 lets either end of the TCP connection be the PNS: the message that
        # opens the call says which role the LAN host plays in it
        role: Literal["pns", "pac"] = "pns" if MESSAGES[mtype].sender == "pns" else "pac"
        self.lan_role = role
        call = self.store.open_call(self, inside_id, high_sent, state, self._now, role)
        if call is not None:
            self.by_inside[inside_id] = call
            self.by_outside[call.outside_id] = call
        else:
            self._refused = True  # no outside ID left
        return call

    def _set_peer(self, call: Call, peer_id: int) -> None:
        if call.peer_id == peer_id:
            return
        if call.peer_id is not None and self.by_peer.get(call.peer_id) is call:
            del self.by_peer[call.peer_id]
        self.by_peer[peer_id] = call
        assert self.store is not None
        self.store.bind_peer(call, peer_id)

    def forget(self, call: Call) -> None:
        """The store ended ``call``: drop it from this connection's indexes."""
        if self.by_inside.get(call.inside_id) is call:
            del self.by_inside[call.inside_id]
        if self.by_outside.get(call.outside_id) is call:
            del self.by_outside[call.outside_id]
        if call.peer_id is not None and self.by_peer.get(call.peer_id) is call:
            del self.by_peer[call.peer_id]
        for m in self._msg.values():
            if m.call is call:
                m.call = None

    def _end_all(self, why: str) -> None:
        if self.store is None:
            return
        for call in list(self.by_inside.values()):
            self.store.end_call(call, why)

    def _close(self, why: str) -> None:
        self._end_all(why)
        self.session = SessionState.CLOSED
        self.closed = True
        self.lan.passive = self.wan.passive = True

    def _reopen(self) -> None:
        """A new connection on the same address/port tuple after FIN/RST."""
        self.closed = False
        self.session = SessionState.IDLE
        self.lan = StreamReader(from_lan=True)
        self.wan = StreamReader(from_lan=False)

    # --- bookkeeping ------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n
        self.engine.count(name, n)


# ---------------------------------------------------------------------------- GRE
def _key_in(remote: int, outside_id: int) -> tuple[str, int, int]:
    """Inbound GRE carries our outside Call ID: (remote, outside ID) finds the call."""
    return ("pptp-i", remote, outside_id)


def _key_out(inside_ip: int, remote: int, peer_id: int) -> tuple[str, int, int, int]:
    """Outbound GRE carries the remote's Call ID: (LAN host, remote, its ID) finds the call."""
    return ("pptp-o", inside_ip, remote, peer_id)


class GreHelper(ProtoHelper):
    """IP protocol 47: enhanced GRE v1 (PPTP data) by Call ID, other GRE by address pair.

    Also the store of PPTP calls: control connections open and end calls here, so the
    outside Call ID pool and the GRE table entries have one owner.

    Enhanced GRE carries only the *receiver's* Call ID (RFC 2637 4.1). Outbound (LAN host ->
    remote) it is the remote's ID: the call is found by (LAN host, remote, that ID) and only
    the source address changes. Inbound it is our outside ID: found by (remote, outside ID),
    the destination and the Call ID are restored. GRE has no checksum (C=0): only the IP
    header checksum changes. Inbound GRE matching no call is dropped (``gre-unknown-call``),
    unless a ``[[forward]]`` gre rule applies and no tcp/1723 forward to the same host lets
    us track that server's calls ("forward-only": address-only to the forward). An existing
    call always wins over a forward.

    GRE v0 (and v1 when the pptp helper is off) is masqueraded by address pair, one LAN host
    per remote (like the engine's generic protocols; a second host gets ``generic-busy``).
    """

    kinds: tuple[str, ...] = ("gre", GRE_ADDR_KIND)

    def __init__(self, engine: EngineView) -> None:
        super().__init__(engine)
        #: the pptp helper is enabled too (wired by the registry): GRE v1 is tracked by Call ID
        self.pptp_enabled = False
        r = engine.config.call_id_range
        self.pool = CallIdPool(r.low, r.high, engine.rng)
        #: (remote, remote's Call ID) -> call entries, for ICMP errors about our outbound GRE
        self.by_peer: dict[tuple[int, int], list[Entry]] = {}
        self._noticed: set[str] = set()

    # --- the call store -----------------------------------------------------------------
    def open_call(
        self,
        control: PptpControl,
        inside_id: int,
        keep_high: bool,
        state: CallState,
        now: float,
        role: Literal["pns", "pac"] | None = None,
    ) -> Call | None:
        eng = self.engine
        remote = control.remote_ip
        out = self.pool.allocate(remote, inside_id, keep_high)
        if out is None:
            eng.count("pptp_call_ids_exhausted")
            self._notice_once(
                f"ids:{remote}",
                f"no outside PPTP Call ID left for calls to {int_to_ip(remote)} "
                f"(call of {int_to_ip(control.inside_ip)} refused: Call ID {REFUSED_CALL_ID} "
                "sent instead, no GRE)",
            )
            return None
        call = Call(
            control, role or control.lan_role, control.inside_ip, remote, inside_id, out, state,
            now,
        )
        e = Entry(
            PROTO_GRE, "gre", "gre", control.inside_ip, inside_id, remote, 0,
            eng.public_ip or 0, out, now,
        )
        e.ext = call
        e.state_name = state.value
        try:
            eng.table.add(e, now, (_key_in(remote, out),))
        except TableFull as exc:
            # the call keeps its outside ID (no clash) but has no data path
            eng.count("pptp_call_without_gre")
            self._notice_once(
                "table-full",
                f"{exc}: PPTP call of {int_to_ip(control.inside_ip)} to {int_to_ip(remote)} "
                "gets no GRE mapping",
            )
        else:
            call.entry = e
            eng.created(e, now)
        eng.count("pptp_calls")
        return call

    def bind_peer(self, call: Call, peer_id: int) -> None:
        """The remote told us its Call ID: outbound GRE can now be matched."""
        table = self.engine.table
        e = call.entry
        if call.peer_id is not None:
            self._unindex_peer(call)
            if e is not None:
                table.remove_key(e, _key_out(call.inside_ip, call.remote_ip, call.peer_id))
        call.peer_id = peer_id
        if e is not None and e.live:
            e.remote_port = peer_id
            table.add_key(e, _key_out(call.inside_ip, call.remote_ip, peer_id))
            self.by_peer.setdefault((call.remote_ip, peer_id), []).append(e)

    def end_call(self, call: Call, why: str) -> None:
        if call.state is CallState.ENDED:
            return
        e = call.entry
        if e is not None and e.live:
            self.engine.table.remove(e, why)  # -> on_remove -> _forget
        if call.live:  # no entry, or removed without reaching on_remove
            self._forget(call)

    def _forget(self, call: Call) -> None:
        call.state = CallState.ENDED
        if call.entry is not None:
            call.entry.state_name = CallState.ENDED.value
        self.pool.release(call.remote_ip, call.outside_id)
        self._unindex_peer(call)
        call.control.forget(call)

    def _unindex_peer(self, call: Call) -> None:
        if call.peer_id is None or call.entry is None:
            return
        k = (call.remote_ip, call.peer_id)
        lst = self.by_peer.get(k)
        if lst is not None:
            if call.entry in lst:
                lst.remove(call.entry)
            if not lst:
                del self.by_peer[k]

    # --- ProtoHelper ----------------------------------------------------------------------
    def outbound(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(4)
        buf = ip.buf
        ver = buf[off + 1] & 0x07
        if ver > 1:
            return self._not_pptp(ip, ver)
        if ver == 1 and self.pptp_enabled:
            ip.l4(GRE_MIN_V1)
            if int.from_bytes(buf[off : off + 4], "big") & GRE_V1_MASK != GRE_V1_VALUE:
                return self._not_pptp(ip, ver)
            cid = ip.u16(GRE_CALL_ID)
            e = self.engine.table.get(_key_out(ip.src, ip.dst, cid), now)
            if e is not None:
                return self._call_out(ip, e, now)
            a = self.engine.table.get(("go", PROTO_GRE, ip.src, ip.dst), now)
            if a is None:
                fwd = self._untracked_forward(ip.dst)
                if fwd is not None and ip_to_int(fwd.to) == ip.src:
                    return self._addr_out(ip, now, "forward")
            elif addr_mode(a) == "forward":
                return self._addr_out(ip, now, "forward")
            return self._unknown_call(ip, cid, "outbound")
        return self._addr_out(ip, now, "v0" if ver == 0 else "untracked")

    def inbound(self, ip: IPv4, now: float) -> Verdict:
        off = ip.l4(4)
        buf = ip.buf
        ver = buf[off + 1] & 0x07
        if ver > 1:
            return self._not_pptp(ip, ver)
        table = self.engine.table
        if ver == 1 and self.pptp_enabled:
            ip.l4(GRE_MIN_V1)
            if int.from_bytes(buf[off : off + 4], "big") & GRE_V1_MASK != GRE_V1_VALUE:
                return self._not_pptp(ip, ver)
            cid = ip.u16(GRE_CALL_ID)
            e = table.get(_key_in(ip.src, cid), now)
            if e is not None:
                call = e.ext
                if isinstance(call, Call) and call.peer_id is not None:
                    return self._call_in(ip, e, call, now)
                return self._unknown_call(ip, cid, "inbound (call not connected yet)")
            a = table.get(("gi", PROTO_GRE, ip.src), now)
            if a is not None and addr_mode(a) == "forward":
                return self._addr_deliver(ip, a, now)
            if a is None:
                fwd = self._untracked_forward(ip.src)
                if fwd is not None:
                    return self._addr_in_forward(ip, fwd, now)
            return self._unknown_call(ip, cid, "inbound")
        a = table.get(("gi", PROTO_GRE, ip.src), now)
        if a is not None:
            return self._addr_deliver(ip, a, now)
        fwd = self.engine.match_forward(PROTO_GRE, None, ip.src)
        if fwd is not None:
            return self._addr_in_forward(ip, fwd, now)
        v: Verdict = self.engine.drop(
            DropReason.NO_MAPPING, f"unsolicited GRE v{ver} from {int_to_ip(ip.src)}", ip
        )
        return v

    def icmp_embedded_inbound(self, inner: IPv4, now: float) -> Entry | None:
        """``inner`` is our outbound GRE as sent: public source, remote destination, the
        remote's Call ID. The call's LAN host if exactly one call matches."""
        b = inner.buf
        l4 = inner.ihl
        if len(b) < l4 + GRE_MIN_V1:
            return None
        table = self.engine.table
        ver = b[l4 + 1] & 0x07
        if ver == 1 and self.pptp_enabled:
            if int.from_bytes(b[l4 : l4 + 4], "big") & GRE_V1_MASK != GRE_V1_VALUE:
                return None
            cid = (b[l4 + GRE_CALL_ID] << 8) | b[l4 + GRE_CALL_ID + 1]
            live = [
                e for e in self.by_peer.get((inner.dst, cid), ()) if e.live and e.expires_at > now
            ]
            if len(live) == 1:
                return live[0]
            if len(live) > 1:
                self.engine.count("gre_icmp_ambiguous")
                return None
            a = table.get(("gi", PROTO_GRE, inner.dst), now)
            return a if a is not None and addr_mode(a) == "forward" else None
        if ver > 1:
            return None
        e: Entry | None = table.get(("gi", PROTO_GRE, inner.dst), now)
        return e

    def icmp_embedded_outbound(self, inner: IPv4, now: float) -> Entry | None:
        """Inbound GRE as delivered (remote -> LAN host, the LAN host's own Call ID) quoted in
        an ICMP error from the LAN side or the gateway itself: that host's call
        with that remote and Call ID. The calls are scanned (no index by inside Call ID):
        such errors are rare, and each follows a GRE packet that already cost a slow path."""
        b = inner.buf
        l4 = inner.ihl
        if len(b) < l4 + GRE_MIN_V1 or b[l4 + 1] & 0x07 != 1 or not self.pptp_enabled:
            return None
        if int.from_bytes(b[l4 : l4 + 4], "big") & GRE_V1_MASK != GRE_V1_VALUE:
            return None
        cid = (b[l4 + GRE_CALL_ID] << 8) | b[l4 + GRE_CALL_ID + 1]
        for (remote, _peer_id), entries in self.by_peer.items():
            if remote != inner.src:
                continue
            for e in entries:
                if e.inside_ip == inner.dst and e.inside_port == cid and e.live and e.expires_at > now:
                    return e
        return None

    def icmp_embedded_outbound_fix(self, inner: IPv4, entry: Entry) -> None:
        """The quoted Call ID back to the one the remote sent (our outside Call ID)."""
        if isinstance(entry.ext, Call) and entry.inside_port != entry.alias_port:
            inner.set_l4_u16(GRE_CALL_ID, entry.alias_port, None)  # GRE v1 has no checksum

    def detail(self, entry: Entry, now: float) -> dict[str, str]:
        c = entry.ext
        if isinstance(c, Call):
            server = c.remote_ip if c.lan_role == "pns" else c.inside_ip
            pac = c.pac_call_id
            return {
                "lan_role": c.lan_role,
                "call_id_inside": str(c.inside_id),
                "call_id_outside": str(c.outside_id),
                "peer_call_id": "-" if c.peer_id is None else str(c.peer_id),
                "pac_call_id": "-" if pac is None else str(pac),
                "server": int_to_ip(server),
                "call_state": c.state.value,
                "pkts_out": str(entry.pkts_out),
                "pkts_in": str(entry.pkts_in),
            }
        return {"mode": "address-only", "gre": addr_mode(entry)}

    def on_remove(self, entry: Entry, why: str) -> None:
        c = entry.ext
        if isinstance(c, Call) and c.state is not CallState.ENDED:
            self._forget(c)

    # --- persistence ------------------------------------------------------------------
    def export_entry(self, entry: Entry, ago: Ago, ref: Ref) -> Saved | None:
        """A call's GRE entry refers to its control connection's entry (saved before it);
        an address-only entry saves its mode. None: not savable (control not saved)."""
        c = entry.ext
        if isinstance(c, Call):
            control = ref(c.control)
            if control is None or not c.live:
                return None
            return {"call": {"control": control, "inside_id": c.inside_id}}
        return {"mode": addr_mode(entry)}

    def import_entry(self, entry: Entry, data: Record, at: At, resolve: Resolve) -> bool:
        """Link a restored GRE entry to its call (restored with the control connection)."""
        try:
            if "mode" in data:
                entry.ext = GreAddr(data.as_str("mode"))
                return entry.kind == GRE_ADDR_KIND
            cd = data.as_rec("call")
            owner = resolve(cd.as_int("control"))
            inside_id = cd.as_int("inside_id")
        except (KeyError, ValueError):
            return False
        control = None if owner is None else owner.alg
        if entry.kind != "gre" or not isinstance(control, PptpControl):
            return False
        call = control.by_inside.get(inside_id)
        if call is None or call.entry is not None or call.outside_id != entry.alias_port:
            return False
        call.entry = entry
        entry.ext = call
        entry.state_name = call.state.value
        if call.peer_id is not None:
            self.by_peer.setdefault((call.remote_ip, call.peer_id), []).append(entry)
        return True

    # --- paths ------------------------------------------------------------------------
    def _call_out(self, ip: IPv4, e: Entry, now: float) -> Verdict:
        self.engine.table.touch(e, now)
        pub = self.engine.public_ip
        assert pub is not None  # the engine drops outbound packets before it has one
        ip.set_src(pub)
        e.pkts_out += 1
        e.last_out = now
        e.bytes_out += ip.total_len
        return accept(ip.buf)

    def _call_in(self, ip: IPv4, e: Entry, call: Call, now: float) -> Verdict:
        self.engine.table.touch(e, now)
        ip.set_dst(call.inside_ip)
        ip.set_l4_u16(GRE_CALL_ID, call.inside_id, None)  # GRE v1 has no checksum
        e.pkts_in += 1
        e.last_in = now
        e.bytes_in += ip.total_len
        return accept(ip.buf)

    def _addr_out(self, ip: IPv4, now: float, mode: str) -> Verdict:
        eng = self.engine
        table = eng.table
        e = table.get(("go", PROTO_GRE, ip.src, ip.dst), now)
        if e is None:
            other = table.get(("gi", PROTO_GRE, ip.dst), now)
            if other is not None:
                busy: Verdict = eng.drop(
                    DropReason.GENERIC_BUSY,
                    f"GRE to {int_to_ip(ip.dst)} is in use by {int_to_ip(other.inside_ip)}",
                    ip,
                )
                return busy
            e = Entry(
                PROTO_GRE, GRE_ADDR_KIND, "gre" if mode == "forward" else "generic",
                ip.src, 0, ip.dst, 0, eng.public_ip or 0, 0, now,
            )
            e.ext = GreAddr(mode)
            v: Verdict | None = eng.add_entry(
                e, now, (("go", PROTO_GRE, ip.src, ip.dst), ("gi", PROTO_GRE, ip.dst))
            )
            if v is not None:
                return v
        else:
            table.touch(e, now)
        pub = eng.public_ip
        assert pub is not None  # the engine drops outbound packets before it has one
        ip.set_src(pub)
        e.pkts_out += 1
        e.last_out = now
        e.bytes_out += ip.total_len
        return accept(ip.buf)

    def _addr_in_forward(self, ip: IPv4, fwd: Forward, now: float) -> Verdict:
        eng = self.engine
        to = ip_to_int(fwd.to)
        e = Entry(PROTO_GRE, GRE_ADDR_KIND, "gre", to, 0, ip.src, 0, eng.public_ip or 0, 0, now)
        e.ext = GreAddr("forward")
        v: Verdict | None = eng.add_entry(
            e, now, (("go", PROTO_GRE, to, ip.src), ("gi", PROTO_GRE, ip.src))
        )
        if v is not None:
            return v
        return self._addr_deliver(ip, e, now)

    def _addr_deliver(self, ip: IPv4, e: Entry, now: float) -> Verdict:
        self.engine.table.touch(e, now)
        ip.set_dst(e.inside_ip)
        e.pkts_in += 1
        e.last_in = now
        e.bytes_in += ip.total_len
        return accept(ip.buf)

    def _untracked_forward(self, remote: int) -> Forward | None:
        """A gre forward that applies to ``remote`` and whose server's control connection we
        do not track (no tcp/1723 forward to the same host): GRE goes there by address."""
        eng = self.engine
        fwd: Forward | None = eng.match_forward(PROTO_GRE, None, remote)
        if fwd is None:
            return None
        if self.pptp_enabled:
            tcp: Forward | None = eng.match_forward(PROTO_TCP, PPTP_PORT, remote)
            if tcp is not None and tcp.to == fwd.to:
                return None
        return fwd

    def _unknown_call(self, ip: IPv4, cid: int, where: str) -> Verdict:
        v: Verdict = self.engine.drop(
            DropReason.GRE_UNKNOWN_CALL,
            f"PPTP GRE {where} with Call ID {cid}: no such call",
            ip,
        )
        return v

    def _not_pptp(self, ip: IPv4, ver: int) -> Verdict:
        v: Verdict = self.engine.drop(
            DropReason.GRE_NOT_PPTP,
            f"GRE version {ver} that is not PPTP's enhanced GRE (K, v1, protocol 0x880B)",
            ip,
        )
        return v

    def _notice_once(self, key: str, message: str) -> None:
        if key not in self._noticed:
            self._noticed.add(key)
            self.engine.notice("pptp", message)


# ---------------------------------------------------------------------------- specs
class PptpAlgFactory(TcpAlgFactory):
    """``factory(engine)`` of the pptp spec: ``attach`` gives each TCP 1723 session its ALG."""


    def __init__(self, engine: EngineView) -> None:
        super().__init__(engine)
        #: the GRE helper, the call store (wired by the registry)
        self.gre: GreHelper | None = None
        self._warned = False

    def attach(self, entry: Entry, now: float, server_inside: bool = False) -> PptpControl:
        store = self.gre
        if store is None:
            if not self._warned:
                self._warned = True
                self.engine.notice(
                    "pptp",
                    "the pptp helper runs without the gre helper: control messages are "
                    "checked but Call IDs are not translated (one client per server only)",
                )
        return PptpControl(self.engine, store, entry, now, server_inside)

    def restore_alg(self, entry: Entry, data: Record, at: At) -> PptpControl | None:
        """A control connection's ALG from ``vpnmasq.state``; None if the record is bad."""
        ctrl = self.attach(entry, at(0.0), server_inside=data.get("lan_role") == "pac")
        try:
            ctrl.import_state(data, at)
        except (KeyError, TypeError, ValueError, AttributeError):
            if ctrl.store is not None:  # give back the outside IDs taken so far
                for call in list(ctrl.by_inside.values()):
                    ctrl.store.pool.release(call.remote_ip, call.outside_id)
            return None
        return ctrl


PPTP_SPEC = HelperSpec(
    "pptp",
    "tcp-alg",
    PROTO_TCP,
    PPTP_PORT,
    PptpAlgFactory,
    "PPTP control connections (TCP 1723): Call ID translation for many clients per server",
)
GRE_SPEC = HelperSpec(
    "gre",
    "proto",
    PROTO_GRE,
    None,
    GreHelper,
    "GRE (IP 47): PPTP data by Call ID, other GRE by address pair",
)
SPECS = (PPTP_SPEC, GRE_SPEC)
