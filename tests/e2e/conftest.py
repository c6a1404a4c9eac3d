"""Fixtures for end-to-end tests with real VPN peers in network namespaces.

Every test gets a fresh :class:`vpnmasq_lab.topology.Topology` that is torn down afterwards,
also on failure or Ctrl-C:

* ``topo``: 2 LAN hosts, 1 remote, the kernel's own NAT in the gateway;
* ``vtopo``: 3 LAN hosts, 2 remotes, no NAT yet (tests start vpnmasq with their own config);
* ``vgw``: ``vtopo`` with ``vpnmasq run`` in the gateway, in each ``mode`` (hybrid, userspace).

When a test fails, the gateway's conntrack table and nft ruleset are printed, and for vpnmasq
its masquerade table and the tail of its log, to help explain why.

Captures: ``--keep-captures DIR`` (only when pytest is started on ``tests/e2e``, where this
file is an initial conftest) or ``VPNMASQ_KEEP_CAPTURES=DIR`` (always) keeps a pcap of the
gateway's ``wan0`` and ``lan0`` for every test, named after it, for Wireshark.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vpnmasq_lab.gateway import VpnmasqGateway
from vpnmasq_lab.topology import Topology, cleanup_stale

KEEP_CAPTURES_ENV = "VPNMASQ_KEEP_CAPTURES"
MODES = ("hybrid", "userspace")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--keep-captures",
        metavar="DIR",
        default=None,
        help=f"keep pcaps of the gateway's wan0/lan0 per e2e test in DIR (env: {KEEP_CAPTURES_ENV})",
    )


def keep_captures_dir(config: pytest.Config) -> str | None:
    opt: str | None = None
    try:
        opt = config.getoption("--keep-captures")
    except ValueError:  # option not registered (this conftest was not an initial one)
        opt = None
    return opt or os.environ.get(KEEP_CAPTURES_ENV) or None


def _label(nodeid: str) -> str:
    """A file-name-safe label for a test: ``test_x[hybrid]`` -> ``test_x-hybrid``."""
    name = nodeid.split("::", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


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


def _make_topo(
    request: pytest.FixtureRequest, hosts: int, remotes: int, *, kernel_nat: bool = True
) -> Iterator[Topology]:
    t0 = time.monotonic()
    topo = Topology(hosts=hosts, remotes=remotes)
    try:
        topo.up()
        if kernel_nat:
            topo.gateway_kernel_nat()
        keep = keep_captures_dir(request.config)
        if keep:
            topo.start_captures(keep, _label(request.node.nodeid))
        request.node.user_properties.append(("topology_up_s", round(time.monotonic() - t0, 3)))
        yield topo
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            _explain_failure(topo)
    finally:
        topo.down()


def _explain_failure(topo: Topology) -> None:
    print("\n--- gateway conntrack ---")
    print("\n".join(topo.conntrack()))
    print(topo.exec("gw", ["conntrack", "-S"], check=False).stdout)
    print("--- gateway nft ---")
    print(topo.counters())
    gw: VpnmasqGateway | None = topo.vpnmasq
    if gw is not None:
        if gw.running():
            print("--- vpnmasq status ---")
            print(gw.status_text())
        print("--- vpnmasq log (tail) ---")
        print(gw.log_tail(60))


@pytest.fixture
def topo(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """2 LAN hosts (h1, h2) + LAN server + gateway with kernel NAT + 1 remote (r1)."""
    yield from _make_topo(request, hosts=2, remotes=1)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """vpnmasq's mode: "hybrid" (kernel masquerades plain traffic) or "userspace" (all)."""
    return str(request.param)


@pytest.fixture
def vtopo(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """h1..h3 + LAN server srv + gateway (no NAT yet) + r1, r2. Start vpnmasq with
    ``vtopo.gateway_vpnmasq(mode, forwards=...)``."""
    yield from _make_topo(request, hosts=3, remotes=2, kernel_nat=False)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """No NAT yet (tests start vpnmasq themselves); 2 LAN hosts and 1 remote unless sized by
    ``@pytest.mark.parametrize("lab", [(hosts, remotes)], indirect=True)``."""
    hosts, remotes = getattr(request, "param", (2, 1))
    yield from _make_topo(request, hosts=hosts, remotes=remotes, kernel_nat=False)


@pytest.fixture
def vgw(vtopo: Topology, mode: str, request: pytest.FixtureRequest) -> VpnmasqGateway:
    """``vpnmasq run`` in the gateway of ``vtopo``, default config, in ``mode``."""
    gw: VpnmasqGateway = vtopo.gateway_vpnmasq(mode)
    request.node.user_properties.append(("vpnmasq_start_s", gw.started_s))
    return gw
