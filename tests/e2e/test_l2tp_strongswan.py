"""L2TP/IPsec with real strongSwan peers through ``vpnmasq run``.

The issue asks for "strongSwan in transport mode over NAT-T carrying a UDP 1701 echo". Here
strongSwan (5.9.8) does ESP only through kernel-libipsec (the kernel has no ESP), and
kernel-libipsec refuses transport mode: with ``mode = transport`` the responder logs "IPsec
SA: unsupported mode", "failed to create SAD entry", "unable to install inbound and outbound
IPsec SA (SAD) in kernel", and the initiator gets NO_PROPOSAL_CHOSEN (checked by
:func:`test_kernel_libipsec_refuses_transport_mode`, which keeps the finding honest if the
lab's strongSwan changes). The transport-mode data path is covered by scapy ESP
(``test_realworld.py::test_l2tp_ipsec_data_path_two_clients_through_nat_t``).

The closest real case, here: two LAN clients and one server, each a charon, negotiating
through vpnmasq over NAT-T with L2TP/IPsec's traffic selectors, restricted to the two hosts
and UDP 1701 (``local_ts = dynamic[udp/1701]``, host-to-host *tunnel* mode; see
:class:`vpnmasq_lab.strongswan.L2tpIpsecServer`), both tunnels up at once, each carrying an
L2TP-shaped hello echo on UDP 1701 (tests/e2e/l2tp_hello.py). IKEv1 (what desktop L2TP/IPsec
clients speak) and IKEv2, in both vpnmasq modes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from tests.waiting import DEADLINE

from vpnmasq_lab.topology import GW_WAN_IP, LabError, Topology

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

HELLO = str(Path(__file__).with_name("l2tp_hello.py"))
PY = sys.executable
CHARON = "/usr/lib/ipsec/charon"
CONNECT_TIMEOUT = 30.0  # generous: charons and the gateway share two loaded cores


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("mode", ["userspace", "hybrid"])
def test_l2tp_hello_through_strongswan_host_to_host_tunnels_two_clients(
    lab: Topology, mode: str, version: int, require: Any
) -> None:
    require(CHARON, "swanctl")
    from vpnmasq_lab.strongswan import L2tpIpsecClient, L2tpIpsecServer

    topo = lab
    gw = topo.gateway_vpnmasq(mode=mode)
    srv = L2tpIpsecServer(topo, "r1", version=version).start()
    hello = topo.start_json("r1", [PY, HELLO, "server", "--bind", srv.ip], name="l2tp-hello")
    clients = [L2tpIpsecClient(topo, h, srv).start() for h in ("h1", "h2")]
    for c in clients:
        c.connect(timeout=CONNECT_TIMEOUT)
    for c in clients:  # both tunnels up at once, each limited to the two hosts and UDP 1701
        sas = c.charon.list_sas()
        assert f"ESTABLISHED, IKEv{version}" in sas and "INSTALLED, TUNNEL-in-UDP" in sas, sas
        assert f"local  {c.ip}/32[udp/l2f]" in sas and f"remote {srv.ip}/32[udp/l2f]" in sas, sas
    for c in clients:
        res = topo.run_json(
            c.role,
            [PY, HELLO, "client", "--server", srv.ip, "--token", c.role, "--timeout", "10"],
            timeout=60,
        )
        assert res["ok"], res
        assert res["local"] == c.ip
    # the server saw each client's own LAN address and port 1701: r1 has no route to the
    # LAN, so the hellos came out of the tunnels (a leaked one would come from GW_WAN_IP)
    for c in clients:  # the reader thread may not have the server's line yet: wait for it
        hello.wait_for(lambda ev, c=c: ev.get("peer") == f"{c.ip}:1701", timeout=DEADLINE)
    peers = {p["peer"] for p in hello.where(event="peer")}
    assert peers == {f"{c.ip}:1701" for c in clients}, peers
    assert not hello.where(event="bad")
    # ... and the tunnels' outer packets went through vpnmasq's NAT: IKE on 500 kept its
    # port for both hosts (ISAKMP helper), NAT-T from two distinct public ports
    ike = gw.entries("isakmp")
    assert sorted(r["inside"] for r in ike) == ["10.77.0.11:500", "10.77.0.12:500"], ike
    assert {r["outside"] for r in ike} == {f"{GW_WAN_IP}:500"}
    if mode == "userspace":  # hybrid: the kernel masquerades UDP 4500
        natt = gw.entries("natt")
        assert len({r["outside"] for r in natt}) == 2, natt
        assert all("esp" in r["detail"]["natt"] for r in natt), natt


def test_kernel_libipsec_refuses_transport_mode(lab: Topology, require: Any) -> None:
    """The finding behind the case above, recorded as a test: IKE comes up, the transport
    mode CHILD_SA does not, with the error kernel-libipsec gives."""
    require(CHARON, "swanctl")
    from vpnmasq_lab.strongswan import (
        L2tpIpsecClient,
        L2tpIpsecServer,
        l2tp_ts,
        responder_conf,
    )

    topo = lab
    topo.gateway_vpnmasq(mode="userspace")
    srv = L2tpIpsecServer(topo, "r1")
    srv.charon.start()
    # the transport-mode server of a real L2TP/IPsec set-up: both selectors dynamic (with a
    # subnet as remote_ts, transport mode through NAT gets TS_UNACCEPTABLE instead)
    conf = responder_conf(local_ip=srv.ip, inner_net=l2tp_ts(), remote_ts=l2tp_ts())
    srv.charon.load(conf.replace("mode = tunnel", "mode = transport"))
    client = L2tpIpsecClient(topo, "h1", srv).start()
    transport = client.charon.swanctl_conf.read_text().replace("mode = tunnel", "mode = transport")
    client.charon.load(transport)
    with pytest.raises(LabError):
        client.connect(timeout=CONNECT_TIMEOUT)
    assert "received NO_PROPOSAL_CHOSEN notify, no CHILD_SA built" in client.charon.log()
    log = srv.charon.log()
    assert "IPsec SA: unsupported mode" in log
    assert "unable to install inbound and outbound IPsec SA (SAD) in kernel" in log
    assert "IKE_SA rw[1] established" in log  # IKE itself went through vpnmasq
