"""Unit tests for worker/latency_model.py: the online fit ``latency ~ a + b x cost`` and the
wait it justifies (:func:`worth_waiting`). Pure arithmetic: no clock, no asyncio."""

from __future__ import annotations

import math
import random
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.latency_model import LatencyModel, worth_waiting

#: A GPU-like device: a call costs 50 ms however small, a padded token 1 us.
GPU_A, GPU_B = 0.05, 1e-6
#: A CPU-like device: 2 ms per call, 100 us per padded token (64 tokens: 6.4 ms).
CPU_A, CPU_B = 0.002, 1e-4


def fitted(a: float, b: float, costs=(16, 64, 128, 256, 512, 1024), rounds: int = 5,
           **kwargs) -> LatencyModel:
    model = LatencyModel(**kwargs)
    for _ in range(rounds):
        for x in costs:
            model.observe(x, a + b * x)
    return model


# -- the fit -----------------------------------------------------------------------------


def test_a_fresh_model_knows_nothing():
    model = LatencyModel()
    assert model.observations == 0
    assert model.fixed_s == 0.0 and model.per_cost_s == 0.0
    assert model.predict(100) == 0.0


@pytest.mark.parametrize(("a", "b"), [(0.05, 1e-6), (0.002, 1e-4), (0.0, 3e-5), (0.01, 0.0)])
def test_recovers_a_and_b_from_exact_data(a, b):
    model = fitted(a, b)
    assert model.observations == 30
    assert model.fixed_s == pytest.approx(a, rel=1e-6, abs=1e-9)
    assert model.per_cost_s == pytest.approx(b, rel=1e-6, abs=1e-12)
    assert model.predict(300) == pytest.approx(a + b * 300, rel=1e-6)


def test_two_different_costs_are_enough():
    model = LatencyModel()
    model.observe(10, 0.02 + 0.001 * 10)
    model.observe(50, 0.02 + 0.001 * 50)
    assert model.fixed_s == pytest.approx(0.02)
    assert model.per_cost_s == pytest.approx(0.001)


@pytest.mark.parametrize("seed", range(4))
def test_recovers_a_and_b_from_noisy_data(seed):
    rng = random.Random(seed)
    a, b, noise = 0.05, 1e-4, 0.002
    model = LatencyModel()
    for _ in range(300):
        x = rng.uniform(16, 1024)
        model.observe(x, a + b * x + rng.gauss(0.0, noise))
    assert model.fixed_s == pytest.approx(a, rel=0.1)
    assert model.per_cost_s == pytest.approx(b, rel=0.1)


def test_follows_a_change_and_forgets_the_old_regime():
    rng = random.Random(0)
    old = [rng.uniform(16, 1024) for _ in range(100)]
    new = [rng.uniform(16, 1024) for _ in range(150)]

    def run(model: LatencyModel) -> LatencyModel:
        for x in old:
            model.observe(x, 0.01 + 2e-4 * x)  # a CPU-like regime ...
        for x in new:
            model.observe(x, 0.08 + 5e-5 * x)  # ... then the device changes
        return model

    model = run(LatencyModel())
    assert model.fixed_s == pytest.approx(0.08, rel=0.02)
    assert model.per_cost_s == pytest.approx(5e-5, rel=0.02)
    # Without forgetting, the old regime still pulls the fit well off.
    stale = run(LatencyModel(decay=1.0))
    assert abs(stale.fixed_s - 0.08) > 0.1 * 0.08 or abs(stale.per_cost_s - 5e-5) > 0.1 * 5e-5


def test_the_change_shows_gradually():
    model = fitted(0.01, 2e-4)
    model.observe(500, 0.2)  # one batch, much slower than the model predicts (0.11 s)
    # It moves the prediction toward the new observation, not all the way.
    assert 0.01 + 2e-4 * 500 < model.predict(500) < 0.2


def test_constant_cost_data_puts_everything_in_the_fixed_part():
    model = LatencyModel()
    for _ in range(20):
        model.observe(128, 0.03)
    assert model.fixed_s == pytest.approx(0.03)
    assert model.per_cost_s == 0.0
    assert model.predict(128) == pytest.approx(0.03)


def test_constant_cost_data_keeps_the_slope_already_learnt():
    model = fitted(0.02, 1e-4)
    for _ in range(500):
        model.observe(100, 0.02 + 1e-4 * 100)
    assert model.fixed_s == pytest.approx(0.02, rel=1e-3)
    assert model.per_cost_s == pytest.approx(1e-4, rel=1e-3)


def test_a_line_below_the_origin_is_clamped_to_it():
    model = LatencyModel()
    model.observe(10, 0.001)
    model.observe(20, 0.010)  # the line through these two crosses zero at x = 8.9
    assert model.fixed_s == 0.0
    assert model.per_cost_s > 0.0
    # It still predicts the data's weighted mean.
    w = model.decay + 1.0
    mean_x, mean_y = (model.decay * 10 + 20) / w, (model.decay * 0.001 + 0.010) / w
    assert model.predict(mean_x) == pytest.approx(mean_y)


def test_a_falling_line_gets_no_negative_slope():
    model = LatencyModel()
    for x, y in [(10, 0.05), (100, 0.03), (1000, 0.01)]:
        model.observe(x, y)
    assert model.per_cost_s == 0.0
    assert model.fixed_s > 0.0


@pytest.mark.parametrize("seed", range(3))
def test_noise_around_a_line_through_the_origin_never_goes_negative(seed):
    rng = random.Random(seed)
    model = LatencyModel()
    clamped = 0
    for _ in range(500):
        x = rng.uniform(1, 100)
        model.observe(x, max(0.0, 1e-3 * x + rng.gauss(0.0, 0.01)))
        assert model.fixed_s >= 0.0 and model.per_cost_s >= 0.0
        assert model.predict(0) >= 0.0
        clamped += model.fixed_s == 0.0
    assert clamped, "the data never tilted the fit below the origin: the test proves nothing"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e5), st.floats(0, 10)), min_size=1, max_size=60))
def test_never_negative_on_any_data(points):
    model = LatencyModel()
    for x, y in points:
        model.observe(x, y)
        assert model.fixed_s >= 0.0
        assert model.per_cost_s >= 0.0
        assert model.predict(x) >= 0.0


def test_fixed_cost_in_tokens_is_a_over_b():
    assert fitted(0.002, 1e-4).fixed_cost_in_tokens() == pytest.approx(20)
    assert fitted(GPU_A, GPU_B).fixed_cost_in_tokens() == pytest.approx(50_000)
    # Unknown per-token cost: infinite, so nothing is kept apart on a guess.
    assert LatencyModel().fixed_cost_in_tokens() == math.inf
    constant = LatencyModel()
    constant.observe(64, 0.01)
    assert constant.fixed_cost_in_tokens() == math.inf


# -- worth_waiting -----------------------------------------------------------------------


def pays(a: float, b: float, *, count: int, longest: int, newcomer: int, gap: float) -> bool:
    """The module's criterion: holding ``count`` items for ``gap`` until one more arrives,
    and computing the padding the newcomer adds, costs less than the newcomer paying the
    fixed cost again on its own: ``(n + 1) x (g + b x added) < a + b x newcomer``."""
    added = max(longest, newcomer) * (count + 1) - longest * count
    return (count + 1) * (gap + b * added) < a + b * newcomer


def test_no_wait_before_any_observation():
    model = LatencyModel()
    assert worth_waiting(model, count=1, longest=16, newcomer=16, expected_gap=1e-6,
                         since_last=0.0) == 0.0


def test_no_wait_for_an_empty_batch():
    model = fitted(GPU_A, GPU_B)
    assert worth_waiting(model, count=0, longest=0, newcomer=16, expected_gap=1e-6,
                         since_last=0.0) == 0.0


def test_gpu_like_waits_for_dense_arrivals():
    model = fitted(GPU_A, GPU_B)
    wait = worth_waiting(model, count=1, longest=16, newcomer=16, expected_gap=0.002,
                         since_last=0.0)
    # Break-even: 2 x (g + 16 b) = a + 16 b, so g = (a - 16 b) / 2, about 25 ms.
    assert wait == pytest.approx((GPU_A - 16 * GPU_B) / 2, rel=1e-6)
    assert pays(GPU_A, GPU_B, count=1, longest=16, newcomer=16, gap=0.002)


def test_gpu_like_does_not_wait_for_sparse_arrivals():
    model = fitted(GPU_A, GPU_B)
    assert worth_waiting(model, count=1, longest=16, newcomer=16, expected_gap=0.05,
                         since_last=0.0) == 0.0
    assert not pays(GPU_A, GPU_B, count=1, longest=16, newcomer=16, gap=0.05)


@pytest.mark.parametrize("count", [1, 3, 7])
@pytest.mark.parametrize("expected_gap", [1e-6, 1e-4, 1e-3])
def test_cpu_like_does_not_wait_even_for_dense_arrivals(count, expected_gap):
    model = fitted(CPU_A, CPU_B)
    assert worth_waiting(model, count=count, longest=64, newcomer=64,
                         expected_gap=expected_gap, since_last=0.0) == 0.0


@pytest.mark.parametrize(("a", "b"), [(GPU_A, GPU_B), (CPU_A, CPU_B), (0.01, 2e-5)])
@pytest.mark.parametrize(("count", "longest", "newcomer"),
                         [(1, 16, 16), (4, 32, 16), (4, 16, 64), (15, 8, 8)])
def test_waits_exactly_when_the_documented_criterion_says_it_pays(a, b, count, longest,
                                                                   newcomer):
    model = fitted(a, b)
    for gap in (1e-6, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2):
        wait = worth_waiting(model, count=count, longest=longest, newcomer=newcomer,
                             expected_gap=gap, since_last=0.0)
        criterion = pays(a, b, count=count, longest=longest, newcomer=newcomer, gap=gap)
        assert (wait > 0.0) == criterion, (gap, wait)
        if criterion:
            # The wait is how long until one more arrival no longer pays.
            assert not pays(a, b, count=count, longest=longest, newcomer=newcomer,
                            gap=wait * 1.001)
            assert pays(a, b, count=count, longest=longest, newcomer=newcomer,
                        gap=wait * 0.999)


def test_the_wait_shrinks_as_the_stream_goes_quiet_and_ends_once_overdue():
    model = fitted(GPU_A, GPU_B)
    waits = [worth_waiting(model, count=1, longest=16, newcomer=16, expected_gap=0.002,
                           since_last=s) for s in (0.0, 0.005, 0.01, 0.02)]
    assert all(w1 > w2 > 0.0 for w1, w2 in pairwise(waits)), waits
    assert waits[0] - waits[1] == pytest.approx(0.005)
    full = waits[0]
    for overdue in (full, full + 1e-4, 0.1, 10.0):
        assert worth_waiting(model, count=1, longest=16, newcomer=16, expected_gap=0.002,
                             since_last=overdue) == 0.0


def test_a_bigger_batch_waits_less():
    model = fitted(GPU_A, GPU_B)
    waits = [worth_waiting(model, count=n, longest=16, newcomer=16, expected_gap=1e-4,
                           since_last=0.0) for n in (1, 2, 4, 8)]
    assert all(w1 > w2 > 0.0 for w1, w2 in pairwise(waits)), waits


def test_a_long_newcomer_that_pads_the_batch_is_worth_less():
    model = fitted(0.01, 2e-5)
    short = worth_waiting(model, count=4, longest=16, newcomer=16, expected_gap=1e-4,
                          since_last=0.0)
    long_ = worth_waiting(model, count=4, longest=16, newcomer=200, expected_gap=1e-4,
                          since_last=0.0)
    assert short > 0.0
    assert long_ < short


def test_unknown_lengths_count_items():
    model = LatencyModel()
    for n in (1, 2, 4, 8, 1, 2, 4, 8):
        model.observe(n, 0.05 + 0.001 * n)  # batch_cost: the item count
    wait = worth_waiting(model, count=1, longest=0, newcomer=0, expected_gap=1e-3,
                         since_last=0.0)
    # Break-even: 2 x (g + b) = a + b.
    assert wait == pytest.approx((0.05 - 0.001) / 2, rel=1e-6)
