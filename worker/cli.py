"""``batchwire worker``: load the pipeline once, warm it up, then serve a gateway."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from protocol import curve, eventloop
from protocol.heap import freeze_startup_objects
from protocol.logs import setup_logging
from worker.config import (DEFAULT_CAPACITY_BATCHES, EXIT_CANNOT_LOAD, WorkerConfig,
                           check_connect, parse)

log = logging.getLogger("batchwire.worker")


def _leave_before_serving(signum: int, _frame: object) -> None:
    log.info("%s before the model was loaded and serving: exiting",
             signal.Signals(signum).name)
    logging.shutdown()
    # The load runs on a thread no one can interrupt; waiting for it is what the signal's
    # sender did not ask for. Nothing is held yet that the gateway would miss.
    os._exit(0)


def run(config: WorkerConfig) -> int:
    setup_logging(config.log_level, config.worker_id, config.log_format)
    # Before the imports and the load, which take seconds to minutes: as PID 1 (the worker
    # image) a signal with no handler is ignored, so `docker stop` during a load was dropped,
    # and the worker went on to join and serve. The service's handlers replace these.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _leave_before_serving)
    try:  # before torch's import and the model load: a malformed endpoint is known now
        check_connect(config.connect)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_LOAD
    from worker.runner import PipelineRunner
    from worker.service import WorkerService

    try:  # before the slow model load, like the key check below
        eventloop.uvloop_module(config.event_loop)
    except eventloop.EventLoopUnavailable as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_LOAD
    try:  # before the slow model load: a wrong key path should fail in a second
        if config.curve_server_key:
            curve.load_public(config.curve_server_key)
        if config.curve_secret_key:
            curve.load_keypair(config.curve_secret_key)
    except (OSError, ValueError) as exc:
        log.error("cannot read CURVE keys: %s", exc)
        return EXIT_CANNOT_LOAD
    try:
        runner = PipelineRunner(config.model, config.task, config.device, config.torch_threads,
                                trust_remote_code=config.trust_remote_code,
                                pooling=config.pooling, normalize=config.normalize,
                                max_seq_length=config.max_seq_length,
                                sparse_mlm_head=config.sparse_mlm_head,
                                stock_pipeline=config.stock_pipeline, dtype=config.dtype)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_LOAD
    # One inference thread: the pipeline is used from this thread only, loading included.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
    log.info("loading %s (%s) on %s", runner.model, runner.task, config.device)
    try:
        loaded = executor.submit(runner.load).result()
        unbatchable = runner.unbatchable
        if unbatchable and config.max_batch_size > 1:
            # Correct answers before fast ones: each input runs alone, as the plain
            # pipeline runs it.
            log.warning("%s: batched with others, a text would be answered otherwise than "
                        "alone, so each input runs alone (max batch size 1, not %d)",
                        unbatchable, config.max_batch_size)
            capacity = (DEFAULT_CAPACITY_BATCHES if config.capacity
                        == DEFAULT_CAPACITY_BATCHES * config.max_batch_size else config.capacity)
            # The default capacity follows the batch size: left at 4 batches of 16, the gateway
            # would hand it 64 inputs to queue out of sight, past --max-queue.
            config = dataclasses.replace(config, max_batch_size=1, capacity=capacity)
        warmed = executor.submit(runner.warm_up, config.max_batch_size).result()
    except Exception as exc:  # noqa: BLE001 - say what failed, in one line, and exit
        log.error("could not load %s (%s) on %s: %s: %s", runner.model, runner.task,
                  config.device, type(exc).__name__, exc)
        executor.shutdown(wait=False)
        return EXIT_CANNOT_LOAD
    log.info("loaded in %.1f s (%s weights), warmed up in %.2f s", loaded,
             runner.loaded_dtype or "no floating-point", warmed)
    freeze_startup_objects()
    try:
        return eventloop.run(WorkerService(config, runner, executor).run(), config.event_loop)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
