"""Userspace mode's kernel fast path for plain sessions (vpnmasq.datapath.offload) on real
traffic: TCP, UDP and ICMP echo, each filtering behaviour, ICMP errors, SYN/FIN.

inside 10.77.0.2 -- gw (vpnmasq's userspace rules, the engine behind an in-process queue,
an Offloader following its table) -- remote 203.0.113.10 (and 198.51.100.2 on its link).

Sockets in the inside and remote namespaces talk through the gateway. The first packets of
a session take the queue (the engine decides the mapping); once the offloader has put the
session into the maps, the kernel rewrites the rest, and probes at the top of vpnmasq's
chains (the same method as test_offload.py's for ESP/GRE) show they never get there.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import GatewayTopology, Lab, QueuedEngine

from vpnmasq.config import Config
from vpnmasq.datapath import rules
from vpnmasq.datapath.offload import Offloader
from vpnmasq.engine import Engine
from vpnmasq.helpers import available
from vpnmasq.packet.checksum import checksum
from vpnmasq.packet.ipv4 import ip_to_int
from vpnmasq.packet.l4 import build_udp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.waiting import ANSWER_TIMEOUT, wait_until  # noqa: E402

pytestmark = pytest.mark.netns

QUEUE = 24
MARK = 0x564D
APDF = "address-port-dependent"
EIF = "endpoint-independent"


class Gateway(QueuedEngine):
    """The engine behind the gw's queue and an Offloader on its table; ``lock`` serialises
    both with the test thread (the daemon's loop does the same in one thread)."""

    def __init__(self, lab: Lab, t: GatewayTopology, filtering: str) -> None:
        cfg = Config(
            inside_networks=(t.inside_net,),
            public_address=t.public,
            mode="userspace",
            filtering=filtering,  # type: ignore[arg-type]
            helpers=tuple(h for h in Config().helpers if h in available()),
        )
        self.off = Offloader(t.public, t.gw_wan_if, MARK, netns=lab.ns(t.gw), filtering=filtering)
        engine = Engine(cfg, rng_seed=7)
        spec = rules.RuleSpec(t.gw_wan_if, [t.inside_net], t.public, mode="userspace",
                              queue_num=QUEUE, extra=self.off.rules(),
                              alias_ranges=engine.pool.alias_ranges)  # fmt: skip
        rules.install(spec, netns=lab.ns(t.gw))
        super().__init__(lab, t.gw, QUEUE, engine, MARK)
        self.off.attach(self.engine.table)

    def offload(self) -> int:
        """What the daemon does after a loop step; the number of elements offloaded."""
        with self.lock:
            self.off.quick(time.monotonic() + 1.0)  # past the batching interval
            return len(self.off.offloaded)

    def sync(self) -> None:
        with self.lock:
            self.off.sync(self.engine, time.monotonic())


@pytest.fixture(params=[APDF, EIF])
def gw(request: pytest.FixtureRequest, lab: Lab, gw_topo: GatewayTopology) -> Iterator[Gateway]:
    g = Gateway(lab, gw_topo, request.param)
    yield g
    g.worker.stop()


@pytest.fixture
def apdf(lab: Lab, gw_topo: GatewayTopology) -> Iterator[Gateway]:
    g = Gateway(lab, gw_topo, APDF)
    yield g
    g.worker.stop()


def udp(lab: Lab, role: str, addr: str, port: int) -> socket.socket:
    s = lab.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    s.settimeout(ANSWER_TIMEOUT)
    return s


def udp_session(lab: Lab, t: GatewayTopology) -> tuple[socket.socket, socket.socket, tuple[str, int]]:
    """A UDP session inside:40000 <-> remote:7777 through the engine (one datagram each way):
    the remote's socket, the inside socket, and the mapping the remote saw."""
    srv, cli = udp(lab, t.remote, t.remote_host, 7777), udp(lab, t.inside, t.inside_host, 40000)
    cli.sendto(b"first", (t.remote_host, 7777))
    _, seen_as = srv.recvfrom(100)
    srv.sendto(b"back", seen_as)
    assert cli.recvfrom(100) == (b"back", (t.remote_host, 7777))
    return srv, cli, seen_as


def probes(lab: Lab, t: GatewayTopology) -> dict[str, int]:
    """Packets of TCP/UDP/ICMP counted at the top of vpnmasq's chains (see _add_probes)."""
    counts: dict[str, int] = {}
    for ln in lab.run(t.gw, ["iptables-save", "-c", "-t", "mangle"]).stdout.splitlines():
        if ln.startswith("[") and " -A VPNMASQ_" in ln and " -j " not in ln:
            counts[ln.split("] ", 1)[1]] = int(ln[1:].split(":", 1)[0])
    nft = lab.run(t.gw, ["nft", "list", "table", "ip", rules.NFT_TABLE]).stdout
    for chain in ("raw_in", "raw_out"):
        body = nft.split(f"chain {chain} {{", 1)[1]
        counts[chain] = int(body.split("counter packets ", 1)[1].split()[0])
    return counts


def add_probes(lab: Lab, t: GatewayTopology) -> None:
    for chain in ("VPNMASQ_IN", "VPNMASQ_OUT"):
        for proto in ("tcp", "udp", "icmp"):
            lab.run(t.gw, ["iptables", "-t", "mangle", "-I", chain, "1", "-p", proto])
    for chain in ("raw_in", "raw_out"):
        lab.run(t.gw, ["nft", "insert", "rule", "ip", rules.NFT_TABLE, chain,
                       "meta", "l4proto", "{", "tcp", ",", "udp", ",", "icmp", "}", "counter"])  # fmt: skip


def echo_id(data: bytes) -> int:
    return int(struct.unpack_from("!H", data, 24)[0])


def ping(sock: socket.socket, dst: str, ident: int, seq: int) -> bytes:
    """One echo request from a raw ICMP socket; the matching reply (IP header included)."""
    msg = bytearray(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"vpnmasq")
    struct.pack_into("!H", msg, 2, checksum(msg))
    sock.sendto(bytes(msg), (dst, 0))
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while time.monotonic() < deadline:
        data = sock.recv(2048)
        if data[20] == 0 and echo_id(data) == ident and struct.unpack_from("!H", data, 26)[0] == seq:
            assert checksum(data[20:]) == 0
            return data
    raise AssertionError("no echo reply")


def transfer(src: socket.socket, dst: socket.socket, blob: bytes) -> bytes:
    sender = threading.Thread(target=src.sendall, args=(blob,), daemon=True)
    sender.start()
    got = bytearray()
    while len(got) < len(blob):
        chunk = dst.recv(65536)
        assert chunk, "connection closed"
        got += chunk
    sender.join(ANSWER_TIMEOUT)
    return bytes(got)


def test_established_sessions_bypass_the_queue_both_ways(
    lab: Lab, gw_topo: GatewayTopology, gw: Gateway
) -> None:
    t = gw_topo
    # UDP: the first exchange through the engine decides the mapping
    srv, cli = udp(lab, t.remote, t.remote_host, 7777), udp(lab, t.inside, t.inside_host, 40000)
    cli.sendto(b"first", (t.remote_host, 7777))
    _, seen_as = srv.recvfrom(100)
    srv.sendto(b"back", seen_as)
    assert cli.recvfrom(100) == (b"back", (t.remote_host, 7777))
    # TCP: handshake and a little data through the engine
    ls = lab.socket(t.remote, socket.AF_INET, socket.SOCK_STREAM)
    ls.bind((t.remote_host, 7778))
    ls.listen()
    ls.settimeout(ANSWER_TIMEOUT)
    c = lab.socket(t.inside, socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(ANSWER_TIMEOUT)
    c.connect((t.remote_host, 7778))
    s, tcp_seen_as = ls.accept()
    s.settimeout(ANSWER_TIMEOUT)
    c.sendall(b"hello")
    assert s.recv(100) == b"hello"
    s.sendall(b"world")
    assert c.recv(100) == b"world"
    # ICMP echo
    ic = lab.socket(t.inside, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ic.settimeout(ANSWER_TIMEOUT)
    ping(ic, t.remote_host, 0x4242, 1)
    assert gw.offload() == 9  # three elements per session
    add_probes(lab, t)
    q = {p: gw.queued_count(p) for p in (1, 6, 17)}
    # now the kernel: UDP both ways, a TCP bulk transfer both ways, pings
    for i in range(20):
        cli.sendto(b"x%d" % i, (t.remote_host, 7777))
        data, a = srv.recvfrom(100)
        assert (data, a) == (b"x%d" % i, seen_as)
        srv.sendto(data, a)
        assert cli.recvfrom(100) == (data, (t.remote_host, 7777))
    blob = bytes(range(256)) * 4096  # 1 MiB each way, read while it is written
    assert transfer(c, s, blob) == blob
    assert transfer(s, c, blob) == blob
    for seq in range(2, 5):
        reply = ping(ic, t.remote_host, 0x4242, seq)
        assert socket.inet_ntoa(reply[12:16]) == t.remote_host
    assert {p: gw.queued_count(p) for p in (1, 6, 17)} == q  # none took the queue
    assert set(probes(lab, t).values()) == {0}, probes(lab, t)
    # the engine hears about it at the next sync
    (ue,) = [e for e in gw.engine.table if e.kind == "napt" and e.proto == 17]
    before = (ue.pkts_out, ue.pkts_in)
    gw.sync()
    assert (ue.pkts_out, ue.pkts_in) == (before[0] + 20, before[1] + 20)
    flows = gw.off.status()["flows"]
    assert {f["proto"] for f in flows} == {"tcp", "udp", "icmp"}
    (tf,) = [f for f in flows if f["proto"] == "tcp"]
    assert tf["kernel_bytes_out"] > len(blob) and tf["kernel_bytes_in"] > len(blob)
    assert tf["outside"] == f"{tcp_seen_as[0]}:{tcp_seen_as[1]}"
    # FIN still reaches the engine (and the session leaves the maps)
    c.close()
    wait_until(lambda: gw.queued_count(6) > q[6], what="the FIN queued")
    gw.sync()
    assert not [el for el in gw.off.offloaded if el.set == "napt_out" and el.key[0] == 6]


def test_filtering_decides_what_the_kernel_lets_in(
    lab: Lab, gw_topo: GatewayTopology, gw: Gateway
) -> None:
    """Another port of the same remote: address-and-port-dependent filtering leaves it to the
    engine (which drops it), endpoint-independent filtering lets the kernel deliver it."""
    t = gw_topo
    srv, cli, seen_as = udp_session(lab, t)
    gw.offload()
    q = gw.queued_count(17)
    other = udp(lab, t.remote, t.remote_host, 7779)
    other.sendto(b"unsolicited", seen_as)
    if gw.engine.config.filtering == EIF:
        assert cli.recvfrom(100) == (b"unsolicited", (t.remote_host, 7779))
        assert gw.queued_count(17) == q  # the kernel let it in
    else:
        wait_until(lambda: gw.queued_count(17) == q + 1, what="the engine saw it")
        cli.settimeout(0.5)
        with pytest.raises(TimeoutError):
            cli.recvfrom(100)
        assert gw.engine.counters.get("drop:filtered", 0) == 1


def test_icmp_errors_about_offloaded_sessions_are_still_translated(
    lab: Lab, gw_topo: GatewayTopology, apdf: Gateway
) -> None:
    """A router beyond the gateway answers an offloaded datagram with an ICMP error: the error
    takes the queue and reaches the inside host about its own datagram."""
    t = gw_topo
    srv, cli, seen_as = udp_session(lab, t)
    assert apdf.offload() >= 3
    listen = lab.socket(t.inside, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    listen.settimeout(ANSWER_TIMEOUT)
    q = apdf.queued_count(1)
    # "port unreachable" from the remote's link address, quoting what it received
    quoted = build_udp(ip_to_int(t.public), ip_to_int(t.remote_host), seen_as[1], 7777, b"x")
    err = bytearray(struct.pack("!BBHI", 3, 3, 0, 0)) + quoted[:28]
    struct.pack_into("!H", err, 2, checksum(err))
    r = lab.socket(t.remote, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    r.bind((t.remote_link, 0))
    r.sendto(bytes(err), (t.public, 0))
    data = listen.recv(2048)
    assert data[20:22] == b"\x03\x03"
    inner = data[28:]
    assert socket.inet_ntoa(inner[12:16]) == t.inside_host  # the inside host's own datagram
    assert struct.unpack_from("!H", inner, 20)[0] == 40000
    assert apdf.queued_count(1) == q + 1


def test_a_datagram_without_udp_checksum_crosses_the_kernel_path_intact(
    lab: Lab, gw_topo: GatewayTopology, apdf: Gateway
) -> None:
    """UDP checksum 0 means "none" (RFC 768): nftables' rewrite would put a wrong one in,
    so such datagrams are left to the engine, which keeps it 0."""
    t = gw_topo
    srv, cli, seen_as = udp_session(lab, t)
    assert apdf.offload() >= 3
    q = apdf.queued_count(17)
    raw = lab.socket(t.inside, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    pkt = build_udp(ip_to_int(t.inside_host), ip_to_int(t.remote_host), 40000, 7777, b"nocsum",
                    no_checksum=True)
    raw.sendto(bytes(pkt[20:]), (t.remote_host, 0))
    assert srv.recvfrom(100) == (b"nocsum", seen_as)
    assert apdf.queued_count(17) == q + 1
