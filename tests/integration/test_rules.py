"""rules.install()/remove() against real iptables (nft and legacy) and nftables, and what the
installed rules do to packets (nobody listens on the queue here: owned traffic is dropped)."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest
from netns import GatewayTopology, Lab
from tests.waiting import ANSWER_TIMEOUT

from vpnmasq.datapath import rules

pytestmark = pytest.mark.netns

VARIANTS = ["iptables", "iptables-legacy"]
KERNEL_PORTS = (20000, 29999)


def spec_for(t: GatewayTopology, mode: str, *, public: str | None = "public") -> rules.RuleSpec:
    return rules.RuleSpec(
        t.gw_wan_if,
        [t.inside_net, "192.168.50.0/24"],
        t.public if public == "public" else None,
        mode=mode,  # type: ignore[arg-type]
        queue_num=21,
        kernel_port_range=KERNEL_PORTS,
        forwards=[("tcp", 8022), ("udp", 5060), ("gre", None)],
    )


def snapshot(lab: Lab, role: str, variant: str) -> str:
    save = lab.run(role, [f"{variant}-save"]).stdout
    save = "\n".join(
        re.sub(r"\[\d+:\d+\]", "", ln) for ln in save.splitlines() if not ln.startswith("#")
    )
    nft = lab.run(role, ["nft", "list", "ruleset"]).stdout
    nft = re.sub(r"counter packets \d+ bytes \d+", "counter", nft)
    return save + "\n----\n" + nft


def add_foreign_state(lab: Lab, role: str, variant: str) -> None:
    """Someone else's rules, and the built-in chains our jumps live in (iptables creates
    those on first use and they stay, empty, when our jump is deleted: not ours to remove)."""
    ipt = variant
    for table, chain in (
        ("raw", "PREROUTING"),
        ("mangle", "PREROUTING"),
        ("mangle", "POSTROUTING"),
        ("mangle", "FORWARD"),
    ):
        lab.run(role, [ipt, "-t", table, "-A", chain, "-j", "RETURN"])
        lab.run(role, [ipt, "-t", table, "-D", chain, "-j", "RETURN"])
    lab.run(role, f"{ipt} -t mangle -A PREROUTING -i eth9 -j MARK --set-mark 7")
    lab.run(
        role,
        f"{ipt} -t raw -N FOREIGN && {ipt} -t raw -A FOREIGN -p udp --dport 53 -j CT --notrack",
    )
    lab.run(role, f"{ipt} -t raw -A PREROUTING -j FOREIGN")
    lab.run(role, f"{ipt} -t filter -A FORWARD -p tcp --dport 25 -j DROP")
    lab.run(
        role,
        "nft add table inet other && nft add chain inet other c '{ type filter hook input priority 0; }'",
    )
    lab.run(role, "nft add rule inet other c tcp dport 23 drop")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_install_then_remove_leaves_no_trace(
    lab: Lab, gw_topo: GatewayTopology, variant: str, mode: str
) -> None:
    gw = lab.ns(gw_topo.gw)
    add_foreign_state(lab, gw_topo.gw, variant)
    before = snapshot(lab, gw_topo.gw, variant)
    spec = spec_for(gw_topo, mode)

    assert not rules.installed(netns=gw, iptables=variant)
    rules.install(spec, netns=gw, iptables=variant)
    assert rules.installed(netns=gw, iptables=variant)
    first = snapshot(lab, gw_topo.gw, variant)
    for chain in ("VPNMASQ_IN", "VPNMASQ_OUT"):
        assert f":{chain} " in first
    assert "VPNMASQ_RAW" not in first  # untracking is native nft now (rules module docstring)
    assert "table ip vpnmasq {" in first and ("masquerade" in first) == (mode == "hybrid")
    # our jumps come first in the built-in chains (in userspace mode the hairpin jump too:
    # every mapping hairpins), and our raw chain before iptables raw
    hairpin = f"-A PREROUTING -d {gw_topo.public}/32 ! -i {gw_topo.gw_wan_if} -j VPNMASQ_HP\n"
    assert (
        f"-A PREROUTING -i {gw_topo.gw_wan_if} -m mark ! --mark 0x564d -j VPNMASQ_IN\n"
        + (hairpin if mode == "userspace" else "")
        + "-A PREROUTING -i eth9"
    ) in first
    assert "type filter hook prerouting priority raw - 1; policy accept;" in first

    rules.install(spec, netns=gw, iptables=variant)  # reinstall: same result, no duplicates
    assert snapshot(lab, gw_topo.gw, variant) == first

    rules.remove(netns=gw, iptables=variant)
    assert snapshot(lab, gw_topo.gw, variant) == before
    assert not rules.installed(netns=gw, iptables=variant)
    rules.remove(netns=gw, iptables=variant)  # idempotent
    assert snapshot(lab, gw_topo.gw, variant) == before


def test_remove_after_a_crash_with_pieces_missing(lab: Lab, gw_topo: GatewayTopology) -> None:
    gw = lab.ns(gw_topo.gw)
    add_foreign_state(lab, gw_topo.gw, "iptables")
    before = snapshot(lab, gw_topo.gw, "iptables")
    rules.install(spec_for(gw_topo, "hybrid"), netns=gw)
    lab.run(
        gw_topo.gw,
        f"iptables -t mangle -D POSTROUTING -o {gw_topo.gw_wan_if} -s 192.168.50.0/24 -j VPNMASQ_OUT",
    )
    lab.run(gw_topo.gw, "iptables -t mangle -F VPNMASQ_OUT")  # still jumped to for inside_net
    lab.run(gw_topo.gw, "nft delete table ip vpnmasq")
    # what an older version (untracking in iptables raw) left behind
    lab.run(
        gw_topo.gw,
        "iptables -t raw -N VPNMASQ_RAW && iptables -t raw -N VPNMASQ_RAW_IN"
        " && iptables -t raw -A VPNMASQ_RAW -j VPNMASQ_RAW_IN"
        " && iptables -t raw -A VPNMASQ_RAW_IN -p 50 -j CT --notrack"
        " && iptables -t raw -I PREROUTING 1 -j VPNMASQ_RAW",
    )
    assert rules.installed(netns=gw)
    rules.remove(netns=gw)
    assert snapshot(lab, gw_topo.gw, "iptables") == before
    assert not rules.installed(netns=gw)


def test_failed_install_is_rolled_back(
    lab: Lab, gw_topo: GatewayTopology, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = lab.ns(gw_topo.gw)
    add_foreign_state(lab, gw_topo.gw, "iptables")
    before = snapshot(lab, gw_topo.gw, "iptables")
    monkeypatch.setattr(rules, "nft_rules", lambda spec: "table ip vpnmasq { chain c { bogus } }\n")
    with pytest.raises(rules.RuleError, match="nft"):
        rules.install(spec_for(gw_topo, "hybrid"), netns=gw)
    assert not rules.installed(netns=gw)
    assert snapshot(lab, gw_topo.gw, "iptables") == before


def test_forward_mark_rule_detection(lab: Lab, gw_topo: GatewayTopology) -> None:
    gw = lab.ns(gw_topo.gw)
    assert not rules.forward_mark_rule_present(netns=gw)
    hint = rules.forward_mark_hint()  # a runnable command (with a placement comment)
    assert hint.startswith("iptables -A FORWARD -m mark --mark 0x564d -j ACCEPT  # ")
    lab.run(gw_topo.gw, hint)
    assert rules.forward_mark_rule_present(netns=gw)
    assert not rules.forward_mark_rule_present(0x1234, netns=gw)
    lab.run(gw_topo.gw, hint.replace("-A", "-D"))
    assert not rules.forward_mark_rule_present(netns=gw)
    lab.run(gw_topo.gw, hint.replace("iptables", "iptables-legacy"))
    assert rules.forward_mark_rule_present(netns=gw)
    lab.run(gw_topo.gw, hint.replace("iptables", "iptables-legacy").replace("-A", "-D"))
    lab.run(
        gw_topo.gw,
        "nft add table inet fw && nft add chain inet fw filter_forward '{ type filter hook forward priority 0; policy drop; }'"
        " && nft add rule inet fw filter_forward meta mark 0x564d accept",
    )
    assert rules.forward_mark_rule_present(netns=gw)


def _conntrack(lab: Lab, t: GatewayTopology, proto: str) -> list[str]:
    out = lab.run(t.gw, ["conntrack", "-L", "-p", proto], check=False).stdout
    return [ln for ln in out.splitlines() if ln.startswith(proto)]


def _recv(s: socket.socket, timeout: float) -> tuple[bytes, tuple[str, int]] | None:
    s.settimeout(timeout)
    try:
        return s.recvfrom(65535)
    except TimeoutError:
        return None


def _recv_raw_udp(s: socket.socket, payload: bytes, timeout: float) -> bool:
    """Whether a UDP datagram carrying ``payload`` arrives on raw socket ``s`` in time."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = _recv(s, left)
        if got is None:
            return False
        if got[0][(got[0][0] & 0x0F) * 4 + 8 :] == payload:
            return True
    return False


def test_hybrid_kernel_masquerade_owned_traffic_and_timeouts(
    lab: Lab, gw_topo: GatewayTopology
) -> None:
    t = gw_topo
    rules.install(spec_for(t, "hybrid"), netns=lab.ns(t.gw))
    server = lab.socket(t.remote, socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((t.remote_host, 9))
    ike_server = lab.socket(t.remote, socket.AF_INET, socket.SOCK_DGRAM)
    ike_server.bind((t.remote_host, 500))

    # plain UDP: masqueraded by the kernel into the kernel port range
    client = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((t.inside_host, 4000))
    client.sendto(b"plain", (t.remote_host, 9))
    got = _recv(server, ANSWER_TIMEOUT)
    assert got is not None and got[1][0] == t.public
    assert KERNEL_PORTS[0] <= got[1][1] <= KERNEL_PORTS[1]
    [entry] = [e for e in _conntrack(lab, t, "udp") if "dport=9 " in e]
    timeout = int(entry.split()[2])
    assert 60 < timeout <= 120  # ct timeout udp_rfc4787 (kernel default would be 30)

    # IKE (owned by vpnmasq): NOTRACKed and queued; with no listener it is dropped
    ike = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    ike.bind((t.inside_host, 500))
    ike.sendto(b"ike", (t.remote_host, 500))
    assert _recv(ike_server, 0.3) is None
    assert not [e for e in _conntrack(lab, t, "udp") if "port=500 " in e]

    # an ICMP error about a kernel flow is RELATED: not queued, un-NATed by the kernel
    refused = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    refused.connect((t.remote_host, 10))
    refused.send(b"x")
    refused.settimeout(ANSWER_TIMEOUT)
    with pytest.raises(ConnectionRefusedError):
        refused.recv(10)

    # TCP: unspecified states of the tcp_rfc5382 policy keep the kernel defaults
    listener = lab.socket(t.remote, socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((t.remote_host, 80))
    listener.listen()
    conn = lab.socket(t.inside, socket.AF_INET, socket.SOCK_STREAM)
    conn.settimeout(ANSWER_TIMEOUT)
    conn.connect((t.remote_host, 80))
    accepted, peer = listener.accept()
    assert peer[0] == t.public
    [entry] = [e for e in _conntrack(lab, t, "tcp") if "dport=80 " in e]
    assert "ESTABLISHED" in entry and int(entry.split()[2]) > 7440  # RFC 5382 minimum
    for s in (accepted, conn, listener):
        s.close()


@pytest.mark.parametrize("public", ["public", None], ids=["public-address", "addrtype"])
def test_userspace_queues_only_owned_traffic_to_the_gateway(
    lab: Lab, gw_topo: GatewayTopology, public: str | None
) -> None:
    """No listener (fail-closed): whatever is queued is dropped, everything else passes."""
    t = gw_topo
    rules.install(spec_for(t, "userspace", public=public), netns=lab.ns(t.gw))

    def reaches_gw(src_role: str, src: str, dst: str, port: int, expected: bool) -> bool:
        """Whether a datagram is delivered to the gateway; waits long only where one is
        ``expected``. Seen on a raw socket: a UDP socket on the port would own the packet,
        and a packet a local socket owns is never queued (rules.LOCAL_SOCKET)."""
        sink = lab.socket(t.gw, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        s = lab.socket(src_role, socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        token = os.urandom(8)
        s.sendto(token, (dst, port))
        ok = _recv_raw_udp(sink, token, ANSWER_TIMEOUT if expected else 0.3)
        sink.close()
        s.close()
        return ok

    # from outside to the public address: alias range, IKE and forwards are queued
    assert not reaches_gw(t.remote, t.remote_host, t.public, 61500, expected=False)
    assert not reaches_gw(t.remote, t.remote_host, t.public, 4500, expected=False)
    assert not reaches_gw(t.remote, t.remote_host, t.public, 5060, expected=False)
    assert reaches_gw(t.remote, t.remote_host, t.public, 5353, expected=True)
    # from inside to the gateway's own addresses: never queued, except the pool ports of the
    # public address when the rules know it (userspace mode hairpins every mapping)
    assert reaches_gw(t.inside, t.inside_host, t.gw_lan, 61500, expected=True)
    assert reaches_gw(t.inside, t.inside_host, t.public, 5353, expected=True)
    hairpins = public is not None
    assert reaches_gw(t.inside, t.inside_host, t.public, 61500, expected=not hairpins) is not hairpins
    # a socket of the gateway's own on a pool port keeps its packets, from either side
    own = lab.socket(t.gw, socket.AF_INET, socket.SOCK_DGRAM)
    own.bind(("0.0.0.0", 61500))
    for role, src in ((t.remote, t.remote_host), (t.inside, t.inside_host)):
        c = lab.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
        c.bind((src, 0))
        c.sendto(b"mine", (t.public, 61500))
        got = _recv(own, ANSWER_TIMEOUT)
        assert got is not None and got[0] == b"mine" and got[1][0] == src, (role, got)
        c.close()
    own.close()
    # forwarded traffic from inside leaving via outside_if: queued
    server = lab.socket(t.remote, socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((t.remote_host, 9))
    c = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    c.sendto(b"out", (t.remote_host, 9))
    assert _recv(server, 0.3) is None
