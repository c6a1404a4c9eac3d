"""vpnmasq's netfilter rules expose nothing of the gateway itself: they only untrack and
queue traffic to the public address on what the engine owns (its alias port range, IKE
500/4500, forwarded ports, ICMP, GRE, ESP, AH), never ACCEPT anything (they untrack, queue,
return or mark), never touch the filter table, and queue outbound traffic only from the
inside networks. (Generated text from :func:`vpnmasq.datapath.rules.iptables_rules`, the
queue rules, and :func:`vpnmasq.datapath.rules.nft_rules`, the native untracking, mark and
kernel NAT; the namespace tests in tests/integration check that the same text is what gets
installed.)"""

from __future__ import annotations

import re

import pytest

from vpnmasq.datapath.rules import LOCAL_SOCKET, RuleSpec, iptables_rules, nft_rules
from vpnmasq.verdict import Direction

OUT = Direction.OUTBOUND

PUBLIC = "198.51.100.1"


def _spec(mode: str, forwards: tuple[tuple[str, int | None], ...] = ()) -> RuleSpec:
    return RuleSpec(
        outside_if="wan0",
        inside_networks=["10.77.0.0/24"],
        public_address=PUBLIC,
        mode=mode,  # type: ignore[arg-type]
        alias_port_range=(61000, 65535),
        kernel_port_range=(32768, 60999),
        forwards=forwards,
    )


def _rules(spec: RuleSpec) -> list[str]:
    return [ln for ln in iptables_rules(spec).splitlines() if ln.startswith(("-A", "-I"))]


@pytest.mark.parametrize("mode", ["userspace", "hybrid"])
@pytest.mark.parametrize("forwards", [(), (("tcp", 8080), ("udp", 5060), ("gre", None))])
def test_rules_accept_nothing_and_queue_only_owned_inbound_traffic(mode: str, forwards: tuple) -> None:
    text = iptables_rules(_spec(mode, forwards))
    assert "*filter" not in text, "vpnmasq never touches the filter table"
    for line in _rules(_spec(mode, forwards)):
        target = line.split(" -j ", 1)[1].split()[0] if " -j " in line else ""
        assert target in {"CT", "NFQUEUE", "RETURN", "MARK"} or target.startswith("VPNMASQ_"), line
        assert target != "ACCEPT", line
    # inbound: only to the public address (the dispatch RETURNs everything else first)
    assert f"-A VPNMASQ_IN ! -d {PUBLIC}/32 -j RETURN" in text
    ports: set[str] = set()
    for line in _rules(_spec(mode, forwards)):
        if line.startswith(("-A VPNMASQ_IN ", "-A VPNMASQ_RAW_IN ")) and "-p tcp" in line or (
            line.startswith(("-A VPNMASQ_IN ", "-A VPNMASQ_RAW_IN ")) and "-p udp" in line
        ):
            m = re.search(r"--dports? (\S+)", line)
            assert m, f"a tcp/udp rule without a port match would take every port: {line}"
            ports.add(m.group(1))
    allowed = {"61000:65535", "500,4500", "500", "4500"} | {
        str(p) for proto, p in forwards if p is not None
    }
    assert ports <= allowed, ports - allowed
    assert not any(p in ports for p in ("22", "53", "80", "443", "1:65535", "0:65535"))
    # the native side: nothing accepted, untracking inbound only for the public address and
    # only with a destination port for TCP/UDP
    nft = nft_rules(_spec(mode, forwards))
    assert not re.search(r"(?<!policy )\baccept\b", nft), "the nft table never accepts anything"
    ls = [ln.strip() for ln in nft.splitlines()]
    start = ls.index("chain raw_in {") + 1
    raw_in = ls[start : ls.index("}", start)]
    assert raw_in[0] == f"ip daddr != {PUBLIC} return"
    nft_ports: set[str] = set()
    for line in raw_in[1:]:
        # untracked (then queued), or, for a pool port a socket of the gateway itself owns
        # (a resolver's reply), left tracked for the gateway's own stack: never accepted
        assert line.endswith(" notrack") or line.endswith(f" {LOCAL_SOCKET} return"), line
        if line.startswith(("tcp ", "udp ")):
            m = re.search(r"dport (\{ [^}]+ \}|\S+)", line)
            assert m, f"a tcp/udp rule without a port match would take every port: {line}"
            nft_ports.add(m.group(1).replace("-", ":").replace("{ ", "").replace(" }", "").replace(", ", ","))
    assert nft_ports <= allowed, nft_ports - allowed


def test_outbound_queueing_is_only_for_inside_sources() -> None:
    for mode in ("userspace", "hybrid"):
        jumps = [ln for ln in _rules(_spec(mode)) if ln.endswith("-j VPNMASQ_OUT")]
        assert jumps == ["-I POSTROUTING 1 -o wan0 -s 10.77.0.0/24 -j VPNMASQ_OUT"], jumps
        nft = nft_rules(_spec(mode))
        assert [ln.strip() for ln in nft.splitlines() if "goto raw_out" in ln] == [
            "ip saddr 10.77.0.0/24 goto raw_out"
        ]


def test_replies_to_low_range_aliases_are_queued() -> None:
    # was a finding in the rules' review: the engine maps LAN source ports < 1024 into
    # low_port_range (600-1023); rules now untrack/queue that range as well
    from vpnmasq.config import Config
    from vpnmasq.daemon import rule_spec
    from vpnmasq.engine import Engine
    from vpnmasq.packet.ipv4 import ip_to_int
    from vpnmasq.packet.l4 import build_udp

    cfg = Config(inside_networks=("10.77.0.0/24",), public_address=PUBLIC, mode="userspace")
    eng = Engine(cfg, rng_seed=1)
    v = eng.handle(build_udp(ip_to_int("10.77.0.11"), ip_to_int("203.0.113.20"), 123, 123), OUT, 0.0)
    assert v.payload is not None
    alias = int.from_bytes(v.payload[20:22], "big")
    assert 600 <= alias <= 1023  # the engine's choice for a source port below 1024
    text = iptables_rules(rule_spec(cfg, PUBLIC))
    queued = re.findall(r"-A VPNMASQ_IN -p udp .*--dport (\d+):(\d+)", text)
    assert any(int(lo) <= alias <= int(hi) for lo, hi in queued), queued
