"""TCP session tracking and the MSS clamp, for the NAPT translator.

Owns the TCP states of an entry (``Entry.state``: SYN_SENT .. CLOSED, moving its timeout
class), the window checks that keep blind RSTs and FINs from ending a mapping (RFC 5382,
RFC 5961 spirit), and lowering the MSS option of SYNs (``mss_clamp``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vpnmasq.conntrack.table import Entry
from vpnmasq.packet.checksum import update16
from vpnmasq.packet.ipv4 import IPv4
from vpnmasq.packet.l4 import TCP_CSUM, TCP_FIN, TCP_MIN, TCP_RST, TCP_SYN

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.engine.core import Engine

# TCP session states
TCP_SYN_SENT = 1
TCP_ESTABLISHED = 2
TCP_FIN_WAIT = 3
TCP_CLOSING = 4
TCP_CLOSED = 5
TCP_STATE_NAMES = {
    TCP_SYN_SENT: "SYN_SENT",
    TCP_ESTABLISHED: "ESTABLISHED",
    TCP_FIN_WAIT: "FIN_WAIT",
    TCP_CLOSING: "CLOSING",
    TCP_CLOSED: "CLOSED",
}
F_SYN_OUT = 1
F_SYN_IN = 2
F_FIN_OUT = 4
F_FIN_IN = 8
TCP_OPT_MSS = 2
#: An inbound RST is believed only if its sequence number lies this close after the last
#: ACK the inside host sent (RFC 5382 / RFC 5961 spirit: blind RSTs must not kill mappings).
RST_WINDOW = 1 << 20


def track(eng: Engine, e: Entry, tflags: int, outbound: bool, now: float) -> None:
    """Move ``e``'s state for a segment with flags ``tflags``; its timeout class follows."""
    st = e.state
    if tflags & TCP_RST:
        e.state = TCP_CLOSED
    else:
        if tflags & TCP_SYN:
            e.flags |= F_SYN_OUT if outbound else F_SYN_IN
        if tflags & TCP_FIN:
            e.flags |= F_FIN_OUT if outbound else F_FIN_IN
        f = e.flags
        if f & F_FIN_OUT and f & F_FIN_IN:
            e.state = TCP_CLOSING
        elif f & (F_FIN_OUT | F_FIN_IN):
            e.state = TCP_FIN_WAIT
        elif (f & F_SYN_OUT and f & F_SYN_IN) or (
            st == TCP_SYN_SENT and not f & (F_SYN_OUT | F_SYN_IN) and not outbound
        ):
            # both SYNs seen, or a mid-stream pickup answered by the remote
            e.state = TCP_ESTABLISHED
        elif st == 0:
            e.state = TCP_SYN_SENT
    table = eng.table
    if e.state != st:
        eng.set_state(e, TCP_STATE_NAMES[e.state])
        if e.state == TCP_ESTABLISHED:
            tclass = "pptp_control" if e.alg is not None else "tcp_established"
        elif e.state == TCP_CLOSED:
            tclass = "tcp_closed"
        else:
            tclass = "tcp_transitory"
        table.set_class(e, tclass, now)
    else:
        table.touch(e, now)


def blind(e: Entry, tflags: int, seq: int) -> str | None:
    """An inbound RST or FIN that is not near the last ACK the inside host sent: the name
    of its counter (it is dropped), else None. A RST is believed only just after that ACK;
    a FIN either side of it (a retransmitted FIN, or data + FIN, lies just before it)."""
    if e.last_ack_out < 0:
        return None
    ahead = (seq - e.last_ack_out) % (1 << 32)
    if tflags & TCP_RST:
        return "tcp_rst_out_of_window" if ahead >= RST_WINDOW else None
    if tflags & TCP_FIN and ahead >= RST_WINDOW and (1 << 32) - ahead > RST_WINDOW:
        return "tcp_fin_out_of_window"
    return None


def clamp_mss(ip: IPv4, off: int, mss: int) -> bool:
    """Lower the MSS option of a TCP SYN at ``off`` to ``mss`` (RFC 1624 update of the TCP
    checksum; a field at an odd offset is summed byte-swapped). True if changed."""
    buf = ip.buf
    doff = (buf[off + 12] >> 4) * 4
    end = min(off + doff, ip.total_len)
    i = off + TCP_MIN
    while i < end:
        kind = buf[i]
        if kind == 0:  # end of option list
            return False
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= end or buf[i + 1] < 2 or i + buf[i + 1] > end:
            return False  # malformed options: leave them alone
        if kind == TCP_OPT_MSS and buf[i + 1] == 4:
            old = (buf[i + 2] << 8) | buf[i + 3]
            if old <= mss:
                return False
            new = mss
            buf[i + 2] = new >> 8
            buf[i + 3] = new & 0xFF
            c = off + TCP_CSUM
            csum = (buf[c] << 8) | buf[c + 1]
            if (i + 2 - off) & 1:  # odd offset within the segment
                old = ((old & 0xFF) << 8) | (old >> 8)
                new = ((new & 0xFF) << 8) | (new >> 8)
            csum = update16(csum, old, new)
            buf[c] = csum >> 8
            buf[c + 1] = csum & 0xFF
            return True
        i += buf[i + 1]
    return False
