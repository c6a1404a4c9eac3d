"""The slow path alone: ``bench/run.py --slow-path`` (a few minutes instead of ten).

Two topologies, the kernel's own NAT and ``vpnmasq run`` in userspace mode (every packet
through NFQUEUE -> engine -> payload verdict), measured round-robin exactly as the full lab
benchmark does (the same functions of ``bench/lab.py``): the UDP flood rates at 1400 and 64
bytes in both directions with the daemon's CPU time per packet, the UDP round trip (median
and p99), and the py-spy profile of the daemon under a 64-byte flood. The result has the
shape of :func:`lab.run_lab`'s, so ``report.py`` renders it (the rows it does not measure
stay empty).

Use it to measure a change of ``datapath/nfqueue.py`` or the daemon's packet loop before
and after, under the bench lock::

    flock /tmp/vpnmasq-bench.lock .venv/bin/python bench/run.py --slow-path --skip-engine \\
        --rounds 5 --docs /tmp/slow-docs
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lab

from vpnmasq_lab.topology import Topology

MODES = ("kernel", "userspace")


def run_slow_path(
    rounds: int, seconds: float, *, quick: bool, log: Callable[[str], None], profile_out: Path
) -> dict[str, Any]:
    """Kernel and userspace-mode gateways side by side; see the module docstring."""
    cells: dict[str, lab.Cell] = {}
    profile: dict[str, Any] = {}

    def cell(name: str, unit: str) -> lab.Cell:
        return cells.setdefault(name, lab.Cell(name, unit))

    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        topos: dict[str, Topology] = {}
        pids: dict[str, int | None] = {}
        for mode in MODES:
            topo = stack.enter_context(Topology(hosts=1, remotes=1, lan_server=False))
            proc = stack.enter_context(lab.gateway(topo, mode))
            topos[mode] = topo
            pids[mode] = lab._python_pid(proc.pid) if proc is not None else None
        log(f"  {len(MODES)} gateways up in {time.monotonic() - t0:.0f} s")
        for rnd in range(rounds):
            t1 = time.monotonic()
            order = list(MODES) if rnd % 2 == 0 else list(reversed(MODES))
            for mode in order:
                med, p99 = lab.measure_latency(topos[mode], 300 if quick else 2000)
                cell("rtt_median_us", "us").add(mode, med)
                cell("rtt_p99_us", "us").add(mode, p99)
            for size in (1400, 64):
                for d in ("out", "in"):
                    for mode in order:
                        rate, cpu = lab.flood(topos[mode], "udp", size, d, None, seconds, pids[mode])
                        cell(f"udp{size}_{d}_pps", "pkt/s").add(mode, rate)
                        cell(f"udp{size}_{d}_cpu_us", "us/pkt").add(mode, cpu)
            if rnd == 0 and pids["userspace"] is not None:
                profile = lab.profile_slow_path(
                    topos["userspace"], pids["userspace"] or 0, 4 if quick else 6, profile_out
                )
            log(f"  round {rnd + 1}/{rounds}: {time.monotonic() - t1:.0f} s")
    return {
        "cells": {k: {"unit": c.unit, "values": c.values} for k, c in cells.items()},
        "modes": list(MODES),
        "profile": profile,
        "notes": ["slow path only (bench/run.py --slow-path): no TCP, ESP, GRE or offload rows"],
    }


__all__ = ["MODES", "run_slow_path"]
