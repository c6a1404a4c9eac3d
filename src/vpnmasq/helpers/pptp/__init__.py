"""PPTP (RFC 2637): the control-connection ALG on TCP 1723 and the GRE protocol helper.

Two specs, one call store::

    pptp  tcp-alg  TCP 1723  control.py: PptpControl per connection (parses, rewrites Call IDs)
    gre   proto    IP 47     gre.py: GreHelper, enhanced GRE v1 by Call ID, v0 by address pair

wire.py holds the message schema and the stream reader, callids.py the outside Call ID pool,
control.py the ALG and the call store. Design notes: docs/internals/helpers-pptp.md.
"""

from __future__ import annotations

from vpnmasq.helpers.base import HelperSpec
from vpnmasq.helpers.pptp.callids import CallIdPool
from vpnmasq.helpers.pptp.control import Call, CallStore, PptpAlgFactory, PptpControl
from vpnmasq.helpers.pptp.gre import GRE_ADDR_KIND, GreAddr, GreHelper, addr_mode
from vpnmasq.helpers.pptp.wire import (
    CALL_TRANSITIONS,
    HEAD_KEEP,
    MAX_CALLS_PER_CONTROL,
    MAX_CALLS_WITHOUT_GRE,
    MAX_MESSAGE_LEN,
    MESSAGES,
    PPTP_MAGIC,
    REFUSED_CALL_ID,
    REWRITE_LOG_MAX,
    SESSION_TRANSITIONS,
    CallState,
    MessageSpec,
    MessageType,
    SessionState,
    StreamReader,
)
from vpnmasq.packet.ipv4 import PROTO_GRE, PROTO_TCP
from vpnmasq.packet.l4 import PPTP_PORT

PPTP_SPEC = HelperSpec(
    "pptp",
    "tcp-alg",
    PROTO_TCP,
    PPTP_PORT,
    PptpAlgFactory,
    "PPTP control connections (TCP 1723): Call ID translation for many clients per server",
)
GRE_SPEC = HelperSpec(
    "gre",
    "proto",
    PROTO_GRE,
    None,
    GreHelper,
    "GRE (IP 47): PPTP data by Call ID, other GRE by address pair",
)
SPECS = (PPTP_SPEC, GRE_SPEC)

__all__ = [
    "CALL_TRANSITIONS",
    "GRE_ADDR_KIND",
    "GRE_SPEC",
    "HEAD_KEEP",
    "MAX_CALLS_PER_CONTROL",
    "MAX_CALLS_WITHOUT_GRE",
    "MAX_MESSAGE_LEN",
    "MESSAGES",
    "PPTP_MAGIC",
    "PPTP_SPEC",
    "REFUSED_CALL_ID",
    "REWRITE_LOG_MAX",
    "SESSION_TRANSITIONS",
    "SPECS",
    "Call",
    "CallIdPool",
    "CallState",
    "CallStore",
    "GreAddr",
    "GreHelper",
    "MessageSpec",
    "MessageType",
    "PptpAlgFactory",
    "PptpControl",
    "SessionState",
    "StreamReader",
    "addr_mode",
]
