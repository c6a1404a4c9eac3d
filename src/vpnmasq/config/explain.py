"""``vpnmasq check-config --explain``: every key with its type, default and documentation,
as text or as the Markdown of docs/CONFIG.md.
"""

from __future__ import annotations

import textwrap
from typing import Literal

from vpnmasq.config.keys import (
    ESP_KEYS,
    FORWARD_KEYS,
    LIMIT_KEYS,
    ROUTE_KEYS,
    SYNC_KEYS,
    TIMEOUT_KEYS,
    TOP_KEYS,
    KeySpec,
)
from vpnmasq.config.schema import Config, EspPolicy, Limits, Route, Sync, Timeouts


# ----------------------------------------------------------------------------- docs
def _sections() -> list[tuple[str, str, tuple[KeySpec, ...], object]]:
    """(title, TOML prefix, keys, instance holding the defaults)."""
    return [
        ("Top level", "", TOP_KEYS, Config()),
        ("[timeouts] (seconds)", "timeouts.", TIMEOUT_KEYS, Timeouts()),
        ("[limits]", "limits.", LIMIT_KEYS, Limits()),
        ("[esp] (IPsec ESP association policy)", "esp.", ESP_KEYS, EspPolicy()),
        ("[sync] (active/standby table replication, docs/HA.md)", "sync.", SYNC_KEYS, Sync()),
        ("[[forward]] (one table per rule; publishes an inside server)", "", FORWARD_KEYS, None),
        (
            "[[route]] (one table per remote network behind a LAN VPN router)",
            "",
            ROUTE_KEYS,
            Route("0.0.0.0/32", "0.0.0.0"),
        ),
    ]


def _default_text(spec: KeySpec, instance: object) -> str:
    if instance is None or spec.required:
        return "required" if spec.required else "(unset)"
    return spec.kind.fmt(getattr(instance, spec.field))


def explain(fmt: Literal["text", "markdown"] = "text") -> str:
    """Every configuration key with its type, default and meaning (README uses markdown)."""
    out: list[str] = []
    if fmt == "markdown":
        for title, prefix, specs, inst in _sections():
            out += [f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
            for s in specs:
                cells = [f"`{prefix}{s.key}`", s.kind.name, f"`{_default_text(s, inst)}`", s.doc]
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            out.append("")
        return "\n".join(out)
    out += [
        "vpnmasq configuration file (TOML). Unknown keys are errors; every message names the",
        'key and its line. Port ranges are written "low-high" or [low, high]. Forward rules',
        "are counted from 1 in messages (forward[2] is the second [[forward]] table).",
        "",
    ]
    wrap = textwrap.TextWrapper(width=88, initial_indent="    ", subsequent_indent="    ")
    for title, prefix, specs, inst in _sections():
        out += [title, "-" * len(title)]
        for s in specs:
            default = "required" if s.required else f"default {_default_text(s, inst)}"
            out.append(f"{prefix}{s.key}  ({s.kind.name}; {default})")
            out += wrap.wrap(s.doc)
        out.append("")
    return "\n".join(out).rstrip() + "\n"
