"""The table's compact forms (memory per mapping): a binding keeps a lone session in
a slot, standard keys are recomputed instead of stored, identifiers live in a bitmap, and the
small values that change hot paths (accept verdicts, dotted quads) equal their plain forms."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from tests.packets import EXT, EXT2, IN, MASQ, OUT, PRV1, build_udp, make_engine
from vpnmasq.conntrack.alloc import IdSet
from vpnmasq.conntrack.table import F_FAST_IN, F_FAST_OUT, Binding, Entry, MasqTable, standard_keys
from vpnmasq.packet.ipv4 import int_to_ip
from vpnmasq.verdict import Action, Verdict, accept


def session(remote: int, rport: int, alias: int = 61000) -> Entry:
    return Entry(17, "napt", "udp", PRV1, 4000, remote, rport, MASQ, alias, 0.0)


def test_binding_views_follow_its_sessions_from_one_to_many_and_back() -> None:
    t = MasqTable({"udp": 60.0}, 100)
    b = Binding(17, PRV1, 4000, 61000)
    t.add_binding(b)
    a, c, d = session(EXT, 53), session(EXT, 54), session(EXT2, 53)
    for e in (a, c, d):
        t.add(e, 0.0, standard_keys(e))  # type: ignore[arg-type]
        t.attach(e, b)
    assert b.n_sessions == 3
    assert dict(b.sessions) == {(EXT, 53): a, (EXT, 54): c, (EXT2, 53): d}
    assert dict(b.remotes) == {EXT: 2, EXT2: 1}
    assert b.has_remote(EXT2) and not b.has_remote(MASQ)
    t.remove(c)
    t.remove(d)
    assert b._many is None and b._one is a  # back to the compact form
    assert dict(b.sessions) == {(EXT, 53): a} and dict(b.remotes) == {EXT: 1}
    assert b.session(EXT, 53) is a and b.session(EXT, 54) is None
    t.remove(a)
    assert b.n_sessions == 0 and not b.sessions and not b.has_remote(EXT)


def test_standard_keys_are_not_stored_but_still_listed_and_removed() -> None:
    t = MasqTable({"udp": 60.0}, 100)
    e = session(EXT, 53)
    keys = (("o", 17, PRV1, 4000, EXT, 53), ("i", 17, 61000, EXT, 53))
    t.add(e, 0.0, keys)
    assert e._keys is None
    assert e.keys == keys
    assert all(t.index[k] is e for k in keys)
    t.add_key(e, ("extra", 1))
    assert e.keys == (*keys, ("extra", 1))
    t.remove(e)
    assert t.index == {}


def test_other_keys_are_kept_as_given() -> None:
    t = MasqTable({"udp": 60.0}, 100)
    e = session(EXT, 53)
    t.add(e, 0.0, (("custom", 1),))
    assert e._keys == (("custom", 1),)
    t.remove_key(e, ("custom", 1))
    assert e.keys == () and t.index == {}


def test_an_entry_enters_the_table_without_fast_path_marks() -> None:
    t = MasqTable({"udp": 60.0}, 100)
    e = session(EXT, 53)
    e.flags = F_FAST_OUT | F_FAST_IN | 1
    t.add(e, 0.0, standard_keys(e))  # type: ignore[arg-type]
    assert e.flags == 1


def test_equal_addresses_and_ports_share_one_object_per_table() -> None:
    eng = make_engine()
    for i in range(3):
        v = eng.handle(build_udp(PRV1, EXT, 40000 + i, 4444, b"x"), OUT, 0.0)
        assert v.accepted
    a, b, c = sorted(eng.table, key=lambda e: e.inside_port)
    assert a.remote_ip is b.remote_ip is c.remote_ip
    assert a.remote_port is b.remote_port is c.remote_port
    assert a.inside_ip is b.inside_ip


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 0xFFFF)), max_size=60))
def test_idset_behaves_like_a_set(ops: list[tuple[bool, int]]) -> None:
    s, ref = IdSet(), set()
    for add, x in ops:
        if add:
            s.add(x)
            ref.add(x)
        else:
            s.discard(x)
            ref.discard(x)
        assert len(s) == len(ref)
    assert set(s) == ref
    assert all(x in s for x in ref)
    assert -1 not in s and 0x10000 not in s and "x" not in s


def test_accept_is_a_plain_accept_verdict() -> None:
    v = accept(bytearray(b"abc"))
    assert v == Verdict(Action.ACCEPT, b"abc")
    assert type(v.payload) is bytes
    assert (v.reason, v.detail, v.local, v.released, v.icmp_back) == (None, "", False, (), None)
    assert v.accepted and hash(v) == hash(Verdict(Action.ACCEPT, b"abc"))


@given(st.integers(0, 0xFFFFFFFF))
def test_int_to_ip_is_the_dotted_quad(v: int) -> None:
    assert int_to_ip(v) == str(ipaddress.IPv4Address(v))


def test_int_to_ip_refuses_what_is_not_an_address() -> None:
    for bad in (-1, 1 << 32):
        try:
            int_to_ip(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_inbound_reply_still_reaches_the_host_after_compaction() -> None:
    eng = make_engine()
    v = eng.handle(build_udp(PRV1, EXT, 40000, 53, b"q"), OUT, 0.0)
    assert v.payload is not None
    alias = int.from_bytes(v.payload[20:22], "big")
    back = eng.handle(build_udp(EXT, MASQ, 53, alias, b"a"), IN, 0.1)
    assert back.payload is not None and back.payload[16:20] == PRV1.to_bytes(4, "big")
