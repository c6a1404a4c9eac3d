"""Which nfnetlink_queue client for the slow path: vpnmasq's own (datapath/nfqueue.py) or
fnfqueue (PyPI; CFFI, recvmmsg in a reader thread). Not part of ``make bench``.

    .venv/bin/pip install -e '.[compare]'   # fnfqueue: only this comparison needs it
    .venv/bin/python bench/nfqclients.py --rounds 3

One lab topology (bench/lab.py's h1 -- gw -- r1) with vpnmasq's userspace-mode rules; in the
gateway, pinned to the gateway CPU, a minimal slow path, the engine behind either client
(``worker`` below), in turn; trafgen floods UDP both ways at 64 and 1400 bytes. Prints the
delivered packets/s and the worker's CPU time per packet, medians over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = 0x564D


def worker(kind: str) -> None:
    """The slow path as the daemon runs it, with one client or the other."""
    from vpnmasq.config import Config
    from vpnmasq.datapath.nfqueue import Hook, NfQueue
    from vpnmasq.engine import Engine
    from vpnmasq.helpers import available
    from vpnmasq.verdict import Action, Direction

    cfg = Config(inside_networks=("10.77.0.0/24",), public_address="198.51.100.1", mode="userspace",
                 helpers=tuple(h for h in Config().helpers if h in available()))  # fmt: skip
    handle = Engine(cfg, rng_seed=1).handle
    out, inb, pre, acc = Direction.OUTBOUND, Direction.INBOUND, int(Hook.PRE_ROUTING), Action.ACCEPT
    print("ready", flush=True)
    if kind == "own":
        q = NfQueue(0)
        accept, drop = q.accept, q.drop
        while True:
            q.wait_readable(1.0)
            while True:
                pkts = q.recv_batch(256)
                now = time.monotonic()
                for pid, hook, _hw, payload, _cap, _orig, _m, _in, _out, _skb in pkts:
                    v = handle(payload, inb if hook == pre else out, now, pid)
                    if v.action is acc:
                        accept(pid, v.payload, MARK)
                    else:
                        drop(pid)
                q.flush()
                if len(pkts) < 256:
                    break
    import fnfqueue  # type: ignore[import-not-found]

    conn = fnfqueue.Connection(alloc_size=256, chunk_size=64)
    conn.bind(0).set_mode(fnfqueue.MAX_PAYLOAD, fnfqueue.COPY_PACKET)
    while True:
        try:
            for p in conn:
                v = handle(p.payload, inb if p.hook == pre else out, time.monotonic())
                if v.action is acc:
                    p.payload = v.payload
                    p.mark = MARK
                    p.mangle()
                else:
                    p.drop()
        except fnfqueue.BufferOverflowException:
            conn.reset()


def compare(rounds: int, seconds: float) -> None:
    sys.path.insert(0, str(HERE))
    import lab  # noqa: PLC0415 - bench/ is not a package

    from vpnmasq.datapath import rules
    from vpnmasq_lab.topology import Topology

    res: dict[tuple[str, int, str], list[tuple[float, float | None]]] = {}
    with Topology(hosts=1, remotes=1, lan_server=False) as topo:
        topo.gateway_nat_off()
        spec = rules.RuleSpec("wan0", ["10.77.0.0/24"], lab.PUB, mode="userspace", queue_num=0)
        rules.install(spec, netns=topo.ns("gw"))
        for rnd in range(rounds):
            for kind in ["own", "fnfqueue"] if rnd % 2 == 0 else ["fnfqueue", "own"]:
                argv = ["taskset", "-c", lab.GATEWAY_CPU, lab.PY, __file__, "--worker", kind]
                p = topo.popen("gw", argv, name=kind)
                assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
                pid = lab._python_pid(p.pid)
                for size in (64, 1400):
                    for d in ("out", "in"):
                        res.setdefault((kind, size, d), []).append(
                            lab.flood(topo, "udp", size, d, None, seconds, pid)
                        )
                topo.stop(p)
    for (kind, size, d), vals in sorted(res.items()):
        rate = statistics.median(r for r, _ in vals)
        cpus = [c for _, c in vals if c]
        cpu = f"{statistics.median(cpus):.2f}" if cpus else "-"
        print(f"{kind:9} UDP {size:4} B {d:3}: {rate / 1e3:6.0f}k pkt/s, {cpu} us CPU/pkt "
              f"(rounds: {', '.join(f'{r / 1e3:.0f}k' for r, _ in vals)})")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--worker", choices=("own", "fnfqueue"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker)
        return 0
    compare(a.rounds, a.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
