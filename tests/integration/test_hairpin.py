"""Hairpinning through ``vpnmasq run``: a LAN host reaches a LAN server published with
``[[forward]]`` through the gateway's public address (issues 2 and 8), in both modes.

srv (10.77.0.5) runs the harness's echo peers (:class:`harness.Remote` bound to
srv: UDP/TCP echo on port 7, a minimal PPTP server on TCP 1723 and GRE echo), published as
``tcp 8080 -> srv:7``, ``udp 7``, ``tcp 1723`` and ``gre``. h1 and h2 talk to
198.51.100.1; the server must see the *public address* as their source (so that its answers
go back through the gateway) and nothing may leave on wan0.

The kernel side, measured here: the packet rewritten in PREROUTING has the public address (a
local address) as its source, so the routing decision drops it as a martian unless
``accept_local = 1`` on the LAN interface (the daemon sets it, guards it and puts it back),
and strict ``rp_filter`` drops it too (the daemon warns). Harness: harness.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    H1,
    MARK,
    NEW_PUBLIC,
    PUBLIC,
    R1,
    SRV,
    Daemon,
    PptpCall,
    Remote,
    Sniffer,
    gw_run,
    iptables_save,
    ours_installed,
    sock,
    tcp_echo,
    udp_echo,
    wait_for,
)
from tests.waiting import ANSWER_TIMEOUT, DEADLINE

from vpnmasq.daemon import ADDRESS_POLL_S, HAIRPIN_SYSCTL_FILE
from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns
MODES = ["hybrid", "userspace"]


def in_pool(d: Daemon, port: int) -> bool:
    """``port`` is one the engine hands out (the pool status reports)."""
    pool = d.status()["limits"]["pool"]
    return any(lo <= port <= hi for lo, hi in [*pool["ranges"], pool["low"]])

FORWARDS = f"""
[[forward]]
protocol = "tcp"
port = 8080
to = "{SRV}"
to_port = 7

[[forward]]
protocol = "udp"
port = 7
to = "{SRV}"

[[forward]]
protocol = "tcp"
port = 1723
to = "{SRV}"

[[forward]]
protocol = "gre"
to = "{SRV}"
"""
#: the local source guard, first rule of vpnmasq's nft raw chain (rules.RuleSpec)
GUARD = 'iifname "lan0" fib saddr type local meta pkttype host drop'


def nft_raw(topo: Topology) -> str:
    """vpnmasq's raw chain as ``nft -a`` lists it (rule handles included)."""
    return gw_run(topo, "nft", "-a", "list", "chain", "ip", "vpnmasq", "raw").stdout


@pytest.fixture
def lan_server(topo: Topology) -> Iterator[Remote]:
    r = Remote(topo, "srv", SRV)
    try:
        yield r
    finally:
        r.close()


def accept_local(topo: Topology, ifname: str = "lan0") -> str:
    return gw_run(topo, "sysctl", "-n", f"net.ipv4.conf.{ifname}.accept_local").stdout.strip()


def set_sysctl(topo: Topology, key: str, value: str) -> None:
    assert gw_run(topo, "sysctl", "-qw", f"{key}={value}").returncode == 0


def hairpin_daemon(topo: Topology, workdir: Path, mode: str, extra: str = "") -> Daemon:
    d = Daemon(topo, mode, workdir)
    d.write_config(extra + FORWARDS)
    return d


def _spoofed_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # no checksum
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0, 64, 17, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return hdr + udp  # the kernel fills in the header checksum for IP_HDRINCL


def send_spoofed(topo: Topology, role: str, src: str, dst: str, dport: int) -> int:
    """A UDP packet from ``role`` with a forged source address; returns its source port."""
    sport = 40000 + int.from_bytes(os.urandom(1), "big")
    s = sock(topo, role, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        s.sendto(_spoofed_udp(src, dst, sport, dport, b"spoofed"), (dst, 0))
    finally:
        s.close()
    return sport


# ------------------------------------------------------------------------------ the feature
@pytest.mark.parametrize("mode", MODES)
def test_lan_hosts_reach_forwarded_lan_servers_through_the_public_address(
    topo: Topology, lan_server: Remote, wan: Sniffer, workdir: Path, mode: str
) -> None:
    assert accept_local(topo) == "0"
    d = hairpin_daemon(topo, workdir, mode).start()
    every = "every mapping, " if mode == "userspace" else ""
    assert f"hairpinning {every}tcp 8080->7, udp 7, tcp 1723, gre from lan0" in d.log()
    assert accept_local(topo) == "1"
    # TCP (8080 on the public address -> srv:7) and UDP, from both LAN hosts
    for host in ("h1", "h2"):
        assert tcp_echo(topo, host, PUBLIC, 8080), f"TCP hairpin from {host}\n{d.log()}"
        assert udp_echo(topo, host, PUBLIC, 7), f"UDP hairpin from {host}"
    # the server saw the public address (its answers come back through the gateway), each
    # client on its own alias port
    for kind in ("tcp", "udp"):
        seen = lan_server.saw(kind)
        assert {a for a, _ in seen} == {PUBLIC}, seen
        assert len({p for _, p in seen}) == 2 and all(in_pool(d, p) for _, p in seen)
    # PPTP to the LAN server through the public address: both hosts use Call ID 7
    calls = [PptpCall(topo, h, call_id=7, dst=PUBLIC) for h in ("h1", "h2")]
    try:
        for call in calls:
            assert call.peer_id_seen == 7  # the server's reply, its Call ID translated back
            assert call.gre_roundtrip() == (PUBLIC, 7)  # GRE both ways, to the right caller
        gre = d.entries("gre")
    finally:
        for call in calls:
            call.close()
    assert {a for a, _ in lan_server.saw("pptp")} == {PUBLIC}
    server_side = {cid for _, cid in lan_server.saw("pptp-call")}
    assert len(server_side) == 2, server_side  # the server saw two distinct Call IDs
    # GRE entries: the two callers' legs and the server's leg of each call
    assert sorted(r["inside"] for r in gre) == sorted([H1, "10.77.0.12", SRV, SRV]), gre
    assert d.counters().get("hairpin", 0) >= 20
    assert [p for p in wan.seen if p.outgoing] == []  # nothing of it left on wan0
    assert d.stop() == 0 and not ours_installed(topo)
    assert accept_local(topo) == "0" and not (workdir / HAIRPIN_SYSCTL_FILE).exists()


def test_only_forwarded_ports_hairpin_and_the_gateways_own_services_stay_local(
    topo: Topology, lan_server: Remote, workdir: Path
) -> None:
    """A service of the gateway on the public address (an sshd, say) gets the LAN client's
    own address, untouched; only forwarded ports hairpin. A default-drop stateful FORWARD
    chain with README's mark rule passes hairpinned packets (the verdict marks them in
    PREROUTING)."""
    gw_run(topo, "iptables", "-P", "FORWARD", "DROP")
    gw_run(topo, "iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate",
           "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
    gw_run(topo, "iptables", "-A", "FORWARD", "-m", "mark", "--mark", hex(MARK), "-j", "ACCEPT")
    d = hairpin_daemon(topo, workdir, "userspace").start()
    srv = sock(topo, "gw", socket.AF_INET, socket.SOCK_STREAM)
    usrv = sock(topo, "gw", socket.AF_INET, socket.SOCK_DGRAM)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((PUBLIC, 2222))
        srv.listen(1)
        srv.settimeout(ANSWER_TIMEOUT)
        usrv.bind((PUBLIC, 5300))
        usrv.settimeout(ANSWER_TIMEOUT)
        # both ports lie in userspace mode's "auto" pool: the daemon takes them out when it
        # sees them listening (every ADDRESS_POLL_S), and the rules stop queueing them
        wait_for(
            lambda: not in_pool(d, 2222) and not in_pool(d, 5300),
            "the new services taken out of the port pool",
            timeout=2 * ADDRESS_POLL_S + DEADLINE,
        )
        assert "now listens on" in d.log()
        c = sock(topo, "h1", socket.AF_INET, socket.SOCK_STREAM)
        c.settimeout(ANSWER_TIMEOUT)
        c.connect((PUBLIC, 2222))
        conn, peer = srv.accept()
        conn.close()
        c.close()
        assert peer[0] == H1
        u = sock(topo, "h1", socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(b"to-the-gateway", (PUBLIC, 5300))
        u.close()
        data, upeer = usrv.recvfrom(100)
        assert data == b"to-the-gateway" and upeer[0] == H1
    finally:
        srv.close()
        usrv.close()
    assert tcp_echo(topo, "h1", PUBLIC, 8080)  # through the stateful FORWARD chain
    c = d.counters()
    assert c.get("hairpin", 0) >= 4, c
    assert not any(r["inside"].startswith(H1) and r["remote"].endswith((":2222", ":5300"))
                   for r in d.entries())  # fmt: skip
    assert d.stop() == 0


def test_accept_local_is_guarded_against_lan_hosts_spoofing_the_gateway(
    topo: Topology, remote: Remote, wan: Sniffer, workdir: Path
) -> None:
    """With accept_local on, the kernel no longer drops a LAN packet that claims the
    gateway's own address as its source; vpnmasq's guard rule does. Taking the guard out
    shows that it is what stops them."""
    d = hairpin_daemon(topo, workdir, "hybrid").start()
    assert GUARD in nft_raw(topo)
    sport = send_spoofed(topo, "h1", PUBLIC, R1, 7)
    assert udp_echo(topo, "h1")  # ordinary traffic passes meanwhile (and flushes the path)
    assert (PUBLIC, sport) not in remote.saw("udp")
    assert not any(p.outgoing and p.sport == sport for p in wan.seen)

    (handle,) = [ln.rsplit("# handle ", 1)[1] for ln in nft_raw(topo).splitlines() if GUARD in ln]
    assert gw_run(topo, "nft", "delete", "rule", "ip", "vpnmasq", "raw", "handle", handle).returncode == 0
    sport2 = send_spoofed(topo, "h1", PUBLIC, R1, 7)
    wait_for(lambda: (PUBLIC, sport2) in remote.saw("udp"), "the unguarded spoofed packet")
    assert d.stop() == 0


def test_strict_rp_filter_drops_hairpin_and_is_reported(
    topo: Topology, lan_server: Remote, workdir: Path
) -> None:
    set_sysctl(topo, "net.ipv4.conf.lan0.rp_filter", "1")
    d = hairpin_daemon(topo, workdir, "userspace").start()
    assert "set net.ipv4.conf.lan0.rp_filter=2 (loose)" in d.log()
    assert not udp_echo(topo, "h1", PUBLIC, 7, timeout=0.5)

    def rp_filter_drops() -> int:
        out = gw_run(topo, "nstat", "-az", "TcpExtIPReversePathFilter").stdout.split()
        return int(out[out.index("TcpExtIPReversePathFilter") + 1])

    # the daemon re-injects the hairpinned datagram, maybe after the echo gave up waiting
    wait_for(lambda: rp_filter_drops() >= 1, "rp_filter to drop the hairpinned datagram")
    set_sysctl(topo, "net.ipv4.conf.lan0.rp_filter", "2")  # what the warning says
    assert udp_echo(topo, "h1", PUBLIC, 7)
    assert d.stop() == 0


def test_accept_local_survives_crash_and_handover_then_is_restored(
    topo: Topology, lan_server: Remote, workdir: Path
) -> None:
    record = workdir / HAIRPIN_SYSCTL_FILE
    d = hairpin_daemon(topo, workdir, "userspace").start()
    assert json.loads(record.read_text()) == {"accept_local": {"lan0": "0"}}
    d.send(signal.SIGKILL)
    d.wait()
    assert accept_local(topo) == "1" and record.exists()  # a crash restores nothing ...
    d.start()  # ... the next start knows the admin's value from the record
    assert GUARD in nft_raw(topo)
    d.send(signal.SIGUSR2)  # handover: rules and sysctl stay for the successor
    assert d.wait() == 0
    assert accept_local(topo) == "1" and record.exists() and GUARD in nft_raw(topo)
    d.start("--handover")
    assert "rules taken over" in d.log()
    assert udp_echo(topo, "h1", PUBLIC, 7)
    assert d.stop() == 0
    assert accept_local(topo) == "0" and not record.exists()  # the admin's value, back

    # an admin who already has accept_local = 1: left alone, not guarded, not recorded
    set_sysctl(topo, "net.ipv4.conf.lan0.accept_local", "1")
    d.start()
    assert GUARD not in nft_raw(topo) and not record.exists()
    assert udp_echo(topo, "h1", PUBLIC, 7)
    assert d.stop() == 0
    assert accept_local(topo) == "1"


def test_hairpin_rules_follow_an_address_change(
    topo: Topology, lan_server: Remote, workdir: Path
) -> None:
    """Without ``public_address`` the hairpin rules name the outside interface's current
    address (a LAN packet's destination cannot be matched by interface), and are swapped
    when it changes."""
    d = hairpin_daemon(topo, workdir, "hybrid").start()
    assert f"-d {PUBLIC}/32 ! -i wan0 -j VPNMASQ_HP" in iptables_save(topo)
    assert udp_echo(topo, "h1", PUBLIC, 7)
    ip = ["ip", "-n", topo.ns("gw"), "addr"]
    subprocess.run([*ip, "add", f"{NEW_PUBLIC}/24", "dev", "wan0"], check=True)
    subprocess.run([*ip, "del", f"{PUBLIC}/24", "dev", "wan0"], check=True)
    wait_for(lambda: f"-d {NEW_PUBLIC}/32 ! -i wan0" in iptables_save(topo), "new rules")
    assert f"-d {PUBLIC}/32 ! -i wan0" not in iptables_save(topo)
    # The rules, the engine's address and the kernel's routes change in separate steps;
    # a datagram sent in between may be lost, as on any router. What matters is that
    # hairpinning through the new address works once they have settled.
    try:
        wait_for(lambda: udp_echo(topo, "h1", NEW_PUBLIC, 7, timeout=2.0), "echo via the new address")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{lan_server.peers}\n{d.log()}") from None
    assert lan_server.saw("udp")[-1][0] == NEW_PUBLIC
    assert tcp_echo(topo, "h2", NEW_PUBLIC, 8080)
    assert d.stop() == 0 and not ours_installed(topo)
