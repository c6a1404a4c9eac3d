"""IP fragments: later fragments follow the translation of their datagram's first fragment.

Owns the first-fragment states (by direction, addresses, protocol and IP id, kept for
``timeouts.fragment``, at most :data:`MAX_FRAGMENT_STATES`) and the fragments that arrive
before their first one (held, at most ``limits.fragment_buffer``, released with the first
fragment's verdict or dropped when it never comes).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpnmasq.packet.ipv4 import IPv4
from vpnmasq.verdict import Action, Direction, DropReason, Verdict, accept

if TYPE_CHECKING:  # pragma: no cover
    from vpnmasq.engine.core import Engine

#: First-fragment states kept (each maps later fragments of one datagram). A first fragment
#: is remembered for timeouts.fragment; this bounds what a flood of them can take (about
#: 150 bytes each, so some 10 MB).
MAX_FRAGMENT_STATES = 65536

FragKey = tuple[Direction, int, int, int, int]


@dataclass(slots=True)
class FragState:
    new_src: int
    new_dst: int
    ok: bool
    expires_at: float


class Fragments:
    def __init__(self, eng: Engine, dispatch: Callable[[IPv4, Direction, float], Verdict]) -> None:
        self.eng = eng
        self.dispatch = dispatch
        self.lifetime = eng.timeouts["fragment"]
        self.buffer = eng.config.limits.fragment_buffer
        self.states: OrderedDict[FragKey, FragState] = OrderedDict()
        self.held: dict[FragKey, list[tuple[object, bytes, float]]] = {}
        self.held_count = 0
        self.held_order: OrderedDict[FragKey, float] = OrderedDict()

    def handle(self, ip: IPv4, direction: Direction, now: float, token: object) -> Verdict:
        key = (direction, ip.src, ip.dst, ip.proto, ip.ident)
        if ip.frag_offset == 0:
            return self._first(ip, key, direction, now)
        st0 = self.states.get(key)
        if st0 is not None and st0.expires_at > now:
            return self._apply(ip.buf, st0)
        if self.held_count >= self.buffer:
            return self.eng.drop(DropReason.FRAGMENT_OVERFLOW, "too many fragments waiting", ip)
        self.held.setdefault(key, []).append((token, bytes(ip.buf), now))
        self.held_order.setdefault(key, now + self.lifetime)
        self.held_count += 1
        self.eng.count("fragments_held")
        return Verdict(Action.HOLD)

    def _first(self, ip: IPv4, key: FragKey, direction: Direction, now: float) -> Verdict:
        v = self.dispatch(ip, direction, now)
        until = now + self.lifetime
        if v.action is Action.ACCEPT:
            out = v.payload
            if out is None:
                st = FragState(ip.src, ip.dst, True, until)
            else:
                new_src = int.from_bytes(out[12:16], "big")
                st = FragState(new_src, int.from_bytes(out[16:20], "big"), True, until)
        else:
            st = FragState(0, 0, False, until)
        self.states[key] = st
        self.states.move_to_end(key)
        if len(self.states) > MAX_FRAGMENT_STATES:
            # a flood of first fragments must not grow memory for timeouts.fragment
            # seconds: forget the oldest (its later fragments wait, then time out)
            self.states.popitem(last=False)
            self.eng.count("fragment_states_evicted")
        held = self.held.pop(key, None)
        if held:
            self.held_order.pop(key, None)
            self.held_count -= len(held)
            rel = tuple((tok, self._apply(bytearray(data), st)) for tok, data, _ in held)
            return Verdict(v.action, v.payload, v.reason, v.detail, v.local, rel)
        return v

    def _apply(self, buf: bytearray, st: FragState) -> Verdict:
        if not st.ok:
            return self.eng.drop(DropReason.FILTERED, "fragment of a dropped datagram")
        ip = IPv4(buf)
        if ip.frag_offset == 0:  # a duplicate first fragment: needs the full treatment
            return self.eng.drop(DropReason.MALFORMED, "duplicate first fragment")
        if ip.src != st.new_src:
            ip.set_src(st.new_src)
        if ip.dst != st.new_dst:
            ip.set_dst(st.new_dst)
        return accept(buf)

    def release_all(self, why: str) -> list[tuple[object, Verdict]]:
        """Drop every held fragment (the engine is being replaced): their verdicts."""
        out = [
            (tok, self.eng.drop(DropReason.FRAGMENT_TIMEOUT, why))
            for held in self.held.values()
            for tok, _data, _t in held
        ]
        self.held.clear()
        self.held_order.clear()
        self.held_count = 0
        return out

    def next_deadline(self) -> float | None:
        cands = []
        if self.states:
            cands.append(next(iter(self.states.values())).expires_at)
        if self.held_order:
            cands.append(next(iter(self.held_order.values())))
        return min(cands) if cands else None

    def expire(self, now: float) -> list[tuple[object, Verdict]]:
        while self.states:
            k, st = next(iter(self.states.items()))
            if st.expires_at > now:
                break
            del self.states[k]
        out: list[tuple[object, Verdict]] = []
        while self.held_order:
            k, dl = next(iter(self.held_order.items()))
            if dl > now:
                break
            del self.held_order[k]
            for tok, _data, _t in self.held.pop(k, []):
                self.held_count -= 1
                out.append(
                    (tok, self.eng.drop(DropReason.FRAGMENT_TIMEOUT, "first fragment never came"))
                )
        return out

    def clear(self) -> None:
        self.states.clear()
