"""Fixtures for end-to-end tests with real VPN peers in network namespaces.

Every test gets a fresh :class:`vpnmasq.lab.topology.Topology` (2 LAN hosts, 1 remote by
default) that is torn down afterwards, also on failure or Ctrl-C. When a test fails, the
gateway's conntrack table and nft ruleset are printed to help explain why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vpnmasq.lab.topology import Topology, cleanup_stale


def require(*tools: str) -> None:
    """Skip the test (kselftest-style SKIP) when a program or module is not installed."""
    for tool in tools:
        if tool.startswith("py:"):
            if importlib.util.find_spec(tool[3:]) is None:
                pytest.skip(f"python module {tool[3:]!r} is not installed")
        elif os.path.isabs(tool):
            if not os.access(tool, os.X_OK):
                pytest.skip(f"{tool} is not installed")
        elif shutil.which(tool) is None:
            pytest.skip(f"{tool!r} is not installed")


@pytest.fixture(name="require")
def require_fixture() -> Any:
    """``require("pptpd", "py:scapy")`` inside a test: skip it if something is missing."""
    return require


@pytest.fixture(scope="session", autouse=True)
def _e2e_preflight() -> None:
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root: network namespaces, nftables, raw sockets, mounts")
    require("ip", "nft", "conntrack", "ss", "mount")
    cleanup_stale()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


def _make_topo(request: pytest.FixtureRequest, hosts: int, remotes: int) -> Iterator[Topology]:
    t0 = time.monotonic()
    topo = Topology(hosts=hosts, remotes=remotes)
    try:
        topo.up()
        topo.gateway_kernel_nat()
        request.node.user_properties.append(("topology_up_s", round(time.monotonic() - t0, 3)))
        yield topo
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print("\n--- gateway conntrack ---")
            print("\n".join(topo.conntrack()))
            print(topo.exec("gw", ["conntrack", "-S"], check=False).stdout)
            print("--- gateway nft ---")
            print(topo.counters())
    finally:
        topo.down()


@pytest.fixture
def topo(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """2 LAN hosts (h1, h2) + LAN server + gateway with kernel NAT + 1 remote (r1)."""
    yield from _make_topo(request, hosts=2, remotes=1)
