"""Programs on the gateway itself that use a port of the engine's pool: a resolver's query
socket (UDP bound to 0.0.0.0 on a port of its choosing, unconnected), a TCP connect from an
explicitly bound port. In userspace mode with the "auto" pool nearly every port from 1024 up
is the engine's, so their replies to the public address must reach them, not the queue:
the ``socket`` test of vpnmasq's raw chains (rules.LOCAL_SOCKET). LAN hosts' traffic is
still masqueraded through the queue meanwhile."""

from __future__ import annotations

import os
import socket

import pytest
from harness import H1, PUBLIC, R1, Daemon, Remote, sock, tcp_echo, udp_echo
from tests.waiting import ANSWER_TIMEOUT

from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns

#: ports of the gateway's own programs: in the auto pool (1024-32767 on a default system),
#: not listening when vpnmasq starts
RESOLVER_PORT, TCP_CLIENT_PORT = 20053, 20054


def in_pool(d: Daemon, port: int) -> bool:
    return any(lo <= port <= hi for lo, hi in d.status()["limits"]["pool"]["ranges"])


def gateway_udp_query(topo: Topology, port: int) -> tuple[bytes, tuple[str, int]] | None:
    """What a resolver does: an unconnected UDP socket bound to 0.0.0.0:port, sendto the
    remote's echo, the answer from recvfrom (None: no answer)."""
    s = sock(topo, "gw", socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("0.0.0.0", port))
        s.settimeout(ANSWER_TIMEOUT)
        token = os.urandom(8)
        s.sendto(token, (R1, 7))
        try:
            data, peer = s.recvfrom(100)
        except TimeoutError:
            return None
        return (data, peer) if data == token else None
    finally:
        s.close()


def gateway_tcp_echo(topo: Topology, port: int) -> bool:
    s = sock(topo, "gw", socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((PUBLIC, port))
        s.settimeout(ANSWER_TIMEOUT)
        s.connect((R1, 7))
        token = os.urandom(16)
        s.sendall(token)
        got = b""
        while len(got) < len(token):
            chunk = s.recv(100)
            if not chunk:
                break
            got += chunk
        return got == token
    except OSError:
        return False
    finally:
        s.close()


def test_the_gateways_own_sockets_on_pool_ports_get_their_replies(
    topo: Topology, remote: Remote, workdir
) -> None:
    d = Daemon(topo, "userspace", workdir).start()
    assert in_pool(d, RESOLVER_PORT) and in_pool(d, TCP_CLIENT_PORT), d.status()["limits"]["pool"]
    # LAN traffic first, so the engine holds mappings while the gateway's own flows run
    assert udp_echo(topo, "h1") and tcp_echo(topo, "h1")

    answer = gateway_udp_query(topo, RESOLVER_PORT)
    assert answer is not None, "the gateway's UDP query from a pool port got no answer"
    assert answer[1] == (R1, 7)
    assert (PUBLIC, RESOLVER_PORT) in remote.saw("udp")  # sent as itself, not translated
    assert gateway_tcp_echo(topo, TCP_CLIENT_PORT), "TCP from an explicitly bound pool port"
    assert (PUBLIC, TCP_CLIENT_PORT) in remote.saw("tcp")

    # the engine never saw the gateway's flows: no mapping, nothing dropped for them ...
    rows = d.entries()
    assert not any(r["outside"].endswith((f":{RESOLVER_PORT}", f":{TCP_CLIENT_PORT}"))
                   for r in rows if r["proto"] in ("udp", "tcp")), rows  # fmt: skip
    # ... while the LAN host's flows are its mappings (queued), and still work
    assert {r["inside"].split(":")[0] for r in d.entries("udp")} == {H1}
    assert udp_echo(topo, "h2") and tcp_echo(topo, "h2")
    assert len({p for a, p in remote.saw("udp") if a == PUBLIC} - {RESOLVER_PORT}) == 2
    assert d.stop() == 0


def test_a_lan_host_reaches_a_gateway_socket_on_a_pool_port_through_the_public_address(
    topo: Topology, remote: Remote, workdir
) -> None:
    """Hairpin path (raw_hp): a LAN host's packet to public:port that a socket of the
    gateway holds is the gateway's, as without vpnmasq, not an unknown mapping's."""
    d = Daemon(topo, "userspace", workdir).start()
    assert in_pool(d, RESOLVER_PORT)
    g = sock(topo, "gw", socket.AF_INET, socket.SOCK_DGRAM)
    h = sock(topo, "h1", socket.AF_INET, socket.SOCK_DGRAM)
    try:
        g.bind(("0.0.0.0", RESOLVER_PORT))
        g.settimeout(ANSWER_TIMEOUT)
        h.sendto(b"to-the-gateway", (PUBLIC, RESOLVER_PORT))
        data, peer = g.recvfrom(100)
        assert data == b"to-the-gateway" and peer[0] == H1
    finally:
        g.close()
        h.close()
    assert d.stop() == 0


def test_a_mapping_never_takes_a_port_a_gateway_socket_holds(
    topo: Topology, remote: Remote, workdir
) -> None:
    """Port preservation would keep a LAN host's source port on the outside; when a socket
    of the gateway holds that port the engine picks another, and both flows work."""
    d = Daemon(topo, "userspace", workdir).start()
    port = RESOLVER_PORT + 7
    assert in_pool(d, port)
    g = sock(topo, "gw", socket.AF_INET, socket.SOCK_DGRAM)
    h = sock(topo, "h1", socket.AF_INET, socket.SOCK_DGRAM)
    try:
        g.bind(("0.0.0.0", port))
        h.bind(("0.0.0.0", port))
        h.settimeout(ANSWER_TIMEOUT)
        h.sendto(b"from-h1", (R1, 7))
        assert h.recvfrom(100) == (b"from-h1", (R1, 7))
        g.settimeout(ANSWER_TIMEOUT)
        g.sendto(b"from-gw", (R1, 7))
        assert g.recvfrom(100) == (b"from-gw", (R1, 7))
    finally:
        g.close()
        h.close()
    [row] = [r for r in d.entries("udp") if r["inside"] == f"{H1}:{port}"]
    assert row["outside"] != f"{PUBLIC}:{port}", row
    assert (PUBLIC, port) in remote.saw("udp")  # the gateway's own, as itself
    assert d.stop() == 0
