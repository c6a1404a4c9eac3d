"""The configuration's schema: frozen dataclasses (Config and its tables), their policies
and the limits and defaults they share with the rest of vpnmasq. No parsing, no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["hybrid", "userspace"]
Filtering = Literal["endpoint-independent", "address-dependent", "address-port-dependent"]
AddressChangePolicy = Literal["flush", "rewrite"]
AmbiguousIkePolicy = Literal["drop", "most-recent"]
LocalVpnPolicy = Literal["auto", "always", "never"]


class ConfigError(ValueError):
    """Our caller's fault: a bad config file or value. Names the key and line."""

    def __init__(self, message: str, *, key: str | None = None, line: int | None = None) -> None:
        where = ""
        if key is not None:
            where += f"{key}: "
        if line is not None:
            where = f"line {line}: " + where
        super().__init__(where + message)
        self.key = key
        self.line = line


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Idle timeouts in seconds. Defaults meet RFC 4787/5382/5508 and the HOWTO (6.x, 5.7)."""

    udp: float = 300.0  # RFC 4787 REQ-5: MUST >= 120 s, RECOMMENDED >= 300 s
    tcp_established: float = 7440.0  # RFC 5382 REQ-5: >= 2 h 4 min
    tcp_transitory: float = 240.0  # RFC 5382 REQ-5: >= 4 min (SYN sent, FIN seen)
    tcp_closed: float = 10.0  # after an in-window RST (libalias TCP_EXPIRE_DEAD)
    icmp: float = 60.0  # RFC 5508 REQ-1a: >= 60 s
    generic: float = 600.0  # other IP protocols by address pair (Linux generic timeout)
    fragment: float = 30.0  # how long to wait for the first fragment of a datagram
    isakmp: float = 14400.0  # >= typical IKE SA lifetime (HOWTO 5.7: hours)
    esp: float = 4200.0  # child SA lifetime 1 h plus margin
    esp_pending: float = 2.0  # pending ESP init yields its turn after this (HOWTO 6.2 fix)
    esp_wait_max: float = 30.0  # a waiting ESP init is dropped after this long in the FIFO
    gre: float = 7440.0  # a PPTP call's GRE data, until the call ends
    pptp_control: float = 7440.0  # the TCP 1723 control connection (established)

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
                raise ConfigError("must be a positive number of seconds", key=f"timeouts.{name}")


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    def __post_init__(self) -> None:
        if not (1 <= self.low <= self.high <= 65535):
            raise ConfigError(f"bad range {self.low}-{self.high}", key="port_range")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    @property
    def size(self) -> int:
        return self.high - self.low + 1


@dataclass(frozen=True, slots=True)
class Forward:
    """Inbound forwarding ("port forwarding"): public protocol (+port) -> LAN host (+port).

    ``port`` None forwards the whole protocol (GRE, ESP, or every port of TCP/UDP).
    ``remote`` optionally restricts the rule to one outside network.
    """

    protocol: str  # tcp | udp | gre | esp
    to: str
    port: int | None = None
    to_port: int | None = None
    remote: str | None = None

    @property
    def proto_number(self) -> int:
        return {"tcp": 6, "udp": 17, "gre": 47, "esp": 50}[self.protocol]


@dataclass(frozen=True, slots=True)
class Route:
    """Network-to-network (HOWTO 2.8): ``network`` is reached through ``via``, a VPN router
    on the LAN. Traffic between the inside networks and ``network`` is routed, never
    masqueraded; the router's own tunnel to the outside is masqueraded like any host's."""

    network: str
    via: str
    send_redirects: bool = True  # False: the gateway stops sending ICMP redirects (see docs)


@dataclass(frozen=True, slots=True)
class EspPolicy:
    parallel_sessions: bool = True  # several LAN hosts to the same remote (HOWTO PAROK)
    guess_single_host: bool = False  # deliver unassociated inbound ESP to the only plausible host
    max_waiting_per_remote: int = 64
    max_pending_per_host: int = 8


#: limits.max_new_per_host_per_second by default: a busy desktop never keeps this up (a page
#: load opens tens of connections, a browser restoring its tabs a few hundred in some
#: seconds), while a flood or a scanner sends thousands to tens of thousands per second.
#: The token bucket also lets a burst of this many through at once (engine.py).
DEFAULT_NEW_PER_HOST_PER_SECOND = 500.0
#: limits.max_ports_per_host = "auto": this share of each protocol's port pool (TCP, UDP,
#: ICMP ids). A flooding host leaves the rest to the others; the busiest P2P client holds
#: some hundreds of ports (its sessions share them: endpoint-independent mapping).
HOST_PORT_SHARE = 0.25
#: limits.max_entries_per_host = "auto": this share of limits.max_entries (sessions; one
#: port may carry many, so this is larger than the port share)
HOST_ENTRY_SHARE = 0.125


@dataclass(frozen=True, slots=True)
class Limits:
    """Table size and per-host limits. ``None`` ("auto") is sized when the engine starts,
    from the port pool (:mod:`vpnmasq.conntrack.pool`); 0 is unlimited."""

    max_entries: int = 200_000
    max_new_per_host_per_second: float = DEFAULT_NEW_PER_HOST_PER_SECOND  # 0 = unlimited
    max_entries_per_host: int | None = None  # None: HOST_ENTRY_SHARE of max_entries
    max_ports_per_host: int | None = None  # None: HOST_PORT_SHARE of the port pool
    fragment_buffer: int = 256  # out-of-order fragments held per engine


@dataclass(frozen=True, slots=True)
class Sync:
    """[sync]: replicate the table to a standby gateway (docs/HA.md). Off unless ``peer``."""

    peer: str | None = None  # "address:port" of the other gateway's sync listener
    listen: str | None = None  # "address:port" this gateway receives on
    key_file: str | None = None  # shared secret (both gateways read the same bytes)
    interface: str | None = None  # bind the sync socket to this device
    node: int = 1  # 1 or 2: which half of each identifier range new mappings come from
    full_sync_interval: float = 10.0
    queue: int = 256  # datagrams waiting to be sent; more are dropped (then a full resync)

    @property
    def enabled(self) -> bool:
        return self.peer is not None


@dataclass(frozen=True, slots=True)
class Config:
    outside_interface: str = "wan0"
    inside_networks: tuple[str, ...] = ("10.0.0.0/8",)
    mode: Mode = "hybrid"
    public_address: str | None = None  # None: read from the outside interface
    port_range: PortRange | None = None  # None ("auto"): see HYBRID_PORT_RANGE, conntrack/pool
    low_port_range: PortRange = field(default_factory=lambda: PortRange(600, 1023))
    icmp_id_range: PortRange = field(default_factory=lambda: PortRange(1, 65535))
    call_id_range: PortRange = field(default_factory=lambda: PortRange(1, 65535))
    kernel_port_range: PortRange = field(default_factory=lambda: PortRange(32768, 60999))
    preserve_ports: bool = True
    filtering: Filtering = "address-port-dependent"
    on_address_change: AddressChangePolicy = "flush"
    ambiguous_ike: AmbiguousIkePolicy = "drop"
    exempt_networks: tuple[str, ...] = ()  # registered-address hosts: routed, not masqueraded
    ah_icmp_prohibited: bool = False
    helpers: tuple[str, ...] = ("isakmp", "natt", "esp", "pptp", "gre", "ah", "fwz")
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    esp: EspPolicy = field(default_factory=EspPolicy)
    forwards: tuple[Forward, ...] = ()
    # daemon-level (not used by the engine)
    queue_num: int = 0
    fail_open: bool = False
    mark: int = 0x564D  # "VM": set on every packet vpnmasq owns; accept it in FORWARD
    control_socket: str = "/run/vpnmasq/control.sock"
    metrics_listen: str | None = None
    state_file: str | None = None
    log_level: str = "info"
    offload: bool | None = None  # None ("auto"): see offload_on
    on_address_change_hook: str | None = None
    # running it in the real world: routes, local VPN endpoints, MSS clamping
    local_vpn: LocalVpnPolicy = "auto"
    mss_clamp: int = 0
    routes: tuple[Route, ...] = ()
    sync: Sync = field(default_factory=Sync)

    @property
    def offload_on(self) -> bool:
        """``offload`` with "auto" decided: on in hybrid mode (ESP/GRE offload changes
        nothing but speed, docs/SECURITY.md lists the tests), off in userspace mode (NAPT
        offload is newer; turn it on with ``offload = true``)."""
        return self.offload if self.offload is not None else self.mode == "hybrid"

    def inside_nets(self) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(ipaddress.IPv4Network(n, strict=False) for n in self.inside_networks)



#: port_range = "auto" in hybrid mode (above the kernel's default ip_local_port_range, which
#: its masquerade uses as kernel_port_range); userspace mode's auto pool is every port the
#: gateway does not use itself (vpnmasq.conntrack.pool)
HYBRID_PORT_RANGE = PortRange(61000, 65535)
#: Linux's default net.ipv4.ip_local_port_range, assumed where the system cannot be read
#: (check-config, replay, tests)
DEFAULT_LOCAL_PORT_RANGE = PortRange(32768, 60999)

KNOWN_HELPERS: tuple[str, ...] = ("isakmp", "natt", "esp", "pptp", "gre", "ah", "fwz")
FORWARD_PROTOCOLS: tuple[str, ...] = ("tcp", "udp", "gre", "esp")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")

# Minimum idle timeouts from the NAT behaviour RFCs; lower values load, with a warning.
RFC_MINIMUM_TIMEOUTS: dict[str, tuple[float, str]] = {
    "udp": (120.0, "RFC 4787 REQ-5"),
    "tcp_established": (7440.0, "RFC 5382 REQ-5"),
    "tcp_transitory": (240.0, "RFC 5382 REQ-5"),
    "icmp": (60.0, "RFC 5508 REQ-1a"),
}
# HOWTO 5.7: an IPsec entry that expires before the rekey interval breaks idle tunnels.
TYPICAL_IPSEC_REKEY = 3600.0
# sockaddr_un.sun_path is 108 bytes including the terminating NUL (unix(7)).
MAX_UNIX_PATH = 107
IFNAMSIZ = 16  # including the NUL (netdevice(7)), so names have at most 15 bytes
#: characters an interface name may have in vpnmasq's rule text (a subset of the kernel's)
IFNAME_RULE_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-"
)
# TCP MSS clamp bounds: RFC 879/9293 default MSS 536 is the smallest every IPv4 host accepts;
# 65495 = 65535 - 20 (IP) - 20 (TCP).
MIN_MSS = 536
MAX_MSS = 65495




class ConfigErrors(ConfigError):
    """Several problems in one file; ``errors`` lists them in line order, the first sets key/line."""

    def __init__(self, errors: list[ConfigError]) -> None:
        ValueError.__init__(self, "\n".join(str(e) for e in errors))
        self.key = errors[0].key
        self.line = errors[0].line
        self.errors = errors


