"""Shared test vocabulary: fixed address roles (libalias style) and packet builders.

MASQ is the gateway's public address; PRV1..3 are LAN hosts; EXT and EXT2 outside hosts.
"""

from __future__ import annotations

from vpnmasq.config import Config, Limits, PortRange
from vpnmasq.engine import Engine
from vpnmasq.helpers import available
from vpnmasq.packet.checksum import checksum, pseudo_header_sum
from vpnmasq.packet.ipv4 import PROTO_ESP, IPv4, build_ipv4, ip_to_int
from vpnmasq.packet.l4 import build_esp, build_gre_v1, build_icmp, build_tcp, build_udp
from vpnmasq.verdict import Action, Direction, Verdict

MASQ = ip_to_int("198.51.100.1")
PRV1 = ip_to_int("10.77.0.11")
PRV2 = ip_to_int("10.77.0.12")
PRV3 = ip_to_int("10.77.0.13")
SRV_LAN = ip_to_int("10.77.0.5")
EXT = ip_to_int("203.0.113.20")
EXT2 = ip_to_int("203.0.113.21")
ATTACKER = ip_to_int("192.0.2.66")

OUT = Direction.OUTBOUND
IN = Direction.INBOUND

__all__ = [
    "MASQ", "PRV1", "PRV2", "PRV3", "SRV_LAN", "EXT", "EXT2", "ATTACKER", "OUT", "IN",
    "make_engine", "build_tcp", "build_udp", "build_icmp", "build_esp", "build_gre_v1",
    "ip_of", "l4_ports", "assert_checksums_ok", "accepted", "dropped", "NO_HOST_LIMITS",
    "esp_packet",
]


#: the per-host limits off (they are on by default): for tests that make many mappings from
#: one host at one instant
NO_HOST_LIMITS = Limits(max_entries_per_host=0, max_ports_per_host=0, max_new_per_host_per_second=0)


def esp_packet(src: int, dst: int, spi: int, seq: int = 1) -> bytearray:
    """An IPv4 packet carrying ESP (raw, IP protocol 50) with this SPI and sequence number."""
    return build_ipv4(src, dst, PROTO_ESP, build_esp(spi, seq))


def make_engine(**overrides: object) -> Engine:
    kw: dict[str, object] = {
        "inside_networks": ("10.77.0.0/24",),
        "public_address": "198.51.100.1",
        "mode": "userspace",
        # the hybrid default range: tests name ports outside it as the gateway's own
        "port_range": PortRange(61000, 65535),
        # every helper that is importable (the VPN helpers' own tests require theirs)
        "helpers": tuple(h for h in Config().helpers if h in available()),
    }
    kw.update(overrides)
    seed = kw.pop("rng_seed", 0x0B61)
    return Engine(Config(**kw), rng_seed=seed)  # type: ignore[arg-type]


def ip_of(v: Verdict | bytes | bytearray) -> IPv4:
    data = v.payload if isinstance(v, Verdict) else v
    assert data is not None, "verdict carries no payload"
    return IPv4(bytearray(data))


def l4_ports(v: Verdict | bytes | bytearray) -> tuple[int, int]:
    ip = ip_of(v)
    return ip.u16(0), ip.u16(2)


def assert_checksums_ok(data: bytes | bytearray) -> None:
    """IP header checksum and, for unfragmented TCP/UDP/ICMP, the L4 checksum."""
    ip = IPv4(bytearray(data))
    assert ip.header_checksum_ok(), "bad IPv4 header checksum"
    if ip.is_fragment:
        return
    seg = bytes(ip.payload())
    if ip.proto in (6, 17):
        if ip.proto == 17 and seg[6:8] == b"\x00\x00":
            return
        s = checksum(seg, pseudo_header_sum(ip.src, ip.dst, ip.proto, len(seg)))
        assert s == 0, f"bad L4 checksum for proto {ip.proto}"
    elif ip.proto == 1:
        assert checksum(seg) == 0, "bad ICMP checksum"


def accepted(v: Verdict) -> IPv4:
    assert v.action is Action.ACCEPT, f"expected ACCEPT, got {v.action} ({v.reason}: {v.detail})"
    assert v.payload is not None
    assert_checksums_ok(v.payload)
    return ip_of(v)


def dropped(v: Verdict, reason: object = None) -> Verdict:
    assert v.action is Action.DROP, f"expected DROP, got {v.action}"
    if reason is not None:
        assert v.reason == reason, f"expected {reason}, got {v.reason} ({v.detail})"
    return v
