"""RFC 5780 NAT behaviour discovery in the lab, with coturn: a STUN server on a remote with
two addresses (``turnserver --stun-only``, which answers the CHANGE-REQUEST tests only when it
listens on two addresses and two ports) and ``turnutils_natdiscovery`` on a LAN host.

    srv = StunServer(topo, "r1", alt_ip="198.51.100.21").start()
    nat_behaviour(topo, "h1", srv.ip)   # {"mapping": "endpoint-independent", "filtering": ...}
    nat_hairpinning(topo, "h1", srv.ip)  # (True, output) if the NAT hairpinned the probe
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

STUN_PORT = 3478
ALT_PORT = 3479

#: natdiscovery's verdict lines -> the RFC 4787 terms vpnmasq's config uses
_BEHAVIOURS = {
    "Endpoint Independent": "endpoint-independent",
    "Address Dependent": "address-dependent",
    "Address and Port Dependent": "address-port-dependent",
}
_VERDICT = re.compile(r"NAT with (Endpoint Independent|Address and Port Dependent|Address Dependent) (Mapping|Filtering)!")


class StunServer:
    """coturn as a plain STUN server (no relay, no auth) on ``role``'s address and
    ``alt_ip`` (added to its interface): the two addresses RFC 5780's tests need."""

    def __init__(self, topo: Any, role: str, alt_ip: str, ifname: str = "eth0") -> None:
        self.topo, self.role, self.alt_ip, self.ifname = topo, role, alt_ip, ifname
        self.ip: str = topo.ip(role)
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 10.0) -> StunServer:
        self.topo.exec(self.role, ["ip", "addr", "add", f"{self.alt_ip}/32", "dev", self.ifname])
        argv = [
            "turnserver", "--stun-only", "--no-cli", "-n",
            "-L", self.ip, "-L", self.alt_ip,
            "--listening-port", str(STUN_PORT), "--alt-listening-port", str(ALT_PORT),
            "--log-file", "stdout", "--simple-log", "--no-stdout-log",
        ]  # fmt: skip
        self.proc = self.topo.popen(self.role, argv, name=f"{self.role}:turnserver",
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.topo.wait_listen(self.role, ALT_PORT, "udp", timeout=timeout, addr=self.alt_ip)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.topo.stop(self.proc)
            self.proc = None


def parse_natdiscovery(text: str) -> dict[str, str]:
    """``{"mapping": ..., "filtering": ...}`` from turnutils_natdiscovery's output (the
    behaviours it concluded, in vpnmasq's config terms; a key is missing if it did not)."""
    out: dict[str, str] = {}
    for m in _VERDICT.finditer(text):
        out[m.group(2).lower()] = _BEHAVIOURS[m.group(1)]
    return out


def nat_behaviour(topo: Any, host: str, server: str, timeout: float = 60.0) -> dict[str, str]:
    """Run the mapping (``-m``) and filtering (``-f``) discovery from ``host`` against a
    :class:`StunServer` at ``server``. Each run waits for the answers a NAT filters out
    (natdiscovery's own timeouts, a few seconds)."""
    r = topo.exec(host, ["turnutils_natdiscovery", "-m", "-f", server], check=False,
                  timeout=timeout)  # fmt: skip
    found = parse_natdiscovery(str(r.stdout))
    found["output"] = str(r.stdout)
    return found


def nat_hairpinning(topo: Any, host: str, server: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Run the hairpinning discovery (``-H``) from ``host``: natdiscovery learns its mapping
    from the server, then sends a binding request to that public address and port from
    another local port. True if the request came back to the first socket through the NAT;
    also natdiscovery's output."""
    r = topo.exec(host, ["turnutils_natdiscovery", "-H", server], check=False, timeout=timeout)
    out = str(r.stdout)
    return _HAIRPINNED in out, out


#: what natdiscovery prints when its hairpinning probe arrived
_HAIRPINNED = "Received a request (maybe a successful hairpinning)"
