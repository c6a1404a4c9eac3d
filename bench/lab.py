"""Namespace benchmarks: vpnmasq against the kernel's own NAT on one lab topology.

::

    h1 10.77.0.11 -- [gw: lan0 10.77.0.1 | wan0 198.51.100.1] -- r1 198.51.100.20

The gateway runs, in turn and within each round, every *mode* of one round-robin:

* ``kernel``: nftables ``masquerade`` plus the kernel PPTP helper
  (``Topology.gateway_kernel_nat()``), i.e. kernel forwarding, conntrack and generic ESP NAT;
* ``hybrid``: ``vpnmasq run`` in hybrid mode with ``offload = false`` (kernel NAT for plain
  TCP/UDP, ESP/GRE/IKE/PPTP through the NFQUEUE slow path);
* ``userspace``: ``vpnmasq run`` in userspace mode (everything through the slow path);
* ``offload``: hybrid mode plus the kernel fast path of :mod:`vpnmasq.datapath.offload`
  (``offload = true``; what a default install gets, ``offload = "auto"``);
* ``uoffload``: userspace mode with ``offload = true`` (established TCP/UDP/ICMP echo
  sessions in the kernel's maps, RFC 4787 behaviour from the engine).

Packet rates are measured with ``trafgen`` (netsniff-ng) on one CPU of the sender flooding one
flow, counted as ``rx_packets`` of the receiver's interface over a fixed window; vpnmasq is
pinned to the other CPU. Associations (ESP SPIs, the PPTP call) are set up before every
measurement. Results are medians over rounds; each figure is compared with the kernel's of
the same round-robin.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpnmasq.datapath import rules
from vpnmasq.packet.ipv4 import build_ipv4, ip_to_int
from vpnmasq.packet.l4 import build_esp, build_gre_v1, build_udp
from vpnmasq_lab.topology import Topology

ROOT = Path(__file__).resolve().parent.parent
VPNMASQ = ROOT / ".venv" / "bin" / "vpnmasq"
PY = sys.executable
PEERS = str(ROOT / "bench" / "peers.py")
H1, R1, PUB = "10.77.0.11", "198.51.100.20", "198.51.100.1"
ESP_OUT_SPI, ESP_IN_SPI = 0x1001, 0x2001
PNS_CALL_ID, PAC_CALL_ID = 0x1234, 0x4000
UDP_SPORT, UDP_DPORT = 61234, 9  # source port inside vpnmasq's alias range: preserved
SENDER_CPU, GATEWAY_CPU = "0", "1"
#: the offloading gateway installs an association within its sync interval
OFFLOAD_SETTLE_S = 1.5


@dataclass
class Cell:
    """One measured figure: the values of each round, per mode."""

    name: str
    unit: str
    values: dict[str, list[float | None]] = field(default_factory=dict)

    def add(self, mode: str, v: float | None) -> None:
        """Round ``i``'s value is ``values[mode][i]`` (None: that measurement failed)."""
        self.values.setdefault(mode, []).append(v)


# ------------------------------------------------------------------------------ helpers
def sh(topo: Topology, role: str, *argv: str, check: bool = True) -> str:
    return str(topo.exec(role, list(argv), check=check).stdout)


def mac(topo: Topology, role: str, ifname: str) -> str:
    return sh(topo, role, "cat", f"/sys/class/net/{ifname}/address").strip()


def rx_packets(topo: Topology, role: str, ifname: str = "eth0") -> int:
    return int(sh(topo, role, "cat", f"/sys/class/net/{ifname}/statistics/rx_packets"))


def trafgen_config(dmac: str, smac: str, packet: bytes) -> str:
    frame = bytes.fromhex(dmac.replace(":", "") + smac.replace(":", "")) + b"\x08\x00" + packet
    return "{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n"


def padded(total: int, header: bytes) -> bytes:
    """``header`` followed by zeros up to an IP payload that makes a ``total``-byte datagram."""
    return header + b"\0" * max(0, total - 20 - len(header))


def cpu_ns(pid: int | None) -> int | None:
    """CPU time the process's main thread has run, in ns (/proc/PID/schedstat)."""
    if pid is None:
        return None
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def flood_rate(
    topo: Topology, sender: str, ifname: str, dmac: str, packet: bytes, receiver: str,
    seconds: float, gw_pid: int | None = None, warmup: float = 0.4,
) -> tuple[float, float | None]:
    """Packets/s arriving at ``receiver`` while trafgen floods ``packet`` from ``sender``,
    and the gateway process's CPU time per delivered packet in us (None for the kernel)."""
    cfg = topo.workdir / f"flood-{sender}-{len(packet)}.cfg"
    cfg.write_text(trafgen_config(dmac, mac(topo, sender, ifname), packet))
    p = topo.popen(
        sender,
        ["taskset", "-c", SENDER_CPU, "trafgen", "-o", ifname, "-i", str(cfg), "-P", "1", "-C"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        name="trafgen",
    )
    try:
        time.sleep(warmup)
        a, c0, t0 = rx_packets(topo, receiver), cpu_ns(gw_pid), time.monotonic()
        time.sleep(seconds)
        b, c1, t1 = rx_packets(topo, receiver), cpu_ns(gw_pid), time.monotonic()
    finally:
        topo.stop(p)
    time.sleep(0.2)  # let the gateway drain its queue before the next measurement
    n = b - a
    cpu = (c1 - c0) / 1e3 / n if c0 is not None and c1 is not None and n > 0 else None
    return n / (t1 - t0), cpu


# ------------------------------------------------------------------------------ gateway modes
@contextlib.contextmanager
def gateway(topo: Topology, mode: str) -> Iterator[subprocess.Popen[Any] | None]:
    """Put the gateway in ``mode`` for the duration of the block."""
    topo.gateway_nat_off()
    if mode == "kernel":
        topo.gateway_kernel_nat(pptp_helper=True)
        try:
            yield None
        finally:
            topo.gateway_nat_off()
        return
    sock = topo.workdir / f"ctl-{mode}.sock"
    cfg = topo.workdir / f"vpnmasq-{mode}.toml"
    vmode = "userspace" if mode in ("userspace", "uoffload") else "hybrid"
    cfg.write_text(
        f'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\nmode = "{vmode}"\n'
        f'control_socket = "{sock}"\nlog_level = "warning"\n'
        # explicit both ways: "auto" (the default) would offload in the hybrid column too
        + ("offload = true\n" if mode in ("offload", "uoffload") else "offload = false\n")
    )
    argv = [str(VPNMASQ), "run", "--config", str(cfg)]
    log = open(topo.workdir / f"vpnmasq-{mode}.log", "w")  # noqa: SIM115 - closed below
    p = topo.popen("gw", ["taskset", "-c", GATEWAY_CPU, *argv], stdout=log, stderr=log, name=mode)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists() or "VPNMASQ_OUT" not in sh(topo, "gw", "iptables-save", check=False):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vpnmasq ({mode}) did not start: {log.name}")
            time.sleep(0.1)
        yield p
    finally:
        topo.stop(p)
        log.close()
        topo.gateway_nat_off()


def status(topo: Topology, mode: str) -> dict[str, Any]:
    """The daemon's ``status`` answer over its control socket (the offload section too)."""
    from vpnmasq.datapath.control import ControlError, query

    try:
        return query(str(topo.workdir / f"ctl-{mode}.sock"), "status")
    except (ControlError, OSError) as exc:
        return {"error": str(exc)}


# ------------------------------------------------------------------------------ associations
def associate_esp(topo: Topology) -> None:
    """h1 sends the first ESP packet (SPI out), r1 answers (SPI in): the association."""
    out = build_esp(ESP_OUT_SPI, 1, b"\0" * 32).hex()
    back = build_esp(ESP_IN_SPI, 1, b"\0" * 32).hex()
    sh(topo, "h1", PY, PEERS, "send-raw", "--proto", "50", "--dst", R1, "--hex", out, "--count", "2")
    sh(topo, "r1", PY, PEERS, "send-raw", "--proto", "50", "--dst", PUB, "--hex", back, "--count", "2")


def open_pptp_call(topo: Topology, peers: list[Any]) -> tuple[int, int]:
    """A PPTP control connection and call from h1 to r1; returns (Call ID r1 puts in its
    GRE, Call ID h1 puts in its GRE) as each end saw them through the gateway. The peers
    are appended to ``peers`` (the caller stops them: the call lives as long as they do)."""
    srv = topo.start_json("r1", [PY, PEERS, "pptp-server", "--call-id", str(PAC_CALL_ID)], name="pptp-server")
    peers.append(srv)
    cli = topo.start_json(
        "h1", [PY, PEERS, "pptp-client", "--server", R1, "--call-id", str(PNS_CALL_ID)],
        ready="call", name="pptp-client",
    )
    peers.append(cli)
    seen = srv.wait_event("call")
    h1_sends = int(cli.wait_event("call")["pac_call_id"])
    r1_sends = int(seen["pns_call_id"])
    # one GRE packet each way opens the kernel's GRE flows (expectations) and the call's
    sh(topo, "h1", PY, PEERS, "send-raw", "--proto", "47", "--dst", R1, "--hex",
       build_gre_v1(h1_sends, b"\xff\x03\xc0\x21").hex(), "--count", "2")
    sh(topo, "r1", PY, PEERS, "send-raw", "--proto", "47", "--dst", PUB, "--hex",
       build_gre_v1(r1_sends, b"\xff\x03\xc0\x21").hex(), "--count", "2")
    return r1_sends, h1_sends


# ------------------------------------------------------------------------------ measurements
def vpn_packets(kind: str, size: int, r1_call: int, h1_call: int) -> tuple[bytes, bytes]:
    """(outbound packet from h1, inbound packet from r1) of ``size`` bytes."""
    h1, r1, pub = ip_to_int(H1), ip_to_int(R1), ip_to_int(PUB)
    if kind == "esp":
        return (
            bytes(build_ipv4(h1, r1, 50, padded(size, build_esp(ESP_OUT_SPI, 7, b"")))),
            bytes(build_ipv4(r1, pub, 50, padded(size, build_esp(ESP_IN_SPI, 7, b"")))),
        )
    ppp = b"\xff\x03\x00\x21"
    return (
        bytes(build_ipv4(h1, r1, 47, padded(size, build_gre_v1(h1_call, ppp)))),
        bytes(build_ipv4(r1, pub, 47, padded(size, build_gre_v1(r1_call, ppp)))),
    )


Rate = tuple[float, float | None]


def measure_tcp(topo: Topology, seconds: float) -> float | None:
    """iperf3 TCP bulk h1 -> r1, Gbit/s received."""
    srv = topo.popen("r1", ["iperf3", "-s", "-1", "-B", R1], name="iperf3-server")
    try:
        topo.wait_listen("r1", 5201)
        cp = topo.exec("h1", ["iperf3", "-c", R1, "-t", str(seconds), "-J"], check=False, timeout=seconds + 30)
        try:
            res = json.loads(cp.stdout)
            return float(res["end"]["sum_received"]["bits_per_second"]) / 1e9
        except (ValueError, KeyError):
            return None
    finally:
        topo.stop(srv)


def measure_latency(topo: Topology, count: int) -> tuple[float | None, float | None]:
    echo = topo.start_json("r1", [PY, PEERS, "udp-echo", "--port", "7"], name="udp-echo")
    try:
        res = topo.run_json(
            "h1", [PY, PEERS, "udp-pingpong", "--server", R1, "--port", "7", "--count", str(count)],
            timeout=120,
        )
    finally:
        echo.stop()
    return res.get("median_us"), res.get("p99_us")


def profile_slow_path(topo: Topology, pid: int, seconds: float, out: Path) -> dict[str, Any]:
    """py-spy samples of the gateway while a UDP flood crosses it (userspace mode)."""
    pyspy = ROOT / ".venv" / "bin" / "py-spy"
    if not pyspy.exists():
        return {"error": "py-spy not installed"}
    h1, r1 = ip_to_int(H1), ip_to_int(R1)
    pkt = bytes(build_udp(h1, r1, UDP_SPORT, UDP_DPORT, b"\0" * 36))
    cfg = topo.workdir / "profile.cfg"
    cfg.write_text(trafgen_config(mac(topo, "gw", "lan0"), mac(topo, "h1", "eth0"), pkt))
    p = topo.popen(
        "h1", ["taskset", "-c", SENDER_CPU, "trafgen", "-o", "eth0", "-i", str(cfg), "-P", "1", "-C"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, name="trafgen",
    )
    try:
        time.sleep(0.3)
        cp = subprocess.run(
            [str(pyspy), "record", "--pid", str(pid), "--duration", str(int(max(1, seconds))),
             "--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )
    finally:
        topo.stop(p)
    if cp.returncode != 0 or not out.exists():
        return {"error": (cp.stderr or cp.stdout).strip()[-300:]}
    return summarize_profile(out.read_text())


_FRAME = re.compile(r"^(?P<fn>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")


def summarize_profile(raw: str, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        total += k
        frames = []
        for fr in stack.split(";"):
            m = _FRAME.match(fr.strip())
            if m is None:
                frames.append(fr.strip())
                continue
            f = m.group("file")
            short = f.split("site-packages/")[-1].split("src/")[-1].split("lib/python3.11/")[-1]
            frames.append(f"{m.group('fn')} ({short})")
        if not frames:
            continue
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + k
        for fr in set(frames):
            incl_n[fr] = incl_n.get(fr, 0) + k
    if not total:
        return {"samples": 0}

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, 100.0 * n / total) for f, n in sorted(d.items(), key=lambda x: -x[1])[:top]]

    boring = ("<module>", "main (", "run (", "Command.", "Group.", "Context.", "Gateway.loop", "invoke")
    incl = {f: n for f, n in incl_n.items() if not f.startswith(boring)}
    return {"samples": total, "self": share(self_n), "inclusive": share(incl)}


# ------------------------------------------------------------------------------ the run
def tools_missing() -> list[str]:
    return [t for t in ("trafgen", "iperf3", "taskset", "nft", "iptables") if shutil.which(t) is None]


def offload_available() -> bool:
    return (ROOT / "src" / "vpnmasq" / "datapath" / "offload.py").exists()


def run_lab(  # noqa: C901 - one lab run: every mode x protocol cell in order, a script
    rounds: int, seconds: float, *, quick: bool, log: Callable[[str], None], profile_out: Path
) -> dict[str, Any]:
    """One topology per gateway mode, all up at once, so every cell is measured for each mode
    back to back (the order alternating between rounds): ratios to the kernel come from
    measurements seconds apart, which matters on a machine whose load drifts."""
    modes = ["kernel", "hybrid", "userspace"] + (["offload", "uoffload"] if offload_available() else [])
    # ESP/GRE take the same slow path (and the same offload) in both modes
    vpn_modes = [m for m in modes if m not in ("userspace", "uoffload")]
    plain_modes = [m for m in modes if m in ("kernel", "userspace", "uoffload")]
    sizes = (1400, 64)
    cells: dict[str, Cell] = {}
    notes: list[str] = []
    profile: dict[str, Any] = {}

    def cell(name: str, unit: str) -> Cell:
        return cells.setdefault(name, Cell(name, unit))

    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        topos: dict[str, Topology] = {}
        pids: dict[str, int | None] = {}
        for mode in modes:
            topo = stack.enter_context(Topology(hosts=1, remotes=1, lan_server=False))
            proc = stack.enter_context(gateway(topo, mode))
            topos[mode], pids[mode] = topo, (_python_pid(proc.pid) if proc is not None else None)
        calls: dict[str, tuple[int, int]] = {}
        for mode in vpn_modes:
            peers: list[Any] = []
            for_stop = peers  # stopped at the end (the call lives as long as its peers)
            stack.callback(_stop_all, for_stop)
            try:
                associate_esp(topos[mode])
                calls[mode] = open_pptp_call(topos[mode], peers)
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                notes.append(f"{mode}: association failed: {exc}")
        if "offload" in modes:
            time.sleep(OFFLOAD_SETTLE_S)
        log(f"  {len(modes)} gateways up and associated in {time.monotonic() - t0:.0f} s")

        def each(ms: list[str], rnd: int) -> list[str]:
            return ms if rnd % 2 == 0 else list(reversed(ms))

        for rnd in range(rounds):
            t1 = time.monotonic()
            for mode in each([m for m in modes if m != "offload"], rnd):
                cell("tcp_gbps", "Gbit/s").add(mode, measure_tcp(topos[mode], 2 if quick else 3))
            for mode in each(["kernel", "userspace"], rnd):
                med, p99 = measure_latency(topos[mode], 300 if quick else 2000)
                cell("rtt_median_us", "us").add(mode, med)
                cell("rtt_p99_us", "us").add(mode, p99)
            for size in sizes:
                for d in ("out", "in"):
                    for mode in each(plain_modes, rnd):
                        rate, cpu = flood(topos[mode], "udp", size, d, None, seconds, pids[mode])
                        cell(f"udp{size}_{d}_pps", "pkt/s").add(mode, rate)
                        cell(f"udp{size}_{d}_cpu_us", "us/pkt").add(mode, cpu)
            for kind in ("esp", "gre"):
                for size in sizes:
                    for d in ("out", "in"):
                        for mode in each([m for m in vpn_modes if m in calls], rnd):
                            rate, cpu = flood(topos[mode], kind, size, d, calls[mode], seconds, pids[mode])
                            cell(f"{kind}{size}_{d}_pps", "pkt/s").add(mode, rate)
                            cell(f"{kind}{size}_{d}_cpu_us", "us/pkt").add(mode, cpu)
            if rnd == 0 and pids.get("userspace") is not None:
                profile = profile_slow_path(
                    topos["userspace"], pids["userspace"] or 0, 4 if quick else 6, profile_out
                )
            log(f"  round {rnd + 1}/{rounds}: {time.monotonic() - t1:.0f} s")
        if "offload" in modes and "offload" in calls:
            st = status(topos["offload"], "offload").get("offload") or {}
            notes.append(
                f"offload at the end: {st.get('elements', '?')} map elements, "
                f"{st.get('syncs', '?')} syncs, {st.get('errors', '?')} errors"
            )
            # diagnostic: the maps alone, without vpnmasq's iptables rules and nft table
            # (what every packet also traverses); the daemon keeps running, the maps work
            rules.remove(netns=topos["offload"].ns("gw"))
            t1 = time.monotonic()
            for rnd, kind in [(r, k) for r in range(min(rounds, 2)) for k in ("esp", "gre")]:
                for size in sizes:
                    for d in ("out", "in"):
                        for mode in each(["kernel", "offload"], rnd):
                            rate, _cpu = flood(topos[mode], kind, size, d, calls[mode], seconds, None)
                            cell(f"{kind}{size}_{d}_bare_pps", "pkt/s").add(
                                "kernel" if mode == "kernel" else "maps-only", rate
                            )
            log(f"  offload maps alone (diagnostic): {time.monotonic() - t1:.0f} s")
    return {"cells": {k: {"unit": c.unit, "values": c.values} for k, c in cells.items()},
            "modes": modes, "profile": profile, "notes": notes}


def flood(
    topo: Topology, kind: str, size: int, direction: str, calls: tuple[int, int] | None,
    seconds: float, gw_pid: int | None,
) -> Rate:
    """One flood measurement: ``kind`` udp/esp/gre, ``direction`` out (h1 -> r1) or in."""
    if kind == "udp":
        h1, r1, pub = ip_to_int(H1), ip_to_int(R1), ip_to_int(PUB)
        pl = b"\0" * max(0, size - 28)
        out_pkt = bytes(build_udp(h1, r1, UDP_SPORT, UDP_DPORT, pl))
        in_pkt = bytes(build_udp(r1, pub, UDP_DPORT, UDP_SPORT, pl))
    else:
        assert calls is not None
        out_pkt, in_pkt = vpn_packets(kind, size, *calls)
    if direction == "out":
        return flood_rate(topo, "h1", "eth0", mac(topo, "gw", "lan0"), out_pkt, "r1", seconds, gw_pid)
    return flood_rate(topo, "r1", "eth0", mac(topo, "gw", "wan0"), in_pkt, "h1", seconds, gw_pid)


def _stop_all(procs: list[Any]) -> None:
    for p in procs:
        p.stop()


def _python_pid(leader: int) -> int:
    """The vpnmasq Python process under ``ip netns exec`` / ``taskset`` (they exec)."""
    for _ in range(20):
        try:
            cmd = Path(f"/proc/{leader}/cmdline").read_bytes()
        except OSError:
            break
        if b"python" in cmd or b"vpnmasq" in cmd:
            return leader
        kids = Path(f"/proc/{leader}/task/{leader}/children").read_text().split()
        if not kids:
            break
        leader = int(kids[0])
    return leader


def machine_facts() -> dict[str, str]:
    facts: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    facts["cpus"] = str(os.cpu_count())
    facts["kernel"] = os.uname().release
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().split()[1]
        facts["memory"] = f"{int(mem) // 1024} MiB"
    facts["python"] = sys.version.split()[0]
    with contextlib.suppress(OSError):
        facts["load at start"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    for tool, argv in (("nft", ["nft", "--version"]), ("iptables", ["iptables", "--version"]),
                       ("trafgen", ["trafgen", "-v"]), ("iperf3", ["iperf3", "--version"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
            facts[tool] = out.splitlines()[0].strip() if out else "?"
    return facts


__all__ = ["Cell", "machine_facts", "run_lab", "summarize_profile", "tools_missing"]

if __name__ == "__main__":  # pragma: no cover - manual use
    signal.signal(signal.SIGINT, signal.default_int_handler)
    res = run_lab(1, 1.0, quick=True, log=print, profile_out=Path("/tmp/vpnmasq-profile.txt"))
    print(json.dumps(res, indent=1))
