"""A real PPTP call and a raw-ESP session keep passing traffic through ``vpnmasq run``
(userspace mode) while an outsider floods the public address with random ESP, GRE and
IKE (UDP 500) packets; the flood rate is stepped up and what was held is recorded.

Topology (``vtopo``): h1, h2, h3, srv -- gw (vpnmasq) -- r1 (PPTP server and raw-ESP
server), r2 (the flooder, also forging random outside source addresses).

This file is also the flooder: ``python tests/e2e/test_flood.py flood --dst IP --pps N
--seconds S`` sends random packets from a raw socket and prints a JSON summary (run in r2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # also run as a script (the flooder), from anywhere
    sys.path.insert(0, str(ROOT))
from tests.waiting import ANSWER_TIMEOUT, DEADLINE, wait_until  # noqa: E402

#: flood steps in packets per second (0 = as fast as the flooder can send)
STEPS = (2000, 8000, 15000, 25000, 0)
STEP_SECONDS = 3.5


# ---------------------------------------------------------------------- the flooder
def _random_packets(dst: str, n: int, *, spoof: bool, own: str, seed: int) -> list[bytes]:
    from vpnmasq.helpers.isakmp import build_header
    from vpnmasq.packet.ipv4 import build_ipv4, ip_to_int
    from vpnmasq.packet.l4 import build_esp, build_gre_v1, build_udp

    rng = random.Random(seed)
    d = ip_to_int(dst)
    out = []
    for k in range(n):
        src = ip_to_int(own)
        if spoof:  # TEST-NET-1 and TEST-NET-3 addresses, never a remote the LAN talks to
            src = ip_to_int(f"{rng.choice(('192.0.2', '203.0.113'))}.{rng.randrange(1, 255)}")
        kind = k % 3
        if kind == 0:
            pkt = build_ipv4(src, d, 50, build_esp(rng.getrandbits(32) | 1, rng.getrandbits(32)))
        elif kind == 1:
            pkt = build_ipv4(src, d, 47, build_gre_v1(rng.getrandbits(16), b"\xff\x03" + bytes(20)))
        else:
            hdr = build_header(rng.getrandbits(64) | 1, 0, 2)
            pkt = build_udp(src, d, 500, 500, hdr)
        out.append(bytes(pkt))
    return out


def flood(dst: str, pps: float, seconds: float, spoof: bool, own: str) -> dict[str, Any]:
    pkts = _random_packets(dst, 3000, spoof=spoof, own=own, seed=os.getpid())
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    print(json.dumps({"event": "flooding"}), flush=True)  # the test measures from here
    sent = errors = 0
    t0 = time.monotonic()
    end = t0 + seconds
    batch = 50
    i = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if pps > 0:
            due = int((now - t0) * pps)
            if sent + errors >= due:
                time.sleep(min(0.002, end - now))
                continue
        for _ in range(batch):
            try:
                s.sendto(pkts[i], (dst, 0))
                sent += 1
            except OSError:
                errors += 1
            i = (i + 1) % len(pkts)
    took = time.monotonic() - t0
    s.close()
    return {"sent": sent, "errors": errors, "seconds": round(took, 3), "pps": round(sent / took)}


def attack(dst: str, own: str, spi: int, port: int) -> dict[str, Any]:
    """From ``own`` (not the server): every GRE Call ID, the client's inbound SPI replayed,
    and a forged PPTP Call-Disconnect-Notify / Outgoing-Call-Reply on the control
    connection's public port."""
    from vpnmasq.packet.ipv4 import build_ipv4, ip_to_int
    from vpnmasq.packet.l4 import TCP_ACK, build_esp, build_gre_v1, build_tcp

    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    src, d = ip_to_int(own), ip_to_int(dst)
    sent = 0
    ppp = b"\xff\x03\x00\x21" + bytes(28)
    for cid in range(65536):
        s.sendto(bytes(build_ipv4(src, d, 47, build_gre_v1(cid, ppp, seq=cid))), (dst, 0))
        sent += 1
        if cid % 500 == 0:
            time.sleep(0.01)  # ~50k/s at most: what reaches the queue, not the kernel's drop
    for seq in range(200):
        s.sendto(bytes(build_ipv4(src, d, 50, build_esp(spi, 1000 + seq, bytes(48)))), (dst, 0))
        sent += 1
    cdn = struct.pack("!HHIHH", 148, 1, 0x1A2B3C4D, 13, 0) + struct.pack("!HBBHH", 0, 3, 0, 0, 0) + bytes(128)
    for seq in range(0, 1 << 32, 1 << 26):  # 64 blind tries over the sequence space
        s.sendto(bytes(build_tcp(src, d, 1723, port, cdn, flags=TCP_ACK, seq=seq, ack=0)), (dst, 0))
        sent += 1
    s.close()
    return {"sent": sent}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["flood", "attack"])
    ap.add_argument("--dst", required=True)
    ap.add_argument("--own", required=True)
    ap.add_argument("--pps", type=float, default=0.0)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--spoof", action="store_true")
    ap.add_argument("--spi", type=lambda x: int(x, 0), default=0x2001)
    ap.add_argument("--port", type=int, default=61000)
    a = ap.parse_args(argv)
    if a.cmd == "attack":
        print(json.dumps(attack(a.dst, a.own, a.spi, a.port)), flush=True)
    else:
        print(json.dumps(flood(a.dst, a.pps, a.seconds, a.spoof, a.own)), flush=True)
    return 0


# ---------------------------------------------------------------------- the test
def _queue_stats(topo: Any) -> dict[str, int]:
    """The kernel's own view of queue 0 (queue_total, queue_dropped, user_dropped)."""
    txt = topo.exec("gw", ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    for line in txt.splitlines():
        f = line.split()
        if f and f[0] == "0" and len(f) >= 7:
            return {"queue_total": int(f[2]), "queue_dropped": int(f[5]), "user_dropped": int(f[6])}
    return {}


def _delta(after: dict[str, int], before: dict[str, int], prefix: str = "") -> dict[str, int]:
    return {
        k: v - before.get(k, 0)
        for k, v in after.items()
        if k.startswith(prefix) and isinstance(v, int) and v != before.get(k, 0)
    }


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_pptp_and_esp_sessions_survive_an_outside_flood(  # long: one e2e transcript
    vtopo: Any, require: Any, record_property: Any, tmp_path: Path
) -> None:
    require("pptpd", "pptp", "/usr/sbin/pptpctrl", "py:scapy", "py:cryptography")
    from vpnmasq_lab.pcap import read_ipv4
    from vpnmasq_lab.pptp_client import PptpClient
    from vpnmasq_lab.pptp_server import PptpServer
    from vpnmasq_lab.rawpeers import RawEspServer, run_esp_client
    from vpnmasq_lab.topology import GW_WAN_IP

    topo = vtopo
    gw = topo.gateway_vpnmasq(
        "userspace",
        config_overrides={"limits": {"max_entries_per_host": 500, "max_new_per_host_per_second": 200}},
    )
    r1 = topo.ip("r1")
    PptpServer(topo, "r1").start()
    esp_srv = RawEspServer(topo, "r1", [(0x1001, 0x2001)]).start()
    call = PptpClient(topo, "h1", r1, token="h1").start()
    first = call.exchange(count=5, timeout=15)
    assert first.ok, first.as_dict()
    esp0 = run_esp_client(topo, "h2", r1, 0x1001, 0x2001, count=3, timeout=5, resend=True)
    assert esp0["ok"], esp0
    entries_before = len(gw.rows())

    steps: list[dict[str, Any]] = []
    pcap = tmp_path / "lan0.pcap"
    # everything the flood sources get onto the LAN (there must be nothing)
    with topo.capture("gw", "lan0", pcap, "src net 192.0.2.0/24 or src net 203.0.113.0/24"):
        for pps in STEPS:
            c0, q0 = gw.counters(), _queue_stats(topo)
            flooder = topo.start_json(
                "r2",
                [sys.executable, str(Path(__file__).resolve()), "flood", "--dst", GW_WAN_IP,
                 "--own", topo.ip("r2"), "--pps", str(pps), "--seconds", str(STEP_SECONDS),
                 "--spoof"],
                name="flooder",
                ready="flooding",  # the flood is under way: both sessions are measured in it
                timeout=DEADLINE,
            )
            n0, ok0 = call.result.sent, call.result.verified
            # the lowest rate must be held completely: wait for every echo as long as it
            # takes; at the higher rates (only recorded) keep to the flood's duration
            held = pps == STEPS[0]
            with ThreadPoolExecutor(2) as ex:
                fp = ex.submit(call.exchange, count=20,
                               timeout=ANSWER_TIMEOUT if held else STEP_SECONDS - 1.0,
                               interval=0.04)
                fe = ex.submit(run_esp_client, topo, "h2", r1, 0x1001, 0x2001, count=20,
                               timeout=ANSWER_TIMEOUT if held else 1.0)
                pptp, esp = fp.result(), fe.result()
            summary = flooder.wait_for(lambda e: "sent" in e, timeout=STEP_SECONDS + DEADLINE)
            # the daemon has given every queued packet its verdict (and counted it)
            wait_until(lambda: _queue_stats(topo).get("queue_total", 0) == 0, what="queue drained")
            c1, q1 = gw.counters(), _queue_stats(topo)
            steps.append({
                "target_pps": pps or "max",
                "flood": summary,
                "pptp_sent": pptp.sent - n0,
                "pptp_verified": pptp.verified - ok0,
                "esp_sent": esp["sent"],
                "esp_verified": esp["verified"],
                "drops": _delta(c1, c0, "drop:"),
                "engine_packets_in": c1.get("packets_in", 0) - c0.get("packets_in", 0),
                "nfq": _delta(c1, c0, "nfq_"),
                "kernel_queue": _delta(q1, q0),
            })
    record_property("flood_steps", steps)
    print(json.dumps(steps, indent=1))

    # after the flood: the same sessions carry traffic again, nothing was lost
    after = call.exchange(count=5, timeout=10)
    esp_after = run_esp_client(topo, "h2", r1, 0x1001, 0x2001, count=5, timeout=5)
    record_property("after", {"pptp": after.as_dict(), "esp": esp_after})
    assert after.ok and not after.crosstalk, after.as_dict()
    assert esp_after["ok"] and esp_after["echo_src"] == GW_WAN_IP, esp_after
    srv = esp_srv.stop()
    assert not srv.get("bad"), srv

    # the lowest rate is held completely: every echo of both sessions came back, and the
    # whole flood is accounted for as counted drops
    low = steps[0]
    assert low["pptp_verified"] == low["pptp_sent"] > 0, low
    assert low["esp_verified"] == low["esp_sent"] == 20, low
    # (by the engine, counted by reason, or by the kernel if the queue overflowed: fail closed)
    dropped = sum(low["drops"].values()) + sum(low["kernel_queue"].get(k, 0)
                                               for k in ("queue_dropped", "user_dropped"))
    assert dropped >= 0.95 * low["flood"]["sent"], low
    assert set(low["drops"]) <= {
        "drop:esp-unassociated", "drop:gre-unknown-call", "drop:isakmp-unknown-session",
    }, low["drops"]
    # no state grew from the flood (the table holds the same sessions as before)
    assert len(gw.rows()) <= entries_before + 2
    # whatever the rate, the daemon kept running and the sessions came back (above), and
    # no packet of the flood reached the LAN: an overflowing queue fails closed
    assert gw.running()
    leaked = read_ipv4(pcap)
    assert not leaked, [(p.src, p.dst, p.proto) for p in leaked[:5]]


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_an_outsider_cannot_reach_a_real_pptp_call_or_esp_session(
    vtopo: Any, require: Any, record_property: Any, tmp_path: Path
) -> None:
    """From r2 (not the server r1): all 65536 GRE Call IDs, the ESP client's inbound SPI
    replayed, and forged PPTP control messages on the control connection's public port.
    Nothing of it reaches the LAN (capture on lan0), the call and the association go on."""
    require("pptpd", "pptp", "/usr/sbin/pptpctrl", "py:scapy", "py:cryptography")
    from vpnmasq_lab.pcap import read_ipv4
    from vpnmasq_lab.pptp_client import PptpClient
    from vpnmasq_lab.pptp_server import PptpServer
    from vpnmasq_lab.rawpeers import RawEspServer, run_esp_client
    from vpnmasq_lab.topology import GW_WAN_IP

    topo = vtopo
    gw = topo.gateway_vpnmasq("userspace")
    r1, r2 = topo.ip("r1"), topo.ip("r2")
    PptpServer(topo, "r1").start()
    esp_srv = RawEspServer(topo, "r1", [(0x1001, 0x2001)]).start()
    call = PptpClient(topo, "h1", r1, token="h1").start()
    assert call.exchange(count=3, timeout=15).ok
    assert run_esp_client(topo, "h2", r1, 0x1001, 0x2001, count=3, timeout=5, resend=True)["ok"]
    ctl = [e for e in gw.entries("tcp") if e["remote"].endswith(":1723")]
    assert ctl, gw.entries()
    port = int(ctl[0]["outside"].rsplit(":", 1)[1])
    c0, q0 = gw.counters(), _queue_stats(topo)
    pcap = tmp_path / "lan0.pcap"
    with topo.capture("gw", "lan0", pcap, f"src host {r2}"):
        res = topo.run_json(
            "r2",
            [sys.executable, str(Path(__file__).resolve()), "attack", "--dst", GW_WAN_IP,
             "--own", r2, "--spi", "0x2001", "--port", str(port)],
            timeout=120,
        )
        # every packet of the attack has had its verdict before the capture ends
        wait_until(lambda: _queue_stats(topo).get("queue_total", 0) == 0, what="queue drained")
    c1, q1 = gw.counters(), _queue_stats(topo)
    drops = _delta(c1, c0, "drop:")
    kq = _delta(q1, q0)
    record_property("attack", {"sent": res.get("sent"), "drops": drops, "kernel_queue": kq})
    assert not read_ipv4(pcap), "a packet of r2's reached the LAN"
    # every guess was dropped: by the engine (counted by reason) or, if the queue overflowed,
    # by the kernel (fail closed, counted in nfnetlink_queue)
    assert drops.get("drop:gre-unknown-call", 0) + kq.get("queue_dropped", 0) >= 65536
    assert drops.get("drop:esp-unassociated", 0) >= 200
    assert drops.get("drop:filtered", 0) >= 64  # the forged control segments
    ok0 = call.result.verified
    call.exchange(count=10, timeout=10)
    assert call.result.verified - ok0 >= 10 and not call.result.crosstalk
    e = run_esp_client(topo, "h2", r1, 0x1001, 0x2001, count=5, timeout=5)
    assert e["ok"] and not e["foreign"], e
    assert not esp_srv.stop().get("bad")


if __name__ == "__main__":
    sys.exit(main())

