"""Which queued items form the next batch: count and token limits, and length buckets.

Pure functions over :class:`~worker.batcher.WorkItem` lists; no clock, no asyncio, so
each rule is testable on its own.

* **Padded cost.** A pipeline pads every input to the batch's longest, so a batch costs
  ``longest x items`` tokens, not the sum of its lengths. ``max_tokens`` bounds that cost.
  The oldest item always goes, even alone past the budget: refusing it would starve it.
* **Length buckets.** Inside the look-ahead window (the group's oldest ``window`` items),
  the batch is built around the oldest item, from the items whose lengths are closest to
  its own, so short inputs stop paying for a long neighbour's padding. An item joins only
  if the padded tokens it adds are no more than it would cost in a call of its own: its
  tokens plus ``join_slack``, the fixed cost of a call in tokens (the latency model's
  ``a / b``). On a GPU that slack is large and nearly everything joins; on a CPU a short
  input is not padded to a long neighbour's length, nor a long one added to short ones.
* **Aging guard.** The oldest item is always in the batch, so lengths that are rare in the
  traffic, long ones typically, cannot be left behind batch after batch. And no item is
  overtaken in more than ``max_passes`` batches: once younger items have gone before it
  that often, it is considered before any item that has not aged (aged items in age
  order), and the batch is then filled by length as usual. Where an aged item cannot join
  (the slack or the budget turns it away: forcing it into a batch of other lengths would
  make every neighbour pay its padding), nothing younger than it may join this batch, so
  it is not overtaken again and soon becomes the oldest. That bounds what bucketing adds
  to the tail latency (first come, first served is what minimises it) without shrinking
  the batch: an earlier version let only items older than the aged one join, which under
  sustained load, where most of the look-ahead has aged, cut batches of 8 to 3-5 and cost
  more throughput than the buckets saved (docs/benchmarks.md, "Length buckets under
  sustained load").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from worker.batcher import WorkItem

#: Passes before an item is taken regardless of its length (see the module doc).
DEFAULT_MAX_PASSES = 2


def padded_tokens(lengths: Sequence[int]) -> int:
    """What a batch of these token lengths costs once padded to its longest."""
    return max(lengths, default=0) * len(lengths)


def batch_cost(lengths: Sequence[int]) -> int:
    """The latency model's x: padded tokens, or the item count when lengths are unknown
    (inputs that are not text have no token count)."""
    return padded_tokens(lengths) or len(lengths)


@dataclass(frozen=True, slots=True)
class Selection:
    items: list["WorkItem"]
    #: Nothing more can join: the count limit is reached, or the token budget turned a
    #: queued item away. A full batch runs at once; one that is not full may wait.
    full: bool

    @property
    def lengths(self) -> list[int]:
        return [it.tokens for it in self.items]


def select(group: Sequence["WorkItem"], *, max_items: int, max_tokens: int = 0,
           buckets: bool = False, window: int = 0, max_passes: int = DEFAULT_MAX_PASSES,
           join_slack: float = math.inf) -> Selection:
    """Pick the next batch from ``group``: one parameter set, oldest first, not empty.

    ``max_tokens=0`` means no token budget; ``window=0`` looks at the whole group;
    ``join_slack`` (bucket mode) is how many padded tokens beyond its own an item may add.
    """
    anchor, rest = group[0], list(group[1:window] if window else group[1:])
    order, full = rest, False
    if buckets:
        aged = [it for it in rest if it.passed_over >= max_passes]
        fresh = [it for it in rest if it.passed_over < max_passes]
        # Stable sort: among equal distances the older item wins.
        order = aged + sorted(fresh, key=lambda it: abs(it.tokens - anchor.tokens))
    chosen = [anchor]
    longest = anchor.tokens
    # Once an aged item is turned away, nothing younger than it may overtake it again.
    overtake_bound = math.inf
    for item in order:
        if len(chosen) >= max_items:
            break
        if item.admitted_at > overtake_bound:
            full = True  # it goes after the aged item: waiting cannot bring it in
            continue
        padded = max(longest, item.tokens) * (len(chosen) + 1)
        if max_tokens and padded > max_tokens:
            full = True
            if not buckets:
                break  # first come, first served: nobody overtakes the item turned away
        elif buckets and padded - longest * len(chosen) > item.tokens + join_slack:
            full = True  # cheaper in a batch of its own length: it goes next
        else:
            chosen.append(item)
            longest = max(longest, item.tokens)
            continue
        if item.passed_over >= max_passes:
            overtake_bound = min(overtake_bound, item.admitted_at)
    if len(chosen) >= max_items or (max_tokens and longest * (len(chosen) + 1) > max_tokens):
        full = True  # not even the shortest newcomer could join
    return Selection(chosen, full)


def mark_passed_over(group: Sequence["WorkItem"], chosen: Sequence["WorkItem"]) -> None:
    """Count a pass for every item left behind while a younger one went."""
    if len(chosen) <= 1:
        return
    taken = set(map(id, chosen))
    youngest = max(it.admitted_at for it in chosen)
    for item in group:
        if id(item) not in taken and item.admitted_at < youngest:
            item.passed_over += 1
