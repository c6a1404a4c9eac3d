"""GRE (IP protocol 47): PPTP's enhanced GRE v1 by Call ID, any other GRE by address pair.

Enhanced GRE carries only the receiver's Call ID (RFC 2637 4.1): outbound the remote's (the
call is found by LAN host, remote and that ID; only the source changes), inbound our outside
ID (found by remote and outside ID; destination and Call ID restored). Calls live in the
:class:`.control.CallStore`. GRE v0, and v1 with the pptp helper off, is masqueraded by
address pair, one LAN host per remote. Known limit: inbound GRE for no known call is dropped
unless a ``[[forward]]`` of GRE applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpnmasq.conntrack.record import Record, Saved
from vpnmasq.conntrack.table import Entry, EntryExt
from vpnmasq.helpers.base import (
    Ago,
    At,
    EngineView,
    ProtoHelper,
    Ref,
    Resolve,
    deliver_in,
    send_out,
)
from vpnmasq.helpers.pptp.control import Call, CallStore, PptpControl, key_in, key_out
from vpnmasq.helpers.pptp.wire import CallState
from vpnmasq.packet.ipv4 import PROTO_GRE, PROTO_TCP, IPv4, int_to_ip, ip_to_int
from vpnmasq.packet.l4 import GRE_CALL_ID, GRE_MIN_V1, GRE_V1_MASK, GRE_V1_VALUE, PPTP_PORT
from vpnmasq.verdict import DropReason, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.config import Forward

GRE_ADDR_KIND = "gre-addr"


@dataclass(frozen=True, slots=True)
class GreAddr(EntryExt):
    """Helper state of an address-only GRE entry (kind ``gre-addr``): why it is one."""

    mode: str  # "v0" | "untracked" (pptp helper off) | "forward"


def addr_mode(e: Entry) -> str:
    """The mode of an address-only GRE entry; "" for any other entry."""
    a = e.ext
    return a.mode if isinstance(a, GreAddr) else ""



class GreHelper(ProtoHelper):
    """IP protocol 47: enhanced GRE v1 (PPTP data) by Call ID, other GRE by address pair.

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
        #: the PPTP calls (their control connections open and end them there)
        self.calls = CallStore(engine)

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
            e = self.engine.table.get(key_out(ip.src, ip.dst, cid), now)
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
            e = table.get(key_in(ip.src, cid), now)
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
                e for e in self.calls.by_peer.get((inner.dst, cid), ()) if e.live and e.expires_at > now
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
        for (remote, _peer_id), entries in self.calls.by_peer.items():
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
            self.calls.forget(c)

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
            self.calls.by_peer.setdefault((call.remote_ip, call.peer_id), []).append(entry)
        return True

    # --- paths ------------------------------------------------------------------------
    def _call_out(self, ip: IPv4, e: Entry, now: float) -> Verdict:
        self.engine.table.touch(e, now)
        return send_out(self.engine, ip, e, now)

    def _call_in(self, ip: IPv4, e: Entry, call: Call, now: float) -> Verdict:
        self.engine.table.touch(e, now)
        ip.set_l4_u16(GRE_CALL_ID, call.inside_id, None)  # GRE v1 has no checksum
        return deliver_in(ip, e, now)

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
        return send_out(eng, ip, e, now)

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
        return deliver_in(ip, e, now)

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

