"""Active/standby replication of the masquerade table (docs/HA.md). Pure: ``codec`` is the
wire format (framing, HMAC, replay window), ``replica`` what is sent and how the standby
keeps it; the socket is ``vpnmasq.datapath.syncsock``."""
