"""How fast can the gateway write a token-level feature-extraction answer?

The answer is a float32 array [1, tokens, 384] (all-MiniLM-L6-v2). The guide's server goes
through ``tolist()`` and ``json.dumps``; batchwire keeps the array as raw bytes from the
worker and lets orjson write it straight from the buffer, or sends it as msgpack bytes.

Run: ``python -m benchmarks.json_encoding`` (prints a Markdown table; a few seconds).
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import orjson

from protocol import codec
from protocol.messages import NDArray


def _time(fn, repeat: int) -> float:
    fn()  # warm
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def measure(tokens: int, hidden: int = 384, repeat: int = 30) -> list[tuple[str, float, int]]:
    rng = np.random.default_rng(0)
    array = rng.standard_normal((1, tokens, hidden)).astype(np.float32)
    wire = NDArray.from_array(array)
    cases = {
        "json.dumps(tolist())  (the guide's path)": lambda: json.dumps(array.tolist()).encode(),
        "orjson.dumps(tolist())": lambda: orjson.dumps(array.tolist()),
        "orjson numpy from raw bytes  (batchwire JSON)": lambda: orjson.dumps(
            wire.to_numpy(), option=orjson.OPT_SERIALIZE_NUMPY),
        "msgpack raw bytes  (batchwire Accept: msgpack)": lambda: codec.encode_client(wire),
    }
    return [(name, _time(fn, repeat), len(fn())) for name, fn in cases.items()]


def main() -> None:
    print("| tokens | encoder | ms per answer | bytes | × faster than json.dumps |")
    print("| --- | --- | --- | --- | --- |")
    for tokens in (16, 128, 512):
        rows = measure(tokens)
        base = rows[0][1]
        for name, seconds, size in rows:
            print(f"| {tokens} | {name} | {seconds * 1000:.3f} | {size:,} | {base / seconds:.1f} |")


if __name__ == "__main__":
    main()
