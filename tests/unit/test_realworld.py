"""Issue 8 in the engine, config, rules and host helpers: [[route]] networks, a VPN endpoint
on the gateway itself (local_vpn), MSS clamping, last-seen times, upstream NAT warnings,
route/consumer detection parsers and the on_address_change_hook."""

from __future__ import annotations

import stat
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.config_text import with_required
from tests.packets import (
    EXT,
    EXT2,
    IN,
    MASQ,
    OUT,
    PRV1,
    accepted,
    build_esp,
    build_udp,
    dropped,
    ip_of,
    make_engine,
)
from tests.waiting import DEADLINE
from vpnmasq.config import ConfigError, load_config, upstream_nat_reason, validate
from vpnmasq.datapath import routes as rt
from vpnmasq.datapath.rules import RuleSpec, iptables_rules, nft_rules
from vpnmasq.events import Row
from vpnmasq.helpers.isakmp import build_header
from vpnmasq.packet.ipv4 import PROTO_TCP, IPv4, build_ipv4, ip_to_int
from vpnmasq.packet.l4 import TCP_ACK, TCP_SYN, build_tcp, l4_checksum
from vpnmasq.status import rows_from_wire, rows_to_wire
from vpnmasq.verdict import Action, DropReason

ROUTED = ip_to_int("10.88.0.7")


def _route_cfg(**kw: object) -> dict[str, object]:
    from vpnmasq.config import Route

    return {"routes": (Route("10.88.0.0/24", "10.77.0.2"),), **kw}


# ------------------------------------------------------------------------------ [[route]]
def test_traffic_to_a_routed_network_is_never_masqueraded() -> None:
    eng = make_engine(**_route_cfg())
    pkt = build_udp(PRV1, ROUTED, 40000, 7, b"x")
    v = eng.handle(pkt, OUT, 0.0)
    assert v.action is Action.ACCEPT and v.payload is None  # unchanged
    assert eng.counters["routed"] == 1 and len(eng.table) == 0
    # the LAN router's own tunnel to the outside is masqueraded like any host's (GRE v0)
    gre0 = build_ipv4(ip_to_int("10.77.0.2"), EXT, 47, struct.pack("!HH", 0, 0x0800) + bytes(pkt))
    assert accepted(eng.handle(gre0, OUT, 0.0)).src == MASQ
    back = build_ipv4(EXT, MASQ, 47, struct.pack("!HH", 0, 0x0800) + b"\x45" + b"\0" * 19)
    assert accepted(eng.handle(back, IN, 0.1)).dst == ip_to_int("10.77.0.2")


def test_route_config_keys_and_errors() -> None:
    c = load_config(
        'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\n[[route]]\nnetwork = "10.88.0.0/24"\n'
        'via = "10.77.0.2"\nsend_redirects = false\n'
    )
    assert c.routes[0].network == "10.88.0.0/24" and c.routes[0].send_redirects is False
    bad = [
        ('[[route]]\nnetwork = "10.88.0.0/24"\nvia = "192.0.2.1"\n', "route[1].via: 192.0.2.1 is not inside"),
        ('[[route]]\nnetwork = "10.77.0.0/16"\nvia = "10.77.0.2"\n', "overlaps the inside network"),
        ('[[route]]\nvia = "10.77.0.2"\n', "route[1].network: 'network' is required"),
        (
            '[[route]]\nnetwork = "10.88.0.0/24"\nvia = "10.77.0.2"\n'
            '[[route]]\nnetwork = "10.88.0.128/25"\nvia = "10.77.0.3"\n',
            "route[2].network: 10.88.0.128/25 overlaps route[1]",
        ),
        ('[[route]]\nnetwork = "0.0.0.0/0"\nvia = "10.77.0.2"\n', "0.0.0.0/0 would send everything"),
    ]
    for text, msg in bad:
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            load_config(with_required('inside_networks = ["10.77.0.0/24"]\n' + text))


def test_rules_leave_routed_networks_to_the_kernel_and_clamp_mss_in_hybrid_mode() -> None:
    spec = RuleSpec("wan0", ["10.77.0.0/24"], "198.51.100.1", routed_networks=["10.88.0.0/24"],
                    mss_clamp=1452)
    nft = nft_rules(spec) or ""
    raw_out = nft.split("chain raw_out {", 1)[1].splitlines()
    i_ret = next(i for i, line in enumerate(raw_out) if "10.88.0.0/24" in line)
    i_first_notrack = next(i for i, line in enumerate(raw_out) if "notrack" in line)
    assert "return" in raw_out[i_ret] and i_ret < i_first_notrack  # RETURN before any NOTRACK
    assert "10.88.0.0/24" not in iptables_rules(spec)  # the queue rules never see them
    assert 'oifname "wan0" tcp flags syn / syn,rst tcp option maxseg size > 1452 tcp option maxseg size set 1452' in nft
    assert "maxseg" not in (nft_rules(RuleSpec("wan0", ["10.77.0.0/24"])) or "")


def test_route_argv_and_proc_parsers() -> None:
    assert rt.route_argv("10.88.0.7/24", "10.77.0.2") == [
        "ip", "route", "replace", "10.88.0.0/24", "via", "10.77.0.2", "proto", "86",
    ]
    udp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   1: 00000000:01F4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1\n"
        "   2: 0164A8C0:1194 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2\n"
        "   3: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3\n"
    )
    rows = rt.parse_proc_net(udp)
    assert rows[0] == ("0.0.0.0", 500, "07") and rows[1] == ("192.168.100.1", 4500, "07")
    raw = "sl local rem st\n 1: 00000000:002F 00000000:0000 07 0 0 0 0 0 0\n"
    assert rt.consumers_from(udp, "", [], 0, "198.51.100.1") == frozenset({"ike"})
    assert rt.consumers_from("", raw, [], 0, None) == frozenset({"gre"})
    assert rt.consumers_from("", "", [], 2, None) == frozenset({"esp"})
    only_other = udp.splitlines()[0] + "\n" + udp.splitlines()[2] + "\n"
    assert rt.consumers_from(only_other, "", [], 0, "198.51.100.1") == frozenset()  # 4500 on another address
    links = [
        {"ifname": "gre1", "linkinfo": {"info_kind": "gre", "info_data": {"local": "198.51.100.1"}}},
        {"ifname": "gre2", "linkinfo": {"info_kind": "gre", "info_data": {"local": "10.9.9.9"}}},
        {"ifname": "eth0"},
    ]
    assert rt.gre_tunnels(links, "198.51.100.1") == ["gre1"]
    assert rt.consumers_from("", "", links, 0, "198.51.100.1") == frozenset({"gre"})


# ------------------------------------------------------------------------------ local_vpn
def test_unclaimed_inbound_vpn_goes_to_the_gateway_only_when_configured() -> None:
    esp = build_ipv4(EXT, MASQ, 50, build_esp(0xABCD0001, 1))
    gre0 = build_ipv4(EXT, MASQ, 47, struct.pack("!HH", 0, 0x0800) + b"\0" * 20)
    natt = build_udp(EXT, MASQ, 4500, 4500, struct.pack("!II", 0xABCD0002, 1) + b"\0" * 16)
    eng = make_engine(local_vpn="never")
    dropped(eng.handle(esp, IN, 0.0), DropReason.ESP_UNASSOCIATED)
    dropped(eng.handle(gre0, IN, 0.0), DropReason.NO_MAPPING)
    dropped(eng.handle(natt, IN, 0.0), DropReason.NO_MAPPING)
    eng = make_engine(local_vpn="auto")  # no consumer reported yet: same as never
    dropped(eng.handle(esp, IN, 0.0), DropReason.ESP_UNASSOCIATED)
    eng.set_local_consumers({"esp", "ike"})
    v = eng.handle(esp, IN, 0.0)
    assert v.action is Action.ACCEPT and v.local and v.payload is None
    dropped(eng.handle(gre0, IN, 0.0), DropReason.NO_MAPPING)  # no local GRE consumer
    assert eng.handle(natt, IN, 0.0).local
    assert eng.counters["local_vpn:esp"] == 1 and eng.counters["local_vpn:ike"] == 1
    assert "drop:esp-unassociated" in eng.counters  # from before, not the local deliveries
    eng = make_engine(local_vpn="always")
    for pkt in (esp, gre0, natt):
        v = eng.handle(pkt, IN, 0.0)
        assert v.local, v
    with pytest.raises(ValueError, match="unknown local VPN kinds"):
        eng.set_local_consumers({"wireguard"})


def test_local_vpn_never_steals_what_a_lan_host_owns() -> None:
    eng = make_engine(local_vpn="always")
    # a LAN host's ESP association
    accepted(eng.handle(build_ipv4(PRV1, EXT, 50, build_esp(0x11110001, 1)), OUT, 0.0))
    back = accepted(eng.handle(build_ipv4(EXT, MASQ, 50, build_esp(0x22220001, 1)), IN, 0.1))
    assert back.dst == PRV1
    # a LAN host's IKE session, and the gateway's own IKE_SA_INIT response from the same remote
    ic = 0x0102030405060708
    accepted(eng.handle(build_udp(PRV1, EXT, 500, 500, build_header(ic, 0, 34, major=2, flags=8)), OUT, 0.2))
    r = accepted(eng.handle(build_udp(EXT, MASQ, 500, 500, build_header(ic, 9, 34, major=2, flags=0x20)), IN, 0.3))
    assert r.dst == PRV1
    own = build_udp(EXT, MASQ, 500, 500, build_header(0x7777, 0x8888, 34, major=2, flags=0x20))
    assert eng.handle(own, IN, 0.4).local  # a response to a request no LAN host sent
    # a new exchange the remote starts (a request) still goes to the LAN host holding a session
    req = build_udp(EXT, MASQ, 500, 500, build_header(0x9999, 0, 34, major=2, flags=0x08))
    assert accepted(eng.handle(req, IN, 0.5)).dst == PRV1


def test_isakmp_helper_follows_local_vpn() -> None:
    eng = make_engine(local_vpn="auto")
    ike = eng.helper_by_name["isakmp"]
    assert ike.deliver_unknown_locally is False
    eng.set_local_consumers({"ike"})
    assert ike.deliver_unknown_locally is True
    eng.set_local_consumers(set())
    assert ike.deliver_unknown_locally is False
    assert make_engine(local_vpn="always").helper_by_name["isakmp"].deliver_unknown_locally is True
    unknown = build_udp(EXT2, MASQ, 500, 500, build_header(0x42, 0, 34, major=2, flags=8))
    assert make_engine(local_vpn="always").handle(unknown, IN, 0.0).local
    dropped(make_engine(local_vpn="never").handle(unknown, IN, 0.0), DropReason.ISAKMP_UNKNOWN)


# ------------------------------------------------------------------------------ MSS clamp
def syn(src: int, dst: int, sport: int, dport: int, options: bytes, *, flags: int = TCP_SYN) -> bytearray:
    opts = options + b"\x00" * (-len(options) % 4)
    doff = (20 + len(opts)) // 4
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, flags, 65535, 0, 0) + opts)
    struct.pack_into("!H", seg, 16, l4_checksum(src, dst, PROTO_TCP, seg))
    return build_ipv4(src, dst, PROTO_TCP, bytes(seg))


def mss_of(data: bytes | bytearray) -> int | None:
    ip = ip_of(data)
    b = ip.buf
    off = ip.ihl
    end = off + (b[off + 12] >> 4) * 4
    i = off + 20
    while i < end:
        if b[i] == 0:
            return None
        if b[i] == 1:
            i += 1
            continue
        if b[i] == 2:
            return (b[i + 2] << 8) | b[i + 3]
        i += b[i + 1]
    return None


MSS1460 = b"\x02\x04\x05\xb4"


def test_mss_clamp_lowers_syn_and_syn_ack_with_valid_checksums() -> None:
    eng = make_engine(mss_clamp=1452)
    out = accepted(eng.handle(syn(PRV1, EXT, 40000, 80, MSS1460 + b"\x01\x03\x03\x07"), OUT, 0.0))
    assert mss_of(out.buf) == 1452  # accepted() verified the TCP checksum
    sa = syn(EXT, MASQ, 80, out.u16(0), MSS1460, flags=TCP_SYN | TCP_ACK)
    back = accepted(eng.handle(sa, IN, 0.1))
    assert mss_of(back.buf) == 1452 and back.dst == PRV1
    assert eng.counters["mss_clamped"] == 2
    # smaller MSS untouched, non-SYN untouched, off by default
    small = accepted(eng.handle(syn(PRV1, EXT, 40001, 80, b"\x02\x04\x05\x00"), OUT, 0.2))
    assert mss_of(small.buf) == 1280
    plain = accepted(make_engine().handle(syn(PRV1, EXT, 40002, 80, MSS1460), OUT, 0.0))
    assert mss_of(plain.buf) == 1460


@given(
    mss=st.integers(0, 65535),
    nops=st.integers(0, 3),
    clamp=st.integers(536, 9000),
)
def test_mss_clamp_at_any_alignment_keeps_the_checksum_right(mss: int, nops: int, clamp: int) -> None:
    eng = make_engine(mss_clamp=clamp)
    opts = b"\x01" * nops + struct.pack("!BBH", 2, 4, mss)
    out = accepted(eng.handle(syn(PRV1, EXT, 40000, 80, opts), OUT, 0.0))
    assert mss_of(out.buf) == min(mss, clamp)


def test_mss_clamp_leaves_malformed_options_alone() -> None:
    eng = make_engine(mss_clamp=1400)
    bad = b"\x03\x00\x02\x04\x05\xb4"  # option of length 0: stop parsing
    out = accepted(eng.handle(syn(PRV1, EXT, 40000, 80, bad), OUT, 0.0))
    assert bytes(out.buf[40:46]) == bad


# ------------------------------------------------------------------------------ last seen
def test_rows_carry_time_since_the_last_packet_each_way() -> None:
    eng2 = make_engine()
    alias = accepted(eng2.handle(build_udp(PRV1, EXT, 40000, 53, b"q"), OUT, 10.0)).u16(0)
    (r,) = eng2.snapshot(12.5)
    assert r.last_seen_out == pytest.approx(2.5) and r.last_seen_in is None
    accepted(eng2.handle(build_udp(EXT, MASQ, 53, alias, b"r"), IN, 13.0))
    (r,) = eng2.snapshot(14.0)
    assert r.last_seen_in == pytest.approx(1.0) and r.pkts_in == 1
    wire = rows_to_wire([r])
    assert wire[0]["last_seen_in"] == pytest.approx(1.0)
    assert rows_from_wire(wire)[0] == r
    del wire[0]["last_seen_out"], wire[0]["last_seen_in"]  # an older daemon
    assert rows_from_wire(wire)[0].last_seen_out is None
    wire[0]["last_seen_in"] = "soon"
    with pytest.raises(ValueError, match="last_seen_in"):
        rows_from_wire(wire)


def test_status_text_shows_last_seen() -> None:
    from vpnmasq.tools.status import render_text

    row = Row("esp", "10.77.0.11", "198.51.100.1", "203.0.113.20", "PENDING", 100.0, 3, 0,
              300, 0, last_seen_out=2.0, last_seen_in=None)
    text = render_text([row], {})
    assert "LAST OUT/IN" in text and "2s/never" in text


# ------------------------------------------------------------------------------ config
def test_upstream_nat_addresses_and_warning() -> None:
    assert upstream_nat_reason("100.64.0.1") == "carrier-grade NAT shared space (RFC 6598)"
    assert upstream_nat_reason("172.20.1.1") == "private (RFC 1918)"
    assert upstream_nat_reason("198.51.100.1") is None
    c = load_config(with_required('inside_networks = ["10.77.0.0/24"]\npublic_address = "100.72.3.4"\n'))
    (w,) = validate(c)
    assert w.startswith("public_address: 100.72.3.4 is carrier-grade NAT") and "NAT-T" in w


def test_local_vpn_and_mss_clamp_values() -> None:
    default = load_config(with_required(""))
    assert default.local_vpn == "auto" and default.mss_clamp == 0
    assert load_config(with_required('local_vpn = "always"\nmss_clamp = 1452')).mss_clamp == 1452
    with pytest.raises(ConfigError, match="mss_clamp: 100 is not 0"):
        load_config(with_required("mss_clamp = 100"))
    with pytest.raises(ConfigError, match="local_vpn"):
        load_config(with_required('local_vpn = "sometimes"'))


# ------------------------------------------------------------------------------ daemon hook
def test_on_address_change_hook_runs_with_new_and_old_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vpnmasq import daemon

    out = tmp_path / "args"
    hook = tmp_path / "hook.sh"
    # write then rename: the file never exists half written
    hook.write_text(f'#!/bin/sh\necho "$1|$2" > {out}.tmp && mv {out}.tmp {out}\n')
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    current = {"a": "198.51.100.1"}
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    class RecordingPopen(real_popen):  # type: ignore[misc,valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            if list(a[0] if a else kw["args"])[:1] == [str(hook)]:
                started.append(self)

    monkeypatch.setattr(daemon.subprocess, "Popen", RecordingPopen)

    def fake_read(ifname: str, cur: str | None = None) -> str | None:
        return current["a"]

    monkeypatch.setattr(daemon, "read_public_address", fake_read)
    calls: list[str] = []
    monkeypatch.setattr(daemon.rules, "remove", lambda **kw: calls.append("remove"))
    monkeypatch.setattr(daemon.rules, "install", lambda spec, **kw: calls.append("install"))
    cfg = load_config(
        f'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\non_address_change_hook = "{hook}"\n'
        'on_address_change = "rewrite"\n'
    )
    gw = daemon.Gateway(cfg)
    assert gw.public == "198.51.100.1"
    accepted(gw.engine.handle(build_udp(PRV1, EXT, 40000, 53, b"q"), OUT, 0.0))
    current["a"] = "198.51.100.77"
    gw._follow_address(1.0)
    assert len(started) == 1 and started[0].wait(DEADLINE) == 0  # the hook ran, and finished
    assert out.read_text().strip() == "198.51.100.77|198.51.100.1"
    (row,) = gw.engine.snapshot(1.0)
    assert row.outside.startswith("198.51.100.77:")  # rewrite policy kept the mapping
    out.unlink()
    current["a"] = None  # the address goes away: no hook run
    gw._follow_address(2.0)
    assert len(started) == 1 and not out.exists()  # not started again


# ------------------------------------------------------------------------------ hairpin
def test_pptp_hairpin_lan_client_calls_the_lan_server_through_the_public_address() -> None:
    from tests.packets import SRV_LAN, l4_ports
    from tests.pptp_wire import gre_call_id, gre_packet, ocrp, ocrq, sccrp, sccrq, u16_at
    from vpnmasq.config import Forward

    eng = make_engine(forwards=(Forward("tcp", "10.77.0.5", port=1723), Forward("gre", "10.77.0.5")))
    cseq, sseq = 1000, 9000

    def client(payload: bytes, flags: int = TCP_ACK) -> bytes:
        nonlocal cseq
        v = accepted(eng.handle(build_tcp(PRV1, MASQ, 40000, 1723, payload, flags=flags, seq=cseq, ack=sseq), OUT, 0.0))
        assert (v.src, v.dst) == (MASQ, SRV_LAN) and l4_ports(v.buf)[1] == 1723
        cseq += len(payload) + (1 if flags & TCP_SYN else 0)
        return tcp_data(v)

    alias: list[int] = []

    def server(payload: bytes, flags: int = TCP_ACK) -> bytes:
        nonlocal sseq
        v = accepted(eng.handle(build_tcp(SRV_LAN, MASQ, 1723, alias[0], payload, flags=flags, seq=sseq, ack=cseq), OUT, 0.0))
        assert (v.src, v.dst) == (MASQ, PRV1) and l4_ports(v.buf) == (1723, 40000)
        sseq += len(payload) + (1 if flags & TCP_SYN else 0)
        return tcp_data(v)

    syn = accepted(eng.handle(build_tcp(PRV1, MASQ, 40000, 1723, b"", flags=TCP_SYN, seq=cseq), OUT, 0.0))
    alias.append(syn.u16(0))
    cseq += 1
    server(b"", TCP_SYN | TCP_ACK)
    client(b"")
    assert client(sccrq()) == sccrq()
    assert server(sccrp()) == sccrp()
    seen_by_server = client(ocrq(0x0101))
    x_out = u16_at(seen_by_server, 12)  # the client's Call ID as the server sees it
    seen_by_client = server(ocrp(0x0202, x_out))
    y_out = u16_at(seen_by_client, 12)  # the server's Call ID as the client sees it
    assert u16_at(seen_by_client, 14) == 0x0101  # the client's own ID restored
    # GRE both ways through the public address
    to_srv = accepted(eng.handle(gre_packet(PRV1, MASQ, y_out), OUT, 0.1))
    assert (to_srv.src, to_srv.dst, gre_call_id(to_srv)) == (MASQ, SRV_LAN, 0x0202)
    to_cli = accepted(eng.handle(gre_packet(SRV_LAN, MASQ, x_out), OUT, 0.2))
    assert (to_cli.src, to_cli.dst, gre_call_id(to_cli)) == (MASQ, PRV1, 0x0101)
    assert eng.counters["hairpin"] >= 2
    # ESP does not hairpin (its inbound leg would go back to the sender)
    dropped(eng.handle(build_ipv4(PRV1, MASQ, 50, build_esp(1, 1)), OUT, 0.3), DropReason.FILTERED)


def tcp_data(ip: IPv4) -> bytes:
    off = ip.ihl
    return bytes(ip.buf[off + (ip.buf[off + 12] >> 4) * 4 : ip.total_len])
