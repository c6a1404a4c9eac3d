"""``vpnmasq replay``: run a packet capture through the engine, offline.

Reads a pcap or pcapng file (scapy's readers; Ethernet with VLAN tags, Linux cooked
SLL/SLL2, raw IP and BSD loopback link types), treats every IPv4 packet whose source is in
an inside network as OUTBOUND and every other one as INBOUND, and hands it to
:class:`vpnmasq.engine.Engine` with ``now`` = its capture timestamp. What the gateway would
forward is written to the output file as raw IPv4 (LINKTYPE_RAW) with the capture
timestamps, so Wireshark and tshark read it directly.

Design notes, kernel facts and measurements: docs/internals/tools-replay.md.
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from scapy.error import Scapy_Exception
from scapy.utils import RawPcapNgReader, RawPcapReader, RawPcapWriter

from vpnmasq.config import Config
from vpnmasq.events import EntryCreated, Row
from vpnmasq.packet.ipv4 import ip_to_int
from vpnmasq.status import kind_of
from vpnmasq.tools.status import render_text
from vpnmasq.verdict import Action, Direction, Verdict

# Link types (https://www.tcpdump.org/linktypes.html)
LINKTYPE_NULL = 0  # BSD loopback, 4-byte address family in the capturing host's byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4/IPv6, version from the first nibble
LINKTYPE_LOOP = 108  # OpenBSD loopback, address family in network byte order
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_LINUX_SLL2 = 276
DLT_RAW_ALIASES = (12, 14)  # DLT_RAW as written by some platforms' libpcap
SUPPORTED_LINKTYPES = {
    LINKTYPE_NULL: "BSD loopback",
    LINKTYPE_ETHERNET: "Ethernet",
    LINKTYPE_RAW: "raw IP",
    12: "raw IP",
    14: "raw IP",
    LINKTYPE_LOOP: "OpenBSD loopback",
    LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_LINUX_SLL2: "Linux cooked v2 (SLL2)",
}
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
AF_INET = 2


class ReplayError(Exception):
    """The replay cannot run (bad input file, missing public_address). Operator-facing."""


@dataclass
class ReplayReport:
    """What happened, for the summary and for tests."""

    frames: int = 0  # records in the capture
    outbound: int = 0  # IPv4 packets given to the engine, per direction
    inbound: int = 0
    written: int = 0  # packets in the output file
    rewritten: int = 0  # ... of which the engine changed
    accepted_local: int = 0  # inbound packets for the gateway itself (not forwarded)
    dropped: Counter[str] = field(default_factory=Counter)  # by DropReason value
    skipped: Counter[str] = field(default_factory=Counter)  # not given to the engine, by why
    mappings_created: Counter[str] = field(default_factory=Counter)  # by proto/helper kind
    held: int = 0  # HOLD verdicts
    held_at_end: int = 0  # still held when the capture ended
    clock_clamped: int = 0  # timestamps that went backwards
    rows: list[Row] = field(default_factory=list)  # the table at the last timestamp
    counters: dict[str, int] = field(default_factory=dict)
    first_ts: float | None = None
    last_ts: float | None = None

    @property
    def packets_in(self) -> int:
        return self.outbound + self.inbound

    @property
    def accepted(self) -> int:
        return self.written + self.accepted_local


# ------------------------------------------------------------------------------ link layer
def ip_from_frame(linktype: int, frame: bytes) -> tuple[bytes | None, str]:  # noqa: C901 - one branch per capture link type
    """The IPv4 datagram in ``frame`` (trailing link padding removed), or None and why not."""
    off: int
    ethertype: int | None = None
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None, "short link header"
        ethertype, off = int.from_bytes(frame[12:14], "big"), 14
    elif linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None, "short link header"
        ethertype, off = int.from_bytes(frame[14:16], "big"), 16
    elif linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return None, "short link header"
        ethertype, off = int.from_bytes(frame[0:2], "big"), 20
    elif linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, *DLT_RAW_ALIASES):
        off = 0
    elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if len(frame) < 4:
            return None, "short link header"
        fam = frame[:4]
        if linktype == LINKTYPE_LOOP:
            is_inet = int.from_bytes(fam, "big") == AF_INET
        else:
            is_inet = AF_INET in (int.from_bytes(fam, "little"), int.from_bytes(fam, "big"))
        if not is_inet:
            return None, "not IPv4"
        off = 4
    else:
        return None, f"link type {linktype} not supported"
    while ethertype in VLAN_TPIDS:
        if len(frame) < off + 4:
            return None, "short link header"
        ethertype = int.from_bytes(frame[off + 2 : off + 4], "big")
        off += 4
    if ethertype is not None and ethertype != ETH_P_IP:
        return None, "IPv6 (not handled)" if ethertype == ETH_P_IPV6 else "not IPv4"
    ip = frame[off:]
    if not ip:
        return None, "empty"
    version = ip[0] >> 4
    if version == 6:
        return None, "IPv6 (not handled)"
    if version != 4:
        return None, "not IPv4"
    if len(ip) >= 4:
        total = int.from_bytes(ip[2:4], "big")
        if total > len(ip):
            return None, "truncated in capture"
        if 20 <= total < len(ip):
            ip = ip[:total]  # Ethernet minimum-frame padding
    return bytes(ip), ""


# ------------------------------------------------------------------------------ capture I/O
@dataclass(frozen=True, slots=True)
class _Frame:
    data: bytes
    linktype: int
    ts_ns: int
    truncated: bool


def open_capture(path: str) -> Iterator[_Frame]:
    """Open ``path`` now (so a bad file fails before anything else happens); iterate later."""
    try:
        reader = RawPcapReader(path)
    except (Scapy_Exception, EOFError) as e:
        raise ReplayError(f"{path} is not a pcap or pcapng capture ({e})") from None
    except OSError as e:
        raise ReplayError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(reader, RawPcapNgReader) and reader.linktype not in SUPPORTED_LINKTYPES:
        reader.close()
        raise ReplayError(
            f"{path}: link type {reader.linktype} is not supported (supported: "
            + ", ".join(sorted(set(SUPPORTED_LINKTYPES.values())))
            + ")"
        )
    return _frames(reader)


def _frames(reader: Any) -> Iterator[_Frame]:
    """pcapng gives a link type and resolution per interface; pcap one per file."""
    try:
        if isinstance(reader, RawPcapNgReader):
            records: Iterator[tuple[bytes, Any]] = iter(reader)  # scapy's types say pcap
            for data, meta in records:
                ts_ns = ((meta.tshigh << 32) | meta.tslow) * 1_000_000_000 // meta.tsresol
                yield _Frame(data, meta.linktype, ts_ns, len(data) < meta.wirelen)
        else:
            scale = 1 if reader.nano else 1000
            for data, meta in reader:
                yield _Frame(
                    data,
                    reader.linktype,
                    meta.sec * 1_000_000_000 + meta.usec * scale,
                    len(data) < meta.caplen or meta.caplen < meta.wirelen,
                )
    finally:
        reader.close()


class _RawIPv4Writer:
    """LINKTYPE_RAW pcap, nanosecond timestamps (what the input had, without rounding)."""

    def __init__(self, path: str) -> None:
        try:
            self._w = RawPcapWriter(path, linktype=LINKTYPE_RAW, nano=True, snaplen=65535)
            self._w.write_header(None)
        except OSError as e:
            raise ReplayError(f"cannot write {path}: {e.strerror or e}") from None

    def write(self, packet: bytes, ts_ns: int) -> None:
        sec, nsec = divmod(ts_ns, 1_000_000_000)
        self._w.write_packet(packet, sec=sec, usec=nsec)

    def close(self) -> None:
        self._w.close()


# ------------------------------------------------------------------------------ replay
def replay(  # noqa: C901 - the replay loop: read, engine, count, write
    config: Config,
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    seed: int | None = 0,
) -> ReplayReport:
    """Replay ``in_path`` through a fresh engine; write forwarded packets to ``out_path``.

    ``seed`` fixes the engine's port choices so two runs give the same output.
    """
    from vpnmasq.engine import Engine  # the engine is the only heavy import; keep it here

    if config.public_address is None:
        raise ReplayError(
            "replay needs public_address in the config (the address the gateway "
            'masquerades to); add e.g. public_address = "198.51.100.1"'
        )
    public = ipaddress.IPv4Address(config.public_address)
    inside = config.inside_nets()
    frames = open_capture(os.fspath(in_path))
    engine = Engine(config, ip_to_int(config.public_address), rng_seed=seed)
    report = ReplayReport()
    held: dict[int, bytes] = {}  # packet index -> original datagram
    writer = _RawIPv4Writer(os.fspath(out_path))
    now = float("-inf")

    def settle(token: object, verdict: Verdict, original: bytes, ts_ns: int) -> None:
        if verdict.action is Action.HOLD:
            report.held += 1
        elif verdict.action is Action.DROP:
            reason = verdict.reason.value if verdict.reason else "unspecified"
            report.dropped[reason] += 1
        elif verdict.local:
            report.accepted_local += 1
        else:
            if verdict.payload is not None and verdict.payload != original:
                report.rewritten += 1
            writer.write(verdict.payload if verdict.payload is not None else original, ts_ns)
            report.written += 1
        for tok, v in verdict.released:
            if isinstance(tok, int) and tok in held:
                settle(tok, v, held.pop(tok), ts_ns)

    def count_events() -> None:
        for ev in engine.drain_events():
            if isinstance(ev, EntryCreated):
                report.mappings_created[kind_of(ev.row)] += 1

    try:
        for index, frame in enumerate(frames):
            report.frames += 1
            if frame.truncated:
                report.skipped["truncated in capture"] += 1
                continue
            ip, why = ip_from_frame(frame.linktype, frame.data)
            if ip is None:
                report.skipped[why] += 1
                continue
            t = frame.ts_ns / 1e9
            if t < now:
                report.clock_clamped += 1
            now = max(now, t)
            if report.first_ts is None:
                report.first_ts = t
            report.last_ts = t
            deadline = engine.next_deadline()
            if deadline is not None and deadline <= now:
                for tok, v in engine.handle_timer(now):
                    if isinstance(tok, int) and tok in held:
                        settle(tok, v, held.pop(tok), frame.ts_ns)
            src = ipaddress.IPv4Address(ip[12:16]) if len(ip) >= 20 else None
            if src is not None and src == public:
                report.skipped["from the public address (captured after masquerading)"] += 1
                continue
            outbound = src is not None and any(src in n for n in inside)
            direction = Direction.OUTBOUND if outbound else Direction.INBOUND
            if outbound:
                report.outbound += 1
            else:
                report.inbound += 1
            verdict = engine.handle(ip, direction, now, token=index)
            if verdict.action is Action.HOLD:
                held[index] = ip
            settle(index, verdict, ip, frame.ts_ns)
            count_events()
    finally:
        writer.close()
    count_events()
    report.held_at_end = len(held)
    if report.last_ts is not None:
        report.rows = engine.snapshot(now)
    report.counters = dict(engine.counters)
    return report


# ------------------------------------------------------------------------------ summary
def summary(
    report: ReplayReport,
    out_path: str | os.PathLike[str] | None = None,
    *,
    with_table: bool = True,
) -> Group:
    """A rich renderable: packet counts, drops by reason, mappings, the final table
    (:func:`final_table`; :func:`print_summary` writes it unwrapped)."""
    t = Table(title="replay summary", show_header=False, box=None, pad_edge=False)
    t.add_column(justify="left")
    t.add_column(justify="right")
    span = ""
    if report.first_ts is not None and report.last_ts is not None:
        span = f" over {report.last_ts - report.first_ts:.3f} s"
    t.add_row("records in capture", str(report.frames))
    t.add_row(f"IPv4 packets in{span}", str(report.packets_in))
    t.add_row("  outbound (from an inside network)", str(report.outbound))
    t.add_row("  inbound", str(report.inbound))
    t.add_row(
        "packets out" + (f" ({os.fspath(out_path)})" if out_path else ""), str(report.written)
    )
    t.add_row("  rewritten", str(report.rewritten))
    t.add_row("accepted for the gateway itself (not forwarded)", str(report.accepted_local))
    t.add_row("dropped", str(sum(report.dropped.values())))
    for reason, n in sorted(report.dropped.items()):
        t.add_row(f"  {reason}", str(n))
    if report.held:
        t.add_row("held (fragments)", str(report.held))
        t.add_row("  still held at the end", str(report.held_at_end))
    if report.skipped:
        t.add_row("skipped (not given to the engine)", str(sum(report.skipped.values())))
        for why, n in sorted(report.skipped.items()):
            t.add_row(f"  {why}", str(n))
    if report.clock_clamped:
        t.add_row("timestamps that went backwards", str(report.clock_clamped))
    t.add_row("mappings created", str(sum(report.mappings_created.values())))
    for kind, n in sorted(report.mappings_created.items()):
        t.add_row(f"  {kind}", str(n))
    title = Text(f"\nmasquerade table at the end ({len(report.rows)} entries)", style="bold")
    if not with_table:
        return Group(t, title)
    return Group(t, title, Text(final_table(report), overflow="fold"))


def final_table(report: ReplayReport) -> str:
    """The table at the end as plain columns, like ``vpnmasq status``: a rich table elides
    cells that do not fit, and cookies, SPIs and Call IDs must be read in full."""
    if not report.rows:
        return "(empty)"
    return render_text(report.rows, {}).rstrip("\n").rsplit("\n", 1)[0].rstrip("\n")


def print_summary(
    report: ReplayReport, out_path: str | None = None, console: Console | None = None
) -> None:
    con = console or Console()
    con.print(summary(report, out_path, with_table=False))
    con.out(final_table(report), highlight=False)  # whole lines: the terminal wraps them
