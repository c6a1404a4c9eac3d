"""Policy around the translators: which addresses are ours, how fast a host may open
mappings, and which unclaimed VPN traffic goes to the gateway's own endpoint.

Owns the membership tests (``inside_networks``, ``exempt_networks``, ``[[route]]``s), the
per-host new-mapping token buckets (``limits.max_new_per_host_per_second``) and the
``local_vpn`` policy. Pure; the engine asks, per packet.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

from vpnmasq.config import Config
from vpnmasq.packet.ipv4 import PROTO_ESP, PROTO_GRE, PROTO_UDP, IPv4
from vpnmasq.packet.l4 import ISAKMP_PORT, NATT_PORT
from vpnmasq.verdict import DropReason

#: limits.max_new_per_host_per_second is a token bucket per inside host; it holds this many
#: seconds' worth of tokens (at least one), so a burst such as a web page opening its
#: connections at once passes while a sustained flood is held to the rate.
NEW_MAPPING_BURST_S = 1.0
#: Token buckets kept at most (least recently used dropped first; a dropped bucket is simply
#: full again). Bounds the memory a LAN host forging many inside source addresses can take.
MAX_RATE_BUCKETS = 65536
#: UDP ports of IKE and NAT-T: their inbound packets always take the slow path (helpers,
#: local VPN)
IKE_UDP_PORTS = frozenset({ISAKMP_PORT, NATT_PORT})
#: Drops that mean "nobody on the LAN wants this inbound VPN packet": with ``local_vpn`` it
#: goes to the gateway's own VPN endpoint instead (see ``Engine.drop``).
LOCAL_DELIVERY_REASONS = frozenset(
    {
        DropReason.NO_MAPPING,
        DropReason.FILTERED,
        DropReason.ESP_UNASSOCIATED,
        DropReason.GRE_UNKNOWN_CALL,
        DropReason.GRE_NOT_PPTP,
        DropReason.ISAKMP_UNKNOWN,
    }
)
#: Local VPN consumer kinds (``Engine.set_local_consumers``): IKE on UDP 500/4500 (NAT-T
#: ESP-in-UDP included), ESP (protocol 50), GRE (protocol 47).
LOCAL_VPN_KINDS = ("ike", "esp", "gre")


def net(n: str) -> tuple[int, int]:
    """(network, mask) of a CIDR string."""
    nw = ipaddress.IPv4Network(n, strict=False)
    return int(nw.network_address), int(nw.netmask)


def _member(nets: list[tuple[int, int]], addr: int) -> bool:
    for nw, mask in nets:
        if addr & mask == nw:
            return True
    return False


class Networks:
    """inside_networks, exempt_networks and [[route]] networks."""

    def __init__(self, config: Config) -> None:
        self.inside = [net(n) for n in config.inside_networks]
        self.exempt = [net(n) for n in config.exempt_networks]
        self.routed = [net(r.network) for r in config.routes]

    def is_inside(self, addr: int) -> bool:
        return _member(self.inside, addr)

    def is_exempt(self, addr: int) -> bool:
        return _member(self.exempt, addr)

    def is_routed(self, addr: int) -> bool:
        """``addr`` is in a [[route]] network (behind a LAN VPN router): never masqueraded."""
        return _member(self.routed, addr)


class NewMappingRate:
    """limits.max_new_per_host_per_second: a token bucket per inside host."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, self.rate * NEW_MAPPING_BURST_S)
        #: host -> (tokens, time of the last refill)
        self.buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()

    def has_token(self, host: int, now: float) -> bool:
        """Refill ``host``'s token bucket up to ``now``; True if a token is available."""
        b = self.buckets.get(host)
        if b is None:
            tokens = self.burst
            if len(self.buckets) >= MAX_RATE_BUCKETS:
                self.buckets.popitem(last=False)
        else:
            tokens = min(self.burst, b[0] + max(0.0, now - b[1]) * self.rate)
            self.buckets.move_to_end(host)
        self.buckets[host] = (tokens, max(now, b[1]) if b is not None else now)
        return tokens >= 1.0

    def spend(self, host: int) -> None:
        tokens, at = self.buckets[host]
        self.buckets[host] = (tokens - 1.0, at)


class LocalVpn:
    """config local_vpn: which unclaimed inbound VPN traffic the gateway takes itself."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.consumers: frozenset[str] = frozenset()
        #: some kind is delivered locally (a cheap test per packet)
        self.any = False
        self._sync()

    def set_consumers(self, kinds: Iterable[str]) -> None:
        kinds = frozenset(kinds)
        unknown = set(kinds) - set(LOCAL_VPN_KINDS)
        if unknown:
            raise ValueError(f"unknown local VPN kinds {sorted(unknown)}; known: {LOCAL_VPN_KINDS}")
        self.consumers = kinds
        self._sync()

    def delivers(self, kind: str) -> bool:
        """Whether unclaimed inbound traffic of ``kind`` goes to the gateway itself."""
        if self.policy == "always":
            return True
        return self.policy == "auto" and kind in self.consumers

    def _sync(self) -> None:
        self.any = any(self.delivers(k) for k in LOCAL_VPN_KINDS)

    def kind_of(self, ip: IPv4) -> str | None:
        """The local-VPN kind of an inbound packet to the public address, if it is enabled."""
        p = ip.proto
        if p == PROTO_ESP:
            kind = "esp"
        elif p == PROTO_GRE:
            kind = "gre"
        elif p == PROTO_UDP and ip.frag_offset == 0 and ip.l4_len >= 4:
            if ip.u16(2) not in IKE_UDP_PORTS:
                return None
            kind = "ike"
        else:
            return None
        return kind if self.delivers(kind) else None
