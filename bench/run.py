"""The benchmark command (`make bench`): vpnmasq against the kernel, in one run.

Runs the engine benchmarks (bench/engine.py) and the namespace benchmarks (bench/lab.py),
writes docs/BENCHMARKS.md, docs/bench.png and docs/bench-results.json, and prints the tables.

    .venv/bin/python bench/run.py            # ~10 minutes: 3 rounds, 1M mappings
    .venv/bin/python bench/run.py --quick    # ~2-3 minutes: 1 round, 200k mappings
    .venv/bin/python bench/run.py --skip-lab # the engine alone (no root needed)
    .venv/bin/python bench/run.py --slow-path --skip-engine --docs /tmp/x
        # ~1 minute: the NFQUEUE slow path alone (UDP rates, latency, py-spy profile)
    .venv/bin/python bench/run.py --status-cost
        # ~1 minute: what one status call costs the packet loop at 1k/20k/100k entries,
        # merged into the last bench-results.json and the report regenerated
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engine as engine_bench  # noqa: E402
import lab as lab_bench  # noqa: E402
import report  # noqa: E402
import slowpath  # noqa: E402

ROOT = HERE.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def status_cost_only(docs: Path, quick: bool) -> int:
    """Measure the status cost alone, merge it into the last results, rewrite the report."""
    path = docs / "bench-results.json"
    old = json.loads(path.read_text()) if path.exists() else {"when": time.strftime("%Y-%m-%d %H:%M %Z")}
    log("status cost at 1k, 20k, 100k entries ...")
    eng = old.setdefault("engine", {})
    eng.update(engine_bench.run_all(quick, log=log, only=("status",)))
    eng["status_when"] = time.strftime("%Y-%m-%d %H:%M %Z")
    path.write_text(json.dumps(old, indent=1, default=str) + "\n")
    cmd = "make bench" + (" (--quick)" if old.get("quick") else "")
    print(report.write(old, docs, command=cmd))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, shorter windows, 200k mappings")
    ap.add_argument("--rounds", type=int, default=None, help="lab rounds (default 3, quick 1)")
    ap.add_argument("--seconds", type=float, default=None, help="measurement window (default 1.5, quick 1)")
    ap.add_argument("--skip-lab", action="store_true", help="engine benchmarks only")
    ap.add_argument("--skip-engine", action="store_true", help="namespace benchmarks only")
    ap.add_argument(
        "--slow-path", action="store_true",
        help="lab: only the kernel and userspace-mode gateways (UDP rates, latency, profile)",
    )
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where to write the report")
    ap.add_argument(
        "--report-only", action="store_true",
        help="rewrite BENCHMARKS.md and bench.png from the last bench-results.json (no measuring)",
    )
    ap.add_argument(
        "--status-cost", action="store_true",
        help="measure only the status cost (engine), merge it into the last results, rewrite "
        "the report",
    )
    a = ap.parse_args(argv)
    if a.status_cost:
        return status_cost_only(Path(a.docs), a.quick)
    if a.report_only:
        docs = Path(a.docs)
        old = json.loads((docs / "bench-results.json").read_text())
        cmd = "make bench" + (" (--quick)" if old.get("quick") else "")
        print(report.write(old, docs, command=cmd))
        return 0
    rounds = a.rounds or (1 if a.quick else 3)
    seconds = a.seconds or (1.0 if a.quick else 1.5)
    docs = Path(a.docs)
    t0 = time.monotonic()
    results: dict[str, object] = {
        "when": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": lab_bench.machine_facts(),
        "quick": a.quick,
        "rounds": rounds,
        "seconds": seconds,
    }
    if not a.skip_engine:
        log("engine benchmarks ...")
        results["engine"] = engine_bench.run_all(a.quick, log=log)
    if not a.skip_lab:
        missing = lab_bench.tools_missing()
        if os.geteuid() != 0:
            results["lab_skipped"] = "needs root (network namespaces, netfilter)"
        elif missing:
            results["lab_skipped"] = f"missing tools: {', '.join(missing)} (run scripts/setup.sh)"
        else:
            log(f"lab benchmarks: {rounds} round(s), {seconds:g} s windows ...")
            run = slowpath.run_slow_path if a.slow_path else lab_bench.run_lab
            results["lab"] = run(
                rounds, seconds, quick=a.quick, log=log,
                profile_out=Path(tempfile.gettempdir()) / "vpnmasq-bench-profile.txt",
            )
        if "lab_skipped" in results:
            log(f"lab skipped: {results['lab_skipped']}")
    results["duration_s"] = time.monotonic() - t0
    try:
        results["load_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        pass
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "bench-results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    cmd = "make bench" + (" (--quick)" if a.quick else "")
    table = report.write(results, docs, command=cmd)
    print(table)
    log(f"\nwrote {docs / 'BENCHMARKS.md'} and {docs / 'bench.png'} in {results['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
