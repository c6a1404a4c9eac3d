"""The sync wire format: what the standby accepts, and what it refuses with which reason."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpnmasq.sync.codec import (
    HEADER,
    REPLAY_WINDOW,
    Kind,
    Opener,
    ReplayWindow,
    Sealer,
    SyncError,
    check_key,
)

KEY = b"0123456789abcdef-shared\n"
WALL = 1_700_000_000.0


def pair(epoch: int = 7) -> tuple[Sealer, Opener]:
    return Sealer(KEY, node=1, epoch=epoch), Opener(KEY, own_node=2)


def refused(op: Opener, dgram: bytes) -> str:
    with pytest.raises(SyncError) as exc:
        op.open(dgram)
    return exc.value.reason


def test_a_sealed_message_opens_to_the_same_body_in_sequence() -> None:
    s, o = pair()
    body = {"records": [{"id": 3, "ext": {"out_spi": 0x1001}}], "remove": [9]}
    m1 = o.open(s.seal(Kind.DELTA, body, WALL))
    m2 = o.open(s.seal(Kind.HELLO, {"active": True}, WALL + 1))
    assert (m1.kind, m1.node, m1.epoch, m1.seq, m1.body) == (Kind.DELTA, 1, 7, 1, body)
    assert (m2.kind, m2.seq, m2.sent_ms) == (Kind.HELLO, 2, int((WALL + 1) * 1000))


def test_any_changed_byte_or_another_key_fails_authentication() -> None:
    s, o = pair()
    d = s.seal(Kind.DELTA, {"records": [], "remove": []}, WALL)
    for i in (5, HEADER.size + 1, len(d) - 1):  # header, body, tag
        bad = bytearray(d)
        bad[i] ^= 0x01
        assert refused(o, bytes(bad)) in ("sync_bad_auth", "sync_version")
    other = Opener(b"another key of 16 bytes", own_node=2)
    assert refused(other, d) == "sync_bad_auth"
    assert o.open(d).seq == 1  # the failures left the window alone


def test_a_version_this_one_does_not_speak_is_refused_even_with_a_valid_tag() -> None:
    s, o = pair()
    d = bytearray(s.seal(Kind.HELLO, {}, WALL))
    d[4] = 2
    assert refused(o, bytes(d)) == "sync_version"


def test_replayed_reordered_and_too_old_messages() -> None:
    s, o = pair()
    msgs = [s.seal(Kind.DELTA, {"n": i}, WALL + i) for i in range(REPLAY_WINDOW + 10)]
    o.open(msgs[1])
    o.open(msgs[0])  # reordered inside the window: accepted once
    assert refused(o, msgs[0]) == "sync_replayed"
    assert refused(o, msgs[1]) == "sync_replayed"
    o.open(msgs[-1])
    assert refused(o, msgs[2]) == "sync_too_old"  # behind the window
    assert o.open(msgs[-2]).body == {"n": REPLAY_WINDOW + 8}


def test_our_own_message_reflected_back_is_refused() -> None:
    s = Sealer(KEY, node=2, epoch=1)
    o = Opener(KEY, own_node=2)
    assert refused(o, s.seal(Kind.FULL, {}, WALL)) == "sync_own_node"


def test_a_restarted_peer_is_accepted_but_an_old_run_cannot_be_replayed() -> None:
    old, o = pair(epoch=1)
    recorded = old.seal(Kind.FULL, {"records": []}, WALL)
    o.open(old.seal(Kind.DELTA, {}, WALL + 5))
    new = Sealer(KEY, node=1, epoch=2)
    assert o.open(new.seal(Kind.HELLO, {}, WALL + 6)).epoch == 2  # restarted: new epoch
    assert refused(o, recorded) == "sync_stale_epoch"
    assert refused(o, old.seal(Kind.DELTA, {}, WALL + 5.5)) == "sync_stale_epoch"


def test_keys_shorter_than_128_bits_are_refused() -> None:
    assert check_key(b"  0123456789abcdef\n") == b"0123456789abcdef"
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Sealer(b"short\n", node=1, epoch=1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_only_ever_raises_sync_error(data: bytes) -> None:
    o = Opener(KEY, own_node=2)
    with pytest.raises(SyncError):
        o.open(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 200), max_size=120))
def test_the_window_accepts_each_sequence_number_at_most_once(seqs: list[int]) -> None:
    w = ReplayWindow()
    accepted: list[int] = []
    for q in seqs:
        if w.check(q) is None:
            w.accept(q)
            accepted.append(q)
    assert len(accepted) == len(set(accepted))
    # everything accepted was new and not more than the window behind the top at the time
    top = 0
    for q in accepted:
        assert q > top - REPLAY_WINDOW
        top = max(top, q)
