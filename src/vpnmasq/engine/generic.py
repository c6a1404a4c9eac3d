"""Any other IP protocol: address-only NAT, one LAN host per (protocol, remote).

The translator of the dispatch table for protocols that have neither a built-in translator
nor a helper. Known limit: a second LAN host talking the same protocol to the same remote is
refused (``generic-protocol-remote-in-use``): without ports nothing tells their replies apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vpnmasq.conntrack.table import Entry
from vpnmasq.helpers.base import deliver_in, send_out
from vpnmasq.packet.ipv4 import IPv4, int_to_ip
from vpnmasq.verdict import DropReason, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.engine.core import Engine


class Generic:
    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.table = eng.table

    def outbound(self, ip: IPv4, now: float) -> Verdict:
        eng, p = self.eng, ip.proto
        e = self.table.get(("go", p, ip.src, ip.dst), now)
        if e is None:
            other = self.table.get(("gi", p, ip.dst), now)
            if other is not None:
                return eng.drop(
                    DropReason.GENERIC_BUSY,
                    f"protocol {p} to {int_to_ip(ip.dst)} is in use by {int_to_ip(other.inside_ip)}",
                    ip,
                )
            e = Entry(p, "generic", "generic", ip.src, 0, ip.dst, 0, eng.public_ip or 0, 0, now)
            v = eng.add_entry(e, now, (("go", p, ip.src, ip.dst), ("gi", p, ip.dst)))
            if v is not None:
                return v
        else:
            self.table.touch(e, now)
        return send_out(eng, ip, e, now)

    def inbound(self, ip: IPv4, now: float) -> Verdict:
        e = self.table.get(("gi", ip.proto, ip.src), now)
        if e is None:
            return self.eng.drop(
                DropReason.NO_MAPPING,
                f"unsolicited protocol {ip.proto} from {int_to_ip(ip.src)}",
                ip,
            )
        self.table.touch(e, now)
        return deliver_in(ip, e, now)
