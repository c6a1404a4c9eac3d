"""Offload changes nothing but speed: every behaviour of an ESP association holds while the
kernel forwards it (``vpnmasq run``, hybrid mode, offload on as by default).

Each test first gets h1's association with r1 (SPI 0x1001 out, 0x2001 in) into the kernel's
maps and shows that its packets skip the queue, then checks one behaviour: counters and
last-seen in status, ICMP errors about the flow, idle expiry, flush, an address change, a
SIGKILL and restart with state_file, a handover, a configuration reload, a rekey (a new SPI
pair from the same host).

Harness: harness.py.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import (
    NEW_PUBLIC,
    PUBLIC,
    R1,
    Daemon,
    RawPeer,
    Remote,
    Sniffer,
    esp_exchange,
    sock,
    wait_for,
)
from tests.waiting import ANSWER_TIMEOUT

from vpnmasq.daemon import HANDOVER_SIGNAL
from vpnmasq.packet.checksum import checksum
from vpnmasq.packet.ipv4 import PROTO_ESP, PROTO_ICMP
from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns

H1 = "10.77.0.11"
SPI, SPI_BACK = 0x1001, 0x2001
REKEY, REKEY_BACK = 0x1003, 0x2003
#: runs in the daemon's process: save the table every second instead of every 30 s
FAST_SAVES = "import vpnmasq.daemon as d\nd.STATE_SAVE_INTERVAL_S = 1.0"


def offloaded(d: Daemon, spi_in: int = SPI_BACK) -> bool:
    return any(
        r.get("offloaded") and r["detail"].get("spi_in") == f"0x{spi_in:08x}" for r in d.entries("esp")
    )


def queued(d: Daemon) -> int:
    return d.counters().get("nfq_received", 0)


def esp_row(d: Daemon, spi_in: int = SPI_BACK) -> dict[str, object]:
    [row] = [r for r in d.entries("esp") if r["detail"].get("spi_in") == f"0x{spi_in:08x}"]
    return row


def into_the_kernel(topo: Topology, d: Daemon, spi: int = SPI, spi_back: int = SPI_BACK) -> None:
    """Associate h1's SPI pair (slow path), wait for the sync that offloads it, and show
    that its packets then skip the queue."""
    assert esp_exchange(topo, "h1", spi)
    wait_for(lambda: offloaded(d, spi_back), f"SPI 0x{spi_back:x} in the kernel's maps")
    before = queued(d)
    for seq in range(2, 7):
        assert esp_exchange(topo, "h1", spi, seq=seq)
    assert queued(d) == before, "offloaded ESP still took the queue"


def lan_gets_remote_esp(topo: Topology, remote: Remote, spi: int, timeout: float) -> bool:
    """The remote speaks first on ``spi``: does it reach h1?"""
    lan = RawPeer(topo, "h1", PROTO_ESP)
    try:
        lan.drain()
        remote.send_esp(PUBLIC, spi)
        got = lan.recv(timeout)
        return got is not None and got[1][:4] == spi.to_bytes(4, "big")
    finally:
        lan.close()


def remote_esp_is_dropped(topo: Topology, d: Daemon, remote: Remote) -> None:
    """The remote's next packet on the old SA reaches nobody: the engine drops it, counted."""
    dropped = d.counters().get("drop:esp-unassociated", 0)
    assert not lan_gets_remote_esp(topo, remote, SPI_BACK, timeout=0.5)
    wait_for(lambda: d.counters().get("drop:esp-unassociated", 0) == dropped + 1, "the drop")


def offload_flows(d: Daemon) -> list[dict[str, object]]:
    flows: list[dict[str, object]] = d.status().get("offload", {}).get("flows", [])
    return flows


# ------------------------------------------------------------------------------ the tests
def test_offload_is_on_by_default_and_status_counts_what_the_kernel_forwarded(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    d = Daemon(topo, "hybrid", workdir).start()  # no offload key: the default
    assert d.status()["offload"]["enabled"] is True
    into_the_kernel(topo, d)
    before = esp_row(d)
    time.sleep(1.5)  # idle: last-seen grows
    for seq in range(10, 20):
        assert esp_exchange(topo, "h1", SPI, seq=seq)

    def credited() -> bool:
        r = esp_row(d)
        return r["pkts_out"] >= before["pkts_out"] + 10 and r["pkts_in"] >= before["pkts_in"] + 10  # type: ignore[operator]

    wait_for(credited, "the kernel's counters credited to the row")
    row = esp_row(d)
    assert row["pkts_out"] >= 16 and row["pkts_in"] >= 16, row
    assert row["bytes_out"] > before["bytes_out"] and row["bytes_in"] > before["bytes_in"], row  # type: ignore[operator]
    # last seen: refreshed by offloaded packets (within a sync interval, not the idle 1.5 s)
    assert row["last_seen_out"] is not None and row["last_seen_out"] < 1.5, row  # type: ignore[operator]
    assert row["last_seen_in"] is not None and row["last_seen_in"] < 1.5, row  # type: ignore[operator]
    assert "[offload]" in d.status_text("--proto", "esp")
    assert d.stop() == 0


def test_icmp_error_about_an_offloaded_flow_reaches_the_lan_host(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    """A router on the way says "fragmentation needed" about h1's (offloaded) ESP: the error
    takes the queue, the engine finds the association by the quoted SPI, and h1 gets it
    quoting its own address (RFC 5508 REQ-3)."""
    d = Daemon(topo, "hybrid", workdir).start()
    into_the_kernel(topo, d)
    quoted = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 16, 0x1234, 0x4000, 63, PROTO_ESP, 0,
                    socket.inet_aton(PUBLIC), socket.inet_aton(R1))
    )
    struct.pack_into("!H", quoted, 10, checksum(bytes(quoted)))
    quoted += struct.pack("!II", SPI, 77) + bytes(8)
    icmp = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, 1400)) + quoted
    struct.pack_into("!H", icmp, 2, checksum(bytes(icmp)))
    h1 = sock(topo, "h1", socket.AF_INET, socket.SOCK_RAW, PROTO_ICMP)
    r1 = sock(topo, "r1", socket.AF_INET, socket.SOCK_RAW, PROTO_ICMP)
    try:
        h1.settimeout(0.2)
        r1.sendto(bytes(icmp), (PUBLIC, 0))
        deadline = time.monotonic() + ANSWER_TIMEOUT
        got = None
        while got is None and time.monotonic() < deadline:
            try:
                pkt = h1.recv(2048)
            except TimeoutError:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            if pkt[ihl] == 3 and pkt[ihl + 1] == 4:
                got = pkt
        assert got is not None, f"no frag-needed reached h1\n{d.log()[-3000:]}"
        ihl = (got[0] & 0x0F) * 4
        inner = got[ihl + 8 :]
        assert socket.inet_ntoa(inner[12:16]) == H1  # the quote carries h1's own address
        assert socket.inet_ntoa(inner[16:20]) == R1
        assert inner[20:24] == SPI.to_bytes(4, "big")
        assert struct.unpack("!H", got[ihl + 6 : ihl + 8])[0] == 1400  # next-hop MTU kept
    finally:
        h1.close()
        r1.close()
    assert offloaded(d)  # the error changed nothing about the association
    assert d.stop() == 0


def test_an_offloaded_flow_lives_while_the_kernel_forwards_it_and_expires_when_idle(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    d = Daemon(topo, "hybrid", workdir, extra="[timeouts]\nesp = 4\n").start()
    into_the_kernel(topo, d)
    # traffic only the kernel sees, for twice the idle timeout: the entry is refreshed
    for seq in range(10, 18):
        assert esp_exchange(topo, "h1", SPI, seq=seq), "offloaded flow broke while in use"
        time.sleep(1.0)
    assert offloaded(d)
    assert d.counters().get("expired:esp", 0) == 0
    # idle: the entry expires by its timeout, and the kernel's map lets go of it
    wait_for(lambda: d.counters().get("expired:esp", 0) == 1, "the idle association to expire")
    wait_for(lambda: offload_flows(d) == [], "the expired flow to leave the kernel's maps")
    remote_esp_is_dropped(topo, d, remote)
    assert d.stop() == 0


def test_flush_takes_offloaded_flows_out_of_the_kernel(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    d = Daemon(topo, "hybrid", workdir).start()
    into_the_kernel(topo, d)
    assert lan_gets_remote_esp(topo, remote, SPI_BACK, ANSWER_TIMEOUT)
    out = subprocess.run(
        [sys.executable, "-m", "vpnmasq.cli", "flush", "--socket", d.socket_path],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "flushed 1 entry" in out
    wait_for(lambda: offload_flows(d) == [], "the kernel's maps to empty")
    assert d.entries("esp") == []
    remote_esp_is_dropped(topo, d, remote)
    # and a new association goes the usual way, into the kernel again
    into_the_kernel(topo, d)
    assert d.stop() == 0


def test_an_address_change_moves_offloaded_flows_to_the_new_address(
    topo: Topology, remote: Remote, wan: Sniffer, workdir: Path
) -> None:
    d = Daemon(topo, "hybrid", workdir).start()
    into_the_kernel(topo, d)
    ip = ["ip", "-n", topo.ns("gw"), "addr"]
    subprocess.run([*ip, "add", f"{NEW_PUBLIC}/24", "dev", "wan0"], check=True)
    subprocess.run([*ip, "del", f"{PUBLIC}/24", "dev", "wan0"], check=True)
    wait_for(lambda: f"public address {PUBLIC} -> {NEW_PUBLIC}" in d.log(), "the change")
    wan.clear()
    assert esp_exchange(topo, "h1", SPI, seq=30)
    wait_for(lambda: offloaded(d), "the association back in the kernel's maps")
    for seq in range(31, 36):
        assert esp_exchange(topo, "h1", SPI, seq=seq)
    wan.settle()
    out = [p for p in wan.seen if p.outgoing]
    assert out and {p.src for p in out} == {NEW_PUBLIC}, out  # never the old address
    assert wan.leaked() == []
    assert [r["outside"] for r in d.entries("esp")] == [NEW_PUBLIC]
    assert d.stop() == 0


def test_sigkill_and_a_restart_with_state_file_keep_the_offloaded_flow(
    topo: Topology, remote: Remote, wan: Sniffer, workdir: Path
) -> None:
    state = workdir / "state.json"
    extra = f'state_file = "{state}"\n'
    d = Daemon(topo, "hybrid", workdir, extra=extra, python_setup=FAST_SAVES).start()
    into_the_kernel(topo, d)

    def saved() -> bool:
        return state.exists() and any(e["kind"] == "esp" for e in json.loads(state.read_text())["entries"])

    wait_for(saved, "a saved table with the association")
    d.send(signal.SIGKILL)
    d.wait()
    # nobody reads the queue, but the kernel keeps forwarding the offloaded flow, rewritten
    # as before (never with h1's address)
    wan.clear()
    assert esp_exchange(topo, "h1", SPI, seq=40)
    wan.settle()
    assert wan.leaked() == [] and {p.src for p in wan.seen if p.outgoing} == {PUBLIC}
    again = Daemon(topo, "hybrid", workdir, extra=extra)
    again.start()
    assert "restored" in again.log(), again.log()
    # the restart re-installs vpnmasq's table (the maps live in it) and fills the maps from
    # the restored table: the same association, no new one
    wait_for(lambda: offloaded(again), "the restored association back in the kernel's maps")
    assert lan_gets_remote_esp(topo, remote, SPI_BACK, ANSWER_TIMEOUT)
    assert esp_exchange(topo, "h1", SPI, seq=41)
    c = again.counters()
    assert not any(k.startswith(("esp:associated", "created:esp")) for k in c), c
    assert again.stop() == 0


def test_a_handover_keeps_the_offloaded_flow(
    topo: Topology, remote: Remote, wan: Sniffer, workdir: Path
) -> None:
    old = Daemon(topo, "hybrid", workdir).start()
    into_the_kernel(topo, old)
    old.send(HANDOVER_SIGNAL)
    assert old.wait() == 0
    # the gap: the queue is unread (packets vpnmasq decides wait or are dropped), the kernel
    # still forwards the offloaded flow with the public address
    wan.clear()
    assert esp_exchange(topo, "h1", SPI, seq=50)
    assert wan.leaked() == []
    new = Daemon(topo, "hybrid", workdir)
    new.start("--handover")
    assert "restored 1 entries (esp 1)" in new.log(), new.log()
    wait_for(lambda: offloaded(new), "the association reconciled with the maps")
    assert lan_gets_remote_esp(topo, remote, SPI_BACK, ANSWER_TIMEOUT)
    before = queued(new)
    assert esp_exchange(topo, "h1", SPI, seq=51)
    assert queued(new) == before
    assert not any(k.startswith("created:esp") for k in new.counters())
    assert new.stop() == 0


def test_a_rekey_from_the_same_host_is_associated_and_offloaded_too(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    """h1 rekeys: a new SPI pair with the same remote while the old one is in the kernel.
    The new outbound SPI misses the maps, takes the queue, is associated by the engine as
    without offload, and then moves into the kernel; both pairs work meanwhile."""
    d = Daemon(topo, "hybrid", workdir).start()
    into_the_kernel(topo, d)
    into_the_kernel(topo, d, REKEY, REKEY_BACK)
    assert offloaded(d, SPI_BACK) and offloaded(d, REKEY_BACK)
    assert esp_exchange(topo, "h1", SPI, seq=60) and esp_exchange(topo, "h1", REKEY, seq=60)
    assert lan_gets_remote_esp(topo, remote, REKEY_BACK, ANSWER_TIMEOUT)
    flows = offload_flows(d)
    assert sorted(str(f.get("spi_in")) for f in flows) == ["0x00002001", "0x00002003"], flows
    assert d.stop() == 0


def test_a_configuration_reload_keeps_the_offloaded_flow(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    """SIGHUP re-reads the file (here a longer ESP timeout): the new engine holds the
    association and the maps are reconciled with it, not emptied."""
    d = Daemon(topo, "hybrid", workdir).start()
    into_the_kernel(topo, d)
    d.write_config("[timeouts]\nesp = 5000\n")
    d.send(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in d.log(), "the reload")
    assert "1 entries kept, 0 removed" in d.log(), d.log()[-2000:]
    wait_for(lambda: offloaded(d), "the association in the kernel's maps after the reload")
    before = queued(d)
    assert esp_exchange(topo, "h1", SPI, seq=70)
    assert queued(d) == before
    assert lan_gets_remote_esp(topo, remote, SPI_BACK, ANSWER_TIMEOUT)
    assert d.stop() == 0
