"""The masquerading engine: bytes in, verdict out, ``now`` passed in.

The public face is :class:`Engine` (``handle``, ``handle_timer``, ``next_deadline``,
``drain_events``, ``snapshot``, ``flush``, ``set_public_address``,
``set_local_consumers``). One module per concern:

    core.py       wiring, the dispatch table protocol -> translator, the helpers' view
    fast.py       the fast path for established TCP/UDP flows (one flat function)
    policy.py     inside/exempt/routed networks, new-mapping rate, local VPN delivery
    napt.py       TCP and UDP: bindings, sessions, forwards, the shared rewrite tail
    tcp_state.py  TCP state tracking, blind RST/FIN checks, the MSS clamp
    icmp.py       ICMP queries, and errors translated through the header they quote
    generic.py    other protocols, by address pair
    hairpin.py    LAN to LAN through the public address
    fragments.py  later fragments follow their first fragment's translation
"""

from vpnmasq.engine.core import MAX_PACKET, Engine
from vpnmasq.engine.fragments import MAX_FRAGMENT_STATES
from vpnmasq.engine.policy import MAX_RATE_BUCKETS, NEW_MAPPING_BURST_S
from vpnmasq.packet.ipv4 import describe

__all__ = [
    "MAX_FRAGMENT_STATES",
    "MAX_PACKET",
    "MAX_RATE_BUCKETS",
    "NEW_MAPPING_BURST_S",
    "Engine",
    "describe",
]
