"""Two vpnmasq gateways as an active/standby pair, and VPN sessions that run through a
failover and a failback (``vpnmasq demo --ha``, tests/e2e/test_ha_e2e.py)::

     h1 PPTP, h2 h3 raw ESP,          +- lan0 [gw1] wan0 -+
     h4 strongSwan, h5 download       |                   |
          --[lan: br0]----------------+                   +-[inet: br0]- r1 198.51.100.20
             VIP 10.77.0.1            +- lan0 [gw2] wan0 -+  VIP 198.51.100.1 (public)
                    gw1 10.77.0.2, gw2 10.77.0.3 (VRRP, vpnmasq sync, conntrackd)

keepalived (VRRPv3 on lan0, gw1 priority 150, gw2 100) puts both virtual addresses on the
master; the outside interfaces have no address of their own. vpnmasq (hybrid mode) runs on
both with ``[sync]`` (node 1 / node 2), and conntrackd moves the kernel's own flows (NAT-T on
UDP 4500, the download). The scenario:

1. sessions start through gw1: a pptp-linux call to pptpd (h1), raw ESP from h2 and h3 to
   one remote (two SA pairs to r1), strongSwan IKEv2 with NAT-T (h4), a TCP download (h5);
2. **failover**: gw1 crashes (SIGKILL of vpnmasq, keepalived and conntrackd, links down);
   gw2 becomes master and takes over the replicated tables;
3. **failback**: gw1 boots (links up, conntrackd and vpnmasq as standby, both wait for the
   peer's tables, then keepalived, which preempts); gw2 hands the addresses back.

For each session it reports the longest gap between answers and whether it survived without
re-negotiating (the same pptp process and call, the same SPIs, the same IKE and CHILD SAs,
the same TCP connection), then the same run with keepalived alone (no ``[sync]``, no
conntrackd), side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpnmasq.datapath.control import ControlError, query

from .gateway import lab_config, to_toml
from .pptp_client import PptpClient
from .pptp_server import PptpServer
from .rawpeers import RawEspServer, esp_client_argv
from .strongswan import ECHO_PORT, IpsecInitiator, IpsecResponder
from .topology import GW_WAN_IP, LAN_NET, WAN_NET, LabError, Topology

LAN_VIP = "10.77.0.1"
PUBLIC_VIP = GW_WAN_IP
GATEWAYS = {"gw1": "10.77.0.2", "gw2": "10.77.0.3"}
SYNC_PORT = 3790
CONNTRACKD_PORT = 3780
DOWNLOAD_PORT = 8080
VRRP_ID = 77
#: VRRPv3 advertisement interval: the backup declares the master dead after 3 of them
#: plus a skew (RFC 5798 6.1), about 1.1 s here
ADVERT_INT = 0.3
PROBE_INTERVAL = 0.1
#: seconds the sessions run on past a failback for gw1 to boot, sync and preempt
BOOT_BUDGET = 12.0
#: ESP SA pairs (out, in) of h2 and h3 with r1
ESP_SAS = {"h2": (0x1001, 0x2001), "h3": (0x1002, 0x2002)}


class HaTopology(Topology):
    """:class:`Topology` with two gateways, ``gw1`` and ``gw2``, in place of ``gw``."""

    def __init__(self, hosts: int = 5, remotes: int = 1, **kw: Any) -> None:
        super().__init__(hosts, remotes, lan_server=False, **kw)

    def _build_nodes(self) -> None:
        super()._build_nodes()
        del self.nodes["gw"]
        from .topology import Node

        for role, ip in GATEWAYS.items():
            self.nodes[role] = Node(role, f"{self.tag}-{role}", ip)

    def _create_gateways(self, plug: Callable[[str, str, str, str | None], None]) -> None:
        for role, ip in GATEWAYS.items():
            plug(role, "lan0", "lan", f"{ip}/{LAN_NET.prefixlen}")
            plug(role, "wan0", "inet", None)  # only the public VIP, when master
            self.router_sysctls(role)


#: a gateway whose vpnmasq is not ready (``vpnmasq sync-ready`` fails) loses this much
#: priority: gw1 (150) then stays below gw2 (100) until it has the table
TRACK_WEIGHT = -60


def keepalived_conf(
    role: str, priority: int, notify: str | None = None, track: str | None = None
) -> str:
    """The lab's keepalived.conf (packaging/keepalived.conf is the annotated sample)."""
    lines = [
        "global_defs {",
        f"  router_id {role}",
        "  vrrp_version 3",
        "  vrrp_garp_master_delay 1",
        "  vrrp_garp_master_repeat 3",
        "  vrrp_garp_lower_prio_repeat 1",
        "  script_user root",
        "}",
    ]
    if track:
        lines += [
            "vrrp_script vpnmasq_ready {",
            f"  script {track}",
            "  interval 0.5",
            f"  weight {TRACK_WEIGHT}",
            "  fall 1",
            "  rise 1",
            "  init_fail",
            "}",
        ]
    lines += [
        "vrrp_instance vpnmasq {",
        "  state BACKUP",
        "  interface lan0",
        f"  virtual_router_id {VRRP_ID}",
        f"  priority {priority}",
        f"  advert_int {ADVERT_INT}",
        "  virtual_ipaddress {",
        f"    {LAN_VIP}/{LAN_NET.prefixlen} dev lan0",
        f"    {PUBLIC_VIP}/{WAN_NET.prefixlen} dev wan0",
        "  }",
    ]
    if notify:
        lines.append(f"  notify {notify}")
    if track:
        lines += ["  track_script {", "    vpnmasq_ready", "  }"]
    lines += ["}", ""]
    return "\n".join(lines)


def conntrackd_conf(own: str, peer: str, workdir: Path) -> str:
    """The lab's conntrackd.conf (packaging/conntrackd.conf is the annotated sample): FTFW
    over the LAN, the peer's flows written straight into the kernel's table (no external
    cache to commit, so no race with the first packets after a failover)."""
    return "\n".join(
        [
            "Sync {",
            "  Mode FTFW {",
            "    DisableExternalCache On",
            "    StartupResync On",
            "  }",
            "  UDP {",
            f"    IPv4_address {own}",
            f"    IPv4_Destination_Address {peer}",
            f"    Port {CONNTRACKD_PORT}",
            "    Interface lan0",
            "    Checksum on",
            "  }",
            "}",
            "General {",
            "  HashSize 8192",
            "  HashLimit 65536",
            f"  LogFile {workdir / 'conntrackd.log'}",
            f"  LockFile {workdir / 'conntrackd.lock'}",
            f"  UNIX {{ Path {workdir / 'conntrackd.ctl'} }}",
            "  Filter From Userspace {",
            "    Protocol Accept { TCP UDP ICMP }",
            "    Address Ignore {",
            "      IPv4_address 127.0.0.1",
            *(f"      IPv4_address {a}" for a in (LAN_VIP, *GATEWAYS.values())),
            "    }",
            "  }",
            "}",
            "",
        ]
    )


class HaNode:
    """vpnmasq + keepalived in one gateway namespace of an :class:`HaTopology`."""

    def __init__(self, topo: HaTopology, role: str, *, sync: bool, mode: str = "hybrid") -> None:
        self.topo, self.role, self.sync = topo, role, sync
        self.node = 1 if role == "gw1" else 2
        self.priority = 150 if self.node == 1 else 100
        self.dir = topo.mkdir(f"{role}-{'sync' if sync else 'nosync'}")
        peer = "gw2" if self.node == 1 else "gw1"
        over: dict[str, Any] = {"public_address": PUBLIC_VIP}
        if sync:
            key = self.dir / "sync.key"
            key.write_bytes(b"vpnmasq-lab-shared-sync-key-0123456789\n")
            os.chmod(key, 0o600)
            over["sync"] = {
                "peer": f"{GATEWAYS[peer]}:{SYNC_PORT}",
                "listen": f"{GATEWAYS[role]}:{SYNC_PORT}",
                "key_file": str(key),
                "node": self.node,
                "full_sync_interval": 5.0,
            }
        self.config = lab_config(self.dir, mode=mode, overrides=over)
        self.socket = str(self.config["control_socket"])
        self.vpnmasq: subprocess.Popen[Any] | None = None
        self.keepalived: subprocess.Popen[Any] | None = None
        self.conntrackd: subprocess.Popen[Any] | None = None

    # ---------------------------------------------------------------- processes
    def start_vpnmasq(self, timeout: float = 30.0) -> None:
        cfg = self.dir / "vpnmasq.toml"
        cfg.write_text(to_toml(self.config))
        with open(self.dir / "vpnmasq.log", "ab") as log:
            self.vpnmasq = self.topo.popen(
                self.role,
                [sys.executable, "-m", "vpnmasq.cli", "run", "--config", str(cfg)],
                name=f"vpnmasq:{self.role}",
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.vpnmasq.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"vpnmasq on {self.role} did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def start_keepalived(self) -> None:
        conf = self.dir / "keepalived.conf"
        notify = None
        if self.sync:
            # becoming master: conntrackd learns the flows now in the kernel's table (the
            # peer's, written there as they came) and sends them all to the other side
            ct = f"conntrackd -C {self.dir / 'conntrackd.conf'}"
            script = self.dir / "notify.sh"
            script.write_text(f'#!/bin/sh\n[ "$3" = MASTER ] && {ct} -R && {ct} -B\nexit 0\n')
            script.chmod(0o700)
            notify = str(script)
        track = None
        if self.sync:  # keepalived takes the addresses only once vpnmasq has the table
            track = str(self.dir / "ready.sh")
            Path(track).write_text(
                f"#!/bin/sh\nexec {sys.executable} -m vpnmasq.cli sync-ready --socket "
                f"{self.socket} >/dev/null 2>&1\n"
            )
            os.chmod(track, 0o700)
        conf.write_text(keepalived_conf(self.role, self.priority, notify, track))
        run = self.dir / "run"
        with open(self.dir / "keepalived.log", "ab") as log:
            self.keepalived = self.topo.popen(
                self.role,
                [
                    "keepalived",
                    "--dont-fork",
                    "--log-console",
                    "--vrrp",
                    "--no-syslog",
                    "-f",
                    str(conf),
                    "-p",
                    str(run / "keepalived.pid"),
                    "-r",
                    str(run / "vrrp.pid"),
                ],
                name=f"keepalived:{self.role}",
                private_run=run,
                stdout=log,
                stderr=log,
            )

    def start_conntrackd(self) -> None:
        """conntrackd for the kernel's own flows (hybrid mode's plain traffic); with sync only
        (keepalived alone has none of the two)."""
        peer = GATEWAYS["gw2" if self.node == 1 else "gw1"]
        conf = self.dir / "conntrackd.conf"
        conf.write_text(conntrackd_conf(GATEWAYS[self.role], peer, self.dir))
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "conntrackd.lock").unlink()  # left by a SIGKILLed run
        with open(self.dir / "conntrackd.out", "ab") as log:
            self.conntrackd = self.topo.popen(
                self.role,
                ["conntrackd", "-C", str(conf)],
                name=f"conntrackd:{self.role}",
                stdout=log,
                stderr=log,
            )

    def ping(self) -> bool:
        try:
            query(self.socket, "ping", timeout=1.0)
        except ControlError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        try:
            return dict(query(self.socket, "status", timeout=5.0))
        except ControlError:
            return {}

    def sync_status(self) -> dict[str, Any]:
        return dict(self.status().get("sync") or {})

    def is_master(self) -> bool:
        cp = self.topo.exec(
            self.role, ["ip", "-4", "-o", "addr", "show", "dev", "wan0"], check=False
        )
        return f" {PUBLIC_VIP}/" in cp.stdout

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join((self.dir / "vpnmasq.log").read_text().splitlines()[-n:])
        except OSError:
            return ""

    # ---------------------------------------------------------------- failures
    def crash(self) -> None:
        """SIGKILL vpnmasq and keepalived (their whole sessions), then the links go down
        as with a box that lost power (its VIPs stay configured, but unreachable)."""
        for p in (self.keepalived, self.vpnmasq, self.conntrackd):
            if p is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                self.topo.stop(p)
        self.keepalived = self.vpnmasq = self.conntrackd = None
        for dev in ("lan0", "wan0"):
            self.topo.exec(self.role, ["ip", "link", "set", dev, "down"])

    def boot(self, *, wait_sync: float = 15.0) -> float:
        """The crashed gateway comes back: links up without the stale VIPs, conntrackd and
        vpnmasq (standby), then keepalived, whose track script (``vpnmasq sync-ready``)
        holds its priority down until vpnmasq has the peer's table. Returns the seconds
        until conntrackd had the lab's flows (keepalived starts then)."""
        for vip, dev in ((LAN_VIP, "lan0"), (PUBLIC_VIP, "wan0")):
            pfx = LAN_NET.prefixlen if dev == "lan0" else WAN_NET.prefixlen
            self.topo.exec(
                self.role, ["ip", "addr", "del", f"{vip}/{pfx}", "dev", dev], check=False
            )
        for dev in ("lan0", "wan0"):
            self.topo.exec(self.role, ["ip", "link", "set", dev, "up"])
        if self.sync:
            self.start_conntrackd()
        self.start_vpnmasq()
        t0 = time.monotonic()
        if self.sync:
            # the kernel's flows: conntrackd asked the peer for them at start
            asked = 0.0
            while not self.kernel_flows_synced():
                if time.monotonic() - asked > 1.0:  # (its first request may go unanswered)
                    asked = time.monotonic()
                    self.topo.exec(
                        self.role,
                        ["conntrackd", "-C", str(self.dir / "conntrackd.conf"), "-n"],
                        check=False,
                    )
                if time.monotonic() - t0 > wait_sync:
                    raise LabError(
                        f"{self.role}: conntrackd brought no flows:\n"
                        + (self.dir / "conntrackd.log").read_text(errors="replace")[-1500:]
                    )
                time.sleep(0.1)
        waited = time.monotonic() - t0
        self.start_keepalived()
        return waited

    def kernel_flows_synced(self) -> bool:
        """The lab's plain flows (the download, NAT-T) are in this gateway's conntrack table."""
        cp = self.topo.exec(self.role, ["conntrack", "-L"], check=False)
        return f"dport={DOWNLOAD_PORT}" in cp.stdout and "dport=4500" in cp.stdout

    def stop(self) -> None:
        for p in (self.keepalived, self.vpnmasq, self.conntrackd):
            if p is not None:
                self.topo.stop(p, timeout=5.0)
        self.keepalived = self.vpnmasq = self.conntrackd = None


# ------------------------------------------------------------------------------ sessions
@dataclass
class SessionReport:
    name: str
    echoes: list[float] = field(default_factory=list)  # monotonic times of new echoes
    intact: bool = True  # same process, call and SPIs; no cross-talk
    why: str = ""

    def longest_gap(self, start: float, end: float) -> float:
        pts = [start, *sorted(self.echoes), end]
        return max(b - a for a, b in zip(pts, pts[1:], strict=False))

    def verdict(self, events: Sequence[tuple[str, float]], end: float) -> tuple[bool, str]:
        """(survived, why not): intact, and echoes came back after every failover event
        and until the end."""
        if not self.intact or not self.echoes:
            return False, self.why or "no echo at all"
        for name, ev in events:
            if not any(t > ev + 0.05 for t in self.echoes):
                return False, self.why or f"no echo after the {name}"
        if max(self.echoes) <= end - 3.0:
            return False, self.why or "echoes stopped before the end"
        return True, self.why


class PptpSession(threading.Thread):
    def __init__(self, topo: Topology, role: str, server: str, until: float) -> None:
        super().__init__(daemon=True, name=f"pptp:{role}")
        self.topo, self.role, self.server, self.until = topo, role, server, until
        self.report = SessionReport(f"PPTP call {role} -> r1")
        self.client: PptpClient | None = None
        self.up = threading.Event()

    def run(self) -> None:
        c = self.client = PptpClient(self.topo, self.role, self.server, token=self.role).start()
        if not c.wait_up(timeout=15.0):
            self.report.intact, self.report.why = False, "call did not come up"
            self.up.set()
            return
        self.up.set()
        last = c.result.verified
        while time.monotonic() < self.until:
            c.send()
            c.poll(PROBE_INTERVAL)
            if c.result.verified > last:
                self.report.echoes.append(time.monotonic())
                last = c.result.verified
            if c.proc is not None and c.proc.poll() is not None:
                self.report.intact, self.report.why = False, "pptp exited (control connection lost)"
                break
        if c.result.crosstalk:
            self.report.intact, self.report.why = False, "cross-talk"
        c.stop()


class EspSession(threading.Thread):
    def __init__(self, topo: Topology, role: str, server: str, until: float) -> None:
        super().__init__(daemon=True, name=f"esp:{role}")
        self.topo, self.role, self.server, self.until = topo, role, server, until
        out, inn = ESP_SAS[role]
        self.report = SessionReport(f"raw ESP {role} -> r1 (SPIs {out:#x}/{inn:#x})")
        self.up = threading.Event()

    def run(self) -> None:
        out, inn = ESP_SAS[self.role]
        count = int((self.until - time.monotonic()) / PROBE_INTERVAL)
        argv = esp_client_argv(
            self.topo,
            self.server,
            out,
            inn,
            token=self.role,
            count=count,
            timeout=0.5,
            interval=PROBE_INTERVAL,
        )
        jp = self.topo.start_json(self.role, argv, ready="listening", name=f"esp:{self.role}")
        t0 = time.monotonic()
        self.up.set()
        summary = jp.wait_event("summary", timeout=count * PROBE_INTERVAL * 2 + 30)
        self.report.echoes = [t0 + t for t in summary.get("echo_at", [])]
        if summary.get("crosstalk") or summary.get("foreign") or summary.get("bad"):
            self.report.intact = False
            self.report.why = f"foreign SPIs {summary.get('foreign')}, cross-talk"


class IpsecSession(threading.Thread):
    """strongSwan IKEv2 with NAT-T (UDP 4500) from a LAN host to r1; UDP echoes through the
    tunnel. Survives only with the same IKE and CHILD SA SPIs (no re-negotiation)."""

    def __init__(self, topo: Topology, role: str, responder: IpsecResponder, until: float) -> None:
        super().__init__(daemon=True, name=f"ipsec:{role}")
        self.topo, self.role, self.until = topo, role, until
        self.initiator = IpsecInitiator(topo, role, responder)
        self.report = SessionReport(f"strongSwan NAT-T {role} -> r1")
        self.up = threading.Event()
        self.spis: list[set[str]] = []

    def sa_spis(self) -> set[str]:
        """The SPIs of the initiator's IKE and CHILD SAs (swanctl --list-sas)."""
        out = self.initiator.charon.list_sas()
        return set(re.findall(r"\b([0-9a-f]{16})_[ir]", out)) | {
            f"{d} {spi}" for d, spi in re.findall(r"^\s+(in|out)\s+([0-9a-f]{8})\b", out, re.M)
        }

    def run(self) -> None:
        try:
            self.initiator.start()
            self.initiator.connect(timeout=15.0)
        except LabError as exc:
            self.report.intact, self.report.why = False, f"tunnel did not come up: {exc}"
            self.up.set()
            return
        self.spis.append(self.sa_spis())
        self.up.set()
        count = int((self.until - time.monotonic()) / PROBE_INTERVAL)
        res = self.topo.run_json(
            self.role,
            self.topo.py(
                "vpnmasq_lab.plain",
                "udp-echo-client",
                self.initiator.server.inner_ip,
                ECHO_PORT,
                "--count",
                count,
                "--interval",
                PROBE_INTERVAL,
                "--timeout",
                0.5,
                "--token",
                self.role,
            ),
            timeout=count * PROBE_INTERVAL + 30,
        )
        shift = time.monotonic() - time.time()
        self.report.echoes = [w + shift for w in res.get("echo_wall", [])]
        self.spis.append(self.sa_spis())
        if res.get("crosstalk"):
            self.report.intact, self.report.why = False, "cross-talk"
        elif self.spis[0] != self.spis[-1] or not self.spis[0]:
            self.report.intact = False
            self.report.why = (
                f"SAs re-negotiated ({sorted(self.spis[0])} -> {sorted(self.spis[-1])})"
            )
        self.initiator.stop()


class DownloadSession(threading.Thread):
    """A plain TCP download from r1 (hybrid mode: the kernel's NAT; conntrackd moves it).
    Survives only on the same TCP connection."""

    def __init__(self, topo: Topology, role: str, server: str, until: float) -> None:
        super().__init__(daemon=True, name=f"download:{role}")
        self.topo, self.role, self.server, self.until = topo, role, server, until
        self.report = SessionReport(f"TCP download {role} <- r1")
        self.up = threading.Event()

    def run(self) -> None:
        self.up.set()
        duration = self.until - time.monotonic()
        res = self.topo.run_json(
            self.role,
            self.topo.py(
                "vpnmasq_lab.plain",
                "download-client",
                self.server,
                DOWNLOAD_PORT,
                "--duration",
                round(duration, 2),
            ),
            timeout=duration + 30,
        )
        shift = time.monotonic() - time.time()
        self.report.echoes = [w + shift for w in res.get("echo_wall", [])]
        if res.get("error"):
            self.report.intact, self.report.why = False, f"connection lost ({res['error']})"


# ------------------------------------------------------------------------------ scenario
@dataclass
class HaRun:
    sync: bool
    sessions: list[SessionReport]
    events: list[tuple[str, float]]
    start: float
    end: float
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, bool, float, str]]:
        out = []
        for s in self.sessions:
            ok, why = s.verdict(self.events, self.end)
            out.append((s.name, ok, s.longest_gap(self.start, self.end), why))
        return out

    def summary(self) -> str:
        rows = self.rows()
        ok = sum(1 for r in rows if r[1])
        gap = max((r[2] for r in rows), default=0.0)
        return f"ha: {ok}/{len(rows)} sessions survived, longest gap {gap:.1f} s"


def gw1_sync_note(node: HaNode) -> str:
    c = node.status().get("counters", {})
    return f"{c.get('sync_full_applied', 0)} full sync(s) applied before the takeover"


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise LabError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def run_scenario(  # long: the failover scenario, step by step
    *, sync: bool, warmup: float = 3.0, hold: float = 6.0, log: Callable[[str], None] = print
) -> HaRun:
    """One run: sessions through gw1, crash gw1, failback to gw1; returns the reports."""
    topo = HaTopology(hosts=5, remotes=1)
    with topo:
        r1 = topo.ip("r1")
        nodes = {r: HaNode(topo, r, sync=sync) for r in GATEWAYS}
        for n in nodes.values():
            n.start_vpnmasq()
        gw1, gw2 = nodes["gw1"], nodes["gw2"]
        if sync:
            for n in nodes.values():
                n.start_conntrackd()
        gw1.start_keepalived()
        wait_for(gw1.is_master, 15.0, "gw1 to become master")
        gw2.start_keepalived()
        if sync:
            wait_for(lambda: gw2.sync_status().get("replica_synced", False), 15.0, "first sync")
        pptpd = PptpServer(topo, "r1").start()
        esp = RawEspServer(topo, "r1", list(ESP_SAS.values())).start()
        responder = IpsecResponder(topo, "r1", version=2).start()
        download = topo.start_json(
            "r1",
            topo.py("vpnmasq_lab.plain", "download-server", "--port", DOWNLOAD_PORT),
            name="download-server",
        )
        total = warmup + hold + BOOT_BUDGET + hold
        until = time.monotonic() + total
        threads: list[PptpSession | EspSession | IpsecSession | DownloadSession] = [
            PptpSession(topo, "h1", r1, until),
            EspSession(topo, "h2", r1, until),
            EspSession(topo, "h3", r1, until),
            IpsecSession(topo, "h4", responder, until),
            DownloadSession(topo, "h5", r1, until),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.up.wait(20.0)
        start = time.monotonic()
        time.sleep(warmup)
        events: list[tuple[str, float]] = []
        t_fail = time.monotonic()
        events.append(("failover", t_fail))
        log(
            f"  failover: gw1 crashes (SIGKILL vpnmasq + keepalived, links down){' [sync]' if sync else ''}"
        )
        gw1.crash()
        took = wait_for(gw2.is_master, 10.0, "gw2 to become master")
        log(f"    gw2 master after {took:.1f} s")
        time.sleep(hold)
        counters = gw2.status().get("counters", {})
        learned = {k: v for k, v in counters.items() if k in ("created:esp", "created:gre")}
        carried = {k: v for k, v in counters.items() if k.startswith("restored:")}
        log(
            f"    gw2 after the failover: carried over {carried or 'nothing'}, "
            f"learned anew {learned or 'nothing'}"
        )
        for t in threads:
            if isinstance(t, EspSession) and counters.get("created:esp"):
                t.report.why = "association re-learned from traffic, not carried"
        log(
            "  failback: gw1 boots (vpnmasq"
            + (
                " and conntrackd standby; keepalived preempts once `vpnmasq sync-ready`"
                if sync
                else ", keepalived preempts"
            )
            + (")" if not sync else " says it has the table)")
        )
        waited = gw1.boot()
        t_back = time.monotonic()
        took = wait_for(gw1.is_master, 15.0, "gw1 to become master again")
        events.append(("failback", t_back + took))
        log(
            (f"    gw1's conntrackd had the flows after {waited:.1f} s; " if sync else "    gw1 ")
            + f"master again {took:.1f} s after keepalived started"
            + (f" (vpnmasq replica: {gw1_sync_note(gw1)})" if sync else "")
        )
        for t in threads:
            t.join(total + 60)
        end = min(time.monotonic(), until)
        notes = [f"{r}: {n.sync_status()}" for r, n in nodes.items() if sync]
        esp.stop()
        responder.stop()
        download.stop()
        pptpd.stop()
        for n in nodes.values():
            n.stop()
        return HaRun(sync, [t.report for t in threads], events, start, end, notes)


def render(with_sync: HaRun, without: HaRun | None) -> str:
    out = []
    head = f"{'session':44} {'vpnmasq [sync]':>24}"
    if without is not None:
        head += f"   {'keepalived alone':>24}"
    out += [head, "-" * len(head)]
    rows2 = without.rows() if without is not None else None
    for i, (name, ok, gap, why) in enumerate(with_sync.rows()):
        cell = f"{'survived' if ok else 'FAILED'}, gap {gap:5.1f} s"
        line = f"{name:44} {cell:>24}"
        if rows2 is not None:
            _, ok2, gap2, why2 = rows2[i]
            cell2 = f"{'survived' if ok2 else 'FAILED'}, gap {gap2:5.1f} s"
            line += f"   {cell2:>24}"
            if why2:
                line += f"  ({why2})"
        if why:
            line += f"  [{why}]"
        out.append(line)
    out.append("")
    if without is not None:
        out.append("without sync: " + without.summary())
    out.append(with_sync.summary())
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vpnmasq demo --ha", description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-compare", action="store_true", help="skip the run without [sync]")
    ap.add_argument("--hold", type=float, default=6.0, help="seconds between the two failovers")
    args = ap.parse_args(list(argv or []))
    if os.geteuid() != 0:
        print("vpnmasq demo --ha needs root (network namespaces)", file=sys.stderr)
        return 1
    print(f"HA pair with vpnmasq [sync] (keepalived VRRP, advert_int {ADVERT_INT} s):")
    with_sync = run_scenario(sync=True, hold=args.hold)
    without = None
    if not args.no_compare:
        print("the same with keepalived alone (no [sync]):")
        without = run_scenario(sync=False, hold=args.hold)
    print()
    print(render(with_sync, without))
    rows = with_sync.rows()
    return 0 if all(r[1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
