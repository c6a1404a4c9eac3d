"""A stand-in for pppd: async-HDLC PPP framing over a pty, for PoPToP without kernel PPP.

This machine has no kernel PPP (``CONFIG_PPP`` is not set), so a real pppd cannot run.
pptpd's control process (pptpctrl) only needs *something* on the pty that speaks the
async-HDLC framing of RFC 1662: 0x7E flags, 0x7D escapes, and a correct FCS-16 (pptpctrl
drops frames whose FCS is wrong: "GRE: Bad checksum from pppd."). It strips the framing,
sends the PPP frame in GRE, and frames what comes back. pptp-linux's GRE-to-PPP gateway does
the same on the client side, on fd 0 when run with ``--nolaunchpppd``.

Codec (pure): :func:`fcs16`, :func:`encode_frame`, :class:`HdlcDecoder`.

Server role (pptpd's ``ppp`` program): ``python -m vpnmasq_lab.pppstub --log-dir D -- ARGS``.
pptpctrl runs it as ``<ppp> local file <optfile> 115200 <localip>:<remoteip> ipparam
<client public ip> remotenumber <client public ip>`` with the pty slave on fds 0 and 1. It
puts the pty in raw mode and answers every test frame (PPP protocol 0x0021 carrying
``VMQ <token> <seq>``) with ``VMQ <token> <seq> ECHO pid=<pid> peer=<ipparam>``; any other
frame is echoed unchanged. Its first frame, sent unprompted, is ``VMQ _hello 0 HELLO pid=..
peer=..`` (pptpctrl only starts reading GRE once "pppd" has written something). It writes its counters as JSON to ``D/stub-<pid>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLAG = 0x7E
ESC = 0x7D
ESC_XOR = 0x20
FCS_INIT = 0xFFFF
FCS_GOOD = 0xF0B8  # RFC 1662 C.2: the FCS over data + its own FCS field
PPP_ADDR_CTRL = b"\xff\x03"
PROTO_IP = 0x0021  # test frames pretend to be IPv4; nobody on the path parses them
HELLO_TOKEN = "_hello"  # the stub's first frame: "VMQ _hello 0 HELLO pid=<pid> peer=<ipparam>"
MAX_FRAME = 4096  # PPTP payloads are MRU-limited (1500 typ.); anything longer is garbage

_FCS_TABLE: list[int] = []
for _b in range(256):
    _v = _b
    for _ in range(8):
        _v = (_v >> 1) ^ 0x8408 if _v & 1 else _v >> 1
    _FCS_TABLE.append(_v)


def fcs16(data: bytes, fcs: int = FCS_INIT) -> int:
    """RFC 1662 FCS-16 (reflected CCITT polynomial 0x8408), not yet complemented."""
    for b in data:
        fcs = (fcs >> 8) ^ _FCS_TABLE[(fcs ^ b) & 0xFF]
    return fcs


def encode_frame(frame: bytes, accm: int = 0xFFFFFFFF) -> bytes:
    """Wrap a PPP frame (address/control/protocol/info) in flags, escapes and the FCS."""
    fcs = fcs16(frame) ^ 0xFFFF
    raw = frame + bytes((fcs & 0xFF, fcs >> 8))  # FCS goes LSB first
    out = bytearray((FLAG,))
    for b in raw:
        if b in (FLAG, ESC) or (b < 0x20 and accm >> b & 1):
            out += bytes((ESC, b ^ ESC_XOR))
        else:
            out.append(b)
    out.append(FLAG)
    return bytes(out)


def ppp_frame(protocol: int, info: bytes) -> bytes:
    return PPP_ADDR_CTRL + protocol.to_bytes(2, "big") + info


def split_ppp(frame: bytes) -> tuple[int, bytes] | None:
    """(protocol, info) of a PPP frame with or without address/control; None if too short."""
    if frame[:2] == PPP_ADDR_CTRL:
        frame = frame[2:]
    if len(frame) < 2:
        return None
    if frame[0] & 1:  # protocol-field compression: one-byte protocol
        return frame[0], frame[1:]
    return int.from_bytes(frame[:2], "big"), frame[2:]


@dataclass
class DecoderStats:
    frames: int = 0
    bad_fcs: int = 0
    runts: int = 0
    too_long: int = 0
    bytes_in: int = 0


class HdlcDecoder:
    """Incremental async-HDLC deframer: ``feed(bytes) -> [frame, ...]`` (FCS checked, stripped)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._esc = False
        self._overflow = False
        self.stats = DecoderStats()

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        self.stats.bytes_in += len(data)
        for b in data:
            if b == FLAG:
                self._end(out)
                continue
            if self._overflow:
                continue
            if b == ESC:
                self._esc = True
                continue
            if self._esc:
                b ^= ESC_XOR
                self._esc = False
            self._buf.append(b)
            if len(self._buf) > MAX_FRAME:
                self._overflow = True
        return out

    def _end(self, out: list[bytes]) -> None:
        buf, self._buf = bytes(self._buf), bytearray()
        esc, self._esc = self._esc, False
        if self._overflow:
            self._overflow = False
            self.stats.too_long += 1
            return
        if not buf:
            return  # back-to-back flags
        if len(buf) < 4 or esc:
            self.stats.runts += 1
            return
        if fcs16(buf) != FCS_GOOD:
            self.stats.bad_fcs += 1
            return
        self.stats.frames += 1
        out.append(buf[:-2])


def test_payload(token: str, seq: int) -> bytes:
    return f"VMQ {token} {seq}".encode()


def parse_test_payload(info: bytes) -> tuple[str, int, str] | None:
    """(token, seq, rest) for ``VMQ <token> <seq>[ rest]``; None otherwise."""
    parts = info.decode(errors="replace").split(" ", 3)
    if len(parts) >= 3 and parts[0] == "VMQ" and parts[2].isdigit():
        return parts[1], int(parts[2]), parts[3] if len(parts) > 3 else ""
    return None


class EchoStub:
    """Server side: answers test frames from the pty (fd 0/1) and keeps counters."""

    def __init__(self, pppd_args: Sequence[str], log_dir: Path | None) -> None:
        self.args = list(pppd_args)
        self.ipparam = _arg_after(self.args, "ipparam")
        self.addrs = next((a for a in self.args if ":" in a and a[0].isdigit()), None)
        self.log_dir = log_dir
        self.decoder = HdlcDecoder()
        self.echoed = 0
        self.tokens: dict[str, int] = {}
        self.started = time.time()
        self._last_dump = 0.0
        self._dirty = False

    def reply_for(self, frame: bytes) -> bytes:
        sp = split_ppp(frame)
        if sp is not None and sp[0] == PROTO_IP:
            t = parse_test_payload(sp[1])
            if t is not None:
                token, seq, _ = t
                self.tokens[token] = self.tokens.get(token, 0) + 1
                info = (
                    test_payload(token, seq)
                    + f" ECHO pid={os.getpid()} peer={self.ipparam}".encode()
                )
                return ppp_frame(PROTO_IP, info)
        return frame

    def hello(self) -> bytes:
        info = (
            test_payload(HELLO_TOKEN, 0) + f" HELLO pid={os.getpid()} peer={self.ipparam}".encode()
        )
        return ppp_frame(PROTO_IP, info)

    def snapshot(self) -> dict[str, Any]:
        st = self.decoder.stats
        return {
            "pid": os.getpid(),
            "args": self.args,
            "ipparam": self.ipparam,
            "addrs": self.addrs,
            "started": self.started,
            "frames_in": st.frames,
            "bad_fcs": st.bad_fcs,
            "runts": st.runts,
            "too_long": st.too_long,
            "bytes_in": st.bytes_in,
            "echoed": self.echoed,
            "tokens": self.tokens,
        }

    def dump(self, force: bool = False) -> None:
        if self.log_dir is None:
            return
        now = time.monotonic()
        if not force and now - self._last_dump < 0.2:
            self._dirty = True
            return
        self._last_dump = now
        self._dirty = False
        path = self.log_dir / f"stub-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, path)

    def run(self, fd_in: int = 0, fd_out: int = 1) -> None:
        with contextlib.suppress(OSError):
            tty.setraw(fd_in)  # no echo, no line editing: bytes in = bytes out
        # pptpctrl does not read GRE until "pppd" has written to the pty ("detect startup of
        # pppd": the GRE fd joins its select() set only then), as a real pppd does with its
        # first LCP Configure-Request. So speak first.
        _write_all(fd_out, encode_frame(self.hello()))
        self.dump(force=True)
        while True:
            r, _, _ = select.select([fd_in], [], [], 0.1)
            if not r:
                self.dump(force=self._dirty)
                continue
            try:
                data = os.read(fd_in, 65536)
            except OSError:  # EIO: pptpctrl closed the pty master
                break
            if not data:
                break
            out = bytearray()
            for frame in self.decoder.feed(data):
                out += encode_frame(self.reply_for(frame))
                self.echoed += 1
            if out:
                _write_all(fd_out, bytes(out))
            self.dump()
        self.dump(force=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        view = view[n:]


def _arg_after(args: Sequence[str], key: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a == key:
            return args[i + 1]
    return None


def write_wrapper(path: Path, log_dir: Path, python: str = sys.executable) -> Path:
    """Write the executable that pptpd's ``ppp`` option points at (it takes no arguments)."""
    path.write_text(
        f'#!/bin/sh\nexec {python} -m vpnmasq_lab.pppstub --log-dir {log_dir} -- "$@"\n'
    )
    path.chmod(0o755)
    return path


def read_stub_logs(log_dir: Path) -> list[dict[str, Any]]:
    """All ``stub-<pid>.json`` snapshots in a directory (one per PPTP call on the server)."""
    out = []
    for f in sorted(Path(log_dir).glob("stub-*.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(f.read_text()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vpnmasq_lab.pppstub")
    ap.add_argument("--log-dir", type=Path)
    ap.add_argument("pppd_args", nargs="*", help="whatever pptpctrl passes to pppd")
    a = ap.parse_args(argv)
    stub = EchoStub(a.pppd_args, a.log_dir)

    def _term(signum: int, frame: object) -> None:
        stub.dump(force=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)
    stub.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
