"""Run the fuzzers: ``python fuzz/run.py --seconds N [--target T ...] [--jobs J]``.

Each target runs in its own process (libFuzzer runs one target per process) under atheris,
coverage-guided, seeded from :mod:`fuzz.seeds` plus the corpus kept from earlier runs in
``fuzz/.work/<target>/corpus``. A crash (any exception, including a broken invariant or
oracle) is written to ``fuzz/.work/<target>/crashes/``; turn it into a regression test by
copying it to ``tests/fuzz/regressions/<target>/`` (``tests/fuzz/test_regressions.py`` replays
every file there). Without atheris, a plain random mutator runs the same targets.

Prints one line per target (inputs run, rate, crashes) and writes ``summary.json`` into the
work directory; exits 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ALL_TARGETS = ("engine", "ipv4", "tcp", "udp", "icmp", "gre", "esp", "isakmp", "pptp")
DEFAULT_WORK = ROOT / "fuzz" / ".work"
MAX_LEN = 4096


# ---------------------------------------------------------------------- child: one target
def _child(target: str, seconds: float, work: Path, engine: str) -> int:
    tdir = work / target
    seeds_dir, corpus_dir, crash_dir = tdir / "seeds", tdir / "corpus", tdir / "crashes"
    for d in (corpus_dir, crash_dir):
        d.mkdir(parents=True, exist_ok=True)
    try:
        if engine != "atheris":
            raise ImportError("random engine requested")
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        return _random_child(target, seconds, tdir)
    with atheris.instrument_imports(include=["vpnmasq"]):
        from fuzz.seeds import write_corpus
        from fuzz.targets import TARGETS
    write_corpus(target, str(seeds_dir))
    fn = TARGETS[target]

    def one(data: bytes) -> None:
        fn(data)

    argv = [
        sys.argv[0],
        f"-max_total_time={max(1, int(seconds))}",
        f"-artifact_prefix={crash_dir}/",
        f"-max_len={MAX_LEN}",
        "-timeout=20",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
        str(corpus_dir),
        str(seeds_dir),
    ]
    atheris.Setup(argv, one)
    atheris.Fuzz()
    return 0


def _mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(6)
        if op == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and len(b) > 2:
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 8)]
        elif op == 4 and pool:
            other = rng.choice(pool)
            i = rng.randrange(len(b) + 1)
            j = rng.randrange(len(other) + 1)
            b = b[:i] + other[j:]
        elif b:
            i = rng.randrange(max(1, len(b) - 1))
            b[i : i + 2] = rng.randrange(65536).to_bytes(2, "big")
    return bytes(b[:MAX_LEN])


def _random_child(target: str, seconds: float, tdir: Path) -> int:
    """The same targets under a plain random mutator (no coverage feedback)."""
    import traceback

    from fuzz.seeds import seeds
    from fuzz.targets import TARGETS

    fn = TARGETS[target]
    pool = seeds(target) + [p.read_bytes() for p in sorted((tdir / "corpus").glob("*"))]
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    runs, crashes = 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = _mutate(rng, rng.choice(pool), pool)
        runs += 1
        try:
            fn(data)
        except Exception:  # noqa: BLE001 - every exception is a finding
            crashes += 1
            name = tdir / "crashes" / f"crash-{runs:08d}"
            name.write_bytes(data)
            print(f"==CRASH== {name}\n{traceback.format_exc()}", file=sys.stderr)
            if crashes >= 5:
                break
    print(f"stat::number_of_executed_units: {runs}", file=sys.stderr)
    return 1 if crashes else 0


# ---------------------------------------------------------------------- parent
def _run_one(target: str, seconds: float, work: Path, engine: str) -> dict[str, object]:
    tdir = work / target
    tdir.mkdir(parents=True, exist_ok=True)
    before = set((tdir / "crashes").glob("*")) if (tdir / "crashes").exists() else set()
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", target,
        "--seconds", str(seconds), "--workdir", str(work), "--engine", engine,
    ]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT),
                       timeout=seconds * 3 + 120)
    took = time.monotonic() - t0
    log = p.stdout + p.stderr
    (tdir / "last.log").write_text(log)
    m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log) or re.findall(
        r"Done (\d+) runs", log
    )
    runs = int(m[-1]) if m else 0
    cov = re.findall(r"\bcov: (\d+)", log)
    crashes = sorted(str(c) for c in set((tdir / "crashes").glob("*")) - before)
    corpus = len(list((tdir / "corpus").glob("*"))) if (tdir / "corpus").exists() else 0
    return {
        "target": target,
        "runs": runs,
        "seconds": round(took, 1),
        "rate": round(runs / seconds, 1) if seconds else 0.0,
        "coverage": int(cov[-1]) if cov else None,
        "corpus": corpus,
        "exit": p.returncode,
        "crashes": crashes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="time per target")
    ap.add_argument("--target", action="append", choices=ALL_TARGETS,
                    help="run only this target (repeatable); default: all")
    ap.add_argument("--jobs", type=int, default=0, help="targets run at once (default: CPUs)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a.child, a.seconds, a.workdir, a.engine)
    targets = a.target or list(ALL_TARGETS)
    jobs = a.jobs or min(len(targets), os.cpu_count() or 1)
    a.workdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        results = list(ex.map(lambda t: _run_one(t, a.seconds, a.workdir, a.engine), targets))
    (a.workdir / "summary.json").write_text(json.dumps(results, indent=2))
    bad = [r for r in results if r["crashes"] or r["exit"] not in (0,)]
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'target':8} {'inputs':>10} {'inputs/s':>9} {'cov':>6} {'corpus':>6}  crashes")
        for r in results:
            crashes = r["crashes"]
            assert isinstance(crashes, list)
            print(
                f"{r['target']:8} {r['runs']:>10} {r['rate']:>9} {r['coverage'] or '-':>6} "
                f"{r['corpus']:>6}  {len(crashes)}"
                + (f" (exit {r['exit']}; see {a.workdir / str(r['target']) / 'last.log'})"
                   if r in bad else "")
            )
        print(f"total inputs: {sum(int(str(r['runs'])) for r in results)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
