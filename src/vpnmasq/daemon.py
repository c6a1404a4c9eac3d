"""The composition root (wireguard-go main.go style): config -> engine + NFQUEUE + rules +
control socket + metrics + address follower + signals, and one loop that drives them.

The loop is the only place that reads the clock: ``now = time.monotonic()`` once per batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from vpnmasq.config import Config
from vpnmasq.datapath import rules
from vpnmasq.datapath.control import ControlServer
from vpnmasq.datapath.nfqueue import Hook, NfQueue, QueuedPacket
from vpnmasq.engine import Engine
from vpnmasq.events import (
    AddressChanged,
    EntryCreated,
    EntryExpired,
    Event,
    Notice,
    PacketDropped,
)
from vpnmasq.packet.ipv4 import int_to_ip, ip_to_int
from vpnmasq.verdict import Action, Direction, Verdict

log = logging.getLogger("vpnmasq")

#: the public address is re-read when netlink reports an address change (RTMGRP_IPV4_IFADDR),
#: and at least this often as a safety net
ADDRESS_POLL_S = 10.0
RTMGRP_IPV4_IFADDR = 0x10
#: log at most this many lines per (kind, reason) per second; the rest are counted and
#: summarised ("... 37 more suppressed")
LOG_BURST = 5
LOG_WINDOW_S = 1.0


class RateLimitedLog:
    """One line per event, at most LOG_BURST lines per key and second (journald-friendly)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self.window: dict[str, tuple[float, int]] = {}
        self.suppressed: dict[str, int] = {}

    def emit(self, key: str, level: int, msg: str, now: float) -> None:
        start, n = self.window.get(key, (now, 0))
        if now - start >= LOG_WINDOW_S:
            sup = self.suppressed.pop(key, 0)
            if sup:
                self.log.log(level, "%s: %d more like this suppressed", key, sup)
            start, n = now, 0
        if n < LOG_BURST:
            self.log.log(level, "%s", msg)
        else:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
        self.window[key] = (start, n + 1)

    def event(self, ev: Event, now: float) -> None:
        if isinstance(ev, PacketDropped):
            self.emit(
                "drop:" + ev.reason, logging.INFO, f"drop {ev.reason}: {ev.flow} ({ev.detail})", now
            )
        elif isinstance(ev, EntryCreated):
            r = ev.row
            extra = " ".join(f"{k}={v}" for k, v in r.detail.items())
            self.emit(
                "created",
                logging.DEBUG,
                f"new {r.proto} {r.inside} -> {r.remote} as {r.outside} {extra}".rstrip(),
                now,
            )
        elif isinstance(ev, EntryExpired):
            r = ev.row
            self.emit(
                "expired",
                logging.DEBUG,
                f"end {r.proto} {r.inside} -> {r.remote} ({ev.why}; {r.pkts_out} out, "
                f"{r.pkts_in} in)",
                now,
            )
        elif isinstance(ev, Notice):
            self.emit("notice:" + ev.topic, logging.WARNING, f"{ev.topic}: {ev.message}", now)
        elif isinstance(ev, AddressChanged):
            self.log.warning(
                "public address %s -> %s (%d entries dropped)", ev.old, ev.new, ev.entries_dropped
            )


def read_public_address(ifname: str, current: str | None = None) -> str | None:
    """The IPv4 address of ``ifname`` (via netlink, pyroute2). With several addresses (a
    DHCP renew may add the new one before removing the old), keep ``current`` while it is
    still there, else take the primary (first) one."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        addrs = [
            a.get_attr("IFA_ADDRESS")
            for a in ipr.get_addr(index=idx[0], family=socket.AF_INET)
        ]
    addrs = [a for a in addrs if a]
    if current in addrs:
        return current
    return addrs[0] if addrs else None


def send_icmp_error(original: bytes, icmp_type: int, code: int) -> None:
    """Answer the sender of ``original`` with an ICMP error quoting its IP header + 8 bytes
    (RFC 792). A raw ICMP socket lets the kernel pick the source address (the gateway's
    address on the way back to the sender)."""
    from vpnmasq.packet.checksum import checksum

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


def rule_spec(config: Config, public: str | None) -> rules.RuleSpec:
    return rules.RuleSpec(
        outside_if=config.outside_interface,
        inside_networks=list(config.inside_networks),
        public_address=public,
        mode=config.mode,
        queue_num=config.queue_num,
        fail_open=config.fail_open,
        mark=config.mark,
        alias_port_range=(config.port_range.low, config.port_range.high),
        kernel_port_range=(config.kernel_port_range.low, config.kernel_port_range.high),
        forwards=[(f.protocol, f.port) for f in config.forwards],
    )


class Gateway:
    """The running daemon. ``step()`` is one loop iteration; tests may drive it directly."""

    def __init__(self, config: Config, *, handover: bool = False) -> None:
        self.config = config
        self.handover = handover
        self.stopping = False
        self.keep_rules = False
        self.rl = RateLimitedLog(log)
        self.public: str | None = config.public_address or read_public_address(
            config.outside_interface
        )
        if self.public is None:
            log.warning(
                "no IPv4 address on %s yet; outbound packets are dropped until one appears",
                config.outside_interface,
            )
        self.engine = Engine(config, ip_to_int(self.public) if self.public else None)
        self.sel = selectors.DefaultSelector()
        self.nfq: NfQueue | None = None
        self.control: ControlServer | None = None
        self.last_addr_check = 0.0
        self.queue_latency_sum = 0.0
        self.queue_batches = 0
        self.metrics: Any = None
        self.addr_mon: socket.socket | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        cfg = self.config
        if not self.handover:
            rules.remove()  # a crash may have left rules behind: start clean
        rules.install(rule_spec(cfg, self.public))
        log.info(
            "rules installed: mode=%s outside=%s inside=%s public=%s queue=%d",
            cfg.mode,
            cfg.outside_interface,
            ",".join(cfg.inside_networks),
            self.public,
            cfg.queue_num,
        )
        self.nfq = NfQueue(cfg.queue_num, fail_open=cfg.fail_open)
        self.sel.register(self.nfq.fileno(), selectors.EVENT_READ, "nfq")
        if not cfg.public_address:
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
                flush=self.engine.flush,
                takeover=self.handover,
            )
            self.sel.register(self.control.fileno(), selectors.EVENT_READ, "control")
        except OSError as exc:
            log.warning("control socket %s unavailable: %s", cfg.control_socket, exc)
        if cfg.metrics_listen:
            self._start_metrics(cfg.metrics_listen)
        if not rules.forward_mark_rule_present(cfg.mark):
            log.info("hint: %s", rules.forward_mark_hint(cfg.mark))

    def stop(self) -> None:
        if self.nfq is not None:
            with contextlib.suppress(OSError):
                self.nfq.flush()
            self.nfq.close()
            self.nfq = None
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.addr_mon is not None:
            self.addr_mon.close()
            self.addr_mon = None
        if self.keep_rules:
            log.info("handover: rules and queue left in place (fail closed until the successor binds)")
        else:
            rules.remove()
            log.info("rules removed; vpnmasq stopped")

    # ---------------------------------------------------------------- status / metrics
    def _status(self) -> dict[str, Any]:
        from vpnmasq import status

        now = time.monotonic()
        return status.status_payload(self.engine.snapshot(now), self._counters())

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
        if self.nfq is not None:
            for k, v in self.nfq.counters.as_dict().items():
                c["nfq_" + k] = v
        c["queue_batches"] = self.queue_batches
        c["queue_latency_us_total"] = int(self.queue_latency_sum * 1e6)
        return c

    def _start_metrics(self, listen: str) -> None:
        from vpnmasq import metrics

        host, _, port = listen.rpartition(":")
        self.metrics = metrics.serve(host or "127.0.0.1", int(port), self._counters, self._by_proto)
        log.info("prometheus metrics on http://%s/metrics", listen)

    def _by_proto(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in list(self.engine.table):
            k = e.kind
            out[k] = out.get(k, 0) + 1
        return out

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
        eng = self.engine
        for p in pkts:
            direction = Direction.INBOUND if p.hook == Hook.PRE_ROUTING else Direction.OUTBOUND
            if p.truncated:
                eng.count("drop:too-big")
                eng.count("dropped")
                self.rl.emit(
                    "drop:too-big", logging.INFO,
                    f"drop too-big: {p.orig_len} bytes exceed the queue copy range", now,
                )
                assert self.nfq is not None
                self.nfq.drop(p.packet_id)
                continue
            v = eng.handle(p.payload, direction, now, token=p.packet_id)
            self._apply(p.packet_id, v)
            if v.icmp_back is not None:
                send_icmp_error(p.payload, *v.icmp_back)

    def step(self, timeout: float | None) -> None:
        for key, _ in self.sel.select(timeout):
            if key.data == "nfq" and self.nfq is not None:
                while True:
                    pkts = self.nfq.recv_batch(256)
                    if not pkts:
                        break
                    t0 = time.monotonic()
                    self.on_packets(pkts, t0)
                    self.nfq.flush()
                    self.queue_latency_sum += time.monotonic() - t0
                    self.queue_batches += 1
                    if len(pkts) < 256:
                        break
            elif key.data == "addr" and self.addr_mon is not None:
                with contextlib.suppress(BlockingIOError):
                    while self.addr_mon.recv(65536):
                        pass
                self.last_addr_check = 0.0  # re-read now
            elif key.data == "control" and self.control is not None:
                self.control.handle_ready()
                if self.control.last_error is not None:
                    log.warning("control request failed: %s", self.control.last_error)
                    self.control.last_error = None
        now = time.monotonic()
        dl = self.engine.next_deadline()
        if dl is not None and dl <= now:
            for tok, v in self.engine.handle_timer(now):
                self._apply(tok, v)
            if self.nfq is not None:
                self.nfq.flush()
        if now - self.last_addr_check >= ADDRESS_POLL_S and not self.config.public_address:
            self.last_addr_check = now
            self._follow_address(now)
        for ev in self.engine.drain_events():
            self.rl.event(ev, now)

    def _follow_address(self, now: float) -> None:
        try:
            new = read_public_address(self.config.outside_interface, self.public)
        except Exception as exc:  # netlink trouble must not kill the datapath
            log.warning("reading the address of %s failed: %s", self.config.outside_interface, exc)
            return
        if new == self.public:
            return
        old, self.public = self.public, new
        self.engine.set_public_address(ip_to_int(new) if new else None, now)
        with contextlib.suppress(Exception):
            rules.remove()
            rules.install(rule_spec(self.config, new))
        hook = self.config.on_address_change_hook
        if hook and new:
            with contextlib.suppress(OSError):
                subprocess.Popen([hook, new, old or ""], start_new_session=True)

    def timeout(self) -> float:
        dl = self.engine.next_deadline()
        t = ADDRESS_POLL_S
        if dl is not None:
            t = min(t, max(0.0, dl - time.monotonic()))
        return t

    def loop(self, until: Callable[[], bool] | None = None) -> None:
        while not self.stopping and not (until and until()):
            self.step(self.timeout())


def run(config: Config, *, handover: bool = False) -> int:
    """Run in the foreground until SIGTERM/SIGINT (exit 0, rules removed) or SIGHUP
    (handover: exit 0 leaving rules and queue in place for the successor)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vpnmasq[%(process)d]: %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(getattr(logging, config.log_level.upper(), logging.INFO))
    log.propagate = False  # libraries (pyroute2) keep their own, quieter, level
    if os.geteuid() != 0:
        log.error("vpnmasq run needs root (netfilter rules and NFQUEUE)")
        return 1
    gw = Gateway(config, handover=handover)

    def _stop(signum: int, _frame: object) -> None:
        gw.stopping = True
        if signum == signal.SIGHUP:
            gw.keep_rules = True

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, _stop)
    try:
        gw.start()
        log.info("vpnmasq running (public address %s)", gw.public or "none yet")
        gw.loop()
    except Exception:
        log.exception("vpnmasq failed")
        gw.keep_rules = False
        gw.stop()
        return 1
    gw.stop()
    return 0


__all__ = ["Gateway", "read_public_address", "rule_spec", "run", "int_to_ip"]
