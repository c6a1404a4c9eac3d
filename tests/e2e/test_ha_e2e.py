"""`vpnmasq demo --ha`: two gateways (keepalived VRRP + vpnmasq [sync]) carry a pptp-linux
call and two raw-ESP hosts to one remote through a crash failover and a failback; the same
sessions with keepalived alone lose the PPTP call."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

#: the goal of the HA lab: the longest gap in any session across both failovers
MAX_GAP_S = 3.0


def test_ha_pair_carries_vpn_sessions_through_failover_and_failback(
    require: Any, record_property: Any
) -> None:
    require("keepalived", "pptpd", "pptp", "/usr/sbin/pptpctrl", "py:scapy")
    cp = subprocess.run(
        [sys.executable, "-m", "vpnmasq.cli", "demo", "--ha"],
        capture_output=True,
        text=True,
        timeout=230,
    )
    out = cp.stdout
    record_property("stdout_tail", out[-3000:])
    assert cp.returncode == 0, (out[-3000:], cp.stderr[-3000:])
    m = re.search(r"^ha: (\d+)/(\d+) sessions survived, longest gap ([\d.]+) s$", out, re.M)
    assert m, out
    assert m.group(1) == m.group(2) == "3"
    assert float(m.group(3)) <= MAX_GAP_S
    # the standby carried the associations and the call over: nothing was learned anew
    assert "carried over {'restored:esp': 2" in out and "learned anew nothing" in out
    # keepalived alone: the new master has no table; the PPTP control connection dies
    m2 = re.search(r"^without sync: ha: (\d+)/3 sessions survived", out, re.M)
    assert m2 and int(m2.group(1)) < 3, out
    pptp = next(ln for ln in out.splitlines() if ln.startswith("PPTP call"))
    assert pptp.count("survived") == 1 and "FAILED" in pptp, pptp


def test_sample_keepalived_conf_passes_keepalived_config_test(require: Any) -> None:
    """packaging/keepalived.conf as shipped (checked where its interfaces exist)."""
    require("keepalived", "ip")
    ns = f"vmq-hak-{os.getpid()}"
    conf = Path(__file__).resolve().parents[2] / "packaging" / "keepalived.conf"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "lan0", "type", "veth", "peer", "name", "wan0"],
            check=True,
        )
        cp = subprocess.run(
            ["ip", "netns", "exec", ns, "keepalived", "--config-test", "-f", str(conf)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cp.returncode == 0, cp.stderr
        assert "advert_int 0.3" in conf.read_text()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
