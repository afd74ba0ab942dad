"""The gateway's memory of inputs that killed the workers running them."""

from __future__ import annotations

from gateway.poison_memo import PoisonMemo, fingerprint


def test_a_fingerprint_tells_apart_what_the_workers_would_compute_differently():
    base = fingerprint("fill-mask", "a [MASK]", {"top_k": 2, "targets": ["x"]}, False, "")
    assert base == fingerprint("fill-mask", "a [MASK]", {"targets": ["x"], "top_k": 2}, False, "")
    others = [
        fingerprint("fill-mask", "a [MASK] ", {"top_k": 2, "targets": ["x"]}, False, ""),
        fingerprint("fill-mask", "a [MASK]", {"top_k": 3, "targets": ["x"]}, False, ""),
        fingerprint("fill-mask", "a [MASK]", {"top_k": 2, "targets": ["x"]}, True, ""),
        fingerprint("fill-mask", "a [MASK]", {"top_k": 2, "targets": ["x"]}, False, "query"),
        fingerprint("feature-extraction", "a [MASK]", {"top_k": 2, "targets": ["x"]}, False, ""),
        fingerprint("fill-mask", {"text": "a [MASK]"}, {"top_k": 2, "targets": ["x"]}, False, ""),
    ]
    assert len({base, *others}) == len(others) + 1


def test_an_input_is_remembered_for_its_time_then_forgotten():
    memo = PoisonMemo(60.0)
    assert not memo
    memo.remember(b"p", now=100.0)
    assert memo.known_for(b"p", now=130.0) == 30.0
    assert memo.known_for(b"other", now=130.0) is None
    assert memo.known_for(b"p", now=160.0) is None and len(memo) == 0


def test_found_again_its_time_starts_afresh_and_it_is_forgotten_last():
    memo = PoisonMemo(60.0, max_remembered=2)
    memo.remember(b"first", now=0.0)
    memo.remember(b"second", now=10.0)
    memo.remember(b"first", now=20.0)  # again: its 60 s from now, and now the newest
    assert memo.known_for(b"first", now=65.0) == 15.0
    assert memo.known_for(b"second", now=65.0) == 5.0
    memo.remember(b"third", now=66.0)  # past the bound: the oldest, "second", goes
    assert memo.known_for(b"second", now=66.0) is None
    assert memo.known_for(b"first", now=66.0) == 14.0
    assert memo.known_for(b"third", now=66.0) == 60.0


def test_past_its_bound_the_oldest_is_forgotten_first():
    memo = PoisonMemo(600.0, max_remembered=3)
    for i in range(5):
        memo.remember(bytes([i]), now=float(i))
    assert len(memo) == 3
    assert [memo.known_for(bytes([i]), now=5.0) is not None for i in range(5)] == [
        False, False, True, True, True]


def test_a_memory_of_zero_remembers_nothing():
    memo = PoisonMemo(0.0)
    memo.remember(b"p", now=0.0)
    assert len(memo) == 0 and memo.known_for(b"p", now=0.0) is None
