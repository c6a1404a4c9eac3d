"""Prometheus metrics (prometheus-client): a collector that reads the daemon's counters at
scrape time, so the packet path pays nothing for metrics.

Exported: ``vpnmasq_packets_total{direction}``, ``vpnmasq_drops_total{reason}``,
``vpnmasq_entries{kind}``, ``vpnmasq_entries_created_total{kind}``,
``vpnmasq_pending_esp_inits``, ``vpnmasq_queue_batches_total``,
``vpnmasq_queue_latency_seconds_total``, ``vpnmasq_nfqueue_total{counter}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class VpnmasqCollector(Collector):
    def __init__(
        self, counters: Callable[[], dict[str, int]], by_kind: Callable[[], dict[str, int]]
    ) -> None:
        self.counters = counters
        self.by_kind = by_kind

    def collect(self) -> Iterator[Any]:
        c = self.counters()
        pk = CounterMetricFamily("vpnmasq_packets", "Packets seen by the engine", labels=["direction"])
        pk.add_metric(["out"], c.get("packets_out", 0))
        pk.add_metric(["in"], c.get("packets_in", 0))
        yield pk
        dr = CounterMetricFamily("vpnmasq_drops", "Packets dropped, by reason", labels=["reason"])
        cr = CounterMetricFamily(
            "vpnmasq_entries_created", "Table entries created, by kind", labels=["kind"]
        )
        nq = CounterMetricFamily("vpnmasq_nfqueue", "NFQUEUE client counters", labels=["counter"])
        for k, v in sorted(c.items()):
            if k.startswith("drop:"):
                dr.add_metric([k[5:]], v)
            elif k.startswith("created:"):
                cr.add_metric([k[8:]], v)
            elif k.startswith("nfq_"):
                nq.add_metric([k[4:]], v)
            elif k.startswith("kernel_queue_") and k != "kernel_queue_waiting":
                nq.add_metric(["kernel_" + k[len("kernel_queue_"):]], v)
        yield dr
        yield cr
        yield nq
        en = GaugeMetricFamily("vpnmasq_entries", "Live table entries, by kind", labels=["kind"])
        kinds = self.by_kind()
        for k, v in sorted(kinds.items()):
            en.add_metric([k], v)
        yield en
        yield GaugeMetricFamily(
            "vpnmasq_pending_esp_inits",
            "ESP associations waiting for their inbound SPI",
            value=c.get("esp_pending", 0),
        )
        yield CounterMetricFamily(
            "vpnmasq_queue_batches", "Batches read from the queue", value=c.get("queue_batches", 0)
        )
        yield CounterMetricFamily(
            "vpnmasq_queue_latency_seconds",
            "Time spent handling queued batches (sum; divide by batches for the mean)",
            value=c.get("queue_latency_us_total", 0) / 1e6,
        )


def registry_for(
    counters: Callable[[], dict[str, int]], by_kind: Callable[[], dict[str, int]]
) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(VpnmasqCollector(counters, by_kind))
    return reg


def serve(
    host: str,
    port: int,
    counters: Callable[[], dict[str, int]],
    by_kind: Callable[[], dict[str, int]],
) -> Any:
    """Start the HTTP exporter in a background thread; returns the server object."""
    return start_http_server(port, addr=host, registry=registry_for(counters, by_kind))
