"""Notice within a second when someone else's firewall change removes or alters vpnmasq's
rules, so the daemon can put them back: nftables notifications (NFNLGRP_NFTABLES) plus a
canary the loop checks (the ruleset generation id), then a comparison of fingerprints that
names what is missing. Parsing is pure; :class:`RuleWatch` holds the sockets and timers, the
daemon does the repair. Design and figures: docs/internals/datapath-rulewatch.md.
"""

from __future__ import annotations

import errno
import json
import shlex
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CANARY_INTERVAL_S",
    "SETTLE_S",
    "Change",
    "RuleWatch",
    "differences",
    "fingerprint",
    "parse_notifications",
    "relevant",
    "snapshot",
]

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NLMSG_ERROR = 2
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
# linux/netfilter/nf_tables.h: enum nf_tables_msg_types
NFT_MSG_NAMES = (
    "newtable", "gettable", "deltable", "newchain", "getchain", "delchain",
    "newrule", "getrule", "delrule", "newset", "getset", "delset",
    "newsetelem", "getsetelem", "delsetelem", "newgen", "getgen", "trace",
    "newobj", "getobj", "delobj", "getobj_reset", "newflowtable", "getflowtable",
    "delflowtable",
)  # fmt: skip
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
#: attribute 1 of every table, chain, rule, set, element and object message is the table
#: name (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, ...), attribute 2/3 the chain
#: of a rule / the name of a chain; attribute 1 of NEWGEN is the generation id (be32)
NFTA_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_CHAIN_NAME = 3
#: set elements change all the time (the offload sync) and never take a rule away
_IGNORED = frozenset({"newsetelem", "delsetelem", "newgen", "getgen", "trace"})

#: how often the loop looks at the generation id (and, with iptables-legacy, checks)
CANARY_INTERVAL_S = 0.5
#: a relevant notification schedules the check this much later
SETTLE_S = 0.05

_NLH = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_NFGEN = struct.Struct("=BBH")


@dataclass(frozen=True)
class Change:
    """One nftables notification: what changed, in which table (and chain)."""

    kind: str  # "deltable", "newrule", ... (NFT_MSG_NAMES)
    family: int
    table: str
    chain: str = ""
    gen: int | None = None  # NEWGEN: the generation id after the commit


def _attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        ln, typ = _NLA.unpack_from(data, off)
        if ln < 4:
            break
        out.setdefault(typ & 0x3FFF, data[off + 4 : off + ln])
        off += (ln + 3) & ~3
    return out


def _name(raw: bytes | None) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace") if raw else ""


def parse_notifications(data: bytes) -> list[Change]:
    """The nftables changes in one datagram from the NFNLGRP_NFTABLES socket (messages of
    other subsystems and malformed tails are skipped)."""
    out: list[Change] = []
    off = 0
    while off + _NLH.size <= len(data):
        ln, typ, _flags, _seq, _pid = _NLH.unpack_from(data, off)
        if ln < _NLH.size or off + ln > len(data):
            break
        if typ >> 8 == NFNL_SUBSYS_NFTABLES and ln >= _NLH.size + _NFGEN.size:
            msg = typ & 0xFF
            kind = NFT_MSG_NAMES[msg] if msg < len(NFT_MSG_NAMES) else f"msg{msg}"
            family = data[off + _NLH.size]
            a = _attrs(data, off + _NLH.size + _NFGEN.size, off + ln)
            if msg == NFT_MSG_NEWGEN:
                raw = a.get(NFTA_TABLE, b"")
                gen = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
                out.append(Change(kind, family, "", gen=gen))
            else:
                chain = a.get(NFTA_RULE_CHAIN if kind.endswith("rule") else NFTA_CHAIN_NAME)
                chain_name = _name(chain) if kind.endswith(("rule", "chain")) else ""
                out.append(Change(kind, family, _name(a.get(NFTA_TABLE)), chain_name))
        off += (ln + 3) & ~3
    return out


def relevant(changes: Iterable[Change], tables: Iterable[str]) -> bool:
    """Whether a change may have touched our rules: anything but set elements and
    generation markers, in one of ``tables`` (IPv4 family: our nft tables and the iptables
    tables holding our chains)."""
    names = set(tables)
    return any(
        c.kind not in _IGNORED and c.family == socket.AF_INET and c.table in names
        for c in changes
    )


# --- the fingerprint ------------------------------------------------------------------------


def _strip(obj: Any) -> Any:
    """An nft JSON object without what changes on its own (handles, set elements, counter
    values)."""
    if isinstance(obj, dict):
        return {
            k: _strip(v) for k, v in obj.items() if k not in ("handle", "elem", "packets", "bytes")
        }
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _nft_pieces(table: str, nft_json: str) -> dict[str, str]:
    try:
        items = json.loads(nft_json).get("nftables", [])
    except (ValueError, AttributeError):
        return {}
    pieces: dict[str, list[Any]] = {}
    head = f"nft table ip {table}"
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            continue
        (kind, body), = item.items()
        if kind == "metainfo" or not isinstance(body, dict):
            continue
        if kind == "table":
            pieces.setdefault(head, []).append(body.get("name"))
        elif kind == "rule":
            pieces.setdefault(f"{head} chain {body.get('chain')}", []).append(_strip(body))
        else:  # chain (its hook), set, map, ct timeout, ...
            pieces.setdefault(f"{head} {kind} {body.get('name')}", []).append(_strip(body))
    return {k: json.dumps(v, sort_keys=True) for k, v in pieces.items()}


def _jump_target(line: str) -> str | None:
    try:
        tokens = shlex.split(line)
    except ValueError:
        return None
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


def _iptables_pieces(save_text: str, prefix: str) -> dict[str, str]:
    pieces: dict[str, str] = {}
    table = ""
    rules: dict[str, list[str]] = {}
    order: list[str] = []
    for raw in [*save_text.splitlines(), "COMMIT"]:
        line = raw.strip()
        if line.startswith("*"):
            table, rules, order = line[1:], {}, []
        elif line.startswith(":"):
            name = line[1:].split()[0]
            rules.setdefault(name, [])
            order.append(name)
        elif line.startswith("-A "):
            chain = line.split()[1]
            rules.setdefault(chain, []).append(line)
        elif line == "COMMIT" and table:
            for chain in order:
                body = rules.get(chain, [])
                if chain.startswith(prefix):
                    pieces[f"iptables {table} chain {chain}"] = "\n".join(body)
                    continue
                tops = [i for i, ln in enumerate(body) if (_jump_target(ln) or "").startswith(prefix)]
                if tops:  # the top of the chain down to our last jump
                    pieces[f"iptables {table} {chain} jumps"] = "\n".join(body[: tops[-1] + 1])
            table = ""
    return pieces


def fingerprint(nft_tables: dict[str, str], save_text: str, prefix: str) -> dict[str, str]:
    """What vpnmasq has installed, as named pieces (pure). ``nft_tables`` maps each of our
    table names to its ``nft -j list table ip NAME`` output (empty: absent); ``save_text`` is
    ``iptables-save`` output; ``prefix`` names our iptables chains."""
    out: dict[str, str] = {}
    for table, text in nft_tables.items():
        if text:
            out.update(_nft_pieces(table, text))
    out.update(_iptables_pieces(save_text, prefix))
    return out


def differences(baseline: dict[str, str], current: dict[str, str]) -> list[str]:
    """What happened to the pieces of ``baseline`` (pure): ``removed ...``, ``emptied ...``
    (an iptables chain flushed), ``changed ...``; a removed table stands for everything in
    it. Pieces that appeared in a table of ours count as changes too."""
    gone_tables = [k for k in baseline if k.startswith("nft table ") and " chain " not in k
                   and len(k.split()) == 4 and k not in current]  # fmt: skip
    out: list[str] = [f"removed {k.removeprefix('nft ')}" for k in gone_tables]

    def covered(key: str) -> bool:
        return any(key.startswith(t + " ") for t in gone_tables)

    for key, value in baseline.items():
        if key in gone_tables or covered(key):
            continue
        label = key.removeprefix("nft ")
        if key not in current:
            out.append(f"removed {label}")
        elif current[key] != value:
            out.append(f"emptied {label}" if current[key] == "" else f"changed {label}")
    for key in current:
        if key not in baseline and key.startswith("nft table ") and not covered(key):
            if any(key.startswith(t + " ") for t in baseline if len(t.split()) == 4):
                out.append(f"added {key.removeprefix('nft ')}")
    return out


def snapshot(
    tables: Sequence[str], *, iptables: str = "iptables", iptables_tables: Sequence[str] = ()
) -> tuple[dict[str, str], str]:
    """Read what :func:`fingerprint` needs: ``nft -j list table ip T`` per table (empty when
    it does not exist) and ``iptables-save`` of ``iptables_tables``."""
    nft: dict[str, str] = {}
    for table in tables:
        r = subprocess.run(
            ["nft", "-j", "list", "table", "ip", table], capture_output=True, text=True, timeout=30
        )
        nft[table] = r.stdout if r.returncode == 0 else ""
    saves = []
    for t in iptables_tables:
        r = subprocess.run(
            [f"{iptables}-save", "-t", t], capture_output=True, text=True, timeout=30
        )
        saves.append(r.stdout if r.returncode == 0 else "")
    return nft, "\n".join(saves)


class RuleWatch:
    """The two sources and when to check; the daemon's loop drives it:

    * register :meth:`fileno` for reading and call :meth:`on_readable` when it is;
    * include :meth:`deadline` in its poll timeout and call :meth:`due` after each poll:
      True means "take a fingerprint now and compare" (:meth:`checked` afterwards).

    ``read_gen`` may be replaced (tests); ``poll_every_interval`` is for iptables-legacy.
    """

    def __init__(
        self,
        tables: Sequence[str],
        now: float,
        *,
        poll_every_interval: bool = False,
        read_gen: Callable[[], int | None] | None = None,
    ) -> None:
        self.tables = tuple(tables)
        self.poll_every_interval = poll_every_interval
        self.sock: socket.socket | None = None
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            s.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            s.setblocking(False)
            self.sock = s
        except OSError:
            self.sock = None  # canary only
        self._gen_sock: socket.socket | None = None
        self._read_gen = read_gen or self._getgen
        self.last_gen = self._read_gen()
        self.next_canary = now + CANARY_INTERVAL_S
        self.check_at: float | None = None
        #: whether nftables may have changed since the last check (a notification, a
        #: generation that moved, lost notifications); False when only the iptables-legacy
        #: poll asks for the check: then our nft table need not be read again, and reading
        #: it lists every offload map element (about 0.5 s per 20,000 on this machine)
        self.nft_changed = True
        self.notifications = 0
        self.overruns = 0

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def on_readable(self, now: float) -> None:
        """Drain the notifications; schedule a check if one concerns our tables."""
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:  # ENOBUFS: notifications were lost, so look
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    self.schedule(now, nft=True)
                    continue
                return
            changes = parse_notifications(data)
            for c in changes:
                if c.gen is not None:
                    self.last_gen = c.gen
            if relevant(changes, self.tables):
                self.notifications += 1
                self.schedule(now + SETTLE_S, nft=True)

    def schedule(self, when: float, *, nft: bool = True) -> None:
        """Check at ``when``; ``nft``: nftables may have changed (see :attr:`nft_changed`)."""
        self.check_at = when if self.check_at is None else min(self.check_at, when)
        self.nft_changed = self.nft_changed or nft

    def deadline(self) -> float:
        return self.next_canary if self.check_at is None else min(self.check_at, self.next_canary)

    def due(self, now: float) -> bool:
        if now >= self.next_canary:
            self.next_canary = now + CANARY_INTERVAL_S
            gen = self._read_gen()
            moved = gen is not None and gen != self.last_gen
            if self.poll_every_interval or moved:
                self.schedule(now, nft=moved)
            self.last_gen = gen
        return self.check_at is not None and now >= self.check_at

    def catch_up(self, now: float) -> bool:
        """Before the daemon changes its own rules and takes a new baseline: read the
        notifications not read yet and the generation, and say whether a check is due first
        (someone else changed the ruleset since the last look; with iptables-legacy, which
        tells nobody, always). Otherwise the new baseline would take a firewall reload that
        came just before (``nft -f /etc/nftables.conf; systemctl reload vpnmasq``) for ours."""
        if self.sock is not None:
            self.on_readable(now)
        gen = self._read_gen()
        if gen is not None and gen != self.last_gen:
            self.schedule(now, nft=True)
        self.last_gen = gen
        return self.check_at is not None or self.poll_every_interval

    def checked(self) -> None:
        """The check ran (and whatever it found was repaired): forget the schedule."""
        self.check_at = None
        self.nft_changed = False
        self.last_gen = self._read_gen()

    def _getgen(self) -> int | None:
        """The nftables generation id of this namespace (NFT_MSG_GETGEN), None on error."""
        try:
            if self._gen_sock is None:
                self._gen_sock = socket.socket(
                    socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER
                )
                self._gen_sock.settimeout(1.0)
            msg = _NLH.pack(
                _NLH.size + _NFGEN.size, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
                NLM_F_REQUEST, 0, 0,
            ) + _NFGEN.pack(socket.AF_UNSPEC, 0, 0)  # fmt: skip
            self._gen_sock.send(msg)
            data = self._gen_sock.recv(4096)
        except OSError:
            return None
        for c in parse_notifications(data):
            if c.gen is not None:
                return c.gen
        return None

    def close(self) -> None:
        for s in (self.sock, self._gen_sock):
            if s is not None:
                s.close()
        self.sock = self._gen_sock = None
