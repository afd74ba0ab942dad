"""Overload with deadlines: how many requests one worker answers in time when it is offered
more than it can compute and every request carries ``X-Timeout-Ms``.

For each source tree given (``--source NAME=DIR``, so two commits can be compared in one
run on one machine), ``batchwire serve`` with one worker starts from that tree, and:

1. its capacity is measured: a closed loop of ``--capacity-clients`` clients with no
   deadline, requests answered per second;
2. for each deadline in ``--timeouts-ms`` and each load in ``--loads`` (multiples of that
   capacity), an open loop sends at that rate for ``--duration`` seconds;
3. the worker's ``answered`` and ``skipped`` counters (``/info``) are read before and after,
   so ``computed - 200s`` is the work done for answers that arrived after their 504;
   where a tree's ``/info`` has ``deadline_missed``, its 504s are split by where each input
   was when its deadline ran out (the gateway's queue, refused by the worker, in flight).

Output: a JSON file (``--out``) and a Markdown table on stdout. Speed is reported here, never
asserted; ``tests/e2e/test_benchmark_smoke.py`` runs it on the tiny model.

    python -m benchmarks.deadlines --source before=/tmp/before --source after=.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from benchmarks import loadgen
from benchmarks.models import MODEL_KEYS, get_model
from benchmarks.procs import REPO_ROOT, ServerProcess, bench_env, free_port
from benchmarks.workloads import make_inputs

#: Seconds to wait for the worker's counters to settle after a load point: answers to
#: requests the gateway already timed out still arrive, and are counted, after it ends.
SETTLE_S = 10.0


def _info(base_url: str) -> dict:
    with urllib.request.urlopen(base_url + "/info", timeout=10) as resp:
        return json.loads(resp.read())


def _counts(base_url: str) -> tuple[int, int, dict]:
    """The worker's answered and skipped counts, and the gateway's 504s for a deadline by
    where (empty from a tree older than that count)."""
    info = _info(base_url)
    workers = info["workers"]
    return (sum(w["answered"] for w in workers), sum(w["skipped"] for w in workers),
            info.get("deadline_missed", {}))


def _settle(base_url: str) -> tuple[int, int, dict]:
    """The counters once nothing is queued or in flight any more."""
    end = time.monotonic() + SETTLE_S
    while time.monotonic() < end:
        info = _info(base_url)
        if not info["queue_depth"] and not sum(w["in_flight"] for w in info["workers"]):
            break
        time.sleep(0.1)
    return _counts(base_url)


def start_server(name: str, source: Path, model, args: argparse.Namespace) -> ServerProcess:
    env = bench_env()
    env["PYTHONPATH"] = str(source) + os.pathsep + env["PYTHONPATH"]
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--model", model.path, "--task", model.task, "--workers", "1",
            "--torch-threads", str(args.torch_threads), "--log-level", "WARNING"]
    server = ServerProcess(name, argv, port, args.logs / f"{name}.log", env=env, cwd=source)
    server.start()
    server.wait_ready(args.ready_timeout, b"Paris is the [MASK] of France.")
    return server


def measure(server: ServerProcess, inputs: list[str], args: argparse.Namespace) -> dict:
    url = server.base_url + "/"
    capacity = asyncio.run(loadgen.closed_loop(
        url, inputs, concurrency=args.capacity_clients, duration_s=args.duration))
    rate_ok = capacity["throughput_rps"]
    points = []
    for timeout_ms in args.timeouts_ms:
        for load in args.loads:
            before = _settle(server.base_url)
            point, background = asyncio.run(_offer(url, inputs, load * rate_ok, timeout_ms,
                                                   args))
            after = _settle(server.base_url)
            answered, skipped = after[0] - before[0], after[1] - before[1]
            computed = answered - skipped
            in_time = point["statuses"].get("200", 0)
            row = {
                "timeout_ms": timeout_ms, "load": load, "rate": round(load * rate_ok, 1),
                "offered": point["offered"], "in_time": in_time,
                "statuses": point["statuses"], "computed": computed,
                "p50_ms": point["latency_ms"]["p50"], "p99_ms": point["latency_ms"]["p99"],
                "deadline_missed": {where: count - before[2].get(where, 0)
                                    for where, count in after[2].items()},
            }
            if background is not None:
                row["background"] = {
                    "timeout_ms": args.background_timeout_ms, "offered": background["offered"],
                    "in_time": background["statuses"].get("200", 0),
                    "statuses": background["statuses"],
                    "p50_ms": background["latency_ms"]["p50"],
                    "p99_ms": background["latency_ms"]["p99"]}
                in_time += row["background"]["in_time"]
            row["computed_late"] = max(computed - in_time, 0)
            points.append(row)
            print(f"  {server.name}: {timeout_ms} ms, {load} x capacity: {row['in_time']} of "
                  f"{point['offered']} in time, {computed} computed", file=sys.stderr)
    return {"capacity_rps": rate_ok, "points": points}


async def _offer(url: str, inputs: list[str], rate: float, timeout_ms: int,
                 args: argparse.Namespace) -> tuple[dict, dict | None]:
    """An open loop at ``rate`` with ``timeout_ms``; with ``--background-timeout-ms``, a
    share of that rate goes to a second loop, at the same time, with the longer deadline."""
    def loop(share: float, timeout: int):
        return loadgen.open_loop(
            url, inputs, rate=share * rate, duration_s=args.duration,
            headers={**loadgen.TEXT_HEADERS, "X-Timeout-Ms": str(timeout)})

    if not args.background_timeout_ms:
        return await loop(1.0, timeout_ms), None
    share = args.background_share
    point, background = await asyncio.gather(loop(1.0 - share, timeout_ms),
                                             loop(share, args.background_timeout_ms))
    return point, background


def background_table(results: dict) -> str:
    lines = ["| source | deadlines | offered (x capacity) | short: in time of offered | "
             "long: in time of offered | long: p50 / p99 ms |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, run in results["sources"].items():
        for p in run["points"]:
            bg = p["background"]
            lines.append(
                f"| {name} | {p['timeout_ms']} / {bg['timeout_ms']} ms | "
                f"{p['offered'] + bg['offered']} ({p['load']}x {run['capacity_rps']:.0f}/s) | "
                f"{p['statuses'].get('200', 0)} of {p['offered']} | {bg['in_time']} of "
                f"{bg['offered']} | {bg['p50_ms']} / {bg['p99_ms']} |")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["| source | deadline | offered (x capacity) | answered in time | 503 | 504 | "
             "504 where: gateway queue / worker refused / in flight | computed | "
             "computed, answer late | p99 of those in time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, run in results["sources"].items():
        for p in run["points"]:
            lines.append(
                f"| {name} | {p['timeout_ms']} ms | {p['offered']} ({p['load']}x "
                f"{run['capacity_rps']:.0f}/s) | {p['in_time']} | "
                f"{p['statuses'].get('503', 0)} | {p['statuses'].get('504', 0)} | "
                f"{_where(p.get('deadline_missed'))} | {p['computed']} | {p['computed_late']} | "
                f"{p['p99_ms'] if p['p99_ms'] is not None else '-'} |")
    return "\n".join(lines)


def _where(missed: dict | None) -> str:
    if not missed:
        return "-"
    return " / ".join(str(missed.get(where, 0))
                      for where in ("gateway_queue", "worker_refused", "in_flight"))


def _source(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=DIR")
    folder = Path(path).resolve()
    if not (folder / "gateway" / "__main__.py").is_file():
        raise argparse.ArgumentTypeError(f"{folder} holds no batchwire source tree")
    return name, folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deadlines",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=_source, action="append", default=[],
                        help="NAME=DIR: a batchwire source tree to measure (repeatable; "
                             "default: this one, as 'this')")
    parser.add_argument("--model", default="minilm-fill-mask", choices=MODEL_KEYS)
    parser.add_argument("--timeouts-ms", type=lambda t: [int(x) for x in t.split(",")],
                        default=[150, 250, 1000])
    parser.add_argument("--loads", type=lambda t: [float(x) for x in t.split(",")],
                        default=[0.5, 2.0], help="offered rates, as multiples of capacity")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per point")
    parser.add_argument("--background-timeout-ms", type=int, default=0,
                        help="send --background-share of each point's rate at the same time "
                             "with this longer deadline (clients with short deadlines beside "
                             "others with long ones); 0: every request has the point's")
    parser.add_argument("--background-share", type=float, default=0.5)
    parser.add_argument("--capacity-clients", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--inputs", type=int, default=256, help="distinct inputs to cycle")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deadlines.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sources = args.source or [("this", REPO_ROOT)]
    args.logs = args.out.parent / "deadlines-logs"
    model = get_model(args.model)
    inputs = make_inputs("varied", args.inputs, task=model.task, max_tokens=model.max_tokens)
    results = {"model": model.key, "command": "python -m benchmarks.deadlines "
               + " ".join(argv if argv is not None else sys.argv[1:]), "sources": {}}
    for name, source in sources:
        server = start_server(name, source, model, args)
        try:
            results["sources"][name] = measure(server, inputs, args)
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if args.background_timeout_ms:
        print()
        print(background_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
