"""Protocol helpers (ALGs), registered explicitly: nothing registers itself on import.

``default_registry()`` lists every helper vpnmasq ships; the config's ``helpers`` key picks
which to enable by name (an unknown name is a config error).
"""

from __future__ import annotations

from vpnmasq.helpers.registry import HelperRegistry


def default_registry() -> HelperRegistry:
    from vpnmasq.helpers import unmasqueradable

    reg = HelperRegistry()
    reg.register(unmasqueradable.AH_SPEC)
    reg.register(unmasqueradable.FWZ_SPEC)
    try:  # VPN helpers land in their own modules; each adds its specs here
        from vpnmasq.helpers import isakmp

        for spec in isakmp.SPECS:
            reg.register(spec)
    except ImportError:
        pass
    try:
        from vpnmasq.helpers import esp

        for spec in esp.SPECS:
            reg.register(spec)
    except ImportError:
        pass
    try:
        from vpnmasq.helpers import pptp

        for spec in pptp.SPECS:
            reg.register(spec)
    except ImportError:
        pass
    return reg


def available() -> list[str]:
    return sorted(default_registry().specs)
