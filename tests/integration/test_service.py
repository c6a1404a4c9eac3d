"""``vpnmasq run`` as a systemd service, in a namespace lab, without systemd: the test plays
the service manager. It listens on the NOTIFY_SOCKET it gives the daemon (READY=1 only once
the rules are installed and the queue is bound, WATCHDOG=1 from the loop, STATUS= with the
mapping count, RELOADING=1 around a SIGHUP reload), hands it a JOURNAL_STREAM (priority
prefixes), and starts it before its outside interface is up (it waits, then becomes ready).

The reload test keeps a transcript (notify messages and log lines) for the issue note:
``VPNMASQ_TRANSCRIPT=FILE``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    Daemon,
    Remote,
    esp_exchange,
    gw_run,
    iptables_save,
    ours_installed,
    udp_echo,
    wait_for,
)

from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns


class Manager:
    """The service manager's end of NOTIFY_SOCKET (a path: abstract names are per network
    namespace, and the daemon runs in the gateway's)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.s.bind(self.path)
        self.s.setblocking(False)
        self.got: list[tuple[float, dict[str, str]]] = []

    def poll(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.s.recv(4096).decode()
            except BlockingIOError:
                return [m for _, m in self.got]
            self.got.append((time.monotonic(), dict(ln.split("=", 1) for ln in data.splitlines())))

    def wait(self, key: str, value: str | None = None, after: int = 0) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            for m in self.poll()[after:]:
                if key in m and (value is None or m[key] == value):
                    return m
            return None

        return wait_for_value(found, f"{key}={value or '*'} on NOTIFY_SOCKET")

    def close(self) -> None:
        self.s.close()


def wait_for_value(cond, what: str):  # type: ignore[no-untyped-def]
    box: list[object] = []

    def check() -> bool:
        v = cond()
        if v is not None:
            box.append(v)
            return True
        return False

    wait_for(check, what)
    return box[0]


@pytest.fixture
def manager(workdir: Path) -> Iterator[Manager]:
    m = Manager(workdir / "notify")
    try:
        yield m
    finally:
        m.close()


def queue_bound(topo: Topology) -> bool:
    text = gw_run(topo, "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    return any(line.split()[:1] == ["0"] for line in text.splitlines())


def test_ready_watchdog_status_and_reload(
    topo: Topology, remote: Remote, workdir: Path, manager: Manager
) -> None:
    env = {"NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": "1000000"}
    d = Daemon(topo, "userspace", workdir, env=env).start(wait=False)
    try:
        ready = manager.wait("READY", "1")
        # READY=1 comes after the rules and the bound queue, never before
        assert ours_installed(topo) and queue_bound(topo)
        assert ready["STATUS"].startswith("0 mappings") and ready["MAINPID"]
        d.wait_ready()
        n = len(manager.poll())
        manager.wait("WATCHDOG", "1", after=n)  # from the loop, every 0.5 s here
        manager.wait("WATCHDOG", "1", after=len(manager.poll()))
        assert udp_echo(topo, "h1") and udp_echo(topo, "h2")
        manager.wait("STATUS", "2 mappings; public address 198.51.100.1; mode userspace")
        kept = [e for e in d.entries("udp") if e["inside"].startswith("10.77.0.11:")]

        # reload: h2 (.12) leaves the inside networks, h1 (.11) stays; a forward appears
        before = len(manager.poll())
        d.write_config(
            d.extra + '[[forward]]\nprotocol = "udp"\nport = 5353\nto = "10.88.0.5"\n'
        )
        text = d.config_path.read_text().replace('"10.77.0.0/24"', '"10.77.0.8/30"')
        d.config_path.write_text(text)
        d.send(signal.SIGHUP)
        manager.wait("RELOADING", "1", after=before)
        manager.wait("READY", "1", after=before)
        wait_for(lambda: "configuration reloaded" in d.log(), "the reload line")
        line = next(ln for ln in d.log().splitlines() if "configuration reloaded" in ln)
        assert "(changed: inside_networks, forwards)" in line
        assert "1 entries kept, 1 removed (not-inside 1)" in line
        after = d.entries("udp")
        assert [e["inside"] for e in after] == [e["inside"] for e in kept]
        assert [e["outside"] for e in after] == [e["outside"] for e in kept]  # same mapping
        save = iptables_save(topo)
        assert "-s 10.77.0.8/30 -o wan0 -j VPNMASQ_OUT" in save and "10.77.0.0/24" not in save
        assert "--dport 5353" in save  # the new forward is owned
        assert udp_echo(topo, "h1")

        # a broken file is refused; everything stays as it was
        before = len(manager.poll())
        good = d.config_path.read_text()
        d.config_path.write_text(good.replace('"10.77.0.8/30"', '"10.77.0.8/30",'))
        d.config_path.write_text(good.replace("inside_networks = [", "inside_networks = [["))
        d.send(signal.SIGHUP)
        manager.wait("READY", "1", after=before)
        wait_for(lambda: "reload refused" in d.log(), "the refusal")
        assert "-s 10.77.0.8/30 -o wan0 -j VPNMASQ_OUT" in iptables_save(topo)
        assert udp_echo(topo, "h1")
        transcript(d, manager)
        assert d.stop() == 0
        assert manager.wait("STOPPING", "1")
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def transcript(d: Daemon, manager: Manager) -> None:
    out = os.environ.get("VPNMASQ_TRANSCRIPT")
    if not out:
        return
    t0 = manager.got[0][0] if manager.got else 0.0
    with open(out, "a", encoding="utf-8") as f:
        f.write("--- NOTIFY_SOCKET (seconds since the first message) ---\n")
        for t, m in manager.got:
            if m.get("WATCHDOG"):
                continue
            f.write(f"{t - t0:7.3f}  " + " ".join(f"{k}={v}" for k, v in m.items()) + "\n")
        f.write("--- log ---\n")
        keep = re.compile(r"rules installed|running|reload|refused|stopped|mappings")
        f.writelines(ln + "\n" for ln in d.log().splitlines() if keep.search(ln))


def test_journal_stream_gets_priority_prefixes(topo: Topology, workdir: Path) -> None:
    log = workdir / "daemon-0.log"
    log.write_bytes(b"")  # the harness truncates it in place: same device and inode
    st = os.stat(log)
    d = Daemon(topo, "hybrid", workdir, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    d.start()
    try:
        lines = [ln for ln in d.log().splitlines() if ln]
        assert lines and all(re.match(r"<[0-7]>", ln) for ln in lines), lines[:5]
        assert not any("vpnmasq[" in ln for ln in lines)
        assert any(ln.startswith("<6>vpnmasq running") for ln in lines)
    finally:
        assert d.stop() == 0


def test_a_down_or_missing_outside_interface_is_waited_for(
    topo: Topology, remote: Remote, workdir: Path, manager: Manager
) -> None:
    assert gw_run(topo, "ip", "link", "set", "wan0", "down").returncode == 0
    d = Daemon(topo, "hybrid", workdir, env={"NOTIFY_SOCKET": manager.path})
    d.start(wait=False)
    try:
        wait_for(lambda: "waiting for it" in d.log(), "the daemon to say it waits")
        assert "outside_interface wan0 is down" in d.log()
        assert manager.wait("STATUS", "waiting for wan0 (down)")
        assert d.proc is not None and d.proc.poll() is None
        assert not ours_installed(topo) and "READY" not in str(manager.poll())
        assert gw_run(topo, "ip", "link", "set", "wan0", "up").returncode == 0
        manager.wait("READY", "1")
        assert ours_installed(topo)
        assert udp_echo(topo, "h1")
        assert d.log().count("waiting for it") == 1  # logged once
    finally:
        assert d.stop() == 0

    # a missing one: waits too, and a stop while waiting leaves nothing behind
    d.write_config(d.extra)
    d.config_path.write_text(d.config_path.read_text().replace('"wan0"', '"wan9"'))
    d.start(wait=False)
    wait_for(lambda: "outside_interface wan9 is missing" in d.log(), "the wait for wan9")
    assert "interfaces: " in d.log() and "wan0" in d.log().split("interfaces: ")[1]
    assert d.stop() == 0
    assert not ours_installed(topo)


#: what the unit grants (DynamicUser, AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW), minus
#: systemd: another uid, no groups, exactly these two capabilities, inherited by nft,
#: iptables-restore and sysctl
UNPRIVILEGED = [
    "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
    "--inh-caps=-all,+net_admin,+net_raw", "--ambient-caps=+net_admin,+net_raw",
    "--bounding-set=-all,+net_admin,+net_raw", "--",
]  # fmt: skip
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13


def test_runs_as_an_unprivileged_user_with_two_capabilities(
    topo: Topology, remote: Remote, workdir: Path
) -> None:
    os.chmod(workdir, 0o777)  # the unit's RuntimeDirectory belongs to the service user
    d = Daemon(topo, "userspace", workdir, command=[*UNPRIVILEGED, sys.executable, "-m", "vpnmasq.cli"])
    d.start()
    try:
        assert d.proc is not None
        pid = gw_run(topo, "pgrep", "-f", "-n", f"vpnmasq.cli run -c {d.config_path}").stdout.split()
        status = Path(f"/proc/{pid[0]}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s", status, re.M), status
        cap_eff = int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M).group(1), 16)  # type: ignore[union-attr]
        assert cap_eff == (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
        # rules, queue, accept_local for hairpinning (userspace mode hairpins every mapping)
        assert ours_installed(topo) and queue_bound(topo)
        assert gw_run(topo, "sysctl", "-n", "net.ipv4.conf.lan0.accept_local").stdout.strip() == "1"
        assert udp_echo(topo, "h1") and esp_exchange(topo, "h2", 0x1001)
        # a firewall change is noticed and repaired without root as well
        assert gw_run(topo, "nft", "delete", "table", "ip", "vpnmasq").returncode == 0
        wait_for(lambda: "re-installed in" in d.log(), "the rules re-installed")
        assert udp_echo(topo, "h1")
        d.config_path.write_text(d.config_path.read_text() + "[timeouts]\nudp = 600\n")
        d.send(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in d.log(), "the reload")
    finally:
        assert d.stop() == 0, d.log()[-2000:]
    assert not ours_installed(topo)
    assert gw_run(topo, "sysctl", "-n", "net.ipv4.conf.lan0.accept_local").stdout.strip() == "0"
