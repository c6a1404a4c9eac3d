"""``vpnmasq check-config`` (without --offline) against a real machine: a network namespace
with its own interfaces and iptables, and the same answer from ``vpnmasq diagnose``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from netns import Lab

pytestmark = pytest.mark.netns

VPNMASQ = str(Path(sys.executable).with_name("vpnmasq"))
# a veth pair inside the namespace (no dummy module needed)
WAN = "ip link add wan0 type veth peer name wan0-peer && ip link set wan0-peer up"
CONFIG = 'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\n'

CASES = [
    # (case, shell set-up in the namespace, warning check-config prints or None)
    ("FORWARD policy ACCEPT", f"{WAN} && ip link set wan0 up", None),
    (
        "FORWARD policy DROP without the mark rule",
        f"{WAN} && ip link set wan0 up && iptables -P FORWARD DROP",
        "FORWARD drops by default (iptables FORWARD policy DROP) and no rule accepts",
    ),
    (
        "FORWARD policy DROP with the mark rule",
        f"{WAN} && ip link set wan0 up && iptables -P FORWARD DROP && "
        "iptables -A FORWARD -m mark --mark 0x564d -j ACCEPT",
        None,
    ),
    ("outside interface missing", "true", "outside_interface wan0 does not exist"),
    ("outside interface down", WAN, "outside_interface wan0 is down"),
]


@pytest.mark.parametrize(("setup", "warning"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_config_on_a_real_namespace(
    lab: Lab, tmp_path: Path, setup: str, warning: str | None
) -> None:
    lab.add_ns("gw")
    lab.run("gw", setup)
    cfg = tmp_path / "vpnmasq.toml"
    cfg.write_text(CONFIG)
    r = lab.run("gw", [VPNMASQ, "check-config", str(cfg)], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    if warning is None:
        assert r.stdout == f"OK: {cfg}\n" and r.stderr == "", r.stderr
    else:
        assert warning in r.stderr and r.stdout == f"OK: {cfg} (1 warning)\n", r.stderr
    # diagnose judges the same facts the same way (-q: only what is not OK)
    d = lab.run("gw", [VPNMASQ, "diagnose", "-c", str(cfg), "-q"], check=False)
    if warning is None:
        assert "forward-mark" not in d.stdout and "outside-interface" not in d.stdout, d.stdout
    else:
        assert warning in d.stdout, d.stdout
