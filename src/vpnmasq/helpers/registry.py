"""Explicit helper registry: clashes are refused, unknown names are config errors."""

from __future__ import annotations

from collections.abc import Iterable

from vpnmasq.config import ConfigError
from vpnmasq.helpers.base import HelperSpec


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
