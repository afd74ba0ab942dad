"""What HTTPS (``--tls-cert``) costs: the same `batchwire serve` twice, one plain HTTP and
one HTTPS with a certificate from a throwaway CA (trustme), both up at once and measured
alternately with the closed-loop load generator, so that the machine's drift falls on both.

Usage::

    python -m benchmarks.tls --out benchmarks/results/tls-overhead \\
        --models tiny-fill-mask,minilm-fill-mask

Writes ``results.json``: one row per model, scheme, concurrency and round (requests/s,
p50 and p99 ms), and prints each row as it is measured. The certificate is ECDSA P-256
(trustme's default); each client keeps its connections, so handshakes are not what is measured,
the encryption of every request and answer is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from benchmarks.loadgen import closed_loop
from benchmarks.models import get_model
from benchmarks.procs import REPO_ROOT, bench_env, free_port
from benchmarks.workloads import make_inputs

SCHEMES = ("http", "https")


def make_certificate(out: Path) -> tuple[str, str, ssl.SSLContext]:
    """(cert file, key file, a client context trusting them) for 127.0.0.1."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert_file, key_file = out / "server.pem", out / "server.key"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key_file))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return str(cert_file), str(key_file), client


def wait_ready(url: str, client: ssl.SSLContext, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "ready", timeout=2, context=client) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready within {timeout_s:g} s")
        time.sleep(0.2)


def measure(model_key: str, out: Path, cert: str, key: str, client: ssl.SSLContext, *,
            points: Sequence[tuple[int, float, int]]) -> list[dict]:
    """``points``: (concurrency, seconds per run, rounds); each round runs both schemes, in
    turns that alternate which goes first."""
    model = get_model(model_key)
    inputs = make_inputs("varied", 512, task=model.task, max_tokens=model.max_tokens)
    procs, urls = [], {}
    try:
        for scheme in SCHEMES:
            port = free_port()
            tls = ["--tls-cert", cert, "--tls-key", key] if scheme == "https" else []
            with open(out / f"{model_key}-{scheme}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "gateway", "serve", "--model", model.path,
                     "--port", str(port), "--log-level", "WARNING", *tls],
                    env=bench_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT))
            urls[scheme] = f"{scheme}://127.0.0.1:{port}/"
        for url in urls.values():
            wait_ready(url, client)
        rows = []
        for concurrency, duration_s, rounds in points:
            for round_ in range(rounds):
                for scheme in SCHEMES if round_ % 2 == 0 else SCHEMES[::-1]:
                    result = asyncio.run(closed_loop(
                        urls[scheme], inputs, concurrency=concurrency, duration_s=duration_s,
                        ssl=client if scheme == "https" else None))
                    row = {"model": model_key, "scheme": scheme, "concurrency": concurrency,
                           "round": round_, "rps": result["throughput_rps"],
                           "p50_ms": result["latency_ms"]["p50"],
                           "p99_ms": result["latency_ms"]["p99"],
                           "statuses": result["statuses"]}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        return rows
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="tiny-fill-mask,minilm-fill-mask")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=4, help="rounds at C=1 (one fewer at C=64)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cert, key, client = make_certificate(args.out)
    points = [(1, args.duration, args.rounds), (64, args.duration, max(1, args.rounds - 1))]
    rows = []
    for model_key in args.models.split(","):
        rows += measure(model_key, args.out, cert, key, client, points=points)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
