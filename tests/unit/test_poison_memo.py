"""The gateway's memory of inputs that killed the workers running them."""

from __future__ import annotations

from gateway.poison_memo import PoisonMemo, fingerprinter


def test_a_fingerprint_tells_apart_what_the_workers_would_compute_differently():
    params = {"top_k": 2, "targets": ["x"]}
    base = fingerprinter("m", "fill-mask", params, False, "")("a [MASK]")
    assert base == fingerprinter("m", "fill-mask", {"targets": ["x"], "top_k": 2}, False,
                                 "")("a [MASK]")
    others = [
        fingerprinter("m", "fill-mask", params, False, "")("a [MASK] "),
        fingerprinter("m", "fill-mask", params, False, "")({"text": "a [MASK]"}),
        fingerprinter("m", "fill-mask", {"top_k": 3, "targets": ["x"]}, False, "")("a [MASK]"),
        fingerprinter("m", "fill-mask", params, True, "")("a [MASK]"),
        fingerprinter("m", "fill-mask", params, False, "query")("a [MASK]"),
        fingerprinter("m", "feature-extraction", params, False, "")("a [MASK]"),
        fingerprinter("m2", "fill-mask", params, False, "")("a [MASK]"),  # a new model
    ]
    assert len({base, *others}) == len(others) + 1


def test_a_requests_parameters_are_encoded_once_for_all_its_inputs(monkeypatch):
    """Once per input, a 4 MB body of 256 inputs with a large ``targets`` list took 30 s of
    the gateway's event loop while anything was remembered."""
    import gateway.poison_memo as poison_memo

    encoded = []
    real = poison_memo.encode_canonical
    monkeypatch.setattr(poison_memo, "encode_canonical",
                        lambda value: encoded.append(value) or real(value))
    digest_of = fingerprinter("m", "fill-mask", {"targets": ["w"] * 1000}, False, "")
    digests = [digest_of(f"text {i} [MASK]") for i in range(256)]
    assert len(set(digests)) == 256
    assert len(encoded) == 1 + 256 and encoded[1:] == [f"text {i} [MASK]" for i in range(256)]


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


def test_what_is_remembered_now_leaves_out_the_expired():
    memo = PoisonMemo(60.0)
    memo.remember(b"p", now=0.0)
    assert memo.remembered(now=30.0) == 1 and memo.remembered(now=61.0) == 0


def test_a_memory_of_zero_remembers_nothing():
    memo = PoisonMemo(0.0)
    memo.remember(b"p", now=0.0)
    assert len(memo) == 0 and memo.known_for(b"p", now=0.0) is None
