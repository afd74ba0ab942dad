"""Deadline-bounded dynamic batching: plain asyncio and a runner callable, no sockets.

The policy, in one place:

* A batch opens when the model is free and at least one item waits. An empty queue starts
  no timer.
* It closes when it holds ``max_batch_size`` items, or ``max_batch_tokens`` padded tokens
  (longest input x items: what the padded call really computes), or when its **oldest**
  item has waited ``max_delay`` since gateway admission (``WorkItem.admitted_at`` already
  counts the time spent queued in the gateway), whichever comes first. ``max_delay = 0``
  takes what is there. Token lengths are measured on arrival (``WorkItem.tokens``).
* Items whose pipeline parameters differ cannot share a call: a batch only takes items of
  the oldest item's parameter set; the others wait for the next batch.
* Length buckets (``length_buckets``): the batch is built around the oldest item from the
  queued items of the most similar length, with an aging guard (:mod:`worker.batch_policy`).
* While a batch computes in the inference thread, the next one fills for free.
* Cancelled and expired items are answered as such and never computed. So is an item that
  its batch, once closed, would finish after its deadline by the latency model's
  prediction: its answer would arrive after the gateway's 504, and its place goes to an
  item that can make it. (Measured, one worker offered twice what it can do with a 150 ms
  deadline: it computed 1,697 answers, 1,634 of them after their 504.) Dropping such items
  from a batch already closed would run it short (a trial that did so lost a quarter of
  the answers at a 250 ms deadline), so they are left out as it closes, and younger items
  take their places. The deadline is the gateway's less the trip back (gateway.broker).
  One item of a batch always runs, so that a prediction too high is corrected; and a
  stall is learnt as at most STALL_FACTOR times the prediction. Each parameter set has a
  latency model of its own once it has run a few batches (a MiniLM fill-mask batch of 8
  took 249 ms with top_k 500 against 144 ms with top_k 5), and the model of all batches
  until then.
* A batch that raises is split in halves and retried, so one bad input fails alone and its
  neighbours still get results. Every submitted item gets exactly one outcome.
* Adaptive (the worker's default): a batch that is not full waits only while the worker's
  fitted latency model (latency ~ a + b x padded tokens, :mod:`worker.latency_model`) says
  the next arrival, at the current arrival rate of the batch's own parameter set (only
  those can join it), is worth holding it for. A lone request on a quiet worker, or a
  single client's closed loop, runs at once instead of paying ``max_delay``; ``max_delay``
  stays the hard bound. ``adaptive=False`` is the fixed window.
* An out-of-memory error also splits the batch, and lowers the effective token budget to
  the larger half's padded tokens (the effective batch size, when inputs have no token
  counts), so the worker stops asking the device for what it cannot hold; after a while
  without another, it is raised again step by step (:mod:`worker.memory_limits`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from protocol.errors import (
    BatchwireError,
    Cancelled,
    DeadlineExceeded,
    InvalidParameters,
    ModelError,
)
from worker import batch_policy
from worker.latency_model import LatencyModel, worth_waiting
from worker.memory_limits import DEFAULT_RECOVERY_S, MemoryLimits

log = logging.getLogger("batchwire.worker.batcher")

#: Batches observed before the latency model is trusted to call an item late.
LATE_AFTER_BATCHES = 3
#: A batch that takes longer than this many times the model's prediction is learnt as
#: taking that long (Batcher._observe). A lasting slowdown is still followed: each batch
#: raises the prediction, and so the bound.
STALL_FACTOR = 4.0
#: ... plus this, so that a model that predicts next to nothing still learns quickly that
#: batches have become slow.
STALL_FLOOR_S = 0.005


@dataclass(frozen=True, slots=True)
class RunOutput:
    """What a runner may return instead of a bare list, to report each input's token count."""

    outputs: Sequence[Any]
    tokens: Sequence[int]


#: ``runner(inputs, parameters, lengths) -> outputs | RunOutput``: runs in the inference
#: thread, returns one output per input in order, raises on failure. ``lengths`` are the
#: inputs' token counts measured on arrival (0: unknown), so the runner need not re-measure.
Runner = Callable[[list, dict, list], "Sequence[Any] | RunOutput"]


@dataclass(eq=False, slots=True)
class WorkItem:
    request_id: int
    inputs: Any
    parameters: dict
    #: Grouping key: items batch together only when their parameters are equal.
    parameter_key: Any
    #: Monotonic time (this process's clock) at which the gateway admitted the request.
    admitted_at: float
    #: Monotonic time after which nobody waits for the answer any more.
    deadline: float
    #: Token count, measured on arrival (0: unknown, e.g. an input that is not text).
    tokens: int = 0
    cancelled: bool = False
    #: Batches that left this item behind while taking younger ones (the aging guard).
    passed_over: int = 0


#: Parameter sets whose arrival rates are tracked at once; past it the quietest half is
#: forgotten (a forgotten set starts afresh: its next batch does not wait).
MAX_ARRIVAL_STREAMS = 256
#: Parameter keys longer than this are tracked by a 16-byte digest of theirs.
STREAM_KEY_DIGEST_ABOVE = 64


@dataclass(slots=True)
class ArrivalStream:
    """Exponential moving averages of one parameter set's arrivals: the gap between them
    (None until two have arrived) and their token counts; and its batches' latency."""

    last: float
    gap: float | None = None
    tokens: float = 0.0
    latency: LatencyModel = field(default_factory=LatencyModel)

    def observe(self, now: float, tokens: int) -> None:
        gap = now - self.last
        self.gap = gap if self.gap is None else 0.7 * self.gap + 0.3 * gap
        self.last = now
        self.tokens = float(tokens) if not self.tokens else 0.7 * self.tokens + 0.3 * tokens


@dataclass(frozen=True, slots=True)
class BatchStats:
    batch_size: int
    queue_ms: float
    inference_ms: float
    #: Sequence number of the pipeline call this item ran in (1, 2, ...).
    batch_id: int = 0
    tokens: int = 0
    #: The batch's padded cost (longest x items) and the share of it that was padding.
    batch_tokens: int = 0
    padding_ratio: float = 0.0


@dataclass(eq=False)
class Batcher:
    runner: Runner
    executor: Executor
    max_batch_size: int
    max_delay_s: float
    on_result: Callable[[WorkItem, Any, BatchStats], None]
    on_error: Callable[[WorkItem, BatchwireError], None]
    #: Turns whatever the runner raised into the error a client sees.
    classify_error: Callable[[BaseException], BatchwireError] = field(
        default=lambda exc: exc if isinstance(exc, BatchwireError) else ModelError(str(exc))
    )
    #: Wait for a batch to fill only when arrivals suggest more is coming (see module doc).
    adaptive: bool = False
    #: Tells an out-of-memory error from other failures (the runner knows torch; we do not).
    is_out_of_memory: Callable[[BaseException], bool] = field(default=lambda exc: False)
    #: Padded-token budget of one batch; 0: count alone bounds a batch.
    max_batch_tokens: int = 0
    #: Batch items of similar length together (see :mod:`worker.batch_policy`).
    length_buckets: bool = False
    #: How many of the oldest queued items a batch is chosen from (0: all of them).
    window: int = 0
    max_passes: int = batch_policy.DEFAULT_MAX_PASSES
    #: Seconds without an out-of-memory error before a lowered limit is raised a step; 0:
    #: never (:mod:`worker.memory_limits`).
    oom_recovery_s: float = DEFAULT_RECOVERY_S
    #: Leave out of a closing batch the items it would finish too late (see module doc).
    drop_late: bool = True
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_delay_s < 0:
            raise ValueError("max_delay must not be negative")
        if self.max_batch_tokens < 0:
            raise ValueError("max_batch_tokens must not be negative")
        self._queue: list[WorkItem] = []
        self._by_id: dict[int, WorkItem] = {}
        self._wakeup = asyncio.Event()
        self._busy_since: float | None = None
        self._closing = False
        #: Lowered after an out-of-memory error; never above the configured limits.
        self.limits = MemoryLimits(self.max_batch_size, self.max_batch_tokens,
                                   self.oom_recovery_s, self.clock)
        #: The latency of every batch, whatever its parameters: what a parameter set's own
        #: model stands in for until that one has seen LATE_AFTER_BATCHES batches.
        self.latency = LatencyModel()
        #: Arrival streams by parameter set: a batch can only be joined by items of its own
        #: parameters, so only their arrivals say whether holding it pays.
        self._arrivals: dict[Any, ArrivalStream] = {}
        self.batches_run = 0
        self.items_skipped = 0

    # -- feeding (called from the I/O loop) -------------------------------------------
    def submit(self, item: WorkItem) -> None:
        now = self.clock()
        key = _stream_key(item.parameter_key)
        stream = self._arrivals.get(key)
        if stream is None:
            if len(self._arrivals) >= MAX_ARRIVAL_STREAMS:
                self._forget_quiet_streams()
            self._arrivals[key] = ArrivalStream(now, tokens=float(item.tokens))
        else:
            stream.observe(now, item.tokens)
        self._queue.append(item)
        self._by_id[item.request_id] = item
        self._wakeup.set()

    def cancel(self, request_id: int) -> bool:
        """Mark an item as withdrawn; it is skipped if it has not started computing."""
        item = self._by_id.get(request_id)
        if item is None:
            return False
        item.cancelled = True
        self._wakeup.set()
        return True

    @property
    def effective_batch_size(self) -> int:
        return self.limits.batch_size

    @property
    def effective_batch_tokens(self) -> int:
        return self.limits.batch_tokens

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy_since is not None

    def busy_for(self) -> float:
        """Seconds the running batch has been computing (0 when idle)."""
        return 0.0 if self._busy_since is None else self.clock() - self._busy_since

    def abandon_queued(self) -> list[WorkItem]:
        """Take every item that has not started, for a worker that is leaving."""
        items, self._queue = self._queue, []
        for item in items:
            self._by_id.pop(item.request_id, None)
        return items

    # -- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        """Form and run batches until :meth:`close`; returns once the running batch is done."""
        while not self._closing:
            batch = await self._next_batch()
            if batch:
                await self._execute(batch)

    def close(self) -> None:
        self._closing = True
        self._wakeup.set()

    async def _next_batch(self) -> list[WorkItem]:
        while not self._closing:
            self._drop_dead_items()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self.limits.raise_if_due()
            oldest = min(self._queue, key=lambda it: it.admitted_at)
            group = sorted((it for it in self._queue if it.parameter_key == oldest.parameter_key),
                           key=lambda it: it.admitted_at)
            selection = batch_policy.select(
                group, max_items=self.effective_batch_size, max_tokens=self.effective_batch_tokens,
                buckets=self.length_buckets, window=self.window, max_passes=self.max_passes,
                join_slack=self.latency_for(oldest.parameter_key).fixed_cost_in_tokens())
            now = self.clock()
            close_at = oldest.admitted_at + self.max_delay_s
            if self.adaptive:
                close_at = min(close_at, now + self._worth_waiting(selection, now))
            if selection.full or now >= close_at:
                if self._drop_late(selection, now):
                    continue  # choose again: younger items take the late ones' places
                batch_policy.mark_passed_over(group, selection.items)
                self._take(selection.items)
                return selection.items
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), close_at - now)
            except asyncio.TimeoutError:
                pass
        return []

    def _worth_waiting(self, selection: batch_policy.Selection, now: float) -> float:
        """How much longer the batch may wait for the next arrival of its own parameter set
        (see latency_model)."""
        stream = self._arrivals.get(_stream_key(selection.items[0].parameter_key))
        if stream is None or stream.gap is None:
            return 0.0  # one arrival so far: nothing says another is coming
        return worth_waiting(
            self._latency_of(stream), count=len(selection.items),
            longest=max(selection.lengths), newcomer=round(stream.tokens),
            expected_gap=stream.gap, since_last=now - stream.last)

    def _drop_late(self, selection: batch_policy.Selection, now: float) -> bool:
        """Answer 504 to the items of ``selection`` that it would finish after their
        deadlines, but one, and take them from the queue; whether there were any."""
        if not self.drop_late or self.latency.observations < LATE_AFTER_BATCHES:
            return False
        # The prediction as it is, with no margin: leaving a tenth of it for luck still let
        # 200-450 answers of 1,700 through past their 504 in the measurement above, while
        # below capacity neither version turned away what would have made it.
        latency = self.latency_for(selection.items[0].parameter_key)
        predicted = latency.predict(batch_policy.batch_cost(selection.lengths))
        done_at = now + predicted
        late = [it for it in selection.items if it.deadline < done_at]
        if len(late) == len(selection.items):
            # Never all of it: the model learns only from batches that run, so a prediction
            # too high (slow first batches, a length it never saw) would turn every request
            # away for good. The item with the most time left runs, and if the model was
            # wrong, its batch puts it right. (Running the whole batch instead was tried:
            # under overload the worker's queue often holds just the late, and computing
            # them halved the answers in time at a 150 ms deadline.)
            late.remove(max(late, key=lambda it: it.deadline))
        if not late:
            return False
        for item in late:
            left_ms = max(item.deadline - now, 0.0) * 1000.0
            self._finish_error(item, DeadlineExceeded(
                f"the request could not finish within its time budget ({left_ms:.0f} ms were "
                f"left, and its batch takes about {predicted * 1000.0:.0f} ms): the model is "
                "busy; raise X-Timeout-Ms or retry"))
        self.items_skipped += len(late)
        self._take(late)
        return True

    def _take(self, items: list[WorkItem]) -> None:
        """Remove ``items`` from the queue."""
        taken = set(map(id, items))
        self._queue = [it for it in self._queue if id(it) not in taken]

    def _forget_quiet_streams(self) -> None:
        """Bound the per-parameter-set state: keep the most recently active half."""
        keep = sorted(self._arrivals.items(), key=lambda kv: kv[1].last)[len(self._arrivals) // 2:]
        self._arrivals = dict(keep)

    def _drop_dead_items(self, items: list[WorkItem] | None = None) -> list[WorkItem]:
        """Answer the cancelled and expired of ``items`` (the queue when None) and return
        the others; the queue keeps the others."""
        now = self.clock()
        alive = []
        for item in self._queue if items is None else items:
            if item.cancelled:
                self._finish_error(item, Cancelled("the request was cancelled before it ran"))
            elif now >= item.deadline:
                self._finish_error(
                    item, DeadlineExceeded("the request's deadline passed before it could run")
                )
            else:
                alive.append(item)
                continue
            self.items_skipped += 1
        if items is None:
            self._queue = alive
        return alive

    async def _execute(self, batch: list[WorkItem]) -> None:
        try:
            await self._run_isolating(batch)
        finally:
            self._busy_since = None

    async def _run_isolating(self, batch: list[WorkItem]) -> None:
        # A half of a failed batch runs after the whole did: what was cancelled or ran out
        # of time meanwhile is answered as such, not computed.
        batch = self._drop_dead_items(batch)
        if not batch:
            return
        loop = asyncio.get_running_loop()
        self._busy_since = self.clock()
        try:
            lengths = [it.tokens for it in batch]
            outputs, started, finished = await loop.run_in_executor(
                self.executor, self._timed_run, [it.inputs for it in batch], batch[0].parameters,
                lengths)
            tokens: Sequence[int] = lengths
            if isinstance(outputs, RunOutput):
                outputs, tokens = outputs.outputs, outputs.tokens
            count = len(outputs) if hasattr(outputs, "__len__") else None
            if count != len(batch) or len(tokens) != len(batch):
                raise ModelError(f"the pipeline returned {count} outputs for {len(batch)} inputs")
        except Exception as exc:  # noqa: BLE001 - every item must still get an answer
            if self.is_out_of_memory(exc) and len(batch) > 1:
                half = len(batch) // 2
                self.limits.out_of_memory(lengths, half)
                await self._run_isolating(batch[:half])
                await self._run_isolating(batch[half:])
                return
            error = self.classify_error(exc)
            if len(batch) == 1 or isinstance(error, InvalidParameters):
                # Parameters are shared by the whole group: splitting cannot help.
                for item in batch:
                    self._finish_error(item, error)
                return
            log.info("batch of %d failed (%s); splitting to isolate the bad input",
                     len(batch), error.code)
            half = len(batch) // 2
            await self._run_isolating(batch[:half])
            await self._run_isolating(batch[half:])
            return
        self.batches_run += 1
        inference_ms = (finished - started) * 1000.0
        self._observe(batch_policy.batch_cost(tokens), finished - started,
                      batch[0].parameter_key)
        padded = batch_policy.padded_tokens(tokens)
        padding = 1.0 - sum(tokens) / padded if padded else 0.0
        for item, output, count in zip(batch, outputs, tokens):
            stats = BatchStats(len(batch), (started - item.admitted_at) * 1000.0, inference_ms,
                               self.batches_run, count, padded, padding)
            self._by_id.pop(item.request_id, None)
            self.on_result(item, output, stats)

    def latency_for(self, parameter_key: Any) -> LatencyModel:
        """The latency model that predicts a batch of this parameter set: its own, once it
        has seen enough batches, else the one of all batches. With one model for all, a
        client asking for fill-mask top_k 500 beside others asking for the default had the
        cheap batches predicted slower than they were (their items turned away as late
        while they would have made it) and the dear ones faster."""
        return self._latency_of(self._arrivals.get(_stream_key(parameter_key)))

    def _latency_of(self, stream: ArrivalStream | None) -> LatencyModel:
        if stream is not None and stream.latency.observations >= LATE_AFTER_BATCHES:
            return stream.latency
        return self.latency

    def _observe(self, cost: float, seconds: float, parameter_key: Any = None) -> None:
        """Teach the latency models (all batches', and the parameter set's) a batch's time,
        a stall's at most STALL_FACTOR times what each expected: one batch held up for a
        second (a paused VM, a collection, a cold first large batch) tilted the fitted line
        for hundreds of batches, and every batch bigger than the next one alone looked ten
        times slower than it was."""
        stream = self._arrivals.get(_stream_key(parameter_key))
        for model in (self.latency, stream.latency) if stream is not None else (self.latency,):
            learnt = seconds
            if model.observations >= LATE_AFTER_BATCHES:
                learnt = min(seconds, STALL_FACTOR * model.predict(cost) + STALL_FLOOR_S)
            model.observe(cost, learnt)

    def _timed_run(self, inputs: list, parameters: dict, lengths: list) -> tuple[Any, float, float]:
        """Runs in the inference thread and times the call there, so inference_ms is the
        model's time, not the model's time plus however late the event loop woke up."""
        started = self.clock()
        outputs = self.runner(inputs, parameters, lengths)
        return outputs, started, self.clock()

    def _finish_error(self, item: WorkItem, error: BatchwireError) -> None:
        self._by_id.pop(item.request_id, None)
        self.on_error(item, error)


def _stream_key(parameter_key: Any) -> Any:
    """The key of a parameter set's arrival stream: a digest of a long one, so that streams
    of parameters a client filled with megabytes (refused or not) cannot hold 256 of them."""
    if isinstance(parameter_key, bytes) and len(parameter_key) > STREAM_KEY_DIGEST_ABOVE:
        return hashlib.blake2b(parameter_key, digest_size=16).digest()
    return parameter_key
