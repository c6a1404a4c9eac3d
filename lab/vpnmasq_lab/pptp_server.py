"""PoPToP ``pptpd`` in a namespace, with :mod:`vpnmasq_lab.pppstub` as its ``ppp`` program.

::

    srv = PptpServer(topo, "r1").start()
    ...                                  # clients connect to topo.ip("r1"):1723
    srv.calls()                          # one dict per call: ipparam, frames_in, tokens, ...
    srv.stop()

What pptpd needs here (see README-lab.md):

* ``ppp <wrapper>`` in its own pptpd.conf: the wrapper execs the stub with this Python;
* ``localip`` / ``remoteip`` (it refuses calls without a free remote address);
* no ``logwtmp`` (Debian's /etc/pptpd.conf has it; the plugin needs a real pppd);
* ``-f`` foreground, ``-c`` conf, ``-o`` options file (passed to "pppd" as ``file X``);
* a private /run: its pid file is /var/run/pptpd.pid.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from vpnmasq.packet.l4 import PPTP_PORT

from .pppstub import read_stub_logs, write_wrapper
from .topology import Topology


class PptpServer:
    def __init__(
        self,
        topo: Topology,
        role: str,
        *,
        localip: str = "192.168.200.1",
        remoteip: str = "192.168.200.10-99",
        debug: bool = False,
        connections: int = 50,
        extra_conf: str = "",
        argv_prefix: tuple[str, ...] = (),
    ) -> None:
        self.topo = topo
        self.role = role
        self.ip = topo.ip(role)
        self.dir = topo.mkdir(f"pptpd-{role}")
        self.run_dir = self.dir / "run"
        self.log_dir = self.dir / "calls"
        self.localip = localip
        self.remoteip = remoteip
        self.debug = debug
        self.connections = connections
        self.extra_conf = extra_conf
        self.argv_prefix = argv_prefix  # e.g. ("strace", "-f", "-o", "/tmp/x") for debugging
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 10.0) -> PptpServer:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        wrapper = write_wrapper(self.dir / "ppp-stub", self.log_dir)
        options = self.dir / "options"
        options.write_text("# read by nobody: the stub ignores pppd options\n")
        conf = self.dir / "pptpd.conf"
        conf.write_text(
            f"ppp {wrapper}\n"
            f"option {options}\n"
            f"localip {self.localip}\n"
            f"remoteip {self.remoteip}\n"
            f"connections {self.connections}\n"
            f"listen {self.ip}\n" + ("debug\n" if self.debug else "") + self.extra_conf
        )
        argv = [
            *self.argv_prefix,
            "pptpd",
            "--fg",
            "-c",
            str(conf),
            "-o",
            str(options),
            "-p",
            str(self.run_dir / "pptpd.pid"),
        ]
        self.stderr_path = self.dir / "pptpd.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = self.topo.popen(
                self.role,
                argv,
                name=f"pptpd:{self.role}",
                private_run=self.run_dir,
                stdout=err,
                stderr=err,
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin")},
            )
        self.topo.wait_listen(self.role, PPTP_PORT, "tcp", timeout)
        return self

    def calls(self) -> list[dict[str, Any]]:
        """Snapshots written by each stub (one stub = one PPTP call pptpctrl accepted)."""
        return read_stub_logs(self.log_dir)

    def tokens(self) -> dict[str, int]:
        """Test tokens seen by the server, summed over calls."""
        out: dict[str, int] = {}
        for c in self.calls():
            for t, n in c.get("tokens", {}).items():
                out[t] = out.get(t, 0) + n
        return out

    def stop(self) -> None:
        if self.proc is not None:
            self.topo.stop(self.proc)
            self.proc = None
