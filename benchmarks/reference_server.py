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

Token-level feature-extraction runs exactly as above: ``pipe(string)`` returns the nested
float lists ``[1, tokens, hidden]`` and ``JSONResponse`` writes them with ``json.dumps``.
(In the batching variant the pipeline pads every item of a batch to the batch's longest
input and answers the padding rows too: that is what the guide's code does, unchanged.)

``--pooling mean`` is NOT in the guide, which has no sentence embeddings. It is the
faithful equivalent for the benchmark's embeddings workload, with the guide's architecture
otherwise unchanged (same queue, same loop task, the pipeline on the event loop, same
``JSONResponse``): the loop task calls the pipeline with ``return_tensors=True``,
mean-pools the token vectors of each input (over its own tokens only: in a batch, the
padding rows are dropped first, which is what sentence-transformers' attention-mask
weighted mean does), L2-normalises the mean (all-MiniLM-L6-v2's declared pooling: mean,
then Normalize), and answers the vector as a JSON list of ``hidden`` floats. Pooling
tensors, not the default nested lists, is what anyone writing this by hand would do; it
costs the baseline less than ``tolist()`` of every token would. ``--max-seq-length N``
embeds at most an input's first N tokens (the tokenizer's own truncation), as
sentence-transformers and batchwire do for a model that declares N (256 for
all-MiniLM-L6-v2): the benchmark passes the model's declared length, so every server
embeds the same tokens.

Usage: ``python -m benchmarks.reference_server --model DIR --task fill-mask --port 8000
[--batching] [--pooling mean]``, then ``curl -X POST -d "test [MASK]" http://127.0.0.1:8000/``.
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
POOLING: str | None = None  # None (the guide) or "mean" (mean + L2 normalise)
#: With POOLING: the tokenizer arguments that cut an input at --max-seq-length ({}: none).
TRUNCATION: dict = {}
#: Not in the guide, which runs on the CPU: the GPU section runs every server on the GPU.
DEVICE: str | None = None
#: Not in the guide either: a run comparing every server in bfloat16 (say) sets it for all.
DTYPE: str | None = None


def _pipeline():
    import torch
    from transformers import pipeline

    dtype = {"dtype": getattr(torch, DTYPE)} if DTYPE else {}
    return pipeline(task=TASK, model=MODEL, device=DEVICE, **dtype)


# -- --pooling mean: not in the guide (see the module docstring) ------------------------------
def mean_pool(tokens, n_tokens: int | None = None) -> list[float]:
    """``[1, tokens, hidden]`` tensor -> the L2-normalised mean of its first ``n_tokens``
    rows (all of them by default), as a list of floats."""
    import torch

    rows = tokens[0] if n_tokens is None else tokens[0, :n_tokens]
    return torch.nn.functional.normalize(rows.float().mean(dim=0), dim=0).tolist()


def _pooled(pipe, string):
    return mean_pool(pipe(string, return_tensors=True, tokenize_kwargs=TRUNCATION))


def _pooled_batch(pipe, strings, batch_size):
    # Batched outputs are padded to the batch's longest input: pool each over its own tokens.
    lengths = [len(ids) for ids in pipe.tokenizer(strings, **TRUNCATION)["input_ids"]]
    outs = pipe(strings, batch_size=batch_size, return_tensors=True,
                tokenize_kwargs=TRUNCATION)
    return [mean_pool(out, n) for out, n in zip(outs, lengths)]


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
        out = _pooled(pipe, string) if POOLING else pipe(string)
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
            outs = [_pooled(pipe, strings[0]) if POOLING else pipe(strings[0])]
        elif POOLING:
            outs = _pooled_batch(pipe, strings, len(strings))
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
    global MODEL, TASK, MAX_BATCH_SIZE, POOLING, DEVICE, DTYPE, TRUNCATION
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
    parser.add_argument("--pooling", choices=("none", "mean"), default="none",
                        help="NOT in the guide: answer one sentence embedding per input, the "
                        "mean of its token vectors, L2-normalised (feature-extraction only)")
    parser.add_argument("--max-seq-length", type=int, default=0,
                        help="NOT in the guide: with --pooling, embed at most an input's first "
                        "this-many tokens, as sentence-transformers does (0: all of them)")
    parser.add_argument("--device", default=None,
                        help="NOT in the guide: the pipeline's device, e.g. cuda (default: "
                        "the pipeline's own, the CPU)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="NOT in the guide: the model's dtype (default: the checkpoint's)")
    parser.add_argument("--access-log", action="store_true",
                        help="uvicorn's per-request access log (on in `uvicorn server:app`)")
    args = parser.parse_args(argv)
    MODEL, TASK, MAX_BATCH_SIZE, DEVICE = args.model, args.task, args.max_batch_size, args.device
    DTYPE = args.dtype
    POOLING = None if args.pooling == "none" else args.pooling
    if POOLING and TASK not in (None, "feature-extraction"):
        parser.error("--pooling needs --task feature-extraction")
    if args.max_seq_length and not POOLING:
        parser.error("--max-seq-length needs --pooling mean")
    TRUNCATION = ({"truncation": True, "max_length": args.max_seq_length}
                  if args.max_seq_length > 0 else {})

    import uvicorn

    uvicorn.run(create_app(args.batching), host=args.host, port=args.port,
                access_log=args.access_log, log_level="info" if args.access_log else "warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
