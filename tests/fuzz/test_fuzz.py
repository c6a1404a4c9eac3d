"""The fuzzers in the test suite: seeds and regression inputs replayed, a few hypothesis
examples per target, and every atheris target run briefly (``fuzz/run.py``).

Longer runs: ``make fuzz`` (``FUZZ_SECONDS`` per target) or ``python fuzz/run.py --seconds N``.
A crash file from ``fuzz/.work/<target>/crashes/`` becomes a regression test by copying it to
``tests/fuzz/regressions/<target>/`` (with a name that says what it found).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz.run import ALL_TARGETS
from fuzz.seeds import seeds
from fuzz.targets import TARGETS, encode, flags_of, records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
REGRESSIONS = Path(__file__).resolve().parent / "regressions"


def test_every_parser_has_a_target() -> None:
    assert set(TARGETS) == set(ALL_TARGETS)
    assert {"engine", "ipv4", "tcp", "udp", "icmp", "gre", "esp", "isakmp", "pptp"} <= set(TARGETS)


def test_record_framing_round_trips() -> None:
    recs = [(flags_of(out=True, step=2, timer=True, peer=3, host=1), b"abc"), (0, b""), (7, b"x" * 300)]
    data = encode(2, recs)
    assert data[0] == 2
    assert list(records(data[1:])) == recs


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_seeds_pass_every_oracle(target: str) -> None:
    s = seeds(target)
    assert len(s) >= 3, "each target needs real seeds"
    for data in s:
        TARGETS[target](data)


def _regression_files() -> list[tuple[str, Path]]:
    out = []
    for d in sorted(REGRESSIONS.glob("*")):
        if d.is_dir():
            out += [(d.name, f) for f in sorted(d.iterdir()) if f.is_file() and f.suffix != ".md"]
    return out


@pytest.mark.parametrize(("target", "path"), _regression_files(), ids=lambda x: getattr(x, "name", x))
def test_regression_inputs(target: str, path: Path) -> None:
    """Inputs that once crashed a target (or broke an oracle) pass now."""
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", ALL_TARGETS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_hypothesis_bytes_through_every_target(target: str, data: bytes) -> None:
    TARGETS[target](data)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_each_atheris_fuzzer_runs_briefly(tmp_path: Path) -> None:
    """Every target under coverage-guided fuzzing for a moment: no crash, inputs counted."""
    p = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "run.py"), "--seconds", "2", "--workdir",
         str(tmp_path), "--json"],
        capture_output=True, text=True, cwd=str(ROOT), timeout=240,
    )
    results = json.loads((tmp_path / "summary.json").read_text())
    assert p.returncode == 0, p.stdout + p.stderr
    assert {r["target"] for r in results} == set(ALL_TARGETS)
    for r in results:
        assert r["runs"] > 20, r
        assert not r["crashes"], r
