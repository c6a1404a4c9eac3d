"""``vpnmasq replay``: captures built with scapy go through the real engine.

Roles: two LAN hosts PRV1/PRV2 in 10.77.0.0/24, the gateway's public address PUB, a
server EXT on the Internet.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from scapy.layers.inet import ICMP, IP, TCP, UDP, defragment, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1Q, Ether
from scapy.packet import Packet, Padding, Raw
from scapy.utils import PcapNgWriter, RawPcapReader, wrpcap

from tests.config_text import with_required
from vpnmasq.config import Config, load_config
from vpnmasq.tools.replay import (
    LINKTYPE_RAW,
    ReplayError,
    ReplayReport,
    ip_from_frame,
    print_summary,
    replay,
    summary,
)

PRV1, PRV2 = "10.77.0.11", "10.77.0.12"
PUB = "198.51.100.1"
EXT = "203.0.113.9"
T0 = 1_700_000_000.0

# Plain NAPT needs no helpers, so these tests do not depend on the VPN helpers' progress.
PLAIN = load_config(
    f'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\npublic_address = "{PUB}"\nmode = "userspace"\n'
    "helpers = []\n"
)


def at(pkt: Packet, t: float) -> Packet:
    pkt.time = T0 + t
    return pkt


def same_ports_two_hosts() -> list[Packet]:
    """PRV1 and PRV2 both use UDP 40000 and TCP 40001 to the same server ports."""
    pkts = []
    for i, host in enumerate((PRV1, PRV2)):
        pkts.append(
            at(
                Ether() / IP(src=host, dst=EXT) / UDP(sport=40000, dport=53) / Raw(b"q" * 12),
                i * 0.1,
            )
        )
        pkts.append(
            at(
                Ether()
                / IP(src=host, dst=EXT)
                / TCP(sport=40001, dport=80, flags="S", seq=1000 + i),
                i * 0.1 + 0.01,
            )
        )
    return pkts


def read_out(path: Path) -> list[tuple[bytes, float]]:
    reader = RawPcapReader(str(path))
    assert reader.linktype == LINKTYPE_RAW
    out = [(data, meta.sec + meta.usec / (1e9 if reader.nano else 1e6)) for data, meta in reader]
    reader.close()
    return out


def checksums_ok(raw: bytes) -> bool:
    """Scapy recomputes every checksum from scratch; the bytes must not change.

    A fragment carries only part of the transport segment: only its IP header is checked
    (reassemble with scapy's ``defragment`` to check the rest)."""
    pkt = IP(raw)
    del pkt.chksum
    if pkt.frag or pkt.flags.MF:
        return bytes(pkt) == raw
    for layer in (TCP, UDP, ICMP):
        if layer in pkt:
            del pkt[layer].chksum
    return bytes(pkt) == raw


def run(
    tmp_path: Path, pkts: list[Packet], config: Config = PLAIN, name: str = "in.pcap", **kw: Any
) -> tuple[ReplayReport, list[tuple[bytes, float]]]:
    src = tmp_path / name
    wrpcap(str(src), pkts, **kw)
    out = tmp_path / "out.pcap"
    report = replay(config, src, out)
    return report, read_out(out)


# ------------------------------------------------------------------------------ core case
def test_two_hosts_same_ports_get_distinct_outside_ports(tmp_path: Path) -> None:
    report, out = run(tmp_path, same_ports_two_hosts())
    assert report.outbound == 4 and report.written == 4 and report.rewritten == 4
    assert not report.dropped
    pkts = [IP(data) for data, _ in out]
    assert all(p.src == PUB for p in pkts)
    udp_ports = [p[UDP].sport for p in pkts if UDP in p]
    tcp_ports = [p[TCP].sport for p in pkts if TCP in p]
    assert len(set(udp_ports)) == 2 and len(set(tcp_ports)) == 2
    assert all(checksums_ok(data) for data, _ in out)
    assert report.mappings_created == {"udp": 2, "tcp": 2}
    assert {r.inside for r in report.rows} == {
        f"{PRV1}:40000",
        f"{PRV2}:40000",
        f"{PRV1}:40001",
        f"{PRV2}:40001",
    }


def test_output_keeps_capture_timestamps(tmp_path: Path) -> None:
    pkts = same_ports_two_hosts()
    _, out = run(tmp_path, pkts)
    assert [round(ts, 6) for _, ts in out] == [round(float(p.time), 6) for p in pkts]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_says_every_checksum_is_good(tmp_path: Path) -> None:
    run(tmp_path, same_ports_two_hosts())
    res = subprocess.run(
        [
            "tshark",
            "-r",
            str(tmp_path / "out.pcap"),
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-T",
            "fields",
            "-e",
            "ip.checksum.status",
            "-e",
            "tcp.checksum.status",
            "-e",
            "udp.checksum.status",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = res.stdout.splitlines()
    assert len(lines) == 4
    for line in lines:
        statuses = [f for f in line.split("\t") if f]
        # tshark prints 1 for Good (0 Bad, 2 Unverified): IP plus one of TCP/UDP per packet
        assert statuses == ["1", "1"], line


def test_replies_are_translated_back_and_runs_are_repeatable(tmp_path: Path) -> None:
    first, out = run(tmp_path, same_ports_two_hosts())
    udp = [IP(d) for d, _ in out if UDP in IP(d)]
    replies = [
        at(
            Ether() / IP(src=EXT, dst=PUB) / UDP(sport=53, dport=p[UDP].sport) / Raw(b"a" * 20),
            1 + i,
        )
        for i, p in enumerate(udp)
    ]
    # same seed, same allocations: the replies match the first run's outside ports
    report, out2 = run(tmp_path, same_ports_two_hosts() + replies, name="in2.pcap")
    assert report.inbound == 2 and report.written == 6 and not report.dropped
    back = [IP(d) for d, _ in out2[4:]]
    assert [(p.dst, p[UDP].dport) for p in back] == [(PRV1, 40000), (PRV2, 40000)]
    assert all(checksums_ok(d) for d, _ in out2)


def test_timeouts_run_on_capture_time(tmp_path: Path) -> None:
    pkts = [
        at(Ether() / IP(src=PRV1, dst=EXT) / UDP(sport=40000, dport=53), 0),
    ]
    _, out = run(tmp_path, pkts)
    port = IP(out[0][0])[UDP].sport
    late = at(Ether() / IP(src=EXT, dst=PUB) / UDP(sport=53, dport=port), 301)  # udp = 300 s
    report, out = run(tmp_path, [*pkts, late], name="late.pcap")
    assert report.written == 1
    assert report.dropped == {"no-mapping": 1}


def test_unsolicited_inbound_is_dropped(tmp_path: Path) -> None:
    report, out = run(tmp_path, [at(Ether() / IP(src=EXT, dst=PUB) / UDP(sport=1, dport=9), 0)])
    assert out == [] and report.dropped == {"no-mapping": 1} and report.inbound == 1


# ------------------------------------------------------------------------------ link layers
def _as(kind: str, p: Packet) -> Packet:
    ip = p[IP]
    ip.remove_underlayer(None)
    q: Packet
    if kind == "sll":
        q = CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6) / ip
    elif kind == "sll2":
        q = CookedLinuxV2(proto=0x0800) / ip
    elif kind == "vlan":
        q = Ether() / Dot1Q(vlan=7) / ip
    elif kind == "raw":
        q = ip
    else:
        q = Ether() / ip
    q.time = p.time
    return q


@pytest.mark.parametrize("kind", ["ether", "sll", "sll2", "vlan", "raw"])
def test_link_types_give_the_same_output(tmp_path: Path, kind: str) -> None:
    _, want = run(tmp_path, same_ports_two_hosts(), name="ref.pcap")
    pkts = [_as(kind, p) for p in same_ports_two_hosts()]
    kw: dict[str, Any] = {"linktype": LINKTYPE_RAW} if kind == "raw" else {}
    report, got = run(tmp_path, pkts, name=f"{kind}.pcap", **kw)
    assert report.written == 4
    assert got == want


def test_pcapng_input(tmp_path: Path) -> None:
    _, want = run(tmp_path, same_ports_two_hosts(), name="ref.pcap")
    src = tmp_path / "in.pcapng"
    w = PcapNgWriter(str(src))
    for p in same_ports_two_hosts():
        w.write(p)
    w.close()
    out = tmp_path / "out.pcap"
    report = replay(PLAIN, src, out)
    assert report.written == 4
    assert [d for d, _ in read_out(out)] == [d for d, _ in want]


def test_ethernet_padding_is_removed_and_non_ip_is_skipped(tmp_path: Path) -> None:
    pkts = [
        at(
            Ether()
            / IP(src=PRV1, dst=EXT)
            / UDP(sport=5000, dport=7)
            / Raw(b"x")
            / Padding(b"\0" * 17),
            0,
        ),
        at(Ether() / ARP(psrc=PRV1, pdst="10.77.0.1"), 0.1),
        at(Ether() / IPv6(src="fd00::1", dst="2001:db8::1") / UDP(), 0.2),
        at(Ether() / IP(src=PUB, dst=EXT) / UDP(sport=61000, dport=7), 0.3),
    ]
    report, out = run(tmp_path, pkts)
    assert report.frames == 4 and report.written == 1
    assert len(out[0][0]) == 20 + 8 + 1
    assert report.skipped == {
        "not IPv4": 1,
        "IPv6 (not handled)": 1,
        "from the public address (captured after masquerading)": 1,
    }


def test_ip_from_frame_rejects_truncated_datagrams() -> None:
    raw = bytes(IP(src=PRV1, dst=EXT) / UDP() / Raw(b"x" * 40))
    assert ip_from_frame(LINKTYPE_RAW, raw) == (raw, "")
    assert ip_from_frame(LINKTYPE_RAW, raw[:30]) == (None, "truncated in capture")
    assert ip_from_frame(1, b"\x00" * 10) == (None, "short link header")
    assert ip_from_frame(105, raw) == (None, "link type 105 not supported")
    bsd_loopback = (2).to_bytes(4, "little") + raw
    assert ip_from_frame(0, bsd_loopback) == (raw, "")


# ------------------------------------------------------------------------------ fragments
def test_out_of_order_fragments_are_held_then_released(tmp_path: Path) -> None:
    big = IP(src=PRV1, dst=EXT, id=4242) / UDP(sport=6000, dport=9) / Raw(b"z" * 1400)
    frags = fragment(big, fragsize=800)  # type: ignore[no-untyped-call]
    assert len(frags) == 2
    pkts = [at(Ether() / frags[1], 0.0), at(Ether() / frags[0], 0.5)]  # last fragment first
    report, out = run(tmp_path, pkts)
    assert report.held == 1 and report.held_at_end == 0
    assert report.written == 2 and not report.dropped
    first, second = (IP(d) for d, _ in out)
    assert first.frag == 0 and second.frag > 0  # the held one is written when released
    assert first.src == second.src == PUB
    assert [round(ts - T0, 3) for _, ts in out] == [0.5, 0.5]  # released at the moment of release
    assert all(checksums_ok(d) for d, _ in out)
    (whole,) = defragment([IP(d) for d, _ in out])  # type: ignore[no-untyped-call]
    assert whole[UDP].sport == IP(out[0][0])[UDP].sport and whole[Raw].load == b"z" * 1400
    assert checksums_ok(bytes(whole))


# ------------------------------------------------------------------------------ errors / summary
def test_public_address_is_required(tmp_path: Path) -> None:
    wrpcap(str(tmp_path / "in.pcap"), same_ports_two_hosts())
    with pytest.raises(ReplayError, match="needs public_address"):
        replay(load_config(with_required("")), tmp_path / "in.pcap", tmp_path / "out.pcap")


def test_not_a_capture(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, this is not a pcap file\n")
    with pytest.raises(ReplayError, match="not a pcap or pcapng capture"):
        replay(PLAIN, bad, tmp_path / "out.pcap")


def test_unsupported_link_type(tmp_path: Path) -> None:
    wrpcap(str(tmp_path / "wifi.pcap"), [Raw(b"\x00" * 30)], linktype=105)
    with pytest.raises(ReplayError, match="link type 105 is not supported"):
        replay(PLAIN, tmp_path / "wifi.pcap", tmp_path / "out.pcap")


def test_summary_mentions_counts_and_final_table(tmp_path: Path) -> None:
    report, _ = run(tmp_path, same_ports_two_hosts())
    console = Console(width=200, record=True, color_system=None)
    console.print(summary(report, tmp_path / "out.pcap"))
    text = console.export_text()
    for words in (
        "IPv4 packets in",
        "packets out",
        "mappings created",
        "masquerade table at the end (4 entries)",
        f"{PRV2}:40001",
    ):
        assert words in text


# ------------------------------------------------------------------------------ VPN helpers
def test_isakmp_from_two_hosts_keeps_source_port_500(tmp_path: Path) -> None:
    """HOWTO 2.10: ISAKMP keeps UDP source port 500 for every client; cookies tell them
    apart, so both inside hosts reach the same server from PUB:500."""
    cfg = load_config(
        f'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\npublic_address = "{PUB}"\n'
        'mode = "userspace"\nhelpers = ["isakmp"]\n'
    )

    def ike(host: str, icookie: bytes) -> Packet:
        # ISAKMP header: initiator cookie, zero responder cookie, next payload SA (1),
        # version 1.0, exchange main mode (2), flags 0, message id 0, length 28
        hdr = icookie + b"\0" * 8 + bytes([1, 0x10, 2, 0]) + b"\0" * 4 + (28).to_bytes(4, "big")
        return Ether() / IP(src=host, dst=EXT) / UDP(sport=500, dport=500) / Raw(hdr)

    pkts = [at(ike(PRV1, b"\x11" * 8), 0), at(ike(PRV2, b"\x22" * 8), 0.1)]
    report, out = run(tmp_path, pkts, config=cfg)
    assert report.written == 2, report.dropped
    assert [(IP(d).src, IP(d)[UDP].sport) for d, _ in out] == [(PUB, 500), (PUB, 500)]
    # the final table shows the full 64-bit cookies, even on a narrow terminal
    console = Console(width=80, record=True)
    print_summary(report, str(tmp_path / "out.pcap"), console)
    text = console.export_text()
    assert "1111111111111111" in text and "2222222222222222" in text
