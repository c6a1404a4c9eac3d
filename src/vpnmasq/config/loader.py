"""TOML text -> Config: ``load_config(text)`` (pure) and ``validate``; ``read_config_text``
is the one function of the package that reads a file.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from vpnmasq.config.checks import collect_warnings, cross_checks
from vpnmasq.config.keys import (
    FORWARD_KEYS,
    REQUIRED_HINT,
    ROUTE_KEYS,
    TABLES,
    TOP_BY_KEY,
    TOP_KEYS,
    TOP_NAMES,
    BadValue,
    KeySpec,
    suggest,
    type_name,
)
from vpnmasq.config.locate import Locator, Problems, toml_error
from vpnmasq.config.schema import Config, ConfigError, Forward, Route


# ----------------------------------------------------------------------------- loading
def load_config(text: str) -> Config:
    """Parse and check TOML text. Raises ConfigError (or ConfigErrors) naming key and line.

    Pure: no file system, no network. Warnings (values that load but are risky) come from
    :func:`validate`.
    """
    config, _ = _load(text)
    return config


def parse_value(key: str, value: object) -> Any:
    """One top-level key's value as the loader parses it (for command-line overrides)."""
    try:
        return TOP_BY_KEY[key].kind.parse(value)
    except BadValue as e:
        raise ConfigError(str(e), key=key + e.sub) from None


def load_config_file(path: str | os.PathLike[str]) -> Config:
    return load_config(read_config_text(path))


def read_config_text(path: str | os.PathLike[str]) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM (some Windows editors) is not TOML
            return f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{os.fspath(path)} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None


def validate(config: Config, text: str | None = None) -> list[str]:
    """Check a Config as a whole: raise ConfigError for errors, return warnings.

    ``text`` (the TOML it came from) adds line numbers. ``load_config`` already runs the
    error checks; call this afterwards for the warnings, or on a Config built in code.
    """
    where = Locator(text or "")
    errors = Problems(where)
    cross_checks(config, errors)
    errors.raise_if_any()
    warnings = Problems(where)
    collect_warnings(config, warnings)
    return [str(w) for w in warnings.sorted()]


def _load(text: str) -> tuple[Config, Locator]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise toml_error(text, e) from None
    if not data:
        raise ConfigError(
            "the file sets nothing: outside_interface and inside_networks are required"
        )
    where = Locator(text)
    errors = Problems(where)
    for spec in TOP_KEYS:
        if spec.required and spec.key not in data:
            errors.add(spec.key, f"required, and not set ({REQUIRED_HINT[spec.key]})")
    kwargs: dict[str, object] = {}
    first_table_line = where.first_header
    for key, value in data.items():
        if key in TOP_BY_KEY:
            spec = TOP_BY_KEY[key]
            try:
                kwargs[spec.field] = spec.kind.parse(value)
            except BadValue as e:
                errors.add(key + e.sub, str(e))
        elif key in TABLES:
            cls, fname, specs = TABLES[key]
            if not isinstance(value, dict):
                errors.add(key, f"must be a table ([{key}]), got {type_name(value)}")
                continue
            parsed = _parse_table(value, specs, key, errors, first_table_line)
            if parsed is not None:
                kwargs[fname] = cls(**parsed)
        elif key == "forward":
            forwards = _parse_forwards(value, errors, first_table_line)
            if forwards is not None:
                kwargs["forwards"] = forwards
        elif key == "route":
            routes = _parse_routes(value, errors, first_table_line)
            if routes is not None:
                kwargs["routes"] = routes
        else:
            errors.add(key, f"unknown key '{key}'" + (suggest(key, TOP_NAMES) or _elsewhere(key)))
    errors.raise_if_any()
    config = Config(**kwargs)  # type: ignore[arg-type]
    cross_checks(config, errors)
    errors.raise_if_any()
    return config, where


def _elsewhere(name: str) -> str:
    """A table key written at the top level: say which table it belongs to."""
    for table, (_, _, specs) in TABLES.items():
        if any(s.key == name for s in specs):
            return f" ('{name}' belongs in the [{table}] table: did you mean '{table}.{name}'?)"
    if any(s.key == name for s in FORWARD_KEYS):
        return f" ('{name}' belongs in a [[forward]] table)"
    if any(s.key == name for s in ROUTE_KEYS):
        return f" ('{name}' belongs in a [[route]] table)"
    return ""


def _misplaced_hint(name: str, first_table_line: int | None) -> str:
    """A top-level key written after a [table] header silently lands in that table."""
    if name in TOP_BY_KEY and first_table_line is not None:
        return (
            f" ('{name}' is a top-level key: move it above line {first_table_line}, "
            "before the first [table] header)"
        )
    return ""


def _parse_table(
    value: dict[str, object],
    specs: tuple[KeySpec, ...],
    prefix: str,
    errors: Problems,
    first_table_line: int | None,
) -> dict[str, object] | None:
    by_key = {s.key: s for s in specs}
    out: dict[str, object] = {}
    ok = True
    for k, v in value.items():
        full = f"{prefix}.{k}"
        spec = by_key.get(k)
        if spec is None:
            hint = _misplaced_hint(k, first_table_line) or suggest(k, by_key)
            section = f"[[{prefix.split('[')[0]}]]" if "[" in prefix else f"[{prefix}]"
            errors.add(full, f"unknown key '{k}' in {section}{hint}")
            ok = False
            continue
        try:
            out[spec.field] = spec.kind.parse(v)
        except BadValue as e:
            errors.add(full + e.sub, str(e))
            ok = False
    for spec in specs:
        if spec.required and spec.key not in value:
            errors.add(f"{prefix}.{spec.key}", f"'{spec.key}' is required")
            ok = False
    return out if ok else None


def _parse_forwards(
    value: object, errors: Problems, first_table_line: int | None
) -> tuple[Forward, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        errors.add("forward", "must be an array of tables: write each rule under [[forward]]")
        return None
    out: list[Forward] = []
    ok = True
    for i, item in enumerate(value, 1):
        key = f"forward[{i}]"
        parsed = _parse_table(item, FORWARD_KEYS, key, errors, first_table_line)
        if parsed is None:
            ok = False
            continue
        proto = str(parsed["protocol"])
        if proto in ("gre", "esp"):
            for p in ("port", "to_port"):
                if p in parsed:
                    errors.add(
                        f"{key}.{p}",
                        f"{proto} has no ports: remove '{p}' "
                        f"(a {proto} forward sends the whole protocol to one host)",
                    )
                    ok = False
        elif "to_port" in parsed and "port" not in parsed:
            errors.add(f"{key}.to_port", "'to_port' needs 'port' (which public port maps to it?)")
            ok = False
        if ok:
            out.append(Forward(**parsed))  # type: ignore[arg-type]
    return tuple(out) if ok else None


def _parse_routes(
    value: object, errors: Problems, first_table_line: int | None
) -> tuple[Route, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        errors.add("route", "must be an array of tables: write each route under [[route]]")
        return None
    out: list[Route] = []
    ok = True
    for i, item in enumerate(value, 1):
        parsed = _parse_table(item, ROUTE_KEYS, f"route[{i}]", errors, first_table_line)
        if parsed is None:
            ok = False
            continue
        out.append(Route(**parsed))  # type: ignore[arg-type]
    return tuple(out) if ok else None


