"""Configuration: frozen dataclasses and a pure TOML loader.

``load_config(text)`` builds a :class:`Config`; every error is a :class:`ConfigError` that
names the key and, where known, the line. Nothing here touches the system.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import textwrap
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

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


# =====================================================================================
# Loader: TOML text -> Config. One table of KeySpec drives parsing, type checks, unknown-key
# detection and the documentation printed by ``explain()`` (and pasted into the README), so
# the three cannot drift apart.
# =====================================================================================


class ConfigErrors(ConfigError):
    """Several problems in one file; ``errors`` lists them in line order, the first sets key/line."""

    def __init__(self, errors: list[ConfigError]) -> None:
        ValueError.__init__(self, "\n".join(str(e) for e in errors))
        self.key = errors[0].key
        self.line = errors[0].line
        self.errors = errors


class _Bad(Exception):
    """A value is wrong; ``sub`` names the offending element (e.g. "[2]"). Internal."""

    def __init__(self, message: str, sub: str = "") -> None:
        super().__init__(message)
        self.sub = sub


def _tname(v: object) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return f"a {type(v).__name__}"


def _suggest(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or ""."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not close:
        close = [c for c in candidates if c.lower() == word.lower()]
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True, slots=True)
class _Kind:
    """How one key is typed: ``name`` for docs, ``parse`` raises _Bad, ``fmt`` renders a default."""

    name: str
    parse: Callable[[object], object]
    fmt: Callable[[object], str] = lambda v: _toml_literal(v)


def _toml_literal(v: object) -> str:
    if v is None:
        return "(unset)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_literal(x) for x in v) + "]"
    if isinstance(v, PortRange):
        return f'"{v.low}-{v.high}"'
    return str(v)


def _p_str(v: object) -> str:
    if not isinstance(v, str):
        raise _Bad(f"expected a string, got {_tname(v)}")
    if not v:
        raise _Bad("must not be empty")
    return v


def _p_bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, got {_tname(v)}")
    return v


def _k_int(lo: int, hi: int, name: str | None = None) -> _Kind:
    def parse(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"expected an integer, got {_tname(v)}")
        if not lo <= v <= hi:
            raise _Bad(f"{v} is out of range {lo}..{hi}")
        return v

    return _Kind(name or f"integer {lo}..{hi}", parse)


def _k_number(minimum: float, *, exclusive: bool, name: str) -> _Kind:
    def parse(v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _Bad(f"expected a number, got {_tname(v)}")
        f = float(v)
        if f != f or f in (float("inf"), float("-inf")):
            raise _Bad("must be a finite number")
        if f < minimum or (exclusive and f == minimum):
            raise _Bad(f"must be {'>' if exclusive else '>='} {_toml_literal(minimum)}")
        return f

    return _Kind(name, parse)


def _k_choice(options: tuple[str, ...]) -> _Kind:
    def parse(v: object) -> str:
        s = _p_str(v)
        if s not in options:
            shown = ", ".join(f'"{o}"' for o in options)
            raise _Bad(f'"{s}" is not one of {shown}' + _suggest(s, options))
        return s

    return _Kind(" | ".join(f'"{o}"' for o in options), parse)


def _p_ipv4(v: object) -> str:
    s = _p_str(v)
    try:
        return str(ipaddress.IPv4Address(s))
    except ValueError:
        raise _Bad(f'"{s}" is not an IPv4 address') from None


def _network(s: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(s, strict=False)
    except ValueError:
        raise _Bad(f'"{s}" is not an IPv4 network (CIDR such as "10.0.0.0/24")') from None


def _p_network(v: object) -> str:
    return str(_network(_p_str(v)))


def _k_networks(*, allow_empty: bool) -> _Kind:
    def parse(v: object) -> tuple[str, ...]:
        if not isinstance(v, list):
            raise _Bad(f"expected an array of CIDR strings, got {_tname(v)}")
        if not v and not allow_empty:
            raise _Bad("must list at least one network")
        out: list[str] = []
        for i, item in enumerate(v, 1):
            try:
                out.append(_p_network(item))
            except _Bad as e:
                raise _Bad(str(e), f"[{i}]") from None
        return tuple(out)

    return _Kind("array of CIDR", parse)


def _p_port_range(v: object) -> PortRange:
    if isinstance(v, str):
        lo_s, sep, hi_s = v.partition("-")
        if not sep or not lo_s.strip().isdigit() or not hi_s.strip().isdigit():
            raise _Bad(f'"{v}" is not a port range such as "61000-65535"')
        lo, hi = int(lo_s), int(hi_s)
    elif isinstance(v, list):
        if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise _Bad("expected [low, high] with two integers")
        lo, hi = v[0], v[1]
    else:
        raise _Bad(f'expected "low-high" or [low, high], got {_tname(v)}')
    if not 1 <= lo <= hi <= 65535:
        raise _Bad(f"{lo}-{hi} is not a range within 1..65535 with low <= high")
    return PortRange(lo, hi)


def _p_auto_port_range(v: object) -> PortRange | None:
    if v == AUTO:
        return None
    return _p_port_range(v)


def _k_count_auto(name: str) -> _Kind:
    def parse(v: object) -> int | None:
        if v == AUTO:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f'expected "auto" or an integer, got {_tname(v)}')
        if not 0 <= v <= 100_000_000:
            raise _Bad(f"{v} is out of range 0..100000000")
        return v

    return _Kind(name, parse, lambda v: f'"{AUTO}"' if v is None else _toml_literal(v))


def _p_helpers(v: object) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise _Bad(f"expected an array of helper names, got {_tname(v)}")
    seen: list[str] = []
    for i, item in enumerate(v, 1):
        if not isinstance(item, str):
            raise _Bad(f"expected a helper name, got {_tname(item)}", f"[{i}]")
        if item not in KNOWN_HELPERS:
            raise _Bad(
                f"unknown helper '{item}' (known: {', '.join(KNOWN_HELPERS)})"
                + _suggest(item, KNOWN_HELPERS),
                f"[{i}]",
            )
        if item in seen:
            raise _Bad(f"helper '{item}' is listed twice", f"[{i}]")
        seen.append(item)
    return tuple(seen)


def _p_abs_path(v: object) -> str:
    s = _p_str(v)
    if not s.startswith("/"):
        raise _Bad(f'"{s}" must be an absolute path (the daemon runs with / as its directory)')
    return s


def _p_socket_path(v: object) -> str:
    s = _p_abs_path(v)
    if len(s.encode()) > MAX_UNIX_PATH:
        raise _Bad(f"is {len(s.encode())} bytes; a UNIX socket path has at most {MAX_UNIX_PATH}")
    return s


def interface_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an interface name vpnmasq writes into its rules, or None.

    First the kernel's own rule (``dev_valid_name``): not empty, below IFNAMSIZ bytes,
    not "." or "..", no "/", ":", whitespace or NUL. Then what the rule text can carry: only
    :data:`IFNAME_RULE_CHARS`, so nothing needs quoting in nft or iptables arguments (a '"'
    would end an nft string, a '+' is an iptables wildcard, a '!' a negation).
    """
    if not name:
        return "must not be empty"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size >= IFNAMSIZ:
        return f"is {size} bytes; the kernel allows at most {IFNAMSIZ - 1} (IFNAMSIZ {IFNAMSIZ})"
    if name in (".", ".."):
        return f'"{name}" is reserved by the kernel'
    for c in name:
        if c == "\0":
            return "contains a NUL byte, which the kernel never allows"
        if c in "/:":
            return f"contains {c!r}, which the kernel never allows in an interface name"
        if c.isspace():  # also 0xA0, which the kernel's ctype table counts as space
            return f"contains whitespace ({c!r}), which the kernel never allows"
    bad = sorted({c for c in name if c not in IFNAME_RULE_CHARS})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        return (
            f"contains {shown}: vpnmasq writes interface names into nftables/iptables rules, "
            "which carry only letters, digits and _ . @ -"
        )
    return None


def _p_ifname(v: object) -> str:
    s = _p_str(v)
    why = interface_name_problem(s)
    if why is not None:
        raise _Bad(f"{s!r} is not a valid interface name: {why}")
    return s


def _p_host_port(v: object) -> str:
    s = _p_str(v)
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _Bad(f'"{s}" is not "address:port" (e.g. "127.0.0.1:9464" or ":9464")')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not all(part.isalnum() or "-" in part for part in host.split(".")):
                raise _Bad(f'"{host}" is not an address or host name') from None
    return s


def _p_mss(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"expected an integer, got {_tname(v)}")
    if v != 0 and not MIN_MSS <= v <= MAX_MSS:
        raise _Bad(
            f"{v} is not 0 (off) or {MIN_MSS}..{MAX_MSS} ({MIN_MSS} is the MSS every IPv4 "
            "host must accept, RFC 9293 3.7.1)"
        )
    return v


def _fmt_hex(v: object) -> str:
    return f"0x{v:X}" if isinstance(v, int) else str(v)


AUTO = "auto"
_BOOL = _Kind("boolean", _p_bool)
_SECONDS = _k_number(0.0, exclusive=True, name="seconds")
_PORT = _k_int(1, 65535, "port 1..65535")
_COUNT1 = _k_int(1, 100_000_000, "integer >= 1")
_RANGE = _Kind('port range "lo-hi" or [lo, hi]', _p_port_range)
_NETWORKS = _k_networks(allow_empty=False)
_NETWORKS0 = _k_networks(allow_empty=True)
_IPV4 = _Kind("IPv4 address", _p_ipv4)
_NETWORK = _Kind("IPv4 address or CIDR", _p_network)
_PATH = _Kind("absolute path", _p_abs_path)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One documented configuration key. ``key`` is the TOML spelling inside its section."""

    key: str
    kind: _Kind
    doc: str
    required: bool = False
    field_name: str = ""  # dataclass field, when it differs from ``key``

    @property
    def field(self) -> str:
        return self.field_name or self.key


TOP_KEYS: tuple[KeySpec, ...] = (
    KeySpec(
        "outside_interface",
        _Kind("interface name", _p_ifname),
        "Interface that faces the Internet. Masqueraded packets leave through it and "
        "inbound replies and forwards arrive on it.",
        required=True,
    ),
    KeySpec(
        "inside_networks",
        _NETWORKS,
        "Private networks behind the gateway. A packet whose source is in one of them is "
        "outbound and gets masqueraded; forward targets must lie inside them.",
        required=True,
    ),
    KeySpec(
        "mode",
        _k_choice(get_args(Mode)),
        '"hybrid": the kernel masquerades ordinary TCP/UDP/ICMP (fast path) and only VPN '
        "traffic (IKE/NAT-T, ESP, PPTP control, GRE) is queued to vpnmasq. "
        '"userspace": every forwarded packet goes through vpnmasq (slower, one table).',
    ),
    KeySpec(
        "public_address",
        _IPV4,
        "Address the gateway masquerades to. Unset: read from outside_interface and follow "
        "its changes (dynamic IP). Required by `vpnmasq replay`.",
    ),
    KeySpec(
        "port_range",
        _Kind(
            'port range "lo-hi" or [lo, hi], or "auto"',
            _p_auto_port_range,
            lambda v: f'"{AUTO}"' if v is None else _toml_literal(v),
        ),
        "Outside ports vpnmasq allocates for masqueraded TCP/UDP flows with source port "
        '>= 1024 (RFC 4787 REQ-3 keeps ranges apart). "auto": in hybrid mode '
        f"{HYBRID_PORT_RANGE.low}-{HYBRID_PORT_RANGE.high} (the kernel masquerades plain "
        "traffic in kernel_port_range); in userspace mode every port from 1024 up that the "
        "gateway does not use itself: never net.ipv4.ip_local_port_range (its own "
        "connections), never a port a local service listens on, never a forwarded port "
        "(read at start: about 36,000 ports on a default system; `vpnmasq run` and "
        "`vpnmasq status` print the pool). A range must not overlap kernel_port_range in "
        "hybrid mode. Forwarded ports are never handed out.",
    ),
    KeySpec(
        "low_port_range",
        _RANGE,
        "Outside ports for inside source ports below 1024 (RFC 4787 REQ-3 recommends "
        "privileged stay privileged).",
    ),
    KeySpec(
        "icmp_id_range",
        _RANGE,
        "ICMP query identifiers (echo id) vpnmasq allocates when two inside hosts use "
        "the same one to the same remote.",
    ),
    KeySpec(
        "call_id_range",
        _RANGE,
        "PPTP Call IDs allocated on the outside so several inside PPTP clients can call "
        "the same server (HOWTO 2.7, a pool of its own, not the TCP port pool).",
    ),
    KeySpec(
        "kernel_port_range",
        _RANGE,
        "Hybrid mode: the port range the kernel's masquerade rule uses for its own flows "
        "(installed by vpnmasq). Must not overlap port_range. Unused in userspace mode.",
    ),
    KeySpec(
        "preserve_ports",
        _BOOL,
        "Keep the inside source port on the outside when it is free (like libalias "
        "SAME_PORTS). ISAKMP source port 500 is always kept; the cookies tell hosts apart.",
    ),
    KeySpec(
        "filtering",
        _k_choice(get_args(Filtering)),
        "Which inbound packets may use an existing mapping (RFC 4787 REQ-8): from any "
        "remote, only from remotes the inside host has sent to, or only from the exact "
        "remote address and port. Userspace mode filters hairpinned packets (another LAN "
        "host sending through the public address) the same way, the remote being the "
        "sender's public address and port.",
    ),
    KeySpec(
        "on_address_change",
        _k_choice(get_args(AddressChangePolicy)),
        '"flush": drop all mappings when the public address changes (peers must '
        'reconnect anyway). "rewrite": keep the table and masquerade to the new address.',
    ),
    KeySpec(
        "ambiguous_ike",
        _k_choice(get_args(AmbiguousIkePolicy)),
        "A new ISAKMP exchange started by a remote that several inside hosts talk to "
        '(cannot tell which one it wants): "drop" it, or deliver it to the "most-recent" '
        "inside host that exchanged ISAKMP with that remote.",
    ),
    KeySpec(
        "exempt_networks",
        _NETWORKS0,
        "Hosts with registered (public) addresses on the inside: routed, never "
        "masqueraded (HOWTO 3.9-3.12).",
    ),
    KeySpec(
        "ah_icmp_prohibited",
        _BOOL,
        "When an inside host sends IPsec AH (which cannot be masqueraded: its checksum "
        "covers the addresses, HOWTO 2.2), answer with ICMP administratively prohibited "
        "(RFC 5508 REQ-8) instead of dropping silently.",
    ),
    KeySpec(
        "helpers",
        _Kind(f"array of: {', '.join(KNOWN_HELPERS)}", _p_helpers),
        "Protocol helpers to enable. isakmp: UDP 500 tracked by cookies with the source port "
        "kept; natt: IKE on UDP 4500; esp: IP protocol 50 associated by SPI; pptp: TCP 1723 "
        "control with Call ID translation; gre: PPTP data (IP protocol 47) by Call ID; "
        "ah, fwz: detect and report protocols that cannot be masqueraded.",
    ),
    KeySpec(
        "queue_num",
        _k_int(0, 65535),
        "NFQUEUE number the rules send packets to (iptables NFQUEUE --queue-num).",
    ),
    KeySpec(
        "fail_open",
        _BOOL,
        "true: while vpnmasq is not reading the queue the kernel forwards queued packets "
        "un-masqueraded (--queue-bypass), which leaks inside addresses; false: they are "
        "dropped. See packaging/guard.nft for a guard that drops such leaks.",
    ),
    KeySpec(
        "mark",
        _Kind("integer 1..0xFFFFFFFF", _k_int(1, 0xFFFFFFFF).parse, _fmt_hex),
        "Packet mark vpnmasq sets on every packet it owns; the FORWARD chain must accept "
        "packets with this mark (check-config warns when the rule is missing).",
    ),
    KeySpec(
        "control_socket",
        _Kind("absolute path", _p_socket_path),
        "UNIX socket for `vpnmasq status` and `vpnmasq flush`; created mode 0600 "
        "(root only) in a 0700 directory.",
    ),
    KeySpec(
        "metrics_listen",
        _Kind('"address:port"', _p_host_port),
        'Serve Prometheus metrics on this address, e.g. "127.0.0.1:9464". Unset: no '
        "metrics endpoint.",
    ),
    KeySpec(
        "state_file",
        _PATH,
        "Where the masquerade table is saved (every 30 s, at stop and on SIGUSR2 for `run "
        "--handover`; atomically, mode 0600) and restored at start, so VPN sessions survive "
        "a restart. Unset: every start begins with an empty table (a handover then uses "
        "handover.json next to control_socket).",
    ),
    KeySpec("log_level", _k_choice(LOG_LEVELS), "Lowest level of messages that are logged."),
    KeySpec(
        "offload",
        _Kind(
            'true | false | "auto"',
            lambda v: None if v == AUTO else _p_bool(v),
            lambda v: f'"{AUTO}"' if v is None else _toml_literal(v),
        ),
        "Once an ESP or GRE flow is fully associated (and, in userspace mode, once a TCP, "
        "UDP or ICMP echo session is established each way), install a stateless nftables "
        "rewrite for it so its packets stop going through userspace. The engine still "
        "decides every new session, TCP SYN/FIN/RST and ICMP error, and keeps the timeouts. "
        '"auto": on in hybrid mode, where it changes nothing but speed (established ESP and '
        "GRE at about 0.85 of the kernel's rate instead of 0.17, docs/BENCHMARKS.md): the "
        "table stays the truth, offloaded traffic is credited back every second (timeouts, "
        "status counters and last-seen), and ICMP errors, flush, address changes, rekeys, "
        "restarts from state_file, handovers and the firewall-reload restore behave as "
        "without it (docs/SECURITY.md lists the tests). One visible difference: while no "
        "vpnmasq runs (a crash, a handover's gap), offloaded flows keep passing, rewritten "
        'as before, instead of being dropped. Off in userspace mode under "auto".',
    ),
    KeySpec(
        "on_address_change_hook",
        _PATH,
        "Program run (no shell) when the public address changes, with the new address "
        "and the old one (empty when there was none) as arguments, e.g. to update dynamic "
        "DNS. Not run when the address goes away.",
    ),
    KeySpec(
        "local_vpn",
        _k_choice(get_args(LocalVpnPolicy)),
        "Inbound IKE (UDP 500/4500), ESP and GRE to the public address that match no "
        "mapping and no forward: hand them to the gateway itself, for a VPN endpoint running "
        'on it (strongSwan, an ip gre tunnel). "auto": only for protocols the daemon finds '
        'a local consumer of; "always": every such packet; "never": drop them '
        "(HOWTO 3.14 said the two cannot coexist; with cookies, SPIs and Call IDs they can).",
    ),
    KeySpec(
        "mss_clamp",
        _Kind(f"integer 0 or {MIN_MSS}..{MAX_MSS}", lambda v: _p_mss(v)),
        "Lower the TCP MSS option of SYNs passing the gateway to at most this value, for "
        "links with a small MTU such as PPPoE (MTU 1492: 1452). 0: off. Userspace mode "
        "rewrites the option in vpnmasq; hybrid mode installs an nftables rule for it.",
    ),
)

TIMEOUT_DOCS: dict[str, str] = {
    "udp": "Idle UDP mapping (RFC 4787 REQ-5: at least 120 s, 300 s recommended).",
    "tcp_established": "Idle established TCP connection (RFC 5382 REQ-5: at least 7440 s).",
    "tcp_transitory": "TCP before the handshake completes or after FIN (RFC 5382: at least 240 s).",
    "tcp_closed": "TCP after an in-window RST, before the entry is removed.",
    "icmp": "ICMP query (echo) mapping (RFC 5508 REQ-1a: at least 60 s).",
    "generic": "Other IP protocols, tracked by address pair.",
    "fragment": "How long out-of-order fragments wait for the fragment with the ports.",
    "isakmp": "ISAKMP (IKE) session tracked by cookies; at least the IKE SA lifetime.",
    "esp": "Associated ESP SPI pair; longer than the rekey interval, or idle tunnels lose "
    "their association (HOWTO 5.7).",
    "esp_pending": "A new outbound SPI waits this long for the inbound reply before another "
    "host's new SPI to the same remote gets its turn (HOWTO 6.2 serialization).",
    "esp_wait_max": "A new outbound SPI waiting for its turn is dropped after this long.",
    "gre": "PPTP GRE data flow of a call, by Call ID.",
    "pptp_control": "Established PPTP control connection (TCP 1723).",
}

LIMIT_DOCS: dict[str, tuple[_Kind, str]] = {
    "max_entries": (_COUNT1, "Masquerade table size; new flows are dropped (table-full) above it."),
    "max_new_per_host_per_second": (
        _k_number(0.0, exclusive=False, name="number >= 0 (0 = unlimited)"),
        "New mappings one inside host's own packets may create per second (a token bucket "
        "that also lets this many through at once). The default is a rate a busy desktop "
        "never keeps up, and a flood or scanner exceeds many times over. Beyond it: "
        "host-limit drops, logged once per host and interval, counted per host in status "
        "and metrics. 0: unlimited.",
    ),
    "max_entries_per_host": (
        _k_count_auto('integer >= 0 (0 = unlimited) or "auto"'),
        f'Live mappings (sessions) one inside host may hold. "auto": {HOST_ENTRY_SHARE:g} of '
        "max_entries. 0: unlimited.",
    ),
    "max_ports_per_host": (
        _k_count_auto('integer >= 0 (0 = unlimited) or "auto"'),
        "Outside ports (TCP and UDP each; ICMP ids) one inside host may hold at once, so one "
        'host cannot exhaust the pool for the others. "auto": '
        f"{HOST_PORT_SHARE:g} of the pool (printed by `vpnmasq run` at start). 0: unlimited.",
    ),
    "fragment_buffer": (
        _k_int(0, 100_000_000, "integer >= 0"),
        "Out-of-order fragments held while waiting for the first fragment.",
    ),
}

ESP_DOCS: dict[str, tuple[_Kind, str]] = {
    "parallel_sessions": (
        _BOOL,
        "Allow several inside hosts to hold IPsec sessions with the same remote at once "
        "(HOWTO PAROK). false: one host per remote until its entry expires.",
    ),
    "guess_single_host": (
        _BOOL,
        "Deliver inbound ESP with an unknown SPI to the one inside host that recently did "
        "ISAKMP with that remote, when there is exactly one (HOWTO 6.2 guess). false: drop it.",
    ),
    "max_waiting_per_remote": (
        _COUNT1,
        "New outbound SPIs that may wait in line for one remote while another is pending.",
    ),
    "max_pending_per_host": (_COUNT1, "New outbound SPIs one inside host may have pending."),
}

SYNC_KEYS: tuple[KeySpec, ...] = (
    KeySpec(
        "peer",
        _Kind('"address:port"', _p_host_port),
        "The other gateway's sync listener. Setting it turns on replication: the gateway "
        "that holds the public address sends its table there; the other keeps it and takes "
        "over when the address arrives (keepalived moves it; docs/HA.md). Needs "
        "public_address (the virtual public address), listen and key_file.",
    ),
    KeySpec(
        "listen",
        _Kind('"address:port"', _p_host_port),
        "Address and UDP port this gateway receives sync messages on (a dedicated link or "
        "the LAN; never the outside).",
    ),
    KeySpec(
        "key_file",
        _PATH,
        "File holding the shared key (at least 16 bytes, the same file on both gateways, "
        "mode 0600). Every message carries an HMAC-SHA256 over it, a sequence number and "
        "a timestamp; forged, replayed or stale messages are dropped and counted.",
    ),
    KeySpec(
        "interface",
        _Kind("interface name", _p_ifname),
        "Bind the sync socket to this interface (SO_BINDTODEVICE). Unset: any.",
    ),
    KeySpec(
        "node",
        _k_int(1, 2, "1 or 2"),
        "Role hint, different on the two gateways: node 1 hands out new ports, ICMP ids and "
        "PPTP Call IDs from the lower half of each range, node 2 from the upper half, so "
        "even when both are active at once (split brain) no identifier goes to two hosts.",
    ),
    KeySpec(
        "full_sync_interval",
        _SECONDS,
        "The active gateway re-sends the whole table this often (changes go at once), so a "
        "standby that joined late or lost messages catches up.",
    ),
    KeySpec(
        "queue",
        _COUNT1,
        "Sync datagrams that may wait for the socket. When the standby or the link is "
        "slow, more are dropped and counted (the packet path never waits), and a full "
        "resync follows.",
    ),
)

TIMEOUT_KEYS: tuple[KeySpec, ...] = tuple(KeySpec(k, _SECONDS, d) for k, d in TIMEOUT_DOCS.items())
LIMIT_KEYS: tuple[KeySpec, ...] = tuple(KeySpec(k, kd[0], kd[1]) for k, kd in LIMIT_DOCS.items())
ESP_KEYS: tuple[KeySpec, ...] = tuple(KeySpec(k, kd[0], kd[1]) for k, kd in ESP_DOCS.items())

FORWARD_KEYS: tuple[KeySpec, ...] = (
    KeySpec(
        "protocol",
        _k_choice(FORWARD_PROTOCOLS),
        "What to publish: tcp or udp (with or without port), or a whole IP protocol: "
        "gre (PPTP data, protocol 47) or esp (IPsec, protocol 50).",
        required=True,
    ),
    KeySpec(
        "to",
        _IPV4,
        "Inside host that receives the traffic; must be inside an inside network.",
        required=True,
    ),
    KeySpec(
        "port",
        _PORT,
        "Public port for tcp/udp. Omitted: inbound packets of that protocol on any port "
        "that belong to no masqueraded flow go to `to` (check-config warns). Not allowed "
        "for gre/esp. The port is reserved: masqueraded flows never get it. When rules "
        "overlap, one with a port wins over one without, and one with remote over one "
        "without; rules equally specific must not overlap.",
    ),
    KeySpec("to_port", _PORT, "Port on the inside host; default: the same as port. Needs port."),
    KeySpec(
        "remote",
        _NETWORK,
        "Only accept from this outside address or network. Omitted: from anywhere.",
    ),
)

ROUTE_KEYS: tuple[KeySpec, ...] = (
    KeySpec(
        "network",
        _NETWORK,
        "Remote network reached through a VPN router on the LAN (HOWTO 2.8: network to "
        "network). The gateway installs the route; traffic between the inside networks and "
        "this network is never masqueraded.",
        required=True,
    ),
    KeySpec(
        "via",
        _IPV4,
        "The LAN VPN router; must be inside an inside network. Its own tunnel traffic "
        "(GRE, ESP, IKE, WireGuard over UDP) is masqueraded like any host's.",
        required=True,
    ),
    KeySpec(
        "send_redirects",
        _BOOL,
        "false: stop the gateway sending ICMP redirects on the interface towards the router "
        "(hosts that ignore or mishandle redirects, stateful filters on the hosts).",
    ),
)

# Section name in TOML -> (dataclass type, Config field, keys)
_TABLES: dict[str, tuple[type[Any], str, tuple[KeySpec, ...]]] = {
    "timeouts": (Timeouts, "timeouts", TIMEOUT_KEYS),
    "limits": (Limits, "limits", LIMIT_KEYS),
    "esp": (EspPolicy, "esp", ESP_KEYS),
    "sync": (Sync, "sync", SYNC_KEYS),
}
_TOP_BY_KEY = {s.key: s for s in TOP_KEYS}
# What to write when a required top-level key is missing.
_REQUIRED_HINT = {
    "outside_interface": 'the interface that faces the Internet, e.g. outside_interface = "eth0"',
    "inside_networks": 'the LANs to masquerade, e.g. inside_networks = ["192.168.1.0/24"]',
}
_TOP_NAMES: tuple[str, ...] = (*(s.key for s in TOP_KEYS), *_TABLES, "forward", "route")


def _check_docs_cover_dataclasses() -> None:
    """Every dataclass field is documented exactly once (cheap; runs at import)."""
    pairs: list[tuple[type[Any], tuple[KeySpec, ...], set[str]]] = [
        (Config, TOP_KEYS, {"timeouts", "limits", "esp", "forwards", "routes", "sync"}),
        (Timeouts, TIMEOUT_KEYS, set()),
        (Limits, LIMIT_KEYS, set()),
        (EspPolicy, ESP_KEYS, set()),
        (Sync, SYNC_KEYS, set()),
        (Forward, FORWARD_KEYS, set()),
        (Route, ROUTE_KEYS, set()),
    ]
    for cls, specs, extra in pairs:
        documented = {s.field for s in specs} | extra
        fields = {f.name for f in dataclasses.fields(cls)}
        if documented != fields:
            raise AssertionError(f"{cls.__name__}: docs and fields differ: {documented ^ fields}")


_check_docs_cover_dataclasses()


# ----------------------------------------------------------------------------- line numbers
class _Locator:
    """Line numbers of keys in TOML text, which tomllib does not report.

    Keys are dotted paths with 1-based indexes for array elements and ``[[tables]]``:
    ``"timeouts.udp"``, ``"forward[2].port"``, ``"inside_networks[3]"``. ``line(key)`` falls
    back to the nearest enclosing key (a missing ``forward[2].to`` points at its
    ``[[forward]]`` header). The scanner only needs to be right for text tomllib accepted;
    if it gets lost it stops, and messages simply carry fewer line numbers.
    """

    def __init__(self, text: str = "") -> None:
        self.lines: dict[str, int] = {}
        self.first_header: int | None = None  # line of the first [table] or [[table]]
        self._s = text
        self._i = 0
        self._line = 1
        self._arrays: dict[str, int] = {}  # [[name]] (unindexed) -> elements so far
        try:
            self._document()
        except (_ScanLost, IndexError):
            pass

    def line(self, key: str) -> int | None:
        k = key
        while k:
            if k in self.lines:
                return self.lines[k]
            cut = max(k.rfind("."), k.rfind("["))
            if cut <= 0:
                return None
            k = k[:cut]
        return None

    def has(self, key: str) -> bool:
        return key in self.lines

    # -- scanner ------------------------------------------------------------------------
    def _record(self, key: str, line: int) -> None:
        self.lines.setdefault(key, line)

    def _peek(self, k: int = 0) -> str:
        j = self._i + k
        return self._s[j] if j < len(self._s) else ""

    def _blank(self, newlines: bool) -> None:
        """Skip spaces and comments (and newlines if asked)."""
        s = self._s
        while self._i < len(s):
            c = s[self._i]
            if c in " \t\r":
                self._i += 1
            elif c == "#":
                while self._i < len(s) and s[self._i] != "\n":
                    self._i += 1
            elif c == "\n" and newlines:
                self._line += 1
                self._i += 1
            else:
                return

    def _document(self) -> None:
        table = ""
        while True:
            self._blank(newlines=True)
            if self._i >= len(self._s):
                return
            line = self._line
            if self._peek() == "[":
                if self.first_header is None:
                    self.first_header = line
                array = self._peek(1) == "["
                self._i += 2 if array else 1
                parts = self._key()
                self._blank(newlines=False)
                if not self._s.startswith("]]" if array else "]", self._i):
                    raise _ScanLost
                self._i += 2 if array else 1
                table = self._resolve(parts)
                if array:
                    plain = ".".join(parts)
                    self._arrays[plain] = self._arrays.get(plain, 0) + 1
                    self._record(table, line)
                    table = f"{table}[{self._arrays[plain]}]"
                self._record(table, line)
            else:
                self._pair(table)

    def _resolve(self, parts: list[str]) -> str:
        """Header parts -> path, indexing parents that are arrays of tables."""
        path = ""
        plain = ""
        for p in parts:
            plain = f"{plain}.{p}" if plain else p
            path = f"{path}.{p}" if path else p
            if plain in self._arrays and plain != ".".join(parts):
                path = f"{path}[{self._arrays[plain]}]"
        return path

    def _pair(self, table: str) -> None:
        line = self._line
        parts = self._key()
        path = table
        for p in parts:
            path = f"{path}.{p}" if path else p
            self._record(path, line)
        self._blank(newlines=False)
        if self._peek() != "=":
            raise _ScanLost
        self._i += 1
        self._blank(newlines=False)
        self._value(path)

    def _key(self) -> list[str]:
        parts: list[str] = []
        s = self._s
        while True:
            self._blank(newlines=False)
            c = self._peek()
            if c == '"':
                end = self._i + 1
                while s[end] != '"':
                    end += 2 if s[end] == "\\" else 1
                parts.append(json.loads(s[self._i : end + 1]))
                self._i = end + 1
            elif c == "'":
                end = s.index("'", self._i + 1)
                parts.append(s[self._i + 1 : end])
                self._i = end + 1
            else:
                start = self._i
                while self._i < len(s) and (s[self._i].isalnum() or s[self._i] in "_-"):
                    self._i += 1
                if self._i == start:
                    raise _ScanLost
                parts.append(s[start : self._i])
            self._blank(newlines=False)
            if self._peek() != ".":
                return parts
            self._i += 1

    def _value(self, path: str) -> None:  # noqa: C901 - one branch per value type of the schema
        s = self._s
        c = self._peek()
        if s.startswith('"""', self._i) or s.startswith("'''", self._i):
            q = s[self._i : self._i + 3]
            end = self._i + 3
            while not s.startswith(q, end):
                if s[end] == "\\" and q == '"""':
                    end += 1
                end += 1
                if end >= len(s):
                    raise _ScanLost
            while end + 3 < len(s) and s[end + 3] == q[0]:  # up to two quotes before closing
                end += 1
            self._line += s.count("\n", self._i, end)
            self._i = end + 3
        elif c == '"':
            end = self._i + 1
            while s[end] != '"':
                end += 2 if s[end] == "\\" else 1
            self._i = end + 1
        elif c == "'":
            self._i = s.index("'", self._i + 1) + 1
        elif c == "[":
            self._i += 1
            n = 0
            while True:
                self._blank(newlines=True)
                if self._peek() == "]":
                    self._i += 1
                    return
                n += 1
                self._record(f"{path}[{n}]", self._line)
                self._value(f"{path}[{n}]")
                self._blank(newlines=True)
                if self._peek() == ",":
                    self._i += 1
        elif c == "{":  # newlines tolerated (TOML 1.1 allows them; costs nothing here)
            self._i += 1
            while True:
                self._blank(newlines=True)
                if self._peek() == "}":
                    self._i += 1
                    return
                self._pair(path)
                self._blank(newlines=True)
                if self._peek() == ",":
                    self._i += 1
        else:
            start = self._i
            while self._i < len(s) and s[self._i] not in ",]}\n#":
                self._i += 1
            if self._i == start:
                raise _ScanLost


class _ScanLost(Exception):
    """The line scanner met something it does not understand; it stops quietly."""


# ----------------------------------------------------------------------------- errors
class _Problems:
    """Collects errors or warnings with their key and line; raises them sorted by line."""

    def __init__(self, where: _Locator) -> None:
        self.where = where
        self.items: list[ConfigError] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(ConfigError(message, key=key, line=self.where.line(key)))

    def add_at_first_present(self, keys: Sequence[str], message: str) -> None:
        """Blame the first of ``keys`` that the file sets (defaults have no line)."""
        for k in keys:
            if self.where.has(k):
                self.add(k, message)
                return
        self.add(keys[0], message)

    def sorted(self) -> list[ConfigError]:
        return sorted(self.items, key=lambda e: (e.line is None, e.line or 0))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        errors = self.sorted()
        if len(errors) == 1:
            raise errors[0]
        raise ConfigErrors(errors)


def _toml_error(text: str, err: tomllib.TOMLDecodeError) -> ConfigError:
    """tomllib's words, with the line where the syntax breaks and the key being set there.

    tomllib reports where it gave up, which for an array left open is the first line after
    it ("line 3, column 1" for an unclosed array on line 2). :func:`_syntax_break` moves such
    errors back to the last line with content inside the open array.
    """
    msg = str(err)
    lines = text.splitlines()
    m = re.search(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)\s*$", msg)
    if not m:
        return ConfigError(f"not valid TOML: {msg}")
    words = msg[: m.start()]
    if m.group(1):
        line, col = int(m.group(1)), int(m.group(2))
        offset = sum(len(x) + 1 for x in text.split("\n")[: line - 1]) + col - 1
        gave_up = f"at line {line}"
    else:
        line, offset, gave_up = max(len(lines), 1), len(text), "at the end of the file"
    brk = _syntax_break(text[:offset])
    if brk.string_line is not None and brk.string_line != line:
        return ConfigError(
            f"not valid TOML: this string is not closed; tomllib: {words} {gave_up}",
            key=brk.key,
            line=brk.string_line,
        )
    if brk.open_line is not None and brk.blank_before:
        where = (
            "']' missing"
            if brk.open_line == brk.last_line
            else f"']' or ',' missing (the array starts on line {brk.open_line})"
        )
        return ConfigError(
            f"not valid TOML: {where}; tomllib: {words} {gave_up}",
            key=brk.key,
            line=brk.last_line,
        )
    return ConfigError(f"not valid TOML: {words}", key=brk.key, line=line)


@dataclass(slots=True)
class _Break:
    key: str | None = None  # the key whose value is open at the cut, if any
    open_line: int | None = None  # line of the outermost '[' or '{' still open in a value
    last_line: int = 1  # last line with content (not blank, not a comment)
    blank_before: bool = True  # nothing but blanks/comments on the cut's own line
    string_line: int | None = None  # where a string still open at the cut starts


def _syntax_break(head: str) -> _Break:  # noqa: C901 - one branch per TOML syntax error tomllib reports
    """Scan TOML text up to the point where tomllib failed: which value is still open.

    Only brackets inside values count (``[table]`` headers do not); strings and comments are
    skipped. Good enough for syntax errors, which is all it is used for.
    """
    b = _Break()
    depth: list[int] = []
    in_value = False
    line = 1
    i = 0
    n = len(head)
    while i < n:
        c = head[i]
        if c == "\n":
            line += 1
            b.blank_before = True
            if not depth:
                in_value = False
                b.key = None
            i += 1
            continue
        if c in " \t\r":
            i += 1
            continue
        if c == "#":
            j = head.find("\n", i)
            i = n if j < 0 else j
            continue
        b.last_line, b.blank_before = line, False
        if c in "\"'":
            q = head[i : i + 3] if head.startswith(c * 3, i) else c
            j = i + len(q)
            while j < n and not head.startswith(q, j):
                j += 2 if head[j] == "\\" and c == '"' else 1
            if j >= n:
                b.string_line = line
            line += head.count("\n", i, min(j, n))
            i = j + len(q)
        elif not in_value:
            if c == "[":  # a table header: skip it, no value is open after it
                j = head.find("\n", i)
                i = n if j < 0 else j
                continue
            j = head.find("=", i)
            eol = head.find("\n", i)
            if j < 0 or 0 <= eol < j:  # a key without '=' on its line: the error is here
                i = n if eol < 0 else eol
                continue
            b.key = head[i:j].strip().strip("\"'") or None
            in_value = True
            i = j + 1
        else:
            if c in "[{":
                if not depth:
                    b.open_line = line
                depth.append(line)
            elif c in "]}" and depth:
                depth.pop()
                if not depth:
                    b.open_line = None
            i += 1
    return b


# ----------------------------------------------------------------------------- loading
def load_config(text: str) -> Config:
    """Parse and check TOML text. Raises ConfigError (or ConfigErrors) naming key and line.

    Pure: no file system, no network. Warnings (values that load but are risky) come from
    :func:`validate`.
    """
    config, _ = _load(text)
    return config


def parse_value(key: str, value: object) -> Any:
    """One top-level key's value as the loader parses it (for command-line overrides)."""
    try:
        return _TOP_BY_KEY[key].kind.parse(value)
    except _Bad as e:
        raise ConfigError(str(e), key=key + e.sub) from None


def load_config_file(path: str | os.PathLike[str]) -> Config:
    return load_config(read_config_text(path))


def read_config_text(path: str | os.PathLike[str]) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{os.fspath(path)} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None


def validate(config: Config, text: str | None = None) -> list[str]:
    """Check a Config as a whole: raise ConfigError for errors, return warnings.

    ``text`` (the TOML it came from) adds line numbers. ``load_config`` already runs the
    error checks; call this afterwards for the warnings, or on a Config built in code.
    """
    where = _Locator(text or "")
    errors = _Problems(where)
    _cross_checks(config, errors)
    errors.raise_if_any()
    warnings = _Problems(where)
    _warnings(config, warnings)
    return [str(w) for w in warnings.sorted()]


def _load(text: str) -> tuple[Config, _Locator]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(text, e) from None
    if not data:
        raise ConfigError(
            "the file sets nothing: outside_interface and inside_networks are required"
        )
    where = _Locator(text)
    errors = _Problems(where)
    for spec in TOP_KEYS:
        if spec.required and spec.key not in data:
            errors.add(spec.key, f"required, and not set ({_REQUIRED_HINT[spec.key]})")
    kwargs: dict[str, object] = {}
    first_table_line = where.first_header
    for key, value in data.items():
        if key in _TOP_BY_KEY:
            spec = _TOP_BY_KEY[key]
            try:
                kwargs[spec.field] = spec.kind.parse(value)
            except _Bad as e:
                errors.add(key + e.sub, str(e))
        elif key in _TABLES:
            cls, fname, specs = _TABLES[key]
            if not isinstance(value, dict):
                errors.add(key, f"must be a table ([{key}]), got {_tname(value)}")
                continue
            parsed = _parse_table(value, specs, key, errors, first_table_line)
            if parsed is not None:
                kwargs[fname] = cls(**parsed)
        elif key == "forward":
            forwards = _parse_forwards(value, errors, first_table_line)
            if forwards is not None:
                kwargs["forwards"] = forwards
        elif key == "route":
            routes = _parse_routes(value, errors, first_table_line)
            if routes is not None:
                kwargs["routes"] = routes
        else:
            errors.add(key, f"unknown key '{key}'" + (_suggest(key, _TOP_NAMES) or _elsewhere(key)))
    errors.raise_if_any()
    config = Config(**kwargs)  # type: ignore[arg-type]
    _cross_checks(config, errors)
    errors.raise_if_any()
    return config, where


def _elsewhere(name: str) -> str:
    """A table key written at the top level: say which table it belongs to."""
    for table, (_, _, specs) in _TABLES.items():
        if any(s.key == name for s in specs):
            return f" ('{name}' belongs in the [{table}] table: did you mean '{table}.{name}'?)"
    if any(s.key == name for s in FORWARD_KEYS):
        return f" ('{name}' belongs in a [[forward]] table)"
    if any(s.key == name for s in ROUTE_KEYS):
        return f" ('{name}' belongs in a [[route]] table)"
    return ""


def _misplaced_hint(name: str, first_table_line: int | None) -> str:
    """A top-level key written after a [table] header silently lands in that table."""
    if name in _TOP_BY_KEY and first_table_line is not None:
        return (
            f" ('{name}' is a top-level key: move it above line {first_table_line}, "
            "before the first [table] header)"
        )
    return ""


def _parse_table(
    value: dict[str, object],
    specs: tuple[KeySpec, ...],
    prefix: str,
    errors: _Problems,
    first_table_line: int | None,
) -> dict[str, object] | None:
    by_key = {s.key: s for s in specs}
    out: dict[str, object] = {}
    ok = True
    for k, v in value.items():
        full = f"{prefix}.{k}"
        spec = by_key.get(k)
        if spec is None:
            hint = _misplaced_hint(k, first_table_line) or _suggest(k, by_key)
            section = f"[[{prefix.split('[')[0]}]]" if "[" in prefix else f"[{prefix}]"
            errors.add(full, f"unknown key '{k}' in {section}{hint}")
            ok = False
            continue
        try:
            out[spec.field] = spec.kind.parse(v)
        except _Bad as e:
            errors.add(full + e.sub, str(e))
            ok = False
    for spec in specs:
        if spec.required and spec.key not in value:
            errors.add(f"{prefix}.{spec.key}", f"'{spec.key}' is required")
            ok = False
    return out if ok else None


def _parse_forwards(
    value: object, errors: _Problems, first_table_line: int | None
) -> tuple[Forward, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        errors.add("forward", "must be an array of tables: write each rule under [[forward]]")
        return None
    out: list[Forward] = []
    ok = True
    for i, item in enumerate(value, 1):
        key = f"forward[{i}]"
        parsed = _parse_table(item, FORWARD_KEYS, key, errors, first_table_line)
        if parsed is None:
            ok = False
            continue
        proto = str(parsed["protocol"])
        if proto in ("gre", "esp"):
            for p in ("port", "to_port"):
                if p in parsed:
                    errors.add(
                        f"{key}.{p}",
                        f"{proto} has no ports: remove '{p}' "
                        f"(a {proto} forward sends the whole protocol to one host)",
                    )
                    ok = False
        elif "to_port" in parsed and "port" not in parsed:
            errors.add(f"{key}.to_port", "'to_port' needs 'port' (which public port maps to it?)")
            ok = False
        if ok:
            out.append(Forward(**parsed))  # type: ignore[arg-type]
    return tuple(out) if ok else None


def _parse_routes(
    value: object, errors: _Problems, first_table_line: int | None
) -> tuple[Route, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        errors.add("route", "must be an array of tables: write each route under [[route]]")
        return None
    out: list[Route] = []
    ok = True
    for i, item in enumerate(value, 1):
        parsed = _parse_table(item, ROUTE_KEYS, f"route[{i}]", errors, first_table_line)
        if parsed is None:
            ok = False
            continue
        out.append(Route(**parsed))  # type: ignore[arg-type]
    return tuple(out) if ok else None


def _overlap(a: PortRange, b: PortRange) -> bool:
    return a.low <= b.high and b.low <= a.high


def _rng(r: PortRange) -> str:
    return f"{r.low}-{r.high}"


def _describe_forward(f: Forward) -> str:
    port = (
        f"port {f.port}"
        if f.port is not None
        else (f"every {f.protocol} port" if f.protocol in ("tcp", "udp") else f.protocol)
    )
    what = port if f.port is None else f"{f.protocol} {port}"
    return what + (f" from {f.remote}" if f.remote else "")


def _cross_checks(config: Config, errors: _Problems) -> None:  # noqa: C901 - a list of independent checks, a few lines each
    """Errors that involve more than one key (also run by validate() on hand-built Configs)."""
    inside = config.inside_nets()
    port_range = config.port_range or HYBRID_PORT_RANGE
    if config.mode == "hybrid" and _overlap(port_range, config.kernel_port_range):
        errors.add_at_first_present(
            ["port_range", "kernel_port_range"],
            f"port_range {_rng(port_range)} overlaps kernel_port_range "
            f"{_rng(config.kernel_port_range)}; in hybrid mode the kernel and vpnmasq would "
            "hand out the same outside ports",
        )
    if config.mode == "hybrid" and _overlap(config.low_port_range, config.kernel_port_range):
        errors.add_at_first_present(
            ["low_port_range", "kernel_port_range"],
            f"low_port_range {_rng(config.low_port_range)} overlaps kernel_port_range "
            f"{_rng(config.kernel_port_range)}; in hybrid mode the kernel and vpnmasq would "
            "hand out the same outside ports",
        )
    if config.port_range is not None and _overlap(config.port_range, config.low_port_range):
        errors.add_at_first_present(
            ["low_port_range", "port_range"],
            f"low_port_range {_rng(config.low_port_range)} overlaps port_range "
            f"{_rng(config.port_range)}",
        )
    if config.public_address is not None:
        pub = ipaddress.IPv4Address(config.public_address)
        for net in inside:
            if pub in net:
                errors.add("public_address", f"{pub} is inside the inside network {net}")
        if pub.is_unspecified or pub.is_multicast or pub.is_loopback:
            errors.add("public_address", f"{pub} cannot be a public address")
    seen: list[tuple[int, Forward]] = []
    for i, f in enumerate(config.forwards, 1):
        key = f"forward[{i}]"
        to = ipaddress.IPv4Address(f.to)
        nets = [n for n in inside if to in n]
        if not nets:
            errors.add(
                f"{key}.to",
                f"{to} is not inside any inside network ({', '.join(config.inside_networks)})",
            )
        else:
            net = nets[0]
            if net.prefixlen < 31 and to in (net.network_address, net.broadcast_address):
                errors.add(f"{key}.to", f"{to} is the network or broadcast address of {net}")
        for j, g in seen:
            # The engine tries forwards most specific first (port before no port, remote
            # before no remote), so only rules of equal specificity can be ambiguous.
            if g.protocol != f.protocol or (f.port is None) != (g.port is None):
                continue
            if (f.remote is None) != (g.remote is None) or f.port != g.port:
                continue
            r1 = ipaddress.IPv4Network(f.remote) if f.remote else None
            r2 = ipaddress.IPv4Network(g.remote) if g.remote else None
            if r1 is not None and r2 is not None and not r1.overlaps(r2):
                continue
            other = f"forward[{j}]"
            ln = errors.where.line(other)
            at = f" at line {ln}" if ln is not None else ""
            if f.remote == g.remote:
                errors.add(
                    key,
                    f"duplicate forward: {_describe_forward(f)} is already "
                    f"forwarded by {other}{at}",
                )
            else:
                errors.add(
                    key,
                    f"{_describe_forward(f)} overlaps {other}{at} "
                    f"({_describe_forward(g)}); an inbound packet could match both",
                )
            break
        seen.append((i, f))
    _route_checks(config, errors)
    _sync_checks(config, errors)


def _sync_checks(config: Config, errors: _Problems) -> None:
    sync = config.sync
    if not sync.enabled:
        for name in ("listen", "key_file", "interface"):
            if getattr(sync, name) is not None:
                errors.add(f"sync.{name}", f"sync.{name} needs sync.peer (replication is off)")
        return
    for name in ("listen", "key_file"):
        if getattr(sync, name) is None:
            errors.add("sync.peer", f"replication needs sync.{name} too")
    if config.public_address is None:
        errors.add(
            "sync.peer",
            "replication needs public_address: the virtual public address keepalived moves "
            "(the gateway holding it is the active one)",
        )
    for name in ("peer", "listen"):
        host = str(getattr(sync, name) or "").rpartition(":")[0]
        if name == "listen" and host in ("", "0.0.0.0"):
            continue
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            errors.add(f"sync.{name}", f'"{getattr(sync, name)}" needs an IPv4 address')


def _route_checks(config: Config, errors: _Problems) -> None:
    """[[route]]: the router is on the LAN; the remote network is neither inside nor the
    public address; no two routes overlap (the kernel would pick one silently)."""
    inside = config.inside_nets()
    nets: list[tuple[int, ipaddress.IPv4Network]] = []
    for i, r in enumerate(config.routes, 1):
        key = f"route[{i}]"
        net = ipaddress.IPv4Network(r.network, strict=False)
        via = ipaddress.IPv4Address(r.via)
        if not any(via in n for n in inside):
            errors.add(
                f"{key}.via",
                f"{via} is not inside any inside network ({', '.join(config.inside_networks)}); "
                "the VPN router must be on the LAN",
            )
        if via in net:
            errors.add(f"{key}.via", f"{via} lies inside the network it routes ({net})")
        for n in inside:
            if net.overlaps(n):
                errors.add(
                    f"{key}.network",
                    f"{net} overlaps the inside network {n}; a routed network must be "
                    "elsewhere (give the remote site its own addresses)",
                )
        if config.public_address is not None:
            if ipaddress.IPv4Address(config.public_address) in net:
                errors.add(f"{key}.network", f"{net} contains the public address")
        if net.prefixlen == 0:
            errors.add(
                f"{key}.network",
                "0.0.0.0/0 would send everything to the LAN router (use its own default "
                "route instead)",
            )
        for j, other in nets:
            if net.overlaps(other):
                errors.add(f"{key}.network", f"{net} overlaps route[{j}] ({other})")
                break
        nets.append((i, net))


def _warnings(config: Config, warn: _Problems) -> None:  # noqa: C901 - a list of independent warnings, a few lines each
    t = config.timeouts
    for name, (minimum, source) in RFC_MINIMUM_TIMEOUTS.items():
        value = getattr(t, name)
        if value < minimum:
            warn.add(
                f"timeouts.{name}",
                f"{_toml_literal(value)} s is below the {source} "
                f"minimum of {_toml_literal(minimum)} s; idle flows will lose their mapping",
            )
    if t.esp < TYPICAL_IPSEC_REKEY:
        warn.add(
            "timeouts.esp",
            f"{_toml_literal(t.esp)} s is shorter than a typical 1 h "
            "IPsec rekey interval; idle tunnels lose their association (HOWTO 5.7)",
        )
    if t.isakmp < t.esp:
        warn.add(
            "timeouts.isakmp",
            f"{_toml_literal(t.isakmp)} s is shorter than timeouts.esp "
            f"({_toml_literal(t.esp)} s); rekeys of a quiet tunnel find no ISAKMP entry",
        )
    if t.esp_pending >= t.esp_wait_max:
        warn.add(
            "timeouts.esp_pending",
            f"{_toml_literal(t.esp_pending)} s is not below "
            f"timeouts.esp_wait_max ({_toml_literal(t.esp_wait_max)} s); a waiting SPI "
            "is dropped before the pending one yields its turn",
        )
    inside = config.inside_nets()
    for i, (raw, net) in enumerate(zip(config.inside_networks, inside, strict=True), 1):
        for other in inside[i:]:
            if net.overlaps(other):
                warn.add(f"inside_networks[{i}]", f"{net} overlaps {other}")
        del raw
    for i, raw in enumerate(config.exempt_networks, 1):
        ex = ipaddress.IPv4Network(raw, strict=False)
        if not any(ex.subnet_of(n) for n in inside):
            warn.add(
                f"exempt_networks[{i}]",
                f"{ex} is not inside any inside network, so it would not be masqueraded anyway",
            )
    if config.mode == "userspace" and warn.where.has("kernel_port_range"):
        warn.add("kernel_port_range", "only used in hybrid mode; ignored in userspace mode")
    if "gre" in config.helpers and "pptp" not in config.helpers:
        warn.add(
            "helpers",
            "'gre' without 'pptp': GRE Call IDs are learned from the PPTP "
            "control connection, so outbound PPTP calls will not be tracked",
        )
    if "esp" in config.helpers and "isakmp" not in config.helpers:
        warn.add(
            "helpers",
            "'esp' without 'isakmp': ESP associations cannot be tied to IKE "
            "sessions and rely on serialization alone",
        )
    if config.fail_open:
        warn.add(
            "fail_open",
            "true: while vpnmasq is down, queued packets leave un-masqueraded "
            "with inside source addresses (load packaging/guard.nft to drop them)",
        )
    lim = config.limits
    if lim.max_entries_per_host is not None and 0 < lim.max_entries < lim.max_entries_per_host:
        warn.add(
            "limits.max_entries_per_host",
            f"{lim.max_entries_per_host} is larger than "
            f"limits.max_entries ({lim.max_entries}) and never applies",
        )
    for i, f in enumerate(config.forwards, 1):
        key = f"forward[{i}]"
        if f.protocol in ("tcp", "udp") and f.port is None:
            warn.add(
                key,
                f"no port: every inbound {f.protocol} packet to the public address "
                f"that matches no masquerade mapping goes to {f.to}",
            )
        if config.mode == "hybrid" and f.port is not None and f.port in config.kernel_port_range:
            warn.add(
                f"{key}.port",
                f"port {f.port} is inside kernel_port_range {_rng(config.kernel_port_range)}; "
                "the kernel may also give it to a masqueraded flow (conntrack keeps the flows "
                "apart, but captures are harder to read)",
            )
    if config.public_address is not None:
        why = upstream_nat_reason(config.public_address)
        if why is not None:
            warn.add("public_address", upstream_nat_warning(config.public_address, why))
    if config.mss_clamp and config.mss_clamp > 1460:
        warn.add(
            "mss_clamp",
            f"{config.mss_clamp} is above 1460, the MSS of a 1500-byte Ethernet MTU; it only "
            "lowers MSS options larger than that",
        )
    for i, r in enumerate(config.routes, 1):
        if any(f.to == r.via for f in config.forwards):
            continue
        if "gre" not in config.helpers and "esp" not in config.helpers:
            warn.add(
                f"route[{i}]",
                f"neither the gre nor the esp helper is enabled: the tunnel of {r.via} is "
                "masqueraded only if it runs over UDP (WireGuard, NAT-T)",
            )


# Upstream NAT (seed 2.9): an outside address that is itself private means another
# NAT sits between the gateway and the Internet. NAT-T survives it; raw ESP and GRE rarely do,
# and nothing outside can reach the [[forward]]s.
UPSTREAM_NAT_NETWORKS: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (ipaddress.IPv4Network("10.0.0.0/8"), "private (RFC 1918)"),
    (ipaddress.IPv4Network("172.16.0.0/12"), "private (RFC 1918)"),
    (ipaddress.IPv4Network("192.168.0.0/16"), "private (RFC 1918)"),
    (ipaddress.IPv4Network("100.64.0.0/10"), "carrier-grade NAT shared space (RFC 6598)"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local (RFC 3927)"),
)


def upstream_nat_reason(address: str) -> str | None:
    """Why ``address`` on the outside means another NAT upstream, or None if it does not."""
    try:
        a = ipaddress.IPv4Address(address)
    except ValueError:
        return None
    for net, why in UPSTREAM_NAT_NETWORKS:
        if a in net:
            return why
    return None


def upstream_nat_warning(address: str, why: str | None = None) -> str:
    """The operator-facing text for an outside address behind another NAT."""
    why = why or upstream_nat_reason(address) or "not public"
    return (
        f"{address} is {why}: another NAT sits upstream. IPsec with NAT-T (UDP 4500) works "
        "through it; raw ESP (protocol 50) and PPTP's GRE (protocol 47) usually do not, and "
        "[[forward]]ed LAN servers cannot be reached from outside. Ask the provider for a "
        "public address (or bridge mode on the upstream router), or use NAT-T"
    )


# ----------------------------------------------------------------------------- docs
def _sections() -> list[tuple[str, str, tuple[KeySpec, ...], object]]:
    """(title, TOML prefix, keys, instance holding the defaults)."""
    return [
        ("Top level", "", TOP_KEYS, Config()),
        ("[timeouts] (seconds)", "timeouts.", TIMEOUT_KEYS, Timeouts()),
        ("[limits]", "limits.", LIMIT_KEYS, Limits()),
        ("[esp] (IPsec ESP association policy)", "esp.", ESP_KEYS, EspPolicy()),
        ("[sync] (active/standby table replication, docs/HA.md)", "sync.", SYNC_KEYS, Sync()),
        ("[[forward]] (one table per rule; publishes an inside server)", "", FORWARD_KEYS, None),
        (
            "[[route]] (one table per remote network behind a LAN VPN router)",
            "",
            ROUTE_KEYS,
            Route("0.0.0.0/32", "0.0.0.0"),
        ),
    ]


def _default_text(spec: KeySpec, instance: object) -> str:
    if instance is None or spec.required:
        return "required" if spec.required else "(unset)"
    return spec.kind.fmt(getattr(instance, spec.field))


def explain(fmt: Literal["text", "markdown"] = "text") -> str:
    """Every configuration key with its type, default and meaning (README uses markdown)."""
    out: list[str] = []
    if fmt == "markdown":
        for title, prefix, specs, inst in _sections():
            out += [f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
            for s in specs:
                cells = [f"`{prefix}{s.key}`", s.kind.name, f"`{_default_text(s, inst)}`", s.doc]
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            out.append("")
        return "\n".join(out)
    out += [
        "vpnmasq configuration file (TOML). Unknown keys are errors; every message names the",
        'key and its line. Port ranges are written "low-high" or [low, high]. Forward rules',
        "are counted from 1 in messages (forward[2] is the second [[forward]] table).",
        "",
    ]
    wrap = textwrap.TextWrapper(width=88, initial_indent="    ", subsequent_indent="    ")
    for title, prefix, specs, inst in _sections():
        out += [title, "-" * len(title)]
        for s in specs:
            default = "required" if s.required else f"default {_default_text(s, inst)}"
            out.append(f"{prefix}{s.key}  ({s.kind.name}; {default})")
            out += wrap.wrap(s.doc)
        out.append("")
    return "\n".join(out).rstrip() + "\n"
