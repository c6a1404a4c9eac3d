"""The control socket: ``vpnmasq status`` / ``flush`` talk to the running daemon here.

A UNIX stream socket (root only: mode 0600 in a 0700 directory) speaking newline-delimited
JSON. Each request is one line, ``{"cmd": "status" | "counters" | "flush" | "ping"}``
(``status`` may add ``"proto"``, ``"host"`` and ``"limit"``: the daemon filters); each
answer is one line, ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. A client may
send several requests on one connection; they are answered in order.

Streamed answers: a callback may return the pieces of its answer line instead of the
answer; :meth:`ControlServer.work` produces them between packet batches, within a time
budget. Design notes: docs/internals/datapath-control.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vpnmasq import __version__

COMMANDS = ("status", "counters", "flush", "ping", "events")
MAX_REQUEST = 64 * 1024  # a request is a short JSON object; anything longer is garbage
MAX_CLIENTS = 16  # root-only socket, so a handful is plenty; more are refused
READ_CHUNK = 64 * 1024
CLIENT_TIMEOUT = 5.0
#: a streamed answer pauses while this much of it waits to be read by the client
OUTPUT_HIGH_WATER = 1 << 20
#: an event subscriber's unsent events are capped at this; beyond it its events are dropped
#: (counted, and it is told how many once it has caught up to half of it)
EVENTS_BUFFER = 256 * 1024

#: what a command callback returns: the answer, or the pieces of its line (see work())
Answer = Mapping[str, Any] | Iterator[bytes]


class ControlError(RuntimeError):
    """The daemon could not be asked, or said no. The message is meant for the operator."""


@dataclass
class _Client:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    read_closed: bool = False
    job: Iterator[bytes] | None = None  # an answer being produced a slice at a time
    job_started: bool = False
    events: Callable[[Mapping[str, Any]], bool] | None = None  # subscribed: its filter
    lost: int = 0  # events dropped for this subscriber since it was last told


class ControlServer:
    """Non-blocking JSON-lines server on a UNIX socket; see the module docstring."""

    def __init__(
        self,
        path: str,
        *,
        status: Callable[[Mapping[str, Any]], Answer],
        counters: Callable[[], Mapping[str, int]],
        flush: Callable[[], int],
        subscribe: Callable[[Mapping[str, Any]], Callable[[Mapping[str, Any]], bool]]
        | None = None,
        takeover: bool = False,
    ) -> None:
        """Bind ``path``. A stale socket file is replaced; a live one raises ControlError
        unless ``takeover`` (handover from a running instance: it keeps serving its old
        descriptor until it exits, new clients reach us)."""
        self.path = path
        self._status = status
        self._counters = counters
        self._flush = flush
        self._subscribe = subscribe
        self._clients: dict[int, _Client] = {}
        self._rr = 0  # round robin over clients with a job
        self.last_error: Exception | None = None  # the daemon may log it
        self._sel = selectors.EpollSelector()
        self._listener = self._bind(path, takeover)
        self._inode = os.stat(path).st_ino
        self._sel.register(self._listener, selectors.EVENT_READ, None)

    # ---------------------------------------------------------------- setup / teardown
    @staticmethod
    def _bind(path: str, takeover: bool) -> socket.socket:
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
            if _is_live(path) and not takeover:
                raise ControlError(f"another vpnmasq is already listening on {path}")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window in which the socket is group/world accessible
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(MAX_CLIENTS)
        sock.setblocking(False)
        return sock

    def fileno(self) -> int:
        """Poll this for readability; then call :meth:`handle_ready`."""
        return self._sel.fileno()

    def close(self) -> None:
        """Close every connection and remove the socket file if it is still ours."""
        for c in list(self._clients.values()):
            self._drop(c)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listener)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:  # not a successor's socket
                os.unlink(self.path)
        self._sel.close()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- event handling
    def handle_ready(self) -> None:
        """Serve whatever is ready now (accepts, reads, answers, writes); never blocks."""
        for key, events in self._sel.select(timeout=0):
            client: _Client | None = key.data
            if client is None:
                self._accept()
                continue
            if events & selectors.EVENT_READ:
                self._read(client)
            if client.sock.fileno() in self._clients and events & selectors.EVENT_WRITE:
                self._write(client)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next poll
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            if len(self._clients) >= MAX_CLIENTS:
                with contextlib.suppress(OSError):
                    sock.send(_encode({"ok": False, "error": "too many control connections"}))
                sock.close()
                continue
            sock.setblocking(False)
            c = _Client(sock)
            self._clients[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        if not data:
            c.read_closed = True
        c.inbuf += data
        self._serve(c)

    def _serve(self, c: _Client) -> None:
        """Answer the complete requests waiting in ``c.inbuf``, in order, up to the first
        that is streamed (the rest wait until it is done)."""
        if c.events is not None:  # a subscriber only listens; what it sends is ignored
            c.inbuf.clear()
            self._update(c)
            return
        while c.job is None and b"\n" in c.inbuf:
            line, _, rest = bytes(c.inbuf).partition(b"\n")
            c.inbuf = bytearray(rest)
            if line.strip():
                self._start(c, line)
        if c.job is None and len(c.inbuf) > MAX_REQUEST:
            c.outbuf += _encode({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
            c.inbuf.clear()
            c.read_closed = True
        if c.job is None and c.read_closed and c.inbuf.strip():  # last one without a newline
            line = bytes(c.inbuf)
            c.inbuf.clear()
            self._start(c, line)
        if c.outbuf:
            self._write(c)  # usually fits the socket buffer: no extra poll round
        else:
            self._update(c)

    def _start(self, c: _Client, line: bytes) -> None:
        sub = self._subscription(line)
        if sub is not None:
            c.events = sub
            c.outbuf += _encode({"ok": True, "events": "streaming"})
            c.inbuf.clear()
            return
        ans = self.answer(line)
        if isinstance(ans, Mapping):
            c.outbuf += _encode(ans)
        else:
            c.job, c.job_started = ans, False

    # ---------------------------------------------------------------- event subscribers
    def _subscription(self, line: bytes) -> Callable[[Mapping[str, Any]], bool] | None:
        """The filter of an ``events`` request that can be served; None otherwise (then
        :meth:`answer` explains)."""
        if self._subscribe is None:
            return None
        req = _decode(line)
        if not isinstance(req, dict) or req.get("cmd") != "events":
            return None
        try:
            return self._subscribe(req)
        except ValueError:
            return None

    def subscribers(self) -> int:
        return sum(1 for c in self._clients.values() if c.events is not None)

    def publish(self, items: Sequence[Mapping[str, Any]]) -> None:
        """Queue ``items`` to every subscriber whose filter takes them, never blocking: a
        subscriber whose unsent events exceed :data:`EVENTS_BUFFER` loses them (counted;
        it gets ``{"event": "lost", "count": N}`` once it has caught up)."""
        if not items:
            return
        lines: dict[int, bytes] = {}
        for c in list(self._clients.values()):
            match = c.events
            if match is None:
                continue
            for i, item in enumerate(items):
                if not match(item):
                    continue
                line = lines.get(i)
                if line is None:
                    line = lines[i] = _encode(item)
                if len(c.outbuf) + len(line) > EVENTS_BUFFER:
                    c.lost += 1
                    continue
                self._tell_lost(c)
                c.outbuf += line
            if c.outbuf:
                self._write(c)

    @staticmethod
    def _tell_lost(c: _Client) -> None:
        if c.lost and len(c.outbuf) <= EVENTS_BUFFER // 2:
            c.outbuf += _encode({"event": "lost", "count": c.lost})
            c.lost = 0

    # ---------------------------------------------------------------- streamed answers
    def runnable(self) -> bool:
        """Some streamed answer can make progress now (its client is keeping up)."""
        return any(
            c.job is not None and len(c.outbuf) < OUTPUT_HIGH_WATER for c in self._clients.values()
        )

    def work(self, deadline: float) -> None:
        """Produce streamed answers, a piece at a time, until ``deadline`` (monotonic).
        Clients take turns; one whose unsent output is over the high-water mark waits."""
        clients = [c for c in self._clients.values() if c.job is not None]
        if not clients:
            return
        self._rr = (self._rr + 1) % len(clients)
        clients = clients[self._rr :] + clients[: self._rr]
        while clients:
            for c in list(clients):
                if c.job is None or len(c.outbuf) >= OUTPUT_HIGH_WATER:
                    clients.remove(c)
                    continue
                self._step(c)
                if time.monotonic() >= deadline:
                    clients = []
                    break
        for c in list(self._clients.values()):
            if c.outbuf:
                self._write(c)

    def _step(self, c: _Client) -> None:
        assert c.job is not None
        try:
            piece = next(c.job)
        except StopIteration:
            c.job = None
            self._serve(c)  # requests that waited behind it
            return
        except Exception as e:  # a failing producer must not take the packet loop down
            self.last_error = e
            c.job = None
            if not c.job_started:
                c.outbuf += _encode({"ok": False, "error": f"failed inside the daemon: {e}"})
            else:  # half a line is out: the client sees the connection close
                c.inbuf.clear()
                c.read_closed = True
            self._update(c)
            return
        c.job_started = True
        c.outbuf += piece

    def _write(self, c: _Client) -> None:
        try:
            sent = c.sock.send(c.outbuf)
        except (BlockingIOError, InterruptedError):
            self._update(c)  # wait for the socket to take more
            return
        except OSError:
            self._drop(c)
            return
        del c.outbuf[:sent]
        if c.lost:
            self._tell_lost(c)
        self._update(c)

    def _update(self, c: _Client) -> None:
        if c.read_closed and not c.outbuf and c.job is None:
            self._drop(c)
            return
        mask = (0 if c.read_closed else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if c.outbuf else 0
        )
        self._sel.modify(c.sock, mask, c)

    def _drop(self, c: _Client) -> None:
        c.job = None
        fd = c.sock.fileno()
        self._clients.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.sock.close()

    # ---------------------------------------------------------------- requests
    def answer(self, line: bytes) -> Answer:
        """The response for one request line: an object, or the pieces of a streamed
        answer (see :meth:`work`). Public for tests and the daemon."""
        req = _decode(line)
        if req is _NOT_JSON:
            return {"ok": False, "error": 'request is not JSON; send {"cmd": "status"}'}
        cmd = req.get("cmd") if isinstance(req, dict) else None
        if cmd not in COMMANDS:
            return {
                "ok": False,
                "error": f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})",
            }
        try:
            if cmd == "ping":
                return {"ok": True, "pid": os.getpid(), "version": __version__}
            if cmd == "status":
                ans = self._status(req)
                return {"ok": True, **ans} if isinstance(ans, Mapping) else ans
            if cmd == "events":
                if self._subscribe is None:
                    return {"ok": False, "error": "this daemon has no event stream"}
                try:
                    self._subscribe(req)  # ValueError with the reason (else served above)
                except ValueError as e:
                    return {"ok": False, "error": f"events: {e}"}
                return {"ok": False, "error": "events: cannot subscribe"}
            if cmd == "counters":
                return {"ok": True, "counters": dict(self._counters())}
            return {"ok": True, "flushed": int(self._flush())}
        except Exception as e:  # a failing callback must not take the packet loop down
            self.last_error = e
            return {
                "ok": False,
                "error": f"{cmd} failed inside the daemon: {type(e).__name__}: {e}",
            }


_NOT_JSON = object()


def _decode(line: bytes) -> Any:
    """The request on ``line``, or :data:`_NOT_JSON`. Nesting deeper than the decoder's
    recursion limit (a few thousand brackets, well within MAX_REQUEST) is garbage too: its
    RecursionError must not reach the daemon's loop."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        return _NOT_JSON


def _encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _is_live(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


# -------------------------------------------------------------------- client side
def query(
    path: str,
    cmd: str,
    *,
    timeout: float = CLIENT_TIMEOUT,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Send one command (with ``params``, e.g. status filters) to the daemon at ``path``
    and return its answer (``ok`` true). ``timeout`` bounds each wait for the daemon.

    Raises ControlError with a message an operator can act on.
    """
    s = _connect(path, timeout)
    try:
        buf = bytearray()
        try:
            try:
                s.sendall(_encode({**(params or {}), "cmd": cmd}))
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may refuse us (too many connections) and close before we
                # write; its one-line reason is still waiting in our receive buffer.
                pass
            while True:  # a big table comes in many chunks: look for the end in each
                chunk = s.recv(READ_CHUNK)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in chunk:
                    break
        except TimeoutError:
            raise ControlError(f"vpnmasq did not answer '{cmd}' within {timeout:g} s") from None
        except OSError as e:
            raise ControlError(f"lost the connection to {path}: {e.strerror or e}") from None
    finally:
        s.close()
    line, nl, _ = bytes(buf).partition(b"\n")
    if not nl:
        raise ControlError(f"vpnmasq closed the connection on {path} without answering")
    try:
        resp = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError(f"vpnmasq sent an answer that is not JSON on {path}") from None
    if not isinstance(resp, dict):
        raise ControlError(f"vpnmasq sent an unexpected answer on {path}")
    if not resp.get("ok"):
        raise ControlError(f"vpnmasq refused '{cmd}': {resp.get('error', 'no reason given')}")
    return resp


def _connect(path: str, timeout: float) -> socket.socket:
    """A connected client socket, or ControlError with a message an operator can act on."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        s.close()
        raise ControlError(f"vpnmasq is not running (no socket at {path})") from None
    except ConnectionRefusedError:
        s.close()
        raise ControlError(
            f"vpnmasq is not running (stale socket at {path}, nothing is listening)"
        ) from None
    except PermissionError:
        s.close()
        raise ControlError(
            f"permission denied on {path}: the control socket is root-only; "
            "run this command as root (e.g. with sudo)"
        ) from None
    except TimeoutError:
        s.close()
        raise ControlError(
            f"vpnmasq did not accept a connection on {path} within {timeout:g} s"
        ) from None
    except OSError as e:
        s.close()
        raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
    return s


def subscribe(
    path: str, params: Mapping[str, Any] | None = None, *, timeout: float = CLIENT_TIMEOUT
) -> Iterator[dict[str, Any]]:
    """Subscribe to the daemon's event stream (``params``: filters) and yield its events
    as they come; ends when the daemon closes the stream. ControlError if it refuses."""
    s = _connect(path, timeout)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(_encode({**(params or {}), "cmd": "events"}))
        f = s.makefile("rb")
        try:
            first = f.readline()
        except TimeoutError:
            raise ControlError(f"vpnmasq did not answer 'events' within {timeout:g} s") from None
        try:
            resp = json.loads(first) if first else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            resp = None
        if not isinstance(resp, dict):
            raise ControlError(f"vpnmasq closed the connection on {path} without answering")
        if not resp.get("ok"):
            raise ControlError(f"vpnmasq refused 'events': {resp.get('error', 'no reason')}")
        s.settimeout(None)  # events come when they come
        for line in f:
            try:
                item = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(item, dict):
                yield item
    except OSError as e:
        raise ControlError(f"lost the connection to {path}: {e.strerror or e}") from None
    finally:
        s.close()
