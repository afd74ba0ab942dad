"""The gateway broker over real ZeroMQ sockets, with fake workers driven by the test.

Each test binds a :class:`gateway.broker.Broker` ROUTER on an ipc:// endpoint in its own
tmp_path and connects DEALER sockets from this process that speak the wire protocol by
hand: they send READY, read REQUEST/CANCEL/HEARTBEAT frames, and answer RESULT/ERROR when
the test says so. No worker processes, no model.

Synchronisation is never a sleep. Frames on one DEALER-ROUTER pipe stay in order both ways,
and the broker answers every READY with a HEARTBEAT (after anything it sent that worker
before), so :meth:`FakeWorker.sync` (re-send READY, wait for that HEARTBEAT) is a barrier:
once it returns, the broker has handled every frame this worker sent before it and this
worker has received every frame the broker sent it before. Tests that need it keep the
broker's heartbeat interval long so no periodic HEARTBEAT can pass for the barrier's reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import signal
import time
import uuid
from typing import Any, Callable

import msgpack
import pytest
import zmq
import zmq.asyncio

from gateway.broker import (COMPACT_QUEUE_ABOVE, LIST_ITEM_FAILED, MAX_CRASHES, YIELD_AFTER_BYTES,
                            YIELD_AFTER_FRAMES, Broker, PendingRequest, WorkerHandle)
from protocol import codec
from gateway.held_memory import STRUCTURED_EXPANSION
from protocol.errors import (
    AnswersTooLarge,
    BatchwireError,
    Cancelled,
    DeadlineExceeded,
    Draining,
    ModelError,
    NoWorkers,
    Overloaded,
    WorkerCrashed,
)
from protocol.messages import (
    PROTOCOL_VERSION,
    Cancel,
    NDArray,
    Disconnect,
    Error,
    Heartbeat,
    Message,
    MessageType,
    Ready,
    Request,
    Result,
)
from tests.e2e.conftest import wait_for_async

#: Generous bound on anything that should happen "now": only reached when a test fails.
WAIT_S = 5.0
#: Long enough that the broker's periodic heartbeat never fires inside a test.
QUIET_HEARTBEAT_S = 60.0


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S):
    """Poll a condition of the broker's state, yielding to the loop, with a deadline."""
    return await wait_for_async(predicate, timeout, what, interval=0.005)


async def outcome(pending: PendingRequest, timeout: float = WAIT_S) -> Any:
    """The future's result, or the exception it raised (returned, not raised)."""
    try:
        return await asyncio.wait_for(asyncio.shield(pending.future), timeout)
    except BatchwireError as exc:
        return exc


def ids(pendings: list[PendingRequest]) -> list[int]:
    return [p.request_id for p in pendings]


class FakeWorker:
    """A DEALER in the test process that speaks the worker side of the protocol."""

    _pids = itertools.count(3_900_001)

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, name: str, capacity: int):
        self.name = name
        self.identity = f"fake-{name}/{uuid.uuid4().hex[:8]}".encode()
        self.pid = next(self._pids)
        self.ready = Ready(worker_id=name, pid=self.pid, model="fake-model", task="fill-mask",
                           device="cpu", capacity=capacity, max_batch_size=capacity)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.requests: list[Request] = []
        self.cancels: list[int] = []
        self.heartbeats = 0
        self.disconnects: list[Disconnect] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read(), name=f"fake-worker-{name}")
        self.closed = False

    async def _read(self) -> None:
        while True:
            message = codec.decode(await self.sock.recv())
            if isinstance(message, Request):
                self.requests.append(message)
            elif isinstance(message, Cancel):
                self.cancels.append(message.request_id)
            elif isinstance(message, Heartbeat):
                self.heartbeats += 1
            elif isinstance(message, Disconnect):
                self.disconnects.append(message)
            else:
                raise AssertionError(f"a worker got {message!r} from the broker")
            async with self._changed:
                self._changed.notify_all()

    async def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT_S):
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
        except asyncio.TimeoutError:
            if self._reader.done() and self._reader.exception() is not None:
                raise self._reader.exception()
            raise AssertionError(f"worker {self.name}: timed out after {timeout:.1f} s "
                                 f"waiting for {what}") from None

    async def wait_requests(self, n: int) -> list[Request]:
        await self.wait(lambda: len(self.requests) >= n, f"{n} request(s), has "
                        f"{[r.request_id for r in self.requests]}")
        return list(self.requests)

    def request_ids(self) -> list[int]:
        return [r.request_id for r in self.requests]

    async def send(self, message: Message) -> None:
        await self.sock.send(codec.encode(message))

    async def send_raw(self, *frames: bytes) -> None:
        await self.sock.send_multipart(list(frames))

    async def sync(self) -> None:
        """Barrier: (re-)send READY and wait for the HEARTBEAT the broker answers it with."""
        seen = self.heartbeats
        await self.send(self.ready)
        await self.wait(lambda: self.heartbeats > seen, "the broker's reply to READY")

    register = sync

    async def answer(self, request_id: int, output: Any = None, *, batch_id: int = 0,
                     batch_size: int = 1, inference_ms: float = 2.0,
                     batch_tokens: int = 0) -> None:
        await self.send(Result(request_id=request_id, output=output, batch_size=batch_size,
                               queue_ms=1.0, inference_ms=inference_ms, batch_id=batch_id,
                               batch_tokens=batch_tokens))

    async def fail(self, request_id: int, code: str, message: str = "") -> None:
        await self.send(Error(request_id=request_id, code=code, message=message or code))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self.sock.close(linger=0)


class Harness:
    """Makes the broker and fake workers of one test, and closes all of them."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str):
        self.ctx = ctx
        self.endpoint = endpoint
        self.brokers: list[Broker] = []
        self.workers: list[FakeWorker] = []
        #: (pid, reason) of every on_worker_dead call.
        self.deaths: list[tuple[int, str]] = []

    async def broker(self, *, max_queue: int = 16, heartbeat_interval_s: float = QUIET_HEARTBEAT_S,
                     batch_timeout_s: float = 60.0, **options: Any) -> Broker:
        broker = Broker(self.endpoint, max_queue=max_queue, **options,
                        heartbeat_interval_s=heartbeat_interval_s,
                        batch_timeout_s=batch_timeout_s, context=self.ctx)
        # Fake pids: record instead of letting anything act on them.
        broker.on_worker_dead = lambda pid, reason, identity: self.deaths.append((pid, reason))
        self.brokers.append(broker)
        await broker.start()
        return broker

    def peer(self, name: str, capacity: int = 1) -> FakeWorker:
        worker = FakeWorker(self.ctx, self.endpoint, name, capacity)
        self.workers.append(worker)
        return worker

    async def worker(self, broker: Broker, name: str, capacity: int) -> FakeWorker:
        """A fake worker, registered: the broker has it in ``workers`` when this returns."""
        worker = self.peer(name, capacity)
        await worker.register()
        assert broker.workers[worker.identity].info.capacity == capacity
        return worker

    async def aclose(self) -> None:
        for broker in self.brokers:
            await broker.close()
        for worker in self.workers:
            await worker.close()


@pytest.fixture
async def h(tmp_path):
    ctx = zmq.asyncio.Context()
    harness = Harness(ctx, f"ipc://{tmp_path}/b.sock")
    try:
        yield harness
    finally:
        await harness.aclose()
        ctx.destroy(linger=0)


def handle(broker: Broker, worker: FakeWorker):
    return broker.workers[worker.identity]


# -- 1. credit --------------------------------------------------------------------------------
async def test_credit_caps_unanswered_requests_per_worker(h):
    broker = await h.broker()
    w = await h.worker(broker, "a", capacity=2)

    p = broker.submit_many(["x1", "x2", "x3"], {"top_k": 1}, 5.0)
    got = await w.wait_requests(2)
    await w.sync()
    assert w.request_ids() == ids(p[:2]), "the third request went out beyond the credit"
    assert [r.inputs for r in got] == ["x1", "x2"]
    assert got[0].parameters == {"top_k": 1}
    assert 0 < got[0].budget_ms <= 5000.0 and got[0].waited_ms >= 0.0
    assert broker.queue_depth == 1
    assert set(handle(broker, w).in_flight) == set(ids(p[:2]))
    assert not p[2].future.done()

    await w.answer(p[1].request_id, "y2")  # answering either one frees a slot
    assert (await outcome(p[1])).output == "y2"
    got = await w.wait_requests(3)
    assert got[2].request_id == p[2].request_id and got[2].inputs == "x3"
    assert broker.queue_depth == 0
    await w.sync()
    assert len(w.requests) == 3

    await w.answer(p[0].request_id, "y1")
    await w.answer(p[2].request_id, "y3")
    assert [(await outcome(x)).output for x in p] == ["y1", "y2", "y3"]
    assert handle(broker, w).in_flight == {}
    assert broker.in_flight == 0


# -- 2. most free credit first ---------------------------------------------------------------
async def test_dispatch_goes_to_the_worker_with_most_free_credit(h):
    broker = await h.broker()
    a = await h.worker(broker, "a", capacity=4)
    first = broker.submit_many(["a1", "a2", "a3"], {}, 5.0)
    await a.wait_requests(3)
    b = await h.worker(broker, "b", capacity=4)  # joins later, so it is the second choice on ties

    nxt = broker.submit_many(["n1"], {}, 5.0)
    await b.wait_requests(1)
    assert b.request_ids() == ids(nxt)
    # B (free 3) still beats A (free 1).
    more = broker.submit_many(["n2", "n3"], {}, 5.0)
    await b.wait_requests(3)
    await a.sync()
    await b.sync()
    assert a.request_ids() == ids(first)
    assert b.request_ids() == ids(nxt + more)
    assert handle(broker, a).free == 1 and handle(broker, b).free == 1


async def test_dispatch_prefers_the_worker_that_answers_sooner_and_overflows_to_the_other(h):
    """By free credit alone, a worker ten times slower held half the requests under load
    and, joined first, took every request at low load while the fast one idled."""
    # A frozen clock, so only the batch times reported count: a real one added the
    # machine's round trip to the fast worker's (past 0.1 s on a loaded one, it looked
    # as slow as the slow one).
    broker = await h.broker(max_queue=64, clock=lambda: 1000.0)
    slow = await h.worker(broker, "slow", capacity=4)  # joined first: the old tie-break
    fast = await h.worker(broker, "fast", capacity=4)
    batch = itertools.count(1)

    async def serve(worker: FakeWorker, inference_ms: float, n: int) -> None:
        await worker.wait_requests(n)
        for request in worker.requests[n - 1:n]:
            await worker.answer(request.request_id, worker.name, batch_id=next(batch),
                                inference_ms=inference_ms, batch_tokens=20)

    # One request each, to learn their speeds: 10 ms a batch against 100 ms.
    first = broker.submit_many(["a", "b"], {}, 5.0)
    await serve(slow, 100.0, 1)
    await serve(fast, 10.0, 1)
    assert sorted([(await outcome(p)).output for p in first]) == ["fast", "slow"]
    # One client at a time: every request to the fast worker.
    for i in range(6):
        (p,) = broker.submit_many([f"low {i}"], {}, 5.0)
        await serve(fast, 10.0, 2 + i)
        assert (await outcome(p)).output == "fast"
    assert len(slow.requests) == 1
    # More than the fast worker holds: the rest goes to the slow one, not into the queue.
    burst = broker.submit_many([f"burst {i}" for i in range(6)], {}, 5.0)
    await fast.wait_requests(7 + 4)
    await slow.wait_requests(1 + 2)
    assert broker.queue_depth == 0 and not any(p.done for p in burst)


async def test_a_new_worker_is_taken_for_average_and_an_idle_ones_slow_record_fades(h):
    """A worker with no batch yet looked instantly fast and got a whole burst while a known
    one sat idle; and one slow batch on record kept an idle worker out for good, since its
    estimate changed only when it answered."""
    # A frozen clock: each worker's trip is then 0, not the machine's ZeroMQ round trip
    # (on a loaded one, over 12 ms tipped the burst's split); and with no time passing no
    # worker is ever declared dead. Records fade by heartbeat ticks, which still come.
    broker = await h.broker(heartbeat_interval_s=0.1, clock=lambda: 1000.0)
    known = await h.worker(broker, "known", capacity=8)
    new = h.peer("new", capacity=8)
    await joined_later(broker, known, new)


async def joined_later(broker: Broker, known: FakeWorker, new: FakeWorker) -> None:
    (p,) = broker.submit_many(["first"], {}, 5.0)
    await known.wait_requests(1)
    await known.answer(p.request_id, "known", batch_id=1, inference_ms=10.0)
    await outcome(p)
    await new.register()
    broker.submit_many([f"burst {i}" for i in range(8)], {}, 5.0)
    await known.wait_requests(1 + 4)
    await new.wait_requests(4)
    assert len(known.requests) == 5 and len(new.requests) == 4

    for i, request in enumerate(known.requests[1:]):
        await known.answer(request.request_id, "known", batch_id=2 + i, inference_ms=10.0)
    for i, request in enumerate(new.requests):  # one long batch on record
        await new.answer(request.request_id, "new", batch_id=1 + i, inference_ms=500.0)
    await new.sync()
    assert handle(broker, new).batch_s > 0.1
    await wait_until(lambda: handle(broker, new).batch_s < 0.05, "the idle worker's record to fade")


async def test_dispatch_counts_the_way_back_from_a_distant_worker(h):
    """Two workers computing alike, one across a slow link: by batch time alone they tied,
    and the distant one (40 ms each way in the probe) got as many requests, a quarter of
    them past a 60 ms deadline."""
    now = [1000.0]
    broker = await h.broker(clock=lambda: now[0])
    far = await h.worker(broker, "far", capacity=4)  # joined first: the tie-break's pick
    near = await h.worker(broker, "near", capacity=4)
    broker.submit_many(["a", "b"], {}, 5.0)
    await far.wait_requests(1)
    await near.wait_requests(1)
    await near.answer(near.requests[0].request_id, "near", batch_id=1, inference_ms=10.0)
    await near.sync()
    now[0] += 0.1  # the trip to the far worker and back takes 100 ms
    await far.answer(far.requests[0].request_id, "far", batch_id=1, inference_ms=10.0)
    await far.sync()
    assert handle(broker, far).trip_s == pytest.approx(0.1 - 0.011)
    assert handle(broker, near).trip_s == 0.0
    for i in range(4):
        (p,) = broker.submit_many([f"low {i}"], {}, 5.0)
        await near.wait_requests(2 + i)
        await near.answer(near.requests[-1].request_id, "near", batch_id=2 + i,
                          inference_ms=10.0)
        assert (await outcome(p)).output == "near"
    assert len(far.requests) == 1


async def test_a_worker_is_given_the_time_left_less_its_trip_there_and_back(h):
    """An answer must leave the worker a trip before the deadline to arrive in time: told
    the whole time left, an overloaded worker computed answers that came after their 504."""
    now = [1000.0]
    broker = await h.broker(clock=lambda: now[0])
    w = await h.worker(broker, "far", capacity=4)
    broker.submit_many(["a"], {}, 5.0)
    (first,) = await w.wait_requests(1)
    assert first.budget_ms == pytest.approx(5000.0)  # no trip measured yet
    now[0] += 0.1
    await w.answer(first.request_id, "a", batch_id=1, inference_ms=10.0)
    await w.sync()
    broker.submit_many(["b"], {}, 5.0)
    second = (await w.wait_requests(2))[1]
    assert second.budget_ms == pytest.approx(5000.0 - 89.0)
    # One answer read late (a stalled event loop) makes the trip look long: the worker
    # still gets half the time left, not none, or every request would be 504 and no
    # answer would ever come to measure the trip again.
    now[0] += 2.0
    await w.answer(second.request_id, "b", batch_id=2, inference_ms=10.0)
    await w.sync()
    assert handle(broker, w).trip_s > 0.3
    broker.submit_many(["c"], {}, 0.3)
    third = (await w.wait_requests(3))[2]
    assert third.budget_ms == pytest.approx(150.0)


async def test_the_queue_serves_the_earliest_deadline_first(h):
    """Behind a backlog of requests with long deadlines, one with a short deadline went
    last, however soon it had to be answered; with one deadline for all, the order is the
    order of arrival, as before."""
    broker = await h.broker()
    w = await h.worker(broker, "a", capacity=1)
    (busy,) = broker.submit_many(["busy"], {}, 5.0)
    await w.wait_requests(1)
    long1, long2 = broker.submit_many(["long 1", "long 2"], {}, 30.0)
    (short,) = broker.submit_many(["short"], {}, 1.0)
    (long3,) = broker.submit_many(["long 3"], {}, 30.0)
    (medium,) = broker.submit_many(["medium"], {}, 10.0)
    order = [busy]
    for expected in (short, medium, long1, long2, long3):
        await w.answer(order[-1].request_id, "x")
        got = await w.wait_requests(len(order) + 1)
        assert got[-1].request_id == expected.request_id, [r.inputs for r in got]
        order.append(expected)
    assert broker.queue_depth == 0


async def test_a_deadline_past_the_default_queues_as_the_default_and_is_not_starved(h):
    """By its own deadline, a request given an hour went behind every default one admitted
    after it, for as long as they kept coming."""
    broker = await h.broker(max_queue=64, default_timeout_s=30.0)
    w = await h.worker(broker, "a", capacity=1)
    (busy,) = broker.submit_many(["busy"], {}, 30.0)
    await w.wait_requests(1)
    (patient,) = broker.submit_many(["patient"], {}, 3600.0)
    steady = broker.submit_many(["n0"], {}, 30.0)
    (short,) = broker.submit_many(["short"], {}, 1.0)  # shorter than the default: still first
    order = [busy]
    for expected in (short, patient, steady[0]):
        await w.answer(order[-1].request_id, "x")
        got = await w.wait_requests(len(order) + 1)
        assert got[-1].request_id == expected.request_id, [r.inputs for r in got]
        order.append(expected)


async def test_withdrawn_requests_do_not_pile_up_in_the_queue(h):
    """Withdrawn requests wait in the heap for their turn at its top, which behind a stream
    of shorter deadlines can be a long while: it is rebuilt without them, and the live ones
    keep their order."""
    broker = await h.broker(max_queue=4000)
    w = await h.worker(broker, "a", capacity=1)
    (busy,) = broker.submit_many(["busy"], {}, 5.0)
    await w.wait_requests(1)
    waiting = broker.submit_many([f"x{i}" for i in range(3000)], {}, 30.0)
    kept = waiting[::100]
    keep = {pending.request_id for pending in kept}
    for pending in waiting:
        if pending.request_id not in keep:
            broker.cancel(pending)
    assert broker.queue_depth == len(kept) == 30
    assert len(broker._queue) <= 2 * len(kept) + COMPACT_QUEUE_ABOVE
    # Those still in the heap hold no inputs (a body each, back in the budget already).
    assert all(p.inputs is None for _, p in broker._queue if not p.queued)
    previous = busy
    for pending in kept:
        await w.answer(previous.request_id, "x")
        got = await w.wait_requests(len(w.requests) + 1)
        assert got[-1].request_id == pending.request_id
        previous = pending
    assert broker.queue_depth == 0


# -- 3. exactly once --------------------------------------------------------------------------
async def test_duplicate_answers_resolve_once_and_free_credit_once(h, caplog):
    caplog.set_level(logging.WARNING, logger="batchwire.gateway.broker")
    broker = await h.broker()
    w = await h.worker(broker, "a", capacity=2)
    p = broker.submit_many(["x1", "x2", "x3"], {}, 5.0)
    await w.wait_requests(2)

    r1 = p[0].request_id
    await w.answer(r1, "first")
    await w.answer(r1, "second")  # duplicate
    await w.fail(r1, "model_error")  # and a late error for the same id
    await w.wait_requests(3)  # the real slot freed by the first answer
    await w.sync()  # the broker has handled both duplicates

    assert (await outcome(p[0])).output == "first"
    worker = handle(broker, w)
    assert set(worker.in_flight) == {p[1].request_id, p[2].request_id}
    assert worker.answered == 1
    assert broker.queue_depth == 0
    # Had a duplicate freed a second slot, this one would go out now.
    q = broker.submit_many(["x4"], {}, 5.0)
    await w.sync()
    assert broker.queue_depth == 1 and len(w.requests) == 3
    await w.answer(p[1].request_id, "two")
    got = await w.wait_requests(4)
    assert got[3].request_id == q[0].request_id
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# -- 4. deadline ------------------------------------------------------------------------------
async def test_deadline_answers_504_cancels_on_worker_and_keeps_credit_until_answered(h):
    broker = await h.broker()
    w = await h.worker(broker, "a", capacity=1)

    started = time.monotonic()
    (p,) = broker.submit_many(["slow"], {}, 0.05)
    (req,) = await w.wait_requests(1)
    assert req.budget_ms <= 50.0
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(p.future, WAIT_S)
    elapsed = time.monotonic() - started
    assert 0.04 <= elapsed < 3.0, f"deadline of 0.05 s fired after {elapsed:.3f} s"
    await w.wait(lambda: p.request_id in w.cancels, "a CANCEL for the expired request")
    assert broker.in_flight == 0

    # The worker may still be computing it: the slot stays taken.
    assert p.request_id in handle(broker, w).in_flight
    (q,) = broker.submit_many(["next"], {}, 5.0)
    await w.sync()
    assert broker.queue_depth == 1 and len(w.requests) == 1

    await w.fail(p.request_id, "cancelled", "skipped")
    got = await w.wait_requests(2)
    assert got[1].request_id == q.request_id
    assert handle(broker, w).skipped == 1
    assert isinstance(p.future.exception(), DeadlineExceeded)  # unchanged by the late answer
    await w.answer(q.request_id, "ok")
    assert (await outcome(q)).output == "ok"


async def test_each_504_for_a_deadline_is_counted_where_the_input_was(h):
    """A 504 alone did not say whether to add workers or to look at batch sizes: each is
    now counted by where its input was when the deadline ran out."""
    broker = await h.broker()
    w = await h.worker(broker, "a", capacity=1)
    missed = broker.deadline_missed
    assert missed == {"gateway_queue": 0, "worker_refused": 0, "in_flight": 0}

    (busy,) = broker.submit_many(["busy"], {}, 30.0)
    await w.wait_requests(1)
    (queued,) = broker.submit_many(["queued"], {}, 0.05)  # no credit left: it waits here
    assert isinstance(await outcome(queued), DeadlineExceeded)
    assert missed == {"gateway_queue": 1, "worker_refused": 0, "in_flight": 0}

    await w.answer(busy.request_id, "ok")
    (refused,) = broker.submit_many(["refused"], {}, 30.0)
    (_, sent) = await w.wait_requests(2)
    await w.fail(sent.request_id, "deadline_exceeded", "its batch would finish too late")
    assert isinstance(await outcome(refused), DeadlineExceeded)
    assert missed == {"gateway_queue": 1, "worker_refused": 1, "in_flight": 0}

    (held,) = broker.submit_many(["held"], {}, 0.05)
    await w.wait_requests(3)
    assert isinstance(await outcome(held), DeadlineExceeded)
    assert missed == {"gateway_queue": 1, "worker_refused": 1, "in_flight": 1}
    # The worker's own 504 for it, after the gateway's, is the same miss: not counted again.
    await w.fail(held.request_id, "deadline_exceeded", "expired")
    await w.sync()
    assert handle(broker, w).in_flight == {}
    assert missed == {"gateway_queue": 1, "worker_refused": 1, "in_flight": 1}


# -- 5. admission -----------------------------------------------------------------------------
async def test_admission_without_workers_is_no_workers(h):
    broker = await h.broker()
    with pytest.raises(NoWorkers) as info:
        broker.submit_many(["x"], {}, 5.0)
    assert info.value.retry_after == 1 and info.value.status == 503
    assert broker.queue_depth == 0 and broker.in_flight == 0


async def test_admission_refuses_a_list_that_does_not_fit_as_a_whole(h):
    broker = await h.broker(max_queue=2)
    w = await h.worker(broker, "a", capacity=1)

    # 1 free slot + 2 queue places: 4 items do not fit, and none of them is admitted.
    with pytest.raises(Overloaded) as info:
        broker.submit_many(["a", "b", "c", "d"], {}, 5.0)
    assert info.value.retry_after == 1 and info.value.status == 503
    await w.sync()
    assert broker.queue_depth == 0 and broker.in_flight == 0 and w.requests == []

    # 3 items fit exactly.
    p = broker.submit_many(["a", "b", "c"], {}, 5.0)
    await w.wait_requests(1)
    assert broker.queue_depth == 2 and broker.in_flight == 3

    with pytest.raises(Overloaded) as info:
        broker.submit_many(["e"], {}, 5.0)
    assert info.value.retry_after == 1
    await w.sync()
    assert broker.queue_depth == 2 and broker.in_flight == 3 and len(w.requests) == 1

    # The admitted ones are served in order.
    for i, pending in enumerate(p):
        await w.wait_requests(i + 1)
        await w.answer(pending.request_id, i)
    assert [(await outcome(x)).output for x in p] == [0, 1, 2]
    assert w.request_ids() == ids(p)


async def test_admission_while_draining_is_draining(h):
    broker = await h.broker()
    w = await h.worker(broker, "a", capacity=1)
    (p,) = broker.submit_many(["x"], {}, 5.0)
    await w.wait_requests(1)

    assert await broker.drain(0.05) is False  # p is still out
    assert broker.draining
    with pytest.raises(Draining) as info:
        broker.submit_many(["y"], {}, 5.0)
    assert info.value.retry_after == 1 and info.value.status == 503
    assert broker.queue_depth == 0 and broker.in_flight == 1

    drain = asyncio.create_task(broker.drain(WAIT_S))
    await w.answer(p.request_id, "done")
    assert await asyncio.wait_for(drain, WAIT_S) is True
    assert (await outcome(p)).output == "done"
    await w.sync()
    assert len(w.requests) == 1


# -- 6. worker death: requeue -----------------------------------------------------------------
async def test_worker_death_requeues_its_requests_in_order_at_the_front(h):
    broker = await h.broker()
    a = await h.worker(broker, "a", capacity=2)
    p = broker.submit_many(["r1", "r2", "r3", "r4"], {}, 5.0)
    await a.wait_requests(2)
    assert a.request_ids() == ids(p[:2]) and broker.queue_depth == 2

    broker.worker_process_exited(a.pid, "exit code -9")
    assert h.deaths == [(a.pid, "exit code -9")]
    assert a.identity not in broker.workers
    assert broker.queue_depth == 4 and broker.requeued == 2
    assert not any(x.future.done() for x in p)
    assert [x.crashes for x in p] == [1, 1, 0, 0]

    b = await h.worker(broker, "b", capacity=4)
    # r1 and r2 were on a worker that died: each runs alone, the queue keeps its order.
    for i, pending in enumerate(p[:2]):
        await b.wait_requests(i + 1)
        await b.sync()
        assert b.request_ids() == ids(p[: i + 1])
        await b.answer(pending.request_id, f"b{i + 1}")
    got = await b.wait_requests(4)
    assert [r.request_id for r in got] == ids(p)
    assert [r.inputs for r in got] == ["r1", "r2", "r3", "r4"]
    await b.answer(p[2].request_id, "b3")
    await b.answer(p[3].request_id, "b4")
    assert [(await outcome(x)).output for x in p] == ["b1", "b2", "b3", "b4"]
    assert broker.queue_depth == 0 and broker.in_flight == 0


async def test_requests_left_without_any_worker_get_503_unless_one_is_on_its_way(h):
    """When the last worker died, the requests it held and those queued waited out their
    whole deadline (30 s by default) for a 504, while new requests got 503 at once."""
    broker = await h.broker(heartbeat_interval_s=0.1)
    asked = []

    def expecting() -> bool:  # serve's supervisor, restarting the worker
        asked.append(True)
        return len(asked) < 5

    broker.expecting_workers = expecting
    a = await h.worker(broker, "a", capacity=2)
    p = broker.submit_many(["r1", "r2", "r3"], {}, 30.0)
    await a.wait_requests(2)
    broker.worker_process_exited(a.pid, "exit code -9")
    assert broker.queue_depth == 3
    # While a worker is on its way, they wait for it; once none is, they are answered.
    await wait_until(lambda: all(x.future.done() for x in p), "the queued requests' 503")
    assert len(asked) == 5
    for x in p:
        with pytest.raises(NoWorkers, match="every model worker left"):
            await x.future
    assert broker.queue_depth == 0 and broker.in_flight == 0


async def test_a_killed_workers_late_ready_does_not_bring_it_back(h, caplog):
    """A worker declared dead whose process is being killed may have a READY still waiting
    in the socket. Taken back in by it, the worker looked idle and was handed the suspect
    (the request it held); its death a moment later charged that innocent request a second
    crash: 500 worker_crashed."""
    broker = await h.broker()
    broker.on_worker_dead = (lambda pid, reason, identity:
                             h.deaths.append((pid, reason)) or True)
    a = await h.worker(broker, "a", capacity=2)
    (p,) = broker.submit_many(["innocent"], {}, 5.0)
    await a.wait_requests(1)
    broker.worker_lost(handle(broker, a), "no message for 5.2 s")
    assert h.deaths == [(a.pid, "no message for 5.2 s")] and p.crashes == 1
    with caplog.at_level(logging.DEBUG, logger="batchwire.gateway.broker"):
        await a.send(a.ready)
        await wait_until(lambda: "ignoring READY from worker a" in caplog.text,
                         "the late READY to be read")
    assert a.identity not in broker.workers and len(a.requests) == 1
    assert broker.queue_depth == 1 and not p.future.done()
    b = await h.worker(broker, "b", capacity=2)
    await b.wait_requests(1)
    await b.answer(p.request_id, "fine")
    assert (await outcome(p)).output == "fine"


# -- 7. poison isolation ----------------------------------------------------------------------
async def test_suspect_runs_alone_and_a_second_death_answers_worker_crashed(h):
    broker = await h.broker()
    a = await h.worker(broker, "a", capacity=2)
    (suspect,) = broker.submit_many(["poison"], {}, 5.0)
    await a.wait_requests(1)
    b = await h.worker(broker, "b", capacity=4)
    (r2,) = broker.submit_many(["r2"], {}, 5.0)
    await b.wait_requests(1)
    assert b.request_ids() == [r2.request_id]

    broker.worker_process_exited(a.pid, "killed")
    assert suspect.crashes == 1 and not suspect.future.done()
    # B has free credit but holds r2: the suspect waits for a worker holding nothing.
    await b.sync()
    assert b.request_ids() == [r2.request_id] and broker.queue_depth == 1

    await b.answer(r2.request_id, "fine")
    assert (await outcome(r2)).output == "fine"
    got = await b.wait_requests(2)
    assert got[1].request_id == suspect.request_id
    assert handle(broker, b).suspect is suspect and handle(broker, b).free == 0

    # While B holds the suspect it gets nothing else, whatever its capacity.
    others = broker.submit_many(["r3", "r4"], {}, 5.0)
    await b.sync()
    assert b.request_ids() == [r2.request_id, suspect.request_id]
    assert broker.queue_depth == 2
    c = await h.worker(broker, "c", capacity=4)
    await c.wait_requests(2)
    assert c.request_ids() == ids(others)

    broker.worker_process_exited(b.pid, "killed again")
    assert isinstance(await outcome(suspect), WorkerCrashed)
    assert suspect.crashes == MAX_CRASHES
    assert [pid for pid, _ in h.deaths] == [a.pid, b.pid]
    # Other requests are unaffected.
    await c.answer(others[0].request_id, "c3")
    await c.answer(others[1].request_id, "c4")
    assert [(await outcome(x)).output for x in others] == ["c3", "c4"]
    await c.sync()
    assert suspect.request_id not in c.request_ids()
    assert broker.queue_depth == 0 and broker.in_flight == 0


async def test_an_input_that_killed_two_workers_is_refused_unrun_when_sent_again(h):
    """A client retrying the 500 of a poison input had it kill two more workers each time:
    a pool of two held down by one retrying client."""
    now = [1000.0]
    broker = await h.broker(clock=lambda: now[0], poison_memory_s=60.0)
    params = {"top_k": 2, "targets": ["a", "b"]}
    await killed_twice(h, broker, "poison", params)
    assert len(broker.poison) == 1 and broker.poison.refused == 0
    # With no worker up (both died), it is still known: its 500, not a 503 to retry.
    assert not broker.workers
    with pytest.raises(WorkerCrashed):
        broker.submit_many(["poison"], params, 5.0)
    with pytest.raises(NoWorkers):
        broker.submit_many(["fine"], params, 5.0)
    assert broker.poison.refused == 1 and broker.in_flight == 0

    c = await h.worker(broker, "c", capacity=4)
    # Sent again, alone or in a list, with the parameters in any key order: 500 at once.
    for inputs in (["poison"], ["fine", "poison"]):
        with pytest.raises(WorkerCrashed) as refused:
            broker.submit_many(inputs, {"targets": ["a", "b"], "top_k": 2}, 5.0)
        assert "refused for another 60 s" in refused.value.message
    assert "input 1 of this list" in refused.value.message
    assert broker.poison.refused == 3
    # Another input, or the same with other parameters, runs; nothing refused reached C.
    fine = broker.submit_many(["fine"], params, 5.0) + broker.submit_many(["poison"], {}, 5.0)
    await c.wait_requests(2)
    assert c.request_ids() == ids(fine) and broker.queue_depth == 0
    # Remembered for --poison-memory-s, then run again like any input.
    now[0] += 61.0
    (again,) = broker.submit_many(["poison"], params, 5.0)
    await c.wait_requests(3)
    assert c.request_ids()[-1] == again.request_id and len(broker.poison) == 0


async def test_an_input_a_worker_died_holding_is_a_suspect_when_sent_again(h):
    """An input that hangs the model got its 504 at the deadline, before the watchdog ended
    the worker: settled, it was never charged, and each retry held another worker until
    its watchdog and cost it a reload. What a dead worker held is now charged whatever its
    answer; sent again, it runs alone; dead again, it is poison."""
    broker = await h.broker(poison_memory_s=60.0)
    a = await h.worker(broker, "a", capacity=2)
    hangs, innocent = broker.submit_many(["hangs", "innocent"], {}, 0.05)
    await a.wait_requests(2)
    assert isinstance(await outcome(hangs), DeadlineExceeded)  # the model call goes on
    assert isinstance(await outcome(innocent), (DeadlineExceeded, Cancelled))
    broker.worker_process_exited(a.pid, "exited with code 3 (its watchdog)")
    assert len(broker.suspected) == 2 and len(broker.poison) == 0

    # Retried, each is a suspect: first in line, alone on a worker holding nothing.
    b = await h.worker(broker, "b", capacity=4)
    (retried,) = broker.submit_many(["innocent"], {}, 30.0)
    (fresh,) = broker.submit_many(["fresh"], {}, 30.0)
    assert retried.alone and retried.crashes == 0 and not fresh.alone
    await b.wait_requests(1)
    await b.sync()
    assert b.request_ids() == [retried.request_id]
    await b.answer(retried.request_id, "fine")  # run alone and answered: cleared
    assert (await outcome(retried)).output == "fine"
    await b.wait_requests(2)
    await b.answer(fresh.request_id, "fine")
    await outcome(fresh)
    (again,) = broker.submit_many(["innocent"], {}, 30.0)
    assert not again.alone and len(broker.suspected) == 1
    await b.wait_requests(3)
    await b.answer(again.request_id, "fine")
    await outcome(again)

    # The hanging one, retried (twice, in a burst): the first runs alone and kills its
    # worker too. Poison now: the copy waiting behind it and any later one get 500, unrun.
    first, second = (broker.submit_many(["hangs"], {}, 30.0)[0] for _ in range(2))
    assert first.alone and second.alone
    await b.wait_requests(4)
    assert b.requests[-1].request_id == first.request_id
    broker.worker_process_exited(b.pid, "exited with code 3 (its watchdog)")
    assert isinstance(await outcome(first), WorkerCrashed)
    assert isinstance(await outcome(second), WorkerCrashed)
    assert len(broker.poison) == 1 and len(broker.suspected) == 0
    c = await h.worker(broker, "c", capacity=4)
    with pytest.raises(WorkerCrashed):
        broker.submit_many(["hangs"], {}, 30.0)
    await c.sync()
    assert c.requests == []


async def test_a_suspects_copy_waits_while_one_runs_and_other_requests_go_on(h):
    """Each copy of a suspected input went alone to another idle worker: one that hangs the
    model held every worker until its watchdog (three workers, a client retrying its 504s:
    six deaths, the pool down twice)."""
    broker = await h.broker(poison_memory_s=60.0)
    a = await h.worker(broker, "a", capacity=1)
    (first,) = broker.submit_many(["hangs"], {}, 0.05)
    await a.wait_requests(1)
    await outcome(first)  # 504; the model call goes on
    broker.worker_process_exited(a.pid, "exited with code 3")
    b = await h.worker(broker, "b", capacity=2)
    c = await h.worker(broker, "c", capacity=2)
    (alone,) = broker.submit_many(["hangs"], {}, 0.05)
    await wait_until(lambda: len(b.requests) + len(c.requests) == 1, "the copy to run alone")
    runner, idle = (b, c) if b.requests else (c, b)
    await outcome(alone)  # 504 again, and the call goes on
    (retry,) = broker.submit_many(["hangs"], {}, 30.0)
    (other,) = broker.submit_many(["other"], {}, 30.0)
    await idle.wait_requests(1)
    await idle.sync()
    assert idle.request_ids() == [other.request_id]  # not the copy: it waits
    assert not retry.done and broker.queue_depth == 1
    broker.worker_process_exited(runner.pid, "exited with code 3")
    assert isinstance(await outcome(retry), WorkerCrashed)
    assert len(broker.poison) == 1 and idle.request_ids() == [other.request_id]


async def run_alone_after_a_death(h, broker: Broker, text: str, parameters: dict | None = None,
                                  *, capacity: int = 1, timeout_s: float = 30.0):
    """``text`` is on worker "a" when its process dies, then runs alone on worker "b", which
    joins after. Returns (its request, b, the REQUEST b was sent)."""
    a = await h.worker(broker, "a", capacity=capacity)
    (pending,) = broker.submit_many([text], parameters or {}, timeout_s)
    await a.wait_requests(1)
    broker.worker_process_exited(a.pid, "killed")  # from outside: charged, as it must be
    b = await h.worker(broker, "b", capacity=capacity)
    (request,) = await b.wait_requests(1)
    return pending, b, request


async def test_a_suspect_answered_with_an_error_of_its_own_is_cleared(h):
    """The worker survived running it alone: not what the other one died of. (Cleared only
    on a Result, an input a pipeline refuses, sent again and again, ran alone each time.)"""
    broker = await h.broker(poison_memory_s=60.0)
    held, b, request = await run_alone_after_a_death(h, broker, "too long")
    await b.fail(request.request_id, "input_too_long", "shorten it")
    assert isinstance(await outcome(held), BatchwireError)
    assert len(broker.suspected) == 0
    (again,) = broker.submit_many(["too long"], {}, 30.0)
    assert not again.alone


async def test_once_a_copy_runs_alone_and_is_answered_the_others_need_not(h):
    """After one crash, twenty identical requests ran one at a time on a worker with 64
    free slots, the other requests waiting behind them."""
    broker = await h.broker(poison_memory_s=60.0)
    a = await h.worker(broker, "a", capacity=1)
    broker.submit_many(["ping"], {}, 30.0)
    await a.wait_requests(1)
    broker.worker_process_exited(a.pid, "killed")  # its ping is requeued, to run alone
    b = await h.worker(broker, "b", capacity=8)
    copies = [broker.submit_many(["ping"], {}, 30.0)[0] for _ in range(3)]
    assert all(copy.alone for copy in copies)
    (first,) = await b.wait_requests(1)
    await b.sync()
    assert len(b.requests) == 1  # alone
    await b.answer(first.request_id, "pong")
    await b.wait_requests(4)  # the three copies together, no longer one at a time
    assert not any(copy.alone for copy in copies) and len(broker.suspected) == 0


class PassingTime:
    """A broker clock that runs while started, and stands still otherwise: workers that
    registered at one instant of it fall silent together."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._task: asyncio.Task | None = None

    def __call__(self) -> float:
        return self.now

    def start(self) -> None:
        async def run() -> None:
            while True:
                await asyncio.sleep(0.02)  # time passing, not a wait on anything
                self.now += 0.02
        self._task = asyncio.create_task(run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def test_workers_silent_together_do_not_take_each_others_suspects(h):
    """Found silent in one check, the first was taken out and its request sent at once to
    the second, idle but just as silent: charged a second crash it did not cause, the
    innocent input got 500 (and, remembered, would have been refused for ten minutes)."""
    clock = PassingTime()
    broker = await h.broker(heartbeat_interval_s=0.1, clock=clock)
    a = await h.worker(broker, "a", capacity=1)
    (innocent,) = broker.submit_many(["innocent"], {}, 30.0)
    await a.wait_requests(1)
    b = await h.worker(broker, "b", capacity=1)
    clock.start()
    try:
        await wait_until(lambda: not broker.workers, "both silent workers to be declared dead")
    finally:
        await clock.stop()  # before no worker for long enough sheds the queue
    assert not b.requests and not innocent.done and innocent.crashes == 1
    c = await h.worker(broker, "c", capacity=1)
    (request,) = await c.wait_requests(1)
    await c.answer(request.request_id, "fine")
    assert (await outcome(innocent)).output == "fine"


async def test_a_second_death_by_silence_does_not_make_an_input_poison(h):
    """Silence says nothing about what a worker ran: a frozen or cut-off worker holding a
    suspect must not get its input refused for the whole memory."""
    clock = PassingTime()
    broker = await h.broker(heartbeat_interval_s=0.1, clock=clock)
    suspect, _, _ = await run_alone_after_a_death(h, broker, "innocent")
    clock.start()
    try:
        assert isinstance(await outcome(suspect), WorkerCrashed)  # b went silent with it
    finally:
        await clock.stop()
    assert "no message" in h.deaths[-1][1] and len(broker.poison) == 0
    c = await h.worker(broker, "c", capacity=1)
    (again,) = broker.submit_many(["innocent"], {}, 30.0)
    await c.wait_requests(1)


@pytest.mark.parametrize("heard_again", [True, False], ids=["beats-again", "frozen"])
async def test_a_suspect_is_not_sent_to_a_worker_silent_for_a_heartbeat(h, heard_again):
    """Two workers frozen a heartbeat apart: the first was taken out and its request sent
    alone to the second, silent for almost two beats but not yet for three; its death by
    silence then charged the request a second crash, and the innocent input got 500. A
    worker silent past a beat gets a suspect once it is heard again; frozen, it never does.
    The beats are the test's own (the broker's own tick would never come)."""
    now = [1000.0]
    broker = await h.broker(clock=lambda: now[0])
    beat = broker.heartbeat_interval_s
    a = await h.worker(broker, "a", capacity=1)
    b = await h.worker(broker, "b", capacity=1)
    (innocent,) = broker.submit_many(["innocent"], {}, 30 * beat)
    await a.wait_requests(1)
    now[0] += 1.4 * beat
    await b.send(Heartbeat())  # b's last word, if it is frozen
    await wait_until(lambda: handle(broker, b).last_seen == now[0], "b's beat to be read")
    now[0] += 1.8 * beat  # a: 3.2 beats silent, gone; b: 1.8
    broker._check_workers(now[0])
    assert a.identity not in broker.workers and innocent.crashes == 1
    assert innocent.queued and not handle(broker, b).in_flight
    if heard_again:
        await b.send(Heartbeat())
        (request,) = await b.wait_requests(1)
        assert request.request_id == innocent.request_id
        await b.answer(request.request_id, "fine")
    else:
        now[0] += 1.4 * beat
        broker._check_workers(now[0])  # b: 3.2 beats silent, gone, holding nothing of it
        assert not broker.workers and not innocent.done and innocent.crashes == 1
        c = await h.worker(broker, "c", capacity=1)
        (request,) = await c.wait_requests(1)
        await c.answer(request.request_id, "fine")
        assert b.requests == []
    assert (await outcome(innocent)).output == "fine"


async def test_a_worker_already_silent_when_sent_a_request_is_not_charged_its_silence(h):
    """Its silence began before the request reached it, so it says nothing about the
    request: not charged, the request runs again as any other, not alone."""
    now = [1000.0]
    broker = await h.broker(clock=lambda: now[0])
    beat = broker.heartbeat_interval_s
    a = await h.worker(broker, "a", capacity=1)
    now[0] += 2.5 * beat
    (request,) = broker.submit_many(["text"], {}, 30 * beat)
    await a.wait_requests(1)
    now[0] += 0.7 * beat
    broker._check_workers(now[0])  # a: 3.2 beats silent, gone
    assert not broker.workers and request.crashes == 0 and not request.suspect
    c = await h.worker(broker, "c", capacity=1)
    (sent,) = await c.wait_requests(1)
    await c.answer(sent.request_id, "fine")
    assert (await outcome(request)).output == "fine"


async def killed_twice(h, broker: Broker, text: str, parameters: dict) -> None:
    """``text`` kills worker "a", then worker "b" as it runs alone: 500 worker_crashed."""
    poison, b, _ = await run_alone_after_a_death(h, broker, text, parameters, capacity=2,
                                                 timeout_s=5.0)
    broker.worker_process_exited(b.pid, "killed again")
    assert isinstance(await outcome(poison), WorkerCrashed)


async def test_a_request_run_alone_for_another_ones_crash_is_not_500_after_one_silence(h):
    """Made a suspect by another request's crash, a fresh request counted that crash as its
    own: its worker going silent once answered it 500 "died twice"."""
    clock = PassingTime()
    broker = await h.broker(heartbeat_interval_s=0.1, clock=clock, poison_memory_s=60.0)
    a = await h.worker(broker, "a", capacity=1)
    (old,) = broker.submit_many(["text"], {}, 0.05)
    await a.wait_requests(1)
    await outcome(old)  # answered 504; then its worker dies
    broker.worker_process_exited(a.pid, "exited with code 3")
    b = await h.worker(broker, "b", capacity=1)
    (fresh,) = broker.submit_many(["text"], {}, 30.0)
    assert fresh.alone
    await b.wait_requests(1)
    clock.start()
    try:
        await wait_until(lambda: not broker.workers, "the silent worker to be declared dead")
    finally:
        await clock.stop()
    assert not fresh.done and fresh.crashes == 1 and len(broker.poison) == 0
    c = await h.worker(broker, "c", capacity=1)
    (request,) = await c.wait_requests(1)
    await c.answer(request.request_id, "fine")
    assert (await outcome(fresh)).output == "fine"


async def test_with_no_poison_memory_a_poison_input_runs_again(h):
    broker = await h.broker(poison_memory_s=0.0)
    await killed_twice(h, broker, "poison", {})
    c = await h.worker(broker, "c", capacity=1)
    (again,) = broker.submit_many(["poison"], {}, 5.0)
    await c.wait_requests(1)
    assert len(broker.poison) == 0


# -- 8. heartbeat timeout -----------------------------------------------------------------------
async def test_silent_worker_is_declared_dead_and_its_requests_move(h):
    # Not shorter: the live worker's heartbeats cross ZeroMQ's I/O thread, which a loaded
    # machine can hold for a few tenths of a second.
    interval = 0.2
    broker = await h.broker(heartbeat_interval_s=interval)
    silent = h.peer("silent", capacity=2)
    last_heard = time.monotonic()  # before its READY, so at or before the broker's last_seen
    await silent.register()
    p = broker.submit_many(["r1", "r2"], {}, 5.0)
    await silent.wait_requests(2)

    live = await h.worker(broker, "live", capacity=2)

    async def keep_alive() -> None:
        while True:
            await live.send(Heartbeat())
            await asyncio.sleep(interval / 2)

    beating = asyncio.create_task(keep_alive())
    try:
        await wait_until(lambda: silent.identity not in broker.workers,
                         "the silent worker to be declared dead")
        elapsed = time.monotonic() - last_heard
        assert 3 * interval < elapsed < 10 * interval, f"declared dead after {elapsed:.2f} s"
        assert h.deaths and h.deaths[0][0] == silent.pid and "no message" in h.deaths[0][1]
        assert broker.requeued == 2

        for i, pending in enumerate(p):
            await live.wait_requests(i + 1)
            await live.answer(pending.request_id, f"live{i + 1}")
        assert [(await outcome(x)).output for x in p] == ["live1", "live2"]
        assert live.identity in broker.workers, "a worker that keeps beating was dropped"
        assert live.heartbeats >= 2  # the broker's own periodic heartbeats reach it
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)


# -- 9. protocol version mismatch ---------------------------------------------------------------
def frame(version: Any, message: Message) -> bytes:
    """A message as encoded by a peer speaking protocol ``version``."""
    fields = msgpack.unpackb(codec.encode(message), raw=False)[2:]
    return msgpack.packb([version, int(message.TYPE), *fields], use_bin_type=True)


async def test_peer_of_another_protocol_version_is_refused(h, caplog):
    caplog.set_level(logging.ERROR, logger="batchwire.gateway.broker")
    broker = await h.broker()
    stranger = h.peer("v99", capacity=8)
    await stranger.send_raw(frame(99, stranger.ready))
    await wait_until(lambda: any("refusing peer" in r.getMessage() for r in caplog.records),
                     "the broker to refuse the version-99 peer")
    assert broker.workers == {}
    with pytest.raises(NoWorkers):
        broker.submit_many(["x"], {}, 5.0)

    good = await h.worker(broker, "good", capacity=1)
    (p,) = broker.submit_many(["x"], {}, 5.0)
    await good.wait_requests(1)
    # A version-99 RESULT, even from the registered worker, is dropped.
    await good.send_raw(frame(99, Result(p.request_id, "v99", 1, 0.0, 0.0)))
    await stranger.send_raw(frame(99, Result(p.request_id, "v99", 1, 0.0, 0.0)))
    await good.sync()
    assert not p.future.done()
    await good.answer(p.request_id, "v1")
    assert (await outcome(p)).output == "v1"

    assert list(broker.workers) == [good.identity]
    assert stranger.requests == [] and stranger.heartbeats == 0
    # Logged once per peer, however many frames it sends.
    refused = [r.getMessage() for r in caplog.records if "refusing peer" in r.getMessage()]
    assert sum(repr(stranger.identity) in m for m in refused) == 1, refused
    assert sum(repr(good.identity) in m for m in refused) == 1, refused


# -- 10. garbage and strangers ------------------------------------------------------------------
GARBAGE = [
    b"",
    b"\xc1",  # never valid msgpack
    b"plain text, not msgpack",
    msgpack.packb({"version": 1}),
    msgpack.packb([PROTOCOL_VERSION]),
    msgpack.packb([PROTOCOL_VERSION, 99]),  # unknown type
    msgpack.packb(["1", int(MessageType.RESULT), 1, None, 1, 0.0, 0.0]),  # version not an int
    msgpack.packb([PROTOCOL_VERSION, int(MessageType.RESULT), "1", None, 1, 0.0, 0.0]),
    msgpack.packb([PROTOCOL_VERSION, int(MessageType.RESULT), 1]),  # too few fields
    msgpack.packb([PROTOCOL_VERSION, int(MessageType.ERROR), 1, "cancelled", "m", "extra"]),
    msgpack.packb([PROTOCOL_VERSION, int(MessageType.HEARTBEAT)]) + b"\x00",  # trailing data
]


async def test_garbage_frames_and_unknown_identities_are_ignored(h, caplog):
    caplog.set_level(logging.WARNING, logger="batchwire.gateway.broker")
    broker = await h.broker()
    a = await h.worker(broker, "a", capacity=2)
    (p,) = broker.submit_many(["x"], {}, 5.0)
    await a.wait_requests(1)
    rid = p.request_id

    # A stranger answers A's request, sends junk, then a READY with capacity 0 and a
    # multi-frame message; only its final valid READY registers it.
    stranger = h.peer("stranger", capacity=3)
    await stranger.answer(rid, "forged")
    await stranger.fail(rid, "model_error")
    await stranger.send(Disconnect("not even registered"))
    for junk in GARBAGE:
        await stranger.send_raw(junk)
    await stranger.send(Ready(worker_id="zero", pid=1, model="m", task="t", device="cpu",
                              capacity=0, max_batch_size=1))
    await stranger.send_raw(codec.encode(stranger.ready), b"second frame")
    await stranger.send_raw(b"", codec.encode(stranger.ready))  # REQ-style delimiter
    await stranger.register()  # the broker has handled everything above
    assert handle(broker, stranger).info.capacity == 3
    assert not p.future.done()
    # Registered now, but the request is not its to answer.
    await stranger.answer(rid, "forged again")
    await stranger.sync()
    assert stranger.heartbeats == 2, "a malformed READY was answered as if registered"
    assert not p.future.done()
    assert handle(broker, stranger).answered == 0

    # The owner sends junk too; its request stays held, then its real answer counts.
    for junk in GARBAGE:
        await a.send_raw(junk)
    split = codec.encode(Result(rid, "split", 1, 0.0, 0.0))
    await a.send_raw(split, b"extra frame")
    await a.send_raw(b"", split)
    await a.sync()
    assert not p.future.done() and rid in handle(broker, a).in_flight
    await a.answer(rid, "real")
    assert (await outcome(p)).output == "real"

    # The broker still works: new requests are dispatched and answered.
    q = broker.submit_many(["y", "z"], {}, 5.0)
    await wait_until(lambda: len(a.requests) + len(stranger.requests) == 3, "both new requests")
    for worker in (a, stranger):
        for req in worker.requests:
            if req.request_id != rid:
                await worker.answer(req.request_id, req.inputs)
    assert [(await outcome(x)).output for x in q] == ["y", "z"]
    assert not any(t.done() for t in broker._tasks), "a broker task died"
    assert not [r for r in caplog.records if r.exc_info], caplog.text


# -- 11. clean leave ----------------------------------------------------------------------------
async def test_disconnect_requeues_without_counting_a_crash(h):
    broker = await h.broker()
    a = await h.worker(broker, "a", capacity=2)
    p = broker.submit_many(["r1", "r2"], {}, 5.0)
    await a.wait_requests(2)

    await a.send(Disconnect(reason="SIGTERM"))
    await wait_until(lambda: a.identity not in broker.workers, "A to be forgotten")
    assert h.deaths == [], "a clean leave must not be reported as a dead process"
    assert broker.requeued == 2 and broker.queue_depth == 2
    assert [x.crashes for x in p] == [0, 0]

    # Not suspects: a new worker gets both at once.
    b = await h.worker(broker, "b", capacity=4)
    await b.wait_requests(2)
    assert b.request_ids() == ids(p)
    assert handle(broker, b).suspect is None

    # One real death after the clean leave is the first crash: retried, not 500.
    broker.worker_process_exited(b.pid, "killed")
    assert [x.crashes for x in p] == [1, 1]
    assert not any(x.future.done() for x in p)
    c = await h.worker(broker, "c", capacity=4)
    for i, pending in enumerate(p):
        await c.wait_requests(i + 1)
        await c.sync()
        assert c.request_ids() == ids(p[: i + 1]), "suspects must run one at a time"
        await c.answer(pending.request_id, f"c{i + 1}")
    assert [(await outcome(x)).output for x in p] == ["c1", "c2"]


async def test_a_disconnect_is_answered_so_the_leaving_worker_may_close(h):
    """A leaving worker keeps its socket open until the broker answers its DISCONNECT.
    Closed at once, a send the broker made before reading the DISCONNECT failed, and the
    leave counted as a crash. One already dropped is answered too: it would otherwise wait
    out its bound."""
    broker = await h.broker()
    a = await h.worker(broker, "a", capacity=2)
    (p,) = broker.submit_many(["x"], {}, 5.0)
    await a.wait_requests(1)
    await a.send(Disconnect(reason="signal SIGTERM"))
    await a.wait(lambda: len(a.disconnects) == 1, "the broker to answer the DISCONNECT")
    assert a.identity not in broker.workers and broker.requeued == 1 and p.crashes == 0
    assert h.deaths == []

    b = await h.worker(broker, "b", capacity=2)
    broker.worker_process_exited(b.pid, "declared dead")
    await b.send(Disconnect(reason="signal SIGTERM"))
    await b.wait(lambda: len(b.disconnects) == 1, "the broker to answer a dropped worker")


def add_ghost(broker: Broker) -> tuple[bytes, Ready]:
    """A worker (capacity 8) whose connection is gone before the broker noticed: a send to it
    fails (EHOSTUNREACH under ROUTER_MANDATORY). Returns its identity and READY."""
    ready = Ready(worker_id="ghost", pid=3_999_999, model="fake-model", task="fill-mask",
                  device="cpu", capacity=8, max_batch_size=8)
    identity = b"ghost/never-connected"
    now = time.monotonic()
    broker.workers[identity] = WorkerHandle(identity, ready, joined_at=now, last_seen=now)
    return identity, ready


async def test_a_send_to_a_vanished_worker_moves_the_request_at_once(h, caplog):
    """A worker whose connection is gone before the broker noticed: the send fails
    (EHOSTUNREACH under ROUTER_MANDATORY), and the broker acts on it then and there instead
    of waiting heartbeats for a request that never left. An asyncio socket reports that
    failure in the Future its send returns, which the broker must read."""
    caplog.set_level(logging.WARNING)
    broker = await h.broker()
    live = await h.worker(broker, "live", capacity=1)
    ghost, ghost_ready = add_ghost(broker)

    (p,) = broker.submit_many(["x"], {}, 5.0)  # the ghost has the most credit: tried first
    assert ghost not in broker.workers, "the vanished worker is still dispatched to"
    assert h.deaths and h.deaths[0][0] == ghost_ready.pid and "send failed" in h.deaths[0][1]
    assert p.crashes == 0, "a request that never reached a worker was counted as crashing it"
    await live.wait_requests(1)
    await live.answer(p.request_id, "live")
    assert (await outcome(p)).output == "live"
    assert "never retrieved" not in caplog.text


async def test_a_send_that_fails_while_a_suspect_is_set_aside_answers_nothing_wrong(h):
    """A send that fails takes its worker out, which dispatched what that worker held from
    inside the pass that sent. That inner pass found a suspect the outer one had set aside
    counted as queued but not in the heap, and read past the heap's end: IndexError out of
    submit_many (the client's 500) for a request that had gone to another worker."""
    broker = await h.broker(poison_memory_s=60.0)
    await run_alone_after_a_death(h, broker, "hangs", capacity=4)
    (retry,) = broker.submit_many(["hangs"], {}, 30.0)
    assert retry.alone and retry.queued  # set aside while its copy runs on B
    c = await h.worker(broker, "c", capacity=4)
    ghost, _ = add_ghost(broker)

    (innocent,) = broker.submit_many(["innocent"], {}, 30.0)  # the ghost first: most credit
    assert ghost not in broker.workers
    (sent,) = await c.wait_requests(1)
    assert sent.request_id == innocent.request_id
    await c.answer(sent.request_id, "fine")
    assert (await outcome(innocent)).output == "fine"
    assert retry.queued and broker.queue_depth == 1 and len(broker._queue) == 1


async def test_a_worker_of_another_task_is_refused_while_the_gateways_task_is_served(
        h, caplog):
    """One gateway serves one task: a feature-extraction worker joining fill-mask workers
    would answer some clients with vectors instead of candidates. It may join once the
    others are gone (it keeps announcing itself). Another model of the same task is let in
    with a warning: a rolling upgrade."""
    caplog.set_level(logging.WARNING, logger="batchwire.gateway.broker")
    broker = await h.broker()
    fill = await h.worker(broker, "fill", capacity=1)
    features = h.peer("features", capacity=1)
    features.ready = dataclasses.replace(features.ready, task="feature-extraction")
    for _ in range(2):
        await features.send(features.ready)
    await fill.sync()  # a barrier for the broker's loop, which reads both sockets
    await wait_until(lambda: "refusing worker features" in caplog.text,
                     "the broker to refuse the other task's worker")
    assert list(broker.workers) == [fill.identity]
    (p,) = broker.submit_many(["x"], {}, 5.0)
    await fill.wait_requests(1)
    assert features.requests == []
    await fill.answer(p.request_id, "candidates")
    assert (await outcome(p)).output == "candidates"

    upgraded = h.peer("upgraded", capacity=1)
    upgraded.ready = dataclasses.replace(upgraded.ready, model="fake-model-v2")
    await upgraded.register()
    assert upgraded.identity in broker.workers
    assert "serves fake-model-v2 while others serve ['fake-model']" in caplog.text
    # Both READYs are long handled by now: the refusal was logged once, not per READY.
    assert caplog.text.count("refusing worker features") == 1

    for leaving in (fill, upgraded):
        await leaving.send(Disconnect(reason="SIGTERM"))
    await wait_until(lambda: not broker.workers, "the fill-mask workers to leave")
    await features.register()
    assert list(broker.workers) == [features.identity]


async def test_requests_of_a_task_whose_workers_are_gone_never_reach_another_tasks(h):
    """Once a task's workers are all gone, a worker of another task may join; requests
    admitted for the first task and still queued (requeued from the dead ones) went to it,
    and their clients got its answers with a 200: vectors to fill-mask clients. They get
    503 no_workers now, saying why; requests admitted after get the new task."""
    broker = await h.broker()
    fill = await h.worker(broker, "fill", capacity=1)
    queued = broker.submit_many(["a", "b"], {}, 5.0)
    await fill.wait_requests(1)
    broker.worker_process_exited(fill.pid, "killed")
    features = h.peer("features", capacity=2)
    features.ready = dataclasses.replace(features.ready, task="feature-extraction")
    await features.register()
    for pending in queued:
        error = await outcome(pending)
        assert isinstance(error, NoWorkers) and "task (fill-mask) are gone" in error.message
    (later,) = broker.submit_many(["c"], {}, 5.0)
    got = await features.wait_requests(1)
    assert [r.request_id for r in got] == [later.request_id]
    await features.answer(later.request_id, "vectors")
    assert (await outcome(later)).output == "vectors"
    await features.sync()
    assert len(features.requests) == 1 and broker.queue_depth == 0


async def test_error_answers_resolve_with_the_workers_error(h):
    broker = await h.broker()
    w = await h.worker(broker, "a", capacity=2)
    p = broker.submit_many(["x", "y"], {}, 5.0)
    await w.wait_requests(2)
    await w.fail(p[0].request_id, "model_error", "boom")
    await w.fail(p[1].request_id, "no_such_code", "odd")
    first, second = await outcome(p[0]), await outcome(p[1])
    assert isinstance(first, ModelError) and first.message == "boom"
    assert type(second) is BatchwireError and second.code == "no_such_code"
    assert handle(broker, w).in_flight == {}


async def test_cancel_withdraws_and_tells_the_worker(h):
    broker = await h.broker()
    w = await h.worker(broker, "a", capacity=1)
    p = broker.submit_many(["x", "queued"], {}, 5.0)
    await w.wait_requests(1)
    broker.cancel(p[1], LIST_ITEM_FAILED)  # still queued: nothing to tell the worker
    broker.cancel(p[0])
    assert isinstance(await outcome(p[0]), Cancelled) and isinstance(await outcome(p[1]), Cancelled)
    assert "list failed" in (await outcome(p[1])).message
    await w.wait(lambda: w.cancels == [p[0].request_id], "a CANCEL")
    assert broker.queue_depth == 0 and broker.in_flight == 0
    # Counted apart: a client that left, and a list that failed as a whole.
    assert broker.cancelled == {"client_gone": 1, "list_item_failed": 1}
    await w.fail(p[0].request_id, "cancelled")
    await w.sync()
    assert w.request_ids() == [p[0].request_id] and handle(broker, w).in_flight == {}


# -- 12. metrics ----------------------------------------------------------------------------------
async def test_results_of_one_batch_count_as_one_batch(h):
    broker = await h.broker()
    w = await h.worker(broker, "a", capacity=4)

    def sample(name: str) -> float:
        return broker.metrics.registry.get_sample_value(name) or 0.0

    assert sample("batchwire_batch_size_count") == 0
    p = broker.submit_many(["x1", "x2", "x3"], {}, 5.0)
    await w.wait_requests(3)
    await w.answer(p[0].request_id, 1, batch_id=7, batch_size=2)
    await w.answer(p[1].request_id, 2, batch_id=7, batch_size=2)
    await outcome(p[0])
    await outcome(p[1])
    assert sample("batchwire_batch_size_count") == 1
    assert sample("batchwire_batch_size_sum") == 2
    assert sample("batchwire_inference_seconds_count") == 1
    assert sample("batchwire_queue_wait_seconds_count") == 2  # one per item

    await w.answer(p[2].request_id, 3, batch_id=8, batch_size=1)
    await outcome(p[2])
    await w.answer(p[2].request_id, 3, batch_id=9, batch_size=1)  # duplicate: not observed
    await w.sync()
    assert sample("batchwire_batch_size_count") == 2
    assert sample("batchwire_batch_size_sum") == 3
    assert sample("batchwire_queue_wait_seconds_count") == 3
    assert handle(broker, w).batches == 2
    text = broker.metrics.scrape().decode()
    assert "\nbatchwire_batch_size_count 2.0\n" in text


# -- found bugs ------------------------------------------------------------------------------------
async def _suspect_at_head_of_queue(h, broker: Broker):
    """A suspect queued at the head, waiting for an idle worker, while worker B (capacity 4)
    holds one request and so has 3 free slots. Returns (B, suspect, B's request)."""
    a = await h.worker(broker, "a", capacity=1)
    (suspect,) = broker.submit_many(["poison"], {}, 5.0)
    await a.wait_requests(1)
    b = await h.worker(broker, "b", capacity=4)
    (busy,) = broker.submit_many(["long"], {}, 5.0)
    await b.wait_requests(1)
    broker.worker_process_exited(a.pid, "killed")
    assert broker.queue_depth == 1 and handle(broker, b).free == 3
    return b, suspect, busy


async def _suspects_beside_two_busy_workers(h, broker: Broker, texts: list[str]):
    """Worker A dies holding ``texts`` (suspects now), while B and C (capacity 8) hold one
    request each. Returns (B, C, the suspects)."""
    a = await h.worker(broker, "a", capacity=len(texts))
    suspects = broker.submit_many(texts, {}, 60.0)
    await a.wait_requests(len(texts))
    b = await h.worker(broker, "b", capacity=8)
    c = await h.worker(broker, "c", capacity=8)
    broker.submit_many(["held by b"], {}, 60.0)
    broker.submit_many(["held by c"], {}, 60.0)
    await b.wait_requests(1)
    await c.wait_requests(1)
    broker.worker_process_exited(a.pid, "killed")
    assert all(p.suspect for p in suspects) and broker.queue_depth == len(suspects)
    return b, c, suspects


async def test_a_suspect_drains_one_worker_while_the_others_serve_the_queue(h):
    """A suspect waiting for an idle worker held up the whole queue: every worker emptied
    while one would do. It keeps one worker from new work, the one that should empty
    soonest; and keeps that one while another is only a little sooner, but not one that
    has become far slower to empty (a long batch, an input that hangs)."""
    broker = await h.broker(clock=lambda: 1000.0)
    b, c, (suspect,) = await _suspects_beside_two_busy_workers(h, broker, ["suspect"])
    drained = b if suspect.drains is handle(broker, b) else c
    serving = c if drained is b else b
    assert suspect.drains is handle(broker, drained)
    fresh = broker.submit_many(["f1", "f2", "f3"], {}, 60.0)
    await serving.wait_requests(4)
    await drained.sync()
    assert serving.request_ids()[1:] == ids(fresh) and len(drained.requests) == 1
    assert [broker.worker_state(handle(broker, w)) for w in (drained, serving)] == [
        "drained", "ready"]  # as /info shows them

    # Timings as answers would have set them (the clock stands still: no overrun, no
    # trip). Holding 1 of 8, the drained worker should empty in 10 x 1.125 ms; holding 4,
    # the serving one in 6 x 1.5 ms: sooner, but not twice as soon.
    handle(broker, drained).batch_s, handle(broker, serving).batch_s = 0.010, 0.006
    (later,) = broker.submit_many(["later"], {}, 60.0)
    await serving.wait_requests(5)
    await drained.sync()
    assert serving.requests[-1].request_id == later.request_id and len(drained.requests) == 1
    assert suspect.drains is handle(broker, drained)

    # Its batch now looks ten times as long: the serving one drains instead, and the
    # other takes new work again.
    handle(broker, drained).batch_s = 0.100
    (last,) = broker.submit_many(["last"], {}, 60.0)
    await drained.wait_requests(2)
    assert drained.requests[1].request_id == last.request_id
    assert suspect.drains is handle(broker, serving) and not suspect.done

    for request in serving.requests:
        await serving.answer(request.request_id, "fine")
    await serving.wait_requests(6)
    assert serving.requests[5].request_id == suspect.request_id  # alone, once it was idle
    assert handle(broker, serving).suspect is suspect
    assert [broker.worker_state(handle(broker, w)) for w in (drained, serving)] == [
        "ready", "suspect"]


async def test_the_queue_bound_counts_the_credit_of_workers_not_drained(h):
    """With the queue full of a suspect that waits, a request the serving worker has
    credit for is not queued at all: 503 for it was a refusal with room to spare."""
    broker = await h.broker(max_queue=1)
    b, c, (suspect,) = await _suspects_beside_two_busy_workers(h, broker, ["suspect"])
    serving = c if suspect.drains is handle(broker, b) else b
    admitted = broker.submit_many(["x", "y", "z"], {}, 60.0)
    await serving.wait_requests(4)
    assert serving.request_ids()[1:] == ids(admitted) and broker.queue_depth == 1
    with pytest.raises(Overloaded):  # past the serving worker's credit, they would queue
        broker.submit_many([f"more-{i}" for i in range(6)], {}, 60.0)


async def test_as_many_suspects_as_workers_drain_them_all(h):
    """Each waiting suspect keeps a worker of its own; with every worker kept, the rest of
    the queue waits behind them, as it always did."""
    broker = await h.broker(clock=lambda: 1000.0)
    b, c, suspects = await _suspects_beside_two_busy_workers(h, broker, ["s1", "s2"])
    kept = [b if p.drains is handle(broker, b) else c for p in suspects]
    assert set(kept) == {b, c}
    (fresh,) = broker.submit_many(["fresh"], {}, 60.0)
    await b.sync()
    await c.sync()
    assert len(b.requests) == len(c.requests) == 1 and broker.queue_depth == 3
    for worker, suspect in zip(kept, suspects):  # each idle in turn: its own suspect, alone
        await worker.answer(worker.requests[0].request_id, "fine")
        await worker.wait_requests(2)
        await worker.sync()
        assert worker.request_ids()[1:] == [suspect.request_id]
    await kept[0].answer(suspects[0].request_id, "fine")  # cleared: it takes the rest
    await kept[0].wait_requests(3)
    assert kept[0].requests[2].request_id == fresh.request_id


async def test_queue_bound_holds_while_a_suspect_blocks_the_head(h):
    broker = await h.broker(max_queue=1)
    b, suspect, busy = await _suspect_at_head_of_queue(h, broker)
    # The queue is full (1 of 1). Admitting 3 more "into B's free credit" only queues them
    # behind the suspect, which dispatch will not pass.
    with pytest.raises(Overloaded):
        broker.submit_many(["x", "y", "z"], {}, 5.0)
    await b.sync()
    assert broker.queue_depth <= broker.max_queue


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_requests_behind_a_settled_suspect_are_dispatched(h, how):
    broker = await h.broker()
    b, suspect, busy = await _suspect_at_head_of_queue(h, broker)
    (behind,) = broker.submit_many(["behind"], {}, 5.0)
    await b.sync()
    assert broker.queue_depth == 2 and len(b.requests) == 1
    if how == "cancel":
        broker.cancel(suspect)
    else:
        # Its deadline timer's own callback, fired now: a real short deadline could pass
        # during the set-up above on a loaded machine.
        suspect.timer.cancel()
        broker._expire(suspect)
    assert isinstance(await outcome(suspect), (Cancelled, DeadlineExceeded))
    # B holds one request and has 3 free slots: "behind" should go out now, not when B
    # happens to answer "long" (which it never does here).
    await b.wait(lambda: len(b.requests) == 2, "the request queued behind the suspect")
    assert b.requests[1].request_id == behind.request_id


async def test_a_worker_that_heartbeats_but_never_answers_is_declared_stuck(h):
    """The gateway's backstop for a hung model call: heartbeats alone do not keep a worker
    that holds work without progress; its requests run elsewhere."""
    broker = await h.broker(heartbeat_interval_s=0.1, batch_timeout_s=0.3)
    stuck = await h.worker(broker, "stuck", capacity=2)
    (pending,) = broker.submit_many(["x"], {}, 10.0)
    await stuck.wait_requests(1)

    alive = [stuck]

    async def keep_heartbeating():
        # Both fake workers beat like real ones (the broker drops a silent one at 0.3 s).
        while True:
            for worker in alive:
                await worker.send(Heartbeat())
            await asyncio.sleep(0.05)  # the fake workers' heartbeat period, not a wait
    beating = asyncio.create_task(keep_heartbeating())
    try:
        healthy = await h.worker(broker, "healthy", capacity=2)
        alive.append(healthy)
        (moved,) = await healthy.wait_requests(1)
        assert moved.request_id == pending.request_id
        assert stuck.identity not in broker.workers
        assert any(pid == stuck.pid and "stuck" in reason for pid, reason in h.deaths)
        await healthy.answer(moved.request_id, "done")
        assert (await asyncio.wait_for(pending.future, WAIT_S)).output == "done"
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)


# -- answer memory ------------------------------------------------------------------------------
def frame_bytes(request_id: int, output: Any) -> int:
    """What the broker counts for an answer: its RESULT frame, as FakeWorker.answer sends it."""
    return len(codec.encode(Result(request_id=request_id, output=output, batch_size=1,
                                   queue_ms=1.0, inference_ms=2.0, batch_id=0)))


def floats(n: int) -> NDArray:
    return NDArray("<f4", (n,), bytes(4 * n))


async def test_answers_are_held_in_one_budget_too_large_is_422_crowded_is_503(h):
    broker = await h.broker(max_held_bytes=10_000)
    w = await h.worker(broker, "a", capacity=4)
    first, second = broker.memory.claim(), broker.memory.claim()
    a = broker.submit_many(["a1", "a2"], {}, 5.0, claim=first)
    b = broker.submit_many(["b1"], {}, 5.0, claim=second)
    await w.wait_requests(3)

    await w.answer(a[0].request_id, floats(1500))  # ~6 kB: held
    assert (await outcome(a[0])).output == floats(1500)
    held = frame_bytes(a[0].request_id, floats(1500))
    assert first.held == broker.memory.held == held

    # b1 alone would fit, but not beside a1: the server is busy, not the request wrong.
    await w.answer(b[0].request_id, floats(1000))
    assert isinstance(await outcome(b[0]), Overloaded)
    assert second.held == 0 and broker.memory.held == held

    # a2 takes the first request past the budget on its own: it can never be answered.
    await w.answer(a[1].request_id, floats(1500))
    refused = await outcome(a[1])
    assert isinstance(refused, AnswersTooLarge) and refused.status == 422
    assert "send fewer inputs per request" in refused.message
    assert broker.memory.held == held, "a refused answer is not held"

    first.release()
    assert broker.memory.held == 0 and first.held == 0
    # Credit came back with every answer, refused or not.
    assert handle(broker, w).in_flight == {} and broker.in_flight == 0

    # Maps and strings count at their decoded size, several times their frame.
    third = broker.memory.claim()
    c = broker.submit_many(["c1"], {}, 5.0, claim=third)
    await w.wait_requests(4)
    candidates = [{"score": 0.5, "token": i, "token_str": "w", "sequence": "a w"} for i in range(40)]
    await w.answer(c[0].request_id, candidates)
    assert (await outcome(c[0])).output == candidates
    assert third.held == STRUCTURED_EXPANSION * frame_bytes(c[0].request_id, candidates)
    third.release()


async def test_an_answer_that_comes_after_its_request_was_settled_is_not_held(h):
    broker = await h.broker(max_held_bytes=10_000)
    w = await h.worker(broker, "a", capacity=2)
    claim = broker.memory.claim()
    [p] = broker.submit_many(["x"], {}, 5.0, claim=claim)
    await w.wait_requests(1)
    broker.cancel(p)
    claim.release()  # the handler is gone: its account is closed
    await w.answer(p.request_id, floats(1000))
    await w.sync()
    assert broker.memory.held == 0 and claim.held == 0


async def test_the_loop_runs_between_two_large_answers_already_waiting(h, monkeypatch):
    """pyzmq hands over a frame already waiting without yielding; a large answer takes long
    to decode (a 44 MiB one of fill-mask candidates, a second), so the broker yields after
    each, and the HTTP side is not held for a whole burst of them."""
    broker = await h.broker()
    w = await h.worker(broker, "a", capacity=2)
    p = broker.submit_many(["x", "y"], {}, 5.0)
    await w.wait_requests(2)
    loop = asyncio.get_running_loop()
    events: list = []
    decode = codec.decode

    def recording(payload: bytes) -> Message:
        message = decode(payload)
        if isinstance(message, Result) and len(payload) > YIELD_AFTER_BYTES:
            events.append(message.request_id)
            if len(events) == 1:
                loop.call_soon(events.append, "the loop ran")
                # Hold this frame until the second one waits in the socket too.
                waiting = zmq.Socket.shadow(broker._socket.underlying)  # a blocking view
                assert waiting.poll(WAIT_S * 1000), "the second answer never came"
        return message

    monkeypatch.setattr(codec, "decode", recording)
    large = floats(YIELD_AFTER_BYTES // 4 + 1)
    await w.answer(p[0].request_id, large)
    await w.answer(p[1].request_id, large)
    assert [(await outcome(x)).output for x in p] == [large, large]
    assert events == [p[0].request_id, "the loop ran", p[1].request_id]


async def test_the_loop_runs_while_small_frames_keep_coming(h, monkeypatch, caplog):
    """A peer sending small frames (heartbeats, garbage) faster than they are taken held the
    event loop for as long as it sent them: one second of heartbeats froze /health for 19 s.
    The broker gives the loop a turn every YIELD_AFTER_FRAMES frames; garbage gets one
    WARNING, not one each."""
    caplog.set_level(logging.WARNING, logger="batchwire.gateway.broker")
    # inproc: a frame sent is in the broker's pipe when send returns, so all of them wait
    # there before the broker's loop runs again.
    h.endpoint = f"inproc://flood-{uuid.uuid4().hex}"
    await h.broker()
    loop = asyncio.get_running_loop()
    taken: list[int] = []
    taken_when_the_loop_ran: list[int] = []
    decode = codec.decode

    def counting(payload: bytes) -> Message:
        taken.append(len(payload))
        if len(taken) == 1:
            loop.call_soon(lambda: taken_when_the_loop_ran.append(len(taken)))
        return decode(payload)

    monkeypatch.setattr(codec, "decode", counting)
    flood = h.ctx.socket(zmq.DEALER)
    flood.setsockopt(zmq.SNDHWM, 0)  # the pipe takes every frame before the broker reads
    try:
        flood.connect(h.endpoint)
        blocking = zmq.Socket.shadow(flood.underlying)
        count = 4 * YIELD_AFTER_FRAMES
        for i in range(count):
            blocking.send(codec.encode(Heartbeat()) if i % 2 else b"garbage")
        await wait_until(lambda: len(taken) == count, "every frame to be taken")
    finally:
        flood.close(linger=0)
    assert taken_when_the_loop_ran == [YIELD_AFTER_FRAMES]
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 1


async def test_a_frame_past_the_limit_is_refused_as_it_arrives_not_read_first(h):
    """Checked after it was read whole, three 1 GiB frames took the gateway to 4 GB: libzmq
    drops the peer of a frame past MAXMSGSIZE as it arrives."""
    broker = await h.broker()
    assert broker._socket.getsockopt(zmq.MAXMSGSIZE) == codec.MAX_FRAME_BYTES


async def test_a_worker_that_announces_another_task_is_admitted_afresh(h):
    """A READY again updates a worker's limits. One that turned to another task stayed in
    dispatch: a request of the old task went to it and got 503 "the workers of this
    request's task are gone" while a worker of that task sat idle."""
    broker = await h.broker()
    a = await h.worker(broker, "a", capacity=4)
    b = await h.worker(broker, "b", capacity=1)
    a.ready = dataclasses.replace(a.ready, task="text-classification")
    await a.send(a.ready)
    await wait_until(lambda: a.identity not in broker.workers, "a to be taken out")
    (p,) = broker.submit_many(["x"], {}, 5.0)
    await b.wait_requests(1)
    await b.answer(p.request_id, "from b")
    assert (await outcome(p)).output == "from b"
    assert h.deaths == []  # taken out as a clean leave, not a crash


async def test_a_peer_can_end_only_the_local_worker_it_joined_as(h):
    """A READY claiming a supervised worker's pid, then silence, had that worker SIGKILLed
    round after round: the supervisor is told which peer was lost, and ends a process only
    for the peer it joined as."""
    from gateway.supervisor import Supervisor, WorkerSlot

    class Process:
        pid, returncode = 4242, None
        signals: list[int] = []

        def send_signal(self, sig: int) -> None:
            self.signals.append(sig)

    supervisor = Supervisor.__new__(Supervisor)
    supervisor.slots = [WorkerSlot(0, "cpu", [], {}, process=Process())]
    assert not supervisor.kill(4242, "silent", b"rogue/00000000")  # no READY from it yet
    supervisor.ready(4242, b"worker-0/12345678")
    supervisor.ready(4242, b"rogue/00000000")  # the second claim is not taken
    assert not supervisor.kill(4242, "silent", b"rogue/00000000")
    assert Process.signals == []
    assert supervisor.kill(4242, "silent", b"worker-0/12345678")
    assert Process.signals == [signal.SIGKILL]


@pytest.mark.parametrize("rogue_key", ["authorized", "revoked"])
async def test_a_peer_with_another_key_cannot_answer_as_the_worker_whose_identity_it_took(
        h, tmp_path, caplog, rogue_key):
    """ROUTER_HANDOVER gives a known identity to whoever connects with it. A peer holding
    another authorized CURVE key took a worker's identity over, and its forged answers
    reached that worker's clients with a 200 (100 of 100 in the probe that found it). A key
    revoked after its handshake (its connection lives on) is no better: checked first, the
    revocation hid the takeover, and the worker's requests went to the rogue until their
    deadline."""
    from protocol import curve, handshakes

    caplog.set_level(logging.ERROR, logger="batchwire.gateway.broker")
    gateway_public, gateway_secret = curve.generate(tmp_path / "keys", "gateway")
    authorized = tmp_path / "authorized"
    secrets = {name: curve.generate(authorized, name)[1] for name in ("real", "rogue")}
    broker = await h.broker(curve_secret_key=str(gateway_secret),
                            curve_authorized_keys=str(authorized))
    identity = b"real/0123abcd"

    def dealer(name: str, on_handshake=None) -> zmq.asyncio.Socket:
        sock = h.ctx.socket(zmq.DEALER)
        sock.curve_publickey, sock.curve_secretkey = curve.load_keypair(secrets[name])
        sock.curve_serverkey = curve.load_public(gateway_public)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        if on_handshake is not None:
            watches.append(handshakes.watch(sock, on_handshake, name))
        sock.connect(h.endpoint)
        return sock

    watches: list[asyncio.Task] = []

    real = dealer("real")
    rogue = None
    try:
        await real.send(codec.encode(Ready(worker_id="real", pid=1, model="m", task="fill-mask",
                                           device="cpu", capacity=1, max_batch_size=1)))
        assert isinstance(codec.decode(await asyncio.wait_for(real.recv(), WAIT_S)), Heartbeat)
        (p,) = broker.submit_many(["x"], {}, 5.0)
        request = codec.decode(await asyncio.wait_for(real.recv(), WAIT_S))
        assert isinstance(request, Request) and request.request_id == p.request_id
        joined = asyncio.Event()
        rogue = dealer("rogue", lambda handshake: handshake.ok and joined.set())
        if rogue_key == "revoked":
            await asyncio.wait_for(joined.wait(), WAIT_S)  # admitted, then revoked
            (authorized / "rogue.key").unlink()
            assert broker.worker_keys.reload_if_changed()
        await rogue.send(codec.encode(Result(p.request_id, "forged", 1, 0.0, 0.0)))
        await wait_until(lambda: p.future.done() or "another CURVE key" in caplog.text,
                         "the forged answer to be taken or dropped")
        assert not p.future.done(), (await outcome(p)).output
        # Whatever is sent to that identity now reaches the rogue: the worker is out of
        # dispatch, its request back in the queue at once (not three heartbeats later),
        # uncharged, and the READY of the real worker, under its own key, has it back.
        assert identity not in broker.workers
        assert broker.queue_depth == 1 and p.crashes == 0
        real.close(linger=0)
        real = dealer("real")
        await real.send(codec.encode(Ready(worker_id="real", pid=1, model="m", task="fill-mask",
                                           device="cpu", capacity=1, max_batch_size=1)))
        while True:
            message = codec.decode(await asyncio.wait_for(real.recv(), WAIT_S))
            if isinstance(message, Request):
                break
        assert message.request_id == p.request_id
        assert broker.workers[identity].key == curve.load_public(secrets["real"]).decode()
    finally:
        for watching in watches:
            watching.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        real.close(linger=0)
        if rogue is not None:
            rogue.close(linger=0)


async def test_a_newer_workers_ready_is_dropped_with_one_line_saying_to_upgrade(h, caplog):
    """A READY with a field this gateway does not know comes from a newer worker, which
    re-sends it every second: dropped (nothing in it can be trusted to mean what this side
    thinks), with one ERROR saying which side to upgrade, not a warning a second."""
    caplog.set_level(logging.WARNING, logger="batchwire.gateway.broker")
    broker = await h.broker()
    newer = h.peer("newer", capacity=2)
    fields = msgpack.unpackb(codec.encode(newer.ready))
    fields += [0] * (len(dataclasses.fields(Ready)) + 2 - len(fields)) + ["a field from later"]
    for _ in range(3):
        await newer.send_raw(msgpack.packb(fields))
    await newer.register()  # the broker has handled the three; a READY it knows still counts
    assert handle(broker, newer).info.capacity == 2
    lines = [r for r in caplog.records if "newer batchwire" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR
    assert "the gateway first" in lines[0].getMessage()
