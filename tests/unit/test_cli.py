"""The vpnmasq command line, through click's CliRunner (no root, no daemon)."""

from __future__ import annotations

import contextlib
import json
import select
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from tests.waiting import wait_until
from vpnmasq import cli as cli_mod
from vpnmasq.cli import cli
from vpnmasq.config import Config
from vpnmasq.datapath.control import ControlServer
from vpnmasq.events import Row
from vpnmasq.status import status_payload

GOOD = """\
outside_interface = "wan0"
inside_networks = ["10.77.0.0/24"]
mode = "hybrid"                     # or "userspace"
[[forward]]                         # publish a PPTP server on the LAN
protocol = "tcp"
port = 1723
to = "10.77.0.5"
[[forward]]
protocol = "gre"
to = "10.77.0.5"
"""


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    p = tmp_path / "vpnmasq.toml"
    p.write_text(GOOD)
    return p


pytestmark = pytest.mark.usefixtures("no_host_config")


# ------------------------------------------------------------------------------ help
def test_help_lists_the_commands() -> None:
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("run", "check-config", "status", "events", "top", "flush", "replay", "demo",
                "diagnose", "trace"):
        assert f"  {cmd} " in r.output
    assert "VPNMASQ_" in r.output


def _all_options(group: click.Group) -> Iterator[tuple[str, click.Option]]:
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name not in ("help", "version"):
                yield name, p


def test_every_option_has_an_envvar_and_says_so() -> None:
    opts = list(_all_options(cli))
    assert len(opts) >= 10
    for cmd, opt in opts:
        assert isinstance(opt.envvar, str) and opt.envvar.startswith("VPNMASQ_"), (cmd, opt.name)
        assert f"[env: {opt.envvar}]" in (opt.help or ""), (cmd, opt.name)


def test_version() -> None:
    r = invoke("--version")
    assert r.exit_code == 0 and "vpnmasq" in r.output


# ------------------------------------------------------------------------------ check-config
def test_check_config_ok(good: Path) -> None:
    r = invoke("check-config", "--offline", str(good))
    assert r.exit_code == 0
    assert r.output == f"OK: {good}\n"


def test_check_config_error_names_key_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('mode = "hybrid"\n[timeouts]\nudp = 300\nudpp = 5\n[[forward]]\nprotocol = "x"\n')
    r = invoke("check-config", "--offline", str(p))
    assert r.exit_code == 1
    assert (
        f"{p}: line 4: timeouts.udpp: unknown key 'udpp' in [timeouts] (did you mean 'udp'?)"
        in (r.output)
    )
    assert f"{p}: line 6: forward[1].protocol:" in r.output
    assert "OK" not in r.output


def test_check_config_warnings_still_ok(tmp_path: Path) -> None:
    p = tmp_path / "w.toml"
    p.write_text(GOOD + "[timeouts]\nudp = 60\n")
    r = invoke("check-config", "--offline", str(p))
    assert r.exit_code == 0
    assert f"warning: {p}: line 12: timeouts.udp: 60 s is below the RFC 4787 REQ-5" in r.output
    assert r.output.endswith(f"OK: {p} (1 warning)\n")


def test_check_config_file_from_env(good: Path) -> None:
    r = invoke("check-config", "--offline", env={"VPNMASQ_CONFIG": str(good)})
    assert r.exit_code == 0 and "OK:" in r.output


def test_check_config_missing_file(tmp_path: Path) -> None:
    r = invoke("check-config", "--offline", str(tmp_path / "nope.toml"))
    assert r.exit_code == 1 and "cannot read" in r.output
    r = invoke("check-config", "--offline")  # no FILE: the default path (absent here)
    assert r.exit_code == 1 and f"cannot read {cli_mod.DEFAULT_CONFIG}" in r.output


def test_explain_alone_and_with_a_file(good: Path) -> None:
    r = invoke("check-config", "--explain")
    assert r.exit_code == 0
    assert "timeouts.udp  (seconds; default 300)" in r.output
    r = invoke("check-config", "--explain", "--markdown")
    assert "| `forward.to`" not in r.output and "| `to` | IPv4 address | `required` |" in r.output
    r = invoke("check-config", "--explain", "--offline", str(good))
    assert r.exit_code == 0 and r.output.endswith(f"OK: {good}\n")


# ------------------------------------------------------------------------------ status / flush
ROWS = [
    Row("udp", "10.77.0.11:40000", "198.51.100.1:61002", "203.0.113.9:53", "napt", 42.0, 1, 1),
    Row(
        "esp",
        "10.77.0.12",
        "198.51.100.1",
        "203.0.113.50",
        "ASSOCIATED",
        4000.0,
        5,
        5,
        500,
        500,
        {"spi_out": "0x1", "spi_in": "0x2", "assoc": "serialized"},
    ),
]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "ctl" / "control.sock")
    state = {"rows": list(ROWS)}

    def flush() -> int:
        n = len(state["rows"])
        state["rows"] = []
        return n

    server = ControlServer(
        path,
        status=lambda _req: status_payload(state["rows"], {"packets_out": 10}),
        counters=lambda: {"packets_out": 10},
        flush=flush,
    )
    with served(server):
        yield path


@contextlib.contextmanager
def served(server: ControlServer) -> Iterator[None]:
    """Answer ``server``'s requests from a thread until the block ends; then close it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if select.select([server.fileno()], [], [], 0.02)[0]:
                server.handle_ready()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)
        server.close()


def test_top_in_a_script_ends_its_lines_and_fails_without_a_daemon(
    daemon: str, tmp_path: Path
) -> None:
    r = invoke("top", "-n", "1", "--socket", daemon)
    assert r.exit_code == 0 and "10.77.0.11" in r.output and r.output.endswith("\n")
    r = invoke("top", "-n", "1", "--socket", str(tmp_path / "none.sock"))
    assert r.exit_code == 1 and "not running" in r.output and r.output.endswith("\n")


def test_status_table(daemon: str) -> None:
    r = invoke("status", "--socket", daemon)
    assert r.exit_code == 0
    assert r.output.splitlines()[0].startswith("PROTO")
    assert "10.77.0.11:40000" in r.output and "spi_out=0x1" in r.output
    assert "packets_out  10" in r.output


def test_status_filters_and_json(daemon: str) -> None:
    r = invoke("status", "--socket", daemon, "--proto", "esp", "--json")
    doc = json.loads(r.output)
    assert [e["inside"] for e in doc["entries"]] == ["10.77.0.12"]
    assert doc["total_entries"] == 2
    r = invoke("status", "--host", "10.77.0.11", env={"VPNMASQ_SOCKET": daemon})
    assert "10.77.0.11:40000" in r.output and "10.77.0.12" not in r.output
    assert "1 of 2 entries shown" in r.output


def test_status_socket_from_config_file(daemon: str, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD.split("[[forward]]")[0] + f'control_socket = "{daemon}"\n')
    r = invoke("status", env={"VPNMASQ_CONFIG": str(cfg)})
    assert r.exit_code == 0 and "2 entries" in r.output


def test_status_takes_the_socket_from_dash_c(daemon: str, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\n'
        f'control_socket = "{daemon}"\n'
    )
    r = invoke("status", "-c", str(cfg))
    assert r.exit_code == 0 and "2 entries" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("mode = 7\n")
    r = invoke("status", "-c", str(bad))
    assert r.exit_code == 1 and "bad.toml" in r.output


def test_status_sends_filters_and_limit_to_the_daemon(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl" / "control.sock")
    seen: list[dict[str, Any]] = []

    def status(req: Any) -> dict[str, Any]:
        seen.append(dict(req))
        return {**status_payload(ROWS[:1], {}), "total_entries": 9}

    with served(ControlServer(path, status=status, counters=dict, flush=lambda: 0)):
        r = invoke("status", "-s", path, "-p", "UDP", "-H", "10.77.0.0/24", "--limit", "3")
    assert r.exit_code == 0, r.output
    assert seen == [{"cmd": "status", "proto": "udp", "host": "10.77.0.0/24", "limit": 3}]
    assert "1 of 9 entries shown" in r.output


def test_status_json_when_not_running_prints_a_json_error(tmp_path: Path) -> None:
    r = invoke("status", "--json", "--socket", str(tmp_path / "none.sock"))
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and "not running" in doc["error"]


def test_status_bad_host_is_a_usage_error(daemon: str) -> None:
    r = invoke("status", "--socket", daemon, "--host", "10.77.0.300")
    assert r.exit_code == 2 and "not an IPv4 address or network" in r.output


def test_status_when_not_running(tmp_path: Path) -> None:
    r = invoke("status", "--socket", str(tmp_path / "none.sock"))
    assert r.exit_code == 1
    assert "vpnmasq is not running (no socket at" in r.output


def test_flush(daemon: str) -> None:
    r = invoke("flush", "--socket", daemon)
    assert r.exit_code == 0 and r.output == "flushed 2 entries\n"
    assert "0 entries" in invoke("status", "--socket", daemon).output


# ------------------------------------------------------------------------------ run / demo
def test_run_calls_the_daemon(monkeypatch: pytest.MonkeyPatch, good: Path) -> None:
    seen: dict[str, Any] = {}

    def run(config: Config, *, handover: bool, config_path: str) -> int:
        seen.update(config=config, handover=handover, config_path=config_path)
        return 0

    fake = types.ModuleType("vpnmasq.daemon")
    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vpnmasq.daemon", fake)
    r = invoke("run", env={"VPNMASQ_CONFIG": str(good), "VPNMASQ_HANDOVER": "1"})
    assert r.exit_code == 0
    assert seen["handover"] is True and seen["config"].forwards[0].port == 1723
    assert seen["config_path"] == str(good)  # re-read on SIGHUP


def test_run_refuses_a_bad_config(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("mode = 1\n")
    r = invoke("run", "--config", str(p))
    assert r.exit_code == 2 and "line 1: mode:" in r.output


def test_run_without_daemon_module(monkeypatch: pytest.MonkeyPatch, good: Path) -> None:
    monkeypatch.setitem(sys.modules, "vpnmasq.daemon", None)
    r = invoke("run", "--config", str(good))
    assert r.exit_code == 1 and "no daemon" in r.output


def test_demo_passes_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("vpnmasq_lab.demo")

    def main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vpnmasq_lab.demo", fake)
    r = invoke("demo", "--hosts", "3", "--help")
    assert r.exit_code == 3 and seen == [["--hosts", "3", "--help"]]


def test_demo_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vpnmasq_lab.demo", None)
    r = invoke("demo")
    assert r.exit_code == 1 and "lab demo is not installed" in r.output and "vpnmasq-lab" in r.output


# ------------------------------------------------------------------------------ replay
def test_replay_needs_public_address(good: Path, tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.utils import wrpcap

    wrpcap(
        str(tmp_path / "in.pcap"), [IP(src="10.77.0.11", dst="203.0.113.9") / UDP()], linktype=101
    )
    r = invoke("replay", "-c", str(good), str(tmp_path / "in.pcap"), str(tmp_path / "out.pcap"))
    assert r.exit_code == 1 and "needs public_address" in r.output
    r = invoke(
        "replay", "-c", str(good), "--public-address", "10.77.0.1",
        str(tmp_path / "in.pcap"), str(tmp_path / "out.pcap"),
    )  # fmt: skip
    assert r.exit_code == 2 and "inside the inside network" in r.output


def test_replay_end_to_end(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap, wrpcap

    cfg = tmp_path / "lab.toml"
    cfg.write_text(
        'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\nmode = "userspace"\n'
        "helpers = []\n"
    )
    pkts = [
        IP(src=h, dst="203.0.113.9") / UDP(sport=4000, dport=53)
        for h in ("10.77.0.11", "10.77.0.12")
    ]
    wrpcap(str(tmp_path / "in.pcap"), pkts, linktype=101)
    r = invoke(
        "replay", "-c", str(cfg), "--public-address", "198.51.100.1",
        str(tmp_path / "in.pcap"), str(tmp_path / "out.pcap"),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "replay summary" in r.output and "masquerade table at the end (2 entries)" in r.output
    out = rdpcap(str(tmp_path / "out.pcap"))
    assert {p[IP].src for p in out} == {"198.51.100.1"}
    assert len({p[UDP].sport for p in out}) == 2


def test_events_prints_the_stream_and_says_when_it_ends(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl" / "control.sock")
    wanted: list[dict[str, Any]] = []
    server = ControlServer(path, status=dict, counters=dict, flush=lambda: 0,
                           subscribe=lambda req: wanted.append(dict(req)) or (lambda item: True))
    item = {"event": "created", "kind": "udp", "proto": "udp", "inside": "10.77.0.11:5000",
            "outside": "198.51.100.1:5000", "remote": "203.0.113.9:53", "state": "napt",
            "time": 1.5}

    def daemon() -> None:  # the only thread that touches the server
        def subscribed() -> bool:
            if select.select([server.fileno()], [], [], 0.02)[0]:
                server.handle_ready()
            return server.subscribers() == 1

        wait_until(subscribed, what="the subscriber")
        server.publish([item, {**item, "inside": "10.77.0.11:5001"}])  # small: sent at once
        server.close()

    t = threading.Thread(target=daemon, daemon=True)
    t.start()
    r = invoke("events", "-s", path, "-p", "udp", "-H", "10.77.0.11")
    t.join(5)
    assert wanted == [{"cmd": "events", "proto": "udp", "host": "10.77.0.11"}]
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and "[NEW]" in lines[0] and "10.77.0.11:5000 -> 203.0.113.9:53" in lines[0]
    assert r.exit_code == 1 and "closed the event stream after 2 events" in r.stderr


@pytest.mark.parametrize(
    "sync, code",
    [
        (None, 1),  # no [sync]
        ({"role": "standby", "node": 1, "replica_synced": False}, 1),  # still waiting
        ({"role": "standby", "node": 1, "replica_synced": True}, 0),
        ({"role": "active", "node": 1, "replica_synced": False}, 0),
    ],
)
def test_sync_ready_exit_status_gates_keepalived(
    tmp_path: Path, sync: dict[str, object] | None, code: int
) -> None:
    path = str(tmp_path / "ctl" / "control.sock")

    def answer(_req: object) -> dict[str, object]:
        out = status_payload([], {})
        if sync is not None:
            out["sync"] = {"peer": "10.77.0.3:3790", "peer_seen_s_ago": 0.1, **sync}
        return out

    server = ControlServer(path, status=answer, counters=dict, flush=lambda: 0)
    with served(server):
        r = invoke("sync-ready", "--socket", path)
    assert r.exit_code == code, r.output
    assert ("sync: node 1" in r.output) == (sync is not None)


def test_sync_ready_fails_when_vpnmasq_is_not_running(tmp_path: Path) -> None:
    assert invoke("sync-ready", "--socket", str(tmp_path / "none.sock")).exit_code == 1


def test_events_help_names_the_removal_reasons_the_stream_sends() -> None:
    from vpnmasq import reload
    from vpnmasq.eventstream import REMOVAL_REASONS

    text = " ".join((cli.commands["events"].help or "").split())
    for word in {*REMOVAL_REASONS.values(), "fin-rst", reload.RELOAD_WHY}:
        assert word in text, word
