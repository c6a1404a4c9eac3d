"""Hairpinning of ordinary mappings through ``vpnmasq run`` (RFC 4787 REQ-9, RFC 5382 REQ-7):
two LAN hosts behind the gateway reach each other through their *public* mappings, as
peer-to-peer and STUN clients do when both ends sit behind the same NAT.

Each LAN host learns its mapping from a reflector on r1 (:class:`Reflector`: it answers with
the source address and port it saw, like a STUN binding response), then sends to the other
host's public endpoint.

* userspace mode: vpnmasq hairpins every mapping. The receiving host sees the sender's
  public mapping as the source, and the configured filtering applies as to a packet from
  outside; ICMP errors inside hairpinned flows reach the other LAN host quoting its own
  datagram.
* hybrid mode: plain TCP/UDP mappings are the kernel's (nftables ``masquerade``), and the
  kernel does not hairpin them: the packet is delivered to the gateway itself, whose stack
  answers "port unreachable" (UDP) or a RST (TCP). These tests pin that down.

Harness and topology: harness.py (h1 10.77.0.11, h2 10.77.0.12, gw 198.51.100.1,
r1 198.51.100.20).
"""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    H1,
    H2,
    NEW_PUBLIC,
    PUBLIC,
    R1,
    Daemon,
    Sniffer,
    iptables_save,
    refused,
    sock,
    wait_for,
)
from tests.waiting import ANSWER_TIMEOUT, wait_until

from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns

REFLECT_PORT = 3478  # STUN's port; the reflector speaks "address:port\n", not STUN
Endpoint = tuple[str, int]
#: how long a packet that must *not* arrive is waited for, once the gateway has handled it
#: (the daemon's counter moved), see tests/waiting.py
QUIET = 0.3


class Reflector:
    """On r1: UDP and TCP on :data:`REFLECT_PORT` answer with the source seen,
    ``b"198.51.100.1:61234\\n"``. TCP connections stay open until the client closes them,
    so the client's mapping stays alive meanwhile."""

    def __init__(self, topo: Topology) -> None:
        self.udp = sock(topo, "r1", socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((R1, REFLECT_PORT))
        self.tcp = sock(topo, "r1", socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((R1, REFLECT_PORT))
        self.tcp.listen(8)
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self.udp, self.tcp], [], [], 0.05)
            except (OSError, ValueError):
                return
            with contextlib.suppress(OSError):
                if self.udp in r:
                    _data, peer = self.udp.recvfrom(2048)
                    self.udp.sendto(f"{peer[0]}:{peer[1]}\n".encode(), peer)
                if self.tcp in r:
                    c, peer = self.tcp.accept()
                    self.conns.append(c)
                    c.sendall(f"{peer[0]}:{peer[1]}\n".encode())

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        for s in (self.udp, self.tcp, *self.conns):
            s.close()


@pytest.fixture
def reflector(topo: Topology) -> Iterator[Reflector]:
    r = Reflector(topo)
    try:
        yield r
    finally:
        r.close()


def _endpoint(text: bytes) -> Endpoint:
    addr, _, port = text.decode().strip().rpartition(":")
    return addr, int(port)


class UdpPeer:
    """A UDP socket on a LAN host, with its public mapping as the reflector saw it."""

    def __init__(self, topo: Topology, role: str) -> None:
        self.s = sock(topo, role, socket.AF_INET, socket.SOCK_DGRAM)
        self.s.bind(("0.0.0.0", 0))
        self.port = self.s.getsockname()[1]
        self.s.settimeout(ANSWER_TIMEOUT)
        try:
            self.s.sendto(b"binding?", (R1, REFLECT_PORT))
            data, _ = self.s.recvfrom(2048)
        except OSError:
            self.s.close()
            raise
        self.public = _endpoint(data)

    def send(self, to: Endpoint, data: bytes) -> None:
        self.s.sendto(data, to)

    def recv(self, timeout: float = ANSWER_TIMEOUT) -> tuple[bytes, Endpoint] | None:
        """The next datagram other than the reflector's, with its source; None on timeout."""
        self.s.settimeout(timeout)
        try:
            while True:
                data, src = self.s.recvfrom(2048)
                if src != (R1, REFLECT_PORT):
                    return data, src
        except TimeoutError:
            return None

    def close(self) -> None:
        self.s.close()


def _reuse(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


class TcpPeer:
    """A TCP port on a LAN host with a public mapping: a connection to the reflector from
    that port (kept open, so the mapping lives), a listener on it, and connections from it
    (SO_REUSEPORT on all three), as TCP hole punching does."""

    def __init__(self, topo: Topology, role: str) -> None:
        self.topo, self.role = topo, role
        self.listener = sock(topo, role, socket.AF_INET, socket.SOCK_STREAM)
        _reuse(self.listener)
        self.listener.bind(("0.0.0.0", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(4)
        self.listener.settimeout(ANSWER_TIMEOUT)
        self.to_reflector = self.connect((R1, REFLECT_PORT))
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = self.to_reflector.recv(64)
            if not chunk:
                raise ConnectionError("reflector closed")
            buf += chunk
        self.public = _endpoint(buf)

    def connect(self, to: Endpoint, timeout: float = ANSWER_TIMEOUT) -> socket.socket:
        s = sock(self.topo, self.role, socket.AF_INET, socket.SOCK_STREAM)
        _reuse(s)
        s.bind(("0.0.0.0", self.port))
        s.settimeout(timeout)
        try:
            s.connect(to)
        except OSError:
            s.close()
            raise
        return s

    def close(self) -> None:
        self.listener.close()
        self.to_reflector.close()


def daemon(topo: Topology, workdir: Path, mode: str, filtering: str, extra: str = "") -> Daemon:
    d = Daemon(topo, mode, workdir)
    d.write_config(f'filtering = "{filtering}"\n{extra}')
    return d.start()


def counter(d: Daemon, name: str) -> int:
    return d.counters().get(name, 0)


def hairpinned_away(wan: Sniffer) -> list[object]:
    """Packets of the LAN hosts' conversation with each other that appeared on wan0."""
    return [p for p in wan.seen if p.dst == PUBLIC and p.src == PUBLIC]


# ------------------------------------------------------------------------------ userspace
def test_userspace_udp_peers_reach_each_other_through_their_public_mappings(
    topo: Topology, reflector: Reflector, wan: Sniffer, workdir: Path
) -> None:
    """Endpoint-independent filtering: each host sends to the other's public endpoint and
    sees the other's public mapping as the source (RFC 4787 REQ-9: never the private
    address); nothing of it leaves on wan0."""
    d = daemon(topo, workdir, "userspace", "endpoint-independent")
    a, b = UdpPeer(topo, "h1"), UdpPeer(topo, "h2")
    try:
        assert a.public[0] == b.public[0] == PUBLIC and a.public != b.public
        a.send(b.public, b"a-to-b")
        assert b.recv() == (b"a-to-b", a.public), d.log()
        b.send(a.public, b"b-to-a")
        assert a.recv() == (b"b-to-a", b.public)
        print(f"userspace UDP: h1 {H1}:{a.port} is {a.public}, h2 {H2}:{b.port} is {b.public};"
              f" h2 saw h1 as {a.public}, h1 saw h2 as {b.public}")  # fmt: skip
        assert counter(d, "hairpin") >= 2
        rows = {(r["inside"], r["remote"]) for r in d.entries("udp")}
        assert (f"{H1}:{a.port}", f"{PUBLIC}:{b.public[1]}") in rows, rows
        assert (f"{H2}:{b.port}", f"{PUBLIC}:{a.public[1]}") in rows, rows
    finally:
        a.close()
        b.close()
    assert hairpinned_away(wan) == []
    assert d.stop() == 0


def test_userspace_tcp_peers_reach_each_other_through_their_public_mappings(
    topo: Topology, reflector: Reflector, wan: Sniffer, workdir: Path
) -> None:
    """A LAN host connects to another's public TCP mapping (which the other keeps open to
    the reflector and listens on); each end sees the other's public mapping."""
    d = daemon(topo, workdir, "userspace", "endpoint-independent")
    a, b = TcpPeer(topo, "h1"), TcpPeer(topo, "h2")
    try:
        assert a.public[0] == b.public[0] == PUBLIC and a.public != b.public
        c = a.connect(b.public)
        conn, peer = b.listener.accept()
        try:
            assert c.getpeername() == b.public  # h1 talks to h2's public mapping ...
            assert peer == a.public  # ... and h2 sees h1's, the same one r1 saw
            c.sendall(b"over-the-hairpin")
            conn.settimeout(ANSWER_TIMEOUT)
            assert conn.recv(64) == b"over-the-hairpin"
            conn.sendall(b"and-back")
            assert c.recv(64) == b"and-back"
            print(f"userspace TCP: h1 {H1}:{a.port} is {a.public}, h2 {H2}:{b.port} is "
                  f"{b.public}; h2 accepted {peer}, h1 connected to {c.getpeername()}")  # fmt: skip
        finally:
            c.close()
            conn.close()
        assert counter(d, "hairpin") >= 4
    finally:
        a.close()
        b.close()
    assert hairpinned_away(wan) == []
    assert d.stop() == 0


def test_userspace_hairpinned_sessions_stay_with_the_engine_when_offload_is_on(
    topo: Topology, reflector: Reflector, wan: Sniffer, workdir: Path
) -> None:
    """``offload = true``: sessions through wan0 go to the kernel's maps, the hairpinned legs
    (which never cross wan0) stay with the engine, which translates every packet of them."""
    d = daemon(topo, workdir, "userspace", "endpoint-independent", "offload = true\n")
    a, b = UdpPeer(topo, "h1"), UdpPeer(topo, "h2")
    try:
        for i in range(10):
            a.send(b.public, b"a%d" % i)
            assert b.recv() == (b"a%d" % i, a.public)
            b.send(a.public, b"b%d" % i)
            assert a.recv() == (b"b%d" % i, b.public)
        # a full sync of the maps that began after every leg was eligible
        syncs = d.status()["offload"]["syncs"]
        wait_for(lambda: d.status()["offload"]["syncs"] >= syncs + 2, "two more offload syncs")
        rows = d.entries("udp")
        to_reflector = [r for r in rows if r["remote"] == f"{R1}:{REFLECT_PORT}"]
        assert len(to_reflector) == 2 and all(r["offloaded"] for r in to_reflector), rows
        legs = [r for r in rows if r["remote"].startswith(f"{PUBLIC}:")]
        assert len(legs) == 2 and not any(r["offloaded"] for r in legs), legs
        assert counter(d, "hairpin") >= 20
    finally:
        a.close()
        b.close()
    assert hairpinned_away(wan) == []
    assert d.stop() == 0


def test_userspace_filtering_treats_a_hairpinned_packet_like_one_from_outside(
    topo: Topology, reflector: Reflector, workdir: Path
) -> None:
    """Address-and-port-dependent filtering (the default): h1's mapping has only sent to
    the reflector, so h2's packet to it through the hairpin is filtered, exactly like r1's
    from another port. That packet opened h2's mapping for h1's public endpoint, so h1's
    answer passes, and from then on both ways (hole punching), each from the other's public
    mapping. A TCP SYN to a mapping that never sent to the sender is filtered too."""
    d = daemon(topo, workdir, "userspace", "address-port-dependent")
    a, b = UdpPeer(topo, "h1"), UdpPeer(topo, "h2")
    outsider = sock(topo, "r1", socket.AF_INET, socket.SOCK_DGRAM)
    try:
        filtered = counter(d, "drop:filtered")
        b.send(a.public, b"hairpinned-unsolicited")
        wait_for(lambda: counter(d, "drop:filtered") == filtered + 1, "the hairpin to be filtered")
        outsider.sendto(b"outside-unsolicited", a.public)
        wait_for(lambda: counter(d, "drop:filtered") == filtered + 2, "r1's to be filtered")
        assert a.recv(QUIET) is None  # neither arrived
        assert "does not accept this remote (address-port-dependent)" in d.log()
        # hole punching: h2's filtered datagram opened h2's mapping for h1's public
        # endpoint, so h1's answer passes; h1's answer opened h1's mapping for h2's
        a.send(b.public, b"punch")
        assert b.recv() == (b"punch", a.public)
        b.send(a.public, b"now-it-passes")
        assert a.recv() == (b"now-it-passes", b.public)
        assert counter(d, "drop:filtered") == filtered + 2
        # TCP: h1 connects to h2's public TCP mapping, which never sent to h1's: filtered
        ta, tb = TcpPeer(topo, "h1"), TcpPeer(topo, "h2")
        try:
            before = counter(d, "drop:filtered")
            with pytest.raises(OSError):
                ta.connect(tb.public, timeout=QUIET * 3)
            assert counter(d, "drop:filtered") > before
            tb.listener.settimeout(QUIET)
            with pytest.raises(TimeoutError):
                tb.listener.accept()
        finally:
            ta.close()
            tb.close()
    finally:
        a.close()
        b.close()
        outsider.close()
    assert d.stop() == 0


def test_userspace_hairpin_rules_follow_an_address_change(
    topo: Topology, reflector: Reflector, workdir: Path
) -> None:
    """Without ``public_address`` the hairpin rules name the outside interface's current
    address; with no forward at all they still follow it, and the hosts' new mappings
    hairpin through the new address."""
    d = daemon(topo, workdir, "userspace", "endpoint-independent")
    assert f"-d {PUBLIC}/32 ! -i wan0 -j VPNMASQ_HP" in iptables_save(topo)
    ip = ["ip", "-n", topo.ns("gw"), "addr"]
    subprocess.run([*ip, "add", f"{NEW_PUBLIC}/24", "dev", "wan0"], check=True)
    subprocess.run([*ip, "del", f"{PUBLIC}/24", "dev", "wan0"], check=True)
    wait_for(lambda: f"-d {NEW_PUBLIC}/32 ! -i wan0" in iptables_save(topo), "new rules")
    assert f"-d {PUBLIC}/32 ! -i wan0" not in iptables_save(topo)

    def new_mappings() -> tuple[UdpPeer, UdpPeer] | None:
        # the engine follows the address in its own step (and flushes the table): ask the
        # reflector until both hosts are seen from the new address
        peers: list[UdpPeer] = []
        try:
            peers += [UdpPeer(topo, "h1"), UdpPeer(topo, "h2")]
        except OSError:  # a request lost while the gateway changes over
            pass
        if len(peers) == 2 and peers[0].public[0] == peers[1].public[0] == NEW_PUBLIC:
            return peers[0], peers[1]
        for p in peers:
            p.close()
        return None

    got = wait_until(new_mappings, what="mappings on the new address")
    assert got is not None
    a, b = got
    try:
        a.send(b.public, b"via-the-new-address")
        assert b.recv() == (b"via-the-new-address", a.public), d.log()
    finally:
        a.close()
        b.close()
    assert d.stop() == 0


def test_userspace_icmp_errors_inside_hairpinned_flows_reach_the_right_host(
    topo: Topology, reflector: Reflector, workdir: Path
) -> None:
    """h1 and h2 talk through their public mappings; then h2 closes its socket, and h1's
    next datagram makes h2's kernel answer "port unreachable" to the public address. The
    error reaches h1 quoting h1's own datagram (h1's connected socket reports it), and the
    same the other way round."""
    d = daemon(topo, workdir, "userspace", "endpoint-independent")
    for sender, closer in (("h1", "h2"), ("h2", "h1")):
        a, b = UdpPeer(topo, sender), UdpPeer(topo, closer)
        try:
            a.s.connect(b.public)  # errors are reported to a connected socket
            a.s.send(b"hello")
            assert b.recv() == (b"hello", a.public)
            b.close()
            errors = counter(d, "hairpin")
            a.s.settimeout(ANSWER_TIMEOUT)
            a.s.send(b"to-a-closed-port")
            assert refused(a.s), f"{sender} got no port unreachable\n{d.log()}"
            assert counter(d, "hairpin") >= errors + 2  # the datagram, then the error
        finally:
            a.close()
            b.close()
    assert d.stop() == 0


# ------------------------------------------------------------------------------ hybrid
def test_hybrid_mode_leaves_plain_mappings_to_the_kernel_which_does_not_hairpin_them(
    topo: Topology, reflector: Reflector, wan: Sniffer, workdir: Path
) -> None:
    """Hybrid mode: plain TCP/UDP is masqueraded by the kernel (nftables masquerade in
    kernel_port_range). A LAN host's packet to another LAN host's public mapping is
    delivered to the gateway itself: the gateway answers "port unreachable" (UDP) or a RST
    (TCP), the other host gets nothing and vpnmasq never sees the packet."""
    d = daemon(topo, workdir, "hybrid", "endpoint-independent")
    a, b = UdpPeer(topo, "h1"), UdpPeer(topo, "h2")
    ta, tb = TcpPeer(topo, "h1"), TcpPeer(topo, "h2")
    try:
        assert a.public[0] == b.public[0] == PUBLIC
        a.s.connect(b.public)
        a.s.send(b"a-to-b")
        assert refused(a.s)  # from the gateway's own stack
        with pytest.raises(ConnectionRefusedError):
            ta.connect(tb.public)
        assert b.recv(QUIET) is None
        tb.listener.settimeout(QUIET)
        with pytest.raises(TimeoutError):
            tb.listener.accept()
        print(f"hybrid: h1 is {a.public} (UDP) {ta.public} (TCP), h2 is {b.public} (UDP) "
              f"{tb.public} (TCP); h1 -> h2's UDP mapping: port unreachable, -> h2's TCP "
              "mapping: connection refused; h2 saw nothing")  # fmt: skip
        assert counter(d, "hairpin") == 0
    finally:
        for p in (a, b, ta, tb):
            p.close()
    assert hairpinned_away(wan) == []
    assert d.stop() == 0

