"""Re-reading the configuration in a running gateway (SIGHUP, ``systemctl reload``): which
changes it can take without a restart, and the table carried over into an engine built from
the new configuration, the way a handover carries it into a new process (entries that no
longer apply, e.g. a host outside the new ``inside_networks`` or a removed forward, are
dropped and counted by reason; timeouts are clamped to the new ones). The new engine
reports each dropped entry as removed (``why`` "reload"), as if its own table had removed
it: ``vpnmasq events`` readers and the removed-entries counters see it go. Pure: ``now``
and ``wall`` come from the caller.
"""

from __future__ import annotations

from dataclasses import fields

from vpnmasq import state
from vpnmasq.config import Config
from vpnmasq.conntrack.pool import PortPool
from vpnmasq.conntrack.table import Entry
from vpnmasq.engine import Engine
from vpnmasq.events import EntryExpired

__all__ = ["RELOAD_WHY", "RESTART_KEYS", "changed_keys", "left_behind", "rebuild", "restart_needed"]

#: the engine's word for an entry a reload did not carry over (events, counters)
RELOAD_WHY = "reload"

#: keys a running daemon cannot change: the queue it bound and how (queue_num, fail_open),
#: the sockets it listens on, the interface its address follower and rules were built
#: around, and the parts that hold state of their own (the mode's rule layout, the
#: offload table, the HA peer link)
RESTART_KEYS = (
    "outside_interface",
    "public_address",
    "mode",
    "queue_num",
    "fail_open",
    "control_socket",
    "metrics_listen",
    "offload",
    "sync",
)


def changed_keys(old: Config, new: Config) -> list[str]:
    """The top-level keys whose values differ, in the order Config declares them."""
    return [f.name for f in fields(Config) if getattr(old, f.name) != getattr(new, f.name)]


def restart_needed(old: Config, new: Config) -> list[str]:
    """The changed keys a reload cannot apply (empty: the reload can go ahead)."""
    out = [k for k in changed_keys(old, new) if k in RESTART_KEYS]
    if new.offload_on and new.mode == "userspace" and old.filtering != new.filtering:
        out.append("filtering (with offload in userspace mode)")
    return out


def rebuild(
    engine: Engine, config: Config, now: float, wall: float, pool: PortPool | None = None
) -> tuple[Engine, state.RestoreReport]:
    """A new engine for ``config`` (and its port ``pool``) holding what still applies of
    ``engine``'s table, and the report of what was dropped. Counters carry on (they are
    totals since start)."""
    fresh = Engine(config, engine.public_ip, pool=pool, port_in_use=engine.port_in_use)
    data = state.export_state(engine, now, wall)
    report = state.import_state(fresh, data, now, wall)
    for why, n in data.get("skipped", {}).items():  # what could not even be exported
        report.drop(str(why), int(n))
    for name, n in engine.counters.items():
        fresh.counters[name] = fresh.counters.get(name, 0) + n
    for e in left_behind(engine, fresh):
        fresh.count("removed:" + e.kind)
        fresh.events.append(EntryExpired(engine.row(e, now), RELOAD_WHY))
    return fresh, report


def left_behind(old: Engine, new: Engine) -> list[Entry]:
    """The entries of ``old`` that ``new`` does not hold (a restored entry keeps all its
    keys, a dropped one none), each once, in ``old``'s index order."""
    kept = new.table.index
    out: dict[int, Entry] = {}
    for key, e in old.table.index.items():
        if key not in kept and e.live:
            out.setdefault(id(e), e)
    return list(out.values())
