"""Host networking the daemon applies around the engine: ``[[route]]`` networks and
the gateway's own VPN endpoints.

Two jobs, each a pure part (tested on text) and a thin applier (``ip``, ``sysctl``, /proc):
the routes to networks behind LAN VPN routers (tagged with :data:`RT_PROTO`, so only ours
are removed), and probing which VPN protocols have a local consumer (``local_vpn = "auto"``).

Design notes, kernel facts and measurements: docs/internals/datapath-routes.md.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vpnmasq.packet.ipv4 import PROTO_ESP, PROTO_GRE
from vpnmasq.packet.l4 import ISAKMP_PORT, NATT_PORT

__all__ = [
    "RT_PROTO",
    "Applied",
    "RouteError",
    "apply_routes",
    "gre_tunnels",
    "local_vpn_consumers",
    "parse_proc_net",
    "remove_routes",
    "route_argv",
    "undo",
]

#: rtnetlink protocol number on vpnmasq's routes (``ip route ... proto 86``): numbers above
#: RTPROT_STATIC (4) and not in /etc/iproute2/rt_protos are free for daemons to claim.
RT_PROTO = 86
IKE_PORTS = (ISAKMP_PORT, NATT_PORT)
#: /proc/net/{udp,raw} socket state 07 = TCP_CLOSE, what unconnected UDP and raw sockets show
_UNCONNECTED = "07"


class RouteError(RuntimeError):
    """A command failed; the message has the command and its stderr."""


class _RouteLike(Protocol):
    @property
    def network(self) -> str: ...

    @property
    def via(self) -> str: ...

    @property
    def send_redirects(self) -> bool: ...


@dataclass
class Applied:
    """What :func:`apply_routes` changed, for :func:`undo`."""

    routes: list[str] = field(default_factory=list)  # networks installed
    sysctls: dict[str, str] = field(default_factory=dict)  # sysctl key -> previous value


# ------------------------------------------------------------------------------ pure parts
def route_argv(network: str, via: str) -> list[str]:
    """``ip route replace`` for one [[route]] (replace: idempotent across restarts)."""
    net = str(ipaddress.IPv4Network(network, strict=False))
    gw = str(ipaddress.IPv4Address(via))
    return ["ip", "route", "replace", net, "via", gw, "proto", str(RT_PROTO)]


def _hex_addr(h: str) -> str:
    """/proc/net little-endian hex IPv4 ("0100007F") -> dotted quad."""
    return str(ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(h), "little")))


def parse_proc_net(text: str) -> list[tuple[str, int, str]]:
    """``/proc/net/udp`` or ``/proc/net/raw`` -> (local address, port, state hex) rows.

    For raw sockets the "port" column is the IP protocol number the socket was opened for.
    """
    out: list[tuple[str, int, str]] = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 4 or ":" not in cols[1]:
            continue
        addr, _, port = cols[1].partition(":")
        try:
            out.append((_hex_addr(addr), int(port, 16), cols[3]))
        except ValueError:
            continue
    return out


def _bound_to(addr: str, public: str | None) -> bool:
    return addr == "0.0.0.0" or public is None or addr == public


def gre_tunnels(link_json: Sequence[dict[str, Any]], public: str | None) -> list[str]:
    """Names of GRE tunnel devices (``ip -d -j link``) whose local end is the public address
    or unset (a tunnel that would receive GRE sent to the public address)."""
    names = []
    for link in link_json:
        info = link.get("linkinfo") or {}
        if info.get("info_kind") not in ("gre", "gretap", "erspan"):
            continue
        local = (info.get("info_data") or {}).get("local")
        if local in (None, "any", "0.0.0.0") or local == public:
            names.append(str(link.get("ifname", "?")))
    return names


def consumers_from(
    udp: str,
    raw: str,
    links: Sequence[dict[str, Any]],
    xfrm_esp_states: int,
    public: str | None,
) -> frozenset[str]:
    """The local VPN consumer kinds, from /proc/net/udp, /proc/net/raw, ``ip -d -j link``
    and the number of kernel ESP states (pure; :func:`local_vpn_consumers` gathers)."""
    kinds: set[str] = set()
    for addr, port, _st in parse_proc_net(udp):
        if port in IKE_PORTS and _bound_to(addr, public):
            kinds.add("ike")
    for addr, proto, _st in parse_proc_net(raw):
        if not _bound_to(addr, public):
            continue
        if proto == PROTO_ESP:
            kinds.add("esp")
        elif proto == PROTO_GRE:
            kinds.add("gre")
    if xfrm_esp_states:
        kinds.add("esp")
    if gre_tunnels(links, public):
        kinds.add("gre")
    return frozenset(kinds)


# ------------------------------------------------------------------------------ appliers
def _prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _run(argv: list[str], netns: str | None, *, check: bool = True) -> str:
    full = _prefix(netns) + argv
    try:
        r = subprocess.run(full, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RouteError(f"{' '.join(argv)}: {e}") from e
    if check and r.returncode != 0:
        raise RouteError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def _read(path: str, netns: str | None) -> str:
    if netns is None:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return f.read()
        except OSError:
            return ""
    return _run(["cat", path], netns, check=False)


def _sysctl_get(key: str, netns: str | None) -> str | None:
    text = _read("/proc/sys/" + key.replace(".", "/"), netns).strip()
    return text or None


def _sysctl_set(key: str, value: str, netns: str | None) -> None:
    _run(["sysctl", "-q", "-w", f"{key}={value}"], netns)


def _dev_towards(via: str, netns: str | None) -> str | None:
    try:
        data = json.loads(_run(["ip", "-j", "route", "get", via], netns) or "[]")
    except (RouteError, ValueError):
        return None
    return str(data[0]["dev"]) if data and "dev" in data[0] else None


def apply_routes(routes: Iterable[_RouteLike], *, netns: str | None = None) -> Applied:
    """Install the [[route]]s; turn redirects off where asked. On failure, undo and raise."""
    applied = Applied()
    try:
        for r in routes:
            _run(route_argv(r.network, r.via), netns)
            applied.routes.append(str(ipaddress.IPv4Network(r.network, strict=False)))
            if not r.send_redirects:
                dev = _dev_towards(r.via, netns)
                for scope in ("all", dev):
                    if scope is None:
                        continue
                    key = f"net.ipv4.conf.{scope}.send_redirects"
                    if key in applied.sysctls:
                        continue
                    old = _sysctl_get(key, netns)
                    if old is not None and old != "0":
                        applied.sysctls[key] = old
                        _sysctl_set(key, "0", netns)
    except RouteError:
        undo(applied, netns=netns)
        raise
    return applied


def remove_routes(*, netns: str | None = None) -> int:
    """Delete every route with vpnmasq's protocol (also after a crash). Returns how many."""
    try:
        data = json.loads(_run(["ip", "-j", "route", "show", "proto", str(RT_PROTO)], netns) or "[]")
    except ValueError:
        return 0
    n = 0
    for r in data:
        dst = r.get("dst")
        if dst:
            _run(["ip", "route", "del", dst, "proto", str(RT_PROTO)], netns, check=False)
            n += 1
    return n


def undo(applied: Applied, *, netns: str | None = None) -> None:
    """Restore the sysctls :func:`apply_routes` changed and remove vpnmasq's routes."""
    for key, old in applied.sysctls.items():
        try:
            _sysctl_set(key, old, netns)
        except RouteError:
            pass
    applied.sysctls.clear()
    remove_routes(netns=netns)
    applied.routes.clear()


def local_vpn_consumers(public: str | None, *, netns: str | None = None) -> frozenset[str]:
    """Which VPN protocols have an endpoint on this machine (see the module docstring)."""
    try:
        links = json.loads(_run(["ip", "-d", "-j", "link", "show"], netns, check=False) or "[]")
    except ValueError:
        links = []
    try:
        xfrm = _run(["ip", "xfrm", "state", "list", "proto", "esp"], netns, check=False)
    except RouteError:
        xfrm = ""
    n_esp = sum(1 for line in xfrm.splitlines() if line.startswith("src "))
    if "encap type espinudp" in xfrm and n_esp:  # NAT-T states ride on the IKE sockets
        n_esp -= xfrm.count("encap type espinudp")
    return consumers_from(
        _read("/proc/net/udp", netns), _read("/proc/net/raw", netns), links, n_esp, public
    )
