"""vpnmasq: a VPN-aware IP masquerading gateway for Linux.

Layering (enforced by import-linter, see pyproject.toml):
packet <- conntrack <- helpers <- engine <- datapath/status <- daemon <- cli.
Everything from ``engine`` down is pure: bytes in, verdict out, ``now`` passed in.
"""

__version__ = "0.1.0"
