"""pptp-linux ``pptp --nolaunchpppd`` in a namespace, driven through a socketpair.

With ``--nolaunchpppd`` pptp uses its fd 0 as the "pty" of a pppd that is not there: it reads
async-HDLC frames from fd 0 and writes frames from the server back to it. We give it one
end of a ``socketpair`` as stdin and stdout and play pppd on the other end with
:mod:`vpnmasq_lab.pppstub`'s codec::

    c = PptpClient(topo, "h1", topo.ip("r1"), token="h1").start()
    res = c.exchange(count=5)    # PptpResult(sent, received, verified, crosstalk, ...)
    assert res.ok
    c.stop()

Each client gets a private /run (pptp's call manager listens on
/var/run/pptp/<server-ip>:<n>; two pptp processes that see the same /run share one call
manager, i.e. one control connection with several calls).
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pppstub import (
    HELLO_TOKEN,
    PROTO_IP,
    HdlcDecoder,
    encode_frame,
    parse_test_payload,
    ppp_frame,
    split_ppp,
    test_payload,
)
from .topology import Topology


@dataclass
class PptpResult:
    token: str
    sent: int = 0
    received: int = 0  # frames with a good FCS that came back
    verified: int = 0  # distinct seqs echoed by the server stub with our token
    crosstalk: list[str] = field(default_factory=list)  # echoes carrying another token
    unannotated: int = 0  # our frames back without the stub's ECHO mark (e.g. pty echo)
    bad_fcs: int = 0
    server_views: set[str] = field(default_factory=set)  # "pid=.. peer=.." the server saw
    hellos: list[str] = field(default_factory=list)  # the server stub's unprompted first frame
    first_echo_s: float | None = None  # time from start() to the first verified echo
    pptp_exit: int | None = None

    sent_unique: int = 0  # distinct seqs judged (probes sent before the call was up excluded)

    @property
    def ok(self) -> bool:
        return self.verified > 0 and self.verified == self.sent_unique and not self.crosstalk

    def as_dict(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "sent": self.sent,
            "sent_unique": self.sent_unique,
            "received": self.received,
            "verified": self.verified,
            "crosstalk": self.crosstalk,
            "unannotated": self.unannotated,
            "bad_fcs": self.bad_fcs,
            "server_views": sorted(self.server_views),
            "hellos": self.hellos,
            "first_echo_s": self.first_echo_s,
            "pptp_exit": self.pptp_exit,
            "ok": self.ok,
        }


class PptpClient:
    def __init__(
        self,
        topo: Topology,
        role: str,
        server_ip: str,
        *,
        token: str | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.topo = topo
        self.role = role
        self.server_ip = server_ip
        self.token = token or f"{role}-{os.urandom(3).hex()}"
        # Pass the same run_dir to two clients in one namespace to make them share pptp's
        # call manager (one control connection, two calls).
        self.run_dir = Path(run_dir) if run_dir else topo.mkdir(f"pptp-{role}-{self.token}")
        self.extra_args = extra_args
        self.proc: subprocess.Popen[Any] | None = None
        self.sock: socket.socket | None = None
        self.decoder = HdlcDecoder()
        self.result = PptpResult(self.token)
        self._seqs_sent: set[int] = set()
        self._seqs_ok: set[int] = set()
        self._t0 = 0.0
        self._seq = 0

    def start(self) -> PptpClient:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stderr_path = self.run_dir.parent / f"pptp-{self.role}-{self.token}.stderr"
        argv = [
            "pptp",
            self.server_ip,
            "--nolaunchpppd",
            "--nohostroute",
            "--loglevel",
            "1",
            *self.extra_args,
        ]
        with open(self.stderr_path, "wb") as err:
            self.proc = self.topo.popen(
                self.role,
                argv,
                name=f"pptp:{self.role}",
                private_run=self.run_dir,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=err,
            )
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self._t0 = time.monotonic()
        return self

    # ------------------------------------------------------------------ I/O
    def send(self, seq: int | None = None) -> int:
        """Send one test frame; returns its seq."""
        assert self.sock is not None, "start() first"
        if seq is None:
            self._seq += 1
            seq = self._seq
        frame = encode_frame(ppp_frame(PROTO_IP, test_payload(self.token, seq)))
        self.sock.sendall(frame)
        self.result.sent += 1
        self._seqs_sent.add(seq)
        self.result.sent_unique = len(self._seqs_sent)
        return seq

    def poll(self, timeout: float) -> int:
        """Read what arrives within timeout; returns the number of frames decoded."""
        assert self.sock is not None
        n = 0
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            r, _, _ = select.select([self.sock], [], [], max(0.0, left))
            if not r:
                break
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:  # pptp exited with data unread
                data = b""
            if not data:  # pptp exited
                break
            for frame in self.decoder.feed(data):
                n += 1
                self._on_frame(frame)
            if left <= 0:
                break
        self.result.bad_fcs = self.decoder.stats.bad_fcs
        return n

    def _on_frame(self, frame: bytes) -> None:
        self.result.received += 1
        sp = split_ppp(frame)
        t = parse_test_payload(sp[1]) if sp and sp[0] == PROTO_IP else None
        if t is None:
            self.result.unannotated += 1
            return
        token, seq, rest = t
        if token == HELLO_TOKEN:
            self.result.hellos.append(rest)
            return
        if token != self.token:
            self.result.crosstalk.append(f"{token} {seq} {rest}")
            return
        if not rest.startswith("ECHO "):
            self.result.unannotated += 1
            return
        self.result.server_views.add(rest[5:])
        if seq in self._seqs_sent and seq not in self._seqs_ok:
            self._seqs_ok.add(seq)
            self.result.verified = len(self._seqs_ok)
            if self.result.first_echo_s is None:
                self.result.first_echo_s = round(time.monotonic() - self._t0, 3)

    def wait_up(self, timeout: float = 10.0, probe_interval: float = 0.3) -> bool:
        """Probe until the first echo comes back (the call is set up and the stub runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            self.send()
            self.poll(min(probe_interval, max(0.0, deadline - time.monotonic())))
            if self._seqs_ok:
                return True
        return bool(self._seqs_ok)

    def exchange(
        self,
        count: int = 5,
        *,
        timeout: float = 10.0,
        interval: float = 0.05,
    ) -> PptpResult:
        """wait_up(), then send `count` more frames and wait for all their echoes."""
        deadline = time.monotonic() + timeout
        if not self.wait_up(timeout):
            self._finish()
            return self.result
        # Early probes that were sent before the stub put its pty in raw mode may never get
        # an echo; forget them, only the frames sent from here on are judged.
        self._seqs_sent = set(self._seqs_ok)
        for _ in range(count):
            self.send()
            self.poll(interval)
        while self._seqs_ok != self._seqs_sent and time.monotonic() < deadline:
            self.poll(min(0.2, max(0.0, deadline - time.monotonic())))
        self.result.sent_unique = len(self._seqs_sent)
        self._finish()
        return self.result

    def _finish(self) -> None:
        if self.proc is not None:
            self.result.pptp_exit = self.proc.poll()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> PptpResult:
        if self.proc is not None:
            self.topo.stop(self.proc)
            self.result.pptp_exit = self.proc.returncode
            self.proc = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        return self.result
