"""Faults with real VPN peers through ``vpnmasq run`` (userspace mode): the daemon killed
with SIGKILL and restarted with ``state_file`` (rules cleaned and re-installed, table
restored, the PPTP call and the raw-ESP session carry on without re-association); a corrupt
or incompatible state file (reported, ignored, not fatal); the outside interface going down
and up.

Topology (``vtopo``): h1 (PPTP client), h2 (raw ESP client), h3, srv -- gw -- r1 (PPTP
server, raw-ESP server), r2.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from tests.waiting import ANSWER_TIMEOUT, DEADLINE, wait_until

pytestmark = [pytest.mark.e2e]

SPI_OUT, SPI_IN = 0x1001, 0x2001


def _sessions(topo: Any) -> tuple[Any, Any]:
    """A PPTP call h1 -> r1 and a raw-ESP association h2 <-> r1, both verified."""
    from vpnmasq_lab.pptp_client import PptpClient
    from vpnmasq_lab.pptp_server import PptpServer
    from vpnmasq_lab.rawpeers import RawEspServer, run_esp_client

    r1 = topo.ip("r1")
    PptpServer(topo, "r1").start()
    esp_srv = RawEspServer(topo, "r1", [(SPI_OUT, SPI_IN)]).start()
    call = PptpClient(topo, "h1", r1, token="h1").start()
    r = call.exchange(count=5, timeout=15)
    assert r.ok, r.as_dict()
    e = run_esp_client(topo, "h2", r1, SPI_OUT, SPI_IN, count=3, timeout=5, resend=True)
    assert e["ok"], e
    return call, esp_srv


def _esp_ok(topo: Any, count: int = 5, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    from vpnmasq_lab.rawpeers import run_esp_client

    return run_esp_client(topo, "h2", topo.ip("r1"), SPI_OUT, SPI_IN, count=count, timeout=timeout)


def _jumps(topo: Any) -> int:
    """How many jumps into vpnmasq's chains the built-in chains hold (1 per chain if clean)."""
    out = topo.exec("gw", ["iptables-save"], check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("-A") and "-j VPNMASQ_" in line
               and not line.startswith("-A VPNMASQ_"))


@pytest.mark.timeout(150)
def test_sigkill_then_restart_with_state_file_keeps_the_vpn_sessions(
    vtopo: Any, require: Any, record_property: Any
) -> None:
    require("pptpd", "pptp", "/usr/sbin/pptpctrl", "py:scapy", "py:cryptography")
    from vpnmasq_lab.topology import GW_WAN_IP

    topo = vtopo
    state = topo.workdir / "vpnmasq-state.json"
    cfg = {"state_file": str(state)}
    gw = topo.gateway_vpnmasq("userspace", config_overrides=cfg)
    jumps_first = _jumps(topo)
    call, esp_srv = _sessions(topo)
    before = {k: gw.entries(k) for k in ("gre", "esp", "pptp")}
    # the table is saved every 30 s (daemon.STATE_SAVE_INTERVAL_S, written to a temporary
    # file and renamed): wait for a save that already holds both sessions
    def saved_kinds() -> list[str]:
        if not state.exists():
            return []
        kinds = sorted({e["kind"] for e in json.loads(state.read_text())["entries"]})
        return kinds if {"esp", "gre"} <= set(kinds) else []

    with contextlib.suppress(AssertionError):  # the assertions below say what is missing
        wait_until(saved_kinds, 2 * 30 + DEADLINE, "a saved table with both sessions")
    assert state.exists(), "no state file written"
    saved = json.loads(state.read_text())
    kinds = sorted({e["kind"] for e in saved["entries"]})
    record_property("saved_kinds", kinds)
    assert {"esp", "gre"} <= set(kinds), kinds

    # crash: no cleanup at all; the rules stay, so owned packets are dropped (fail closed)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    sent0, ok0 = call.result.sent, call.result.verified
    call.exchange(count=3, timeout=1.5)
    sent1, ok1 = call.result.sent, call.result.verified
    record_property("while_down", {"sent": sent1 - sent0, "verified": ok1 - ok0})
    assert ok1 == ok0 and sent1 > sent0  # nothing passes while nobody reads the queue

    t1 = time.monotonic()
    gw2 = gw.restart(mode="userspace", config_overrides=cfg)
    record_property("restart_s", round(time.monotonic() - t1, 3))
    log = gw2.log()
    record_property("restore_log", [ln for ln in log.splitlines() if "restored" in ln or "saved table" in ln])
    assert "restored" in log, gw2.log_tail()
    assert _jumps(topo) == jumps_first, "rules not cleaned before re-installing"
    after = {k: gw2.entries(k) for k in ("gre", "esp", "pptp")}
    record_property("entries_before", before)
    record_property("entries_after", after)
    for k in ("gre", "esp"):
        assert len(after[k]) == len(before[k]) >= 1, (k, before[k], after[k])
    assert after["esp"][0]["detail"]["assoc"] == "established"
    assert after["esp"][0]["detail"]["spi_in"] == f"0x{SPI_IN:08x}"

    # the same call and the same association carry on
    r = call.exchange(count=10, timeout=DEADLINE)
    record_property("pptp_after", {"sent": r.sent - sent1, "verified": r.verified - ok1})
    assert r.verified - ok1 >= 10 and not r.crosstalk, r.as_dict()
    e = _esp_ok(topo)
    record_property("esp_after", e)
    assert e["ok"] and e["echo_src"] == GW_WAN_IP, e
    srv = esp_srv.stop()
    assert not srv.get("unknown_spi") and not srv.get("bad"), srv
    c = gw2.counters()
    assert not c.get("drop:esp-unassociated") and not c.get("drop:gre-unknown-call"), c


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "content",
    [b"\x00garbage{", b'{"format": "vpnmasq-state", "version": 999, "entries": []}',
     b'{"format": "vpnmasq-state", "version": 1, "entries": "nope"}'],
    ids=["garbage", "future-version", "bad-entries"],
)
def test_a_corrupt_or_incompatible_state_file_is_reported_and_ignored(
    vtopo: Any, require: Any, content: bytes
) -> None:
    require("py:scapy", "py:cryptography")
    from vpnmasq_lab.rawpeers import RawEspServer

    topo = vtopo
    state: Path = topo.workdir / "vpnmasq-state.json"
    state.write_bytes(content)
    gw = topo.gateway_vpnmasq("userspace", config_overrides={"state_file": str(state)})
    assert gw.running()
    log = gw.log()
    assert "ignoring the saved table" in log or "restored" in log, gw.log_tail()
    assert not gw.rows()
    # and it works: a new association is made
    srv = RawEspServer(topo, "r1", [(SPI_OUT, SPI_IN)]).start()
    from vpnmasq_lab.rawpeers import run_esp_client

    e = run_esp_client(topo, "h2", topo.ip("r1"), SPI_OUT, SPI_IN, count=3, timeout=5, resend=True)
    assert e["ok"], e
    srv.stop()


@pytest.mark.timeout(90)
def test_the_outside_interface_going_down_and_up_is_survived(
    vtopo: Any, require: Any, record_property: Any
) -> None:
    require("pptpd", "pptp", "/usr/sbin/pptpctrl", "py:scapy", "py:cryptography")
    topo = vtopo
    gw = topo.gateway_vpnmasq("userspace")
    call, esp_srv = _sessions(topo)
    topo.exec("gw", ["ip", "link", "set", "wan0", "down"])
    sent0, ok0 = call.result.sent, call.result.verified
    call.exchange(count=3, timeout=1.0)
    sent1, ok1 = call.result.sent, call.result.verified
    time.sleep(1.0)  # the outage lasts a while (a scenario duration, not a wait)
    topo.exec("gw", ["ip", "link", "set", "wan0", "up"])
    # back once the link is up again and the kernel routes through it
    wait_until(lambda: "198.51.100.0/24" in topo.exec("gw", ["ip", "-4", "route", "show", "dev",
                                                            "wan0"], check=False).stdout,
               what="wan0's route back")  # fmt: skip
    assert gw.running(), gw.log_tail()
    r = call.exchange(count=10, timeout=DEADLINE)
    e = _esp_ok(topo)
    record_property("while_down", {"sent": sent1 - sent0, "verified": ok1 - ok0})
    record_property("after", {"pptp_sent": r.sent - sent1, "pptp_verified": r.verified - ok1, "esp": e})
    assert ok1 == ok0 and sent1 > sent0  # nothing crosses a link that is down
    assert r.verified - ok1 >= 10 and not r.crosstalk, r.as_dict()
    assert e["ok"], e
    assert gw.entries("gre") and gw.entries("esp")  # the same entries, nothing re-made
    esp_srv.stop()
