"""State persistence (vpnmasq.state): export from one engine, import into a fresh one.

Each test builds traffic on engine A on a manual clock, saves it (``now``/``wall`` passed
by hand), restores it into engine B whose monotonic clock starts elsewhere, and checks that
B translates the *same* flows the same way without creating anything new.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.packets import (
    EXT,
    EXT2,
    IN,
    MASQ,
    OUT,
    PRV1,
    PRV2,
    SRV_LAN,
    accepted,
    build_icmp,
    build_tcp,
    build_udp,
    dropped,
    esp_packet,
    make_engine,
)
from tests.pptp_wire import (
    ControlLink,
    ccrq,
    cdn,
    gre_call_id,
    gre_in,
    gre_out,
    ocrp,
    ocrq,
    u16_at,
)
from vpnmasq import state
from vpnmasq.config import Limits, PortRange, Timeouts
from vpnmasq.engine import Engine
from vpnmasq.helpers.isakmp import build_header
from vpnmasq.packet.ipv4 import ip_to_int
from vpnmasq.packet.l4 import TCP_ACK, TCP_SYN
from vpnmasq.verdict import DropReason

WALL = 1_700_000_000.0
NEW_PUBLIC = ip_to_int("198.51.100.2")



def moved(
    a: Engine, b: Engine, *, now_a: float, now_b: float, gap: float = 0.0
) -> state.RestoreReport:
    """Save ``a`` at (now_a, WALL), pass it through JSON, restore into ``b`` ``gap`` s later."""
    data = json.loads(json.dumps(state.export_state(a, now_a, WALL), allow_nan=False))
    return state.import_state(b, data, now_b, WALL + gap)


def entry_for(eng: Engine, kind: str, inside: int | None = None) -> Any:
    for e in eng.table:
        if e.kind == kind and (inside is None or e.inside_ip == inside):
            return e
    raise AssertionError(f"no {kind} entry")


# ------------------------------------------------------------------------------ NAPT
def test_napt_sessions_and_bindings_come_back_with_their_ports_and_lifetimes() -> None:
    a = make_engine()
    # UDP: PRV1:5000 -> EXT:53 and its reply
    out = accepted(a.handle(build_udp(PRV1, EXT, 5000, 53, b"q"), OUT, 10.0))
    alias = out.u16(0)
    accepted(a.handle(build_udp(EXT, MASQ, 53, alias, b"r"), IN, 10.0))
    # TCP handshake PRV1:40000 -> EXT:443
    syn = accepted(a.handle(build_tcp(PRV1, EXT, 40000, 443, flags=TCP_SYN), OUT, 11.0))
    tcp_alias = syn.u16(0)
    accepted(a.handle(build_tcp(EXT, MASQ, 443, tcp_alias, flags=TCP_SYN | TCP_ACK), IN, 11.0))
    accepted(a.handle(build_tcp(PRV1, EXT, 40000, 443), OUT, 11.0))
    # ICMP echo
    accepted(a.handle(build_icmp(PRV1, EXT, 8, rest=(77 << 16) | 1), OUT, 12.0))

    b = make_engine()
    rep = moved(a, b, now_a=20.0, now_b=1000.0, gap=7.0)
    assert rep.n_dropped == 0 and rep.restored == {"napt": 2, "icmp": 1}
    assert len(b.table) == 3 and not any(k.startswith("created:") for k in b.counters)

    # the same flows keep their outside ports, both ways
    v = accepted(b.handle(build_udp(PRV1, EXT, 5000, 53, b"q2"), OUT, 1000.0))
    assert (v.src, v.u16(0)) == (MASQ, alias)
    v = accepted(b.handle(build_udp(EXT, MASQ, 53, alias, b"r2"), IN, 1000.0))
    assert (v.dst, v.u16(2)) == (PRV1, 5000)
    tcp = next(e for e in b.table if e.proto == 6)
    assert tcp.state_name == "ESTABLISHED" and tcp.tclass == "tcp_established"
    v = accepted(b.handle(build_tcp(EXT, MASQ, 443, tcp_alias, b"data"), IN, 1000.0))
    assert (v.dst, v.u16(2)) == (PRV1, 40000)
    v = accepted(b.handle(build_icmp(EXT, MASQ, 0, rest=(77 << 16) | 1), IN, 1000.0))
    assert v.dst == PRV1
    assert not any(k.startswith("created:") for k in b.counters)
    # the restored binding holds its port: another host asking for the same one gets another
    v2 = accepted(b.handle(build_udp(PRV2, EXT2, alias, 53, b"x"), OUT, 1000.0))
    assert v2.u16(0) != alias


def test_remaining_lifetime_is_converted_through_the_wall_clock() -> None:
    a = make_engine()
    accepted(a.handle(build_icmp(PRV1, EXT, 8, rest=(5 << 16) | 1), OUT, 100.0))
    left_at_save = entry_for(a, "icmp").expires_at - 130.0  # 60 s timeout, saved 30 s later
    assert left_at_save == pytest.approx(30.0)

    b = make_engine()
    moved(a, b, now_a=130.0, now_b=5.0, gap=12.0)
    assert entry_for(b, "icmp").expires_at - 5.0 == pytest.approx(18.0)
    assert b.next_deadline() == pytest.approx(23.0)

    c = make_engine()  # down longer than the entry had left: gone
    rep = moved(a, c, now_a=130.0, now_b=5.0, gap=31.0)
    assert len(c.table) == 0 and rep.dropped == {"expired": 1}

    d = make_engine()  # the wall clock went backwards: no time is taken off
    moved(a, d, now_a=130.0, now_b=5.0, gap=-3600.0)
    assert entry_for(d, "icmp").expires_at - 5.0 == pytest.approx(30.0)


def test_restored_entries_expire_in_order() -> None:
    a = make_engine()
    for i, t in enumerate((0.0, 100.0, 200.0)):  # three UDP flows, 300 s timeout each
        accepted(a.handle(build_udp(PRV1, EXT, 6000 + i, 53), OUT, t))
    b = make_engine()
    moved(a, b, now_a=250.0, now_b=0.0)
    # 50, 150 and 250 s left; restored in a different order than they expire would break
    # the per-class LRU (the head must expire first)
    assert b.next_deadline() == pytest.approx(50.0)
    b.handle_timer(50.0)
    assert sorted(e.inside_port for e in b.table) == [6001, 6002]
    assert b.next_deadline() == pytest.approx(150.0)
    b.handle_timer(150.0)
    assert [e.inside_port for e in b.table] == [6002]


# ------------------------------------------------------------------------------ ESP
def test_established_esp_association_survives_and_pending_init_is_not_saved() -> None:
    a = make_engine()
    accepted(a.handle(esp_packet(PRV1, EXT, 0x1001), OUT, 1.0))
    v = accepted(a.handle(esp_packet(EXT, MASQ, 0x2001), IN, 1.5))
    assert v.dst == PRV1
    # PRV2 starts an SA with EXT that nobody answers: a pending init
    accepted(a.handle(esp_packet(PRV2, EXT, 0x3001), OUT, 2.0))
    assert sum(1 for e in a.table if e.kind == "esp") == 2
    data = state.export_state(a, 3.0, WALL)
    assert data["skipped"] == {"not-saved": 1}
    assert [r["ext"]["state"] for r in data["entries"]] == ["established"]

    b = make_engine()
    rep = state.import_state(b, json.loads(json.dumps(data)), 50.0, WALL + 1.0)
    assert rep.restored == {"esp": 1}
    # the remote speaks first after the restart: delivered by the restored association,
    # no new association is made (a fresh engine would drop it: ESP_UNASSOCIATED)
    v = accepted(b.handle(esp_packet(EXT, MASQ, 0x2001, 2), IN, 50.0))
    assert v.dst == PRV1
    accepted(b.handle(esp_packet(PRV1, EXT, 0x1001, 2), OUT, 50.1))
    assert not any(k.startswith("esp:associated") for k in b.counters)
    e = entry_for(b, "esp")
    d = b.row(e, 50.1).detail
    assert (d["spi_out"], d["spi_in"], d["assoc"]) == ("0x00001001", "0x00002001", "established")
    assert (e.pkts_out, e.pkts_in) == (2, 2)  # counts carried over
    # PRV2's init was not carried over: its next packet starts a new claim
    accepted(b.handle(esp_packet(PRV2, EXT, 0x3001, 2), OUT, 50.2))
    assert b.counters.get("created:esp") == 1

    fresh = make_engine()
    dropped(fresh.handle(esp_packet(EXT, MASQ, 0x2001, 2), IN, 50.0), DropReason.ESP_UNASSOCIATED)


# ------------------------------------------------------------------------------ ISAKMP
def isakmp(src: int, dst: int, ic: int, rc: int, exch: int = 2) -> bytearray:
    return build_udp(src, dst, 500, 500, build_header(ic, rc, exch))


def test_isakmp_sessions_survive_with_their_cookies() -> None:
    a = make_engine()
    ic1, ic2, rc1, rc2 = 0x1111, 0x2222, 0xAAAA, 0xBBBB
    for host, ic, rc in ((PRV1, ic1, rc1), (PRV2, ic2, rc2)):
        v = accepted(a.handle(isakmp(host, EXT, ic, 0), OUT, 1.0))
        assert (v.src, v.u16(0)) == (MASQ, 500)
        assert accepted(a.handle(isakmp(EXT, MASQ, ic, rc), IN, 1.1)).dst == host

    b = make_engine()
    rep = moved(a, b, now_a=2.0, now_b=9.0, gap=1.0)
    assert rep.restored == {"isakmp": 2}
    # both LAN hosts keep port 500 and are told apart by cookies, inbound first
    assert accepted(b.handle(isakmp(EXT, MASQ, ic2, rc2, 5), IN, 9.0)).dst == PRV2
    assert accepted(b.handle(isakmp(EXT, MASQ, ic1, rc1, 5), IN, 9.0)).dst == PRV1
    v = accepted(b.handle(isakmp(PRV1, EXT, ic1, rc1, 5), OUT, 9.1))
    assert (v.src, v.u16(0)) == (MASQ, 500)
    assert b.row(entry_for(b, "isakmp", PRV2), 9.1).detail["rcookie"] == f"{rc2:016x}"
    assert not any(k.startswith("created:") for k in b.counters)


# ------------------------------------------------------------------------------ PPTP
def test_pptp_control_connection_and_calls_survive_mid_message() -> None:
    a = make_engine()
    link = ControlLink(a, PRV1, 1025, EXT).open(0.0)
    link.start_session(0.1)
    out1 = link.outgoing_call(7, 99, 0.2)
    accepted(gre_out(a, PRV1, EXT, 99, 0.3))
    assert gre_call_id(accepted(gre_in(a, EXT, out1, 0.3))) == 7
    # PRV2 has a call to the same server with Call ID 0x0108, which keeps that outside ID
    link2 = ControlLink(a, PRV2, 1026, EXT).open(0.0)
    link2.start_session(0.1)
    assert link2.outgoing_call(0x0108, 200, 0.2) == 0x0108
    # PRV1's next Outgoing-Call-Request also uses 0x0108 and is cut in the middle of its
    # Call ID field: the first part goes through engine A, the rest through B after the
    # restore, which must still pick another outside ID (the restored pool knows 0x0108)
    req = ocrq(0x0108)
    first = link.lan_sends(req[:13], 0.4)
    assert first == req[:13]

    b = make_engine()
    rep = moved(a, b, now_a=0.5, now_b=3.0, gap=0.5)
    assert rep.restored == {"napt": 2, "gre": 2} and rep.n_dropped == 0
    link.eng = link2.eng = b
    rest = link.lan_sends(req[13:], 3.0)
    out2 = (first[12] << 8) | rest[0]
    assert first[12] == 0x01 and out2 not in (0x0108, out1)  # low byte translated in B
    ctrl = next(e for e in b.table if e.kind == "napt" and e.inside_ip == PRV1).alg
    assert ctrl.by_inside[0x0108].outside_id == out2
    # the restored call carries GRE both ways
    assert gre_call_id(accepted(gre_in(b, EXT, out1, 3.1))) == 7
    assert accepted(gre_out(b, PRV1, EXT, 99, 3.1)).src == MASQ
    # the remote answers the second call; the first is cleared and ends
    got = link.remote_sends(ocrp(100, out2), 3.2)
    assert u16_at(got, 14) == 0x0108
    assert link.lan_sends(ccrq(7), 3.3)[12:14] == out1.to_bytes(2, "big")
    link.remote_sends(cdn(99), 3.4)
    dropped(gre_in(b, EXT, out1, 3.5), DropReason.GRE_UNKNOWN_CALL)
    gre = accepted(gre_in(b, EXT, out2, 3.5))
    assert (gre.dst, gre_call_id(gre)) == (PRV1, 0x0108)
    gre = accepted(gre_in(b, EXT, 0x0108, 3.5))  # PRV2's call, untouched
    assert (gre.dst, gre_call_id(gre)) == (PRV2, 0x0108)


# ------------------------------------------------------------------------------ what no longer applies
def test_restore_onto_a_changed_public_address() -> None:
    a = make_engine()
    accepted(a.handle(esp_packet(PRV1, EXT, 0x1001), OUT, 1.0))
    accepted(a.handle(esp_packet(EXT, MASQ, 0x2001), IN, 1.0))
    accepted(a.handle(build_udp(PRV1, EXT, 5000, 53), OUT, 1.0))

    flush = make_engine(public_address="198.51.100.2")  # on_address_change = "flush"
    rep = moved(a, flush, now_a=2.0, now_b=2.0)
    assert len(flush.table) == 0 and rep.dropped == {"address-changed": 2}

    rewrite = make_engine(public_address="198.51.100.2", on_address_change="rewrite")
    rep = moved(a, rewrite, now_a=2.0, now_b=2.0)
    assert rep.n_restored == 2
    assert accepted(rewrite.handle(esp_packet(PRV1, EXT, 0x1001, 2), OUT, 2.0)).src == NEW_PUBLIC
    v = accepted(rewrite.handle(esp_packet(EXT, NEW_PUBLIC, 0x2001, 2), IN, 2.0))
    assert v.dst == PRV1

    no_addr = Engine(make_engine().config, None)
    object.__setattr__(no_addr, "public_ip", None)
    rep = moved(a, no_addr, now_a=2.0, now_b=2.0)
    assert rep.dropped == {"no-public-address": 2}


def test_restore_into_a_changed_config_drops_what_no_longer_applies() -> None:
    a = make_engine()
    accepted(a.handle(esp_packet(PRV1, EXT, 0x1001), OUT, 1.0))
    accepted(a.handle(esp_packet(EXT, MASQ, 0x2001), IN, 1.0))
    accepted(a.handle(build_udp(PRV1, EXT, 5000, 53), OUT, 1.0))
    accepted(a.handle(build_udp(PRV2, EXT, 62000, 53), OUT, 1.0))  # preserved: in range
    saved = json.loads(json.dumps(state.export_state(a, 2.0, WALL)))
    ports = {r["inside_port"]: r["alias_port"] for r in saved["entries"] if r["proto"] == 17}
    assert ports[62000] == 62000

    # PRV1 no longer inside; esp helper off; port_range no longer holds 62000
    b = make_engine(
        inside_networks=("10.77.0.12/32",),
        helpers=("isakmp", "natt", "pptp", "gre"),
        port_range=PortRange(61000, 61999),
    )
    rep = state.import_state(b, saved, 2.0, WALL)
    assert rep.n_restored == 0
    assert rep.dropped == {"helper-disabled": 1, "not-inside": 1, "binding": 1}
    c = make_engine(helpers=("isakmp", "natt", "pptp", "gre"))
    rep = state.import_state(c, saved, 2.0, WALL)
    assert rep.dropped == {"helper-disabled": 1} and rep.restored == {"napt": 2}

    # a port that became a forward's is not handed back to the old session
    from vpnmasq.config import Forward

    d = make_engine(forwards=(Forward("udp", "10.77.0.5", 62000),))
    rep = state.import_state(d, saved, 2.0, WALL)
    assert rep.dropped == {"binding": 1} and rep.restored == {"napt": 1, "esp": 1}


def test_a_smaller_table_keeps_the_entries_with_most_time_left() -> None:
    a = make_engine()
    for i in range(5):
        accepted(a.handle(build_udp(PRV1, EXT, 7000 + i, 53), OUT, float(i)))
    b = make_engine(limits=Limits(max_entries=2))
    rep = moved(a, b, now_a=10.0, now_b=10.0)
    assert rep.dropped == {"table-full": 3}
    assert sorted(e.inside_port for e in b.table) == [7003, 7004]


def test_timeouts_shortened_in_the_config_cap_restored_lifetimes() -> None:
    a = make_engine()
    accepted(a.handle(build_udp(PRV1, EXT, 5000, 53), OUT, 0.0))
    b = make_engine(timeouts=Timeouts(udp=120.0))
    moved(a, b, now_a=1.0, now_b=0.0)
    assert entry_for(b, "napt").expires_at == pytest.approx(120.0)


def test_malformed_records_are_dropped_one_by_one() -> None:
    a = make_engine()
    accepted(a.handle(build_udp(PRV1, EXT, 5000, 53), OUT, 0.0))
    accepted(a.handle(build_icmp(PRV1, EXT, 8, rest=(5 << 16) | 1), OUT, 0.0))
    data = json.loads(json.dumps(state.export_state(a, 1.0, WALL)))
    data["entries"][0]["inside_port"] = "not a port"
    data["entries"].append({"kind": "napt"})
    data["entries"].append(["not", "a", "record"])
    b = make_engine()
    rep = state.import_state(b, data, 1.0, WALL)
    assert rep.dropped == {"malformed": 3} and rep.n_restored == 1


def test_restore_needs_an_empty_table_and_a_known_format() -> None:
    a = make_engine()
    accepted(a.handle(build_udp(PRV1, EXT, 5000, 53), OUT, 0.0))
    data = state.export_state(a, 1.0, WALL)
    with pytest.raises(state.StateError, match="empty table"):
        state.import_state(a, data, 1.0, WALL)
    for bad, msg in (
        ({**data, "version": 2}, "newer vpnmasq"),
        ({**data, "version": 0}, "not supported"),
        ({**data, "format": "other"}, "not a vpnmasq state"),
        ({**data, "entries": {}}, "entries"),
        ({**data, "saved_at": "yesterday"}, "saved_at"),
        ([1, 2], "JSON object"),
    ):
        with pytest.raises(state.StateError, match=msg):
            state.import_state(make_engine(), bad, 1.0, WALL)


# ------------------------------------------------------------------------------ files
def test_write_is_atomic_private_and_read_back(tmp_path: Path) -> None:
    a = make_engine()
    accepted(a.handle(build_udp(PRV1, EXT, 5000, 53), OUT, 0.0))
    path = tmp_path / "sub" / "state.json"
    data = state.export_state(a, 1.0, WALL)
    n = state.write_state(str(path), data)
    assert n == path.stat().st_size > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert state.read_state(str(path)) == json.loads(json.dumps(data))
    # overwrite: no temporary files left behind, the new content is there
    os.chmod(path, 0o644)
    state.write_state(str(path), {**data, "entries": []})
    assert os.listdir(path.parent) == ["state.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    got = state.read_state(str(path))
    assert got is not None and got["entries"] == []


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    good = state.export_state(make_engine(), 1.0, WALL)
    state.write_state(str(path), good)
    with pytest.raises(ValueError):
        state.write_state(str(path), {**good, "saved_at": float("nan")})
    assert state.read_state(str(path)) == good
    assert os.listdir(tmp_path) == ["state.json"]


def test_reading_missing_corrupt_and_incompatible_files(tmp_path: Path) -> None:
    assert state.read_state(str(tmp_path / "none.json")) is None
    p = tmp_path / "s.json"
    p.write_bytes(b"\x00\xffgarbage")
    with pytest.raises(state.StateError, match="corrupt"):
        state.read_state(str(p))
    p.write_text("[" * 100_000)  # nested past the decoder's recursion limit: corrupt too
    with pytest.raises(state.StateError, match="corrupt"):
        state.read_state(str(p))
    p.write_text('{"format": "vpnmasq-state", "version": 9, "saved_at": 1, "entries": []}')
    with pytest.raises(state.StateError, match="version 9 was written by a newer vpnmasq"):
        state.read_state(str(p))
    p.write_text("[]")
    with pytest.raises(state.StateError, match="not a vpnmasq state"):
        state.read_state(str(p))


def test_report_summary_names_kinds_and_reasons() -> None:
    r = state.RestoreReport(restored={"esp": 1, "napt": 2}, dropped={"expired": 3}, elapsed=4.25)
    assert (
        r.summary() == "restored 3 entries (esp 1, napt 2) saved 4.2 s ago; dropped 3 (expired 3)"
    )


def test_a_forwarded_lan_pptp_server_keeps_its_call_across_a_restore() -> None:
    from vpnmasq.config import Forward

    fwd = (Forward("tcp", "10.77.0.5", 1723), Forward("gre", "10.77.0.5"))
    a = make_engine(forwards=fwd)
    srv = ControlLink(a, SRV_LAN, 1723, EXT2, 50000, lan_opens=False, public_port=1723).open(0.0)
    srv.start_session(0.0)
    assert srv.remote_sends(ocrq(7), 0.1) == ocrq(7)  # the outside PNS calls in
    reply = srv.lan_sends(ocrp(1, 7), 0.2)  # the LAN PAC answers with Call ID 1
    s_out = u16_at(reply, 12)

    b = make_engine(forwards=fwd)
    rep = moved(a, b, now_a=1.0, now_b=1.0)
    assert rep.restored == {"fwd": 1, "gre": 1} and rep.n_dropped == 0
    srv.eng = b
    gre = accepted(gre_in(b, EXT2, s_out, 1.5))  # the PNS's GRE reaches the LAN server
    assert (gre.dst, gre_call_id(gre)) == (SRV_LAN, 1)
    assert accepted(gre_out(b, SRV_LAN, EXT2, 7, 1.5)).src == MASQ
    assert srv.remote_sends(ccrq(7), 2.0) == ccrq(7)  # and the control connection goes on
    # the static forward binding is the config's, not a copy
    e = entry_for(b, "fwd")
    assert e.binding is b.table.binding(6, SRV_LAN, 1723) and e.binding.static


def test_natt_sessions_keep_their_labels() -> None:
    a = make_engine()
    accepted(a.handle(build_udp(PRV1, EXT, 4500, 4500, b"\xff"), OUT, 0.0))  # keepalive
    accepted(a.handle(build_udp(PRV1, EXT, 4500, 4500, b"\x00\x00\x10\x01" + bytes(12)), OUT, 0.1))
    b = make_engine()
    moved(a, b, now_a=1.0, now_b=1.0)
    d = b.row(entry_for(b, "napt"), 1.0).detail
    assert d["keepalives"] == "1/0" and d["esp"] == "1/0" and d["spi_out"] == "0x00001001"
