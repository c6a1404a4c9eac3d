"""Engine-only benchmarks (no kernel): the pure core's own speed and memory.

* established rewrites, packets per CPU-second (``time.process_time``: one core, whatever
  else runs on the machine), for TCP/UDP (the fast path, and the slow path for comparison)
  and ESP/GRE (the helpers);
* new mappings per second;
* memory per mapping (resident memory of a fresh interpreter: everything, fixed costs and
  allocator overhead included) at 100k and 1M mappings, and the established rate over such
  a table;
* the cost of association: packets and (manual-clock) time to associate N ESP SPI pairs
  and N PPTP calls to one remote, and the CPU it takes.

Prints figures, asserts nothing (see docs/BENCHMARKS.md)::

    .venv/bin/python bench/engine.py [--quick] [--json] [--only SECTIONS] [--repeat N]

``--only established,memory`` runs some sections (established, vpn, new, memory,
association, status); ``--repeat N`` reports the median of N runs of each figure (the machine is
shared: expect noise). Measure under the bench lock
(``flock /tmp/vpnmasq-bench.lock .venv/bin/python bench/engine.py ...``).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from vpnmasq.config import Config, Limits, PortRange
from vpnmasq.engine import Engine
from vpnmasq.helpers import available
from vpnmasq.packet.ipv4 import PROTO_ESP, PROTO_GRE, build_ipv4, ip_to_int
from vpnmasq.packet.l4 import TCP_ACK, TCP_SYN, build_esp, build_gre_v1, build_tcp, build_udp
from vpnmasq.verdict import Action, Direction

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the PPTP transcript builders of the tests
    sys.path.insert(0, str(ROOT))

OUT, IN = Direction.OUTBOUND, Direction.INBOUND
PUB = ip_to_int("198.51.100.1")
EXT = ip_to_int("203.0.113.20")
LAN = ip_to_int("10.0.0.0")


def make(max_entries: int = 2_000_000, **kw: Any) -> Engine:
    cfg = Config(
        inside_networks=("10.0.0.0/8",),
        public_address="198.51.100.1",
        mode="userspace",
        port_range=PortRange(1024, 65535),
        # the per-host limits (on by default) off: the synthetic flows come from few hosts at
        # rates no real host reaches; the bench measures the table and the rewrite
        limits=Limits(
            max_entries=max_entries,
            max_entries_per_host=0,
            max_ports_per_host=0,
            max_new_per_host_per_second=0,
        ),
        filtering="endpoint-independent",
        helpers=tuple(h for h in Config().helpers if h in available()),
        **kw,
    )
    return Engine(cfg, rng_seed=1)


def per_cpu_second(fn: Callable[[int], None], n: int) -> float:
    t0 = time.process_time()
    fn(n)
    return n / (time.process_time() - t0)


def _loop(eng: Engine, pkts: list[bytes], direction: Direction) -> Callable[[int], None]:
    handle, m = eng.handle, len(pkts)

    def run(k: int) -> None:
        for i in range(k):
            handle(pkts[i % m], direction, 1.0)

    return run


# ------------------------------------------------------------------ established flows
def established(proto: str, n: int, *, fast: bool = True, flows: int = 64, size: int = 1400) -> dict[str, float]:
    """TCP or UDP flows, handshake done, then ``n`` data packets each way."""
    eng = make()
    eng.fast_path = fast
    pl = b"x" * (size - 40)
    outs: list[bytes] = []
    ins: list[bytes] = []
    for i in range(flows):
        host = LAN + 2 + i
        if proto == "tcp":
            v = eng.handle(build_tcp(host, EXT, 40000, 443, flags=TCP_SYN), OUT, 0.0)
            assert v.payload is not None
            alias = int.from_bytes(v.payload[20:22], "big")
            eng.handle(build_tcp(EXT, PUB, 443, alias, flags=TCP_SYN | TCP_ACK), IN, 0.0)
            outs.append(bytes(build_tcp(host, EXT, 40000, 443, pl)))
            ins.append(bytes(build_tcp(EXT, PUB, 443, alias, pl, flags=TCP_ACK)))
        else:
            v = eng.handle(build_udp(host, EXT, 40000, 443, pl), OUT, 0.0)
            assert v.payload is not None
            alias = int.from_bytes(v.payload[20:22], "big")
            outs.append(bytes(build_udp(host, EXT, 40000, 443, pl)))
            ins.append(bytes(build_udp(EXT, PUB, 443, alias, pl)))
        for p, d in ((outs[-1], OUT), (ins[-1], IN)):  # one packet each way marks the flow
            assert eng.handle(p, d, 0.5).action is Action.ACCEPT
    tag = "" if fast else "_slowpath"
    return {
        f"{proto}_out_pps{tag}": per_cpu_second(_loop(eng, outs, OUT), n),
        f"{proto}_in_pps{tag}": per_cpu_second(_loop(eng, ins, IN), n),
    }


def vpn_established(kind: str, n: int, *, flows: int = 16) -> dict[str, float]:
    """ESP associations / PPTP calls set up first, then ``n`` packets each way."""
    eng = make()
    outs: list[bytes] = []
    ins: list[bytes] = []
    pl = b"\0" * 1372
    if kind == "esp":
        for i in range(flows):
            host = LAN + 2 + i
            out = bytes(build_ipv4(host, EXT, PROTO_ESP, build_esp(0x1000 + i, 1, pl)))
            back = bytes(build_ipv4(EXT, PUB, PROTO_ESP, build_esp(0x2000 + i, 1, pl)))
            assert eng.handle(out, OUT, 0.0).accepted and eng.handle(back, IN, 0.0).accepted
            outs.append(out)
            ins.append(back)
    else:
        from tests.pptp_wire import ControlLink

        for i in range(flows):
            host = LAN + 2 + i
            link = ControlLink(eng, host, 40000, EXT).open(0.0)
            link.start_session(0.0)
            outside = link.outgoing_call(0x100 + i, 0x4000 + i, 0.0)
            outs.append(bytes(build_ipv4(host, EXT, PROTO_GRE, build_gre_v1(0x4000 + i, pl))))
            ins.append(bytes(build_ipv4(EXT, PUB, PROTO_GRE, build_gre_v1(outside, pl))))
    for p, d in zip(outs + ins, [OUT] * flows + [IN] * flows, strict=True):
        assert eng.handle(p, d, 0.5).accepted
    return {
        f"{kind}_out_pps": per_cpu_second(_loop(eng, outs, OUT), n),
        f"{kind}_in_pps": per_cpu_second(_loop(eng, ins, IN), n),
    }


def new_mappings(n: int) -> float:
    eng = make()
    pkts = [
        bytes(build_udp(LAN + 1 + (i >> 14), EXT, 1024 + (i & 0x3FFF), 53, b"q")) for i in range(n)
    ]
    t0 = time.process_time()
    for j, p in enumerate(pkts):
        eng.handle(p, OUT, 0.0)
        if j & 1023 == 0:
            eng.drain_events()
    dt = time.process_time() - t0
    eng.drain_events()
    return n / dt


# ------------------------------------------------------------------ memory
def _mapping_packets(n: int, per_binding: int) -> Iterator[bytes]:
    """``n`` distinct mappings. ``per_binding`` 1: every mapping its own binding (TCP and UDP
    alternate, 4096 source ports per LAN host, 256 remotes): the worst case. Otherwise UDP
    bindings (one LAN port) with ``per_binding`` sessions each, to as many remotes: one public
    address has ~64k ports per protocol, so a million mappings need the endpoint-independent
    sharing of a binding by several sessions (or more addresses)."""
    if per_binding == 1:
        for i in range(n):
            b = build_udp if i & 1 else build_tcp
            host = LAN + 1 + (i >> 12)
            yield bytes(b(host, EXT + (i & 0xFF), 1024 + ((i >> 1) & 0x7FF), 53, b"q"))
        return
    for i in range(n):
        binding, remote = divmod(i, per_binding)
        host = LAN + 1 + (binding >> 12)
        yield bytes(build_udp(host, EXT + remote, 1024 + (binding & 0xFFF), 53, b"q"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory_per_mapping(n: int, per_binding: int = 1, rate_packets: int = 0) -> dict[str, float]:
    """Bytes per mapping and, optionally, the established-flow rate over the full table
    (random flows: cache misses included). Measured in a fresh interpreter
    (:func:`_memory_child`): resident memory after filling minus before creating the engine,
    so everything counts (the engine's fixed costs, allocator overhead and fragmentation)."""
    import subprocess

    cp = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(n), str(per_binding), str(rate_packets)],
        capture_output=True, text=True, check=True, timeout=900,
    )
    res: dict[str, float] = json.loads(cp.stdout.strip().splitlines()[-1])
    return res


def _memory_child(n: int, per_binding: int, rate_packets: int) -> dict[str, float]:
    rnd = random.Random(5)
    gc.collect()
    base = _rss()
    eng = make()
    sample: list[bytes] = []
    for j, p in enumerate(_mapping_packets(n, per_binding)):
        v = eng.handle(p, OUT, 0.0)
        if j & 1023 == 0:
            eng.drain_events()
        # the rate sample: UDP flows (a TCP flow needs its handshake to be established)
        if rate_packets and p[9] == 17 and rnd.random() < 8192 / n:
            assert v.payload is not None
            sample.append(p)
    eng.drain_events()
    gc.collect()
    used = _rss() - base
    assert len(eng.table) == n, (len(eng.table), n)
    out = {f"bytes_per_mapping_{n}": used / n}
    if rate_packets:
        for p in sample:  # the second packet marks each flow for the fast path
            eng.handle(p, OUT, 0.5)
        rnd.shuffle(sample)
        out[f"out_pps_with_{n}_mappings"] = per_cpu_second(_loop(eng, sample, OUT), rate_packets)
    return out


# ------------------------------------------------------------------ association cost
def esp_association(hosts: int, *, retransmit: float = 0.5, rtt: float = 0.05, step: float = 0.01) -> dict[str, float]:
    """``hosts`` LAN hosts start ESP to one remote at once, with no IKE seen (the worst case:
    pure serialization); each retransmits its first packet every ``retransmit`` s until the
    remote's SPI reaches it; the remote answers every packet it gets after ``rtt`` s."""
    eng = make()
    out_spi = {LAN + 2 + i: 0x1000_0000 + i for i in range(hosts)}
    in_spi = {h: 0x2000_0000 + i for i, h in enumerate(out_spi)}
    owner = {s: h for h, s in in_spi.items()}
    done: dict[int, float] = {}
    next_send = dict.fromkeys(out_spi, 0.0)
    replies: list[tuple[float, int]] = []
    now, offered = 0.0, 0
    cpu0 = time.process_time()
    while len(done) < hosts and now < 3600:
        for t, spi in sorted(replies):
            if t <= now:
                replies.remove((t, spi))
                offered += 1
                v = eng.handle(build_ipv4(EXT, PUB, PROTO_ESP, build_esp(spi, 1)), IN, now)
                if v.accepted and v.payload is not None:
                    dst = int.from_bytes(v.payload[16:20], "big")
                    assert dst == owner[spi], "misassociated"
                    done.setdefault(dst, now)
        for h in out_spi:
            if h in done or next_send[h] > now:
                continue
            next_send[h] = now + retransmit
            offered += 1
            v = eng.handle(build_ipv4(h, EXT, PROTO_ESP, build_esp(out_spi[h], 1)), OUT, now)
            if v.accepted:
                replies.append((now + rtt, in_spi[h]))
        now += step
        dl = eng.next_deadline()
        if dl is not None and dl <= now:
            eng.handle_timer(now)
    cpu = time.process_time() - cpu0
    return {
        "seconds_all": max(done.values()) if done else float("nan"),
        "packets": offered,
        "packets_per_association": offered / hosts,
        "cpu_ms": cpu * 1e3,
    }


def esp_association_ike(
    hosts: int, *, retransmit: float = 0.5, rtt: float = 0.05, keep: list[Any] | None = None
) -> dict[str, float]:
    """``hosts`` LAN hosts start at once, each with its own IKEv2 exchange with one remote
    (IKE_SA_INIT, IKE_AUTH, on UDP 500 through the gateway) and then raw ESP: the IKE
    signal the ESP helper uses. Each host sends its first ESP packet once its IKE_AUTH is
    answered and repeats it every ``retransmit`` s until the remote's first ESP packet reaches
    it; the remote answers every packet after ``rtt`` s (the ESP answer from the SPI it
    negotiated with that host). Event-driven on a manual clock; the time until the last host
    is associated, the packets through the gateway and the engine's CPU time."""
    from vpnmasq.helpers.isakmp import build_header

    eng = make()
    if keep is not None:
        keep.append(eng)
    hosts_ = [LAN + 2 + i for i in range(hosts)]
    cookie = {h: 0x1111_0000_0000_0000 + i for i, h in enumerate(hosts_)}
    out_spi = {h: 0x1000_0000 + i for i, h in enumerate(hosts_)}
    in_spi = {h: 0x2000_0000 + i for i, h in enumerate(hosts_)}
    owner = {s: h for h, s in in_spi.items()}
    events: list[tuple[float, int, str, int]] = []  # (time, seq, what, host)
    seq = [0]

    def at(t: float, what: str, h: int) -> None:
        seq[0] += 1
        heapq.heappush(events, (t, seq[0], what, h))

    for h in hosts_:
        at(0.0, "init", h)
    done: dict[int, float] = {}
    offered = 0
    cpu0 = time.process_time()
    while events and len(done) < hosts:
        now, _, what, h = heapq.heappop(events)
        dl = eng.next_deadline()
        if dl is not None and dl <= now:
            eng.handle_timer(now)
        ic, rc = cookie[h], cookie[h] ^ 0xFFFF
        if what in ("init", "auth"):  # the host's IKE request, then the remote's answer
            exch, mid = (34, 0) if what == "init" else (35, 1)
            pkt = build_udp(h, EXT, 500, 500, build_header(ic, 0 if what == "init" else rc, exch,
                            major=2, flags=0x08, message_id=mid))  # fmt: skip
            offered += 1
            if eng.handle(pkt, OUT, now).accepted:
                at(now + rtt, what + "_r", h)
        elif what in ("init_r", "auth_r"):
            exch, mid = (34, 0) if what == "init_r" else (35, 1)
            pkt = build_udp(EXT, PUB, 500, 500, build_header(ic, rc, exch, major=2, flags=0x20,
                            message_id=mid))  # fmt: skip
            offered += 1
            v = eng.handle(pkt, IN, now)
            if v.accepted:
                at(now, "auth" if what == "init_r" else "esp", h)
        elif what == "esp":
            if h in done:
                continue
            offered += 1
            if eng.handle(build_ipv4(h, EXT, PROTO_ESP, build_esp(out_spi[h], 1)), OUT, now).accepted:
                at(now + rtt, "esp_r", h)
            at(now + retransmit, "esp", h)
        elif what == "esp_r":
            offered += 1
            v = eng.handle(build_ipv4(EXT, PUB, PROTO_ESP, build_esp(in_spi[h], 1)), IN, now)
            if v.accepted and v.payload is not None:
                dst = int.from_bytes(v.payload[16:20], "big")
                assert dst == owner[in_spi[h]], "misassociated"
                done.setdefault(dst, now)
    cpu = time.process_time() - cpu0
    return {
        "seconds_all": max(done.values()) if len(done) == hosts else float("nan"),
        "associated": len(done),
        "packets": offered,
        "packets_per_association": offered / hosts,
        "cpu_ms": cpu * 1e3,
    }


def natt_association(clients: int, *, rtt: float = 0.05, keep: list[Any] | None = None) -> dict[str, float]:
    """``clients`` NAT-T clients (RFC 3947/3948) start at once with one remote: IKE_SA_INIT on
    UDP 500, then IKE_AUTH and ESP-in-UDP on 4500 (non-ESP marker for IKE), one packet each way
    per step, ``rtt`` apart. Each client is a UDP mapping of its own (4500 kept for the first);
    the time until every client's first ESP-in-UDP packet came back."""
    from vpnmasq.helpers.isakmp import build_header

    eng = make()
    if keep is not None:
        keep.append(eng)
    offered = 0
    done: dict[int, float] = {}
    cpu0 = time.process_time()
    clients_ = [LAN + 2 + i for i in range(clients)]
    alias: dict[tuple[int, int], int] = {}
    for step, (port, kind) in enumerate(((500, "init"), (4500, "auth"), (4500, "esp"))):
        t = 2 * step * rtt
        for i, h in enumerate(clients_):
            ic = 0x2222_0000_0000_0000 + i
            if kind == "esp":
                body = build_esp(0x3000_0000 + i, 1)
            else:
                body = (b"\0\0\0\0" if port == 4500 else b"") + build_header(
                    ic, 0 if kind == "init" else ic ^ 0xFFFF, 34 if kind == "init" else 35,
                    major=2, flags=0x08, message_id=0 if kind == "init" else 1)  # fmt: skip
            offered += 1
            v = eng.handle(build_udp(h, EXT, port, port, body), OUT, t)
            assert v.accepted and v.payload is not None
            alias[(h, port)] = int.from_bytes(v.payload[20:22], "big")
        for i, h in enumerate(clients_):
            if kind == "esp":
                body = build_esp(0x4000_0000 + i, 1)
            else:
                ic = 0x2222_0000_0000_0000 + i
                body = (b"\0\0\0\0" if port == 4500 else b"") + build_header(
                    ic, ic ^ 0xFFFF, 34 if kind == "init" else 35, major=2, flags=0x20,
                    message_id=0 if kind == "init" else 1)  # fmt: skip
            offered += 1
            v = eng.handle(build_udp(EXT, PUB, port, alias[(h, port)], body), IN, t + rtt)
            assert v.accepted and v.payload is not None
            assert int.from_bytes(v.payload[16:20], "big") == h, "answer to the wrong client"
            if kind == "esp":
                done[h] = t + rtt
    cpu = time.process_time() - cpu0
    return {"seconds_all": max(done.values()), "packets": offered,
            "packets_per_association": offered / clients, "cpu_ms": cpu * 1e3}


def traced_bytes(fn: Callable[[], Any]) -> float:
    """Python memory still held after ``fn()`` (tracemalloc; the result kept alive)."""
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    keep = fn()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del keep
    return float(held)


def pptp_association(calls: int, *, keep: list[Any] | None = None) -> dict[str, float]:
    """``calls`` LAN hosts each open a control connection and one call to one remote: TCP
    handshake (3), Start-Control-Connection (2), Outgoing-Call (2) through the engine."""
    from tests.pptp_wire import ControlLink

    eng = make()
    if keep is not None:
        keep.append(eng)
    offered = [0]
    inner = eng.handle

    def counting(*a: Any, **kw: Any) -> Any:
        offered[0] += 1
        return inner(*a, **kw)

    eng.handle = counting  # type: ignore[method-assign]
    cpu0 = time.process_time()
    for i in range(calls):
        link = ControlLink(eng, LAN + 2 + i, 40000, EXT).open(0.0)
        link.start_session(0.0)
        link.outgoing_call(0, 0x4000 + i, 0.0)  # every client uses Call ID 0
    cpu = time.process_time() - cpu0
    gre = [e for e in eng.table if e.kind == "gre"]
    assert len(gre) == calls and len({e.alias_port for e in gre}) == calls
    return {"seconds_all": 0.0, "packets": offered[0], "packets_per_association": offered[0] / calls,
            "cpu_ms": cpu * 1e3}


# ------------------------------------------------------------------ status cost
#: table sizes of the status-cost figures
STATUS_SIZES = (1_000, 20_000, 100_000)


def status_cost(n: int, slice_s: float | None = None) -> dict[str, float]:
    """What one ``vpnmasq status`` (the whole table, as JSON) costs the packet loop over a
    table of ``n`` UDP mappings, three ways:

    * before: built in one go inside the loop (``Engine.snapshot`` + JSON): the loop is held
      for all of it (CPU time);
    * sliced (what the daemon does): the request copies the index (C speed), then
      :func:`vpnmasq.status.answer_stream` pieces run for ``slice_s`` at a time, as
      ``ControlServer.work`` runs them between packet batches: the longest hold (CPU time of
      a slice; the wall time adds whatever else the machine runs) is what a queued packet
      may wait because of status;
    * forked snapshot (the alternative, as the periodic state save does): ``os.fork()``
      alone, the parent's stall (the copy-on-write faults afterwards are not counted).
    """
    import os

    from vpnmasq.daemon import CONTROL_SLICE_S
    from vpnmasq.status import StatusQuery, answer_stream, status_payload

    slice_s = CONTROL_SLICE_S if slice_s is None else slice_s
    eng = make(max_entries=n + 10)
    for p in _mapping_packets(n, 1):
        eng.handle(p, OUT, 1.0)
    eng.drain_events()
    assert len(eng.table) == n
    gc.collect()
    t0 = time.thread_time()
    doc = json.dumps(status_payload(eng.snapshot(2.0), dict(eng.counters)))
    before_s = time.thread_time() - t0
    t0 = time.thread_time()
    refs = list(eng.table.index.values())
    copy_s = time.thread_time() - t0
    job = answer_stream(refs, StatusQuery(), lambda e: eng.row(e, 2.0),
                        lambda: {"counters": dict(eng.counters)})
    holds: list[float] = []  # wall time of each slice (preemption on a busy machine too)
    cpu: list[float] = []  # CPU time of each slice: what the slicing itself holds
    size, done = 0, False
    while not done:
        t, c = time.perf_counter(), time.thread_time()
        deadline = t + slice_s
        while True:
            try:
                size += len(next(job))
            except StopIteration:
                done = True
                break
            if time.perf_counter() >= deadline:
                break
        holds.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    holds.sort()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    fork_s = time.perf_counter() - t0
    os.waitpid(pid, 0)
    return {
        f"status_{n}_before_ms": before_s * 1e3,
        f"status_{n}_before_mb": len(doc) / 1e6,
        f"status_{n}_copy_ms": copy_s * 1e3,
        f"status_{n}_max_hold_ms": max(max(cpu), copy_s) * 1e3,
        f"status_{n}_p99_hold_wall_ms": holds[int(len(holds) * 0.99)] * 1e3,
        f"status_{n}_max_hold_wall_ms": holds[-1] * 1e3,
        f"status_{n}_slices": float(len(holds)),
        f"status_{n}_total_ms": (sum(holds) + copy_s) * 1e3,
        f"status_{n}_mb": size / 1e6,
        f"status_{n}_fork_ms": fork_s * 1e3,
    }


def _status_child(n: int) -> dict[str, float]:
    return status_cost(n)


def status_costs(repeat: int = 3) -> dict[str, float]:
    """:func:`status_cost` at each of STATUS_SIZES, each in a fresh interpreter (the fork
    stall depends on the process size), median of ``repeat`` runs."""
    import subprocess

    out: dict[str, float] = {}
    for n in STATUS_SIZES:
        def one(n: int = n) -> dict[str, float]:
            cp = subprocess.run([sys.executable, __file__, "--status-child", str(n)],
                                capture_output=True, text=True, check=True, timeout=900)
            res: dict[str, float] = json.loads(cp.stdout.strip().splitlines()[-1])
            return res

        out.update(_median_of(repeat, one))
    return out


# ------------------------------------------------------------------ main
SECTIONS = ("established", "vpn", "new", "memory", "association", "status")


def _median_of(repeat: int, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Each figure of ``fn()`` as the median of ``repeat`` runs."""
    runs = [fn() for _ in range(max(1, repeat))]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_all(
    quick: bool,
    log: Callable[[str], None] = print,
    *,
    only: tuple[str, ...] = SECTIONS,
    repeat: int = 1,
) -> dict[str, Any]:
    n = 60_000 if quick else 300_000
    res: dict[str, Any] = {}
    if "established" in only:
        for proto in ("tcp", "udp"):
            res.update(_median_of(repeat, partial(established, proto, n)))
            res.update(_median_of(repeat, partial(established, proto, n // 3, fast=False)))
        log("  engine: established TCP/UDP done")
    if "vpn" in only:
        for kind in ("esp", "gre"):
            res.update(_median_of(repeat, partial(vpn_established, kind, n // 2)))
        log("  engine: ESP/GRE done")
    if "new" in only:
        res.update(_median_of(repeat, lambda: {"new_mappings_per_s": new_mappings(20_000 if quick else 100_000)}))
        log("  engine: new mappings done")
    if "memory" in only:
        res.update(_median_of(repeat, lambda: memory_per_mapping(100_000, 1, rate_packets=n // 2)))
        res["per_binding_100000"] = 1
        big = 200_000 if quick else 1_000_000
        res.update(_median_of(repeat, lambda: memory_per_mapping(big, 16, rate_packets=n // 2)))
        res[f"per_binding_{big}"] = 16
        log(f"  engine: memory at 100k and {big // 1000}k mappings done")
    if "association" in only:
        assoc: dict[str, dict[str, float]] = {}
        for k in (1, 8, 64):
            assoc[f"esp_{k}"] = esp_association(k)
            assoc[f"esp_ike_{k}"] = esp_association_ike(k)
            assoc[f"natt_{k}"] = natt_association(k)
            assoc[f"pptp_{k}"] = pptp_association(k)
        empty = traced_bytes(make)
        for name, fn in (("esp_ike", esp_association_ike), ("natt", natt_association),
                         ("pptp", pptp_association)):  # fmt: skip
            # memory 64 associations hold: a second run under tracemalloc, less an empty engine
            def build(f: Callable[..., Any] = fn) -> list[Any]:
                kept: list[Any] = []
                f(64, keep=kept)
                for eng in kept:
                    eng.drain_events()  # the daemon logs and drops them
                return kept

            assoc[f"{name}_64"]["bytes_per_association"] = (traced_bytes(build) - empty) / 64
        res["association"] = assoc
        log("  engine: association cost done")
    if "status" in only:
        res.update(status_costs(max(repeat, 3)))
        log("  engine: status cost done")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--repeat", type=int, default=1, help="median of N runs per figure")
    ap.add_argument("--memory-child", nargs=3, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--status-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        print(json.dumps(_memory_child(*a.memory_child)))
        return
    if a.status_child:
        print(json.dumps(_status_child(a.status_child)))
        return
    only = tuple(x.strip() for x in a.only.split(",") if x.strip())
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    res = run_all(a.quick, log=lambda s: print(s, file=sys.stderr), only=only, repeat=a.repeat)
    if a.json:
        print(json.dumps(res, indent=1))
        return
    for k, v in res.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                print(f"{k}.{kk:30s} {vv}")
        else:
            print(f"{k:40s} {v:14,.0f}")


if __name__ == "__main__":
    main()
