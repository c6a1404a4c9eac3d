"""Small peers the lab benchmark runs inside its namespaces (``python bench/peers.py CMD``).

Each prints JSON lines on stdout (``{"event": "ready"}`` when listening) and exits on SIGTERM.

* ``pptp-server``: answers Start-Control-Connection-Request and Outgoing-Call-Request
  (RFC 2637 2.1/2.7) on TCP 1723 with a fixed Call ID; reports the Call ID it was given;
* ``pptp-client``: opens a control connection and one call, reports the Call ID the server
  answered with, then keeps the connection (and so the call) open;
* ``send-raw``: sends raw IPv4 payloads of one protocol (an ESP packet to associate SPIs,
  a GRE packet to open the kernel's GRE flow);
* ``udp-echo`` / ``udp-pingpong``: one-by-one UDP round trips, for the added latency.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import struct
import sys
import time
from typing import Any

MAGIC = 0x1A2B3C4D
SCCRQ, SCCRP, OCRQ, OCRP = 1, 2, 7, 8


def emit(**obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def message(ctype: int, body: bytes) -> bytes:
    return struct.pack("!HHIHH", 12 + len(body), 1, MAGIC, ctype, 0) + body


def start_request() -> bytes:  # 156 bytes
    names = b"bench".ljust(64, b"\0") + b"vpnmasq".ljust(64, b"\0")
    return message(SCCRQ, struct.pack("!HHIIHH", 0x0100, 0, 1, 1, 0, 1) + names)


def start_reply() -> bytes:  # 156 bytes
    names = b"bench".ljust(64, b"\0") + b"vpnmasq".ljust(64, b"\0")
    return message(SCCRP, struct.pack("!HBBIIHH", 0x0100, 1, 0, 1, 1, 0, 1) + names)


def call_request(call_id: int) -> bytes:  # 168 bytes
    body = struct.pack("!HHIIIIHHHH", call_id, 1, 300, 100_000_000, 3, 3, 64, 0, 0, 0)
    return message(OCRQ, body + b"\0" * 128)


def call_reply(call_id: int, peer_call_id: int) -> bytes:  # 32 bytes
    return message(OCRP, struct.pack("!HHBBHIHHI", call_id, peer_call_id, 1, 0, 0, 100_000_000, 64, 0, 0))


def read_message(conn: socket.socket) -> bytes:
    head = b""
    while len(head) < 2:
        chunk = conn.recv(2 - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    (n,) = struct.unpack("!H", head)
    data = head
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def pptp_server(port: int, call_id: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    emit(event="ready", port=port)
    conns = []
    while True:
        conn, peer = srv.accept()
        conns.append(conn)
        try:
            while True:
                m = read_message(conn)
                ctype = struct.unpack_from("!H", m, 8)[0]
                if ctype == SCCRQ:
                    conn.sendall(start_reply())
                elif ctype == OCRQ:
                    pns = struct.unpack_from("!H", m, 12)[0]
                    conn.sendall(call_reply(call_id, pns))
                    emit(event="call", peer=peer[0], pns_call_id=pns, pac_call_id=call_id)
                    break
        except EOFError:
            continue


def pptp_client(server: str, call_id: int) -> None:
    conn = socket.create_connection((server, 1723), timeout=5)
    conn.sendall(start_request())
    read_message(conn)
    conn.sendall(call_request(call_id))
    rep = read_message(conn)
    own, peer = struct.unpack_from("!HH", rep, 12)
    emit(event="call", pns_call_id=call_id, pac_call_id=own, echoed=peer)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def send_raw(proto: int, dst: str, payload_hex: str, count: int, gap: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    data = bytes.fromhex(payload_hex)
    for _ in range(count):
        s.sendto(data, (dst, 0))
        time.sleep(gap)
    emit(event="sent", count=count)


def udp_echo(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    emit(event="ready", port=port)
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)


def udp_pingpong(server: str, port: int, count: int, size: int, warmup: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    s.connect((server, port))
    rtts: list[float] = []
    lost = 0
    for i in range(warmup + count):
        data = struct.pack("!I", i) + b"\0" * max(0, size - 4)
        t0 = time.perf_counter()
        s.send(data)
        try:
            while True:
                back = s.recv(65535)
                if back[:4] == data[:4]:
                    break
        except TimeoutError:
            lost += 1
            continue
        if i >= warmup:
            rtts.append(time.perf_counter() - t0)
    rtts.sort()
    emit(
        event="rtt",
        n=len(rtts),
        lost=lost,
        median_us=statistics.median(rtts) * 1e6 if rtts else None,
        p99_us=rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e6 if rtts else None,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/peers.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pptp-server")
    p.add_argument("--port", type=int, default=1723)
    p.add_argument("--call-id", type=int, required=True)
    p = sub.add_parser("pptp-client")
    p.add_argument("--server", required=True)
    p.add_argument("--call-id", type=int, required=True)
    p = sub.add_parser("send-raw")
    p.add_argument("--proto", type=int, required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--hex", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--gap", type=float, default=0.05)
    p = sub.add_parser("udp-echo")
    p.add_argument("--port", type=int, default=7)
    p = sub.add_parser("udp-pingpong")
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, default=7)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=50)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if a.cmd == "pptp-server":
        pptp_server(a.port, a.call_id)
    elif a.cmd == "pptp-client":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        pptp_client(a.server, a.call_id)
    elif a.cmd == "send-raw":
        send_raw(a.proto, a.dst, a.hex, a.count, a.gap)
    elif a.cmd == "udp-echo":
        udp_echo(a.port)
    else:
        udp_pingpong(a.server, a.port, a.count, a.size, a.warmup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
