"""vpnmasq's daemon with the kernel fast path (:mod:`vpnmasq.datapath.offload`) switched on.

Used by the lab benchmark (``offload`` mode) until the daemon grows the hook itself. It is the
hook, written as a subclass of :class:`vpnmasq.daemon.Gateway`, so it shows exactly what the
daemon needs (see docs/BENCHMARKS.md, "Offload: the daemon hook"):

* ``start()``: after the rules, ``Offloader(public, outside_interface, mark).install()``;
* ``step()``: ``offloader.sync(engine, now)`` every ``SYNC_INTERVAL_S``, and at once when the
  drained events ended an ESP or GRE entry (``Offloader.wants_sync(events)``);
* ``timeout()``: wake up for the next sync;
* ``_follow_address()``: ``offloader.set_public(new)`` when the public address changes;
* ``_status()``: ``payload["offload"] = offloader.status()``;
* ``stop()``: ``offloader.remove()`` unless handing over (the successor reconciles).

    python bench/offload_gateway.py --config FILE
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Any

from vpnmasq import daemon
from vpnmasq.config import load_config_file
from vpnmasq.datapath.offload import SYNC_INTERVAL_S, Offloader
from vpnmasq.events import Event


class _Tap(daemon.RateLimitedLog):
    """The daemon's event logger, also noting when an ESP/GRE entry ended."""

    ended = False

    def event(self, ev: Event, now: float) -> None:
        if Offloader.wants_sync([ev]):
            self.ended = True
        super().event(ev, now)


class OffloadingGateway(daemon.Gateway):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.rl = _Tap(daemon.log)
        self.offloader: Offloader | None = None
        self.next_sync = 0.0

    def start(self) -> None:
        super().start()
        cfg = self.config
        assert self.public is not None, "offload needs the public address"
        self.offloader = Offloader(self.public, cfg.outside_interface, cfg.mark)
        self.offloader.install()
        daemon.log.info("offload: table ip vpnmasq_offload installed")

    def step(self, timeout: float | None) -> None:
        super().step(timeout)
        now = time.monotonic()
        tap = self.rl
        assert isinstance(tap, _Tap)
        if self.offloader is not None and (now >= self.next_sync or tap.ended):
            tap.ended = False
            rep = self.offloader.sync(self.engine, now)
            self.next_sync = now + SYNC_INTERVAL_S
            if rep.added or rep.removed:
                daemon.log.info(
                    "offload: +%d -%d elements (%d offloaded)", rep.added, rep.removed, rep.offloaded
                )

    def timeout(self) -> float:
        return min(super().timeout(), max(0.0, self.next_sync - time.monotonic()))

    def _follow_address(self, now: float) -> None:
        old = self.public
        super()._follow_address(now)
        if self.offloader is not None and self.public and self.public != old:
            self.offloader.set_public(self.public)

    def _status(self) -> dict[str, Any]:
        payload = super()._status()
        if self.offloader is not None:
            payload["offload"] = self.offloader.status()
        return payload

    def stop(self) -> None:
        super().stop()
        if self.offloader is not None and not self.keep_rules:
            self.offloader.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    a = ap.parse_args()
    config = load_config_file(a.config)
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, config.log_level.upper(), 20))
    gw = OffloadingGateway(config)

    def _stop(signum: int, _frame: object) -> None:
        gw.stopping = True

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _stop)
    try:
        gw.start()
        gw.loop()
    finally:
        gw.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
