"""Operator tools that talk to a running daemon: ``vpnmasq events`` and ``vpnmasq top``."""
