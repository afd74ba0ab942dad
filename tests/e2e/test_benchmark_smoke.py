"""The benchmark suite runs end to end on its tiny configuration (``--quick``).

Speed is asserted in the benchmark report, never here: this only checks that every server
starts, answers 200s under load (each answer parsed by the load generator: JSON, and for the
token-level workload also msgpack arrays through numpy.frombuffer), and that results.json,
report.md and a PNG are written.
starlette, uvicorn and matplotlib are part of the test install: if they are missing the
test fails (it does not skip), because the benchmark could not run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("batchwire", "guide", "guide-batching")
#: --quick's result rows per workload: the token-level check runs one batchwire process,
#: asked for JSON and for msgpack answers.
QUICK_ROWS = {
    "fill-mask-tiny-varied": SERVERS,
    "feature-extraction-tiny-varied": ("batchwire", "batchwire-msgpack"),
}
#: --quick takes about a minute on a busy 2-core machine; past this something hangs.
TIMEOUT_S = 170

pytestmark = pytest.mark.e2e


def test_benchmark_dependencies_importable():
    for name in ("starlette", "uvicorn", "matplotlib", "aiohttp"):
        __import__(name)  # ImportError fails the test: the bench needs them


def test_quick_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the runner stops the server it is measuring before it exits.
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"benchmarks.run --quick took over {TIMEOUT_S} s:\n{output[-5000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-5000:]}"

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["quick"] is True
    assert results["machine"]["cpu_count"]
    assert results["command"].startswith("python -m benchmarks.run")
    assert results["loadgen_ceiling"]["throughput_rps"] > 0

    assert [w["name"] for w in results["workloads"]] == list(QUICK_ROWS), "wrong workloads"
    for workload in results["workloads"]:
        ceiling = workload["ceiling"]
        assert "error" not in ceiling, ceiling
        assert ceiling["best_items_per_s"] > 0
        assert [r["batch_size"] for r in ceiling["batch_sizes"]] == [1, 2, 4, 8, 16, 32, 64]
        assert sorted(workload["servers"]) == sorted(QUICK_ROWS[workload["name"]])
        for name in QUICK_ROWS[workload["name"]]:
            server = workload["servers"][name]
            assert "error" not in server, server.get("error")
            assert server["points"], f"{name}: no points"
            for point in server["points"]:
                where = f"{workload['name']} {name} C={point.get('concurrency')}"
                assert point["throughput_rps"] > 0, where
                assert point["statuses"].get("200", 0) > 0, (where, point["statuses"])
                assert point["ok"] == point["statuses"]["200"], where
                assert point["latency_ms"]["p50"] is not None, where
                assert point["decode"] == ("msgpack" if name.endswith("msgpack") else "json")
                assert "bad-answer" not in point["statuses"], (where, point["statuses"])
        # batchwire says how big its batches were.
        assert all(p["mean_batch_size"] >= 1 for p in workload["servers"]["batchwire"]["points"])

    report = (out / "report.md").read_text()
    for name in (*SERVERS, "batchwire-msgpack"):
        assert f"| {name} |" in report
    assert "## Machine and command" in report
    pngs = list(out.glob("*.png"))
    assert pngs, "no plot written"
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
