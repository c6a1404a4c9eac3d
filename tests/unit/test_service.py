"""Behaving like a Linux service, without systemd as PID 1: the sd_notify datagrams against a
NOTIFY_SOCKET the test listens on (a path and an abstract name), the watchdog pace, journal
priority prefixes, and the reload (SIGHUP) of a running Gateway: new config applied with the
table kept and the removed entries reported in one line, a broken or restart-only change
refused with the old configuration in force."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.packets import EXT, OUT, PRV1, PRV2, accepted, build_udp
from tests.unit.conftest import Records
from vpnmasq import daemon, reload
from vpnmasq.config import Config, load_config
from vpnmasq.datapath import sdnotify


# ------------------------------------------------------------------------------ sd_notify
@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """(NOTIFY_SOCKET value, the listening socket) as systemd would set it up."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify")
        s.bind(name)
    else:
        name = "@vpnmasq-test-" + os.urandom(6).hex()
        s.bind("\0" + name[1:])
    s.settimeout(2.0)
    try:
        yield name, s
    finally:
        s.close()


def messages(s: socket.socket) -> list[dict[str, str]]:
    out = []
    s.setblocking(False)
    try:
        while True:
            data = s.recv(4096).decode()
            out.append(dict(line.split("=", 1) for line in data.splitlines()))
    except BlockingIOError:
        return out
    finally:
        s.settimeout(2.0)


def test_ready_status_reloading_stopping_reach_the_socket(
    notify_socket: tuple[str, socket.socket],
) -> None:
    name, listener = notify_socket
    n = sdnotify.Notifier({"NOTIFY_SOCKET": name})
    assert n.enabled
    n.ready("3 mappings")
    n.status("4 mappings")
    n.reloading(123456)
    n.stopping()
    n.close()
    assert messages(listener) == [
        {"READY": "1", "STATUS": "3 mappings", "MAINPID": str(os.getpid())},
        {"STATUS": "4 mappings"},
        {"RELOADING": "1", "MONOTONIC_USEC": "123456"},
        {"STOPPING": "1"},
    ]


def test_watchdog_pings_at_half_the_interval_and_only_for_our_pid(
    notify_socket: tuple[str, socket.socket],
) -> None:
    name, listener = notify_socket
    env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    n = sdnotify.Notifier(env)
    assert n.watchdog_interval == 10.0
    for now in (100.0, 101.0, 109.9, 110.0, 115.0, 120.5):
        n.watchdog(now)
    assert messages(listener) == [{"WATCHDOG": "1"}] * 3  # at 100, 110, 120.5
    assert n.next_watchdog() == 130.5
    other = sdnotify.Notifier({**env, "WATCHDOG_PID": "1"})  # meant for another process
    assert other.watchdog_interval is None and other.next_watchdog() is None


def test_without_notify_socket_everything_is_a_noop() -> None:
    n = sdnotify.Notifier({})
    assert not n.enabled and not n.send(READY=1)
    n.ready("x")
    n.watchdog(1.0)
    assert n.next_watchdog() is None


# ------------------------------------------------------------------------------ journal
@pytest.mark.parametrize(
    ("level", "prio"),
    [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
     (logging.CRITICAL, 2)],
)  # fmt: skip
def test_journal_lines_carry_the_priority_and_no_name_or_pid(level: int, prio: int) -> None:
    rec = logging.LogRecord("vpnmasq", level, __file__, 1, "drop %s", ("x",), None)
    assert sdnotify.JournalFormatter("%(message)s").format(rec) == f"<{prio}>drop x"


def test_a_multi_line_message_keeps_its_priority_on_every_line() -> None:
    rec = logging.LogRecord("vpnmasq", logging.ERROR, __file__, 1, "a\nb", (), None)
    assert sdnotify.JournalFormatter("%(message)s").format(rec) == "<3>a\n<3>b"


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert sdnotify.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
        assert not sdnotify.stderr_is_journal({"JOURNAL_STREAM": "1:2"}, f.fileno())
        assert not sdnotify.stderr_is_journal({}, f.fileno())
        assert not sdnotify.stderr_is_journal({"JOURNAL_STREAM": "junk"}, f.fileno())


# ------------------------------------------------------------------------------ reload (pure)
BASE = """outside_interface = "wan0"
inside_networks = ["10.77.0.0/24"]
mode = "userspace"
public_address = "198.51.100.1"
control_socket = "/tmp/vpnmasq-unit/ctl.sock"
"""


def test_changed_keys_and_what_needs_a_restart() -> None:
    old = load_config(BASE)
    new = load_config(BASE.replace("10.77.0.0/24", "10.78.0.0/24") + "queue_num = 3\n")
    assert reload.changed_keys(old, new) == ["inside_networks", "queue_num"]
    assert reload.restart_needed(old, new) == ["queue_num"]
    assert reload.restart_needed(old, load_config(BASE + "[timeouts]\nudp = 600\n")) == []


# ------------------------------------------------------------------------------ reload (Gateway)
@pytest.fixture
def gw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[daemon.Gateway]:
    """A Gateway with two LAN hosts' UDP mappings, the rules replaced by a recorder, and a
    NOTIFY_SOCKET the test reads."""
    replaced: list[Any] = []
    monkeypatch.setattr(daemon.rules, "replace", lambda spec: replaced.append(spec))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    path = tmp_path / "vpnmasq.toml"
    text = BASE.replace("/tmp/vpnmasq-unit", str(tmp_path)).replace(
        '["10.77.0.0/24"]', '["10.77.0.0/24", "10.88.0.0/24"]'
    )
    path.write_text(text)
    g = daemon.Gateway(
        load_config(text),
        config_path=str(path),
        notifier=sdnotify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}),
    )
    g.spec = daemon.rule_spec(g.config, g.config.public_address)
    for host in (PRV1, PRV2):
        accepted(g.engine.handle(build_udp(host, EXT, 5000, 53), OUT, 1.0))
    monkeypatch.setattr(daemon.time, "monotonic", lambda: 2.0)  # the reload, a second later
    g.replaced = replaced  # type: ignore[attr-defined]
    g.listener = listener  # type: ignore[attr-defined]
    try:
        yield g
    finally:
        listener.close()


def rewrite(gw: daemon.Gateway, old: str, new: str) -> None:
    assert gw.config_path is not None
    p = Path(gw.config_path)
    p.write_text(p.read_text().replace(old, new))


def test_reload_applies_the_new_networks_keeps_the_table_and_reports_removals(
    gw: daemon.Gateway, logs: Records
) -> None:
    engine_before = gw.engine
    rewrite(gw, '["10.77.0.0/24", "10.88.0.0/24"]', '["10.77.0.0/25", "10.88.0.0/24"]')
    Path(str(gw.config_path)).write_text(Path(str(gw.config_path)).read_text() + "[timeouts]\nudp = 900\n")
    assert gw.reload_config()
    # 10.77.0.11 and .12 are still inside (/25): both mappings kept, in a new engine
    assert gw.engine is not engine_before and len(gw.engine.table) == 2
    assert gw.config.timeouts.udp == 900 and gw.config.inside_networks[0] == "10.77.0.0/25"
    assert gw.spec is not None and gw.spec.inside_networks[0] == "10.77.0.0/25"
    assert gw.replaced == [gw.spec]  # type: ignore[attr-defined]
    msg = [m for _, m in logs.lines if m.startswith("configuration reloaded")]
    assert msg == [
        f"configuration reloaded from {gw.config_path} (changed: inside_networks, timeouts): "
        "2 entries kept, 0 removed (none)"
    ]
    rewrite(gw, '"10.77.0.0/25"', '"10.77.0.0/29"')  # .11 and .12 are out now
    assert gw.reload_config()
    assert len(gw.engine.table) == 0
    assert (logging.WARNING, f"configuration reloaded from {gw.config_path} (changed: "
            "inside_networks): 0 entries kept, 2 removed (not-inside 2)") in logs.lines  # fmt: skip
    ms = messages(gw.listener)  # type: ignore[attr-defined]
    assert [m.get("RELOADING") for m in ms] == ["1", None, "1", None]
    assert ms[-1]["READY"] == "1" and ms[-1]["STATUS"].startswith("0 mappings")


def test_reload_applies_new_limits_and_forwards(gw: daemon.Gateway, logs: Records) -> None:
    p = Path(str(gw.config_path))
    p.write_text(
        p.read_text()
        + '[limits]\nmax_entries_per_host = 1\nmax_entries = 1\n'
        + '[[forward]]\nprotocol = "tcp"\nport = 8443\nto = "10.77.0.5"\n'
    )
    assert gw.reload_config()
    assert len(gw.engine.table) == 1 and gw.engine.table.max_entries == 1
    assert gw.spec is not None and ("tcp", 8443) in gw.spec.forwards
    assert any(
        m.endswith("(changed: limits, forwards): 1 entries kept, 1 removed (table-full 1)")
        for _, m in logs.lines
    ), logs.text()


def test_a_broken_file_is_refused_and_the_running_configuration_stays(
    gw: daemon.Gateway, logs: Records
) -> None:
    before, engine = gw.config, gw.engine
    rewrite(gw, 'inside_networks = ["10.77.0.0/24", "10.88.0.0/24"]', "inside_networks = [")
    assert not gw.reload_config()
    assert gw.config is before and gw.engine is engine and len(engine.table) == 2
    assert gw.replaced == []  # type: ignore[attr-defined]
    errors = [m for lvl, m in logs.lines if lvl == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith(f"reload refused, the running configuration stays: {gw.config_path}: line 2")
    ms = messages(gw.listener)  # type: ignore[attr-defined]
    assert ms[0]["RELOADING"] == "1" and ms[-1]["READY"] == "1"


def test_a_change_only_a_restart_can_make_is_refused(gw: daemon.Gateway, logs: Records) -> None:
    before = gw.config
    rewrite(gw, 'mode = "userspace"', 'mode = "hybrid"')
    assert not gw.reload_config()
    assert gw.config is before and gw.replaced == []  # type: ignore[attr-defined]
    assert any("mode changed" in m and "restart" in m for _, m in logs.lines)


def test_an_unchanged_file_changes_nothing(gw: daemon.Gateway, logs: Records) -> None:
    engine = gw.engine
    assert gw.reload_config()
    assert gw.engine is engine and gw.replaced == []  # type: ignore[attr-defined]
    assert any(m.endswith("unchanged") for _, m in logs.lines)


def test_a_reload_keeps_counters_and_config_objects_compare_by_value() -> None:
    a, b = load_config(BASE), load_config(BASE)
    assert a == b and reload.changed_keys(a, b) == []
    assert isinstance(a, Config)
