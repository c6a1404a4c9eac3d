"""The PPTP control-connection ALG (TCP 1723) and the call store.

:class:`PptpControl` is attached to each control connection (``entry.alg``): it parses both
directions with :class:`.wire.StreamReader`, rewrites the LAN host's Call IDs (its own field
going out, the peer field coming in) and moves calls through ``CALL_TRANSITIONS``.
:class:`CallStore` owns the calls of every connection: their outside IDs
(:class:`.callids.CallIdPool`) and their GRE table entries (``kind "gre"``, found by
:mod:`.gre`). Known limit: without the gre helper, Call IDs are checked but not translated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vpnmasq.conntrack.record import Record, Saved, as_int, as_rec
from vpnmasq.conntrack.table import Entry, EntryAlg, EntryExt, TableFull
from vpnmasq.helpers.base import Ago, At, EngineView, Ref, TcpAlgFactory
from vpnmasq.helpers.pptp.callids import CallIdPool
from vpnmasq.helpers.pptp.wire import (
    _SEQ_MASK,
    CALL_TRANSITIONS,
    ENDS_ALL_CALLS,
    MAX_CALLS_PER_CONTROL,
    MAX_CALLS_WITHOUT_GRE,
    MESSAGES,
    OPENS_CALL,
    REFUSED_CALL_ID,
    SESSION_TRANSITIONS,
    CallState,
    M,
    SessionState,
    StreamReader,
)
from vpnmasq.packet.checksum import update16
from vpnmasq.packet.ipv4 import PROTO_GRE, IPv4, int_to_ip
from vpnmasq.packet.l4 import TCP_ACK, TCP_CSUM, TCP_FIN, TCP_RST, TCP_SYN
from vpnmasq.verdict import DropReason, Verdict


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


@dataclass(slots=True)
class _Msg:
    """What the control connection learned so far about the message being parsed."""

    call: Call | None = None
    remote_id: int | None = None
    opened: bool = False


class PptpControl(EntryAlg):
    """The ALG of one PPTP control connection (a TCP 1723 entry's ``alg``)."""

    def __init__(
        self, engine: EngineView, store: CallStore | None, entry: Entry, now: float, server_inside: bool
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


def key_in(remote: int, outside_id: int) -> tuple[str, int, int]:
    """Inbound GRE carries our outside Call ID: (remote, outside ID) finds the call."""
    return ("pptp-i", remote, outside_id)


def key_out(inside_ip: int, remote: int, peer_id: int) -> tuple[str, int, int, int]:
    """Outbound GRE carries the remote's Call ID: (LAN host, remote, its ID) finds the call."""
    return ("pptp-o", inside_ip, remote, peer_id)



class CallStore:
    """The PPTP calls of every control connection: outside Call IDs and GRE entries, one owner."""

    def __init__(self, engine: EngineView) -> None:
        self.engine = engine
        r = engine.config.call_id_range
        self.pool = CallIdPool(r.low, r.high, engine.rng)
        #: (remote, remote's Call ID) -> call entries, for ICMP errors about our outbound GRE
        self.by_peer: dict[tuple[int, int], list[Entry]] = {}
        self._noticed: set[str] = set()

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
            eng.table.add(e, now, (key_in(remote, out),))
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
                table.remove_key(e, key_out(call.inside_ip, call.remote_ip, call.peer_id))
        call.peer_id = peer_id
        if e is not None and e.live:
            e.remote_port = peer_id
            table.add_key(e, key_out(call.inside_ip, call.remote_ip, peer_id))
            self.by_peer.setdefault((call.remote_ip, peer_id), []).append(e)

    def end_call(self, call: Call, why: str) -> None:
        if call.state is CallState.ENDED:
            return
        e = call.entry
        if e is not None and e.live:
            self.engine.table.remove(e, why)  # -> GreHelper.on_remove -> forget
        if call.live:  # no entry, or removed without reaching on_remove
            self.forget(call)

    def forget(self, call: Call) -> None:
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

    def _notice_once(self, key: str, message: str) -> None:
        if key not in self._noticed:
            self._noticed.add(key)
            self.engine.notice("pptp", message)



class PptpAlgFactory(TcpAlgFactory):
    """``factory(engine)`` of the pptp spec: ``attach`` gives each TCP 1723 session its ALG."""


    def __init__(self, engine: EngineView) -> None:
        super().__init__(engine)
        #: the call store of the GRE helper (wired by the registry)
        self.calls: CallStore | None = None
        self._warned = False

    def attach(self, entry: Entry, now: float, server_inside: bool = False) -> PptpControl:
        store = self.calls
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


