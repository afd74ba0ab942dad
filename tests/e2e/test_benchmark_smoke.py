"""The benchmark suite runs end to end on its tiny configuration (``--quick``).

Speed is asserted in the benchmark report, never here: this only checks that every server
starts, answers 200s under load (each answer parsed by the load generator: JSON, and for the
token-level workload also msgpack arrays through numpy.frombuffer), and that results.json,
report.md and a PNG are written.
starlette, uvicorn and matplotlib are part of the test install: if they are missing the
test fails (it does not skip), because the benchmark could not run.

The token-aware batching comparison (issue 7) is checked without starting servers: the
count-only variant's command line, the 5-400-token inputs against the real tokenizer, and
the report's comparison table from a made-up results.json.
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
#: --quick (with a small paired C=1 comparison and one interleaved point) takes about a minute on a
#: busy 2-core machine; past this something hangs.
TIMEOUT_S = 200

pytestmark = pytest.mark.e2e


def test_benchmark_dependencies_importable():
    for name in ("starlette", "uvicorn", "matplotlib", "aiohttp"):
        __import__(name)  # ImportError fails the test: the bench needs them


def test_quick_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out),
         "--paired-c1", "--paired-inputs", "6", "--paired-rounds", "1",
         "--interleaved", "4", "--interleaved-rounds", "1", "--interleaved-slice", "0.5"],
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
    # The paired C=1 comparison runs where both batchwire and the guide are rows.
    fill_mask, features = results["workloads"]
    pair = fill_mask["paired_c1"]
    assert "error" not in pair, pair
    assert pair["servers"] == ["batchwire", "guide"] and pair["requests_per_server"] == 6
    assert all(pair["p50_ms"][name] > 0 for name in pair["servers"])
    low, high = pair["difference_ms"]["median_95"]
    assert low <= pair["difference_ms"]["median"] <= high
    assert "paired_c1" not in features
    # So do the interleaved load points.
    [load] = fill_mask["interleaved"]
    assert "error" not in load, load
    assert load["concurrency"] == 4 and load["servers"] == ["batchwire", "guide"]
    for name in load["servers"]:
        assert load[name]["ok"] > 0 and load[name]["ok"] == load[name]["statuses"]["200"]
    low, high = load["throughput_ratio"]["95"]
    assert low <= load["throughput_ratio"]["value"] <= high
    assert "interleaved" not in features
    # Paired and interleaved compared the same two servers: started once for both.
    logs = {path.name for path in (out / "raw").glob("fill-mask-tiny-varied.*.log")}
    assert {"fill-mask-tiny-varied.batchwire.paired+interleaved.log",
            "fill-mask-tiny-varied.guide.paired+interleaved.log"} <= logs, logs
    assert not any(name.endswith((".paired.log", ".interleaved.log")) for name in logs), logs

    report = (out / "report.md").read_text()
    for name in (*SERVERS, "batchwire-msgpack"):
        assert f"| {name} |" in report
    assert "## Machine and command" in report
    assert "### C=1, paired" in report and "batchwire - guide, request by request" in report
    assert "### Interleaved load" in report and "| C | batchwire req/s | guide req/s |" in report
    pngs = list(out.glob("*.png"))
    assert pngs, "no plot written"
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_overload_with_deadlines_benchmark_runs_end_to_end(tmp_path):
    """``benchmarks.deadlines`` on the tiny model, one short point with a second class of
    clients asking for a longer deadline: the server starts from the named source tree, and
    every offered request is counted once, in time or not, and every 504 once by where."""
    out = tmp_path / "deadlines.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.deadlines", "--model", "tiny-fill-mask",
         "--source", f"here={REPO_ROOT}", "--duration", "1", "--timeouts-ms", "200",
         "--loads", "1.5", "--capacity-clients", "8", "--background-timeout-ms", "5000",
         "--out", str(out)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-5000:]
    results = json.loads(out.read_text())
    run = results["sources"]["here"]
    assert run["capacity_rps"] > 0
    [point] = run["points"]
    assert point["timeout_ms"] == 200 and point["load"] == 1.5
    assert sum(point["statuses"].values()) == point["offered"] > 0, point
    assert set(point["statuses"]) <= {"200", "503", "504"}, point
    background = point["background"]
    assert background["timeout_ms"] == 5000
    assert sum(background["statuses"].values()) == background["offered"] > 0, background
    assert background["in_time"] == background["statuses"].get("200", 0)
    assert point["computed"] >= point["in_time"] + background["in_time"]
    assert point["in_time"] == point["statuses"].get("200", 0)
    # Each 504 of either class is counted once by where its input was.
    assert set(point["deadline_missed"]) == {"gateway_queue", "worker_refused", "in_flight"}
    assert sum(point["deadline_missed"].values()) == (point["statuses"].get("504", 0)
                                                      + background["statuses"].get("504", 0))
    assert "| here | 200 ms |" in proc.stdout and "| here | 200 / 5000 ms |" in proc.stdout


# -- token-aware vs count-only batching (issue 7), no servers ----------------------------------
def _resolve(*argv: str):
    from benchmarks import run

    return run.resolve(run.build_parser().parse_args(list(argv)))


def test_count_only_variant_is_batchwire_plus_its_flags():
    from benchmarks import run
    from benchmarks.models import BenchModel

    args = _resolve("--bw-args", "--max-batch-tokens 4096", "--bw-variant",
                    "tok1k=--max-batch-tokens 1024")
    model = BenchModel("m", "/model", "fill-mask", 512, "a model", 32)
    workload = run.WORKLOADS["fill-mask-minilm-mixed400"]
    token_aware = run.server_argv("batchwire", model, 8000, args, workload)
    count_only = run.server_argv("batchwire-count", model, 8000, args, workload)
    tok1k = run.server_argv("batchwire-tok1k", model, 8000, args, workload)
    # The same server and flags; the variant's come last, so they win over --bw-args.
    assert token_aware[-2:] == ["--max-batch-tokens", "4096"]
    assert count_only == token_aware + ["--max-batch-tokens", "0", "--no-length-buckets"]
    assert tok1k == token_aware + ["--max-batch-tokens", "1024"]
    assert token_aware[1:3] == ["-m", "gateway"]

    # The mixed400 workloads run both by default, each its own process; the variant is a
    # JSON row asked like batchwire (embeddings: POST /v1/embeddings).
    assert run.workload_rows(workload, _resolve()) == [
        ("batchwire", ["batchwire"]), ("batchwire-count", ["batchwire-count"]),
        ("guide", ["guide"]), ("guide-batching", ["guide-batching"])]
    embeddings = run.WORKLOADS["embeddings-minilm-mixed400"]
    assert run.client_for("batchwire-count", embeddings, model, ["x"], args).path == \
        "/v1/embeddings"
    # Elsewhere only when asked for; --bw-variant rows always run.
    varied = run.WORKLOADS["fill-mask-minilm-varied"]
    assert [p for p, _ in run.workload_rows(varied, _resolve())] == list(run.JSON_ROWS)
    assert run.workload_rows(varied, _resolve("--servers", "batchwire,batchwire-count")) == [
        ("batchwire", ["batchwire"]), ("batchwire-count", ["batchwire-count"])]
    assert run.workload_rows(varied, args)[-1] == ("batchwire-tok1k", ["batchwire-tok1k"])


def test_mixed400_inputs_span_5_to_400_tokens():
    from tokenizers import Tokenizer

    from benchmarks import run
    from benchmarks.workloads import make_inputs, tokens_by_construction
    from worker.runner import default_model_path

    tokenizer = Tokenizer.from_file(str(Path(default_model_path()) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    for name in ("fill-mask-minilm-mixed400", "embeddings-minilm-mixed400"):
        workload = run.WORKLOADS[name]
        lo, hi = workload.input_tokens(512)
        task = "fill-mask" if workload.answer == "fill-mask" else "feature-extraction"
        inputs = make_inputs(workload.shape, 512, task=task, max_tokens=hi, min_tokens=lo)
        counts = [len(e.ids) for e in tokenizer.encode_batch(inputs)]
        assert (min(counts), max(counts)) == (5, 400), name
        assert counts == [tokens_by_construction(x) for x in inputs], name
        # An even spread: every 50-token band holds about an eighth of the inputs.
        bands = [sum(1 for c in counts if b <= c < b + 50) for b in range(0, 400, 50)]
        assert min(bands) >= 50, bands
        assert all(x.count("[MASK]") == (task == "fill-mask") for x in inputs)


def _point(c: int, rps: float, p50: float, p99: float, batch: float | None = None) -> dict:
    return {"mode": "closed", "concurrency": c, "throughput_rps": rps, "requests": 100,
            "bytes_received": 1000, "statuses": {"200": 100},
            "latency_ms": {"p50": float(p50), "p90": float(p99), "p99": float(p99),
                           "max": float(p99)},
            "mean_batch_size": batch, "decode": "json"}


def test_report_compares_token_aware_with_count_only():
    from benchmarks.report import batching_table, render_markdown

    servers = {
        "batchwire": {"points": [_point(32, 30.0, 900, 1500, 5.1),
                                 _point(64, 32.0, 1800, 2500, 5.5)],
                      "batching": [{"device": "cpu", "max_batch_size": 8,
                                    "max_batch_tokens": 2048}]},
        "batchwire-count": {"points": [_point(32, 20.0, 1400, 3000, 8.0),
                                       _point(64, 20.0, 3000, 5000, 8.0)],
                            "variant_flags": ["--max-batch-tokens", "0", "--no-length-buckets"]},
        "guide": {"points": [_point(32, 15.0, 2000, 2600), _point(64, 16.0, 4000, 4400)]},
    }
    workload = {"name": "fill-mask-minilm-mixed400", "description": "mixed", "answer": "fill-mask",
                "model": {"key": "minilm-fill-mask", "description": "d", "task": "fill-mask",
                          "max_tokens": 512},
                "inputs": 512, "input_words": {"min": 2, "max": 397, "mean": 199.5},
                "input_tokens": {"min": 5, "max": 400, "mean": 202.5},
                "ceiling": None, "servers": servers}
    table = "\n".join(batching_table(workload))
    assert "| 64 | batchwire | 32.0 | 1.60 | 2.00 | 1,800.0 | 2,500.0 | 0.50 | 5.5 |" in table
    assert "| 64 | batchwire-count | 20.0 | 1.00 | 1.25 |" in table
    assert "| 32 | guide | 15.0 | 0.75 | 1.00 |" in table
    assert "- C=32: token-aware = 1.50 × count-only throughput; p99 1500 vs 3000 ms (0.50 ×)" \
        in table
    assert "max_batch_tokens 2048" in table
    assert "`--max-batch-tokens 0 --no-length-buckets`" in table
    # Without a count-only row there is no comparison.
    assert batching_table({**workload, "servers": {"batchwire": servers["batchwire"]}}) == []

    results = {"command": "python -m benchmarks.run", "machine": {}, "workloads": [workload],
               "config": {"warmup_s": 2, "duration_s": 30, "max_requests": 1, "inputs": 512,
                          "batchwire": {"workers": 1, "max_batch_size": 0, "max_delay_ms": 2,
                                        "variants": {"batchwire-count": ["--max-batch-tokens",
                                                                         "0"]}}}}
    report = render_markdown(results, {})
    assert "### Token-aware vs count-only batching" in report
    assert "5-400 tokens with [CLS] and [SEP]" in report


# -- the GPU section's preset, no servers ------------------------------------------------------
def test_gpu_preset_puts_every_server_and_the_ceiling_on_the_gpu(tmp_path):
    from benchmarks import run
    from benchmarks.models import BenchModel

    args = _resolve("--gpu")
    assert args.workloads == list(run.GPU_WORKLOADS)
    # cuda:N, the form batchwire's --devices takes (it refuses a bare "cuda").
    assert args.device == "cuda:0" and args.concurrency == [1, 64, 256]
    assert max(args.batch_sizes) == 256
    model = BenchModel("bert-base-fill-mask", "/model", "fill-mask", 512, "a model", 768)
    workload = run.WORKLOADS["fill-mask-bertbase-varied"]
    bw = run.server_argv("batchwire", model, 8000, args, workload)
    assert bw[bw.index("--devices") + 1] == "cuda:0"
    for guide in ("guide", "guide-batching"):
        argv = run.server_argv(guide, model, 8000, args, workload)
        assert argv[argv.index("--device") + 1] == "cuda:0"
    ceiling = run.ceiling_argv(model, workload, args, tmp_path / "c.json")
    assert ceiling[ceiling.index("--device") + 1] == "cuda:0"
    # Another GPU, or the same workloads on the CPU, by --device; each default stays
    # overridable.
    args = _resolve("--gpu", "--device", "cuda:1", "--concurrency", "64")
    assert run.server_argv("batchwire", model, 8000, args, workload)[-2:] == ["--devices",
                                                                              "cuda:1"]
    assert args.concurrency == [64]
    # A CPU run passes no device at all: each server keeps its own default.
    args = _resolve()
    assert "cpu" == args.device
    assert "--devices" not in run.server_argv("batchwire", model, 8000, args, workload)
    assert "--device" not in run.server_argv("guide", model, 8000, args, workload)
    assert "--device" not in run.ceiling_argv(model, workload, args, tmp_path / "c.json")
    assert not set(run.BERTBASE_WORKLOADS) & set(run.DEFAULT_WORKLOADS)
    for bad in (["--gpu", "--quick"], ["--device", "cuda"], ["--device", "gpu0"]):
        with pytest.raises(SystemExit):
            _resolve(*bad)


def test_interleaved_points_are_asked_for_and_checked():
    assert _resolve().interleaved == []  # off unless asked
    args = _resolve("--interleaved", "32,64")
    assert (args.interleaved, args.interleaved_rounds, args.interleaved_slice) == ([32, 64], 8,
                                                                                   10.0)
    assert args.interleaved_servers == ["batchwire", "guide"]
    args = _resolve("--interleaved", "64", "--bw-variant", "bf16=--dtype bfloat16",
                    "--interleaved-servers", "batchwire-bf16,batchwire")
    assert args.interleaved_servers == ["batchwire-bf16", "batchwire"]
    for bad in (["--interleaved", "0"], ["--interleaved", "64", "--interleaved-rounds", "0"],
                ["--interleaved", "64", "--interleaved-slice", "0"],
                ["--interleaved-servers", "batchwire"],
                ["--interleaved-servers", "batchwire,batchwire"],
                ["--interleaved-servers", "batchwire,nonesuch"]):
        with pytest.raises(SystemExit):
            _resolve(*bad)


def test_bert_from_config_is_a_working_fill_mask_model(tmp_path):
    """The bert-base build path at a small shape (the real one is 440 MB): seeded random
    weights, MiniLM's tokenizer files, a fill-mask pipeline that answers."""
    import json as json_

    from transformers import pipeline

    from benchmarks.models import (
        BERT_BASE,
        TOKENIZER_FILES,
        build_bert_from_config,
        tokenizer_source,
    )

    assert (BERT_BASE["hidden_size"], BERT_BASE["num_hidden_layers"]) == (768, 12)
    build_bert_from_config(tmp_path, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64)
    config = json_.loads((tmp_path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 1)
    assert config["max_position_embeddings"] == 512
    vocab = (tokenizer_source() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert config["vocab_size"] == len(vocab)
    assert all((tmp_path / name).is_file() for name in TOKENIZER_FILES)
    fill = pipeline("fill-mask", model=str(tmp_path), device="cpu")
    answers = fill("paris is the [MASK] of france")
    assert len(answers) == 5 and all(a["token_str"] for a in answers)


def test_dtype_reaches_every_server_and_the_ceiling_or_none_of_them(tmp_path):
    from benchmarks import run
    from benchmarks.models import BenchModel

    model = BenchModel("minilm-features", "/model", "feature-extraction", 512, "a model", 384)
    workload = run.WORKLOADS["embeddings-minilm-varied"]

    def argvs(args):
        return {**{name: run.server_argv(name, model, 8000, args, workload)
                   for name in ("batchwire", "guide", "guide-batching")},
                "ceiling": run.ceiling_argv(model, workload, args, tmp_path / "c.json")}

    for name, argv in argvs(_resolve("--dtype", "bfloat16")).items():
        assert argv[argv.index("--dtype") + 1] == "bfloat16", name
    for name, argv in argvs(_resolve()).items():
        assert "--dtype" not in argv, name
    # Each program knows the flag it is given: a dtype it does not take is refused (2) before
    # --help is reached; an unknown flag would be left for after --help, which exits 0.
    from benchmarks import ceiling, reference_server

    for main in (ceiling.main, reference_server.main):
        for dtype, code in (("bf16", 2), ("bfloat16", 0)):
            with pytest.raises(SystemExit) as exc:
                main(["--dtype", dtype, "--help"])
            assert exc.value.code == code, (main.__module__, dtype)
    with pytest.raises(SystemExit):
        _resolve("--dtype", "bf16")


def test_embeddings_rows_all_cut_inputs_where_batchwire_does(tmp_path):
    """batchwire embeds at most all-MiniLM-L6-v2's declared 256 tokens, as
    sentence-transformers does; the guide's servers and the ceiling must embed the same
    tokens, or the long-input embeddings rows compare different work."""
    from benchmarks import run
    from benchmarks.models import BenchModel
    from worker.runner import default_model_path

    args = _resolve()
    minilm = BenchModel("minilm-features", default_model_path(), "feature-extraction", 512,
                        "a model", 384)
    plain = BenchModel("bert-base-features", str(tmp_path), "feature-extraction", 512,
                       "a model", 768)  # no sentence-transformers files: nothing to cut at
    for name in ("embeddings-minilm-mixed", "embeddings-minilm-varied"):
        workload = run.WORKLOADS[name]
        for argv in (run.server_argv("guide", minilm, 8000, args, workload),
                     run.server_argv("guide-batching", minilm, 8000, args, workload),
                     run.ceiling_argv(minilm, workload, args, tmp_path / "c.json")):
            assert argv[argv.index("--max-seq-length") + 1] == "256", argv
        assert "--max-seq-length" not in run.server_argv("batchwire", minilm, 8000, args,
                                                         workload)  # its own default
        assert "--max-seq-length" not in run.server_argv("guide", plain, 8000, args, workload)
    # The guide's pooled answers with the cut are sentence-transformers' vectors.
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from benchmarks import reference_server

    reference_server.MODEL, reference_server.TASK = default_model_path(), "feature-extraction"
    reference_server.TRUNCATION = {"truncation": True, "max_length": 256}
    try:
        pipe = reference_server._pipeline()
        texts = ["a cat sits on the mat", " ".join(f"w{i}" for i in range(400))]
        want = SentenceTransformer(default_model_path(), device="cpu").encode(texts)
        alone = [reference_server._pooled(pipe, t) for t in texts]
        batched = reference_server._pooled_batch(pipe, texts, 2)
    finally:
        reference_server.MODEL = reference_server.TASK = None
        reference_server.TRUNCATION = {}
    np.testing.assert_allclose(alone, want, atol=2e-5)
    np.testing.assert_allclose(batched, want, atol=2e-5)


def test_tls_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/tls.py: an HTTP and an HTTPS `serve` of the tiny model, both answering 200s
    to the load generator (the HTTPS one verified against the run's own CA)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.tls", "--out", str(tmp_path), "--models",
         "tiny-fill-mask", "--duration", "0.5", "--rounds", "1"],
        cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
        timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["scheme"], r["concurrency"]) for r in rows} == {
        ("http", 1), ("https", 1), ("http", 64), ("https", 64)}
    for row in rows:
        assert set(row["statuses"]) == {"200"} and row["rps"] > 0, row
