"""Peers for the real-world lab cases (tests/e2e/test_realworld.py) that this kernel lacks.

``gre-tunnel``: a GRE v0 (RFC 2784) point-to-point tunnel in userspace: a TUN device for the
inner packets and a raw IP protocol 47 socket for the outer ones. This kernel has no ip_gre
(CONFIG_NET_IPGRE_DEMUX is not set) and no WireGuard, so a LAN VPN router's tunnel for the
network-to-network case is built here. Raw protocol-47 sockets receive GRE (nothing else in
the kernel claims it, so no ICMP protocol-unreachable is sent either) and the kernel adds
the outer IP header on send::

    python tests/e2e/realworld_peers.py gre-tunnel --dev gre1 --remote 198.51.100.20

prints ``{"event": "ready"}`` once the device exists (the caller adds addresses/routes) and
``{"event": "stats", ...}`` on SIGTERM.

``l2tp-natt-server`` / ``l2tp-natt-client``: the data path of L2TP/IPsec (RFC 3193): ESP in
*transport* mode carrying UDP 1701 (an L2TP control header and a token), inside UDP 4500
(NAT-T, RFC 3948), with real crypto (scapy, keys from the SPI as in
:mod:`vpnmasq_lab.rawpeers`). No IKE: strongSwan's kernel-libipsec only does tunnel mode
("IPsec SA: unsupported mode") and this kernel has no ESP, so a real L2TP/IPsec stack cannot
run here. The inner UDP checksum covers the sender's own addresses (transport mode), which a
NAT changes; the receiver reports whether it verifies as received and with the original
address (what IKE's NAT-OA payload tells a real receiver, RFC 3948 3.1.2).

``tcp-mss-server``: accept TCP connections and report the MSS option of each SYN as the
server's kernel received it (``TCP_MAXSEG`` after accept is min(ours, theirs), so the SYN
itself is read from a raw socket).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any

from vpnmasq.packet.l4 import NATT_PORT

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
GRE_V0_IPV4 = struct.pack("!HH", 0, 0x0800)  # no C/K/S bits, version 0, IPv4 payload


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def gre_tunnel(dev: str, remote: str) -> int:
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    stats = {"encap": 0, "decap": 0, "ignored": 0}
    stop = False

    def _term(*_a: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _term)
    _emit({"event": "ready", "dev": dev, "remote": remote})
    while not stop:
        try:
            r, _, _ = select.select([tun, raw], [], [], 0.2)
        except InterruptedError:
            continue
        if tun in r:
            pkt = os.read(tun, 65535)
            if pkt and pkt[0] >> 4 == 4:
                raw.sendto(GRE_V0_IPV4 + pkt, (remote, 0))
                stats["encap"] += 1
        if raw in r:
            data, (src, _) = raw.recvfrom(65535)
            ihl = (data[0] & 0x0F) * 4
            gre = data[ihl:]
            if src != remote or len(gre) < 4 or gre[:4] != GRE_V0_IPV4:
                stats["ignored"] += 1
                continue
            os.write(tun, gre[4:])
            stats["decap"] += 1
    _emit({"event": "stats", **stats})
    return 0


def tcp_mss_server(port: int, bind: str) -> int:
    """Report the MSS option of every SYN to ``port`` (as received here) and echo data."""
    sniff = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(8)
    conns: list[socket.socket] = []
    stop = False

    def _term(*_a: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _term)
    _emit({"event": "ready", "port": port})
    while not stop:
        try:
            r, _, _ = select.select([sniff, srv, *conns], [], [], 0.2)
        except InterruptedError:
            continue
        for s in r:
            if s is sniff:
                data = sniff.recv(65535)
                ihl = (data[0] & 0x0F) * 4
                tcp = data[ihl:]
                if len(tcp) < 20 or struct.unpack("!H", tcp[2:4])[0] != port or not tcp[13] & 0x02:
                    continue
                doff = (tcp[12] >> 4) * 4
                i, mss = 20, None
                while i < doff:
                    if tcp[i] == 0:
                        break
                    if tcp[i] == 1:
                        i += 1
                        continue
                    if tcp[i] == 2:
                        mss = struct.unpack("!H", tcp[i + 2 : i + 4])[0]
                    i += max(2, tcp[i + 1])
                src = socket.inet_ntoa(data[12:16])
                _emit({"event": "syn", "src": src, "mss": mss})
            elif s is srv:
                c, _ = srv.accept()
                c.settimeout(1.0)  # a peer that never ACKs (the black hole) must not stall us
                conns.append(c)
            else:
                try:
                    d = s.recv(65536)
                    if d:
                        s.sendall(d)
                except OSError:
                    d = b""
                if not d:
                    conns.remove(s)
                    s.close()
    return 0


def tcp_bulk_client(dst: str, port: int, size: int, timeout: float) -> int:
    """Send ``size`` bytes to an echo server while reading them back; report whether all came
    back within ``timeout`` and the MSS the socket ended up with."""
    blob = (bytes(range(256)) * (size // 256 + 1))[:size]
    try:
        s = socket.create_connection((dst, port), timeout=timeout)
    except OSError as e:
        _emit({"ok": False, "error": f"connect: {e}", "received": 0})
        return 1
    mss = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    s.setblocking(False)
    sent, got = 0, bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < size and time.monotonic() < deadline:
        w = [s] if sent < size else []
        r, wr, _ = select.select([s], w, [], 0.1)
        if wr:
            try:
                sent += s.send(blob[sent : sent + 65536])
            except BlockingIOError:
                pass
            except OSError:
                break
        if r:
            try:
                d = s.recv(65536)
            except OSError:  # reset: the server gave up on us
                break
            if not d:
                break
            got += d
    s.close()
    ok = bytes(got) == blob
    _emit({"ok": ok, "sent": sent, "received": len(got), "mss": mss,
           **({} if ok else {"error": "timed out" if len(got) < size else "corrupted"})})
    return 0 if ok else 1


L2TP_PORT = 1701
REPLY_SPI_OFFSET = 0x1000


def _l2tp_hello(tunnel: int, session: int, token: bytes) -> bytes:
    """An L2TP v2 control header (T, L, S set; RFC 2661 3.1) followed by ``token``."""
    body = struct.pack("!HHHH", tunnel, session, 0, 0) + token
    return struct.pack("!HH", 0xC802, 4 + len(body)) + body


def _inner_checksum_ok(udp: bytes, src: str, dst: str) -> bool:
    from vpnmasq.packet.checksum import checksum, pseudo_header_sum
    from vpnmasq.packet.ipv4 import ip_to_int

    if udp[6:8] == b"\0\0":
        return True
    return checksum(udp, pseudo_header_sum(ip_to_int(src), ip_to_int(dst), 17, len(udp))) == 0


def _esp_transport(sa: Any, src: str, dst: str, udp_payload: bytes) -> bytes:
    """ESP (transport mode, next header UDP) for IP(src, dst)/UDP(1701, 1701)/payload."""
    from scapy.layers.inet import IP, UDP
    from scapy.packet import Raw

    pkt = sa.encrypt(IP(src=src, dst=dst) / UDP(sport=L2TP_PORT, dport=L2TP_PORT) / Raw(udp_payload))
    return bytes(pkt[IP].payload)


def _esp_open(sa: Any, src: str, dst: str, esp: bytes) -> bytes:
    """Decrypt ESP received (in UDP) from ``src`` to ``dst``: the inner UDP segment."""
    from scapy.layers.inet import IP

    ip = IP(src=src, dst=dst, proto=50) / esp
    return bytes(sa.decrypt(IP(bytes(ip)))[IP].payload)


def udp_datagrams(
    bind: str, port: int, duration: float
) -> Iterator[tuple[socket.socket, bytes, str, int]]:
    """A UDP server loop: bind ``bind:port``, emit ``ready``, then yield ``(sock, data,
    peer address, peer port)`` for each datagram until SIGTERM or ``duration`` seconds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    stop = False

    def _term(*_a: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _term)
    _emit({"event": "ready", "port": port})
    t_end = time.monotonic() + duration
    while not stop and time.monotonic() < t_end:
        r, _, _ = select.select([sock], [], [], 0.2)
        if not r:
            continue
        data, (addr, peer_port) = sock.recvfrom(65535)
        yield sock, data, addr, peer_port


def l2tp_natt_server(bind: str, duration: float) -> int:
    from vpnmasq_lab.rawpeers import make_sa

    seen: set[tuple[str, int]] = set()
    for sock, data, addr, port in udp_datagrams(bind, NATT_PORT, duration):
        if len(data) < 8 or data[:4] == b"\0\0\0\0":
            continue  # keepalive or IKE (none here)
        spi = struct.unpack("!I", data[:4])[0]
        try:
            udp = _esp_open(make_sa(spi), addr, bind, data)
        except Exception as e:  # bad ICV, wrong SPI
            _emit({"event": "bad", "peer": f"{addr}:{port}", "error": str(e)})
            continue
        ports = struct.unpack("!HH", udp[:4])
        token = udp[8 + 12 :]
        original = token.split(b"|")[1].decode() if b"|" in token else addr
        if (addr, port) not in seen:
            seen.add((addr, port))
            _emit({
                "event": "peer", "peer": f"{addr}:{port}", "spi": spi, "ports": list(ports),
                "csum_as_received": _inner_checksum_ok(udp, addr, bind),
                "csum_with_nat_oa": _inner_checksum_ok(udp, original, bind),
            })
        tunnel, session = struct.unpack("!HH", udp[8 + 4 : 8 + 8])
        reply = _l2tp_hello(tunnel, session, token + b" ECHO")
        sock.sendto(_esp_transport(make_sa(spi + REPLY_SPI_OFFSET), bind, addr, reply), (addr, port))
    return 0


def l2tp_natt_client(server: str, spi: int, token: str, count: int, timeout: float) -> int:
    from vpnmasq_lab.rawpeers import make_sa

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", NATT_PORT))
    sock.connect((server, NATT_PORT))
    me = sock.getsockname()[0]
    sa_out, sa_in = make_sa(spi), make_sa(spi + REPLY_SPI_OFFSET)
    ok = 0
    csum_rx: set[bool] = set()
    for seq in range(1, count + 1):
        tok = f"{token}-{seq}|{me}".encode()
        sock.send(_esp_transport(sa_out, me, server, _l2tp_hello(7, seq, tok)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([sock], [], [], 0.1)
            if not r:
                continue
            data = sock.recv(65535)
            try:
                udp = _esp_open(sa_in, server, me, data)
            except Exception:
                continue
            if udp[8 + 12 :] == tok + b" ECHO" and struct.unpack("!H", udp[2:4])[0] == L2TP_PORT:
                ok += 1
                csum_rx.add(_inner_checksum_ok(udp, server, me))
                break
    _emit({"ok": ok == count, "sent": count, "echoed": ok, "local": me,
           "csum_as_received": sorted(csum_rx)})
    return 0 if ok == count else 1


def udp6_echo_server(bind: str, port: int) -> int:
    """IPv6 UDP echo; reports each new peer address (to show it was not translated)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    seen: set[str] = set()
    stop = False

    def _term(*_a: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _term)
    _emit({"event": "ready", "port": port})
    while not stop:
        r, _, _ = select.select([sock], [], [], 0.2)
        if r:
            data, addr = sock.recvfrom(65535)
            if addr[0] not in seen:
                seen.add(addr[0])
                _emit({"event": "peer", "peer": addr[0]})
            sock.sendto(data, addr)
    return 0


def udp6_echo_client(dst: str, port: int, count: int, timeout: float) -> int:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.connect((dst, port))
    sock.settimeout(timeout)
    ok = 0
    for i in range(count):
        msg = f"v6-{os.getpid()}-{i}".encode()
        sock.send(msg)
        try:
            if sock.recv(65535) == msg:
                ok += 1
        except OSError:
            pass
    _emit({"ok": ok == count, "sent": count, "echoed": ok, "local": sock.getsockname()[0]})
    return 0 if ok == count else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gre-tunnel")
    g.add_argument("--dev", required=True)
    g.add_argument("--remote", required=True)
    m = sub.add_parser("tcp-mss-server")
    m.add_argument("--port", type=int, default=9)
    m.add_argument("--bind", default="0.0.0.0")
    b = sub.add_parser("tcp-bulk-client")
    b.add_argument("dst")
    b.add_argument("port", type=int)
    b.add_argument("--size", type=int, default=200_000)
    b.add_argument("--timeout", type=float, default=5.0)
    ls = sub.add_parser("l2tp-natt-server")
    ls.add_argument("--bind", required=True)
    ls.add_argument("--duration", type=float, default=120.0)
    lc = sub.add_parser("l2tp-natt-client")
    lc.add_argument("--server", required=True)
    lc.add_argument("--spi", type=lambda x: int(x, 0), required=True)
    lc.add_argument("--token", default="l2tp")
    lc.add_argument("--count", type=int, default=3)
    lc.add_argument("--timeout", type=float, default=10.0)  # per message; ends at its echo
    u6s = sub.add_parser("udp6-echo-server")
    u6s.add_argument("--bind", default="::")
    u6s.add_argument("--port", type=int, default=7)
    u6c = sub.add_parser("udp6-echo-client")
    u6c.add_argument("dst")
    u6c.add_argument("port", type=int)
    u6c.add_argument("--count", type=int, default=3)
    u6c.add_argument("--timeout", type=float, default=10.0)  # per message; ends at its echo
    a = ap.parse_args(argv)
    if a.cmd == "udp6-echo-server":
        return udp6_echo_server(a.bind, a.port)
    if a.cmd == "udp6-echo-client":
        return udp6_echo_client(a.dst, a.port, a.count, a.timeout)
    if a.cmd == "l2tp-natt-server":
        return l2tp_natt_server(a.bind, a.duration)
    if a.cmd == "l2tp-natt-client":
        return l2tp_natt_client(a.server, a.spi, a.token, a.count, a.timeout)
    if a.cmd == "gre-tunnel":
        return gre_tunnel(a.dev, a.remote)
    if a.cmd == "tcp-mss-server":
        return tcp_mss_server(a.port, a.bind)
    return tcp_bulk_client(a.dst, a.port, a.size, a.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
