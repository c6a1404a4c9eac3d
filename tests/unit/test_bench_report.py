"""bench/report.py and bench/lab.py's profile summary on fixed results: the document states
each figure against its target and says which targets were missed (no timing measured)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


report = load("report")


def results() -> dict[str, Any]:
    def pair(k: list[float], v: list[float], mode: str) -> dict[str, Any]:
        return {"unit": "pkt/s", "values": {"kernel": k, mode: v}}

    cells = {
        "tcp_gbps": {"unit": "Gbit/s", "values": {
            "kernel": [10.0, 12.0], "hybrid": [9.0, 12.0], "userspace": [0.5, 0.6], "uoffload": [9.0, 9.6]}},
        "esp1400_out_pps": {"unit": "pkt/s", "values": {
            "kernel": [300e3, 400e3], "hybrid": [40e3, 40e3], "offload": [285e3, 380e3]}},
        "gre64_in_pps": {"unit": "pkt/s", "values": {
            "kernel": [400e3, None], "hybrid": [30e3, 30e3], "offload": [200e3, 390e3]}},
        "udp64_out_pps": {"unit": "pkt/s", "values": {
            "kernel": [300e3], "userspace": [50e3], "uoffload": [270e3]}},
        "udp64_out_cpu_us": {"unit": "us/pkt", "values": {"userspace": [12.5]}},
        "rtt_median_us": {"unit": "us", "values": {"kernel": [10.0], "userspace": [150.0]}},
        "rtt_p99_us": {"unit": "us", "values": {"kernel": [20.0], "userspace": [900.0]}},
    }
    engine = {
        "tcp_out_pps": 310e3, "tcp_in_pps": 290e3, "udp_out_pps": 320e3, "udp_in_pps": 305e3,
        "bytes_per_mapping_100000": 968.0, "per_binding_100000": 1,
        "bytes_per_mapping_1000000": 1100.0, "per_binding_1000000": 16,
        "association": {"esp_8": {"seconds_all": 3.5, "packets": 44, "packets_per_association": 5.5, "cpu_ms": 2.0}},
    }
    return {"lab": {"cells": cells, "profile": {}, "notes": []}, "engine": engine, "machine": {"cpus": "2"}}


def test_ratios_are_per_round_pairs_and_targets_are_judged(tmp_path: Path) -> None:
    table = report.write(results(), tmp_path, command="make bench")
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 1000
    # TCP: rounds 0.90 and 1.00 -> median 0.95: met
    assert "| plain TCP bulk, iperf3 h1->r1 (hybrid mode) | 11.0 Gbit/s | 10.5 Gbit/s | 0.95 |" in md
    # ESP 1400 out offloaded: 0.95, 0.95 -> met; GRE 64 in: the round without a kernel value
    # is left out of the ratio -> 0.50 -> missed
    esp = next(ln for ln in md.splitlines() if ln.startswith("| ESP 1400 B LAN->outside"))
    assert "0.95" in esp and "| met |" in esp
    # the targets of kernel speed for every flow: userspace TCP 0.90/0.80 -> 0.85, met;
    # offloaded UDP 0.90 met; ESP/GRE 0.50-0.95 missed, with the reason
    assert "| userspace mode, iperf3 TCP bulk" in md and "| 0.85 (9.3 vs 11.0 Gbit/s) | >= 0.85 | met |" in md
    assert "| userspace mode, UDP 1400 B and 64 B packets/s, both directions (offloaded) | 0.21-0.25 | 0.90 |" in md
    assert "| offloaded ESP/GRE (hybrid) | 0.82-0.88 | 0.50-0.95 | >= 0.93 | **missed** |" in md
    assert "| UDP 64 B LAN->outside, userspace mode offloaded | 300k | 270k | 0.90 | >= 0.85 | met |" in md
    assert "- offloaded ESP/GRE 0.50-0.95: every base chain a packet enters costs it" in md
    assert "| 64 raw-ESP hosts, IKE visible: all associated after their IKE | not measured | not measured |" in md
    gre = next(ln for ln in md.splitlines() if ln.startswith("| GRE 64 B outside->LAN"))
    assert "0.50" in gre and "**missed**" in gre
    # the slow path: 50k < 100k, the CPU figure gives 80k per CPU-second
    udp = next(ln for ln in md.splitlines() if ln.startswith("| UDP 64 B LAN->outside"))
    assert "50k; 80k" in udp and "**missed**" in udp
    assert "+70 us per packet" in md
    # the engine: TCP inbound 290k < 300k, memory at 1M over 1 KB
    assert "Engine, established TCP inbound: 290k/core" in md
    assert "Memory at 1000000 mappings: 1100 B" in md
    assert "Slow path with rewrite: 50k packets/s** (target 100k; the slowest cell 2.00x short)" in md
    assert "Offloaded ESP/GRE: worst ratio 0.50" in md
    assert "8 ESP SPI pairs" in md and "44 (5.5 each)" in md
    assert "plain TCP bulk" in table and "engine, established UDP outbound" in table


def test_every_target_met_says_so(tmp_path: Path) -> None:
    r = results()
    r["lab"] = {}
    r["engine"] = {"tcp_out_pps": 400e3, "bytes_per_mapping_100000": 900.0, "per_binding_100000": 1}
    report.write(r, tmp_path, command="make bench")
    assert "None: every target was met in this run." in (tmp_path / "BENCHMARKS.md").read_text()


def test_profile_summary_from_collapsed_stacks() -> None:
    lab = load("lab")
    raw = "\n".join([
        "<module> (vpnmasq:8);run (vpnmasq/daemon.py:600);Gateway.loop (vpnmasq/daemon.py:580);"
        "Engine.handle (vpnmasq/engine.py:421);Engine._fast (vpnmasq/engine.py:560) 30",
        "<module> (vpnmasq:8);run (vpnmasq/daemon.py:600);Gateway.loop (vpnmasq/daemon.py:580);"
        "NfQueue.flush (vpnmasq/datapath/nfqueue.py:700);NfQueue._send (vpnmasq/datapath/nfqueue.py:710) 70",
    ])
    s = lab.summarize_profile(raw)
    assert s["samples"] == 100
    assert s["self"][0] == ("NfQueue._send (vpnmasq/datapath/nfqueue.py)", 70.0)
    incl = dict(s["inclusive"])
    assert incl["Engine.handle (vpnmasq/engine.py)"] == 30.0
    assert not any(f.startswith(("<module>", "Gateway.loop", "run (")) for f in incl)


def test_status_cost_table(tmp_path: Path) -> None:
    r = results()
    r["engine"].update({
        "status_20000_before_ms": 220.0, "status_20000_before_mb": 5.7,
        "status_20000_max_hold_ms": 2.3, "status_20000_max_hold_wall_ms": 9.5,
        "status_20000_slices": 85.0, "status_20000_total_ms": 300.0, "status_20000_fork_ms": 1.6,
    })
    table = report.write(r, tmp_path, command="make bench")
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## What one status call costs the packet path" in md
    assert "| 20,000 | 220 ms (5.7 MB) | 2.3 ms (9.5 ms) | 85, 300 ms | 1.6 ms |" in md
    assert "20,000" in table
    r["engine"] = {k: v for k, v in r["engine"].items() if not k.startswith("status_")}
    report.write(r, tmp_path, command="make bench")
    assert "Not run (`bench/run.py --status-cost`)" in (tmp_path / "BENCHMARKS.md").read_text()
