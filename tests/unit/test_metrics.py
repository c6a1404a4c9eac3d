"""Metrics follow the Prometheus conventions: every counter the engine and daemon keep has a
proper metric, names and types pass ``promtool check metrics`` (or the same rules checked
here when promtool is missing), and labels split one quantity so their sum is that quantity."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.packets import IN, OUT, PRV1, PRV2, build_udp, make_engine
from vpnmasq import metrics
from vpnmasq.config import Limits
from vpnmasq.packet.ipv4 import ip_to_int

SRC = Path(__file__).resolve().parents[2] / "src" / "vpnmasq"
REMOTE = ip_to_int("203.0.113.9")
#: count("name"), _count("name"), count("prefix:" + x) in the sources
_LITERAL = re.compile(r"""\bcount\(\s*"([a-z_:.-]+)"(\s*\+)?""")


def counter_keys_in_source() -> set[tuple[str, bool]]:
    """(key or prefix, is a prefix) for every counter the code names literally."""
    found: set[tuple[str, bool]] = set()
    for path in SRC.rglob("*.py"):
        for m in _LITERAL.finditer(path.read_text()):
            found.add((m.group(1), bool(m.group(2))))
    return found


def exposition(counters: dict[str, int], entries: dict[tuple[str, str], int]) -> str:
    reg = metrics.registry_for(lambda: counters, lambda: entries, max_entries=1000, mode="hybrid")
    return generate_latest(reg).decode()


def traffic_counters() -> dict[str, int]:
    """Counters of a real engine after some traffic, a drop and a full table."""
    eng = make_engine(limits=Limits(max_entries=3))
    for port in range(5000, 5005):
        eng.handle(build_udp(PRV1, REMOTE, port, 53), OUT, 1.0)
    eng.handle(build_udp(REMOTE, ip_to_int("198.51.100.1"), 53, 9), IN, 1.0)
    eng.handle_timer(500.0)
    eng.handle(build_udp(PRV2, REMOTE, 1, 53), OUT, 500.0)
    eng.handle_timer(1000.0)
    return dict(eng.counters)


def test_every_counter_in_the_code_has_a_proper_metric() -> None:
    keys = counter_keys_in_source()
    assert len(keys) > 30  # the pattern still finds them
    unnamed = []
    for key, is_prefix in sorted(keys):
        probe = key + "x" if is_prefix else key
        if probe not in metrics.NOT_COUNTERS and metrics.family_of(probe) is None:
            unnamed.append(key)
    assert unnamed == []


def test_labels_split_one_quantity() -> None:
    c = traffic_counters()
    text = exposition(c, {})
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    drops = sum(s.value for s in fams["vpnmasq_dropped_packets"].samples)
    assert drops == c["dropped"] > 0
    pk = {s.labels["direction"]: s.value for s in fams["vpnmasq_packets"].samples
          if s.name.endswith("_total")}
    assert pk == {"out": c["packets_out"], "in": c["packets_in"]}
    removed = sum(s.value for s in fams["vpnmasq_entries_removed"].samples
                  if s.name.endswith("_total"))
    created = sum(s.value for s in fams["vpnmasq_entries_created"].samples
                  if s.name.endswith("_total"))
    assert created == removed == 4  # 3 fit, 1 after expiry; all expired at t=1000


def test_gauges_build_info_and_default_collectors() -> None:
    text = exposition({"kernel_queue_waiting": 3}, {("udp", "napt"): 5, ("esp", "esp"): 2})
    assert 'vpnmasq_table_entries{kind="napt",protocol="udp"} 5.0' in text
    assert "vpnmasq_table_max_entries 1000.0" in text
    assert "vpnmasq_kernel_queue_waiting_packets 3.0" in text
    assert re.search(r'^vpnmasq_build_info\{mode="hybrid",python_version="[\d.]+",version="', text, re.M)
    for name in ("process_resident_memory_bytes", "python_info", "python_gc_objects_collected_total"):
        assert name in text
    # declared counters exist before they first move (alerts can query them)
    for name in ("vpnmasq_rules_restored_total", "vpnmasq_esp_associations_refused_total",
                 "vpnmasq_kernel_queue_dropped_packets_total", "vpnmasq_pptp_calls_total"):
        assert re.search(rf"^{name} 0\.0$", text, re.M), name


def _all_counters() -> dict[str, int]:
    c = {key: 1 for key in metrics.COUNTERS}
    c.update({p + "sample": 2 for p in metrics.PREFIXES})
    c.update({"expired:napt": 1, "removed:esp": 1, "dropped": 2, "entries": 1})
    c.update(traffic_counters())
    return c


def test_names_and_types_follow_the_conventions() -> None:
    text = exposition(_all_counters(), {("udp", "napt"): 1})
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", fam.name), fam.name
        assert fam.name not in names, f"{fam.name} twice"
        names.add(fam.name)
        assert fam.documentation, fam.name
        if fam.type == "counter":
            assert all(s.name in (fam.name + "_total", fam.name + "_created") for s in fam.samples)
        else:
            assert not fam.name.endswith("_total"), fam.name
        if fam.name.startswith("vpnmasq_"):
            assert not re.search(r"_(ms|us|milliseconds|kilobytes|percent)\b", fam.name), fam.name
            assert fam.type != "unknown", fam.name
    assert not any(n.startswith("vpnmasq_") and "fallback" in n for n in names)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) missing")
def test_promtool_check_metrics_finds_nothing() -> None:
    text = exposition(_all_counters(), {("udp", "napt"): 1, ("esp", "esp"): 1})
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
