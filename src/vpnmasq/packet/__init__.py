"""Pure packet codecs: header views over bytearray, checksums. No state, no clock, no I/O."""

from vpnmasq.packet.errors import MalformedPacket

__all__ = ["MalformedPacket"]
