"""The one error a malformed packet may raise anywhere in the core."""


class MalformedPacket(ValueError):
    """Remote garbage: a truncated or inconsistent header.

    Raised by every parser in :mod:`vpnmasq.packet` instead of IndexError or struct.error.
    The engine turns it into a counted drop; it is never fatal.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
