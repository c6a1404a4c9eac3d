"""Explicit helper registry: clashes are refused, unknown names are config errors, and the
helpers that work as a pair are wired to each other here, as typed attributes."""

from __future__ import annotations

from collections.abc import Iterable

from vpnmasq.config import ConfigError
from vpnmasq.helpers.base import EngineView, Helper, HelperSpec
from vpnmasq.helpers.esp import EspHelper
from vpnmasq.helpers.isakmp import IsakmpHelper
from vpnmasq.helpers.pptp import GreHelper, PptpAlgFactory


class HelperClash(ValueError):
    pass


class HelperRegistry:
    def __init__(self) -> None:
        self.specs: dict[str, HelperSpec] = {}
        self._slots: dict[tuple[str, int, int | None], str] = {}

    def register(self, spec: HelperSpec) -> None:
        if spec.name in self.specs:
            raise HelperClash(f"helper {spec.name!r} registered twice")
        slot = (spec.kind, spec.proto, spec.port)
        if slot in self._slots:
            raise HelperClash(
                f"helper {spec.name!r} clashes with {self._slots[slot]!r} on {slot}"
            )
        self.specs[spec.name] = spec
        self._slots[slot] = spec.name

    def select(self, names: Iterable[str]) -> list[HelperSpec]:
        out = []
        for n in names:
            if n not in self.specs:
                known = ", ".join(sorted(self.specs))
                raise ConfigError(f"unknown helper {n!r} (known: {known})", key="helpers")
            out.append(self.specs[n])
        return out

    def build(
        self, names: Iterable[str], engine: EngineView
    ) -> list[tuple[HelperSpec, Helper]]:
        """The selected helpers, built for ``engine`` and wired to their peers."""
        built = [(spec, spec.factory(engine)) for spec in self.select(names)]
        wire_peers([h for _spec, h in built])
        return built


def wire_peers(helpers: list[Helper]) -> None:
    """ESP <-> ISAKMP (child-SA signals, plausible hosts), PPTP control -> GRE (call store)."""
    esp = next((h for h in helpers if isinstance(h, EspHelper)), None)
    ike = next((h for h in helpers if isinstance(h, IsakmpHelper)), None)
    gre = next((h for h in helpers if isinstance(h, GreHelper)), None)
    pptp = next((h for h in helpers if isinstance(h, PptpAlgFactory)), None)
    if esp is not None:
        esp.ike = ike
    if ike is not None:
        ike.esp = esp
    if pptp is not None:
        pptp.calls = gre.calls if gre is not None else None
    if gre is not None:
        gre.pptp_enabled = pptp is not None
