"""PipelineRunner against real transformers pipelines (nothing mocked).

The contract under test: batching is invisible. Whatever ``runner(inputs, parameters)``
returns for an item must equal what the plain, unbatched ``transformers.pipeline(...)(text)``
returns for that item alone, and every failure must reach the client as the right
``protocol.errors`` class.

Each pipeline is loaded once per module; the reference pipelines are separate
``transformers.pipeline`` objects so the runner's pipeline is never its own oracle.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from protocol.errors import (AnswerTooLarge, BadInput, ClientError, InputTooLong, InvalidParameters,
                             ModelError)
from protocol.messages import NDArray
from tests.conftest import TOKENIZER_FILES
from worker.runner import (EMBED_KEY, PipelineRunner, classify_error, default_model_path,
                           infer_task, to_wire)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_LIMIT = 128  # tiny_model_dir's max_position_embeddings

FILL_MASK_INPUTS = [
    "[MASK].",
    "Paris is the [MASK] of France.",
    "The quick brown fox jumps over the lazy [MASK] near the river bank on a sunny afternoon.",
    "Hello [MASK] world [MASK] again.",  # two masks: one list of candidates per mask
    "[MASK] is",
    "A much longer sentence about the weather, which was cold and wet and [MASK], lasting "
    "for many many days without any end in sight at all, really.",
]

SHORT_TEXT = "Hi."
LONG_TEXT = (
    "Batchwire pads every item of a batch to the longest one, so this sentence is made long "
    "on purpose: it goes on and on about queues, deadlines, workers and tokens until it is "
    "several times longer than the short one next to it in the same batch."
)
FEATURE_INPUTS = [SHORT_TEXT, LONG_TEXT, "A medium sized sentence about cats.", "Ok"]


# -- fixtures -------------------------------------------------------------------------------
def _load(model, task) -> PipelineRunner:
    runner = PipelineRunner(model, task, "cpu")
    runner.load()
    return runner


def _reference(task: str, model: str):
    transformers.logging.set_verbosity_error()
    return transformers.pipeline(task=task, model=model, device="cpu")


@pytest.fixture(scope="module")
def fill_runner(tiny_model_dir) -> PipelineRunner:
    return _load(str(tiny_model_dir), None)


@pytest.fixture(scope="module")
def fill_pipe(tiny_model_dir):
    return _reference("fill-mask", str(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny_fe_runner(tiny_model_dir) -> PipelineRunner:
    return _load(str(tiny_model_dir), "feature-extraction")


@pytest.fixture(scope="module")
def tiny_fe_pipe(tiny_model_dir):
    return _reference("feature-extraction", str(tiny_model_dir))


@pytest.fixture(scope="module")
def minilm_runner() -> PipelineRunner:
    # The default a worker started without --model/--task gets.
    return _load(None, None)


@pytest.fixture(scope="module")
def minilm_pipe():
    return _reference("feature-extraction", default_model_path())


@pytest.fixture(params=["tiny", "minilm"])
def fe_pair(request):
    """(runner, reference pipeline) for feature-extraction, on both models."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny_fe_runner"), request.getfixturevalue("tiny_fe_pipe")
    return request.getfixturevalue("minilm_runner"), request.getfixturevalue("minilm_pipe")


# -- helpers --------------------------------------------------------------------------------
def assert_same_fill_mask(got, want):
    """Same candidates in the same order; scores equal to float tolerance."""
    assert isinstance(got, list) and len(got) == len(want)
    if want and isinstance(want[0], list):  # several masks: one candidate list per mask
        for got_mask, want_mask in zip(got, want):
            assert_same_fill_mask(got_mask, want_mask)
        return
    for got_c, want_c in zip(got, want):
        assert set(got_c) == set(want_c)
        assert got_c["token"] == want_c["token"]
        assert got_c["token_str"] == want_c["token_str"]
        assert got_c["sequence"] == want_c["sequence"]
        assert type(got_c["score"]) is float  # to_wire made it wire-ready
        assert got_c["score"] == pytest.approx(want_c["score"], rel=1e-4, abs=1e-4)


def n_tokens(runner: PipelineRunner, text: str) -> int:
    return len(runner.pipe.tokenizer(text)["input_ids"])


# -- 1. fill-mask: batching is invisible -------------------------------------------------
@pytest.mark.parametrize("parameters", [{}, {"top_k": 3}], ids=["default", "top_k=3"])
def test_fill_mask_batch_equals_unbatched(fill_runner, fill_pipe, parameters):
    lengths = {n_tokens(fill_runner, t) for t in FILL_MASK_INPUTS}
    assert len(lengths) >= 4, "inputs must differ in length so the batch is padded"

    outputs = fill_runner(list(FILL_MASK_INPUTS), dict(parameters)).outputs

    assert len(outputs) == len(FILL_MASK_INPUTS)
    for text, got in zip(FILL_MASK_INPUTS, outputs):
        want = fill_pipe(text, **parameters)
        assert_same_fill_mask(got, want)
        per_mask = got if text.count("[MASK]") > 1 else [got]
        assert len(per_mask) == text.count("[MASK]")
        assert all(len(c) == parameters.get("top_k", 5) for c in per_mask)


def test_fill_mask_runs_its_vocabulary_head_at_mask_tokens_only(fill_runner, fill_pipe):
    """The sparse head is on by default, projects only the mask rows, and changes no answer
    (targets included: they index the same logits)."""
    head = fill_runner.sparse_head
    assert head is not None, "the sparse masked-LM head was not installed"
    rows: list[int] = []
    dense = head._dense
    head._dense = lambda hidden: (rows.append(hidden.shape[0]), dense(hidden))[1]
    try:
        outputs = fill_runner(list(FILL_MASK_INPUTS), {}).outputs
        targeted = fill_runner(list(FILL_MASK_INPUTS[:3]), {"targets": ["the", "a"]}).outputs
    finally:
        head._dense = dense
    masks = sum(t.count("[MASK]") for t in FILL_MASK_INPUTS)
    assert rows == [masks, 3], "the head ran on more than the mask tokens"
    for text, got in zip(FILL_MASK_INPUTS, outputs):
        assert_same_fill_mask(got, fill_pipe(text))
    for text, got in zip(FILL_MASK_INPUTS, targeted):
        assert_same_fill_mask(got, fill_pipe(text, targets=["the", "a"]))


def test_dense_mlm_head_flag_keeps_the_stock_head(tiny_model_dir):
    runner = PipelineRunner(str(tiny_model_dir), None, "cpu", sparse_mlm_head=False)
    runner.load()
    decoder = runner.pipe.model.get_output_embeddings()
    assert runner.sparse_head is None and "forward" not in decoder.__dict__


def test_stock_pipeline_runs_transformers_own_methods_only(tiny_model_dir, fill_pipe):
    """--stock-pipeline: no stand-in in any method slot, and answers identical to the plain
    pipeline's, scores included (the same code ran)."""
    runner = PipelineRunner(str(tiny_model_dir), None, "cpu", stock_pipeline=True)
    runner.load()
    assert (runner.sparse_head, runner.fill_mask_answers, runner.mask_scorer,
            runner.batch_encoder, runner.target_ids) == (None, None, None, None, None)
    assert not ({"preprocess", "_forward", "postprocess", "get_target_ids"}
                & set(runner.pipe.__dict__))
    texts = list(FILL_MASK_INPUTS)
    outputs = runner(texts, {}, [runner.measure(t, {}) for t in texts]).outputs
    assert outputs == fill_pipe(texts, batch_size=len(texts))


def _autograd_modes_seen(runner: PipelineRunner, texts: list[str]) -> list[tuple[bool, bool]]:
    """(inference mode, grad enabled) inside the model's forward, for one batch."""
    seen: list[tuple[bool, bool]] = []
    hook = runner.pipe.model.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_inference_mode_enabled(),
                                          torch.is_grad_enabled())))
    try:
        runner(texts, {}, [runner.measure(t, {}) for t in texts])
    finally:
        hook.remove()
    return seen


def test_the_model_runs_in_inference_mode(fill_runner):
    """no_grad keeps autograd's per-op bookkeeping; inference_mode drops it."""
    for texts in (list(FILL_MASK_INPUTS[:1]), list(FILL_MASK_INPUTS)):
        seen = _autograd_modes_seen(fill_runner, texts)
        assert seen and all(mode == (True, False) for mode in seen)
    assert not torch.is_inference_mode_enabled()  # left on the inference thread: no


def test_stock_pipeline_keeps_the_pipelines_no_grad(tiny_model_dir):
    runner = PipelineRunner(str(tiny_model_dir), None, "cpu", stock_pipeline=True)
    runner.load()
    seen = _autograd_modes_seen(runner, list(FILL_MASK_INPUTS))
    assert seen and all(mode == (False, False) for mode in seen)


def test_sparse_head_that_changes_answers_is_taken_out(tiny_model_dir, monkeypatch):
    """The self-check at load: a head that gets the answers wrong never serves."""
    from worker import sparse_head

    pipe = _reference("fill-mask", str(tiny_model_dir))
    decoder = pipe.model.get_output_embeddings()
    want = pipe("Paris is the [MASK] of France.")

    def wrong(self, hidden):
        # Checked against itself switched off (the stock head), it ranks the vocabulary upside down.
        return self._dense(hidden) * (-1.0 if self.enabled else 1.0)
    monkeypatch.setattr(sparse_head.SparseMaskedHead, "_forward", wrong)
    assert sparse_head.install(pipe, ["Paris is the [MASK] of France.", "[MASK]."]) is None
    assert "forward" not in decoder.__dict__, "the dense head was not restored"
    assert_same_fill_mask(pipe("Paris is the [MASK] of France."), want)


class _CountingBackend:
    """The Rust tokenizer, with its decode_batch calls counted."""

    def __init__(self, backend):
        self.backend, self.calls = backend, 0

    def decode_batch(self, *args, **kwargs):
        self.calls += 1
        return self.backend.decode_batch(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.backend.decode(*args, **kwargs)


def test_fill_mask_answers_decode_in_one_batch_an_input_and_match_the_pipeline(fill_runner,
                                                                                fill_pipe):
    from worker.fill_mask_answers import check_inputs

    answers = fill_runner.fill_mask_answers
    assert answers is not None and fill_runner.pipe.postprocess is answers
    texts = list(FILL_MASK_INPUTS) + check_inputs("[MASK]")
    counting = _CountingBackend(answers.backend)
    answers.backend = counting
    try:
        outputs = fill_runner(texts, {"top_k": 4}).outputs
    finally:
        answers.backend = counting.backend
    assert counting.calls == len(texts)
    for text, got in zip(texts, outputs):
        assert_same_fill_mask(got, fill_pipe(text, top_k=4))


@pytest.mark.parametrize("clean_up", [True, False])
def test_fill_mask_answers_follow_the_tokenizers_clean_up_setting(tiny_model_dir, clean_up):
    """Spaces around apostrophes are cleaned up exactly when the tokenizer's own decode
    would; the same pipeline with and without the fast answers agrees either way."""
    from worker import fill_mask_answers

    pipe = _reference("fill-mask", str(tiny_model_dir))
    pipe.tokenizer.clean_up_tokenization_spaces = clean_up
    text = "Don't stop , it's [MASK] . Really ?"
    want = pipe(text)
    assert fill_mask_answers.install(pipe) is not None
    assert pipe(text) == want
    # The setting changes the answers (the contraction), so both ways are really checked.
    assert all(("don ' t" in c["sequence"]) is not clean_up for c in want)


def test_fill_mask_answers_that_differ_are_taken_out(tiny_model_dir, monkeypatch):
    """The self-check at load: a decoder that gets an answer wrong never serves."""
    from worker import fill_mask_answers

    pipe = _reference("fill-mask", str(tiny_model_dir))
    real = fill_mask_answers.FillMaskAnswers.__call__

    def wrong(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        first = out[0][0] if isinstance(out[0], list) else out[0]
        first["sequence"] += "!"
        return out
    monkeypatch.setattr(fill_mask_answers.FillMaskAnswers, "__call__", wrong)
    assert fill_mask_answers.install(pipe) is None
    assert "postprocess" not in pipe.__dict__, "the stock postprocess was not restored"


def test_fill_mask_candidates_are_scored_a_batch_at_a_time(fill_runner, fill_pipe):
    """What leaves the model's device is the input ids and each input's top-k scores and
    token ids, never the [batch, tokens, vocabulary] logits; the answers are the pipeline's."""
    from worker import fill_mask_answers

    scorer = fill_runner.mask_scorer
    assert scorer is not None and fill_runner.pipe._forward is scorer
    sent: list[dict] = []

    def recording(model_inputs, **kwargs):
        sent.append(scorer(model_inputs, **kwargs))
        return sent[-1]
    fill_runner.pipe._forward = recording
    try:
        outputs = fill_runner(list(FILL_MASK_INPUTS), {"top_k": 3}).outputs
        targeted = fill_runner(list(FILL_MASK_INPUTS[:2]), {"targets": ["the", "a"]}).outputs
    finally:
        fill_runner.pipe._forward = scorer
    scored, stock = sent
    assert set(scored) == {"input_ids", fill_mask_answers.SCORES, fill_mask_answers.TOKENS}
    most_masks = max(t.count("[MASK]") for t in FILL_MASK_INPUTS)
    assert tuple(scored[fill_mask_answers.SCORES].shape) == (len(FILL_MASK_INPUTS),
                                                              most_masks, 3)
    assert "logits" in stock, "targets need the logits: they go the stock way"
    for text, got in zip(FILL_MASK_INPUTS, outputs):
        assert_same_fill_mask(got, fill_pipe(text, top_k=3))
    for text, got in zip(FILL_MASK_INPUTS, targeted):
        assert_same_fill_mask(got, fill_pipe(text, targets=["the", "a"]))
    assert scorer.top_k is None, "the scorer was left prepared"


def test_batched_scoring_gives_the_stock_answers_bit_for_bit_on_cpu(tiny_model_dir):
    """Each row is softmaxed on its own, so scoring a batch's masks together changes no bit:
    the same pipeline with and without the scorer answers identically."""
    from worker import fill_mask_answers, mask_scores

    pipe = _reference("fill-mask", str(tiny_model_dir))
    assert fill_mask_answers.install(pipe) is not None
    texts = list(FILL_MASK_INPUTS) + fill_mask_answers.check_inputs("[MASK]")
    want = [pipe(texts, batch_size=len(texts)), pipe(texts, batch_size=3, top_k=7),
            pipe(texts[3])]
    scorer = mask_scores.install(pipe)
    assert scorer is not None
    got = []
    for args, kwargs in [((texts,), {"batch_size": len(texts)}),
                         ((texts,), {"batch_size": 3, "top_k": 7}), ((texts[3],), {})]:
        assert scorer.prepare({k: v for k, v in kwargs.items() if k != "batch_size"})
        got.append(pipe(*args, **kwargs))
        scorer.clear()
    assert got == want


@pytest.mark.parametrize("parameters", [{"top_k": "x"}, {"top_k": 0}, {"top_k": 10**9},
                                        {"top_k": True}, {"targets": ["the"]}])
def test_the_scorer_leaves_what_it_cannot_score_to_the_stock_way(fill_runner, parameters):
    assert fill_runner.mask_scorer.prepare(parameters) is False
    assert fill_runner.mask_scorer.top_k is None


@pytest.mark.parametrize("top_k, why", [
    (10**9, "top_k is 1000000000, more than the 30522 tokens this model chooses from"),
    (-1, "top_k must be a whole number of at least 1, not -1"),
    (0, "top_k must be a whole number of at least 1, not 0"),
    (2.5, "top_k must be a whole number of at least 1, not 2.5"),
], ids=["past-the-vocabulary", "negative", "zero", "fraction"])
def test_a_top_k_the_model_cannot_give_is_still_blamed_on_the_parameters(fill_runner, top_k,
                                                                        why):
    """The message names the parameter and its bounds, not torch's "selected index k out of
    range"."""
    assert fill_runner.pipe.model.config.vocab_size == 30522
    for texts in (["a [MASK]"], ["a [MASK]", "the [MASK] b"]):
        with pytest.raises(InvalidParameters, match=f"^{re.escape(why)}$"):
            fill_runner(texts, {"top_k": top_k})
    assert fill_runner.mask_scorer.top_k is None
    assert len(fill_runner(["a [MASK]"], {"top_k": 30522}).outputs[0]) == 30522
    # On arrival too, before the answer's size is estimated: top_k 2**64 - 1 was refused as
    # an answer too large, with a message quoting 18446744073709551615 candidates.
    with pytest.raises(InvalidParameters, match=f"^{re.escape(why)}$"):
        fill_runner.arrive("[MASK] " * 50, {"top_k": top_k})


@pytest.mark.parametrize("targets", [{"the": 1}, 3, [], ["the", 2], [""], [None]])
def test_targets_that_are_not_words_are_refused_with_what_to_send(fill_runner, targets):
    """The pipeline iterates whatever it gets: an object's keys were used as the targets."""
    with pytest.raises(InvalidParameters, match="^targets must be a word or a non-empty "
                       "list of words, not "):
        fill_runner(["a [MASK]"], {"targets": targets})
    assert len(fill_runner(["a [MASK]"], {"targets": ["the", "a"]}).outputs[0]) == 2


def test_a_fill_mask_answer_sure_to_be_too_large_is_refused_on_arrival(fill_runner):
    """500 masks x top_k 30522 would be 15 million sequences of 500 tokens, built (tens of
    GB) before the frame's size check refused them; the estimate refuses it unbuilt, and
    lets through answers that may fit, which are then built and checked exactly."""
    many = "[MASK] " * 120  # the tiny model takes 128 tokens
    with pytest.raises(AnswerTooLarge, match=r"^the answer would hold 120 masks x top_k 30522 "
                       r"candidates, each with the whole text filled in: over \d+ MiB, more "
                       r"than the 64 MiB a worker sends in one message; ask for a smaller "
                       r"top_k, or put fewer masks in one input$"):
        fill_runner.arrive(many, {"top_k": 30522})
    # Targets bound the candidates, whatever top_k says.
    assert fill_runner.arrive(many, {"top_k": 30522, "targets": ["the", "a"]})[0] == 122
    # Pad with whitespace: a long text of few tokens has short sequences, so it is not refused.
    padded = "[MASK] " * 3 + " " * 1_000_000
    assert fill_runner.arrive(padded, {"top_k": 30522})[0] == 5
    assert fill_runner.arrive("a [MASK] " * 20, {"top_k": 1000})[0] == 42
    # The default top_k (5) is counted too: 100 masks x 5 are small.
    assert fill_runner.arrive("[MASK] " * 100, {})[0] == 102


def test_a_batch_of_fill_mask_answers_too_large_together_raises_so_it_runs_in_halves(
        fill_runner):
    """Each input fits alone (4 MiB), sixteen together are over 64 MiB: the batch raises
    before the model runs, and the batcher, which splits a batch that raises, runs halves."""
    text = "a [MASK] " + "b " * 100
    parameters = {"top_k": 30522}
    [tokens] = [fill_runner.arrive(text, parameters)[0]]
    with pytest.raises(AnswerTooLarge, match="^the answers of this batch of 16 come to over "
                       r"\d+ MiB together; run it in smaller batches$"):
        fill_runner([text] * 16, parameters, [tokens] * 16)
    assert fill_runner.mask_scorer.top_k is None
    fill_runner._check_batch_candidates([text] * 8, parameters, [tokens] * 8)
    # The usual top_k is nowhere near it.
    assert len(fill_runner([text] * 16, {"top_k": 5}).outputs) == 16


def test_mask_scorer_is_cleared_when_the_batch_fails(fill_runner):
    with pytest.raises(Exception):
        fill_runner(["a [MASK]", "no mask here"], {})
    assert fill_runner.mask_scorer.top_k is None
    assert len(fill_runner(["a [MASK]"], {}).outputs[0]) == 5  # and it serves again


def test_a_scorer_that_changes_answers_is_taken_out(tiny_model_dir, monkeypatch):
    """The self-check at load: batched scoring that gets a score wrong never serves."""
    from worker import fill_mask_answers, mask_scores

    pipe = _reference("fill-mask", str(tiny_model_dir))
    assert fill_mask_answers.install(pipe) is not None
    real = mask_scores.MaskScorer.__call__

    def wrong(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if fill_mask_answers.SCORES in out:
            out[fill_mask_answers.SCORES][..., 0] *= 0.5
        return out
    monkeypatch.setattr(mask_scores.MaskScorer, "__call__", wrong)
    assert mask_scores.install(pipe) is None
    assert "_forward" not in pipe.__dict__, "the stock _forward was not restored"


def test_targets_are_looked_up_once_per_set_of_words(fill_runner, fill_pipe, monkeypatch):
    """The stock lookup copies the whole vocabulary each call, twice per batch; the ids of
    a set of words are kept, and the answers stay the stock ones."""
    from worker import target_ids

    assert fill_runner.target_ids is not None, "the targets' stand-in was not installed"
    monkeypatch.setattr(target_ids, "MAX_KEPT", 2)
    fill_runner.target_ids.kept.clear()
    lookups: list = []
    stock = fill_runner.target_ids.stock
    monkeypatch.setattr(fill_runner.target_ids, "stock",
                        lambda targets: (lookups.append(targets), stock(targets))[1])
    texts = list(FILL_MASK_INPUTS[:3])
    for targets in (["the", "a"], ["the", "a"], "the", ["a", "the"], ["the", "a"]):
        outputs = fill_runner(texts, {"targets": targets}).outputs
        for text, got in zip(texts, outputs):
            assert_same_fill_mask(got, fill_pipe(text, targets=targets))
    # Once per new set of words; the third set pushed out the first, which is looked up again.
    assert lookups == [["the", "a"], "the", ["a", "the"], ["the", "a"]]
    for _ in range(2):  # no token at all: an error, which is not kept
        with pytest.raises(InvalidParameters, match="target"):
            fill_runner(texts, {"targets": [" "]})
    assert lookups[4:] == [[" "], [" "]]


def test_a_targets_lookup_that_changes_the_ids_is_taken_out(tiny_model_dir, monkeypatch):
    from worker import target_ids

    pipe = _reference("fill-mask", str(tiny_model_dir))
    monkeypatch.setattr(target_ids.TargetIds, "__call__", lambda self, targets: np.array([0]))
    assert target_ids.install(pipe) is None
    assert "get_target_ids" not in pipe.__dict__, "the stock method was not restored"


def test_the_scorer_needs_the_batched_answers(tiny_model_dir):
    """The stock postprocess reads logits, so without the batched answers it stays stock."""
    from worker import mask_scores

    pipe = _reference("fill-mask", str(tiny_model_dir))
    assert mask_scores.install(pipe) is None and "_forward" not in pipe.__dict__


@pytest.mark.parametrize("kind", ["fill-mask", "feature-extraction"])
def test_a_batch_is_tokenized_in_one_call_unless_parameters_tokenize(kind, fill_runner,
                                                                     tiny_fe_runner):
    runner = fill_runner if kind == "fill-mask" else tiny_fe_runner
    encoder = runner.batch_encoder
    assert encoder is not None and runner.pipe.preprocess is encoder
    encoder.forget_arrivals()  # other tests' measured texts: this one measures none
    stock_calls: list[str] = []
    stock = encoder.stock
    encoder.stock = lambda text, **kw: (stock_calls.append(text), stock(text, **kw))[1]
    texts = list(FILL_MASK_INPUTS if kind == "fill-mask" else FEATURE_INPUTS)
    try:
        runner(texts, {})
        assert stock_calls == []  # every text came from the one batched call
        if kind == "feature-extraction":
            runner(texts, {"truncation": True})  # a tokenizer argument: the stock way
            assert sorted(stock_calls) == sorted(texts)
        stock_calls.clear()
        runner(texts[:1], {})  # a batch of one, not measured on arrival: the stock method
        assert stock_calls == texts[:1]
    finally:
        encoder.stock = stock
    assert encoder._ready == {}


@pytest.mark.parametrize("kind", ["fill-mask", "feature-extraction"])
def test_a_text_counted_on_arrival_is_not_tokenized_again(kind, fill_runner, tiny_fe_runner,
                                                          fill_pipe, tiny_fe_pipe, monkeypatch):
    """measure() tokenizes each arrival through the Rust backend to count it; the batch
    builds its inputs from those encodings, with no tokenizer call, and answers as before."""
    runner, reference = ((fill_runner, fill_pipe) if kind == "fill-mask"
                         else (tiny_fe_runner, tiny_fe_pipe))
    encoder = runner.batch_encoder
    assert encoder.uses_arrivals
    texts = list(FILL_MASK_INPUTS if kind == "fill-mask" else FEATURE_INPUTS)
    tokenizer_type = type(runner.pipe.tokenizer)
    calls: list = []
    real_call = tokenizer_type.__call__
    monkeypatch.setattr(tokenizer_type, "__call__",
                        lambda self, *a, **k: (calls.append(a), real_call(self, *a, **k))[1])
    encoder.forget_arrivals()
    lengths = [runner.measure(text, {}) for text in texts]
    assert set(encoder._remembered) == {(t, None) for t in texts}
    outputs = runner(texts, {}, lengths).outputs
    assert calls == [] and encoder._remembered == {}
    # A lone request (a batch of one, the pipeline's unbatched call) the same way.
    outputs += runner(texts[:1], {}, [runner.measure(texts[0], {})]).outputs
    assert calls == [] and encoder._remembered == {}
    for text, got in zip(texts + texts[:1], outputs):
        if kind == "fill-mask":
            assert_same_fill_mask(got, reference(text))
        else:
            want = reference(text, return_tensors=True)
            np.testing.assert_allclose(got.to_numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    # A text that arrived with tokenizer parameters is not remembered, and is tokenized.
    runner.measure(texts[0], {"tokenizer_kwargs": {"truncation": True}})
    assert encoder._remembered == {}


def test_arrival_encodings_are_dropped_past_their_limit(tiny_fe_runner, monkeypatch):
    from worker import batch_encoding

    monkeypatch.setattr(batch_encoding, "MAX_REMEMBERED", 3)
    encoder = tiny_fe_runner.batch_encoder
    try:
        for i in range(7):
            tiny_fe_runner.measure(f"text number {i}", {})
        assert 0 < len(encoder._remembered) <= 3
    finally:
        encoder.forget_arrivals()


def test_arrival_encodings_are_dropped_past_their_texts_size(tiny_fe_runner, monkeypatch):
    """They are kept by their texts: whitespace-padded 1 MB texts, refused afterwards (a
    parameter the pipeline rejects), left 1 MB each in the worker, 512 MB at the count's
    limit."""
    from worker import batch_encoding

    monkeypatch.setattr(batch_encoding, "MAX_REMEMBERED_CHARS", 3_000_000)
    encoder = tiny_fe_runner.batch_encoder
    padded = " " * 1_000_000
    try:
        for i in range(7):
            tiny_fe_runner.measure(f"text number {i}{padded}", {})
        assert 0 < len(encoder._remembered) <= 3
        assert sum(len(text) for text, _ in encoder._remembered) == encoder._remembered_chars
        assert encoder._remembered_chars <= 3_000_000
        assert tiny_fe_runner([f"text number 6{padded}", "x"], {}).outputs
        assert encoder._remembered_chars == sum(len(text) for text, _ in encoder._remembered)
    finally:
        encoder.forget_arrivals()


def test_a_too_long_arrival_is_not_remembered(tiny_fe_runner):
    with pytest.raises(InputTooLong):
        tiny_fe_runner.measure("word " * (TINY_LIMIT + 5), {})
    assert tiny_fe_runner.batch_encoder._remembered == {}


def test_arrival_encodings_that_differ_are_not_reused(tiny_model_dir, monkeypatch):
    """Their own check at load: encodings that would build other inputs are not used, and
    the batch encoder still tokenizes a batch in one call."""
    from worker import batch_encoding
    from worker.runner import counting_backend

    monkeypatch.setitem(batch_encoding.ENCODING_FIELDS, "token_type_ids", "attention_mask")
    pipe = _reference("feature-extraction", str(tiny_model_dir))
    encoder = batch_encoding.install(pipe, "feature-extraction",
                                     counting_backend(pipe.tokenizer))
    assert encoder is not None and not encoder.uses_arrivals
    encoder.remember("hello", object())
    assert encoder._remembered == {}


def test_a_custom_pipelines_own_preprocess_is_kept(fault_model_dir):
    """The fault pipeline's preprocess adds inputs of its own: it is not replaced (its
    postprocess is the stock one, so the batched answers still apply)."""
    runner = PipelineRunner(str(fault_model_dir), "fault-fill-mask", "cpu",
                            trust_remote_code=True)
    runner.load()
    assert runner.kind == "fill-mask" and runner.batch_encoder is None
    assert "preprocess" not in runner.pipe.__dict__
    assert runner.fill_mask_answers is not None
    assert runner.mask_scorer is None, "its own _forward was replaced"
    outputs = runner(["a [MASK] b", "a longer [MASK] text here"], {}).outputs
    assert len(outputs) == 2 and all(len(o) == 5 for o in outputs)


def test_batch_encoding_is_cleared_when_the_batch_fails(fill_runner):
    with pytest.raises(Exception):
        fill_runner(["a [MASK]", "no mask here"], {})
    assert fill_runner.batch_encoder._ready == {}


def test_batch_encoder_that_changes_the_inputs_is_taken_out(tiny_model_dir, monkeypatch):
    """The self-check at load: an encoder whose tokens differ never serves."""
    from worker import batch_encoding

    pipe = _reference("feature-extraction", str(tiny_model_dir))
    real = batch_encoding.BatchEncoder.__call__

    def wrong(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out["input_ids"][0, -1] = 0  # the last token becomes padding
        return out
    monkeypatch.setattr(batch_encoding.BatchEncoder, "__call__", wrong)
    assert batch_encoding.install(pipe, "feature-extraction") is None
    assert "preprocess" not in pipe.__dict__, "the stock preprocess was not restored"


def test_same_answers_allows_ties_only():
    from worker.sparse_head import same_answers

    a = [{"token": 1, "score": 0.5}, {"token": 2, "score": 0.2}, {"token": 3, "score": 0.2}]
    swapped_tie = [a[0], a[2], a[1]]
    assert same_answers([a], [swapped_tie])
    assert not same_answers([a], [[a[1], a[0], a[2]]])  # 0.5 vs 0.2: not a tie
    assert not same_answers([a], [[a[0], a[1], {"token": 3, "score": 0.25}]])


# -- 2. feature-extraction: batching is invisible (tiny and real MiniLM) ----------------------
def test_raw_batched_feature_extraction_pads(fe_pair):
    """Guard for the test below: without batchwire's trim, short items come back padded."""
    runner, pipe = fe_pair
    unbatched = np.array(pipe(SHORT_TEXT))
    batched = pipe([SHORT_TEXT, LONG_TEXT], batch_size=2)
    assert np.array(batched[0]).shape[1] > unbatched.shape[1]
    assert np.array(batched[0]).shape[1] == n_tokens(runner, LONG_TEXT)


def test_feature_extraction_batch_equals_unbatched(fe_pair):
    runner, pipe = fe_pair
    hidden = runner.pipe.model.config.hidden_size
    lengths = [n_tokens(runner, t) for t in FEATURE_INPUTS]
    assert max(lengths) >= 5 * min(lengths)

    outputs = runner(list(FEATURE_INPUTS), {}).outputs

    assert len(outputs) == len(FEATURE_INPUTS)
    for text, n, got in zip(FEATURE_INPUTS, lengths, outputs):
        assert isinstance(got, NDArray)
        array = got.to_numpy()
        want = np.array(pipe(text))
        assert want.shape == (1, n, hidden)
        assert array.shape == want.shape  # own tokens only, not the batch's longest
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, want, atol=1e-4, rtol=0)


# -- 3. one-item batch --------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["Paris is the [MASK] of France.", "Hello [MASK] world [MASK] again."])
def test_fill_mask_one_item_batch_equals_unbatched(fill_runner, fill_pipe, text):
    (got,) = fill_runner([text], {}).outputs
    assert_same_fill_mask(got, fill_pipe(text))


def test_feature_extraction_one_item_batch_equals_unbatched(tiny_fe_runner, tiny_fe_pipe):
    (got,) = tiny_fe_runner([LONG_TEXT], {}).outputs
    want = np.array(tiny_fe_pipe(LONG_TEXT))
    assert got.to_numpy().shape == want.shape
    np.testing.assert_allclose(got.to_numpy(), want, atol=1e-4, rtol=0)


# -- 4. inputs longer than the model takes -----------------------------------------------------
def test_a_long_text_is_refused_from_its_start(fill_runner, tiny_fe_runner, monkeypatch):
    """A text whose start alone holds more tokens than the model takes is refused without
    counting the rest: seconds, for a few MiB, on the worker's measuring thread."""
    texts = ["word " * 40_000 + "[MASK]",
             # Chinese and Japanese, written without spaces: cut before an ideograph.
             "".join(chr(0x4E00 + (n * 7919) % 20902) for n in range(200_000)) + "[MASK]",
             "猫が[MASK]に座った。" * 20_000]
    for runner in (fill_runner, tiny_fe_runner):
        assert runner._measurer.ideograph_cut and runner._bulk_measurer.ideograph_cut
        for text in texts:
            # As a call with tokenizer arguments leaves the measuring tokenizer's backend.
            runner.measure("hello", {"truncation": True})
            recording = _Recording(runner._measurer.counting)
            monkeypatch.setattr(runner._measurer, "counting", recording)
            with pytest.raises(InputTooLong, match=f"input is over {TINY_LIMIT + 16} tokens "
                               f"long but this model takes at most {TINY_LIMIT}; shorten it"):
                runner.measure(text, {})
            assert len(recording.lengths) == 1 and recording.lengths[0] < len(text) // 10


def test_too_long_input_is_422_input_too_long(fill_runner, tiny_fe_runner):
    assert fill_runner.max_length == TINY_LIMIT
    text = "word " * 200 + "[MASK]"
    n = n_tokens(fill_runner, text)
    assert n > TINY_LIMIT
    for runner, inputs in ((fill_runner, [text]), (fill_runner, ["a [MASK]", text]),
                           (tiny_fe_runner, ["short", "word " * 200])):
        # On arrival (the worker's I/O loop) and, for callers that did not measure, in the call.
        for attempt in (lambda: runner.measure(inputs[-1], {}), lambda: runner(inputs, {})):
            with pytest.raises(InputTooLong) as info:
                attempt()
            message = str(info.value)
            assert str(n_tokens(runner, inputs[-1])) in message
            assert str(TINY_LIMIT) in message
            assert info.value.status == 422
    with pytest.raises(InputTooLong, match="truncation"):  # feature-extraction hints at the fix
        tiny_fe_runner.measure("word " * 200, {})
    # Except for /v1/embeddings, which takes no parameters: there, shortening is the fix.
    with pytest.raises(InputTooLong) as info:
        tiny_fe_runner.measure("word " * 200, {EMBED_KEY: True})
    assert "truncation" not in str(info.value) and "shorten it" in str(info.value)


def test_measure_counts_tokens_as_the_pipeline_does(fill_runner, tiny_fe_runner):
    for runner, text in ((fill_runner, "Paris is the [MASK] of France."),
                         (tiny_fe_runner, SHORT_TEXT), (tiny_fe_runner, LONG_TEXT)):
        assert runner.measure(text, {}) == n_tokens(runner, text)
        # The count travels to the call, which reports it without tokenizing again.
        (n,) = runner([text], {}, [runner.measure(text, {})]).tokens
        assert n == n_tokens(runner, text)
    assert tiny_fe_runner.measure("word " * 200, {"truncation": True}) == TINY_LIMIT
    assert tiny_fe_runner.measure({"not": "text"}, {}) == 0


COUNT_TEXTS = [SHORT_TEXT, LONG_TEXT, "", "  tabs\tand\nnewlines ", "naïve café 日本語 😀",
               "Paris is the [MASK] of France.", "[CLS] already [SEP] special"]


def test_measure_counts_through_the_rust_backend_when_it_agrees(fill_runner, tiny_fe_runner):
    for runner in (fill_runner, tiny_fe_runner):
        assert runner._measurer.counting is runner._measurer.tokenizer.backend_tokenizer
        for text in COUNT_TEXTS:
            assert runner.measure(text, {}) == n_tokens(runner, text), text


def test_tokenizer_arguments_the_pipeline_sets_itself_are_refused_plainly(tiny_fe_runner):
    """return_tensors given in tokenize_kwargs: the tokenizer's TypeError quoted its whole
    repr, the model's path included, and said nothing of what to change."""
    for name in ("tokenize_kwargs", "tokenizer_kwargs"):
        with pytest.raises(InvalidParameters, match=f"^{name}.return_tensors is the pipeline's "
                           "to set; leave it out$"):
            tiny_fe_runner.measure("hello", {name: {"return_tensors": "pt"}})


def test_measure_after_a_truncating_call_counts_in_full(tiny_fe_runner):
    """A call with truncation leaves settings on the Rust backend; the next count without
    truncation must not inherit them (a too-long input would slip through, truncated)."""
    long = "word " * 200
    assert tiny_fe_runner.measure(long, {"truncation": True}) == TINY_LIMIT
    with pytest.raises(InputTooLong):
        tiny_fe_runner.measure(long, {})
    assert tiny_fe_runner.measure(LONG_TEXT, {}) == n_tokens(tiny_fe_runner, LONG_TEXT)


def test_counting_backend_is_refused_when_the_tokenizer_counts_otherwise(tiny_fe_runner):
    from worker.runner import counting_backend

    real = tiny_fe_runner._measurer.tokenizer

    class AddsATokenInPython:
        """A tokenizer whose call adds a token its Rust backend knows nothing about."""

        backend_tokenizer = real.backend_tokenizer
        mask_token = real.mask_token

        def __call__(self, texts, **kwargs):
            return {"input_ids": [ids + [0] for ids in real(texts, **kwargs)["input_ids"]]}

    assert counting_backend(AddsATokenInPython()) is None
    assert counting_backend(real) is real.backend_tokenizer


def test_pooling_modes_equal_torch(tiny_fe_runner):
    """The CPU pooling (numpy) against the same reductions written in torch."""
    tokens = torch.randn(1, 7, 32) * 3
    rows = tokens[0]
    expected = {"mean": rows.mean(dim=0), "cls": rows[0], "max": rows.max(dim=0).values}
    saved = tiny_fe_runner.pooling, tiny_fe_runner.normalize
    try:
        for mode, vector in expected.items():
            for normalize in (False, True):
                tiny_fe_runner.pooling, tiny_fe_runner.normalize = mode, normalize
                want = torch.nn.functional.normalize(vector, dim=0) if normalize else vector
                got = tiny_fe_runner._pool(tokens)
                assert got.dtype == np.float32 and got.shape == (32,)
                np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6,
                                           err_msg=f"{mode}, normalize={normalize}")
        # The input is left as it was (cls takes a row of it: a copy, not a view).
        np.testing.assert_array_equal(tokens[0].numpy(), rows.numpy())
    finally:
        tiny_fe_runner.pooling, tiny_fe_runner.normalize = saved


def test_measure_uses_its_own_tokenizer(tiny_fe_runner):
    """measure() runs on the I/O loop, and on the thread that measures long texts, while
    the inference thread tokenizes: sharing one fast tokenizer between threads can raise
    "Already borrowed" in the Rust backend."""
    loop, bulk = tiny_fe_runner._measurer, tiny_fe_runner._bulk_measurer
    backends = {id(tiny_fe_runner.pipe.tokenizer.backend_tokenizer)}
    for measurer in (loop, bulk):
        assert measurer.tokenizer is not tiny_fe_runner.pipe.tokenizer
        backends.add(id(measurer.tokenizer.backend_tokenizer))
    assert len(backends) == 3
    assert bulk.counting is bulk.tokenizer.backend_tokenizer
    for text in COUNT_TEXTS + ["word " * 200]:
        for embed in ({}, {EMBED_KEY: True}, {"truncation": True}):
            try:
                want = tiny_fe_runner.measure(text, embed)
            except InputTooLong:
                with pytest.raises(InputTooLong):
                    tiny_fe_runner.measure(text, embed, bulk=True)
            else:
                assert tiny_fe_runner.measure(text, embed, bulk=True) == want


def test_too_long_input_with_truncation_succeeds(tiny_fe_runner, tiny_fe_pipe):
    """The tokenizer (MiniLM's) allows 512 tokens but the tiny model only 128 positions:
    truncation must cut to the model's limit, not the tokenizer's."""
    long_text = "word " * 200
    outputs = tiny_fe_runner([SHORT_TEXT, long_text], {"truncation": True}).outputs
    short, long = (o.to_numpy() for o in outputs)
    assert long.shape == (1, TINY_LIMIT, 32)
    assert short.shape == (1, n_tokens(tiny_fe_runner, SHORT_TEXT), 32)
    want = np.array(tiny_fe_pipe(long_text, tokenize_kwargs={"truncation": True, "max_length": TINY_LIMIT}))
    np.testing.assert_allclose(long, want, atol=1e-4, rtol=0)
    (alone,) = tiny_fe_runner([long_text], {"truncation": True}).outputs
    assert alone.to_numpy().shape == (1, TINY_LIMIT, 32)


def test_truncation_on_real_model(minilm_runner):
    (out,) = minilm_runner(["word " * 600], {"truncation": True}).outputs
    assert out.to_numpy().shape == (1, 512, 384)


def test_parameters_are_not_mutated(tiny_fe_runner, tiny_fe_pipe):
    """feature-extraction's _sanitize_parameters writes "truncation" into tokenize_kwargs;
    the runner must not let that leak into the caller's dict (it used to, and then the
    pipeline call itself failed with 'truncation parameter defined twice')."""
    parameters = {"truncation": True, "tokenize_kwargs": {"max_length": 6}}
    snapshot = json.loads(json.dumps(parameters))
    for _ in range(2):  # the same dict, reused, still works
        outputs = tiny_fe_runner([LONG_TEXT, SHORT_TEXT], parameters).outputs
        assert parameters == snapshot
        assert outputs[0].to_numpy().shape == (1, 6, 32)
        assert outputs[1].to_numpy().shape == (1, n_tokens(tiny_fe_runner, SHORT_TEXT), 32)
    want = np.array(tiny_fe_pipe(LONG_TEXT, tokenize_kwargs={"truncation": True, "max_length": 6}))
    np.testing.assert_allclose(outputs[0].to_numpy(), want, atol=1e-4, rtol=0)


# -- 5. parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize("inputs", [["a [MASK]"], ["a [MASK]", "the [MASK] b"]], ids=["one", "two"])
def test_unknown_parameter_is_invalid_parameters(fill_runner, inputs):
    with pytest.raises(InvalidParameters) as info:
        fill_runner(inputs, {"foo": 1})
    assert "foo" in str(info.value)
    assert info.value.status == 422
    assert classify_error(info.value) is info.value


def test_a_parameter_the_pipeline_would_ignore_is_invalid_parameters(tiny_fe_runner):
    """feature-extraction's _sanitize_parameters swallows any **kwargs: {"max_length": 4}
    or a misspelt "truncate" would change nothing, silently."""
    with pytest.raises(InvalidParameters) as info:
        tiny_fe_runner(["hello", LONG_TEXT], {"max_length": 4, "truncate": True})
    message = str(info.value)
    assert info.value.status == 422
    assert "ignores parameters ['max_length', 'truncate']" in message
    assert "(the parameters it names: truncation, tokenize_kwargs)" in message
    assert "/v1/embeddings" in message
    # What it names, and tokenizer arguments inside tokenize_kwargs, still run.
    (out,) = tiny_fe_runner([LONG_TEXT], {"tokenize_kwargs": {"truncation": True,
                                                                "max_length": 4}}).outputs
    assert out.to_numpy().shape == (1, 4, 32)


@pytest.mark.parametrize("arguments, why", [
    # Overflowed inside the Rust tokenizer: the client's mistake, not a model failure (it
    # used to be a 500).
    ({"max_length": -1, "truncation": True}, "'max_length' must be a whole number of tokens"),
    ({"max_length": "5", "truncation": True}, "'max_length' must be a whole number of tokens"),
    # Had the tokenizer build a billion-token list on the worker's I/O loop: killed twice.
    ({"padding": "max_length", "max_length": 10**9},
     f"'max_length' is 1000000000, more than the {TINY_LIMIT} tokens"),
    ({"padding": True, "pad_to_multiple_of": 10**9}, "'pad_to_multiple_of' is 1000000000"),
    ({"truncation": True, "max_length": TINY_LIMIT, "stride": TINY_LIMIT + 1},
     f"'stride' is {TINY_LIMIT + 1}"),
], ids=["negative", "string", "huge-padding", "huge-multiple", "huge-stride"])
def test_tokenizer_arguments_out_of_range_are_invalid_parameters(tiny_fe_runner, arguments,
                                                                  why):
    parameters = {"tokenize_kwargs": arguments}
    with pytest.raises(InvalidParameters, match=why):
        tiny_fe_runner.measure("hello there", parameters)
    with pytest.raises(InvalidParameters, match=why):
        tiny_fe_runner(["hello there"], parameters)
    # Up to the model's limit they are the tokenizer's to read.
    padded = {"tokenize_kwargs": {"padding": "max_length", "max_length": TINY_LIMIT}}
    assert tiny_fe_runner.measure("hello there", padded) == TINY_LIMIT


def test_return_tensors_is_the_servers_to_set(tiny_fe_runner):
    with pytest.raises(InvalidParameters, match="return_tensors is the server's to set"):
        tiny_fe_runner(["hello"], {"return_tensors": True})


@pytest.fixture(scope="module")
def nli_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT with a 3-way classification head labelled as NLI, so it serves both
    text-classification and zero-shot-classification."""
    return with_head(tiny_model_dir, tmp_path_factory.mktemp("tiny-nli"),
                     transformers.BertForSequenceClassification,
                     ["entailment", "neutral", "contradiction"])


def with_head(tiny_model_dir: Path, target: Path, model_class: type, labels: list[str]) -> Path:
    """``target``: the tiny BERT's weights under a ``model_class`` head of ``labels``, with
    its tokenizer files."""
    config = transformers.AutoConfig.from_pretrained(
        tiny_model_dir, id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)})
    transformers.logging.set_verbosity_error()
    model_class.from_pretrained(tiny_model_dir, config=config).save_pretrained(target)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, target / name)
    return target


def test_parameters_a_pipeline_passes_on_are_not_refused(nli_model_dir):
    """Pipelines whose **kwargs go somewhere (text-classification: to the tokenizer) keep
    taking them; zero-shot-classification reads three names from its **kwargs and drops the
    rest, so a misspelt one is refused there."""
    classify = _load(str(nli_model_dir), "text-classification")
    reference = _reference("text-classification", str(nli_model_dir))
    parameters = {"truncation": True, "max_length": 4, "function_to_apply": "sigmoid"}
    outputs = classify([LONG_TEXT, SHORT_TEXT], parameters).outputs
    for text, output in zip([LONG_TEXT, SHORT_TEXT], outputs):
        [want] = reference(text, **parameters)
        [got] = output
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)

    zero_shot = _load(str(nli_model_dir), "zero-shot-classification")
    labels = {"candidate_labels": ["sport", "music"]}
    (answer,) = zero_shot(["a song"], {**labels, "multi_label": True,
                                       "hypothesis_template": "It is about {}."}).outputs
    assert sorted(answer["labels"]) == ["music", "sport"]
    with pytest.raises(InvalidParameters, match=r"ignores parameters \['hypotesis_template'\]"):
        zero_shot(["a song"], {**labels, "hypotesis_template": "It is about {}."})


@pytest.mark.parametrize("parameters", [{}, {"top_k": 2}, {"top_k": None},
                                        {"function_to_apply": "none"}],
                         ids=["plain", "top_k", "all", "function"])
def test_a_classification_has_the_shape_of_the_pipelines_answer_alone_or_batched(
        nli_model_dir, parameters):
    """pipe("text") answers [{label, score}] and pipe(["text", ...]) each text a bare
    {label, score}: a text batched with others was answered in the second shape, one alone
    in the first, so a client's answer changed shape with the load."""
    classify = _load(str(nli_model_dir), "text-classification")
    reference = _reference("text-classification", str(nli_model_dir))
    pair = {"text": SHORT_TEXT, "text_pair": LONG_TEXT}
    for inputs in ([SHORT_TEXT], [SHORT_TEXT, LONG_TEXT, pair], [pair, LONG_TEXT]):
        outputs = classify(inputs, parameters).outputs
        for text, output in zip(inputs, outputs):
            assert_same_classification(output, reference(text, **parameters))


def test_a_text_pair_longer_than_the_model_takes_is_refused_on_arrival(nli_model_dir):
    """Text pairs were not measured: one too long reached the model and failed there, 500
    model_error, where a text alone gets 422 input_too_long."""
    classify = _load(str(nli_model_dir), "text-classification")
    reference = _reference("text-classification", str(nli_model_dir))
    reference.tokenizer.model_max_length = classify.max_length
    long_pair = {"text": " ".join([LONG_TEXT] * 3), "text_pair": SHORT_TEXT}
    with pytest.raises(InputTooLong, match=f"at most {classify.max_length}"):
        classify.arrive(long_pair, {})
    assert classify.arrive({"text": SHORT_TEXT, "text_pair": LONG_TEXT}, {})[0] > 10
    parameters = {"truncation": "only_first"}
    assert classify.arrive(long_pair, parameters)[0] == classify.max_length
    [output] = classify([long_pair], parameters).outputs
    assert_same_classification(output, reference(dict(long_pair), **parameters))


def assert_same_classification(got, want):
    """The same shape (a {label, score}, or a list of them), labels, and scores to 1e-5."""
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (got, want)
        for one, wanted in zip(got, want):
            assert_same_classification(one, wanted)
        return
    assert isinstance(got, dict) and got.keys() == want.keys(), (got, want)
    assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"],
                                                                           abs=1e-5)


@pytest.fixture(scope="module")
def ner_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT with a token-classification head of person and place labels."""
    return with_head(tiny_model_dir, tmp_path_factory.mktemp("tiny-ner"),
                     transformers.BertForTokenClassification,
                     ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])


def test_a_long_text_is_found_entities_in_chunks_with_stride(ner_model_dir):
    """stride is transformers' way to run token-classification over a text longer than the
    model takes, in overlapping chunks; refused as too long, it could not be asked for."""
    runner = _load(str(ner_model_dir), "token-classification")
    reference = _reference("token-classification", str(ner_model_dir))
    reference.tokenizer.model_max_length = runner.max_length  # as the runner takes the model's
    parameters = {"aggregation_strategy": "simple", "stride": 16}
    long_text = " ".join([LONG_TEXT] * 4)
    count, kept = runner.arrive(long_text, parameters)
    assert count > runner.max_length and kept == long_text
    with pytest.raises(InputTooLong):
        runner.arrive(long_text, {"aggregation_strategy": "simple"})
    texts = [long_text, SHORT_TEXT, LONG_TEXT]
    for text, output in zip(texts, runner(texts, parameters).outputs):
        want = reference(text, **parameters)
        assert [(e["entity_group"], e["start"], e["end"]) for e in output] == [
            (e["entity_group"], e["start"], e["end"]) for e in want]
        assert [e["score"] for e in output] == pytest.approx([e["score"] for e in want],
                                                             abs=1e-4)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE trained here on the README, taking 64 tokens,
    and without a pad token, as GPT-2's own tokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    target = tmp_path_factory.mktemp("tiny-gpt2")
    end = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([(Path(__file__).parents[2] / "README.md").read_text()],
                            vocab_size=400, special_tokens=[end])
    bpe.save(str(target / "tokenizer.json"))
    tokenizer = transformers.GPT2TokenizerFast(tokenizer_file=str(target / "tokenizer.json"),
                                               bos_token=end, eos_token=end, unk_token=end,
                                               model_max_length=64)
    tokenizer.save_pretrained(target)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )).eval().save_pretrained(target)
    return target


GENERATE = {"max_new_tokens": 4, "do_sample": False}


def test_a_model_without_a_pad_token_batches_each_prompt_as_it_runs_alone(gpt2_dir):
    """The pipeline refuses to batch without a pad token: the warm-up batch stopped the
    worker, and such a model served only with --max-batch-size 1."""
    generate = _load(str(gpt2_dir), "text-generation")
    generate.warm_up(8)
    reference = _reference("text-generation", str(gpt2_dir))
    assert reference.tokenizer.pad_token is None
    texts = [SHORT_TEXT, LONG_TEXT[:100], "A medium sized sentence about cats."]
    for text, output in zip(texts, generate(texts, GENERATE).outputs):
        assert output == reference(text, **GENERATE)


def test_a_model_without_a_pad_token_batches_for_every_task(gpt2_dir, tmp_path):
    """The pad-with-eos fallback was for text-generation only: GPT-2 or Llama served as
    feature-extraction or text-classification stopped at the warm-up batch ("Pipeline with
    tokenizer without pad_token cannot do batching"), and the classification head needs
    the pad id in the model's config to find each row's last real token."""
    classifier = tmp_path / "gpt2-classifier"
    shutil.copytree(gpt2_dir, classifier)
    config = transformers.GPT2Config.from_pretrained(gpt2_dir, num_labels=3)
    assert config.pad_token_id is None
    torch.manual_seed(1)
    transformers.GPT2ForSequenceClassification(config).eval().save_pretrained(classifier)
    texts = [SHORT_TEXT, "A medium sized sentence about cats.", "Hi."]
    for model, task in ((gpt2_dir, "feature-extraction"), (classifier, "text-classification")):
        runner = _load(str(model), task)
        runner.warm_up(8)
        reference = _reference(task, str(model))
        assert reference.tokenizer.pad_token is None
        for text, output in zip(texts, runner(texts, {}).outputs):
            want = reference(text)
            if task == "feature-extraction":
                np.testing.assert_allclose(output.to_numpy(), np.asarray(want), atol=1e-5)
            else:
                assert output[0]["label"] == want[0]["label"]
                assert output[0]["score"] == pytest.approx(want[0]["score"], abs=1e-5)


def test_a_roberta_takes_as_many_tokens_as_its_positions_allow(tiny_model_dir, tmp_path):
    """RoBERTa numbers positions from its pad id + 1: 130 position embeddings and pad id 0
    (this tokenizer's) take 129 tokens. The limit was read as 130, so an input of 130 tokens
    passed the length check and crashed in the model (500), and truncation cut to 130 too.
    (roberta-base: 514 positions, pad id 1, 512 tokens.)"""
    roberta = tmp_path / "tiny-roberta"
    roberta.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tiny_model_dir) / name, roberta)
    tokenizer = transformers.AutoTokenizer.from_pretrained(roberta)
    config = transformers.RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(config).eval().save_pretrained(roberta)
    tokenizer.model_max_length = 10 ** 30  # declares no limit of its own
    tokenizer.save_pretrained(roberta)
    runner = _load(str(roberta), "fill-mask")
    assert runner.max_length == 129
    words = "word " * 200
    fits = tokenizer.decode(tokenizer(words)["input_ids"][1:127]) + " [MASK]"
    assert len(tokenizer(fits)["input_ids"]) == 129
    assert runner([fits], {}).outputs[0][0]["token_str"]
    with pytest.raises(InputTooLong):
        runner.arrive("word " + fits, {})
    [cut] = runner(["[MASK] " + words], {"tokenizer_kwargs": {"truncation": True}}).outputs
    assert cut  # cut to 129 tokens, not to 130 (a crash)


def test_a_model_whose_outputs_change_with_padding_is_found_at_load(tiny_model_dir, tmp_path,
                                                                    fill_runner):
    """ConvBERT's convolutions see the padding: a text batched with a longer one was
    answered otherwise than alone (0.0096 off in its vectors); FNet and Funnel, by far
    more. The worker then runs each input alone (worker/cli.py)."""
    convbert = tmp_path / "tiny-convbert"
    convbert.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tiny_model_dir) / name, convbert)
    torch.manual_seed(0)
    transformers.ConvBertModel(transformers.ConvBertConfig(
        vocab_size=30522, hidden_size=32, embedding_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
    )).eval().save_pretrained(convbert)
    runner = _load(str(convbert), "feature-extraction")
    assert "ConvBertModel's outputs change with padding" in runner.unbatchable
    assert fill_runner.unbatchable == ""
    # bfloat16 rounds otherwise in another batch shape: not a change the check reports.
    half = PipelineRunner(str(tiny_model_dir), "fill-mask", "cpu", dtype="bfloat16")
    half.load()
    assert half.unbatchable == ""


def test_a_truncated_prompt_is_answered_after_the_whole_prompt(gpt2_dir):
    """text-generation's answer begins with the prompt: cut to its start on arrival, as
    texts whose answers hold nothing of them are, the answer began with the cut."""
    generate = _load(str(gpt2_dir), "text-generation")
    reference = _reference("text-generation", str(gpt2_dir))
    prompt = " ".join(f"queue {i} of workers" for i in range(300))  # past 32 x (64 + 16) chars
    parameters = {"truncation": True, **GENERATE}
    _, kept = generate.arrive(prompt, parameters)
    assert kept == prompt
    [answer] = generate([kept, SHORT_TEXT], parameters).outputs[:1]
    assert answer == reference(prompt, **parameters)
    assert answer[0]["generated_text"].startswith(prompt)


def test_conflicting_parameters_are_invalid_parameters(tiny_fe_runner):
    with pytest.raises(InvalidParameters, match="truncation"):
        tiny_fe_runner(["hello"], {"truncation": True, "tokenize_kwargs": {"truncation": True}})


@pytest.mark.parametrize("inputs", [["a [MASK]"], ["a [MASK]", "the [MASK] b"]], ids=["one", "two"])
def test_ill_typed_parameter_is_a_client_error(fill_runner, inputs):
    """{"top_k": "x"} -> 400 BadInput, via classify_error.

    What happens today: FillMaskPipeline._sanitize_parameters accepts any top_k, so
    _check_parameters passes; the pipeline then raises a plain TypeError from torch.topk
    ("topk(): argument 'k' (position 1) must be int, not str"), and classify_error maps it to
    BadInput (status 400) because the message reads like an input error ("argument",
    "must be"). It is not a 5xx ModelError.
    """
    with pytest.raises(Exception) as info:
        fill_runner(inputs, {"top_k": "x"})
    err = classify_error(info.value)
    assert isinstance(err, ClientError)
    assert 400 <= err.status < 500
    assert not isinstance(err, ModelError)
    assert isinstance(err, (BadInput, InvalidParameters))


# -- 6. no mask ---------------------------------------------------------------------------------
@pytest.mark.parametrize("inputs", [["no mask here"], ["a [MASK]", "no mask here"]], ids=["one", "two"])
def test_missing_mask_is_bad_input(fill_runner, inputs):
    with pytest.raises(Exception) as info:
        fill_runner(inputs, {})
    err = classify_error(info.value)
    assert isinstance(err, BadInput)
    assert err.status == 400
    assert "mask" in str(err).lower()
    assert "[MASK]" in str(err)


async def test_an_input_its_parameters_fail_with_fails_alone_not_the_clients_batched_with_it(
        fill_runner):
    """A truncation that cuts one input's [MASK] off: the batch failed, ran again without
    the parameters, and the parameters were blamed for all of it, so the four clients batched
    with that one input got a 422 that each got nowhere else."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.batcher import Batcher, WorkItem

    parameters = {"tokenizer_kwargs": {"truncation": True, "max_length": 6}}
    good = ["a [MASK] day", "the [MASK] sat", "[MASK] is here", "so [MASK]"]
    bad = "one two three four five six [MASK]"
    with pytest.raises(Exception) as info:
        fill_runner(good + [bad], parameters)
    assert not isinstance(info.value, InvalidParameters)
    with pytest.raises(InvalidParameters, match="cannot use parameters"):
        fill_runner([bad], parameters)

    answers: dict[int, object] = {}
    batch_sizes: list[int] = []
    all_answered = asyncio.Event()

    def answer(item: WorkItem, outcome: object) -> None:
        answers[item.request_id] = outcome
        if len(answers) == 5:
            all_answered.set()

    def on_result(item: WorkItem, output: object, stats) -> None:
        batch_sizes.append(stats.batch_size)
        answer(item, output)

    executor = ThreadPoolExecutor(max_workers=1)
    # A batch of exactly the five, closed as it fills: a larger cap kept the batch open for
    # all of max_delay_s (5 s) before it ran. The long delay still keeps the five together.
    batcher = Batcher(runner=fill_runner, executor=executor, max_batch_size=len(good) + 1,
                      max_delay_s=5.0, on_result=on_result, on_error=answer,
                      classify_error=classify_error, adaptive=False)
    running = asyncio.create_task(batcher.run())
    now = time.monotonic()
    for rid, text in enumerate(good + [bad]):
        batcher.submit(WorkItem(rid, text, parameters, "p", now, now + 60))
    try:
        await asyncio.wait_for(all_answered.wait(), 60)
    finally:
        batcher.close()
        await running
        executor.shutdown()
    assert isinstance(answers[4], InvalidParameters), answers[4]
    for rid, text in enumerate(good):
        assert_same_fill_mask(answers[rid], fill_runner([text], parameters).outputs[0])
    assert max(batch_sizes) > 1  # the four were answered in batches, not only one at a time


def test_classify_error_unknown_failure_is_model_error():
    err = classify_error(RuntimeError("CUDA out of memory\nsecond line"))
    assert isinstance(err, ModelError) and err.status == 500
    assert "RuntimeError" in str(err) and "second line" not in str(err)


# -- 7. infer_task ----------------------------------------------------------------------------------
def _model_dir(tmp_path, architectures):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": architectures}))
    return str(tmp_path)


def test_infer_task_tiny_model_is_fill_mask(tiny_model_dir):
    assert infer_task(str(tiny_model_dir)) == "fill-mask"


@pytest.mark.parametrize(
    "architectures, task",
    [
        (["BertModel"], "feature-extraction"),
        (["BertForSequenceClassification"], "text-classification"),
        (["GPT2LMHeadModel"], "text-generation"),
        (["T5ForConditionalGeneration"], "text2text-generation"),
    ],
)
def test_infer_task_from_architectures(tmp_path, architectures, task):
    assert infer_task(_model_dir(tmp_path, architectures)) == task


def test_infer_task_without_config_asks_for_task(tmp_path):
    with pytest.raises(ValueError, match="--task"):
        infer_task(str(tmp_path))


@pytest.mark.parametrize("architectures", [["BertForPreTraining"], []])
def test_infer_task_unknown_architecture_asks_for_task(tmp_path, architectures):
    with pytest.raises(ValueError, match="--task"):
        infer_task(_model_dir(tmp_path, architectures))


def _hub_cache(monkeypatch, tmp_path, repo_id: str, files_from=None):
    """A local hub cache (the layout huggingface_hub writes) holding ``repo_id`` at one
    revision, with ``files_from``'s files; the hub client reads it and nothing else."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    if files_from is not None:
        revision = "0" * 40
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
        shutil.copytree(files_from, repo / "snapshots" / revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_hub_id_in_the_local_cache_needs_no_task(monkeypatch, tmp_path, tiny_model_dir):
    _hub_cache(monkeypatch, tmp_path, "batchwire-test/tiny-fill-mask", tiny_model_dir)
    assert infer_task("batchwire-test/tiny-fill-mask") == "fill-mask"
    runner = PipelineRunner("batchwire-test/tiny-fill-mask", None, "cpu")
    assert runner.task == "fill-mask"
    runner.load()
    answers = runner(["Paris is the [MASK] of France."], {}).outputs[0]
    assert len(answers) == 5 and all("[MASK]" not in a["sequence"] for a in answers)


def test_a_hub_ids_declared_pooling_is_read_from_the_cache(monkeypatch, tmp_path):
    """A sentence-transformers model served by hub id keeps its declared pooling and
    normalisation, as it does from a directory."""
    from worker.runner import declared_embedding

    minilm = Path(default_model_path())
    files = tmp_path / "minilm-files"
    (files / "1_Pooling").mkdir(parents=True)
    for name in ("config.json", "modules.json", "1_Pooling/config.json"):
        (files / name).write_bytes((minilm / name).read_bytes())
    _hub_cache(monkeypatch, tmp_path, "sentence-transformers/all-MiniLM-L6-v2", files)
    assert declared_embedding(str(minilm)) == ("mean", True)
    assert declared_embedding("sentence-transformers/all-MiniLM-L6-v2") == ("mean", True)
    assert infer_task("sentence-transformers/all-MiniLM-L6-v2") == "feature-extraction"
    assert declared_embedding("sentence-transformers/not-cached") == ("mean", False)


def test_a_hub_id_not_in_the_cache_offline_asks_for_task(monkeypatch, tmp_path):
    _hub_cache(monkeypatch, tmp_path, "batchwire-test/not-here")
    with pytest.raises(ValueError, match=r"not a local directory.*hub cache.*pass --task"):
        infer_task("batchwire-test/not-here")


# -- 8. to_wire -----------------------------------------------------------------------------------------
def test_to_wire_nested_containers_and_numpy_scalars():
    obj = {"a": [np.float32(0.5), (1, "x", None)], 2: {"b": (np.int64(3), True)}}
    wire = to_wire(obj)
    assert wire == {"a": [0.5, [1, "x", None]], "2": {"b": [3, True]}}
    assert type(wire["a"][0]) is float
    assert type(wire["2"]["b"][0]) is int


def test_to_wire_numpy_array_round_trips():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    for source in (array, array.transpose(2, 0, 1)):  # C-contiguous and not
        wire = to_wire(source)
        assert isinstance(wire, NDArray)
        np.testing.assert_array_equal(wire.to_numpy(), source)
        assert wire.to_numpy().dtype == np.float32


@pytest.mark.parametrize(
    "dtype, wire_dtype",
    [("float32", np.float32), ("bfloat16", np.float32), ("float16", np.float16), ("int64", np.int64)],
)
def test_to_wire_torch_tensors(dtype, wire_dtype):
    tensor = torch.tensor([[1.5, -2.0, 3.25]], dtype=getattr(torch, dtype))
    wire = to_wire(tensor)
    assert isinstance(wire, NDArray)
    array = wire.to_numpy()
    assert array.dtype == wire_dtype
    assert array.shape == (1, 3)
    np.testing.assert_array_equal(array, tensor.float().numpy().astype(wire_dtype))


def test_to_wire_torch_scalar_is_python():
    assert to_wire(torch.tensor(2.5)) == 2.5
    assert type(to_wire(torch.tensor(2.5))) is float


def test_to_wire_rejects_unknown_objects():
    with pytest.raises(TypeError, match="object"):
        to_wire(object())
    with pytest.raises(TypeError):
        to_wire({"nested": [{1, 2}]})


# -- 9. warm-up and defaults -------------------------------------------------------------------------------
def test_default_runner_is_minilm_feature_extraction(minilm_runner):
    assert minilm_runner.model == default_model_path()
    assert minilm_runner.task == "feature-extraction"
    unloaded = PipelineRunner(None, None, "cpu")
    assert (unloaded.model, unloaded.task, unloaded.pipe) == (default_model_path(), "feature-extraction", None)


@pytest.mark.parametrize("name", ["fill_runner", "tiny_fe_runner", "minilm_runner"])
def test_warm_up_returns_duration(request, name):
    runner = request.getfixturevalue(name)
    started = time.monotonic()
    duration = runner.warm_up(4)
    assert isinstance(duration, float)
    assert 0 < duration <= time.monotonic() - started


# -- sentence embeddings (REQUEST.embed) ----------------------------------------------------
def test_minilm_declares_mean_pooling_with_normalisation(minilm_runner):
    assert (minilm_runner.pooling, minilm_runner.normalize) == ("mean", True)
    assert minilm_runner.pooling_description == "mean+normalize"


def test_embeddings_match_sentence_transformers(minilm_runner):
    """The pooled vector is what sentence-transformers itself computes for the model."""
    from sentence_transformers import SentenceTransformer

    texts = ["a cat sits on the mat", "stock markets fell sharply after the announcement", "hi"]
    result = minilm_runner(list(texts), {EMBED_KEY: True})
    reference = SentenceTransformer(minilm_runner.model, device="cpu").encode(texts)
    for out, ref in zip(result.outputs, reference):
        vector = out.to_numpy()
        assert vector.shape == (384,)
        np.testing.assert_allclose(vector, ref, atol=1e-5)
    tokenizer = minilm_runner.pipe.tokenizer
    assert list(result.tokens) == [len(tokenizer(t)["input_ids"]) for t in texts]


def _distinct_words(n: int, seed: int) -> str:
    """A text of ``n`` words, no stretch of it repeating: a truncated embedding differs
    from a whole one, and from another text's."""
    rng = np.random.default_rng(seed)
    vocabulary = ("river market engine quiet purple ladder winter signal orange pocket "
                  "thunder garden copper silent rocket violin meadow harbor candle whisper "
                  "forest bridge mirror planet saddle").split()
    return " ".join(rng.choice(vocabulary, size=n))


def test_long_embeddings_are_truncated_as_sentence_transformers_does(minilm_runner):
    """all-MiniLM-L6-v2 declares max_seq_length 256 (its tokenizer takes 512):
    sentence-transformers embeds a longer text's first 256 tokens, so a vector served here
    must be that one, or it will not match an index built with sentence-transformers. Every
    path is checked: measured on arrival or not, in a batch and alone, and a text whose
    arrival encoding a token-level request left behind."""
    from sentence_transformers import SentenceTransformer

    assert minilm_runner.embed_max_length == 256 and minilm_runner.max_length == 512
    texts = [_distinct_words(300, 1), "a cat sits on the mat", _distinct_words(600, 2),
             _distinct_words(254, 3)]
    counts = [n_tokens(minilm_runner, t) for t in texts]
    assert counts[0] > 256 and counts[2] > 512 and counts[3] == 256, counts
    model = SentenceTransformer(minilm_runner.model, device="cpu")
    assert model.max_seq_length == 256
    reference = model.encode(texts)
    whole = minilm_runner([texts[0]], {}).outputs[0].to_numpy()[0].mean(axis=0)
    # Unit vectors: the cosine of the untruncated mean with sentence-transformers' is not 1.
    assert float(np.dot(whole / np.linalg.norm(whole), reference[0])) < 0.999
    embed = {EMBED_KEY: True}
    want_counts = [min(n, 256) for n in counts]

    def check(result, indices):
        assert list(result.tokens) == [want_counts[i] for i in indices]
        for out, i in zip(result.outputs, indices):
            np.testing.assert_allclose(out.to_numpy(), reference[i], atol=2e-5)

    measured = [minilm_runner.measure(t, embed) for t in texts]
    assert measured == want_counts
    # One Rust call on arrival gives each text its cut encoding, which the batch builds the
    # model inputs from: no second tokenization. The counting backend is left uncut.
    assert minilm_runner._measurer.truncating is not None
    assert minilm_runner._measurer.counting.truncation is None
    # The thread that measures long texts cuts with its own copy.
    assert minilm_runner._bulk_measurer.truncating not in (None, minilm_runner._measurer.truncating)
    assert minilm_runner.measure(texts[2], embed, bulk=True) == want_counts[2]
    remembered = minilm_runner.batch_encoder._remembered
    assert [len(remembered[(t, 256)]) for t in texts] == want_counts
    check(minilm_runner(list(texts), embed, measured), range(4))
    check(minilm_runner(list(texts), embed), range(4))
    for i, text in enumerate(texts):
        check(minilm_runner([text], embed, [minilm_runner.measure(text, embed)]), [i])
        check(minilm_runner([text], embed), [i])
    # A token-level request measures (and leaves behind) the whole encoding of a 300-token
    # text; an embedding of the same text must not build its inputs from it.
    assert minilm_runner.measure(texts[0], {}) == counts[0]
    check(minilm_runner([texts[0]], embed, [256]), [0])
    assert minilm_runner.measure(texts[0], {}) == counts[0]
    check(minilm_runner([texts[0], texts[1]], embed, [256, want_counts[1]]), [0, 1])
    # The other way round: the same text measured whole for its token-level answer, then
    # cut for its embedding, before either runs. Each batch gets its own encoding; the
    # token-level answer is all of the text's tokens, not the embedding's first 256.
    for _ in range(2):
        assert minilm_runner.measure(texts[0], {}) == counts[0]
        assert minilm_runner.measure(texts[0], embed) == 256
        whole_tokens = minilm_runner([texts[0]], {}, [counts[0]]).outputs[0].to_numpy()
        assert whole_tokens.shape == (1, counts[0], 384)
        check(minilm_runner([texts[0]], embed, [256]), [0])
    # Token-level answers are not truncated: the whole 300 tokens, or a 422 past 512.
    assert minilm_runner([texts[0]], {}).outputs[0].to_numpy().shape == (1, counts[0], 384)
    with pytest.raises(InputTooLong):
        minilm_runner.measure(texts[2], {})


class _Recording:
    """A Rust backend that notes the length of every text it encodes, and encodes it."""

    def __init__(self, backend):
        self.backend, self.lengths = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def encode_batch_fast(self, texts):
        self.lengths += [len(t) for t in texts]
        return self.backend.encode_batch_fast(texts)


def test_a_long_texts_embedding_is_tokenized_from_its_start(minilm_runner, monkeypatch):
    """An embedding keeps a text's first 256 tokens, so a 100,000-character text is
    tokenized from its start only (a 4 MiB one took 2.5 to 10 s whole), cut before a
    whitespace or, in CJK text, an ideograph; the vectors are sentence-transformers' all
    the same. A start with too few tokens in it (long whitespace runs) and text with nowhere
    to cut (a long run of kana) are tokenized whole."""
    from sentence_transformers import SentenceTransformer

    from worker.text_starts import PREFIX_CHARS_PER_TOKEN, embedding_prefix

    measurer = minilm_runner._measurer
    assert measurer.prefix_cut and minilm_runner._bulk_measurer.prefix_cut
    assert measurer.ideograph_cut and minilm_runner._bulk_measurer.ideograph_cut
    recording = _Recording(measurer.truncating)
    monkeypatch.setattr(measurer, "truncating", recording)
    texts = [_distinct_words(20_000, 5),
             "Don't stop , it's [SEP] here .\nReally ? Yes ! " * 3000,
             "word" + " " * 20_000 + _distinct_words(5_000, 6),
             "猫が座った。" * 3000,
             "".join(chr(0x4E00 + (n * 7919) % 20902) for n in range(20_000)),
             "かたかな、カタカナ。" * 3000]
    model = SentenceTransformer(minilm_runner.model, device="cpu")
    reference = model.encode(texts)
    embed = {EMBED_KEY: True}
    budget = PREFIX_CHARS_PER_TOKEN * (256 + 16)
    padded = {"tokenize_kwargs": {"padding": "max_length", "max_length": 512}}
    for text, want in zip(texts, reference):
        # A call like this leaves padding set on the measuring backend: a start's count
        # must not take it in (the third text's start holds 3 tokens, not 512).
        minilm_runner.measure("hello", padded)
        recording.lengths.clear()
        assert minilm_runner.measure(text, embed) == 256
        (vector,) = minilm_runner([text], embed, [256]).outputs
        np.testing.assert_allclose(vector.to_numpy(), want, atol=2e-5)
        prefix = embedding_prefix(text, 256, ideographs=True)
        if prefix is not None and len(model.tokenizer(prefix)["input_ids"]) >= 256 + 16:
            assert recording.lengths == [len(prefix)] and budget - 1024 <= len(prefix) <= budget
            assert text[len(prefix)].isspace() or 0x4E00 <= ord(text[len(prefix)]) <= 0x9FFF
        else:
            assert recording.lengths == [len(text)], "tokenized whole"
    # Which took which way: the first two and the CJK ones from their start.
    assert [embedding_prefix(t, 256, ideographs=True) is not None
            for t in texts] == [True, True, True, True, True, False]
    assert [embedding_prefix(t, 256) is not None
            for t in texts] == [True, True, True, False, False, False]
    # The item the batch runs is that start, so even with its arrival encoding gone the
    # batch tokenizes no more than it.
    for text, want in zip(texts, reference):
        tokens, run = minilm_runner.arrive(text, embed)
        assert tokens == 256 and (run == text) == (text is texts[2] or text is texts[-1])
        minilm_runner.batch_encoder.forget_arrivals()
        (vector,) = minilm_runner([run], embed, [tokens]).outputs
        np.testing.assert_allclose(vector.to_numpy(), want, atol=2e-5)


def test_a_plain_models_long_text_with_truncation_is_cut_on_arrival_too(tiny_fe_runner):
    """A model without sentence-transformers files has no embedding cut to check the start
    against; unchecked, {"truncation": true} on a 4 MiB text tokenized it whole on arrival
    and again in its batch, which held the inference thread for 3 s. Checked at the model's
    own limit, its item is the start, and the answer the whole text's."""
    assert tiny_fe_runner.embed_max_length is None and tiny_fe_runner.max_length == TINY_LIMIT
    assert tiny_fe_runner._measurer.prefix_cut and tiny_fe_runner._bulk_measurer.prefix_cut
    for text in (_distinct_words(20_000, 8), "".join(chr(0x4E00 + (n * 7919) % 20902)
                                                      for n in range(20_000))):
        tokens, run = tiny_fe_runner.arrive(text, {"truncation": True})
        assert tokens == TINY_LIMIT and len(run) < len(text) // 4 and text.startswith(run)
        (short,) = tiny_fe_runner([run], {"truncation": True}, [tokens]).outputs
        (whole,) = tiny_fe_runner([text], {"truncation": True}).outputs
        np.testing.assert_array_equal(short.to_numpy(), whole.to_numpy())


def test_token_level_answers_with_truncation_run_a_long_texts_start(minilm_runner):
    """{"truncation": true} answers the first 512 tokens' vectors: a long text's item is its
    start, and the answer is the one the whole text gives."""
    text = _distinct_words(20_000, 7)
    tokens, run = minilm_runner.arrive(text, {"truncation": True})
    assert tokens == 512 and len(run) < len(text) // 4 and text.startswith(run)
    (short,) = minilm_runner([run], {"truncation": True}, [tokens]).outputs
    (whole,) = minilm_runner([text], {"truncation": True}).outputs
    assert short.to_numpy().shape == whole.to_numpy().shape == (1, 512, 384)
    np.testing.assert_array_equal(short.to_numpy(), whole.to_numpy())
    # Other parameters, or none: the text as sent.
    assert minilm_runner.arrive(text, {"truncation": True, "tokenize_kwargs": {}})[1] is text
    with pytest.raises(InputTooLong):
        minilm_runner.arrive(text, {})


def test_a_tokenizer_that_keeps_a_long_texts_end_is_not_cut_at_its_start(minilm_runner):
    from tokenizers import Tokenizer

    from worker.text_starts import prefix_cut_agrees

    counting = minilm_runner._measurer.embed_counting
    for side in ("right", "left"):
        cutting = Tokenizer.from_str(counting.to_str())
        cutting.enable_truncation(256, direction=side)
        assert prefix_cut_agrees(counting, cutting, 256) is (side == "right")


def test_text_is_cut_before_an_ideograph_only_where_the_tokenizer_sets_each_apart(
        minilm_runner):
    """BERT's tokenizer makes every CJK ideograph a piece of its own, so a cut before one
    changes none of the tokens before it. A tokenizer that keeps a run of them together
    (sentencepiece's, or BERT's without its Chinese-character handling), or has an added
    token with one in it, is never cut there."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers

    from worker.text_starts import ideographs_stand_alone, prefix_cut_agrees

    counting = minilm_runner._measurer.embed_counting
    assert ideographs_stand_alone(counting)
    cutting = Tokenizer.from_str(counting.to_str())
    cutting.enable_truncation(256)
    assert prefix_cut_agrees(counting, cutting, 256, ideographs=True)

    together = Tokenizer.from_str(counting.to_str())
    together.normalizer = normalizers.BertNormalizer(handle_chinese_chars=False)
    assert not ideographs_stand_alone(together)
    spaced = Tokenizer.from_str(counting.to_str())
    spaced.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not ideographs_stand_alone(spaced)
    added = Tokenizer.from_str(counting.to_str())
    added.add_tokens([AddedToken("新品", single_word=False)])
    assert not ideographs_stand_alone(added)
    # Cut all the same, it would be found out by the check texts.
    together_cutting = Tokenizer.from_str(together.to_str())
    together_cutting.enable_truncation(256)
    assert not prefix_cut_agrees(together, together_cutting, 256, ideographs=True)
    assert prefix_cut_agrees(together, together_cutting, 256)


def test_max_seq_length_setting_truncates_embeddings_of_any_feature_model(tiny_model_dir,
                                                                         tiny_fe_runner, caplog):
    """--max-seq-length N cuts embeddings at N on a model that declares nothing (which
    otherwise refuses an input past its limit), and one past the model's limit fails the
    load with a message that says why."""
    text = "word " * 200
    assert tiny_fe_runner.embed_max_length is None
    runner = PipelineRunner(str(tiny_model_dir), "feature-extraction", "cpu", max_seq_length=16)
    runner.load()
    assert runner.embed_max_length == 16
    assert runner.measure(text, {EMBED_KEY: True}) == 16
    (vector,) = runner([text], {EMBED_KEY: True}).outputs
    (cut,) = runner(["word " * 14], {EMBED_KEY: True}).outputs  # [CLS] + 14 + [SEP]
    np.testing.assert_allclose(vector.to_numpy(), cut.to_numpy(), atol=1e-6)
    with pytest.raises(InputTooLong):  # token-level answers are not cut
        runner.measure(text, {})
    fill_mask = PipelineRunner(str(tiny_model_dir), "fill-mask", "cpu", max_seq_length=16)
    with caplog.at_level("WARNING", logger="batchwire.worker.runner"):
        fill_mask.load()
    assert fill_mask.embed_max_length is None
    assert "--max-seq-length 16 is for sentence embeddings" in caplog.text
    with pytest.raises(InputTooLong):  # not cut: a fill-mask answer is the whole input's
        fill_mask.measure("word " * 200 + "[MASK]", {})
    too_far = PipelineRunner(str(tiny_model_dir), "feature-extraction", "cpu",
                             max_seq_length=TINY_LIMIT + 1)
    with pytest.raises(ValueError, match=f"--max-seq-length {TINY_LIMIT + 1} is more than "
                       f"the {TINY_LIMIT} tokens"):
        too_far.load()


def test_a_sentence_transformers_model_declaring_no_length_cuts_at_its_limit(tiny_model_dir,
                                                                            tmp_path):
    """sentence-transformers truncates at the tokenizer's limit when a model declares no
    max_seq_length; served as one (modules.json names a Transformer), the tiny model's
    embeddings do too, where the plain tiny model refuses the input."""
    for item in tiny_model_dir.iterdir():
        shutil.copy(item, tmp_path / item.name)
    (tmp_path / "modules.json").write_text(
        '[{"path": "", "type": "sentence_transformers.models.Transformer"}]')
    runner = _load(str(tmp_path), "feature-extraction")
    assert runner.embed_max_length == runner.max_length == TINY_LIMIT
    text = "word " * 200
    assert runner.measure(text, {EMBED_KEY: True}) == TINY_LIMIT
    (vector,) = runner([text], {EMBED_KEY: True}).outputs
    (cut,) = runner(["word " * (TINY_LIMIT - 2)], {EMBED_KEY: True}).outputs
    np.testing.assert_allclose(vector.to_numpy(), cut.to_numpy(), atol=1e-6)


def _sentence_transformers_dir(tiny_model_dir, target, pooling: dict, normalize: bool = False):
    """The tiny model as a sentence-transformers model with this Pooling config."""
    for item in tiny_model_dir.iterdir():
        shutil.copy(item, target / item.name)
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, **pooling}))
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (target / "modules.json").write_text(json.dumps(modules))
    return target


@pytest.mark.parametrize("pooling, normalize, want", [
    ({"pooling_mode": "cls"}, False, "cls"),
    ({"pooling_mode": "max"}, False, "max"),
    ({"pooling_mode": "mean"}, True, "mean"),
    ({"pooling_mode": "mean_sqrt_len_tokens"}, False, "mean_sqrt_len_tokens"),
    ({"pooling_mode": "weightedmean"}, False, "weightedmean"),
    ({"pooling_mode": "lasttoken"}, True, "lasttoken"),
    ({"pooling_mode": ["cls", "mean"]}, True, "cls,mean"),  # concatenated
    ({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
      "pooling_mode_weightedmean_tokens": True}, False, "weightedmean"),  # the older form
    ({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False}, False, "mean"),
], ids=lambda v: str(v) if not isinstance(v, dict) else "+".join(
    str(x) for k, x in v.items() if k == "pooling_mode" or x is True) or "legacy-none")
def test_every_sentence_transformers_pooling_gives_its_vectors(tiny_model_dir, tmp_path,
                                                               pooling, normalize, want):
    """Whatever pooling a model's Pooling config names, in either config form, the
    embedding is sentence-transformers' own: batched with padding and alone."""
    from sentence_transformers import SentenceTransformer

    model_dir = _sentence_transformers_dir(tiny_model_dir, tmp_path, pooling, normalize)
    runner = _load(str(model_dir), "feature-extraction")
    assert runner.pooling == want and runner.normalize == normalize
    texts = ["Hi.", LONG_TEXT, "A medium sized sentence about cats."]
    reference = SentenceTransformer(str(model_dir), device="cpu").encode(texts)
    assert reference.shape == (3, 32 * len(want.split(",")))
    batched = runner(list(texts), {EMBED_KEY: True}).outputs
    alone = [runner([t], {EMBED_KEY: True}).outputs[0] for t in texts]
    for got in (batched, alone):
        np.testing.assert_allclose(np.stack([v.to_numpy() for v in got]), reference,
                                   atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("skip", [0, 3], ids=["all-tokens", "prompt-left-out"])
@pytest.mark.parametrize("pooling", ["cls", "max", "mean", "mean_sqrt_len_tokens",
                                     "weightedmean", "lasttoken", "cls,mean"])
def test_pooling_on_the_device_equals_pooling_in_numpy(pooling, skip):
    """A GPU worker pools with torch on the device (no copy of every token to the host);
    the same arithmetic as the CPU's numpy path, checked here on CPU tensors."""
    runner = PipelineRunner(None, None, "cpu")
    runner.pooling, runner.normalize = pooling, True
    tokens = torch.randn(7, 16)
    np.testing.assert_allclose(runner._pool_torch(tokens, skip).numpy(),
                               runner._pool_numpy(tokens.numpy(), skip), atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "max", "mean", "mean_sqrt_len_tokens",
                                     "weightedmean", "lasttoken", "cls,mean"])
def test_a_pooling_that_leaves_the_prompt_out_pools_the_texts_tokens(tiny_model_dir, tmp_path,
                                                                      pooling):
    """include_prompt false (INSTRUCTOR's and GritLM's Pooling): sentence-transformers
    pools over what follows the prompt, its leading special token left out with it, and
    weights positions from the input's start; the vectors must be those, for the default
    prompt and a named one, batched and alone, on either pooling path."""
    from sentence_transformers import SentenceTransformer

    model_dir = _sentence_transformers_dir(
        tiny_model_dir, tmp_path, {"pooling_mode": pooling.split(","), "include_prompt": False})
    (model_dir / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": "Represent the question for retrieval: ", "doc": "passage: ",
                    "none": ""},
        "default_prompt_name": "doc"}))
    runner = _load(str(model_dir), "feature-extraction")
    model = SentenceTransformer(str(model_dir), device="cpu")
    texts = ["Hi.", LONG_TEXT, "A medium sized sentence about cats."]
    for name, key in ((None, True), ("query", "query"), ("none", "none")):
        reference = model.encode(texts, prompt_name=name)
        for pool_on_device in (False, True):
            if pool_on_device:
                runner._pool = lambda out, skip=0: runner._pool_torch(out[0].float(), skip)
            batched = runner(list(texts), {EMBED_KEY: key}).outputs
            alone = [runner([t], {EMBED_KEY: key}).outputs[0] for t in texts]
            for got in (batched, alone):
                np.testing.assert_allclose(np.stack([v.to_numpy() for v in got]), reference,
                                           atol=2e-5, rtol=1e-5, err_msg=f"{name}")
            runner.__dict__.pop("_pool", None)
    # Leaving the prompt out is what made them so (but for the last token, the same).
    model[1].include_prompt = True
    (served,) = runner(texts[:1], {EMBED_KEY: True}).outputs
    assert pooling == "lasttoken" or np.abs(model.encode(texts[:1])[0]
                                            - served.to_numpy()).max() > 1e-3


@pytest.mark.parametrize("layers, safe", [
    ([(16, "torch.nn.modules.activation.Tanh")], True),  # distiluse's and LaBSE's shape
    ([(16, "torch.nn.modules.linear.Identity"), (8, "torch.nn.modules.activation.GELU")],
     False),  # two in a row, weights in pytorch_model.bin
], ids=["tanh", "identity+gelu-bin"])
def test_dense_modules_give_sentence_transformers_vectors(tiny_model_dir, tmp_path, layers,
                                                          safe):
    """A Dense projection after the pooling (LaBSE, distiluse, sentence-t5 end in one)
    changes the vectors and their size; the embedding is its output, normalised after it,
    as sentence-transformers computes it. The model is saved by sentence-transformers
    itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (Dense, Normalize, Pooling,
                                                                    Transformer)

    modules, size = [Transformer(str(tiny_model_dir)), Pooling(32, "mean")], 32
    for out, activation in layers:
        module_name, _, class_name = activation.rpartition(".")
        act = getattr(__import__(module_name, fromlist=[class_name]), class_name)()
        modules.append(Dense(size, out, activation_function=act))
        size = out
    modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu")
    model.save(str(tmp_path), safe_serialization=safe)
    runner = _load(str(tmp_path), "feature-extraction")
    assert runner.embedding_refusal == "" and len(runner.dense_layers) == len(layers)
    texts = ["Hi.", LONG_TEXT, "A medium sized sentence about cats."]
    reference = model.encode(texts)
    assert reference.shape == (3, size)
    batched = runner(list(texts), {EMBED_KEY: True}).outputs
    alone = [runner([t], {EMBED_KEY: True}).outputs[0] for t in texts]
    for got in (batched, alone):
        np.testing.assert_allclose(np.stack([v.to_numpy() for v in got]), reference,
                                   atol=2e-5)
    # The device path (a GPU worker's), here on CPU tensors.
    runner._pool = lambda tokens, skip=0: runner._pool_torch(tokens[0].float(), skip)
    on_device = runner(list(texts), {EMBED_KEY: True}).outputs
    np.testing.assert_allclose(np.stack([v.to_numpy() for v in on_device]), reference,
                               atol=2e-5)


@pytest.mark.parametrize("include_prompt", [True, False])
def test_a_default_prompt_is_put_before_every_embedded_text(tiny_model_dir, tmp_path,
                                                             include_prompt):
    """sentence-transformers' encode puts a model's default prompt before every text (a
    model saved with default_prompt_name); the vectors must be those, whether the Pooling
    pools the prompt's tokens or leaves them out."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model = SentenceTransformer(
        modules=[Transformer(str(tiny_model_dir)),
                 Pooling(32, "mean", include_prompt=include_prompt)],
        device="cpu", prompts={"query": "query: ", "passage": "passage: "},
        default_prompt_name="query")
    model.save(str(tmp_path))
    runner = _load(str(tmp_path), "feature-extraction")
    texts = ["a cat", LONG_TEXT]
    assert runner.embedding_prompt == "query: "
    assert runner.prompt_excluded is not include_prompt
    reference = model.encode(texts)
    assert np.abs(reference[0] - model.encode(texts[:1], prompt="")[0]).max() > 1e-3
    measured = [runner.measure(t, {EMBED_KEY: True}) for t in texts]
    assert measured == [n_tokens(runner, "query: " + t) for t in texts]
    for result in (runner(list(texts), {EMBED_KEY: True}, measured),
                   runner(list(texts), {EMBED_KEY: True})):
        np.testing.assert_allclose(np.stack([v.to_numpy() for v in result.outputs]),
                                   reference, atol=2e-5)
        assert list(result.tokens) == measured
    # Token-level answers are the text's own, without the prompt.
    assert runner([texts[0]], {}).outputs[0].to_numpy().shape[1] == n_tokens(runner, texts[0])


@pytest.mark.parametrize("default", [None, "query"], ids=["no-default", "default-query"])
def test_a_named_prompt_is_put_before_every_embedded_text(tiny_model_dir, tmp_path, default):
    """A request's prompt_name picks one of the model's prompts, as encode(prompt_name=...)
    does, in place of its default prompt; a name the model does not have is a 400 that
    lists those it has. Prompts batch apart, so a batch's texts share their prompt."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model = SentenceTransformer(
        modules=[Transformer(str(tiny_model_dir)), Pooling(32, "mean")], device="cpu",
        prompts={"query": "query: ", "passage": "passage: "}, default_prompt_name=default)
    model.save(str(tmp_path))
    runner = _load(str(tmp_path), "feature-extraction")
    texts = ["a cat", LONG_TEXT]
    for name in ("query", "passage"):
        reference = model.encode(texts, prompt_name=name)
        embed = {EMBED_KEY: name}
        measured = [runner.measure(t, embed) for t in texts]
        assert measured == [n_tokens(runner, f"{name}: {t}") for t in texts]
        for result in (runner(list(texts), embed, measured), runner(list(texts), embed),
                       runner(texts[:1], embed)):
            got = np.stack([v.to_numpy() for v in result.outputs])
            np.testing.assert_allclose(got, reference[:len(got)], atol=2e-5)
    # No name: the default prompt, or none.
    (plain,) = runner(texts[:1], {EMBED_KEY: True}).outputs
    np.testing.assert_allclose(plain.to_numpy(), model.encode(texts[:1])[0], atol=2e-5)
    assert (np.abs(plain.to_numpy() - model.encode(texts[:1], prompt="")[0]).max() > 1e-3) \
        == (default is not None)
    for attempt in (lambda: runner.measure("a cat", {EMBED_KEY: "search"}),
                    lambda: runner(["a cat"], {EMBED_KEY: "search"})):
        # (sentence-transformers 6 saves an empty "document" prompt beside those given.)
        with pytest.raises(BadInput, match="\"prompt_name\" is 'search', which is not one "
                           "of this model's prompts: (document, )?passage, query$"):
            attempt()


def test_a_prompt_name_the_worker_cannot_honour_is_refused(tiny_model_dir, tmp_path):
    """A name the model lacks (it has only sentence-transformers' empty "query" and
    "document", MiniLM's case) and --pooling (no sentence-transformers prompts): each a 400
    that says what to do, while embeddings without a name, or of "query", still work."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    (tmp_path / "bare").mkdir()
    bare = _sentence_transformers_dir(tiny_model_dir, tmp_path / "bare",
                                      {"pooling_mode": "mean"})
    prompted = tmp_path / "prompted"
    SentenceTransformer(modules=[Transformer(str(tiny_model_dir)), Pooling(32, "mean")],
                        device="cpu", prompts={"query": "query: "}).save(str(prompted))
    chosen = PipelineRunner(str(prompted), "feature-extraction", "cpu", pooling="mean")
    chosen.load()
    bare_runner = _load(str(bare), "feature-extraction")
    for runner, name, why in (
            (bare_runner, "search",
             "'search', which is not one of this model's prompts: document, query"),
            (chosen, "query", "pools as its --pooling flag says.*put the prompt before")):
        with pytest.raises(BadInput, match=why):
            runner.measure("a cat", {EMBED_KEY: name})
        assert runner(["a cat"], {EMBED_KEY: True}).outputs[0].to_numpy().shape == (32,)
    # sentence-transformers' own empty prompts: the text as it is.
    assert bare_runner.embedding_prompts == {"query": "", "document": ""}
    plain = bare_runner(["a cat"], {EMBED_KEY: True}).outputs[0].to_numpy()
    for name in ("query", "document"):
        named = bare_runner(["a cat"], {EMBED_KEY: name}).outputs[0].to_numpy()
        np.testing.assert_array_equal(named, plain)


def test_do_lower_case_lowercases_embedded_texts_as_sentence_transformers_does(
        tiny_model_dir, tmp_path):
    """A Transformer module saved with do_lower_case lowercases every text it embeds, even
    when its tokenizer keeps case: sentence-transformers puts a Lowercase normalizer ahead
    of the tokenizer's own, so special tokens written in a text stay special. Token-level
    answers are the pipeline's, which keeps case."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    cased = tmp_path / "cased"
    shutil.copytree(tiny_model_dir, cased)
    AutoTokenizer.from_pretrained(str(tiny_model_dir), do_lower_case=False).save_pretrained(
        str(cased))
    # Written as published models have it (bge's, for one): sentence-transformers 6 saves
    # a model it lowercases for without the flag, so its own reload would not lowercase.
    model_dir = _sentence_transformers_dir(cased, tmp_path, {"pooling_mode": "mean"})
    (model_dir / "sentence_bert_config.json").write_text(
        '{"max_seq_length": 128, "do_lower_case": true}')
    model = SentenceTransformer(str(model_dir), device="cpu")
    assert "Lowercase()" in str(model.tokenizer.backend_tokenizer.normalizer)
    runner = _load(str(model_dir), "feature-extraction")
    texts = ["A Cat SAT on the MAT [SEP] Then LEFT", LONG_TEXT.upper(), "ok"]
    reference = model.encode(texts)
    cased_ids = runner.pipe.tokenizer(texts[0])["input_ids"]
    assert cased_ids != runner.pipe.tokenizer(texts[0].lower())["input_ids"], "keeps case"
    want_tokens = [len(model.tokenize([t])["input_ids"][0]) for t in texts]
    embed = {EMBED_KEY: True}
    measured = [runner.measure(t, embed) for t in texts]
    assert measured == want_tokens
    for result in (runner(list(texts), embed, measured), runner(list(texts), embed),
                   runner(texts[:1], embed)):
        got = np.stack([v.to_numpy() for v in result.outputs])
        np.testing.assert_allclose(got, reference[:len(got)], atol=2e-5)
    # Token-level answers keep case, and never get an embedding's lowercased encoding.
    runner.measure(texts[0], embed)
    runner.measure(texts[0], {})
    (tokens,) = runner([texts[0]], {}).outputs
    want = runner.pipe(texts[0], return_tensors=True)[0].numpy()
    np.testing.assert_allclose(tokens.to_numpy()[0], want, atol=1e-5)
    assert runner.pipe.tokenizer is not runner._embed_tokenizer


def _with_module(model_dir, module: dict, files: dict | None = None):
    modules = json.loads((model_dir / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", **module})
    (model_dir / "modules.json").write_text(json.dumps(modules))
    for name, text in (files or {}).items():
        (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / name).write_text(text)


@pytest.mark.parametrize("module, files, why", [
    ({"path": "2_LSTM", "type": "sentence_transformers.models.LSTM"}, {}, "LSTM \\(2_LSTM\\)"),
    ({"path": "2_Dense", "type": "sentence_transformers.models.Dense"}, {},
     "Dense \\(2_Dense\\): 2_Dense/config.json is missing"),
    ({"path": "2_Dense", "type": "sentence_transformers.models.Dense"},
     {"2_Dense/config.json": '{"in_features": 32, "out_features": 16, "use_residual": true}'},
     "Dense \\(2_Dense\\): it adds a residual connection"),
    ({"path": "2_Dense", "type": "sentence_transformers.models.Dense"},
     {"2_Dense/config.json": '{"in_features": 32, "out_features": 16, '
                             '"activation_function": "mypackage.Swish"}'},
     "Dense \\(2_Dense\\): its activation 'mypackage.Swish' is not a torch.nn module"),
], ids=["unknown-module", "dense-without-files", "dense-residual", "dense-custom-activation"])
def test_a_model_with_modules_batchwire_does_not_run_refuses_embeddings(
        tiny_model_dir, tmp_path, module, files, why):
    """Pooling without a module the model ends in would answer vectors that match nothing
    the model made. So embeddings are a 400 that says which module and why; token-level
    answers still work, and --pooling serves the pooled transformer output to someone who
    asks for it."""
    model_dir = _sentence_transformers_dir(tiny_model_dir, tmp_path, {"pooling_mode": "mean"})
    _with_module(model_dir, module, files)
    runner = _load(str(model_dir), "feature-extraction")
    for attempt in (lambda: runner.measure("a cat", {EMBED_KEY: True}),
                    lambda: runner(["a cat"], {EMBED_KEY: True})):
        with pytest.raises(BadInput, match=f"modules include {why}.*which batchwire does "
                           "not run"):
            attempt()
    assert runner(["a cat"], {}).outputs[0].to_numpy().shape == (1, 4, 32)
    chosen = PipelineRunner(str(model_dir), "feature-extraction", "cpu", pooling="mean")
    chosen.load()
    assert chosen.embedding_refusal == ""
    assert chosen(["a cat"], {EMBED_KEY: True}).outputs[0].to_numpy().shape == (32,)


def test_an_unknown_declared_pooling_fails_the_load_unless_pooling_is_set(tiny_model_dir,
                                                                         tmp_path):
    model_dir = _sentence_transformers_dir(tiny_model_dir, tmp_path,
                                           {"pooling_mode": "attention"})
    with pytest.raises(ValueError, match="declares pooling \\['attention'\\].*pass --pooling"):
        _load(str(model_dir), "feature-extraction")
    runner = PipelineRunner(str(model_dir), "feature-extraction", "cpu", pooling="cls")
    runner.load()
    assert runner.pooling_description == "cls"


def test_declared_prompts_reads_the_names_and_the_default(tmp_path):
    from worker.runner import declared_prompts

    # sentence-transformers' empty "query" and "document" unless the model names them.
    empty = {"query": "", "document": ""}
    assert declared_prompts(default_model_path()) == (empty, "")  # MiniLM names none
    assert declared_prompts(str(tmp_path)) == (empty, "")  # no config at all
    config = tmp_path / "config_sentence_transformers.json"
    config.write_text('{"prompts": {"query": "query: ", "doc": ""}, "default_prompt_name": null}')
    assert declared_prompts(str(tmp_path)) == (
        {"query": "query: ", "document": "", "doc": ""}, "")
    config.write_text('{"prompts": {"query": "query: "}, "default_prompt_name": "query"}')
    assert declared_prompts(str(tmp_path)) == ({"query": "query: ", "document": ""}, "query: ")
    config.write_text('{"prompts": {"query": "query: "}, "default_prompt_name": "search"}')
    with pytest.raises(ValueError, match="default_prompt_name 'search' names no prompt"):
        declared_prompts(str(tmp_path))
    config.write_text('{"prompts": ["query: "]}')
    with pytest.raises(ValueError, match="\"prompts\" that are not a name -> text map"):
        declared_prompts(str(tmp_path))


def test_declared_max_seq_length_reads_the_transformer_modules_config(tmp_path):
    from worker.runner import declared_max_seq_length

    assert declared_max_seq_length(default_model_path()) == 256
    assert declared_max_seq_length(str(tmp_path)) is None  # not a sentence-transformers model
    (tmp_path / "modules.json").write_text(
        '[{"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},'
        ' {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    assert declared_max_seq_length(str(tmp_path)) == 0  # declares no length
    (tmp_path / "0_Transformer").mkdir()
    (tmp_path / "0_Transformer" / "sentence_bert_config.json").write_text(
        '{"max_seq_length": 128, "do_lower_case": false}')
    assert declared_max_seq_length(str(tmp_path)) == 128
    (tmp_path / "0_Transformer" / "sentence_bert_config.json").write_text(
        '{"max_seq_length": null}')
    assert declared_max_seq_length(str(tmp_path)) == 0


def test_embedding_on_a_fill_mask_worker_is_a_clear_400(fill_runner):
    from worker.runner import EMBED_KEY

    assert fill_runner.pooling_description == ""
    with pytest.raises(BadInput, match="no sentence embeddings"):
        fill_runner(["a [MASK]"], {EMBED_KEY: True})


def test_declared_embedding_reads_sentence_transformers_files(tmp_path):
    from worker.runner import declared_embedding

    assert declared_embedding(str(tmp_path)) == ("mean", False)  # nothing declared
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (tmp_path / "modules.json").write_text(
        '[{"path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    assert declared_embedding(str(tmp_path)) == ("cls", False)


# -- --dtype ----------------------------------------------------------------------------------
def test_auto_dtype_loads_the_checkpoints_own(minilm_runner, fill_runner):
    assert minilm_runner.dtype == "auto"
    assert minilm_runner.loaded_dtype == fill_runner.loaded_dtype == "float32"


def test_bfloat16_embeddings_are_float32_vectors_close_to_the_float32_ones(minilm_runner):
    from worker.runner import EMBED_KEY

    runner = PipelineRunner(None, None, "cpu", dtype="bfloat16")
    runner.load()
    assert runner.loaded_dtype == "bfloat16"
    assert {p.dtype for p in runner.pipe.model.parameters()} == {torch.bfloat16}
    texts = ["a cat sits on the mat", "stock markets fell sharply after the announcement", "hi",
             LONG_TEXT]
    got = runner(list(texts), {EMBED_KEY: True})
    want = minilm_runner(list(texts), {EMBED_KEY: True})
    assert list(got.tokens) == list(want.tokens)
    for out, ref in zip(got.outputs, want.outputs):
        vector, reference = out.to_numpy(), ref.to_numpy()
        assert vector.dtype == np.float32 and vector.shape == (384,)
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)
        # bfloat16 keeps 8 bits of mantissa: close in direction, not equal.
        assert float(vector @ reference) > 0.99
        assert not np.array_equal(vector, reference)
    # Token-level answers have no numpy bfloat16: they travel as float32.
    [tokens] = runner.__call__([SHORT_TEXT], {}).outputs
    assert tokens.dtype == "<f4" and tokens.shape[-1] == 384


def test_float16_token_level_answers_travel_as_float16(tiny_model_dir, tiny_fe_runner):
    runner = PipelineRunner(str(tiny_model_dir), "feature-extraction", "cpu", dtype="float16")
    runner.load()
    assert runner.loaded_dtype == "float16"
    [got] = runner([LONG_TEXT], {}).outputs
    [want] = tiny_fe_runner([LONG_TEXT], {}).outputs
    assert got.dtype == "<f2" and got.shape == want.shape
    np.testing.assert_allclose(got.to_numpy().astype(np.float32), want.to_numpy(),
                               rtol=0.05, atol=0.05)


def test_bfloat16_fill_mask_keeps_its_stand_ins_and_answers_as_the_bfloat16_pipeline(
        tiny_model_dir):
    runner = PipelineRunner(str(tiny_model_dir), None, "cpu", dtype="bfloat16")
    runner.load()
    # The stand-ins check themselves against the stock methods in the same dtype.
    assert runner.sparse_head is not None and runner.fill_mask_answers is not None
    assert runner.mask_scorer is not None and runner.batch_encoder is not None
    transformers.logging.set_verbosity_error()
    reference = transformers.pipeline("fill-mask", model=str(tiny_model_dir), device="cpu",
                                      dtype=torch.bfloat16)
    got = runner(list(FILL_MASK_INPUTS), {}).outputs
    for text, answer in zip(FILL_MASK_INPUTS, got):
        want = reference(text)
        assert_same_fill_mask(answer, want)


def test_a_cuda_device_this_host_cannot_use_is_refused_before_the_load(tiny_model_dir):
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError) as refused:
        PipelineRunner(str(tiny_model_dir), "fill-mask", f"cuda:{count}")
    expected = "this host has" if count else "this host cannot use CUDA"
    assert f"--device cuda:{count}: {expected}" in str(refused.value)
    assert PipelineRunner(str(tiny_model_dir), "fill-mask", "cpu").device == "cpu"


def test_a_model_folder_without_tokenizer_files_is_refused_at_load(tiny_model_dir, tmp_path):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for path in Path(tiny_model_dir).iterdir():
        if path.name not in TOKENIZER_FILES:
            shutil.copy(path, bare)
    with pytest.raises(ValueError, match="has no tokenizer files"):
        PipelineRunner(str(bare), "fill-mask", "cpu").load()
