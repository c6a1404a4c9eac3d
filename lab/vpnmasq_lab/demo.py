"""``vpnmasq demo``: real VPN clients on a LAN share one public address through vpnmasq.

::

    h1..h3 ---- PPTP (pptp-linux) ----------------------+        +-- r1 PoPToP pptpd
    h4 -------- IPsec, strongSwan IKEv2 + NAT-T --------+        |
    h5, h6 ---- IPsec, raw ESP (proto 50) --------------+-[gw]---+-- r2 IPsec gateway (charon + raw ESP)
    every host: web-like TCP (HTTP/1.0 GETs) -----------+ vpnmasq+-- r3 web server
    srv 10.77.0.5: PoPToP, published by [[forward]] <---+        +-- r4 road warrior calling srv

Phase 1 runs every session through ``vpnmasq run`` (``--mode``, hybrid by default) and shows
the masquerade table live (a rich view on a terminal, periodic plain text otherwise). Phase 2
runs the same sessions through the Linux kernel's own NAT (nftables masquerade, the PPTP
conntrack helper and a DNAT for the published server) in a fresh topology. The demo ends
with one line per session: whether its echoes came back, packets each way, and what the
kernel's NAT did with the same traffic, with the reason when it failed.

Every topology is torn down on exit, on Ctrl-C and on SIGTERM; namespaces left behind by a
run that was killed with SIGKILL are removed at the next start. Exit status: 0 when every
session worked through vpnmasq, 1 otherwise, 2 for a usage or setup problem, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from vpnmasq.events import Row
from vpnmasq.status import kind_of
from vpnmasq.tools.status import render_text, rich_table

from .gateway import VpnmasqGateway
from .pptp_client import PptpClient
from .pptp_server import PptpServer
from .rawpeers import RawEspServer, run_esp_client
from .strongswan import CHARON, IpsecInitiator, IpsecResponder, missing_plugins
from .topology import GW_WAN_IP, LAN_SERVER_IP, LabError, Topology, cleanup_stale

DEFAULT_HOSTS = 6
DEFAULT_DURATION = 8.0  # seconds of traffic per phase, after the sessions are set up
MIN_HOSTS, MAX_HOSTS = 2, 20
WEB_PORT = 80
PPTP_SERVER, IPSEC_GW, WEB_SERVER, ROAD_WARRIOR = "r1", "r2", "r3", "r4"
REMOTES = 4
#: how often the live view and the plain-text view refresh
LIVE_REFRESH_S = 0.5
TEXT_EVERY_S = 3.0
VPN_KINDS = ("pptp", "gre", "esp", "isakmp", "natt")
TABLE_FRAME_LINES = 5  # a rich table's title, borders and header
#: entries of plain (non-VPN) kinds listed in the final table; the rest are counted
PLAIN_ROWS_SHOWN = 6
#: live view columns given up, in this order, when a table is wider than the terminal
OPTIONAL_COLUMNS = ("DETAIL", "LAST OUT/IN", "BYTES OUT/IN", "EXPIRES")
UNBOUNDED_WIDTH = 10_000  # to measure a table's natural width

KIND_LABEL = {
    "pptp": "PPTP",
    "pptp-in": "PPTP in",
    "ipsec-natt": "IPsec NAT-T",
    "raw-esp": "IPsec ESP",
    "web": "web",
}
#: what the kernel's NAT is known to get wrong, shown under the summary when it fails
KERNEL_LIMITS = {
    "raw-esp": "Linux conntrack tracks ESP as a generic protocol, by address pair without the "
    "SPI: a second LAN host's ESP to the same remote maps to the same outside tuple and is "
    "dropped at conntrack confirm (insert_failed). vpnmasq associates each host's SPIs.",
    "pptp": "nf_nat_pptp uses the control connection's TCP source port as the NAT Call ID, "
    "which breaks with two calls in one control connection. vpnmasq allocates Call IDs.",
}


# ------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class SessionSpec:
    key: str  # unique, also the token its packets carry
    kind: str  # pptp | pptp-in | ipsec-natt | raw-esp | web
    client: str  # role of the client namespace
    server: str  # role of the server namespace
    spis: tuple[int, int] | None = None  # raw ESP: (client's outbound SPI, inbound SPI)

    @property
    def title(self) -> str:
        target = "public address" if self.kind == "pptp-in" else self.server
        return f"{self.client} -> {target}"

    @property
    def label(self) -> str:
        return KIND_LABEL[self.kind]


def plan_sessions(n_hosts: int, *, pptp: bool = True, strongswan: bool = True) -> list[SessionSpec]:
    """Half the hosts (rounded up) call the PPTP server, the others the IPsec gateway; of
    those every third uses strongSwan and the rest raw ESP, so two raw-ESP hosts share one
    remote as soon as there are three IPsec hosts. Every host also browses the web server,
    and r4 calls the LAN's PPTP server through the public address."""
    hosts = [f"h{i + 1}" for i in range(n_hosts)]
    n_pptp = (n_hosts + 1) // 2 if pptp else 0
    out: list[SessionSpec] = []
    for h in hosts[:n_pptp]:
        out.append(SessionSpec(f"pptp-{h}", "pptp", h, PPTP_SERVER))
    for i, h in enumerate(hosts[n_pptp:]):
        if strongswan and i % 3 == 0:
            out.append(SessionSpec(f"ike-{h}", "ipsec-natt", h, IPSEC_GW))
        else:
            n = int(h[1:])
            out.append(SessionSpec(f"esp-{h}", "raw-esp", h, IPSEC_GW, (0x1000 + n, 0x2000 + n)))
    if pptp:
        out.append(SessionSpec("pptp-in-r4", "pptp-in", ROAD_WARRIOR, "srv"))
    for h in hosts:
        out.append(SessionSpec(f"web-{h}", "web", h, WEB_SERVER))
    return out


# ---------------------------------------------------------------------------- sessions
@dataclass
class SessionResult:
    spec: SessionSpec
    ok: bool
    out: int  # packets (frames, datagrams, requests) the client sent
    back: int  # packets that came back to it
    verified: int  # echoes verified as its own
    expected: int  # echoes it should have had
    crosstalk: int  # packets of another session delivered to it
    reason: str  # why it failed ("" when ok)


class Session(threading.Thread):
    """One client's traffic for the length of a phase, in a daemon thread."""

    def __init__(self, spec: SessionSpec, topo: Topology, servers: Servers, until: float) -> None:
        super().__init__(name=spec.key, daemon=True)
        self.spec = spec
        self.topo = topo
        self.servers = servers
        self.until = until
        self.stop_event = threading.Event()
        self.traffic_done = threading.Event()  # set when its traffic is over
        self.release = threading.Event()  # the phase has looked at the table: tear down
        self.state = "starting"
        self.out = self.back = self.verified = self.expected = self.crosstalk = 0
        self.error: str | None = None
        self.pptp_ok: bool | None = None

    def run(self) -> None:
        try:
            getattr(self, "_run_" + self.spec.kind.replace("-", "_"))()
            self.state = "done"
        except Exception as e:  # a failed session is a result, not a crash of the demo
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.error = first[:120]
            self.state = "failed"
        finally:
            self.traffic_done.set()

    def _linger(self) -> None:
        """Keep the session (its call, its tunnel) up until the phase has taken its last
        look at the gateway's table."""
        self.traffic_done.set()
        self.release.wait(30)

    def _more(self) -> bool:
        return not self.stop_event.is_set() and time.monotonic() < self.until

    def _pause(self, s: float = 0.5) -> None:
        self.stop_event.wait(s)

    # -- kinds
    def _run_pptp(self) -> None:
        server_ip = GW_WAN_IP if self.spec.kind == "pptp-in" else self.topo.ip(self.spec.server)
        c = PptpClient(self.topo, self.spec.client, server_ip, token=self.spec.key).start()
        try:
            r = c.exchange(count=5, timeout=10)
            self._pptp_counts(r)
            self.state = "up" if r.verified else "no call"
            while r.verified and self._more():
                self._pause()
                r = c.exchange(count=3, timeout=3)
                self._pptp_counts(r)
            self._pptp_counts(r)
            self.pptp_ok = r.ok
            self.state = "done"
            self._linger()
        finally:
            c.stop()

    _run_pptp_in = _run_pptp

    def _pptp_counts(self, r: Any) -> None:
        self.out, self.back = r.sent, r.received
        self.verified, self.expected, self.crosstalk = r.verified, r.sent_unique, len(r.crosstalk)

    def _run_ipsec_natt(self) -> None:
        responder = self.servers.responder
        if responder is None:
            raise LabError("no IPsec responder")
        ini = IpsecInitiator(self.topo, self.spec.client, responder).start()
        ini.connect(timeout=12)
        self.state = "up"
        first = True
        while first or self._more():
            first = False
            for r in (
                ini.udp_echo(count=3, timeout=2, token=self.spec.key),
                ini.tcp_echo(count=2, timeout=2, token=self.spec.key),
            ):
                self.out += int(r.get("sent", 0))
                self.back += int(r.get("received", r.get("verified", 0)))
                self.verified += int(r.get("verified", 0))
                self.expected += int(r.get("sent", 0))
                self.crosstalk += len(r.get("crosstalk", []))
            self._pause()

    def _run_raw_esp(self) -> None:
        assert self.spec.spis is not None
        spi_out, spi_in = self.spec.spis
        first = True
        while first or self._more():
            r = run_esp_client(
                self.topo,
                self.spec.client,
                self.topo.ip(self.spec.server),
                spi_out,
                spi_in,
                token=self.spec.key,
                count=3,
                timeout=4.0 if first else 2.0,
                resend=True,
            )
            first = False
            self.out += int(r["sent"]) + int(r["resent"])
            self.back += int(r["received"]) + sum(r["foreign"].values())
            self.verified += int(r["verified"])
            self.expected += 3
            self.crosstalk += len(r["crosstalk"]) + sum(r["foreign"].values())
            self.state = "up" if r["verified"] else "no reply"
            self._pause()

    def _run_web(self) -> None:
        first = True
        while first or self._more():
            first = False
            r = self.topo.run_json(
                self.spec.client,
                self.topo.py(
                    "vpnmasq_lab.plain",
                    "http-client",
                    self.topo.ip(self.spec.server),
                    WEB_PORT,
                    "--count",
                    3,
                    "--token",
                    self.spec.key,
                    "--timeout",
                    2,
                ),
            )
            self.out += int(r["sent"])
            self.back += int(r["verified"]) + len(r["crosstalk"])
            self.verified += int(r["verified"])
            self.expected += int(r["sent"])
            self.crosstalk += len(r["crosstalk"])
            self.state = "up" if r["verified"] else "no reply"
            self._pause(0.7)

    # -- verdict
    def result(self) -> SessionResult:
        ok = (
            self.error is None
            and self.expected > 0
            and self.verified == self.expected
            and self.crosstalk == 0
            and self.pptp_ok is not False
        )
        return SessionResult(
            self.spec,
            ok,
            self.out,
            self.back,
            self.verified,
            self.expected,
            self.crosstalk,
            "" if ok else self._reason(),
        )

    def _reason(self) -> str:
        if self.error:
            return self.error
        if self.crosstalk:
            return f"cross-talk: {self.crosstalk} packets of another session delivered here"
        if self.expected == 0:
            return "no call came up" if self.spec.kind.startswith("pptp") else "nothing sent"
        if self.verified == 0:
            return f"nothing came back ({self.out} sent)"
        return f"only {self.verified} of {self.expected} echoes came back"


# ----------------------------------------------------------------------------- servers
@dataclass
class Servers:
    pptpd: PptpServer | None = None
    lan_pptpd: PptpServer | None = None
    responder: IpsecResponder | None = None
    esp: RawEspServer | None = None
    web: Any = None

    @classmethod
    def start(cls, topo: Topology, plan: Sequence[SessionSpec]) -> Servers:
        kinds = {s.kind for s in plan}
        srv = cls()
        if "pptp" in kinds:
            srv.pptpd = PptpServer(topo, PPTP_SERVER).start()
        if "pptp-in" in kinds:
            srv.lan_pptpd = PptpServer(topo, "srv").start()
        if "ipsec-natt" in kinds:
            srv.responder = IpsecResponder(topo, IPSEC_GW, version=2).start()
        sas = [s.spis for s in plan if s.kind == "raw-esp" and s.spis is not None]
        if sas:
            srv.esp = RawEspServer(topo, IPSEC_GW, sas).start()
        if "web" in kinds:
            srv.web = topo.start_json(
                WEB_SERVER,
                topo.py("vpnmasq_lab.plain", "http-server", "--port", WEB_PORT),
                name="http-server",
            )
        return srv


# ------------------------------------------------------------------------------- view
@dataclass
class Snapshot:
    phase: str
    elapsed: float
    sessions: list[Session]
    rows: list[Row] | None = None  # vpnmasq's table
    conntrack: list[str] | None = None  # the kernel's table
    log: list[str] = field(default_factory=list)


class View:
    """Live (rich, on a terminal), text (periodic, not a terminal) or quiet."""

    def __init__(self, console: Console, style: str) -> None:
        self.console = console
        self.style = style
        self.live: Live | None = None
        self.last_text = 0.0
        self.last_shape: tuple[tuple[str, ...], ...] | None = None

    def begin(self, title: str) -> None:
        if self.style == "quiet":
            return
        self.console.print(Text(title, style="bold"))
        if self.style == "live":
            self.live = Live(
                Text("setting up..."), console=self.console, refresh_per_second=4, transient=True
            )
            self.live.start()

    def update(self, snap: Snapshot) -> None:
        if self.live is not None:
            self.live.update(self._rich(snap))
        elif self.style == "text" and snap.elapsed - self.last_text >= TEXT_EVERY_S:
            self.last_text = snap.elapsed
            self.console.print(self._text(snap), markup=False, highlight=False, soft_wrap=True)

    def end(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        self.last_text = 0.0
        self.last_shape = None

    # -- renderers
    def _sessions_table(self, sessions: Sequence[Session]) -> Table:
        t = Table(title="sessions", header_style="bold", expand=False, title_justify="left")
        for h in ("SESSION", "KIND", "STATE", "OUT", "BACK", "VERIFIED"):
            t.add_column(h, justify="right" if h in ("OUT", "BACK", "VERIFIED") else "left")
        for s in sessions:
            style = "red" if s.state == "failed" or s.crosstalk else None
            t.add_row(
                s.spec.title,
                s.spec.label,
                s.state,
                str(s.out),
                str(s.back),
                f"{s.verified}/{s.expected}",
                style=style,
            )
        return t

    def _fit(self, t: Table) -> Table:
        """One line per entry: leave out the least useful columns until the table fits."""
        width = self.console.size.width
        unbounded = self.console.options.update(width=UNBOUNDED_WIDTH)
        for header in OPTIONAL_COLUMNS:
            if Measurement.get(self.console, unbounded, t).maximum <= width:
                break
            for i, col in enumerate(t.columns):
                if str(col.header) == header:
                    del t.columns[i]
                    break
        for col in t.columns:
            col.no_wrap = True
            col.overflow = "ellipsis"
        return t

    def _rich(self, snap: Snapshot) -> RenderableType:
        parts: list[RenderableType] = [
            Text(f"{snap.phase}    t = {snap.elapsed:4.1f} s", style="bold cyan"),
            self._sessions_table(snap.sessions),
        ]
        # lines left on the screen: header, the sessions table (+5 for its frame), log
        room = max(12, self.console.size.height - len(snap.sessions) - 8 - len(snap.log))
        if snap.rows is not None:
            shown = 0
            for kind, rows in _by_kind(snap.rows):
                take = rows[: max(0, room - TABLE_FRAME_LINES)]
                if not take:
                    continue
                t = rich_table(take, title=f"vpnmasq masquerade table: {kind}")
                parts.append(self._fit(t))
                shown += len(take)
                room -= len(take) + TABLE_FRAME_LINES
            if len(snap.rows) > shown:
                parts.append(
                    Text(f"... {len(snap.rows) - shown} more entries (vpnmasq status)", style="dim")
                )
            if not snap.rows:
                parts.append(Text("vpnmasq masquerade table: empty", style="dim"))
        if snap.conntrack is not None:
            ct = Table(title="kernel conntrack (gateway)", header_style="bold", expand=False)
            ct.add_column("ENTRY", no_wrap=True, overflow="ellipsis")
            n_ct = max(1, room - TABLE_FRAME_LINES)
            for line in snap.conntrack[:n_ct]:
                ct.add_row(line)
            parts.append(ct)
            if len(snap.conntrack) > n_ct:
                parts.append(Text(f"... {len(snap.conntrack) - n_ct} more", style="dim"))
        if snap.log:
            parts.append(Text("\n".join(snap.log), style="dim", overflow="ellipsis", no_wrap=True))
        return Group(*parts)

    def _text(self, snap: Snapshot) -> str:
        lines = [f"--- {snap.phase}  t={snap.elapsed:.1f}s"]
        lines += [
            f"  {s.spec.title:<24} {s.spec.label:<12} {s.state:<9} "
            f"out {s.out:>4}  back {s.back:>4}  verified {s.verified}/{s.expected}"
            for s in snap.sessions
        ]
        if snap.rows is not None:
            # the whole table when entries came or went, else one line of counts
            shape = tuple(
                sorted((r.proto, r.inside, r.outside, r.remote, r.state) for r in snap.rows)
            )
            counts = ", ".join(f"{len(g)} {k}" for k, g in _by_kind(snap.rows))
            lines.append(f"vpnmasq table: {len(snap.rows)} entries ({counts or 'empty'})")
            if shape != self.last_shape and snap.rows:
                lines.append(table_text(snap.rows))
            self.last_shape = shape
        if snap.conntrack is not None:
            lines.append(f"kernel conntrack: {len(snap.conntrack)} entries")
        return "\n".join(lines)


def _by_kind(rows: Sequence[Row]) -> list[tuple[str, list[Row]]]:
    """Rows grouped by helper kind, VPN kinds first: one kind per table gives each its own
    columns (SPIs, Call IDs, cookies) instead of one wide DETAIL column."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(kind_of(r), []).append(r)
    order = [k for k in VPN_KINDS if k in groups] + sorted(k for k in groups if k not in VPN_KINDS)
    return [(k, groups[k]) for k in order]


def table_text(rows: Sequence[Row], plain_limit: int | None = None) -> str:
    """The table as ``vpnmasq status --proto KIND`` prints it, one block per kind; with
    ``plain_limit``, at most that many entries of each non-VPN kind (web connections)."""
    blocks = []
    for kind, group in _by_kind(rows):
        more = 0
        if plain_limit is not None and kind not in VPN_KINDS and len(group) > plain_limit:
            more = len(group) - plain_limit
            group = sorted(group, key=lambda r: r.inside)[:plain_limit]
        text = render_text(group, {}).rstrip().splitlines()[:-2]  # drop "N entries"
        if more:
            text.append(f"... and {more} more {kind} entries")
        blocks.append("\n".join([f"[{kind}]", *text]))
    return "\n\n".join(blocks)


# ------------------------------------------------------------------------------ phases
@dataclass
class PhaseOutcome:
    name: str
    results: dict[str, SessionResult]
    seconds: float
    table: list[Row] = field(default_factory=list)  # vpnmasq: its table at the end
    facts: list[str] = field(default_factory=list)  # evidence worth a line in the summary
    captures: list[Path] = field(default_factory=list)


def _ct_stats(topo: Topology) -> dict[str, int]:
    out = topo.exec("gw", ["conntrack", "-S"], check=False).stdout
    total: dict[str, int] = {}
    for tok in out.split():
        k, _, v = tok.partition("=")
        if v.isdigit():
            total[k] = total.get(k, 0) + int(v)
    return total


def run_phase(
    name: str,
    gateway: str,
    plan: Sequence[SessionSpec],
    *,
    n_hosts: int,
    mode: str,
    duration: float,
    view: View,
    captures: str | None,
    stop: threading.Event,
) -> PhaseOutcome:
    t0 = time.monotonic()
    with Topology(hosts=n_hosts, remotes=REMOTES) as topo:
        gw: VpnmasqGateway | None = None
        if gateway == "vpnmasq":
            gw = topo.gateway_vpnmasq(
                mode,
                forwards=[
                    {"protocol": "tcp", "port": 1723, "to": LAN_SERVER_IP},
                    {"protocol": "gre", "to": LAN_SERVER_IP},
                ],
            )
        else:
            topo.gateway_kernel_nat(forward_to_lan_server=[("tcp", 1723)])
        caps: list[Path] = []
        if captures:
            label = f"{gateway}-{mode}" if gateway == "vpnmasq" else "kernel-nat"
            caps = topo.start_captures(captures, label)
        ct_before = _ct_stats(topo) if gw is None else {}
        view.begin(name)
        servers = Servers.start(topo, plan)
        until = time.monotonic() + duration
        sessions = [Session(s, topo, servers, until) for s in plan]
        for s in sessions:
            s.start()
        last: Snapshot | None = None
        try:
            while not all(s.traffic_done.is_set() for s in sessions):
                if stop.is_set():
                    raise KeyboardInterrupt
                view.update(_snapshot(name, t0, sessions, topo, gw))
                time.sleep(LIVE_REFRESH_S)
            last = _snapshot(name, t0, sessions, topo, gw)  # every session still up
            view.update(last)
        finally:
            for s in sessions:
                s.stop_event.set()
                s.release.set()
            view.end()
        for s in sessions:
            s.join(10)
        results = {s.spec.key: s.result() for s in sessions}
        outcome = PhaseOutcome(name, results, 0.0, captures=caps)
        if last is not None and last.rows is not None:
            outcome.table = last.rows
        _add_facts(outcome, topo, servers, gw, ct_before)
        if caps:
            topo.stop_captures()
    outcome.seconds = round(time.monotonic() - t0, 1)
    return outcome


def _snapshot(
    name: str, t0: float, sessions: list[Session], topo: Topology, gw: VpnmasqGateway | None
) -> Snapshot:
    snap = Snapshot(name, time.monotonic() - t0, sessions)
    if gw is not None:
        with contextlib.suppress(Exception):
            snap.rows = gw.rows()
        snap.log = [ln.split(": ", 1)[-1] for ln in gw.log().splitlines()[-3:]]
    else:
        with contextlib.suppress(Exception):
            snap.conntrack = [" ".join(ln.split()) for ln in topo.conntrack()]
    return snap


def _add_facts(
    outcome: PhaseOutcome,
    topo: Topology,
    servers: Servers,
    gw: VpnmasqGateway | None,
    ct_before: dict[str, int],
) -> None:
    """Evidence from the servers and the gateway, attached to failing sessions' reasons."""
    esp_peers: dict[str, str] = {}
    if servers.esp is not None:
        summary = servers.esp.stop()
        esp_peers = dict(summary.get("peers", {}))
    for key, r in outcome.results.items():
        if r.ok or r.spec.spis is None:
            continue
        spi = f"{r.spec.spis[0]:#x}"
        if spi not in esp_peers:
            outcome.results[key] = _with_reason(
                r, f"{r.reason}; its ESP never reached {r.spec.server} (dropped at the gateway)"
            )
    if gw is None:
        after = _ct_stats(topo)
        for k in ("insert_failed", "drop", "invalid"):
            n = after.get(k, 0) - ct_before.get(k, 0)
            if n:
                outcome.facts.append(f"kernel conntrack {k}: +{n} during the phase")
    else:
        c: dict[str, int] = {}
        with contextlib.suppress(Exception):
            c = gw.counters()
        drops = {k.removeprefix("drop:"): v for k, v in c.items() if k.startswith("drop:")}
        if drops:
            outcome.facts.append(
                "vpnmasq drops by reason: "
                + ", ".join(f"{k} {v}" for k, v in sorted(drops.items()))
            )
        held = c.get("drop:esp-waiting-for-pending-init", 0)
        if held:
            outcome.facts.append(
                f"{held} first ESP packets were held back while another host's SA was being "
                "associated (HOWTO 6.2), and resent by their clients"
            )


def _with_reason(r: SessionResult, reason: str) -> SessionResult:
    return SessionResult(r.spec, r.ok, r.out, r.back, r.verified, r.expected, r.crosstalk, reason)


# ----------------------------------------------------------------------------- summary
def summary_table(
    plan: Sequence[SessionSpec], ours: PhaseOutcome, kernel: PhaseOutcome | None, mode: str
) -> Table:
    t = Table(title="vpnmasq demo: every session", header_style="bold", title_justify="left")
    t.add_column("SESSION", no_wrap=True)
    t.add_column("KIND", no_wrap=True)
    t.add_column(f"VPNMASQ ({mode})", no_wrap=True)
    t.add_column("PKTS OUT/IN", justify="right", no_wrap=True)
    if kernel is not None:
        t.add_column("KERNEL NAT", no_wrap=True)
        t.add_column("PKTS OUT/IN", justify="right", no_wrap=True)
        t.add_column("WHY (KERNEL)")
    for spec in plan:
        r = ours.results[spec.key]
        cells: list[RenderableType] = [spec.title, spec.label, _verdict(r), f"{r.out}/{r.back}"]
        if kernel is not None:
            k = kernel.results[spec.key]
            cells += [_verdict(k), f"{k.out}/{k.back}", Text(k.reason)]
        t.add_row(*cells)
    return t


def _verdict(r: SessionResult) -> Text:
    if r.ok:
        return Text(f"OK {r.verified}/{r.expected}", style="green")
    text = Text(f"FAILED {r.verified}/{r.expected}", style="bold red")
    return text


def print_summary(
    console: Console,
    plan: Sequence[SessionSpec],
    ours: PhaseOutcome,
    kernel: PhaseOutcome | None,
    mode: str,
    started: float,
) -> None:
    console.print()
    if ours.table:
        console.print(
            f"vpnmasq's masquerade table at the end of phase 1 ({len(ours.table)} entries):",
            style="bold",
        )
        console.print(
            table_text(ours.table, PLAIN_ROWS_SHOWN), markup=False, highlight=False, soft_wrap=True
        )
        console.print()
    console.print(summary_table(plan, ours, kernel, mode))
    n_ok = sum(r.ok for r in ours.results.values())
    lines = [f"vpnmasq ({mode}): {n_ok}/{len(plan)} sessions OK in {ours.seconds} s"]
    if mode == "hybrid":
        lines.append(
            "  hybrid mode: the kernel masquerades plain traffic (web) on its fast path; "
            "vpnmasq handles the VPN traffic (its table above)"
        )
    for r in ours.results.values():
        if not r.ok:
            lines.append(f"  {r.spec.title} {r.spec.label}: {r.reason}")
    lines += [f"  {f}" for f in ours.facts]
    if kernel is not None:
        k_ok = sum(r.ok for r in kernel.results.values())
        lines.append(f"kernel NAT: {k_ok}/{len(plan)} sessions OK in {kernel.seconds} s")
        lines += [f"  {f}" for f in kernel.facts]
        failed_kinds = {r.spec.kind for r in kernel.results.values() if not r.ok}
        for kind in sorted(failed_kinds):
            if kind in KERNEL_LIMITS:
                lines.append(f"  {KIND_LABEL[kind]}: {KERNEL_LIMITS[kind]}")
    caps = ours.captures + (kernel.captures if kernel else [])
    if caps:
        lines.append("captures (Wireshark): " + ", ".join(str(p) for p in caps))
    lines.append(f"total {time.monotonic() - started:.1f} s")
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vpnmasq demo",
        description="Real VPN clients on a LAN (network namespaces) share one public address "
        "through vpnmasq; then the same traffic through the kernel's NAT, side by side. "
        "Needs root. Everything is torn down on exit and on Ctrl-C.",
    )
    ap.add_argument(
        "--hosts",
        type=int,
        default=DEFAULT_HOSTS,
        metavar="N",
        help=f"LAN client hosts ({MIN_HOSTS}-{MAX_HOSTS}; default {DEFAULT_HOSTS}: 3 PPTP, "
        "1 strongSwan, 2 raw ESP)",
    )
    ap.add_argument(
        "--mode",
        choices=("hybrid", "userspace"),
        default="hybrid",
        help="vpnmasq's mode (default hybrid: the kernel masquerades plain traffic)",
    )
    ap.add_argument(
        "--no-kernel-compare", action="store_true", help="skip phase 2 (the kernel's NAT)"
    )
    ap.add_argument(
        "--keep-captures",
        metavar="DIR",
        help="write pcaps of the gateway's wan0 and lan0 per phase to DIR (for Wireshark)",
    )
    ap.add_argument("--quiet", action="store_true", help="no live view, only the summary")
    ap.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        metavar="S",
        help=f"seconds of traffic per phase after set-up (default {DEFAULT_DURATION:g})",
    )
    return ap


REQUIRED_TOOLS = ("ip", "nft", "iptables", "conntrack", "ss", "mount")


def _missing(names: Sequence[str]) -> list[str]:
    """The programs (names on PATH, or absolute paths) that are not installed."""
    out = []
    for n in names:
        found = os.access(n, os.X_OK) if os.path.isabs(n) else shutil.which(n) is not None
        if not found:
            out.append(n)
    return out


def main(argv: list[str] | None = None) -> int:
    if argv and "--ha" in argv:  # the active/standby pair: its own scenario (ha.py)
        from .ha import main as ha_main

        return ha_main([a for a in argv if a != "--ha"])
    args = _parser().parse_args(argv)
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if not MIN_HOSTS <= args.hosts <= MAX_HOSTS:
        out.print(f"vpnmasq demo: --hosts must be {MIN_HOSTS}..{MAX_HOSTS}", style="red")
        return 2
    if not 1.0 <= args.duration <= 120.0:
        out.print("vpnmasq demo: --duration must be 1..120 seconds", style="red")
        return 2
    if os.geteuid() != 0:
        out.print("vpnmasq demo: needs root (network namespaces, netfilter)", style="red")
        return 2
    missing = _missing(REQUIRED_TOOLS) + (_missing(["tcpdump"]) if args.keep_captures else [])
    if missing:
        out.print(f"vpnmasq demo: missing programs: {', '.join(missing)}", style="red")
        return 2
    have_pptp = not _missing(["pptpd", "pptp", "/usr/sbin/pptpctrl"])
    swan_plugins = missing_plugins()
    have_swan = not _missing([CHARON, "swanctl"]) and not swan_plugins
    swan_what = "strongSwan (charon)" + (f": plugins {', '.join(swan_plugins)}" if swan_plugins else "")
    for ok, what in ((have_pptp, "PPTP (pptpd, pptp)"), (have_swan, swan_what)):
        if not ok:
            out.print(f"note: {what} not installed; those sessions are left out", style="yellow")
    style = "quiet" if args.quiet else ("live" if out.is_terminal else "text")
    view = View(out, style)
    plan = plan_sessions(args.hosts, pptp=have_pptp, strongswan=have_swan)
    started = time.monotonic()
    stop = threading.Event()
    cleanup_stale()

    def phase(name: str, gateway: str) -> PhaseOutcome:
        return run_phase(
            name,
            gateway,
            plan,
            n_hosts=args.hosts,
            mode=args.mode,
            duration=args.duration,
            view=view,
            captures=args.keep_captures,
            stop=stop,
        )

    n = 1 if args.no_kernel_compare else 2
    try:
        ours = phase(f"phase 1/{n}: vpnmasq ({args.mode}) in the gateway", "vpnmasq")
        kernel = None
        if not args.no_kernel_compare:
            kernel = phase("phase 2/2: the Linux kernel's NAT in the gateway", "kernel")
    except KeyboardInterrupt:
        view.end()
        out.print("interrupted; the lab has been torn down", style="yellow")
        return 130
    except LabError as e:
        view.end()
        out.print(f"vpnmasq demo: the lab failed: {e}", style="red", markup=False)
        return 2
    print_summary(out, plan, ours, kernel, args.mode, started)
    return 0 if all(r.ok for r in ours.results.values()) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
