"""The rate-limited drop log of ``vpnmasq run`` adds up to its counters: an ESP flood that
nobody on the LAN asked for is dropped (``esp-unassociated``), a few lines per second are
logged and the rest counted; the count of every window is written when the window ends
(the daemon's loop wakes for it) or at stop, whichever comes first.

Harness: harness.py (r1 sends ESP to the public address 198.51.100.1).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    PUBLIC,
    Daemon,
    Remote,
    wait_for,
)

from vpnmasq_lab.topology import Topology

pytestmark = pytest.mark.netns

REASON = "esp-unassociated"
FLOOD = 600


def logged(log: str, reason: str) -> int:
    """Drops of ``reason`` the log accounts for: its lines plus the suppressed counts."""
    lines = len(re.findall(rf"^vpnmasq\[\d+\]: INFO drop {reason}: ", log, re.M))
    suppressed = re.findall(rf"INFO drop:{reason}: (\d+) more like this suppressed$", log, re.M)
    return lines + sum(int(n) for n in suppressed)


def test_the_drop_log_adds_up_to_the_counter(
    topo: Topology, remote: Remote, workdir: Path, record_property: Callable[[str, object], None]
) -> None:
    d = Daemon(topo, "hybrid", workdir).start()

    def dropped() -> int:
        return d.counters().get(f"drop:{REASON}", 0)

    for i in range(FLOOD):
        remote.send_esp(PUBLIC, 0x7000 + i % 7, seq=i)
    wait_for(lambda: dropped() == FLOOD, f"{FLOOD} {REASON} drops")
    # the last window ends with no further drop: the loop writes its count by itself
    wait_for(lambda: logged(d.log(), REASON) == FLOOD, "the log to account for every drop")
    assert "more like this suppressed" in d.log()
    # a short burst, then stop at once: its window is still open, stop writes it
    for i in range(20):
        remote.send_esp(PUBLIC, 0x7100, seq=i)
    wait_for(lambda: dropped() == FLOOD + 20, "20 more drops")
    counted = dropped()
    assert d.stop() == 0
    log = d.log()
    assert logged(log, REASON) == counted, log[-2000:]
    lines = len(re.findall(rf"INFO drop {REASON}: ", log))
    record_property("drop_log", f"{counted} drops: {lines} lines + {counted - lines} suppressed")
    print(f"{counted} {REASON} drops counted; the log: {lines} lines + {counted - lines} suppressed")
