"""Running vpnmasq in the real world, each case with real peers through
``vpnmasq run`` in the lab gateway:

* network to network (HOWTO 2.8): a LAN VPN router with a GRE v0 tunnel to a remote site;
* a VPN endpoint on the gateway itself (strongSwan) and LAN IPsec clients at once;
* MSS clamping on a 1492-byte outside link (a PMTU black hole without it);
* IPv6 forwarding untouched by vpnmasq;
* L2TP/IPsec's data path (transport-mode ESP in UDP 4500 carrying UDP 1701), two clients;
* ``vpnmasq diagnose`` on a deliberately broken gateway, and ``vpnmasq trace``.

Routes for [[route]] are applied with :func:`vpnmasq.datapath.routes.apply_routes` here: the
daemon does not call it yet (see that module's docstring for the hook).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.waiting import ANSWER_TIMEOUT, wait_until

from vpnmasq_lab.topology import GW_WAN_IP, LabError, Topology

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

PEERS = str(Path(__file__).with_name("realworld_peers.py"))
PY = sys.executable


def vpnmasq(topo: Topology, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """The vpnmasq CLI run in the gateway namespace."""
    return topo.exec("gw", [PY, "-m", "vpnmasq.cli", *args], check=False, timeout=timeout)


# ------------------------------------------------------------------------------ network to network
@pytest.mark.parametrize("mode", ["userspace", "hybrid"])
def test_lan_reaches_a_remote_network_through_a_lan_gre_router(lab: Topology, mode: str) -> None:
    """h1 is a Linux VPN router on the LAN with a GRE v0 tunnel to r1, which serves
    10.88.0.0/24; h2 (any LAN host) reaches 10.88.0.1 with its own address (never
    masqueraded), while the router's GRE itself is masqueraded to the public address."""
    topo = lab
    gw = topo.gateway_vpnmasq(
        mode=mode,
        config_overrides={
            "route": [{"network": "10.88.0.0/24", "via": "10.77.0.11", "send_redirects": False}]
        },
    )
    # the daemon installed the route and turned redirects off towards the LAN router
    assert "10.88.0.0/24 via 10.77.0.11" in topo.exec("gw", ["ip", "route"]).stdout
    redirects = topo.exec("gw", ["sysctl", "-n", "net.ipv4.conf.all.send_redirects",
                                 "net.ipv4.conf.lan0.send_redirects"]).stdout.split()
    assert redirects == ["0", "0"]
    tunnels = [
        topo.start_json(role, [PY, PEERS, "gre-tunnel", "--dev", "gre1", "--remote", remote])
        for role, remote in (("h1", "198.51.100.20"), ("r1", GW_WAN_IP))
    ]
    for role, net in (("h1", "10.88.0.0/24"), ("r1", "10.77.0.0/24")):
        topo.exec(role, ["ip", "link", "set", "gre1", "up"])
        topo.exec(role, ["ip", "route", "add", net, "dev", "gre1"])
        topo.exec(role, ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0",
                         "net.ipv4.conf.gre1.rp_filter=0"])
    topo.exec("h1", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    topo.exec("r1", ["ip", "addr", "add", "10.88.0.1/32", "dev", "lo"])
    echo = topo.start_json("r1", topo.py("vpnmasq_lab.plain", "udp-echo-server", "--port", "7",
                                         "--bind", "10.88.0.1"))
    res = topo.run_json("h2", topo.py("vpnmasq_lab.plain", "udp-echo-client", "10.88.0.1", "7",
                                      "--count", "3", "--token", "h2"))
    assert res["ok"], res
    peers = [ev["peer"].split(":")[0] for ev in echo.where(event="peer")]
    assert peers == ["10.77.0.12"]  # the remote site sees the LAN address: routed, not NATed
    (row,) = gw.entries("gre")
    assert row["inside"] == "10.77.0.11" and row["outside"] == GW_WAN_IP
    assert row["detail"]["gre"] == "v0" and row["pkts_out"] >= 3 and row["pkts_in"] >= 3
    stats = [t.stop() for t in tunnels]
    assert all(s is not None and s["decap"] >= 3 for s in stats), stats
    gw.stop()  # a clean stop undoes the route and restores the sysctls it changed
    assert "10.88.0.0/24" not in topo.exec("gw", ["ip", "route"]).stdout
    assert topo.exec("gw", ["sysctl", "-n", "net.ipv4.conf.all.send_redirects"]).stdout.strip() == "1"


# ------------------------------------------------------------------------------ VPN on the gateway
@pytest.mark.parametrize("lab", [(1, 2)], indirect=True)
@pytest.mark.parametrize("mode", ["userspace", "hybrid"])
def test_strongswan_on_the_gateway_and_a_lan_ipsec_client_at_once(
    lab: Topology, mode: str, require: Any
) -> None:
    """The gateway's own charon (to r2) and h1's charon (to r1) share the public address,
    UDP 500 and 4500. With local_vpn the gateway's IKE and ESP-in-UDP replies, which no LAN
    host claims, are delivered to it; with local_vpn = "never" they are dropped."""
    require("/usr/lib/ipsec/charon", "swanctl")
    from vpnmasq_lab.strongswan import Charon, IpsecInitiator, IpsecResponder, initiator_conf

    topo = lab
    r1 = IpsecResponder(topo, "r1").start()
    r2 = IpsecResponder(topo, "r2", remote_ts="10.98.0.0/24").start()
    topo.exec("gw", ["ip", "addr", "add", "10.98.0.1/32", "dev", "lo"])
    own = Charon(topo, "gw", name="charon-gw").start()
    own.load(
        initiator_conf(local_ip=GW_WAN_IP, remote_ip=r2.ip, inner_net=r2.inner_net).replace(
            "local_ts = dynamic", "local_ts = 10.98.0.1/32"
        )
    )
    client = IpsecInitiator(topo, "h1", r1).start()

    # negative control: without local delivery the gateway's own IKE never completes
    gw = topo.gateway_vpnmasq(mode=mode, config_overrides={"local_vpn": "never"})
    with pytest.raises(LabError):
        own.initiate("net", "home", timeout=3.0)
    assert gw.counters().get("drop:isakmp-unknown-session", 0) >= 1
    own.swanctl("--terminate", "--ike", "home", "--force", check=False)

    gw = topo.gateway_vpnmasq(mode=mode, config_overrides={"local_vpn": "always"})
    client.connect()
    own.initiate("net", "home")
    res_lan = client.udp_echo(count=3)
    res_gw = topo.run_json("gw", topo.py("vpnmasq_lab.plain", "udp-echo-client", r2.inner_ip, "7",
                                         "--count", "3", "--token", "gw"))
    assert res_lan["ok"], res_lan
    assert res_gw["ok"], res_gw
    assert r1.peers_seen()[0].startswith("10.77.0.11:")
    assert r2.peers_seen()[0].startswith("10.98.0.1:")
    c = gw.counters()
    assert c.get("local_vpn:ike", 0) >= 1  # at least the IKE_SA_INIT response on port 500
    (ike,) = gw.entries("isakmp")
    assert ike["inside"] == "10.77.0.11:500"  # the LAN client's IKE is still its own


# ------------------------------------------------------------------------------ MTU
@pytest.mark.parametrize("lab", [(1, 1)], indirect=True)
def test_mss_clamp_fixes_a_pmtu_black_hole_on_a_1492_byte_outside_link(lab: Topology) -> None:
    """wan0 has MTU 1492 (PPPoE) and r1 does not know: its 1500-byte segments are silently
    dropped (no ICMP: a PMTU black hole). Clamping the MSS of SYNs to 1452 fixes it."""
    topo = lab
    topo.exec("gw", ["ip", "link", "set", "wan0", "mtu", "1492"])
    # one segment per packet at r1 (no GSO), so the oversize frames really hit wan0's MTU
    topo.exec("r1", ["ip", "link", "set", "eth0", "gso_max_segs", "1"])
    srv = topo.start_json("r1", [PY, PEERS, "tcp-mss-server", "--port", "9"])
    bulk = [PY, PEERS, "tcp-bulk-client", "198.51.100.20", "9", "--size", "100000"]

    gw = topo.gateway_vpnmasq(mode="userspace")
    stuck = topo.run_json("h1", [*bulk, "--timeout", "2"])
    assert not stuck["ok"] and stuck["received"] < 100000, stuck
    assert srv.where(event="syn")[-1]["mss"] == 1460
    warn = [ln for ln in vpnmasq(topo, "diagnose", "-c", str(gw.config_path), "-q").stdout
            .splitlines() if ln.startswith("[WARN] mtu:")]
    assert warn and "MTU 1492" in warn[0] and warn[0].endswith("-> fix: mss_clamp = 1452")

    gw = topo.gateway_vpnmasq(mode="userspace", config_overrides={"mss_clamp": 1452})
    res = topo.run_json("h1", [*bulk, "--timeout", "30"])  # ends when all is back
    assert res["ok"], res
    assert srv.where(event="syn")[-1]["mss"] == 1452
    assert gw.counters().get("mss_clamped", 0) >= 1
    out = vpnmasq(topo, "diagnose", "-c", str(gw.config_path)).stdout
    assert "[  ok] mtu: outside MTU 1492, TCP MSS clamped to 1452" in out


IKE_CERT_RESPONDER = """connections {
  rw {
    version = 2
    local_addrs = 198.51.100.20
    fragmentation = no
    proposals = aes128-sha256-x25519
    local {
      auth = pubkey
      certs = r1.pem
      id = r1.lab
    }
    remote {
      auth = pubkey
      cacerts = ca.pem
    }
    children {
      net {
        local_ts = 10.99.20.0/24
        remote_ts = 10.77.0.0/24
        esp_proposals = aes128-sha256
      }
    }
  }
}
"""
IKE_CERT_INITIATOR = """connections {
  home {
    version = 2
    remote_addrs = 198.51.100.20
    encap = yes
    fragmentation = no
    proposals = aes128-sha256-x25519
    local {
      auth = pubkey
      certs = h1.pem
      id = h1.lab
    }
    remote {
      auth = pubkey
      id = r1.lab
      cacerts = ca.pem
    }
    children {
      net {
        local_ts = dynamic
        remote_ts = 10.99.20.0/24
        esp_proposals = aes128-sha256
        start_action = none
      }
    }
  }
}
"""


def make_pki(d: Path, names: tuple[str, ...], comment_size: int = 2500) -> None:
    """A CA and one ECDSA certificate per name, each padded with an nsComment so that an
    IKE_AUTH carrying one is larger than any MTU here (as RSA chains are in real life)."""

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{d}/ca.key")
    run("openssl", "req", "-x509", "-new", "-key", f"{d}/ca.key", "-subj", "/CN=vpnmasq lab CA",
        "-days", "2", "-out", f"{d}/ca.pem")
    for n in names:
        run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{d}/{n}.key")
        run("openssl", "req", "-new", "-key", f"{d}/{n}.key", "-subj", f"/CN={n}.lab",
            "-out", f"{d}/{n}.csr")
        (d / f"{n}.ext").write_text(f"subjectAltName=DNS:{n}.lab\nnsComment={'x' * comment_size}\n")
        run("openssl", "x509", "-req", "-in", f"{d}/{n}.csr", "-CA", f"{d}/ca.pem", "-CAkey",
            f"{d}/ca.key", "-CAcreateserial", "-days", "2", "-extfile", f"{d}/{n}.ext",
            "-out", f"{d}/{n}.pem")


@pytest.mark.parametrize("lab", [(1, 1)], indirect=True)
@pytest.mark.parametrize("mode", ["userspace", "hybrid"])
def test_certificate_sized_ike_auth_ip_fragmented_on_a_1492_link(
    lab: Topology, mode: str, require: Any
) -> None:
    """strongSwan with certificates (IKEv2 fragmentation off) over a 1492-byte outside link:
    IKE_AUTH is IP-fragmented both ways on wan0 and the tunnel still comes up through
    vpnmasq (fragments follow their first fragment's mapping; with conntrack on, the kernel
    reassembles before the queue and fragments again on the way out)."""
    require("/usr/lib/ipsec/charon", "swanctl", "openssl", "tcpdump", "py:scapy")
    import shutil

    from scapy.layers.inet import IP
    from scapy.utils import rdpcap

    from vpnmasq_lab.strongswan import Charon

    topo = lab
    pki = topo.mkdir("pki")
    make_pki(pki, ("r1", "h1"))
    topo.exec("gw", ["ip", "link", "set", "wan0", "mtu", "1492"])
    topo.exec("r1", ["ip", "link", "set", "eth0", "mtu", "1492"])
    gw = topo.gateway_vpnmasq(mode=mode)
    topo.exec("r1", ["ip", "addr", "add", "10.99.20.1/32", "dev", "lo"])
    topo.start_json("r1", topo.py("vpnmasq_lab.plain", "udp-echo-server", "--port", "7",
                                  "--bind", "10.99.20.1"))
    peers = {}
    for role, conf in (("r1", IKE_CERT_RESPONDER), ("h1", IKE_CERT_INITIATOR)):
        ch = Charon(topo, role)
        for sub, f in (("x509", f"{role}.pem"), ("x509ca", "ca.pem"), ("ecdsa", f"{role}.key")):
            (ch.dir / sub).mkdir(exist_ok=True)
            shutil.copy(pki / f, ch.dir / sub / f)  # swanctl loads credentials from here
        ch.start()
        ch.load(conf)
        peers[role] = ch
    with topo.capture("gw", "wan0", pki / "wan0.pcap"):
        peers["h1"].initiate("net", "home")
        res = topo.run_json("h1", topo.py("vpnmasq_lab.plain", "udp-echo-client", "10.99.20.1",
                                          "7", "--count", "2"))
    assert res["ok"], res
    frags = [p[IP] for p in rdpcap(str(pki / "wan0.pcap")) if IP in p and (p[IP].flags.MF or p[IP].frag)]
    out = [p for p in frags if p.src == GW_WAN_IP]
    back = [p for p in frags if p.dst == GW_WAN_IP]
    assert len(out) >= 2 and len(back) >= 2, [p.summary() for p in frags]
    assert all(p.proto == 17 and len(p) <= 1492 for p in frags)
    if mode == "userspace":
        (ike,) = gw.entries("isakmp")
        assert ike["detail"]["version"] == "IKEv2" and ike["pkts_in"] >= 1


# ------------------------------------------------------------------------------ IPv6
@pytest.mark.parametrize("lab", [(1, 1)], indirect=True)
@pytest.mark.parametrize("mode", ["userspace", "hybrid"])
def test_ipv6_forwarding_is_unaffected(lab: Topology, mode: str) -> None:
    """vpnmasq's rules are IPv4 only: a dual-stack LAN host reaches the outside over IPv6
    natively (its own address, no translation) while vpnmasq runs."""
    topo = lab
    six = {
        "gw": [("lan0", "fd77::1/64"), ("wan0", "fd51::1/64")],
        "h1": [("eth0", "fd77::11/64")],
        "r1": [("eth0", "fd51::20/64")],
    }
    for role, addrs in six.items():
        for dev, cidr in addrs:
            # no duplicate address detection: link-local addresses usable at once
            topo.exec(role, ["sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0",
                             f"net.ipv6.conf.{dev}.disable_ipv6=0"])
            topo.exec(role, ["ip", "-6", "addr", "add", cidr, "dev", dev, "nodad"])
    topo.exec("gw", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    topo.exec("h1", ["ip", "-6", "route", "add", "default", "via", "fd77::1"])
    topo.exec("r1", ["ip", "-6", "route", "add", "fd77::/64", "via", "fd51::1"])
    gw = topo.gateway_vpnmasq(mode=mode)
    srv = topo.start_json("r1", [PY, PEERS, "udp6-echo-server", "--port", "7"])
    res = topo.run_json("h1", [PY, PEERS, "udp6-echo-client", "fd51::20", "7"])
    assert res["ok"], res
    assert [e["peer"] for e in srv.where(event="peer")] == ["fd77::11"]
    v4 = topo.run_json("h1", topo.py("vpnmasq_lab.plain", "ping", "198.51.100.20", "--count", "2"))
    assert v4.get("received", 0) >= 1, v4  # IPv4 still masqueraded alongside
    ip6 = topo.exec("gw", ["ip6tables-save"], check=False).stdout
    assert "VPNMASQ" not in ip6
    nft = topo.exec("gw", ["nft", "list", "tables"]).stdout
    assert "ip6 vpnmasq" not in nft and "inet vpnmasq" not in nft
    if mode == "userspace":  # the IPv4 ping went through vpnmasq (hybrid: kernel NAT)
        assert gw.counters().get("packets_out", 0) >= 1


# ------------------------------------------------------------------------------ L2TP/IPsec
@pytest.mark.parametrize("mode", ["userspace", "hybrid"])
def test_l2tp_ipsec_data_path_two_clients_through_nat_t(lab: Topology, mode: str) -> None:
    """L2TP/IPsec as desktop systems use it: transport-mode ESP in UDP 4500 carrying UDP
    1701, from two LAN hosts to one server. Both get through with distinct NAT-T ports; the
    inner UDP checksum (transport mode: computed over the private address) verifies only with
    the original address, which is why receivers use NAT-OA (RFC 3948 3.1.2)."""
    topo = lab
    gw = topo.gateway_vpnmasq(mode=mode)
    srv = topo.start_json("r1", [PY, PEERS, "l2tp-natt-server", "--bind", "198.51.100.20"])
    for i, host in enumerate(("h1", "h2")):
        res = topo.run_json(host, [PY, PEERS, "l2tp-natt-client", "--server", "198.51.100.20",
                                   "--spi", hex(0x3001 + i), "--token", host])
        assert res["ok"], res
        assert res["csum_as_received"] == [False]
    peers = srv.where(event="peer")
    assert len(peers) == 2
    assert {p["peer"].split(":")[0] for p in peers} == {GW_WAN_IP}
    assert len({p["peer"] for p in peers}) == 2  # two NAT-T ports
    assert all(p["ports"] == [1701, 1701] for p in peers)
    assert all(p["csum_with_nat_oa"] and not p["csum_as_received"] for p in peers)
    if mode == "userspace":
        rows = gw.entries("natt")
        assert len(rows) == 2 and all("esp" in r["detail"]["natt"] for r in rows)


# ------------------------------------------------------------------------------ diagnose/trace
@pytest.mark.parametrize("lab", [(1, 1)], indirect=True)
def test_diagnose_on_a_broken_gateway_then_follows_a_pptp_host(lab: Topology, require: Any) -> None:
    """Broken on purpose: a stateful FORWARD policy without vpnmasq's mark rule, and an
    outside address in carrier-grade NAT space. diagnose names both (exit 1). Then, mark
    rule added and GRE blocked at the remote, it follows h1's PPTP call to "GRE out, nothing
    back"."""
    require("pptpd", "pptp")
    from vpnmasq_lab.pptp_client import PptpClient
    from vpnmasq_lab.pptp_server import PptpServer

    topo = lab
    cgn = "100.64.0.1"
    topo.exec("gw", ["ip", "addr", "flush", "dev", "wan0"])
    topo.exec("gw", ["ip", "addr", "add", f"{cgn}/24", "dev", "wan0"])
    topo.exec("gw", ["ip", "addr", "add", "198.51.100.1/24", "dev", "wan0"])  # secondary
    topo.exec("r1", ["ip", "route", "add", "100.64.0.0/24", "dev", "eth0"])
    for rule in (
        ["-P", "FORWARD", "DROP"],
        ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        ["-A", "FORWARD", "-i", "lan0", "-o", "wan0", "-j", "ACCEPT"],
    ):
        topo.exec("gw", ["iptables", *rule])
    gw = topo.gateway_vpnmasq(mode="hybrid", config_overrides={"public_address": None})
    broken = vpnmasq(topo, "diagnose", "-c", str(gw.config_path))
    print(broken.stdout)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    lines = broken.stdout.splitlines()
    mark = [ln for ln in lines if ln.startswith("[FAIL] forward-mark:")]
    assert mark and "-m mark --mark 0x564d -j ACCEPT" in mark[0]
    nat = [ln for ln in lines if ln.startswith("[WARN] upstream-nat:")]
    assert nat and cgn in nat[0] and "NAT-T" in nat[0]
    assert any(ln.startswith("[  ok] daemon:") for ln in lines)

    topo.exec("gw", ["iptables", "-I", "FORWARD", "-m", "mark", "--mark", "0x564d", "-j", "ACCEPT"])
    # an upstream router that drops protocol 47: the Internet switch filters GRE
    topo.exec("inet", ["nft", "-f", "-"], input=(
        "table bridge upstream {\n chain path {\n"
        "  type filter hook forward priority 0; policy accept;\n"
        "  ether type ip ip protocol gre drop\n }\n}\n"
    ))
    PptpServer(topo, "r1").start()
    client = PptpClient(topo, "h1", topo.ip("r1"), token="h1").start()
    assert not client.wait_up(timeout=2.5)
    host = vpnmasq(topo, "diagnose", "-c", str(gw.config_path), "--host", "10.77.0.11", "-q")
    print(host.stdout)
    gre = [ln for ln in host.stdout.splitlines() if "GRE out, nothing back" in ln]
    assert gre and gre[0].startswith("[FAIL] host:") and "protocol 47" in gre[0]
    assert not any(ln.startswith("[FAIL] forward-mark") for ln in host.stdout.splitlines())


def _packet_sockets(pid: int) -> int:
    """How many AF_PACKET sockets process ``pid`` holds (its namespace's /proc/net/packet)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        inodes = set()
        for fd in fds:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        with open(f"/proc/{pid}/net/packet") as f:
            rows = [ln.split() for ln in f.read().splitlines()[1:]]
    except OSError:
        return 0
    return sum(1 for row in rows if row and row[-1] in inodes)


@pytest.mark.parametrize("lab", [(1, 1)], indirect=True)
def test_trace_writes_a_pcapng_of_both_sides_with_pairs(lab: Topology, tmp_path: Path) -> None:
    """vpnmasq trace on the gateway while h1 sends raw ESP to r1: every ESP packet appears on
    lan0 (before) and wan0 (after), paired, and the pcapng opens in tshark with the
    interface names and comments."""
    topo = lab
    gw = topo.gateway_vpnmasq(mode="userspace")
    out = tmp_path / "trace.pcapng"
    tracer = topo.popen(
        "gw",
        [PY, "-m", "vpnmasq.cli", "trace", "-c", str(gw.config_path), "-H", "10.77.0.11",
         "-p", "esp", "-o", str(out),
         "-n", "12", "-d", "60", "--lines-per-second", "0"],
        name="trace",
    )
    # capturing once its packet sockets (one per interface: lan0, wan0) exist
    wait_until(lambda: _packet_sockets(tracer.pid) >= 2 or tracer.poll() is not None,
               what="vpnmasq trace to open its sockets")  # fmt: skip
    from vpnmasq_lab.rawpeers import RawEspServer, run_esp_client

    RawEspServer(topo, "r1", [(0x1001, 0x2001)]).start()
    res = run_esp_client(topo, "h1", topo.ip("r1"), 0x1001, 0x2001, count=3, timeout=ANSWER_TIMEOUT)
    assert res.get("ok", res.get("verified")), res
    stdout, stderr = tracer.communicate(timeout=90)
    text = stdout.decode()
    print(text)
    lines = [ln for ln in text.splitlines() if " esp spi=" in ln]
    assert len(lines) >= 12, text + stderr.decode()  # 3 out + 3 back, each on both sides
    assert any("lan0" in ln and "spi=0x00001001" in ln for ln in lines)
    assert any("wan0" in ln and "198.51.100.1 > 198.51.100.20 esp spi=0x00001001" in ln for ln in lines)
    assert sum(1 for ln in lines if "(= #" in ln) >= 6  # every datagram paired with its copy
    cp = subprocess.run(
        ["tshark", "-r", str(out), "-T", "fields", "-e", "frame.interface_name", "-e", "esp.spi",
         "-e", "frame.comment"],
        capture_output=True, text=True, timeout=60,
    )
    rows = [ln.split("\t") for ln in cp.stdout.splitlines() if ln.strip()]
    assert {r[0] for r in rows} == {"lan0", "wan0"}
    assert any("after translation" in r[2] for r in rows if len(r) > 2)
    json.dumps(rows)  # plain strings only
