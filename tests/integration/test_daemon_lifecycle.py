"""``vpnmasq run`` life cycle in a namespace lab: clean stop, crash (SIGKILL: fail closed,
then a restart cleans up), an address change on the outside interface, the handover
(SIGUSR2 + ``run --handover``) and ``state_file`` across a restart. Harness: harness.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess

import pytest
from harness import (
    NEW_PUBLIC,
    PUBLIC,
    R1,
    Daemon,
    PptpCall,
    RawPeer,
    Remote,
    Sniffer,
    esp_exchange,
    gre_v0_exchange,
    gw_run,
    ike_echo,
    iptables_save,
    ours_installed,
    ping,
    tcp_echo,
    udp_echo,
    wait_for,
)
from tests.waiting import ANSWER_TIMEOUT

from vpnmasq.datapath import rules
from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns
MODES = ["hybrid", "userspace"]
#: run the daemon with an idle poll of an hour instead of ADDRESS_POLL_S
LONG_IDLE_POLL = "import vpnmasq.daemon; vpnmasq.daemon.ADDRESS_POLL_S = 3600.0"


def ours(mode: str) -> int:
    """How many jumps to vpnmasq's chains the daemon installs in this lab (see
    test_clean_stop_removes_exactly_our_rules)."""
    return 5 if mode == "userspace" else 4


def jumps(save: str) -> list[str]:
    """Rules in built-in chains that jump to one of ours."""
    return [ln for ln in save.splitlines() if re.match(r"-A [A-Z]+ .*-j VPNMASQ_", ln)]


@pytest.mark.parametrize("mode", MODES)
def test_clean_stop_removes_exactly_our_rules(topo: Topology, workdir, mode: str) -> None:
    gw = topo.ns("gw")
    for rule in (  # the admin's own rules, in tables vpnmasq also uses
        "-A FORWARD -p tcp --dport 25 -j DROP",
        "-t mangle -A PREROUTING -i lan0 -j MARK --set-mark 7",
        "-t raw -A PREROUTING -p udp --dport 53 -j CT --notrack",
    ):
        assert gw_run(topo, "iptables", *rule.split()).returncode == 0
    before = iptables_save(topo)
    # idle, the daemon's poll would sleep for an hour (ADDRESS_POLL_S): it stops (within the
    # generous DEADLINE of Daemon.wait) only because the signal ends the poll at once
    d = Daemon(topo, mode, workdir, python_setup=LONG_IDLE_POLL).start()
    assert ours_installed(topo)
    # mangle PREROUTING, POSTROUTING once per inside network (two here), and mangle OUTPUT
    # for the gateway's own ICMP errors; in userspace mode PREROUTING once more for packets
    # from the LAN to the public address (every mapping hairpins); the rest is vpnmasq's
    # nft table
    assert len(jumps(iptables_save(topo))) == ours(mode)
    assert d.stop(signal.SIGTERM) == 0
    assert not ours_installed(topo)
    assert not rules.forward_mark_rule_present(netns=gw)
    after = iptables_save(topo)
    assert (
        "VPNMASQ" not in after
        and "vpnmasq"
        not in subprocess.run(
            ["ip", "netns", "exec", gw, "nft", "list", "ruleset"], capture_output=True, text=True
        ).stdout
    )
    # nothing else was touched (built-in chains iptables created for our jumps stay, empty)
    assert [ln for ln in before.splitlines() if ln.startswith("-A")] == [
        ln for ln in after.splitlines() if ln.startswith("-A")
    ]
    assert len([ln for ln in after.splitlines() if ln.startswith("-A")]) == 3
    assert "rules removed; vpnmasq stopped" in d.log()
    assert not os.path.exists(d.socket_path)


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_fails_closed_and_a_restart_cleans_up(
    topo: Topology, remote: Remote, wan: Sniffer, workdir, mode: str
) -> None:
    d = Daemon(topo, mode, workdir).start()
    assert esp_exchange(topo, "h1", 0x1001)
    d.send(signal.SIGKILL)
    d.wait()
    assert ours_installed(topo)  # its rules stay, nobody reads the queue
    wan.clear()
    # owned traffic in both modes: dropped, never leaked with the LAN address
    assert not esp_exchange(topo, "h1", 0x1001, timeout=0.3)
    assert not gre_v0_exchange(topo, "h1", timeout=0.3)
    assert not ike_echo(topo, "h1", timeout=0.3)
    for host in ("h1", "h2"):
        call_failed = False
        try:
            PptpCall(topo, host, call_id=3, timeout=0.3).close()
        except (OSError, AssertionError):
            call_failed = True
        assert call_failed
    # hybrid: the kernel must answer plain traffic (as long as it takes); userspace: nothing
    # may come back, so a short wait is enough
    plain_wait = ANSWER_TIMEOUT if mode == "hybrid" else 0.3
    plain_ok = udp_echo(topo, "h1", timeout=plain_wait)
    ping_ok = ping(topo, "h2", timeout=plain_wait)
    tcp_ok = tcp_echo(topo, "h2", timeout=plain_wait)
    assert wan.leaked() == [], wan.leaked()
    if mode == "hybrid":  # plain traffic is the kernel's: unaffected, with the public source
        assert plain_ok and ping_ok and tcp_ok
        assert {p.src for p in wan.seen if p.outgoing} == {PUBLIC}
    else:  # everything is owned: nothing at all leaves
        assert not (plain_ok or ping_ok or tcp_ok)
        assert [p for p in wan.seen if p.outgoing] == []

    d.start()  # the restart removes the leftovers and installs once
    assert "rules installed" in d.log()
    save = iptables_save(topo)
    assert len(jumps(save)) == ours(mode), jumps(save)  # see test_clean_stop_removes_exactly_our_rules
    assert save.count(":VPNMASQ_OUT ") == 1
    assert esp_exchange(topo, "h1", 0x1001) and udp_echo(topo, "h1")
    assert wan.leaked() == []
    assert d.stop() == 0 and not ours_installed(topo)


@pytest.mark.parametrize("mode", MODES)
def test_an_address_change_on_the_outside_interface_is_followed(
    topo: Topology, remote: Remote, wan: Sniffer, workdir, mode: str
) -> None:
    d = Daemon(topo, mode, workdir).start()
    assert esp_exchange(topo, "h1", 0x1001) and udp_echo(topo, "h1")
    ip = ["ip", "-n", topo.ns("gw"), "addr"]
    # a DHCP renew: the new address comes first, then the old one goes
    subprocess.run([*ip, "add", f"{NEW_PUBLIC}/24", "dev", "wan0"], check=True)
    subprocess.run([*ip, "del", f"{PUBLIC}/24", "dev", "wan0"], check=True)
    wait_for(lambda: f"public address {PUBLIC} -> {NEW_PUBLIC}" in d.log(), "the change")
    wan.clear()
    assert esp_exchange(topo, "h1", 0x1001)
    assert udp_echo(topo, "h1") and ike_echo(topo, "h1")
    out = [p for p in wan.seen if p.outgoing]
    assert {p.src for p in out} == {NEW_PUBLIC}, out
    assert {p.proto for p in out} >= {50, 17}
    assert wan.leaked() == []
    assert (NEW_PUBLIC, 0x1001) in remote.saw("esp")
    esp = [r for r in d.entries() if r["proto"] == "esp"]
    assert [r["outside"] for r in esp] == [NEW_PUBLIC]
    assert d.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_handover_keeps_an_established_esp_association(
    topo: Topology, remote: Remote, wan: Sniffer, workdir, mode: str
) -> None:
    # the queue's path: offloaded flows keep passing in the gap (test_offload_behaviour.py)
    old = Daemon(topo, mode, workdir, extra="offload = false\n").start()
    assert esp_exchange(topo, "h1", 0x1001) and esp_exchange(topo, "h1", 0x1001, seq=2)
    assert old.counters().get("esp:associated:serialized") == 1
    handover_file = workdir / "handover.json"

    old.send(signal.SIGUSR2)
    assert old.wait() == 0
    assert "handover: table saved to" in old.log()
    assert ours_installed(topo)  # rules (and the queue number) stay
    assert stat.S_IMODE(handover_file.stat().st_mode) == 0o600
    saved = json.loads(handover_file.read_text())
    assert saved["version"] == 1 and [e["kind"] for e in saved["entries"]] == ["esp"]

    # the gap: owned packets are dropped, not leaked
    wan.clear()
    assert not esp_exchange(topo, "h1", 0x1001, timeout=0.3, seq=3)
    assert wan.leaked() == [] and [p for p in wan.seen if p.outgoing] == []

    new = Daemon(topo, mode, workdir, extra="offload = false\n")
    new.start("--handover")
    log = new.log()
    assert "rules taken over" in log and "restored 1 entries (esp 1)" in log, log
    assert not handover_file.exists()  # consumed
    # the remote speaks first on the old SA: the restored association delivers it (a
    # fresh table would drop it as unassociated), then the LAN host answers
    lan = RawPeer(topo, "h1", 50)
    try:
        lan.drain()
        remote.send_esp(PUBLIC, 0x2001)
        got = lan.recv(ANSWER_TIMEOUT)
        assert got is not None and got[0] == R1 and got[1][:4] == (0x2001).to_bytes(4, "big")
    finally:
        lan.close()
    assert esp_exchange(topo, "h1", 0x1001, seq=4)
    c = new.counters()
    assert not any(k.startswith(("esp:associated", "created:esp")) for k in c), c
    [row] = new.entries("esp")
    assert row["detail"]["spi_in"] == "0x00002001" and row["pkts_in"] >= 4
    assert wan.leaked() == []
    assert new.stop() == 0 and not ours_installed(topo)


def test_state_file_carries_the_table_across_a_restart(
    topo: Topology, remote: Remote, workdir
) -> None:
    state_file = workdir / "lib" / "state.json"
    d = Daemon(topo, "hybrid", workdir)
    d.write_config(f'state_file = "{state_file}"\n')
    d.start()
    assert esp_exchange(topo, "h1", 0x1001) and ike_echo(topo, "h1")
    assert d.stop() == 0  # saved at stop, rules removed
    assert not ours_installed(topo)
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_file.parent.stat().st_mode) == 0o700

    d.start()
    assert "restored 2 entries (esp 1, isakmp 1)" in d.log(), d.log()
    lan = RawPeer(topo, "h1", 50)
    try:
        lan.drain()
        remote.send_esp(PUBLIC, 0x2001)
        assert lan.recv(ANSWER_TIMEOUT) is not None  # the remote speaks first: still associated
    finally:
        lan.close()
    assert d.stop() == 0

    state_file.write_text('{"format": "vpnmasq-state", "version": 99}')
    d.start()  # incompatible: reported, ignored, empty table
    assert "ignoring the saved table" in d.log() and "newer vpnmasq" in d.log()
    assert d.entries() == []
    assert d.stop() == 0

    state_file.write_bytes(b"\x00garbage")
    d.start()
    assert "corrupt" in d.log() and d.entries() == []
    assert d.stop() == 0


def test_without_state_file_every_start_begins_empty(
    topo: Topology, remote: Remote, workdir
) -> None:
    d = Daemon(topo, "userspace", workdir).start()
    assert esp_exchange(topo, "h1", 0x1001) and udp_echo(topo, "h1")
    assert d.stop() == 0
    assert os.listdir(workdir) == ["vpnmasq.toml", "daemon-0.log"] or set(os.listdir(workdir)) == {
        "vpnmasq.toml",
        "daemon-0.log",
    }
    d.start()
    assert d.entries() == [] and "restored" not in d.log()
    assert d.stop() == 0


def test_a_second_instance_does_not_touch_the_first(
    topo: Topology, remote: Remote, workdir
) -> None:
    first = Daemon(topo, "userspace", workdir).start()
    other = workdir / "second"
    other.mkdir()
    second = Daemon(topo, "userspace", other)
    second.start(wait=False)
    assert second.wait() == 1
    assert "NFQUEUE 0 is bound by another process" in second.log()
    assert ours_installed(topo) and esp_exchange(topo, "h1", 0x1001)  # first one unharmed
    assert first.stop() == 0


def test_rules_replace_swaps_without_removing(topo: Topology) -> None:
    gw = topo.ns("gw")
    a = rules.RuleSpec("wan0", ["10.77.0.0/24"], None, mode="hybrid")
    b = rules.RuleSpec("wan0", ["10.77.0.0/24", "10.88.0.0/24"], None, mode="userspace")
    rules.replace(a, netns=gw)  # from nothing
    first = iptables_save(topo)
    assert len(jumps(first)) == 2  # PREROUTING -> VPNMASQ_IN, POSTROUTING -> VPNMASQ_OUT
    rules.replace(b, netns=gw)
    second = iptables_save(topo)
    assert len(jumps(second)) == 3 and "10.88.0.0/24" in second  # one OUT jump per network
    nft = subprocess.run(
        ["ip", "netns", "exec", gw, "nft", "list", "table", "ip", "vpnmasq"],
        capture_output=True,
        text=True,
    ).stdout
    assert "chain raw {" in nft and "masquerade" not in nft  # userspace: no kernel masquerade
    rules.install(a, netns=gw)
    rules.replace(a, netns=gw)
    assert iptables_save(topo).count("-j VPNMASQ_IN\n") == 1
    rules.remove(netns=gw)
    assert not rules.installed(netns=gw)
