"""Kernel fast path for established VPN flows: nftables maps that rewrite statelessly.

Python decides, the kernel forwards. Once the engine has associated an ESP SPI pair or a
PPTP call's Call IDs, :class:`Offloader` puts the pair into maps of the nftables table
``ip vpnmasq_offload``; the kernel then rewrites later packets of that flow itself, in both
directions, before they would reach the queue. Packets whose key is in no map do not match
and take the queue as before, so the engine still sees every packet it has not understood
(new SPIs, rekeys, unknown calls, anything from another address).

Design notes, kernel facts and measurements: docs/internals/datapath-offload.md.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vpnmasq.conntrack.table import Entry
from vpnmasq.helpers.esp import EspState
from vpnmasq.helpers.pptp import Call, CallState
from vpnmasq.packet.ipv4 import int_to_ip, ip_to_int

__all__ = [
    "OFFLOAD_TABLE",
    "SYNC_INTERVAL_S",
    "Element",
    "OffloadError",
    "Offloader",
    "SyncReport",
    "desired_elements",
    "element_commands",
    "parse_elements",
    "pre_copy",
    "table_definition",
    "table_removal",
]

OFFLOAD_TABLE = "vpnmasq_offload"
#: how often the daemon syncs: the maps' counters refresh engine entries (whose timeouts are
#: minutes: esp 4200 s, gre 7440 s), ended flows leave the maps at the latest this late
SYNC_INTERVAL_S = 1.0
#: enhanced GRE v1 carrying PPP (RFC 2637 4.1): K and version 1 set, protocol 0x880B; the
#: mask ignores the S and A bits (libalias / nf_conntrack_proto_gre use the same test)
GRE_V1_MASK = 0xEF7FFFFF
GRE_V1_VALUE = 0x2001880B
#: priorities (nftables numbers): before iptables raw (-300) / mangle (-150)
PRE_PRIORITY = -310
POST_PRIORITY = -160

# map / set name -> (has a value, has counters)
_SETS: dict[str, tuple[bool, bool]] = {
    "esp_in": (True, True),
    "esp_out": (False, True),
    "gre_in_addr": (True, True),
    "gre_in_call": (True, False),
    "gre_out": (False, True),
    "esp_out_pre": (False, False),
    "gre_out_pre": (False, False),
}
_DECL = {
    "esp_in": "typeof ip saddr . esp spi : ip daddr",
    "esp_out": "typeof ip saddr . ip daddr . esp spi",
    "gre_in_addr": "typeof ip saddr . @th,48,16 : ip daddr",
    "gre_in_call": "typeof ip saddr . @th,48,16 : @th,48,16",
    "gre_out": "typeof ip saddr . ip daddr . @th,48,16",
    "esp_out_pre": "typeof ip saddr . ip daddr . esp spi",
    "gre_out_pre": "typeof ip saddr . ip daddr . @th,48,16",
}
#: outbound set -> its uncounted copy looked up in prerouting (derived by sync, see above)
_PRE_COPY = {"esp_out": "esp_out_pre", "gre_out": "gre_out_pre"}
#: which way the traffic counted by an element goes (for crediting the engine entry)
_DIRECTION = {"esp_in": "in", "esp_out": "out", "gre_in_addr": "in", "gre_out": "out"}


class OffloadError(RuntimeError):
    """nft refused a command (stderr in the message)."""


@dataclass(frozen=True, slots=True)
class Element:
    """One element of one of our maps or sets: ``key`` is the tuple of its concatenation
    (addresses as ints), ``value`` its map value (None in a set)."""

    set: str
    key: tuple[int, ...]
    value: int | None = None

    def nft(self) -> str:
        parts = [int_to_ip(k) if _is_addr(self.set, i) else str(k) for i, k in enumerate(self.key)]
        text = " . ".join(parts)
        if self.value is not None:
            v = int_to_ip(self.value) if self.set in ("esp_in", "gre_in_addr") else str(self.value)
            text += f" : {v}"
        return text


def _is_addr(set_name: str, i: int) -> bool:
    """Key position ``i`` of ``set_name`` holds an IPv4 address."""
    if set_name in ("esp_out", "gre_out", "esp_out_pre", "gre_out_pre"):
        return i < 2
    return i == 0


# ------------------------------------------------------------------ pure: what to offload
def _esp_elements(e: Entry) -> list[Element] | None:
    a = e.ext
    if (
        getattr(a, "state", None) is not EspState.ESTABLISHED
        or getattr(a, "tentative", True)
        or a.out_spi is None
        or a.in_spi is None
    ):
        return None
    return [
        Element("esp_in", (e.remote_ip, a.in_spi), e.inside_ip),
        Element("esp_out", (e.inside_ip, e.remote_ip, a.out_spi)),
    ]


def _gre_elements(e: Entry) -> list[Element] | None:
    c = e.ext
    if not isinstance(c, Call) or c.state is not CallState.ESTABLISHED or c.peer_id is None:
        return None
    return [
        Element("gre_in_addr", (c.remote_ip, c.outside_id), c.inside_ip),
        Element("gre_in_call", (c.remote_ip, c.outside_id), c.inside_id),
        Element("gre_out", (c.inside_ip, c.remote_ip, c.peer_id)),
    ]


def pre_copy(el: Element) -> Element:
    """The uncounted copy of an outbound element that prerouting looks up (see the module
    docstring: offloaded outbound packets are untracked there)."""
    return Element(_PRE_COPY[el.set], el.key, el.value)


def desired_elements(entries: Iterable[Entry], now: float) -> dict[Element, Entry]:
    """Every map element the live, eligible ESP and GRE entries call for, with its entry.

    When two entries want the same key (two LAN hosts that picked the same inbound SPI with
    one remote, 1 in 2**32), neither is offloaded: the engine keeps deciding those packets.
    """
    out: dict[Element, Entry] = {}
    keys: dict[tuple[str, tuple[int, ...]], Element | None] = {}
    for e in entries:
        if not e.live or e.expires_at <= now:
            continue
        if e.kind == "esp":
            els = _esp_elements(e)
        elif e.kind == "gre":
            els = _gre_elements(e)
        else:
            continue
        if not els:
            continue
        for el in els:
            k = (el.set, el.key)
            if k in keys:
                other = keys[k]
                if other is not None:
                    out.pop(other, None)
                keys[k] = None
                continue
            keys[k] = el
            out[el] = e
    return out


# ------------------------------------------------------------------ pure: nft text
def table_definition(public: str, outside_if: str, mark: int) -> str:
    """``nft -f`` input creating the table, its maps and sets (kept if they exist, with
    their elements) and its two chains (flushed and refilled: the public address is in
    them)."""
    pub = int_to_ip(ip_to_int(public))  # validates
    if not outside_if or '"' in outside_if or len(outside_if) > 15:
        raise ValueError(f"invalid interface name: {outside_if!r}")
    t = OFFLOAD_TABLE
    lines = [f"table ip {t} {{"]
    for name, (_v, counted) in _SETS.items():
        kind = "map" if _SETS[name][0] else "set"
        lines.append(f"\t{kind} {name} {{")
        lines.append(f"\t\t{_DECL[name]}")
        if counted:
            lines.append("\t\tcounter")
        lines.append("\t}")
    lines += [
        "\tchain pre {",
        f"\t\ttype filter hook prerouting priority {PRE_PRIORITY}; policy accept;",
        "\t}",
        "\tchain post {",
        f"\t\ttype filter hook postrouting priority {POST_PRIORITY}; policy accept;",
        "\t}",
        "}",
        f"flush chain ip {t} pre",
        f"flush chain ip {t} post",
    ]
    gre = f"ip protocol gre @th,0,32 & {GRE_V1_MASK:#x} == {GRE_V1_VALUE:#x}"
    into = f'iifname "{outside_if}" ip daddr {pub}'
    out = f'oifname "{outside_if}"'
    m = f"meta mark set {mark:#x}"
    lines += [
        f"add rule ip {t} pre {into} ip protocol esp"
        f" ip daddr set ip saddr . esp spi map @esp_in notrack {m} return",
        f"add rule ip {t} pre {into} {gre}"
        " ip daddr set ip saddr . @th,48,16 map @gre_in_addr"
        f" @th,48,16 set ip saddr . @th,48,16 map @gre_in_call notrack {m} return",
        f'add rule ip {t} pre iifname != "{outside_if}" ip protocol esp'
        " ip saddr . ip daddr . esp spi @esp_out_pre notrack return",
        f'add rule ip {t} pre iifname != "{outside_if}" {gre}'
        " ip saddr . ip daddr . @th,48,16 @gre_out_pre notrack return",
        f"add rule ip {t} post {out} ip protocol esp"
        f" ip saddr . ip daddr . esp spi @esp_out ip saddr set {pub} return",
        f"add rule ip {t} post {out} {gre}"
        f" ip saddr . ip daddr . @th,48,16 @gre_out ip saddr set {pub}",
    ]
    return "\n".join(lines) + "\n"


def table_removal() -> str:
    return f"table ip {OFFLOAD_TABLE} {{}}\ndelete table ip {OFFLOAD_TABLE}\n"


def element_commands(add: Iterable[Element], delete: Iterable[Element]) -> str:
    """``nft -f`` input deleting then adding elements (one transaction)."""
    lines = [
        f"delete element ip {OFFLOAD_TABLE} {el.set} {{ {_key_text(el)} }}" for el in delete
    ]
    lines += [f"add element ip {OFFLOAD_TABLE} {el.set} {{ {el.nft()} }}" for el in add]
    return "\n".join(lines) + ("\n" if lines else "")


def _key_text(el: Element) -> str:
    return Element(el.set, el.key).nft()


def parse_elements(nft_json: str) -> dict[Element, tuple[int, int]]:
    """Our elements in ``nft -j list table ip vpnmasq_offload`` output, with their counters
    (packets, bytes; zeros for uncounted sets)."""
    out: dict[Element, tuple[int, int]] = {}
    data = json.loads(nft_json)
    for obj in data.get("nftables", []):
        s = obj.get("set") or obj.get("map")
        if not isinstance(s, dict) or s.get("table") != OFFLOAD_TABLE or s.get("name") not in _SETS:
            continue
        name = s["name"]
        for item in s.get("elem", []):
            value: Any = None
            if isinstance(item, list) and len(item) == 2:  # map: [key, value]
                item, value = item
            counters = (0, 0)
            if isinstance(item, dict) and "elem" in item:
                c = item["elem"].get("counter") or {}
                counters = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
                item = item["elem"].get("val")
            if isinstance(item, dict) and "concat" in item:
                parts = item["concat"]
            else:
                continue
            key = tuple(_as_int(p) for p in parts)
            out[Element(name, key, None if value is None else _as_int(value))] = counters
    return out


def _as_int(v: object) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return ip_to_int(v) if "." in v else int(v, 0)
    raise ValueError(f"unexpected element part {v!r}")


# ------------------------------------------------------------------ the I/O shell
Runner = Callable[[list[str], str | None], str]


def _default_runner(netns: str | None) -> Runner:
    def run(argv: list[str], stdin: str | None) -> str:
        full = (["ip", "netns", "exec", netns] if netns else []) + argv
        try:
            r = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OffloadError(f"{' '.join(argv)}: {exc}") from exc
        if r.returncode != 0:
            raise OffloadError(f"{' '.join(argv)} failed: {r.stderr.strip()}\n{stdin or ''}")
        return r.stdout

    return run


@dataclass
class SyncReport:
    added: int = 0
    removed: int = 0
    credited: int = 0  # entries refreshed by kernel-forwarded traffic
    offloaded: int = 0  # elements in the maps after the sync


@dataclass
class Offloader:
    """Keeps ``ip vpnmasq_offload`` in step with an engine. Not thread-safe; the daemon's loop
    owns it: :meth:`install` at start, :meth:`sync` every :data:`SYNC_INTERVAL_S` (and when
    ESP/GRE entries end), :meth:`remove` at stop (unless handing over)."""

    public: str
    outside_if: str
    mark: int
    netns: str | None = None
    runner: Runner | None = None
    #: last counters seen per element (baseline for crediting)
    seen: dict[Element, tuple[int, int]] = field(default_factory=dict)
    offloaded: dict[Element, Entry] = field(default_factory=dict)
    errors: int = 0
    last_error: str | None = None
    syncs: int = 0

    def __post_init__(self) -> None:
        self._run: Runner = self.runner or _default_runner(self.netns)
        self._offloaded_ids: set[int] = set()

    # --- lifecycle ---------------------------------------------------------------------
    def install(self) -> None:
        """Create the table (or refresh its chains, keeping elements: the first sync then
        reconciles them with the engine's table)."""
        self._run(["nft", "-f", "-"], table_definition(self.public, self.outside_if, self.mark))

    def remove(self) -> None:
        self._run(["nft", "-f", "-"], table_removal())
        self.seen.clear()
        self.offloaded.clear()
        self._offloaded_ids = set()

    def set_public(self, public: str) -> None:
        """The public address changed: chains are rebuilt (elements stay; sync corrects)."""
        self.public = public
        self.install()

    # --- the sync ----------------------------------------------------------------------
    def read(self) -> dict[Element, tuple[int, int]]:
        return parse_elements(self._run(["nft", "-j", "list", "table", "ip", OFFLOAD_TABLE], None))

    def sync(self, engine: Any, now: float) -> SyncReport:
        """Credit kernel-forwarded traffic to entries, then make the maps match the table."""
        rep = SyncReport()
        try:
            actual = self.read()
        except (OffloadError, ValueError) as exc:
            self._failed(exc)
            return rep
        self.syncs += 1
        desired = desired_elements(_candidates(engine.table), now)
        # 1. activity: what the kernel forwarded since the last look refreshes the entry
        credited: set[int] = set()
        for el, (pk, by) in actual.items():
            base = self.seen.get(el)
            e = desired.get(el)
            if base is not None and e is not None and pk > base[0]:
                _credit(engine, e, _DIRECTION.get(el.set, ""), pk - base[0], by - base[1], now)
                credited.add(id(e))
        rep.credited = len(credited)
        # 2. the maps follow the table (and the prerouting copies follow the outbound sets)
        copies = {pre_copy(el) for el in desired if el.set in _PRE_COPY}
        stale = [el for el in actual if el not in desired and el not in copies]
        new = [el for el in desired if el not in actual]
        new_copies = [el for el in copies if el not in actual]
        if stale or new or new_copies:
            try:
                self._run(["nft", "-f", "-"], element_commands([*new, *new_copies], stale))
            except OffloadError as exc:
                self._failed(exc)
                new = []  # retried next sync; counters below stay consistent
        stale = [el for el in stale if el.set not in _PRE_COPY.values()]  # report originals
        self.seen = {el: actual.get(el, (0, 0)) for el in desired if el in actual or el in new}
        self.offloaded = {el: desired[el] for el in self.seen}
        self._offloaded_ids = {id(e) for e in self.offloaded.values()}
        rep.added, rep.removed, rep.offloaded = len(new), len(stale), len(self.offloaded)
        return rep

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = str(exc).splitlines()[0][:300]

    @staticmethod
    def wants_sync(events: Iterable[object]) -> bool:
        """Whether drained engine events ended an ESP or GRE entry (sync now, not later)."""
        for ev in events:
            row = getattr(ev, "row", None)
            if type(ev).__name__ == "EntryExpired" and getattr(row, "proto", "") in ("esp", "gre"):
                return True
        return False

    # --- status ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        flows: dict[int, dict[str, Any]] = {}
        for el, e in self.offloaded.items():
            f = flows.setdefault(
                id(e),
                {
                    "proto": e.kind,
                    "inside": int_to_ip(e.inside_ip),
                    "remote": int_to_ip(e.remote_ip),
                    "kernel_pkts_out": 0,
                    "kernel_pkts_in": 0,
                },
            )
            if el.set == "esp_in":
                f["spi_in"] = f"0x{el.key[1]:08x}"
            elif el.set == "esp_out":
                f["spi_out"] = f"0x{el.key[2]:08x}"
            elif el.set == "gre_in_call":
                f["call_id_outside"] = el.key[1]
                f["call_id_inside"] = el.value
            elif el.set == "gre_out":
                f["peer_call_id"] = el.key[2]
            d = _DIRECTION.get(el.set)
            if d is not None:
                f[f"kernel_pkts_{d}"] += self.seen.get(el, (0, 0))[0]
        return {
            "enabled": True,
            "flows": sorted(flows.values(), key=lambda f: (f["proto"], f["inside"], f["remote"])),
            "elements": len(self.offloaded),
            "syncs": self.syncs,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def is_offloaded(self, entry: Entry) -> bool:
        """O(1): status asks this for every row. Entries listed in ``offloaded`` stay alive
        while listed, so their ids cannot be reused by other entries."""
        return id(entry) in self._offloaded_ids


def _candidates(table: Any) -> Iterator[Entry]:
    """ESP and GRE entries of the table (its ``esp`` and ``gre`` timeout classes hold the
    associated ones), without walking the whole table."""
    for tclass in ("esp", "gre"):
        yield from table.entries_of(tclass)


def _credit(engine: Any, e: Entry, direction: str, pkts: int, nbytes: int, now: float) -> None:
    engine.table.touch(e, now)
    if direction == "in":
        e.pkts_in += pkts
        e.bytes_in += max(0, nbytes)
        e.last_in = now
    elif direction == "out":
        e.pkts_out += pkts
        e.bytes_out += max(0, nbytes)
        e.last_out = now
    a = e.ext
    if hasattr(a, "last_seen"):
        a.last_seen = now
