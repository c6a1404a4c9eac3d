"""Suite-wide settings.

Hypothesis checks two things against the wall clock by default: each example must finish
within a 200 ms ``deadline``, and generating data must not be "too slow" (a health check).
On a busy 2-core CI machine both fail for reasons that have nothing to do with the code under
test, so the suite's profile turns them off (tests/waiting.py: never assert on timing). Tests
that set their own ``@settings`` keep what they set; everything else comes from here.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "vpnmasq",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("vpnmasq")
