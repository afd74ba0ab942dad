"""Run the benchmark suite: every workload on every server, plus the ceilings.

``python -m benchmarks.run`` (``make bench``) does, for each workload:

1. the ceiling: the raw pipeline in its own process on the workload's inputs at batch sizes
   1..64 (:mod:`benchmarks.ceiling`);
2. for each server (batchwire, the guide's reference server, the guide's batching variant):
   start it as a subprocess on a free 127.0.0.1 port, wait (with a deadline) until it has
   answered a real request, then for each concurrency level run a short untimed warm-up
   and a measured closed-loop point (:mod:`benchmarks.loadgen`), bounded by ``--duration``
   and ``--max-requests``; then stop it (SIGTERM, wait, SIGKILL).

A "server" in the results is a server process seen by one kind of client. ``batchwire``
and ``batchwire-msgpack`` are the same batchwire process (started once per workload),
asked for JSON and for msgpack (``Accept: application/msgpack``) answers. Every answer is
parsed by the load generator as a client would (``json.loads``; ``msgpack.unpackb`` and
``numpy.frombuffer`` for arrays) and its shape checked, so the client's side of each
format is paid alike; a 200 that does not parse or check counts as ``bad-answer``.

Batching variants are batchwire processes of their own, started with the run's batchwire
flags plus the variant's, and measured on the same inputs as ``batchwire`` (JSON answers):

* ``batchwire-count``: count-only batching, ``--max-batch-tokens 0 --no-length-buckets``
  (no token budget, no length buckets), against ``batchwire``'s token-aware default
  (issue 7). The ``*-mixed400`` workloads (5-400 tokens, run only when named) have it by
  default; any other workload when ``--servers`` names it.
* ``--bw-variant NAME='FLAGS'`` (repeatable) adds a row ``batchwire-NAME`` to every workload,
  e.g. ``--bw-variant tok2k='--max-batch-tokens 2048'`` to compare token budgets.

Where a workload has ``batchwire`` and ``batchwire-count``, the report adds a table of the
two (and the guide) point by point: throughput, p50, p99 and their ratios.

Workload kinds (``Workload.answer``):

* ``fill-mask``: raw text to ``POST /`` on every server;
* ``tokens``: token-level feature-extraction, raw text to ``POST /``; answers are
  ``[1, tokens, hidden]`` float arrays (batchwire JSON, batchwire msgpack, the guide's JSON);
* ``embeddings``: one pooled vector per input. batchwire: ``POST /v1/embeddings`` with
  ``{"input": text}`` (pooled as the model declares: mean + normalize for
  all-MiniLM-L6-v2); the guide's servers, which have no pooling, run with
  ``--pooling mean`` (:mod:`benchmarks.reference_server`: the same pooling after the
  pipeline, the guide's architecture otherwise), and the ceiling pools alike.

Once per run the load generator's own ceiling is measured against a trivial aiohttp server.
Everything lands in ``<out>/results.json``; ``<out>/report.md`` holds docs-ready tables and
``<out>/*.png`` the plots. Server logs and raw ceiling reports go to ``<out>/raw/``.

``--quick`` is the end-to-end check the test suite runs: the tiny model only (fill-mask on
every server at concurrency 1 and 8, and one token-level feature-extraction point at
concurrency 8 through batchwire's JSON and msgpack answers), about a second per point.

CPU accounting per point (all in cores, i.e. CPU seconds per wall second): the server's
process tree, the load generator, and the rest of the machine ("others": anything else
running on the box, which makes a point less trustworthy).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from benchmarks import interleaved, loadgen, paired
from benchmarks.profiler import PointProfiler, ProfilerUnavailable, py_spy
from benchmarks.procs import (
    HOST,
    REPO_ROOT,
    ServerFailed,
    ServerProcess,
    bench_env,
    die_with_parent,
    free_port,
    machine_cpu_seconds,
)
from gateway.config import is_device
from worker.config import FLOAT_DTYPES

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
#: Result rows: (server process, answer format the client asks for).
SERVER_SPECS = {
    "batchwire": ("batchwire", "json"),
    "batchwire-msgpack": ("batchwire", "msgpack"),
    "batchwire-count": ("batchwire-count", "json"),
    "guide": ("guide", "json"),
    "guide-batching": ("guide-batching", "json"),
}
SERVERS = tuple(SERVER_SPECS)
SERVER_LABELS = {
    "batchwire": "batchwire",
    "batchwire-msgpack": "batchwire, msgpack answers",
    "batchwire-count": "batchwire, count-only batching (no token budget, no length buckets)",
    "guide": "guide reference (Starlette, per request)",
    "guide-batching": "guide batching variant (1 ms drain)",
}
#: Batchwire batching variants: process name -> the flags added after the run's batchwire
#: flags (argparse keeps the last of a repeated flag, so these win over --bw-args).
BW_VARIANTS = {"batchwire-count": ("--max-batch-tokens", "0", "--no-length-buckets")}
JSON_ROWS = ("batchwire", "guide", "guide-batching")
#: What the paired C=1 comparison compares, and --interleaved by default.
PAIR_ROWS = ("batchwire", "guide")
#: Where answers are arrays, batchwire is also asked for msgpack.
ARRAY_ROWS = ("batchwire", "batchwire-msgpack", "guide", "guide-batching")
#: Issue 7's rows: token-aware (batchwire's default) and count-only batching, and the guide.
TOKEN_ROWS = ("batchwire", "batchwire-count", "guide", "guide-batching")
MIXED400_TOKENS = (5, 400)


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # a key of benchmarks.models
    shape: str  # varied | mixed
    description: str
    #: fill-mask | tokens (token-level feature-extraction) | embeddings (pooled vectors)
    answer: str = "fill-mask"
    #: The result rows this workload runs by default (msgpack only where answers are
    #: arrays). ``--servers`` may also name the batchwire batching variants.
    servers: tuple[str, ...] = JSON_ROWS
    #: ``mixed`` only: (shortest, longest) input in tokens, special tokens included
    #: (None: 5 words up to the model's limit).
    tokens: tuple[int, int] | None = None

    def input_tokens(self, model_max_tokens: int) -> tuple[int | None, int]:
        """(min_tokens, max_tokens) for :func:`benchmarks.workloads.make_inputs`."""
        if self.tokens is None:
            return None, model_max_tokens
        lo, hi = self.tokens
        if hi > model_max_tokens:
            raise SystemExit(f"{self.name}: {hi} tokens is past the model's limit "
                             f"({model_max_tokens})")
        return lo, hi


WORKLOADS = {
    w.name: w
    for w in (
        Workload("fill-mask-minilm-varied", "minilm-fill-mask", "varied",
                 "fill-mask (the guide's task) on a MiniLM-sized BERT, sentences of 5-40 words"),
        Workload("fill-mask-minilm-mixed", "minilm-fill-mask", "mixed",
                 "fill-mask on a MiniLM-sized BERT, lengths spread up to the 512-token limit"),
        Workload("embeddings-minilm-varied", "minilm-features", "varied",
                 "sentence embeddings (all-MiniLM-L6-v2, mean pooling + L2 normalisation): "
                 "one 384-float vector per input, sentences of 5-40 words",
                 answer="embeddings"),
        Workload("embeddings-minilm-mixed", "minilm-features", "mixed",
                 "sentence embeddings (all-MiniLM-L6-v2), lengths spread up to the "
                 "512-token limit", answer="embeddings"),
        Workload("feature-extraction-minilm-varied", "minilm-features", "varied",
                 "token-level feature-extraction (all-MiniLM-L6-v2): [1, tokens, 384] float "
                 "answers, sentences of 5-40 words", answer="tokens", servers=ARRAY_ROWS),
        Workload("feature-extraction-minilm-mixed", "minilm-features", "mixed",
                 "token-level feature-extraction (all-MiniLM-L6-v2), lengths spread up to "
                 "the 512-token limit", answer="tokens", servers=ARRAY_ROWS),
        # Issue 7 (token-aware batching): lengths spread evenly over 5-400 tokens, where
        # padding a batch to its longest input costs the most; batchwire's token-aware default
        # against its count-only batching, on the same inputs.
        Workload("fill-mask-minilm-mixed400", "minilm-fill-mask", "mixed",
                 "fill-mask on a MiniLM-sized BERT, lengths spread evenly over 5-400 tokens: "
                 "token-aware against count-only batching (issue 7)",
                 servers=TOKEN_ROWS, tokens=MIXED400_TOKENS),
        Workload("embeddings-minilm-mixed400", "minilm-features", "mixed",
                 "sentence embeddings (all-MiniLM-L6-v2), lengths spread evenly over 5-400 "
                 "tokens: token-aware against count-only batching (issue 7)",
                 answer="embeddings", servers=TOKEN_ROWS, tokens=MIXED400_TOKENS),
        # The GPU section (--gpu): a bert-base-sized model, where batching pays far more than
        # on a CPU. Opt-in: on a 2-core CPU a bert-base answers a few dozen requests a second.
        Workload("fill-mask-bertbase-varied", "bert-base-fill-mask", "varied",
                 "fill-mask on a bert-base-sized BERT (random weights), sentences of 5-40 words"),
        Workload("fill-mask-bertbase-mixed", "bert-base-fill-mask", "mixed",
                 "fill-mask on a bert-base-sized BERT, lengths spread up to the 512-token limit"),
        Workload("embeddings-bertbase-varied", "bert-base-features", "varied",
                 "pooled embeddings (mean + L2 normalisation) of a bert-base-sized BERT: one "
                 "768-float vector per input, sentences of 5-40 words", answer="embeddings"),
        Workload("feature-extraction-bertbase-varied", "bert-base-features", "varied",
                 "token-level feature-extraction on a bert-base-sized BERT: [1, tokens, 768] "
                 "float answers, sentences of 5-40 words", answer="tokens", servers=ARRAY_ROWS),
        Workload("fill-mask-tiny-varied", "tiny-fill-mask", "varied",
                 "the tiny random fill-mask model: the servers' own overhead"),
        Workload("feature-extraction-tiny-varied", "tiny-features", "varied",
                 "token-level feature-extraction on the tiny random model ([1, tokens, 32] "
                 "floats): the answer path's own overhead", answer="tokens", servers=ARRAY_ROWS),
    )
}
#: Earlier names, still accepted by --workloads.
WORKLOAD_ALIASES = {
    "features-minilm-varied": "feature-extraction-minilm-varied",
    "features-minilm-mixed": "feature-extraction-minilm-mixed",
}
#: Issue 7's comparison runs only when named: at 5-400 tokens a CPU answers a few requests a
#: second, so its points need longer durations and grace than the suite's defaults (see
#: docs/benchmarks.md for the command).
BERTBASE_WORKLOADS = ("fill-mask-bertbase-varied", "fill-mask-bertbase-mixed",
                      "embeddings-bertbase-varied", "feature-extraction-bertbase-varied")
#: --gpu's default: two workloads fit one 10-minute device call (the others by name).
GPU_WORKLOADS = ("fill-mask-bertbase-varied", "embeddings-bertbase-varied")
OPT_IN_WORKLOADS = ("feature-extraction-tiny-varied", "fill-mask-minilm-mixed400",
                    "embeddings-minilm-mixed400", *BERTBASE_WORKLOADS)
DEFAULT_WORKLOADS = tuple(w for w in WORKLOADS if w not in OPT_IN_WORKLOADS)
QUICK_WORKLOADS = ("fill-mask-tiny-varied", "feature-extraction-tiny-varied")
#: --quick trims its token-level check to one batchwire process (JSON and msgpack answers)
#: at the highest concurrency: one server start instead of three keeps --quick near a minute.
QUICK_TRIM = {"feature-extraction-tiny-varied": ("batchwire", "batchwire-msgpack")}


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _csv_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model, concurrency 1 and 8, ~1 s points: an end-to-end check")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU section: two bert-base workloads (fill-mask and embeddings; "
                   "the other bert-base ones by name) on --device cuda:0 at concurrency 1,64,256, "
                   "ceiling batch sizes 1..256 (each default still overridable)")
    p.add_argument("--device", default=None,
                   help="where every server and the ceiling run the model: cpu or cuda:N "
                   "(default cpu; --gpu: cuda:0). batchwire gets it as serve --devices")
    p.add_argument("--dtype", default=None, choices=FLOAT_DTYPES,
                   help="the model's dtype in every server and the ceiling alike (batchwire's "
                   "--dtype; the guide's servers and the ceiling load the pipeline with it); "
                   "default: the checkpoint's. A batchwire row alone in another dtype: "
                   "--bw-variant bf16='--dtype bfloat16'")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument("--workloads", type=_csv, default=None,
                   help=f"comma list of {', '.join(WORKLOADS)} (default: all but "
                   f"{', '.join(OPT_IN_WORKLOADS)}; --quick: {', '.join(QUICK_WORKLOADS)})")
    p.add_argument("--servers", type=_csv, default=None,
                   help=f"comma list of {', '.join(SERVERS)} (default: each workload's own "
                   "rows: batchwire-msgpack only where answers are arrays, batchwire-count "
                   "only on the *-mixed400 workloads). A named row runs on every workload "
                   "that can have it: batchwire-count on all, batchwire-msgpack where "
                   "answers are arrays")
    p.add_argument("--concurrency", type=_csv_ints, default=None,
                   help="closed-loop client counts (default 1,8,32,64,128; --quick 1,8)")
    p.add_argument("--rates", type=_csv_floats, default=[],
                   help="also run open-loop points at these request rates (per second)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per measured point (default 10; --quick 1)")
    p.add_argument("--warmup", type=float, default=None,
                   help="untimed seconds before each point (default 2; --quick 0.3)")
    p.add_argument("--max-requests", type=int, default=None,
                   help="request cap per point (default 20000; --quick 300)")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds after a point's duration before outstanding requests are "
                   "cancelled (default 15; --quick 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    p.add_argument("--inputs", type=int, default=512, help="distinct inputs per workload")
    p.add_argument("--no-ceiling", action="store_true", help="skip the raw-pipeline ceiling")
    p.add_argument("--batch-sizes", type=_csv_ints, default=None,
                   help="ceiling batch sizes (default 1,2,4,...,64; --gpu up to 256)")
    p.add_argument("--ceiling-seconds", type=float, default=None,
                   help="ceiling seconds per batch size (default 3; --quick 0.2)")
    p.add_argument("--no-loadgen-ceiling", action="store_true",
                   help="skip measuring the load generator against a trivial server")
    p.add_argument("--ready-timeout", type=float, default=None,
                   help="seconds a server may take to answer its first request "
                   "(default 300; --quick 90)")
    p.add_argument("--keep-going", action=argparse.BooleanOptionalAction, default=None,
                   help="after a server fails, go on with the others (default: yes; "
                   "--quick: no, stop at the first failure)")
    p.add_argument("--bw-workers", type=int, default=1, help="batchwire --workers")
    p.add_argument("--bw-max-batch-size", type=int, default=0,
                   help="batchwire --max-batch-size (0: batchwire's own device default)")
    p.add_argument("--bw-max-delay-ms", type=float, default=2.0, help="batchwire --max-delay-ms")
    p.add_argument("--bw-max-queue", type=int, default=4096, help="batchwire --max-queue")
    p.add_argument("--bw-args", default="",
                   help="extra batchwire serve flags (one string), for every batchwire process "
                   "(batching variants included)")
    p.add_argument("--bw-variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="add a result row batchwire-NAME on every workload: a batchwire process "
                   "of its own with the batchwire flags plus FLAGS (one string), e.g. "
                   "tok2k='--max-batch-tokens 2048'. Repeatable. (batchwire-count is built in: "
                   f"{' '.join(BW_VARIANTS['batchwire-count'])})")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads for every server and the ceiling alike "
                   "(OMP_NUM_THREADS, and batchwire's --torch-threads); 0: each one's default "
                   "(torch: one per core; batchwire: the cores divided among its workers). "
                   "Default 0; --quick 1 (the tiny model gains nothing from threads)")
    p.add_argument("--guide-max-batch-size", type=int, default=64,
                   help="batch cap of the guide's batching variant (0: none, as in the guide)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy every server process (and each batchwire worker) during each "
                   "measured point; summaries in results.json and report.md, collapsed "
                   "stacks in raw/ (needs py-spy)")
    p.add_argument("--profile-rate", type=int, default=100,
                   help="py-spy samples per second with --profile")
    p.add_argument("--paired-c1", action=argparse.BooleanOptionalAction, default=None,
                   help="per workload, also compare batchwire and the guide at C=1 with both "
                   "up at once and the same inputs sent to each in turn "
                   "(benchmarks/paired.py): the machine's drift between two servers run one "
                   "after the other is larger than the difference measured (default: yes; "
                   "--quick and --gpu: no)")
    p.add_argument("--paired-inputs", type=int, default=100,
                   help="distinct inputs in the paired C=1 comparison")
    p.add_argument("--paired-rounds", type=int, default=3,
                   help="counted passes over them, after one warm-up pass")
    p.add_argument("--interleaved", type=_csv_ints, default=[],
                   help="per workload, also load batchwire and the guide at these "
                   "concurrencies (e.g. 64) with both up at once, in alternating slices "
                   "(benchmarks/interleaved.py): a throughput ratio the machine's drift "
                   "cannot skew (default: none)")
    p.add_argument("--interleaved-servers", type=_csv, default=list(PAIR_ROWS),
                   help="the two result rows to interleave: the ratio is the first's "
                   "throughput over the second's (e.g. batchwire,batchwire-count, or a "
                   "--bw-variant row)")
    p.add_argument("--interleaved-rounds", type=int, default=8,
                   help="rounds of one slice per server, alternating who goes first (at C=64 "
                   "on a 2-core VM one server's slices vary by about 25 %% from one to the "
                   "next: 8 rounds gave an interval of +-0.03 on a ratio near 1)")
    p.add_argument("--interleaved-slice", type=float, default=10.0,
                   help="seconds per slice (several times the latency at that concurrency)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--note", default="", help="free text recorded in results.json and report.md")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    quick, gpu = args.quick, args.gpu
    if quick and gpu:
        raise SystemExit("--quick and --gpu are different runs: pick one")
    default_workloads = args.workloads is None
    defaults = {
        "workloads": list(QUICK_WORKLOADS if quick else GPU_WORKLOADS if gpu
                          else DEFAULT_WORKLOADS),
        "concurrency": [1, 8] if quick else [1, 64, 256] if gpu else [1, 8, 32, 64, 128],
        "device": "cuda:0" if gpu else "cpu",
        "batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256] if gpu else [1, 2, 4, 8, 16, 32, 64],
        "duration": 1.0 if quick else 10.0,
        "warmup": 0.3 if quick else 2.0,
        "max_requests": 300 if quick else 200_000 if gpu else 20_000,
        "grace": 5.0 if quick else 15.0,
        "ceiling_seconds": 0.2 if quick else 3.0,
        "ready_timeout": 90.0 if quick else 300.0,
        "keep_going": not quick,
        "torch_threads": 1 if quick else 0,
        "paired_c1": not (quick or gpu),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not is_device(args.device):
        raise SystemExit(f"--device {args.device!r}: use cpu or cuda:N, as batchwire's --devices")
    if quick:
        args.ceiling_max_items = 64
        args.loadgen_ceiling_duration = 1.0
        args.inputs = min(args.inputs, 128)
    else:
        args.ceiling_max_items = 4096
        args.loadgen_ceiling_duration = 3.0
    # Only the default quick set is trimmed; naming workloads with --quick runs them whole.
    args.trim = QUICK_TRIM if quick and default_workloads else {}
    args.workloads = [WORKLOAD_ALIASES.get(w, w) for w in args.workloads]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    args.variants = dict(BW_VARIANTS)
    args.user_variants = []
    for spec in args.bw_variant:
        name, sep, flags = spec.partition("=")
        row = f"batchwire-{name.strip()}"
        if not sep or not name.strip() or not name.strip().replace("-", "").isalnum():
            raise SystemExit(f"--bw-variant {spec!r}: use NAME=FLAGS, NAME of letters, digits "
                             "and dashes")
        if row in SERVER_SPECS or row in args.variants:
            raise SystemExit(f"--bw-variant {spec!r}: row {row} already exists")
        args.variants[row] = tuple(shlex.split(flags))
        args.user_variants.append(row)
    if args.servers is not None:
        known = (*SERVERS, *args.user_variants)
        unknown = [s for s in args.servers if s not in known]
        if unknown:
            raise SystemExit(f"unknown server(s) {unknown}; known: {', '.join(known)}")
    if args.profile:
        try:
            py_spy()
        except ProfilerUnavailable as exc:
            raise SystemExit(str(exc)) from None
    if args.paired_inputs < 1 or args.paired_rounds < 1:
        raise SystemExit("--paired-inputs and --paired-rounds must be at least 1")
    if (min(args.interleaved, default=1) < 1 or args.interleaved_rounds < 1
            or args.interleaved_slice <= 0):
        raise SystemExit("--interleaved concurrencies, --interleaved-rounds and "
                         "--interleaved-slice must be positive")
    known = (*SERVERS, *args.user_variants)
    pair = args.interleaved_servers
    if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(known):
        raise SystemExit(f"--interleaved-servers {','.join(pair)}: name two different rows "
                         f"of {', '.join(known)}")
    if min(args.concurrency, default=1) < 1 or args.duration <= 0 or args.max_requests < 1:
        raise SystemExit("concurrency, --duration and --max-requests must be positive")
    return args


# -- machine facts --------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*argv: str) -> str | None:
    try:
        out = subprocess.run(["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _gpus() -> list[str] | None:
    """The GPUs nvidia-smi lists (name and memory), without importing torch here; None
    where there is no nvidia-smi or it fails."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def machine_facts() -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    dirty = _git("status", "--porcelain")
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in (
            "torch", "transformers", "tokenizers", "numpy", "aiohttp", "starlette", "uvicorn",
            "pyzmq", "msgpack", "orjson", "uvloop", "httptools", "matplotlib", "batchwire")},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpus": _gpus(),
    }


# -- servers -------------------------------------------------------------------------------
def subprocess_env(args: argparse.Namespace) -> dict[str, str]:
    if args.torch_threads > 0:
        n = str(args.torch_threads)
        return bench_env({"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n})
    return bench_env()


def is_batchwire(process: str, args: argparse.Namespace) -> bool:
    return process == "batchwire" or process in args.variants


def row_spec(name: str, args: argparse.Namespace) -> tuple[str, str]:
    """(process, answer format) of result row ``name``."""
    if name in SERVER_SPECS:
        return SERVER_SPECS[name]
    return name, "json"  # a --bw-variant row: its own batchwire process


def row_label(name: str, args: argparse.Namespace) -> str:
    if name in SERVER_LABELS:
        return SERVER_LABELS[name]
    return f"batchwire {shlex.join(args.variants[name])}"


def device_flags(flag: str, args: argparse.Namespace) -> list[str]:
    """``[flag, device]`` off the CPU; nothing on it, so CPU runs keep each server's own
    default (batchwire's ``--devices auto`` finds no GPU and divides the cores)."""
    return [] if args.device == "cpu" else [flag, args.device]


def dtype_flags(args: argparse.Namespace) -> list[str]:
    """``["--dtype", X]`` when the run names a dtype; nothing keeps each one's default."""
    return ["--dtype", args.dtype] if args.dtype else []


def server_argv(process: str, model, port: int, args: argparse.Namespace,
                workload: Workload) -> list[str]:
    if is_batchwire(process, args):
        threads = ["--torch-threads", str(args.torch_threads)] if args.torch_threads > 0 else []
        return [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                "--port", str(port), "--model", model.path, "--task", model.task,
                "--workers", str(args.bw_workers),
                *(["--max-batch-size", str(args.bw_max_batch_size)]
                  if args.bw_max_batch_size > 0 else []),
                "--max-delay-ms", str(args.bw_max_delay_ms),
                "--max-queue", str(args.bw_max_queue),
                "--log-level", "WARNING", *threads, *device_flags("--devices", args),
                *dtype_flags(args),
                *shlex.split(args.bw_args), *args.variants.get(process, ())]
    argv = [sys.executable, "-m", "benchmarks.reference_server", "--model", model.path,
            "--task", model.task, "--port", str(port), *device_flags("--device", args),
            *dtype_flags(args)]
    if process == "guide-batching":
        argv += ["--batching", "--max-batch-size", str(args.guide_max_batch_size)]
    if workload.answer == "embeddings":
        # Not in the guide: see reference_server's docstring.
        argv += ["--pooling", "mean", *embedding_cut(model)]
    return argv


def embedding_cut(model) -> list[str]:
    """``--max-seq-length`` for the guide's servers and the ceiling on an embeddings
    workload: the length batchwire cuts embeddings at by default (the model's declared
    max_seq_length, 256 for all-MiniLM-L6-v2), so every row embeds the same tokens."""
    from worker.runner import declared_max_seq_length

    n = declared_max_seq_length(model.path)
    return ["--max-seq-length", str(n)] if n else []


@dataclass(frozen=True)
class Client:
    """What one result row sends and how it reads the answers."""

    path: str
    bodies: list[bytes]
    headers: dict[str, str]
    decode: str  # loadgen decoder: json | msgpack
    check: object  # loadgen.answer_check(...) or None
    describe: str


def client_for(server: str, workload: Workload, model, inputs: list[str],
               args: argparse.Namespace) -> Client:
    process, fmt = row_spec(server, args)
    check = loadgen.answer_check(workload.answer, model.hidden_size)
    if workload.answer == "embeddings" and is_batchwire(process, args):
        return Client("/v1/embeddings", loadgen.embeddings_bodies(inputs),
                      dict(loadgen.JSON_HEADERS), "json", check,
                      'POST /v1/embeddings {"input": text} (JSON); answers parsed with '
                      "json.loads")
    headers = dict(loadgen.TEXT_HEADERS)
    if fmt == "msgpack":
        headers["Accept"] = loadgen.MSGPACK_TYPE
        how = ("POST / raw text, Accept: application/msgpack; answers parsed with "
               "msgpack.unpackb + numpy.frombuffer")
    else:
        how = "POST / raw text; answers parsed with json.loads"
    return Client("/", [x.encode("utf-8") for x in inputs], headers, fmt, check, how)


def measure_point(server: ServerProcess, client: Client, args: argparse.Namespace, *,
                  concurrency: int | None = None, rate: float | None = None,
                  profile_to: Path | None = None) -> dict:
    url = server.base_url + client.path
    common = dict(timeout_s=args.timeout, grace_s=args.grace, headers=client.headers,
                  decode=client.decode, check=client.check)
    warm_c = concurrency or max(1, min(64, int(rate or 1)))
    # Warm-up: untimed, same shape of load (also absorbs a previous point's leftovers).
    asyncio.run(loadgen.closed_loop(url, client.bodies, concurrency=warm_c,
                                    duration_s=args.warmup,
                                    max_requests=max(warm_c * 4, 50), **common))
    server_cpu0, machine0 = server.cpu_seconds(), machine_cpu_seconds()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    profiler = (PointProfiler(server.process.pid, profile_to, args.duration,
                              args.profile_rate).start() if profile_to else None)
    if rate is not None:
        result = asyncio.run(loadgen.open_loop(url, client.bodies, rate=rate,
                                               duration_s=args.duration,
                                               max_requests=args.max_requests, **common))
    else:
        result = asyncio.run(loadgen.closed_loop(url, client.bodies, concurrency=concurrency,
                                                 duration_s=args.duration,
                                                 max_requests=args.max_requests, **common))
    server_cpu1, machine1 = server.cpu_seconds(), machine_cpu_seconds()
    if profiler is not None:
        result["profile"] = profiler.finish()
    wall = result["wall_s"] or 1e-9
    cpu = {"loadgen": round(result["loadgen_cpu_s"] / wall, 3)}
    if server_cpu0 is not None and server_cpu1 is not None:
        cpu["server"] = round((server_cpu1 - server_cpu0) / wall, 3)
    if machine0 and machine1:
        busy = (machine1[0] - machine0[0]) / wall
        cpu["machine_busy"] = round(busy, 3)
        if "server" in cpu:
            # Everything else on the box during the point (other jobs, the kernel's share).
            cpu["others"] = round(max(0.0, busy - cpu["server"] - cpu["loadgen"]), 3)
    result["cpu_cores"] = cpu
    if load0 is not None:
        result["load_average_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return result


def run_process(process: str, rows: list[str], model, workload: Workload, inputs: list[str],
                args: argparse.Namespace, raw_dir: Path) -> dict[str, dict]:
    """Start one server process, measure each of its result ``rows`` in turn, stop it."""
    port = free_port()
    argv = server_argv(process, model, port, args, workload)
    server = ServerProcess(process, argv, port, raw_dir / f"{workload.name}.{process}.log",
                           env=subprocess_env(args))
    concurrency = args.concurrency
    if workload.name in args.trim:
        concurrency = [max(args.concurrency)]
    entries: dict[str, dict] = {}
    for name in rows:
        client = client_for(name, workload, model, inputs, args)
        entries[name] = {"server": name, "label": row_label(name, args), "process": process,
                         "argv": [Path(a).name if i == 0 else a for i, a in enumerate(argv)],
                         "request": client.describe, "points": []}
        if process in args.variants:
            entries[name]["variant_flags"] = list(args.variants[process])
    print(f"[bench] {workload.name}: starting {process} on port {port}", file=sys.stderr)
    current = rows[0]
    try:
        server.start()
        ready = round(server.wait_ready(args.ready_timeout, inputs[0].encode("utf-8")), 2)
        info = batching_info(server) if is_batchwire(process, args) else None
        for name in rows:
            current = name
            entry = entries[name]
            entry["ready_after_s"] = ready
            if info is not None:
                entry["batching"] = info
            client = client_for(name, workload, model, inputs, args)
            for c in concurrency:
                profile_to = raw_dir / f"{workload.name}.{name}.C{c}" if args.profile else None
                point = measure_point(server, client, args, concurrency=c,
                                      profile_to=profile_to)
                entry["points"].append(point)
                _log_point(workload.name, name, f"C={c}", point)
                if not server.alive():
                    raise ServerFailed(f"{process} died during the C={c} point:\n"
                                       f"{server.log_tail()}")
            for rate in args.rates:
                point = measure_point(server, client, args, rate=rate)
                entry["points"].append(point)
                _log_point(workload.name, name, f"rate={rate:g}/s", point)
    except ServerFailed as exc:
        # The row being measured failed, and every row after it never ran.
        for name in rows[rows.index(current):]:
            entries[name]["error"] = str(exc)
        print(f"[bench] {workload.name}: {process} FAILED: {exc}", file=sys.stderr)
    finally:
        code = server.stop()
        for entry in entries.values():
            entry["exit_code"] = code
    return entries


class _BothUp:
    """Two result rows' server processes (by default batchwire's, JSON answers, and the
    guide's), started together on first use and stopped by :meth:`close`.

    The paired C=1 comparison and the interleaved load share one when they compare the same
    two rows (the default): one start of both servers instead of two. A start that failed
    fails every later use the same way, without starting again.
    """

    def __init__(self, model, workload: Workload, inputs: list[str], args: argparse.Namespace,
                 raw_dir: Path, why: str, rows: Sequence[str] = PAIR_ROWS):
        self.model, self.workload, self.inputs, self.args = model, workload, inputs, args
        self.raw_dir, self.why, self.rows = raw_dir, why, tuple(rows)
        self.servers: list[ServerProcess] = []
        self._up: list[tuple[ServerProcess, Client]] | None = None
        self._failed: BaseException | None = None

    def get(self) -> list[tuple[ServerProcess, Client]]:
        if self._failed is not None:
            raise self._failed
        if self._up is None:
            try:
                self._start()
            except BaseException as exc:
                self._failed = exc
                self.close()
                raise
            self._up = [(server, client_for(row, self.workload, self.model, self.inputs,
                                            self.args))
                        for server, row in zip(self.servers, self.rows)]
        return self._up

    def _start(self) -> None:
        ports: list[int] = []
        for row in self.rows:
            process = row_spec(row, self.args)[0]
            port = free_port()
            while port in ports:  # the OS may hand a just-closed port out again
                port = free_port()
            ports.append(port)
            server = ServerProcess(
                f"{row} ({self.why})",
                server_argv(process, self.model, port, self.args, self.workload), port,
                self.raw_dir / f"{self.workload.name}.{row}.{self.why}.log",
                env=subprocess_env(self.args))
            self.servers.append(server)
            # Started together: nothing is measured until both are ready, and loading the
            # two models side by side takes less time than one after the other.
            server.start()
        for server in self.servers:
            server.wait_ready(self.args.ready_timeout, self.inputs[0].encode("utf-8"))

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []


def run_paired(model, workload: Workload, inputs: list[str], args: argparse.Namespace,
               raw_dir: Path, pair: _BothUp | None = None) -> dict:
    """batchwire (JSON answers) and the guide's server up at once, compared at C=1 on the
    same inputs in alternating blocks (:mod:`benchmarks.paired`). ``pair``: the two servers
    to use (started if they are not yet, left running); else they start and stop here."""
    print(f"[bench] {workload.name}: C=1 paired, batchwire and guide", file=sys.stderr)
    own = pair is None
    if pair is None:
        pair = _BothUp(model, workload, inputs, args, raw_dir, "paired")
    try:
        up = pair.get()
        targets = [paired.Target(name, HOST, server.port, client.path, client.bodies,
                                 client.headers, client.check)
                   for name, (server, client) in zip(PAIR_ROWS, up)]
        result = paired.compare(*targets, inputs=args.paired_inputs,
                                rounds=args.paired_rounds, timeout_s=args.timeout)
    except (ServerFailed, paired.PairedFailure, OSError, ValueError) as exc:
        print(f"[bench] {workload.name}: C=1 paired FAILED: {exc}", file=sys.stderr)
        return {"error": str(exc)}
    finally:
        if own:
            pair.close()
    d = result["difference_ms"]
    print(f"[bench] {workload.name} C=1 paired: p50 batchwire {result['p50_ms']['batchwire']:.2f}"
          f" ms, guide {result['p50_ms']['guide']:.2f} ms; batchwire - guide median "
          f"{d['median']:+.2f} ms [{d['median_95'][0]:+.2f}, {d['median_95'][1]:+.2f}], mean "
          f"{d['mean']:+.2f} ms", file=sys.stderr)
    return result


def run_interleaved(model, workload: Workload, inputs: list[str], args: argparse.Namespace,
                    raw_dir: Path, pair: _BothUp | None = None) -> list[dict]:
    """The two --interleaved-servers rows (batchwire and the guide by default) up at once,
    loaded in alternating closed-loop slices at each --interleaved concurrency
    (:mod:`benchmarks.interleaved`). ``pair``: those two servers, as for :func:`run_paired`."""
    a, b = args.interleaved_servers
    print(f"[bench] {workload.name}: interleaved load, {a} and {b}", file=sys.stderr)
    own = pair is None
    if pair is None:
        pair = _BothUp(model, workload, inputs, args, raw_dir, "interleaved", (a, b))
    results: list[dict] = []
    try:
        up = pair.get()
        for server, _ in up:
            if not server.alive():
                raise ServerFailed(f"{server.name} is not running:\n{server.log_tail()}")
        targets = [interleaved.Target(row, server.base_url + client.path, client.bodies,
                                      client.headers, client.decode, client.check)
                   for row, (server, client) in zip((a, b), up)]
        for c in args.interleaved:
            result = interleaved.compare(
                *targets, concurrency=c, rounds=args.interleaved_rounds,
                slice_s=args.interleaved_slice, warmup_s=args.warmup,
                max_requests=args.max_requests, timeout_s=args.timeout,
                grace_s=args.grace)
            results.append(result)
            r = result["throughput_ratio"]
            print(f"[bench] {workload.name} C={c} interleaved: {a} "
                  f"{result[a]['throughput_rps']:.1f} req/s, {b} "
                  f"{result[b]['throughput_rps']:.1f} req/s, ratio {r['value']:.3f} "
                  f"[{r['95'][0]:.3f}, {r['95'][1]:.3f}]", file=sys.stderr)
            for server, _ in up:
                if not server.alive():
                    raise ServerFailed(f"{server.name} died during the C={c} "
                                       f"interleaved point:\n{server.log_tail()}")
    except (ServerFailed, OSError, ValueError) as exc:
        print(f"[bench] {workload.name}: interleaved FAILED: {exc}", file=sys.stderr)
        return [*results, {"error": str(exc)}]
    finally:
        if own:
            pair.close()
    return results


def _has_rows(workload: Workload, args: argparse.Namespace, wanted: Sequence[str]) -> bool:
    rows = {name for _, names in workload_rows(workload, args) for name in names}
    return set(wanted) <= rows


def wants_paired(workload: Workload, args: argparse.Namespace) -> bool:
    """Both batchwire and the guide are among the workload's rows, and the run asks."""
    return bool(args.paired_c1) and _has_rows(workload, args, PAIR_ROWS)


def wants_interleaved(workload: Workload, args: argparse.Namespace) -> bool:
    """Both --interleaved-servers rows are among the workload's rows, and the run asks."""
    return bool(args.interleaved) and _has_rows(workload, args, args.interleaved_servers)


def available_rows(workload: Workload, args: argparse.Namespace) -> tuple[str, ...]:
    """The rows ``workload`` can have: its own, and every batchwire batching variant."""
    return tuple(dict.fromkeys((*workload.servers, *args.variants)))


def workload_rows(workload: Workload, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """[(process, [result rows])] in --servers order, rows of one process together.

    Without --servers, the workload's own rows; every --bw-variant row runs either way.
    """
    selected = list(workload.servers if args.servers is None else args.servers)
    selected += [v for v in args.user_variants if v not in selected]
    available = available_rows(workload, args)
    wanted = args.trim.get(workload.name, available)
    names = [s for s in selected if s in available and s in wanted]
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(row_spec(name, args)[0], []).append(name)
    return list(groups.items())


def batching_info(server: ServerProcess) -> list[dict] | None:
    """The batching settings each worker reports at ``GET /info`` (max batch size, and
    whatever token-budget / length-bucket fields it has), or None if it does not answer."""
    try:
        with urllib.request.urlopen(server.base_url + "/info", timeout=5) as resp:
            workers = json.loads(resp.read()).get("workers") or []
    except (OSError, ValueError, AttributeError):
        return None
    keep = ("device", "dtype", "max_batch_size", "capacity")
    return [{k: v for k, v in w.items()
             if k in keep or "token" in k or "bucket" in k or "batching" in k}
            for w in workers if isinstance(w, dict)]


def _log_point(workload: str, server: str, label: str, point: dict) -> None:
    lat = point["latency_ms"]
    print(f"[bench] {workload} {server} {label}: {point['throughput_rps']:.1f} req/s, "
          f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, statuses {point['statuses']}, "
          f"cpu {point.get('cpu_cores')}", file=sys.stderr)


def ceiling_argv(model, workload: Workload, args: argparse.Namespace, out: Path) -> list[str]:
    min_tokens, max_tokens = workload.input_tokens(model.max_tokens)
    argv = [sys.executable, "-m", "benchmarks.ceiling", "--model", model.path,
            "--task", model.task, "--workload", workload.shape,
            "--inputs", str(args.inputs), "--max-tokens", str(max_tokens),
            *(["--min-tokens", str(min_tokens)] if min_tokens is not None else []),
            "--batch-sizes", ",".join(map(str, args.batch_sizes)),
            "--seconds-per-size", str(args.ceiling_seconds),
            "--max-items-per-size", str(args.ceiling_max_items), "--json-out", str(out),
            *device_flags("--device", args), *dtype_flags(args)]
    if workload.answer == "embeddings":
        argv += ["--pooling", "mean", *embedding_cut(model)]
    return argv


def run_ceiling(model, workload: Workload, args: argparse.Namespace, raw_dir: Path) -> dict:
    out = raw_dir / f"{workload.name}.ceiling.json"
    argv = ceiling_argv(model, workload, args, out)
    print(f"[bench] {workload.name}: ceiling", file=sys.stderr)
    limit = 120 + len(args.batch_sizes) * (args.ceiling_seconds * 4 + 60)
    try:
        proc = subprocess.run(argv, cwd=REPO_ROOT, env=subprocess_env(args), timeout=limit,
                              capture_output=True, text=True,
                              preexec_fn=die_with_parent if sys.platform.startswith("linux")
                              else None)
    except subprocess.TimeoutExpired:
        return {"error": f"ceiling did not finish within {limit:.0f} s"}
    (raw_dir / f"{workload.name}.ceiling.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": f"ceiling exited {proc.returncode}: {proc.stderr[-2000:]}"}
    return json.loads(out.read_text())


# -- main -------------------------------------------------------------------------------------
def _terminate(signum, frame) -> None:
    # SIGTERM unwinds like ^C, so every `finally` stops its server before we exit.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, _terminate)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(build_parser().parse_args(argv))
    out: Path = args.out.resolve()
    raw_dir = out / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    from benchmarks.models import get_model
    from benchmarks.workloads import make_inputs, tokens_by_construction

    results: dict = {
        "schema": 1,
        "command": "python -m benchmarks.run" + "".join(" " + shlex.quote(a) for a in argv),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "note": args.note,
        "machine": machine_facts(),
        "config": {
            "quick": args.quick, "gpu": args.gpu, "device": args.device, "dtype": args.dtype,
            "workloads": args.workloads,
            "servers": args.servers,  # None: each workload's own rows
            "concurrency": args.concurrency, "rates": args.rates, "duration_s": args.duration,
            "warmup_s": args.warmup, "max_requests": args.max_requests, "grace_s": args.grace,
            "timeout_s": args.timeout, "inputs": args.inputs, "batch_sizes": args.batch_sizes,
            "ceiling_seconds_per_size": args.ceiling_seconds,
            "batchwire": {"workers": args.bw_workers, "max_batch_size": args.bw_max_batch_size,
                          "max_delay_ms": args.bw_max_delay_ms, "max_queue": args.bw_max_queue,
                          "extra": args.bw_args,
                          "variants": {k: list(v) for k, v in args.variants.items()}},
            "guide_batching_max_batch_size": args.guide_max_batch_size,
            "quick_trim": {w: {"servers": list(rows), "concurrency": [max(args.concurrency)]}
                           for w, rows in args.trim.items() if w in args.workloads},
            "torch_threads": args.torch_threads,
            "paired_c1": ({"inputs": args.paired_inputs, "rounds": args.paired_rounds,
                           "block": paired.DEFAULT_BLOCK} if args.paired_c1 else None),
            "interleaved": ({"concurrency": args.interleaved,
                             "servers": args.interleaved_servers,
                             "rounds": args.interleaved_rounds,
                             "slice_s": args.interleaved_slice} if args.interleaved else None),
            "omp_env": {k: v for k, v in os.environ.items()
                        if k.startswith(("OMP_", "MKL_", "KMP_"))},
        },
        "loadgen_ceiling": None,
        "workloads": [],
    }

    def save() -> None:
        results["elapsed_s"] = round(time.time() - started, 1)
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(out / "results.json")

    if not args.no_loadgen_ceiling:
        print("[bench] load generator ceiling (trivial aiohttp server)", file=sys.stderr)
        try:
            results["loadgen_ceiling"] = loadgen.measure_ceiling(
                concurrency=max(args.concurrency), duration_s=args.loadgen_ceiling_duration,
                log_path=raw_dir / "trivial-server.log")
        except ServerFailed as exc:
            results["loadgen_ceiling"] = {"error": str(exc)}
        save()

    failed = False
    for name in args.workloads:
        workload = WORKLOADS[name]
        model = get_model(workload.model)
        min_tokens, max_tokens = workload.input_tokens(model.max_tokens)
        inputs = make_inputs(workload.shape, args.inputs, task=model.task,
                             max_tokens=max_tokens, min_tokens=min_tokens)
        words = [len(x.split()) for x in inputs]
        tokens = [tokens_by_construction(x) for x in inputs]
        entry: dict = {"name": name, "description": workload.description,
                       "shape": workload.shape, "answer": workload.answer,
                       "model": asdict(model),
                       "inputs": len(inputs),
                       "input_words": {"min": min(words), "max": max(words),
                                       "mean": round(sum(words) / len(words), 1)},
                       # By construction (every word one token), checked against MiniLM's
                       # tokenizer once, not in the run.
                       "input_tokens": {"min": min(tokens), "max": max(tokens),
                                        "mean": round(sum(tokens) / len(tokens), 1)},
                       "ceiling": None, "servers": {}}
        results["workloads"].append(entry)
        if not args.no_ceiling:
            entry["ceiling"] = run_ceiling(model, workload, args, raw_dir)
            save()
            if "error" in entry["ceiling"]:
                print(f"[bench] {name}: ceiling FAILED: {entry['ceiling']['error']}",
                      file=sys.stderr)
                failed = True
        for process, rows in workload_rows(workload, args):
            entry["servers"].update(run_process(process, rows, model, workload, inputs, args,
                                                raw_dir))
            failed = failed or any("error" in entry["servers"][r] for r in rows)
            save()
            if failed and not args.keep_going:
                break
        if failed and not args.keep_going:
            print("[bench] stopping at the first failure (--no-keep-going)", file=sys.stderr)
            break
        with_paired, with_interleaved = (wants_paired(workload, args),
                                         wants_interleaved(workload, args))
        # Both compare batchwire with the guide by default: one start of the two serves both.
        shared = (_BothUp(model, workload, inputs, args, raw_dir, "paired+interleaved")
                  if with_paired and with_interleaved
                  and tuple(args.interleaved_servers) == PAIR_ROWS else None)
        try:
            if with_paired:
                entry["paired_c1"] = run_paired(model, workload, inputs, args, raw_dir, shared)
                failed = failed or "error" in entry["paired_c1"]
                save()
            if with_interleaved:
                entry["interleaved"] = run_interleaved(model, workload, inputs, args, raw_dir,
                                                       shared)
                failed = failed or any("error" in r for r in entry["interleaved"])
                save()
            elif args.interleaved:
                print(f"[bench] {workload.name}: no interleaved load: "
                      f"{' and '.join(args.interleaved_servers)} are not both among its rows",
                      file=sys.stderr)
        finally:
            if shared is not None:
                shared.close()

    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["machine"]["load_average_end"] = (list(os.getloadavg())
                                              if hasattr(os, "getloadavg") else None)
    save()

    from benchmarks.report import write_report

    written = write_report(results, out, plots=not args.no_plots)
    print(f"[bench] wrote {out / 'results.json'}", file=sys.stderr)
    for path in written:
        print(f"[bench] wrote {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
