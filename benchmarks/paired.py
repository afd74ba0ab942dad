"""C = 1, paired: batchwire and the guide's server up at once, each input sent to both in turn.

Why a second way to measure C = 1: on the 2-core VMs this project runs on, the machine's
own speed drifts by 20-30 % over minutes (a model call of a 260-token text took 31 ms in
one run and 42 ms in the next, on the same code). The closed-loop points measure one server
after the other, so at C = 1 that drift lands between the two servers and is larger than
the difference the issue's target is about (batchwire's p50 within 1 ms of the guide's).

Pairing takes the drift out. Both servers run at the same time (the one not being asked
sleeps), and a sequential client sends a block of inputs to one server, then the same block
to the other, alternating which goes first. Each input's two latencies, taken seconds
apart, are compared. Reported per workload:

* each server's p50 over the same requests, and the difference of the two p50s (the
  issue's target is stated on it) with a 95 % bootstrap interval;
* the paired difference, batchwire minus the guide, request by request: its median, with
  a 95 % bootstrap interval, and its mean;
* ``rounds``: how often each input was sent to each server (the first pass is a warm-up
  and not counted, so every counted request reuses whatever the server built for that
  input's shape on an earlier pass, as a long-running server would).

The intervals resample whole blocks (a block's pairs, for one pass), not single pairs: the
machine's speed moves between one server's half of a block and the other's, and that moves
all the block's pairs together. Resampling single pairs made intervals too narrow to
trust: in an A/A check (two identical batchwire servers, long-input embeddings) the
per-pair median came out +1.21, +0.49 and -1.08 ms in three runs, two of them with
intervals that left out zero.

The client is ``http.client`` on one keep-alive connection per server: the same client for
both, so its own cost cancels in the difference. Every answer is parsed and its shape
checked, as the closed loop does; a non-200 or a bad answer fails the comparison.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

#: Inputs per block: long enough that a block outlasts the sleeping server's wake-up,
#: short enough that the machine's speed does not drift within one.
DEFAULT_BLOCK = 10
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Target:
    """One server as the paired client sees it."""

    name: str
    host: str
    port: int
    path: str
    bodies: Sequence[bytes]
    headers: dict
    check: Callable[[object], bool] | None = None


class PairedFailure(RuntimeError):
    pass


def _ask(conn: http.client.HTTPConnection, target: Target, body: bytes) -> float:
    started = time.perf_counter()
    conn.request("POST", target.path, body, target.headers)
    resp = conn.getresponse()
    payload = resp.read()
    elapsed = time.perf_counter() - started
    if resp.status != 200:
        raise PairedFailure(f"{target.name} answered {resp.status}: {payload[:300]!r}")
    parsed = json.loads(payload)
    if target.check is not None and not target.check(parsed):
        raise PairedFailure(f"{target.name} answered a 200 of the wrong shape: {payload[:300]!r}")
    return elapsed * 1000.0


Pair = tuple[float, float]


def block_bootstrap(blocks: Sequence[Sequence[Pair]], statistic: Callable[[list[Pair]], float],
                    *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % interval of ``statistic`` over resamples of whole ``blocks`` of pairs."""
    if not blocks or not all(blocks):
        raise ValueError("no pairs to resample")
    rng = random.Random(seed)
    values = sorted(statistic([pair for block in rng.choices(blocks, k=len(blocks))
                               for pair in block]) for _ in range(samples))
    return values[int(0.025 * samples)], values[int(0.975 * samples) - 1]


def median_of_differences(pairs: Sequence[Pair]) -> float:
    return statistics.median(x - y for x, y in pairs)


def difference_of_medians(pairs: Sequence[Pair]) -> float:
    return statistics.median(x for x, _ in pairs) - statistics.median(y for _, y in pairs)


def compare(a: Target, b: Target, *, inputs: int, rounds: int, block: int = DEFAULT_BLOCK,
            timeout_s: float = 60.0) -> dict:
    """Send inputs ``0..inputs-1`` to ``a`` and ``b`` in alternating blocks, ``rounds``
    counted passes after one warm-up pass; -> latencies and the paired difference a - b."""
    if len(a.bodies) != len(b.bodies):
        raise ValueError("both servers must be sent the same inputs")
    count = min(inputs, len(a.bodies))
    if count < 1 or rounds < 1 or block < 1:
        raise ValueError("inputs, rounds and block must be at least 1")
    conns = {t.name: http.client.HTTPConnection(t.host, t.port, timeout=timeout_s)
             for t in (a, b)}
    blocks: list[list[Pair]] = []
    started = time.monotonic()
    try:
        turn = 0
        for rnd in range(rounds + 1):
            for first in range(0, count, block):
                order = (a, b) if turn % 2 == 0 else (b, a)
                turn += 1
                ms: dict[str, list[float]] = {}
                for target in order:
                    ms[target.name] = [_ask(conns[target.name], target, target.bodies[i])
                                       for i in range(first, min(first + block, count))]
                if rnd > 0:
                    blocks.append(list(zip(ms[a.name], ms[b.name])))
    finally:
        for conn in conns.values():
            conn.close()
    pairs = [pair for blk in blocks for pair in blk]
    first, second = [x for x, _ in pairs], [y for _, y in pairs]
    diffs = [x - y for x, y in pairs]
    low, high = block_bootstrap(blocks, median_of_differences)
    p50_low, p50_high = block_bootstrap(blocks, difference_of_medians)
    return {
        "servers": [a.name, b.name],
        "inputs": count, "rounds": rounds, "block": block,
        "requests_per_server": len(diffs),
        "blocks_resampled": len(blocks),
        "wall_s": round(time.monotonic() - started, 2),
        "p50_ms": {a.name: round(statistics.median(first), 3),
                   b.name: round(statistics.median(second), 3)},
        "mean_ms": {a.name: round(statistics.fmean(first), 3),
                    b.name: round(statistics.fmean(second), 3)},
        "p50_difference_ms": {
            "of": f"p50 {a.name} - p50 {b.name}",
            "value": round(difference_of_medians(pairs), 3),
            "95": [round(p50_low, 3), round(p50_high, 3)],
        },
        "difference_ms": {
            "of": f"{a.name} - {b.name}",
            "median": round(median_of_differences(pairs), 3),
            "median_95": [round(low, 3), round(high, 3)],
            "mean": round(statistics.fmean(diffs), 3),
        },
    }
