"""The worker's online model of its own batch latency, and the wait it justifies.

``latency ~ a + b * cost``, where ``cost`` is a batch's padded tokens (the item count for
inputs without tokens): ``a`` is what every pipeline call pays however small (Python,
kernel launches, the pipeline's own loop), ``b`` what each padded token adds. It is fitted
by exponentially weighted least squares over recent batches, so it follows the model as
the device warms, throttles or shares its cores.

Whether to hold a batch for one more item (see :func:`worth_waiting`): holding ``n``
items for the gap ``g`` until the next one arrives, and computing the padding it adds,
costs them ``n * (g + b * added)``; the newcomer then rides along instead of queueing
behind this batch and paying the fixed cost ``a`` again. Waiting pays while

    (n + 1) * (g + b * added) < a + b * newcomer_tokens

On a GPU ``a`` dominates and bursts are worth collecting; on a CPU ``b`` dominates and a
batch that is not full runs at once, which is what the measured ceiling (batching gains
1.7x there) says it should do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LatencyModel:
    #: Weight kept by past observations at each new one (0.95: about the last 20 batches).
    decay: float = 0.95

    def __post_init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.observations = 0
        self.fixed_s = 0.0
        self.per_cost_s = 0.0

    def observe(self, cost: float, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + cost
        self._y = d * self._y + seconds
        self._xx = d * self._xx + cost * cost
        self._xy = d * self._xy + cost * seconds
        self.observations += 1
        self._fit()

    def _fit(self) -> None:
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        if var_x > 1e-9 * max(1.0, mean_x * mean_x):
            slope = (self._xy / self._w - mean_x * mean_y) / var_x
        else:
            # Every batch cost the same: the data cannot split fixed from per-token time.
            # Keep the slope learnt so far (none at first: all of it counts as fixed).
            slope = self.per_cost_s
        slope = max(slope, 0.0)
        fixed = mean_y - slope * mean_x
        if fixed < 0.0:
            # Noise can tilt the line below the origin; a call never costs less than nothing.
            fixed, slope = 0.0, mean_y / mean_x if mean_x > 0 else 0.0
        self.fixed_s, self.per_cost_s = fixed, slope

    def predict(self, cost: float) -> float:
        return self.fixed_s + self.per_cost_s * cost

    def fixed_cost_in_tokens(self) -> float:
        """``a / b``: how many padded tokens cost as much as one more call (inf until the
        per-token cost is known, so nothing is kept apart on a guess)."""
        return self.fixed_s / self.per_cost_s if self.per_cost_s > 0 else math.inf


def worth_waiting(model: LatencyModel, *, count: int, longest: int, newcomer: int,
                  expected_gap: float, since_last: float) -> float:
    """Seconds from now that holding a batch of ``count`` items (padded to ``longest``
    tokens; 0 when unknown) for one more arrival of about ``newcomer`` tokens still pays;
    0.0 when it does not (run now).

    ``expected_gap`` is the recent mean gap between arrivals, ``since_last`` the time since
    the last one: a stream that has gone quiet for longer than its usual gap counts as
    slow, so the wait ends once the next arrival is later than the model can afford.
    """
    if model.observations == 0 or count < 1:
        return 0.0  # nothing measured yet: no reason to believe waiting pays
    if longest > 0 or newcomer > 0:
        added, own = max(longest, newcomer) * (count + 1) - longest * count, newcomer
    else:
        added = own = 1  # no token counts: a batch's cost is its item count
    # What the newcomer would pay on its own after this batch: the fixed cost again.
    saved = model.fixed_s + model.per_cost_s * own
    # The longest gap at which one more item still pays for the wait.
    affordable_gap = saved / (count + 1) - model.per_cost_s * added
    if affordable_gap <= 0.0 or expected_gap >= affordable_gap:
        return 0.0
    return max(0.0, affordable_gap - since_last)
