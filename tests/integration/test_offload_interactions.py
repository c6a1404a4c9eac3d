"""Userspace mode's NAPT offload (datapath/offload.py) together with the features that replace
vpnmasq's table or its engine under it: a firewall reload (rulewatch), a SIGHUP reload, a
handover and a restart with ``state_file``. ``vpnmasq run`` runs in the lab's gateway
(harness.py); h1 keeps a UDP and a TCP session to r1's echo service open through each.

What must hold every time: the offload maps hold exactly the elements the table calls for
(refilled after a replaced table, emptied of what a reload removed, never twice), the
sessions carry on with the same public mapping, and no LAN source reaches the WAN.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    LAN,
    NFTABLES_CONF,
    PUBLIC,
    R1,
    Daemon,
    Remote,
    Sniffer,
    esp_exchange,
    gw_run,
    sock,
    wait_for,
)
from tests.waiting import ANSWER_TIMEOUT

from vpnmasq.datapath import rules
from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns

ECHO = 7


class Sessions:
    """A UDP and a TCP session from h1 to r1's echo service, kept open: ``round()`` sends
    one message on each and says whether both came back."""

    def __init__(self, topo: Topology, host: str = "h1") -> None:
        self.udp = sock(topo, host, socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.settimeout(ANSWER_TIMEOUT)
        self.udp.connect((R1, ECHO))
        self.tcp = sock(topo, host, socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.settimeout(ANSWER_TIMEOUT)
        self.tcp.connect((R1, ECHO))
        self.n = 0

    def round(self) -> bool:
        self.n += 1
        token = os.urandom(8) + self.n.to_bytes(4, "big")
        self.udp.send(token)
        self.tcp.sendall(token)
        try:
            got = b""
            while len(got) < len(token):
                chunk = self.tcp.recv(len(token) - len(got))
                if not chunk:
                    return False
                got += chunk
            while True:  # a late answer of an earlier round may still be queued
                if self.udp.recv(100) == token:
                    break
        except (TimeoutError, ConnectionError):
            return False
        return got == token

    @property
    def ports(self) -> tuple[int, int]:
        return self.udp.getsockname()[1], self.tcp.getsockname()[1]

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


@contextlib.contextmanager
def sessions(topo: Topology) -> Iterator[Sessions]:
    s = Sessions(topo)
    try:
        yield s
    finally:
        s.close()


def map_elements(topo: Topology) -> dict[str, list[str]]:
    """The elements of every offload map and set in vpnmasq's table, as nft lists them."""
    r = gw_run(topo, "nft", "-j", "list", "table", "ip", rules.NFT_TABLE)
    if r.returncode != 0:
        return {}
    out: dict[str, list[str]] = {}
    for obj in json.loads(r.stdout)["nftables"]:
        for kind in ("map", "set"):
            s = obj.get(kind)
            if s is not None:
                out[s["name"]] = sorted(
                    json.dumps(_no_counter(e), sort_keys=True) for e in s.get("elem", [])
                )
    return out


def _no_counter(e: object) -> object:
    """An element as nft -j lists it, without its counter (which moves with traffic)."""
    if isinstance(e, dict):
        return {k: _no_counter(v) for k, v in e.items() if k != "counter"}
    if isinstance(e, list):
        return [_no_counter(v) for v in e]
    return e


def napt_elements(topo: Topology) -> dict[str, list[str]]:
    return {k: v for k, v in map_elements(topo).items() if k.startswith("napt_") and v}


def outside_of(d: Daemon, proto: str, inside_port: int) -> str:
    (row,) = [r for r in d.entries(proto) if r["inside"] == f"10.77.0.11:{inside_port}"]
    return str(row["outside"])


def offloaded(topo: Topology, n: int = 2) -> bool:
    """``n`` sessions are offloaded both ways (in the kernel's maps)."""
    els = map_elements(topo)
    return len(els.get("napt_out", [])) == n and len(els.get("napt_in_addr", [])) == n


def leaked(wan: Sniffer, after: float = 0.0) -> list[object]:
    return [
        p for p in wan.seen
        if p.outgoing and p.t > after and ipaddress.IPv4Address(p.src) in LAN
    ]  # fmt: skip


def queued(d: Daemon) -> int:
    return d.counters().get("nfq_received", 0)


def kernel_carries(d: Daemon, s: Sessions, rounds: int = 5) -> None:
    """``rounds`` more rounds, none of whose packets take the queue (the maps rewrite them),
    all of which the daemon counts as forwarded by the kernel (top, metrics)."""
    q, c = queued(d), d.counters()
    for _ in range(rounds):
        assert s.round()
    assert queued(d) == q, "offloaded packets took the queue"
    for way in ("out", "in"):  # a UDP datagram and a TCP segment (at least) each round
        key = "offload_packets_" + way
        wait_for(lambda k=key: d.counters()[k] >= c[k] + 2 * rounds, f"{key} counted")


def test_firewall_reload_refills_the_napt_offload_maps(
    topo: Topology, remote: Remote, wan: Sniffer, workdir: Path
) -> None:
    d = Daemon(topo, "userspace", workdir, extra="offload = true\n").start()
    conf = workdir / "nftables.conf"
    conf.write_text(NFTABLES_CONF)
    try:
        with sessions(topo) as s:
            assert s.round() and s.round()
            wait_for(lambda: offloaded(topo), "both sessions offloaded")
            mapping = {
                p: outside_of(d, p, port) for p, port in zip(("udp", "tcp"), s.ports, strict=True)
            }
            before = napt_elements(topo)
            assert len(before["napt_out"]) == 2, before
            kernel_carries(d, s)
            for cmd in (f"nft flush ruleset; nft -f {conf}", "iptables -t mangle -F"):
                n = d.counters()["rules_restored"]
                r = gw_run(topo, "sh", "-c", cmd)
                assert r.returncode == 0, r.stderr
                wait_for(lambda n=n: d.counters()["rules_restored"] > n, f"restore after {cmd}")
                t_restored = time.time()
                wait_for(lambda: napt_elements(topo) == before, f"the maps refilled after {cmd}")
                wan.clear()
                kernel_carries(d, s)
                assert leaked(wan, t_restored) == [], cmd
                for p, port in zip(("udp", "tcp"), s.ports, strict=True):  # the same public mapping
                    assert outside_of(d, p, port) == mapping[p], cmd
                assert napt_elements(topo) == before, cmd  # nothing added twice
                assert set(remote.saw("udp")) == {(PUBLIC, int(mapping["udp"].split(":")[1]))}
        assert "offload sync failed" not in d.log() and "offload update failed" not in d.log()
    finally:
        assert d.stop() == 0
    assert not rules.installed(netns=topo.ns("gw"))


def napt_out_flows(topo: Topology) -> set[str]:
    """The sessions napt_out rewrites, as "proto inside -> remote" (status' words)."""
    out = set()
    for el in map_elements(topo).get("napt_out", []):
        concat = _find_concat(json.loads(el))
        if concat:
            proto, ip, port, rip, rport = concat
            out.add(f"{proto} {ip}:{port} -> {rip}:{rport}")
    return out


def _find_concat(obj: object) -> list[object] | None:
    if isinstance(obj, dict):
        if "concat" in obj:
            return list(obj["concat"])
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            found = _find_concat(v)
            if found:
                return found
    return None


def table_flows(d: Daemon) -> set[str]:
    return {
        f"{r['proto']} {r['inside']} -> {r['remote']}"
        for r in d.entries()
        if r["proto"] in ("udp", "tcp")
    }


def test_reload_takes_removed_sessions_out_of_the_maps_and_new_timeouts_apply(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    """SIGHUP: h2 leaves inside_networks and the UDP timeout shrinks; then a per-host limit
    removes one of h1's sessions without any rule changing. What a reload removed leaves
    the kernel maps (the kernel must not go on rewriting a mapping the engine no longer
    has); what stays is offloaded again (after a packet each way through the engine: a
    rebuilt table starts without fast-path marks), keeps its mapping, and expires by the
    new timeout."""
    d = Daemon(topo, "userspace", workdir, extra="offload = true\n").start()
    try:
        with sessions(topo) as s1, contextlib.closing(Sessions(topo, "h2")) as s2:
            assert s1.round() and s2.round() and s1.round() and s2.round()
            wait_for(lambda: offloaded(topo, 4), "four sessions offloaded")
            mapping = {
                p: outside_of(d, p, port) for p, port in zip(("udp", "tcp"), s1.ports, strict=True)
            }
            assert len(napt_out_flows(topo)) == 4 and napt_out_flows(topo) == table_flows(d)
            text = d.config_path.read_text().replace('"10.77.0.0/24"', '"10.77.0.8/30"')
            d.config_path.write_text(text + "[timeouts]\nudp = 120\n")
            d.send(signal.SIGHUP)
            wait_for(lambda: "configuration reloaded" in d.log(), "the reload")
            assert "2 entries kept, 2 removed (not-inside 2)" in d.log(), d.log()
            assert s1.round()
            wait_for(lambda: offloaded(topo, 2), "h1's sessions offloaded again")
            assert napt_out_flows(topo) == table_flows(d), (napt_out_flows(topo), table_flows(d))
            assert not any("10.77.0.12" in f for f in napt_out_flows(topo))
            kernel_carries(d, s1)
            for p, port in zip(("udp", "tcp"), s1.ports, strict=True):
                assert outside_of(d, p, port) == mapping[p]
            (row,) = [r for r in d.entries("udp") if r["inside"].startswith("10.77.0.11:")]
            assert row["offloaded"] and row["expires_in"] <= 120 + 10 + 1, row

            # no rule changes: the maps are not replaced, the sync must delete by itself
            d.config_path.write_text(
                d.config_path.read_text() + "[limits]\nmax_entries_per_host = 1\n"
            )
            d.send(signal.SIGHUP)
            wait_for(lambda: d.log().count("configuration reloaded") == 2, "the second reload")
            assert "1 entries kept, 1 removed (table-full 1)" in d.log(), d.log()
            wait_for(lambda: len(napt_out_flows(topo)) <= 1, "the removed session out of the maps")
            assert napt_out_flows(topo) <= table_flows(d), (napt_out_flows(topo), table_flows(d))
    finally:
        assert d.stop() == 0


#: the periodic save of state_file every second (instead of STATE_SAVE_INTERVAL_S)
SAVE_OFTEN = "import vpnmasq.daemon; vpnmasq.daemon.STATE_SAVE_INTERVAL_S = 1.0"


def saved(path: Path) -> int:
    """How many entries the state file holds (0: none yet)."""
    try:
        return len(json.loads(path.read_text())["entries"])
    except (OSError, ValueError, KeyError):
        return 0


class Hairpin:
    """h2 reaches h1's public UDP mapping (endpoint-independent filtering: any sender may),
    through the gateway: ``check()`` says whether h1 got it, from h2's public mapping."""

    def __init__(self, topo: Topology, d: Daemon) -> None:
        self.h1 = sock(topo, "h1", socket.AF_INET, socket.SOCK_DGRAM)
        self.h1.settimeout(ANSWER_TIMEOUT)
        self.h1.bind(("0.0.0.0", 0))
        assert self.to_remote()
        self.public = outside_of(d, "udp", self.h1.getsockname()[1])
        self.h2 = sock(topo, "h2", socket.AF_INET, socket.SOCK_DGRAM)
        self.h2.bind(("0.0.0.0", 0))
        self.seen_as: tuple[str, int] | None = None

    def to_remote(self) -> bool:
        """h1's own session with r1 (the mapping h2 reaches), one round."""
        self.h1.sendto(b"open", (R1, ECHO))
        try:
            return self.h1.recvfrom(100)[0] == b"open"
        except TimeoutError:
            return False

    def check(self) -> bool:
        addr, port = self.public.split(":")
        token = os.urandom(8)
        self.h2.sendto(token, (addr, int(port)))
        try:
            while True:
                data, src = self.h1.recvfrom(100)
                if data == token:
                    break
        except TimeoutError:
            return False
        if self.seen_as is None:
            self.seen_as = src
        return src[0] == PUBLIC and src == self.seen_as  # h2's mapping, the same each time

    def close(self) -> None:
        self.h1.close()
        self.h2.close()


@pytest.mark.parametrize("how", ["handover", "sigkill-restart"])
def test_handover_and_restart_with_napt_offload_and_hairpin(
    topo: Topology, remote: Remote, wan: Sniffer, workdir: Path, how: str
) -> None:
    """The table moves to a new process (SIGUSR2 + run --handover, or SIGKILL and a start
    that reads state_file): the new process's maps start empty and hold exactly what its
    table calls for once traffic flows (nothing twice, nothing of the old process left);
    the sessions and the hairpin keep their mappings, nothing LAN-sourced leaves."""
    state = workdir / "state.json"
    extra = f'offload = true\nfiltering = "endpoint-independent"\nstate_file = "{state}"\n'
    d = Daemon(topo, "userspace", workdir, extra=extra, python_setup=SAVE_OFTEN).start()
    try:
        with sessions(topo) as s, contextlib.closing(Hairpin(topo, d)) as hp:
            assert s.round() and s.round() and hp.check()
            wait_for(lambda: offloaded(topo, 3), "the sessions offloaded")  # + hairpin's out leg
            mapping = table_flows(d), {r["inside"]: r["outside"] for r in d.entries()}
            kernel_carries(d, s)
            if how == "handover":
                d.send(signal.SIGUSR2)
                assert d.wait() == 0
                d.start("--handover")
            else:
                wait_for(lambda: saved(state) >= 5, "the sessions in the state file")
                d.proc.kill()  # type: ignore[union-attr]
                d.wait()
                d.start()
            assert "restored" in d.log(), d.log()
            wan.clear()
            assert s.round() and hp.check() and hp.to_remote()
            wait_for(lambda: offloaded(topo, 3), "the sessions offloaded again")
            assert napt_out_flows(topo) <= table_flows(d)
            assert (table_flows(d), {r["inside"]: r["outside"] for r in d.entries()}) == mapping
            kernel_carries(d, s)
            assert hp.check()
            assert leaked(wan) == []
            off = d.status()["offload"]
            assert off["errors"] == 0 and off["elements"] == sum(
                len(v) for k, v in map_elements(topo).items() if not k.endswith("_pre")
            ), (off, map_elements(topo))
    finally:
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0
    assert not rules.installed(netns=topo.ns("gw"))


@pytest.fixture
def legacy_path(workdir: Path) -> dict[str, str]:
    """An environment whose ``iptables`` tools are iptables-legacy (as after
    ``update-alternatives --set iptables /usr/sbin/iptables-legacy``)."""
    bin_dir = workdir / "legacy-bin"
    bin_dir.mkdir()
    multi = shutil.which("xtables-legacy-multi")
    if multi is None:
        pytest.skip("xtables-legacy-multi (iptables-legacy) not installed")
    for tool in ("iptables", "iptables-save", "iptables-restore"):
        (bin_dir / tool).symlink_to(multi)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


def legacy_save(topo: Topology) -> str:
    return gw_run(topo, "iptables-legacy-save").stdout


@pytest.mark.parametrize("mode", ["userspace", "hybrid"])
def test_iptables_legacy_firewall_changes_are_repaired(
    topo: Topology,
    remote: Remote,
    wan: Sniffer,
    workdir: Path,
    legacy_path: dict[str, str],
    mode: str,
) -> None:
    """With iptables-legacy (no nftables notifications for its tables: the daemon checks
    every CANARY_INTERVAL_S), ``iptables -t mangle -F`` and ``iptables-restore`` of the
    admin's own rules are repaired, and so is an nft flush of vpnmasq's table; offloaded
    sessions (userspace mode) carry on and nothing LAN-sourced leaves after each repair."""
    d = Daemon(topo, mode, workdir, extra="offload = true\n", env=legacy_path).start()
    conf = workdir / "nftables.conf"
    conf.write_text(NFTABLES_CONF)
    ipt = workdir / "mangle.rules"  # the admin's saved rules, without vpnmasq's
    ipt.write_text(
        "*mangle\n:PREROUTING ACCEPT [0:0]\n"
        "-A PREROUTING -p tcp --dport 25 -j MARK --set-mark 7\nCOMMIT\n"
    )
    try:
        assert "-j VPNMASQ_OUT" in legacy_save(topo)
        assert "VPNMASQ" not in gw_run(topo, "iptables-nft-save").stdout  # one family only
        with sessions(topo) as s:
            assert s.round() and s.round()
            if mode == "userspace":
                wait_for(lambda: offloaded(topo), "both sessions offloaded")
            for cmd in (
                "iptables-legacy -t mangle -F",
                f"iptables-legacy-restore < {ipt}",
                f"nft flush ruleset; nft -f {conf}",
            ):
                n = d.counters()["rules_restored"]
                r = gw_run(topo, "sh", "-c", cmd)
                assert r.returncode == 0, r.stderr
                wait_for(lambda n=n: d.counters()["rules_restored"] > n, f"restore after {cmd}")
                t_restored = time.time()
                save = legacy_save(topo)
                assert "-j VPNMASQ_IN" in save and "-j VPNMASQ_OUT" in save, (cmd, save)
                assert gw_run(topo, "nft", "list", "table", "ip", rules.NFT_TABLE).returncode == 0
                if mode == "userspace":
                    wait_for(lambda: offloaded(topo), f"the maps refilled after {cmd}")
                    kernel_carries(d, s)
                else:
                    assert s.round() and s.round()
                assert leaked(wan, t_restored) == [], cmd
    finally:
        assert d.stop() == 0
    assert "VPNMASQ" not in legacy_save(topo)
    assert not rules.installed(netns=topo.ns("gw"))


def test_hybrid_reload_takes_a_removed_hosts_esp_out_of_the_maps(
    topo: Topology, remote: Remote, wan: Sniffer, workdir: Path
) -> None:
    """Hybrid mode, offload on: h1 and h2 each have an offloaded ESP pair. A SIGHUP that
    takes h2 out of inside_networks takes its ESP elements out of the kernel maps (the
    kernel must not go on masquerading it); h1's association stays offloaded."""
    d = Daemon(topo, "hybrid", workdir, extra="offload = true\n").start()
    try:
        for host, spi in (("h1", 0x1001), ("h2", 0x1002)):
            assert esp_exchange(topo, host, spi) and esp_exchange(topo, host, spi, seq=2)
        wait_for(lambda: len(map_elements(topo).get("esp_out", [])) == 2, "both ESP offloaded")
        text = d.config_path.read_text().replace('"10.77.0.0/24"', '"10.77.0.8/30"')
        d.config_path.write_text(text)
        d.send(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in d.log(), "the reload")
        assert "1 entries kept, 1 removed (not-inside 1)" in d.log(), d.log()
        wait_for(
            lambda: len(map_elements(topo).get("esp_out", [])) == 1, "h2's ESP out of the maps"
        )
        els = map_elements(topo)
        assert not any("10.77.0.12" in el for v in els.values() for el in v), els
        assert len(els["esp_in"]) == 1
        q = queued(d)
        assert esp_exchange(topo, "h1", 0x1001, seq=3)
        assert queued(d) == q  # h1's ESP: still the kernel's both ways
    finally:
        assert d.stop() == 0
