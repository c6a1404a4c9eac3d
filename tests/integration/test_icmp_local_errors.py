"""The gateway's own ICMP errors about packets vpnmasq rewrote leave translated.

``vpnmasq run`` in the lab gateway (harness: harness.py). When the gateway's
kernel cannot forward a packet vpnmasq rewrote, its ICMP error quotes the rewritten header:

* inbound: the LAN link (gw's ``lan0``) has MTU 1280 and r1 sends a 1400-byte DF packet that
  vpnmasq rewrote to a LAN host (UDP to a NAPT mapping in userspace mode, where vpnmasq owns
  plain UDP; ESP, ISAKMP and PPTP GRE in both modes). r1 must get "fragmentation needed"
  quoting *its own* packet byte for byte (destination = the public address, its ports, SPI,
  cookies or outside Call ID), never a LAN address;
* outbound: h1 sends to an address on the outside link that nobody answers ARP for. The
  packet has already been masqueraded when the neighbour lookup fails, so the kernel's "host
  unreachable" quotes public source -> remote and is addressed to the public address, i.e.
  the gateway itself. vpnmasq delivers it to h1 quoting h1's own packet (RFC 5508);
* PMTUD for the LAN still works (gw's ``wan0`` narrower than the LAN): frag-needed to h1
  quotes h1's packet as sent and is not touched.

Packets are checked with scapy (checksums recomputed and compared). Every wait is a poll
loop with a generous deadline that resends what it waits an answer for.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from harness import (
    H1,
    PUBLIC,
    R1,
    Daemon,
    PptpCall,
    Remote,
    Sniffer,
    gre_v1,
    gw_run,
    refused,
    sock,
)
from tests.waiting import DEADLINE, wait_until

from vpnmasq.packet.checksum import checksum
from vpnmasq.packet.ipv4 import PROTO_ESP
from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns
scapy_all = pytest.importorskip("scapy.all")
IP, UDP, ICMP, Raw = scapy_all.IP, scapy_all.UDP, scapy_all.ICMP, scapy_all.Raw

NOBODY = "198.51.100.99"  # on the outside link, answers no ARP

LAN_MTU = 1280
WAIT_S = DEADLINE  # generous: CI machines are loaded


def _checksums_ok(pkt: bytes) -> None:
    """The outer IP and ICMP checksums, and the quoted IP header's, are what scapy computes."""
    p = IP(pkt)
    again = IP(pkt)
    del again.chksum
    del again[ICMP].chksum
    rebuilt = IP(bytes(again))
    assert rebuilt.chksum == p.chksum, "outer IP checksum"
    assert rebuilt[ICMP].chksum == p[ICMP].chksum, "ICMP checksum"
    quoted = _quoted(pkt)
    ihl = (quoted[0] & 0x0F) * 4
    hdr = bytearray(quoted[:ihl])
    given = hdr[10:12]
    hdr[10:12] = b"\0\0"
    assert struct.pack("!H", checksum(bytes(hdr))) == bytes(given), "quoted IP header checksum"



def _quoted(pkt: bytes) -> bytes:
    ihl = (pkt[0] & 0x0F) * 4
    return pkt[ihl + 8 :]


class IcmpWatch:
    """ICMP errors arriving at one namespace (a raw ICMP socket owned by the test)."""

    def __init__(self, topo: Topology, role: str) -> None:
        self.s = sock(topo, role, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.s.setblocking(False)

    def errors(self) -> list[bytes]:
        out = []
        while True:
            try:
                pkt = self.s.recv(65535)
            except BlockingIOError:
                return out
            ihl = (pkt[0] & 0x0F) * 4
            if pkt[ihl] in (3, 4, 11, 12):
                out.append(pkt)

    def close(self) -> None:
        self.s.close()

    def __enter__(self) -> IcmpWatch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@contextmanager
def _running(
    topo: Topology, workdir: Path, mode: str, *, narrow_lan: bool = False, config: str | None = None
) -> Iterator[tuple[Daemon, ExitStack]]:
    """``vpnmasq run`` in ``mode`` (with ``config`` added, the LAN link narrowed to LAN_MTU if
    asked) and an ExitStack for the test's sockets: they are closed at the end, and then,
    if the test passed, the daemon must stop cleanly."""
    d = Daemon(topo, mode, workdir)
    if config is not None:
        d.write_config(config)
    d.start()
    if narrow_lan:
        _narrow_lan(topo)
    with ExitStack() as res:
        yield d, res
    assert d.stop() == 0


def _wait_error(
    watch: IcmpWatch, send: Callable[[], None], match: Callable[[bytes], bool]
) -> tuple[bytes, list[bytes]]:
    """Send, and resend every second, until an ICMP error ``match``es; (it, all seen)."""
    seen: list[bytes] = []
    deadline = time.monotonic() + WAIT_S
    next_send = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_send:
            send()
            next_send = time.monotonic() + 1.0
        for pkt in watch.errors():
            seen.append(pkt)
            if match(pkt):
                return pkt, seen
        time.sleep(0.02)
    raise AssertionError(f"no matching ICMP error within {WAIT_S} s; saw {len(seen)}: {seen!r}")


def _raw_sender(topo: Topology, role: str) -> socket.socket:
    s = sock(topo, role, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    return s


def _big_df(src: str, dst: str, l4: object, **ip: object) -> bytes:
    """A 1400-byte datagram with DF and a fixed IP id (the kernel keeps both), checksums set."""
    pkt = IP(src=src, dst=dst, id=0x4242, flags="DF", ttl=64, **ip) / l4  # type: ignore[operator]
    pad = 1400 - len(pkt)
    return bytes(IP(bytes(pkt / Raw(b"v" * pad))))


def _narrow_lan(topo: Topology) -> None:
    r = gw_run(topo, "ip", "link", "set", "lan0", "mtu", str(LAN_MTU))
    assert r.returncode == 0, r.stderr


def _no_private_quoted(errors: list[bytes]) -> None:
    for pkt in errors:
        q = _quoted(pkt)
        for addr in (q[12:16], q[16:20]):
            assert not socket.inet_ntoa(addr).startswith("10.77."), f"LAN address leaked: {pkt!r}"


def _frag_needed(proto: int | None = None) -> Callable[[bytes], bool]:
    """Matches "fragmentation needed" (3/4), quoting a packet of ``proto`` when given."""

    def match(pkt: bytes) -> bool:
        ihl = (pkt[0] & 0x0F) * 4
        return pkt[ihl : ihl + 2] == b"\x03\x04" and (proto is None or pkt[ihl + 8 + 9] == proto)

    return match


def _unreachable_to(dst: str) -> Callable[[bytes], bool]:
    """Matches a "destination unreachable" quoting a whole IP header addressed to ``dst``."""

    def match(pkt: bytes) -> bool:
        ihl = (pkt[0] & 0x0F) * 4
        q = pkt[ihl + 8 :]
        return pkt[ihl] == 3 and len(q) >= 28 and q[16:20] == socket.inet_aton(dst)

    return match


def _frag_needed_quoting(
    watch: IcmpWatch, send: Callable[[], None], sent: bytes, proto: int | None = None
) -> tuple[bytes, list[bytes]]:
    """Send until a frag-needed arrives; it quotes ``sent`` byte for byte, checksums right.
    Returns (it, every error seen)."""
    err, seen = _wait_error(watch, send, _frag_needed(proto))
    quoted = _quoted(err)
    assert quoted == sent[: len(quoted)], (quoted[:48].hex(), sent[:48].hex())
    _checksums_ok(err)
    return err, seen


def _inbound_frag_needed(
    watch: IcmpWatch, raw: socket.socket, sent: bytes, proto: int | None = None
) -> bytes:
    """r1 sends ``sent`` to the public address until the gateway's frag-needed arrives: it
    quotes r1's own packet byte for byte, and no error r1 saw quoted a LAN address."""
    err, seen = _frag_needed_quoting(watch, lambda: raw.sendto(sent, (PUBLIC, 0)), sent, proto)
    _no_private_quoted(seen)
    return err


def _outbound_unreachable(watch: IcmpWatch, send: Callable[[], object]) -> bytes:
    """h1 ``send``s to NOBODY until "host unreachable" arrives: addressed to h1, quoting
    h1's own address as the source, checksums right. Returns the quoted packet."""
    # ARP for NOBODY fails after about 3 s; resending keeps the neighbour entry trying
    err, _ = _wait_error(watch, send, _unreachable_to(NOBODY))
    p = IP(err)
    assert p.dst == H1 and (p[ICMP].type, p[ICMP].code) == (3, 1), p.summary()
    q = _quoted(err)
    assert q[12:16] == socket.inet_aton(H1)
    _checksums_ok(err)
    return q


def _udp_mapping(topo: Topology) -> tuple[socket.socket, socket.socket, int]:
    """h1 (an unconnected UDP socket) sends to r1:9; (h1's socket, r1's socket, alias port)."""
    r = sock(topo, "r1", socket.AF_INET, socket.SOCK_DGRAM)
    r.bind((R1, 9))
    r.settimeout(1.0)
    h = sock(topo, "h1", socket.AF_INET, socket.SOCK_DGRAM)
    h.bind(("0.0.0.0", 0))
    deadline = time.monotonic() + WAIT_S
    while True:
        h.sendto(b"open", (R1, 9))
        try:
            data, (addr, port) = r.recvfrom(2048)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise AssertionError("h1's UDP never reached r1") from None
            continue
        assert (data, addr) == (b"open", PUBLIC)
        return h, r, port


def test_frag_needed_about_inbound_udp_quotes_the_remotes_own_packet(
    topo: Topology, workdir: Path
) -> None:
    with _running(topo, workdir, "userspace", narrow_lan=True) as (d, res):
        h, r, alias = _udp_mapping(topo)
        res.enter_context(h)
        res.enter_context(r)
        watch = res.enter_context(IcmpWatch(topo, "r1"))
        raw = res.enter_context(_raw_sender(topo, "r1"))
        sent = _big_df(R1, PUBLIC, UDP(sport=9, dport=alias))
        # byte for byte what r1 sent (TTL included: the MTU check comes before the decrement)
        err = _inbound_frag_needed(watch, raw, sent)
        p = IP(err)
        assert (p.src, p.dst) == (PUBLIC, R1)
        assert p[ICMP].nexthopmtu == LAN_MTU
        assert len(_quoted(err)) >= 28
        assert d.counters().get("icmp_local_error_out", 0) >= 1


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_frag_needed_about_inbound_esp_keeps_the_spi_and_the_public_address(
    topo: Topology, workdir: Path, mode: str
) -> None:
    with _running(topo, workdir, mode, narrow_lan=True) as (d, res):
        h1 = res.enter_context(sock(topo, "h1", socket.AF_INET, socket.SOCK_RAW, PROTO_ESP))
        r_esp = res.enter_context(sock(topo, "r1", socket.AF_INET, socket.SOCK_RAW, PROTO_ESP))
        r_esp.settimeout(1.0)
        watch = res.enter_context(IcmpWatch(topo, "r1"))
        raw = res.enter_context(_raw_sender(topo, "r1"))
        # h1's outbound SA first, so the remote's answer on SPI 0x2001 is placed at h1
        deadline = time.monotonic() + WAIT_S
        while True:
            h1.sendto(struct.pack("!II", 0x1001, 1) + b"h1-first", (R1, 0))
            try:
                pkt = r_esp.recv(2048)
                if socket.inet_ntoa(pkt[12:16]) == PUBLIC:
                    break
            except TimeoutError:
                pass
            assert time.monotonic() < deadline, "h1's ESP never reached r1"
        esp = Raw(struct.pack("!II", 0x2001, 7) + os.urandom(16))
        sent = _big_df(R1, PUBLIC, esp, proto=PROTO_ESP)
        err = _inbound_frag_needed(watch, raw, sent, PROTO_ESP)
        p = IP(err)
        assert (p.src, p.dst) == (PUBLIC, R1)
        quoted = _quoted(err)
        assert quoted[16:20] == socket.inet_aton(PUBLIC)
        assert quoted[20:24] == struct.pack("!I", 0x2001)
        assert d.counters().get("icmp_local_error_out", 0) >= 1


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_frag_needed_about_inbound_isakmp_quotes_the_public_address(
    topo: Topology, workdir: Path, mode: str
) -> None:
    """A certificate-sized IKE message too big for the LAN link: the remote's kernel lowers
    its path MTU only if the error quotes its own packet (ISAKMP is found by its cookies)."""
    ic, rc = int.from_bytes(os.urandom(8), "big") | 1, 0x5EED5EED5EED5EED
    with _running(topo, workdir, mode, narrow_lan=True) as (d, res):
        h = res.enter_context(sock(topo, "h1", socket.AF_INET, socket.SOCK_DGRAM))
        h.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        h.bind(("0.0.0.0", 500))
        r = res.enter_context(sock(topo, "r1", socket.AF_INET, socket.SOCK_DGRAM))
        r.bind((R1, 500))
        r.settimeout(1.0)
        watch = res.enter_context(IcmpWatch(topo, "r1"))
        raw = res.enter_context(_raw_sender(topo, "r1"))
        deadline = time.monotonic() + WAIT_S
        while True:  # IKE_SA_INIT from h1 (IKEv2 header, responder cookie 0)
            h.sendto(struct.pack("!QQBBBBII", ic, 0, 33, 0x20, 34, 0x08, 0, 28), (R1, 500))
            try:
                _data, peer = r.recvfrom(2048)
                if peer == (PUBLIC, 500):
                    break
            except TimeoutError:
                pass
            assert time.monotonic() < deadline, "h1's IKE never reached r1"
        # the answer (with the responder cookie) opens the session; then the big IKE_AUTH
        answer = struct.pack("!QQBBBBII", ic, rc, 33, 0x20, 34, 0x20, 0, 28)
        r.sendto(answer, (PUBLIC, 500))
        h.settimeout(WAIT_S)
        assert h.recv(2048) == answer
        auth = Raw(struct.pack("!QQBBBBII", ic, rc, 35, 0x20, 35, 0x20, 1, 1372))
        sent = _big_df(R1, PUBLIC, UDP(sport=500, dport=500) / auth)
        _inbound_frag_needed(watch, raw, sent)
        assert d.counters().get("icmp_local_error_out", 0) >= 1


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_frag_needed_about_inbound_pptp_gre_quotes_the_outside_call_id(
    topo: Topology, workdir: Path, mode: str
) -> None:
    """GRE to a PPTP client: the gateway's error must quote the Call ID the server sent (the
    outside one vpnmasq allocated), not the client's own."""
    with _running(topo, workdir, mode, narrow_lan=True) as (_d, res):
        remote = Remote(topo)
        res.callback(remote.close)
        # two callers with the same Call ID: the second gets another one outside
        calls = [PptpCall(topo, h, call_id=7, timeout=WAIT_S) for h in ("h1", "h2")]
        for c in reversed(calls):
            res.callback(c.close)
        watch = res.enter_context(IcmpWatch(topo, "r1"))
        raw = res.enter_context(_raw_sender(topo, "r1"))
        # the caller's Call ID as the server saw it, for the call where it is not 7
        (outside,) = [remote.calls[c.server_id] for c in calls if remote.calls[c.server_id] != 7]
        gre = Raw(gre_v1(outside, b"\xff\x03" + os.urandom(16)))
        sent = _big_df(R1, PUBLIC, gre, proto=47)
        err = _inbound_frag_needed(watch, raw, sent, 47)
        assert struct.unpack_from("!H", _quoted(err), 20 + 6)[0] == outside


def test_host_unreachable_about_an_outbound_packet_reaches_the_lan_host(
    topo: Topology, workdir: Path
) -> None:
    """The kernel addresses it to the public address (the quoted source): RFC 5508 wants it
    at the LAN host, quoting the LAN host's own packet."""
    with _running(topo, workdir, "userspace") as (d, res):
        watch = res.enter_context(IcmpWatch(topo, "h1"))
        h = res.enter_context(sock(topo, "h1", socket.AF_INET, socket.SOCK_DGRAM))
        h.bind(("0.0.0.0", 0))
        port = h.getsockname()[1]
        q = _outbound_unreachable(watch, lambda: h.sendto(b"anyone?", (NOBODY, 9)))
        assert struct.unpack_from("!HH", q, (q[0] & 0x0F) * 4) == (port, 9)
        assert d.counters().get("icmp_local_error_in", 0) >= 1


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_host_unreachable_about_outbound_esp_reaches_the_lan_host(
    topo: Topology, workdir: Path, mode: str
) -> None:
    """The same for ESP (vpnmasq's in both modes): found by the quoted SPI."""
    esp = struct.pack("!II", 0x7001, 1) + b"anyone there?"
    with _running(topo, workdir, mode) as (d, res):
        watch = res.enter_context(IcmpWatch(topo, "h1"))
        h = res.enter_context(sock(topo, "h1", socket.AF_INET, socket.SOCK_RAW, PROTO_ESP))
        q = _outbound_unreachable(watch, lambda: h.sendto(esp, (NOBODY, 0)))
        assert q[9] == PROTO_ESP
        assert q[20:24] == struct.pack("!I", 0x7001)
        assert d.counters().get("icmp_local_error_in", 0) >= 1


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_pmtud_for_the_lan_still_works_through_a_narrower_outside_link(
    topo: Topology, workdir: Path, mode: str
) -> None:
    with _running(topo, workdir, mode) as (_d, res):
        assert gw_run(topo, "ip", "link", "set", "wan0", "mtu", str(LAN_MTU)).returncode == 0
        watch = res.enter_context(IcmpWatch(topo, "h1"))
        raw = res.enter_context(_raw_sender(topo, "h1"))
        sent = _big_df(H1, R1, UDP(sport=4444, dport=9))
        err, _ = _frag_needed_quoting(watch, lambda: raw.sendto(sent, (R1, 0)), sent)
        assert IP(err)[ICMP].nexthopmtu == LAN_MTU


def test_rules_queue_the_gateways_icmp_errors_from_output(topo: Topology, workdir: Path) -> None:
    d = Daemon(topo, "hybrid", workdir).start()
    save = gw_run(topo, "iptables-save", "-t", "mangle").stdout
    assert "-A OUTPUT -j VPNMASQ_LOCAL" in save
    assert "-A VPNMASQ_LOCAL -d 10.77.0.0/24 -j RETURN" in save
    assert d.stop() == 0
    assert "VPNMASQ_LOCAL" not in gw_run(topo, "iptables-save", "-t", "mangle").stdout


# ------------------------------------------------------------------------------ hairpin
HAIRPIN_UDP_PORT = 5353  # forwarded to srv, where nothing listens on it


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_port_unreachable_inside_a_hairpinned_flow_reaches_the_lan_client(
    topo: Topology, workdir: Path, mode: str
) -> None:
    """h1 -> public:5353, forwarded to srv:5353 where no socket listens: srv's "port
    unreachable" (addressed to the public address, quoting public:alias -> srv) goes back to
    h1 quoting h1's own datagram, so h1's connected socket sees ECONNREFUSED."""
    forward = f'\n[[forward]]\nprotocol = "udp"\nport = {HAIRPIN_UDP_PORT}\nto = "10.77.0.5"\n'
    with _running(topo, workdir, mode, config=forward) as (d, res):
        srv_wire = Sniffer(topo, "srv", "eth0")
        res.callback(srv_wire.close)
        watch = res.enter_context(IcmpWatch(topo, "h1"))
        h = res.enter_context(sock(topo, "h1", socket.AF_INET, socket.SOCK_DGRAM))
        h.connect((PUBLIC, HAIRPIN_UDP_PORT))
        port = h.getsockname()[1]

        def unreachable(pkt: bytes) -> bool:
            ihl = (pkt[0] & 0x0F) * 4
            return pkt[ihl : ihl + 2] == b"\x03\x03"

        err, _ = _wait_error(watch, lambda: _send_ignoring_refusal(h, b"anyone?"), unreachable)
        p = IP(err)
        assert (p.src, p.dst) == (PUBLIC, H1)
        q = _quoted(err)
        assert q[12:20] == socket.inet_aton(H1) + socket.inet_aton(PUBLIC)
        assert struct.unpack_from("!HH", q, (q[0] & 0x0F) * 4) == (port, HAIRPIN_UDP_PORT)
        _checksums_ok(err)
        # ... and the kernel gave it to the socket it was about (the error is pending on
        # the socket: the next send or recv reports it; else resend, an error may be
        # rate-limited by srv's kernel)
        h.settimeout(1.0)
        wait_until(lambda: refused(h, b"again"), WAIT_S, "ECONNREFUSED on h1's socket")
        # it was srv's error (the gateway would answer a datagram it kept with its own)
        assert any(p.proto == 1 and p.outgoing and p.dst == PUBLIC for p in srv_wire.seen)
        assert d.counters().get("hairpin", 0) >= 2  # h1's datagram and srv's error


def _send_ignoring_refusal(s: socket.socket, data: bytes) -> None:
    try:
        s.send(data)
    except ConnectionRefusedError:  # the previous error, reported on this send
        pass
