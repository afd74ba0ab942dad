"""The paired C=1 client (benchmarks/paired.py) against two real HTTP servers on 127.0.0.1.

Latency is not asserted (speed belongs to the benchmark report): what is checked is the
order requests are sent in, that the warm-up pass is not counted, that each input's two
latencies are paired, and that a failing or malformed answer stops the comparison.
"""

from __future__ import annotations

import statistics

import pytest

from benchmarks import paired
from tests.unit.http_stub import RecordingServer, recording_servers


def _target(server: RecordingServer, bodies, check=None) -> paired.Target:
    return paired.Target(server.name, "127.0.0.1", server.port, "/", bodies,
                         {"Content-Type": "text/plain"}, check)


@pytest.fixture
def servers():
    yield from recording_servers()


def test_blocks_alternate_and_the_warm_up_pass_is_not_counted(servers):
    make, log = servers
    bodies = [f"text {i}".encode() for i in range(5)]
    a, b = make("a"), make("b")
    result = paired.compare(_target(a, bodies), _target(b, bodies), inputs=5, rounds=2, block=2)
    # Three passes (one warm-up) over blocks [0, 1], [2, 3], [4]; who goes first alternates
    # block by block, carrying on across passes.
    expected, turn = [], 0
    for _ in range(3):
        for block in ([0, 1], [2, 3], [4]):
            order = ("a", "b") if turn % 2 == 0 else ("b", "a")
            turn += 1
            expected += [(name, f"text {i}") for name in order for i in block]
    assert log == expected
    assert result["requests_per_server"] == 10 and result["servers"] == ["a", "b"]
    d = result["difference_ms"]
    # One resampling unit a block and pass: [0, 1], [2, 3], [4], twice.
    assert result["blocks_resampled"] == 6
    d, p = result["difference_ms"], result["p50_difference_ms"]
    assert d["of"] == "a - b" and d["median_95"][0] <= d["median_95"][1]
    assert p["95"][0] <= p["95"][1]


def test_only_the_inputs_asked_for_are_sent(servers):
    make, log = servers
    bodies = [f"text {i}".encode() for i in range(10)]
    a, b = make("a"), make("b")
    paired.compare(_target(a, bodies), _target(b, bodies), inputs=3, rounds=1)
    assert sorted({body for _, body in log}) == ["text 0", "text 1", "text 2"]


def test_a_failed_or_malformed_answer_stops_the_comparison(servers):
    make, _ = servers
    bodies = [b"x", b"y"]
    ok = make("ok")
    failing = make("failing", answer=lambda body: (500, {"error": "boom"}))
    with pytest.raises(paired.PairedFailure, match="failing answered 500"):
        paired.compare(_target(ok, bodies), _target(failing, bodies), inputs=2, rounds=1)
    wrong = make("wrong")
    with pytest.raises(paired.PairedFailure, match="wrong shape"):
        paired.compare(_target(ok, bodies),
                       _target(wrong, bodies, check=lambda obj: len(obj) == 3),
                       inputs=2, rounds=1)


def test_the_servers_must_get_the_same_inputs(servers):
    make, _ = servers
    a, b = make("a"), make("b")
    with pytest.raises(ValueError):
        paired.compare(_target(a, [b"x"]), _target(b, [b"x", b"y"]), inputs=1, rounds=1)
    with pytest.raises(ValueError):
        paired.compare(_target(a, [b"x"]), _target(b, [b"x"]), inputs=1, rounds=0)


def test_block_bootstrap_brackets_the_statistic_and_is_repeatable():
    blocks = [[(10.0 + i + j, 10.0 + j) for j in range(5)] for i in range(-4, 9)]
    pairs = [pair for block in blocks for pair in block]
    low, high = paired.block_bootstrap(blocks, paired.median_of_differences)
    assert low < paired.median_of_differences(pairs) < high
    assert (low, high) == paired.block_bootstrap(blocks, paired.median_of_differences)
    constant = [[(5.0, 2.0)] * 4] * 6
    assert paired.block_bootstrap(constant, paired.difference_of_medians) == (3.0, 3.0)
    with pytest.raises(ValueError):
        paired.block_bootstrap([], paired.median_of_differences)


def test_blocks_are_resampled_whole():
    # Two kinds of block: every pair in one differs by +10, in the other by -10. Resampling
    # whole blocks can only ever draw +10s and -10s in block-sized lumps; with single
    # pairs the interval would be as narrow as for independent draws.
    blocks = [[(10.0, 0.0)] * 10 if i % 2 else [(0.0, 10.0)] * 10 for i in range(6)]
    low, high = paired.block_bootstrap(blocks, lambda pairs: statistics.fmean(
        x - y for x, y in pairs))
    assert low <= -10.0 * 2 / 6 and high >= 10.0 * 2 / 6
