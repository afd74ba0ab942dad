"""The baseline: the server of the transformers guide "Using pipelines for a webserver".

Written as the guide writes it: Starlette + uvicorn, one ``asyncio.Queue``, one loop task
that owns the pipeline, and ``POST /`` reading the raw body and answering
``JSONResponse(out)``. As in the guide, the pipeline is created inside the loop task and
``pipe(string)`` runs ON the event loop: while it computes, the server neither accepts nor
answers anything (the guide's "Blocking the main thread" section says so).

``--batching`` swaps in the guide's "Dynamic batching" loop: after the first item, drain the
queue with a 1 ms ``wait_for`` and call the pipeline once on the list.

Deliberate differences from the guide's text, none of which changes its architecture:

* model, task and port come from flags (the guide hard-codes google-bert/bert-base-uncased,
  and is started with ``uvicorn server:app``);
* Starlette 1.x removed ``@app.on_event("startup")``; the same start-up code runs from a
  ``lifespan`` context manager;
* uvicorn's per-request access log is off by default (``--access-log`` turns it on), so the
  baseline is not charged for logging that batchwire does not do;
* the batching loop: the guide's sketch reads the first item and then overwrites it in the
  drain loop without appending it (its first request would never be answered), so the first
  item is appended here; and a batch of one is sent as ``pipe(string)``, because pipelines
  unwrap a one-item list (fill-mask would hand the one waiter its 5 candidates one by one in
  ``zip``). The guide's sketch has no batch size limit ("usually not a great idea", it
  says); ``--max-batch-size`` adds one (0, the default, keeps none). The benchmark runner
  passes 64, the largest batch its ceiling measures: unbounded, 128 fill-mask inputs of
  512 tokens would make one 8 GB logits tensor.

Usage: ``python -m benchmarks.reference_server --model DIR --task fill-mask --port 8000
[--batching]``, then ``curl -X POST -d "test [MASK]" http://127.0.0.1:8000/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Sequence

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

# Set by main() before uvicorn starts; the guide writes them inline in server_loop.
MODEL: str | None = None
TASK: str | None = None


def _pipeline():
    from transformers import pipeline

    return pipeline(task=TASK, model=MODEL)


# -- the guide's server ---------------------------------------------------------------------
async def homepage(request):
    payload = await request.body()
    string = payload.decode("utf-8")
    response_q = asyncio.Queue()
    await request.app.model_queue.put((string, response_q))
    output = await response_q.get()
    return JSONResponse(output)


async def server_loop(q):
    pipe = _pipeline()
    while True:
        (string, response_q) = await q.get()
        out = pipe(string)
        await response_q.put(out)


# -- the guide's "Dynamic batching" variant ------------------------------------------------
MAX_BATCH_SIZE = 0  # 0: no limit, as in the guide


async def batching_server_loop(q):
    pipe = _pipeline()
    while True:
        (string, rq) = await q.get()
        strings = [string]
        queues = [rq]
        while not MAX_BATCH_SIZE or len(strings) < MAX_BATCH_SIZE:
            try:
                (string, rq) = await asyncio.wait_for(q.get(), timeout=0.001)  # 1ms
            except asyncio.exceptions.TimeoutError:
                break
            strings.append(string)
            queues.append(rq)
        if len(strings) == 1:
            outs = [pipe(strings[0])]
        else:
            outs = pipe(strings, batch_size=len(strings))
        for rq, out in zip(queues, outs):
            await rq.put(out)


def create_app(batching: bool = False) -> Starlette:
    loop_fn = batching_server_loop if batching else server_loop

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # The guide's @app.on_event("startup") body.
        q = asyncio.Queue()
        app.model_queue = q
        task = asyncio.create_task(loop_fn(q))
        yield
        task.cancel()

    return Starlette(routes=[Route("/", homepage, methods=["POST"])], lifespan=lifespan)


def main(argv: Sequence[str] | None = None) -> int:
    global MODEL, TASK, MAX_BATCH_SIZE
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reference_server",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model directory (or hub id)")
    parser.add_argument("--task", default=None, help="pipeline task, e.g. fill-mask")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--batching", action="store_true",
                        help="the guide's dynamic batching loop (1 ms drain)")
    parser.add_argument("--max-batch-size", type=int, default=0,
                        help="with --batching: most requests per pipeline call (0: no limit)")
    parser.add_argument("--access-log", action="store_true",
                        help="uvicorn's per-request access log (on in `uvicorn server:app`)")
    args = parser.parse_args(argv)
    MODEL, TASK, MAX_BATCH_SIZE = args.model, args.task, args.max_batch_size

    import uvicorn

    uvicorn.run(create_app(args.batching), host=args.host, port=args.port,
                access_log=args.access_log, log_level="info" if args.access_log else "warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
