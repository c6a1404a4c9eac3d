"""An L2TP-shaped hello echo on UDP 1701, for L2TP/IPsec through strongSwan tunnels
(tests/e2e/test_l2tp_strongswan.py). Run inside a lab namespace::

    python tests/e2e/l2tp_hello.py server --bind 198.51.100.20
    python tests/e2e/l2tp_hello.py client --server 198.51.100.20 --token h1

The server answers every L2TP v2 control header (``_l2tp_hello`` of realworld_peers.py) with
the same tunnel/session and the token plus `` ECHO``, and reports each new peer (address and
port as the server's kernel delivered them: through an IPsec tunnel, the client's own LAN
address and port 1701). The client sends from port 1701, as L2TP does, and prints one JSON
line: ``ok`` when every hello came back.
"""

from __future__ import annotations

import argparse
import select
import socket
import struct
import time

from realworld_peers import L2TP_PORT, _emit, _l2tp_hello, udp_datagrams


def _parse(data: bytes) -> tuple[int, int, bytes] | None:
    """(tunnel, session, token) of an L2TP v2 control message with length, or None."""
    if len(data) < 12:
        return None
    flags, length, tunnel, session = struct.unpack_from("!HHHH", data)
    if flags != 0xC802 or length != len(data):
        return None
    return tunnel, session, data[12:]


def server(bind: str, duration: float) -> int:
    seen: set[tuple[str, int]] = set()
    for sock, data, addr, port in udp_datagrams(bind, L2TP_PORT, duration):
        msg = _parse(data)
        if msg is None:
            _emit({"event": "bad", "peer": f"{addr}:{port}", "len": len(data)})
            continue
        tunnel, session, token = msg
        if (addr, port) not in seen:
            seen.add((addr, port))
            _emit({"event": "peer", "peer": f"{addr}:{port}", "token": token.decode(errors="replace")})
        sock.sendto(_l2tp_hello(tunnel, session, token + b" ECHO"), (addr, port))
    return 0


def client(server_ip: str, token: str, count: int, timeout: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", L2TP_PORT))
    sock.connect((server_ip, L2TP_PORT))
    ok = 0
    for seq in range(1, count + 1):
        tok = f"{token}-{seq}".encode()
        deadline = time.monotonic() + timeout
        next_send = 0.0
        done = False
        while not done and time.monotonic() < deadline:
            if time.monotonic() >= next_send:  # resend: the first may race the tunnel
                sock.send(_l2tp_hello(7, seq, tok))
                next_send = time.monotonic() + 1.0
            r, _, _ = select.select([sock], [], [], 0.1)
            if not r:
                continue
            try:
                msg = _parse(sock.recv(65535))
            except ConnectionRefusedError:
                continue
            if msg == (7, seq, tok + b" ECHO"):
                ok += 1
                done = True
    _emit({"ok": ok == count, "sent": count, "echoed": ok, "local": sock.getsockname()[0]})
    return 0 if ok == count else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", required=True)
    s.add_argument("--duration", type=float, default=300.0)
    c = sub.add_parser("client")
    c.add_argument("--server", required=True)
    c.add_argument("--token", default="l2tp")
    c.add_argument("--count", type=int, default=3)
    c.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args()
    if a.cmd == "server":
        return server(a.bind, a.duration)
    return client(a.server, a.token, a.count, a.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
