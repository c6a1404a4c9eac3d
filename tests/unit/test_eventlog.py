"""The rate-limited event log: lines per key and window, and the suppressed count of every
window written when the window ends or at stop, so that the log adds up to the counters."""

from __future__ import annotations

import logging
import re
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from vpnmasq.eventlog import LOG_BURST, RateLimitedLog
from vpnmasq.events import PacketDropped

SUPPRESSED = re.compile(r"^(\S+): (\d+) more like this suppressed$")


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def rate_log() -> tuple[RateLimitedLog, Lines]:
    logger = logging.Logger("vpnmasq-test")  # not attached to the root logger
    h = Lines()
    logger.addHandler(h)
    return RateLimitedLog(logger), h


def drop(reason: str, i: int = 0) -> PacketDropped:
    return PacketDropped(reason, f"n{i}", "udp 10.0.0.1:1 -> 192.0.2.1:2")


def accounted(lines: list[str]) -> Counter[str]:
    """Per key: events the log accounts for (its lines plus the suppressed counts)."""
    c: Counter[str] = Counter()
    for ln in lines:
        m = SUPPRESSED.match(ln)
        if m:
            c[m.group(1)] += int(m.group(2))
        elif ln.startswith("drop "):
            c["drop:" + ln[5:].split(":", 1)[0]] += 1
    return c


def test_a_burst_per_key_then_the_count_when_the_window_ends() -> None:
    rl, h = rate_log()
    for i in range(20):
        rl.event(drop("no-mapping", i), 10.0 + i * 0.01)
    rl.event(drop("filtered"), 10.3)
    assert sum(ln.startswith("drop no-mapping") for ln in h.lines) == LOG_BURST
    assert "drop filtered: udp 10.0.0.1:1 -> 192.0.2.1:2 (n0)" in h.lines
    # nothing more of no-mapping arrives: the window's end alone writes its count
    assert rl.next_deadline() == 11.0
    rl.flush_due(10.99)
    assert not any("suppressed" in ln for ln in h.lines)
    rl.flush_due(11.0)
    assert h.lines[-1] == f"drop:no-mapping: {20 - LOG_BURST} more like this suppressed"
    assert rl.next_deadline() is None  # filtered suppressed nothing: no wakeup for it
    rl.event(drop("no-mapping", 99), 11.5)  # a new window
    assert h.lines[-1].startswith("drop no-mapping")


def test_stop_writes_the_counts_of_windows_still_open() -> None:
    rl, h = rate_log()
    for i in range(8):
        rl.event(drop("esp-unassociated", i), 5.0)
    rl.close()
    assert h.lines[-1] == f"drop:esp-unassociated: {8 - LOG_BURST} more like this suppressed"
    rl.close()  # written once
    assert sum("suppressed" in ln for ln in h.lines) == 1


def test_a_later_event_ends_the_window_too_and_the_count_is_written_once() -> None:
    rl, h = rate_log()
    for i in range(7):
        rl.event(drop("filtered", i), 1.0)
    rl.event(drop("filtered", 7), 2.5)  # the window ended before anyone flushed it
    rl.flush_due(2.5)
    rl.close()
    assert [ln for ln in h.lines if "suppressed" in ln] == [
        f"drop:filtered: {7 - LOG_BURST} more like this suppressed"
    ]
    assert accounted(h.lines)["drop:filtered"] == 8


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["no-mapping", "filtered", "esp-unassociated"]),
            st.floats(0.0, 0.7),  # time since the previous event
            st.booleans(),  # the loop runs its timer check after this event
        ),
        max_size=300,
    )
)
def test_the_log_adds_up_to_the_events_of_every_key(
    events: list[tuple[str, float, bool]],
) -> None:
    rl, h = rate_log()
    now = 0.0
    sent: Counter[str] = Counter()
    for i, (reason, dt, tick) in enumerate(events):
        now += dt
        rl.event(drop(reason, i), now)
        sent["drop:" + reason] += 1
        if tick:
            rl.flush_due(now)
            dl = rl.next_deadline()
            assert dl is None or dl > now  # nothing that is due is left unwritten
    rl.close()
    assert accounted(h.lines) == sent
