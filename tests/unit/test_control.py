"""Control socket: round trips over a real UNIX socket in a temporary directory."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import DEADLINE, wait_until
from vpnmasq import __version__
from vpnmasq.datapath import control
from vpnmasq.datapath.control import ControlError, ControlServer, query
from vpnmasq.events import Row
from vpnmasq.status import rows_from_wire, status_payload

ROWS = [Row("udp", "10.77.0.11:40000", "198.51.100.1:61002", "203.0.113.9:53", "napt", 42.0, 1, 1)]


class Daemon:
    """A stand-in for the daemon: callbacks plus a poll loop in a thread."""

    def __init__(self, path: str, **kw: Any) -> None:
        self.rows = list(ROWS)
        self.flushes = 0
        self.server = ControlServer(
            path,
            status=lambda _req: status_payload(self.rows, {"packets_out": 7}),
            counters=lambda: {"packets_out": 7},
            flush=self.flush,
            **kw,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def flush(self) -> int:
        self.flushes += 1
        n, self.rows = len(self.rows), []
        return n

    def _loop(self) -> None:
        fd = self.server.fileno()
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.02)
            if ready:
                self.server.handle_ready()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def server_clients(d: Daemon | ControlServer) -> int:
    """How many connections the server holds open."""
    server = d.server if isinstance(d, Daemon) else d
    return len(server._clients)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "vpnmasq" / "control.sock")


@pytest.fixture
def daemon(sock_path: str) -> Iterator[Daemon]:
    d = Daemon(sock_path)
    yield d
    d.stop()


def raw_exchange(path: str, data: bytes, *, shut: bool = True, lines: int = 1) -> list[Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    try:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused and closed before we wrote: the answer is still readable
    buf = b""
    while buf.count(b"\n") < lines:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return [json.loads(line) for line in buf.splitlines()]


# ------------------------------------------------------------------------------ round trips
def test_status_round_trip(daemon: Daemon, sock_path: str) -> None:
    resp = query(sock_path, "status")
    assert resp["ok"] is True
    assert rows_from_wire(resp["entries"]) == ROWS
    assert resp["counters"] == {"packets_out": 7}


def test_ping_counters_flush(daemon: Daemon, sock_path: str) -> None:
    ping = query(sock_path, "ping")
    assert ping["pid"] == os.getpid() and ping["version"] == __version__
    assert query(sock_path, "counters")["counters"] == {"packets_out": 7}
    assert query(sock_path, "flush")["flushed"] == 1
    assert daemon.flushes == 1
    assert query(sock_path, "status")["entries"] == []


def test_socket_is_root_only(daemon: Daemon, sock_path: str) -> None:
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock_path)).st_mode) == 0o700


def test_unknown_command_is_refused(daemon: Daemon, sock_path: str) -> None:
    with pytest.raises(ControlError, match=r"refused 'reboot': unknown command 'reboot'"):
        query(sock_path, "reboot")


def test_failing_callback_is_reported_not_raised(daemon: Daemon, sock_path: str) -> None:
    daemon.rows = [None]  # type: ignore[list-item]  # rows_to_wire will fail on this
    with pytest.raises(ControlError, match="status failed inside the daemon: AttributeError"):
        query(sock_path, "status")
    assert isinstance(daemon.server.last_error, AttributeError)
    assert query(sock_path, "ping")["ok"] is True  # still serving


def test_garbage_and_pipelined_requests(daemon: Daemon, sock_path: str) -> None:
    answers = raw_exchange(
        sock_path, b'not json\n{"cmd": "ping"}\n\n[1, 2]\n{"cmd": "counters"}', lines=4
    )
    assert [a["ok"] for a in answers] == [False, True, False, True]
    assert "not JSON" in answers[0]["error"]
    assert "unknown command None" in answers[2]["error"]
    assert answers[3]["counters"] == {"packets_out": 7}  # last request had no newline


def test_connection_stays_open_for_several_requests(daemon: Daemon, sock_path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sock_path)
    f = s.makefile("rwb")
    for _ in range(3):
        f.write(b'{"cmd": "ping"}\n')
        f.flush()
        assert json.loads(f.readline())["ok"] is True
    s.close()


def test_large_status_is_written_in_pieces(daemon: Daemon, sock_path: str) -> None:
    daemon.rows = [
        Row(
            "udp",
            f"10.77.{i // 250}.{i % 250}:4000",
            f"198.51.100.1:{1024 + i}",
            "203.0.113.9:53",
            "napt",
            30.0,
            i,
            i,
            100 * i,
            100 * i,
        )
        for i in range(20_000)
    ]
    resp = query(sock_path, "status", timeout=20)
    assert len(resp["entries"]) == 20_000
    assert resp["entries"][-1]["pkts_in"] == 19_999


def test_overlong_request_is_refused(daemon: Daemon, sock_path: str) -> None:
    answers = raw_exchange(sock_path, b"x" * (control.MAX_REQUEST + 10), shut=False)
    assert answers[0]["ok"] is False and "longer than" in answers[0]["error"]


def test_too_many_clients_are_turned_away(daemon: Daemon, sock_path: str) -> None:
    idle = []
    for _ in range(control.MAX_CLIENTS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        idle.append(s)
    # the kernel queues connections in order, so the server accepts all idle ones first
    wait_until(lambda: server_clients(daemon) == control.MAX_CLIENTS, what="16 accepted")
    answers = raw_exchange(sock_path, b'{"cmd": "ping"}\n')
    assert answers == [{"ok": False, "error": "too many control connections"}]
    # the CLI's client reports the daemon's reason, whether or not it got to write first
    with pytest.raises(ControlError, match="too many control connections"):
        query(sock_path, "ping")
    assert server_clients(daemon) == control.MAX_CLIENTS  # the refused ones were not kept
    for s in idle:
        s.close()
    # once the server has seen the idle clients go, a new client is served again
    wait_until(lambda: server_clients(daemon) == 0, what="the idle clients to be dropped")
    assert query(sock_path, "ping")["ok"] is True


def test_handle_ready_returns_at_once_when_idle(sock_path: str) -> None:
    # no serving thread here: a blocking accept/recv would hang the call below for ever
    server = ControlServer(sock_path, status=dict, counters=dict, flush=lambda: 0)
    try:
        done = threading.Event()
        t = threading.Thread(target=lambda: (server.handle_ready(), done.set()), daemon=True)
        t.start()
        assert done.wait(DEADLINE), "handle_ready blocked with nothing to do"
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(sock_path)  # a client that never writes: accepted, then not waited on
        try:
            wait_until(lambda: (server.handle_ready(), server_clients(server))[1] == 1)
            done.clear()
            t = threading.Thread(target=lambda: (server.handle_ready(), done.set()), daemon=True)
            t.start()
            assert done.wait(DEADLINE), "handle_ready blocked on a silent client"
        finally:
            idle.close()
    finally:
        server.close()


@pytest.mark.parametrize("line", [b"[" * 60000, b'{"a": ' * 9000, b'{"cmd": "events", "x": ' + b"[" * 60000])
def test_deeply_nested_json_is_refused_and_the_server_carries_on(sock_path: str, line: bytes) -> None:
    """A request nested deeper than the JSON decoder's recursion limit (well under
    MAX_REQUEST) is garbage like any other: answered with an error, never raised into the
    daemon's loop (which would stop the gateway)."""
    from vpnmasq.eventstream import EventFilter

    server = ControlServer(sock_path, status=dict, counters=dict, flush=lambda: 0,
                           subscribe=EventFilter.from_request)  # fmt: skip
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(DEADLINE)
    try:
        c.connect(sock_path)
        c.sendall(line + b'\n{"cmd": "ping"}\n')
        c.setblocking(False)
        got = bytearray()

        def answered() -> bool:
            server.handle_ready()  # in this thread: an exception fails the test
            with contextlib.suppress(BlockingIOError):
                got.extend(c.recv(65536))
            return got.count(b"\n") >= 2

        wait_until(answered, what="both answers")
        bad, ping = (json.loads(x) for x in bytes(got).splitlines())
        assert bad["ok"] is False and "not JSON" in bad["error"]
        assert ping["ok"] is True
    finally:
        c.close()
        server.close()


# ------------------------------------------------------------------------------ lifecycle
def test_not_running_message(sock_path: str) -> None:
    with pytest.raises(
        ControlError, match=r"vpnmasq is not running \(no socket at .*control\.sock\)"
    ):
        query(sock_path, "status")


def test_stale_socket_is_reported_then_replaced(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path), mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # the file stays: a crashed daemon
    with pytest.raises(ControlError, match="stale socket"):
        query(sock_path, "ping")
    d = Daemon(sock_path)
    try:
        assert query(sock_path, "ping")["ok"] is True
    finally:
        d.stop()
    assert not os.path.exists(sock_path)  # close() removes its own socket


def test_second_server_refused_unless_takeover(daemon: Daemon, sock_path: str) -> None:
    with pytest.raises(ControlError, match="already listening"):
        ControlServer(sock_path, status=dict, counters=dict, flush=lambda: 0)
    successor = Daemon(sock_path, takeover=True)
    try:
        successor.rows = []
        assert query(sock_path, "status")["entries"] == []  # new clients reach the successor
        daemon.stop()  # the old instance exits: must not remove the successor's socket
        assert os.path.exists(sock_path)
        assert query(sock_path, "ping")["ok"] is True
    finally:
        successor.stop()


def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("important")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(str(path), status=dict, counters=dict, flush=lambda: 0)
    assert path.read_text() == "important"


def test_permission_denied_message(monkeypatch: pytest.MonkeyPatch, sock_path: str) -> None:
    def deny(self: socket.socket, address: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", deny)
    with pytest.raises(ControlError, match=r"permission denied on .*control\.sock: .*root-only"):
        query(sock_path, "status")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unprivileged_user_is_denied(daemon: Daemon, sock_path: str) -> None:
    """A real EACCES: a child process as 'nobody' (uid 65534) asks the root-only socket."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                query(sock_path, "status")
                msg = "answered"
            except ControlError as e:
                msg = str(e)
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    msg = os.read(r, 4096).decode()
    os.close(r)
    assert msg.startswith("permission denied on ") or "not running" in msg, msg
    assert "answered" not in msg


def test_no_answer_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(1)
    try:
        with pytest.raises(ControlError, match="did not answer 'status' within 0.2 s"):
            query(path, "status", timeout=0.2)
    finally:
        mute.close()


# ------------------------------------------------------------------------------ streamed answers
def _lines(sock: socket.socket, server: ControlServer, n: int) -> list[Any]:
    """The next ``n`` lines ``sock`` gets from ``server`` (served from this thread)."""
    sock.setblocking(False)
    buf = b""

    def enough() -> bool:
        nonlocal buf
        server.handle_ready()
        try:
            buf += sock.recv(1 << 20)
        except BlockingIOError:
            pass
        return buf.count(b"\n") >= n

    wait_until(enough, what=f"{n} lines")
    return [json.loads(x) for x in buf.splitlines()]


def _pieces(n: int, log: list[int]) -> Iterator[bytes]:
    """A streamed status answer of ``n`` rows, one row per piece; ``log`` records progress."""
    yield b'{"ok":true,"entries":['
    for i in range(n):
        log.append(i)
        yield (b"," if i else b"") + json.dumps({"i": i, "pad": "x" * 200}).encode()
    yield b'],"total_entries":%d}\n' % n


def test_streamed_answer_is_produced_only_by_work(sock_path: str) -> None:
    """The server answers a streamed request only when the loop gives it time (work()),
    a bounded piece at a time; requests behind it on the connection wait their turn."""
    log: list[int] = []
    server = ControlServer(
        sock_path, status=lambda req: _pieces(int(req.get("limit", 3)), log),
        counters=lambda: {"n": 1}, flush=lambda: 0,
    )
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect(sock_path)
        c.sendall(b'{"cmd":"status","limit":5}\n{"cmd":"counters"}\n')
        wait_until(lambda: (server.handle_ready(), server.runnable())[1], what="job accepted")
        assert log == []  # nothing produced while the loop handles packets
        server.work(deadline=0.0)  # a deadline already passed: exactly one piece
        assert log == []  # that piece was the opening of the line
        while server.runnable():
            server.work(deadline=0.0)
        assert log == [0, 1, 2, 3, 4]
        first, second = _lines(c, server, 2)
        assert [e["i"] for e in first["entries"]] == [0, 1, 2, 3, 4]
        assert second == {"ok": True, "counters": {"n": 1}}
        c.close()
    finally:
        server.close()


def test_slow_reader_pauses_only_its_own_answer(sock_path: str) -> None:
    """A client that does not read: its answer stops at the high-water mark (runnable()
    turns false, the loop does not spin on it) and the others are still served."""
    log: list[int] = []
    server = ControlServer(
        sock_path, status=lambda req: _pieces(100_000, log), counters=lambda: {"n": 1},
        flush=lambda: 0,
    )
    try:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(sock_path)
        slow.sendall(b'{"cmd":"status"}\n')
        wait_until(lambda: (server.handle_ready(), server.runnable())[1], what="job accepted")
        for _ in range(100_000):
            if not server.runnable():
                break
            server.work(deadline=0.0)
        assert not server.runnable()
        produced = len(log)
        assert 0 < produced < 100_000
        (client,) = server._clients.values()
        assert len(client.outbuf) >= control.OUTPUT_HIGH_WATER
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.connect(sock_path)
        other.sendall(b'{"cmd":"ping"}\n')
        assert _lines(other, server, 1)[0]["ok"] is True
        assert len(log) == produced  # the paused answer did not move
        other.close()
        slow.close()
    finally:
        server.close()


def test_client_reads_a_big_streamed_answer(sock_path: str) -> None:
    """query() over a multi-megabyte answer produced between 'packet batches'."""
    log: list[int] = []
    server = ControlServer(
        sock_path, status=lambda req: _pieces(10_000, log), counters=dict, flush=lambda: 0
    )
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            timeout = 0.0 if server.runnable() else 0.02
            if select.select([server.fileno()], [], [], timeout)[0]:
                server.handle_ready()
            if server.runnable():
                server.work(time.monotonic() + 0.002)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        resp = query(sock_path, "status", params={"limit": 1}, timeout=DEADLINE)
        assert resp["total_entries"] == 10_000 and len(resp["entries"]) == 10_000
    finally:
        stop.set()
        t.join(5)
        server.close()


# ------------------------------------------------------------------------------ event stream
def _subscriber_server(sock_path: str) -> ControlServer:
    def subscribe(req: Any) -> Any:
        host = req.get("host")
        if host == "bad":
            raise ValueError("'bad' is not an IPv4 address or network")
        return lambda item: host is None or item.get("host") == host

    return ControlServer(sock_path, status=dict, counters=dict, flush=lambda: 0,
                         subscribe=subscribe)


def test_subscriber_gets_the_events_its_filter_takes(sock_path: str) -> None:
    server = _subscriber_server(sock_path)
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(sock_path)
        c.sendall(b'{"cmd":"events","host":"10.0.0.1"}\n')
        (hello,) = _lines(c, server, 1)
        assert hello == {"ok": True, "events": "streaming"} and server.subscribers() == 1
        server.publish([{"event": "a", "host": "10.0.0.1"}, {"event": "b", "host": "10.0.0.2"}])
        assert _lines(c, server, 1) == [{"event": "a", "host": "10.0.0.1"}]
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.connect(sock_path)
        bad.sendall(b'{"cmd":"events","host":"bad"}\n')
        assert _lines(bad, server, 1) == [
            {"ok": False, "error": "events: 'bad' is not an IPv4 address or network"}
        ]
        bad.close()
        c.close()
        wait_until(lambda: (server.handle_ready(), server.subscribers() == 0)[1],
                   what="the subscriber gone")
    finally:
        server.close()


def test_a_slow_subscriber_loses_events_and_is_told_how_many(sock_path: str) -> None:
    """publish() never blocks: a reader that does not read has its events dropped once its
    buffer is full, and a 'lost' line with the count comes when it catches up."""
    server = _subscriber_server(sock_path)
    try:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(sock_path)
        slow.sendall(b'{"cmd":"events"}\n')
        wait_until(lambda: (server.handle_ready(), server.subscribers() == 1)[1], what="sub")
        item = {"event": "created", "pad": "x" * 500}
        t0 = time.monotonic()
        for _ in range(5000):  # ~2.5 MB, far more than the socket and EVENTS_BUFFER hold
            server.publish([item])
        assert time.monotonic() - t0 < 10  # nothing waited for the reader
        (client,) = server._clients.values()
        assert len(client.outbuf) <= control.EVENTS_BUFFER
        assert client.lost > 0
        lost_then = client.lost
        # the reader catches up: everything queued, then the count of what it missed
        slow.setblocking(False)
        got: list[Any] = []
        buf = b""

        def told() -> bool:
            nonlocal buf
            server.handle_ready()
            try:
                buf += slow.recv(1 << 20)
            except BlockingIOError:
                pass
            *done, buf = buf.split(b"\n")
            got.extend(json.loads(x) for x in done)
            return any(g.get("event") == "lost" for g in got)

        wait_until(told, what="the lost notice")
        lost = [g for g in got if g.get("event") == "lost"]
        assert lost == [{"event": "lost", "count": lost_then}]
        delivered = sum(1 for g in got if g.get("event") == "created")
        assert delivered + lost_then <= 5000
        slow.close()
    finally:
        server.close()
