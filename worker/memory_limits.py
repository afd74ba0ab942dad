"""What a worker's batches may cost once its device has run out of memory, and how that limit
comes back.

An out-of-memory error lowers the limit to what the larger half of the failed batch costs,
so the worker stops asking the device for what it could not hold. It need not stay there:
the memory may have been taken by something that has since let go of it (another process on
the GPU, the allocator's fragmentation after an unusual batch). So after ``recovery_s``
without another such error the limit is raised by a quarter, and again after each further
``recovery_s``, back to the configured one. An error at a raised limit lowers it again and
doubles the wait before the next raise (up to an hour), so a device that truly holds no more
is asked for more ever more rarely: each ask costs one failed call, whose halves then run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from worker import batch_policy

log = logging.getLogger("batchwire.worker.batcher")

#: Seconds without an out-of-memory error before a lowered limit is first raised again.
DEFAULT_RECOVERY_S = 60.0
#: The longest wait between raises, however often raising has failed.
MAX_RECOVERY_S = 3600.0
#: Each raise multiplies a lowered limit by this much: small steps, so the limit settles
#: near what the device holds instead of swinging between half and all of it.
RAISE_STEP = 1.25
#: With no configured token budget, the lowered one is dropped once it is this many times
#: the cost of the batch that ran out of memory.
UNBOUNDED_PAST = 2


@dataclass(eq=False)
class MemoryLimits:
    #: The configured limits, which the effective ones never pass.
    max_batch_size: int
    #: 0: no token budget.
    max_batch_tokens: int
    #: 0: a lowered limit is never raised again.
    recovery_s: float = DEFAULT_RECOVERY_S
    clock: Callable[[], float] = time.monotonic
    #: What batches may cost now: the configured limits until the device runs out.
    batch_size: int = field(init=False)
    batch_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch_size, self.batch_tokens = self.max_batch_size, self.max_batch_tokens
        self._wait_s = self.recovery_s
        self._changed_at = 0.0
        #: Whether the limit was raised since the last error: one more says the raise was
        #: too much, and the next one waits twice as long.
        self._raised = False
        #: The padded tokens of the last batch that ran out of memory.
        self._failed_tokens = 0

    @property
    def lowered(self) -> bool:
        return (self.batch_size < self.max_batch_size
                or self.batch_tokens != self.max_batch_tokens)

    def out_of_memory(self, lengths: Sequence[int], half: int) -> None:
        """A batch of inputs of these token ``lengths`` ran out of memory and is run as its
        first ``half`` and the rest: the larger of those is what the next batches may cost.
        Activation memory follows padded tokens, so when every token count is known only
        the token budget drops, and short inputs still batch up to the configured count.
        Without counts (inputs that are not text), the count drops."""
        if self._raised:
            self._wait_s = min(self._wait_s * 2, MAX_RECOVERY_S)
            self._raised = False
        self._changed_at = self.clock()
        if all(lengths):  # both halves hold an item, so the cost below is positive
            self._failed_tokens = batch_policy.padded_tokens(lengths)
            cost = max(batch_policy.padded_tokens(lengths[:half]),
                       batch_policy.padded_tokens(lengths[half:]))
            if not self.batch_tokens or cost < self.batch_tokens:
                self.batch_tokens = cost
                log.warning("out of memory on a batch of %d (%d padded tokens); effective "
                            "token budget is now %d padded tokens", len(lengths),
                            self._failed_tokens, cost)
        elif len(lengths) - half < self.batch_size:
            self.batch_size = len(lengths) - half
            log.warning("out of memory on a batch of %d; effective batch size is now %d",
                        len(lengths), self.batch_size)

    def raise_if_due(self) -> None:
        """Raise a lowered limit a step when ``recovery_s`` (doubled for each raise that ran
        out of memory again) has passed since it last changed. Called as each batch forms."""
        if not self.recovery_s or not self.lowered:
            return
        now = self.clock()
        if now - self._changed_at < self._wait_s:
            return
        self._changed_at, self._raised = now, True
        if self.batch_size < self.max_batch_size:
            self.batch_size = min(self.max_batch_size,
                                  max(self.batch_size + 1, math.ceil(self.batch_size * RAISE_STEP)))
        if self.batch_tokens != self.max_batch_tokens:
            raised = max(self.batch_tokens + 1, math.ceil(self.batch_tokens * RAISE_STEP))
            if self.max_batch_tokens:
                self.batch_tokens = min(self.max_batch_tokens, raised)
            else:
                self.batch_tokens = 0 if raised >= UNBOUNDED_PAST * self._failed_tokens else raised
        log.info("no out-of-memory error for %.0f s: effective batch size %d, token budget %s "
                 "(configured: %d, %s)", self._wait_s, self.batch_size,
                 self.batch_tokens or "none", self.max_batch_size, self.max_batch_tokens or "none")
