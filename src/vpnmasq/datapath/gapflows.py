"""Conntrack entries that a gap in vpnmasq's rules left un-NATed (hybrid mode): a LAN flow
that started while the masquerade rule was gone keeps its null NAT binding, and leaks on
after the rule is back. :func:`leaks` is the pure test, :func:`drop_unnatted` deletes them
(pyroute2). Why and what was measured: docs/internals/datapath-rulewatch.md.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["IPS_SRC_NAT", "drop_unnatted", "leaks"]

#: include/uapi/linux/netfilter/nf_conntrack_common.h: IPS_SRC_NAT_BIT = 4 (a source NAT
#: binding was set up; a null binding only sets IPS_SRC_NAT_DONE)
IPS_SRC_NAT = 1 << 4
#: the protocols the kernel masquerades in hybrid mode (vpnmasq's own are untracked again
#: once its raw chain is back, whatever conntrack holds)
KERNEL_NAT_PROTOCOLS = (1, 6, 17)

Nets = Sequence[ipaddress.IPv4Network]


def _nets(nets: Iterable[str]) -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(n, strict=False) for n in nets]


def leaks(
    orig_src: str,
    orig_dst: str,
    reply_dst: str,
    status: int,
    *,
    inside: Nets,
    exempt: Nets = (),
    local: Nets = (),
) -> bool:
    """Whether a conntrack entry is a LAN flow to the outside without source NAT: its
    original source in ``inside`` and not in ``exempt``, its destination in neither
    ``inside`` nor ``local`` (routed networks), no SNAT binding, and replies addressed to
    the LAN host itself."""
    try:
        src, dst = ipaddress.IPv4Address(orig_src), ipaddress.IPv4Address(orig_dst)
    except ValueError:
        return False
    return (
        not status & IPS_SRC_NAT
        and reply_dst == orig_src
        and any(src in n for n in inside)
        and not any(src in n for n in exempt)
        and not any(dst in n for n in (*inside, *local))
    )


def drop_unnatted(
    inside_networks: Iterable[str],
    *,
    exempt_networks: Iterable[str] = (),
    routed_networks: Iterable[str] = (),
) -> int:
    """Delete the conntrack entries :func:`leaks` picks; returns how many."""
    from pyroute2 import Conntrack

    inside, exempt = _nets(inside_networks), _nets(exempt_networks)
    local = _nets(routed_networks)
    n = 0
    with Conntrack() as ct:
        for e in list(ct.dump_entries()):
            o, r = e.tuple_orig, e.tuple_reply
            if o.saddr is None or o.daddr is None or r.daddr is None:
                continue
            if o.proto not in KERNEL_NAT_PROTOCOLS:
                continue
            if leaks(o.saddr, o.daddr, r.daddr, e.status or 0, inside=inside, exempt=exempt, local=local):
                try:
                    ct.entry("del", tuple_orig=o)
                    n += 1
                except Exception:  # gone meanwhile (pyroute2's NetlinkError is no OSError)
                    continue
    return n
