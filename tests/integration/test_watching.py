"""Watching a busy gateway does not hurt it: ``status --json`` in a loop over a table of
~20,000 UDP mappings while a probe crosses the gateway every 10 ms (no probe lost, little
added latency); ``vpnmasq events`` follows real flows; ``vpnmasq top`` under tmux shows the
sessions as a person sees them. Harness: harness.py."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import (
    H1,
    H2,
    R1,
    Daemon,
    Remote,
    esp_exchange,
    sock,
    udp_echo,
)
from tests.waiting import DEADLINE, wait_until

from vpnmasq.datapath.control import query
from vpnmasq.packet.ipv4 import ip_to_int
from vpnmasq.packet.l4 import build_udp
from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns

MAPPINGS = 20_000
#: how often a burst of the table fill is sent again when some of it was lost
FILL_RESENDS = 3
PROBE_INTERVAL_S = 0.010
STATUS_LOOP_S = 6.0
#: the goal of the status-under-load test: what status may add to a probe's round trip (the
#: figure is printed and reported; measured 32-41 ms on a loaded 2-core machine)
MAX_ADDED_MS = 50.0
#: what the test fails on: a regression to a status that holds the loop for a whole table walk
#: (the blocking status took 145 ms of CPU per call at 20,000 entries); wider than the goal so
#: that a busy CI machine's scheduling noise does not fail it
REGRESSION_MS = 100.0
#: where the README screenshot of `vpnmasq top` is written when asked (make it with
#: VPNMASQ_TOP_SCREENSHOT=docs/top.txt pytest tests/integration/test_watching.py -k tmux)
SCREENSHOT = os.environ.get("VPNMASQ_TOP_SCREENSHOT")


#: reads `status --json` on stdin, prints "total_entries entries"
COUNT_ENTRIES = shlex.join([
    sys.executable, "-c",
    "import json, sys; d = json.load(sys.stdin); print(d['total_entries'], len(d['entries']))",
])


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vpnmasq.cli", *args]


def fill_table(topo: Topology, d: Daemon, n: int) -> None:
    """``n`` UDP mappings from h1 (source ports 20000...) to r1's discard port, sent from a
    raw socket in bursts; each burst waits for the daemon to have taken the one before (the
    kernel queue is bounded, and a busy machine may slow the daemon). UDP may be lost on the
    way (a full queue drops): a burst not all taken is sent again, which only refreshes the
    mappings already made."""
    s = sock(topo, "h1", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        src, dst = ip_to_int(H1), ip_to_int(R1)
        base = _created(d)
        for start in range(0, n, 500):
            sent = min(n, start + 500)
            for attempt in range(FILL_RESENDS + 1):
                for port in range(20000 + start, 20000 + sent):
                    s.sendto(bytes(build_udp(src, dst, port, 9, b"m")), (R1, 0))
                last = attempt == FILL_RESENDS
                try:
                    wait_until(
                        lambda sent=sent: _created(d) - base >= sent,
                        timeout=DEADLINE if last else 5.0,
                        what=f"{sent} mappings",
                    )
                    break
                except AssertionError:
                    if last:
                        raise
    finally:
        s.close()


def _created(d: Daemon) -> int:
    return int(query(d.socket_path, "counters", timeout=DEADLINE)["counters"].get("created:napt", 0))


def table_size(d: Daemon) -> int:
    return int(query(d.socket_path, "status", params={"limit": 1}, timeout=DEADLINE)["total_entries"])


class Probe:
    """A UDP echo from h2 through the gateway to r1 every PROBE_INTERVAL_S; records each
    round trip (None: no answer within a second)."""

    def __init__(self, topo: Topology) -> None:
        self.s = sock(topo, "h2", socket.AF_INET, socket.SOCK_DGRAM)
        self.s.settimeout(1.0)
        self.rtts: list[tuple[float, float | None]] = []  # (sent at, rtt)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            seq += 1
            token = seq.to_bytes(8, "big")
            t0 = time.monotonic()
            self.s.sendto(token, (R1, 7))
            rtt: float | None = None
            try:
                while True:
                    data, _ = self.s.recvfrom(64)
                    if data == token:
                        rtt = time.monotonic() - t0
                        break
            except TimeoutError:
                pass
            self.rtts.append((t0, rtt))
            next_at += PROBE_INTERVAL_S
            time.sleep(max(0.0, next_at - time.monotonic()))

    def between(self, a: float, b: float) -> list[float | None]:
        return [r for t, r in self.rtts if a <= t < b]


def test_status_in_a_loop_over_20000_mappings_loses_no_probe(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    d = Daemon(topo, "userspace", workdir)
    # 20,000 mappings from one host (h1), made as fast as the queue takes them: more than
    # the per-host limits allow by default (a quarter of the pool, 500 new flows a second)
    d.write_config('port_range = "10000-65535"\n[limits]\nmax_entries = 100000\n'
                   "max_ports_per_host = 0\nmax_entries_per_host = 0\n"
                   "max_new_per_host_per_second = 0\n")
    d.start()
    try:
        assert udp_echo(topo, "h2"), "the probe path works"
        fill_table(topo, d, MAPPINGS)
        assert table_size(d) >= MAPPINGS
        probe = Probe(topo)
        probe.t.start()
        time.sleep(2.0)  # baseline
        status = shlex.join(cli("status", "--json", "-s", d.socket_path))
        t_status = time.monotonic()
        answers, took = 0, []
        while time.monotonic() - t_status < STATUS_LOOP_S:
            t0 = time.monotonic()
            # the 10 MB answer is parsed in a child: in this process json.loads would hold
            # the GIL for ~100 ms and delay the probe thread and r1's echo, not the gateway
            r = topo.exec("gw", ["sh", "-c", f"{status} | {COUNT_ENTRIES}"], check=False,
                          timeout=DEADLINE)
            took.append(time.monotonic() - t0)
            assert r.returncode == 0, r.stderr
            total, shown = map(int, r.stdout.split())
            assert total >= MAPPINGS and shown >= MAPPINGS
            answers += 1
        t_end = time.monotonic()
        time.sleep(0.5)
        probe.stop.set()
        probe.t.join(5)
        probe.s.close()
    finally:
        assert d.stop() == 0
    base = probe.between(t_status - 2.0, t_status)
    during = probe.between(t_status, t_end)
    assert None not in base, "the probe lost packets before status ran"
    lost = sum(1 for r in during if r is None)
    got = sorted(r for r in during if r is not None)
    base_ms = statistics.median([r for r in base if r is not None]) * 1e3
    base_max = max(r for r in base if r is not None) * 1e3
    slow = sum(1 for r in got if r * 1e3 - base_ms >= MAX_ADDED_MS)
    p50, p99, worst = (got[len(got) // 2] * 1e3, got[int(len(got) * 0.99)] * 1e3, got[-1] * 1e3)
    print(
        f"\nstatus-under-load: {MAPPINGS} UDP mappings, userspace mode; {answers} `status --json`"
        f" answers in {t_end - t_status:.1f} s (each {min(took):.2f}-{max(took):.2f} s);"
        f" probes every {PROBE_INTERVAL_S * 1e3:.0f} ms: {len(during)} sent during the loop,"
        f" {lost} lost; round trip baseline median {base_ms:.2f} ms (max {base_max:.2f} ms),"
        f" {slow} probes {MAX_ADDED_MS:g} ms or more above it; during: median"
        f" {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.2f} ms"
        f" (added at worst {worst - base_ms:.1f} ms)"
    )
    assert answers >= 2
    assert lost == 0
    assert worst - base_ms < REGRESSION_MS


def test_events_follow_a_flow_and_its_filter(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    """``vpnmasq events --json -H h1 -n 2``: h2's flows are filtered out by the daemon; each
    echo from h1 (a new source port) shows up as a created entry."""
    d = Daemon(topo, "userspace", workdir)
    d.start()
    p = topo.popen("gw", cli("events", "--json", "-H", H1, "-n", "2", "-s", d.socket_path),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def two_seen() -> bool:  # until the reader has subscribed and seen two of h1's
            assert udp_echo(topo, "h2") and udp_echo(topo, "h1")
            return p.poll() is not None

        wait_until(two_seen, what="two events for h1")
        out, err = p.communicate(timeout=DEADLINE)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        assert d.stop() == 0
    assert p.returncode == 0, err
    evs = [json.loads(line) for line in out.decode().splitlines()]
    assert [e["event"] for e in evs] == ["created", "created"]
    for ev in evs:
        assert ev["inside"].startswith(f"{H1}:") and ev["remote"] == f"{R1}:7"
        assert ev["kind"] == "udp" and isinstance(ev["time"], float)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux missing (scripts/setup.sh)")
def test_top_under_tmux_shows_the_busy_sessions(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    """``vpnmasq top`` in an 80x24 tmux pane while h1 sends a steady UDP stream and h2 a
    slower one: the capture shows the header, h1's session first with its rate."""
    d = Daemon(topo, "userspace", workdir)
    d.start()
    session = f"vmqtop{os.getpid()}"
    stop = threading.Event()

    def stream(role: str, rate: float) -> None:
        s = sock(topo, role, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            while not stop.is_set():
                s.sendto(b"x" * 100, (R1, 7))
                time.sleep(1 / rate)
        finally:
            s.close()

    def esp(role: str, rate: float) -> None:  # an IPsec tunnel's ESP, answered by r1
        seq = 0
        while not stop.is_set():
            seq += 1
            esp_exchange(topo, role, 0x1001, seq=seq)
            time.sleep(1 / rate)

    senders = [threading.Thread(target=f, args=(h, r), daemon=True)
               for f, h, r in ((stream, "h1", 200.0), (stream, "h2", 20.0), (esp, "h2", 10.0))]
    for t in senders:
        t.start()
    cmd = " ".join(["ip", "netns", "exec", topo.ns("gw"),
                    *cli("top", "-d", "0.5", "-s", d.socket_path)])
    try:
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24",
                        cmd], check=True, env={**os.environ, "TERM": "xterm-256color"})

        def screen() -> str | None:
            r = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                               capture_output=True, text=True)
            text = r.stdout
            lines = [ln for ln in text.splitlines() if ln.strip()]
            heads = [i for i, ln in enumerate(lines) if ln.startswith("KIND")]
            if not heads or len(lines) < heads[0] + 3:
                return None
            first = lines[heads[0] + 1]
            return text if first.startswith("udp") and f"{H1}:" in first and "0/0" not in first \
                else None

        text = wait_until(screen, what="top showing h1's stream first")
    finally:
        stop.set()
        for t in senders:
            t.join(5)
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        assert d.stop() == 0
    lines = text.splitlines()
    assert all(len(ln) <= 80 for ln in lines)
    assert lines[0].startswith("vpnmasq top  ") and " entries: " in lines[0]
    assert lines[1].startswith("pkt/s out ") and " kernel drops 0, batch " in lines[1]
    body = [ln for ln in lines if ln.startswith("udp")]
    assert f"{H1}:" in body[0] and f"{R1}:7" in body[0]
    assert any(f"{H2}:" in ln for ln in body[1:])
    (tunnel,) = [ln for ln in lines if ln.startswith("esp")]
    assert H2 in tunnel and R1 in tunnel and tunnel.rstrip().endswith("by serialized")
    print("\n" + text)
    if SCREENSHOT:
        Path(SCREENSHOT).write_text("\n".join(ln.rstrip() for ln in lines).rstrip() + "\n")
