"""``vpnmasq trace``: every matching packet before and after translation, as pcapng for
Wireshark, plus decoded one-line debug output (rate-limited).

Pure parts (filters, pcapng blocks, decoding) are tested on bytes; the capture runs in the
daemon through the control socket.

Design notes, kernel facts and measurements: docs/internals/tools-trace.md.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from vpnmasq.helpers.isakmp import IsakmpHeader, MalformedIsakmp
from vpnmasq.helpers.pptp import MESSAGES, PPTP_MAGIC

__all__ = [
    "PROTO_FILTERS",
    "LineLimiter",
    "Observation",
    "PcapngWriter",
    "Tracer",
    "decode",
    "proto_matcher",
]

#: seconds within which the outside copy of a packet is paired with the inside copy
PAIR_WINDOW = 2.0
#: how long a remote a traced host talked to keeps matching on the outside interface
REMOTE_TTL = 600.0
#: pending (unpaired) packets remembered for pairing; oldest forgotten first
MAX_PENDING = 4096
#: decoded lines per flow and second before lines are summarised ("... 40 more")
LINES_PER_SECOND = 5

LINKTYPE_RAW = 101  # pcapng/pcap: raw IPv4/IPv6, no link header

ICMP_TYPES = {
    0: "echo-reply",
    3: "unreachable",
    4: "source-quench",
    5: "redirect",
    8: "echo-request",
    11: "time-exceeded",
    12: "parameter-problem",
    13: "timestamp",
    14: "timestamp-reply",
}
UNREACH_CODES = {
    0: "net",
    1: "host",
    2: "protocol",
    3: "port",
    4: "frag-needed",
    9: "net-prohibited",
    10: "host-prohibited",
    13: "admin-prohibited",
}
PROTO = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 51: "ah"}
TCP_FLAGS = "FSRPAUEC"


# ============================================================================ decoding
def _u16(b: bytes, o: int) -> int:
    return (b[o] << 8) | b[o + 1]


def _u32(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 4], "big")


def decode(pkt: bytes, *, depth: int = 0) -> str:
    """One line describing an IPv4 datagram; never raises (bad input says what is wrong)."""
    if len(pkt) < 20:
        return f"short packet ({len(pkt)} bytes)"
    if pkt[0] >> 4 != 4:
        return f"not IPv4 (version {pkt[0] >> 4})"
    ihl = (pkt[0] & 0x0F) * 4
    total = _u16(pkt, 2)
    if ihl < 20 or len(pkt) < ihl:
        return f"bad IPv4 header length {ihl}"
    ident = _u16(pkt, 4)
    frag = _u16(pkt, 6)
    off = (frag & 0x1FFF) * 8
    mf = bool(frag & 0x2000)
    proto = pkt[9]
    src = str(ipaddress.IPv4Address(pkt[12:16]))
    dst = str(ipaddress.IPv4Address(pkt[16:20]))
    end = min(total, len(pkt)) if total >= ihl else len(pkt)
    l4 = pkt[ihl:end]
    name = PROTO.get(proto, f"proto{proto}")
    head = f"{src} > {dst} {name}"
    tail = f" len={total} id={ident}"
    if off or mf:
        tail += f" frag={off}{'+' if mf else ''}"
    if off:
        return head + " (fragment, no header)" + tail
    try:
        body = _DECODERS.get(proto, _decode_other)(l4, depth)
    except (IndexError, struct.error, ValueError) as exc:
        body = f"truncated ({exc.__class__.__name__})"
    return f"{head} {body}{tail}".replace("  ", " ")


def _decode_other(l4: bytes, depth: int) -> str:
    return f"{len(l4)} bytes"


def _decode_gre(l4: bytes, depth: int) -> str:
    if len(l4) < 4:
        return f"truncated ({len(l4)} bytes)"
    b0, b1 = l4[0], l4[1]
    ver = b1 & 0x07
    ptype = _u16(l4, 2)
    flags = []
    for bit, ch in ((0x80, "C"), (0x40, "R"), (0x20, "K"), (0x10, "S"), (0x08, "s")):
        if b0 & bit:
            flags.append(ch)
    if ver == 1 and b1 & 0x80:
        flags.append("A")
    out = f"v{ver} flags={''.join(flags) or '-'} proto=0x{ptype:04x}"
    o = 4
    if ver == 1:
        # RFC 2637 4.1: Key = payload length (16) + Call ID of the receiver (16)
        if b0 & 0x20:
            out += f" payload_len={_u16(l4, 4)} call_id={_u16(l4, 6)}"
            o = 8
        if b0 & 0x10:
            out += f" seq={_u32(l4, o)}"
            o += 4
        if b1 & 0x80:
            out += f" ack={_u32(l4, o)}"
            o += 4
        if ptype == 0x880B:
            out += " (pptp)" if (_u32(l4, 0) & 0xEF7FFFFF) == 0x2001880B else " (not pptp)"
        return out
    # GRE v0 (RFC 2784/2890): [checksum+reserved] [key] [seq]
    if b0 & 0x80:
        out += f" csum=0x{_u16(l4, 4):04x}"
        o = 8
    if b0 & 0x20:
        out += f" key={_u32(l4, o)}"
        o += 4
    if b0 & 0x10:
        out += f" seq={_u32(l4, o)}"
        o += 4
    if ptype == 0x0800 and depth == 0 and len(l4) > o:
        out += f" [inner: {decode(l4[o:], depth=1)}]"
    return out


def _decode_esp(l4: bytes, depth: int) -> str:
    if len(l4) < 8:
        return f"truncated ({len(l4)} bytes)"
    return f"spi=0x{_u32(l4, 0):08x} seq={_u32(l4, 4)}"


def _decode_ah(l4: bytes, depth: int) -> str:
    if len(l4) < 12:
        return f"truncated ({len(l4)} bytes)"
    return f"next={l4[0]} spi=0x{_u32(l4, 4):08x} seq={_u32(l4, 8)} (AH cannot be masqueraded)"


def _isakmp(data: bytes) -> str:
    try:
        h = IsakmpHeader.parse(data, whole=False)
    except MalformedIsakmp as exc:
        return f"not ISAKMP ({exc.reason})"
    flags = []
    if h.major == 2:
        for bit, ch in ((0x08, "I"), (0x10, "V"), (0x20, "R")):
            if h.flags & bit:
                flags.append(ch)
    else:
        for bit, ch in ((0x01, "E"), (0x02, "C"), (0x04, "A")):
            if h.flags & bit:
                flags.append(ch)
    return (
        f"{h.version} {h.exchange_name} icookie={h.icookie:016x} rcookie={h.rcookie:016x} "
        f"flags={''.join(flags) or '-'} msgid={h.message_id} length={h.length}"
    )


def _decode_udp(l4: bytes, depth: int) -> str:
    if len(l4) < 8:
        return f"truncated ({len(l4)} bytes)"
    sport, dport = _u16(l4, 0), _u16(l4, 2)
    data = l4[8:]
    out = f"{sport} > {dport}"
    if 500 in (sport, dport):
        return f"{out} isakmp {_isakmp(data)}"
    if 4500 in (sport, dport):
        if data == b"\xff":
            return f"{out} nat-t keepalive"
        if data[:4] == b"\x00\x00\x00\x00":
            return f"{out} nat-t isakmp {_isakmp(data[4:])}"
        if len(data) >= 8:
            return f"{out} nat-t esp spi=0x{_u32(data, 0):08x} seq={_u32(data, 4)}"
        return f"{out} nat-t {len(data)} bytes"
    if 1701 in (sport, dport) and len(data) >= 6:
        flags = _u16(data, 0)
        ctrl = "control" if flags & 0x8000 else "data"
        o = 4 if flags & 0x4000 else 2  # L (length) bit
        return f"{out} l2tp v{flags & 0x0F} {ctrl} tunnel={_u16(data, o)} session={_u16(data, o + 2)}"
    return f"{out} {len(data)} bytes"


def _pptp_messages(data: bytes) -> list[str]:
    out = []
    o = 0
    while o + 12 <= len(data):
        length = _u16(data, o)
        if _u32(data, o + 4) != PPTP_MAGIC or length < 12:
            out.append("(not framed as PPTP)")
            break
        ctype = _u16(data, o + 8)
        spec = MESSAGES.get(ctype)
        text = spec.name if spec else f"type-{ctype}"
        if spec is not None:
            for role, fo in spec.fields:
                if o + fo + 2 <= len(data):
                    text += f" {'call_id' if role == 'own' else 'peer_call_id'}={_u16(data, o + fo)}"
            if spec.result is not None and o + spec.result < len(data):
                text += f" result={data[o + spec.result]}"
        out.append(text)
        o += length
    return out


def _decode_tcp(l4: bytes, depth: int) -> str:
    if len(l4) < 20:
        if len(l4) >= 4:
            return f"{_u16(l4, 0)} > {_u16(l4, 2)} (quoted header)"
        return f"truncated ({len(l4)} bytes)"
    sport, dport = _u16(l4, 0), _u16(l4, 2)
    doff = (l4[12] >> 4) * 4
    fl = l4[13]
    flags = "".join(c for i, c in enumerate(TCP_FLAGS) if fl & (1 << i)) or "-"
    out = f"{sport} > {dport} [{flags}] seq={_u32(l4, 4)} ack={_u32(l4, 8)} win={_u16(l4, 14)}"
    i = 20
    while i < min(doff, len(l4)):
        k = l4[i]
        if k == 0:
            break
        if k == 1:
            i += 1
            continue
        if i + 1 >= len(l4) or l4[i + 1] < 2:
            break
        if k == 2 and l4[i + 1] == 4 and i + 4 <= len(l4):
            out += f" mss={_u16(l4, i + 2)}"
        i += l4[i + 1]
    payload = l4[doff:]
    if payload and 1723 in (sport, dport):
        out += " pptp " + "; ".join(_pptp_messages(payload))
    elif payload:
        out += f" {len(payload)} bytes"
    return out


def _decode_icmp(l4: bytes, depth: int) -> str:
    if len(l4) < 8:
        return f"truncated ({len(l4)} bytes)"
    t, code = l4[0], l4[1]
    name = ICMP_TYPES.get(t, f"type-{t}")
    if t in (0, 8, 13, 14):
        return f"{name} id={_u16(l4, 4)} seq={_u16(l4, 6)}"
    out = name
    if t == 3:
        out += f"/{UNREACH_CODES.get(code, code)}"
        if code == 4:
            out += f" mtu={_u16(l4, 6)}"
    elif code:
        out += f"/{code}"
    if t in (3, 4, 5, 11, 12) and depth == 0 and len(l4) >= 28:
        out += f" [quoting: {decode(l4[8:], depth=1)}]"
    return out


_DECODERS: dict[int, Callable[[bytes, int], str]] = {
    1: _decode_icmp,
    6: _decode_tcp,
    17: _decode_udp,
    47: _decode_gre,
    50: _decode_esp,
    51: _decode_ah,
}


# ============================================================================ filtering
#: --proto names -> predicate over (ip proto, sport, dport); ports 0 when not TCP/UDP
PROTO_FILTERS: dict[str, Callable[[int, int, int], bool]] = {
    "gre": lambda p, s, d: p == 47,
    "esp": lambda p, s, d: p == 50,
    "ah": lambda p, s, d: p == 51,
    "isakmp": lambda p, s, d: p == 17 and 500 in (s, d),
    "ike": lambda p, s, d: p == 17 and (500 in (s, d) or 4500 in (s, d)),
    "natt": lambda p, s, d: p == 17 and 4500 in (s, d),
    "pptp": lambda p, s, d: p == 47 or (p == 6 and 1723 in (s, d)),
    "ipsec": lambda p, s, d: p in (50, 51) or (p == 17 and (500 in (s, d) or 4500 in (s, d))),
    "l2tp": lambda p, s, d: p == 17 and 1701 in (s, d),
    "vpn": lambda p, s, d: p in (47, 50, 51)
    or (p == 17 and bool({500, 4500, 1701} & {s, d}))
    or (p == 6 and 1723 in (s, d)),
    "tcp": lambda p, s, d: p == 6,
    "udp": lambda p, s, d: p == 17,
    "icmp": lambda p, s, d: p == 1,
}


def proto_matcher(names: Iterable[str]) -> Callable[[int, int, int], bool] | None:
    """A predicate for several --proto names (any of them), or None for "everything".
    ICMP errors always match: they are how paths report trouble (frag needed, unreachable)."""
    preds = []
    for n in names:
        key = n.lower()
        if key not in PROTO_FILTERS:
            raise ValueError(f"unknown protocol {n!r} (known: {', '.join(PROTO_FILTERS)})")
        preds.append(PROTO_FILTERS[key])
    if not preds:
        return None
    return lambda p, s, d: p == 1 or any(f(p, s, d) for f in preds)


@dataclass(frozen=True, slots=True)
class Observation:
    """What :meth:`Tracer.observe` decided about one captured packet."""

    seq: int  # 1-based number in the trace (= pcapng packet number)
    side: str  # "inside" | "outside"
    direction: str  # "out" (towards the Internet) | "in" | "local"
    line: str  # decoded
    comment: str  # for the pcapng record
    paired_with: int | None  # seq of the other copy of the same datagram


@dataclass
class _Pending:
    seq: int
    side: str
    at: float


@dataclass
class Tracer:
    """Filter and pair packets seen on the gateway's interfaces (pure; ``now`` passed in).

    ``host``: only this inside address or network; on the outside, packets to or from the
    remotes it talked to in the last :data:`REMOTE_TTL` seconds (masquerading hides the
    host there). ``match``: from :func:`proto_matcher`, None for all protocols.
    """

    inside_networks: Sequence[str]
    public: str | None = None
    host: str | None = None
    match: Callable[[int, int, int], bool] | None = None
    seq: int = 0
    _inside: list[ipaddress.IPv4Network] = field(default_factory=list)
    _host: ipaddress.IPv4Network | None = None
    _remotes: OrderedDict[int, float] = field(default_factory=OrderedDict)
    _pending: OrderedDict[tuple[int, int, int, int, str], _Pending] = field(
        default_factory=OrderedDict
    )

    def __post_init__(self) -> None:
        self._inside = [ipaddress.IPv4Network(n, strict=False) for n in self.inside_networks]
        self._host = ipaddress.IPv4Network(self.host, strict=False) if self.host else None

    def _is_inside(self, a: int) -> bool:
        addr = ipaddress.IPv4Address(a)
        return any(addr in n for n in self._inside)

    def _is_host(self, a: int) -> bool:
        return self._host is None or ipaddress.IPv4Address(a) in self._host

    def observe(self, side: str, pkt: bytes, now: float) -> Observation | None:  # noqa: C901 - pairs the before/after copies; one branch per case
        """``side`` "inside" (a LAN interface) or "outside"; None if the packet is filtered
        out. Each returned observation gets the next sequence number."""
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            return None
        ihl = (pkt[0] & 0x0F) * 4
        proto = pkt[9]
        src = int.from_bytes(pkt[12:16], "big")
        dst = int.from_bytes(pkt[16:20], "big")
        frag_off = _u16(pkt, 6) & 0x1FFF
        sport = dport = 0
        if proto in (6, 17) and frag_off == 0 and len(pkt) >= ihl + 4:
            sport, dport = _u16(pkt, ihl), _u16(pkt, ihl + 2)
        if self.match is not None and not self.match(proto, sport, dport):
            return None
        pub = int(ipaddress.IPv4Address(self.public)) if self.public else None
        self._expire(now)
        if side == "inside":
            if self._is_inside(src) and not self._is_inside(dst):
                direction, remote, lan = "out", dst, src
            elif self._is_inside(dst) and not self._is_inside(src):
                direction, remote, lan = "in", src, dst
            else:
                return None  # LAN to LAN, or the gateway's own
            if not self._is_host(lan):
                return None
            if self._host is not None:
                self._remotes[remote] = now + REMOTE_TTL
                self._remotes.move_to_end(remote)
        else:
            if pub is not None and src == pub:
                direction, remote = "out", dst
            elif pub is not None and dst == pub:
                direction, remote = "in", src
            elif self._is_inside(src) or self._is_inside(dst):
                direction, remote = ("out", dst) if self._is_inside(src) else ("in", src)
            else:
                direction, remote = "local", dst
            if self._host is not None:
                exp = self._remotes.get(remote)
                if exp is None or exp <= now:
                    return None
        self.seq += 1
        key = (proto, _u16(pkt, 4), _u16(pkt, 2), remote, direction)
        other_side = "outside" if side == "inside" else "inside"
        paired: int | None = None
        p = self._pending.get(key)
        if p is not None and p.side == other_side and now - p.at <= PAIR_WINDOW:
            paired = p.seq
            del self._pending[key]
        else:
            self._pending[key] = _Pending(self.seq, side, now)
            self._pending.move_to_end(key)
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        before_after = (
            "before" if (side == "inside") == (direction == "out") else "after"
        )
        comment = f"{side} {direction}bound"
        if direction != "local":
            comment += f", {before_after} translation"
        if paired is not None:
            comment += f" (#{paired} is the same datagram {'after' if before_after == 'before' else 'before'})"
        line = decode(pkt)
        return Observation(self.seq, side, direction, line, comment, paired)

    def _expire(self, now: float) -> None:
        while self._remotes:
            k, exp = next(iter(self._remotes.items()))
            if exp > now:
                break
            del self._remotes[k]
        while self._pending:
            k2, p = next(iter(self._pending.items()))
            if now - p.at <= PAIR_WINDOW:
                break
            del self._pending[k2]


# ============================================================================ rate limit
@dataclass
class LineLimiter:
    """At most ``rate`` lines per second per key (token bucket, burst ``rate``); returns
    the number suppressed since the last line that passed, so it can be reported."""

    rate: float = LINES_PER_SECOND
    _buckets: dict[str, tuple[float, float, int]] = field(default_factory=dict)

    def allow(self, key: str, now: float) -> tuple[bool, int]:
        if self.rate <= 0:
            return True, 0
        tokens, at, suppressed = self._buckets.get(key, (self.rate, now, 0))
        tokens = min(self.rate, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now, 0)
            return True, suppressed
        self._buckets[key] = (tokens, now, suppressed + 1)
        return False, 0


def flow_key(pkt: bytes) -> str:
    """Rate-limit key: protocol and the two addresses (both directions share it)."""
    if len(pkt) < 20:
        return "?"
    a, b = sorted((pkt[12:16], pkt[16:20]))
    return f"{pkt[9]}:{a.hex()}:{b.hex()}"


# ============================================================================ pcapng
def _pad4(b: bytes) -> bytes:
    return b + b"\x00" * (-len(b) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(btype: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


class PcapngWriter:
    """Minimal pcapng (little-endian): one Section Header, one Interface Description per
    interface (LINKTYPE_RAW, nanosecond timestamps, if_name), one Enhanced Packet Block per
    packet with an ``opt_comment``. Readable by Wireshark, tshark and scapy."""

    SHB = 0x0A0D0D0A
    IDB = 0x00000001
    EPB = 0x00000006

    def __init__(self, f: BinaryIO, *, application: str = "vpnmasq trace") -> None:
        self.f = f
        self.interfaces: dict[str, int] = {}
        opts = _option(4, application.encode()) + _option(0, b"")  # shb_userappl, end
        body = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + opts
        f.write(_block(self.SHB, body))

    def interface(self, name: str, snaplen: int = 0) -> int:
        """The interface id for ``name`` (an IDB is written the first time)."""
        if name in self.interfaces:
            return self.interfaces[name]
        opts = _option(2, name.encode()) + _option(9, b"\x09") + _option(0, b"")  # ns
        self.f.write(_block(self.IDB, struct.pack("<HHI", LINKTYPE_RAW, 0, snaplen) + opts))
        self.interfaces[name] = len(self.interfaces)
        return self.interfaces[name]

    def packet(self, iface: str, ts_ns: int, data: bytes, comment: str = "") -> None:
        if_id = self.interface(iface)
        opts = (_option(1, comment.encode()) + _option(0, b"")) if comment else b""
        body = (
            struct.pack("<IIIII", if_id, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), len(data))
            + _pad4(data)
            + opts
        )
        self.f.write(_block(self.EPB, body))

    def flush(self) -> None:
        self.f.flush()


# ============================================================================ live capture
ETH_P_IP = 0x0800
#: packet sockets bound to one protocol only see packets coming in; ETH_P_ALL also gets the
#: ones leaving (dev_queue_xmit_nit), which is half of what trace is for
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
RECV_SIZE = 65536 + 256


def inside_interfaces(inside_networks: Sequence[str], addr_json: Sequence[dict[str, object]]) -> list[str]:
    """Interfaces (``ip -j addr`` output) holding an address inside an inside network."""
    nets = [ipaddress.IPv4Network(n, strict=False) for n in inside_networks]
    out: list[str] = []
    for link in addr_json:
        infos = link.get("addr_info")
        if not isinstance(infos, list):
            continue
        for a in infos:
            if not isinstance(a, dict) or a.get("family") != "inet":
                continue
            try:
                ip = ipaddress.IPv4Address(str(a.get("local")))
            except ValueError:
                continue
            if any(ip in n for n in nets) and str(link.get("ifname")) not in out:
                out.append(str(link.get("ifname")))
    return out


def capture_live(  # noqa: C901 - the capture loop with its timeouts
    ifaces: dict[str, str],
    tracer: Tracer,
    writer: PcapngWriter | None,
    emit: Callable[[str], None],
    *,
    duration: float | None = None,
    count: int | None = None,
    limiter: LineLimiter | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Read IPv4 packets from ``ifaces`` (name -> "inside"/"outside") with AF_PACKET until
    ``duration`` seconds, ``count`` matching packets or ``stop()``; write each match to
    ``writer`` and ``emit`` a decoded line (rate-limited). Returns the packets written."""
    import selectors
    import socket
    import time

    limiter = limiter or LineLimiter()
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    try:
        for name, side in ifaces.items():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((name, ETH_P_ALL))
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, (name, side))
            if writer is not None:
                writer.interface(name)
        t0 = time.monotonic()
        n = 0
        while not stop():
            left = None if duration is None else duration - (time.monotonic() - t0)
            if left is not None and left <= 0:
                break
            for key, _ in sel.select(0.2 if left is None else min(0.2, left)):
                name, side = key.data
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                while True:
                    try:
                        data, addr = sock.recvfrom(RECV_SIZE)
                    except BlockingIOError:
                        break
                    if addr[1] != ETH_P_IP:
                        continue
                    now = time.monotonic()
                    obs = tracer.observe(side, data, now)
                    if obs is None:
                        continue
                    n += 1
                    if writer is not None:
                        writer.packet(name, time.time_ns(), data, f"{obs.comment}: {obs.line}")
                    ok, suppressed = limiter.allow(flow_key(data), now)
                    if suppressed:
                        emit(f"    ... {suppressed} more lines of this flow not shown")
                    if ok:
                        pair = f" (= #{obs.paired_with})" if obs.paired_with else ""
                        emit(f"#{obs.seq:<5} {name:<6} {obs.direction:<3} {obs.line}{pair}")
                    if count is not None and n >= count:
                        return n
            if writer is not None:
                writer.flush()
        return n
    finally:
        for s in socks:
            s.close()
        sel.close()
        if writer is not None:
            writer.flush()


def decode_file(
    path: str,
    emit: Callable[[str], None],
    *,
    match: Callable[[int, int, int], bool] | None = None,
    host: str | None = None,
    count: int | None = None,
) -> int:
    """Decode the IPv4 packets of a pcap/pcapng file (e.g. from tcpdump) to lines, with the
    live capture's filters: ``match`` from :func:`proto_matcher`, ``host`` (an address or
    network on either side), at most ``count`` lines. Lines keep the file's packet numbers
    (as Wireshark shows them). A file that is not a capture raises
    :class:`vpnmasq.tools.replay.ReplayError` with a one-line reason."""
    from vpnmasq.tools.replay import ip_from_frame, open_capture

    net = ipaddress.IPv4Network(host, strict=False) if host else None
    shown = 0
    for n, frame in enumerate(open_capture(path), 1):
        if count is not None and shown >= count:
            break
        ip, why = ip_from_frame(frame.linktype, frame.data)
        if ip is None:
            if match is None and net is None:
                emit(f"#{n:<5} ({why})")
                shown += 1
            continue
        if not _wanted(ip, match, net):
            continue
        emit(f"#{n:<5} {decode(ip)}")
        shown += 1
    return shown


def _wanted(
    pkt: bytes, match: Callable[[int, int, int], bool] | None, net: ipaddress.IPv4Network | None
) -> bool:
    if len(pkt) < 20:
        return match is None and net is None
    if net is not None and not (
        ipaddress.IPv4Address(pkt[12:16]) in net or ipaddress.IPv4Address(pkt[16:20]) in net
    ):
        return False
    if match is None:
        return True
    ihl = (pkt[0] & 0x0F) * 4
    sport = dport = 0
    if pkt[9] in (6, 17) and _u16(pkt, 6) & 0x1FFF == 0 and len(pkt) >= ihl + 4:
        sport, dport = _u16(pkt, ihl), _u16(pkt, ihl + 2)
    return match(pkt[9], sport, dport)
