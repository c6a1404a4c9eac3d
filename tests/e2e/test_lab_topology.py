"""The lab topology cleans up after itself: on SIGTERM, and via cleanup_stale() after SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vpnmasq_lab.topology import OWNER_DIR, Topology, cleanup_stale, list_namespaces, netns_pids

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

_OWNER = """
import json, sys, time
from vpnmasq_lab.topology import Topology
topo = Topology(hosts=1, remotes=1).up()
p = topo.start_json("r1", topo.py("vpnmasq_lab.plain", "udp-echo-server", "--port", "7"))
print(json.dumps({"tag": topo.tag, "ns": [n.ns for n in topo.nodes.values()],
                  "workdir": str(topo.workdir)}), flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    """Exited (maybe a zombie waiting for its new parent, init, to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _start_owner() -> tuple[subprocess.Popen[str], dict[str, object]]:
    p = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    info = json.loads(p.stdout.readline())
    return p, info


def test_sigterm_tears_down() -> None:
    p, info = _start_owner()
    ns = info["ns"]
    assert isinstance(ns, list) and set(ns) <= set(list_namespaces())
    p.send_signal(signal.SIGTERM)
    p.wait(15)
    assert not set(ns) & set(list_namespaces())
    assert not (OWNER_DIR / f"{info['tag']}.json").exists()


def test_cleanup_stale_after_sigkill() -> None:
    p, info = _start_owner()
    ns = info["ns"]
    assert isinstance(ns, list)
    r1 = next(n for n in ns if n.endswith("-r1"))
    pids = netns_pids(r1)
    assert pids  # the echo server runs in r1
    p.kill()
    p.wait(5)
    assert set(ns) <= set(list_namespaces())  # SIGKILL: nothing could clean up
    removed = cleanup_stale()
    assert set(ns) <= set(removed)
    assert not set(ns) & set(list_namespaces())
    assert all(_gone(pid) for pid in pids)


def test_cleanup_stale_leaves_live_runs_alone() -> None:
    with Topology(hosts=1, remotes=0) as topo:
        p, info = _start_owner()
        try:
            cleanup_stale()
            ns = info["ns"]
            assert isinstance(ns, list) and set(ns) <= set(list_namespaces())
            assert {n.ns for n in topo.nodes.values()} <= set(list_namespaces())
        finally:
            p.terminate()
            p.wait(15)
