"""worker/memory_limits.py: the limit an out-of-memory error leaves, and how it comes back.
Plain arithmetic on a clock the test moves: no asyncio, no threads."""

from __future__ import annotations

import logging

from worker.memory_limits import MAX_RECOVERY_S, MemoryLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(max_batch_size=32, max_batch_tokens=4096, recovery_s=60.0):
    clock = Clock()
    return MemoryLimits(max_batch_size, max_batch_tokens, recovery_s, clock), clock


def steps_back(memory: MemoryLimits, clock: Clock, read) -> list:
    """``read(memory)`` after each raise, a minute apart, until the configured limits are
    back; each raise is asked for twice at its moment, and must happen once."""
    seen = []
    while memory.lowered:
        clock.now += 60
        memory.raise_if_due()
        seen.append(read(memory))
        memory.raise_if_due()
        assert read(memory) == seen[-1]
    return seen


def test_the_limit_a_failed_batch_leaves_is_its_larger_half():
    memory, _ = limits()
    assert not memory.lowered
    memory.out_of_memory([100] * 16, 8)  # 1,600 padded tokens; each half 800
    assert (memory.batch_size, memory.batch_tokens) == (32, 800) and memory.lowered
    memory.out_of_memory([0] * 10, 5)  # no token counts: the count drops
    assert (memory.batch_size, memory.batch_tokens) == (5, 800)


def test_a_lowered_limit_rises_a_quarter_at_a_time_back_to_the_configured_one(caplog):
    memory, clock = limits(max_batch_tokens=2000)
    memory.out_of_memory([100] * 16, 8)
    clock.now += 59.9
    memory.raise_if_due()
    assert memory.batch_tokens == 800, "not before recovery_s"
    with caplog.at_level(logging.INFO, logger="batchwire.worker.batcher"):
        seen = steps_back(memory, clock, lambda m: m.batch_tokens)
    assert seen == [1000, 1250, 1563, 1954, 2000]
    assert "no out-of-memory error for 60 s: effective batch size 32, token budget 1000" \
        in caplog.text


def test_a_raise_that_runs_out_of_memory_again_doubles_the_wait():
    memory, clock = limits()
    memory.out_of_memory([100] * 16, 8)
    clock.now += 60
    memory.raise_if_due()
    assert memory.batch_tokens == 1000
    memory.out_of_memory([125] * 8, 4)  # the raised limit was too much: back to 500
    assert memory.batch_tokens == 500
    clock.now += 60
    memory.raise_if_due()
    assert memory.batch_tokens == 500, "the next raise waits 120 s"
    clock.now += 60
    memory.raise_if_due()
    assert memory.batch_tokens == 625
    # The first error after that raise doubles the wait again (240 s); a second one, with
    # no raise between, does not.
    memory.out_of_memory([100] * 4, 2)
    memory.out_of_memory([50] * 4, 2)
    clock.now += 239
    memory.raise_if_due()
    assert memory.batch_tokens == 100
    clock.now += 1
    memory.raise_if_due()
    assert memory.batch_tokens == 125
    # However often it fails, an hour at most.
    for _ in range(20):
        memory.out_of_memory([125] * 2, 1)
        clock.now += MAX_RECOVERY_S
        memory.raise_if_due()
        assert memory.batch_tokens == 157


def test_the_batch_size_rises_too_when_it_was_what_dropped():
    memory, clock = limits(max_batch_size=8, max_batch_tokens=0)
    memory.out_of_memory([0] * 8, 4)
    memory.out_of_memory([0] * 4, 2)
    assert memory.batch_size == 2
    assert steps_back(memory, clock, lambda m: m.batch_size) == [3, 4, 5, 7, 8]
    assert memory.batch_tokens == 0


def test_with_no_configured_budget_the_lowered_one_goes_once_past_twice_what_failed():
    memory, clock = limits(max_batch_tokens=0)
    memory.out_of_memory([100] * 16, 8)
    assert memory.batch_tokens == 800
    # 3,818 >= 2 x 1,600: no budget again.
    assert steps_back(memory, clock, lambda m: m.batch_tokens) == [1000, 1250, 1563, 1954,
                                                                   2443, 3054, 0]


def test_recovery_zero_keeps_the_lowered_limit_for_good():
    memory, clock = limits(recovery_s=0)
    memory.out_of_memory([100] * 16, 8)
    clock.now += 10 * MAX_RECOVERY_S
    memory.raise_if_due()
    assert memory.batch_tokens == 800
