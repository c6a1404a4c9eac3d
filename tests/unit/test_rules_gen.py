"""Rule generation as text: no root, no kernel (tests/integration/test_rules.py loads it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vpnmasq.datapath.rules import (
    DEFAULT_MARK,
    RuleSpec,
    forward_mark_hint,
    interfaces_towards,
    iptables_removal,
    iptables_replacement,
    iptables_rules,
    mark_rule_in_ruleset,
    nft_removal,
    nft_rules,
    ours_in_ruleset,
    port_range_warnings,
    rp_filter_blocks_hairpin,
)

INSIDE = "10.77.0.0/24"
PUBLIC = "198.51.100.1"


def spec(**kw: object) -> RuleSpec:
    base: dict[str, object] = dict(
        outside_if="wan0", inside_networks=[INSIDE], public_address=PUBLIC, queue_num=5
    )
    base.update(kw)
    return RuleSpec(**base)  # type: ignore[arg-type]


def lines(text: str) -> list[str]:
    return text.splitlines()


def table(text: str, name: str) -> list[str]:
    ls = lines(text)
    start = ls.index(f"*{name}")
    return ls[start + 1 : ls.index("COMMIT", start)]


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"outside_if": "wan0; rm -rf /"},
        {"outside_if": "a" * 16},
        {"outside_if": ".."},
        {"inside_networks": []},
        {"inside_networks": ["10.77.0.0/33"]},
        {"public_address": "not-an-ip"},
        {"mode": "kernel"},
        {"queue_num": 65536},
        {"mark": 0},
        {"alias_port_range": (0, 10)},
        {"alias_port_range": (20, 10)},
        {"alias_port_range": (30000, 40000), "kernel_port_range": (39000, 50000)},
        {"forwards": [("tcp", None)]},
        {"forwards": [("gre", 47)]},
        {"forwards": [("sctp", 1)]},
    ],
)
def test_invalid_specs_are_rejected(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        spec(**kw)


def test_spec_normalises_networks_and_dedups() -> None:
    s = spec(inside_networks=["10.77.0.5/24", "10.77.0.0/24"], forwards=[("udp", 53), ("udp", 53)])
    assert s.inside_networks == ("10.77.0.0/24",)
    assert s.forwards == (("udp", 53),)


def test_overlapping_ranges_allowed_in_userspace_mode() -> None:
    # no kernel masquerade there, so the kernel range is unused
    spec(mode="userspace", alias_port_range=(30000, 40000), kernel_port_range=(39000, 50000))


# --- userspace mode ---------------------------------------------------------------------


def nft_chain(text: str, name: str) -> list[str]:
    """The rules of one chain of :func:`nft_rules` output (hook line left out)."""
    ls = [ln.strip() for ln in lines(text)]
    start = ls.index(f"chain {name} {{")
    body = ls[start + 1 : ls.index("}", start)]
    return [ln for ln in body if not ln.startswith("type ")]


def nft_hook(text: str, name: str) -> str:
    ls = [ln.strip() for ln in lines(text)]
    return ls[ls.index(f"chain {name} {{") + 1]


def test_userspace_untracks_in_native_nft_chains() -> None:
    text = nft_rules(spec(mode="userspace"))
    assert nft_hook(text, "raw") == "type filter hook prerouting priority raw - 1; policy accept;"
    assert nft_chain(text, "raw") == [
        "ct state untracked return",
        'iifname "wan0" goto raw_in',
        "ip saddr 10.77.0.0/24 ip daddr 198.51.100.1 goto raw_hp",  # every mapping hairpins
        "ip saddr 10.77.0.0/24 goto raw_out",
    ]
    assert nft_chain(text, "raw_hp") == [
        "fib saddr type local return",
        "tcp dport 61000-65535 socket transparent { 0, 1 } return",  # the gateway's own
        "udp dport 61000-65535 socket transparent { 0, 1 } return",
        "tcp dport 61000-65535 notrack",
        "udp dport 61000-65535 notrack",
    ]
    assert nft_chain(text, "raw_in") == [
        "ip daddr != 198.51.100.1 return",
        "tcp dport 61000-65535 socket transparent { 0, 1 } return",
        "udp dport 61000-65535 socket transparent { 0, 1 } return",
        "tcp dport 61000-65535 notrack",
        "udp dport 61000-65535 notrack",
        "udp dport { 500, 4500 } notrack",
        "meta l4proto { 1, 47, 50, 51 } notrack",
    ]
    assert nft_chain(text, "raw_out") == [
        "ip daddr 10.77.0.0/24 return",
        "fib daddr type != { local, broadcast, multicast } notrack",
    ]
    assert nft_chain(text, "forward") == [
        'oifname != "wan0" return',
        "ip saddr != 10.77.0.0/24 return",
        "ct state untracked meta mark set 0x564d return",
    ]
    assert "masquerade" not in text and "ct timeout" not in text  # no kernel NAT
    assert "CT --notrack" not in iptables_rules(spec(mode="userspace"))  # nothing in raw


def test_userspace_mangle_chains_queue_only_untracked() -> None:
    mangle = table(iptables_rules(spec(mode="userspace")), "mangle")
    q = "-m conntrack --ctstate UNTRACKED -j NFQUEUE --queue-num 5"
    assert mangle == [
        ":VPNMASQ_IN - [0:0]",
        ":VPNMASQ_OUT - [0:0]",
        ":VPNMASQ_HP - [0:0]",
        "-A VPNMASQ_IN ! -d 198.51.100.1/32 -j RETURN",
        f"-A VPNMASQ_IN -p tcp --dport 61000:65535 {q}",
        f"-A VPNMASQ_IN -p udp --dport 61000:65535 {q}",
        f"-A VPNMASQ_IN -p udp -m multiport --dports 500,4500 {q}",
        f"-A VPNMASQ_IN -p 1 {q}",
        f"-A VPNMASQ_IN -p 47 {q}",
        f"-A VPNMASQ_IN -p 50 {q}",
        f"-A VPNMASQ_IN -p 51 {q}",
        f"-A VPNMASQ_OUT {q}",
        "-A VPNMASQ_HP -m addrtype --src-type LOCAL -j RETURN",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p tcp --dport 61000:65535 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p udp --dport 61000:65535 {q}",
        "-I PREROUTING 1 ! -i wan0 -d 198.51.100.1/32 -j VPNMASQ_HP",
        "-I PREROUTING 1 -i wan0 -m mark ! --mark 0x564d -j VPNMASQ_IN",
        "-I POSTROUTING 1 -o wan0 -s 10.77.0.0/24 -j VPNMASQ_OUT",
    ]
    assert "*raw" not in iptables_rules(spec(mode="userspace"))


def test_fail_open_adds_queue_bypass_everywhere_and_only_then() -> None:
    closed = iptables_rules(spec(mode="userspace"))
    opened = iptables_rules(spec(mode="userspace", fail_open=True))
    assert "--queue-bypass" not in closed
    queue_lines = [ln for ln in lines(opened) if "NFQUEUE" in ln]
    assert queue_lines and all(ln.endswith("--queue-num 5 --queue-bypass") for ln in queue_lines)


def test_forwards_and_several_inside_networks() -> None:
    s = spec(
        mode="userspace",
        inside_networks=[INSIDE, "192.168.1.0/24"],
        forwards=[("tcp", 22), ("udp", 5060), ("esp", None)],
        routed_networks=["10.88.0.0/16"],
    )
    nft, ls = nft_rules(s), lines(iptables_rules(s))
    raw_in = nft_chain(nft, "raw_in")
    assert "tcp dport 22 notrack" in raw_in and "udp dport 5060 notrack" in raw_in
    # ESP from the forward merged into the protocol set, once
    assert [ln for ln in raw_in if ln.startswith("meta l4proto")] == [
        "meta l4proto { 1, 47, 50, 51 } notrack"
    ]
    raw = nft_chain(nft, "raw")
    assert [ln for ln in raw if ln.endswith("goto raw_out")] == [
        "ip saddr 10.77.0.0/24 goto raw_out", "ip saddr 192.168.1.0/24 goto raw_out"
    ]
    # LAN-to-LAN and routed networks are left to routing
    assert nft_chain(nft, "raw_out")[:3] == [
        "ip daddr 10.77.0.0/24 return",
        "ip daddr 192.168.1.0/24 return",
        "ip daddr 10.88.0.0/16 return",
    ]
    assert "ip saddr != 10.77.0.0/24 ip saddr != 192.168.1.0/24 return" in nft_chain(
        nft, "forward"
    )
    for net in (INSIDE, "192.168.1.0/24"):
        assert f"-I POSTROUTING 1 -o wan0 -s {net} -j VPNMASQ_OUT" in ls
    # inserted one by one at the top: the last inserted ends up first
    assert ls.index("-I POSTROUTING 1 -o wan0 -s 192.168.1.0/24 -j VPNMASQ_OUT") < ls.index(
        f"-I POSTROUTING 1 -o wan0 -s {INSIDE} -j VPNMASQ_OUT"
    )


def test_no_public_address_uses_the_addresses_of_the_outside_interface() -> None:
    s = spec(public_address=None)
    raw_in = nft_chain(nft_rules(s), "raw_in")
    # the gateway's own sockets first (no FIB lookup needed: a socket owns the packet)
    assert raw_in[0] == "udp sport 500 udp dport 61000-65535 socket transparent { 0, 1 } return"
    assert raw_in[1] == "tcp sport 1723 tcp dport 61000-65535 socket transparent { 0, 1 } return"
    # the FIB lookup after the protocol match: the kernel's own replies never pay for it
    assert raw_in[2] == "udp dport 500 fib daddr . iif type local notrack"
    assert all(ln.endswith(" fib daddr . iif type local notrack") for ln in raw_in[2:])
    ls = lines(iptables_rules(s))
    assert "-A VPNMASQ_IN -m addrtype ! --dst-type LOCAL --limit-iface-in -j RETURN" in ls


@pytest.mark.parametrize(
    ("match", "nft"),
    [
        ("", ""),
        ("-p 47", "meta l4proto 47"),
        ("-p 1", "meta l4proto 1"),
        ("-p udp --dport 500", "udp dport 500"),
        ("-p tcp --sport 1723 --dport 61000:65535", "tcp sport 1723 tcp dport 61000-65535"),
        ("-p udp -m multiport --dports 500,4500", "udp dport { 500, 4500 }"),
        ("-p icmp --icmp-type 11 -m conntrack --ctstate INVALID,UNTRACKED", None),
        ("-p icmp --icmp-type 3", "icmp type destination-unreachable"),
        ("-p tcp -m state --state NEW", None),
    ],
)
def test_iptables_matches_have_one_native_form(match: str, nft: str | None) -> None:
    """Untracking (nft) and queueing (iptables) come from one list of matches: every match
    either has exactly one native form or is refused (never silently widened)."""
    from vpnmasq.datapath.rules import _nft_match

    if nft is None:
        with pytest.raises(ValueError):
            _nft_match(match)
    else:
        assert _nft_match(match) == nft


# --- hybrid mode ----------------------------------------------------------------------------


def test_hybrid_owns_only_vpn_traffic() -> None:
    text = nft_rules(spec(mode="hybrid", alias_port_range=(62000, 62999)))
    assert nft_chain(text, "raw_in") == [
        "ip daddr != 198.51.100.1 return",
        "udp sport 500 udp dport 62000-62999 socket transparent { 0, 1 } return",
        "tcp sport 1723 tcp dport 62000-62999 socket transparent { 0, 1 } return",
        "udp dport 500 notrack",
        "udp sport 500 udp dport 62000-62999 notrack",
        "tcp sport 1723 tcp dport 62000-62999 notrack",
        "meta l4proto { 47, 50, 51 } notrack",
    ]
    local = "fib daddr type != { local, broadcast, multicast }"  # after the cheap matches
    assert [ln for ln in nft_chain(text, "raw_out") if "notrack" in ln] == [
        f"meta l4proto {{ 47, 50, 51 }} {local} notrack",
        f"udp sport 500 {local} notrack",
        f"udp dport 500 {local} notrack",
        f"tcp dport 1723 {local} notrack",
    ]
    raw = nft_chain(text, "raw") + nft_chain(text, "raw_in") + nft_chain(text, "raw_out")
    assert not any("icmp" in ln for ln in raw)  # ICMP errors stay tracked


def test_hybrid_queues_unrelated_icmp_errors_both_ways() -> None:
    mangle = table(iptables_rules(spec(mode="hybrid")), "mangle")
    for t in (3, 4, 11, 12):
        m = f"-p icmp --icmp-type {t} -m conntrack --ctstate INVALID,UNTRACKED -j NFQUEUE --queue-num 5"
        assert f"-A VPNMASQ_IN {m}" in mangle
        assert f"-A VPNMASQ_OUT {m}" in mangle
    queued = [ln for ln in mangle if "NFQUEUE" in ln]
    assert all("--ctstate UNTRACKED" in ln or "INVALID,UNTRACKED" in ln for ln in queued)
    mark = nft_chain(nft_rules(spec(mode="hybrid")), "forward")
    assert (
        "icmp type { destination-unreachable, source-quench, time-exceeded, parameter-problem }"
        " ct state { invalid, untracked } meta mark set 0x564d"
    ) in mark


def test_outbound_marks_mirror_outbound_queue_rules() -> None:
    """What VPNMASQ_OUT queues in POSTROUTING is what the nft forward chain marks, so the
    admin's one mark rule also passes outbound owned packets (they reach FORWARD before
    their verdict). Both are reached only for the outside interface and an inside source."""
    from vpnmasq.datapath.rules import _nft_match

    for mode in ("hybrid", "userspace"):
        s = spec(mode=mode, inside_networks=[INSIDE, "192.168.1.0/24"], mark=0x1234)
        mangle = table(iptables_rules(s), "mangle")
        queued = [
            _nft_match(
                re.sub(
                    r"\s*-m conntrack --ctstate \S+",
                    "",
                    ln.removeprefix("-A VPNMASQ_OUT ").removesuffix(" -j NFQUEUE --queue-num 5"),
                )
            )
            for ln in mangle
            if ln.startswith("-A VPNMASQ_OUT")
        ]
        fwd = nft_chain(nft_rules(s), "forward")
        marked = [ln for ln in fwd if "meta mark set 0x1234" in ln]
        assert queued and marked
        for m in queued:  # every queued match is marked, under the same ct state
            state = "ct state { invalid, untracked }" if "icmp" in m else "ct state untracked"
            assert any(
                ln.startswith(f"{m} {state}".strip()) or (m.startswith("icmp type") and "icmp" in ln)
                or (m.startswith("meta l4proto") and ln.startswith("meta l4proto {"))
                for ln in marked
            ), m
        assert len(marked) <= len(queued)
        assert fwd[:2] == [
            'oifname != "wan0" return', "ip saddr != 10.77.0.0/24 ip saddr != 192.168.1.0/24 return"
        ]
        for net in (INSIDE, "192.168.1.0/24"):
            assert f"-I POSTROUTING 1 -o wan0 -s {net} -j VPNMASQ_OUT" in mangle
        assert not any("FORWARD" in ln or "MARK" in ln for ln in mangle)


#: what an older version (all classification in iptables) left installed
OLD_SAVE = """\
*mangle
:PREROUTING ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:VPNMASQ_IN - [0:0]
:VPNMASQ_OUT - [0:0]
:VPNMASQ_MARK - [0:0]
-A PREROUTING -i wan0 -j VPNMASQ_IN
-A FORWARD -o wan0 -j VPNMASQ_MARK
-A POSTROUTING -o wan0 -j VPNMASQ_OUT
-A VPNMASQ_IN ! -d 198.51.100.1/32 -j RETURN
-A VPNMASQ_OUT -s 10.77.0.0/24 -p 50 -m conntrack --ctstate UNTRACKED -j NFQUEUE --queue-num 5
-A VPNMASQ_MARK -s 10.77.0.0/24 -p 50 -m conntrack --ctstate UNTRACKED -j MARK --set-xmark 0x564d/0xffffffff
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:VPNMASQ_RAW - [0:0]
:VPNMASQ_RAW_IN - [0:0]
:VPNMASQ_RAW_OUT - [0:0]
-A PREROUTING -j VPNMASQ_RAW
-A VPNMASQ_RAW -i wan0 -d 198.51.100.1/32 -j VPNMASQ_RAW_IN
-A VPNMASQ_RAW -s 10.77.0.0/24 -j VPNMASQ_RAW_OUT
-A VPNMASQ_RAW_OUT -p 50 -j CT --notrack
COMMIT
"""


def test_replacement_swaps_rules_in_one_transaction_per_table() -> None:
    text = iptables_replacement(OLD_SAVE, spec(mode="hybrid"))
    mangle = table(text, "mangle")
    raw = table(text, "raw")
    # declarations first (flush), then the old jumps go, the new rules and jumps come,
    # and the stale chain is removed last, all inside the same COMMIT
    assert mangle[:2] == [":VPNMASQ_IN - [0:0]", ":VPNMASQ_OUT - [0:0]"]
    dels = [ln for ln in mangle if ln.startswith("-D ")]
    assert dels == [
        "-D PREROUTING -i wan0 -j VPNMASQ_IN",
        "-D FORWARD -o wan0 -j VPNMASQ_MARK",
        "-D POSTROUTING -o wan0 -j VPNMASQ_OUT",
    ]
    assert mangle[-2:] == ["-F VPNMASQ_MARK", "-X VPNMASQ_MARK"]
    assert mangle.index("-I POSTROUTING 1 -o wan0 -s 10.77.0.0/24 -j VPNMASQ_OUT") > mangle.index(
        dels[-1]
    )
    # the older version's raw chains go in their own transaction (untracking is in nft now)
    assert raw == [
        "-D PREROUTING -j VPNMASQ_RAW",
        "-F VPNMASQ_RAW",
        "-F VPNMASQ_RAW_IN",
        "-F VPNMASQ_RAW_OUT",
        "-X VPNMASQ_RAW",
        "-X VPNMASQ_RAW_IN",
        "-X VPNMASQ_RAW_OUT",
    ]
    assert text.count("COMMIT") == 2
    # nothing installed yet: the replacement is a plain install
    fresh = iptables_replacement("", spec(mode="userspace"))
    assert fresh == iptables_rules(spec(mode="userspace"))
    # the same version again: the jumps are swapped, nothing else is left over
    same = re.sub(r"-I (\w+) 1 ", r"-A \1 ", iptables_rules(spec(mode="hybrid")))
    again = table(iptables_replacement(same, spec(mode="hybrid")), "mangle")
    assert [ln for ln in again if ln.startswith(("-F", "-X"))] == []


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_networks_are_never_a_set(mode: str) -> None:
    """One rule per network: a set of prefixes created by the transaction that replaces
    the table matches nothing for an instant after the new rules are live (a new flow
    would then go un-NATed for its life)."""
    s = spec(
        mode=mode,
        inside_networks=[INSIDE, "192.168.1.0/24"],
        routed_networks=["10.88.0.0/16"],
        hairpin_forwards=[("tcp", 443, 443)],
    )
    text = nft_rules(s)
    assert re.findall(r"\{[^{}\n]*/\d+[^{}\n]*\}", text) == []  # no { a/n, b/m } anywhere
    nat = nft_chain(text, "postrouting") if mode == "hybrid" else []
    for net in (INSIDE, "192.168.1.0/24") if mode == "hybrid" else ():
        assert f'oifname "wan0" ip saddr {net} masquerade' in nat


def test_hybrid_nft_table() -> None:
    text = nft_rules(spec(mode="hybrid", kernel_port_range=(20000, 29999)))
    ls = [ln.strip() for ln in lines(text)]
    assert ls[:2] == ["table ip vpnmasq {}", "delete table ip vpnmasq"]  # atomic replace
    match = 'oifname "wan0" ip saddr 10.77.0.0/24'
    assert f"{match} meta l4proto {{ tcp, udp }} masquerade to :20000-29999" in ls
    assert f"{match} masquerade" in ls
    assert "policy = { unreplied : 120, replied : 300 };" in ls
    assert any(ln.startswith("policy = { syn_sent : 240") for ln in ls)
    fwd = nft_chain(text, "forward")
    assert nft_hook(text, "forward") == (
        "type filter hook forward priority mangle - 1; policy accept;"
    )
    # only new flows from the inside networks to the outside interface get the timeouts
    i = fwd.index('ct state new meta l4proto udp ct timeout set "udp_rfc4787"')
    assert fwd[:2] == ['oifname != "wan0" return', "ip saddr != 10.77.0.0/24 return"] and i > 1
    assert 'ct state new meta l4proto tcp ct timeout set "tcp_rfc5382"' in fwd


def test_mss_clamp_is_hybrid_only_and_both_ways() -> None:
    fwd = nft_chain(nft_rules(spec(mode="hybrid", mss_clamp=1400)), "forward")
    syn = "tcp flags syn / syn,rst tcp option maxseg size > 1400 tcp option maxseg size set 1400"
    assert fwd[:2] == [f'oifname "wan0" {syn}', f'iifname "wan0" {syn}']  # before the returns
    assert "maxseg" not in nft_rules(spec(mode="userspace", mss_clamp=1400))  # the engine clamps


def test_jumps_are_inserted_first() -> None:
    ls = lines(iptables_rules(spec()))
    assert "-I PREROUTING 1 -i wan0 -m mark ! --mark 0x564d -j VPNMASQ_IN" in ls
    assert "-I POSTROUTING 1 -o wan0 -s 10.77.0.0/24 -j VPNMASQ_OUT" in ls
    assert [ln for ln in ls if ln.startswith("-I ")] == [
        "-I PREROUTING 1 -i wan0 -m mark ! --mark 0x564d -j VPNMASQ_IN",
        "-I POSTROUTING 1 -o wan0 -s 10.77.0.0/24 -j VPNMASQ_OUT",
    ]


def test_an_offloaded_packet_leaves_every_chain_at_its_first_rules() -> None:
    """The layout that makes offloaded ESP/GRE cheap (module docstring): the offload table
    untracks them before ``raw``, which returns on untracked packets at once; marked inbound
    packets never jump to VPNMASQ_IN; outbound jumps need an inside source, which offloaded
    packets no longer have in POSTROUTING; ``forward`` returns on the interface first and
    marks then returns."""
    for mode in ("hybrid", "userspace"):
        s = spec(mode=mode, local_source_guard=["lan0"], mark=0x77)
        nft = nft_rules(s)
        raw = nft_chain(nft, "raw")
        assert raw[0].startswith('iifname "lan0"') and raw[1] == "ct state untracked return"
        fwd = nft_chain(nft, "forward")
        assert fwd[0] == 'oifname != "wan0" return'
        assert all(ln.endswith(" return") for ln in fwd if "meta mark set" in ln and "icmp" not in ln)
        jumps = [ln for ln in lines(iptables_rules(s)) if ln.startswith("-I ")]
        # userspace mode hairpins every mapping: packets from the LAN to the public address
        hairpin = ["-I PREROUTING 1 ! -i wan0 -d 198.51.100.1/32 -j VPNMASQ_HP"]
        assert jumps == [
            *(hairpin if mode == "userspace" else []),
            "-I PREROUTING 1 -i wan0 -m mark ! --mark 0x77 -j VPNMASQ_IN",
            "-I POSTROUTING 1 -o wan0 -s 10.77.0.0/24 -j VPNMASQ_OUT",
        ]
        # no xtables match or target outside the chains that only packets to queue reach
        assert not re.search(r"-m (addrtype|conntrack|pkttype)|-j (CT|MARK)", "\n".join(jumps))


# --- removal / inspection -------------------------------------------------------------------

SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:VPNMASQ_IN - [0:0]
:VPNMASQ_OUT - [0:0]
:OTHER - [0:0]
-A PREROUTING -i wan0 -j VPNMASQ_IN
-A PREROUTING -j MARK --set-xmark 0x7/0xffffffff
-A PREROUTING -m comment --comment "not -j VPNMASQ_IN" -j OTHER
-A POSTROUTING -o wan0 -j VPNMASQ_OUT
-A VPNMASQ_IN ! -d 198.51.100.1/32 -j RETURN
-A VPNMASQ_OUT -s 10.77.0.0/24 -j NFQUEUE --queue-num 5
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:VPNMASQ_RAW - [0:0]
-A PREROUTING -j VPNMASQ_RAW
COMMIT
*filter
:FORWARD DROP [0:0]
-A FORWARD -m mark --mark 0x564d -j ACCEPT
COMMIT
"""


def test_removal_from_save_output() -> None:
    assert iptables_removal(SAVE) == (
        "*mangle\n"
        "-D PREROUTING -i wan0 -j VPNMASQ_IN\n"
        "-D POSTROUTING -o wan0 -j VPNMASQ_OUT\n"
        "-F VPNMASQ_IN\n-F VPNMASQ_OUT\n"
        "-X VPNMASQ_IN\n-X VPNMASQ_OUT\n"
        "COMMIT\n"
        "*raw\n"
        "-D PREROUTING -j VPNMASQ_RAW\n"
        "-F VPNMASQ_RAW\n-X VPNMASQ_RAW\n"
        "COMMIT\n"
    )


def test_removal_of_partial_install_and_of_nothing() -> None:
    partial = "*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j VPNMASQ_RAW\nCOMMIT\n"
    assert iptables_removal(partial) == "*raw\n-D PREROUTING -j VPNMASQ_RAW\nCOMMIT\n"
    clean = "*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j CT --notrack\nCOMMIT\n"
    assert iptables_removal(clean) == ""
    assert not ours_in_ruleset(clean, "table inet filter {\n}\n")
    assert ours_in_ruleset(clean, "table ip vpnmasq {\n\tchain postrouting {\n\t}\n}\n")
    assert ours_in_ruleset(partial, "")
    assert nft_removal() == "table ip vpnmasq {}\ndelete table ip vpnmasq\n"


# --- the FORWARD mark rule ------------------------------------------------------------------


def test_mark_rule_in_iptables_save() -> None:
    assert mark_rule_in_ruleset(SAVE, "")
    assert not mark_rule_in_ruleset(SAVE, "", 0x1)
    masked = "*filter\n-A FORWARD -m mark --mark 0x564d/0xffff -j ACCEPT\nCOMMIT\n"
    assert mark_rule_in_ruleset(masked, "")
    negated = "*filter\n-A FORWARD -m mark ! --mark 0x564d -j ACCEPT\nCOMMIT\n"
    assert not mark_rule_in_ruleset(negated, "")
    dropped = "*filter\n-A FORWARD -m mark --mark 0x564d -j DROP\nCOMMIT\n"
    assert not mark_rule_in_ruleset(dropped, "")
    other_chain = "*filter\n-A INPUT -m mark --mark 0x564d -j ACCEPT\nCOMMIT\n"
    assert not mark_rule_in_ruleset(other_chain, "")


NFT = """\
table inet fw {
\tchain input {
\t\ttype filter hook input priority filter; policy drop;
\t\tmeta mark 0x0000564d accept
\t}
\tchain fwd_chain {
\t\ttype filter hook forward priority filter; policy drop;
\t\tct state established accept
\t\tMARKRULE
\t}
}
"""


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("meta mark 0x0000564d accept", True),
        ("meta mark 0x0000564d counter packets 1 bytes 2 accept", True),
        ('iifname "wan0" meta mark 22093 accept', True),
        ("meta mark != 0x0000564d accept", False),
        ("meta mark 0x0000564d drop", False),
        ("meta mark 0x00000001 accept", False),
    ],
)
def test_mark_rule_in_nft_ruleset(rule: str, expected: bool) -> None:
    assert mark_rule_in_ruleset("", NFT.replace("MARKRULE", rule)) is expected


def test_mark_rule_only_counts_in_forward_hook() -> None:
    assert not mark_rule_in_ruleset("", NFT.replace("MARKRULE", ""))


def test_forward_mark_hint_and_port_warnings() -> None:
    hint = forward_mark_hint()
    assert hint.startswith("iptables -A FORWARD -m mark --mark 0x564d -j ACCEPT  # ")
    assert "ESTABLISHED,RELATED" in hint and "0x564d" in forward_mark_hint(0x564D)
    assert "--mark 0x7 " in forward_mark_hint(7)
    assert DEFAULT_MARK == 0x564D
    assert port_range_warnings(spec(), (32768, 60999)) == []
    [w] = port_range_warnings(
        spec(mode="userspace", alias_port_range=(50000, 50999)), (32768, 60999)
    )
    assert "ip_local_reserved_ports=50000-50999" in w


def test_low_port_range_replies_are_owned_too() -> None:
    """Inside source ports below 1024 are mapped into low_port_range: replies to those
    aliases must be untracked and queued like replies to alias_port_range."""
    s = spec(mode="userspace", low_port_range=(600, 1023))
    us = nft_chain(nft_rules(s), "raw_in")
    assert "udp dport 600-1023 notrack" in us and "tcp dport 600-1023 notrack" in us
    assert any(ln.startswith("-A VPNMASQ_IN -p udp --dport 600:1023 ") for ln in lines(iptables_rules(s)))
    hy = nft_chain(nft_rules(spec(mode="hybrid", low_port_range=(600, 1023))), "raw_in")
    assert "udp sport 500 udp dport 600-1023 notrack" in hy
    assert "tcp sport 1723 tcp dport 600-1023 notrack" in hy
    assert not any("dport 600-1023" in ln and "sport" not in ln for ln in hy)
    assert "600" not in nft_rules(spec(mode="userspace"))  # not given: not owned
    with pytest.raises(ValueError, match="low port range"):
        spec(mode="hybrid", low_port_range=(600, 2000), kernel_port_range=(1024, 60999))


# --- hairpinning ----------------------------------------------------------------------------

HAIRPINS = [("tcp", 8080, 80), ("udp", 53, 53), ("gre", None, None)]


def test_hybrid_hairpin_chains_queue_only_forwarded_traffic_from_inside_to_the_public_address() -> None:
    """Hybrid mode: a LAN client's packets to a forwarded port (or GRE) and the LAN server's
    answers to the client's alias port are untracked in raw and queued in mangle PREROUTING,
    for packets that came in on any interface but the outside one; a local source is never
    hairpinned (the gateway's own packets looped through lo). Plain traffic's mappings are
    the kernel's: nothing else to the public address is queued."""
    s = spec(mode="hybrid", hairpin_forwards=HAIRPINS)
    nft = nft_rules(s)
    raw = nft_chain(nft, "raw")
    # after the outside interface went to raw_in, before raw_out (which returns on local
    # destinations)
    assert raw == [
        "ct state untracked return",
        'iifname "wan0" goto raw_in',
        "ip saddr 10.77.0.0/24 ip daddr 198.51.100.1 goto raw_hp",
        "ip saddr 10.77.0.0/24 goto raw_out",
    ]
    assert nft_chain(nft, "raw_hp") == [
        "fib saddr type local return",
        "tcp sport 80 tcp dport 61000-65535 socket transparent { 0, 1 } return",  # a local socket on an alias port
        "udp sport 53 udp dport 61000-65535 socket transparent { 0, 1 } return",
        "tcp dport 8080 notrack",
        "tcp sport 80 tcp dport 61000-65535 notrack",
        "udp dport 53 notrack",
        "udp sport 53 udp dport 61000-65535 notrack",
        "meta l4proto 47 notrack",
    ]
    mangle = table(iptables_rules(s), "mangle")
    q = "-m conntrack --ctstate UNTRACKED -j NFQUEUE --queue-num 5"
    assert ":VPNMASQ_HP - [0:0]" in mangle
    assert [ln for ln in mangle if ln.startswith("-A VPNMASQ_HP")] == [
        "-A VPNMASQ_HP -m addrtype --src-type LOCAL -j RETURN",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p tcp --dport 8080 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p tcp --sport 80 --dport 61000:65535 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p udp --dport 53 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p udp --sport 53 --dport 61000:65535 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p 47 {q}",
    ]
    assert "-I PREROUTING 1 ! -i wan0 -d 198.51.100.1/32 -j VPNMASQ_HP" in mangle


def test_userspace_hairpins_the_whole_port_pool_and_the_forwards() -> None:
    """Userspace mode: TCP/UDP from the LAN to any port of the engine's pool (every mapping;
    a forwarded server's answers go there too) and to the forwarded ports (GRE too). The
    pool is the one the daemon passes from PortPool.alias_ranges, every range of it."""
    s = spec(mode="userspace", hairpin_forwards=HAIRPINS, alias_ranges=[(61000, 65535), (600, 1023)])
    assert nft_chain(nft_rules(s), "raw_hp") == [
        "fib saddr type local return",
        "tcp dport 61000-65535 socket transparent { 0, 1 } return",  # the gateway's own sockets, pool ports only
        "udp dport 61000-65535 socket transparent { 0, 1 } return",
        "tcp dport 600-1023 socket transparent { 0, 1 } return",
        "udp dport 600-1023 socket transparent { 0, 1 } return",
        "tcp dport 61000-65535 notrack",
        "udp dport 61000-65535 notrack",
        "tcp dport 600-1023 notrack",
        "udp dport 600-1023 notrack",
        "tcp dport 8080 notrack",
        "udp dport 53 notrack",
        "meta l4proto 47 notrack",
    ]
    q = "-m conntrack --ctstate UNTRACKED -j NFQUEUE --queue-num 5"
    assert [ln for ln in lines(iptables_rules(s)) if ln.startswith("-A VPNMASQ_HP")] == [
        "-A VPNMASQ_HP -m addrtype --src-type LOCAL -j RETURN",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p tcp --dport 61000:65535 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p udp --dport 61000:65535 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p tcp --dport 600:1023 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p udp --dport 600:1023 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p tcp --dport 8080 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p udp --dport 53 {q}",
        f"-A VPNMASQ_HP -s 10.77.0.0/24 -p 47 {q}",
    ]
    # the pool, not the kernel's range, and never ICMP queries (pinging the public address
    # is answered by the gateway)
    assert "32768" not in nft_rules(s) and "icmp" not in " ".join(nft_chain(nft_rules(s), "raw_hp"))


def test_the_pool_defaults_to_the_alias_and_low_port_ranges_and_is_validated() -> None:
    assert spec(low_port_range=(600, 1023)).alias_ranges == ((61000, 65535), (600, 1023))
    assert spec().alias_ranges == ((61000, 65535),)
    assert spec(mode="userspace", alias_ranges=[(2000, 2999)]).alias_ranges == ((2000, 2999),)
    with pytest.raises(ValueError, match="overlaps kernel port range"):
        spec(mode="hybrid", alias_ranges=[(61000, 65535), (40000, 40999)])
    with pytest.raises(ValueError, match="alias_ranges"):
        spec(alias_ranges=[(0, 10)])

def test_hairpin_replies_to_low_port_aliases_and_every_inside_network() -> None:
    s = spec(
        mode="hybrid",
        inside_networks=[INSIDE, "192.168.1.0/24"],
        low_port_range=(600, 1023),
        hairpin_forwards=[("tcp", 443, 443)],
    )
    nft, ls = nft_rules(s), lines(iptables_rules(s))
    assert "tcp sport 443 tcp dport 600-1023 notrack" in nft_chain(nft, "raw_hp")
    for net in (INSIDE, "192.168.1.0/24"):
        assert f"ip saddr {net} ip daddr 198.51.100.1 goto raw_hp" in nft_chain(nft, "raw")
    for net in (INSIDE, "192.168.1.0/24"):
        assert any(ln.startswith(f"-A VPNMASQ_HP -s {net} -p tcp --dport 443 ") for ln in ls)

def test_hairpin_needs_forwards_or_userspace_mode_and_an_address() -> None:
    for s in (
        spec(mode="hybrid"),  # hybrid mode without forwards: no hairpin
        spec(mode="userspace", public_address=None, hairpin_forwards=HAIRPINS),  # no address yet
        spec(mode="userspace", public_address=None),
    ):
        assert "_HP" not in iptables_rules(s) and "raw_hp" not in nft_rules(s)
    followed = spec(
        mode="userspace", public_address=None, hairpin_address="203.0.113.9", hairpin_forwards=HAIRPINS
    )
    ls = lines(iptables_rules(followed))
    assert "-I PREROUTING 1 ! -i wan0 -d 203.0.113.9/32 -j VPNMASQ_HP" in ls
    assert "ip saddr 10.77.0.0/24 ip daddr 203.0.113.9 goto raw_hp" in nft_rules(followed)
    # the configured public address wins over the followed one
    both = spec(mode="userspace", hairpin_address="203.0.113.9", hairpin_forwards=HAIRPINS)
    assert "203.0.113.9" not in iptables_rules(both) + nft_rules(both)


@pytest.mark.parametrize(
    "hairpin",
    [("esp", None, None), ("tcp", None, 80), ("udp", 53, None), ("gre", 1, None), ("tcp", 0, 1)],
)
def test_hairpin_forwards_are_validated(hairpin: tuple[str, int | None, int | None]) -> None:
    with pytest.raises(ValueError, match="hairpin"):
        spec(hairpin_forwards=[hairpin])


def test_local_source_guard_comes_first_and_only_for_named_lan_interfaces() -> None:
    raw = nft_chain(nft_rules(spec(local_source_guard=["lan0", "eth1.10"])), "raw")
    drop = "fib saddr type local meta pkttype host drop"  # = addrtype LOCAL, pkttype unicast
    assert raw[:3] == [f'iifname "lan0" {drop}', f'iifname "eth1.10" {drop}', "ct state untracked return"]
    assert "drop" not in nft_rules(spec()) and "DROP" not in iptables_rules(spec())
    for bad in ("wan0", "lo", "lan0; true", ""):
        with pytest.raises(ValueError, match="local source guard"):
            spec(local_source_guard=[bad])

def test_replacement_drops_hairpin_chains_the_new_spec_does_not_have() -> None:
    old = spec(mode="userspace", hairpin_forwards=HAIRPINS, local_source_guard=["lan0"])
    old_save = re.sub(r"-I (\w+) 1 ", r"-A \1 ", iptables_rules(old))
    text = iptables_replacement(old_save, spec(mode="hybrid"))
    mangle = table(text, "mangle")
    assert "-D PREROUTING ! -i wan0 -d 198.51.100.1/32 -j VPNMASQ_HP" in mangle
    assert mangle[-2:] == ["-F VPNMASQ_HP", "-X VPNMASQ_HP"]
    assert "*raw" not in text
    assert iptables_removal(old_save).count("-X VPNMASQ_") == 3  # IN, OUT, HP

def test_interfaces_towards_the_inside_networks() -> None:
    routes = [
        {"dst": "default", "gateway": "198.51.100.254", "dev": "wan0"},
        {"dst": "10.77.0.0/24", "dev": "lan0", "protocol": "kernel", "scope": "link"},
        {"dst": "10.88.0.0/24", "gateway": "10.77.0.254", "dev": "lan0"},
        {"dst": "192.168.1.0/25", "dev": "eth1.10"},  # part of an inside network
        {"dst": "198.51.100.0/24", "dev": "wan0"},
        {"dst": "10.99.0.0/16", "dev": "dmz0"},  # not inside
        {"dst": "10.77.0.0/16", "dev": "wan0"},  # overlaps, but it is the outside interface
        {"dst": "192.168.1.200", "dev": "lo"},
        {"dst": "192.168.1.0/24", "dev": "bh", "type": "blackhole"},
        {"dev": "odd"},
    ]
    inside = [INSIDE, "10.88.0.0/24", "192.168.1.0/24"]
    assert interfaces_towards(routes, inside, "wan0") == ["eth1.10", "lan0"]
    assert interfaces_towards(routes, ["172.16.0.0/12"], "wan0") == []


@pytest.mark.parametrize(
    ("all_value", "dev_value", "blocks"),
    [("0", "0", False), ("1", "0", True), ("0", "1", True), ("1", "2", False),
     ("2", "1", False), ("2", "0", False), (None, None, False), ("x", "1", True)],
)  # fmt: skip
def test_only_strict_rp_filter_blocks_hairpin(
    all_value: str | None, dev_value: str | None, blocks: bool
) -> None:
    assert rp_filter_blocks_hairpin(all_value, dev_value) is blocks


# --- the daemon's side: which forwards hairpin, and the accept_local bookkeeping -------------


def test_daemon_hairpins_forwards_without_a_remote_restriction(tmp_path: Path) -> None:
    from vpnmasq import daemon
    from vpnmasq.config import Config, Forward

    cfg = Config(
        inside_networks=(INSIDE,),
        public_address=PUBLIC,
        mode="userspace",
        forwards=(
            Forward("tcp", "10.77.0.5", port=8080, to_port=80),
            Forward("udp", "10.77.0.5", port=5060),
            Forward("tcp", "10.77.0.6", port=22, remote="203.0.113.0/24"),  # a LAN host is no remote
            Forward("gre", "10.77.0.5"),
            Forward("esp", "10.77.0.7"),  # the engine cannot hairpin ESP
        ),
        control_socket=str(tmp_path / "ctl.sock"),
    )
    assert daemon.hairpin_forwards(cfg) == [("tcp", 8080, 80), ("udp", 5060, 5060), ("gre", None, None)]
    s = daemon.rule_spec(cfg, PUBLIC, guard=["lan0"])
    assert s.hairpin_forwards == (("tcp", 8080, 80), ("udp", 5060, 5060), ("gre", None, None))
    assert s.local_source_guard == ("lan0",)
    nft = nft_rules(s)
    assert "tcp dport 22 notrack" in nft_chain(nft, "raw_in")  # still forwarded from outside ...
    assert not any("22" in ln for ln in nft_chain(nft, "raw_hp"))  # ... not hairpinned


def test_the_rules_queue_the_engines_port_pool(tmp_path: Path) -> None:
    """One home: the daemon passes PortPool.alias_ranges, the pool the engine allocates
    from, so the inbound and hairpin rules follow any change of it."""
    from vpnmasq import daemon
    from vpnmasq.config import Config, PortRange
    from vpnmasq.engine import Engine

    cfg = Config(
        inside_networks=(INSIDE,),
        mode="userspace",
        port_range=PortRange(40000, 40999),
        low_port_range=PortRange(700, 799),
        control_socket=str(tmp_path / "ctl.sock"),
    )
    eng = Engine(cfg, rng_seed=1)
    assert eng.pool.alias_ranges == ((40000, 40999), (700, 799))
    s = daemon.rule_spec(cfg, PUBLIC, pool=eng.pool)
    assert s.alias_ranges == eng.pool.alias_ranges
    hp = nft_chain(nft_rules(s), "raw_hp")
    assert "udp dport 40000-40999 notrack" in hp and "tcp dport 700-799 notrack" in hp
    assert "udp dport 40000-40999 notrack" in nft_chain(nft_rules(s), "raw_in")
    assert [a.ranges for a in eng.ports.values()] == [[(40000, 40999), (700, 799)]] * 2


class FakeSysctl:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.writes: list[tuple[str, str]] = []

    def get(self, ifname: str, key: str, *, netns: str | None = None) -> str | None:
        return self.values.get(f"{ifname}.{key}")

    def set(self, ifname: str, key: str, value: str, *, netns: str | None = None) -> None:
        self.values[f"{ifname}.{key}"] = value
        self.writes.append((f"{ifname}.{key}", value))


@pytest.fixture
def sysctl(monkeypatch: pytest.MonkeyPatch) -> FakeSysctl:
    from vpnmasq import daemon

    fake = FakeSysctl({"lan0.accept_local": "0", "lan1.accept_local": "1", "lan2.accept_local": "0"})
    monkeypatch.setattr(daemon.rules, "ipv4_conf_get", fake.get)
    monkeypatch.setattr(daemon.rules, "ipv4_conf_set", fake.set)
    return fake


def test_accept_local_is_set_guarded_and_restored_only_where_vpnmasq_changed_it(
    tmp_path: Path, sysctl: FakeSysctl
) -> None:
    from vpnmasq.daemon import HairpinSysctls

    path = tmp_path / "run" / "hairpin-sysctl.json"
    hs = HairpinSysctls(str(path))
    hs.plan(["lan0", "lan1"])
    assert hs.guard == ["lan0"]  # lan1: the admin's own accept_local = 1, left alone
    assert json.loads(path.read_text()) == {"accept_local": {"lan0": "0"}}  # before any change
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert sysctl.writes == []
    hs.apply()
    assert sysctl.values["lan0.accept_local"] == "1" and sysctl.values["lan1.accept_local"] == "1"
    # a successor (handover) or a start after a crash sees 1 but knows it was 0
    succ = HairpinSysctls(str(path))
    succ.plan(["lan0", "lan1"])
    assert succ.guard == ["lan0"]
    succ.restore()
    assert sysctl.values["lan0.accept_local"] == "0" and sysctl.values["lan1.accept_local"] == "1"
    assert not path.exists()


def test_accept_local_left_on_an_interface_no_longer_hairpinned_is_restored(
    tmp_path: Path, sysctl: FakeSysctl
) -> None:
    from vpnmasq.daemon import HairpinSysctls

    path = tmp_path / "hairpin-sysctl.json"
    first = HairpinSysctls(str(path))
    first.plan(["lan0", "lan2"])
    first.apply()  # ... then a crash, and the new config hairpins nothing
    nxt = HairpinSysctls(str(path))
    nxt.plan([])
    assert sysctl.values["lan0.accept_local"] == "0" and sysctl.values["lan2.accept_local"] == "0"
    assert nxt.guard == [] and not path.exists()
    # restore() before plan() (a start that failed early) must not forget a crashed run's record
    HairpinSysctls(str(path)).plan(["lan0"])
    assert path.exists()
    HairpinSysctls(str(path)).restore()
    assert path.exists()


def test_bare_protocol_matches_merge_into_one_set_where_the_first_stood() -> None:
    from vpnmasq.datapath.rules import _nft_matches

    assert _nft_matches(["-p udp --dport 500", "-p 47", "-p tcp --dport 1723", "-p 50", "-p 47"]) == [
        "udp dport 500",
        "meta l4proto { 47, 50 }",
        "tcp dport 1723",
    ]
    assert _nft_matches(["", "-p 50"]) == ["", "meta l4proto 50"]  # "" (everything) stays
    assert _nft_matches(["-p 50", "-p 50"]) == ["meta l4proto 50"]


def test_our_own_forward_chain_is_not_taken_for_the_admins_mark_rule() -> None:
    """``diagnose`` and the start-up hint look for a FORWARD rule accepting the mark; vpnmasq's
    own forward chain sets that mark and must not count as one (the admin still needs it)."""
    for mode in ("hybrid", "userspace"):
        ours = nft_rules(spec(mode=mode))
        listed = ours.replace("meta mark set 0x564d", "meta mark set 0x0000564d")  # as nft prints
        assert not mark_rule_in_ruleset("", ours) and not mark_rule_in_ruleset("", listed)
        assert mark_rule_in_ruleset("", listed + NFT.replace("MARKRULE", "meta mark 0x0000564d accept"))


@pytest.mark.parametrize("mode", ["userspace", "hybrid"])
def test_a_local_socket_keeps_its_packets_before_any_untracking(mode: str) -> None:
    """A packet to a pool port that a socket of the gateway owns (a resolver's query port,
    an explicit bind) is left tracked, so the UNTRACKED-only queue rules never take it: the
    socket test comes before every notrack of the chain, and only pool ports pay for it
    (not forwards, ISAKMP, ESP, GRE or ICMP)."""
    s = spec(mode=mode, public_address=None, hairpin_address="198.51.100.1",
             forwards=[("udp", 53)], alias_ranges=[(61000, 61999), (64000, 65535)])  # fmt: skip
    text = nft_rules(s)
    assert ("chain raw_hp" in text) == (mode == "userspace")  # hybrid: no hairpin forwards
    for chain in ("raw_in", "raw_hp") if mode == "userspace" else ("raw_in",):
        rules = nft_chain(text, chain)
        sockets = [i for i, r in enumerate(rules) if "socket" in r]
        untracks = [i for i, r in enumerate(rules) if r.endswith("notrack")]
        assert sockets and untracks and max(sockets) < min(untracks), rules
        for i in sockets:
            assert rules[i].endswith(" socket transparent { 0, 1 } return")
            assert "61000-61999" in rules[i] or "64000-65535" in rules[i]
            assert "dport 53 " not in rules[i] and "dport 500 " not in rules[i]
    ipt = iptables_rules(s)
    assert "-m socket" not in ipt  # the queue rules need UNTRACKED: nft decides alone
