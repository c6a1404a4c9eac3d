"""The daemon's logic without root or a kernel: start order, state file handling, stop and
handover, exit codes and messages, rate-limited logging. The real thing runs in
tests/integration/test_daemon*.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.packets import EXT, IN, OUT, PRV1, accepted, build_udp, esp_packet
from tests.unit.conftest import Records
from vpnmasq import daemon, state
from vpnmasq.config import Config
from vpnmasq.datapath.nfqueue import Hook, NfQueueError, QueuedPacket
from vpnmasq.eventlog import LOG_BURST


def config(tmp_path: Path, **kw: Any) -> Config:
    base: dict[str, Any] = dict(
        outside_interface="wan0",
        inside_networks=("10.77.0.0/24",),
        public_address="198.51.100.1",  # no netlink needed
        mode="userspace",
        control_socket=str(tmp_path / "run" / "ctl.sock"),
    )
    base.update(kw)
    return Config(**base)


class FakeQueue:
    def __init__(self, *a: object, **kw: object) -> None:
        self.flushed = self.closed = 0
        self._pair = socket.socketpair()  # something epoll accepts

    def fileno(self) -> int:
        return self._pair[0].fileno()

    def flush(self) -> int:
        self.flushed += 1
        return 0

    def close(self) -> None:
        self.closed += 1
        for s in self._pair:
            s.close()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record what the daemon does to the rules instead of doing it."""
    seen: list[str] = []
    monkeypatch.setattr(daemon.rules, "install", lambda spec: seen.append("install"))
    monkeypatch.setattr(daemon.rules, "replace", lambda spec: seen.append("replace"))
    monkeypatch.setattr(daemon.rules, "remove", lambda: seen.append("remove"))
    monkeypatch.setattr(daemon.rules, "forward_mark_rule_present", lambda mark: True)
    return seen



# ------------------------------------------------------------------------------ environment
def test_without_cap_net_admin_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, logs: Records
) -> None:
    monkeypatch.setattr(daemon, "has_net_admin", lambda: False)
    with pytest.raises(daemon.StartupError, match="needs CAP_NET_ADMIN") as ei:
        daemon.check_environment(config(tmp_path))
    assert ei.value.code == daemon.EXIT_FAILURE
    assert daemon.run(config(tmp_path)) == 1
    assert any(lvl == logging.ERROR and "needs CAP_NET_ADMIN" in m for lvl, m in logs.lines)


def test_cap_net_admin_is_read_from_the_effective_set() -> None:
    # the test runs as root (CapEff has every bit) or as a user (none)
    assert daemon.has_net_admin() is (os.geteuid() == 0)


def test_a_missing_outside_interface_is_no_startup_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(daemon, "has_net_admin", lambda: True)
    daemon.check_environment(config(tmp_path, outside_interface="wan9"))  # run waits for it
    assert daemon.interface_state("wan9") == "missing"
    assert daemon.interface_state("lo") == "up"


def test_handover_path_is_the_state_file_or_next_to_the_control_socket(tmp_path: Path) -> None:
    assert daemon.handover_path(config(tmp_path)) == str(tmp_path / "run" / "handover.json")
    sf = str(tmp_path / "lib" / "state.json")
    assert daemon.handover_path(config(tmp_path, state_file=sf)) == sf


# ------------------------------------------------------------------------------ start order
def test_a_busy_queue_stops_the_start_before_any_rule_is_touched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, calls: list[str]
) -> None:
    def busy(*a: object, **kw: object) -> None:
        raise NfQueueError(errno.EPERM, "binding nfqueue 0: Operation not permitted")

    monkeypatch.setattr(daemon, "NfQueue", busy)
    gw = daemon.Gateway(config(tmp_path))
    with pytest.raises(daemon.StartupError, match="bound by another process.*SIGUSR2") as ei:
        gw.start()
    assert ei.value.code == 1 and calls == [] and gw.nfq is None


def test_handover_waits_for_the_queue_and_swaps_rules_atomically(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, calls: list[str], logs: Records
) -> None:
    tries: list[int] = []

    def queue(*a: object, **kw: object) -> FakeQueue:
        tries.append(1)
        if len(tries) < 3:  # the predecessor still holds it twice
            raise NfQueueError(errno.EPERM, "busy")
        return FakeQueue()

    monkeypatch.setattr(daemon, "NfQueue", queue)
    monkeypatch.setattr(daemon.time, "sleep", lambda s: None)
    monkeypatch.setattr(daemon, "ControlServer", _NoControl)
    gw = daemon.Gateway(config(tmp_path), handover=True)
    gw.start()
    assert len(tries) == 3 and calls == ["replace"]  # never remove, never install
    assert "handover: no saved table" in logs.text()
    gw.stop()
    assert calls == ["replace", "remove"]


def test_a_normal_start_installs_after_binding(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, calls: list[str]
) -> None:
    order: list[str] = []
    monkeypatch.setattr(daemon, "NfQueue", lambda *a, **kw: order.append("bind") or FakeQueue())
    monkeypatch.setattr(
        daemon.rules, "install", lambda spec: order.append(f"install:{spec.public_address}")
    )
    monkeypatch.setattr(daemon, "ControlServer", _NoControl)
    gw = daemon.Gateway(config(tmp_path))
    gw.start()
    assert order == ["bind", "install:198.51.100.1"]
    gw.stop()
    # following the interface's address: the rules match any address of outside_interface
    monkeypatch.setattr(daemon, "read_public_address", lambda ifname, cur=None: "198.51.100.7")
    order.clear()
    gw2 = daemon.Gateway(config(tmp_path, public_address=None))
    gw2.start()
    assert order == ["bind", "install:None"] and gw2.public == "198.51.100.7"
    gw2.stop()


class _NoControl:
    def __init__(self, *a: object, **kw: object) -> None:
        raise OSError("no control socket in unit tests")


# ------------------------------------------------------------------------------ state
def _gateway_with_traffic(tmp_path: Path, **kw: Any) -> daemon.Gateway:
    gw = daemon.Gateway(config(tmp_path, **kw))
    eng = gw.engine
    accepted(eng.handle(esp_packet(PRV1, EXT, 0x1001), OUT, 1.0))
    accepted(eng.handle(esp_packet(EXT, eng.public_ip, 0x2001), daemon.Direction.INBOUND, 1.0))  # type: ignore[arg-type]
    accepted(eng.handle(build_udp(PRV1, EXT, 5000, 53), OUT, 1.0))
    return gw


def test_stop_saves_to_the_state_file_then_removes_rules(
    tmp_path: Path, calls: list[str], logs: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    sf = tmp_path / "lib" / "state.json"
    gw = _gateway_with_traffic(tmp_path, state_file=str(sf))
    q = FakeQueue()
    gw.nfq = q  # type: ignore[assignment]
    monkeypatch.setattr(daemon.time, "monotonic", lambda: 2.0)
    gw.stop()
    assert q.flushed and q.closed and calls == ["remove"]
    data = json.loads(sf.read_text())
    assert data["version"] == state.STATE_VERSION
    assert sorted(e["kind"] for e in data["entries"]) == ["esp", "napt"]
    assert stat.S_IMODE(sf.stat().st_mode) == 0o600


def test_sigusr2_saves_for_the_successor_and_keeps_the_rules(
    tmp_path: Path, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = _gateway_with_traffic(tmp_path)
    gw.nfq = FakeQueue()  # type: ignore[assignment]
    gw.keep_rules = True
    monkeypatch.setattr(daemon.time, "monotonic", lambda: 2.0)
    gw.stop()
    assert calls == [] and gw.exit_code == 0
    path = Path(daemon.handover_path(gw.config))
    assert len(json.loads(path.read_text())["entries"]) == 2

    # the successor: restores, and consumes the handover file (it is not a state_file)
    succ = daemon.Gateway(config(tmp_path), handover=True)
    monkeypatch.setattr(daemon.time, "monotonic", lambda: 500.0)
    succ.restore_state()
    assert len(succ.engine.table) == 2 and not path.exists()
    assert succ.engine.counters.get("restored:esp") == 1


def test_a_failed_handover_save_is_an_error_exit(
    tmp_path: Path, calls: list[str], logs: Records
) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("a file where the directory should be")
    gw = _gateway_with_traffic(tmp_path)
    gw.nfq = FakeQueue()  # type: ignore[assignment]
    gw.keep_rules = True
    gw.stop()
    assert gw.exit_code == daemon.EXIT_FAILURE and calls == []
    assert any(lvl == logging.ERROR and "saving the table" in m for lvl, m in logs.lines)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x01 not json", "corrupt"),
        (b'{"format": "vpnmasq-state", "version": 7, "saved_at": 1}', "newer vpnmasq"),
        (b'{"format": "something-else"}', "not a vpnmasq state"),
    ],
)
def test_a_bad_state_file_is_reported_and_ignored(
    tmp_path: Path, logs: Records, content: bytes, message: str
) -> None:
    sf = tmp_path / "state.json"
    sf.write_bytes(content)
    gw = daemon.Gateway(config(tmp_path, state_file=str(sf)))
    gw.restore_state()
    assert len(gw.engine.table) == 0
    warn = [m for lvl, m in logs.lines if lvl == logging.WARNING]
    assert len(warn) == 1 and message in warn[0] and "starting with an empty table" in warn[0]
    assert sf.exists()  # left for the admin to look at


def test_a_state_that_fails_half_way_leaves_an_empty_engine(
    tmp_path: Path, logs: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    sf = tmp_path / "state.json"
    gw = _gateway_with_traffic(tmp_path, state_file=str(sf))
    assert gw.save_state(str(sf))

    def boom(*a: object, **kw: object) -> None:
        raise RuntimeError("helper bug")

    monkeypatch.setattr(state, "import_state", boom)
    succ = daemon.Gateway(config(tmp_path, state_file=str(sf)))
    succ.restore_state()
    assert len(succ.engine.table) == 0
    assert "helper bug" in logs.text()


def test_without_state_file_and_handover_nothing_is_read_or_written(
    tmp_path: Path, calls: list[str]
) -> None:
    gw = _gateway_with_traffic(tmp_path)
    Path(daemon.handover_path(gw.config)).parent.mkdir(parents=True)
    Path(daemon.handover_path(gw.config)).write_text("{}")  # a stale handover file
    fresh = daemon.Gateway(config(tmp_path))
    fresh.restore_state()
    assert len(fresh.engine.table) == 0
    gw.nfq = FakeQueue()  # type: ignore[assignment]
    gw.stop()
    assert calls == ["remove"]
    assert Path(daemon.handover_path(gw.config)).read_text() == "{}"


def test_the_table_is_saved_periodically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sf = tmp_path / "state.json"
    gw = _gateway_with_traffic(tmp_path, state_file=str(sf))
    clock = [100.0]
    monkeypatch.setattr(daemon.time, "monotonic", lambda: clock[0])
    gw.next_save = 100.0 + daemon.STATE_SAVE_INTERVAL_S
    assert gw.timeout() == pytest.approx(min(daemon.ADDRESS_POLL_S, daemon.STATE_SAVE_INTERVAL_S))
    gw.step(0)
    assert not sf.exists()
    clock[0] = 100.0 + daemon.STATE_SAVE_INTERVAL_S
    gw.step(0)  # forks a child that writes a snapshot; the loop goes on
    assert gw.saver is not None
    assert gw.next_save == pytest.approx(clock[0] + daemon.STATE_SAVE_INTERVAL_S)
    gw.reap_saver(block=True)
    assert gw.saver is None and sf.exists()
    data = json.loads(sf.read_text())
    assert sorted(e["kind"] for e in data["entries"]) == ["esp", "napt"]
    first = sf.stat().st_mtime_ns
    clock[0] += 1.0
    gw.step(0)
    assert gw.saver is None and sf.stat().st_mtime_ns == first  # not before the next interval


def test_a_failed_background_save_is_logged(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    logs: Records,
    capfd: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "lib").write_text("a file where the directory should be")
    gw = _gateway_with_traffic(tmp_path, state_file=str(tmp_path / "lib" / "state.json"))
    gw.save_in_background(gw.config.state_file or "")
    gw.reap_saver(block=True)
    assert any(lvl == logging.ERROR and "in the background failed" in m for lvl, m in logs.lines)
    assert "ERROR saving the table to" in capfd.readouterr().err  # the child's own line


# ------------------------------------------------------------------------------ logging
def test_stop_writes_what_the_rate_limited_log_still_holds(
    tmp_path: Path, calls: list[str], logs: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drops handled just before a stop: their events are logged and the suppressed count of
    the open window is written, so the log adds up to the counter."""
    gw = daemon.Gateway(config(tmp_path))
    for i in range(12):  # unsolicited: no mapping
        gw.engine.handle(build_udp(EXT, gw.engine.public_ip, 4000 + i, 62000), IN, 1.0)  # type: ignore[arg-type]
    assert gw.engine.counters["drop:no-mapping"] == 12
    monkeypatch.setattr(daemon.time, "monotonic", lambda: 1.0)
    gw.stop()
    lines = [m for _, m in logs.lines if m.startswith("drop no-mapping")]
    assert len(lines) == LOG_BURST
    assert f"drop:no-mapping: {12 - LOG_BURST} more like this suppressed" in logs.text()


def test_run_help_documents_signals_and_handover() -> None:
    from click.testing import CliRunner

    from vpnmasq.cli import cli

    out = CliRunner().invoke(cli, ["run", "--help"]).output
    for needle in ("SIGTERM", "SIGHUP", "SIGUSR2", "--handover", "kill -USR2", "status 2"):
        assert needle in out, needle
    assert "SIGUSR2" in (daemon.__doc__ or "") and "--handover" in (daemon.__doc__ or "")


def test_run_with_a_bad_config_exits_2_with_key_and_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vpnmasq.cli import cli

    p = tmp_path / "bad.toml"
    p.write_text('outside_interface = "wan0"\n\nfilter = "x"\nmode = "kernel"\n')
    r = CliRunner().invoke(cli, ["run", "--config", str(p)])
    assert r.exit_code == 2
    assert "line 4: mode:" in r.output and "line 3: filter" in r.output


def test_rule_spec_carries_both_alias_ranges_and_hybrid_overlap_is_a_config_error(
    tmp_path: Path,
) -> None:
    from tests.config_text import with_required
    from vpnmasq.config import ConfigError, load_config

    spec = daemon.rule_spec(config(tmp_path, mode="hybrid"), None)
    assert spec.alias_ranges == ((61000, 65535), (600, 1023)) and spec.low_port_range == (600, 1023)
    # userspace mode's "auto" pool (a default system: every port >= 1024 but 32768-60999)
    spec = daemon.rule_spec(config(tmp_path), None)
    assert spec.alias_ranges == ((1024, 32767), (61000, 65535), (600, 1023))
    assert spec.public_address is None  # follow the interface: "an address of wan0"
    with pytest.raises(ConfigError, match="line 4: low_port_range: .* overlaps kernel_port_range"):
        load_config(with_required('kernel_port_range = "1000-60999"\nlow_port_range = "600-1023"\n'))
    load_config(with_required('mode = "userspace"\nkernel_port_range = "1000-60999"\n'))


# ------------------------------------------------------------------------------ port pool
PROC_TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   2: 0B004D0A:D431 0500004D:0050 01 00000000:00000000 00:00000000 00000000  1000
"""
PROC_TCP6 = """  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A
"""
PROC_UDP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
  1: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000   104
  2: 0100007F:2EE0 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0
"""


def test_listening_ports_and_the_ephemeral_range_are_read_from_proc(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(PROC_TCP)
    (tmp_path / "tcp6").write_text(PROC_TCP6)
    (tmp_path / "udp").write_text(PROC_UDP)  # udp6 missing: adds nothing
    # 22 and 8080 listen, 3000 on IPv6, 5353 bound; the connected TCP and UDP sockets' ports
    # (54321, 12000) are clients', not services
    assert daemon.listening_ports(str(tmp_path)) == {22, 8080, 3000, 5353}
    rng = tmp_path / "ip_local_port_range"
    rng.write_text("40000\t50000\n")
    assert daemon.read_local_port_range(str(rng)) == (40000, 50000)
    rng.write_text("junk\n")
    assert daemon.read_local_port_range(str(rng)) is None
    assert daemon.read_local_port_range(str(tmp_path / "missing")) is None


def test_every_bound_port_is_read_from_proc_in_any_state(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(PROC_TCP)
    (tmp_path / "tcp6").write_text(PROC_TCP6)
    (tmp_path / "udp").write_text(PROC_UDP)
    assert daemon.bound_ports(6, str(tmp_path)) == {22, 8080, 54321, 3000}  # connected too
    assert daemon.bound_ports(17, str(tmp_path)) == {5353, 12000}
    assert daemon.bound_ports(17, str(tmp_path / "missing")) == set()


def test_a_port_the_daemon_may_not_bind_is_looked_up_in_proc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe binds 0.0.0.0:port; where that is refused (a low port without
    CAP_NET_BIND_SERVICE, as in the shipped unit) /proc/net answers instead."""
    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        assert daemon.local_port_bound(17, port) and not daemon.local_port_bound(6, port)

        class Refused(socket.socket):
            def bind(self, address: object) -> None:
                raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(daemon.socket, "socket", Refused)
        monkeypatch.setattr(daemon, "bound_ports", lambda proto: {port} if proto == 17 else set())
        assert daemon.local_port_bound(17, port) and not daemon.local_port_bound(6, port)
    finally:
        held.close()


def test_the_gateway_hands_the_engine_and_the_rules_the_discovered_pool(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, calls: list[str], logs: Records
) -> None:
    monkeypatch.setattr(daemon, "read_local_port_range", lambda: (40000, 60999))
    monkeypatch.setattr(daemon, "listening_ports", lambda: {22, 8080})
    specs: list[Any] = []
    monkeypatch.setattr(daemon.rules, "install", specs.append)
    monkeypatch.setattr(daemon, "NfQueue", lambda *a, **kw: FakeQueue())
    monkeypatch.setattr(daemon, "ControlServer", _NoControl)
    gw = daemon.Gateway(config(tmp_path))
    assert gw.engine.pool is gw.pool and gw.pool.ranges == ((1024, 8079), (8081, 39999), (61000, 65535))
    gw.start()
    assert specs[0].alias_ranges == gw.pool.alias_ranges
    started = logs.text()
    assert f"port pool: {gw.pool.size} ports (1024-8079, 8081-39999, 61000-65535; auto" in started
    assert f"per host: {(gw.pool.size + 424) // 4} ports, 16383 ICMP ids, 25000 entries, 500 new" in started
    # a host at its limit: one warning, counted per host in status and the counters
    eng = gw.engine
    for i in range(600):
        eng.handle(build_udp(PRV1, EXT, 10000 + i, 53), OUT, 5.0)
    for ev in eng.drain_events():
        gw.rl.event(ev, 5.0)
    limited = [m for lvl, m in logs.lines if "hit its rate limit" in m]
    assert len(limited) == 1 and limited[0].startswith("host 10.77.0.11 hit its rate limit")
    assert not any(m.startswith("drop host-limit") for _, m in logs.lines)
    gw.stop()  # the queue's own counters go with it; the engine's stay
    c = gw._counters()
    assert c["host_limit:10.77.0.11:rate"] == 100 and c["port_pool_size"] == gw.pool.size


def test_metrics_export_host_limit_drops_per_host_and_the_pool_size() -> None:
    from prometheus_client import generate_latest

    from vpnmasq import metrics

    counters = {"host_limit:10.77.0.11:rate": 7, "host_limit:10.77.0.12:ports": 2,
                "port_pool_size": 36280}
    reg = metrics.registry_for(lambda: counters, dict, max_entries=200_000)
    text = generate_latest(reg).decode()
    fam = "vpnmasq_host_limit_dropped_packets_total"
    assert f'{fam}{{host="10.77.0.11",limit="rate"}} 7.0' in text
    assert f'{fam}{{host="10.77.0.12",limit="ports"}} 2.0' in text
    assert "vpnmasq_port_pool_ports 36280.0" in text
    assert "vpnmasq_host_limit" not in text.replace(fam, "")  # no fallback name


class FloodQueue(FakeQueue):
    """A queue that is never empty (a flood): every receive returns a full batch of one UDP
    flow's datagrams, outbound; verdicts are counted."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__()
        self._pair[1].send(b"x")  # readable for select
        self.packets = bytes(build_udp(PRV1, EXT, 40000, 7777, b"flood"))
        self.next_id = 1
        self.verdicts = 0

    def recv_batch(self, n: int = 256) -> list[QueuedPacket]:
        out = []
        for _ in range(n):
            p = self.packets
            out.append(QueuedPacket(self.next_id, int(Hook.POST_ROUTING), 0x0800, p, len(p), len(p)))
            self.next_id += 1
        return out

    def accept(self, pid: object, payload: object = None, mark: object = None) -> None:
        self.verdicts += 1

    drop = accept


def test_a_flood_does_not_keep_the_loop_from_its_other_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, calls: list[str]
) -> None:
    """With the queue never empty, one step still ends after QUEUE_SLICE_S and goes on to
    timers, events and the offload (which would otherwise leave a flooding flow in the slow
    path for as long as the flood lasts)."""
    q = FloodQueue()
    monkeypatch.setattr(daemon, "NfQueue", lambda *a, **kw: q)
    monkeypatch.setattr(daemon, "ControlServer", _NoControl)
    monkeypatch.setattr(daemon, "QUEUE_SLICE_S", 0.05)
    gw = daemon.Gateway(config(tmp_path, offload=True))
    gw.start()
    offloaded: list[float] = []
    assert gw.offloader is not None
    monkeypatch.setattr(gw.offloader, "quick", lambda now: offloaded.append(now))
    monkeypatch.setattr(gw.offloader, "sync", lambda eng, now: daemon.offload.SyncReport())
    gw.step(0.0)
    assert q.verdicts >= 256 and offloaded  # the step ended, and the offload had its turn
    gw.stop()
