"""vpnmasq trace: the decoder, the pcapng writer, filtering/pairing and the line limiter."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.packets import (
    EXT,
    IN,
    MASQ,
    OUT,
    PRV1,
    PRV2,
    accepted,
    build_esp,
    build_gre_v1,
    build_udp,
    make_engine,
)
from vpnmasq.helpers.isakmp import build_header
from vpnmasq.packet.ipv4 import build_ipv4, ip_to_int
from vpnmasq.packet.l4 import build_icmp, build_tcp
from vpnmasq.tools.trace import (
    PAIR_WINDOW,
    LineLimiter,
    PcapngWriter,
    Tracer,
    decode,
    flow_key,
    proto_matcher,
)

LAN = ("10.77.0.0/24",)
PUB = "198.51.100.1"


# ------------------------------------------------------------------------------ decode
def test_decode_enhanced_gre_flags_call_id_seq_ack() -> None:
    pkt = build_ipv4(PRV1, EXT, 47, build_gre_v1(0x1234, b"\xff\x03" + b"x" * 8, seq=77, ack=76))
    line = decode(bytes(pkt))
    assert "gre v1 flags=KSA proto=0x880b payload_len=10 call_id=4660 seq=77 ack=76 (pptp)" in line
    ack_only = build_ipv4(EXT, MASQ, 47, build_gre_v1(9, b"", seq=None, ack=5))
    assert "flags=KA proto=0x880b payload_len=0 call_id=9 ack=5" in decode(bytes(ack_only))


def test_decode_gre_v0_key_and_inner_packet() -> None:
    inner = bytes(build_udp(ip_to_int("10.77.0.12"), ip_to_int("10.88.0.1"), 40000, 7, b"hi"))
    gre = struct.pack("!HHI", 0x2000, 0x0800, 42) + inner  # K set, version 0, IPv4 payload
    line = decode(bytes(build_ipv4(PRV1, EXT, 47, gre)))
    assert "gre v0 flags=K proto=0x0800 key=42" in line
    assert "[inner: 10.77.0.12 > 10.88.0.1 udp 40000 > 7 2 bytes" in line


def test_decode_esp_and_ah() -> None:
    assert "esp spi=0xc0ffee01 seq=5" in decode(bytes(build_ipv4(PRV1, EXT, 50, build_esp(0xC0FFEE01, 5))))
    ah = struct.pack("!BBHII", 50, 4, 0, 0xABCDEF01, 3) + b"\0" * 12
    assert "ah next=50 spi=0xabcdef01 seq=3 (AH cannot be masqueraded)" in decode(
        bytes(build_ipv4(PRV1, EXT, 51, ah))
    )


def test_decode_isakmp_v1_and_v2() -> None:
    v2 = build_header(0x0102030405060708, 0x1112131415161718, 35, major=2, flags=0x20, message_id=1)
    line = decode(bytes(build_udp(EXT, MASQ, 500, 500, v2)))
    assert (
        "isakmp IKEv2 IKE_AUTH icookie=0102030405060708 rcookie=1112131415161718 flags=R "
        "msgid=1 length=28" in line
    )
    v1 = build_header(0xAA, 0xBB, 32, major=1, flags=1, message_id=0xDEAD)
    assert "IKEv1 quick icookie=00000000000000aa rcookie=00000000000000bb flags=E msgid=57005" in decode(
        bytes(build_udp(PRV1, EXT, 500, 500, v1))
    )
    assert "not ISAKMP" in decode(bytes(build_udp(PRV1, EXT, 500, 500, b"hello")))


def test_decode_nat_t_keepalive_ike_and_esp_in_udp() -> None:
    assert "nat-t keepalive" in decode(bytes(build_udp(PRV1, EXT, 4500, 4500, b"\xff")))
    ike = b"\0\0\0\0" + build_header(1, 2, 37, major=2, flags=8)
    assert "nat-t isakmp IKEv2 INFORMATIONAL" in decode(bytes(build_udp(PRV1, EXT, 4500, 4500, ike)))
    esp = struct.pack("!II", 0xC1, 9) + b"\0" * 16
    assert "nat-t esp spi=0x000000c1 seq=9" in decode(bytes(build_udp(PRV1, EXT, 4500, 4500, esp)))


def test_decode_pptp_control_messages_with_call_ids() -> None:
    from tests.pptp_wire import ocrp, ocrq

    data = ocrq(0x0101) + ocrp(0x4242, 0x0101)
    line = decode(bytes(build_tcp(PRV1, EXT, 40000, 1723, data)))
    assert "pptp Outgoing-Call-Request call_id=257; Outgoing-Call-Reply call_id=16962 " \
        "peer_call_id=257 result=1" in line


def test_decode_tcp_mss_and_icmp_frag_needed_quoting_esp() -> None:
    syn = bytearray(build_tcp(PRV1, EXT, 40000, 80, flags=0x02))
    line = decode(bytes(syn))
    assert "40000 > 80 [S]" in line
    quoted = bytes(build_ipv4(MASQ, EXT, 50, build_esp(0x1234, 1)))[:28]
    err = build_icmp(EXT, MASQ, 3, 4, 1400, quoted)
    line = decode(bytes(err))
    assert "icmp unreachable/frag-needed mtu=1400 [quoting: 198.51.100.1 > 203.0.113.20 esp spi=0x00001234" in line


def test_decode_fragments_and_garbage_never_raise() -> None:
    frag = build_ipv4(PRV1, EXT, 50, b"x" * 16, flags_frag=0x0002)  # offset 16, no header
    assert "(fragment, no header)" in decode(bytes(frag)) and "frag=16" in decode(bytes(frag))
    assert decode(b"\x45\x00") == "short packet (2 bytes)"
    assert "gre truncated (1 bytes)" in decode(bytes(build_ipv4(PRV1, EXT, 47, b"\x20")))


@given(st.binary(max_size=120))
def test_decode_any_bytes_gives_a_line(data: bytes) -> None:
    assert isinstance(decode(data), str)
    assert isinstance(decode(b"\x45" + data), str)


# ------------------------------------------------------------------------------ pcapng
def test_pcapng_reads_back_with_scapy_with_interfaces_and_comments(tmp_path: object) -> None:
    from scapy.utils import PcapNgReader

    buf = io.BytesIO()
    w = PcapngWriter(buf)
    a = bytes(build_ipv4(PRV1, EXT, 50, build_esp(1, 1)))
    b = bytes(build_ipv4(MASQ, EXT, 50, build_esp(1, 1)))
    w.packet("lan0", 1_700_000_000_123_456_789, a, "inside outbound, before translation")
    w.packet("wan0", 1_700_000_000_223_456_789, b, "outside outbound, after translation (#1)")
    data = buf.getvalue()
    assert struct.unpack_from("<I", data, 0)[0] == 0x0A0D0D0A
    path = f"{tmp_path}/t.pcapng"
    with open(path, "wb") as f:
        f.write(data)
    pkts = list(PcapNgReader(path))
    assert [bytes(p) for p in pkts] == [a, b]
    assert [p.comment for p in pkts] == [
        b"inside outbound, before translation",
        b"outside outbound, after translation (#1)",
    ]
    assert pkts[1].time - pkts[0].time == pytest.approx(0.1)
    if shutil.which("tshark"):
        cp = subprocess.run(
            ["tshark", "-r", path, "-T", "fields", "-e", "frame.interface_name", "-e", "esp.spi"],
            capture_output=True, text=True, timeout=60,
        )
        assert cp.stdout.split() == ["lan0", "0x00000001", "wan0", "0x00000001"]


# ------------------------------------------------------------------------------ filtering
def test_proto_matcher() -> None:
    m = proto_matcher(["gre"])
    assert m is not None
    assert m(47, 0, 0) and not m(50, 0, 0) and m(1, 0, 0)  # ICMP errors always
    ike = proto_matcher(["ike"])
    assert ike is not None and ike(17, 4500, 4500) and ike(17, 500, 500) and not ike(17, 53, 53)
    assert proto_matcher([]) is None
    with pytest.raises(ValueError, match="unknown protocol 'xyz'"):
        proto_matcher(["xyz"])


def test_tracer_pairs_the_outside_copy_with_the_inside_one_through_a_real_engine() -> None:
    eng = make_engine()
    tr = Tracer(LAN, public=PUB)
    before = bytes(build_ipv4(PRV1, EXT, 50, build_esp(0xC0FFEE01, 1), ident=777))
    after = accepted(eng.handle(before, OUT, 0.0)).buf
    o1 = tr.observe("inside", before, 0.0)
    o2 = tr.observe("outside", bytes(after), 0.01)
    assert o1 is not None and o2 is not None
    assert (o1.direction, o2.direction) == ("out", "out")
    assert o2.paired_with == o1.seq == 1
    assert "before translation" in o1.comment and "after translation" in o2.comment
    # the reply: outside first, then inside
    reply = bytes(build_ipv4(EXT, MASQ, 50, build_esp(0x0BADF00D, 1), ident=99))
    inner = accepted(eng.handle(reply, IN, 0.02)).buf
    o3 = tr.observe("outside", reply, 0.02)
    o4 = tr.observe("inside", bytes(inner), 0.03)
    assert o3 is not None and o4 is not None
    assert o3.direction == o4.direction == "in" and o4.paired_with == o3.seq
    assert "before translation" in o3.comment and "after translation" in o4.comment


def test_tracer_does_not_pair_across_the_window_or_the_same_side() -> None:
    tr = Tracer(LAN, public=PUB)
    before = bytes(build_ipv4(PRV1, EXT, 47, build_gre_v1(5), ident=5))
    after = bytes(build_ipv4(MASQ, EXT, 47, build_gre_v1(5), ident=5))
    assert tr.observe("inside", before, 0.0) is not None
    late = tr.observe("outside", after, PAIR_WINDOW + 0.5)
    assert late is not None and late.paired_with is None
    again = tr.observe("outside", after, PAIR_WINDOW + 0.6)
    assert again is not None and again.paired_with is None  # same side never pairs


def test_tracer_host_filter_learns_the_remotes_of_the_host() -> None:
    tr = Tracer(LAN, public=PUB, host="10.77.0.11")
    other = ip_to_int("203.0.113.99")
    # on the outside nothing matches until the host has talked to that remote
    assert tr.observe("outside", bytes(build_ipv4(EXT, MASQ, 50, build_esp(1, 1))), 0.0) is None
    assert tr.observe("inside", bytes(build_ipv4(PRV2, EXT, 50, build_esp(2, 1))), 0.1) is None
    assert tr.observe("inside", bytes(build_ipv4(PRV1, EXT, 50, build_esp(3, 1))), 0.2) is not None
    assert tr.observe("outside", bytes(build_ipv4(EXT, MASQ, 50, build_esp(1, 2))), 0.3) is not None
    assert tr.observe("outside", bytes(build_ipv4(other, MASQ, 50, build_esp(1, 2))), 0.4) is None


def test_tracer_proto_filter_and_lan_to_lan() -> None:
    tr = Tracer(LAN, public=PUB, match=proto_matcher(["gre"]))
    assert tr.observe("inside", bytes(build_ipv4(PRV1, EXT, 50, build_esp(1, 1))), 0.0) is None
    assert tr.observe("inside", bytes(build_ipv4(PRV1, EXT, 47, build_gre_v1(1))), 0.0) is not None
    assert tr.observe("inside", bytes(build_ipv4(PRV1, PRV2, 47, build_gre_v1(1))), 0.0) is None


def test_line_limiter_summarises_a_flood_per_flow() -> None:
    lim = LineLimiter(rate=2)
    got = [lim.allow("a", 0.0) for _ in range(5)]
    assert [ok for ok, _ in got] == [True, True, False, False, False]
    assert lim.allow("b", 0.0) == (True, 0)  # other flows are not affected
    ok, suppressed = lim.allow("a", 1.0)
    assert ok and suppressed == 3
    assert LineLimiter(rate=0).allow("a", 0.0) == (True, 0)


def test_flow_key_is_the_same_both_ways() -> None:
    a = bytes(build_ipv4(MASQ, EXT, 47, build_gre_v1(1)))
    b = bytes(build_ipv4(EXT, MASQ, 47, build_gre_v1(1)))
    assert flow_key(a) == flow_key(b)


def test_trace_read_decodes_a_capture_file(tmp_path: object) -> None:
    from click.testing import CliRunner

    from vpnmasq.cli import cli

    path = f"{tmp_path}/c.pcapng"
    with open(path, "wb") as f:
        w = PcapngWriter(f)
        w.packet("lan0", 0, bytes(build_ipv4(PRV1, EXT, 47, build_gre_v1(7, b"ab", seq=1))))
        w.packet("lan0", 1, bytes(build_udp(PRV1, EXT, 4500, 4500, b"\xff")))
    res = CliRunner().invoke(cli, ["trace", "--read", path])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("#1") and "call_id=7 seq=1" in lines[0]
    assert "nat-t keepalive" in lines[1]


def _capture(tmp_path: object) -> str:
    path = f"{tmp_path}/c.pcapng"
    with open(path, "wb") as f:
        w = PcapngWriter(f)
        w.packet("lan0", 0, bytes(build_ipv4(PRV1, EXT, 47, build_gre_v1(7, b"ab", seq=1))))
        w.packet("lan0", 1, bytes(build_udp(PRV1, EXT, 4500, 4500, b"\xff")))
        w.packet("lan0", 2, bytes(build_udp(PRV2, EXT, 500, 500, b"\0" * 28)))
        w.packet("lan0", 3, bytes(build_udp(PRV2, EXT, 4500, 4500, b"\xff")))
    return path


def test_trace_read_honours_proto_host_and_count(tmp_path: object) -> None:
    from click.testing import CliRunner

    from vpnmasq.cli import cli

    path = _capture(tmp_path)

    def lines(*args: str) -> list[str]:
        res = CliRunner().invoke(cli, ["trace", "--read", path, *args])
        assert res.exit_code == 0, res.output
        return res.output.splitlines()

    assert [ln.split()[0] for ln in lines("-p", "natt")] == ["#2", "#4"]
    assert [ln.split()[0] for ln in lines("-H", "10.77.0.12")] == ["#3", "#4"]
    assert [ln.split()[0] for ln in lines("-p", "gre", "-p", "isakmp", "-n", "1")] == ["#1"]
    assert [ln.split()[0] for ln in lines("-H", "10.77.0.12", "-p", "natt")] == ["#4"]


def test_trace_read_refuses_an_unknown_protocol_and_a_non_capture(tmp_path: object) -> None:
    from click.testing import CliRunner

    from vpnmasq.cli import cli

    res = CliRunner().invoke(cli, ["trace", "--read", _capture(tmp_path), "-p", "bogus"])
    assert res.exit_code == 2 and "unknown protocol 'bogus'" in res.output
    text = f"{tmp_path}/notes.txt"
    with open(text, "w") as f:
        f.write("not a capture\n" * 20)
    res = CliRunner().invoke(cli, ["trace", "--read", text])
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and "is not a pcap or pcapng capture" in res.output
