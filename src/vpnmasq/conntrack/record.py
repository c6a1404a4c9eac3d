"""Saved records of the state file, typed at the seam: JSON objects read with checked getters.

A helper writes its part of an entry as a :data:`Saved` dict and reads it back through a
:class:`Record`, whose getters raise ``KeyError`` (missing) or ``ValueError`` (wrong type or
range) instead of handing out untyped values; the state file counts such a record refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

#: what a helper saves: JSON-able values only
Saved = dict[str, object]


class Record:
    """A read-only JSON object from the state file with typed getters."""

    __slots__ = ("_d",)

    def __init__(self, d: Mapping[str, object]) -> None:
        self._d = d

    def __contains__(self, key: str) -> bool:
        return key in self._d

    def raw(self, key: str) -> object:
        return self._d[key]

    def get(self, key: str, default: object = None) -> object:
        return self._d.get(key, default)

    def as_int(self, key: str, lo: int = -(1 << 63), hi: int = (1 << 64) - 1) -> int:
        return as_int(self._d[key], lo, hi)

    def opt_int(self, key: str) -> int | None:
        v = self._d[key]
        return None if v is None else as_int(v)

    def as_num(self, key: str) -> float:
        return as_num(self._d[key])

    def opt_num(self, key: str) -> float | None:
        v = self._d[key]
        return None if v is None else as_num(v)

    def as_str(self, key: str) -> str:
        v = self._d[key]
        if not isinstance(v, str):
            raise ValueError(f"{key}: not a string")
        return v

    def as_bool(self, key: str) -> bool:
        v = self._d[key]
        if not isinstance(v, bool):
            raise ValueError(f"{key}: not a boolean")
        return v

    def as_list(self, key: str) -> list[object]:
        v = self._d[key]
        if not isinstance(v, list):
            raise ValueError(f"{key}: not a list")
        return v

    def as_pair(self, key: str) -> tuple[int, int]:
        return as_pair(self._d[key])

    def items(self) -> Iterator[tuple[str, object]]:
        return iter(self._d.items())

    def as_rec(self, key: str) -> Record:
        return as_rec(self._d[key])


def as_int(v: object, lo: int = -(1 << 63), hi: int = (1 << 64) - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"bad integer {v!r}")
    return v


def as_num(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"bad number {v!r}")
    return float(v)


def as_pair(v: object) -> tuple[int, int]:
    if not isinstance(v, list) or len(v) != 2:
        raise ValueError("not a pair")
    return as_int(v[0]), as_int(v[1])


def as_rec(v: object) -> Record:
    if not isinstance(v, Mapping):
        raise ValueError("not an object")
    return Record(v)
