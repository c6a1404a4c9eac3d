"""The composition root (wireguard-go main.go style): config -> engine + NFQUEUE + rules +
control socket + metrics + address follower + state file + signals, and one loop that drives
them.

The loop is the only place that reads the clock: ``now = time.monotonic()`` once per batch
(and ``time.time()`` only to date a saved table, see :mod:`vpnmasq.state`).
SIGTERM/SIGINT stop (rules removed, table saved to ``state_file``); SIGHUP re-reads the
configuration with the table kept (:mod:`vpnmasq.reload`); SIGUSR2 hands over
(table saved, rules and queue left in place for ``vpnmasq run --handover``).

A firewall reload that takes the rules away is repaired from the loop (datapath/rulewatch.py).
Life cycle, signals and hand-over: docs/internals/daemon.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from vpnmasq import reload as config_reload
from vpnmasq import status
from vpnmasq.config import (
    Config,
    ConfigError,
    ConfigErrors,
    load_config,
    read_config_text,
    validate,
)
from vpnmasq.conntrack.pool import PortPool, port_pool
from vpnmasq.conntrack.table import Entry
from vpnmasq.datapath import gapflows, offload, routes, rules, rulewatch, sdnotify
from vpnmasq.datapath.control import Answer, ControlServer
from vpnmasq.datapath.nfqueue import Hook, NfQueue, NfQueueError, QueuedPacket
from vpnmasq.datapath.syncsock import SyncEndpoint, read_key
from vpnmasq.engine import Engine
from vpnmasq.eventlog import RateLimitedLog
from vpnmasq.events import Row
from vpnmasq.eventstream import EventFilter, EventStream
from vpnmasq.packet.checksum import checksum
from vpnmasq.packet.ipv4 import PROTO_NAMES, PROTO_TCP, int_to_ip, ip_to_int
from vpnmasq.sync.replica import split_ranges
from vpnmasq.verdict import Action, Direction, DropReason, Verdict

log = logging.getLogger("vpnmasq")

#: exit status of ``vpnmasq run``: 0 clean stop or handover, 1 failure, 2 the configuration
#: does not fit (bad file: see cli.py; outside_interface missing)
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
#: with state_file set, the table is saved this often while running (and at stop)
STATE_SAVE_INTERVAL_S = 30.0
#: the longest the loop drains the queue before it looks at timers, events and the offload
#: (a flood would otherwise keep a new flow's packets in the slow path: measured, a UDP flood
#: was never offloaded while it lasted)
QUEUE_SLICE_S = 0.02
#: ``status`` reads the offload maps' counters first unless the last read is this recent
STATUS_FRESH_S = 0.5
#: STATUS= for the service manager is refreshed at most this often (when it changed)
STATUS_INTERVAL_S = 2.0
#: a missing or down outside interface at start is looked at again this often (and at
#: every link notification)
INTERFACE_POLL_S = 1.0
RTMGRP_LINK = 0x1
#: the upgrade handover (save the table, leave rules and queue for ``run --handover``)
HANDOVER_SIGNAL = signal.SIGUSR2
#: ``run --handover`` waits this long for the predecessor to release the queue
HANDOVER_WAIT_S = 10.0
HANDOVER_FILE = "handover.json"
#: what vpnmasq changed to hairpin (accept_local per LAN interface, with the admin's values),
#: next to the control socket: a successor after a handover, or a start after a crash, can
#: still put those values back (see HairpinSysctls)
HAIRPIN_SYSCTL_FILE = "hairpin-sysctl.json"

#: the public address is re-read when netlink reports an address change (RTMGRP_IPV4_IFADDR),
#: and at least this often as a safety net
ADDRESS_POLL_S = 10.0
RTMGRP_IPV4_IFADDR = 0x10
#: a streamed control answer (status of a big table) runs this long at a time, between
#: packet batches: the most it adds to a queued packet's wait (bench/engine.py status-cost)
CONTROL_SLICE_S = 0.002


def ipv4_addresses(ifname: str) -> list[str]:
    """The IPv4 addresses of ``ifname``, primary first (via netlink, pyroute2); [] if the
    interface does not exist."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return []
        addrs = [
            a.get_attr("IFA_ADDRESS")
            for a in ipr.get_addr(index=idx[0], family=socket.AF_INET)
        ]
    return [a for a in addrs if a]


def read_public_address(ifname: str, current: str | None = None) -> str | None:
    """The IPv4 address of ``ifname``. With several addresses (a DHCP renew may add the new
    one before removing the old), keep ``current`` while it is still there, else take the
    primary (first) one."""
    addrs = ipv4_addresses(ifname)
    if current in addrs:
        return current
    return addrs[0] if addrs else None


def kernel_queue_counters(queue_num: int) -> dict[str, int]:
    """The kernel's own view of our queue (/proc/net/netfilter/nfnetlink_queue): packets it
    dropped because the queue was full (queue_dropped: fail closed) or because our socket
    buffer overran (user_dropped), and how many wait for a verdict now."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue", encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 7 and parts[0] == str(queue_num):
                    return {
                        "kernel_queue_waiting": int(parts[2]),
                        "kernel_queue_dropped": int(parts[5]),
                        "kernel_queue_user_dropped": int(parts[6]),
                    }
    except (OSError, ValueError):
        pass
    return {}


def read_local_port_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int] | None:
    """``net.ipv4.ip_local_port_range`` (the gateway's own ephemeral ports), or None."""
    try:
        with open(path, encoding="ascii") as f:
            lo, hi = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    return (lo, hi) if 1 <= lo <= hi <= 0xFFFF else None


#: /proc/net/tcp "st" of a listening socket (TCP_LISTEN)
_TCP_LISTEN = "0A"


def _proc_sockets(proc_net: str, name: str) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of each socket in /proc/net/<name> (``tcp``,
    ``udp6`` ...) of this network namespace; empty if the table cannot be read."""
    out: list[tuple[int, int, str]] = []
    try:
        with open(os.path.join(proc_net, name), encoding="ascii") as f:
            next(f, None)  # header
            for line in f:
                fields = line.split()
                if len(fields) >= 4:
                    local, remote = fields[1].rpartition(":")[2], fields[2].rpartition(":")[2]
                    out.append((int(local, 16), int(remote, 16), fields[3]))
    except (OSError, ValueError):
        return out
    return out


def listening_ports(proc_net: str = "/proc/net") -> set[int]:
    """Ports local services hold: TCP sockets listening and UDP sockets bound but not
    connected (a connected one is a client's: its answers come from its one peer), IPv4 and
    IPv6 (a dual-stack socket also takes the IPv4 port). Read from this network
    namespace's /proc/net tables; a table that cannot be read adds nothing."""
    ports: set[int] = set()
    for name, listen_only in (("tcp", True), ("tcp6", True), ("udp", False), ("udp6", False)):
        for port, remote, state in _proc_sockets(proc_net, name):
            if (state == _TCP_LISTEN if listen_only else not remote) and port:
                ports.add(port)
    return ports


def bound_ports(proto: int, proc_net: str = "/proc/net") -> set[int]:
    """Every local port a TCP or UDP socket of this namespace holds, in any state."""
    names = ("tcp", "tcp6") if proto == PROTO_TCP else ("udp", "udp6")
    return {port for name in names for port, _, _ in _proc_sockets(proc_net, name) if port}


def local_port_bound(proto: int, port: int) -> bool:
    """Whether a socket of the gateway holds TCP or UDP ``port`` now (any address, IPv4 or
    dual-stack IPv6, any state, time-wait included): a bind to 0.0.0.0:port without
    SO_REUSEADDR fails then. The engine asks before it hands out a port (one socket, bind,
    close; only candidates free in its own table), so a mapping never starts on the port of
    a resolver's query or an explicitly bound connect. A program binding later is not seen.
    Without CAP_NET_BIND_SERVICE (the shipped unit) a port below 1024 cannot be bound: those
    are looked up in /proc/net instead (rare: only LAN source ports below 1024 map there)."""
    kind = socket.SOCK_STREAM if proto == PROTO_TCP else socket.SOCK_DGRAM
    try:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("0.0.0.0", port))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return port in bound_ports(proto)
        return exc.errno == errno.EADDRINUSE
    return False


def discover_pool(config: Config) -> PortPool:
    """The port pool on this system (see :func:`vpnmasq.conntrack.pool.port_pool`)."""
    if config.port_range is not None or config.mode != "userspace":
        return port_pool(config)
    return port_pool(
        config, local_port_range=read_local_port_range(), listening=listening_ports()
    )


def send_icmp_error(original: bytes, icmp_type: int, code: int) -> None:
    """Answer the sender of ``original`` with an ICMP error quoting its IP header + 8 bytes
    (RFC 792). A raw ICMP socket lets the kernel pick the source address (the gateway's
    address on the way back to the sender)."""
    if len(original) < 20:
        return
    ihl = (original[0] & 0x0F) * 4
    body = bytearray([icmp_type, code, 0, 0, 0, 0, 0, 0]) + original[: ihl + 8]
    c = checksum(body)
    body[2], body[3] = c >> 8, c & 0xFF
    dst = socket.inet_ntoa(original[12:16])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
            s.sendto(bytes(body), (dst, 0))
    except OSError as exc:
        log.debug("sending ICMP %d/%d to %s failed: %s", icmp_type, code, dst, exc)


class HairpinSysctls:
    """``accept_local`` on the LAN interfaces while hairpinning, and putting it back.

    Measured in the lab (``tests/integration/test_hairpin.py``): vpnmasq rewrites a hairpinned
    packet in PREROUTING to source = the public address, a local address, and the routing
    decision that follows drops a local source arriving on a LAN interface as a martian
    unless ``net.ipv4.conf.<lan>.accept_local = 1``. With it, both modes hairpin. Strict
    ``rp_filter`` (1, the larger of ``all`` and the interface) still drops them (counted in
    ``TcpExtIPReversePathFilter``); vpnmasq does not loosen the admin's anti-spoofing
    policy, it warns (:meth:`rp_filter_warnings`).

    ``accept_local`` also opens the door to LAN hosts spoofing the gateway's addresses, so
    every interface vpnmasq turns it on for is also listed in
    :attr:`vpnmasq.datapath.rules.RuleSpec.local_source_guard`: a raw-table rule drops unicast
    packets with a local source arriving there, before vpnmasq's rewrite (the kernel's
    martian check, put back for everything else). Interfaces where the admin already had
    ``accept_local = 1`` are left alone (not changed, not guarded).

    The original values are kept in :data:`HAIRPIN_SYSCTL_FILE` while changed, so they are
    restored by whichever vpnmasq stops last (a handover passes them on; a start after a
    crash finds them).
    """

    KEY = "accept_local"

    def __init__(self, path: str, *, netns: str | None = None) -> None:
        self.path = path
        self.netns = netns
        self.changed: dict[str, str] = {}  # interface -> the admin's accept_local
        self.planned = False

    @property
    def guard(self) -> list[str]:
        return sorted(self.changed)

    def _load(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.path, exc)
            return {}
        saved = data.get(self.KEY) if isinstance(data, dict) else None
        if not isinstance(saved, dict):
            return {}
        return {str(k): str(v) for k, v in saved.items() if str(v).lstrip("-").isdigit()}

    def _save(self) -> None:
        if not self.changed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({self.KEY: self.changed}, f)
        os.replace(tmp, self.path)

    def _set(self, ifname: str, value: str) -> bool:
        try:
            rules.ipv4_conf_set(ifname, self.KEY, value, netns=self.netns)
        except (rules.RuleError, ValueError) as exc:
            log.warning("setting net.ipv4.conf.%s.%s=%s failed: %s", ifname, self.KEY, value, exc)
            return False
        return True

    def plan(self, interfaces: list[str]) -> None:
        """Decide which of ``interfaces`` get ``accept_local = 1`` (and the guard), and
        restore what an earlier run changed on interfaces no longer wanted. Records the
        decision in the file before anything is changed."""
        saved = self._load()
        for ifname, old in saved.items():
            if ifname not in interfaces:
                self._set(ifname, old)
        changed: dict[str, str] = {}
        for ifname in interfaces:
            if ifname in saved:  # changed by a predecessor (handover) or a crashed run
                changed[ifname] = saved[ifname]
                continue
            cur = rules.ipv4_conf_get(ifname, self.KEY, netns=self.netns)
            if cur is not None and cur != "1":
                changed[ifname] = cur
        self.changed = changed
        self.planned = True
        try:
            self._save()
        except OSError as exc:
            log.warning("cannot record the sysctls to restore in %s: %s", self.path, exc)

    def apply(self) -> None:
        for ifname in self.changed:
            self._set(ifname, "1")

    def restore(self) -> None:
        """Put the admin's values back and forget them (a normal stop)."""
        if not self.planned:
            return  # never looked: a file left by an earlier run is not ours to remove yet
        for ifname, old in self.changed.items():
            self._set(ifname, old)
        self.changed = {}
        with contextlib.suppress(OSError):
            self._save()

    def rp_filter_warnings(self, interfaces: list[str]) -> list[str]:
        all_value = rules.ipv4_conf_get("all", "rp_filter", netns=self.netns)
        out = []
        for ifname in interfaces:
            dev_value = rules.ipv4_conf_get(ifname, "rp_filter", netns=self.netns)
            if rules.rp_filter_blocks_hairpin(all_value, dev_value):
                out.append(
                    f"hairpinning from {ifname} is dropped by strict reverse-path filtering "
                    f"(rp_filter: all={all_value}, {ifname}={dev_value}); hairpinned packets "
                    "carry the public address as source: set "
                    f"net.ipv4.conf.{ifname}.rp_filter=2 (loose) to allow them"
                )
        return out


class ReloadRefused(Exception):
    """A reload cannot apply the new configuration; the running one stays."""


class StartupError(Exception):
    """vpnmasq cannot start; the message is for the operator, ``code`` the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def check_environment(config: Config) -> None:
    """CAP_NET_ADMIN (root, or a unit that grants it): StartupError with a clear message.
    A missing or down outside interface is no error: :func:`run` waits for it."""
    if not has_net_admin():
        raise StartupError(
            "vpnmasq run needs CAP_NET_ADMIN (it installs netfilter rules and binds an "
            "NFQUEUE): run it as root, with sudo, or through the systemd unit in packaging/"
        )


CAP_NET_ADMIN = 12


def has_net_admin() -> bool:
    """Whether CAP_NET_ADMIN is in this process's effective set (/proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def interface_state(name: str) -> str:
    """``"up"``, ``"down"`` (administratively) or ``"missing"``."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16sH14x", name.encode()[:15], 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, req))[1]  # SIOCGIFFLAGS
    except OSError:
        return "missing"
    return "up" if flags & 0x1 else "down"  # IFF_UP


def interface_names() -> set[str] | None:
    """Names of the network interfaces (None if they cannot be listed)."""
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:
        return None


def handover_path(config: Config) -> str:
    """Where SIGUSR2 (handover) saves the table and ``run --handover`` reads it: ``state_file``, or
    ``handover.json`` in the control socket's directory (root only, 0700)."""
    if config.state_file:
        return config.state_file
    return os.path.join(os.path.dirname(config.control_socket) or ".", HANDOVER_FILE)


def hairpin_forwards(config: Config) -> list[tuple[str, int | None, int | None]]:
    """The forwards a LAN host can reach through the public address (hairpinning), as
    :attr:`rules.RuleSpec.hairpin_forwards` wants them: TCP/UDP forwards with a port and GRE,
    without a ``remote`` restriction (a LAN client is no remote: the engine would not match
    them). ESP cannot hairpin (the engine says why; use NAT-T, which hairpins as UDP)."""
    out: list[tuple[str, int | None, int | None]] = []
    for f in config.forwards:
        if f.remote is not None:
            continue
        if f.protocol in ("tcp", "udp") and f.port is not None:
            out.append((f.protocol, f.port, f.to_port if f.to_port is not None else f.port))
        elif f.protocol == "gre":
            out.append(("gre", None, None))
    return out


def _describe_hairpin(h: tuple[str, int | None, int | None]) -> str:
    proto, port, server_port = h
    if port is None:
        return proto
    return f"{proto} {port}" + (f"->{server_port}" if server_port != port else "")


def rule_spec(
    config: Config,
    public: str | None,
    *,
    hairpin_address: str | None = None,
    guard: Sequence[str] = (),
    pool: PortPool | None = None,
) -> rules.RuleSpec:
    """The rules for ``config``. ``public`` is the configured public address (None: match
    any address of the outside interface); ``hairpin_address`` the current one, which the
    hairpin rules need when ``public`` is None; ``guard`` the interfaces vpnmasq turned
    ``accept_local`` on for hairpinning (:class:`HairpinSysctls`); ``pool`` the engine's
    port pool (None: what ``config`` gets on a default system)."""
    pool = pool if pool is not None else port_pool(config)
    address = public or hairpin_address
    extra = None
    if config.offload_on and address:  # the offload's maps and rules, in vpnmasq's table
        filtering = config.filtering if config.mode == "userspace" else None
        extra = offload.offload_rules(address, config.outside_interface, config.mark, filtering)
    return rules.RuleSpec(
        outside_if=config.outside_interface,
        inside_networks=list(config.inside_networks),
        public_address=public,
        mode=config.mode,
        queue_num=config.queue_num,
        fail_open=config.fail_open,
        mark=config.mark,
        alias_port_range=pool.ranges[0],
        kernel_port_range=(config.kernel_port_range.low, config.kernel_port_range.high),
        low_port_range=(config.low_port_range.low, config.low_port_range.high),
        alias_ranges=pool.alias_ranges,
        forwards=[(f.protocol, f.port) for f in config.forwards],
        forward_reply_ports=[
            (f.protocol, f.to_port)
            for f in config.forwards
            if f.protocol in ("tcp", "udp") and f.to_port is not None and f.to_port != f.port
        ],
        routed_networks=[r.network for r in config.routes],
        mss_clamp=config.mss_clamp,
        hairpin_forwards=hairpin_forwards(config),
        hairpin_address=hairpin_address,
        local_source_guard=guard,
        local_icmp_errors=True,  # the gateway's own ICMP errors are translated
        hairpin_icmp_errors=True,  # ... and LAN hosts' errors inside hairpinned flows
        extra=extra,
    )


class Gateway:
    """The running daemon. ``step()`` is one loop iteration; tests may drive it directly."""

    def __init__(
        self,
        config: Config,
        *,
        handover: bool = False,
        config_path: str | None = None,
        notifier: sdnotify.Notifier | None = None,
    ) -> None:
        self.handover = handover
        self.config_path = config_path  # re-read on SIGHUP (reload_config)
        self.notifier = notifier or sdnotify.Notifier({})
        self.reload_requested = False
        self.next_status = 0.0
        self.last_status = ""
        self.stopping = False
        self.keep_rules = False
        self.rl = RateLimitedLog(log)
        self.stream = EventStream(lambda e, now: self.engine.row(e, now))
        # [sync]: the engine hands out new identifiers from this node's half of each range;
        # the rules keep the whole pool (the peer's mappings arrive at takeover), except
        # the kernel's own NAT range in hybrid mode
        self.full_config = config
        engine_config = config
        if config.sync.enabled:  # (the engine follows the address: active while it is here)
            engine_config = dataclasses.replace(
                split_ranges(config, config.sync.node), public_address=None
            )
            config = dataclasses.replace(config, kernel_port_range=engine_config.kernel_port_range)
        self.config = config
        self.engine_config = engine_config
        self.sync: SyncEndpoint | None = None
        self.yielding = False  # [sync] node 2 while node 1 says it is active
        self.split_brain = False  # ... and the public address is here too
        self.public: str | None = (
            self._sync_address()
            if config.sync.enabled
            else config.public_address or read_public_address(config.outside_interface)
        )
        if self.public is None and interface_state(config.outside_interface) == "up":
            log.warning(
                "no IPv4 address on %s yet; outbound packets are dropped until one appears",
                config.outside_interface,
            )
        self.pool = discover_pool(config)  # the rules queue all of it
        engine_pool = self.pool if engine_config is config else port_pool(engine_config)
        self.engine = Engine(
            engine_config,
            ip_to_int(self.public) if self.public else None,
            pool=engine_pool,
            port_in_use=local_port_bound,
        )
        self.sel = selectors.DefaultSelector()
        self.nfq: NfQueue | None = None
        self.control: ControlServer | None = None
        self.last_addr_check = 0.0
        self.queue_latency_sum = 0.0
        self.queue_batches = 0
        self.metrics: Any = None
        self.addr_mon: socket.socket | None = None
        self.routes_applied: routes.Applied | None = None
        # kernel fast path for established flows (config offload): ESP/GRE, and in
        # userspace mode plain TCP/UDP/ICMP echo sessions too
        self.offloader: Any = None
        self.next_sync = 0.0
        self.last_sync = 0.0
        self.offload_ended = False
        self.exit_code = EXIT_OK
        self.next_save: float | None = None  # monotonic time of the next periodic save
        self.saver: tuple[int, float] | None = None  # (pid, started) of a background save
        self.outside_index: int | None = None  # ifindex of outside_interface (_from_outside)
        self.hairpin_sysctls = HairpinSysctls(
            os.path.join(os.path.dirname(config.control_socket) or ".", HAIRPIN_SYSCTL_FILE)
        )
        self.spec: rules.RuleSpec | None = None  # the rules installed now
        self.rulewatch: rulewatch.RuleWatch | None = None
        self.rule_baseline: dict[str, str] = {}  # rulewatch.fingerprint after our last change
        self.rules_restored = 0
        self.rules_restore_failed = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:  # noqa: C901 - the start-up sequence, step by step (docs/internals/daemon.md)
        """Bind the queue, restore the table, install the rules, open the control socket
        and the rest (see the module docstring for the order and why)."""
        cfg = self.config
        self.nfq = self._bind_queue()
        self.restore_state()
        # Hairpinning needs accept_local on the LAN interfaces (HairpinSysctls); the guard
        # rule that comes with it is installed before the sysctl is changed.
        hairpin_ifs: list[str] = []
        if rules.hairpins(cfg.mode, hairpin_forwards(cfg)):
            hairpin_ifs = rules.interfaces_towards(
                rules.main_routes(), cfg.inside_networks, cfg.outside_interface
            )
        self.hairpin_sysctls.plan(hairpin_ifs)  # also restores what a crashed run left
        # The rules match "an address of outside_interface" unless public_address is set,
        # so following the address needs no rule change (and leaves no gap), except for
        # the hairpin rules (_follow_hairpin_address).
        spec = self._own_spec()
        if self.handover:
            rules.replace(spec)  # atomic: the predecessor's rules never go away first
        else:
            rules.install(spec)  # removes what a crashed run left, then installs
        self.spec = spec
        self.hairpin_sysctls.apply()
        log.info(
            "rules %s: mode=%s outside=%s inside=%s public=%s queue=%d",
            "taken over" if self.handover else "installed",
            cfg.mode,
            cfg.outside_interface,
            ",".join(cfg.inside_networks),
            self.public,
            cfg.queue_num,
        )
        log.info(
            "port pool: %s; %s",
            self.pool.describe(),
            self.engine.host_limits.describe(),
        )
        if hairpin_ifs:
            hairpinned = [_describe_hairpin(h) for h in hairpin_forwards(cfg)]
            if cfg.mode == "userspace":
                hairpinned.insert(0, "every mapping")
            log.info(
                "hairpinning %s from %s (accept_local set on: %s)",
                ", ".join(hairpinned),
                ",".join(hairpin_ifs),
                ",".join(self.hairpin_sysctls.guard) or "none needed",
            )
            for warning in self.hairpin_sysctls.rp_filter_warnings(hairpin_ifs):
                log.warning("%s", warning)
        self.sel.register(self.nfq.fileno(), selectors.EVENT_READ, "nfq")
        try:
            self.routes_applied = routes.apply_routes(cfg.routes)
        except routes.RouteError as exc:
            log.error("installing [[route]]s failed: %s", exc)
        self._refresh_local_consumers()
        if cfg.state_file:
            self.next_save = time.monotonic() + STATE_SAVE_INTERVAL_S
        if cfg.sync.enabled:
            self._start_sync()
        if not cfg.public_address or cfg.sync.enabled:
            try:
                self.addr_mon = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
                self.addr_mon.bind((0, RTMGRP_IPV4_IFADDR))
                self.addr_mon.setblocking(False)
                self.sel.register(self.addr_mon.fileno(), selectors.EVENT_READ, "addr")
            except OSError as exc:
                log.warning("netlink address monitor unavailable (%s); polling", exc)
        try:
            self.control = ControlServer(
                cfg.control_socket,
                status=self._status,
                counters=self._counters,
                flush=lambda: self.engine.flush(),  # the engine a reload put in place
                subscribe=EventFilter.from_request,
                takeover=self.handover,
            )
            self.sel.register(self.control.fileno(), selectors.EVENT_READ, "control")
        except OSError as exc:
            log.warning("control socket %s unavailable: %s", cfg.control_socket, exc)
        if cfg.metrics_listen:
            self._start_metrics(cfg.metrics_listen)
        if not rules.forward_mark_rule_present(cfg.mark):
            log.info("hint: %s", rules.forward_mark_hint(cfg.mark))
        self._remove_legacy_offload()
        if cfg.offload_on:
            self._start_offload()
        self._watch_rules()

    # ---------------------------------------------------------------- the admin's firewall
    def _watch_rules(self) -> None:
        """Start noticing when a firewall reload takes our rules away (datapath/rulewatch.py)."""
        self.rulewatch = rulewatch.RuleWatch(
            (rules.NFT_TABLE, *rules.CHAINS),
            time.monotonic(),
            poll_every_interval=rules.iptables_is_legacy(),
        )
        if self.rulewatch.sock is not None:
            self.sel.register(self.rulewatch.fileno(), selectors.EVENT_READ, "rulewatch")
        else:
            log.warning("no nftables notifications; checking vpnmasq's rules every %.1f s",
                        rulewatch.CANARY_INTERVAL_S)
        self._rebaseline()

    def _fingerprint(self, nft: bool = True) -> dict[str, str]:
        """What is installed now. Without ``nft`` (nftables says nothing changed: only the
        iptables-legacy poll asks) our nft table is taken as last read, not listed again
        with every offload element in it."""
        tables = [rules.NFT_TABLE] if nft else []
        text, save = rulewatch.snapshot(tables, iptables_tables=tuple(rules.CHAINS))
        fp = rulewatch.fingerprint(text, save, rules.CHAIN_PREFIX)
        if not nft:
            fp.update((k, v) for k, v in self.rule_baseline.items() if k.startswith("nft "))
        return fp

    def _rebaseline(self) -> None:
        """Our own change of the rules is the new reference."""
        if self.rulewatch is not None:
            self.rule_baseline = self._fingerprint()
            self.rulewatch.checked()

    def _catch_up_rules(self, now: float) -> None:
        """Repair a firewall change not looked at yet, against the current baseline, before
        our own rule change takes a new one (see :meth:`rulewatch.RuleWatch.catch_up`)."""
        if self.rulewatch is not None and self.rule_baseline and self.rulewatch.catch_up(now):
            self._check_rules(now)

    def _check_rules(self, now: float) -> None:
        """Compare what is installed with what we installed; put back what is missing."""
        assert self.rulewatch is not None
        what = rulewatch.differences(
            self.rule_baseline, self._fingerprint(nft=self.rulewatch.nft_changed)
        )
        if what:
            self._restore_rules(what, now)
        else:
            self.rulewatch.checked()

    def _restore_rules(self, what: list[str], now: float) -> None:
        """Re-install the rules (with the offload maps, refilled from the table we hold) in
        one transaction per table, the way a handover takes rules over: the table, and with
        it every session, carries on."""
        assert self.rulewatch is not None and self.spec is not None
        t0 = time.monotonic()
        try:
            rules.replace(self.spec)
            self._refill_offload()
        except rules.RuleError as exc:
            self.rules_restore_failed += 1
            log.error("re-installing vpnmasq's rules failed (retrying): %s", exc)
            self.rulewatch.schedule(now + rulewatch.CANARY_INTERVAL_S)
            return
        cfg = self.config
        unnatted = 0
        if cfg.mode == "hybrid":  # flows that started in the gap would leak on (gapflows.py)
            try:
                unnatted = gapflows.drop_unnatted(
                    cfg.inside_networks,
                    exempt_networks=cfg.exempt_networks,
                    routed_networks=[r.network for r in cfg.routes],
                )
            except Exception as exc:  # never let the cleanup stop the datapath
                log.error("deleting un-NATed conntrack entries failed: %s", exc)
        took = time.monotonic() - t0
        self.rules_restored += 1
        self._rebaseline()
        log.warning(
            "firewall change took vpnmasq's rules away (%s): re-installed in %.0f ms, "
            "%d entries kept, %d un-NATed conntrack entries from the gap deleted",
            "; ".join(what),
            took * 1e3,
            len(self.engine.table),
            unnatted,
        )

    @staticmethod
    def _remove_legacy_offload() -> None:
        """Earlier versions kept the offload maps in a table of their own, which a crash or a
        handover may have left: the maps live in vpnmasq's table now, and the kernel must not
        keep rewriting flows through the old one."""
        subprocess.run(
            ["nft", "-f", "-"],
            input=offload.legacy_table_removal(),
            text=True,
            capture_output=True,
            check=False,
        )

    def _refill_offload(self) -> None:
        """The rules were (re-)installed with empty offload maps: fill them in this loop
        iteration (until then the engine translates those flows, as it would without)."""
        if self.offloader is not None:
            if self.public:
                self.offloader.public = self.public
            self.offloader.forget()
            self.next_sync = 0.0

    def _start_offload(self) -> None:
        """Established ESP SPI pairs and PPTP calls go into nftables maps keyed on the remote
        address plus SPI/Call ID, and in userspace mode established NAPT sessions on their
        addresses and ports, so the kernel rewrites them (see datapath/offload.py)."""
        if self.public is None:
            log.warning("offload: no public address yet; offload stays off until restart")
            return
        cfg = self.config
        napt = cfg.mode == "userspace"
        try:
            self.offloader = offload.Offloader(
                self.public,
                cfg.outside_interface,
                cfg.mark,
                filtering=cfg.filtering if napt else None,
            )
            if napt:
                self.offloader.attach(self.engine.table)
            log.info(
                "offload: maps in table ip vpnmasq (%s)",
                f"ESP, GRE, TCP, UDP, ICMP echo; {cfg.filtering} filtering" if napt else "ESP, GRE",
            )
        except Exception as exc:  # the slow path still works without it
            log.warning("offload unavailable: %s", exc)
            self.offloader = None

    def _offload_sync(self, now: float) -> None:
        if self.offloader is None:
            return
        try:  # ended sessions leave the maps before the next packet is handled
            quick = self.offloader.quick(now)
        except Exception as exc:
            log.warning("offload update failed: %s", exc)
            quick = None
        if quick is not None and quick.removed:
            log.debug("offload: +%d -%d elements", quick.added, quick.removed)
        if now < self.next_sync and not self.offload_ended:
            return
        self.offload_ended = False
        self.next_sync = now + self.offloader.interval
        try:
            rep = self.offloader.sync(self.engine, now)
            self.last_sync = now
            self.next_sync = now + self.offloader.interval  # adapted to the read's cost
        except Exception as exc:
            log.warning("offload sync failed: %s", exc)
            return
        if rep.added or rep.removed:
            log.info("offload: +%d -%d elements (%d offloaded)", rep.added, rep.removed, rep.offloaded)

    def _bind_queue(self) -> NfQueue:
        cfg = self.config
        deadline = time.monotonic() + (HANDOVER_WAIT_S if self.handover else 0.0)
        while True:
            try:
                return NfQueue(cfg.queue_num, fail_open=cfg.fail_open)
            except NfQueueError as exc:
                # the kernel answers EPERM (some versions EBUSY) when another socket holds
                # the queue; we are root, so that is what it means here
                if exc.errno not in (errno.EPERM, errno.EBUSY):
                    raise StartupError(f"cannot bind NFQUEUE {cfg.queue_num}: {exc}") from None
                if time.monotonic() >= deadline:
                    hint = (
                        "the previous vpnmasq did not release it: send it SIGUSR2 first"
                        if self.handover
                        else "is another vpnmasq running? Stop it, or take over with "
                        "SIGUSR2 + vpnmasq run --handover"
                    )
                    raise StartupError(
                        f"NFQUEUE {cfg.queue_num} is bound by another process; {hint}"
                    ) from None
                time.sleep(0.05)

    # ---------------------------------------------------------------- state
    def restore_state(self) -> None:
        """Load the saved table (state_file, or the handover file with --handover) into the
        fresh engine. Never fatal: a bad file is reported and the table starts empty."""
        from vpnmasq import state

        cfg = self.config
        path = handover_path(cfg) if self.handover else cfg.state_file
        if not path:
            return
        try:
            data = state.read_state(path)
        except state.StateError as exc:
            log.warning("ignoring the saved table: %s; starting with an empty table", exc)
            return
        if data is None:
            if self.handover:  # an ordinary start with --handover (the systemd unit)
                log.info("handover: no saved table at %s; starting with an empty table", path)
            return
        if self.handover and path != cfg.state_file:
            with contextlib.suppress(OSError):
                os.unlink(path)  # consumed: a later plain start must not pick it up
        try:
            report = state.import_state(self.engine, data, time.monotonic(), time.time())
        except Exception as exc:  # a half-restored table is not to be trusted: start empty
            log.warning("ignoring the saved table %s: %s; starting with an empty table", path, exc)
            self.engine = Engine(
                self.engine_config,
                self.engine.public_ip,
                pool=self.engine.pool,
                port_in_use=local_port_bound,
            )
            return
        log.info("%s from %s", report.summary(), path)

    def save_state(self, path: str) -> bool:
        """Write the table to ``path`` (atomically, mode 0600). False (logged) on failure."""
        from vpnmasq import state

        t0 = time.monotonic()
        try:
            data = state.export_state(self.engine, t0, time.time())
            size = state.write_state(path, data)
        except (OSError, ValueError) as exc:
            log.error("saving the table to %s failed: %s", path, exc)
            return False
        log.debug(
            "table saved to %s: %d entries, %d bytes, %.0f ms",
            path,
            len(data["entries"]),
            size,
            (time.monotonic() - t0) * 1e3,
        )
        return True

    def save_in_background(self, path: str) -> None:
        """The periodic save: a forked child writes a copy-on-write snapshot of the table, so
        the packet loop does not stop while a big table is exported (about 10 us per entry)
        and written. At most one at a time; :meth:`reap_saver` collects it. The final save
        at stop or handover runs in the loop (nothing moves any more then)."""
        from vpnmasq import state

        if self.saver is not None:
            return  # the previous one is still writing
        now, wall = time.monotonic(), time.time()
        try:
            pid = os.fork()
        except OSError as exc:
            log.warning("cannot fork to save the table (%s); saving in the loop", exc)
            self.save_state(path)
            return
        if pid == 0:  # the child: no logging (another thread may hold its lock), no cleanup
            code = 1
            try:
                state.write_state(path, state.export_state(self.engine, now, wall))
                code = 0
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    head = (
                        f"<{sdnotify.journal_priority(logging.ERROR)}>"
                        if sdnotify.stderr_is_journal()
                        else f"vpnmasq[{os.getpid()}]: ERROR "
                    )
                    os.write(2, f"{head}saving the table to {path} failed: {exc}\n".encode())
            finally:
                os._exit(code)
        self.saver = (pid, now)

    def reap_saver(self, block: bool = False) -> None:
        """Collect a finished background save (wait for it with ``block``)."""
        if self.saver is None:
            return
        pid, started = self.saver
        try:
            done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self.saver = None
            return
        if done == 0:
            return
        self.saver = None
        code = os.waitstatus_to_exitcode(status)
        took = (time.monotonic() - started) * 1e3
        if code == 0:
            log.debug("table saved to %s in the background (%.0f ms)", self.config.state_file, took)
        else:
            log.error("saving the table to %s in the background failed (%d)", self.config.state_file, code)

    def stop(self) -> None:
        """Flush verdicts, save the table, close the queue; remove the rules unless handing
        over (``keep_rules``, SIGUSR2). Sets ``exit_code`` if the handover save failed."""
        cfg = self.config
        self.reap_saver(block=True)  # its rename must not land after the final save
        if self.nfq is not None:
            with contextlib.suppress(OSError):
                self.nfq.flush()
        now = time.monotonic()
        for ev in self.engine.drain_events():
            self.rl.event(ev, now)
        self.rl.close()  # the suppressed counts of the last windows
        if self.keep_rules:
            path = handover_path(cfg)
            if self.save_state(path):
                log.info("handover: table saved to %s", path)
            else:
                self.exit_code = EXIT_FAILURE
        elif cfg.state_file and self.nfq is not None:
            self.save_state(cfg.state_file)
        if self.nfq is not None:
            self.nfq.close()
            self.nfq = None
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.sync is not None:
            self.sync.close()
            self.sync = None
        if self.addr_mon is not None:
            self.addr_mon.close()
            self.addr_mon = None
        if self.rulewatch is not None:
            self.rulewatch.close()
            self.rulewatch = None
        if self.routes_applied is not None and not self.keep_rules:
            with contextlib.suppress(Exception):
                routes.undo(self.routes_applied)
            self.routes_applied = None
        if self.keep_rules:
            log.info(
                "handover: rules left in place (owned packets are dropped until the successor "
                "binds the queue); start it with: vpnmasq run --handover"
            )
        else:
            self.hairpin_sysctls.restore()  # before the guard rule goes with the rules
            self.offloader = None  # its maps go with the table
            rules.remove()
            log.info("rules removed; vpnmasq stopped")

    # ---------------------------------------------------------------- status / metrics
    def _status(self, req: Mapping[str, Any]) -> Answer:
        """The ``status`` answer, produced a slice at a time between packet batches
        (:meth:`ControlServer.work`): the request copies the table's references (C speed),
        the rows are built and encoded later, so a big table never stalls the queue."""
        try:
            q = status.StatusQuery.from_request(req)
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        now = time.monotonic()
        eng, off = self.engine, self.offloader
        if off is not None and now - self.last_sync >= STATUS_FRESH_S and off.last_read_s < 0.05:
            self.next_sync = 0.0  # credit what the kernel forwarded, as of now (if cheap)
            self._offload_sync(now)
        offloaded = off.is_offloaded if off is not None else None

        def row(e: Entry) -> Row:
            r = eng.row(e, now)
            return replace(r, offloaded=True) if offloaded is not None and offloaded(e) else r

        def tail() -> dict[str, Any]:
            out: dict[str, Any] = {"counters": self._counters()}
            if off is not None:
                out["offload"] = off.status()
            out["limits"] = {
                "pool": self.engine.pool.as_dict(),
                "per_host": self.engine.host_limits.as_dict(),
                "text": [
                    f"port pool: {self.engine.pool.describe()}",
                    self.engine.host_limits.describe(),
                ],
            }
            if self.sync is not None:
                out["sync"] = {
                    **self.sync.status(self.engine.public_ip is not None, now),
                    "yielding": self.split_brain,  # (node 2 with the address: split brain)
                }
            return out

        return status.answer_stream(list(eng.table.index.values()), q, row, tail)

    def _counters(self) -> dict[str, int]:
        for _ in range(3):
            try:
                c = dict(self.engine.counters)
                break
            except RuntimeError:  # changed size during copy (metrics thread)
                continue
        else:
            c = {}
        c["entries"] = len(self.engine.table)
        for (_, kind), n in list(self.engine.table.by_proto_kind.items()):
            if n:
                c["entries:" + kind] = c.get("entries:" + kind, 0) + n
        c["port_pool_size"] = self.engine.pool.size
        for host, hits in self.engine.limit_hits.snapshot().items():
            for limit, n in hits.items():
                c[f"host_limit:{int_to_ip(host)}:{limit}"] = n
        if self.nfq is not None:
            for k, v in self.nfq.counters.as_dict().items():
                c["nfq_" + k] = v
        if self.offloader is not None:  # what the kernel forwarded for the engine's entries
            c.update(self.offloader.forwarded)
        c["queue_batches"] = self.queue_batches
        c["rules_restored"] = self.rules_restored
        c["rules_restore_failed"] = self.rules_restore_failed
        c.update(kernel_queue_counters(self.config.queue_num))
        c["queue_latency_us_total"] = int(self.queue_latency_sum * 1e6)
        if self.sync is not None:
            c.update(self.sync.counters_all())
        return c

    def _start_metrics(self, listen: str) -> None:
        from vpnmasq import metrics

        host, _, port = listen.rpartition(":")
        reg = metrics.registry_for(
            self._counters,
            self._entries_by_kind,
            max_entries=self.config.limits.max_entries,
            mode=self.config.mode,
        )
        self.metrics = metrics.serve(host or "127.0.0.1", int(port), reg)
        log.info("prometheus metrics on http://%s/metrics", listen)

    def _entries_by_kind(self) -> dict[tuple[str, str], int]:
        """Live entries by (protocol name, kind): kept by the table, O(kinds), any thread."""
        return {
            (PROTO_NAMES.get(p, str(p)), k): n
            for (p, k), n in list(self.engine.table.by_proto_kind.items())
        }

    # ---------------------------------------------------------------- packets
    def _apply(self, pid: object, v: Verdict) -> None:
        assert self.nfq is not None
        if v.action is Action.ACCEPT:
            self.nfq.accept(pid, v.payload, mark=self.config.mark)  # type: ignore[arg-type]
        elif v.action is Action.DROP:
            self.nfq.drop(pid)  # type: ignore[arg-type]
        for tok, rv in v.released:
            self._apply(tok, rv)

    def on_packets(self, pkts: list[QueuedPacket], now: float) -> None:
        """Translate a batch and buffer its verdicts (the caller flushes them).

        This runs once per packet, so it is written for speed: one ``now`` for the whole
        batch, bound methods and constants in locals, and the common verdict (accept or drop,
        nothing released, no ICMP error to send) issued without a call to :meth:`_apply`.
        """
        nfq = self.nfq
        assert nfq is not None
        handle = self.engine.handle
        accept, drop = nfq.accept, nfq.drop
        mark = self.config.mark
        out_idx = self.outside_index
        pre = int(Hook.PRE_ROUTING)
        outbound, inbound = Direction.OUTBOUND, Direction.INBOUND
        accepted, dropped = Action.ACCEPT, Action.DROP
        for pid, hook, _hw, payload, cap_len, orig_len, _mark, indev, _outdev, _skb in pkts:
            if hook != pre:
                direction = outbound
            elif indev == out_idx:
                direction = inbound
            elif self._from_outside(indev):
                direction = inbound
                out_idx = self.outside_index
            else:  # queued in PREROUTING from a LAN interface: a LAN host hairpinning
                direction = outbound
            if orig_len > cap_len:
                self._drop_too_big(pid, orig_len, now)
                continue
            v = handle(payload, direction, now, pid)
            action = v.action
            if action is accepted:
                accept(pid, v.payload, mark)
            elif action is dropped:
                drop(pid)
            if v.released:
                for tok, rv in v.released:
                    self._apply(tok, rv)
            if v.icmp_back is not None:
                send_icmp_error(payload, *v.icmp_back)

    def _drop_too_big(self, pid: int, orig_len: int, now: float) -> None:
        """A packet longer than the copy range arrived cut: it cannot be translated."""
        eng = self.engine
        key = "drop:" + DropReason.TOO_BIG.value
        eng.count(key)
        eng.count("dropped")
        self.rl.emit(
            key, logging.INFO,
            f"drop {DropReason.TOO_BIG.value}: {orig_len} bytes exceed the queue copy range", now,
        )
        assert self.nfq is not None
        self.nfq.drop(pid)

    def _from_outside(self, indev: int | None) -> bool:
        """Whether a packet queued in PREROUTING came in on the outside interface (inbound)
        rather than from a LAN interface (a LAN host hairpinning through the public address,
        which the engine translates as outbound). The index is cached; a mismatch re-reads
        it once, so an outside interface re-created under the same name (PPPoE) is followed
        at once, at the price of one ioctl per hairpinned packet."""
        if indev is None or indev == self.outside_index:
            return True
        try:
            self.outside_index = socket.if_nametoindex(self.config.outside_interface)
        except OSError:
            return True  # the outside interface is gone: keep the hook-only rule
        return indev == self.outside_index

    def step(self, timeout: float | None) -> None:  # noqa: C901 - the loop's one batch: every input in order, flat
        for key, _ in self.sel.select(timeout):
            if key.data == "nfq" and self.nfq is not None:
                until = time.monotonic() + QUEUE_SLICE_S
                while True:
                    pkts = self.nfq.recv_batch(256)
                    if not pkts:
                        break
                    t0 = time.monotonic()
                    self.on_packets(pkts, t0)
                    self.nfq.flush()
                    t1 = time.monotonic()
                    self.queue_latency_sum += t1 - t0
                    self.queue_batches += 1
                    if len(pkts) < 256 or t1 >= until:
                        break  # under a flood: timers, events and the offload still get their turn
            elif key.data == "addr" and self.addr_mon is not None:
                with contextlib.suppress(BlockingIOError):
                    while self.addr_mon.recv(65536):
                        pass
                self.last_addr_check = 0.0  # re-read now
            elif key.data == "control" and self.control is not None:
                self.control.handle_ready()
            elif key.data == "rulewatch" and self.rulewatch is not None:
                self.rulewatch.on_readable(time.monotonic())
            elif key.data == "sync" and self.sync is not None:
                self.sync.on_readable(self.engine.public_ip is not None, time.monotonic())
            elif key.data == "wakeup":  # a signal arrived (run(): signal.set_wakeup_fd)
                with contextlib.suppress(OSError):
                    os.read(key.fd, 512)
        ctl = self.control
        if ctl is not None:
            if ctl.runnable():  # a status answer in progress: one slice, then packets again
                ctl.work(time.monotonic() + CONTROL_SLICE_S)
            if ctl.last_error is not None:
                log.warning("control request failed: %s", ctl.last_error)
                ctl.last_error = None
        now = time.monotonic()
        dl = self.engine.next_deadline()
        if dl is not None and dl <= now:
            for tok, v in self.engine.handle_timer(now):
                self._apply(tok, v)
            if self.nfq is not None:
                self.nfq.flush()
        if now - self.last_addr_check >= ADDRESS_POLL_S:
            self.last_addr_check = now
            if not self.config.public_address or self.sync is not None:
                self._follow_address(now)
            self._refresh_local_consumers()  # a local charon/pptpd may have started
            self._follow_listening_ports()  # a local service may have started
        if self.rulewatch is not None and self.rulewatch.due(now):
            self._check_rules(now)
        events = self.engine.drain_events()
        for ev in events:
            self.rl.event(ev, now)
        self.rl.flush_due(now)
        if ctl is not None and ctl.subscribers():  # vpnmasq events: built only if listened to
            ctl.publish(self.stream.convert(events, now, time.time()))
        if self.offloader is not None:
            if not self.offload_ended and self.offloader.wants_sync(events):
                self.offload_ended = True
            self._offload_sync(now)
        if self.sync is not None and self.sync.must_yield(now) != self.yielding:
            self.yielding = not self.yielding
            self._follow_address(now)
        if self.sync is not None:
            self.sync.tick(
                self.engine, self.engine.public_ip is not None, now, time.time(), time.monotonic
            )
        if self.saver is not None:
            self.reap_saver()
        if self.next_save is not None and now >= self.next_save and self.config.state_file:
            self.next_save = now + STATE_SAVE_INTERVAL_S
            self.save_in_background(self.config.state_file)
        if self.reload_requested:
            self.reload_requested = False
            self.reload_config()
        self.notifier.watchdog(now)  # from the packet loop: a stuck loop stops the pings
        if now >= self.next_status:
            self.next_status = now + STATUS_INTERVAL_S
            self._notify_status()

    def _own_spec(self) -> rules.RuleSpec:
        """The rules for the running configuration, address and port pool."""
        cfg = self.config
        return rule_spec(
            cfg,
            cfg.public_address,
            hairpin_address=self.public,
            guard=self.hairpin_sysctls.guard,
            pool=self.pool,
        )

    def _follow_listening_ports(self) -> None:
        """An "auto" pool leaves out the ports local services listen on: one that started
        since is taken out of the pool, and the rules stop queueing it (atomically)."""
        if self.pool.source != "auto" or self.config.mode != "userspace":
            return
        gone = self.engine.exclude_ports(sorted(listening_ports()))
        if not gone:
            return
        self.pool = self.pool.without(gone)
        log.warning(
            "port pool: a local service now listens on %s; taken out of the pool (%d ports "
            "left; a mapping that holds such a port keeps it until it ends)",
            ", ".join(str(p) for p in gone), self.engine.pool.size,
        )
        spec = self._own_spec()
        try:
            rules.replace(spec)
        except rules.RuleError as exc:
            log.error("updating the rules for the port pool failed: %s", exc)
            return
        self.spec = spec
        self._rebaseline()

    def _refresh_local_consumers(self) -> None:
        """``local_vpn = "auto"``: tell the engine which VPN protocols have an endpoint on
        the gateway itself (a local charon, pptpd, a GRE device...)."""
        if self.config.local_vpn != "auto":
            return
        try:
            self.engine.set_local_consumers(routes.local_vpn_consumers(self.public))
        except Exception as exc:  # probing must never stop the datapath
            log.debug("probing local VPN endpoints failed: %s", exc)

    def _sync_address(self) -> str | None:
        """With [sync], the gateway is active while the virtual public address is on the
        outside interface (keepalived puts it there) and, on node 2, the peer does not say
        it is active too (split brain): that address, or None."""
        pub = self.config.public_address
        here = pub in ipv4_addresses(self.config.outside_interface)
        self.split_brain = here and self.sync is not None and self.sync.must_yield(time.monotonic())
        return pub if here and not self.split_brain else None

    def _start_sync(self) -> None:
        cfg = self.config.sync
        assert cfg.key_file is not None
        try:
            key, warn = read_key(cfg.key_file)
            self.sync = SyncEndpoint(cfg, key)
        except (OSError, ValueError) as exc:
            raise StartupError(f"[sync] (key_file {cfg.key_file}, listen {cfg.listen}): {exc}") from None
        if warn:
            log.warning("[sync] key_file %s", warn)
        self.sel.register(self.sync.fileno(), selectors.EVENT_READ, "sync")
        log.info(
            "sync: node %d, %s, peer %s",
            cfg.node,
            "active" if self.public else f"standby (waiting for {self.config.public_address})",
            cfg.peer,
        )

    def _sync_role(self, new: str | None, now: float) -> None:
        """The public address arrived (take over the replicated table) or went away (stop
        masquerading: the engine was flushed; wait for the new active's table)."""
        assert self.sync is not None
        if new is None:
            self.sync.stand_by()
            log.warning(
                "sync: %s: standby now (masquerading stopped)",
                "node 1 is active too (split brain), node 2 yields"
                if self.split_brain
                else "public address gone",
            )
            return
        rep = self.sync.take_over(self.engine, now, time.time(), self.full_config)
        log.warning(
            "sync: took over %s: %s",
            new,
            rep.summary()
            if rep is not None
            else self.sync.last_error or "no replicated table (starting empty)",
        )
        if self.config.offload_on and self.offloader is None:
            self._start_offload()
            self._rebaseline()  # the offload table is ours to watch from now on

    def _follow_address(self, now: float) -> None:
        try:
            if self.sync is not None:
                new = self._sync_address()
            else:
                new = read_public_address(self.config.outside_interface, self.public)
        except Exception as exc:  # netlink trouble must not kill the datapath
            log.warning("reading the address of %s failed: %s", self.config.outside_interface, exc)
            return
        if new == self.public:
            return
        old, self.public = self.public, new
        # the rules match any address of outside_interface: only the engine changes
        self.engine.set_public_address(ip_to_int(new) if new else None, now)
        if self.sync is not None:
            self._sync_role(new, now)
        self._follow_hairpin_address()
        hook = self.config.on_address_change_hook
        if hook and new:
            with contextlib.suppress(OSError):
                subprocess.Popen([hook, new, old or ""], start_new_session=True)

    def _follow_hairpin_address(self) -> None:
        """The hairpin rules and the offload's rewrites name the public address (packets from
        the LAN to it cannot be matched by interface; a rewrite needs the address itself):
        swap them atomically for the new address. Only needed when ``public_address`` is not
        configured and something hairpins or offload is on."""
        cfg = self.config
        if cfg.public_address or not (
            rules.hairpins(cfg.mode, hairpin_forwards(cfg)) or cfg.offload_on
        ):
            return
        self._catch_up_rules(time.monotonic())
        spec = rule_spec(
            cfg, None, hairpin_address=self.public, guard=self.hairpin_sysctls.guard, pool=self.pool
        )
        try:
            rules.replace(spec)
        except rules.RuleError as exc:
            log.error("updating the rules for %s failed: %s", self.public, exc)
            return
        self.spec = spec
        self._refill_offload()
        self._rebaseline()

    # ---------------------------------------------------------------- service manager
    def status_line(self) -> str:
        return (
            f"{len(self.engine.table)} mappings; public address {self.public or 'none yet'}; "
            f"mode {self.config.mode}"
        )

    def notify_ready(self) -> None:
        """READY=1 with the status line (after the start, and after each reload)."""
        self.last_status = self.status_line()
        self.notifier.ready(self.last_status)

    def _notify_status(self) -> None:
        line = self.status_line()
        if line != self.last_status:
            self.last_status = line
            self.notifier.status(line)

    def reload_config(self) -> bool:
        """SIGHUP / ``systemctl reload``: re-read :attr:`config_path` and apply it, keeping
        the table. A file that does not load, or a change only a restart can make, is
        refused with the reason and the running configuration stays. True if applied."""
        path = self.config_path
        if path is None:
            log.warning("reload: no configuration file to re-read (started without one)")
            return False
        self.notifier.reloading(time.monotonic_ns() // 1000)
        try:
            text = read_config_text(path)
            new = load_config(text)
            for warning in validate(new, text):
                log.warning("%s: %s", path, warning)
            self._catch_up_rules(time.monotonic())  # a firewall reload just before: repaired
            self.apply_config(new, path)
            return True
        except ConfigError as exc:
            errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
            log.error(
                "reload refused, the running configuration stays: %s",
                "; ".join(f"{path}: {e}" for e in errors),
            )
            return False
        except (ReloadRefused, rules.RuleError, OSError) as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return False
        finally:
            self.notify_ready()

    def apply_config(self, new: Config, source: str = "the new configuration") -> None:
        """Put ``new`` in force with the table kept (see :mod:`vpnmasq.reload`): a new
        engine holding the entries that still apply, the rules for ``new`` swapped in one
        transaction per table, routes, hairpin sysctls and offload following. One log line
        says what changed and which entries were removed. Raises :class:`ReloadRefused` (or
        RuleError) with nothing changed."""
        old = self.full_config
        blocked = config_reload.restart_needed(old, new)
        if blocked:
            raise ReloadRefused(
                f"{', '.join(blocked)} changed in {source}: only a restart applies that "
                "(systemctl restart vpnmasq)"
            )
        changed = config_reload.changed_keys(old, new)
        if not changed:
            log.info("reload: %s unchanged", source)
            return
        if old.sync.enabled:  # the standby replicates the table this engine holds
            raise ReloadRefused(
                f"{', '.join(changed)} changed in {source}, but [sync] replicates the table: "
                "restart vpnmasq to apply (the standby takes over meanwhile)"
            )
        now, wall = time.monotonic(), time.time()
        pool = discover_pool(new)
        engine, report = config_reload.rebuild(self.engine, new, now, wall, pool)
        hairpin_ifs: list[str] = []
        if rules.hairpins(new.mode, hairpin_forwards(new)):
            hairpin_ifs = rules.interfaces_towards(
                rules.main_routes(), new.inside_networks, new.outside_interface
            )
        self.hairpin_sysctls.plan(hairpin_ifs)
        spec = rule_spec(
            new,
            new.public_address,
            hairpin_address=self.public,
            guard=self.hairpin_sysctls.guard,
            pool=pool,
        )
        if spec != self.spec:
            try:
                rules.replace(spec)
            except rules.RuleError:
                if self.spec is not None:  # put back what was there (nft may have gone first)
                    with contextlib.suppress(rules.RuleError):
                        rules.replace(self.spec)
                raise
        self.hairpin_sysctls.apply()
        # commit: from here on the new configuration is in force
        for tok, v in self.engine.release_held():
            self._apply(tok, v)
        self.engine, self.config, self.spec, self.pool = engine, new, spec, pool
        self.full_config = self.engine_config = new  # no [sync] (restart_needed refuses it)
        if old.routes != new.routes:
            if self.routes_applied is not None:
                with contextlib.suppress(Exception):
                    routes.undo(self.routes_applied)
            try:
                self.routes_applied = routes.apply_routes(new.routes)
            except routes.RouteError as exc:
                self.routes_applied = None
                log.error("installing [[route]]s failed: %s", exc)
        if self.offloader is not None:
            self.offloader.forget()  # the maps are reconciled with the new table
            if new.mode == "userspace":
                self.offloader.attach(engine.table)
            self.next_sync = 0.0
        log.setLevel(getattr(logging, new.log_level.upper(), logging.INFO))
        self.next_save = now + STATE_SAVE_INTERVAL_S if new.state_file else None
        self._refresh_local_consumers()
        self._rebaseline()
        removed = (
            ", ".join(f"{why} {n}" for why, n in sorted(report.dropped.items()))
            if report.dropped
            else "none"
        )
        log.log(
            logging.WARNING if report.n_dropped else logging.INFO,
            "configuration reloaded from %s (changed: %s): %d entries kept, %d removed (%s)",
            source, ", ".join(changed), report.n_restored, report.n_dropped, removed,
        )  # fmt: skip

    def timeout(self) -> float:
        if self.control is not None and self.control.runnable():
            return 0.0
        now = time.monotonic()
        t = ADDRESS_POLL_S
        for dl in (
            self.engine.next_deadline(),
            self.next_save,
            self.next_sync if self.offloader is not None else None,
            self.rl.next_deadline(),
            self.offloader.next_add() if self.offloader is not None else None,
            self.rulewatch.deadline() if self.rulewatch is not None else None,
            self.sync.next_deadline(self.engine.public_ip is not None) if self.sync else None,
            self.notifier.next_watchdog(),
            self.next_status if self.notifier.enabled else None,
        ):
            if dl is not None:
                t = min(t, max(0.0, dl - now))
        return t

    def loop(self, until: Callable[[], bool] | None = None) -> None:
        while not self.stopping and not (until and until()):
            self.step(self.timeout())


def _setup_logging(config: Config) -> None:
    """One line per event on stderr: ``vpnmasq[pid]: LEVEL message``, or, when stderr is
    the journal (JOURNAL_STREAM), ``<N>message``: journald takes the priority from the
    prefix and adds the name and pid itself."""
    if not any(getattr(h, "_vpnmasq", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            sdnotify.JournalFormatter("%(message)s")
            if sdnotify.stderr_is_journal()
            else logging.Formatter("vpnmasq[%(process)d]: %(levelname)s %(message)s")
        )
        handler._vpnmasq = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(getattr(logging, config.log_level.upper(), logging.INFO))
    log.propagate = False  # libraries (pyroute2) keep their own, quieter, level


def _wait_for_interface(gw: Gateway, wake: socket.socket) -> bool:
    """Wait until ``outside_interface`` exists and is up (a PPPoE or VLAN interface that
    comes later than vpnmasq at boot), logging once. False if a stop signal came first."""
    name = gw.config.outside_interface
    state = interface_state(name)
    if state == "up":
        return True
    have = ", ".join(sorted(interface_names() or ())) or "none"
    log.warning(
        "outside_interface %s is %s (interfaces: %s); waiting for it, rules are installed "
        "when it is up", name, state, have,
    )  # fmt: skip
    gw.notifier.status(f"waiting for {name} ({state})")
    links: socket.socket | None = None
    try:
        links = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        links.bind((0, RTMGRP_LINK))
    except OSError:
        links = None
    try:
        watched = [wake] + ([links] if links is not None else [])
        while not gw.stopping:
            ready, _, _ = select.select(watched, [], [], INTERFACE_POLL_S)
            for r in ready:
                with contextlib.suppress(OSError):
                    r.recv(65536)
            gw.notifier.watchdog(time.monotonic())
            if interface_state(name) == "up":
                log.info("outside_interface %s is up", name)
                if not gw.config.sync.enabled:  # [sync] follows its virtual address itself
                    gw.public = gw.config.public_address or read_public_address(name)
                    gw.engine.set_public_address(
                        ip_to_int(gw.public) if gw.public else None, time.monotonic()
                    )
                return True
        return False
    finally:
        if links is not None:
            links.close()


def run(config: Config, *, handover: bool = False, config_path: str | None = None) -> int:
    """Run in the foreground until SIGTERM/SIGINT (exit 0, rules removed) or SIGUSR2
    (handover: exit 0 leaving rules and queue in place for the successor); SIGHUP re-reads
    ``config_path`` (:meth:`Gateway.reload_config`). See docs/internals/daemon.md. Returns
    the exit status (:data:`EXIT_OK`, :data:`EXIT_FAILURE`, :data:`EXIT_CONFIG`)."""
    _setup_logging(config)
    try:
        check_environment(config)
    except StartupError as exc:
        log.error("%s", exc)
        return exc.code
    notifier = sdnotify.Notifier()
    gw = Gateway(config, handover=handover, config_path=config_path, notifier=notifier)

    def _signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            gw.reload_requested = True
            return
        gw.stopping = True
        if signum == HANDOVER_SIGNAL:
            gw.keep_rules = True

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, HANDOVER_SIGNAL):
        signal.signal(s, _signal)
    # select() resumes after a signal (PEP 475) with the remaining timeout, up to
    # ADDRESS_POLL_S when idle: the wakeup fd makes a signal end the wait at once.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    gw.sel.register(wake_r.fileno(), selectors.EVENT_READ, "wakeup")
    try:
        if not _wait_for_interface(gw, wake_r):
            log.info("stopped while waiting for %s", config.outside_interface)
            return EXIT_OK
        gw.start()
        log.info("vpnmasq running (public address %s)", gw.public or "none yet")
        gw.notify_ready()  # rules installed, queue bound
        gw.loop()
    except (StartupError, rules.RuleError) as exc:
        log.error("%s", exc)
        code = exc.code if isinstance(exc, StartupError) else EXIT_FAILURE
        if gw.nfq is not None:  # we got as far as binding: leave nothing of ours behind
            gw.keep_rules = gw.handover  # a failed successor leaves the rules it found
            gw.stop()
        return code
    except Exception:
        log.exception("vpnmasq failed")
        gw.keep_rules = False
        gw.stop()
        return EXIT_FAILURE
    notifier.stopping()
    gw.stop()
    return gw.exit_code


__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "Gateway",
    "HairpinSysctls",
    "HANDOVER_SIGNAL",
    "ReloadRefused",
    "StartupError",
    "check_environment",
    "hairpin_forwards",
    "handover_path",
    "int_to_ip",
    "read_public_address",
    "rule_spec",
    "run",
]
