"""Protocol helpers (ALGs), registered explicitly: nothing registers itself on import.

``default_registry()`` lists every helper vpnmasq ships; the config's ``helpers`` key picks
which to enable by name (an unknown name is a config error).
"""

from __future__ import annotations

from vpnmasq.helpers import esp, isakmp, pptp, unmasqueradable
from vpnmasq.helpers.base import HelperSpec
from vpnmasq.helpers.registry import HelperRegistry

#: every helper vpnmasq ships, in registration order
SHIPPED: tuple[HelperSpec, ...] = (
    unmasqueradable.AH_SPEC,
    unmasqueradable.FWZ_SPEC,
    *isakmp.SPECS,
    *esp.SPECS,
    *pptp.SPECS,
)


def default_registry() -> HelperRegistry:
    reg = HelperRegistry()
    for spec in SHIPPED:
        reg.register(spec)
    return reg


def available() -> list[str]:
    return sorted(default_registry().specs)
