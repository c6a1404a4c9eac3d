"""A small network-namespace lab for integration tests.

Topology built by :func:`gateway_topology` (the one most tests want)::

    +-----------+  10.77.0.0/24   +------------------+  198.51.100.0/24  +----------------+
    |  inside   | eth0 ------ lan0 |       gw        | wan0 ------- eth0 |     remote     |
    | 10.77.0.2 |                  | 10.77.0.1       |                   | 198.51.100.2   |
    | dflt via  |                  | 198.51.100.1    |                   | 203.0.113.10/lo|
    | 10.77.0.1 |                  | ip_forward=1    |                   | (no route to   |
    +-----------+                  | 203.0.113/24 via|                   |  10.77.0.0/24) |
                                   |   198.51.100.2  |                   +----------------+
                                   +------------------+

The remote host deliberately has no route back to the inside network: a packet that leaks
through the gateway un-masqueraded is still visible on the wire (capture it on ``remote``),
but it can never be answered.

Everything the lab creates is named ``<tag>-<role>`` where ``tag`` is ``vmq-t`` + four random
hex digits + ``-`` + the pid of the test process, so concurrent runs never collide and a
crashed run can be recognised (its pid is gone) and swept by :func:`cleanup_stale`.

All traffic stays inside the namespaces: no interface of the lab is connected to the host
namespace.

Two ways to run something in a namespace:

* ``lab.run(role, argv)`` / ``lab.popen(role, argv)``: a subprocess via ``ip netns exec``;
  ``popen`` processes are tracked and killed at teardown.
* ``lab.socket(role, family, type, proto)``: a socket created *inside* the namespace but
  owned by the test process (sockets stay bound to the namespace they were created in). The
  same trick, ``with lab.entered(role): ...``, creates a netlink socket for an in-process
  NFQUEUE listener. It switches only the calling thread (``setns(2)``) and switches back.

:class:`QueueWorker` runs an :class:`~vpnmasq.datapath.nfqueue.NfQueue` bound in a lab
namespace on a thread of the test process, with a per-packet handler.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from vpnmasq.datapath.nfqueue import Hook, NfQueue, QueuedPacket
from vpnmasq.verdict import Action, Direction

PREFIX = "vmq-t"
NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000

Cmd = Sequence[str] | str


class LabError(RuntimeError):
    """A lab command failed (stderr is in the message)."""


def _argv(cmd: Cmd) -> list[str]:
    return ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def netns_entered(name: str) -> Iterator[None]:
    """Run the body with the *calling thread* in network namespace ``name``.

    Sockets created in the body stay in that namespace after the block exits.
    Subprocesses started in the body inherit it as well.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def netns_unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or ``None`` if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, NFQUEUE)"
    if shutil.which("ip") is None:
        return "iproute2 'ip' not found"
    probe = f"{PREFIX}probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'ip netns add' failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] != "Z"


def _owner_pid(name: str, prefix: str) -> int | None:
    # <prefix><4 hex>-<pid>-<role>; the probe namespace is <prefix>probe-<pid>
    rest = name[len(prefix) :]
    parts = rest.split("-")
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return None


def list_netns(prefix: str = PREFIX) -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def _kill_netns_pids(name: str) -> None:
    """Kill every process still living in namespace ``name`` (all started by a lab)."""
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for tok in r.stdout.split():
        if tok.isdigit() and int(tok) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(tok), signal.SIGKILL)


def delete_netns(name: str) -> None:
    _kill_netns_pids(name)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete lab namespaces left behind by crashed runs (whose owning pid is gone).

    Namespaces of live test processes (including other concurrent runs) are left alone.
    Returns the names deleted.
    """
    removed = []
    for name in list_netns(prefix):
        owner = _owner_pid(name, prefix)
        if owner is not None and owner != os.getpid() and _pid_alive(owner):
            continue
        if owner == os.getpid():
            continue
        delete_netns(name)
        removed.append(name)
    return removed


class Lab:
    """Context manager owning a set of namespaces and the processes started in them."""

    def __init__(self, prefix: str = PREFIX) -> None:
        self.tag = f"{prefix}{secrets.token_hex(2)}-{os.getpid()}"
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill started processes, then delete every namespace. Never raises."""
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        deadline = time.monotonic() + 2.0
        for p in self._procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=2.0)
        self._procs.clear()
        for name in reversed(self._namespaces):
            delete_netns(name)
        self._namespaces.clear()

    # -- building --------------------------------------------------------------------------
    def ns(self, role: str) -> str:
        """Full namespace name for ``role``."""
        return f"{self.tag}-{role}"

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def add_ns(self, role: str) -> str:
        name = self.ns(role)
        self._host(["ip", "netns", "add", name])
        self._namespaces.append(name)
        self.run(role, ["ip", "link", "set", "lo", "up"])
        # keep the links quiet: no IPv6 DAD / router solicitations in captures
        self.sysctl(role, "net.ipv6.conf.all.disable_ipv6", "1")
        self.sysctl(role, "net.ipv6.conf.default.disable_ipv6", "1")
        return name

    def veth(self, a: str, a_if: str, b: str, b_if: str, *, mtu: int = 1500) -> None:
        """A veth pair between namespaces ``a`` and ``b`` (created inside ``a``, no host
        namespace names involved), both ends up."""
        self.run(
            a,
            [
                "ip",
                "link",
                "add",
                a_if,
                "mtu",
                str(mtu),
                "type",
                "veth",
                "peer",
                "name",
                b_if,
                "mtu",
                str(mtu),
                "netns",
                self.ns(b),
            ],
        )
        self.run(a, ["ip", "link", "set", a_if, "up"])
        self.run(b, ["ip", "link", "set", b_if, "up"])

    def addr(self, role: str, ifname: str, cidr: str) -> None:
        self.run(role, ["ip", "addr", "add", cidr, "dev", ifname])

    def route(self, role: str, dst: str, *, via: str | None = None, dev: str | None = None) -> None:
        argv = ["ip", "route", "add", dst]
        if via:
            argv += ["via", via]
        if dev:
            argv += ["dev", dev]
        self.run(role, argv)

    def sysctl(self, role: str, key: str, value: str) -> None:
        self.run(role, ["sysctl", "-qw", f"{key}={value}"])

    # -- running ---------------------------------------------------------------------------
    def _host(self, argv: list[str]) -> None:
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise LabError(f"{' '.join(argv)}: {r.stderr.strip()}")

    def run(
        self,
        role: str,
        cmd: Cmd,
        *,
        check: bool = True,
        timeout: float = 10.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = ["ip", "netns", "exec", self.ns(role), *_argv(cmd)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise LabError(f"[{role}] {' '.join(_argv(cmd))} -> {r.returncode}: {r.stderr.strip()}")
        return r

    def popen(self, role: str, cmd: Cmd, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a tracked background process in ``role``; killed at teardown."""
        argv = ["ip", "netns", "exec", self.ns(role), *_argv(cmd)]
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        p: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        self._procs.append(p)
        return p

    def entered(self, role: str) -> contextlib.AbstractContextManager[None]:
        """``with lab.entered('gw'):`` the calling thread runs in that namespace."""
        return netns_entered(self.ns(role))

    def socket(self, role: str, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket living in namespace ``role`` (usable from any thread)."""
        with self.entered(role):
            return socket.socket(family, type, proto)


@dataclass(frozen=True)
class GatewayTopology:
    """Names and addresses of :func:`gateway_topology`'s lab (roles, not full names)."""

    inside: str = "inside"
    gw: str = "gw"
    remote: str = "remote"
    inside_if: str = "eth0"
    gw_lan_if: str = "lan0"
    gw_wan_if: str = "wan0"
    remote_if: str = "eth0"
    inside_net: str = "10.77.0.0/24"
    inside_host: str = "10.77.0.2"
    gw_lan: str = "10.77.0.1"
    public: str = "198.51.100.1"
    remote_link: str = "198.51.100.2"
    remote_net: str = "203.0.113.0/24"
    remote_host: str = "203.0.113.10"


def gateway_topology(lab: Lab, *, mtu: int = 1500) -> GatewayTopology:
    """Build inside -- gw -- remote (see module docstring)."""
    t = GatewayTopology()
    for role in (t.inside, t.gw, t.remote):
        lab.add_ns(role)
    lab.veth(t.inside, t.inside_if, t.gw, t.gw_lan_if, mtu=mtu)
    lab.veth(t.gw, t.gw_wan_if, t.remote, t.remote_if, mtu=mtu)
    lab.addr(t.inside, t.inside_if, f"{t.inside_host}/24")
    lab.addr(t.gw, t.gw_lan_if, f"{t.gw_lan}/24")
    lab.addr(t.gw, t.gw_wan_if, f"{t.public}/24")
    lab.addr(t.remote, t.remote_if, f"{t.remote_link}/24")
    lab.addr(t.remote, "lo", f"{t.remote_host}/32")
    lab.route(t.inside, "default", via=t.gw_lan)
    lab.route(t.gw, t.remote_net, via=t.remote_link)
    lab.sysctl(t.gw, "net.ipv4.ip_forward", "1")
    return t


# --- an in-process NFQUEUE listener --------------------------------------------------------

#: A callback gets each packet and the queue; it must give (or defer) the verdict itself.
Handler = Callable[[QueuedPacket, NfQueue], None]


class QueueWorker:
    """An :class:`NfQueue` bound in a lab namespace, served by a thread of the test process.

    ``handler`` is called for every packet; exceptions are recorded (and re-raised by
    :meth:`stop`) and the packet dropped, so a failing handler never leaks packets.
    """

    def __init__(self, lab: Lab, role: str, queue_num: int, handler: Handler, **kw: object) -> None:
        with lab.entered(role):
            self.queue = NfQueue(queue_num, **kw)  # type: ignore[arg-type]
        self.handler = handler
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"nfq-{queue_num}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        q = self.queue
        while not self._stop.is_set():
            if not q.wait_readable(0.05):
                q.flush()
                continue
            for pkt in q.recv_batch():
                try:
                    self.handler(pkt, q)
                except Exception:
                    self.errors.append(traceback.format_exc())
                    try:
                        q.drop(pkt.packet_id)
                    except ValueError:
                        pass
            q.flush()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._thread.join(timeout=30)  # it checks every 50 ms; a busy machine may be slow
        self.queue.close()
        if self.errors:
            raise AssertionError("handler failed:\n" + "\n".join(self.errors))


class QueuedEngine:
    """An engine behind a lab queue, giving the verdicts the daemon would (accept with the
    rewritten packet and ``mark``, or drop; PREROUTING is inbound). ``lock`` serialises the
    engine with the test thread; ``queued`` records (protocol, hook) of every packet."""

    def __init__(self, lab: Lab, role: str, queue_num: int, engine: Any, mark: int) -> None:
        self.engine, self.mark = engine, mark
        self.lock = threading.Lock()
        self.queued: list[tuple[int, int]] = []
        self.worker = QueueWorker(lab, role, queue_num, self.handle)

    def handle(self, pkt: QueuedPacket, q: NfQueue) -> None:
        d = Direction.INBOUND if pkt.hook == Hook.PRE_ROUTING else Direction.OUTBOUND
        with self.lock:
            self.queued.append((pkt.payload[9], pkt.hook))
            v = self.engine.handle(pkt.payload, d, time.monotonic())
        if v.action is Action.ACCEPT:
            q.accept(pkt.packet_id, v.payload, mark=self.mark)
        else:
            q.drop(pkt.packet_id)

    def queued_count(self, proto: int) -> int:
        with self.lock:
            return sum(1 for p, _ in self.queued if p == proto)
