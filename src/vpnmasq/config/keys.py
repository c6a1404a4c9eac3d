"""Every key, once: its value kind (parser and type name) and its documentation. One table of
KeySpec drives parsing, type checks, unknown-key detection and ``explain()``, so the three
cannot drift apart; an import-time check makes sure every dataclass field is documented.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, get_args

from vpnmasq.config.schema import (
    FORWARD_PROTOCOLS,
    HOST_ENTRY_SHARE,
    HOST_PORT_SHARE,
    HYBRID_PORT_RANGE,
    IFNAME_RULE_CHARS,
    IFNAMSIZ,
    KNOWN_HELPERS,
    LOG_LEVELS,
    MAX_MSS,
    MAX_UNIX_PATH,
    MIN_MSS,
    AddressChangePolicy,
    AmbiguousIkePolicy,
    Config,
    EspPolicy,
    Filtering,
    Forward,
    Limits,
    LocalVpnPolicy,
    Mode,
    PortRange,
    Route,
    Sync,
    Timeouts,
)

# =====================================================================================
# Loader: TOML text -> Config. One table of KeySpec drives parsing, type checks, unknown-key
# detection and the documentation printed by ``explain()`` (and pasted into the README), so
# the three cannot drift apart.
# =====================================================================================


class BadValue(Exception):
    """A value is wrong; ``sub`` names the offending element (e.g. "[2]"). Internal."""

    def __init__(self, message: str, sub: str = "") -> None:
        super().__init__(message)
        self.sub = sub


def type_name(v: object) -> str:
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


def suggest(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or ""."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not close:
        close = [c for c in candidates if c.lower() == word.lower()]
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True, slots=True)
class _Kind:
    """How one key is typed: ``name`` for docs, ``parse`` raises BadValue, ``fmt`` renders a default."""

    name: str
    parse: Callable[[object], object]
    fmt: Callable[[object], str] = lambda v: toml_literal(v)


def toml_literal(v: object) -> str:
    if v is None:
        return "(unset)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, tuple | list):
        return "[" + ", ".join(toml_literal(x) for x in v) + "]"
    if isinstance(v, PortRange):
        return f'"{v.low}-{v.high}"'
    return str(v)


def _p_str(v: object) -> str:
    if not isinstance(v, str):
        raise BadValue(f"expected a string, got {type_name(v)}")
    if not v:
        raise BadValue("must not be empty")
    return v


def _p_bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise BadValue(f"expected true or false, got {type_name(v)}")
    return v


def _k_int(lo: int, hi: int, name: str | None = None) -> _Kind:
    def parse(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise BadValue(f"expected an integer, got {type_name(v)}")
        if not lo <= v <= hi:
            raise BadValue(f"{v} is out of range {lo}..{hi}")
        return v

    return _Kind(name or f"integer {lo}..{hi}", parse)


def _k_number(minimum: float, *, exclusive: bool, name: str) -> _Kind:
    def parse(v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise BadValue(f"expected a number, got {type_name(v)}")
        f = float(v)
        if f != f or f in (float("inf"), float("-inf")):
            raise BadValue("must be a finite number")
        if f < minimum or (exclusive and f == minimum):
            raise BadValue(f"must be {'>' if exclusive else '>='} {toml_literal(minimum)}")
        return f

    return _Kind(name, parse)


def _k_choice(options: tuple[str, ...]) -> _Kind:
    def parse(v: object) -> str:
        s = _p_str(v)
        if s not in options:
            shown = ", ".join(f'"{o}"' for o in options)
            raise BadValue(f'"{s}" is not one of {shown}' + suggest(s, options))
        return s

    return _Kind(" | ".join(f'"{o}"' for o in options), parse)


def _p_ipv4(v: object) -> str:
    s = _p_str(v)
    try:
        return str(ipaddress.IPv4Address(s))
    except ValueError:
        raise BadValue(f'"{s}" is not an IPv4 address') from None


def _network(s: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(s, strict=False)
    except ValueError:
        raise BadValue(f'"{s}" is not an IPv4 network (CIDR such as "10.0.0.0/24")') from None


def _p_network(v: object) -> str:
    return str(_network(_p_str(v)))


def _k_networks(*, allow_empty: bool) -> _Kind:
    def parse(v: object) -> tuple[str, ...]:
        if not isinstance(v, list):
            raise BadValue(f"expected an array of CIDR strings, got {type_name(v)}")
        if not v and not allow_empty:
            raise BadValue("must list at least one network")
        out: list[str] = []
        for i, item in enumerate(v, 1):
            try:
                out.append(_p_network(item))
            except BadValue as e:
                raise BadValue(str(e), f"[{i}]") from None
        return tuple(out)

    return _Kind("array of CIDR", parse)


def _p_port_range(v: object) -> PortRange:
    if isinstance(v, str):
        lo_s, sep, hi_s = v.partition("-")
        if not sep or not lo_s.strip().isdigit() or not hi_s.strip().isdigit():
            raise BadValue(f'"{v}" is not a port range such as "61000-65535"')
        lo, hi = int(lo_s), int(hi_s)
    elif isinstance(v, list):
        if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise BadValue("expected [low, high] with two integers")
        lo, hi = v[0], v[1]
    else:
        raise BadValue(f'expected "low-high" or [low, high], got {type_name(v)}')
    if not 1 <= lo <= hi <= 65535:
        raise BadValue(f"{lo}-{hi} is not a range within 1..65535 with low <= high")
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
            raise BadValue(f'expected "auto" or an integer, got {type_name(v)}')
        if not 0 <= v <= 100_000_000:
            raise BadValue(f"{v} is out of range 0..100000000")
        return v

    return _Kind(name, parse, lambda v: f'"{AUTO}"' if v is None else toml_literal(v))


def _p_helpers(v: object) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise BadValue(f"expected an array of helper names, got {type_name(v)}")
    seen: list[str] = []
    for i, item in enumerate(v, 1):
        if not isinstance(item, str):
            raise BadValue(f"expected a helper name, got {type_name(item)}", f"[{i}]")
        if item not in KNOWN_HELPERS:
            raise BadValue(
                f"unknown helper '{item}' (known: {', '.join(KNOWN_HELPERS)})"
                + suggest(item, KNOWN_HELPERS),
                f"[{i}]",
            )
        if item in seen:
            raise BadValue(f"helper '{item}' is listed twice", f"[{i}]")
        seen.append(item)
    return tuple(seen)


def _p_abs_path(v: object) -> str:
    s = _p_str(v)
    if not s.startswith("/"):
        raise BadValue(f'"{s}" must be an absolute path (the daemon runs with / as its directory)')
    return s


def _p_socket_path(v: object) -> str:
    s = _p_abs_path(v)
    if len(s.encode()) > MAX_UNIX_PATH:
        raise BadValue(f"is {len(s.encode())} bytes; a UNIX socket path has at most {MAX_UNIX_PATH}")
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
        raise BadValue(f"{s!r} is not a valid interface name: {why}")
    return s


def _p_host_port(v: object) -> str:
    s = _p_str(v)
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadValue(f'"{s}" is not "address:port" (e.g. "127.0.0.1:9464" or ":9464")')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not all(part.isalnum() or "-" in part for part in host.split(".")):
                raise BadValue(f'"{host}" is not an address or host name') from None
    return s


def _p_mss(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadValue(f"expected an integer, got {type_name(v)}")
    if v != 0 and not MIN_MSS <= v <= MAX_MSS:
        raise BadValue(
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
            lambda v: f'"{AUTO}"' if v is None else toml_literal(v),
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
            lambda v: f'"{AUTO}"' if v is None else toml_literal(v),
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
TABLES: dict[str, tuple[type[Any], str, tuple[KeySpec, ...]]] = {
    "timeouts": (Timeouts, "timeouts", TIMEOUT_KEYS),
    "limits": (Limits, "limits", LIMIT_KEYS),
    "esp": (EspPolicy, "esp", ESP_KEYS),
    "sync": (Sync, "sync", SYNC_KEYS),
}
TOP_BY_KEY = {s.key: s for s in TOP_KEYS}
# What to write when a required top-level key is missing.
REQUIRED_HINT = {
    "outside_interface": 'the interface that faces the Internet, e.g. outside_interface = "eth0"',
    "inside_networks": 'the LANs to masquerade, e.g. inside_networks = ["192.168.1.0/24"]',
}
TOP_NAMES: tuple[str, ...] = (*(s.key for s in TOP_KEYS), *TABLES, "forward", "route")


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


