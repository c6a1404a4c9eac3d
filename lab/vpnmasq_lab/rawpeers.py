"""Raw ESP (IP protocol 50), ISAKMP (udp/500) and AH test peers, which strongSwan here cannot be.

strongSwan's kernel-libipsec only speaks ESP-in-UDP and this kernel has no ESP, so the
HOWTO's case (raw ESP plus ISAKMP from source port 500) needs its own peers. Each runs as a
subprocess in a namespace (``python -m vpnmasq_lab.rawpeers esp-server|esp-client|
isakmp-server|isakmp-client|ah-send|raw-listen ...``) and prints JSON lines: events as they
happen, then one ``{"event": "summary", ...}``. ESP is real (scapy's SecurityAssociation,
keys derived from the SPI and a seed); clients verify every echo and count cross-talk as
``foreign``.

Every option, and what each peer checks: docs/internals/lab-rawpeers.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from vpnmasq.packet.ipv4 import PROTO_ESP
from vpnmasq.packet.l4 import ISAKMP_PORT

ESP_NEXT_HEADER = 253  # RFC 3692 experimental: nobody will interpret our payload


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _int0(s: str) -> int:
    return int(s, 0)


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: object) -> None:
    raise _Stop()


def _install_signals() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


# ---------------------------------------------------------------------------------- ESP
def esp_keys(spi: int, seed: str = "vpnmasq-lab") -> tuple[bytes, bytes]:
    """(AES-128 key, HMAC-SHA1 key) for an SPI: both ends derive the same from SPI + seed."""
    h = hashlib.sha256(f"{seed}:{spi:#010x}".encode()).digest()
    return h[:16], hashlib.sha1(h).digest()


def make_sa(spi: int, seed: str = "vpnmasq-lab") -> Any:
    from scapy.layers.ipsec import ESP, SecurityAssociation

    ck, ak = esp_keys(spi, seed)
    sa_cls: Any = SecurityAssociation  # scapy is untyped
    return sa_cls(
        ESP, spi=spi, crypt_algo="AES-CBC", crypt_key=ck, auth_algo="HMAC-SHA1-96", auth_key=ak
    )


def esp_encrypt(sa: Any, src: str, dst: str, payload: bytes) -> bytes:
    """ESP header + encrypted payload + ICV (no IP header: the raw socket adds it)."""
    from scapy.layers.inet import IP
    from scapy.packet import Raw

    pkt = sa.encrypt(IP(src=src, dst=dst, proto=ESP_NEXT_HEADER) / Raw(payload))
    return bytes(pkt[IP].payload)


def esp_decrypt(sa: Any, ip_packet: bytes) -> bytes:
    """Decrypt a whole IP/ESP packet; returns the inner payload. Raises on a bad ICV."""
    from scapy.layers.inet import IP

    return bytes(sa.decrypt(IP(ip_packet))[IP].payload)


def _esp_spi(ip_packet: bytes) -> tuple[str, int] | None:
    if len(ip_packet) < 28:
        return None
    ihl = (ip_packet[0] & 0x0F) * 4
    if len(ip_packet) < ihl + 8:
        return None
    src = socket.inet_ntoa(ip_packet[12:16])
    return src, struct.unpack("!I", ip_packet[ihl : ihl + 4])[0]


def _esp_socket(bind: str | None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, PROTO_ESP)
    if bind:
        s.bind((bind, 0))
    return s


def _local_addr_for(dst: str) -> str:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.connect((dst, 9))
        return str(u.getsockname()[0])
    finally:
        u.close()


def esp_server(  # long: a scripted peer, in transcript order
    bind: str,
    sas: Sequence[tuple[int, int]],
    *,
    seed: str = "vpnmasq-lab",
    send_first: str | None = None,
    first_count: int = 3,
    first_interval: float = 0.2,
    duration: float = 3600.0,
) -> dict[str, Any]:
    """Echo ESP: receive on each IN SPI, answer on its OUT SPI to the packet's source."""
    pairs = {
        spi_in: (make_sa(spi_in, seed), spi_out, make_sa(spi_out, seed)) for spi_in, spi_out in sas
    }
    s = _esp_socket(bind)
    stats: dict[str, Any] = {
        "received": 0,
        "echoed": 0,
        "bad": 0,
        "unknown_spi": {},
        "peers": {},
        "first_sent": 0,
    }
    _emit(
        {
            "event": "ready",
            "kind": "esp-server",
            "bind": bind,
            "sas": [[f"{a:#x}", f"{b:#x}"] for a, b in sas],
        }
    )
    deadline = time.monotonic() + duration
    next_first = time.monotonic() if send_first else None
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            if send_first is not None and next_first is not None and now >= next_first:
                for _, spi_out, sa_out in pairs.values():
                    n = stats["first_sent"] // max(1, len(pairs)) + 1
                    payload = f"VMQ server-first {n} spi={spi_out:#x}".encode()
                    s.sendto(esp_encrypt(sa_out, bind, send_first, payload), (send_first, 0))
                    stats["first_sent"] += 1
                _emit({"event": "sent-first", "target": send_first, "n": stats["first_sent"]})
                if stats["first_sent"] >= first_count * len(pairs):
                    next_first = None
                else:
                    next_first = now + first_interval
            wait = 0.5 if next_first is None else max(0.0, next_first - time.monotonic())
            r, _, _ = select.select([s], [], [], min(wait, max(0.0, deadline - time.monotonic())))
            if not r:
                continue
            data = s.recv(65535)
            hdr = _esp_spi(data)
            if hdr is None:
                stats["bad"] += 1
                continue
            src, spi = hdr
            if spi not in pairs:
                key = f"{spi:#x}"
                stats["unknown_spi"][key] = stats["unknown_spi"].get(key, 0) + 1
                _emit({"event": "unknown-spi", "spi": key, "src": src})
                continue
            sa_in, spi_out, sa_out = pairs[spi]
            try:
                payload = esp_decrypt(sa_in, data)
            except Exception as e:  # scapy raises IPSecIntegrityError and friends
                stats["bad"] += 1
                _emit({"event": "bad-esp", "spi": f"{spi:#x}", "src": src, "error": str(e)})
                continue
            stats["received"] += 1
            peer_key = f"{spi:#x}"
            if stats["peers"].get(peer_key) != src:
                stats["peers"][peer_key] = src
                _emit(
                    {
                        "event": "peer",
                        "spi": peer_key,
                        "src": src,
                        "first": payload[:64].decode(errors="replace"),
                    }
                )
            reply = payload + f" ECHO src={src}".encode()
            s.sendto(esp_encrypt(sa_out, bind, src, reply), (src, 0))
            stats["echoed"] += 1
    except _Stop:
        pass
    finally:
        s.close()
    summary = {"event": "summary", "kind": "esp-server", **stats}
    _emit(summary)
    return summary


def esp_client(  # noqa: C901 - a scripted peer: send, wait, verify, in transcript order
    server: str,
    spi_out: int,
    spi_in: int,
    *,
    token: str = "t",
    count: int = 5,
    interval: float = 0.1,
    timeout: float = 3.0,
    seed: str = "vpnmasq-lab",
    listen_first: float = 0.0,
    first_wanted: int = 0,
    resend: bool = False,
) -> dict[str, Any]:
    """Send ``count`` ESP packets and verify their echoes.

    ``listen_first``: listen this long before sending (the remote speaks first); it ends
    early once ``first_wanted`` (if > 0) of the server's own packets arrived. ``resend``:
    re-send every packet not yet echoed each ``interval`` until ``timeout``, as the traffic
    inside a real tunnel would be retransmitted (a gateway may hold a host's first packets
    back while another host's SA is being associated)."""
    sa_out, sa_in = make_sa(spi_out, seed), make_sa(spi_in, seed)
    s = _esp_socket(None)
    local = _local_addr_for(server)
    got: set[int] = set()
    res: dict[str, Any] = {
        "event": "summary",
        "kind": "esp-client",
        "server": server,
        "local": local,
        "spi_out": f"{spi_out:#x}",
        "spi_in": f"{spi_in:#x}",
        "token": token,
        "sent": 0,
        "received": 0,
        "verified": 0,
        "echo_src": None,
        "crosstalk": [],
        "foreign": {},
        "bad": 0,
        "server_first": 0,
        "resent": 0,
        "first_echo_s": None,
        "echo_at": [],  # seconds after start of each new verified echo (gap measurements)
    }
    t0 = time.monotonic()

    def handle(data: bytes) -> None:
        hdr = _esp_spi(data)
        if hdr is None:
            return
        src, spi = hdr
        if spi != spi_in:
            key = f"{spi:#x}"
            res["foreign"][key] = res["foreign"].get(key, 0) + 1
            return
        try:
            payload = esp_decrypt(sa_in, data).decode(errors="replace")
        except Exception:
            res["bad"] += 1
            return
        res["received"] += 1
        parts = payload.split(" ")
        if len(parts) >= 3 and parts[0] == "VMQ" and parts[1] == "server-first":
            res["server_first"] += 1
            return
        if len(parts) >= 4 and parts[0] == "VMQ" and parts[1] == token and parts[2].isdigit():
            if int(parts[2]) not in got:
                res["echo_at"].append(round(time.monotonic() - t0, 3))
            got.add(int(parts[2]))
            res["verified"] = len(got)
            if res["first_echo_s"] is None:
                res["first_echo_s"] = round(time.monotonic() - t0, 3)
            if parts[3] == "ECHO" and len(parts) > 4:
                res["echo_src"] = parts[4].removeprefix("src=")
        else:
            res["crosstalk"].append(payload[:80])

    def pump(until: float) -> None:
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            r, _, _ = select.select([s], [], [], left)
            if r:
                handle(s.recv(65535))

    def send(seq: int) -> None:
        payload = f"VMQ {token} {seq}".encode()
        s.sendto(esp_encrypt(sa_out, local, server, payload), (server, 0))

    _emit({"event": "listening", "kind": "esp-client", "local": local, "token": token})
    try:
        if listen_first > 0:
            end_first = time.monotonic() + listen_first
            while time.monotonic() < end_first:
                if first_wanted and res["server_first"] >= first_wanted:
                    break
                pump(min(end_first, time.monotonic() + 0.05))
        for seq in range(1, count + 1):
            send(seq)
            res["sent"] += 1
            pump(time.monotonic() + interval)
        end = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < end:
            pump(min(end, time.monotonic() + (interval if resend else 0.1)))
            if resend and time.monotonic() < end:
                for seq in range(1, count + 1):
                    if seq not in got:
                        send(seq)
                        res["resent"] += 1
    except _Stop:
        pass
    finally:
        s.close()
    res["ok"] = res["verified"] == count and not res["crosstalk"] and not res["bad"]
    _emit(res)
    return res


# ----------------------------------------------------------------------------------- AH
IPPROTO_AH = 51


def ah_packet(spi: int, seq: int, payload: bytes = b"") -> bytes:
    """An AH header (RFC 4302: next header, length, SPI, sequence, 96-bit ICV) + payload.

    The ICV is zeros: nothing can verify it anyway once a NAT has rewritten the addresses
    it covers, which is the point of sending it."""
    icv = bytes(12)
    length = (12 + len(icv)) // 4 - 2  # in 32-bit words, minus 2 (RFC 4302 2.2)
    return struct.pack("!BBHII", ESP_NEXT_HEADER, length, 0, spi, seq) + icv + payload


def ah_send(
    dst: str, *, count: int = 3, spi: int = 0x3001, interval: float = 0.05
) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_AH)
    try:
        for seq in range(1, count + 1):
            s.sendto(ah_packet(spi, seq, f"VMQ ah {seq}".encode()), (dst, 0))
            time.sleep(interval)
    finally:
        s.close()
    res = {"event": "summary", "kind": "ah-send", "dst": dst, "spi": f"{spi:#x}", "sent": count}
    _emit(res)
    return res


def raw_listen(proto: int, bind: str | None, duration: float = 3600.0) -> dict[str, Any]:
    """Count packets of one IP protocol arriving at ``bind`` (by source) until stopped."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    if bind:
        s.bind((bind, 0))
    stats: dict[str, Any] = {"received": 0, "sources": {}}
    _emit({"event": "ready", "kind": "raw-listen", "proto": proto, "bind": bind})
    deadline = time.monotonic() + duration
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([s], [], [], 0.5)
            if not r:
                continue
            data = s.recv(65535)
            src = socket.inet_ntoa(data[12:16]) if len(data) >= 20 else "?"
            stats["received"] += 1
            stats["sources"][src] = stats["sources"].get(src, 0) + 1
            _emit({"event": "packet", "proto": proto, "src": src, "len": len(data)})
    except _Stop:
        pass
    finally:
        s.close()
    summary = {"event": "summary", "kind": "raw-listen", "proto": proto, **stats}
    _emit(summary)
    return summary


# ------------------------------------------------------------------------------- ISAKMP
ISAKMP_HDR = struct.Struct("!8s8sBBBBII")  # icookie rcookie next ver exch flags msgid length
NP_VENDOR_ID = 13  # IKEv1 Vendor ID payload type
NP_V2_VENDOR_ID = 43  # IKEv2 Vendor ID payload type
EXCH_MAIN_MODE = 2
EXCH_IKE_SA_INIT = 34
EXCH_QUICK_MODE = 32  # IKEv1 phase 2: negotiates the ESP SAs
EXCH_IKE_AUTH = 35  # IKEv2: authenticates and creates the first child SA
FLAG_V2_INITIATOR = 0x08
FLAG_V2_RESPONSE = 0x20


def isakmp_packet(
    icookie: bytes,
    rcookie: bytes,
    version: int,
    token: str,
    response: bool = False,
    *,
    exchange: int | None = None,
    msgid: int = 0,
) -> bytes:
    """An ISAKMP/IKE header with one Vendor ID payload carrying ``VMQ <token>``.

    ``exchange`` defaults to Main Mode (v1) / IKE_SA_INIT (v2); :data:`EXCH_QUICK_MODE` and
    :data:`EXCH_IKE_AUTH` are the child-SA exchanges a masquerading gateway can watch for."""
    vid = f"VMQ {token}".encode()
    if version == 1:
        np, ver, exch, flags = NP_VENDOR_ID, 0x10, EXCH_MAIN_MODE, 0
    else:
        np, ver, exch = NP_V2_VENDOR_ID, 0x20, EXCH_IKE_SA_INIT
        flags = FLAG_V2_RESPONSE if response else FLAG_V2_INITIATOR
    if exchange is not None:
        exch = exchange
    payload = struct.pack("!BBH", 0, 0, 4 + len(vid)) + vid
    length = ISAKMP_HDR.size + len(payload)
    return ISAKMP_HDR.pack(icookie, rcookie, np, ver, exch, flags, msgid, length) + payload


def parse_isakmp(data: bytes) -> dict[str, Any] | None:
    if len(data) < ISAKMP_HDR.size:
        return None
    ic, rc, np, ver, exch, flags, msgid, length = ISAKMP_HDR.unpack_from(data)
    token = None
    if np in (NP_VENDOR_ID, NP_V2_VENDOR_ID) and len(data) >= ISAKMP_HDR.size + 4:
        plen = struct.unpack_from("!H", data, ISAKMP_HDR.size + 2)[0]
        vid = data[ISAKMP_HDR.size + 4 : ISAKMP_HDR.size + plen].decode(errors="replace")
        if vid.startswith("VMQ "):
            token = vid[4:]
    return {
        "icookie": ic.hex(),
        "rcookie": rc.hex(),
        "version": ver >> 4,
        "exch": exch,
        "flags": flags,
        "msgid": msgid,
        "length": length,
        "token": token,
    }


def isakmp_server(
    bind: str,
    port: int = ISAKMP_PORT,
    *,
    send_first: str | None = None,
    first_count: int = 3,
    duration: float = 3600.0,
) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    rcookies: dict[bytes, bytes] = {}
    stats: dict[str, Any] = {
        "received": 0,
        "replied": 0,
        "bad": 0,
        "peers": {},
        "first_sent": 0,
        "child_exchanges": 0,
    }
    _emit({"event": "ready", "kind": "isakmp-server", "bind": f"{bind}:{port}"})
    if send_first:
        for n in range(first_count):
            pkt = isakmp_packet(os.urandom(8), b"\0" * 8, 2, f"server-first {n + 1}")
            s.sendto(pkt, (send_first, ISAKMP_PORT))
            stats["first_sent"] += 1
        _emit({"event": "sent-first", "target": send_first, "n": stats["first_sent"]})
    deadline = time.monotonic() + duration
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([s], [], [], 0.5)
            if not r:
                continue
            data, peer = s.recvfrom(65535)
            msg = parse_isakmp(data)
            if msg is None:
                stats["bad"] += 1
                continue
            stats["received"] += 1
            ic = data[:8]
            rc = rcookies.setdefault(ic, os.urandom(8))
            peer_s = f"{peer[0]}:{peer[1]}"
            if stats["peers"].get(msg["icookie"]) != peer_s:
                stats["peers"][msg["icookie"]] = peer_s
                _emit(
                    {
                        "event": "peer",
                        "peer": peer_s,
                        "icookie": msg["icookie"],
                        "rcookie": rc.hex(),
                        "token": msg["token"],
                        "version": msg["version"],
                    }
                )
            reply_token = f"{msg['token']} ECHO peer={peer_s}"
            if msg["exch"] in (EXCH_QUICK_MODE, EXCH_IKE_AUTH):
                stats["child_exchanges"] += 1
            reply = isakmp_packet(
                ic,
                rc,
                msg["version"] or 1,
                reply_token,
                response=True,
                exchange=msg["exch"],
                msgid=msg["msgid"],
            )
            s.sendto(reply, peer)
            stats["replied"] += 1
    except _Stop:
        pass
    finally:
        s.close()
    summary = {"event": "summary", "kind": "isakmp-server", **stats}
    _emit(summary)
    return summary


def isakmp_client(
    server: str,
    *,
    version: int = 1,
    token: str = "t",
    count: int = 3,
    sport: int = ISAKMP_PORT,
    port: int = ISAKMP_PORT,
    timeout: float = 2.0,
    interval: float = 0.1,
    icookie: bytes | None = None,
    child: int = 0,
) -> dict[str, Any]:
    """Phase 1: ``count`` Main Mode / IKE_SA_INIT messages, each echoed with a responder
    cookie. Then ``child`` child-SA exchanges (IKEv1 Quick Mode, IKEv2 IKE_AUTH) with both
    cookies, each answered in kind: what a gateway watches to learn that ESP SAs follow."""
    ic = icookie or os.urandom(8)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", sport))
    res: dict[str, Any] = {
        "event": "summary",
        "kind": "isakmp-client",
        "server": server,
        "sport": sport,
        "version": version,
        "icookie": ic.hex(),
        "token": token,
        "sent": 0,
        "received": 0,
        "verified": 0,
        "rcookies": [],
        "seen_as": None,
        "crosstalk": [],
        "child_sent": 0,
        "child_verified": 0,
    }
    try:
        end = time.monotonic() + count * interval + timeout
        sent_at = 0.0
        while time.monotonic() < end and res["verified"] < count:
            if res["sent"] < count and time.monotonic() - sent_at >= interval:
                s.sendto(isakmp_packet(ic, b"\0" * 8, version, token), (server, port))
                res["sent"] += 1
                sent_at = time.monotonic()
            r, _, _ = select.select([s], [], [], interval)
            if not r:
                continue
            data, _peer = s.recvfrom(65535)
            msg = parse_isakmp(data)
            if msg is None:
                continue
            res["received"] += 1
            tok = msg["token"] or ""
            if msg["icookie"] != ic.hex() or not tok.startswith(f"{token} ECHO"):
                res["crosstalk"].append({"icookie": msg["icookie"], "token": tok})
                continue
            res["verified"] += 1
            if msg["rcookie"] not in res["rcookies"]:
                res["rcookies"].append(msg["rcookie"])
            res["seen_as"] = tok.rsplit("peer=", 1)[-1]
        if child and res["rcookies"]:
            _isakmp_child_exchanges(s, server, port, ic, version, token, child, timeout, res)
    except _Stop:
        pass
    finally:
        s.close()
    res["ok"] = (
        res["verified"] >= count
        and not res["crosstalk"]
        and len(res["rcookies"]) == 1
        and res["child_verified"] >= child
    )
    _emit(res)
    return res


def _isakmp_child_exchanges(
    s: socket.socket,
    server: str,
    port: int,
    ic: bytes,
    version: int,
    token: str,
    n: int,
    timeout: float,
    res: dict[str, Any],
) -> None:
    rc = bytes.fromhex(res["rcookies"][0])
    exch = EXCH_QUICK_MODE if version == 1 else EXCH_IKE_AUTH
    for i in range(n):
        # IKEv1 Quick Modes have random message IDs; IKEv2 counts them (IKE_SA_INIT was 0)
        msgid = struct.unpack("!I", os.urandom(4))[0] | 1 if version == 1 else i + 1
        pkt = isakmp_packet(ic, rc, version, token, exchange=exch, msgid=msgid)
        end = time.monotonic() + timeout
        next_send = 0.0
        done = False
        while not done and time.monotonic() < end:
            if time.monotonic() >= next_send:  # retransmit like an IKE daemon would
                s.sendto(pkt, (server, port))
                res["child_sent"] += 1
                next_send = time.monotonic() + 0.3
            r, _, _ = select.select([s], [], [], 0.1)
            if not r:
                continue
            msg = parse_isakmp(s.recv(65535))
            if msg is None:
                continue
            res["received"] += 1
            if msg["icookie"] != ic.hex() or not (msg["token"] or "").startswith(f"{token} ECHO"):
                res["crosstalk"].append({"icookie": msg["icookie"], "token": msg["token"]})
            elif msg["exch"] == exch and msg["msgid"] == msgid:
                res["child_verified"] += 1
                done = True


# ------------------------------------------------------------------- test-side wrappers
class RawEspServer:
    """``esp-server`` in a namespace: ``RawEspServer(topo, "r1", [(0x1001, 0x2001)]).start()``."""

    def __init__(
        self,
        topo: Any,
        role: str,
        sas: Sequence[tuple[int, int]],
        *,
        send_first: str | None = None,
        first_count: int = 3,
        first_interval: float = 0.2,
    ) -> None:
        self.topo, self.role, self.sas = topo, role, list(sas)
        self.ip = topo.ip(role)
        self.send_first, self.first_count, self.first_interval = (
            send_first,
            first_count,
            first_interval,
        )
        self.jp: Any = None

    def start(self) -> RawEspServer:
        args: list[object] = ["esp-server", "--bind", self.ip]
        for a, b in self.sas:
            args += ["--sa", f"{a:#x}:{b:#x}"]
        if self.send_first:
            args += [
                "--send-first",
                self.send_first,
                "--first-count",
                self.first_count,
                "--first-interval",
                self.first_interval,
            ]
        self.jp = self.topo.start_json(
            self.role, self.topo.py(__name__, *args), name=f"esp-server:{self.role}"
        )
        return self

    def events(self, name: str) -> list[dict[str, Any]]:
        return list(self.jp.where(event=name))

    def stop(self) -> dict[str, Any]:
        """SIGTERM; returns the server's summary (received, echoed, peers, unknown_spi)."""
        self.jp.stop()
        s = self.jp.where(event="summary")
        return s[-1] if s else {}


def run_esp_client(
    topo: Any,
    role: str,
    server_ip: str,
    spi_out: int,
    spi_in: int,
    *,
    token: str | None = None,
    count: int = 5,
    timeout: float = 3.0,
    listen_first: float = 0.0,
    resend: bool = False,
) -> dict[str, Any]:
    """Run ``esp-client`` in a namespace to completion; returns its summary."""
    return dict(
        topo.run_json(
            role,
            esp_client_argv(
                topo,
                server_ip,
                spi_out,
                spi_in,
                token=token or role,
                count=count,
                timeout=timeout,
                listen_first=listen_first,
                resend=resend,
            ),
            timeout=timeout + listen_first + count + 15,
        )
    )


def esp_client_argv(
    topo: Any,
    server_ip: str,
    spi_out: int,
    spi_in: int,
    *,
    token: str,
    count: int = 5,
    timeout: float = 3.0,
    listen_first: float = 0.0,
    first_wanted: int = 0,
    resend: bool = False,
    interval: float = 0.1,
) -> list[str]:
    """argv of ``esp-client`` (for :meth:`Topology.start_json` with ``ready="listening"``)."""
    extra: list[object] = ["--resend"] if resend else []
    return list(
        topo.py(
            __name__,
            "esp-client",
            "--server",
            server_ip,
            "--spi-out",
            f"{spi_out:#x}",
            "--spi-in",
            f"{spi_in:#x}",
            "--token",
            token,
            "--count",
            count,
            "--timeout",
            timeout,
            "--interval",
            interval,
            "--listen-first",
            listen_first,
            "--first-wanted",
            first_wanted,
            *extra,
        )
    )


class IsakmpServer:
    """``isakmp-server`` in a namespace; ``.peers()`` lists the "ip:port" each client came from."""

    def __init__(self, topo: Any, role: str, *, send_first: str | None = None) -> None:
        self.topo, self.role, self.ip, self.send_first = topo, role, topo.ip(role), send_first
        self.jp: Any = None

    def start(self) -> IsakmpServer:
        args: list[object] = ["isakmp-server", "--bind", self.ip]
        if self.send_first:
            args += ["--send-first", self.send_first]
        self.jp = self.topo.start_json(
            self.role, self.topo.py(__name__, *args), name=f"isakmp-server:{self.role}"
        )
        return self

    def peers(self) -> dict[str, str]:
        """token -> "ip:port" as seen by the server."""
        return {ev["token"]: ev["peer"] for ev in self.jp.where(event="peer")}

    def stop(self) -> dict[str, Any]:
        self.jp.stop()
        s = self.jp.where(event="summary")
        return s[-1] if s else {}


def run_isakmp_client(
    topo: Any,
    role: str,
    server_ip: str,
    *,
    version: int = 1,
    token: str | None = None,
    count: int = 3,
    sport: int = ISAKMP_PORT,
    timeout: float = 2.0,
    child: int = 0,
) -> dict[str, Any]:
    """Run ``isakmp-client`` in a namespace to completion; returns its summary."""
    return dict(
        topo.run_json(
            role,
            topo.py(
                __name__,
                "isakmp-client",
                "--server",
                server_ip,
                "--version",
                version,
                "--token",
                token or role,
                "--count",
                count,
                "--sport",
                sport,
                "--timeout",
                timeout,
                "--child",
                child,
            ),
            timeout=timeout * (1 + child) + count + 15,
        )
    )


# ---------------------------------------------------------------------------------- CLI
def _sa_pair(s: str) -> tuple[int, int]:
    a, _, b = s.partition(":")
    return int(a, 0), int(b, 0)


def main(argv: Sequence[str] | None = None) -> int:  # long: the argument parser of every peer
    ap = argparse.ArgumentParser(prog="python -m vpnmasq_lab.rawpeers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("esp-server")
    p.add_argument("--bind", required=True)
    p.add_argument(
        "--sa",
        action="append",
        type=_sa_pair,
        required=True,
        help="IN:OUT SPI pair (repeat for more clients)",
    )
    p.add_argument("--seed", default="vpnmasq-lab")
    p.add_argument("--send-first", metavar="TARGET")
    p.add_argument("--first-count", type=int, default=3)
    p.add_argument("--first-interval", type=float, default=0.2)
    p.add_argument("--duration", type=float, default=3600.0)
    p = sub.add_parser("esp-client")
    p.add_argument("--server", required=True)
    p.add_argument("--spi-out", type=_int0, required=True)
    p.add_argument("--spi-in", type=_int0, required=True)
    p.add_argument("--token", default=f"pid{os.getpid()}")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--seed", default="vpnmasq-lab")
    p.add_argument("--listen-first", type=float, default=0.0)
    p.add_argument("--first-wanted", type=int, default=0)
    p.add_argument("--resend", action="store_true")
    p = sub.add_parser("ah-send")
    p.add_argument("--dst", required=True)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--spi", type=_int0, default=0x3001)
    p = sub.add_parser("raw-listen")
    p.add_argument("--proto", type=int, required=True)
    p.add_argument("--bind")
    p.add_argument("--duration", type=float, default=3600.0)
    p = sub.add_parser("isakmp-server")
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, default=ISAKMP_PORT)
    p.add_argument("--send-first", metavar="TARGET")
    p.add_argument("--first-count", type=int, default=3)
    p.add_argument("--duration", type=float, default=3600.0)
    p = sub.add_parser("isakmp-client")
    p.add_argument("--server", required=True)
    p.add_argument("--version", type=int, choices=(1, 2), default=1)
    p.add_argument("--token", default=f"pid{os.getpid()}")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--sport", type=int, default=ISAKMP_PORT)
    p.add_argument("--port", type=int, default=ISAKMP_PORT)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--icookie", type=bytes.fromhex)
    p.add_argument(
        "--child",
        type=int,
        default=0,
        help="child-SA exchanges after phase 1 (Quick Mode/IKE_AUTH)",
    )
    a = ap.parse_args(argv)
    _install_signals()
    if a.cmd == "esp-server":
        esp_server(
            a.bind,
            a.sa,
            seed=a.seed,
            send_first=a.send_first,
            first_count=a.first_count,
            first_interval=a.first_interval,
            duration=a.duration,
        )
        return 0
    if a.cmd == "esp-client":
        r = esp_client(
            a.server,
            a.spi_out,
            a.spi_in,
            token=a.token,
            count=a.count,
            interval=a.interval,
            timeout=a.timeout,
            seed=a.seed,
            listen_first=a.listen_first,
            first_wanted=a.first_wanted,
            resend=a.resend,
        )
        return 0 if r["ok"] else 1
    if a.cmd == "ah-send":
        ah_send(a.dst, count=a.count, spi=a.spi)
        return 0
    if a.cmd == "raw-listen":
        raw_listen(a.proto, a.bind, a.duration)
        return 0
    if a.cmd == "isakmp-server":
        isakmp_server(
            a.bind, a.port, send_first=a.send_first, first_count=a.first_count, duration=a.duration
        )
        return 0
    r = isakmp_client(
        a.server,
        version=a.version,
        token=a.token,
        count=a.count,
        sport=a.sport,
        port=a.port,
        timeout=a.timeout,
        icookie=a.icookie,
        child=a.child,
    )
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
