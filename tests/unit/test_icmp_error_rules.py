"""The rules that queue ICMP errors about vpnmasq's flows which conntrack cannot relate:
the gateway's own (mangle OUTPUT, chain VPNMASQ_LOCAL) and LAN hosts' errors inside
hairpinned flows (chain VPNMASQ_HP). Off by default in RuleSpec; the daemon turns both on."""

from __future__ import annotations

import re

import pytest

from vpnmasq.config import Config
from vpnmasq.daemon import rule_spec
from vpnmasq.datapath.rules import RuleSpec, iptables_removal, iptables_rules

ERRORS = "-m conntrack --ctstate INVALID,UNTRACKED"


def spec(**kw: object) -> RuleSpec:
    base: dict[str, object] = dict(
        outside_if="wan0",
        inside_networks=["10.77.0.0/24", "10.88.0.0/24"],
        public_address="198.51.100.1",
        queue_num=5,
    )
    base.update(kw)
    return RuleSpec(**base)  # type: ignore[arg-type]


def mangle(text: str) -> list[str]:
    ls = text.splitlines()
    start = ls.index("*mangle")
    return ls[start + 1 : ls.index("COMMIT", start)]


def test_off_by_default_nothing_changes() -> None:
    text = iptables_rules(spec(hairpin_forwards=[("udp", 7, 7)]))
    assert "VPNMASQ_LOCAL" not in text and not re.search(r"VPNMASQ_HP .*-p icmp", text)


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_gateway_errors_are_queued_from_output_except_to_inside_or_routed(mode: str) -> None:
    s = spec(mode=mode, local_icmp_errors=True, routed_networks=["10.99.0.0/16"])
    m = mangle(iptables_rules(s))
    assert ":VPNMASQ_LOCAL - [0:0]" in m
    local = [ln for ln in m if ln.startswith("-A VPNMASQ_LOCAL")]
    assert local == [
        "-A VPNMASQ_LOCAL -d 10.77.0.0/24 -j RETURN",
        "-A VPNMASQ_LOCAL -d 10.88.0.0/24 -j RETURN",
        "-A VPNMASQ_LOCAL -d 10.99.0.0/16 -j RETURN",
        *(
            f"-A VPNMASQ_LOCAL -p icmp --icmp-type {t} {ERRORS} -j NFQUEUE --queue-num 5"
            for t in (3, 4, 11, 12)
        ),
    ]
    assert "-I OUTPUT 1 -j VPNMASQ_LOCAL" in m
    # the declaration comes before any rule of the chain (iptables-restore needs that)
    assert m.index(":VPNMASQ_LOCAL - [0:0]") < m.index(local[0])


def test_fail_open_reaches_the_new_queue_rules_too() -> None:
    m = mangle(iptables_rules(spec(local_icmp_errors=True, fail_open=True)))
    queued = [ln for ln in m if "VPNMASQ_LOCAL -p icmp" in ln]
    assert queued and all(ln.endswith("--queue-bypass") for ln in queued)


def test_hairpin_errors_are_queued_only_when_hairpinning() -> None:
    assert not re.search(r"VPNMASQ_HP .*-p icmp", iptables_rules(spec(hairpin_icmp_errors=True)))
    m = mangle(iptables_rules(spec(hairpin_icmp_errors=True, hairpin_forwards=[("udp", 7, 7)])))
    hp = [ln for ln in m if ln.startswith("-A VPNMASQ_HP") and "-p icmp" in ln]
    assert hp == [
        f"-A VPNMASQ_HP -s {net} -p icmp --icmp-type {t} {ERRORS} -j NFQUEUE --queue-num 5"
        for net in ("10.77.0.0/24", "10.88.0.0/24")
        for t in (3, 4, 11, 12)
    ]
    # never NOTRACKed: errors about the gateway's own flows stay RELATED and local
    text = iptables_rules(spec(hairpin_icmp_errors=True, hairpin_forwards=[("udp", 7, 7)]))
    assert not re.search(r"VPNMASQ_RAW_HP .*-p icmp", text)


def test_removal_takes_the_output_jump_and_the_chain() -> None:
    installed = re.sub(r"-I (\w+) 1 ", r"-A \1 ", iptables_rules(spec(local_icmp_errors=True)))
    removal = iptables_removal(installed)
    assert "-D OUTPUT -j VPNMASQ_LOCAL" in removal
    assert "-F VPNMASQ_LOCAL" in removal and "-X VPNMASQ_LOCAL" in removal


def test_the_daemon_asks_for_both() -> None:
    cfg = Config(outside_interface="wan0", inside_networks=("10.77.0.0/24",))
    s = rule_spec(cfg, "198.51.100.1")
    assert s.local_icmp_errors and s.hairpin_icmp_errors
