"""Load points, interleaved: batchwire and the guide's server up at once, measured in turns.

Why: the closed-loop points measure one server after the other, minutes apart, and this
project's 2-core VMs drift by 20-30 % over minutes. Long-input embeddings at C=64, 60 s
points, measured that way twice in a row on the same code: batchwire 24.7 req/s against
the guide's 18.7 (1.32 x) with batchwire first, 20.1 against 19.7 (1.02 x) with the guide
first. A ratio between two servers needs both measured under the same drift.

How: both servers run at once (the one not being loaded sleeps). For each concurrency C,
each round gives each server one closed-loop slice of ``slice_s`` seconds at C, alternating
which goes first; a slice starts only when the previous one has drained (every request
answered or timed out), so the two never compete. One untimed warm-up slice per server
comes first. Reported, per concurrency:

* each server's throughput over all its slices (answers / summed slice time) and p50, p99
  of all its latencies pooled;
* the throughput ratio a / b, and a 95 % bootstrap interval that resamples whole rounds:
  within a round the two slices are seconds apart, so the drift moves both together.

Each slice is a :func:`benchmarks.loadgen.closed_loop` point: its throughput counts from
its start to its last answer, so a slice's drain is inside it, as in every closed-loop
point. Slices should outlast the latency at C several times over (a 3 s p99 wants slices
of 10 s or more). A non-200 answer does not stop the run; it is counted by status, as in
the closed loop.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Sequence

from benchmarks import loadgen

BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Target:
    """One server as the load generator sees it."""

    name: str
    url: str
    bodies: Sequence[bytes]
    headers: dict
    decode: str | None = None
    check: object = None


@dataclass(frozen=True)
class Slice:
    ok: int
    elapsed_s: float
    latencies_ms: list[float]
    statuses: dict[str, int]


def throughput(slices: Sequence[Slice]) -> float:
    elapsed = sum(s.elapsed_s for s in slices)
    return sum(s.ok for s in slices) / elapsed if elapsed > 0 else 0.0


def ratio(rounds: Sequence[tuple[Slice, Slice]]) -> float:
    """Throughput of the first server over the second's, over ``rounds``."""
    second = throughput([b for _, b in rounds])
    return throughput([a for a, _ in rounds]) / second if second > 0 else float("inf")


def round_bootstrap(rounds: Sequence[tuple[Slice, Slice]], *,
                    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % interval of :func:`ratio` over resamples of whole rounds."""
    if not rounds:
        raise ValueError("no rounds to resample")
    rng = random.Random(seed)
    values = sorted(ratio(rng.choices(rounds, k=len(rounds))) for _ in range(samples))
    return values[int(0.025 * samples)], values[int(0.975 * samples) - 1]


def _slice(target: Target, *, concurrency: int, duration_s: float, max_requests: int,
           timeout_s: float, grace_s: float) -> Slice:
    point = asyncio.run(loadgen.closed_loop(
        target.url, target.bodies, concurrency=concurrency, duration_s=duration_s,
        max_requests=max_requests, timeout_s=timeout_s, grace_s=grace_s,
        headers=target.headers, decode=target.decode, check=target.check,
        keep_latencies=True))
    return Slice(point["ok"], point["elapsed_s"], point["latencies_ms"], point["statuses"])


def _summary(slices: Sequence[Slice]) -> dict:
    latencies = sorted(x for s in slices for x in s.latencies_ms)
    statuses: dict[str, int] = {}
    for s in slices:
        for status, n in s.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    pct = (lambda q: None if not latencies else round(loadgen.percentile(latencies, q), 3))
    return {
        "throughput_rps": round(throughput(slices), 3),
        "ok": sum(s.ok for s in slices),
        "statuses": dict(sorted(statuses.items())),
        "elapsed_s": round(sum(s.elapsed_s for s in slices), 3),
        "latency_ms": {"p50": pct(50), "p99": pct(99)},
        "slices_rps": [round(s.ok / s.elapsed_s, 3) if s.elapsed_s > 0 else 0.0
                       for s in slices],
    }


def compare(a: Target, b: Target, *, concurrency: int, rounds: int, slice_s: float,
            warmup_s: float, max_requests: int = loadgen.DEFAULT_MAX_REQUESTS,
            timeout_s: float = loadgen.DEFAULT_TIMEOUT_S,
            grace_s: float = loadgen.DEFAULT_GRACE_S) -> dict:
    """``rounds`` rounds of one ``slice_s`` closed-loop slice per server at ``concurrency``,
    alternating which goes first, after one untimed warm-up slice each."""
    if rounds < 1 or slice_s <= 0 or concurrency < 1:
        raise ValueError("rounds, slice_s and concurrency must be positive")
    common = dict(concurrency=concurrency, max_requests=max_requests, timeout_s=timeout_s,
                  grace_s=grace_s)
    if warmup_s > 0:
        for target in (a, b):
            _slice(target, duration_s=warmup_s, **common)
    measured: list[tuple[Slice, Slice]] = []
    for turn in range(rounds):
        order = (a, b) if turn % 2 == 0 else (b, a)
        got = {t.name: _slice(t, duration_s=slice_s, **common) for t in order}
        measured.append((got[a.name], got[b.name]))
    low, high = round_bootstrap(measured)
    return {
        "servers": [a.name, b.name],
        "concurrency": concurrency, "rounds": rounds, "slice_s": slice_s,
        "warmup_s": warmup_s,
        a.name: _summary([x for x, _ in measured]),
        b.name: _summary([y for _, y in measured]),
        "throughput_ratio": {"of": f"{a.name} / {b.name}", "value": round(ratio(measured), 4),
                             "95": [round(low, 4), round(high, 4)]},
    }
