"""The kernel fast path (``vpnmasq.datapath.offload``) under the same attacks as the slow
path: the nft maps it would install for the world of :func:`fuzz.world.build_world`, looked
up the way the kernel looks them up (``ip saddr . esp spi`` and ``ip saddr . @th,48,16``),
must deliver nothing of an outsider's, only established associations and calls are offloaded,
and a flood changes no map element. (The daemon does not run the offloader yet when this was
written; these tests pin the keys it will use. The namespace check of installed maps is in
tests/integration/test_offload.py.)"""

from __future__ import annotations

import random

import pytest
from fuzz.world import World, build_world

from tests.packets import ATTACKER, EXT, EXT2, MASQ, PRV1, PRV2, PRV3

offload = pytest.importorskip("vpnmasq.datapath.offload")


def maps(w: World) -> dict[str, dict[tuple[int, ...], int | None]]:
    out: dict[str, dict[tuple[int, ...], int | None]] = {}
    for el in offload.desired_elements(w.eng.table, w.now):
        out.setdefault(el.set, {})[el.key] = el.value
    return out


def fast_esp_in(m: dict[str, dict[tuple[int, ...], int | None]], src: int, spi: int) -> int | None:
    return m.get("esp_in", {}).get((src, spi))


def fast_gre_in(m: dict[str, dict[tuple[int, ...], int | None]], src: int, cid: int) -> int | None:
    return m.get("gre_in_addr", {}).get((src, cid))


def test_only_established_associations_and_calls_are_offloaded() -> None:
    w = build_world(0)
    m = maps(w)
    # PRV1's ESP association and both PPTP calls; PRV2's pending ESP init is not there
    assert m["esp_in"] == {(EXT, 0x2001): PRV1}
    assert set(m["esp_out"]) == {(PRV1, EXT, 0x1001)}
    assert {v for v in m["gre_in_addr"].values()} == {PRV1, PRV2}
    assert all(k[0] == EXT for k in m["gre_in_addr"])
    assert not any(k[1] == EXT2 for k in m["esp_out"])
    # every inbound key starts with the remote's address: no SPI or Call ID alone
    for name in ("esp_in", "gre_in_addr", "gre_in_call"):
        assert all(len(k) == 2 and k[0] in (EXT, EXT2) for k in m[name]), name


def test_an_outsider_misses_every_map() -> None:
    w = build_world(0)
    m = maps(w)
    for src in (ATTACKER, EXT2, PRV1, PRV3, MASQ):
        for spi in (0x2001, 0x1001, 0x3001):
            assert fast_esp_in(m, src, spi) is None
        for cid in range(65536):
            assert fast_gre_in(m, src, cid) is None
    # the real server reaches each call's host only with that call's outside ID
    hits = {cid: fast_gre_in(m, EXT, cid) for cid in range(65536)}
    owners = {w.outside_call_ids["pptp"]: PRV1, w.outside_call_ids["pptp2"]: PRV2}
    assert {c: h for c, h in hits.items() if h is not None} == owners


def test_a_flood_changes_no_map_element() -> None:
    from tests.pptp_wire import gre_packet
    from vpnmasq.helpers.isakmp import build_header
    from vpnmasq.packet.ipv4 import PROTO_ESP, build_ipv4
    from vpnmasq.packet.l4 import build_esp, build_udp

    w = build_world(0)
    before = maps(w)
    rng = random.Random(9)
    for k in range(6000):
        src = rng.choice((ATTACKER, EXT2, (192 << 24) | rng.getrandbits(16)))
        if k % 3 == 0:
            pkt = build_ipv4(src, MASQ, PROTO_ESP, build_esp(rng.getrandbits(32) | 1, 1))
        elif k % 3 == 1:
            pkt = gre_packet(src, MASQ, rng.getrandbits(16))
        else:
            pkt = build_udp(src, MASQ, 500, 500, build_header(rng.getrandbits(64) | 1, 0, 2))
        w.send(pkt, False)
    after = maps(w)
    # EXT2's first new SPI is PRV2's pending answer (the remote itself): anything else of
    # the flood leaves the maps as they were
    extra = {k: v for k, v in after.get("esp_in", {}).items() if k not in before["esp_in"]}
    assert all(k[0] == EXT2 and v == PRV2 for k, v in extra.items()), extra
    for name in ("gre_in_addr", "gre_in_call", "gre_out", "esp_out"):
        assert {k: v for k, v in after.get(name, {}).items() if k[0] != PRV2} == {
            k: v for k, v in before.get(name, {}).items() if k[0] != PRV2
        }, name
    assert after["esp_in"][(EXT, 0x2001)] == PRV1
