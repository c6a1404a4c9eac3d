"""A reload (SIGHUP) rebuilds the engine from the new configuration: the entries it does not
carry over must be reported as removed, as if the table had removed them, so that
``vpnmasq events`` readers and the removed-entries counters see them go; the entries it
carries over must not be reported at all (a reader would drop a live session)."""

from __future__ import annotations

import dataclasses

from tests.packets import EXT, MASQ, OUT, PRV1, PRV2, accepted, build_tcp, build_udp
from tests.pptp_wire import ControlLink
from tests.transcript import Gw
from vpnmasq import reload
from vpnmasq.events import EntryCreated, EntryExpired
from vpnmasq.eventstream import EventStream


def busy_gateway() -> Gw:
    """Both LAN hosts with a UDP and a TCP session, IKE + an associated ESP pair, and a
    PPTP call (control connection and GRE)."""
    gw = Gw()
    for i, host in enumerate((PRV1, PRV2)):
        accepted(gw.out(build_udp(host, EXT, 5000, 53)))
        accepted(gw.out(build_tcp(host, EXT, 40000 + i, 443, flags=0x02)))
        accepted(gw.ike_out(host, ic=0x100 + i))
        accepted(gw.ike_in(ic=0x100 + i, rc=0x200 + i))
        accepted(gw.esp_out(host, 0x1000 + i))
        accepted(gw.esp_in(0x2000 + i))
        link = ControlLink(gw.eng, host, 41000, EXT).open(gw.now)
        link.start_session(gw.now)
        link.outgoing_call(7, 0x4000 + i, gw.now)
    gw.eng.drain_events()
    return gw


def test_a_reload_that_keeps_everything_reports_nothing() -> None:
    gw = busy_gateway()
    new, rep = reload.rebuild(gw.eng, gw.eng.config, gw.now + 1, 1000.0)
    assert rep.n_dropped == 0 and len(new.table) == len(gw.eng.table)
    assert reload.left_behind(gw.eng, new) == []
    assert new.drain_events() == []


def test_entries_a_reload_drops_are_reported_removed_and_counted() -> None:
    gw = busy_gateway()
    kinds_of_prv2 = sorted(e.kind for e in gw.eng.table if e.inside_ip == PRV2)
    assert len(kinds_of_prv2) >= 5, kinds_of_prv2
    cfg = dataclasses.replace(gw.eng.config, inside_networks=("10.77.0.11/32",))
    before = dict(gw.eng.counters)
    new, rep = reload.rebuild(gw.eng, cfg, gw.now + 1, 1000.0)
    events = new.drain_events()
    assert all(isinstance(ev, EntryExpired) and ev.why == reload.RELOAD_WHY for ev in events)
    assert rep.n_dropped == len(events)
    assert sorted(ev.row.inside.split(":")[0] for ev in events) == ["10.77.0.12"] * len(events)
    assert len(events) == len(kinds_of_prv2)
    for kind in set(kinds_of_prv2):
        assert new.counters["removed:" + kind] == before.get(
            "removed:" + kind, 0
        ) + kinds_of_prv2.count(kind)
    # the stream says so in its words, with the row (SPIs, Call IDs) of what went
    objs = EventStream(new.row).convert(events, gw.now + 1, 1000.0)
    assert {o["event"] for o in objs} == {"removed"} and {o["reason"] for o in objs} == {"reload"}
    assert any(o.get("what") == "pptp-call-down" for o in objs)
    (esp,) = [o for o in objs if o["proto"] == "esp"]
    assert esp["detail"]["spi_in"] == "0x00002001", esp
    # nothing of the kept host is reported, and its sessions work on
    assert not [ev for ev in events if isinstance(ev, EntryCreated)]
    assert accepted(new.handle(build_udp(PRV1, EXT, 5000, 53), OUT, gw.now + 1)).src == MASQ
