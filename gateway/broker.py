"""The gateway's ZeroMQ side: one ROUTER socket, credit-based dispatch, one bounded queue,
served earliest deadline first (suspects before all).

Every admitted request is a :class:`PendingRequest` whose future is resolved exactly once:
with the worker's RESULT, with its ERROR, with 504 when the deadline passes, or with 500
when the workers that held it died. Late and duplicate replies are dropped by request id.

Poison control: a request that was on a worker when it died is a *suspect*. It is requeued
ahead of every other request but runs alone, on a worker holding nothing else, so if it
kills that worker too only it is charged; after two deaths it is answered 500 and never
retried. Innocent requests that shared the first worker's queue run again (alone) and
succeed. Across requests (a client retrying its 500 or 504), by a digest of the input and
its parameters (gateway/poison_memo.py): one a worker died holding is a suspect when sent
again, and one that killed two workers is refused at admission.

Credit: a worker announces ``capacity`` in READY; the broker never leaves more than that
many requests unanswered on it, and sends to the worker with the most free credit. A
request whose client gave up stays counted against the worker's credit until the worker
answers it (it always does, if only with "cancelled"), because until then it really is
occupying a slot there.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq
import zmq.asyncio

from gateway.held_memory import DEFAULT_MAX_HELD_BYTES, Claim, HeldMemory, answer_size
from gateway.metrics import GatewayMetrics
from gateway.poison_memo import POISON_MEMORY_S, PoisonMemo, fingerprinter
from gateway.worker_keys import Authenticator, WorkerKeys
from protocol import codec, curve, handshakes
from protocol.codec import MAX_FRAME_BYTES
from protocol.errors import (
    BadInput,
    BatchwireError,
    Cancelled,
    DeadlineExceeded,
    Draining,
    NoWorkers,
    Overloaded,
    ProtocolError,
    WorkerCrashed,
    error_from_code,
)
from protocol.messages import (
    MAX_NESTING,
    MAX_PARAMETERS_BYTES,
    Cancel,
    Disconnect,
    Error,
    Heartbeat,
    Message,
    Ready,
    Request,
    Result,
    nesting,
)
from protocol.logs import Throttled, ThrottledBy
from protocol.transport import send_now

log = logging.getLogger("batchwire.gateway.broker")

MISSED_HEARTBEATS = 3
#: Heartbeats a worker had missed when a request was sent to it for its silence not to be
#: charged to the request (see Broker._quiet_when_sent): past the one a worker's beat can be
#: late by, short of the MISSED_HEARTBEATS that end it.
QUIET_AT_SEND = 2
#: Heartbeats a worker may have been silent for and still be sent a suspect (see
#: Broker._fresh). A running worker beats once a heartbeat; one silent past that waits to be
#: heard again, which dispatches at once.
SUSPECT_TO_FRESH_BEATS = 1.0
#: A worker kept from new work for a waiting suspect stays kept unless another should empty
#: this many times sooner (see Broker._drained_for).
KEEP_DRAINING_WITHIN = 2.0
LOCAL_HOST = socket.gethostname()
#: A request on this many workers that died is not retried again: it may be what kills them.
MAX_CRASHES = 2
#: The receive loop gives the event loop a turn after this many bytes, or this many frames,
#: taken without one (see _receive_loop).
YIELD_AFTER_BYTES = 1 << 20
YIELD_AFTER_FRAMES = 64
#: Peers remembered per "said once" log set (refused, newer, other task); past it the set
#: starts afresh, so a stream of new identities costs a line a minute, not memory forever.
MAX_PEERS_REMEMBERED = 1024
#: Workers one gateway takes: far past any real pool, and a bound on what peers announcing
#: themselves can make it hold.
MAX_WORKERS = 1024
#: Weight of a worker's latest batch in the running average of its speed (dispatch).
SPEED_WEIGHT = 0.2
#: Per heartbeat, how much of an idle worker's lag behind the pool's best timings stays:
#: a worker ten times slower is tried again after about a minute of others' steady load.
IDLE_DECAY = 0.9
#: Identities of killed local workers remembered, to refuse their late READYs.
MAX_KILLED_REMEMBERED = 1024
#: Settled requests the queue's heap may hold beyond twice the live ones before it is
#: rebuilt without them.
COMPACT_QUEUE_ABOVE = 1024
#: Why a request was withdrawn (Broker.cancel): its client went away, or another input of
#: the same list failed, which fails the whole list.
CLIENT_GONE = "client_gone"
LIST_ITEM_FAILED = "list_item_failed"
CANCEL_REASONS = (CLIENT_GONE, LIST_ITEM_FAILED)
#: Where an input was when its deadline made it a 504, each pointing at its own remedy:
#: waiting in the gateway's queue (too few workers for the load), refused by the worker
#: (its deadline passed in the worker's queue, or its batch would have finished too late:
#: deadlines near the batch time, or a backlog at the worker), or sent to a worker whose
#: answer had not come (a batch longer than the deadline, a worker's queue it did not
#: refuse in time, or answers waiting on a gateway too busy to read them).
MISSED_IN_QUEUE = "gateway_queue"
MISSED_AT_WORKER = "worker_refused"
MISSED_IN_FLIGHT = "in_flight"
MISSED_WHERE = (MISSED_IN_QUEUE, MISSED_AT_WORKER, MISSED_IN_FLIGHT)


def check_parameters_size(parameters: dict) -> None:
    """400 for parameters larger than MAX_PARAMETERS_BYTES: every input carries them."""
    if not parameters:
        return
    try:
        size = codec.encoded_size(parameters)
    except (TypeError, ValueError):
        return  # not encodable: dispatch answers it 400 with the reason
    if size > MAX_PARAMETERS_BYTES:
        raise BadInput(f"the parameters take {size} bytes; at most {MAX_PARAMETERS_BYTES} "
                       "are taken, since every input of the request carries them to a "
                       "worker (send fewer targets or labels)")


def check_nesting(inputs: list, parameters: dict) -> None:
    """400 for inputs or parameters nested deeper than a REQUEST may carry (MAX_NESTING):
    pipelines take flat arguments, and a worker refuses such a message unread."""
    depth = nesting(parameters)
    if depth > MAX_NESTING:
        raise BadInput(f"the parameters nest {depth} levels deep; at most {MAX_NESTING} are "
                       "taken (pipeline arguments are numbers, strings, and short lists or "
                       "objects of them)")
    for item in inputs:
        if type(item) is str:
            continue  # most are: a cheaper test than the walk
        depth = nesting(item)
        if depth > MAX_NESTING:
            raise BadInput(f"an input nests {depth} levels deep; at most {MAX_NESTING} are "
                           "taken")


def unsendable(exc: Exception) -> str:
    """What to fix, for an input that msgpack cannot encode."""
    if isinstance(exc, UnicodeEncodeError):
        return (f"its text holds {exc.object[exc.start:exc.end]!r} at character {exc.start}, "
                "a lone surrogate, which is not Unicode text; send valid UTF-8")
    return f"{type(exc).__name__}: {exc}"


@dataclass(eq=False, slots=True)
class PendingRequest:
    request_id: int
    inputs: Any
    parameters: dict
    admitted_at: float
    deadline: float
    future: asyncio.Future
    worker: "WorkerHandle | None" = None
    crashes: int = 0
    timer: asyncio.TimerHandle | None = None
    queued: bool = False
    embed: bool = False
    prompt_name: str = ""
    #: The request's account in the held-memory budget (gateway/held_memory.py), if any.
    claim: Claim | None = None
    #: The task of the workers it was admitted for: its client expects that task's answer.
    task: str = ""
    #: Their model: with the task, what its input's digest is taken under (poison_memo).
    model: str = ""
    #: Its input's digest, where admission took it (while anything was remembered).
    digest: bytes | None = None
    #: Its input was on a worker that died (another request's): it runs alone, as a
    #: suspect does, but has no crash of its own to count.
    alone: bool = False
    #: While it is a suspect waiting for a worker to go idle: the worker kept from new work
    #: for it, so that one goes idle and the others go on serving the rest of the queue.
    drains: "WorkerHandle | None" = None
    #: When it was last sent to a worker (the broker's clock).
    sent_at: float = 0.0
    #: Answered (or given up on). Not future.done(): a cancelled handler's gather cancels
    #: the future itself, and the broker must still withdraw the request.
    settled: bool = False

    @property
    def done(self) -> bool:
        return self.settled

    @property
    def suspect(self) -> bool:
        """Run alone, on a worker holding nothing else, and served before the rest."""
        return bool(self.crashes) or self.alone


@dataclass(eq=False)
class WorkerHandle:
    identity: bytes
    info: Ready
    joined_at: float
    last_seen: float
    in_flight: dict[int, PendingRequest] = field(default_factory=dict)
    answered: int = 0
    #: Items the worker reported as skipped (cancelled or expired before computing).
    skipped: int = 0
    #: Last time this worker answered anything, or started holding work after being idle.
    last_progress: float = 0.0
    #: A request that was on a worker that died runs here alone.
    suspect: PendingRequest | None = None
    batches: int = 0
    last_batch_id: int = -1
    #: The CURVE key (ZAP User-Id) it joined with; None without CURVE.
    key: str | None = None
    #: Seconds of pipeline time per batch, averaged over its recent batches; 0 until its
    #: first. Per batch, not per token: a worker given less work runs smaller batches and
    #: looks faster, so it is given more, which evens out equal workers. (Per padded token,
    #: small batches looked slow: one of two equal workers took 99 % of the requests.)
    batch_s: float = 0.0
    #: Seconds a request spends on its way to the worker and its answer on the way back
    #: (the network both ways, encoding, decoding), averaged likewise: a worker across a
    #: slow link is farther.
    trip_s: float = 0.0

    @property
    def free(self) -> int:
        if self.suspect is not None:
            return 0
        return self.info.capacity - len(self.in_flight)

    def observe_batch(self, inference_ms: float) -> None:
        self.batch_s = _averaged(self.batch_s, inference_ms / 1000.0)

    def observe_trip(self, seconds: float) -> None:
        self.trip_s = _averaged(self.trip_s, max(seconds, 0.0))

    def expected_s(self, now: float, unknown_batch_s: float = 0.0) -> float:
        """About how long one more request sent here now would take to be answered: a
        batch, stretched by what the worker already holds (a full batch's worth ahead, one
        more batch), plus how far its current batch has run past a batch's time (a worker
        stuck in a long batch is not the soonest done), plus the trip there and back."""
        batch_s = self.batch_s or unknown_batch_s
        ahead = len(self.in_flight) / max(self.info.max_batch_size, 1)
        overrun = max(now - self.last_progress - batch_s, 0.0) if self.in_flight else 0.0
        return batch_s * (1.0 + ahead) + overrun + self.trip_s

    def forget_slowly(self, batch_floor_s: float, trip_floor_s: float) -> None:
        """Bring an idle worker's timings a step nearer the pool's best. They change only
        when it answers, so one slow batch on record (a long input, a passing stall) kept an
        idle worker out of dispatch for as long as the others had credit."""
        self.batch_s = batch_floor_s + (self.batch_s - batch_floor_s) * IDLE_DECAY
        self.trip_s = trip_floor_s + (self.trip_s - trip_floor_s) * IDLE_DECAY


class Broker:
    def __init__(
        self,
        endpoint: str,
        *,
        max_queue: int,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        default_timeout_s: float = 30.0,
        heartbeat_interval_s: float = 1.0,
        batch_timeout_s: float = 60.0,
        metrics: GatewayMetrics | None = None,
        curve_secret_key: str | None = None,
        curve_authorized_keys: str | None = None,
        context: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        poison_memory_s: float = POISON_MEMORY_S,
    ):
        self.endpoint = endpoint
        self.max_queue = max_queue
        #: The deadline most requests get (--timeout-ms): one asking for more is queued as
        #: if it had this one, so it does not wait behind everyone admitted after it.
        self.default_timeout_s = default_timeout_s
        self.memory = HeldMemory(max_held_bytes)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.batch_timeout_s = batch_timeout_s
        self.curve_secret_key = curve_secret_key
        self.curve_authorized_keys = curve_authorized_keys
        #: Public keys admitted besides those in curve_authorized_keys (serve's own workers).
        self.extra_worker_keys: set[bytes] = set()
        self._authenticator = None
        #: The keys of curve_authorized_keys, read again when the directory changes.
        self.worker_keys: WorkerKeys | None = None
        self.metrics = metrics or GatewayMetrics()
        self.metrics.watch(self)
        self.clock = clock
        self._ctx = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        # Ids start at random: a worker may still hold (and answer) requests of the gateway
        # this one replaced on the same endpoint, and ids counted from 1 each time matched
        # those answers to this gateway's own requests, whose clients got them (200, someone
        # else's answer). Two sessions' ids meet with odds of about one in 2**40.
        self._ids = itertools.count(secrets.randbits(62) + 1)
        #: Earliest deadline first (suspects before all): (urgency, request) pairs, a heap.
        #: Settled requests stay in it until they reach its top (or it is compacted).
        self._queue: list[tuple[tuple[int, float, int], PendingRequest]] = []
        self._queued = 0
        #: As the last dispatch left them: the suspects it set aside in the queue, and the
        #: workers it drained for them (see _drained_for), which admission's bound reads.
        self._set_aside = 0
        self._draining: set[bytes] = set()
        self._dispatching = False
        self._dispatch_again = False
        self._pending: dict[int, PendingRequest] = {}
        self.workers: dict[bytes, WorkerHandle] = {}
        self.draining = False
        self._tasks: list[asyncio.Task] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._refused_peers: set[bytes] = set()
        #: Malformed frames: one WARNING a minute at most, however many come.
        self._log_dropped = Throttled(log, logging.WARNING)
        self._log_refused = Throttled(log, logging.ERROR)
        self._log_impostor = Throttled(log, logging.ERROR)
        self._log_revoked = Throttled(log, logging.WARNING)
        #: Failed handshakes, by cause (protocol.handshakes): one line a minute for each.
        self._log_handshake = ThrottledBy(log, logging.WARNING)
        #: (peer, message type) pairs dropped for fields this gateway lacks (logged once each).
        self._newer_peers: set[tuple[bytes, str]] = set()
        #: Workers refused for serving another task than the gateway's (logged once each).
        self._other_task_peers: set[bytes] = set()
        #: Called with (pid, reason, identity) when a worker is declared dead or stuck, so
        #: the supervisor can end a local process that may still be hanging around; True
        #: when it did.
        self.on_worker_dead: Callable[[int, str, bytes], bool | None] = (
            lambda pid, reason, identity: None)
        #: Called with the pid and identity of each local worker that joins (the
        #: supervisor's bookkeeping).
        self.on_worker_ready: Callable[[int, bytes], None] = lambda pid, identity: None
        #: Workers whose process the supervisor was told to end: a READY of theirs still
        #: waiting in the socket would have them back, idle, until they die (most recent
        #: kept; a replacement process comes with an identity of its own).
        self._killed: dict[bytes, None] = {}
        self.requeued = 0
        #: When the last worker left (None while any is here, or before the first came).
        self._workerless_since: float | None = None
        #: Whether a worker is on its way (serve's supervisor restarting one): while one is,
        #: requests left without a worker wait for it rather than get 503.
        self.expecting_workers: Callable[[], bool] = lambda: False
        #: Inputs that killed the workers running them, refused at admission for a while.
        self.poison = PoisonMemo(poison_memory_s)
        #: Inputs that were on a worker when it died, once: sent again (a client retrying
        #: its 500 or 504), each is a suspect from the start, run alone. Poison control
        #: otherwise lived and died with one request: an input that hangs the model got
        #: its 504 at the deadline (30 s) before the watchdog ended the worker (60 s), so
        #: it was never charged, and each retry held another worker for a minute and cost
        #: it a reload.
        self.suspected = PoisonMemo(poison_memory_s)
        #: The (model, task) the last worker to join serves: what a poison input's digest is
        #: taken under while no worker is here, so it gets its 500, not a 503 to retry.
        self._last_served: tuple[str, str] | None = None
        #: Requests withdrawn before their answer, by why (CANCEL_REASONS).
        self.cancelled = dict.fromkeys(CANCEL_REASONS, 0)
        #: Inputs answered 504 for their deadline, by where they were (MISSED_WHERE).
        self.deadline_missed = dict.fromkeys(MISSED_WHERE, 0)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        # Fail loudly (EHOSTUNREACH) instead of silently dropping frames to a vanished peer.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted worker process reconnecting under a known identity takes it over.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.LINGER, 0)
        # A peer sending a larger frame is disconnected as it arrives, instead of the frame
        # being read whole and refused after: three 1 GiB frames took the gateway to 4 GB.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self._apply_curve(sock)
        watching = handshakes.watch(sock, self._on_handshake, "broker-handshakes")
        try:
            sock.bind(self.endpoint)
        except BaseException:
            watching.cancel()
            raise
        self._socket = sock
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="broker-receive"),
            asyncio.create_task(self._heartbeat_loop(), name="broker-heartbeat"),
            watching,
        ]

    def _apply_curve(self, sock: zmq.Socket) -> None:
        curve.warn_if_plain(self.endpoint, bool(self.curve_secret_key), log, "gateway")
        if not self.curve_secret_key:
            return
        public, secret = curve.load_keypair(self.curve_secret_key)
        # The authenticator answers ZAP requests for every CURVE handshake on this context,
        # before the broker sees a single frame from the peer.
        auth = self._authenticator = Authenticator(self._ctx, log=log)
        auth.start()
        if self.curve_authorized_keys:
            keys = self.worker_keys = WorkerKeys(self.curve_authorized_keys,
                                                 self.extra_worker_keys,
                                                 peer_address=lambda: auth.peer_address)
            keys.on_revoked = self._revoke
            log.info("CURVE on: %d authorized worker key(s) from %s", keys.count,
                     self.curve_authorized_keys)
            auth.configure_curve_callback("*", keys)
        else:
            log.info("CURVE on: any worker holding the gateway's public key is admitted")
            self._authenticator.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_server = True

    async def close(self) -> None:
        self.draining = True  # nothing new is admitted once the workers are told to go
        for worker in list(self.workers.values()):
            # What is answered "draining" below is not to be computed: a worker that stays up
            # for the next gateway (a remote one) would spend its time on it.
            for request_id, pending in list(worker.in_flight.items()):
                if not pending.done:
                    self._send(worker.identity, Cancel(request_id))
            self._send(worker.identity, Disconnect(reason="gateway shutting down"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pending in list(self._pending.values()):
            self._finish(pending, error=Draining("the gateway shut down before this finished"))
        if self._socket is not None:
            self._socket.close(linger=500)
            self._socket = None
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait for the admitted ones; True if all were answered."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    # -- admission ----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def worker_state(self, worker: WorkerHandle) -> str:
        """What a worker is doing for dispatch, for /info: "ready" (takes requests),
        "suspect" (runs a suspect alone, see _dispatch_queue), or "drained" (kept from new
        work until it is idle, for a suspect that waits: see _drained_for). An operator
        seeing an idle worker while requests wait has the reason."""
        if worker.suspect is not None:
            return "suspect"
        if worker.identity in self._draining:
            return "drained"
        return "ready"

    def submit_many(self, inputs: list, parameters: dict, timeout_s: float,
                    embed: bool = False, prompt_name: str = "",
                    claim: Claim | None = None) -> list[PendingRequest]:
        """Admit all the inputs or none of them (503) so a list is never half served.
        ``claim``: the request's account, which each answer is held in as it arrives."""
        check_nesting(inputs, parameters)
        check_parameters_size(parameters)
        if self.draining:
            raise Draining("the server is shutting down; retry on another instance")
        # One task at a time (see _admissible): any worker's is the gateway's. With none
        # here, the last one's still says what a poison input's digest is taken under.
        served = next(((w.info.model, w.info.task) for w in self.workers.values()),
                      self._last_served)
        now = self.clock()
        digests = None
        if served is not None and (self.poison or self.suspected):
            try:
                digest_of = fingerprinter(*served, parameters, embed, prompt_name)
            except (TypeError, ValueError):
                digest_of = None  # not encodable: dispatch answers it 400 with the reason
            if digest_of is not None:
                digests = self._screen(digest_of, inputs, now)
        if not self.workers:
            raise NoWorkers("no model worker is ready yet; retry shortly")
        model, task = served
        # After every dispatch, what waits is suspects (waiting for an idle worker, or for a
        # copy of their input to finish), or requests for which no worker has credit: free
        # credit helps new requests only if what waits is suspects alone, and only the
        # credit of workers not drained for them.
        free = 0
        if self._queued <= self._set_aside:
            free = sum(max(w.free, 0) for w in self.workers.values()
                       if w.identity not in self._draining)
        if self._queued + max(len(inputs) - free, 0) > self.max_queue:
            raise Overloaded(
                f"the server is at capacity ({self._queued} requests queued); retry shortly"
            )
        loop = asyncio.get_running_loop()
        admitted = []
        for i, item in enumerate(inputs):
            pending = PendingRequest(
                request_id=next(self._ids),
                inputs=item,
                parameters=parameters,
                admitted_at=now,
                deadline=now + timeout_s,
                future=loop.create_future(),
                embed=embed,
                prompt_name=prompt_name,
                claim=claim,
                task=task,
                model=model,
            )
            if digests is not None and digests[i] is not None:
                pending.digest = digests[i]
                pending.alone = self.suspected.known_for(digests[i], now) is not None
            pending.timer = loop.call_later(timeout_s, self._expire, pending)
            self._pending[pending.request_id] = pending
            self._enqueue(pending)
            admitted.append(pending)
        if admitted:
            self._idle.clear()
        self._dispatch()
        return admitted

    def _screen(self, digest_of: Callable[[Any], bytes], inputs: list,
                now: float) -> list[bytes | None]:
        """500 for a list holding an input that killed the workers running it (run again,
        it would kill two more); otherwise each input's digest (None: not encodable)."""
        digests: list[bytes | None] = []
        for i, item in enumerate(inputs):
            try:
                digest = digest_of(item)
            except (TypeError, ValueError):
                digests.append(None)
                continue  # not encodable: dispatch answers it 400, as for any such input
            digests.append(digest)
            left_s = self.poison.known_for(digest, now)
            if left_s is not None:
                self.poison.refused += 1
                which = f"input {i} of this list" if len(inputs) > 1 else "this input"
                raise WorkerCrashed(
                    f"{which}, with these parameters, killed the two workers that ran it "
                    f"shortly before; it is refused for another {left_s:.0f} s rather than "
                    "run again (--poison-memory-s)")
        return digests

    def cancel(self, pending: PendingRequest, reason: str = CLIENT_GONE) -> None:
        """Nobody wants the answer (the client went away, or another item of its list
        failed): stop caring, and tell the worker to skip the item."""
        if pending.done:
            return
        worker = pending.worker
        self.cancelled[reason] += 1
        self._finish(pending, error=Cancelled("the client disconnected" if reason == CLIENT_GONE
                                              else "another input of its list failed"))
        if worker is not None and pending.request_id in worker.in_flight:
            self._send(worker.identity, Cancel(pending.request_id))
        else:
            self._dispatch()  # it may have been a suspect blocking the queue's head

    # -- queue and dispatch -------------------------------------------------------------------
    def _enqueue(self, pending: PendingRequest) -> None:
        pending.queued = True
        pending.worker = None
        self._queued += 1
        heapq.heappush(self._queue, (_urgency(pending, self.default_timeout_s), pending))

    def _dispatch(self) -> None:
        # Not re-entered: a send that fails mid-pass takes its worker out, which dispatches
        # what it held. A pass inside the pass found the suspects the outer one had set
        # aside counted as queued but not in the heap, and read past its end (IndexError
        # out of an HTTP handler: a 500 for a request that had been sent). The outer pass
        # runs again instead.
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            self._dispatch_again = True
            while self._dispatch_again:
                self._dispatch_again = False
                # Suspects set aside (waiting for an idle worker, or while a copy of their
                # input runs), back in the queue when this pass ends: the next answer or
                # death dispatches again.
                deferred: list = []
                self._draining = set()
                try:
                    self._dispatch_queue(deferred)
                finally:
                    for entry in deferred:
                        heapq.heappush(self._queue, entry)
                    self._set_aside = len(deferred)
        finally:
            self._dispatching = False

    def _copy_running(self, pending: PendingRequest) -> bool:
        """Whether a worker holds a request with this suspect's input. Run alone on another
        idle worker meanwhile, the copies of an input that hangs the model each held a
        worker until its watchdog: with three workers and a client retrying its 504s, six
        died, and the pool was down twice. Held back, a copy runs once the first is
        answered (cleared), or is answered 500 once it kills its worker (poison)."""
        if pending.digest is None:
            return False
        return any(held.digest == pending.digest
                   for worker in self.workers.values() for held in worker.in_flight.values())

    def _fresh(self, worker: WorkerHandle, now: float) -> bool:
        """Whether the worker has been heard from within a heartbeat, as a running one always
        has: only such a worker is sent a suspect. One frozen a heartbeat after another was
        sent the other's suspect while silent (not for long enough to be found out yet),
        and its own death by silence then charged the suspect a second crash: the innocent
        input got 500 (2 of 8 trials with two workers stopped a heartbeat apart)."""
        return now - worker.last_seen <= SUSPECT_TO_FRESH_BEATS * self.heartbeat_interval_s

    def _drained_for(self, pending: PendingRequest, draining: set,
                     unknown_s: float) -> WorkerHandle | None:
        """The worker a suspect waiting for an idle one keeps from new work: the one that
        should empty soonest. Only that one drains: the whole queue had waited behind the
        suspect, every worker emptying while one would do. The one kept before stays kept
        unless another should empty in under half its time: each change sets another
        worker draining from the start, but one stuck in a long batch (or holding an input
        that hangs) is not waited for. None: every worker drains for a suspect ahead of
        this one already."""
        now = self.clock()
        soonest = min((w for w in self.workers.values() if w.identity not in draining),
                      key=lambda w: w.expected_s(now, unknown_s), default=None)
        kept = pending.drains
        if (kept is None or soonest is None or self.workers.get(kept.identity) is not kept
                or kept.identity in draining
                or soonest.expected_s(now, unknown_s)
                < kept.expected_s(now, unknown_s) / KEEP_DRAINING_WITHIN):
            kept = soonest
        pending.drains = kept
        return kept

    def _dispatch_queue(self, deferred: list) -> None:
        unknown_s: float | None = None  # see _average_batch_s; once per call, when needed
        # Workers kept from new work, each for a suspect waiting for it to go idle.
        draining = self._draining
        while self._queued > len(deferred) and self.workers:
            pending = self._queue[0][1]
            if not pending.queued:  # finished while queued (deadline, disconnect): skip
                heapq.heappop(self._queue)
                continue
            now = self.clock()
            if pending.suspect:
                if pending.digest is not None and self.poison.known_for(pending.digest,
                                                                        now) is not None:
                    heapq.heappop(self._queue)
                    self._refuse_copy(pending)
                    continue
                if self._copy_running(pending):
                    deferred.append(heapq.heappop(self._queue))
                    continue
                worker = min((w for w in self.workers.values() if not w.in_flight
                              and w.identity not in draining and self._fresh(w, now)),
                             key=lambda w: w.batch_s, default=None)
                if worker is None:
                    if unknown_s is None:
                        unknown_s = self._average_batch_s()
                    drained = self._drained_for(pending, draining, unknown_s)
                    if drained is None:
                        return  # every worker is draining for a suspect; order is kept
                    draining.add(drained.identity)
                    deferred.append(heapq.heappop(self._queue))
                    continue
            else:
                # The worker that should answer soonest among those with free credit: equal
                # credit on a fast and a slow worker are unequal waits. By credit alone, a
                # worker ten times slower held half the requests under load (p99 440 ms
                # against 52 ms), and at low load took all of them while the fast one idled.
                # Until speeds are known, the most free credit decides, as it did alone.
                if unknown_s is None:
                    unknown_s = self._average_batch_s()
                worker = min((w for w in self.workers.values() if w.identity not in draining),
                             key=lambda w: (w.free <= 0, w.expected_s(now, unknown_s), -w.free),
                             default=None)
                if worker is None or worker.free <= 0:
                    return
            heapq.heappop(self._queue)
            if worker.info.task != pending.task:
                # Every worker of its task left and one of another task took their place
                # (_admissible lets it in then): that one would answer in another shape,
                # with a 200 (embeddings to a fill-mask client).
                self._finish(pending, error=NoWorkers(
                    f"the workers of this request's task ({pending.task}) are gone, and this "
                    f"gateway now serves {worker.info.task}; retry for its answer"))
                continue
            pending.queued = False
            self._queued -= 1
            try:
                frame = codec.encode(Request(
                    request_id=pending.request_id,
                    inputs=pending.inputs,
                    parameters=pending.parameters,
                    budget_ms=self._budget_s(pending, worker, now) * 1000.0,
                    waited_ms=(now - pending.admitted_at) * 1000.0,
                    embed=pending.embed,
                    prompt_name=pending.prompt_name,
                ))
            except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
                # What the routes let through should always encode; if it does not, the
                # request is answered here, before any worker holds a slot for it that
                # would never come back (a lone surrogate once did that, and worse).
                log.warning("request %d cannot be sent to a worker: %s: %s",
                            pending.request_id, type(exc).__name__, exc)
                self._finish(pending, error=BadInput(
                    f"the input cannot be sent to the model: {unsendable(exc)}"))
                continue
            if pending.suspect:
                worker.suspect = pending
                pending.drains = None
            pending.worker = worker
            pending.sent_at = now
            if not worker.in_flight:
                worker.last_progress = now
            worker.in_flight[pending.request_id] = pending
            if not self._send_frame(worker.identity, frame, undelivered=pending):
                return  # the worker vanished; _send already requeued its work

    @staticmethod
    def _budget_s(pending: PendingRequest, worker: WorkerHandle, now: float) -> float:
        """The time the worker has to answer: the time left, less the trip there and back,
        which is not its to spend (told the whole time left, an overloaded worker computed
        answers that came after their 504). Less half of the time left at most: the trip is
        measured from answers, and one read late (a stalled event loop) would otherwise
        leave the worker no time at all, answer every request 504, and so never be
        measured again."""
        left = max(pending.deadline - now, 0.0)
        return left - min(worker.trip_s, left / 2.0)

    def _average_batch_s(self) -> float:
        """The batch time of the workers that have run one, on average: what one that has not
        is taken to need. (Taken for instantly fast, a new worker got a whole burst while a
        known one sat idle.) 0 while none has."""
        known = [w.batch_s for w in self.workers.values() if w.batch_s]
        return sum(known) / len(known) if known else 0.0

    def _expire(self, pending: PendingRequest) -> None:
        if pending.done:
            return
        worker = pending.worker
        held = worker is not None and pending.request_id in worker.in_flight
        self.deadline_missed[MISSED_IN_FLIGHT if held else MISSED_IN_QUEUE] += 1
        self._finish(pending, error=DeadlineExceeded(
            "the request did not finish within its time budget; raise X-Timeout-Ms or retry"))
        if held:
            self._send(worker.identity, Cancel(pending.request_id))
        else:
            self._dispatch()  # it may have been a suspect blocking the queue's head

    def _finish(self, pending: PendingRequest, *, result: Result | None = None,
                error: BatchwireError | None = None) -> None:
        if pending.settled:
            return
        pending.settled = True
        if pending.timer is not None:
            pending.timer.cancel()
        if pending.queued:
            pending.queued = False
            self._queued -= 1
            # It stays in the queue's heap until its turn at the top, which for a long
            # deadline behind a stream of short ones can be a while: what it carried (up to
            # a whole body, already given back to the held-memory budget) need not.
            pending.inputs, pending.parameters = None, {}
            if len(self._queue) > 2 * self._queued + COMPACT_QUEUE_ABOVE:
                self._queue = [entry for entry in self._queue if entry[1].queued]
                heapq.heapify(self._queue)
        if pending.future.done():
            pass  # the handler went away and cancelled it
        elif error is not None:
            pending.future.set_exception(error)
            # Nobody may await a future whose client vanished; mark the exception retrieved.
            pending.future.exception()
        else:
            pending.future.set_result(result)
        self._forget(pending)

    def _forget(self, pending: PendingRequest) -> None:
        # Kept in worker.in_flight (credit) until the worker answers; gone from _pending now.
        self._pending.pop(pending.request_id, None)
        if not self._pending:
            self._idle.set()

    # -- workers ---------------------------------------------------------------------------
    def worker_lost(self, worker: WorkerHandle, reason: str, crashed: bool = True,
                    undelivered: PendingRequest | None = None, telling: bool = True,
                    dispatch: bool = True) -> None:
        """Take a worker out of dispatch and requeue what it had not answered (older than
        what waits, so served before it, with one deadline for all; suspects first).
        ``undelivered``: a request that never reached it, so no crash counts against it.
        ``telling``: whether the death says something about what the worker ran (its
        process ended, its model call hung), not only about the worker (silence), so that
        what it held is remembered: as suspects, or as poison where this was a second death.
        ``dispatch``: False while more workers are being taken out, so that what this
        one held is not sent to one of them."""
        if self.workers.get(worker.identity) is not worker:
            return
        del self.workers[worker.identity]
        if not self.workers:
            self._workerless_since = self.clock()
        # Answered already (a 504, a client gone), what it held is charged all the same: the
        # input may be what it died of, and its client may send it again.
        held = [p for p in worker.in_flight.values() if p is not undelivered]
        orphans = [p for p in worker.in_flight.values() if not p.done]
        worker.in_flight.clear()
        worker.suspect = None
        if crashed and worker.info.host in ("", LOCAL_HOST):
            if self.on_worker_dead(worker.info.pid, reason, worker.identity):
                self._killed[worker.identity] = None
                if len(self._killed) > MAX_KILLED_REMEMBERED:
                    del self._killed[next(iter(self._killed))]
        log.warning("worker %s (pid %d) lost: %s; %d request(s) to requeue",
                    worker.info.worker_id, worker.info.pid, reason, len(orphans))
        poisoned = set()
        if crashed:
            for pending in held:
                if not telling and self._quiet_when_sent(pending, worker):
                    continue
                pending.crashes += 1
                if telling and self._remember_crash(pending):
                    poisoned.add(pending.request_id)
        for pending in orphans:
            if pending.request_id in poisoned:
                self._finish(pending, error=WorkerCrashed(
                    "this input was on two workers that died, the second running it alone; "
                    "it is not retried again"))
            elif pending.crashes >= MAX_CRASHES:
                self._finish(pending, error=WorkerCrashed(
                    "the workers running this request died twice; it is not retried again"))
            else:
                self.requeued += 1
                self._enqueue(pending)
        if dispatch:
            self._dispatch()

    def _quiet_when_sent(self, pending: PendingRequest, worker: WorkerHandle) -> bool:
        """Whether the worker had already missed heartbeats when it was sent this request:
        its silence began before the request reached it, so it says nothing about the
        request. Two workers frozen a heartbeat check apart passed a suspect from the first
        to the second, which charged it a second crash: the innocent input got 500. (A
        worker heard within the last beats is charged: a poison input can freeze the whole
        process, heartbeats and all.)"""
        return pending.sent_at - worker.last_seen > QUIET_AT_SEND * self.heartbeat_interval_s

    def _digest(self, pending: PendingRequest) -> bytes | None:
        if pending.digest is not None:
            return pending.digest
        if pending.inputs is None or self.poison.memory_s <= 0:
            return None  # withdrawn while queued (what it held is gone), or memory is off
        try:
            pending.digest = fingerprinter(pending.model, pending.task, pending.parameters,
                                           pending.embed, pending.prompt_name)(pending.inputs)
        except (TypeError, ValueError):
            return None
        return pending.digest

    def _remember_crash(self, pending: PendingRequest) -> bool:
        """A worker died of what it held: a second death of its input (this request's, or
        one before it, which made it run alone) makes it poison, and True; a first makes it
        a suspect when it is sent again."""
        digest = self._digest(pending)
        if digest is None:
            return False
        if pending.crashes + pending.alone < MAX_CRASHES:
            self.suspected.remember(digest, self.clock())
            return False
        self.suspected.forget(digest)
        self.poison.remember(digest, self.clock())
        log.warning("request %d killed the two workers that ran it: the same input with the "
                    "same parameters is refused for %.0f s (%d remembered)", pending.request_id,
                    self.poison.memory_s, len(self.poison))
        # Copies of it waiting in the queue (a client's retries in a burst) would each kill
        # a worker: answered as the next one would be.
        for _, waiting in list(self._queue):
            if (waiting.queued and waiting is not pending
                    and self._digest(waiting) == digest):
                self._refuse_copy(waiting)
        return True

    def _refuse_copy(self, pending: PendingRequest) -> None:
        """500 for a queued copy of an input that has just become poison."""
        self._finish(pending, error=WorkerCrashed(
            "the same input with the same parameters killed the two workers that ran it; "
            "it is not run again"))

    def _cleared(self, pending: PendingRequest) -> None:
        """Run alone and answered (an error of its own included): not what the worker died
        of. Copies admitted to run alone for it need not any more."""
        digest = self._digest(pending)
        if digest is None:
            return
        self.suspected.forget(digest)
        for _, waiting in self._queue:
            if waiting.queued and waiting.alone and waiting.digest == digest:
                waiting.alone = False  # read by dispatch as it reaches the head

    def _revoke(self, keys: frozenset[str]) -> None:
        """Take out the workers that joined with one of these (z85) keys, and tell them."""
        for worker in list(self.workers.values()):
            if worker.key in keys:
                # Not a crash: what it held is requeued uncharged, and it is not killed.
                self.worker_lost(worker, "its CURVE key was revoked", crashed=False)
                self._send(worker.identity, Disconnect(
                    reason="this worker's CURVE key was removed from the gateway's "
                           "--curve-authorized-keys"))

    def _on_handshake(self, handshake: handshakes.Handshake) -> None:
        """Say why a peer was refused before it sent a frame (a refused key says so in
        worker_keys, with the key and the address)."""
        if handshake.ok or handshake.cause == handshakes.REFUSED_KEY:
            return
        if handshake.cause == handshakes.CUT_SHORT:
            # Not a refusal: the peer left mid-handshake (a worker stopping, a port scan).
            log.debug("a peer hung up during its handshake on %s", handshake.endpoint)
            return
        if handshake.cause == handshakes.CURVE_ON_ONE_SIDE:
            why = ("a worker without CURVE: give it --curve-server-key (this gateway's public "
                   "key file)" if self.curve_secret_key else
                   "a worker with CURVE, and this gateway runs without it: drop the worker's "
                   "--curve-* flags, or give the gateway --curve-secret-key")
        elif handshake.cause == handshakes.UNDECRYPTABLE:
            why = ("a worker whose --curve-server-key is not this gateway's public key (the "
                   f".key file beside {self.curve_secret_key})")
        else:
            why = (f"ZMTP protocol error {handshake.code:#x}: a peer that is not a batchwire "
                   "worker")
        self._log_handshake(handshake.cause, "refused a connection to %s before its first "
                            "message: %s", handshake.endpoint or self.endpoint, why)

    def worker_process_exited(self, pid: int, reason: str) -> None:
        """A local worker process died (the supervisor saw it): act now, not after heartbeats."""
        for worker in list(self.workers.values()):
            # The host check keeps a remote worker that happens to share the pid safe.
            if worker.info.pid == pid and worker.info.host in ("", LOCAL_HOST):
                self.worker_lost(worker, reason)

    def _register(self, identity: bytes, ready: Ready, key: str | None = None) -> None:
        now = self.clock()
        worker = self.workers.get(identity)
        if identity in self._killed:
            # Taken back in, it looked idle and was handed a suspect (a request that was on
            # a dead worker), and its death a moment later failed that innocent request.
            log.debug("ignoring READY from worker %s (pid %d): it is being killed",
                      ready.worker_id, ready.pid)
            return
        if worker is not None and (ready.task, ready.model, ready.pid, ready.host) != (
                worker.info.task, worker.info.model, worker.info.pid, worker.info.host):
            # A READY again updates a worker's limits; one naming another task, model or
            # process is another worker, admitted afresh. (One that turned to another task
            # stayed in dispatch, and requests of its old task found no worker: 503 while a
            # worker of that task sat idle.)
            log.warning("worker %s announced another task, model or process; taken out and "
                        "admitted afresh", ready.worker_id)
            self.worker_lost(worker, "it announced itself as another worker", crashed=False)
            worker = None
        if worker is None and len(self.workers) >= MAX_WORKERS:
            self._log_refused("refusing worker %s: this gateway has %d workers already, its "
                              "most", ready.worker_id, MAX_WORKERS)
            return
        if worker is None and not self._admissible(identity, ready):
            return
        if worker is not None:
            worker.info = ready
            worker.last_seen = now
        else:
            self._workerless_since = None
            self._last_served = (ready.model, ready.task)
            self.workers[identity] = WorkerHandle(identity, ready, joined_at=now, last_seen=now,
                                                  key=key)
            log.info("worker %s ready: pid %d, %s (%s) on %s, capacity %d",
                     ready.worker_id, ready.pid, ready.model, ready.task, ready.device,
                     ready.capacity)
            if ready.host in ("", LOCAL_HOST):
                self.on_worker_ready(ready.pid, identity)
        self._send(identity, Heartbeat())
        self._dispatch()

    def _admissible(self, identity: bytes, ready: Ready) -> bool:
        """One gateway serves one task: a worker of another task would answer some of the
        clients' requests in another shape. It is refused (logged once) for as long as
        workers of the other task remain; it keeps announcing itself, so it joins once they
        are gone. Another model of the same task is let in with a warning: that is how a
        rolling upgrade looks."""
        others = list(self.workers.values())
        clash = next((w for w in others if w.info.task != ready.task), None)
        if clash is not None:
            if identity not in self._other_task_peers:
                _remember(self._other_task_peers, identity)
                log.error("refusing worker %s (pid %d on %s): it serves %s (%s), but this "
                          "gateway's workers serve %s (%s); start it against a gateway of "
                          "its own", ready.worker_id, ready.pid, ready.host or "?", ready.task,
                          ready.model, clash.info.task, clash.info.model)
            return False
        if any(w.info.model != ready.model for w in others):
            log.warning("worker %s serves %s while others serve %s: their answers may differ "
                        "until one of the two sets leaves", ready.worker_id, ready.model,
                        sorted({w.info.model for w in others} - {ready.model}))
        self._other_task_peers.discard(identity)
        return True

    # -- socket -----------------------------------------------------------------------------
    def _send(self, identity: bytes, message: Message,
              undelivered: PendingRequest | None = None) -> bool:
        """Send now; on failure, take the worker out (see worker_lost) and return False."""
        return self._send_frame(identity, codec.encode(message), undelivered)

    def _send_frame(self, identity: bytes, frame: bytes,
                    undelivered: PendingRequest | None = None) -> bool:
        if self._socket is None:
            return False
        try:
            send_now(self._socket, [identity, frame])
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH (peer gone, ROUTER_MANDATORY) or EAGAIN (its pipe is full).
            worker = self.workers.get(identity)
            if worker is not None:
                # A peer gone (its connection closed) died; a full pipe says only that it
                # is slow or frozen.
                self.worker_lost(worker, f"send failed: {exc.strerror}",
                                 undelivered=undelivered,
                                 telling=exc.errno == zmq.EHOSTUNREACH)
            return False

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        keyed = bool(self.curve_secret_key)
        frames_taken = bytes_taken = 0
        while True:
            key = None
            if keyed:
                parts = await self._socket.recv_multipart(copy=False)
                key = _user_id(parts[-1])
                frames = [part.bytes for part in parts]
            else:
                frames = await self._socket.recv_multipart(copy=True)
            self._take(frames, key)
            frames_taken += 1
            bytes_taken += sum(len(frame) for frame in frames)
            if frames_taken >= YIELD_AFTER_FRAMES or bytes_taken >= YIELD_AFTER_BYTES:
                # pyzmq hands over a frame already waiting without yielding: a peer sending
                # small frames faster than they are taken (heartbeats, garbage) held the
                # event loop, /health included, for as long as it sent them, and a 44 MiB
                # answer takes a second to decode. The HTTP side runs between turns.
                frames_taken = bytes_taken = 0
                await asyncio.sleep(0)

    def _take(self, frames: list[bytes], key: str | None = None) -> None:
        if len(frames) != 2:
            self._log_dropped("dropping a message of %d frames (want identity + payload)",
                              len(frames))
            return
        identity, payload = frames
        worker = self.workers.get(identity)
        if worker is not None and worker.key != key:
            # ROUTER_HANDOVER gives a known identity to whoever connects with it: another
            # key (authorized, or one revoked whose connection lives on) took a worker's
            # identity over, and its forged answers reached that worker's clients with a
            # 200. What it sends as that worker is dropped.
            self._log_impostor("dropping a message from %r: it came with another CURVE key "
                               "than the worker of that identity joined with; that worker "
                               "is taken out until it joins again", identity[:64])
            # What is sent to that identity now goes to the newcomer: the worker's requests
            # waited there three heartbeats for nothing. They go to the others now,
            # uncharged; the worker, its connection handed over, says READY again once it
            # stops hearing from the gateway.
            self.worker_lost(worker, "a peer with another CURVE key took its identity over",
                             crashed=False)
            return
        if self.worker_keys is not None and not self.worker_keys.admits(key):
            # Admitted at its handshake, its key since taken out of the directory.
            self._log_revoked("dropping a message from %r: its CURVE key %s was revoked "
                              "(removed from --curve-authorized-keys)", identity[:64], key)
            return
        try:
            message = codec.decode(payload)
        except codec.NewerFields as exc:
            # A newer worker re-sends its READY every second: one line says what to do.
            if (identity, exc.name) not in self._newer_peers:
                _remember(self._newer_peers, (identity, exc.name))
                log.error("dropping %s from %r, and any more like it: %s (the gateway "
                          "first, then the workers)", exc.name, identity[:64], exc)
            return
        except codec.ProtocolVersionMismatch as exc:
            if identity not in self._refused_peers:
                _remember(self._refused_peers, identity)
                log.error("refusing peer %r: %s", identity[:64], exc)
            return
        except ProtocolError as exc:
            self._log_dropped("dropping a malformed frame from %r: %s", identity[:64], exc)
            return
        try:
            self._on_message(identity, message, len(payload), key)
        except Exception:  # noqa: BLE001 - one bad message must not stop the broker
            log.exception("error handling %s from %r", type(message).__name__, identity[:64])

    def _on_message(self, identity: bytes, message: Message, frame_bytes: int = 0,
                    key: str | None = None) -> None:
        if isinstance(message, Ready):
            self._register(identity, message, key)
            return
        worker = self.workers.get(identity)
        if worker is None:
            if isinstance(message, Disconnect):
                # Already dropped (declared dead, or we restarted): it waits for an answer to
                # leave, and holds nothing of ours.
                self._send(identity, Disconnect(reason="leave acknowledged"))
            # A worker we do not know (we restarted, or it was declared dead): it re-sends
            # READY when it stops hearing from us. Its replies are for requests long settled.
            return
        worker.last_seen = self.clock()
        if isinstance(message, (Result, Error)):
            pending = worker.in_flight.pop(message.request_id, None)
            if pending is not None:
                worker.answered += 1
                worker.last_progress = self.clock()
                if worker.suspect is pending:
                    worker.suspect = None
                if isinstance(message, Error) and message.code in ("cancelled",
                                                                   "deadline_exceeded"):
                    worker.skipped += 1
                    if message.code == "deadline_exceeded" and not pending.settled:
                        self.deadline_missed[MISSED_AT_WORKER] += 1
                elif pending.suspect and self.suspected:
                    self._cleared(pending)
                if isinstance(message, Result):
                    self._observe(worker, message, pending)
                    # An answer the held-memory budget refuses is answered with the refusal.
                    self._finish(pending, result=message,
                                 error=self._hold(pending, message, frame_bytes))
                else:
                    self._finish(pending, error=error_from_code(message.code, message.message))
            self._dispatch()
        elif isinstance(message, Disconnect):
            self.worker_lost(worker, f"it disconnected ({message.reason})", crashed=False)
            # The answer the worker keeps its socket open for: it is out of dispatch and what
            # it held is requeued, so nothing more is sent to it. Had it closed at once, a send
            # made before this DISCONNECT was read failed, and the leave counted as a crash.
            self._send(identity, Disconnect(reason="leave acknowledged"))
        elif self._queued:
            # Heard from again: an idle worker a suspect would not go to while it was silent
            # (see _fresh) takes it now.
            self._dispatch()

    @staticmethod
    def _hold(pending: PendingRequest, result: Result, frame_bytes: int) -> BatchwireError | None:
        """Count the answer in its request's account; the refusal to answer with instead.
        A settled request's answer is dropped uncounted: its account may be closed."""
        if pending.claim is None or pending.settled:
            return None
        try:
            pending.claim.hold_answer(answer_size(result.output, frame_bytes))
        except BatchwireError as exc:
            return exc
        return None

    def _observe(self, worker: WorkerHandle, result: Result, pending: PendingRequest) -> None:
        self.metrics.observe_queue_wait(result.queue_ms)
        # A batch's results arrive together; count the batch once, at its first result.
        if result.batch_id != worker.last_batch_id:
            worker.last_batch_id = result.batch_id
            worker.batches += 1
            if result.inference_ms > 0:
                worker.observe_batch(result.inference_ms)
            # The worker's queue_ms counts from admission, but with its own clock from the
            # request's arrival (it is told the time waited before dispatch): what is left
            # of the time since admission is the trip there and back.
            worker.observe_trip(self.clock() - pending.admitted_at
                                - (result.queue_ms + result.inference_ms) / 1000.0)
            self.metrics.observe_batch(result.batch_size, result.inference_ms, result.batch_tokens,
                                       result.padding_ratio)

    async def _heartbeat_loop(self) -> None:
        ticked = self.clock()
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            now = self.clock()
            away, ticked = now - ticked - self.heartbeat_interval_s, now
            if away > 0:
                # This process did not run (its loop held by a long call, a paused VM, a GC
                # pause): what workers sent meanwhile still waits unread in the socket, and
                # this tick may come before it is read. That silence was the gateway's, so it
                # does not count against them; one that is really gone misses the next ones.
                # (After a 5 s pause every healthy worker had been declared dead and killed.)
                if away >= self.heartbeat_interval_s:
                    log.warning("the gateway did not run for %.1f s (event loop held, or the "
                                "process paused); workers' silence meanwhile not counted", away)
                for worker in self.workers.values():
                    worker.last_seen += away
                    worker.last_progress += away
                if self._workerless_since is not None:
                    self._workerless_since += away
            self._check_workers(now)

    def _check_workers(self, now: float) -> None:
        """A heartbeat tick: take out the workers gone silent or stuck, and beat to the
        rest."""
        limit = MISSED_HEARTBEATS * self.heartbeat_interval_s
        # The worker's own watchdog exits at batch_timeout_s; this is the backstop for a
        # worker whose watchdog cannot act, so it waits a few heartbeats longer.
        stuck_after = self.batch_timeout_s + limit
        # All found gone are taken out before what they held is sent on: workers frozen
        # together (a paused host) otherwise took each other's suspects, each charged a
        # crash it did not cause, and the innocent input a 500.
        lost = []
        for worker in list(self.workers.values()):
            if now - worker.last_seen > limit:
                lost.append((worker, f"no message for {now - worker.last_seen:.1f} s",
                             False))
            elif worker.in_flight and now - worker.last_progress > stuck_after:
                lost.append((worker, f"stuck: holds {len(worker.in_flight)} request(s) "
                             f"with no answer for {now - worker.last_progress:.1f} s", True))
            else:
                self._send(worker.identity, Heartbeat())
        for worker, reason, telling in lost:
            self.worker_lost(worker, reason, telling=telling, dispatch=False)
        if lost:
            self._dispatch()
        self._forget_slowly()
        if (self._queued and not self.workers and self._workerless_since is not None
                and now - self._workerless_since >= limit and not self.expecting_workers()):
            self._shed_workerless(now - self._workerless_since)

    def _forget_slowly(self) -> None:
        measured = [w for w in self.workers.values() if w.batch_s]
        if len(measured) < 2:
            return
        batch_floor = min(w.batch_s for w in measured)
        trip_floor = min(w.trip_s for w in measured)
        for worker in measured:
            if not worker.in_flight:
                worker.forget_slowly(batch_floor, trip_floor)

    def _shed_workerless(self, gone_s: float) -> None:
        """Answer what waits 503 no_workers: every worker has been gone as long as it takes
        to declare one dead, and none is on its way. It waited out its whole deadline (30 s
        by default) for a 504, while new requests got 503 at once."""
        log.warning("no worker for %.1f s: %d queued input(s) answered 503 no_workers",
                    gone_s, self._queued)
        for _, pending in list(self._queue):
            if pending.queued:
                self._finish(pending, error=NoWorkers(
                    f"every model worker left {gone_s:.0f} s ago and none has come back; "
                    "retry shortly"))
        self._queue.clear()


def _urgency(pending: PendingRequest, default_timeout_s: float) -> tuple[int, float, int]:
    """The queue's order: suspects first (each waits for a worker holding nothing, and
    keeps its place meanwhile), then the earliest deadline, then the first admitted. With
    one deadline for all that is first come, first served; with a few clients asking
    for short deadlines beside many with long ones, a short one no longer waits behind
    the long ones' backlog until it is too late. A deadline past the default counts as
    the default: by its own, a request given an hour waited behind every default one
    admitted after it, for most of the hour."""
    rank = min(pending.deadline, pending.admitted_at + default_timeout_s)
    return (0 if pending.suspect else 1, rank, pending.request_id)


def _averaged(average: float, sample: float) -> float:
    """A running average of a worker's timings: the sample alone while there is none."""
    return sample if not average else (1.0 - SPEED_WEIGHT) * average + SPEED_WEIGHT * sample


def _remember(peers: set, peer: object) -> None:
    """Add ``peer`` to a "logged once" set, which starts afresh once it holds
    :data:`MAX_PEERS_REMEMBERED`."""
    if len(peers) >= MAX_PEERS_REMEMBERED:
        peers.clear()
    peers.add(peer)


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id a frame came with: under CURVE, the sender's public key (z85)."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None
