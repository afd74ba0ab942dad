"""The worker's I/O side: one DEALER socket on an asyncio loop, feeding the batcher.

The socket has one owner, this class's loop; the batcher and the inference thread never
touch it. Heartbeats are sent from this loop, not from the inference thread, so a model call
that hangs cannot hide behind them: the gateway sees the worker's progress stop, not its
heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq
import zmq.asyncio

from protocol import codec, curve, eventloop, handshakes
from protocol.codec import MAX_FRAME_BYTES
from protocol.errors import AnswerTooLarge, BatchwireError, Cancelled, ProtocolError
from protocol.messages import (
    MAX_PROMPT_NAME,
    MAX_PROMPTS,
    Cancel,
    Disconnect,
    Error,
    Heartbeat,
    Message,
    Ready,
    Request,
    Result,
)
from protocol.transport import send_now
from worker.batcher import Batcher, BatchStats, WorkItem
from worker.config import REPEAT_WITHIN_S, WorkerConfig
from worker.gateway_handshakes import GatewayHandshakes
from worker.runner import (EMBED_KEY, PipelineRunner, classify_error, is_out_of_memory,
                           text_chars)

log = logging.getLogger("batchwire.worker")

#: A gateway silent for this many heartbeat intervals is presumed gone (restarted, say):
#: the worker announces itself again so a new gateway on the same endpoint finds it.
MISSED_HEARTBEATS = 3
#: Texts longer than this are measured (tokenized) on a thread of their own, not on the I/O
#: loop. Tokenizing costs up to ~2.5 us a character here (CJK, long words): a 4 MiB body,
#: which the gateway takes by default, held the loop for 10 s, the gateway heard no
#: heartbeat and killed the worker, twice, and the client got a 500. At this length the
#: loop is held at most ~25 ms.
BULK_TEXT_CHARS = 10_000
#: How long a leaving worker waits for the gateway to acknowledge its DISCONNECT, in
#: heartbeat intervals, and at least / at most (seconds): bounded, as an older gateway never
#: answers one and a gateway that is gone cannot.
LEAVE_ACK_HEARTBEATS = 2
LEAVE_ACK_MIN_S = 2.0
LEAVE_ACK_MAX_S = 5.0


def parameter_key(parameters: dict) -> Any:
    """Hashable, order-independent key: equal parameters batch together."""
    return codec.encode_canonical(parameters)


def result_frame(item: WorkItem, output: Any, stats: BatchStats) -> bytes:
    """The RESULT frame for an item's output. Raises :class:`AnswerTooLarge` when it would
    pass the protocol's frame limit: the gateway would drop it unread, and the request would
    wait for its deadline while its slot on this worker never came back (fill-mask with
    every candidate of several masks, token-level answers of a long-context model)."""
    frame = codec.encode(Result(item.request_id, output, stats.batch_size, stats.queue_ms,
                                stats.inference_ms, stats.batch_id, stats.tokens,
                                stats.batch_tokens, stats.padding_ratio))
    if len(frame) > MAX_FRAME_BYTES:
        raise AnswerTooLarge(
            f"the answer to this input is {len(frame) / 2**20:.1f} MiB, more than the "
            f"{MAX_FRAME_BYTES // 2**20} MiB a worker sends in one message: ask for less "
            "(fewer candidates, a shorter input)")
    return frame


class WorkerService:
    def __init__(self, config: WorkerConfig, runner: PipelineRunner, executor: ThreadPoolExecutor):
        self.config = config
        self.runner = runner
        self.executor = executor
        self.identity = f"{config.worker_id}/{uuid.uuid4().hex[:8]}".encode()
        self._socket: zmq.asyncio.Socket | None = None
        self._joining: GatewayHandshakes | None = None
        self._stopping = asyncio.Event()
        self._stop_reason = ""
        #: When the first leaving signal came (monotonic), for REPEAT_WITHIN_S.
        self._signalled_at: float | None = None
        #: Whether this leave waits for the gateway's DISCONNECT in answer to ours; not when
        #: the gateway is what is leaving (it said DISCONNECT, or the parent that ran it is
        #: gone): no answer would come.
        self._handshake = True
        #: Set by the gateway's DISCONNECT once ours is sent (see _await_leave_ack).
        self._leave_acked: asyncio.Event | None = None
        self._last_heard = time.monotonic()
        self._gateway_known = False
        #: Message types a newer gateway sent that this worker could not read (logged once).
        self._newer_logged: set[str] = set()
        #: The batch limits the last READY announced (see _heartbeat_loop).
        self._announced_limits: tuple[int, int] | None = None
        #: The prompt names READY lists, fixed at load. A name no request may send (too
        #: long) is not worth announcing.
        self._prompts = tuple(sorted(name for name in runner.embedding_prompts
                                     if 0 < len(name) <= MAX_PROMPT_NAME))[:MAX_PROMPTS]
        #: Measures long texts apart from the loop, one at a time (see BULK_TEXT_CHARS),
        #: with its own tokenizers (PipelineRunner.measure's bulk).
        self._bulk = ThreadPoolExecutor(1, thread_name_prefix="measure")
        #: Requests being measured there -> whether the gateway has cancelled them since.
        self._measuring: dict[int, bool] = {}
        self.batcher = Batcher(
            runner=runner,
            executor=executor,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_delay_s,
            on_result=self._send_result,
            on_error=self._send_error,
            classify_error=classify_error,
            is_out_of_memory=is_out_of_memory,
            adaptive=not config.fixed_delay,
            max_batch_tokens=config.max_batch_tokens,
            oom_recovery_s=config.oom_recovery_s,
            length_buckets=config.length_buckets,
            # The look-ahead is what the gateway lets this worker hold: its capacity.
            window=config.capacity,
        )

    # -- lifecycle ----------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until stopped; the process's exit status: 0, or 1 when one of its own tasks
        failed (a bug), which the gateway is to treat as a crash."""
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 2000)
        # Reconnect quickly when a gateway restarts on the same endpoint.
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # A larger frame is refused as it arrives (the peer is disconnected), not read whole
        # first: a 1 GiB frame took a worker to 2.6 GB.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        public_key = self._apply_curve(sock)
        self._socket = sock
        joining = self._joining = GatewayHandshakes(self.config, public_key,
                                                    self._connect_again)
        watching = handshakes.watch(sock, joining, "handshakes")
        sock.connect(self.config.connect)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._send(self._ready())
        log.info("worker %s ready on %s: %s (%s) on %s, capacity %d, max batch %d "
                 "(%s padded tokens, length buckets %s), max delay %.1f ms, %s loop",
                 self.config.worker_id, self.config.connect, self.runner.model, self.runner.task,
                 self.config.device, self.config.capacity, self.config.max_batch_size,
                 self.config.max_batch_tokens or "no limit on",
                 "on" if self.config.length_buckets else "off", self.config.max_delay_ms,
                 eventloop.loop_name())
        batching = asyncio.create_task(self.batcher.run(), name="batcher")
        tasks = [
            asyncio.create_task(self._receive_loop(), name="receive"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            watching,
        ]
        stop = asyncio.create_task(self._stopping.wait())
        await asyncio.wait([stop, batching, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = next((task for task in (batching, *tasks)
                       if task.done() and not task.cancelled() and task.exception()), None)
        if failed is not None:
            # Not a clean leave: a DISCONNECT would have the gateway requeue what this worker
            # held as if it never ran, and whatever broke it would break the next one. Gone
            # silent instead, it is a crash, and poison control settles its requests.
            log.error("worker %s stopping: its %s task failed", self.config.worker_id,
                      failed.get_name(), exc_info=failed.exception())
            stop.cancel()
            joining.cancel()
            for task in (batching, *tasks):
                task.cancel()
            await asyncio.gather(batching, *tasks, return_exceptions=True)
            self._bulk.shutdown(wait=False, cancel_futures=True)
            sock.close(linger=0)
            return 1
        # Finish the batch that is computing and answer it; what has not started is left to
        # the gateway, which requeues it when it reads our DISCONNECT.
        joining.cancel()
        self.batcher.close()
        abandoned = self.batcher.abandon_queued()
        await batching
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Texts still being measured are not ours to answer: the gateway requeues them too.
        self._bulk.shutdown(wait=False, cancel_futures=True)
        self._leave_acked = asyncio.Event()
        self._send(Disconnect(reason=self._stop_reason))
        log.info("worker %s leaving (%s); %d queued request(s) handed back to the gateway",
                 self.config.worker_id, self._stop_reason, len(abandoned))
        # A gateway already gone (said DISCONNECT, or silent) has no answer to give.
        heard_lately = (time.monotonic() - self._last_heard
                        <= MISSED_HEARTBEATS * self.config.heartbeat_interval_s)
        if self._handshake and self._gateway_known and heard_lately:
            await self._await_leave_ack()
        sock.close(linger=2000)
        return 0

    async def _await_leave_ack(self) -> None:
        """Keep the socket open, and read, until the gateway answers our DISCONNECT with its
        own. Closed at once, the gateway's next send to this worker (the work its last
        answers freed room for, a heartbeat) could come before it read the DISCONNECT; that
        send failed (EHOSTUNREACH), and the gateway took the leave for a crash: what the
        worker held was charged a crash, and under `serve` the leaving process was SIGKILLed.
        What arrives meanwhile is not answered: the gateway requeues all it sent us when it
        reads the DISCONNECT."""
        assert self._socket is not None and self._leave_acked is not None
        sock, acked = self._socket, self._leave_acked

        async def read() -> None:
            while True:
                try:
                    message = codec.decode(await sock.recv())
                except ProtocolError:
                    continue
                if isinstance(message, Disconnect):
                    # The gateway's answer, or the gateway itself leaving: either way it
                    # sends this worker nothing more.
                    acked.set()
                    return

        wait_s = min(max(LEAVE_ACK_HEARTBEATS * self.config.heartbeat_interval_s,
                         LEAVE_ACK_MIN_S), LEAVE_ACK_MAX_S)
        reader = asyncio.create_task(read(), name="leave-ack")
        try:
            await asyncio.wait_for(acked.wait(), wait_s)
            log.debug("the gateway acknowledged the DISCONNECT")
        except asyncio.TimeoutError:
            log.debug("no answer to the DISCONNECT in %.1f s; leaving anyway", wait_s)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _apply_curve(self, sock: zmq.Socket) -> str | None:
        """Set the socket's CURVE keys, if any; this worker's public key (z85), or None."""
        config = self.config
        curve.warn_if_plain(config.connect, bool(config.curve_server_key), log, "worker")
        if not config.curve_server_key:
            return None
        sock.curve_serverkey = curve.load_public(config.curve_server_key)
        if config.curve_secret_key:
            public, secret = curve.load_keypair(config.curve_secret_key)
        else:
            public, secret = zmq.curve_keypair()
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        return public.decode("ascii")

    def _connect_again(self) -> None:
        """Connect anew after a refusal libzmq gives up on. (Frames queued for the refused
        connection go with it; the heartbeat loop says READY again until it is answered.)"""
        if self._socket is None or self._socket.closed or self._stopping.is_set():
            return
        try:
            self._socket.disconnect(self.config.connect)
        except zmq.ZMQError:
            pass  # already gone
        self._socket.connect(self.config.connect)

    def stop(self, reason: str, handshake: bool = True) -> None:
        """Leave: finish the running batch, answer it, say DISCONNECT. ``handshake``: wait
        for the gateway to acknowledge that DISCONNECT (not when the gateway is leaving)."""
        if not self._stopping.is_set():
            self._stop_reason = reason
            self._handshake = handshake
            self._stopping.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self._signalled_at is not None and now - self._signalled_at < REPEAT_WITHIN_S:
            log.debug("%s within %.1f s of the first signal: the same request to leave",
                      sig.name, REPEAT_WITHIN_S)
            return
        if self._stopping.is_set() and self._stop_reason.startswith("signal"):
            if self._leave_acked is not None:
                # The batch is answered and DISCONNECT sent: only the gateway's answer is
                # still awaited, and nothing is lost by not waiting for it.
                log.info("%s again while waiting for the gateway to acknowledge the "
                         "DISCONNECT: leaving now", sig.name)
                self._leave_acked.set()
                return
            # A second signal while the last batch is still running: whoever sent it will
            # not wait for that batch (it may hang), so leave now.
            log.warning("%s again while finishing: exiting now", sig.name)
            logging.shutdown()
            os._exit(1)
        if self._signalled_at is None:
            self._signalled_at = now
        self.stop(f"signal {sig.name}")

    # -- receiving ----------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            frame = await self._socket.recv()
            self._last_heard = time.monotonic()
            try:
                message = codec.decode(frame)
            except codec.NewerFields as exc:
                self._cannot_read(exc)
                continue
            except ProtocolError as exc:
                log.warning("ignoring malformed frame from the gateway: %s", exc)
                if (isinstance(exc, codec.Unreadable) and exc.name == "Request"
                        and exc.request_id is not None):
                    # Answered, so that its slot here comes back to the gateway at once.
                    self._send(Error(exc.request_id, ProtocolError.code,
                                     f"the worker cannot read this request: {exc}"))
                continue
            self._gateway_known = True
            try:
                self._handle(message)
            except Exception as exc:  # noqa: BLE001 - one message must not end the loop
                self._handle_failed(message, exc)

    def _cannot_read(self, exc: codec.NewerFields) -> None:
        """A newer gateway sent what this worker has no field for (a REQUEST's prompt_name,
        say): answer that request at once, rather than leave its client to its deadline."""
        if exc.name not in self._newer_logged:
            self._newer_logged.add(exc.name)
            log.error("the gateway sends %s that this worker cannot read: %s", exc.name, exc)
        if exc.name == "Request" and exc.request_id is not None:
            self._send(Error(exc.request_id, ProtocolError.code,
                             "the worker runs an older batchwire than the gateway and cannot "
                             "read this request; upgrade the workers to the gateway's release"))

    def _handle_failed(self, message: Message, exc: Exception) -> None:
        """A bug met while taking a message: its request (if any) gets the error, which says
        so, and the loop goes on for the others."""
        log.error("could not take %s: %s: %s", type(message).__name__, type(exc).__name__,
                  exc, exc_info=exc)
        if isinstance(message, Request):
            self._measuring.pop(message.request_id, None)
            error = classify_error(exc)
            self._send(Error(message.request_id, error.code, error.message))

    def _handle(self, message: Message) -> None:
        if isinstance(message, Request):
            now = time.monotonic()
            parameters = message.parameters
            if message.embed:
                # Embedding requests batch apart from token-level ones with equal parameters,
                # and apart from those with another prompt.
                parameters = {**parameters, EMBED_KEY: message.prompt_name or True}
            if text_chars(message.inputs) > BULK_TEXT_CHARS:
                self._measure_apart(message, parameters, now)
                return
            try:
                arrival = self.runner.arrive(message.inputs, parameters)
            except Exception as exc:  # noqa: BLE001 - the client gets the reason, we go on
                error = classify_error(exc)
                self._send(Error(message.request_id, error.code, error.message))
                return
            self._submit(message, parameters, now, *arrival)
        elif isinstance(message, Cancel):
            if message.request_id in self._measuring:
                self._measuring[message.request_id] = True
            else:
                self.batcher.cancel(message.request_id)
        elif isinstance(message, Disconnect):
            if self._stopping.is_set():
                # Leaving already (a signal) while the gateway shuts down: it reads no
                # DISCONNECT of ours any more, so none is worth waiting an answer for.
                # (The gateway's answer to our DISCONNECT comes only once it is sent, after
                # this loop has ended: _await_leave_ack reads that one.)
                self._handshake = False
            if self.config.exit_on_disconnect:
                self.stop("the gateway said DISCONNECT", handshake=False)
            else:
                # A gateway going away may come back on the same endpoint: say READY again.
                # What it sent us and had not been answered, it answered itself as it left:
                # computing it would only keep the next gateway's requests waiting.
                dropped = self.batcher.abandon_queued()
                for request_id in self._measuring:
                    self._measuring[request_id] = True
                log.info("gateway disconnected (%s); %d queued request(s) dropped; waiting for "
                         "it to return", message.reason, len(dropped) + len(self._measuring))
                self._gateway_known = False
        # Heartbeats need nothing beyond the _last_heard update.

    def _submit(self, message: Request, parameters: dict, now: float, tokens: int,
                inputs: Any) -> None:
        """Hand the request to the batcher, with its token count and the input to run (see
        PipelineRunner.arrive: a long text's start, when only that counts)."""
        self.batcher.submit(WorkItem(
            request_id=message.request_id,
            inputs=inputs,
            parameters=parameters,
            parameter_key=parameter_key(parameters),
            admitted_at=now - message.waited_ms / 1000.0,
            deadline=now + message.budget_ms / 1000.0,
            tokens=tokens,
        ))

    def _measure_apart(self, message: Request, parameters: dict, now: float) -> None:
        """Measure a long text on the bulk thread; it joins the batcher when that is done.
        Its deadline still counts from its arrival."""
        self._measuring[message.request_id] = False
        deadline = now + message.budget_ms / 1000.0

        def measure() -> tuple[int, Any]:
            # Queued behind other long texts, it may have been cancelled or run out of time
            # meanwhile: then not tokenized at all (the batcher answers an expired one).
            if self._measuring.get(message.request_id) or time.monotonic() > deadline:
                return 0, message.inputs
            return self.runner.arrive(message.inputs, parameters, bulk=True)

        future = asyncio.get_running_loop().run_in_executor(self._bulk, measure)
        future.add_done_callback(
            lambda done: self._measured(done, message, parameters, now))

    def _measured(self, future: asyncio.Future, message: Request, parameters: dict,
                  now: float) -> None:
        cancelled = self._measuring.pop(message.request_id, False)
        if self._stopping.is_set() or future.cancelled():
            return  # leaving: the gateway requeues what this worker did not answer
        if cancelled:
            error = Cancelled("the request was cancelled before it ran")
        elif future.exception() is not None:
            error = classify_error(future.exception())
        else:
            try:
                self._submit(message, parameters, now, *future.result())
                return
            except Exception as exc:  # noqa: BLE001 - answered, not lost in a callback
                log.error("could not take a measured request: %s: %s", type(exc).__name__,
                          exc, exc_info=exc)
                error = classify_error(exc)
        self._send(Error(message.request_id, error.code, error.message))

    # -- sending ------------------------------------------------------------------------
    def _send(self, message: Message) -> None:
        self._send_frame(codec.encode(message), type(message).__name__)

    def _send_frame(self, frame: bytes, kind: str) -> None:
        assert self._socket is not None
        # DEALER queues while the gateway is away; a full queue (HWM) would block, so send
        # without waiting and drop instead: the gateway treats silence as death and requeues.
        try:
            send_now(self._socket, [frame])
        except zmq.Again:
            if self._joining is not None and self._joining.failures:
                # Refused at the handshake, there is no connection to queue on: the refusal
                # is logged with its reason, and a line a second here would only bury it.
                log.debug("not connected to the gateway (refused); dropped a %s", kind)
            else:
                log.warning("send queue to the gateway is full; dropped a %s", kind)
        except zmq.ZMQError as exc:
            log.warning("could not send a %s to the gateway (%s); dropped it", kind,
                        exc.strerror)

    def _send_result(self, item: WorkItem, output: Any, stats: BatchStats) -> None:
        try:
            frame = result_frame(item, output, stats)
        except BatchwireError as exc:
            self._send_error(item, exc)
        except (TypeError, ValueError) as exc:  # output msgpack cannot carry
            self._send_error(item, classify_error(exc))
        else:
            self._send_frame(frame, "Result")

    def _send_error(self, item: WorkItem, error: BatchwireError) -> None:
        self._send(Error(item.request_id, error.code, error.message))

    def _limits(self) -> tuple[int, int]:
        return self.batcher.effective_batch_size, self.batcher.effective_batch_tokens

    def _ready(self) -> Ready:
        self._announced_limits = self._limits()
        return Ready(
            worker_id=self.config.worker_id,
            pid=os.getpid(),
            model=self.runner.model,
            task=self.runner.task,
            device=self.config.device,
            capacity=self.config.capacity,
            max_batch_size=self._announced_limits[0],
            host=socket.gethostname(),
            pooling=self.runner.pooling_description,
            max_batch_tokens=self._announced_limits[1],
            dtype=self.runner.loaded_dtype,
            max_seq_length=self.runner.embed_max_length or 0,
            prompts=self._prompts,
        )

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.config.parent_pid and os.getppid() != self.config.parent_pid:
                # The gateway ran in that parent: no one is left to answer a DISCONNECT.
                self.stop("the parent process is gone", handshake=False)
                return
            stuck_for = self.batcher.busy_for()
            if stuck_for > self.config.batch_timeout_s:
                # A model call cannot be interrupted from outside its thread; the only way
                # to free the device is to end the process. The gateway sees it die and
                # requeues this worker's requests; the supervisor starts a fresh one.
                log.critical("batch running for %.1f s, past --batch-timeout-s %.1f: exiting",
                             stuck_for, self.config.batch_timeout_s)
                logging.shutdown()
                os._exit(3)
            silent_for = time.monotonic() - self._last_heard
            silent = silent_for > MISSED_HEARTBEATS * interval
            if silent and self._gateway_known:
                # Once per outage (said in silence, a worker whose gateway had died looked
                # just like one serving): it announces itself every heartbeat until heard.
                log.warning("no word from the gateway at %s for %.1f s; announcing this "
                            "worker again until it answers", self.config.connect, silent_for)
                self._gateway_known = False
            if silent or not self._gateway_known or self._limits() != self._announced_limits:
                # READY again also when an out-of-memory error lowered the batch limits, so
                # the gateway's /info shows what this worker now runs.
                self._send(self._ready())
            else:
                self._send(Heartbeat())
