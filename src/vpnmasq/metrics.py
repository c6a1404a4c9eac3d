"""Prometheus metrics (prometheus-client): a collector that reads the daemon's counters at
scrape time, so the packet path pays nothing for metrics.

The daemon and the engine keep flat counters (``"drop:table-full"``, ``"pptp_calls"``, ...);
:data:`COUNTERS` and :data:`PREFIXES` give each one its metric, following the Prometheus
conventions: one metric per quantity (a label only splits one quantity, so summing over it
makes sense), base units (seconds, bytes, packets), ``_total`` on counters. A counter no
table names is still exported, as ``vpnmasq_<name>_total`` (and the metrics test fails until
it gets a proper name). Gauges: table entries by protocol and kind, the configured maximum,
the kernel queue's backlog, the port pool's size, ``vpnmasq_build_info``; the process and
platform collectors come with the registry. ``packaging/grafana`` and ``packaging/prometheus`` query these names.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from vpnmasq import __version__


@dataclass(frozen=True, slots=True)
class Family:
    """One metric: its name without ``_total``, help text and label names."""

    name: str
    help: str
    labels: tuple[str, ...] = ()
    scale: float = 1.0  # the counter's unit -> the metric's base unit


PACKETS = Family("vpnmasq_packets", "Packets the engine handled, by direction", ("direction",))
OFFLOADED = Family(
    "vpnmasq_offloaded_packets",
    "Packets the kernel forwarded through the offload maps (read back every sync), by direction",
    ("direction",),
)
OFFLOADED_BYTES = Family(
    "vpnmasq_offloaded_bytes",
    "Bytes the kernel forwarded through the offload maps (read back every sync), by direction",
    ("direction",),
)
DROPPED = Family("vpnmasq_dropped_packets", "Packets vpnmasq dropped, by reason", ("reason",))
CREATED = Family("vpnmasq_entries_created", "Table entries created, by kind", ("kind",))
REMOVED = Family(
    "vpnmasq_entries_removed",
    "Table entries removed, by kind and reason (idle: expired; other: flush, FIN/RST, "
    "replaced, address change)",
    ("kind", "reason"),
)
RESTORED = Family("vpnmasq_entries_restored", "Table entries restored from a saved table", ("kind",))
ESP_ASSOC = Family(
    "vpnmasq_esp_associations",
    "ESP SPI pairs associated, by how (ike-signal, serialized, guess, forward)",
    ("how",),
)
NATT = Family("vpnmasq_natt_packets", "NAT-T (UDP 4500) packets, by what they carry", ("carries",))
LOCAL_VPN = Family(
    "vpnmasq_local_vpn_packets",
    "Inbound VPN packets left to the gateway's own endpoint, by protocol",
    ("protocol",),
)
ISAKMP_PROBLEMS = Family(
    "vpnmasq_isakmp_problem_packets", "ISAKMP packets vpnmasq could not place, by problem",
    ("problem",),
)
ISAKMP_REMOTE = Family(
    "vpnmasq_isakmp_remote_sessions",
    "IKE sessions the remote started, by how the LAN host was found",
    ("via",),
)
PPTP_REFUSED = Family(
    "vpnmasq_pptp_calls_refused", "PPTP calls not set up, by reason", ("reason",)
)
PPTP_PROBLEMS = Family(
    "vpnmasq_pptp_message_problems", "PPTP control messages with a problem, by problem",
    ("problem",),
)
TCP_OOW = Family(
    "vpnmasq_tcp_out_of_window_packets",
    "Inbound TCP FIN/RST outside the window, passed without ending the entry",
    ("flag",),
)
ICMP_LOCAL = Family(
    "vpnmasq_icmp_local_errors", "The gateway's own ICMP errors translated, by direction",
    ("direction",),
)
GUESSES = Family(
    "vpnmasq_esp_guesses_resolved", "Tentative ESP guesses later confirmed or withdrawn",
    ("outcome",),
)
NFQ_VERDICTS = Family("vpnmasq_nfqueue_verdicts", "Verdicts given on the queue", ("verdict",))
NFQ_MSGS = Family(
    "vpnmasq_nfqueue_verdict_messages", "Verdict messages sent, by type", ("type",)
)

SYNC_MSGS = Family(
    "vpnmasq_sync_messages",
    "Table replication messages ([sync]), by event (sent, received, applied, dropped...)",
    ("event",),
)
SYNC_REFUSED = Family(
    "vpnmasq_sync_refused_messages",
    "Replication messages refused or not applied, by reason (bad-auth, replayed...)",
    ("reason",),
)


def _f(name: str, help_: str, *, scale: float = 1.0) -> Family:
    return Family(name, help_, (), scale)


#: counter key -> (family, label values)
COUNTERS: dict[str, tuple[Family, tuple[str, ...]]] = {
    "packets_out": (PACKETS, ("out",)),
    "packets_in": (PACKETS, ("in",)),
    "offload_packets_out": (OFFLOADED, ("out",)),
    "offload_packets_in": (OFFLOADED, ("in",)),
    "offload_bytes_out": (OFFLOADED_BYTES, ("out",)),
    "offload_bytes_in": (OFFLOADED_BYTES, ("in",)),
    "rate_limited": (
        _f("vpnmasq_new_mappings_rate_limited", "New mappings refused by the per-host rate"),
        (),
    ),
    "routed": (_f("vpnmasq_routed_packets", "Packets routed without masquerade ([[route]])"), ()),
    "hairpin": (_f("vpnmasq_hairpinned_packets", "Packets hairpinned LAN to LAN"), ()),
    "mss_clamped": (_f("vpnmasq_mss_clamped_packets", "TCP SYNs whose MSS was clamped"), ()),
    "tcp_rst_out_of_window": (TCP_OOW, ("rst",)),
    "tcp_fin_out_of_window": (TCP_OOW, ("fin",)),
    "icmp_local_error_in": (ICMP_LOCAL, ("in",)),
    "icmp_local_error_out": (ICMP_LOCAL, ("out",)),
    "fragments_held": (_f("vpnmasq_fragments_held", "Fragments held for their first"), ()),
    "fragment_states_evicted": (
        _f("vpnmasq_fragment_states_evicted", "Fragment reassembly states evicted when full"),
        (),
    ),
    "esp:unassociated": (
        _f(
            "vpnmasq_esp_associations_refused",
            "Inbound ESP SPIs no LAN host could be associated with (dropped)",
        ),
        (),
    ),
    "esp:guess_confirmed": (GUESSES, ("confirmed",)),
    "esp:guess_withdrawn": (GUESSES, ("withdrawn",)),
    "esp:ike_signal": (
        _f("vpnmasq_esp_ike_signals", "IKE child-SA exchanges seen (ESP association signals)"),
        (),
    ),
    "esp:signal_ignored_queue_full": (
        _f("vpnmasq_esp_ike_signals_ignored", "IKE signals ignored: too many hosts waiting"),
        (),
    ),
    "esp:turn_passed": (
        _f("vpnmasq_esp_turns_passed", "Serialized ESP turns passed on after a timeout"),
        (),
    ),
    "gre_icmp_ambiguous": (
        _f("vpnmasq_gre_icmp_ambiguous", "ICMP errors about GRE that matched several calls"),
        (),
    ),
    "pptp_calls": (_f("vpnmasq_pptp_calls", "PPTP calls set up"), ()),
    "pptp_call_refused": (PPTP_REFUSED, ("server",)),
    "pptp_call_limit": (PPTP_REFUSED, ("call-limit",)),
    "pptp_call_ids_exhausted": (PPTP_REFUSED, ("call-ids-exhausted",)),
    "pptp_call_without_gre": (
        _f("vpnmasq_pptp_calls_without_gre", "PPTP calls set up whose GRE entry failed"),
        (),
    ),
    "pptp_messages": (_f("vpnmasq_pptp_messages", "PPTP control messages parsed"), ()),
    "pptp_unexpected_message": (PPTP_PROBLEMS, ("unexpected",)),
    "pptp_unknown_call_id": (PPTP_PROBLEMS, ("unknown-call-id",)),
    "pptp_desync": (PPTP_PROBLEMS, ("desync",)),
    "pptp_bad_message": (PPTP_PROBLEMS, ("bad-message",)),
    "pptp_straddle_unfixed": (PPTP_PROBLEMS, ("straddle-unfixed",)),
    "pptp_bytes_rewritten": (
        _f("vpnmasq_pptp_rewritten_bytes", "Bytes of PPTP control messages rewritten"),
        (),
    ),
    "pptp_midstream_pickup": (
        _f("vpnmasq_pptp_midstream_pickups", "PPTP control connections picked up mid-stream"),
        (),
    ),
    "pptp_restore_call_id_taken": (
        _f("vpnmasq_pptp_restore_call_id_conflicts", "Restored PPTP calls whose Call ID was taken"),
        (),
    ),
    "isakmp:malformed": (ISAKMP_PROBLEMS, ("malformed",)),
    "isakmp:zero_cookie": (ISAKMP_PROBLEMS, ("zero-cookie",)),
    "isakmp:collision": (ISAKMP_PROBLEMS, ("cookie-collision",)),
    "isakmp:unknown": (ISAKMP_PROBLEMS, ("unknown-session",)),
    "isakmp:ambiguous": (ISAKMP_PROBLEMS, ("ambiguous",)),
    "queue_batches": (_f("vpnmasq_queue_batches", "Batches read from the queue"), ()),
    "queue_latency_us_total": (
        _f(
            "vpnmasq_queue_busy_seconds",
            "Time spent handling queued batches (divide by batches for the mean)",
            scale=1e-6,
        ),
        (),
    ),
    "nfq_received": (_f("vpnmasq_nfqueue_received_packets", "Packets received from the queue"), ()),
    "nfq_accepted": (NFQ_VERDICTS, ("accept",)),
    "nfq_dropped": (NFQ_VERDICTS, ("drop",)),
    "nfq_truncated": (
        _f("vpnmasq_nfqueue_truncated_packets", "Packets longer than the copy range"),
        (),
    ),
    "nfq_send_errors": (_f("vpnmasq_nfqueue_send_errors", "Failed verdict sends"), ()),
    "nfq_recv_errors": (_f("vpnmasq_nfqueue_receive_errors", "Bad or failed queue receives"), ()),
    "nfq_enobufs": (
        _f("vpnmasq_nfqueue_receive_overruns", "Receive overruns reported by the kernel"),
        (),
    ),
    "nfq_verdict_msgs": (NFQ_MSGS, ("single",)),
    "nfq_batch_msgs": (NFQ_MSGS, ("batch",)),
    "nfq_sends": (_f("vpnmasq_nfqueue_sends", "send() calls on the queue socket"), ()),
    "kernel_queue_dropped": (
        _f(
            "vpnmasq_kernel_queue_dropped_packets",
            "Packets the kernel dropped because the queue was full (fail closed)",
        ),
        (),
    ),
    "kernel_queue_user_dropped": (
        _f(
            "vpnmasq_kernel_queue_user_dropped_packets",
            "Packets the kernel dropped because vpnmasq's socket buffer overran",
        ),
        (),
    ),
    **{
        f"sync_{k}": (SYNC_MSGS, (k.replace("_", "-"),))
        for k in (
            "sent", "received", "full_applied", "delta_applied", "send_dropped",
            "send_blocked", "send_failed", "too_large", "takeover_failed",
        )
    },
    **{
        f"sync_{k}": (SYNC_REFUSED, (k.replace("_", "-"),))
        for k in (
            "bad_auth", "replayed", "too_old", "stale_epoch", "own_node", "malformed",
            "version", "late", "gap",
        )
    },
    "rules_restored": (
        _f("vpnmasq_rules_restored", "Times the rules were put back after a firewall change"),
        (),
    ),
    "rules_restore_failed": (
        _f("vpnmasq_rules_restore_failures", "Failed attempts to put the rules back"),
        (),
    ),
}
HOST_LIMITED = Family(
    "vpnmasq_host_limit_dropped_packets",
    "Packets dropped because an inside host hit a per-host limit (ports, entries, rate), "
    "by host and limit",
    ("host", "limit"),
)
#: ``host_limit:<host>:<limit>``: drops per inside host and limit (HOST_LIMITED)
HOST_LIMIT_PREFIX = "host_limit:"
#: counter key prefix -> family; the rest of the key is the label value (REMOVED: two)
PREFIXES: dict[str, Family] = {
    "drop:": DROPPED,
    "created:": CREATED,
    "restored:": RESTORED,
    "esp:associated:": ESP_ASSOC,
    "natt:": NATT,
    "local_vpn:": LOCAL_VPN,
    "isakmp:": ISAKMP_REMOTE,  # after the problems in COUNTERS: the rest are "via"s
}
#: kept by the daemon but exported otherwise: ``dropped`` is the sum of the drop reasons,
#: ``entries`` the table gauge, ``kernel_queue_waiting`` a gauge of its own
NOT_COUNTERS = frozenset({"dropped", "entries", "kernel_queue_waiting", "port_pool_size"})
#: ``entries:<kind>``: live entries by kind for status and top (the table gauge has them)
GAUGE_PREFIX = "entries:"

ENTRIES = "vpnmasq_table_entries"
MAX_ENTRIES = "vpnmasq_table_max_entries"
WAITING = "vpnmasq_kernel_queue_waiting_packets"
POOL = "vpnmasq_port_pool_ports"
BUILD_INFO = "vpnmasq_build_info"


def family_of(key: str) -> tuple[Family, tuple[str, ...]] | None:
    """The metric and label values of one counter key (None: not a counter)."""
    if key in NOT_COUNTERS or key.startswith(GAUGE_PREFIX):
        return None
    hit = COUNTERS.get(key)
    if hit is not None:
        return hit
    if key.startswith(HOST_LIMIT_PREFIX):
        host, _, limit = key[len(HOST_LIMIT_PREFIX) :].rpartition(":")
        return HOST_LIMITED, (host, limit)
    for kind in ("expired:", "removed:"):
        if key.startswith(kind):
            return REMOVED, (key[len(kind) :], "idle" if kind == "expired:" else "other")
    for prefix, fam in PREFIXES.items():
        if key.startswith(prefix):
            return fam, (key[len(prefix) :],)
    return None


def fallback_name(key: str) -> str:
    """``vpnmasq_<key>`` for a counter no table names (the metrics test flags it)."""
    return "vpnmasq_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class VpnmasqCollector(Collector):
    """Reads ``counters()`` (flat daemon counters), ``entries()`` (live entries by
    (protocol, kind)) and the fixed facts at each scrape."""

    def __init__(
        self,
        counters: Callable[[], Mapping[str, int]],
        entries: Callable[[], Mapping[tuple[str, str], int]],
        *,
        max_entries: int,
        mode: str = "",
    ) -> None:
        self.counters = counters
        self.entries = entries
        self.max_entries = max_entries
        self.mode = mode

    def collect(self) -> Iterator[Metric]:
        c = self.counters()
        families: dict[str, CounterMetricFamily] = {}

        def family(f: Family) -> CounterMetricFamily:
            m = families.get(f.name)
            if m is None:
                m = families[f.name] = CounterMetricFamily(f.name, f.help, labels=list(f.labels))
            return m

        for key, (fam, values) in COUNTERS.items():  # every declared one, 0 until it moves
            family(fam).add_metric(list(values), c.get(key, 0) * fam.scale)
        for key, value in sorted(c.items()):
            if key in COUNTERS:
                continue
            hit = family_of(key)
            if hit is not None:
                fam, values = hit
                family(fam).add_metric(list(values), value * fam.scale)
            elif key not in NOT_COUNTERS and not key.startswith(GAUGE_PREFIX):
                family(Family(fallback_name(key), f"engine counter {key}")).add_metric([], value)
        for fam in (DROPPED, CREATED, REMOVED, ESP_ASSOC, HOST_LIMITED):  # even before the first
            family(fam)
        yield from families.values()

        en = GaugeMetricFamily(ENTRIES, "Live table entries, by protocol and kind",
                               labels=["protocol", "kind"])
        for (proto, kind), n in sorted(self.entries().items()):
            en.add_metric([proto, kind], n)
        yield en
        yield GaugeMetricFamily(
            MAX_ENTRIES, "Configured table size (limits.max_entries)", value=self.max_entries
        )
        yield GaugeMetricFamily(
            WAITING, "Packets waiting in the kernel queue for a verdict",
            value=c.get("kernel_queue_waiting", 0),
        )
        yield GaugeMetricFamily(
            POOL, "Outside ports vpnmasq hands out for source ports >= 1024 (the port pool)",
            value=c.get("port_pool_size", 0),
        )
        info = GaugeMetricFamily(
            BUILD_INFO, "vpnmasq version, Python version and mode (value 1)",
            labels=["version", "python_version", "mode"],
        )
        info.add_metric([__version__, platform.python_version(), self.mode], 1)
        yield info


def registry_for(
    counters: Callable[[], Mapping[str, int]],
    entries: Callable[[], Mapping[tuple[str, str], int]],
    *,
    max_entries: int,
    mode: str = "",
) -> CollectorRegistry:
    """A registry with vpnmasq's collector plus the process, platform and GC collectors."""
    reg = CollectorRegistry()
    reg.register(VpnmasqCollector(counters, entries, max_entries=max_entries, mode=mode))
    for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        reg.register(default)
    return reg


def serve(host: str, port: int, registry: CollectorRegistry) -> Any:
    """Start the HTTP exporter in a background thread; returns the server object."""
    return start_http_server(port, addr=host, registry=registry)
