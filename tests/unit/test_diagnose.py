"""vpnmasq diagnose: pure checks over fixture facts; host findings from a real engine's table."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.config_text import with_required
from tests.packets import (
    EXT,
    IN,
    MASQ,
    OUT,
    PRV1,
    PRV2,
    accepted,
    build_esp,
    build_udp,
    make_engine,
)
from tests.pptp_wire import ControlLink, gre_in, gre_out
from vpnmasq.config import Config, Route, load_config
from vpnmasq.datapath.rules import forward_mark_hint
from vpnmasq.engine import Engine
from vpnmasq.helpers.isakmp import build_header
from vpnmasq.packet.ipv4 import build_ipv4, int_to_ip
from vpnmasq.status import status_payload
from vpnmasq.tools import diagnose as dg
from vpnmasq.tools.diagnose import Facts, Finding, Level

CFG = Config(inside_networks=("10.77.0.0/24",), outside_interface="wan0", mode="userspace")

IPT_PLAIN = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:VPNMASQ_RAW - [0:0]
-A PREROUTING -j VPNMASQ_RAW
COMMIT
"""
IPT_STATEFUL = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i lan0 -o wan0 -j ACCEPT
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 10.77.0.0/24 -o wan0 -j MASQUERADE
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:VPNMASQ_RAW - [0:0]
-A PREROUTING -j VPNMASQ_RAW
COMMIT
"""
NFT_KERNEL_NAT = """table ip vmq_kernel_nat {
\tct helper pptp-h {
\t\ttype "pptp" protocol tcp
\t\tl3proto ip
\t}
\tchain postnat {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "wan0" ip saddr 10.77.0.0/24 counter packets 0 bytes 0 masquerade
\t}
}
table ip vpnmasq {
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "wan0" ip saddr { 10.77.0.0/24 } masquerade
\t}
}
"""


def healthy(**over: object) -> Facts:
    f = Facts(
        config=CFG,
        sysctl={
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.wan0.rp_filter": "0",
            "net.ipv4.conf.lan0.rp_filter": "0",
        },
        addresses={"wan0": ["198.51.100.1"], "lan0": ["10.77.0.1"]},
        mtu={"wan0": 1500, "lan0": 1500},
        inside_ifaces=["lan0"],
        kernel={"nfqueue": True, "conntrack": True},
        iptables=IPT_PLAIN,
        nft="",
        daemon={"entries": [], "counters": {}},
        local_consumers=frozenset(),
    )
    for k, v in over.items():
        setattr(f, k, v)
    return f


def levels(findings: list[Finding], check: str) -> list[Level]:
    return [f.level for f in findings if f.check == check]


def only(findings: list[Finding], check: str) -> Finding:
    got = [f for f in findings if f.check == check]
    assert len(got) == 1, got
    return got[0]


# ------------------------------------------------------------------------------ system checks
def test_a_healthy_gateway_has_no_problems_or_warnings() -> None:
    findings = dg.run_checks(healthy())
    assert [f for f in findings if f.level >= Level.WARN] == []
    assert dg.exit_code(findings) == 0


def test_forwarding_off_is_a_failure_with_the_sysctl_to_set() -> None:
    f = healthy()
    f.sysctl["net.ipv4.ip_forward"] = "0"
    fd = only(dg.check_forwarding(f), "forwarding")
    assert fd.level is Level.FAIL
    assert "sysctl -w net.ipv4.ip_forward=1" in fd.fix
    assert dg.exit_code([fd]) == 1


def test_rp_filter_is_the_max_of_all_and_the_interface() -> None:
    cfg = dataclasses.replace(CFG, routes=(Route("10.88.0.0/24", "10.77.0.2"),))
    f = healthy(config=cfg)
    assert levels(dg.check_rp_filter(f), "rp_filter") == [Level.OK]
    f.sysctl["net.ipv4.conf.all.rp_filter"] = "1"  # all=1 makes every interface strict
    got = dg.check_rp_filter(f)
    assert {x.level for x in got} == {Level.WARN}
    assert any("lan0" in x.message for x in got) and any("wan0" in x.message for x in got)
    f.sysctl["net.ipv4.conf.all.rp_filter"] = "2"  # loose wins over strict: max(2, 0)
    assert levels(dg.check_rp_filter(f), "rp_filter") == [Level.OK]
    # strict is fine for plain masquerade: no routes, no VPN endpoint on the gateway
    plain = healthy()
    plain.sysctl["net.ipv4.conf.all.rp_filter"] = "1"
    assert levels(dg.check_rp_filter(plain), "rp_filter") == [Level.OK]
    plain.local_consumers = frozenset({"ike"})
    assert {x.level for x in dg.check_rp_filter(plain)} == {Level.WARN}


def test_missing_kernel_pieces_fail() -> None:
    f = healthy(kernel={"nfqueue": False, "conntrack": True})
    fd = only(dg.check_kernel(f), "kernel")
    assert fd.level is Level.FAIL and "NFQUEUE" in fd.fix


def test_own_masquerade_and_kernel_pptp_helper_are_reported_not_ours() -> None:
    f = healthy(iptables=IPT_PLAIN, nft=NFT_KERNEL_NAT)
    got = dg.check_competing_nat(f)
    nat = only(got, "own-nat")
    assert nat.level is Level.WARN and "vmq_kernel_nat" in nat.message
    assert "table ip vpnmasq" not in nat.message  # vpnmasq's own table is not a competitor
    helper = only(got, "pptp-helper")
    assert helper.level is Level.WARN and "pptp" in helper.message
    f2 = healthy(iptables=IPT_STATEFUL, nft="")
    assert "MASQUERADE" in only(dg.check_competing_nat(f2), "own-nat").message
    assert levels(dg.check_competing_nat(healthy()), "own-nat") == [Level.OK]


def test_stateful_forward_without_the_mark_rule_fails_with_the_rule_to_add() -> None:
    f = healthy(iptables=IPT_STATEFUL)
    fd = only(dg.check_forward_policy(f), "forward-mark")
    assert fd.level is Level.FAIL
    assert fd.fix == forward_mark_hint(0x564D) and "--mark 0x564d -j ACCEPT" in fd.fix
    with_mark = IPT_STATEFUL.replace(
        "-A FORWARD -i lan0", "-A FORWARD -m mark --mark 0x564d -j ACCEPT\n-A FORWARD -i lan0"
    )
    assert levels(dg.check_forward_policy(healthy(iptables=with_mark)), "forward-mark") == [Level.OK]
    nft_drop = "table inet fw {\n\tchain fwd {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n"
    assert levels(dg.check_forward_policy(healthy(nft=nft_drop)), "forward-mark") == [Level.FAIL]


@pytest.mark.parametrize(
    ("addr", "level"),
    [("198.51.100.1", Level.OK), ("100.64.7.9", Level.WARN), ("192.168.1.20", Level.WARN),
     ("10.0.0.2", Level.WARN)],
)
def test_outside_address_behind_another_nat_is_a_warning(addr: str, level: Level) -> None:
    got = dg.check_outside_address(healthy(addresses={"wan0": [addr], "lan0": ["10.77.0.1"]}))
    assert max(x.level for x in got) is level
    if level is Level.WARN:
        text = only(got, "upstream-nat").message
        assert "NAT-T" in text and "GRE" in text and "ESP" in text


def test_outside_interface_without_address_or_missing() -> None:
    assert only(dg.check_outside_address(healthy(addresses={"wan0": []})), "outside").level is Level.FAIL
    fd = only(dg.check_outside_address(healthy(addresses={"eth9": ["1.2.3.4"]})), "outside")
    assert fd.level is Level.FAIL and "does not exist" in fd.message


def test_small_outside_mtu_asks_for_mss_clamp() -> None:
    f = healthy(mtu={"wan0": 1492})
    fd = only(dg.check_mtu(f), "mtu")
    assert fd.level is Level.WARN and fd.fix == "mss_clamp = 1452"
    f2 = healthy(mtu={"wan0": 1492}, config=dataclasses.replace(CFG, mss_clamp=1452))
    assert levels(dg.check_mtu(f2), "mtu") == [Level.OK]
    assert dg.check_mtu(healthy()) == []


def test_local_vpn_endpoint_with_local_vpn_never_and_a_stateful_input() -> None:
    f = healthy(local_consumers=frozenset({"ike"}), config=dataclasses.replace(CFG, local_vpn="never"))
    assert levels(dg.check_local_vpn(f), "local-vpn") == [Level.WARN]
    f2 = healthy(local_consumers=frozenset({"ike"}), iptables=IPT_STATEFUL)
    got = dg.check_local_vpn(f2)
    assert [x.level for x in got] == [Level.INFO, Level.WARN]
    assert "--dports 500,4500" in got[1].fix
    assert dg.check_local_vpn(healthy()) == []


def test_missing_route_fails() -> None:
    cfg = dataclasses.replace(CFG, routes=(Route("10.88.0.0/24", "10.77.0.2"),))
    fd = only(dg.check_routes(healthy(config=cfg)), "route")
    assert fd.level is Level.FAIL and "ip route replace 10.88.0.0/24 via 10.77.0.2" in fd.fix
    ok = healthy(config=cfg, routes={"10.88.0.0/24": "via 10.77.0.2 dev lan0"})
    assert levels(dg.check_routes(ok), "route") == [Level.OK]


def test_daemon_down_and_rules_flushed() -> None:
    fd = only(dg.check_daemon(healthy(daemon=None, daemon_error="no socket")), "daemon")
    assert fd.level is Level.FAIL and "no socket" in fd.message
    got = dg.check_daemon(healthy(iptables="*filter\nCOMMIT\n", nft=""))
    assert levels(got, "rules") == [Level.FAIL]


def test_drop_counters_are_explained() -> None:
    f = healthy(daemon={"entries": [], "counters": {"drop:ah-cannot-be-masqueraded": 3, "dropped": 3}})
    fd = only(dg.check_counters(f), "drops")
    assert fd.level is Level.WARN and fd.message.startswith("3 dropped") and "ESP" in fd.fix


# ------------------------------------------------------------------------------ host checks
def _facts_from(eng: Engine, now: float, host: int) -> Facts:
    return healthy(daemon=status_payload(eng.snapshot(now), eng.counters), host=int_to_ip(host))


def test_host_gre_out_nothing_back_says_protocol_47_is_dropped_upstream() -> None:
    eng = make_engine()
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    link.start_session(0.0)
    link.outgoing_call(0x0101, 0x4242, 0.0)
    for t in (1.0, 2.0, 3.0):
        accepted(gre_out(eng, PRV1, EXT, 0x4242, t))
    got = dg.check_host(_facts_from(eng, 5.0, PRV1))
    fail = [x for x in got if x.level is Level.FAIL]
    assert len(fail) == 1
    assert "GRE out, nothing back" in fail[0].message and "protocol 47" in fail[0].fix
    assert "3 out / 0 in" in fail[0].message
    assert "last out 2s ago, last in never" in fail[0].message
    # once GRE comes back the same host is fine
    accepted(gre_in(eng, EXT, _outside_call_id(eng), 6.0))
    got = dg.check_host(_facts_from(eng, 7.0, PRV1))
    assert all(x.level is Level.OK for x in got), got


def _outside_call_id(eng: Engine) -> int:
    (row,) = [r for r in eng.snapshot(0.0) if r.proto == "gre"]
    return int(row.detail["call_id_outside"])


def test_host_pptp_control_without_a_call() -> None:
    eng = make_engine()
    link = ControlLink(eng, PRV1, 40000, EXT).open(0.0)
    link.start_session(0.0)
    got = dg.check_host(_facts_from(eng, 1.0, PRV1))
    assert any(x.level is Level.WARN and "no call" in x.message for x in got)


def test_host_ike_unanswered_then_ike_without_esp_then_esp_one_way() -> None:
    eng = make_engine()
    ic = 0x1111222233334444
    accepted(eng.handle(build_udp(PRV1, EXT, 500, 500, build_header(ic, 0, 34, major=2, flags=8)), OUT, 0.0))
    fd = [x for x in dg.check_host(_facts_from(eng, 1.0, PRV1)) if x.level is Level.FAIL]
    assert len(fd) == 1 and "never answered" in fd[0].message and "UDP 500" in fd[0].message
    rc = 0x5555666677778888
    accepted(eng.handle(build_udp(EXT, MASQ, 500, 500, build_header(ic, rc, 34, major=2, flags=0x20)), IN, 1.0))
    got = dg.check_host(_facts_from(eng, 2.0, PRV1))
    assert any(x.level is Level.WARN and "no ESP" in x.message for x in got)
    assert not any(x.level is Level.FAIL for x in got)
    for t in (3.0, 4.0):
        accepted(eng.handle(build_ipv4(PRV1, EXT, 50, build_esp(0xC0FFEE01, int(t))), OUT, t))
    got = dg.check_host(_facts_from(eng, 5.0, PRV1))
    fail = [x for x in got if x.level is Level.FAIL]
    assert len(fail) == 1 and "ESP out, nothing back" in fail[0].message
    assert "NAT-T" in fail[0].fix


def test_host_not_inside_or_without_mappings() -> None:
    eng = make_engine()
    fd = only(dg.check_host(_facts_from(eng, 0.0, EXT)), "host")
    assert fd.level is Level.FAIL and "inside_networks" in fd.fix
    fd = only(dg.check_host(_facts_from(eng, 0.0, PRV2)), "host")
    assert fd.level is Level.WARN and "no mapping" in fd.message


# ------------------------------------------------------------------------------ output
def test_render_is_one_line_per_finding_with_the_fix_on_it() -> None:
    f = healthy()
    f.sysctl["net.ipv4.ip_forward"] = "0"
    findings = dg.run_checks(f)
    text = dg.render(findings)
    lines = text.splitlines()
    assert len(lines) == len(findings) + 1  # + summary
    fwd = next(line for line in lines if "forwarding" in line)
    assert fwd.startswith("[FAIL] forwarding:") and "-> fix: sysctl -w" in fwd
    assert lines[-1] == "1 problem, 0 warnings"
    quiet = dg.render(findings, verbose=False)
    assert "[  ok]" not in quiet and "[FAIL]" in quiet
    doc = json.loads(dg.render_json(findings))
    assert {"level": "fail", "check": "forwarding"}.items() <= doc["findings"][1].items()


def test_gather_uses_the_control_socket_answer() -> None:
    payload = {"entries": [], "counters": {"dropped": 0}}
    facts = dg.gather(load_config(with_required("")), query=lambda p, c: payload)
    assert facts.daemon == payload
    assert "net.ipv4.ip_forward" in facts.sysctl

    def refuse(p: str, c: str) -> dict[str, object]:
        raise OSError("no socket")

    facts = dg.gather(CFG, query=refuse)
    assert facts.daemon is None and facts.daemon_error == "no socket"
