"""The kernel fast path (vpnmasq.datapath.offload) on real packets, offload on and off.

inside 10.77.0.2 -- gw (vpnmasq's hybrid rules, the engine behind an in-process queue) --
remote 203.0.113.10 (and 198.51.100.2 on its link, the "attacker" address).

The engine learns an ESP association and a PPTP call from packets it is handed directly (the
same transcript builders as the scenario tests); then real ESP and GRE packets cross the
gateway. With the Offloader synced, the kernel rewrites them (the queue never sees them);
without it, or for a key that is not in the maps, they take the queue and the engine decides.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import GatewayTopology, Lab, QueuedEngine

from vpnmasq.config import Config
from vpnmasq.datapath import rules
from vpnmasq.datapath.offload import Element, Offloader, element_commands
from vpnmasq.engine import Engine
from vpnmasq.helpers import available
from vpnmasq.packet.ipv4 import build_ipv4, ip_to_int
from vpnmasq.packet.l4 import build_esp, build_gre_v1
from vpnmasq.verdict import Direction

# tests/integration is not a package: make the shared test vocabulary importable on its own
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.pptp_wire import ControlLink  # noqa: E402
from tests.waiting import ANSWER_TIMEOUT, wait_until  # noqa: E402

pytestmark = pytest.mark.netns

QUEUE = 23
MARK = 0x564D
SPI_OUT, SPI_IN = 0x1001, 0x2001
LAN_CALL, PAC_CALL = 0x0101, 0x4000


class Gateway(QueuedEngine):
    """vpnmasq's hybrid rules, and the engine behind the gw's queue."""

    def __init__(self, lab: Lab, t: GatewayTopology) -> None:
        cfg = Config(
            inside_networks=(t.inside_net,),
            public_address=t.public,
            mode="hybrid",
            helpers=tuple(h for h in Config().helpers if h in available()),
        )
        rules.install(spec(t), netns=lab.ns(t.gw))
        super().__init__(lab, t.gw, QUEUE, Engine(cfg, rng_seed=7), MARK)


@pytest.fixture
def gw(lab: Lab, gw_topo: GatewayTopology) -> Iterator[Gateway]:
    g = Gateway(lab, gw_topo)
    yield g
    g.worker.stop()


def associate(g: Gateway, t: GatewayTopology) -> None:
    """An ESP SPI pair and an established PPTP call, learned by the engine."""
    eng, now = g.engine, time.monotonic()
    inside, remote, pub = ip_to_int(t.inside_host), ip_to_int(t.remote_host), ip_to_int(t.public)
    with g.lock:
        assert eng.handle(build_ipv4(inside, remote, 50, build_esp(SPI_OUT, 1)), Direction.OUTBOUND, now).accepted
        assert eng.handle(build_ipv4(remote, pub, 50, build_esp(SPI_IN, 1)), Direction.INBOUND, now).accepted
        link = ControlLink(eng, inside, 40000, remote).open(now)
        link.start_session(now)
        outside = link.outgoing_call(LAN_CALL, PAC_CALL, now)
    assert outside == LAN_CALL  # kept: it was free


def spec(t: GatewayTopology, off: Offloader | None = None) -> rules.RuleSpec:
    return rules.RuleSpec(t.gw_wan_if, [t.inside_net], t.public, mode="hybrid", queue_num=QUEUE,
                          extra=off.rules() if off is not None else None)  # fmt: skip


def offloader(lab: Lab, t: GatewayTopology) -> Offloader:
    """An Offloader and vpnmasq's rules with its maps (as the daemon installs them: a
    handover's replace, which starts with empty maps)."""
    o = Offloader(t.public, t.gw_wan_if, MARK, netns=lab.ns(t.gw))
    rules.replace(spec(t, o), netns=lab.ns(t.gw))
    return o


def raw(lab: Lab, role: str, proto: int, bind: str | None = None) -> socket.socket:
    s = lab.socket(role, socket.AF_INET, socket.SOCK_RAW, proto)
    if bind:
        s.bind((bind, 0))
    return s


def received(sock: socket.socket, timeout: float = ANSWER_TIMEOUT) -> list[bytes]:
    """IP datagrams a raw socket got within ``timeout`` (after the first, 0.2 s more)."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return out
        out.append(sock.recv(65535))
        deadline = min(deadline, time.monotonic() + 0.2)


def esp_of(data: bytes) -> tuple[str, str, int]:
    src, dst = socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20])
    return src, dst, struct.unpack_from("!I", data, 20)[0]


def gre_of(data: bytes) -> tuple[str, str, int]:
    src, dst = socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20])
    return src, dst, struct.unpack_from("!H", data, 26)[0]


def exchange(
    lab: Lab, t: GatewayTopology, *, gw: Gateway | None = None, dropped: tuple[str, ...] = ()
) -> dict[str, list[tuple[str, str, int]]]:
    """One ESP and one GRE packet each way; what arrived at the far ends.

    Each side waits as long as it takes for a packet, except those named in ``dropped``
    (e.g. "gre_in": expected to be queued and dropped by ``gw``'s engine): for them it waits
    until the engine has seen both packets of the protocol, then only briefly."""
    got: dict[str, list[tuple[str, str, int]]] = {}
    for proto, name, out_pl, in_pl, parse in (
        (50, "esp", build_esp(SPI_OUT, 2), build_esp(SPI_IN, 2), esp_of),
        (47, "gre", build_gre_v1(PAC_CALL, b"\xff\x03\x00\x21"), build_gre_v1(LAN_CALL, b"\xff\x03\x00\x21"), gre_of),
    ):
        at_remote, at_inside = raw(lab, t.remote, proto), raw(lab, t.inside, proto)
        queued = gw.queued_count(proto) if gw else 0
        raw(lab, t.inside, proto).sendto(out_pl, (t.remote_host, 0))
        raw(lab, t.remote, proto, bind=t.remote_host).sendto(in_pl, (t.public, 0))
        if gw is not None and {name + "_out", name + "_in"} & set(dropped):
            wait_until(
                lambda g=gw, p=proto, n=queued + 2: g.queued_count(p) >= n,
                what=f"{name} queued",
            )
        for key, sock in ((name + "_out", at_remote), (name + "_in", at_inside)):
            got[key] = [parse(d) for d in received(sock, 0.5 if key in dropped else ANSWER_TIMEOUT)]
    return got


EXPECTED = {
    "esp_out": [("198.51.100.1", "203.0.113.10", SPI_OUT)],
    "esp_in": [("203.0.113.10", "10.77.0.2", SPI_IN)],
    "gre_out": [("198.51.100.1", "203.0.113.10", PAC_CALL)],
    "gre_in": [("203.0.113.10", "10.77.0.2", LAN_CALL)],
}


def test_offloaded_flows_are_rewritten_by_the_kernel_and_credited(
    lab: Lab, gw_topo: GatewayTopology, gw: Gateway
) -> None:
    t = gw_topo
    associate(gw, t)
    off = offloader(lab, t)
    with gw.lock:
        rep = off.sync(gw.engine, time.monotonic())
    assert rep.added == 5 and rep.offloaded == 5
    q_esp, q_gre = gw.queued_count(50), gw.queued_count(47)
    assert exchange(lab, t) == EXPECTED
    assert (gw.queued_count(50), gw.queued_count(47)) == (q_esp, q_gre)  # the kernel did it
    # the engine hears about it at the next sync: counters and a refreshed timeout
    (esp,) = [e for e in gw.engine.table if e.kind == "esp"]
    before = (esp.pkts_out, esp.pkts_in)
    with gw.lock:
        rep = off.sync(gw.engine, time.monotonic())
    assert rep.credited == 2
    assert (esp.pkts_out, esp.pkts_in) == (before[0] + 1, before[1] + 1)
    flows = off.status()["flows"]
    assert {f["proto"] for f in flows} == {"esp", "gre"}
    assert all(f["kernel_pkts_in"] == 1 and f["kernel_pkts_out"] == 1 for f in flows)
    # an ended flow leaves the maps; its packets meet the engine again
    with gw.lock:
        gw.engine.flush()
        rep = off.sync(gw.engine, time.monotonic())
    assert rep.removed == 5 and rep.offloaded == 0
    got = exchange(lab, t, gw=gw, dropped=("gre_out", "gre_in", "esp_in"))
    assert (gw.queued_count(50), gw.queued_count(47)) == (q_esp + 2, q_gre + 2)
    assert got["gre_out"] == got["gre_in"] == []  # the call is gone: the engine drops its GRE
    assert got["esp_out"] == EXPECTED["esp_out"]  # ESP starts afresh through the engine
    rules.replace(spec(t), netns=lab.ns(t.gw))  # offload off: the maps go with the rules
    assert "esp_in" not in lab.run(t.gw, ["nft", "list", "table", "ip", rules.NFT_TABLE]).stdout


def _probe_counts(lab: Lab, t: GatewayTopology) -> dict[str, int]:
    """Packets counted by the probes of :func:`test_offloaded_packets_skip_vpnmasqs_chains`."""
    counts: dict[str, int] = {}
    for ln in lab.run(t.gw, ["iptables-save", "-c", "-t", "mangle"]).stdout.splitlines():
        if ln.startswith("[") and " -A VPNMASQ_" in ln and " -j " not in ln:
            n, rest = ln[1:].split(":", 1)[0], ln.split("] ", 1)[1]
            counts[rest] = int(n)
    nft = lab.run(t.gw, ["nft", "list", "table", "ip", rules.NFT_TABLE]).stdout
    for chain in ("raw_in", "raw_out"):
        body = nft.split(f"chain {chain} {{", 1)[1]
        counts[chain] = int(body.split("counter packets ", 1)[1].split()[0])
    return counts


def test_offloaded_packets_skip_vpnmasqs_chains(lab: Lab, gw_topo: GatewayTopology, gw: Gateway) -> None:
    """Why offloaded flows run near the kernel's speed (rules module docstring): their
    packets never reach vpnmasq's classification (nft raw_in/raw_out) nor its queue chains
    (VPNMASQ_IN/OUT), in either direction. Probes count ESP/GRE at the top of each; a packet
    that misses the maps shows that the probes count."""
    t = gw_topo
    associate(gw, t)
    off = offloader(lab, t)
    with gw.lock:
        assert off.sync(gw.engine, time.monotonic()).offloaded == 5
    for chain in ("VPNMASQ_IN", "VPNMASQ_OUT"):
        lab.run(t.gw, ["iptables", "-t", "mangle", "-I", chain, "1", "-p", "50"])
        lab.run(t.gw, ["iptables", "-t", "mangle", "-I", chain, "1", "-p", "47"])
    for chain in ("raw_in", "raw_out"):
        lab.run(t.gw, ["nft", "insert", "rule", "ip", rules.NFT_TABLE, chain,
                       "meta", "l4proto", "{", "47", ",", "50", "}", "counter"])  # fmt: skip
    assert exchange(lab, t) == EXPECTED
    assert set(_probe_counts(lab, t).values()) == {0}, _probe_counts(lab, t)
    # not offloaded: a replayed SPI from another address goes through both
    raw(lab, t.remote, 50, bind=t.remote_link).sendto(build_esp(SPI_IN, 9), (t.public, 0))
    wait_until(lambda: _probe_counts(lab, t)["-A VPNMASQ_IN -p esp"] == 1, what="replay queued")
    assert _probe_counts(lab, t)["raw_in"] == 1


def test_without_offload_the_same_packets_take_the_queue(
    lab: Lab, gw_topo: GatewayTopology, gw: Gateway
) -> None:
    associate(gw, gw_topo)
    q_esp, q_gre = gw.queued_count(50), gw.queued_count(47)
    assert exchange(lab, gw_topo) == EXPECTED
    assert gw.queued_count(50) == q_esp + 2 and gw.queued_count(47) == q_gre + 2


def test_a_replayed_spi_or_call_id_from_another_address_misses_the_maps(
    lab: Lab, gw_topo: GatewayTopology, gw: Gateway
) -> None:
    t = gw_topo
    associate(gw, t)
    off = offloader(lab, t)
    with gw.lock:
        off.sync(gw.engine, time.monotonic())
    at_inside = {p: raw(lab, t.inside, p) for p in (50, 47)}
    q = gw.queued_count(50), gw.queued_count(47)
    # the remote's link address (not the associated one) replays the SPI and the Call ID
    raw(lab, t.remote, 50, bind=t.remote_link).sendto(build_esp(SPI_IN, 9), (t.public, 0))
    raw(lab, t.remote, 47, bind=t.remote_link).sendto(build_gre_v1(LAN_CALL, b"\xff\x03"), (t.public, 0))
    wait_until(lambda: (gw.queued_count(50), gw.queued_count(47)) >= (q[0] + 1, q[1] + 1),
               what="both replays queued")  # fmt: skip
    assert received(at_inside[50], 0.5) == [] and received(at_inside[47], 0.5) == []
    assert (gw.queued_count(50), gw.queued_count(47)) == (q[0] + 1, q[1] + 1)  # the engine saw them


def test_after_a_restart_the_maps_are_refilled_from_the_table(
    lab: Lab, gw_topo: GatewayTopology, gw: Gateway
) -> None:
    """A successor daemon (handover) replaces the rules, maps included: they start empty and
    its first sync fills them from the table it took over; meanwhile the engine translates."""
    t = gw_topo
    associate(gw, t)
    first = offloader(lab, t)
    with gw.lock:
        first.sync(gw.engine, time.monotonic())
    exchange(lab, t)
    q_esp = gw.queued_count(50)
    second = offloader(lab, t)  # a new daemon: the rules replaced
    assert second.read() == {}
    assert exchange(lab, t) == EXPECTED  # through the engine
    assert gw.queued_count(50) == q_esp + 2
    with gw.lock:
        rep = second.sync(gw.engine, time.monotonic())
    assert (rep.added, rep.removed, rep.offloaded) == (5, 0, 5)
    assert exchange(lab, t) == EXPECTED
    assert gw.queued_count(50) == q_esp + 2  # the kernel again
    # elements nobody asked for (a crash between two commands of an older daemon) go
    stale = Element("esp_in", (ip_to_int(t.remote_host), 0x7777), ip_to_int("10.77.0.99"))
    lab.run(t.gw, ["nft", "-f", "-"], input=element_commands([stale], []))
    with gw.lock:
        assert second.sync(gw.engine, time.monotonic()).removed == 1
    assert stale not in second.read()
