"""Unit tests for worker/batch_policy.py: which queued items form the next batch.

Pure functions over WorkItem lists: no clock, no asyncio. Items are built with
``admitted_at`` equal to their position, so "older" is "earlier in the list".
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.batch_policy import (
    DEFAULT_MAX_PASSES,
    Selection,
    batch_cost,
    mark_passed_over,
    padded_tokens,
    select,
)
from worker.batcher import WorkItem


def queue(*lengths: int, passed: dict[int, int] | None = None) -> list[WorkItem]:
    """Items 0, 1, 2, ... (oldest first) of these token lengths; ``passed`` sets passed_over."""
    passed = passed or {}
    return [
        WorkItem(request_id=i, inputs=f"in-{i}", parameters={}, parameter_key=(),
                 admitted_at=float(i), deadline=1e9, tokens=n, passed_over=passed.get(i, 0))
        for i, n in enumerate(lengths)
    ]


def ids(selection: Selection) -> list[int]:
    return [it.request_id for it in selection.items]


# -- padded cost -------------------------------------------------------------------------


@pytest.mark.parametrize(("lengths", "padded"), [
    ([], 0), ([7], 7), ([3, 5, 8], 24), ([8, 3, 5], 24), ([4, 4, 4, 4], 16), ([0, 0], 0),
])
def test_padded_tokens_is_longest_times_count(lengths, padded):
    assert padded_tokens(lengths) == padded


@pytest.mark.parametrize(("lengths", "cost"), [
    ([3, 5, 8], 24),
    ([0, 0, 0], 3),  # lengths unknown: the item count
    ([], 0),
])
def test_batch_cost_is_padded_tokens_or_item_count(lengths, cost):
    assert batch_cost(lengths) == cost


# -- the token budget --------------------------------------------------------------------


def test_fifo_budget_stops_at_the_first_item_that_does_not_fit():
    group = queue(10, 10, 50, 5, 5)
    sel = select(group, max_items=8, max_tokens=40)
    # 10 x 3 would fit but 50 x 3 does not: the batch closes there, and the short items
    # behind the long one do not overtake it (they would have fitted: 10 x 4 = 40).
    assert ids(sel) == [0, 1]
    assert sel.full
    assert sel.lengths == [10, 10]


def test_bucket_mode_skips_an_item_over_budget_and_takes_a_shorter_one():
    # Anchor 30; the 50 is closer in length than the 5, but 50 x 2 = 100 > 90.
    group = queue(30, 50, 5)
    fifo = select(group, max_items=8, max_tokens=90)
    assert ids(fifo) == [0] and fifo.full
    buckets = select(group, max_items=8, max_tokens=90, buckets=True)
    assert ids(buckets) == [0, 2]
    assert padded_tokens(buckets.lengths) == 60  # within the budget of 90
    # An item was turned away: nothing more may join, so the batch must not wait.
    assert buckets.full


@pytest.mark.parametrize("buckets", [False, True])
def test_the_oldest_item_always_goes_even_alone_over_budget(buckets):
    sel = select(queue(500, 10, 10), max_items=8, max_tokens=100, buckets=buckets)
    assert ids(sel) == [0]
    assert sel.full  # reported full: it must run at once, not wait for company
    alone = select(queue(500), max_items=8, max_tokens=100, buckets=buckets)
    assert ids(alone) == [0] and alone.full


@pytest.mark.parametrize("buckets", [False, True])
def test_a_batch_exactly_at_the_budget_is_taken_and_full(buckets):
    sel = select(queue(25, 25, 25, 25, 25), max_items=8, max_tokens=100, buckets=buckets)
    assert ids(sel) == [0, 1, 2, 3]
    assert sel.full


@pytest.mark.parametrize("buckets", [False, True])
def test_under_budget_with_room_left_is_not_full(buckets):
    # 25 x 4 = 100 is not over 100: one more item of any length <= 25 could still join.
    sel = select(queue(25, 25, 25), max_items=8, max_tokens=100, buckets=buckets)
    assert ids(sel) == [0, 1, 2] and not sel.full
    # ... but here no newcomer could: even a 1-token one pads to 40 x 3 = 120 > 100.
    sel = select(queue(40, 40), max_items=8, max_tokens=100, buckets=buckets)
    assert ids(sel) == [0, 1] and sel.full


@pytest.mark.parametrize("buckets", [False, True])
def test_zero_max_tokens_means_no_budget(buckets):
    sel = select(queue(1000, 1000, 1000), max_items=8, max_tokens=0, buckets=buckets)
    assert ids(sel) == [0, 1, 2] and not sel.full


@pytest.mark.parametrize("buckets", [False, True])
def test_unknown_lengths_never_exceed_the_budget(buckets):
    sel = select(queue(0, 0, 0, 0), max_items=8, max_tokens=10, buckets=buckets)
    assert ids(sel) == [0, 1, 2, 3] and not sel.full


# -- the count limit ---------------------------------------------------------------------


@pytest.mark.parametrize("buckets", [False, True])
def test_count_limit(buckets):
    sel = select(queue(*[5] * 10), max_items=4, buckets=buckets)
    assert ids(sel) == [0, 1, 2, 3] and sel.full
    sel = select(queue(*[5] * 3), max_items=4, buckets=buckets)
    assert ids(sel) == [0, 1, 2] and not sel.full
    sel = select(queue(5, 5), max_items=1, buckets=buckets)
    assert ids(sel) == [0] and sel.full


# -- the look-ahead window ---------------------------------------------------------------


@pytest.mark.parametrize("buckets", [False, True])
def test_window_bounds_the_look_ahead(buckets):
    group = queue(*[5] * 10)
    sel = select(group, max_items=8, window=3, buckets=buckets)
    assert ids(sel) == [0, 1, 2]
    assert ids(select(group, max_items=8, window=0, buckets=buckets)) == list(range(8))


def test_bucket_mode_does_not_look_past_the_window():
    # Item 3 matches the anchor exactly, but only the three oldest are looked at.
    group = queue(10, 50, 60, 10)
    assert ids(select(group, max_items=2, buckets=True, window=3)) == [0, 1]
    assert ids(select(group, max_items=2, buckets=True, window=0)) == [0, 3]
    assert ids(select(group, max_items=2, buckets=True, window=10)) == [0, 3]


# -- length buckets ----------------------------------------------------------------------


def test_bucket_mode_takes_the_lengths_nearest_the_oldest():
    group = queue(40, 10, 38, 100, 45, 41)
    sel = select(group, max_items=3, buckets=True)
    assert sel.items[0] is group[0]
    assert sorted(ids(sel)) == [0, 2, 5]  # 41 (1 away) and 38 (2 away)
    assert sel.full
    # FIFO on the same queue takes the oldest three whatever their lengths.
    assert ids(select(group, max_items=3)) == [0, 1, 2]


def test_bucket_mode_breaks_length_ties_by_age():
    group = queue(40, 42, 38, 42)
    assert ids(select(group, max_items=2, buckets=True)) == [0, 1]
    assert ids(select(group, max_items=3, buckets=True)) == [0, 1, 2]


def test_buckets_reduce_padding_on_a_mixed_queue():
    group = queue(8, 64, 8, 64, 8, 64, 8, 64)
    fifo = select(group, max_items=4)
    buckets = select(group, max_items=4, buckets=True)
    assert fifo.lengths == [8, 64, 8, 64]
    assert buckets.lengths == [8, 8, 8, 8]
    assert padded_tokens(buckets.lengths) == 32 < padded_tokens(fifo.lengths) == 256


# -- join slack: an item joins only when padding it costs less than a call of its own ------


def test_a_short_item_is_not_padded_to_a_long_anchor_beyond_the_slack():
    group = queue(100, 10, 100)
    # Joining pads the 10 to 100: 100 padded tokens added, against 10 + slack on its own.
    sel = select(group, max_items=8, buckets=True, join_slack=50)
    assert ids(sel) == [0, 2]
    assert sel.full  # kept apart: it goes next, so this batch need not wait for it
    assert ids(select(group, max_items=8, buckets=True, join_slack=90)) == [0, 2, 1]
    assert ids(select(group, max_items=8, buckets=True)) == [0, 2, 1]  # default: no limit


def test_a_long_item_is_not_added_to_short_ones_beyond_the_slack():
    group = queue(10, 10, 10, 100)
    # 100 x 4 - 10 x 3 = 370 padded tokens added, against 100 + slack on its own.
    sel = select(group, max_items=8, buckets=True, join_slack=200)
    assert ids(sel) == [0, 1, 2] and sel.full
    sel = select(group, max_items=8, buckets=True, join_slack=270)
    assert ids(sel) == [0, 1, 2, 3] and not sel.full


def test_aged_items_go_first_but_still_respect_the_slack():
    # Padding an aged 10 to 100 costs its neighbours 90 tokens: with a slack below that it
    # is kept apart (it is still bounded by the items older than it).
    group = queue(100, 10, passed={1: DEFAULT_MAX_PASSES})
    sel = select(group, max_items=8, buckets=True, join_slack=0)
    assert ids(sel) == [0] and sel.full
    assert ids(select(group, max_items=8, buckets=True, join_slack=90)) == [0, 1]
    # Within the slack, the aged item is taken ahead of a closer length; outside it, the
    # younger closer length may not overtake it again: the anchor goes alone.
    group = queue(100, 90, 100, passed={1: DEFAULT_MAX_PASSES})
    assert ids(select(group, max_items=2, buckets=True, join_slack=10)) == [0, 1]
    sel = select(group, max_items=2, buckets=True, join_slack=9)
    assert ids(sel) == [0] and sel.full


def test_fifo_mode_ignores_the_slack():
    group = queue(100, 10, 10)
    sel = select(group, max_items=8, join_slack=0)
    assert ids(sel) == [0, 1, 2] and not sel.full


def test_zero_slack_still_batches_equal_lengths():
    sel = select(queue(16, 16, 16), max_items=8, buckets=True, join_slack=0)
    assert ids(sel) == [0, 1, 2] and not sel.full


# -- the aging guard ---------------------------------------------------------------------


def test_nothing_younger_overtakes_an_aged_item():
    max_passes = 4
    # Items 1 and 3 have been passed over enough; 5 has not (3 < 4).
    group = queue(10, 200, 10, 300, 10, 150, passed={1: 4, 3: 5, 5: 3})
    sel = select(group, max_items=3, buckets=True, max_passes=max_passes)
    # The aged items go first, oldest first, ahead of the closer lengths 2 and 4.
    assert ids(sel) == [0, 1, 3] and sel.full
    # An aged item further back is taken ahead of the closer lengths; then the batch fills
    # by length as usual.
    group = queue(10, 200, 10, 12, 300, passed={4: 4})
    sel = select(group, max_items=3, buckets=True, max_passes=max_passes)
    assert ids(sel) == [0, 4, 2] and sel.full
    # Below the threshold the guard is off: the nearest lengths win.
    group = queue(10, 200, 10, 300, 10, 150, passed={1: 4, 3: 5, 5: 3})
    sel = select(group, max_items=3, buckets=True, max_passes=6)
    assert ids(sel) == [0, 2, 4]


def test_an_aged_item_that_joins_leaves_room_for_younger_ones():
    # The guard must not shrink the batch: once the aged item is in, nobody overtakes it by
    # going with it, so the younger items of the nearest lengths fill the batch.
    group = queue(20, 21, 30, 20, 20, 20, passed={2: DEFAULT_MAX_PASSES})
    sel = select(group, max_items=4, buckets=True, join_slack=100)
    assert ids(sel) == [0, 2, 3, 4] and sel.full


def test_an_aged_item_turned_away_stops_every_younger_item():
    # The aged 300 would pad three 10s to 300: turned away by the slack. Item 1 is older
    # than it and may still join; 3 and 4 are younger and may not overtake it again.
    group = queue(10, 12, 300, 10, 10, passed={2: DEFAULT_MAX_PASSES})
    sel = select(group, max_items=8, buckets=True, join_slack=50)
    assert ids(sel) == [0, 1] and sel.full
    # Of two aged items, the younger one turned away stops nobody older than itself.
    group = queue(10, 11, 12, 300, 10, passed={1: 2, 3: 2})
    sel = select(group, max_items=8, buckets=True, join_slack=50)
    assert ids(sel) == [0, 1, 2] and sel.full


def test_aged_items_still_respect_the_budget():
    group = queue(10, 10, 200, 10, passed={2: DEFAULT_MAX_PASSES})
    sel = select(group, max_items=8, max_tokens=100, buckets=True)
    # 200 x 2 = 400 > 100: the aged item is skipped; the one older than it goes, the younger
    # one may not overtake it.
    assert ids(sel) == [0, 1]
    assert sel.full


def test_default_max_passes_is_used():
    group = queue(10, 200, 10, passed={1: DEFAULT_MAX_PASSES})
    assert ids(select(group, max_items=2, buckets=True)) == [0, 1]
    assert DEFAULT_MAX_PASSES == 2  # measured: see docs/benchmarks.md, issue 7
    group = queue(10, 200, 10, passed={1: DEFAULT_MAX_PASSES - 1})
    assert ids(select(group, max_items=2, buckets=True)) == [0, 2]


def test_fifo_mode_ignores_passes():
    group = queue(10, 20, 30, passed={2: 99})
    assert ids(select(group, max_items=2)) == [0, 1]


# -- mark_passed_over --------------------------------------------------------------------


def test_mark_passed_over_counts_only_items_older_than_the_youngest_taken():
    group = queue(1, 2, 3, 4, 5, 6)
    chosen = [group[0], group[2], group[4]]
    mark_passed_over(group, chosen)
    assert [it.passed_over for it in group] == [0, 1, 0, 1, 0, 0]
    # Passes accumulate.
    mark_passed_over(group, [group[0], group[4]])
    assert [it.passed_over for it in group] == [0, 2, 1, 2, 0, 0]


def test_mark_passed_over_counts_nothing_for_a_prefix_or_a_lone_item():
    group = queue(1, 2, 3, 4)
    mark_passed_over(group, group[:3])
    mark_passed_over(group, group[:1])
    assert [it.passed_over for it in group] == [0, 0, 0, 0]


def drain_until_taken(group: list[WorkItem], target: WorkItem, **policy) -> int:
    """Run select + mark_passed_over until ``target`` is taken; the batch number it went in."""
    for batch in range(1, len(group) + 1):
        sel = select(group, **policy)
        mark_passed_over(group, sel.items)
        if target in sel.items:
            return batch
        chosen = set(map(id, sel.items))
        group = [it for it in group if id(it) not in chosen]
    raise AssertionError("the target was never taken")


@pytest.mark.parametrize("max_passes", [1, 2, 3])
def test_passes_lead_to_the_aging_guard(max_passes):
    """Selection and marking together: a long item behind short ones of assorted lengths,
    with many young short items matching those lengths exactly (so each batch prefers them
    to their elders). With the guard, no item is overtaken more than max_passes times and
    the long item goes sooner; without it, it waits for every older item to be an anchor in
    turn, overtaken each time."""
    older = [10, 11, 12, 13, 14, 15, 16, 17]

    def fresh() -> tuple[list[WorkItem], WorkItem]:
        group = queue(*older, 400, *[n for n in older for _ in range(3)])
        return group, group[len(older)]

    group, long_item = fresh()
    everyone = list(group)
    taken = drain_until_taken(group, long_item, max_items=4, buckets=True, max_passes=max_passes)
    assert all(it.passed_over <= max_passes for it in everyone), [
        it.passed_over for it in everyone]
    group, long_item = fresh()
    unguarded = drain_until_taken(group, long_item, max_items=4, buckets=True, max_passes=10**6)
    assert unguarded == len(older) + 1
    assert long_item.passed_over == len(older)
    assert taken < unguarded


# -- properties of every selection -------------------------------------------------------


def check_selection(group: list[WorkItem], sel: Selection, *, max_items: int, max_tokens: int,
                    buckets: bool, window: int) -> None:
    looked_at = group[:window] if window else group
    chosen = [id(it) for it in sel.items]
    assert sel.items, "an empty batch"
    assert sel.items[0] is group[0], "the oldest item is not in the batch"
    assert len(chosen) == len(set(chosen)), "an item was taken twice"
    assert set(chosen) <= {id(it) for it in looked_at}, "an item outside the window was taken"
    assert len(sel.items) <= max_items
    if max_tokens and len(sel.items) > 1:
        assert padded_tokens(sel.lengths) <= max_tokens, (sel.lengths, max_tokens)
    if not sel.full:
        # Nothing was turned away and there is room: every item looked at went.
        assert len(sel.items) == len(looked_at)
    if len(sel.items) >= max_items:
        assert sel.full
    if not buckets:
        assert [id(it) for it in sel.items] == [id(it) for it in group[:len(sel.items)]]


@settings(max_examples=400, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 600), min_size=1, max_size=40),
    passes=st.lists(st.integers(0, 6), max_size=40),
    max_items=st.integers(1, 12),
    max_tokens=st.one_of(st.just(0), st.integers(1, 2000)),
    buckets=st.booleans(),
    window=st.integers(0, 45),
    max_passes=st.integers(1, 5),
    join_slack=st.one_of(st.just(math.inf), st.floats(0, 1000)),
)
def test_every_selection_keeps_the_invariants(lengths, passes, max_items, max_tokens, buckets,
                                               window, max_passes, join_slack):
    group = queue(*lengths, passed=dict(enumerate(passes)))
    sel = select(group, max_items=max_items, max_tokens=max_tokens, buckets=buckets,
                 window=window, max_passes=max_passes, join_slack=join_slack)
    check_selection(group, sel, max_items=max_items, max_tokens=max_tokens, buckets=buckets,
                    window=window)


@pytest.mark.parametrize("seed", range(3))
def test_draining_a_queue_answers_every_item_exactly_once(seed):
    """Repeated select + mark_passed_over over a random queue: every item is taken once,
    each batch keeps the invariants, and no item waits more batches than there are items
    older than it (the oldest always goes)."""
    rng = random.Random(seed)
    group = queue(*[rng.choice([4, 8, 16, 100, 300]) for _ in range(60)])
    taken_in: dict[int, int] = {}
    batch = 0
    while group:
        batch += 1
        sel = select(group, max_items=6, max_tokens=600, buckets=True, window=24, max_passes=3,
                     join_slack=50)
        check_selection(group, sel, max_items=6, max_tokens=600, buckets=True, window=24)
        mark_passed_over(group, sel.items)
        for it in sel.items:
            taken_in[it.request_id] = batch
        chosen = set(map(id, sel.items))
        group = [it for it in group if id(it) not in chosen]
    assert sorted(taken_in) == list(range(60))
    for rid, b in taken_in.items():
        assert b <= rid + 1


@pytest.mark.parametrize("seed", range(3))
def test_sustained_load_keeps_batches_full_and_the_aging_bound(seed):
    """A look-ahead kept full (new arrivals replace every batch taken), lengths of 8-43
    tokens, a CPU-like slack: the batches stay full, carry less padding than first come
    first served, and no item is overtaken more than max_passes times. (An earlier guard
    let only items older than an aged one join: under this load most of the look-ahead has
    aged and batches fell to about 3.)"""
    rng = random.Random(seed)
    window, max_items = 32, 8
    group: list[WorkItem] = []
    arrivals, sizes, padding, fifo_padding = 0, [], [], []
    for _ in range(300):
        while len(group) < window:
            group.append(queue(rng.randint(8, 43))[0])
            group[-1].request_id = group[-1].admitted_at = arrivals
            arrivals += 1
        fifo = select(group, max_items=max_items)
        sel = select(group, max_items=max_items, max_tokens=2048, buckets=True, window=window,
                      join_slack=80)
        check_selection(group, sel, max_items=max_items, max_tokens=2048, buckets=True,
                        window=window)
        mark_passed_over(group, sel.items)
        assert all(it.passed_over <= DEFAULT_MAX_PASSES for it in group)
        sizes.append(len(sel.items))
        padding.append(1 - sum(sel.lengths) / padded_tokens(sel.lengths))
        fifo_padding.append(1 - sum(fifo.lengths) / padded_tokens(fifo.lengths))
        chosen = set(map(id, sel.items))
        group = [it for it in group if id(it) not in chosen]
    assert sum(sizes) / len(sizes) >= 7.5
    assert sum(padding) < 0.85 * sum(fifo_padding)
