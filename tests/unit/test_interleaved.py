"""Interleaved load points (benchmarks/interleaved.py) against two real HTTP servers on
127.0.0.1, driven by the real closed-loop load generator.

What is checked is the schedule (warm-up slices first and not counted, then one slice per
server a round, alternating who goes first, never overlapping), the pooling of slices, and
the round bootstrap. The one speed comparison is between two stub servers, one of which
holds every answer 100 ms: the ratio must say which is faster, by a margin no machine noise
can reverse.
"""

from __future__ import annotations

import threading

import pytest

from benchmarks import interleaved
from tests.unit.http_stub import RecordingServer, recording_servers

BODIES = [b"one", b"two", b"three"]


def _target(server: RecordingServer) -> interleaved.Target:
    return interleaved.Target(server.name, server.url, BODIES, {"Content-Type": "text/plain"},
                              decode="json", check=lambda obj: obj == [1.0, 2.0])


@pytest.fixture
def servers():
    yield from recording_servers()


@pytest.fixture
def slices_run(servers, monkeypatch):
    """Every slice run, in order: (server, seconds, requests it got, its first and past-last
    index in the servers' shared log); the slices still run for real."""
    _, log = servers
    run = interleaved._slice
    seen: list[tuple[str, float, int, int, int]] = []

    def spy(target, *, duration_s, **kwargs):
        start = len(log)
        got = run(target, duration_s=duration_s, **kwargs)
        seen.append((target.name, duration_s, len(log) - start, start, len(log)))
        return got

    monkeypatch.setattr(interleaved, "_slice", spy)
    return seen


def test_slices_alternate_after_uncounted_warm_ups(servers, slices_run):
    make, log = servers
    seen = slices_run
    a, b = make("a"), make("b")
    result = interleaved.compare(_target(a), _target(b), concurrency=2, rounds=3, slice_s=0.2,
                                 warmup_s=0.1)
    assert [(name, d) for name, d, *_ in seen] == [
        ("a", 0.1), ("b", 0.1),                      # warm-up, once each
        ("a", 0.2), ("b", 0.2), ("b", 0.2), ("a", 0.2), ("a", 0.2), ("b", 0.2)]
    # A slice's requests all went to its own server, none to the other: no overlap.
    for name, _, count, start, end in seen:
        assert count > 0 and {who for who, _ in log[start:end]} == {name}
    # Only the measured slices count.
    for name in ("a", "b"):
        measured = sum(count for who, d, count, *_ in seen if who == name and d == 0.2)
        assert result[name]["ok"] == measured == result[name]["statuses"]["200"]
        assert len(result[name]["slices_rps"]) == 3
        assert result[name]["latency_ms"]["p50"] <= result[name]["latency_ms"]["p99"]
    ratio = result["throughput_ratio"]
    assert ratio["of"] == "a / b" and ratio["95"][0] <= ratio["value"] <= ratio["95"][1]
    assert result["servers"] == ["a", "b"] and result["concurrency"] == 2


def test_the_ratio_says_which_server_is_faster(servers):
    make, _ = servers
    never = threading.Event()

    def slow_answer(body):
        never.wait(0.1)  # the stub's work: 100 ms an answer
        return 200, [1.0, 2.0]

    fast = make("fast")
    slow = make("slow", answer=slow_answer)
    result = interleaved.compare(_target(fast), _target(slow), concurrency=1, rounds=2,
                                 slice_s=0.5, warmup_s=0)
    # At C=1 the slow server answers at most 10 a second; the plain stub, tens of times
    # that even on a busy machine.
    assert result["slow"]["throughput_rps"] <= 10
    assert result["throughput_ratio"]["value"] > 2
    assert result["throughput_ratio"]["95"][0] > 1


def test_failed_answers_are_counted_not_fatal(servers):
    make, _ = servers
    ok = make("ok")
    failing = make("failing", answer=lambda body: (503, {"error": "busy"}))
    result = interleaved.compare(_target(ok), _target(failing), concurrency=2, rounds=1,
                                 slice_s=0.2, warmup_s=0)
    assert result["failing"]["ok"] == 0 and result["failing"]["statuses"].get("503", 0) > 0
    assert result["failing"]["latency_ms"] == {"p50": None, "p99": None}
    assert result["throughput_ratio"]["value"] == float("inf")


def test_bad_arguments_are_refused(servers):
    make, _ = servers
    a, b = _target(make("a")), _target(make("b"))
    for kwargs in ({"rounds": 0}, {"slice_s": 0}, {"concurrency": 0}):
        args = dict(concurrency=1, rounds=1, slice_s=0.1, warmup_s=0) | kwargs
        with pytest.raises(ValueError):
            interleaved.compare(a, b, **args)


def _slice(ok: int, seconds: float) -> interleaved.Slice:
    return interleaved.Slice(ok, seconds, [1.0] * ok, {"200": ok})


def test_the_ratio_pools_slices_and_the_interval_resamples_rounds():
    # Throughput over all slices, not a mean of per-slice rates: 30 answers in 2 s + 10 in
    # 2 s is 10 req/s, against 5 req/s.
    rounds = [(_slice(30, 2.0), _slice(10, 2.0)), (_slice(10, 2.0), _slice(10, 2.0))]
    assert interleaved.ratio(rounds) == pytest.approx(2.0)
    low, high = interleaved.round_bootstrap(rounds)
    # Resampling whole rounds: either round twice (3.0 or 1.0), or both (2.0).
    assert (low, high) == (pytest.approx(1.0), pytest.approx(3.0))
    assert interleaved.round_bootstrap(rounds) == (low, high)  # seeded: repeatable
    steady = [(_slice(20, 1.0), _slice(10, 1.0))] * 5
    assert interleaved.round_bootstrap(steady) == (pytest.approx(2.0), pytest.approx(2.0))
    with pytest.raises(ValueError):
        interleaved.round_bootstrap([])
