"""The I/O edge: the NFQUEUE netlink client and the netfilter rules that feed it.

Only this package (and the daemon above it) talks to the kernel; everything below the engine
stays pure.
"""

from vpnmasq.datapath.nfqueue import NfQueue, NfQueueCounters, QueuedPacket
from vpnmasq.datapath.rules import RuleSpec

__all__ = ["NfQueue", "NfQueueCounters", "QueuedPacket", "RuleSpec"]
