"""Fill-mask candidates scored on the model's device, a batch at a time.

The stock ``FillMaskPipeline`` hands its postprocess the model's whole ``logits`` tensor,
``[batch, tokens, vocabulary]``, and ``Pipeline.forward`` first moves it to the CPU. For a
batch of 64 sentences of 32 tokens and BERT's 30,522-word vocabulary that is 250 MB copied
off a GPU (and allocated on the host) per batch, to read one row of each sentence; then
each input pays its own softmax and top-k, a handful of torch calls at ~10 us of dispatch
each. On a CPU the copy is free but the per-input calls are not.

:class:`MaskScorer` sits in the pipeline's ``_forward`` slot. When the runner has prepared it
for a call (:meth:`prepare`: the call's ``top_k``, no ``targets``), it runs the stock
``_forward``, gathers the mask rows of the whole batch, and scores them where the model ran:
one softmax and one top-k for the batch. The pipeline then moves only the input ids and the
``[batch, masks, top_k]`` scores and token ids, which :class:`~worker.fill_mask_answers.
FillMaskAnswers` turns into answers. Unprepared calls (``targets``, a custom pipeline's own
methods) run the stock way. It checks itself at load against the stock answers, like the
sparse head, and stays only if they agree.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from worker import fill_mask_answers, sparse_head, stand_ins

log = logging.getLogger("batchwire.worker.mask_scores")

SCORES, TOKENS = fill_mask_answers.SCORES, fill_mask_answers.TOKENS


class MaskScorer:
    """A drop-in ``_forward`` for a fill-mask pipeline whose postprocess is
    :class:`~worker.fill_mask_answers.FillMaskAnswers`."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.stock = pipe._forward
        self.mask_id = pipe.tokenizer.mask_token_id
        self.default_top_k = _default_top_k(pipe)
        #: The prepared call's top_k; None: run the stock way.
        self.top_k: int | None = None

    def prepare(self, parameters: dict) -> bool:
        """Score the next call's candidates here, for ``parameters``' top_k; False (stock
        way) when they ask for ``targets`` or a top_k the stock method should judge."""
        self.top_k = None
        merged = {**getattr(self.pipe, "_postprocess_params", {}), **parameters}
        if merged.get("targets") is not None or merged.get("target_ids") is not None:
            return False
        top_k = merged.get("top_k")
        top_k = self.default_top_k if top_k is None else top_k
        # Anything but a count the vocabulary can give goes to the stock method for its error.
        if type(top_k) is not int or not 0 < top_k <= self.pipe.model.config.vocab_size:
            return False
        self.top_k = top_k
        return True

    def clear(self) -> None:
        self.top_k = None

    def __call__(self, model_inputs: Any, **forward_params: Any) -> Any:
        outputs = self.stock(model_inputs, **forward_params)
        if self.top_k is None:
            return outputs
        input_ids = outputs["input_ids"]
        where = input_ids == self.mask_id
        # Row-major: item by item, each item's masks left to right, as the stock method
        # reads them; every row is softmaxed on its own, so batching them changes nothing.
        values, tokens = outputs["logits"][where].softmax(dim=-1).topk(self.top_k)
        per_item = where.sum(dim=1)
        width = max(int(per_item.max()), 1) if per_item.numel() else 1
        scores = values.new_zeros(input_ids.shape[0], width, self.top_k)
        ids = tokens.new_zeros(input_ids.shape[0], width, self.top_k)
        item, _ = where.nonzero(as_tuple=True)
        slot = (where.cumsum(dim=1) - 1)[where]
        scores[item, slot] = values
        ids[item, slot] = tokens
        return {"input_ids": input_ids, SCORES: scores, TOKENS: ids}


def _default_top_k(pipe: Any) -> int:
    parameter = inspect.signature(type(pipe).postprocess).parameters.get("top_k")
    default = getattr(parameter, "default", 5)
    return default if isinstance(default, int) else 5


def install(pipe: Any) -> MaskScorer | None:
    """Put a :class:`MaskScorer` in ``pipe._forward`` if ``pipe``'s postprocess reads its
    outputs and its answers on the check texts agree with the stock ones."""
    from transformers import FillMaskPipeline

    if not isinstance(pipe.__dict__.get("postprocess"), fill_mask_answers.FillMaskAnswers):
        log.info("fill-mask candidates scored by the stock postprocess")
        return None
    if type(pipe)._forward is not FillMaskPipeline._forward:
        log.info("fill-mask candidates scored by the stock postprocess: %s has its own "
                 "_forward", type(pipe).__name__)
        return None
    calls = fill_mask_answers.check_calls(
        fill_mask_answers.check_inputs(pipe.tokenizer.mask_token))
    scorer = MaskScorer(pipe)

    def run_checks(installed: bool) -> list:
        outputs = []
        for args, kwargs in calls:
            parameters = {k: v for k, v in kwargs.items() if k != "batch_size"}
            if installed and not scorer.prepare(parameters):
                raise RuntimeError(f"the check call {kwargs} was not prepared")
            try:
                outputs.append(pipe(*args, **kwargs))
            finally:
                scorer.clear()
        return outputs
    # Within the sparse head's tolerance: on a GPU these softmaxes run there, the stock
    # ones on the CPU, and the two differ in the last float bits.
    if not stand_ins.swap_in(pipe, "_forward", scorer, run_checks, sparse_head.same_answers,
                             "fill-mask candidates scored by the stock postprocess"):
        return None
    log.info("fill-mask candidates: scored on the model's device, a batch at a time")
    return scorer
