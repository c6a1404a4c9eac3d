"""NfQueue: pure message planning/encoding tests, then real packets through namespaces.

Namespace tests use the lab of netns.py (inside -- gw -- remote) with vpnmasq's userspace-mode
rules installed in gw, and a toy stateless NAT for the single inside host as the handler.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from netns import GatewayTopology, Lab, QueueWorker
from tests.waiting import ANSWER_TIMEOUT, DEADLINE, wait_until

from vpnmasq.datapath import rules
from vpnmasq.datapath.nfqueue import (
    MAX_COPY_RANGE,
    NF_ACCEPT,
    NF_DROP,
    Hook,
    NfQueue,
    NfQueueError,
    QueuedPacket,
    VerdictMsg,
    plan_verdicts,
)
from vpnmasq.packet.checksum import checksum

MARK = rules.DEFAULT_MARK
ALIAS_PORT = 61001  # in RuleSpec's default alias range, so replies are queued inbound

# --- pure: verdict planning ---------------------------------------------------------------

A = (NF_ACCEPT, None, None)


def test_plan_all_plain_accepts_is_one_batch() -> None:
    pending = {i: A for i in range(1, 101)}
    assert plan_verdicts(pending, list(pending)) == [
        VerdictMsg(True, 100, NF_ACCEPT, None, None, 100)
    ]


def test_plan_single_accept_is_individual() -> None:
    assert plan_verdicts({7: A}, [7]) == [VerdictMsg(False, 7, NF_ACCEPT, None, None, 1)]


def test_plan_never_batches_over_a_held_packet() -> None:
    outstanding = list(range(1, 11))
    pending = {i: A for i in outstanding if i != 5}
    msgs = plan_verdicts(pending, outstanding)
    assert msgs[0] == VerdictMsg(True, 4, NF_ACCEPT, None, None, 4)
    # above the held id 5 every verdict is individual: a batch for 10 would accept 5 too
    assert [m.batch for m in msgs[1:]] == [False] * 5
    assert [m.packet_id for m in msgs[1:]] == [6, 7, 8, 9, 10]


def test_plan_splits_runs_on_verdict_mark_and_payload() -> None:
    pending = {
        1: A,
        2: A,
        3: (NF_ACCEPT, MARK, None),
        4: (NF_ACCEPT, MARK, None),
        5: (NF_ACCEPT, None, b"new"),
        6: (NF_DROP, None, None),
        7: (NF_DROP, None, None),
        8: A,
    }
    msgs = plan_verdicts(pending, list(pending))
    assert msgs == [
        VerdictMsg(True, 2, NF_ACCEPT, None, None, 2),
        VerdictMsg(True, 4, NF_ACCEPT, MARK, None, 2),
        VerdictMsg(False, 5, NF_ACCEPT, None, b"new", 1),
        VerdictMsg(True, 7, NF_DROP, None, None, 2),
        VerdictMsg(False, 8, NF_ACCEPT, None, None, 1),
    ]


def test_plan_out_of_order_verdicts_follow_id_order() -> None:
    outstanding = [1, 2, 3, 4]
    pending = {4: A, 2: A, 3: A, 1: A}  # given in another order
    assert plan_verdicts(pending, outstanding) == [VerdictMsg(True, 4, NF_ACCEPT, None, None, 4)]


def test_plan_gaps_are_covered_but_ids_wrap_serially() -> None:
    # ids skipped by the kernel (never queued) may sit inside a run; ids wrap at 2**32
    outstanding = [0xFFFFFFFE, 0xFFFFFFFF, 0, 3]
    pending = {i: A for i in outstanding}
    assert plan_verdicts(pending, outstanding) == [VerdictMsg(True, 3, NF_ACCEPT, None, None, 4)]


# --- pure: wire encoding / parsing -----------------------------------------------------


def _bare_queue() -> NfQueue:
    q = NfQueue.__new__(NfQueue)
    q._res_id = socket.htons(3)
    q._seq = 0
    return q


def test_encode_payload_verdict_layout() -> None:
    q = _bare_queue()
    data = q._encode(VerdictMsg(False, 0x01020304, NF_ACCEPT, MARK, b"abcde", 1))
    nlen, ntype, flags, seq, pid = struct.unpack_from("=IHHII", data)
    assert nlen == len(data) == 32 + 8 + 12  # header+vhdr, mark attr, payload attr padded
    assert ntype == (3 << 8) | 1 and flags == 1 and seq == 1
    assert struct.unpack_from(">BBH", data, 16) == (0, 0, 3)
    assert struct.unpack_from("=HH", data, 20) == (12, 2)
    assert struct.unpack_from(">II", data, 24) == (NF_ACCEPT, 0x01020304)
    assert struct.unpack_from("=HH", data, 32) == (8, 3)
    assert struct.unpack_from(">I", data, 36) == (MARK,)
    assert struct.unpack_from("=HH", data, 40) == (9, 10)
    assert data[44:49] == b"abcde" and data[49:] == b"\0\0\0"


def test_encode_batch_type() -> None:
    data = _bare_queue()._encode(VerdictMsg(True, 9, NF_DROP, None, None, 5))
    assert struct.unpack_from("=IH", data) == (32, (3 << 8) | 3)
    assert struct.unpack_from(">II", data, 24) == (NF_DROP, 9)


def _nla(t: int, d: bytes) -> bytes:
    n = 4 + len(d)
    return struct.pack("=HH", n, t) + d + b"\0" * (-n & 3)


def _packet_attrs(
    pid: int, payload: bytes, *, mark: int | None = None, orig: int | None = None
) -> bytes:
    a = _nla(1, struct.pack(">IHB", pid, 0x0800, 4) + b"\0")
    if mark is not None:
        a += _nla(3, struct.pack(">I", mark))
    a += _nla(5, struct.pack(">I", 2)) + _nla(6, struct.pack(">I", 3))
    a += _nla(11, b"\x01" * 20)  # an attribute we do not decode (NFQA_CT) is skipped
    if orig is not None:
        a += _nla(13, struct.pack(">I", orig))  # NFQA_CAP_LEN: the *original* length
    return a + _nla(10, payload)


def _parse(q: NfQueue, attrs: bytes) -> QueuedPacket | None:
    q._buf[: len(attrs)] = attrs
    return q._parse_packet(0, len(attrs))


def test_parse_packet_attributes_and_truncation() -> None:
    """The generic attribute walk (the receive loop's layout cache is tested, against this
    walk, in tests/unit/test_nfqueue_wire.py)."""
    q = _bare_queue()
    q._buf = bytearray(70000)
    q._view = memoryview(q._buf)
    pkt = _parse(q, _packet_attrs(42, b"P" * 10, mark=7, orig=65535))
    assert pkt == QueuedPacket(42, Hook.POST_ROUTING, 0x0800, b"P" * 10, 10, 65535, 7, 2, 3, 0)
    assert pkt is not None and pkt.truncated
    pkt = _parse(q, _packet_attrs(43, b"Q" * 9, mark=8, orig=65534))
    assert pkt == QueuedPacket(43, Hook.POST_ROUTING, 0x0800, b"Q" * 9, 9, 65534, 8, 2, 3, 0)
    for i, payload in enumerate([b"R" * 5, b"S" * 1500, b"T"]):
        pkt = _parse(q, _packet_attrs(44 + i, payload))
        n = len(payload)
        assert pkt == QueuedPacket(44 + i, 4, 0x0800, payload, n, n, 0, 2, 3, 0)
        assert not pkt.truncated
    assert _parse(q, _nla(10, b"no header")) is None
    assert _parse(q, _packet_attrs(50, b"x")[:-4]) is None  # cut inside the payload


def test_constructor_validates_arguments() -> None:
    with pytest.raises(ValueError):
        NfQueue(0, copy_range=MAX_COPY_RANGE + 1)
    with pytest.raises(ValueError):
        NfQueue(70000)


# --- helpers for the namespace tests --------------------------------------------------------



def rewrite(pkt: bytes, *, src: str | None = None, dst: str | None = None) -> bytes:
    """Change addresses and recompute every checksum from scratch (test oracle, not fast)."""
    b = bytearray(pkt)
    ihl = (b[0] & 0x0F) * 4
    if src:
        b[12:16] = socket.inet_aton(src)
    if dst:
        b[16:20] = socket.inet_aton(dst)
    b[10:12] = b"\0\0"
    b[10:12] = struct.pack("!H", checksum(b[:ihl]))
    if struct.unpack_from("!H", b, 6)[0] & 0x3FFF:
        return bytes(b)  # a fragment: the L4 checksum covers the whole datagram, keep it
    proto, l4 = b[9], ihl
    pseudo = bytes(b[12:20]) + struct.pack("!BBH", 0, proto, len(b) - ihl)
    if proto == 17 and b[l4 + 6 : l4 + 8] != b"\0\0":
        b[l4 + 6 : l4 + 8] = b"\0\0"
        b[l4 + 6 : l4 + 8] = struct.pack("!H", checksum(pseudo + bytes(b[l4:])) or 0xFFFF)
    elif proto == 6:
        b[l4 + 16 : l4 + 18] = b"\0\0"
        b[l4 + 16 : l4 + 18] = struct.pack("!H", checksum(pseudo + bytes(b[l4:])))
    elif proto == 1:
        b[l4 + 2 : l4 + 4] = b"\0\0"
        b[l4 + 2 : l4 + 4] = struct.pack("!H", checksum(b[l4:]))
    return bytes(b)


def checksums_ok(ip: bytes) -> bool:
    """IP header checksum, and the L4 checksum for unfragmented UDP/TCP/ICMP."""
    ihl = (ip[0] & 0x0F) * 4
    if checksum(ip[:ihl]) != 0:
        return False
    if struct.unpack_from("!H", ip, 6)[0] & 0x3FFF:  # fragment: L4 sum covers the datagram
        return True
    proto = ip[9]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, proto, len(ip) - ihl)
    if proto == 17:
        return ip[ihl + 6 : ihl + 8] == b"\0\0" or checksum(pseudo + ip[ihl:]) == 0
    if proto == 6:
        return checksum(pseudo + ip[ihl:]) == 0
    if proto == 1:
        return checksum(ip[ihl:]) == 0
    return True


def nat_handler(
    t: GatewayTopology, mark: int | None = MARK
) -> Callable[[QueuedPacket, NfQueue], None]:
    """A stateless NAT for the single inside host: outbound src -> public, inbound dst back."""
    inside, public = socket.inet_aton(t.inside_host), socket.inet_aton(t.public)

    def handle(pkt: QueuedPacket, q: NfQueue) -> None:
        data = pkt.payload
        if pkt.truncated:
            q.drop(pkt.packet_id)  # may not be modified, must not leak: drop
        elif pkt.hook == Hook.POST_ROUTING and data[12:16] == inside:
            q.accept(pkt.packet_id, rewrite(data, src=t.public))
        elif pkt.hook == Hook.PRE_ROUTING and data[16:20] == public:
            q.accept(pkt.packet_id, rewrite(data, dst=t.inside_host), mark=mark)
        else:
            q.accept(pkt.packet_id)

    return handle


class Capture:
    """Incoming IPv4 packets on one interface of a namespace (AF_PACKET)."""

    def __init__(self, lab: Lab, role: str, ifname: str) -> None:
        self.sock = lab.socket(role, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)

    def until(
        self, enough: Callable[[list[bytes]], bool], timeout: float = DEADLINE
    ) -> list[bytes]:
        """Packets captured until ``enough(packets)`` holds or ``timeout`` passes."""
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while not enough(out) and (left := deadline - time.monotonic()) > 0:
            out += self.packets(min(left, 0.1))
        return out

    def packets(self, duration: float) -> list[bytes]:
        out: list[bytes] = []
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                break
            while True:
                try:
                    frame, addr = self.sock.recvfrom(70000)
                except BlockingIOError:
                    break
                if addr[2] != socket.PACKET_OUTGOING:
                    out.append(frame[14:])
        return out

    def close(self) -> None:
        self.sock.close()


def icmp_echo(sock: socket.socket, dst: str, ident: int, seq: int, data: bytes) -> None:
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    c = checksum(hdr + data)
    sock.sendto(struct.pack("!BBHHH", 8, 0, c, ident, seq) + data, (dst, 0))


def recv_echo_reply(sock: socket.socket, ident: int, timeout: float) -> tuple[bytes, str] | None:
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline:
        try:
            pkt, (src, _) = sock.recvfrom(65535)
        except TimeoutError:
            return None
        ihl = (pkt[0] & 0x0F) * 4
        typ, _code, _c, rid, _seq = struct.unpack_from("!BBHHH", pkt, ihl)
        if typ == 0 and rid == ident:
            return pkt, src
    return None


def userspace_spec(t: GatewayTopology, **kw: object) -> rules.RuleSpec:
    return rules.RuleSpec(t.gw_wan_if, [t.inside_net], t.public, mode="userspace", **kw)  # type: ignore[arg-type]


@pytest.fixture
def gw_firewall(lab: Lab, gw_topo: GatewayTopology) -> GatewayTopology:
    """A stateful-ish FORWARD policy as README describes: LAN out, and vpnmasq-marked in."""
    lab.run(
        gw_topo.gw,
        f"iptables -P FORWARD DROP && iptables -A FORWARD -i {gw_topo.gw_lan_if} -o {gw_topo.gw_wan_if} -j ACCEPT"
        f" && iptables -A FORWARD -m mark --mark {MARK:#x} -j ACCEPT",
    )
    return gw_topo


@contextlib.contextmanager
def bound_queue(lab: Lab, role: str, queue_num: int, **kw: object) -> Iterator[NfQueue]:
    with lab.entered(role):
        q = NfQueue(queue_num, **kw)  # type: ignore[arg-type]
    try:
        yield q
    finally:
        q.close()


def drain(q: NfQueue, n: int, timeout: float = DEADLINE) -> list[QueuedPacket]:
    got: list[QueuedPacket] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        q.wait_readable(0.05)
        got += q.recv_batch()
    return got


def udp_socket(lab: Lab, role: str, bind: tuple[str, int], rcvbuf: int = 8 << 20) -> socket.socket:
    s: socket.socket = lab.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
    s.bind(bind)
    return s


def recv_all(
    s: socket.socket, n: int, timeout: float = ANSWER_TIMEOUT
) -> list[tuple[bytes, tuple[str, int]]]:
    out: list[tuple[bytes, tuple[str, int]]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            out.append(s.recvfrom(70000))
        except TimeoutError:
            break
    return out


# --- namespace tests ------------------------------------------------------------------------


@pytest.mark.netns
def test_udp_and_icmp_echo_through_userspace_nat(
    lab: Lab, gw_firewall: GatewayTopology, queue_worker: Callable[..., QueueWorker]
) -> None:
    t = gw_firewall
    rules.install(userspace_spec(t, queue_num=11), netns=lab.ns(t.gw))
    worker = queue_worker(t.gw, 11, nat_handler(t))
    cap = Capture(lab, t.remote, t.remote_if)

    server = udp_socket(lab, t.remote, (t.remote_host, 7))
    client = udp_socket(lab, t.inside, (t.inside_host, ALIAS_PORT))
    client.sendto(b"ping-udp", (t.remote_host, 7))
    [(data, peer)] = recv_all(server, 1)
    assert (data, peer) == (b"ping-udp", (t.public, ALIAS_PORT))  # masqueraded
    server.sendto(b"pong-udp", peer)
    assert recv_all(client, 1) == [(b"pong-udp", (t.remote_host, 7))]  # un-masqueraded

    pinger = lab.socket(t.inside, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    icmp_echo(pinger, t.remote_host, 0x4242, 1, b"x" * 56)
    reply = recv_echo_reply(pinger, 0x4242, ANSWER_TIMEOUT)
    assert reply is not None and reply[1] == t.remote_host
    assert checksums_ok(reply[0])

    seen = cap.packets(0.2)
    from_gw = [p for p in seen if p[12:16] == socket.inet_aton(t.public)]
    assert len(from_gw) >= 2  # the UDP datagram and the echo request
    assert all(checksums_ok(p) for p in seen)
    assert not [p for p in seen if p[12:16] == socket.inet_aton(t.inside_host)]
    c = worker.queue.counters
    assert c.received >= 4 and c.accepted == c.received and c.send_errors == 0


@pytest.mark.netns
@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_no_listener(lab: Lab, gw_topo: GatewayTopology, fail_open: bool) -> None:
    """Rules installed, nobody bound to the queue: fail-closed drops everything from the
    inside; fail-open (--queue-bypass) lets it out un-NATed, leaking the LAN address."""
    t = gw_topo
    rules.install(userspace_spec(t, queue_num=12, fail_open=fail_open), netns=lab.ns(t.gw))
    cap = Capture(lab, t.remote, t.remote_if)
    client = udp_socket(lab, t.inside, (t.inside_host, ALIAS_PORT))
    pinger = lab.socket(t.inside, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    for i in range(5):
        client.sendto(b"leak?", (t.remote_host, 7))
        icmp_echo(pinger, t.remote_host, 0x77, i, b"leak?")

    def from_inside(pkts: list[bytes]) -> list[bytes]:
        return [p for p in pkts if p[12:16] == socket.inet_aton(t.inside_host)]

    if fail_open:  # all ten leak (wait for them); there were only ten to leak
        assert len(from_inside(cap.until(lambda got: len(from_inside(got)) >= 10))) == 10
    else:
        assert from_inside(cap.packets(0.5)) == []
        # ... while traffic to the gateway itself is not queued at all
        local = udp_socket(lab, t.gw, (t.gw_lan, 5353))
        client.sendto(b"to-gw", (t.gw_lan, 5353))
        assert recv_all(local, 1)[0][0] == b"to-gw"


@pytest.mark.netns
def test_large_datagrams_whole_up_to_copy_range(
    lab: Lab, gw_topo: GatewayTopology, queue_worker: Callable[..., QueueWorker]
) -> None:
    """The gateway reassembles fragments (conntrack is loaded by the CT rules), so userspace
    sees whole datagrams: 9000 bytes and 65531 bytes (= copy range) are rewritten and arrive
    whole; 65535 bytes arrive truncated, cannot be modified, and are dropped."""
    t = gw_topo
    rules.install(userspace_spec(t, queue_num=13), netns=lab.ns(t.gw))
    seen: list[QueuedPacket] = []
    refused: list[str] = []
    nat = nat_handler(t)

    def handler(pkt: QueuedPacket, q: NfQueue) -> None:
        seen.append(pkt)
        if pkt.truncated:
            try:
                q.accept(pkt.packet_id, pkt.payload)
            except ValueError as e:
                refused.append(str(e))
        nat(pkt, q)

    worker = queue_worker(t.gw, 13, handler)
    server = udp_socket(lab, t.remote, (t.remote_host, 9))
    client = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((t.inside_host, ALIAS_PORT))
    sizes = [9000 - 28, MAX_COPY_RANGE - 28, 65535 - 28]
    for n in sizes:
        client.sendto(bytes([n % 251]) * n, (t.remote_host, 9))
    got = recv_all(server, 2)
    # the third had its verdict (dropped): nothing more may arrive
    with contextlib.suppress(AssertionError):  # the assertions below say what is missing
        wait_until(lambda: len(seen) == 3 and refused, what="the handler to see all three")
    got += recv_all(server, 1, timeout=0.3)
    assert [(len(d), peer) for d, peer in got] == [(n, (t.public, ALIAS_PORT)) for n in sizes[:2]]
    assert all(d == bytes([len(d) % 251]) * len(d) for d, _ in got)
    lens = sorted((p.cap_len, p.orig_len) for p in seen)
    assert lens == [(9000, 9000), (MAX_COPY_RANGE, MAX_COPY_RANGE), (MAX_COPY_RANGE, 65535)]
    assert worker.queue.counters.truncated == 1 and len(refused) == 1


@pytest.mark.netns
def test_verdict_batch_with_many_packets_and_a_held_one(lab: Lab, gw_topo: GatewayTopology) -> None:
    t = gw_topo
    n = 1000
    rules.install(userspace_spec(t, queue_num=14), netns=lab.ns(t.gw))
    server = udp_socket(lab, t.remote, (t.remote_host, 9))
    client = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    with bound_queue(lab, t.gw, 14) as q:
        for i in range(n):
            client.sendto(b"%d" % i, (t.remote_host, 9))
        pkts = drain(q, n)
        assert len(pkts) == n
        held = pkts[100]
        for p in pkts:
            if p is not held:
                q.accept(p.packet_id)  # plain accept: leaves un-NATed, fine for this test
        assert q.flush() == n - 1
        c = q.counters
        # ids below the held one in one batch; above it individual verdicts (still one send)
        assert (c.batch_msgs, c.verdict_msgs, c.sends) == (1, n - 101, 1)
        assert q.outstanding == 1
        got = recv_all(server, n - 1)
        assert len(got) == n - 1 and b"100" not in {d for d, _ in got}
        q.accept(held.packet_id)
        q.flush()
        assert recv_all(server, 1)[0][0] == b"100"

        # now everything at once: exactly one VERDICT_BATCH message
        for i in range(n):
            client.sendto(b"%d" % i, (t.remote_host, 9))
        pkts = drain(q, n)
        for p in reversed(pkts):  # verdict order does not matter
            q.accept(p.packet_id)
        before = (c.batch_msgs, c.verdict_msgs, c.sends)
        q.flush()
        assert (c.batch_msgs, c.verdict_msgs, c.sends) == (before[0] + 1, before[1], before[2] + 1)
        assert len(recv_all(server, n)) == n
        assert c.accepted == 2 * n and c.send_errors == 0 and q.last_error is None


@pytest.mark.netns
def test_payload_verdicts_are_packed_into_few_sends(lab: Lab, gw_topo: GatewayTopology) -> None:
    t = gw_topo
    n = 300
    rules.install(userspace_spec(t, queue_num=15), netns=lab.ns(t.gw))
    server = udp_socket(lab, t.remote, (t.remote_host, 9))
    client = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    nat = nat_handler(t)
    with bound_queue(lab, t.gw, 15) as q:
        for i in range(n):
            client.sendto(b"%05d" % i + b"." * 1400, (t.remote_host, 9))
        pkts = drain(q, n)
        assert len(pkts) == n
        for p in pkts:
            nat(p, q)
        q.flush()
        c = q.counters
        # 300 x ~1.5 KB do not fit one send (limit 256 KiB), but need only a few
        assert c.verdict_msgs == n and 2 <= c.sends <= 3 and c.batch_msgs == 0
        got = recv_all(server, n)
        assert len(got) == n and {peer[0] for _, peer in got} == {t.public}


@pytest.mark.netns
def test_close_drops_waiting_packets_and_frees_the_queue(lab: Lab, gw_topo: GatewayTopology) -> None:
    t = gw_topo
    rules.install(userspace_spec(t, queue_num=16), netns=lab.ns(t.gw))
    server = udp_socket(lab, t.remote, (t.remote_host, 9))
    client = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    with bound_queue(lab, t.gw, 16) as q:
        client.sendto(b"orphan", (t.remote_host, 9))
        assert len(drain(q, 1)) == 1
        with pytest.raises(NfQueueError) as exc, lab.entered(t.gw):
            NfQueue(16)  # a second listener on the same queue is refused
        assert exc.value.errno in (errno.EPERM, errno.EBUSY)
        with pytest.raises(ValueError):
            q.accept(123456)  # unknown id
    # closed without a verdict: the kernel dropped it (fail-closed), queue can be rebound
    assert recv_all(server, 1, timeout=0.3) == []
    with bound_queue(lab, t.gw, 16) as q2:
        client.sendto(b"again", (t.remote_host, 9))
        [p] = drain(q2, 1)
        q2.accept(p.packet_id)
        q2.flush()
        assert recv_all(server, 1)[0][0] == b"again"


# --- kernel facts the rules rely on -------------------------------------------------------


@pytest.mark.netns
@pytest.mark.parametrize(
    ("chain", "delivered"), [("PREROUTING", False), ("FORWARD", True), ("POSTROUTING", True)]
)
def test_kernel_fact_source_rewrite_must_follow_routing(
    lab: Lab,
    gw_topo: GatewayTopology,
    queue_worker: Callable[..., QueueWorker],
    chain: str,
    delivered: bool,
) -> None:
    """Why rules.py queues outbound packets in POSTROUTING: a source rewritten to the
    gateway's own address before the routing decision makes the packet a martian."""
    t = gw_topo
    where = f"-i {t.gw_lan_if}" if chain == "PREROUTING" else f"-o {t.gw_wan_if}"
    lab.run(t.gw, f"iptables -t mangle -A {chain} {where} -p udp -j NFQUEUE --queue-num 17")
    handled: list[int] = []

    def handler(p: QueuedPacket, q: NfQueue) -> None:
        q.accept(p.packet_id, rewrite(p.payload, src=t.public))
        handled.append(p.packet_id)

    queue_worker(t.gw, 17, handler)
    server = udp_socket(lab, t.remote, (t.remote_host, 9))
    client = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    client.sendto(b"snat", (t.remote_host, 9))
    wait_until(lambda: handled, what="the queued datagram")  # rewritten and accepted
    got = recv_all(server, 1, timeout=ANSWER_TIMEOUT if delivered else 0.5)
    assert [peer[0] for _, peer in got] == ([t.public] if delivered else [])


@pytest.mark.netns
@pytest.mark.parametrize(("conntrack_match", "pieces"), [(False, 3), (True, 1)])
def test_kernel_fact_notrack_alone_does_not_defragment(
    lab: Lab,
    gw_topo: GatewayTopology,
    queue_worker: Callable[..., QueueWorker],
    conntrack_match: bool,
    pieces: int,
) -> None:
    """Why every queue rule carries ``-m conntrack``: ``CT --notrack`` does not enable
    conntrack (nor its defrag hook) in a namespace, so fragments would reach userspace."""
    t = gw_topo
    lab.run(t.gw, f"iptables -t raw -A PREROUTING -i {t.gw_lan_if} -j CT --notrack")
    match = "-m conntrack --ctstate UNTRACKED" if conntrack_match else ""
    lab.run(
        t.gw,
        f"iptables -t mangle -A POSTROUTING -o {t.gw_wan_if} {match} -j NFQUEUE --queue-num 18",
    )
    sizes: list[int] = []

    def handler(p: QueuedPacket, q: NfQueue) -> None:
        sizes.append(p.cap_len)
        q.accept(p.packet_id)

    queue_worker(t.gw, 18, handler)
    server = udp_socket(lab, t.remote, (t.remote_host, 9))
    client = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    client.sendto(b"f" * 3000, (t.remote_host, 9))
    assert len(recv_all(server, 1)[0][0]) == 3000
    assert len(sizes) == pieces and sum(sizes) == 3028 + 20 * (pieces - 1)


def _queue_stats(lab: Lab, role: str, queue_num: int) -> dict[str, int]:
    names = ["queue", "portid", "waiting", "mode", "range", "dropped", "user_dropped", "last_id"]
    for line in lab.run(role, "cat /proc/net/netfilter/nfnetlink_queue").stdout.splitlines():
        values = [int(v) for v in line.split()[:8]]
        if values[0] == queue_num:
            return dict(zip(names, values, strict=True))
    raise AssertionError(f"queue {queue_num} not bound")


@pytest.mark.netns
def test_kernel_fact_undeliverable_packets_leave_gaps_not_waiting_entries(
    lab: Lab, gw_topo: GatewayTopology
) -> None:
    """Why a VERDICT_BATCH may cover ids we never received: a packet whose message does not
    fit our receive buffer is dropped by the kernel at once (user_dropped), not kept."""
    t = gw_topo
    rules.install(userspace_spec(t, queue_num=19), netns=lab.ns(t.gw))
    server = udp_socket(lab, t.remote, (t.remote_host, 9))
    client = lab.socket(t.inside, socket.AF_INET, socket.SOCK_DGRAM)
    with bound_queue(lab, t.gw, 19, rcvbuf=4096) as q:  # room for very few messages
        got: list[QueuedPacket] = []
        for burst in range(20):
            for i in range(10):
                client.sendto(b"%d" % (burst * 10 + i) + b"." * 1000, (t.remote_host, 9))
            got += drain(q, 200, timeout=0.02)
        # every packet has reached the queue: waiting for us, or dropped by the kernel
        stats = wait_until(
            lambda: (st := _queue_stats(lab, t.gw, 19))["waiting"] + st["user_dropped"] == 200
            and st,
            what="all 200 packets to reach the queue",
        )
        # and we read every message that did fit our buffer
        got += drain(q, stats["waiting"] - len(got))
        stats = _queue_stats(lab, t.gw, 19)
        ids = [p.packet_id for p in got]
        assert stats["user_dropped"] > 0 and len(got) + stats["user_dropped"] == 200
        assert stats["waiting"] == len(got)  # the lost ones are not waiting in the kernel
        assert ids != list(range(ids[0], ids[0] + len(ids)))  # ... they left id gaps
        for p in got:
            q.accept(p.packet_id)
        q.flush()
        assert q.counters.batch_msgs == 1 and _queue_stats(lab, t.gw, 19)["waiting"] == 0
        assert len(recv_all(server, len(got))) == len(got)
