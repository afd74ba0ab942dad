"""The ceiling: the raw pipeline in one process on the benchmark's own inputs.

For each batch size (1, 2, 4, ..., 64) the pipeline runs over the workload's inputs, one
call per batch, for a bounded time; items/s per batch size and the best batch size are
reported. A batch of 1 is called as ``pipe(text)``, as the guide's server calls it; larger
batches as ``pipe(texts, batch_size=n)``. No server can beat the best of these on the same
machine: it is the model's own throughput, with no HTTP, no queues and no serialisation.

The JSON encoding of the outputs (``json.dumps``, as Starlette's ``JSONResponse`` does) is
timed separately and reported as ``items_per_s_with_json``: for token-level
feature-extraction it is a large part of what a JSON-answering server must pay per item.

Feature-extraction is called with ``return_tensors=True``: ``items_per_s`` is then the
model's own rate, without the pipeline's default ``tensor.tolist()`` (the strictest bar for
a server that ships arrays as raw bytes). The ``tolist()`` a list-answering server pays is
timed separately (``items_per_s_as_lists``: the pipeline's default call), and
``items_per_s_with_json`` counts ``tolist()`` + ``json.dumps``. Batched outputs are padded
to the batch's longest input; each item is cut back to its own tokens (a view, untimed
token counts computed once up front) so the JSON sizes are those of real answers.

``--pooling mean`` adds, inside the timed model call, the sentence-embedding pooling that
the embeddings workload's servers do: the mean of each input's token vectors, L2-normalised
(all-MiniLM-L6-v2's declared pooling; :func:`benchmarks.reference_server.mean_pool`).
With ``--max-seq-length N`` it embeds at most each input's first N tokens (the tokenizer's
own truncation), as sentence-transformers and batchwire do for a model that declares N.

Usage: ``python -m benchmarks.ceiling --model DIR --task fill-mask --workload varied``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Sequence

from worker.config import FLOAT_DTYPES

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def _json_dumps(outputs) -> int:
    # Starlette's JSONResponse.render: json.dumps(..., ensure_ascii=False, allow_nan=False,
    # indent=None, separators=(",", ":")).encode("utf-8")
    return len(json.dumps(outputs, ensure_ascii=False, allow_nan=False, indent=None,
                          separators=(",", ":")).encode("utf-8"))


def _tolist(outputs) -> list:
    return [out.tolist() if hasattr(out, "tolist") else out for out in outputs]


def measure(pipe, inputs: Sequence[str], *, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
            seconds_per_size: float = 2.0, max_items_per_size: int = 2048,
            with_json: bool = True, pooling: str | None = None,
            max_seq_length: int = 0) -> dict:
    """Items/s of ``pipe`` at each batch size, each bounded by time and item count."""
    tensors = getattr(pipe, "task", None) == "feature-extraction"
    if pooling and not tensors:
        raise ValueError("pooling needs a feature-extraction pipeline")
    if max_seq_length and not pooling:
        raise ValueError("max_seq_length truncates sentence embeddings: it needs pooling")
    # Sentence embeddings of at most max_seq_length tokens: every call tokenizes with this.
    cut = ({"tokenize_kwargs": {"truncation": True, "max_length": max_seq_length}}
           if max_seq_length else {})
    lengths = None
    if tensors:
        # Each input's own token count (untimed): to cut batch padding off, as a server must.
        lengths = [len(ids) for ids in
                   pipe.tokenizer(list(inputs), **cut.get("tokenize_kwargs", {}))["input_ids"]]
    if pooling:
        from benchmarks.reference_server import mean_pool
    results = []
    for bs in batch_sizes:
        def call(i: int, bs: int = bs):
            idx = [(i + k) % len(inputs) for k in range(bs)]
            batch = [inputs[j] for j in idx]
            if not tensors:
                if bs == 1:
                    return [pipe(batch[0])]
                return pipe(batch, batch_size=bs)
            if bs == 1:
                outs = [pipe(batch[0], return_tensors=True, **cut)]
            else:
                outs = pipe(batch, batch_size=bs, return_tensors=True, **cut)
            if pooling:
                return [mean_pool(out, lengths[j]) for out, j in zip(outs, idx)]
            return [out[:, :lengths[j]] for out, j in zip(outs, idx)]

        call(0)  # warm this shape once, untimed
        items = calls = 0
        model_s = json_s = lists_s = 0.0
        out_bytes = 0
        cpu0 = time.process_time()
        while True:
            t0 = time.perf_counter()
            outputs = call(items)
            t1 = time.perf_counter()
            if with_json:
                if tensors and not pooling:
                    outputs = _tolist(outputs)
                    lists_s += time.perf_counter() - t1
                t2 = time.perf_counter()
                out_bytes += _json_dumps(outputs)
                json_s += time.perf_counter() - t2
            model_s += t1 - t0
            items += bs
            calls += 1
            if model_s >= seconds_per_size or items >= max_items_per_size:
                break
        cpu_s = time.process_time() - cpu0
        row = {
            "batch_size": bs,
            "items": items,
            "calls": calls,
            "seconds": round(model_s, 4),
            "items_per_s": round(items / model_s, 3),
            "ms_per_call": round(model_s / calls * 1000.0, 3),
            "cpu_util": (round(cpu_s / (model_s + lists_s + json_s), 3)
                         if model_s + lists_s + json_s else None),
        }
        if with_json and tensors and not pooling:
            row["tolist_s"] = round(lists_s, 4)
            row["items_per_s_as_lists"] = round(items / (model_s + lists_s), 3)
        if with_json:
            row["json_s"] = round(json_s, 4)
            row["items_per_s_with_json"] = round(items / (model_s + lists_s + json_s), 3)
            row["json_bytes_per_item"] = round(out_bytes / items, 1)
        results.append(row)
        print(f"[ceiling] batch {bs:3d}: {row['items_per_s']:9.2f} items/s "
              f"({row['ms_per_call']:.1f} ms per call, {calls} calls)", file=sys.stderr)
    best = max(results, key=lambda r: r["items_per_s"])
    return {
        "batch_sizes": results,
        "best_batch_size": best["batch_size"],
        "best_items_per_s": best["items_per_s"],
        "unbatched_items_per_s": next((r["items_per_s"] for r in results if r["batch_size"] == 1),
                                      None),
        "best_items_per_s_with_json": (max(r["items_per_s_with_json"] for r in results)
                                       if with_json else None),
        "best_items_per_s_as_lists": (max(r["items_per_s_as_lists"] for r in results)
                                      if with_json and tensors and not pooling else None),
        "unbatched_items_per_s_with_json": next(
            (r.get("items_per_s_with_json") for r in results if r["batch_size"] == 1), None),
        "outputs": ("pooled: one L2-normalised mean vector per input" if pooling
                    else "tensors (return_tensors=True), trimmed to each input's tokens"
                    if tensors else "the pipeline's default Python objects"),
        "pooling": pooling,
        "max_seq_length": max_seq_length or None,
    }


def run(model: str, task: str, inputs: Sequence[str], sparse_head: bool = False,
        device: str | None = None, dtype: str | None = None, **kwargs) -> dict:
    import torch
    import transformers
    from transformers import pipeline

    from worker.runner import model_dtype, pipeline_dtype

    transformers.logging.set_verbosity_error()
    started = time.monotonic()
    pipe = pipeline(task=task, model=model, device=device, **pipeline_dtype(dtype))
    load_s = time.monotonic() - started
    if sparse_head:
        # batchwire's fill-mask head (worker/sparse_head.py), on the plain pipeline: the
        # ceiling of the model as batchwire runs it, not of the stock pipeline.
        from worker.sparse_head import install

        if install(pipe) is None:
            raise SystemExit("--sparse-head: the sparse head could not be installed")
    out = measure(pipe, inputs, **kwargs)
    out.update(model=model, task=task, sparse_head=sparse_head, inputs=len(inputs), load_s=round(load_s, 2),
               device=str(pipe.device), dtype=model_dtype(pipe.model),
               torch_threads=torch.get_num_threads(), torch=torch.__version__,
               transformers=transformers.__version__, python=platform.python_version(),
               cpu_count=os.cpu_count())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model directory")
    parser.add_argument("--task", required=True)
    parser.add_argument("--workload", default="varied", choices=("varied", "mixed"))
    parser.add_argument("--inputs", type=int, default=512, help="distinct inputs to cycle")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="limit for --workload mixed (default: the model's)")
    parser.add_argument("--min-tokens", type=int, default=None,
                        help="shortest input for --workload mixed, special tokens included "
                        "(default: 5 words)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    parser.add_argument("--seconds-per-size", type=float, default=2.0)
    parser.add_argument("--max-items-per-size", type=int, default=2048)
    parser.add_argument("--no-json", action="store_true", help="skip timing json.dumps")
    parser.add_argument("--pooling", choices=("none", "mean"), default="none",
                        help="feature-extraction: pool each output to one sentence embedding "
                        "(mean, then L2-normalised) inside the timed call")
    parser.add_argument("--max-seq-length", type=int, default=0,
                        help="with --pooling mean: embed at most each input's first this-many "
                        "tokens, as sentence-transformers does (0: all of them)")
    parser.add_argument("--sparse-head", action="store_true",
                        help="fill-mask: compute the vocabulary logits at mask tokens only, as a "
                        "batchwire worker does by default")
    parser.add_argument("--device", default=None,
                        help="the pipeline's device, e.g. cuda (default: its own, the CPU); "
                        "outputs come back to the CPU inside the timed call, as a server's must")
    parser.add_argument("--dtype", default=None, choices=FLOAT_DTYPES,
                        help="the model's dtype (default: the checkpoint's), as batchwire's "
                        "--dtype")
    parser.add_argument("--json-out", default=None, help="write the report here (else stdout)")
    args = parser.parse_args(argv)

    from benchmarks.workloads import make_inputs

    max_tokens = args.max_tokens
    if max_tokens is None:
        from benchmarks.models import _max_tokens
        from pathlib import Path

        max_tokens = _max_tokens(Path(args.model))
    inputs = make_inputs(args.workload, args.inputs, task=args.task, max_tokens=max_tokens,
                         min_tokens=args.min_tokens)
    report = run(args.model, args.task, inputs, sparse_head=args.sparse_head, device=args.device,
                 dtype=args.dtype,
                 batch_sizes=[int(x) for x in args.batch_sizes.split(",") if x.strip()],
                 seconds_per_size=args.seconds_per_size,
                 max_items_per_size=args.max_items_per_size, with_json=not args.no_json,
                 pooling=None if args.pooling == "none" else args.pooling,
                 max_seq_length=args.max_seq_length)
    report["workload"] = args.workload
    if args.workload == "mixed":
        report["input_tokens"] = [args.min_tokens, max_tokens]
    text = json.dumps(report, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
