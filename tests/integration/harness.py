"""Harness for the daemon integration tests (test_daemon.py, test_daemon_lifecycle.py).

The lab is :class:`vpnmasq_lab.topology.Topology`: LAN hosts h1 (10.77.0.11) and h2
(10.77.0.12) and a LAN server srv (10.77.0.5) on one switch, the gateway gw (lan0 10.77.0.1,
wan0 198.51.100.1) and an outside host r1 (198.51.100.20). ``vpnmasq run`` runs in gw as a
real process (:class:`Daemon`); everything else is driven from the test process with sockets
created inside the namespaces (``setns`` on the calling thread only), which keeps each test
to a few seconds:

* :class:`Remote` serves r1: UDP and TCP echo on port 7, ISAKMP echo on UDP 500, ESP echo
  (a raw socket: inbound SPI -> reply SPI), GRE echo (raw; v0 as is, PPTP GRE v1 back to
  the caller's Call ID) and a minimal PPTP server on TCP 1723 (control messages of RFC 2637);
* client helpers (:func:`udp_echo`, :func:`esp_exchange`, :class:`PptpCall` ...) run one
  exchange from a LAN host and say whether the answer came back;
* :class:`Sniffer` records every IPv4 packet on gw's wan0 (AF_PACKET), both directions.

No test here needs a real VPN implementation: the gateway only sees headers (SPIs, cookies,
Call IDs), and those are what the peers put on the wire.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.waiting import ANSWER_TIMEOUT, DEADLINE, wait_until

from vpnmasq.datapath import rules
from vpnmasq.datapath.control import ControlError, query
from vpnmasq.packet.checksum import checksum
from vpnmasq_lab.topology import Topology

LAN = ipaddress.IPv4Network("10.77.0.0/24")
PUBLIC = "198.51.100.1"
NEW_PUBLIC = "198.51.100.2"
R1 = "198.51.100.20"
H1, H2, SRV, GW_LAN = "10.77.0.11", "10.77.0.12", "10.77.0.5", "10.77.0.1"
IPPROTO_ESP, IPPROTO_GRE = 50, 47
PPTP_MAGIC = 0x1A2B3C4D
MARK = 0x564D
ECHO_PORT = 7
METRICS_PORT = 9477  # metrics_listen in the gateway namespace
SO_TIMESTAMPNS = 35  # asm-generic/socket.h (not in the socket module)
#: ESP SPIs: LAN host -> remote (the remote answers on the paired one)
SPI_PAIRS = {0x1001: 0x2001, 0x1002: 0x2002, 0x1003: 0x2003}


#: Debian 12's /etc/nftables.conf (a filter table only), as nftables.service loads it
NFTABLES_CONF = """#!/usr/sbin/nft -f
flush ruleset
table inet filter {
	chain input { type filter hook input priority filter; policy accept; }
	chain forward { type filter hook forward priority filter; policy accept; }
	chain output { type filter hook output priority filter; policy accept; }
}
"""


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, NFQUEUE)"
    for tool in ("ip", "iptables", "iptables-save", "nft"):
        if shutil.which(tool) is None:
            return f"{tool!r} not found"
    return None


# ------------------------------------------------------------------------------ namespaces
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


@contextlib.contextmanager
def entered(topo: Topology, role: str) -> Iterator[None]:
    """The calling thread runs in ``role``'s network namespace inside the block."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{topo.ns(role)}", os.O_RDONLY)
    try:
        if _libc.setns(target, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            _libc.setns(own, 0x40000000)
    finally:
        os.close(target)
        os.close(own)


def sock(topo: Topology, role: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    with entered(topo, role):
        return socket.socket(family, kind, proto)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``cond`` until it is true (see tests/waiting.py); AssertionError after ``timeout``."""
    wait_until(cond, timeout, what)


# ------------------------------------------------------------------------------ the daemon
@dataclass
class Daemon:
    """``vpnmasq run`` in the gateway namespace, with its own config and control socket."""

    topo: Topology
    mode: str
    workdir: Path
    extra: str = ""
    #: Python run in the daemon's process before the CLI (e.g. to change a module constant)
    python_setup: str = ""
    #: the vpnmasq command to run instead of this checkout's (an installed package), and its
    #: environment (None: inherited)
    command: list[str] | None = None
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def socket_path(self) -> str:
        return str(self.workdir / "ctl.sock")

    @property
    def config_path(self) -> Path:
        return self.workdir / "vpnmasq.toml"

    def write_config(self, extra: str | None = None) -> None:
        if extra is not None:
            self.extra = extra
        self.config_path.write_text(
            'outside_interface = "wan0"\n'
            'inside_networks = ["10.77.0.0/24", "10.88.0.0/24"]\n'
            f'mode = "{self.mode}"\n'
            f'control_socket = "{self.socket_path}"\n'
            'log_level = "debug"\n' + self.extra
        )

    def start(self, *args: str, wait: bool = True) -> Daemon:
        if not self.config_path.exists():
            self.write_config()
        log = self.workdir / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        python = self.command or [sys.executable, "-m", "vpnmasq.cli"]
        if self.python_setup:
            main = "import sys\nfrom vpnmasq.cli import main\nsys.exit(main())"
            python = [sys.executable, "-c", f"{self.python_setup}\n{main}"]
        with open(log, "wb") as f:
            self.proc = self.topo.popen(
                "gw",
                [*python, "run", "-c", str(self.config_path), *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = DEADLINE) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"vpnmasq exited {self.proc.returncode}:\n{self.log()}")
            try:
                query(self.socket_path, "ping", timeout=0.5)
            except ControlError:
                return False
            return "vpnmasq running" in self.log()

        wait_for(ready, "vpnmasq to start", timeout)

    def log(self, i: int = -1) -> str:
        return self.logs[i].read_text(errors="replace") if self.logs else ""

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = DEADLINE) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.send(sig)
        rc = self.wait()
        self.topo.stop(self.proc)  # type: ignore[arg-type]
        return rc

    def status(self) -> dict[str, Any]:
        return query(self.socket_path, "status", timeout=DEADLINE)

    def counters(self) -> dict[str, int]:
        c: dict[str, int] = self.status()["counters"]
        return c

    def status_text(self, *args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "vpnmasq.cli", "status", "--socket", self.socket_path, *args],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    def entries(self, proto: str | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.status()["entries"]
        return [r for r in rows if proto is None or r.get("proto") == proto]


# ------------------------------------------------------------------------------ sniffing
@dataclass(frozen=True)
class Seen:
    src: str
    dst: str
    proto: int
    outgoing: bool
    sport: int = 0
    dport: int = 0
    #: when it crossed the interface (the kernel's receive timestamp, time.time() clock)
    t: float = 0.0
    #: the IP header and the first 16 bytes after it (ESP SPI and sequence, GRE header ...)
    head: bytes = field(default=b"", compare=False, repr=False)


class Sniffer:
    """Every IPv4 packet on an interface of a namespace (both directions), in a thread.

    A frame that crossed the interface is already queued on the capture socket, but the
    thread may not have read it yet (a busy machine). :attr:`seen`, :meth:`leaked` and
    :meth:`clear` therefore :meth:`settle` first: they account for every frame that crossed
    the interface before they were called."""

    def __init__(self, topo: Topology, role: str, ifname: str) -> None:
        self.s = sock(topo, role, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE: lose no frame
        self.s.bind((ifname, 0))
        self.s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.s.settimeout(0.05)
        self._seen: list[Seen] = []
        self._idle = 0  # reads that found the socket empty
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, anc, _flags, addr = self.s.recvmsg(65535, 64)
            except TimeoutError:
                self._idle += 1
                continue
            except OSError:
                return
            if len(frame) < 34 or frame[12:14] != b"\x08\x00":
                continue
            stamp = time.time()
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("=qq", data[:16])
                    stamp = sec + nsec / 1e9
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            proto = ip[9]
            sport = dport = 0
            if proto in (6, 17) and len(ip) >= ihl + 4:
                sport, dport = struct.unpack_from("!HH", ip, ihl)
            self._seen.append(
                Seen(
                    socket.inet_ntoa(ip[12:16]),
                    socket.inet_ntoa(ip[16:20]),
                    proto,
                    addr[2] == socket.PACKET_OUTGOING,
                    sport,
                    dport,
                    stamp,
                    bytes(ip[: ihl + 16]),
                )
            )

    def settle(self) -> None:
        """Return once every frame queued before the call has been read: two more reads
        found the socket empty (the second of them began after this call)."""
        n = self._idle
        wait_for(lambda: self._idle >= n + 2 or not self._t.is_alive(), "the sniffer to catch up")

    @property
    def seen(self) -> list[Seen]:
        self.settle()
        return list(self._seen)

    def clear(self) -> None:
        self.settle()
        self._seen.clear()

    def leaked(self) -> list[Seen]:
        """Packets on the wire with an inside (LAN) source address."""
        return [p for p in self.seen if ipaddress.IPv4Address(p.src) in LAN]

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.s.close()


# ------------------------------------------------------------------------------ wire formats
def isakmp_header(icookie: int, rcookie: int = 0, exchange: int = 2) -> bytes:
    return struct.pack("!QQBBBBII", icookie, rcookie, 1, 0x10, exchange, 0, 0, 28)


def pptp_msg(ctype: int, length: int, fields: dict[int, int] | None = None) -> bytes:
    """A PPTP control message of ``length`` bytes with 16-bit ``fields`` (offset -> value)
    and, for replies, result code 1 where RFC 2637 puts it."""
    b = bytearray(length)
    struct.pack_into("!HHIHH", b, 0, length, 1, PPTP_MAGIC, ctype, 0)
    for off, v in (fields or {}).items():
        struct.pack_into("!H", b, off, v)
    if ctype == 2:
        b[14] = 1  # Start-Control-Connection-Reply: result OK
    if ctype == 8:
        b[16] = 1  # Outgoing-Call-Reply: connected
    return bytes(b)


def gre_v1(call_id: int, payload: bytes) -> bytes:
    """Enhanced GRE (PPTP): K bit, version 1, protocol 0x880B, payload length, Call ID."""
    return struct.pack("!HHHH", 0x2001, 0x880B, len(payload), call_id) + payload


def gre_v0(payload: bytes) -> bytes:
    return struct.pack("!HH", 0, 0x0800) + payload


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


# ------------------------------------------------------------------------------ the remote
class Remote:
    """Echo peers on r1 (see the module docstring), served by one thread. ``peers`` records
    who each service saw: (service, source address, source port or SPI or Call ID)."""

    def __init__(self, topo: Topology, role: str = "r1", ip: str = R1) -> None:
        self.topo, self.ip = topo, ip
        self.peers: list[tuple[str, str, int]] = []
        self.udp = sock(topo, role, socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((ip, ECHO_PORT))
        self.ike = sock(topo, role, socket.AF_INET, socket.SOCK_DGRAM)
        self.ike.bind((ip, 500))
        self.tcp = sock(topo, role, socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((ip, ECHO_PORT))
        self.tcp.listen(16)
        self.pptp = sock(topo, role, socket.AF_INET, socket.SOCK_STREAM)
        self.pptp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.pptp.bind((ip, 1723))
        self.pptp.listen(16)
        self.esp = sock(topo, role, socket.AF_INET, socket.SOCK_RAW, IPPROTO_ESP)
        self.esp.bind((ip, 0))
        self.gre = sock(topo, role, socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
        self.gre.bind((ip, 0))
        #: PPTP calls: our (server) Call ID -> the caller's Call ID as we saw it
        self.calls: dict[int, int] = {}
        self._next_call = 0x4000
        self._conns: dict[socket.socket, str] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        listen = [self.udp, self.ike, self.tcp, self.pptp, self.esp, self.gre]
        while not self._stop.is_set():
            try:
                r, _, _ = select.select(listen + list(self._conns), [], [], 0.05)
            except (OSError, ValueError):
                return
            for s in r:
                with contextlib.suppress(OSError, ConnectionError, struct.error):
                    self._serve(s)

    def _serve(self, s: socket.socket) -> None:
        if s is self.udp:
            data, peer = s.recvfrom(65535)
            self.peers.append(("udp", peer[0], peer[1]))
            s.sendto(data, peer)
        elif s is self.ike:
            data, peer = s.recvfrom(65535)
            self.peers.append(("ike", peer[0], peer[1]))
            icookie = struct.unpack_from("!Q", data)[0]
            s.sendto(isakmp_header(icookie, 0xFEED0000 | (icookie & 0xFFFF)), peer)
        elif s in (self.tcp, self.pptp):
            c, peer = s.accept()
            kind = "tcp" if s is self.tcp else "pptp"
            self.peers.append((kind, peer[0], peer[1]))
            c.settimeout(1.0)
            self._conns[c] = kind
        elif s is self.esp:
            pkt, _ = s.recvfrom(65535)
            ihl = (pkt[0] & 0x0F) * 4
            src = socket.inet_ntoa(pkt[12:16])
            spi, seq = struct.unpack_from("!II", pkt, ihl)
            self.peers.append(("esp", src, spi))
            reply = SPI_PAIRS.get(spi)
            if reply is not None:
                s.sendto(struct.pack("!II", reply, seq) + pkt[ihl + 8 :], (src, 0))
        elif s is self.gre:
            pkt, _ = s.recvfrom(65535)
            ihl = (pkt[0] & 0x0F) * 4
            src = socket.inet_ntoa(pkt[12:16])
            flags, _proto = struct.unpack_from("!HH", pkt, ihl)
            if flags & 0x7 == 1:
                call = struct.unpack_from("!H", pkt, ihl + 6)[0]
                self.peers.append(("gre1", src, call))
                back = self.calls.get(call)
                if back is not None:
                    s.sendto(gre_v1(back, pkt[ihl + 8 :]), (src, 0))
            else:
                self.peers.append(("gre0", src, 0))
                s.sendto(pkt[ihl:], (src, 0))
        else:
            kind = self._conns[s]
            if kind == "tcp":
                data = s.recv(65535)
                if not data:
                    self._conns.pop(s)
                    s.close()
                    return
                s.sendall(data)
                return
            head = s.recv(2, socket.MSG_PEEK)
            if not head:
                self._conns.pop(s)
                s.close()
                return
            length = struct.unpack("!H", _recv_exact(s, 2))[0]
            msg = struct.pack("!H", length) + _recv_exact(s, length - 2)
            ctype = struct.unpack_from("!H", msg, 8)[0]
            if ctype == 1:  # Start-Control-Connection-Request
                s.sendall(pptp_msg(2, 156))
            elif ctype == 7:  # Outgoing-Call-Request: the caller's Call ID at 12
                caller = struct.unpack_from("!H", msg, 12)[0]
                ours = self._next_call
                self._next_call += 1
                self.calls[ours] = caller
                self.peers.append(("pptp-call", "", caller))
                s.sendall(pptp_msg(8, 32, {12: ours, 14: caller}))

    def saw(self, service: str) -> list[tuple[str, int]]:
        return [(a, b) for k, a, b in self.peers if k == service]

    def send_esp(self, dst: str, spi: int, seq: int = 99, payload: bytes = b"remote-first") -> None:
        self.esp.sendto(struct.pack("!II", spi, seq) + payload, (dst, 0))

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        for s in [self.udp, self.ike, self.tcp, self.pptp, self.esp, self.gre, *self._conns]:
            s.close()


# ------------------------------------------------------------------------------ clients
def udp_echo(
    topo: Topology, role: str, dst: str = R1, port: int = ECHO_PORT, timeout: float = ANSWER_TIMEOUT
) -> bool:
    s = sock(topo, role, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        token = os.urandom(8)
        s.sendto(token, (dst, port))
        try:
            while True:
                data, _ = s.recvfrom(65535)
                if data == token:
                    return True
        except TimeoutError:
            return False
    finally:
        s.close()


def tcp_echo(
    topo: Topology,
    role: str,
    dst: str = R1,
    port: int = ECHO_PORT,
    *,
    timeout: float = ANSWER_TIMEOUT,
) -> bool:
    s = sock(topo, role, socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((dst, port))
        token = os.urandom(16)
        s.sendall(token)
        return _recv_exact(s, len(token)) == token
    except (OSError, ConnectionError):
        return False
    finally:
        s.close()


def ping(topo: Topology, role: str, dst: str = R1, timeout: float = ANSWER_TIMEOUT) -> bool:
    s = sock(topo, role, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        s.settimeout(timeout)
        ident = int.from_bytes(os.urandom(2), "big")
        body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"vpnmasq"
        csum = checksum(body)
        s.sendto(body[:2] + struct.pack("!H", csum) + body[4:], (dst, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pkt, _ = s.recvfrom(65535)
            except TimeoutError:
                return False
            ihl = (pkt[0] & 0x0F) * 4
            if pkt[ihl] == 0 and struct.unpack_from("!H", pkt, ihl + 4)[0] == ident:
                return True
        return False
    finally:
        s.close()



def refused(s: socket.socket, probe: bytes | None = None) -> bool:
    """Whether a connected UDP socket got ICMP port unreachable for its 4-tuple (the kernel
    reports it only when the quoted datagram matches the socket exactly); ``probe`` is sent
    first when given. False when nothing comes within the socket's timeout."""
    try:
        if probe is not None:
            s.send(probe)
        s.recv(2048)
    except ConnectionRefusedError:
        return True
    except TimeoutError:
        return False
    return False


def ike_echo(topo: Topology, role: str, dst: str = R1, timeout: float = ANSWER_TIMEOUT) -> bool:
    """An ISAKMP header from source port 500; True if the answer carries our cookie."""
    s = sock(topo, role, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 500))
        s.settimeout(timeout)
        icookie = int.from_bytes(os.urandom(8), "big") | 1
        s.sendto(isakmp_header(icookie), (dst, 500))
        try:
            data, _ = s.recvfrom(65535)
        except TimeoutError:
            return False
        return struct.unpack_from("!Q", data)[0] == icookie
    finally:
        s.close()


class RawPeer:
    """A raw ESP or GRE socket on a LAN host."""

    def __init__(self, topo: Topology, role: str, proto: int) -> None:
        self.s = sock(topo, role, socket.AF_INET, socket.SOCK_RAW, proto)

    def send(self, dst: str, payload: bytes) -> None:
        self.s.sendto(payload, (dst, 0))

    def recv(self, timeout: float) -> tuple[str, bytes] | None:
        """(source, payload after the IP header) of the next packet, or None."""
        r, _, _ = select.select([self.s], [], [], timeout)
        if not r:
            return None
        pkt = self.s.recv(65535)
        ihl = (pkt[0] & 0x0F) * 4
        return socket.inet_ntoa(pkt[12:16]), pkt[ihl:]

    def drain(self) -> None:
        while self.recv(0.0) is not None:
            pass

    def close(self) -> None:
        self.s.close()


def esp_exchange(
    topo: Topology,
    role: str,
    spi: int,
    *,
    dst: str = R1,
    timeout: float = ANSWER_TIMEOUT,
    seq: int = 1,
) -> bool:
    """Send ESP with ``spi``; True if the remote's answer (on the paired SPI) comes back."""
    p = RawPeer(topo, role, IPPROTO_ESP)
    try:
        token = os.urandom(8)
        p.send(dst, struct.pack("!II", spi, seq) + token)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = p.recv(left)
            if got is None:
                return False
            _src, data = got
            if data[:4] == struct.pack("!I", SPI_PAIRS[spi]) and data[8:] == token:
                return True
        return False
    finally:
        p.close()


def gre_v0_exchange(
    topo: Topology, role: str, dst: str = R1, timeout: float = ANSWER_TIMEOUT
) -> bool:
    p = RawPeer(topo, role, IPPROTO_GRE)
    try:
        token = os.urandom(8)
        p.send(dst, gre_v0(token))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = p.recv(left)
            if got is None:
                return False
            if got[1][4:] == token:
                return True
        return False
    finally:
        p.close()


class PptpCall:
    """A PPTP client on a LAN host: control connection to r1:1723, one outgoing call with
    ``call_id``, then GRE both ways (see :meth:`gre_roundtrip`)."""

    def __init__(
        self,
        topo: Topology,
        role: str,
        call_id: int,
        dst: str = R1,
        timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        self.c = sock(topo, role, socket.AF_INET, socket.SOCK_STREAM)
        self.c.settimeout(timeout)
        self.c.connect((dst, 1723))
        self.c.sendall(pptp_msg(1, 156))
        rep = _recv_exact(self.c, 156)
        assert struct.unpack_from("!H", rep, 8)[0] == 2
        self.c.sendall(pptp_msg(7, 168, {12: call_id, 14: 1}))
        rep = _recv_exact(self.c, 32)
        ctype, server_id, peer = struct.unpack_from("!H2xHH", rep, 8)
        assert ctype == 8
        #: the reply must carry *our* Call ID again (the gateway translated it back)
        self.peer_id_seen = peer
        self.server_id = server_id
        self.call_id = call_id
        self.dst = dst
        self.gre = RawPeer(topo, role, IPPROTO_GRE)

    def gre_roundtrip(self, timeout: float = ANSWER_TIMEOUT) -> tuple[str, int] | None:
        """GRE to the server's Call ID; (source, Call ID) of the echo, or None."""
        token = os.urandom(8)
        self.gre.send(self.dst, gre_v1(self.server_id, token))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.gre.recv(left)
            if got is None:
                return None
            src, data = got
            if data[8:] == token:
                return src, struct.unpack_from("!H", data, 6)[0]
        return None

    def close(self) -> None:
        self.c.close()
        self.gre.close()


def ours_installed(topo: Topology) -> bool:
    return rules.installed(netns=topo.ns("gw"))


def iptables_save(topo: Topology) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", topo.ns("gw"), "iptables-save"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def gw_run(topo: Topology, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", topo.ns("gw"), *argv],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


def metrics_text(topo: Topology, port: int) -> str:
    s = sock(topo, "gw", socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(ANSWER_TIMEOUT)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    finally:
        s.close()
    return buf.partition(b"\r\n\r\n")[2].decode()


def dump(obj: object) -> str:
    return json.dumps(obj, indent=1, default=str)
