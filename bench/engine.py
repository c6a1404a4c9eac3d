"""Engine-only benchmark (no kernel): packets/s for established rewrites, new-mapping rate,
and memory per mapping. Prints figures; asserts nothing (see docs/BENCHMARKS.md).

    .venv/bin/python bench/engine.py [--mappings 100000] [--packets 200000]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc

from vpnmasq.config import Config, Limits, PortRange
from vpnmasq.engine import Engine
from vpnmasq.helpers import available
from vpnmasq.packet.ipv4 import ip_to_int
from vpnmasq.packet.l4 import TCP_ACK, build_tcp, build_udp
from vpnmasq.verdict import Direction

OUT, IN = Direction.OUTBOUND, Direction.INBOUND
PUB = ip_to_int("198.51.100.1")
EXT = ip_to_int("203.0.113.20")


def make(max_entries: int = 2_000_000) -> Engine:
    cfg = Config(
        inside_networks=("10.0.0.0/8",),
        public_address="198.51.100.1",
        mode="userspace",
        port_range=PortRange(1024, 65535),
        limits=Limits(max_entries=max_entries),
        filtering="endpoint-independent",
        helpers=tuple(h for h in Config().helpers if h in available()),
    )
    return Engine(cfg, rng_seed=1)


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def established(proto: str, n: int, flows: int = 64) -> dict[str, float]:
    eng = make()
    build = build_tcp if proto == "tcp" else build_udp
    outs = [bytes(build(ip_to_int("10.0.0.2") + i, EXT, 40000, 443, b"x" * 1400)) for i in range(flows)]
    ins = []
    for p in outs:
        v = eng.handle(p, OUT, 0.0)
        assert v.payload is not None
        alias = int.from_bytes(v.payload[20:22], "big")
        if proto == "tcp":
            ins.append(bytes(build_tcp(EXT, PUB, 443, alias, b"y" * 1400, flags=TCP_ACK)))
        else:
            ins.append(bytes(build_udp(EXT, PUB, 443, alias, b"y" * 1400)))
    handle = eng.handle

    def run_out(k: int) -> None:
        for i in range(k):
            handle(outs[i % flows], OUT, 1.0)

    def run_in(k: int) -> None:
        for i in range(k):
            handle(ins[i % flows], IN, 1.0)

    return {f"{proto}_out_pps": rate(run_out, n), f"{proto}_in_pps": rate(run_in, n)}


def new_mappings(n: int) -> float:
    eng = make()
    pkts = [
        bytes(build_udp(ip_to_int("10.0.0.0") + 1 + (i >> 14), EXT, 1024 + (i & 0x3FFF), 53, b"q"))
        for i in range(n)
    ]
    t0 = time.perf_counter()
    for p in pkts:
        eng.handle(p, OUT, 0.0)
    dt = time.perf_counter() - t0
    eng.drain_events()
    return n / dt


def memory_per_mapping(n: int) -> float:
    """Mappings from many LAN hosts to many remotes (one public address holds ~64k ports per
    protocol, so large tables use TCP, UDP and ICMP across remotes... of the same alias port
    space: each mapping here is its own binding, so n must stay below 3 x 64k)."""
    builders = (build_udp, build_tcp)
    pkts = [
        bytes(
            builders[i & 1](
                ip_to_int("10.0.0.0") + 1 + (i >> 12), EXT + (i & 0xFF), 1024 + ((i >> 1) & 0x7FF), 53, b"q"
            )
        )
        for i in range(n)
    ]
    gc.collect()
    tracemalloc.start()
    eng = make()
    base = tracemalloc.get_traced_memory()[0]
    for j, p in enumerate(pkts):
        eng.handle(p, OUT, 0.0)
        if j % 4096 == 0:
            eng.drain_events()
    eng.drain_events()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(eng.table) == n, len(eng.table)
    return used / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--mappings", type=int, default=100_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res: dict[str, float] = {}
    res.update(established("tcp", a.packets))
    res.update(established("udp", a.packets))
    res["new_mappings_per_s"] = new_mappings(min(a.mappings, 100_000))
    res[f"bytes_per_mapping_at_{a.mappings}"] = memory_per_mapping(a.mappings)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:32s} {v:12,.0f}")


if __name__ == "__main__":
    main()
