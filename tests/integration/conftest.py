"""Fixtures for namespace integration tests (see netns.py for the topology).

Tests marked ``@pytest.mark.netns`` are skipped, with the reason, when namespaces cannot be
created (not root, no iproute2). Stale namespaces from crashed earlier runs are swept once per
session.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Remote, Sniffer
from netns import (
    GatewayTopology,
    Handler,
    Lab,
    QueueWorker,
    cleanup_stale,
    gateway_topology,
    netns_unavailable_reason,
)

from vpnmasq_lab.topology import Topology
from vpnmasq_lab.topology import cleanup_stale as cleanup_stale_lab

_reason: str | None = None
_checked = False


def _unavailable() -> str | None:
    global _reason, _checked
    if not _checked:
        _checked = True
        _reason = netns_unavailable_reason()
        if _reason is None:
            cleanup_stale()
    return _reason


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        reason = _unavailable()
        if reason:
            pytest.skip(f"netns: {reason}")


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = _unavailable()
    if reason:
        pytest.skip(f"netns: {reason}")
    with Lab() as lab:
        yield lab


@pytest.fixture
def gw_topo(lab: Lab) -> GatewayTopology:
    return gateway_topology(lab)


@pytest.fixture
def queue_worker(lab: Lab) -> Iterator[Callable[..., QueueWorker]]:
    """Factory: ``queue_worker(role, queue_num, handler, **NfQueue kwargs)``; stopped at
    teardown (handler errors fail the test)."""
    workers: list[QueueWorker] = []

    def start(role: str, queue_num: int, handler: Handler, **kw: object) -> QueueWorker:
        w = QueueWorker(lab, role, queue_num, handler, **kw)
        workers.append(w)
        return w

    yield start
    errors = []
    for w in workers:
        try:
            w.stop()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n".join(errors))


# ------------------------------------------------------------------------------ the lab (vpnmasq run in namespaces, harness.py)
@pytest.fixture
def topo() -> Iterator[Topology]:
    reason = _unavailable()
    if reason:
        pytest.skip(f"netns: {reason}")
    cleanup_stale_lab()
    t = Topology(hosts=2, remotes=1, install_signal_handlers=False)
    t.up()
    try:
        gw = t.ns("gw")
        # a second inside network behind lan0 (LAN-to-LAN through the gateway): srv also
        # answers on 10.88.0.5, reached from h1/h2 via their default route, the gateway
        subprocess.run(
            ["ip", "-n", t.ns("srv"), "addr", "add", "10.88.0.5/24", "dev", "eth0"], check=True
        )
        subprocess.run(["ip", "-n", gw, "route", "add", "10.88.0.0/24", "dev", "lan0"], check=True)
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                gw,
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.lan0.send_redirects=0",
                "net.ipv4.conf.wan0.promote_secondaries=1",
            ],
            check=True,
        )
        yield t
    finally:
        t.down()


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vmqd-", dir="/tmp"))  # short: UNIX socket paths
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def remote(topo: Topology) -> Iterator[Remote]:
    r = Remote(topo)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def wan(topo: Topology) -> Iterator[Sniffer]:
    s = Sniffer(topo, "gw", "wan0")
    try:
        yield s
    finally:
        s.close()
