"""Waiting in tests that involve other threads, processes or the kernel: poll a condition
with a generous deadline instead of sleeping a fixed time, and never assert on wall-clock
time.

CI runs the suite on a 2-core machine that may be busy with other work, so anything that
"normally takes a few milliseconds" can take seconds. The rules, for every test here:

* wait *for a condition* (:func:`wait_until`), never ``time.sleep(x)`` and then check;
* a positive wait (something must arrive) gets a long deadline (:data:`DEADLINE`,
  :data:`ANSWER_TIMEOUT`): it ends as soon as the answer is there, so it costs nothing when
  the machine is idle;
* a negative wait (something must *not* arrive) stays short, and where possible starts only
  after a condition shows that the thing had its chance (the packet was handled, the
  counter moved);
* durations are recorded as properties, never asserted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: deadline for a condition that must become true (a process starting, a counter moving)
DEADLINE = 30.0
#: how long a peer waits for an answer that must come (a UDP echo, a reply through the
#: gateway); returns early when it comes
ANSWER_TIMEOUT = 10.0


def wait_until(
    cond: Callable[[], T],
    timeout: float = DEADLINE,
    what: str = "the condition",
    interval: float = 0.02,
) -> T:
    """Call ``cond`` until it returns something truthy, and return that; after ``timeout``
    seconds raise AssertionError naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    step = interval
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        time.sleep(step)
        step = min(step * 1.5, 0.25)  # quick at first, gentle on a busy machine later
