"""packaging/grafana/vpnmasq.json and packaging/prometheus/vpnmasq-alerts.yml query only
metrics vpnmasq exports; the alert rules pass ``promtool check rules`` and fire on the
series they are meant for (``promtool test rules``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vpnmasq import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "packaging" / "grafana" / "vpnmasq.json"
ALERTS = ROOT / "packaging" / "prometheus" / "vpnmasq-alerts.yml"
#: series Prometheus records itself for every target
PROMETHEUS_OWN = {"up"}
_NAME = re.compile(r"\b((?:vpnmasq|process|python)_[a-z0-9_]+|up)\b")
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian: prometheus) missing"
)


def exported_names() -> set[str]:
    """Every series name a scrape of vpnmasq can hold (every declared counter present)."""
    c = {key: 1 for key in metrics.COUNTERS}
    c.update({p + "x": 1 for p in metrics.PREFIXES})
    c.update({"expired:napt": 1, "removed:esp": 1, "kernel_queue_waiting": 1})
    reg = metrics.registry_for(lambda: c, lambda: {("udp", "napt"): 1}, max_entries=10)
    names: set[str] = set()
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(q["query"])
    return exprs


def alert_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_dashboard_queries_only_exported_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in doc["panels"]}
    for wanted in ("Sessions by kind", "Drops by reason", "Kernel queue health",
                   "ESP association outcomes", "Table fill"):
        assert wanted in titles
    have = exported_names() | PROMETHEUS_OWN
    used = {n for e in dashboard_exprs() for n in _NAME.findall(e)}
    assert used and used <= have, sorted(used - have)


def test_alerts_query_only_exported_metrics() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "VpnmasqDown", "VpnmasqTableNearFull", "VpnmasqKernelQueueDrops",
        "VpnmasqRulesRestored", "VpnmasqEspAssociationsRefused",
    }
    have = exported_names() | PROMETHEUS_OWN
    used = {n for r in rules for n in _NAME.findall(str(r["expr"]))}
    assert used <= have, sorted(used - have)


@needs_promtool
def test_promtool_check_rules() -> None:
    r = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


SERIES = """
      - series: 'up{job="vpnmasq",instance="gw:9477"}'
        values: '1 1 0 0 0 0'
      - series: 'vpnmasq_table_entries{job="vpnmasq",instance="gw:9477",protocol="udp",kind="napt"}'
        values: '100+1000x12'
      - series: 'vpnmasq_table_max_entries{job="vpnmasq",instance="gw:9477"}'
        values: '10000x12'
      - series: 'vpnmasq_kernel_queue_dropped_packets_total{job="vpnmasq",instance="gw:9477"}'
        values: '0 0 0 50 100 150 200 250 300'
      - series: 'vpnmasq_kernel_queue_user_dropped_packets_total{job="vpnmasq",instance="gw:9477"}'
        values: '0x8'
      - series: 'vpnmasq_rules_restored_total{job="vpnmasq",instance="gw:9477"}'
        values: '0 0 1 1 1'
      - series: 'vpnmasq_esp_associations_refused_total{job="vpnmasq",instance="gw:9477"}'
        values: '0+10x30'
"""
#: alert -> (evaluation time when it must hold, when it must not, the result's labels)
FIRES = {
    "VpnmasqDown": ("3m", "1m", 'up{job="vpnmasq",instance="gw:9477"}'),
    "VpnmasqTableNearFull": ("10m", "5m", '{instance="gw:9477"}'),
    "VpnmasqKernelQueueDrops": ("6m", "2m", '{job="vpnmasq",instance="gw:9477"}'),
    "VpnmasqRulesRestored": ("3m", "1m", '{job="vpnmasq",instance="gw:9477"}'),
    "VpnmasqEspAssociationsRefused": ("20m", "2m", '{job="vpnmasq",instance="gw:9477"}'),
}


@needs_promtool
def test_alert_expressions_hold_on_their_series_and_not_before(tmp_path: Path) -> None:
    """Each alert's expression, taken from the rules file, evaluated by promtool on series
    that go bad: a result when they are bad, none before."""
    exprs = {str(r["alert"]): str(r["expr"]) for r in alert_rules()}
    tests = []
    for alert, (bad, good, labels) in FIRES.items():
        expr = json.dumps(exprs[alert])
        tests.append(f"      - expr: {expr}\n        eval_time: {bad}\n"
                     f"        exp_samples:\n          - labels: '{labels}'\n"
                     f"            value: {_value_at(alert)}")
        tests.append(f"      - expr: {expr}\n        eval_time: {good}\n        exp_samples: []")
    t = tmp_path / "alerts_test.yml"
    t.write_text(
        f"rule_files: [{json.dumps(str(ALERTS))}]\nevaluation_interval: 1m\ntests:\n"
        f"  - interval: 1m\n    input_series:{SERIES}    promql_expr_test:\n"
        + "\n".join(tests) + "\n"
    )
    r = subprocess.run(["promtool", "test", "rules", str(t)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _value_at(alert: str) -> str:
    """The expressions' values at the FIRES times, from SERIES (as promtool computes them)."""
    return {
        "VpnmasqDown": "0",
        "VpnmasqTableNearFull": "1.01",  # (100 + 1000 * 10) / 10,000
        "VpnmasqKernelQueueDrops": "200",  # 200 dropped between 1m and 6m
        "VpnmasqRulesRestored": "1",
        "VpnmasqEspAssociationsRefused": "100",  # 10 a minute
    }[alert]
