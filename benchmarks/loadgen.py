"""An asyncio + aiohttp HTTP load generator: closed loop and open loop, bounded both ways.

* Closed loop: ``C`` clients, each sending its next request as soon as the last one is
  answered (the offered load adapts to the server; throughput at ``C`` is what the server
  sustains with ``C`` requests outstanding).
* Open loop: requests leave on a fixed schedule (``rate`` per second) whatever the server
  does; latency is counted from the scheduled send time, so a stalled server cannot hide
  its backlog (no coordinated omission). In-flight requests are capped; a send that would
  pass the cap is counted as ``dropped``.

Every run is bounded by a duration AND a request count; requests still outstanding
``grace_s`` after the duration are cancelled and counted as ``cancelled``. The report is
JSON: throughput, p50/p90/p99/max latency of 200 answers, counts by status, the mean
``X-Batch-Size`` the server reported, and the generator's own CPU time
(``time.process_time``) so a report can show the generator was not the bottleneck.
``ceiling`` measures the generator against a trivial aiohttp server that answers a
constant: no server can be measured faster than that on the same machine.

``decode`` makes the generator parse every 200 answer as a real client would, so that the
client-side cost of an answer format is paid (and counted in the generator's CPU time)
alike for every server: ``"json"`` is ``json.loads``; ``"msgpack"`` is ``msgpack.unpackb``
with every ``{"dtype", "shape", "data"}`` array (batchwire's ``Accept: application/msgpack``
form) turned into a numpy array by ``numpy.frombuffer(...).reshape(shape)``. ``check``
(see :func:`answer_check`) then verifies the answer's shape; a 200 whose body does not
parse or check is counted as ``bad-answer``, not as a success.

Usage::

    python -m benchmarks.loadgen run --url http://127.0.0.1:8000/ -c 8 --duration 10
    python -m benchmarks.loadgen run --url http://127.0.0.1:8000/ --rate 50 --duration 10
    python -m benchmarks.loadgen ceiling -c 64 --duration 5
    python -m benchmarks.loadgen trivial-server --port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import aiohttp

if TYPE_CHECKING:
    from ssl import SSLContext

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = 15.0
DEFAULT_MAX_REQUESTS = 100_000
TEXT_HEADERS = {"Content-Type": "text/plain; charset=utf-8"}
MSGPACK_TYPE = "application/msgpack"
DECODERS = ("none", "json", "msgpack")


# -- parsing answers as a client would ---------------------------------------------------
def _msgpack_array_hook(obj: dict):
    # batchwire's msgpack arrays: {"dtype": "<f4", "shape": [...], "data": raw bytes}.
    if len(obj) == 3 and isinstance(obj.get("data"), bytes) and "dtype" in obj \
            and "shape" in obj:
        import numpy as np

        return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    return obj


def make_decoder(kind: str | None):
    """``bytes -> object`` for ``kind`` (``json``, ``msgpack``), None for ``none``/None."""
    if kind in (None, "none"):
        return None
    if kind == "json":
        return json.loads
    if kind == "msgpack":
        import msgpack

        def decode_msgpack(payload: bytes):
            return msgpack.unpackb(payload, raw=False, object_hook=_msgpack_array_hook)

        return decode_msgpack
    raise ValueError(f"unknown decoder {kind!r}; known: {', '.join(DECODERS)}")


def _dims(obj) -> tuple[int, ...]:
    """The shape of a numpy array or of a nested list (from its first elements)."""
    shape = getattr(obj, "shape", None)
    if shape is not None:
        return tuple(shape)
    dims = []
    while isinstance(obj, list):
        dims.append(len(obj))
        if not obj:
            break
        obj = obj[0]
    return tuple(dims)


def answer_check(answer: str | None, hidden: int | None):
    """``object -> bool``: does a parsed answer have the workload's shape?

    * ``tokens``: token-level feature-extraction, ``[1, tokens, hidden]``;
    * ``embeddings``: one vector of ``hidden`` floats, bare (``[...]``) or OpenAI-shaped
      (``{"data": [{"embedding": [...]}]}``);
    * anything else (``fill-mask``, None): parsed is enough.
    """
    if answer == "tokens" and hidden:
        def check_tokens(obj) -> bool:
            dims = _dims(obj)
            return len(dims) == 3 and dims[0] == 1 and dims[1] > 0 and dims[2] == hidden

        return check_tokens
    if answer == "embeddings" and hidden:
        def check_embedding(obj) -> bool:
            if isinstance(obj, dict):
                data = obj.get("data")
                if not isinstance(data, list) or len(data) != 1:
                    return False
                obj = data[0].get("embedding") if isinstance(data[0], dict) else None
            return _dims(obj) == (hidden,)

        return check_embedding
    return None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Recorder:
    latencies_ok: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    bytes_received: int = 0
    last_end: float = 0.0

    def record(self, status: str, latency_s: float | None, end: float,
               batch: str | None = None, nbytes: int = 0) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == "200" and latency_s is not None:
            self.latencies_ok.append(latency_s)
            self.last_end = max(self.last_end, end)
            if batch is not None:
                try:
                    self.batch_sizes.append(int(batch))
                except ValueError:
                    pass
        self.bytes_received += nbytes

    def summary(self, *, elapsed_s: float, cpu_s: float) -> dict:
        lat = sorted(x * 1000.0 for x in self.latencies_ok)
        ok = len(lat)
        total = sum(self.statuses.values())

        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {
            "requests": total,
            "ok": ok,
            "statuses": dict(sorted(self.statuses.items())),
            "elapsed_s": round(elapsed_s, 4),
            "throughput_rps": round(ok / elapsed_s, 3) if elapsed_s > 0 else 0.0,
            "latency_ms": {
                "min": r(lat[0] if lat else None),
                "mean": r(sum(lat) / ok if ok else None),
                "p50": r(percentile(lat, 50)),
                "p90": r(percentile(lat, 90)),
                "p99": r(percentile(lat, 99)),
                "max": r(lat[-1] if lat else None),
            },
            "mean_batch_size": (round(sum(self.batch_sizes) / len(self.batch_sizes), 3)
                                if self.batch_sizes else None),
            "bytes_received": self.bytes_received,
            "loadgen_cpu_s": round(cpu_s, 4),
            # Share of ONE core the generator used over the run (1.0 = a full core).
            "loadgen_cpu_util": round(cpu_s / elapsed_s, 4) if elapsed_s > 0 else None,
        }


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, rec: Recorder,
               started: float, headers: dict, decode=None, check=None) -> None:
    status, batch, nbytes = "", None, 0
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            payload = await resp.read()
            status, nbytes = str(resp.status), len(payload)
            batch = resp.headers.get("X-Batch-Size")
        if decode is not None and status == "200":
            # Parsed on the event loop, inside the timed request: a client's real cost.
            try:
                parsed = decode(payload)
            except Exception:  # noqa: BLE001 - any parser's error: not the promised answer
                status = "bad-answer"
            else:
                if check is not None and not check(parsed):
                    status = "bad-answer"
    except asyncio.TimeoutError:
        status = "timeout"
    except aiohttp.ClientError as exc:
        status = f"error:{type(exc).__name__}"
    except asyncio.CancelledError:
        rec.record("cancelled", None, time.perf_counter())
        raise
    end = time.perf_counter()
    rec.record(status, end - started, end, batch, nbytes)


def _session(limit: int, timeout_s: float, ssl: "SSLContext | None" = None
             ) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, force_close=False,
                                     enable_cleanup_closed=False,
                                     ssl=ssl if ssl is not None else True)
    return aiohttp.ClientSession(connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=timeout_s),
                                 auto_decompress=False)


JSON_HEADERS = {"Content-Type": "application/json"}


def embeddings_bodies(texts: Sequence[str]) -> list[bytes]:
    """OpenAI ``POST /v1/embeddings`` bodies: ``{"input": text}`` per text."""
    return [json.dumps({"input": t}).encode("utf-8") for t in texts]


def _bodies(inputs: Sequence[str | bytes]) -> list[bytes]:
    if not inputs:
        raise ValueError("no inputs to send")
    return [x.encode("utf-8") if isinstance(x, str) else x for x in inputs]


async def closed_loop(url: str, inputs: Sequence[str | bytes], *, concurrency: int,
                      duration_s: float, max_requests: int = DEFAULT_MAX_REQUESTS,
                      timeout_s: float = DEFAULT_TIMEOUT_S, grace_s: float = DEFAULT_GRACE_S,
                      headers: dict | None = None, decode: str | None = None,
                      check=None, keep_latencies: bool = False,
                      ssl: "SSLContext | None" = None) -> dict:
    """``concurrency`` clients back to back until ``duration_s`` or ``max_requests``;
    ``keep_latencies``: the answers' latencies too (``latencies_ms``, ascending), for a
    caller that pools several points (:mod:`benchmarks.interleaved`); ``ssl``: the context
    an https:// URL is verified with (a test CA's)."""
    if concurrency < 1 or duration_s <= 0 or max_requests < 1:
        raise ValueError("concurrency, duration and max_requests must be positive")
    bodies = _bodies(inputs)
    headers = headers or TEXT_HEADERS
    decoder = make_decoder(decode)
    rec = Recorder()
    issued = itertools.count()
    async with _session(concurrency, timeout_s, ssl) as session:
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + duration_s

        async def client() -> None:
            while time.perf_counter() < deadline:
                n = next(issued)
                if n >= max_requests:
                    return
                await _one(session, url, bodies[n % len(bodies)], rec, time.perf_counter(),
                           headers, decoder, check)

        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=duration_s + grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        t1, cpu1 = time.perf_counter(), time.process_time()
    # Throughput counts to the last answer; a run cut by max_requests ends when it ends.
    elapsed = (rec.last_end or t1) - t0
    out = rec.summary(elapsed_s=elapsed, cpu_s=cpu1 - cpu0)
    out.update(mode="closed", url=url, concurrency=concurrency, duration_s=duration_s,
               max_requests=max_requests, decode=decode or "none",
               stopped_by="max_requests" if next(issued) > max_requests else "duration",
               wall_s=round(t1 - t0, 4))
    if keep_latencies:
        out["latencies_ms"] = sorted(x * 1000.0 for x in rec.latencies_ok)
    return out


async def open_loop(url: str, inputs: Sequence[str | bytes], *, rate: float, duration_s: float,
                    max_requests: int = DEFAULT_MAX_REQUESTS, max_in_flight: int = 1024,
                    timeout_s: float = DEFAULT_TIMEOUT_S, grace_s: float = DEFAULT_GRACE_S,
                    headers: dict | None = None, decode: str | None = None,
                    check=None, ssl: "SSLContext | None" = None) -> dict:
    """Send at ``rate`` per second for ``duration_s`` (at most ``max_requests`` sends)."""
    if rate <= 0 or duration_s <= 0 or max_requests < 1:
        raise ValueError("rate, duration and max_requests must be positive")
    bodies = _bodies(inputs)
    headers = headers or TEXT_HEADERS
    decoder = make_decoder(decode)
    rec = Recorder()
    total = min(max_requests, max(1, int(rate * duration_s)))
    lags: list[float] = []
    tasks: set[asyncio.Task] = set()
    async with _session(max_in_flight, timeout_s, ssl) as session:
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(total):
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, time.perf_counter() - scheduled))
            if len(tasks) >= max_in_flight:
                rec.record("dropped", None, time.perf_counter())
                continue
            # Latency from the scheduled time: a late send is the server's backlog too.
            task = asyncio.create_task(_one(session, url, bodies[i % len(bodies)], rec,
                                            scheduled, headers, decoder, check))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sent_by = time.perf_counter()
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        t1, cpu1 = time.perf_counter(), time.process_time()
    elapsed = max(rec.last_end, sent_by) - t0
    out = rec.summary(elapsed_s=elapsed, cpu_s=cpu1 - cpu0)
    lags.sort()
    out.update(mode="open", url=url, rate=rate, offered=total, duration_s=duration_s,
               decode=decode or "none",
               max_requests=max_requests, max_in_flight=max_in_flight,
               send_lag_ms={"p50": round(percentile(lags, 50) * 1000, 3),
                            "p99": round(percentile(lags, 99) * 1000, 3),
                            "max": round(lags[-1] * 1000, 3)},
               wall_s=round(t1 - t0, 4))
    return out


# -- the generator's own ceiling -----------------------------------------------------------
TRIVIAL_ANSWER = b'[{"score":0.5,"token":1012,"token_str":".","sequence":"test."}]'


def trivial_app():
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=TRIVIAL_ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/", answer)
    app.router.add_get("/ready", answer)
    return app


def serve_trivial(port: int) -> None:
    from aiohttp import web

    web.run_app(trivial_app(), host="127.0.0.1", port=port, print=None, access_log=None,
                handle_signals=True)


def measure_ceiling(*, concurrency: int = 64, duration_s: float = 3.0,
                    max_requests: int = DEFAULT_MAX_REQUESTS, log_path=None) -> dict:
    """The generator against a trivial aiohttp server (in its own process) on this machine."""
    import tempfile
    from pathlib import Path

    from benchmarks.procs import ServerProcess, free_port

    port = free_port()
    log = Path(log_path) if log_path else Path(tempfile.gettempdir()) / "bench-trivial-server.log"
    server = ServerProcess("trivial-server",
                           [sys.executable, "-m", "benchmarks.loadgen", "trivial-server",
                            "--port", str(port)], port, log)
    with server:
        server.wait_ready(30.0, b"test [MASK]")
        cpu0 = server.cpu_seconds()
        result = asyncio.run(closed_loop(server.base_url + "/", ["test [MASK]"],
                                         concurrency=concurrency, duration_s=duration_s,
                                         max_requests=max_requests))
        cpu1 = server.cpu_seconds()
    if cpu0 is not None and cpu1 is not None:
        result["server_cpu_s"] = round(cpu1 - cpu0, 4)
    result["what"] = ("loadgen ceiling: closed loop against a trivial aiohttp server "
                      "(constant answer)")
    return result


# -- CLI ----------------------------------------------------------------------------------------
def _inputs_from_args(args: argparse.Namespace) -> list[str]:
    if args.body is not None:
        return [args.body]
    from benchmarks.workloads import make_inputs

    return make_inputs(args.workload, args.inputs, task=args.task, max_tokens=args.max_tokens)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="load one URL, print the JSON report")
    run.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000/ (127.0.0.1 only)")
    run.add_argument("-c", "--concurrency", type=int, default=8, help="closed-loop clients")
    run.add_argument("--rate", type=float, default=None,
                     help="open loop: requests per second (instead of --concurrency)")
    run.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    run.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS)
    run.add_argument("--max-in-flight", type=int, default=1024, help="open loop cap")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per request, s")
    run.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                     help="seconds after --duration before outstanding requests are cancelled")
    run.add_argument("--body", default=None, help="send this text every time")
    run.add_argument("--workload", default="varied", choices=("varied", "mixed"))
    run.add_argument("--task", default="fill-mask")
    run.add_argument("--inputs", type=int, default=512, help="distinct inputs to cycle")
    run.add_argument("--max-tokens", type=int, default=128, help="limit for --workload mixed")
    run.add_argument("--decode", choices=DECODERS, default="none",
                     help="parse every answer as a client would (msgpack: arrays via "
                     "numpy.frombuffer)")
    run.add_argument("--accept", default=None,
                     help="Accept header, e.g. application/msgpack")
    run.add_argument("--cafile", default=None,
                     help="for an https:// URL: the CA file its certificate is verified with")
    run.add_argument("--embeddings", action="store_true",
                     help='send {"input": text} as JSON (for POST /v1/embeddings)')

    ceiling = sub.add_parser("ceiling", help="the generator against a trivial server")
    ceiling.add_argument("-c", "--concurrency", type=int, default=64)
    ceiling.add_argument("--duration", type=float, default=3.0)
    ceiling.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS)

    trivial = sub.add_parser("trivial-server", help="answer a constant on 127.0.0.1:PORT")
    trivial.add_argument("--port", type=int, required=True)

    args = parser.parse_args(argv)
    if args.command == "trivial-server":
        serve_trivial(args.port)
        return 0
    if args.command == "ceiling":
        result = measure_ceiling(concurrency=args.concurrency, duration_s=args.duration,
                                 max_requests=args.max_requests)
    else:
        from urllib.parse import urlsplit

        if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--url must point at this machine (127.0.0.1)")
        inputs = _inputs_from_args(args)
        headers = dict(TEXT_HEADERS)
        if args.embeddings:
            inputs = embeddings_bodies(inputs)
            headers = dict(JSON_HEADERS)
        if args.accept:
            headers["Accept"] = args.accept
        import ssl

        common = {"timeout_s": args.timeout, "grace_s": args.grace, "headers": headers,
                  "decode": args.decode,
                  "ssl": ssl.create_default_context(cafile=args.cafile) if args.cafile else None}
        if args.rate is not None:
            coro = open_loop(args.url, inputs, rate=args.rate, duration_s=args.duration,
                             max_requests=args.max_requests, max_in_flight=args.max_in_flight,
                             **common)
        else:
            coro = closed_loop(args.url, inputs, concurrency=args.concurrency,
                               duration_s=args.duration, max_requests=args.max_requests,
                               **common)
        result = asyncio.run(coro)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
