"""AH (IP protocol 51) and Check Point FWZ encapsulation: refused, with the reason, once per flow.

AH's integrity check covers the IP addresses (RFC 4302 3.3.3.1), so no NAT can rewrite them
(HOWTO 2.2, 6.1). FWZ encapsulation mode likewise protects the whole IP packet (HOWTO 4.6);
it is carried as IP protocol 94 (the IANA "IPIP" number; Check Point documents FWZ
encapsulation as "IP protocol 94", see README). Hosts in ``exempt_networks`` (registered
addresses) are routed without masquerade, so AH works for them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING

from vpnmasq.helpers.base import EngineView, HelperSpec, ProtoHelper
from vpnmasq.packet.ipv4 import PROTO_AH, PROTO_FWZ, IPv4, int_to_ip
from vpnmasq.verdict import DropReason, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.conntrack.table import Entry

#: remember this many reported flows so each is explained once, not per packet
REPORTED_MAX = 4096

AH_WHY = (
    "AH (IP protocol 51) cannot be masqueraded: its integrity check covers the IP addresses "
    "(RFC 4302), so the remote would discard every rewritten packet. Use ESP (tunnel mode, "
    "ideally NAT-T), or give this host a registered address (exempt_networks)."
)
FWZ_WHY = (
    "Check Point FWZ encapsulation (IP protocol 94) cannot be masqueraded: it protects the "
    "whole IP packet like AH. Configure the VPN for IKE/IPsec mode instead."
)


class Unmasqueradable(ProtoHelper):
    def __init__(self, engine: EngineView, proto: int, reason: DropReason, why: str) -> None:
        super().__init__(engine)
        self.proto = proto
        self.reason = reason
        self.why = why
        self.reported: OrderedDict[tuple[int, int], None] = OrderedDict()

    def _refuse(self, ip: IPv4, who: int, remote: int, direction: str) -> Verdict:
        key = (who, remote)
        first = key not in self.reported
        if first:
            self.reported[key] = None
            if len(self.reported) > REPORTED_MAX:
                self.reported.popitem(last=False)
            self.engine.notice(
                self.reason.value,
                f"{direction} {int_to_ip(who)} <-> {int_to_ip(remote)}: {self.why}",
            )
        v: Verdict = self.engine.drop(self.reason, self.why, ip)
        if first and direction == "LAN host" and self.engine.config.ah_icmp_prohibited:
            # once per flow, so the host learns why instead of timing out (RFC 5508 REQ-8)
            v = replace(v, icmp_back=(3, 13))
        return v

    def outbound(self, ip: IPv4, now: float) -> Verdict:
        return self._refuse(ip, ip.src, ip.dst, "LAN host")

    def inbound(self, ip: IPv4, now: float) -> Verdict:
        return self._refuse(ip, ip.dst, ip.src, "remote")

    def icmp_embedded_inbound(self, inner: IPv4, now: float) -> Entry | None:
        return None

    def detail(self, entry: Entry, now: float) -> dict[str, str]:
        return {}

    def on_remove(self, entry: Entry, why: str) -> None:
        return None


AH_SPEC = HelperSpec(
    "ah",
    "proto",
    PROTO_AH,
    None,
    lambda eng: Unmasqueradable(eng, PROTO_AH, DropReason.AH_UNSUPPORTED, AH_WHY),
    "refuse AH with a clear reason (it cannot be masqueraded)",
)
FWZ_SPEC = HelperSpec(
    "fwz",
    "proto",
    PROTO_FWZ,
    None,
    lambda eng: Unmasqueradable(eng, PROTO_FWZ, DropReason.FWZ_UNSUPPORTED, FWZ_WHY),
    "refuse Check Point FWZ encapsulation (IP protocol 94) with a clear reason",
)
