"""``vpnmasq run`` as the lab gateway: config file, start, readiness, status, log, clean stop.

::

    with Topology(hosts=3, remotes=2) as topo:
        gw = topo.gateway_vpnmasq(mode="hybrid",
                                  forwards=[{"protocol": "tcp", "port": 1723, "to": LAN_SERVER_IP}])
        ...                                 # peers talk through the gateway
        rows = gw.rows()                    # the masquerade table (vpnmasq status)
        assert "ah-cannot-be-masqueraded" in gw.log()
        gw.stop()                           # SIGTERM; rules removed; exit code 0

The daemon runs in the ``gw`` namespace as ``python -m vpnmasq.cli run --config F`` (the same
interpreter as the caller, so the checkout under test is what runs), with its stderr in a log
file under the topology's workdir. :meth:`VpnmasqGateway.start` returns once the control
socket answers ``ping`` and the netfilter rules are present in the namespace (the daemon
installs them before it opens the socket; both are checked), and raises :class:`LabError`
with the log tail if the daemon exits or does not get there in time.

The control socket lives in the workdir, so the test process (in the host namespace) queries
it directly: a UNIX socket is a file, not a network endpoint.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vpnmasq.datapath import rules
from vpnmasq.datapath.control import ControlError, query
from vpnmasq.events import Row
from vpnmasq.status import kind_of, rows_from_wire

from .topology import GW_WAN_IP, LAN_NET, LabError

if TYPE_CHECKING:  # pragma: no cover
    from .topology import Topology

MODES = ("hybrid", "userspace")
#: how long a control-socket query may wait for the daemon (a busy machine, a busy daemon)
QUERY_TIMEOUT = 30.0


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string of printable ASCII is a TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML: {v!r}")


def to_toml(doc: Mapping[str, Any]) -> str:
    """A small TOML writer for vpnmasq configs: scalars and arrays at the top, one level of
    tables (``timeouts``, ``esp``, ``limits``) and arrays of tables (``forward``)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, Sequence[Mapping[str, Any]]]] = []
    for k, v in doc.items():
        if v is None:
            continue
        if isinstance(v, Mapping):
            tables.append((k, v))
        elif isinstance(v, list | tuple) and v and all(isinstance(x, Mapping) for x in v):
            arrays.append((k, v))
        elif isinstance(v, list | tuple) and not v and k == "forward":
            continue
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, t in tables:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in t.items() if v is not None]
    for name, items in arrays:
        for item in items:
            lines += ["", f"[[{name}]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in item.items() if v is not None]
    return "\n".join(lines) + "\n"


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def lab_config(
    workdir: Path,
    *,
    mode: str = "hybrid",
    forwards: Iterable[Mapping[str, Any]] = (),
    log_level: str = "info",
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config dict for the lab gateway (see :func:`to_toml`). ``overrides`` is merged
    in last, table by table (``{"timeouts": {"udp": 120}}`` keeps the other timeouts)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    doc: dict[str, Any] = {
        "outside_interface": "wan0",
        "inside_networks": [str(LAN_NET)],
        "mode": mode,
        # Fixed, so the test can tell replies to our packets apart; the daemon would follow
        # the address of wan0 (the same one) without it.
        "public_address": GW_WAN_IP,
        "control_socket": str(workdir / "control.sock"),
        "log_level": log_level,
        "forward": [dict(f) for f in forwards],
    }
    return _merge(doc, overrides or {})


class VpnmasqGateway:
    """One ``vpnmasq run`` in the gateway namespace of a :class:`Topology`."""

    def __init__(
        self,
        topo: Topology,
        *,
        mode: str = "hybrid",
        forwards: Iterable[Mapping[str, Any]] = (),
        config_overrides: Mapping[str, Any] | None = None,
        log_level: str = "info",
        name: str = "vpnmasq",
    ) -> None:
        self.topo = topo
        self.mode = mode
        self.dir = topo.mkdir(name)
        self.config = lab_config(
            self.dir,
            mode=mode,
            forwards=forwards,
            log_level=log_level,
            overrides=config_overrides,
        )
        self.config_path = self.dir / "vpnmasq.toml"
        self.log_path = self.dir / "vpnmasq.log"
        self.socket_path = str(self.config["control_socket"])
        self.proc: subprocess.Popen[Any] | None = None
        self.returncode: int | None = None
        self.rules_removed: bool | None = None
        self.started_s: float | None = None

    @property
    def ns(self) -> str:
        return self.topo.ns("gw")

    # ----------------------------------------------------------------- life cycle
    def start(self, timeout: float = 60.0) -> VpnmasqGateway:
        if self.proc is not None:
            raise LabError("vpnmasq already started")
        self.config_path.write_text(to_toml(self.config))
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = self.topo.popen(
                "gw",
                [sys.executable, "-m", "vpnmasq.cli", "run", "--config", str(self.config_path)],
                name="vpnmasq:gw",
                stdout=log,
                stderr=log,
            )
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabError(
                    f"vpnmasq exited ({self.proc.returncode}) while starting:\n{self.log_tail()}"
                )
            if self.ping() and rules.installed(netns=self.ns):
                break
            if time.monotonic() > deadline:
                raise LabError(f"vpnmasq not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.started_s = round(time.monotonic() - t0, 3)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; records the exit code and whether the rules were removed."""
        if self.proc is None:
            return self.returncode
        p, self.proc = self.proc, None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # `ip netns exec` execs, so this is the daemon
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.topo.stop(p)  # SIGKILLs what is left of its session, forgets it
        self.returncode = p.returncode
        try:
            self.rules_removed = not rules.installed(netns=self.ns)
        except rules.RuleError:
            self.rules_removed = None
        return self.returncode

    def restart(self, **kwargs: Any) -> VpnmasqGateway:
        """Stop this daemon and start a new one with other settings (same topology)."""
        self.stop()
        gw: VpnmasqGateway = self.topo.gateway_vpnmasq(**kwargs)
        return gw

    # ----------------------------------------------------------------- control socket
    def ping(self) -> bool:
        try:
            query(self.socket_path, "ping", timeout=1.0)
        except ControlError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        """``vpnmasq status --json``, as a dict: ``entries`` (wire rows) and ``counters``."""
        return query(self.socket_path, "status", timeout=QUERY_TIMEOUT)

    def rows(self) -> list[Row]:
        return rows_from_wire(self.status().get("entries", []))

    def counters(self) -> dict[str, int]:
        return dict(query(self.socket_path, "counters", timeout=QUERY_TIMEOUT).get("counters", {}))

    def flush(self) -> int:
        return int(query(self.socket_path, "flush", timeout=QUERY_TIMEOUT).get("flushed", 0))

    def entries(self, kind: str | None = None, **detail: str) -> list[dict[str, Any]]:
        """Wire rows (as ``vpnmasq status --json`` prints them) of one protocol or helper
        kind (``tcp``, ``esp``, ``gre``, ``isakmp``, ``pptp``, ``natt``...; see
        :func:`vpnmasq.status.kind_of`) whose detail has these values."""
        wire = self.status().get("entries", [])
        out = []
        for e, row in zip(wire, rows_from_wire(wire), strict=True):
            if kind is not None and kind not in (row.proto, kind_of(row)):
                continue
            if all(row.detail.get(k) == v for k, v in detail.items()):
                out.append(e)
        return out

    def status_text(self, *args: str) -> str:
        """The operator's view: ``vpnmasq status [ARGS]`` run as a command."""
        cp = subprocess.run(
            [sys.executable, "-m", "vpnmasq.cli", "status", "--socket", self.socket_path, *args],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return cp.stdout + cp.stderr

    # ----------------------------------------------------------------- log
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until a line of the daemon's log matches ``pattern`` (a regex)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                m = rx.search(line)
                if m:
                    return m
            if time.monotonic() > deadline:
                raise LabError(
                    f"no log line matches {pattern!r} after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
