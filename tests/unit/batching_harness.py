"""The shared harness of the batcher tests: a recording plain-Python runner, a started
:class:`~worker.batcher.Batcher` around it, and the helpers the tests wait with.

Everything is plain asyncio plus a plain-Python runner executed in a real single-thread
executor (as the worker does): no sockets, no torch. Timing assertions use the time the
runner is *called*, recorded inside the runner with ``time.monotonic`` (the batcher's own
clock), so they measure the policy and not the test's scheduling. Synchronisation is always
"wait for a condition, with a timeout"; the only sleeps are inside the runner (simulated
compute) or the poll step of :func:`wait_until`.

The ``make_batcher`` fixture (tests/unit/conftest.py) wraps :class:`BatcherFactory`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from protocol.errors import BatchwireError
from worker import batch_policy
from worker.batcher import Batcher, BatchStats, WorkItem

#: Slack allowed on "it ran at time T" assertions.
TOL = 0.05
#: Upper bound on any single wait in these tests.
WAIT = 5.0

P_A = {"top_k": 1}
P_B = {"top_k": 5}


def key_of(parameters: dict) -> Any:
    return tuple(sorted(parameters.items()))


def default_outputs(inputs: list, parameters: dict) -> list:
    return [("out", x, parameters.get("top_k")) for x in inputs]


def expected_output(item: WorkItem) -> Any:
    return ("out", item.inputs, item.parameters.get("top_k"))


async def wait_until(condition: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Wait for ``condition`` to hold, polling; fail the test if it does not within ``timeout``."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")


def linear_cost(fixed_s: float, per_token_s: float) -> Callable[[Sequence[int]], float]:
    """Simulated compute of a padded call: ``fixed_s + per_token_s x padded tokens``."""

    def cost(lengths: Sequence[int]) -> float:
        return fixed_s + per_token_s * batch_policy.padded_tokens(lengths)

    return cost


@dataclass
class Call:
    started: float
    inputs: list
    parameters: dict
    ended: float | None = None
    #: The token lengths the batcher passed along with the inputs.
    lengths: list = field(default_factory=list)
    #: Simulated compute time of this call (``cost(lengths)``); 0 without a cost model.
    cost_s: float = 0.0
    #: What the call raised instead of returning outputs, if anything.
    raised: BaseException | None = None

    @property
    def padded_tokens(self) -> int:
        return batch_policy.padded_tokens(self.lengths)


class Runner:
    """A synchronous ``runner(inputs, parameters, lengths) -> outputs`` that records every call.

    ``compute`` produces the outputs (and may raise); ``block_first`` makes the first call
    park on a threading.Event until :meth:`release` (``first_started`` tells when it is
    parked); ``duration`` is simulated compute time per call; ``cost(lengths)`` is simulated
    compute time as a function of the call's token lengths (see :func:`linear_cost`);
    ``raise_if(lengths)`` returns an exception for the call to raise (after its simulated
    compute), or None.
    """

    def __init__(
        self,
        compute: Callable[[list, dict], Any] = default_outputs,
        *,
        block_first: bool = False,
        duration: float = 0.0,
        cost: Callable[[Sequence[int]], float] | None = None,
        raise_if: Callable[[Sequence[int]], BaseException | None] | None = None,
    ):
        self.compute = compute
        self.block_first = block_first
        self.duration = duration
        self.cost = cost
        self.raise_if = raise_if
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self.first_started = threading.Event()
        self._release = threading.Event()

    def __call__(self, inputs: list, parameters: dict, lengths: list | None = None) -> Any:
        lengths = list(lengths or [])
        call = Call(time.monotonic(), list(inputs), dict(parameters), lengths=lengths)
        with self._lock:
            self.calls.append(call)
            first = len(self.calls) == 1
        try:
            if self.block_first and first:
                self.first_started.set()
                if not self._release.wait(WAIT):
                    raise RuntimeError("test runner was never released")
            if self.duration:
                time.sleep(self.duration)
            if self.cost is not None:
                call.cost_s = self.cost(lengths)
                time.sleep(call.cost_s)  # simulated compute
            if self.raise_if is not None:
                exc = self.raise_if(lengths)
                if exc is not None:
                    raise exc
            return self.compute(inputs, parameters)
        except BaseException as exc:
            call.raised = exc
            raise
        finally:
            call.ended = time.monotonic()

    def release(self) -> None:
        self._release.set()

    @property
    def computed_inputs(self) -> set:
        """The inputs of every call that returned outputs (not of one that raised)."""
        return {x for call in self.calls if call.raised is None for x in call.inputs}

    @property
    def seen_inputs(self) -> list:
        return [x for call in self.calls for x in call.inputs]

    @property
    def sizes(self) -> list[int]:
        return [len(call.inputs) for call in self.calls]

    @property
    def simulated_s(self) -> float:
        """Total simulated compute of every call so far (deterministic, unlike wall time)."""
        return sum(call.cost_s for call in self.calls)


@dataclass
class Outcome:
    kind: str  # "result" or "error"
    item: WorkItem
    output: Any = None
    stats: BatchStats | None = None
    error: BatchwireError | None = None


@dataclass
class Harness:
    batcher: Batcher
    runner: Runner
    executor: ThreadPoolExecutor
    task: asyncio.Task | None = None
    outcomes: dict[int, list[Outcome]] = field(default_factory=dict)

    def record(self, outcome: Outcome) -> None:
        self.outcomes.setdefault(outcome.item.request_id, []).append(outcome)

    @property
    def answered(self) -> int:
        return len(self.outcomes)

    def only(self, request_id: int) -> Outcome:
        got = self.outcomes.get(request_id, [])
        assert len(got) == 1, f"request {request_id} got {len(got)} outcomes: {got}"
        return got[0]

    def results(self) -> dict[int, Outcome]:
        return {rid: o[0] for rid, o in self.outcomes.items() if o[0].kind == "result"}

    def errors(self) -> dict[int, Outcome]:
        return {rid: o[0] for rid, o in self.outcomes.items() if o[0].kind == "error"}

    def submit(self, *items: WorkItem) -> None:
        for it in items:
            self.batcher.submit(it)

    async def answered_all(self, items, timeout: float = WAIT) -> None:
        ids = {it.request_id for it in items}
        await wait_until(lambda: ids <= self.outcomes.keys(), timeout,
                         f"outcomes for {len(ids)} requests")

    def assert_exactly_once(self, items) -> None:
        for it in items:
            self.only(it.request_id)
        extra = self.outcomes.keys() - {it.request_id for it in items}
        assert not extra, f"outcomes for requests never submitted: {extra}"


def make_item(
    rid: int,
    inputs: Any = None,
    *,
    parameters: dict = P_A,
    admitted_at: float | None = None,
    deadline: float | None = None,
    tokens: int = 0,
) -> WorkItem:
    now = time.monotonic()
    return WorkItem(
        request_id=rid,
        inputs=f"in-{rid}" if inputs is None else inputs,
        parameters=parameters,
        parameter_key=key_of(parameters),
        admitted_at=now if admitted_at is None else admitted_at,
        deadline=now + 60.0 if deadline is None else deadline,
        tokens=tokens,
    )


class BatcherFactory:
    """Builds started Batchers around Runners; :meth:`close_all` tears every one down."""

    def __init__(self) -> None:
        self.harnesses: list[Harness] = []

    def __call__(
        self,
        runner: Runner | None = None,
        *,
        max_batch_size: int = 8,
        max_delay: float = 0.05,
        classify_error: Callable[[BaseException], BatchwireError] | None = None,
        adaptive: bool = False,
        max_batch_tokens: int = 0,
        length_buckets: bool = False,
        window: int = 0,
        max_passes: int | None = None,
        is_out_of_memory: Callable[[BaseException], bool] | None = None,
    ) -> Harness:
        runner = runner or Runner()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-inference")
        harness: Harness

        def on_result(item: WorkItem, output: Any, stats: BatchStats) -> None:
            harness.record(Outcome("result", item, output=output, stats=stats))

        def on_error(item: WorkItem, error: BatchwireError) -> None:
            harness.record(Outcome("error", item, error=error))

        # Left out when not given, so the Batcher's own defaults are what gets tested.
        extra: dict[str, Any] = {}
        if classify_error is not None:
            extra["classify_error"] = classify_error
        if max_passes is not None:
            extra["max_passes"] = max_passes
        if is_out_of_memory is not None:
            extra["is_out_of_memory"] = is_out_of_memory
        batcher = Batcher(
            runner=runner,
            executor=executor,
            max_batch_size=max_batch_size,
            max_delay_s=max_delay,
            on_result=on_result,
            on_error=on_error,
            adaptive=adaptive,
            max_batch_tokens=max_batch_tokens,
            length_buckets=length_buckets,
            window=window,
            **extra,
        )
        harness = Harness(batcher, runner, executor)
        harness.task = asyncio.create_task(batcher.run(), name="batcher-under-test")
        self.harnesses.append(harness)
        return harness

    async def close_all(self) -> None:
        failures = []
        for h in self.harnesses:
            h.runner.release()
            h.batcher.close()
            try:
                await asyncio.wait_for(h.task, WAIT)
            except BaseException as exc:  # noqa: BLE001 - tear every harness down, then report
                failures.append(exc)
            finally:
                h.executor.shutdown(wait=True)
        if failures:
            raise failures[0]
