"""Fixtures for namespace integration tests (see netns.py for the topology).

Tests marked ``@pytest.mark.netns`` are skipped, with the reason, when namespaces cannot be
created (not root, no iproute2). Stale namespaces from crashed earlier runs are swept once per
session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from netns import (
    GatewayTopology,
    Handler,
    Lab,
    QueueWorker,
    cleanup_stale,
    gateway_topology,
    netns_unavailable_reason,
)

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
def topo(lab: Lab) -> GatewayTopology:
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
