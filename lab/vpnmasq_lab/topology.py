"""Namespace topology for the lab: LAN hosts, a masquerading gateway and remote VPN servers.

::

     h1 10.77.0.11 --+                                  +-- r1 198.51.100.20
     h2 10.77.0.12 --+-[lan: br0]- lan0 [gw] wan0 -[inet: br0]-+-- r2 198.51.100.21
     srv 10.77.0.5 --+      10.77.0.1      198.51.100.1         +-- ...

Every node is a network namespace called ``<prefix><run_id>-<role>``; ``lan`` and ``inet``
are plain L2 switches (a bridge, no address), so the gateway has exactly two interfaces,
``lan0`` and ``wan0``, and sees every packet between the LAN and the outside.

Usage::

    with Topology(hosts=2, remotes=1) as topo:
        topo.gateway_kernel_nat()
        topo.exec("h1", ["ip", "route"])
        p = topo.popen("r1", topo.py("vpnmasq_lab.plain", "udp-echo-server", "--port", "7"))

Every process started through :meth:`Topology.popen` is tracked and killed by
:meth:`Topology.down`, which also kills whatever else still runs inside the namespaces and
deletes them. ``down()`` runs on ``with`` exit, at interpreter exit (atexit) and on
SIGTERM/SIGHUP (turned into ``SystemExit``); Ctrl-C raises ``KeyboardInterrupt`` which
unwinds through ``__exit__``. :func:`cleanup_stale` removes namespaces left by a run that
was killed with SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

DEFAULT_PREFIX = "vmq-"
"""Namespace name prefix. Names are ``vmq-<run_id>-<role>``, e.g. ``vmq-3fa2c1-gw``."""

OWNER_DIR = Path("/run/vmq-lab")
"""One ``<prefix><run_id>.json`` per live topology: owner pid + namespaces (for cleanup_stale)."""

LAN_NET = ipaddress.ip_network("10.77.0.0/24")
GW_LAN_IP = "10.77.0.1"
LAN_SERVER_IP = "10.77.0.5"
FIRST_HOST = 11  # h1 = 10.77.0.11, h2 = 10.77.0.12, ...
WAN_NET = ipaddress.ip_network("198.51.100.0/24")
GW_WAN_IP = "198.51.100.1"
FIRST_REMOTE = 20  # r1 = 198.51.100.20, r2 = 198.51.100.21, ...

KERNEL_NAT_TABLE = "vmq_kernel_nat"

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"

# Quiet namespaces: no IPv6 chatter (DAD, router solicitations) in the captures.
_SYSCTLS_ALL = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


@dataclass(frozen=True)
class Node:
    role: str  # "gw", "h1", "srv", "r1", "lan", "inet"
    ns: str  # full namespace name
    ip: str | None  # primary address (gw: LAN side); None for switches


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | bytes | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[Any]:
    cp = subprocess.run(list(argv), capture_output=True, text=text, timeout=timeout, input=input)
    if check and cp.returncode != 0:
        err = cp.stderr if text else cp.stderr.decode(errors="replace")
        raise LabError(f"command failed ({cp.returncode}): {' '.join(argv)}\n{err.strip()}")
    return cp


def list_namespaces() -> list[str]:
    cp = _run([IP, "netns", "list"], check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    cp = _run([IP, "netns", "pids", ns], check=False)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_processes(ns: str, timeout: float = 2.0) -> None:
    pids = netns_pids(ns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in netns_pids(ns) if _pid_alive(p)]
            if not pids:
                return
            time.sleep(0.05)


def _delete_ns(ns: str) -> None:
    _kill_ns_processes(ns)
    _run([IP, "netns", "del", ns], check=False)


def _proc_starttime(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: tells a live owner from a recycled pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(rec: dict[str, Any]) -> bool:
    pid = int(rec.get("pid", 0))
    if pid <= 0 or not _pid_alive(pid):
        return False
    st = rec.get("starttime")
    return st is None or _proc_starttime(pid) == st


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, force: bool = False) -> list[str]:
    """Delete namespaces named ``prefix*`` whose owning run is gone. Returns the names removed.

    A lab run records its pid in ``/run/vmq-lab/<prefix><run_id>.json``. A namespace is
    stale when that record names a process that no longer exists. Namespaces with the prefix
    but no record belong to someone else (another tool using the same prefix) and are left
    alone unless ``force=True``; ``force`` also removes namespaces of live runs, except the
    calling process's own. Processes still running inside are killed first.
    """
    removed: list[str] = []
    records: dict[str, dict[str, Any]] = {}
    if OWNER_DIR.is_dir():
        for f in OWNER_DIR.glob(f"{prefix}*.json"):
            try:
                rec = json.loads(f.read_text())
                records[str(rec["tag"])] = rec
            except (OSError, ValueError, KeyError):
                continue
    me = os.getpid()

    def stale(tag: str) -> bool:
        rec = records.get(tag)
        if rec is None:
            return force
        if int(rec.get("pid", 0)) == me:
            return False
        return force or not _owner_alive(rec)

    for ns in list_namespaces():
        if ns.startswith(prefix) and stale(ns.rsplit("-", 1)[0]):
            _delete_ns(ns)
            removed.append(ns)
    for tag, rec in records.items():
        if stale(tag):
            with contextlib.suppress(OSError):
                (OWNER_DIR / f"{tag}.json").unlink()
            wd = rec.get("workdir")
            if wd and Path(wd).name == tag:  # only our own tmp dirs, never a caller's
                shutil.rmtree(wd, ignore_errors=True)
    return removed


class Topology:
    """LAN hosts + LAN server + masquerading gateway + remote servers, one netns each."""

    def __init__(
        self,
        hosts: int = 2,
        remotes: int = 1,
        *,
        lan_server: bool = True,
        prefix: str = DEFAULT_PREFIX,
        run_id: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        install_signal_handlers: bool = True,
        keep_workdir: bool = False,
    ) -> None:
        if not 1 <= hosts <= 100 or not 0 <= remotes <= 100:
            raise ValueError("hosts must be 1..100 and remotes 0..100")
        self.prefix = prefix
        self.run_id = run_id or os.urandom(3).hex()
        self.tag = f"{prefix}{self.run_id}"
        self.n_hosts = hosts
        self.n_remotes = remotes
        self.has_lan_server = lan_server
        self._workdir_arg = workdir
        self.keep_workdir = keep_workdir
        self.workdir: Path = Path(workdir) if workdir else Path(tempfile.gettempdir()) / self.tag
        self.install_signal_handlers = install_signal_handlers
        self.nodes: dict[str, Node] = {}
        self._procs: list[tuple[str, subprocess.Popen[Any]]] = []
        self._lock = threading.Lock()
        self._is_up = False
        self._old_handlers: dict[int, Any] = {}
        self._atexit_registered = False
        self._kernel_nat = False
        self.vpnmasq: Any = None  # the VpnmasqGateway started by gateway_vpnmasq()
        self._captures: list[subprocess.Popen[Any]] = []
        self._build_nodes()

    # ----------------------------------------------------------------- naming
    def _build_nodes(self) -> None:
        def add(role: str, ip: str | None) -> None:
            self.nodes[role] = Node(role, f"{self.tag}-{role}", ip)

        add("lan", None)
        add("inet", None)
        add("gw", GW_LAN_IP)
        if self.has_lan_server:
            add("srv", LAN_SERVER_IP)
        for i in range(self.n_hosts):
            add(f"h{i + 1}", str(LAN_NET.network_address + FIRST_HOST + i))
        for i in range(self.n_remotes):
            add(f"r{i + 1}", str(WAN_NET.network_address + FIRST_REMOTE + i))

    @property
    def hosts(self) -> list[str]:
        """Roles of the LAN hosts: ["h1", "h2", ...]."""
        return [f"h{i + 1}" for i in range(self.n_hosts)]

    @property
    def remotes(self) -> list[str]:
        """Roles of the outside servers: ["r1", "r2", ...]."""
        return [f"r{i + 1}" for i in range(self.n_remotes)]

    @property
    def public_ip(self) -> str:
        return GW_WAN_IP

    def ns(self, role_or_ns: str) -> str:
        """Full namespace name for a role ("h1") or a full name (returned unchanged)."""
        node = self.nodes.get(role_or_ns)
        if node is not None:
            return node.ns
        if any(n.ns == role_or_ns for n in self.nodes.values()):
            return role_or_ns
        raise KeyError(f"unknown node {role_or_ns!r}; have {sorted(self.nodes)}")

    def ip(self, role: str) -> str:
        """Primary address of a node: hosts/srv on the LAN, remotes outside, gw = LAN side."""
        ip = self.nodes[role].ip
        if ip is None:
            raise KeyError(f"{role} has no address")
        return ip

    # ------------------------------------------------------------ life cycle
    def __enter__(self) -> Topology:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Topology:
        if self._is_up:
            return self
        self._is_up = True  # set first so a failure half way still tears down
        self._register_cleanup()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            OWNER_DIR.mkdir(parents=True, exist_ok=True)
            (OWNER_DIR / f"{self.tag}.json").write_text(
                json.dumps(
                    {
                        "tag": self.tag,
                        "pid": os.getpid(),
                        "created": time.time(),
                        "starttime": _proc_starttime(os.getpid()),
                        "namespaces": [n.ns for n in self.nodes.values()],
                        "workdir": str(self.workdir),
                    }
                )
            )
            self._create()
        except BaseException:
            self.down()
            raise
        return self

    def _create(self) -> None:
        for node in self.nodes.values():
            _run([IP, "netns", "add", node.ns])
        for node in self.nodes.values():
            self._ip(node.role, "link", "set", "lo", "up")
            _run([IP, "netns", "exec", node.ns, "sysctl", "-q", "-w", *_SYSCTLS_ALL])
        for sw in ("lan", "inet"):
            self._ip(sw, "link", "add", "br0", "type", "bridge")
            self._ip(sw, "link", "set", "br0", "up")
            # Bridged frames must not reach netfilter of the switch namespaces.
            _run(
                [
                    IP,
                    "netns",
                    "exec",
                    self.ns(sw),
                    "sh",
                    "-c",
                    "for f in /proc/sys/net/bridge/bridge-nf-call-*; do "
                    "[ -w $f ] && echo 0 > $f; done; true",
                ],
                check=False,
            )

        def plug(role: str, ifname: str, sw: str, cidr: str | None) -> None:
            port = f"p-{role}"
            self._ip(
                role,
                "link",
                "add",
                ifname,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.ns(sw),
            )
            self._ip(sw, "link", "set", port, "master", "br0")
            self._ip(sw, "link", "set", port, "up")
            if cidr:
                self._ip(role, "addr", "add", cidr, "dev", ifname)
            self._ip(role, "link", "set", ifname, "up")

        self._create_gateways(plug)
        lan_roles = (["srv"] if self.has_lan_server else []) + self.hosts
        for role in lan_roles:
            plug(role, "eth0", "lan", f"{self.ip(role)}/{LAN_NET.prefixlen}")
            self._ip(role, "route", "add", "default", "via", GW_LAN_IP)
        for role in self.remotes:
            plug(role, "eth0", "inet", f"{self.ip(role)}/{WAN_NET.prefixlen}")
            # Remotes have no default route: the public side is one L2 segment and every
            # answer goes to 198.51.100.1 directly. Nothing can leak to a real network.

    def _create_gateways(self, plug: Callable[[str, str, str, str | None], None]) -> None:
        """The gateway's two legs (a subclass may build others, e.g. an HA pair)."""
        plug("gw", "lan0", "lan", f"{GW_LAN_IP}/{LAN_NET.prefixlen}")
        plug("gw", "wan0", "inet", f"{GW_WAN_IP}/{WAN_NET.prefixlen}")
        self.router_sysctls("gw")

    def router_sysctls(self, role: str) -> None:
        _run(
            [
                IP,
                "netns",
                "exec",
                self.ns(role),
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
            ]
        )

    def _ip(self, role: str, *args: str) -> None:
        _run([IP, "-n", self.ns(role), *args])

    def down(self) -> None:
        """Kill tracked processes, then everything in our namespaces; delete them. Idempotent."""
        if not self._is_up:
            return
        self._is_up = False
        with contextlib.suppress(Exception):
            self.stop_captures()  # let tcpdump finish its files before everything is killed
        if self.vpnmasq is not None:
            with contextlib.suppress(Exception):
                self.vpnmasq.stop(timeout=3.0)  # a clean exit: rules removed, socket closed
        with self._lock:
            procs, self._procs = self._procs, []
        for _, p in procs:
            _terminate(p)
        for node in self.nodes.values():
            if node.ns in list_namespaces():
                _delete_ns(node.ns)
        with contextlib.suppress(OSError):
            (OWNER_DIR / f"{self.tag}.json").unlink()
        if not self.keep_workdir and self._workdir_arg is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._restore_signals()

    # Signals/atexit: the topology must not outlive the test run.
    def _register_cleanup(self) -> None:
        if not self._atexit_registered:
            atexit.register(self.down)
            self._atexit_registered = True
        if (
            not self.install_signal_handlers
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old = signal.getsignal(sig)
            if old in (signal.SIG_DFL, None):
                self._old_handlers[sig] = old
                signal.signal(sig, _raise_system_exit)

    def _restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_handlers.clear()

    # -------------------------------------------------------------- processes
    def _wrap(
        self,
        role: str,
        argv: Sequence[str],
        private_run: str | os.PathLike[str] | None,
    ) -> list[str]:
        ns = self.ns(role)
        argv = [str(a) for a in argv]
        if private_run is None:
            return [IP, "netns", "exec", ns, *argv]
        # `ip netns exec` already unshares the mount namespace (and makes / a slave), so a
        # bind mount made by the child stays private to it and its descendants.
        Path(private_run).mkdir(parents=True, exist_ok=True)
        script = 'mount --bind "$0" /run && exec "$@"'
        return [IP, "netns", "exec", ns, "sh", "-c", script, str(private_run), *argv]

    def exec(
        self,
        role: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | bytes | None = None,
        text: bool = True,
        private_run: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run argv to completion in a namespace; capture stdout/stderr; raise LabError if check."""
        return _run(
            self._wrap(role, argv, private_run),
            check=check,
            timeout=timeout,
            input=input,
            text=text,
        )

    def popen(
        self,
        role: str,
        argv: Sequence[str],
        *,
        name: str | None = None,
        private_run: str | os.PathLike[str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
        env: dict[str, str] | None = None,
        text: bool = False,
        pass_fds: Sequence[int] = (),
    ) -> subprocess.Popen[Any]:
        """Start argv in a namespace, in its own session; tracked and killed by down().

        ``private_run``: a directory bind-mounted over /run (= /var/run) for this process
        only, for daemons with compiled-in pid files and sockets (pptp, pptpd, charon).
        """
        if not self._is_up:
            raise LabError("topology is not up")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        p = subprocess.Popen(
            self._wrap(role, argv, private_run),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=full_env,
            text=text,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
        with self._lock:
            self._procs.append((name or f"{role}:{argv[0]}", p))
        return p

    def stop(self, p: subprocess.Popen[Any], timeout: float = 3.0) -> int | None:
        """Terminate one tracked process (its whole session) and forget it."""
        _terminate(p, timeout)
        with self._lock:
            self._procs = [(n, q) for n, q in self._procs if q is not p]
        return p.returncode

    @property
    def processes(self) -> list[tuple[str, subprocess.Popen[Any]]]:
        with self._lock:
            return list(self._procs)

    @staticmethod
    def py(module: str, *args: object) -> list[str]:
        """argv to run a module with this interpreter: ``topo.py("vpnmasq_lab.plain", ...)``."""
        return [sys.executable, "-m", module, *(str(a) for a in args)]

    def run_json(
        self,
        role: str,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        private_run: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Run a lab CLI to completion; return the last JSON object it printed on stdout."""
        cp = self.exec(role, argv, check=False, timeout=timeout, private_run=private_run)
        for line in reversed(cp.stdout.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                obj: dict[str, Any] = json.loads(line)
                obj.setdefault("returncode", cp.returncode)
                return obj
        raise LabError(
            f"no JSON from {' '.join(map(str, argv))} in {role} "
            f"(rc={cp.returncode}):\n{cp.stdout[-2000:]}\n{cp.stderr[-2000:]}"
        )

    def start_json(
        self,
        role: str,
        argv: Sequence[str],
        *,
        ready: str = "ready",
        timeout: float = 30.0,
        name: str | None = None,
        private_run: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> JsonProcess:
        """Start a lab server that prints JSON lines; wait for ``{"event": ready}``."""
        p = self.popen(role, argv, name=name, private_run=private_run, env=env)
        jp = JsonProcess(p)
        if ready:
            jp.wait_event(ready, timeout)
        return jp

    def mkdir(self, name: str) -> Path:
        """A fresh directory under this run's workdir (removed by down())."""
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ---------------------------------------------------------------- helpers
    def wait_listen(
        self,
        role: str,
        port: int,
        proto: str = "tcp",
        timeout: float = 10.0,
        addr: str | None = None,
    ) -> None:
        """Wait until something listens on port (ss), instead of sleeping."""
        flag = "-ltnH" if proto == "tcp" else "-lunH"
        deadline = time.monotonic() + timeout
        while True:
            out = self.exec(role, ["ss", flag], check=False).stdout
            for line in out.splitlines():
                cols = line.split()
                if len(cols) >= 4:
                    local = cols[3]
                    host, _, p = local.rpartition(":")
                    if p == str(port) and (
                        addr is None or host.strip("[]") in (addr, "*", "0.0.0.0")
                    ):
                        return
            if time.monotonic() > deadline:
                raise LabError(f"nothing listens on {proto}/{port} in {role} after {timeout}s")
            time.sleep(0.05)

    def conntrack(self, *args: str) -> list[str]:
        """``conntrack -L`` (or other args) in the gateway; lines of output."""
        cp = self.exec("gw", ["conntrack", *(args or ("-L",))], check=False)
        return [ln for ln in cp.stdout.splitlines() if ln.strip()]

    def counters(self, role: str = "gw") -> str:
        """nft ruleset with counters, for debugging a failing test."""
        return str(self.exec(role, ["nft", "list", "ruleset"], check=False).stdout)

    # ----------------------------------------------------------- kernel NAT
    def gateway_kernel_nat(
        self, *, pptp_helper: bool = True, forward_to_lan_server: Sequence[tuple[str, int]] = ()
    ) -> None:
        """Install the Linux kernel's own NAT in the gateway, for comparison with vpnmasq.

        * ``masquerade`` of 10.77.0.0/24 leaving ``wan0``;
        * the kernel PPTP helper (nf_conntrack_pptp + nf_nat_pptp, built in here) assigned
          by an nft ``ct helper`` object to tcp/1723 from the LAN; there is no automatic
          helper assignment any more (``nf_conntrack_helper`` sysctl is gone), so without
          this rule GRE is masqueraded as a plain generic-protocol flow;
        * optional port forwards ``(proto, port)`` from the public address to the LAN server.
        """
        _modprobe("nf_conntrack_pptp", "nf_nat_pptp", "nf_conntrack_proto_gre")
        lines = [f"table ip {KERNEL_NAT_TABLE} {{"]
        if pptp_helper:
            lines += [
                "  ct helper pptp-h {",
                '    type "pptp" protocol tcp',
                "    l3proto ip",
                "  }",
            ]
        lines += [
            "  chain pre {",
            "    type filter hook prerouting priority filter; policy accept;",
        ]
        if pptp_helper:
            lines.append('    iifname "lan0" tcp dport 1723 ct helper set "pptp-h"')
            lines.append('    iifname "wan0" tcp dport 1723 ct helper set "pptp-h"')
        lines += ["  }"]
        lines += [
            "  chain prenat {",
            "    type nat hook prerouting priority dstnat; policy accept;",
        ]
        for proto, port in forward_to_lan_server:
            lines.append(f'    iifname "wan0" {proto} dport {int(port)} dnat to {LAN_SERVER_IP}')
        lines += [
            "  }",
            "  chain postnat {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f'    oifname "wan0" ip saddr {LAN_NET} counter masquerade',
            "  }",
            "}",
        ]
        self.gateway_nat_off()
        self.exec("gw", ["nft", "-f", "-"], input="\n".join(lines) + "\n")
        self.exec("gw", ["conntrack", "-F"], check=False)
        self._kernel_nat = True

    def gateway_vpnmasq(
        self,
        mode: str = "hybrid",
        *,
        forwards: Sequence[Any] = (),
        config_overrides: Any = None,
        log_level: str = "info",
        timeout: float = 60.0,
    ) -> Any:
        """Run ``vpnmasq run`` in the gateway instead of the kernel's NAT; returns the started
        :class:`vpnmasq_lab.gateway.VpnmasqGateway` (also kept as ``self.vpnmasq``).

        Removes the kernel NAT table first and stops a daemon this topology started before.
        ``forwards``: ``[[forward]]`` tables as dicts (``{"protocol": "gre", "to": ...}``);
        ``config_overrides``: more config keys, merged table by table.
        """
        from .gateway import VpnmasqGateway

        if self.vpnmasq is not None:
            self.vpnmasq.stop()
        self.gateway_nat_off()
        n = sum(1 for d in self.workdir.glob("vpnmasq*") if d.is_dir())
        gw = VpnmasqGateway(
            self,
            mode=mode,
            forwards=forwards,
            config_overrides=config_overrides,
            log_level=log_level,
            name=f"vpnmasq-{n + 1}" if n else "vpnmasq",
        )
        self.vpnmasq = gw
        return gw.start(timeout)

    def gateway_nat_off(self) -> None:
        """Remove the kernel NAT table (if any) and flush conntrack in the gateway."""
        self.exec("gw", ["nft", "delete", "table", "ip", KERNEL_NAT_TABLE], check=False)
        self.exec("gw", ["conntrack", "-F"], check=False)
        self._kernel_nat = False

    # -------------------------------------------------------------- capture
    @contextlib.contextmanager
    def capture(
        self, role: str, iface: str, path: str | os.PathLike[str], bpf: str = ""
    ) -> Iterator[Path]:
        """tcpdump to a pcap while the block runs (``with topo.capture("gw", "wan0", f):``)."""
        argv = [
            "tcpdump",
            "-i",
            iface,
            "-n",
            "-U",
            "--immediate-mode",
            "-w",
            str(path),
            "-s",
            "256",
        ]
        if bpf:
            argv += bpf.split()
        p = self.popen(role, argv, name=f"tcpdump:{role}:{iface}", stdout=subprocess.DEVNULL)
        # tcpdump prints "listening on" to stderr once the socket is open (generous: on a
        # busy machine a late start would miss the first packets)
        assert p.stderr is not None
        deadline = time.monotonic() + 30
        buf = b""
        os.set_blocking(p.stderr.fileno(), False)
        while b"listening on" not in buf and time.monotonic() < deadline and p.poll() is None:
            with contextlib.suppress(BlockingIOError, TypeError):
                buf += p.stderr.read() or b""
            time.sleep(0.02)
        try:
            yield Path(path)
        finally:
            time.sleep(0.1)
            p.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)  # its file is complete only once it exits by itself
            self.stop(p)

    def start_captures(
        self,
        directory: str | os.PathLike[str],
        label: str,
        ifaces: Sequence[str] = ("wan0", "lan0"),
        role: str = "gw",
        snaplen: int = 0,
    ) -> list[Path]:
        """Start tcpdump on the gateway's interfaces, writing ``DIR/<label>-<iface>.pcap``
        (for Wireshark) until :meth:`stop_captures` or :meth:`down`. Returns the paths once
        every tcpdump is listening. ``snaplen`` 0 keeps whole packets."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for iface in ifaces:
            path = d / f"{label}-{iface}.pcap"
            argv = [
                "tcpdump",
                "-i",
                iface,
                "-n",
                "-U",
                "--immediate-mode",
                "-w",
                str(path),
                "-s",
                str(snaplen),
            ]
            p = self.popen(role, argv, name=f"tcpdump:{role}:{iface}", stdout=subprocess.DEVNULL)
            _wait_tcpdump(p)
            self._captures.append(p)
            paths.append(path)
        return paths

    def stop_captures(self) -> None:
        """Stop the captures of :meth:`start_captures`; their files are complete afterwards."""
        caps, self._captures = self._captures, []
        for p in caps:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # tcpdump flushes and closes the file
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
            self.stop(p)


def _wait_tcpdump(p: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """Return once tcpdump prints "listening on" (its socket is open), exits, or timeout."""
    assert p.stderr is not None
    deadline = time.monotonic() + timeout
    buf = b""
    os.set_blocking(p.stderr.fileno(), False)
    while b"listening on" not in buf and time.monotonic() < deadline and p.poll() is None:
        with contextlib.suppress(BlockingIOError, TypeError):
            buf += p.stderr.read() or b""
        time.sleep(0.02)


class JsonProcess:
    """A tracked process whose stdout is JSON lines, collected by a reader thread."""

    def __init__(self, p: subprocess.Popen[Any]) -> None:
        self.proc = p
        self.events: list[dict[str, Any]] = []
        self.other_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._cv = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read, args=(p.stdout, False), daemon=True),
            threading.Thread(target=self._read, args=(p.stderr, True), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, f: IO[bytes] | None, is_err: bool) -> None:
        if f is None:
            return
        with contextlib.suppress(ValueError, OSError):
            for raw in f:
                line = raw.decode(errors="replace").rstrip("\n")
                with self._cv:
                    if is_err:
                        self.stderr_lines.append(line)
                    else:
                        try:
                            obj = json.loads(line)
                        except ValueError:
                            self.other_lines.append(line)
                        else:
                            if isinstance(obj, dict):
                                self.events.append(obj)
                    self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the first event with pred(event) true; LabError on timeout or exit."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                    raise LabError(
                        f"process exited ({self.proc.returncode}) before event; "
                        f"stderr: {self.stderr_lines[-20:]}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabError(
                        f"timeout waiting for event; have {self.events[-5:]}, "
                        f"stderr: {self.stderr_lines[-20:]}"
                    )
                self._cv.wait(min(left, 0.2))

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for(lambda ev: ev.get("event") == name, timeout)

    def where(self, **match: Any) -> list[dict[str, Any]]:
        with self._cv:
            return [ev for ev in self.events if all(ev.get(k) == v for k, v in match.items())]

    def last(self) -> dict[str, Any] | None:
        with self._cv:
            return self.events[-1] if self.events else None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 3.0) -> dict[str, Any] | None:
        """Signal the process (whole session), wait, return its last JSON object."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        return self.last()


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _terminate(p: subprocess.Popen[Any], timeout: float = 3.0) -> None:
    if p.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
    else:
        # The leader exited; members of its session may still run (pptp call manager).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


def _modprobe(*modules: str) -> None:
    """Load modules if this kernel has loadable ones; here they are all built in (=y)."""
    if not Path(f"/lib/modules/{os.uname().release}").is_dir() or shutil.which("modprobe") is None:
        return
    for m in modules:
        subprocess.run(["modprobe", "-q", m], capture_output=True, check=False)


def kernel_has(option: str) -> bool | None:
    """True/False if /proc/config.gz says CONFIG_<option>=y|m; None if it cannot tell."""
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            text = f.read()
    except OSError:
        return None
    return f"\nCONFIG_{option}=y" in text or f"\nCONFIG_{option}=m" in text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vpnmasq_lab.topology cleanup [--prefix P] [--force]`` or ``up`` (demo shell)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vpnmasq_lab.topology")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cleanup", help="remove namespaces left by crashed lab runs")
    c.add_argument("--prefix", default=DEFAULT_PREFIX)
    c.add_argument("--force", action="store_true", help="also namespaces with no owner record")
    u = sub.add_parser("up", help="build a topology with kernel NAT and wait for Ctrl-C")
    u.add_argument("--hosts", type=int, default=2)
    u.add_argument("--remotes", type=int, default=1)
    u.add_argument("--no-nat", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "cleanup":
        for ns in cleanup_stale(a.prefix, force=a.force):
            print(ns)
        return 0
    with Topology(hosts=a.hosts, remotes=a.remotes) as topo:
        if not a.no_nat:
            topo.gateway_kernel_nat()
        for node in topo.nodes.values():
            print(f"{node.role:5} {node.ns:24} {node.ip or ''}")
        print("Ctrl-C to tear down", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
