"""The gateway's one typed config (and serve's, which adds the workers it supervises)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from gateway import cors
from gateway.held_memory import BODY_HOLDS, DEFAULT_MAX_HELD_BYTES
from gateway.poison_memo import POISON_MEMORY_S
from protocol.eventloop import add_event_loop_flag
from protocol.flags import (Flags, body_bytes, non_negative_float, port_number, positive_float,
                            positive_int)
from protocol.logs import add_logging_flags
from protocol.version import package_version
from worker.config import add_model_flags


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    zmq_bind: str | None = None
    max_queue: int = 4096
    timeout_ms: float = 30_000.0
    max_body_bytes: int = 4 * 1024 * 1024
    max_inputs: int = 256
    #: /v1/embeddings' own: OpenAI's limit, since each answer there is one vector.
    max_embedding_inputs: int = 2048
    #: Bytes of bodies and answers held at once, all requests together (gateway/held_memory.py).
    max_held_bytes: int = DEFAULT_MAX_HELD_BYTES
    #: Open client connections at once (gateway/connections.py).
    max_connections: int = 4096
    idle_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0
    heartbeat_interval_s: float = 1.0
    batch_timeout_s: float = 60.0
    poison_memory_s: float = POISON_MEMORY_S
    debug: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    event_loop: str = "auto"
    api_key: str | None = None
    #: More keys, one per line, read again when the file changes (gateway/api_keys.py).
    api_keys_file: str | None = None
    #: Origins whose pages may call the gateway from a browser (gateway/cors.py); ("*",): any.
    cors_origins: tuple[str, ...] = ()
    #: HTTPS on --port with this PEM certificate chain and key (gateway/tls.py).
    tls_cert: str | None = None
    tls_key: str | None = None
    curve_secret_key: str | None = None
    curve_authorized_keys: str | None = None
    model_name: str | None = None

    @property
    def requires_key(self) -> bool:
        """Whether routes but the probes need ``Authorization: Bearer KEY``."""
        return bool(self.api_key or self.api_keys_file)


@dataclass(frozen=True)
class WorkerLaunchConfig:
    """What `batchwire serve` hands to each local worker process it starts."""

    model: str | None = None
    task: str | None = None
    #: None: ``--workers auto`` (one per visible GPU, else one per usable CPU core).
    workers: int | None = 1
    devices: str = "auto"
    #: None: each worker's device default (worker.config.default_max_batch_size).
    max_batch_size: int | None = None
    max_delay_ms: float = 2.0
    #: None: the worker's own default (worker.memory_limits.DEFAULT_RECOVERY_S).
    oom_recovery_s: float | None = None
    #: None: each worker's device default (worker.config.default_max_batch_tokens).
    max_batch_tokens: int | None = None
    length_buckets: bool = True
    torch_threads: int = 0
    trust_remote_code: bool = False
    pooling: str = "auto"
    normalize: str = "auto"
    #: 0: as the model declares (worker ``--max-seq-length auto``).
    max_seq_length: int = 0
    fixed_delay: bool = False
    sparse_mlm_head: bool = True
    stock_pipeline: bool = False
    dtype: str = "auto"


@dataclass(frozen=True)
class ServeConfig:
    gateway: GatewayConfig
    workers: WorkerLaunchConfig = field(default_factory=WorkerLaunchConfig)


def is_device(name: str) -> bool:
    """``cpu`` or ``cuda:N``: the devices a worker takes."""
    return name == "cpu" or (name.startswith("cuda:") and name[5:].isdigit())


def device_list(spec: str) -> list[str]:
    """The devices a ``--devices`` list other than ``auto`` names; ValueError naming the
    first that is none."""
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    bad = next((d for d in devices if not is_device(d)), None)
    if bad is not None or not devices:
        raise ValueError(f"unknown device {bad or spec!r}: use auto, cpu, cuda:N, or a list "
                         "such as cuda:0,cuda:1")
    return devices


def devices_spec(text: str) -> str:
    """``--devices``: checked with the other flags, so a typo ("gpu") is one line and exit 2,
    not a traceback once the broker has bound its socket."""
    spec = text.strip()
    if spec != "auto":
        try:
            device_list(spec)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def _add_gateway_flags(flags: Flags, *, serve: bool) -> None:
    d = GatewayConfig()
    flags.add("--host", default=d.host, help="HTTP listen address")
    flags.add("--port", type=port_number, default=d.port, help="HTTP listen port")
    flags.add("--zmq-bind", default=None if serve else "tcp://127.0.0.1:5555",
              help="ZeroMQ endpoint workers connect to" +
              (" (default: a private ipc:// socket)" if serve else ""))
    flags.add("--max-queue", type=positive_int, default=d.max_queue,
              help="requests that may wait for a worker; past it requests get 503 at once")
    flags.add("--timeout-ms", type=positive_float, default=d.timeout_ms,
              help="default deadline per request (the X-Timeout-Ms header overrides it); "
              "past it the answer is 504")
    flags.add("--max-body-bytes", type=body_bytes, default=d.max_body_bytes,
              help="largest request body; larger ones get 413 (at most 16 MiB)")
    flags.add("--max-inputs", type=positive_int, default=d.max_inputs,
              help="most inputs in one /predict or /v2 infer list")
    flags.add("--max-embedding-inputs", type=positive_int, default=d.max_embedding_inputs,
              help="most inputs in one /v1/embeddings request (OpenAI's own limit; "
              "LangChain sends 1000 texts at a time)")
    flags.add("--max-held-bytes", type=positive_int, default=d.max_held_bytes,
              help="most bytes the gateway holds for requests at once, bodies and answers, all "
              "requests together (512 MiB): a body or answer that would pass it beside the "
              "others' gets 503 overloaded, a request whose answers alone pass it 422 "
              "answers_too_large; at least 2 x --max-body-bytes")
    flags.add("--max-connections", type=positive_int, default=d.max_connections,
              help="most client connections open at once; past it a new connection gets 503 "
              "overloaded and is closed")
    flags.add("--idle-timeout-s", type=positive_float, default=d.idle_timeout_s,
              help="a client connection that starts no request for this long while none of "
              "its requests is being handled (idle, or sending a request head too slowly) is "
              "closed, between one and two of these after its last request")
    flags.add("--drain-timeout-s", type=non_negative_float, default=d.drain_timeout_s,
              help="on SIGTERM, how long admitted requests may take to finish")
    flags.add("--heartbeat-interval-s", type=positive_float, default=d.heartbeat_interval_s,
              help="seconds between heartbeats; a worker silent for 3 of them is dead")
    flags.add("--batch-timeout-s", type=positive_float, default=d.batch_timeout_s,
              help="a worker holding work with no answer for this long is stuck: its "
              "requests are requeued and it is replaced")
    flags.add("--poison-memory-s", type=non_negative_float, default=d.poison_memory_s,
              help="an input that killed the two workers that ran it is refused (500 "
              "worker_crashed, before any worker runs it) for this long when sent again "
              "with the same parameters: retried, it would kill two more each time; and one "
              "a worker died holding, even answered already (a hang's 504), is run alone "
              "when sent again; 0 remembers none")
    flags.add("--debug", action="store_true", default=False,
              help="include tracebacks of internal errors in responses")
    add_logging_flags(flags)
    add_event_loop_flag(flags)
    flags.add("--curve-secret-key", default=None,
              help="the gateway's CURVE .key_secret file (batchwire keygen): encrypt and "
              "authenticate the worker link")
    flags.add("--curve-authorized-keys", default=None,
              help="directory of workers' public .key files; only those workers are admitted "
              "(read again when it changes: every 30 s, and on SIGHUP)")
    flags.add("--model-name", default=None,
              help="name the KServe v2 routes answer to (/v2/models/NAME), besides the "
              "model directory's own name")
    flags.add("--api-key", default=None,
              help="require 'Authorization: Bearer KEY' on every route but the probes (/health, "
              "/ready, /v2/health/live, /v2/health/ready)")
    flags.add("--api-keys-file", default=None,
              help="a file of API keys, one per line (# comments), each accepted as --api-key's "
              "is, besides it; read again when it changes, so keys rotate without a restart")
    flags.add("--cors-origins", type=cors.origins, default=(),
              help="origins whose web pages may call the gateway from a browser, comma-"
              "separated (https://app.example.com,http://localhost:3000), or * for any; "
              "unset: none (no CORS headers)")
    flags.add("--tls-cert", default=None,
              help="serve HTTPS (only) on --port with this PEM certificate chain; needs "
              "--tls-key. Both files are read again when they change")
    flags.add("--tls-key", default=None,
              help="the unencrypted PEM private key of --tls-cert")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchwire",
        description="batchwire: serve a Hugging Face transformers pipeline over HTTP with "
        "dynamic batching.",
    )
    parser.add_argument("--version", action="version",
                        version=f"batchwire {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    epilog = "Every flag reads its default from the environment variable named beside it."

    serve = sub.add_parser("serve", help="the gateway plus N local workers (the one-command path)",
                           formatter_class=fmt, epilog=epilog)
    flags = Flags(serve, environ)
    _add_gateway_flags(flags, serve=True)
    flags.add("--workers", type=worker_count, default=1,
              help="local worker processes to run, or auto: one per visible GPU, else one per "
              "usable CPU core with one torch thread each (each worker holds its own copy of "
              "the model; on CPU that is the throughput layout, see docs/operations.md)")
    flags.add("--devices", type=devices_spec, default="auto",
              help="auto, cpu, or a list such as cuda:0,cuda:1 (worker i takes device i mod n)")
    add_model_flags(flags)

    gateway = sub.add_parser("gateway", help="the gateway alone; workers connect to --zmq-bind",
                             formatter_class=fmt, epilog=epilog)
    flags = Flags(gateway, environ)
    _add_gateway_flags(flags, serve=False)

    # Parsed by worker.config; listed here so `batchwire --help` shows it.
    sub.add_parser("worker", help="one model worker connecting to a gateway", add_help=False)

    keygen = sub.add_parser("keygen", help="write a CURVE key pair (NAME.key, NAME.key_secret)",
                            formatter_class=fmt)
    keygen.add_argument("directory", help="where to write the key files")
    keygen.add_argument("--name", default="batchwire", help="file name stem")
    return parser


def gateway_config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        host=args.host,
        port=args.port,
        zmq_bind=args.zmq_bind,
        max_queue=args.max_queue,
        max_held_bytes=args.max_held_bytes,
        max_connections=args.max_connections,
        idle_timeout_s=args.idle_timeout_s,
        timeout_ms=args.timeout_ms,
        max_body_bytes=args.max_body_bytes,
        max_inputs=args.max_inputs,
        max_embedding_inputs=args.max_embedding_inputs,
        drain_timeout_s=args.drain_timeout_s,
        heartbeat_interval_s=args.heartbeat_interval_s,
        batch_timeout_s=args.batch_timeout_s,
        poison_memory_s=args.poison_memory_s,
        debug=args.debug,
        log_level=args.log_level,
        log_format=args.log_format,
        event_loop=args.event_loop,
        api_key=args.api_key or None,
        api_keys_file=args.api_keys_file or None,
        cors_origins=tuple(args.cors_origins),
        tls_cert=args.tls_cert or None,
        tls_key=args.tls_key or None,
        curve_secret_key=args.curve_secret_key,
        curve_authorized_keys=args.curve_authorized_keys,
        model_name=args.model_name or None,
    )


def worker_count(text: str) -> int | None:
    """``--workers``: a positive count, or ``auto`` (None)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a count of at least 1 or 'auto', got {text!r}")


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        gateway=gateway_config_from_args(args),
        workers=WorkerLaunchConfig(
            model=args.model,
            task=args.task,
            workers=args.workers,
            devices=args.devices,
            max_batch_size=args.max_batch_size,
            max_delay_ms=args.max_delay_ms,
            oom_recovery_s=args.oom_recovery_s,
            max_batch_tokens=args.max_batch_tokens,
            length_buckets=not args.no_length_buckets,
            torch_threads=args.torch_threads,
            trust_remote_code=args.trust_remote_code,
            pooling=args.pooling,
            normalize=args.normalize,
            max_seq_length=args.max_seq_length,
            fixed_delay=args.fixed_delay,
            sparse_mlm_head=not args.dense_mlm_head,
            stock_pipeline=args.stock_pipeline,
            dtype=args.dtype,
        ),
    )


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None):
    """-> (command, config) for serve and gateway."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.command == "keygen":
        return "keygen", args
    if args.max_held_bytes < BODY_HOLDS * args.max_body_bytes:
        # A body that could never be admitted would be refused as "overloaded" forever.
        parser.error(f"--max-held-bytes ({args.max_held_bytes}) must be at least "
                     f"{BODY_HOLDS} x --max-body-bytes ({BODY_HOLDS * args.max_body_bytes}): "
                     "a body is held with the inputs read from it")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together: give both (HTTPS) or neither (HTTP)")
    if args.command == "serve":
        return "serve", serve_config_from_args(args)
    return "gateway", gateway_config_from_args(args)
