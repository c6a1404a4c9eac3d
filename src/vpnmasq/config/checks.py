"""Checks across keys (overlapping ranges, forwards, routes, sync) that make a file an
error, and warnings (timeouts below RFC minimums, upstream NAT, ...) that do not.
"""

from __future__ import annotations

import ipaddress

from vpnmasq.config.keys import toml_literal
from vpnmasq.config.locate import Problems
from vpnmasq.config.schema import (
    HYBRID_PORT_RANGE,
    RFC_MINIMUM_TIMEOUTS,
    TYPICAL_IPSEC_REKEY,
    Config,
    Forward,
    PortRange,
)


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


def cross_checks(config: Config, errors: Problems) -> None:  # noqa: C901 - a list of independent checks, a few lines each
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
    route_checks(config, errors)
    sync_checks(config, errors)


def sync_checks(config: Config, errors: Problems) -> None:
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


def route_checks(config: Config, errors: Problems) -> None:
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


def collect_warnings(config: Config, warn: Problems) -> None:  # noqa: C901 - a list of independent warnings, a few lines each
    t = config.timeouts
    for name, (minimum, source) in RFC_MINIMUM_TIMEOUTS.items():
        value = getattr(t, name)
        if value < minimum:
            warn.add(
                f"timeouts.{name}",
                f"{toml_literal(value)} s is below the {source} "
                f"minimum of {toml_literal(minimum)} s; idle flows will lose their mapping",
            )
    if t.esp < TYPICAL_IPSEC_REKEY:
        warn.add(
            "timeouts.esp",
            f"{toml_literal(t.esp)} s is shorter than a typical 1 h "
            "IPsec rekey interval; idle tunnels lose their association (HOWTO 5.7)",
        )
    if t.isakmp < t.esp:
        warn.add(
            "timeouts.isakmp",
            f"{toml_literal(t.isakmp)} s is shorter than timeouts.esp "
            f"({toml_literal(t.esp)} s); rekeys of a quiet tunnel find no ISAKMP entry",
        )
    if t.esp_pending >= t.esp_wait_max:
        warn.add(
            "timeouts.esp_pending",
            f"{toml_literal(t.esp_pending)} s is not below "
            f"timeouts.esp_wait_max ({toml_literal(t.esp_wait_max)} s); a waiting SPI "
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


