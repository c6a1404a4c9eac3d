"""Plain traffic helpers: ICMP pinger (no ``ping`` binary here), TCP and UDP echo.

Each is a function (usable in-process, e.g. inside a namespace subprocess) and a CLI
subcommand that prints one JSON object on stdout::

    python -m vpnmasq_lab.plain ping 198.51.100.20 --count 3
    python -m vpnmasq_lab.plain udp-echo-server --port 7           # runs until killed
    python -m vpnmasq_lab.plain udp-echo-client 198.51.100.20 7 --count 5 --token h1
    python -m vpnmasq_lab.plain tcp-echo-server --port 7
    python -m vpnmasq_lab.plain tcp-echo-client 198.51.100.20 7 --count 5 --token h1
    python -m vpnmasq_lab.plain http-server --port 80                # web-like traffic:
    python -m vpnmasq_lab.plain http-client 198.51.100.22 80 --count 3 --token h1

Servers print ``{"event": "ready", ...}`` once listening and ``{"event": "peer", "peer":
"ip:port"}`` the first time they see a peer, so a test can check what source address and
port the masquerading gateway produced. Clients verify that each echo carries their own
token and sequence number; an echo carrying another token counts as ``crosstalk``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from vpnmasq.packet.checksum import checksum

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0



def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def ping(
    dst: str,
    *,
    count: int = 3,
    interval: float = 0.2,
    timeout: float = 2.0,
    ident: int | None = None,
    payload: bytes = b"vpnmasq-lab",
) -> dict[str, Any]:
    """Send ICMP echo requests over a raw socket; returns sent/received/rtts_ms."""
    ident = (os.getpid() if ident is None else ident) & 0xFFFF
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sent = received = 0
    rtts: list[float] = []
    pending: dict[int, float] = {}
    try:
        deadline = time.monotonic() + count * interval + timeout
        next_send = time.monotonic()
        seq = 0
        while time.monotonic() < deadline:
            now = time.monotonic()
            if seq < count and now >= next_send:
                seq += 1
                hdr = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
                csum = checksum(hdr + payload)
                pkt = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload
                s.sendto(pkt, (dst, 0))
                pending[seq] = now
                sent += 1
                next_send = now + interval
            if seq >= count and not pending:
                break
            wait = max(
                0.0, min(next_send if seq < count else deadline, deadline) - time.monotonic()
            )
            r, _, _ = select.select([s], [], [], wait)
            if not r:
                continue
            data, addr = s.recvfrom(65535)
            ihl = (data[0] & 0x0F) * 4
            icmp = data[ihl:]
            if len(icmp) < 8 or addr[0] != dst:
                continue
            typ, _code, _csum, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
            if typ == ICMP_ECHO_REPLY and rid == ident and rseq in pending:
                rtts.append(round((time.monotonic() - pending.pop(rseq)) * 1000, 3))
                received += 1
    finally:
        s.close()
    return {
        "kind": "ping",
        "dst": dst,
        "ident": ident,
        "sent": sent,
        "received": received,
        "rtts_ms": rtts,
        "ok": received == count,
    }


def _token_msg(token: str, seq: int) -> bytes:
    return f"VMQ {token} {seq}".encode()


def _parse_msg(data: bytes) -> tuple[str, int] | None:
    parts = data.decode(errors="replace").split()
    if len(parts) == 3 and parts[0] == "VMQ" and parts[2].isdigit():
        return parts[1], int(parts[2])
    return None


def udp_echo_server(port: int, bind: str = "0.0.0.0", *, max_seconds: float = 3600.0) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    _emit({"event": "ready", "proto": "udp", "port": port, "bind": bind})
    seen: set[tuple[str, int]] = set()
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], 1.0)
        if not r:
            continue
        data, peer = s.recvfrom(65535)
        if peer not in seen:
            seen.add(peer)
            _emit(
                {
                    "event": "peer",
                    "proto": "udp",
                    "peer": f"{peer[0]}:{peer[1]}",
                    "first": data[:64].decode(errors="replace"),
                }
            )
        s.sendto(data, peer)


def udp_echo_client(
    dst: str,
    port: int,
    *,
    count: int = 5,
    token: str = "t",
    interval: float = 0.1,
    timeout: float = 2.0,
    sport: int = 0,
    bind: str = "0.0.0.0",
) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, sport))
    got: set[int] = set()
    crosstalk: list[str] = []
    echo_wall: list[float] = []  # wall-clock time of each new echo (gap measurements)
    sent = 0

    def recv(until: float) -> None:
        n = len(got)
        _recv_udp(s, until, token, got, crosstalk)
        if len(got) > n:
            echo_wall.append(round(time.time(), 3))

    try:
        deadline = time.monotonic() + count * interval + timeout
        for seq in range(1, count + 1):
            s.sendto(_token_msg(token, seq), (dst, port))
            sent += 1
            end = time.monotonic() + interval
            while time.monotonic() < end:
                recv(end)
        while len(got) < count and time.monotonic() < deadline:
            recv(deadline)
        local = s.getsockname()
    finally:
        s.close()
    return {
        "kind": "udp-echo",
        "dst": f"{dst}:{port}",
        "local": f"{local[0]}:{local[1]}",
        "token": token,
        "sent": sent,
        "received": len(got) + len(crosstalk),
        "verified": len(got),
        "crosstalk": crosstalk,
        "echo_wall": echo_wall,
        "ok": len(got) == count and not crosstalk,
    }


def _recv_udp(
    s: socket.socket, until: float, token: str, got: set[int], crosstalk: list[str]
) -> None:
    r, _, _ = select.select([s], [], [], max(0.0, until - time.monotonic()))
    if not r:
        return
    data = s.recv(65535)
    m = _parse_msg(data)
    if m is None or m[0] != token:
        crosstalk.append(data[:64].decode(errors="replace"))
    else:
        got.add(m[1])


def tcp_echo_server(port: int, bind: str = "0.0.0.0", *, max_seconds: float = 3600.0) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, port))
    ls.listen(64)
    _emit({"event": "ready", "proto": "tcp", "port": port, "bind": bind})
    conns: list[socket.socket] = []
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([ls, *conns], [], [], 1.0)
        for sock in r:
            if sock is ls:
                c, peer = ls.accept()
                conns.append(c)
                _emit({"event": "peer", "proto": "tcp", "peer": f"{peer[0]}:{peer[1]}"})
                continue
            try:
                data = sock.recv(65535)
            except OSError:
                data = b""
            if not data:
                conns.remove(sock)
                sock.close()
            else:
                sock.sendall(data)


def tcp_echo_client(
    dst: str, port: int, *, count: int = 5, token: str = "t", timeout: float = 3.0
) -> dict[str, Any]:
    """One connection, `count` newline-terminated messages, each echoed back."""
    got = 0
    crosstalk: list[str] = []
    local = ""
    try:
        with socket.create_connection((dst, port), timeout=timeout) as s:
            la = s.getsockname()
            local = f"{la[0]}:{la[1]}"
            f = s.makefile("rb")
            for seq in range(1, count + 1):
                s.sendall(_token_msg(token, seq) + b"\n")
                line = f.readline().rstrip(b"\n")
                m = _parse_msg(line)
                if m == (token, seq):
                    got += 1
                elif line:
                    crosstalk.append(line[:64].decode(errors="replace"))
        error = None
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    return {
        "kind": "tcp-echo",
        "dst": f"{dst}:{port}",
        "local": local,
        "token": token,
        "sent": count,
        "verified": got,
        "crosstalk": crosstalk,
        "error": error,
        "ok": got == count and not crosstalk and error is None,
    }


HTTP_MAX_HEADER = 8192  # a lab request is one short line and a Host header


def http_server(port: int, bind: str = "0.0.0.0", *, max_seconds: float = 3600.0) -> None:
    """HTTP/1.0-style: one request per connection, answered with a small page naming the
    path and the address the request came from, then closed (web traffic: many short TCP
    connections, each a new mapping in a NAT)."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, port))
    ls.listen(64)
    _emit({"event": "ready", "proto": "http", "port": port, "bind": bind})
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([ls], [], [], 1.0)
        if not r:
            continue
        c, peer = ls.accept()
        with c:
            c.settimeout(2.0)
            req = b""
            try:
                while b"\r\n\r\n" not in req and len(req) < HTTP_MAX_HEADER:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    req += chunk
                line = req.split(b"\r\n", 1)[0].decode(errors="replace").split()
                path = line[1] if len(line) >= 2 and line[0] == "GET" else None
                src = f"{peer[0]}:{peer[1]}"
                if path is None:
                    c.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    continue
                body = f"VMQ-WEB path={path} from={src}\n".encode() + b"." * 512
                head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
                c.sendall(head.encode() + body)
                _emit({"event": "request", "peer": src, "path": path})
            except OSError:
                continue


def http_client(
    dst: str, port: int, *, count: int = 3, token: str = "t", timeout: float = 3.0
) -> dict[str, Any]:
    """``count`` GET requests, each on a new connection; checks status and that the page
    names this request's path (another client's page would be cross-talk)."""
    verified = 0
    crosstalk: list[str] = []
    errors: list[str] = []
    seen_as: list[str] = []
    for seq in range(1, count + 1):
        path = f"/{token}/{seq}"
        try:
            with socket.create_connection((dst, port), timeout=timeout) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: {dst}\r\n\r\n".encode())
                resp = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    resp += chunk
        except OSError as e:
            errors.append(f"{type(e).__name__}: {e}")
            continue
        head, _, body = resp.partition(b"\r\n\r\n")
        first = body.split(b"\n", 1)[0].decode(errors="replace")
        if not head.startswith(b"HTTP/1.0 200"):
            errors.append(head[:40].decode(errors="replace"))
        elif f"path={path} " in first:
            verified += 1
            seen_as.append(first.rsplit("from=", 1)[-1])
        else:
            crosstalk.append(first[:80])
    return {
        "kind": "http",
        "dst": f"{dst}:{port}",
        "token": token,
        "sent": count,
        "verified": verified,
        "seen_as": seen_as,
        "crosstalk": crosstalk,
        "errors": errors,
        "ok": verified == count and not crosstalk,
    }


#: the download server sends this much every DOWNLOAD_TICK seconds (a steady stream whose
#: gaps are easy to see)
DOWNLOAD_CHUNK = 1024
DOWNLOAD_TICK = 0.02


def download_server(port: int, bind: str = "0.0.0.0", *, max_seconds: float = 3600.0) -> None:
    """A steady TCP download for every client, until it closes."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, port))
    ls.listen(16)
    _emit({"event": "ready", "port": port})

    def stream(c: socket.socket) -> None:
        with c:
            end = time.monotonic() + max_seconds
            try:
                while time.monotonic() < end:
                    c.sendall(b"d" * DOWNLOAD_CHUNK)
                    time.sleep(DOWNLOAD_TICK)
            except OSError:
                pass

    end = time.monotonic() + max_seconds
    while time.monotonic() < end:
        r, _, _ = select.select([ls], [], [], 0.5)
        if r:
            c, _ = ls.accept()
            threading.Thread(target=stream, args=(c,), daemon=True).start()


def download_client(dst: str, port: int, *, duration: float = 10.0) -> dict[str, Any]:
    """Read the download for ``duration`` s on one connection; the wall-clock times data
    arrived (at most one per 50 ms) show its gaps."""
    s = socket.create_connection((dst, port), timeout=5.0)
    local = s.getsockname()
    got = 0
    stamps: list[float] = []
    error = None
    end = time.monotonic() + duration
    try:
        while time.monotonic() < end:
            r, _, _ = select.select([s], [], [], max(0.0, end - time.monotonic()))
            if not r:
                continue
            data = s.recv(65536)
            if not data:
                error = "closed by the server"
                break
            got += len(data)
            now = round(time.time(), 3)
            if not stamps or now - stamps[-1] >= 0.05:
                stamps.append(now)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        s.close()
    return {
        "kind": "download",
        "dst": f"{dst}:{port}",
        "local": f"{local[0]}:{local[1]}",
        "bytes": got,
        "echo_wall": stamps,
        "error": error,
        "ok": error is None and got > 0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vpnmasq_lab.plain")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ping")
    p.add_argument("dst")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--ident", type=int)
    servers = {
        "udp-echo-server": udp_echo_server,
        "tcp-echo-server": tcp_echo_server,
        "http-server": http_server,
        "download-server": download_server,
    }
    for name in servers:
        q = sub.add_parser(name)
        q.add_argument("--port", type=int, default=8080 if name == "download-server" else 7)
        q.add_argument("--bind", default="0.0.0.0")
        q.add_argument("--max-seconds", type=float, default=3600.0)
    for name in ("udp-echo-client", "tcp-echo-client", "http-client"):
        q = sub.add_parser(name)
        q.add_argument("dst")
        q.add_argument("port", type=int)
        q.add_argument("--count", type=int, default=5)
        q.add_argument("--token", default=f"pid{os.getpid()}")
        q.add_argument("--timeout", type=float, default=2.0)
        if name.startswith("udp"):
            q.add_argument("--sport", type=int, default=0)
            q.add_argument("--interval", type=float, default=0.1)
    q = sub.add_parser("download-client")
    q.add_argument("dst")
    q.add_argument("port", type=int)
    q.add_argument("--duration", type=float, default=10.0)
    a = ap.parse_args(argv)
    if a.cmd in servers:
        servers[a.cmd](a.port, a.bind, max_seconds=a.max_seconds)
        return 0
    if a.cmd == "ping":
        res = ping(a.dst, count=a.count, interval=a.interval, timeout=a.timeout, ident=a.ident)
    elif a.cmd == "download-client":
        res = download_client(a.dst, a.port, duration=a.duration)
    elif a.cmd == "http-client":
        res = http_client(a.dst, a.port, count=a.count, token=a.token, timeout=a.timeout)
    elif a.cmd == "udp-echo-client":
        res = udp_echo_client(
            a.dst,
            a.port,
            count=a.count,
            token=a.token,
            timeout=a.timeout,
            sport=a.sport,
            interval=a.interval,
        )
    else:
        res = tcp_echo_client(a.dst, a.port, count=a.count, token=a.token, timeout=a.timeout)
    _emit(res)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
