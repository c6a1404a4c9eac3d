"""RFC 5780 NAT behaviour discovery through `vpnmasq run` in userspace mode (coturn's
turnutils_natdiscovery on a LAN host, coturn's STUN server on a remote with two addresses):
vpnmasq reports endpoint-independent mapping and the filtering it is configured with, with the
kernel offload on and off. With it on, the sessions natdiscovery opened end up in the kernel's
maps (status marks them) and the answers still come out the same."""

from __future__ import annotations

from typing import Any

import pytest

from vpnmasq_lab.stun import StunServer, nat_behaviour, nat_hairpinning
from vpnmasq_lab.topology import Topology

ALT_IP = "198.51.100.121"  # a second address of r1 (RFC 5780's CHANGE-REQUEST needs two)


@pytest.mark.parametrize("offload", [False, True], ids=["offload-off", "offload-on"])
@pytest.mark.parametrize("filtering", ["address-port-dependent", "address-dependent", "endpoint-independent"])
def test_userspace_mode_is_an_rfc_4787_nat_as_configured(
    vtopo: Topology, require: Any, filtering: str, offload: bool
) -> None:
    require("turnserver", "turnutils_natdiscovery")
    topo = vtopo
    srv = StunServer(topo, "r1", ALT_IP).start()
    gw = topo.gateway_vpnmasq("userspace", config_overrides={"offload": offload, "filtering": filtering})
    try:
        found = nat_behaviour(topo, "h1", srv.ip)
        assert (found.get("mapping"), found.get("filtering")) == ("endpoint-independent", filtering), found["output"]
        offloaded = [e for e in gw.status()["entries"] if e.get("offloaded")]
        if offload:  # the sessions that got answers both ways are the kernel's now
            assert offloaded, gw.status_text()
            assert gw.status()["offload"]["errors"] == 0
        else:
            assert offloaded == [] and "offload" not in gw.status()
    finally:
        gw.stop()
        srv.stop()


@pytest.mark.parametrize(
    ("mode", "filtering", "hairpins"),
    [
        ("userspace", "endpoint-independent", True),
        # the probe comes from another mapping, to which the first never sent: filtered, as
        # the same probe from outside would be (the configured filtering applies)
        ("userspace", "address-port-dependent", False),
        ("hybrid", "endpoint-independent", False),  # plain UDP is the kernel's: no hairpin
        ("kernel-nat", "", False),  # the kernel's own NAT, for comparison
    ],
)
def test_natdiscovery_reports_hairpinning_as_the_readme_says(
    vtopo: Topology, require: Any, mode: str, filtering: str, hairpins: bool
) -> None:
    require("turnserver", "turnutils_natdiscovery")
    topo = vtopo
    srv = StunServer(topo, "r1", ALT_IP).start()
    gw = None
    if mode == "kernel-nat":
        topo.gateway_kernel_nat()
    else:
        gw = topo.gateway_vpnmasq(mode, config_overrides={"filtering": filtering})
    try:
        found, output = nat_hairpinning(topo, "h1", srv.ip)
        print(f"{mode} {filtering}: natdiscovery -H says hairpinning={found}")
        assert found is hairpins, output
        if gw is not None and mode == "userspace":
            assert gw.counters().get("hairpin", 0) >= 1, gw.status_text()
    finally:
        if gw is not None:
            gw.stop()
        srv.stop()
