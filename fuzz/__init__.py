"""Fuzzing harnesses for vpnmasq.

``fuzz/targets.py`` holds one target per parser plus the engine entry point; every target
drives a :class:`fuzz.world.World` (an engine already carrying real sessions: TCP, UDP, ICMP,
two PPTP calls, IKE, an ESP association, a pending ESP init) and checks the oracles of
:mod:`fuzz.oracles` after every packet. ``fuzz/run.py`` runs them under atheris
(coverage-guided libFuzzer) for a set time, seeded from ``fuzz/seeds.py``.
"""
