"""Fill-mask's answers decoded in one batched tokenizer call per input instead of ten.

The stock ``FillMaskPipeline.postprocess`` builds each of an input's ``top_k`` candidates
with two ``tokenizer.decode`` calls (the whole sequence with the candidate in the mask's
place, and the candidate alone), each through the Python wrapper: a numpy copy, a
conversion to a list, the Rust decode, then the clean-up of tokenization spaces. With the
model's own work made small (a GPU, or the sparse head on a small model), those per-item
decodes are what a worker spends its time on: a profile of the tiny model under load had
a quarter of the worker's samples in ``postprocess``.

:func:`install` puts :class:`FillMaskAnswers` in the pipeline's ``postprocess`` slot. It
does the same scoring with the same torch calls, then decodes all of an input's candidate
sequences in one ``decode_batch`` call of the Rust tokenizer and their token strings in
direct Rust calls, and applies the same clean-up. Parameters it does not handle
(``targets``) go to the stock method. Like the sparse head it checks itself at load: fixed inputs (two masks,
punctuation the clean-up rewrites, unicode) must give answers equal to the stock method's,
or the stock method stays.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

from worker import stand_ins

log = logging.getLogger("batchwire.worker.fill_mask_answers")

#: Keys of a forward whose candidates were already scored (worker/mask_scores.py): each
#: input's ``[masks, top_k]`` probabilities and token ids, in place of its logits.
SCORES = "batchwire_mask_scores"
TOKENS = "batchwire_mask_tokens"


class FillMaskAnswers:
    """A drop-in ``postprocess`` for one fill-mask pipeline with a fast tokenizer."""

    def __init__(self, pipe: Any):
        tokenizer = pipe.tokenizer
        self.stock = pipe.postprocess
        self.backend = tokenizer.backend_tokenizer
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id
        self.clean_up = _cleans_up(tokenizer)
        self.clean = tokenizer.clean_up_tokenization

    def __call__(self, model_outputs: Any, top_k: int = 5, target_ids: Any = None) -> list:
        if SCORES in model_outputs:
            # Scored a batch at a time where the model ran (worker/mask_scores.py).
            ids = model_outputs["input_ids"][0].tolist()
            positions = [i for i, t in enumerate(ids) if t == self.mask_id]
            scores = model_outputs[SCORES][0, :len(positions)]
            if scores.shape[-1] != top_k:
                raise RuntimeError(f"candidates were scored for top_k={scores.shape[-1]}, "
                                   f"answers asked for top_k={top_k}")
            values = scores.tolist()
            predictions = model_outputs[TOKENS][0, :len(positions)].tolist()
        elif target_ids is not None:
            return self.stock(model_outputs, top_k=top_k, target_ids=target_ids)
        else:
            import torch

            input_ids = model_outputs["input_ids"][0]
            masked_index = torch.nonzero(input_ids == self.mask_id, as_tuple=False).squeeze(-1)
            probs = model_outputs["logits"][0, masked_index, :].softmax(dim=-1)
            scores, tokens = probs.topk(top_k)
            ids = input_ids.tolist()
            positions = masked_index.tolist()
            values, predictions = scores.tolist(), tokens.tolist()
        single_mask = len(positions) == 1
        scored: list[tuple[float, int]] = []
        sequences: list[list[int]] = []
        for position, row_values, row_predictions in zip(positions, values, predictions):
            for value, prediction in zip(row_values, row_predictions):
                tokens = ids.copy()
                tokens[position] = prediction
                # As the stock method: padding out, and the candidate too if it is padding.
                sequences.append([t for t in tokens if t != self.pad_id])
                scored.append((value, prediction))
        # Other masks stay visible in a multi-mask answer, as in the stock method.
        texts = self.backend.decode_batch(sequences, skip_special_tokens=single_mask)
        # One token each: decode_batch's thread pool costs more than these take (5 against
        # 15 us for five, measured).
        strs = [self.backend.decode([p], skip_special_tokens=False) for _, p in scored]
        if self.clean_up:
            texts = [self.clean(t) for t in texts]
            strs = [self.clean(s) for s in strs]
        result = []
        width = len(scored) // max(len(positions), 1)
        for row in range(len(positions)):
            result.append([
                {"score": scored[k][0], "token": scored[k][1], "token_str": strs[k],
                 "sequence": texts[k]}
                for k in range(row * width, (row + 1) * width)
            ])
        return result[0] if single_mask else result


def _cleans_up(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode`` cleans up tokenization spaces by default. transformers
    skips it for BPE models unless told otherwise; the self-check catches any other rule."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    model = getattr(tokenizer.backend_tokenizer, "model", None)
    forced = getattr(tokenizer,
                     "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                     False)
    return not (type(model).__name__ == "BPE" and not forced)


def check_inputs(mask: str) -> list[str]:
    """Texts for the self-check: one and two masks, the punctuation and contractions the
    clean-up rewrites, unicode, and lengths that make a batch pad."""
    return [f"Paris is the {mask} of France.", f"The {mask} sat on the mat by the {mask} door.",
            f"Don't stop , it's {mask} . Really ? Yes !", f"{mask}",
            f"déjà vu, naïve café: the {mask} of 日本 😀 isn't it ?",
            f"Every morning she walks her dog along the river to the old {mask} , doesn't she ?"]


def check_calls(samples: list[str]) -> list[tuple[tuple, dict]]:
    """The self-check's pipeline calls on ``samples``: batched (all at once, and by two with
    top_k 3) and one at a time (default top_k, and top_k 1)."""
    return [((samples,), {"batch_size": len(samples)}),
            ((samples,), {"batch_size": 2, "top_k": 3}),
            ((samples[0],), {}), ((samples[1],), {"top_k": 1})]


def install(pipe: Any, samples: list[str] | None = None) -> FillMaskAnswers | None:
    """Put :class:`FillMaskAnswers` in ``pipe.postprocess`` if its answers on ``samples``
    (default :func:`check_inputs`) equal the stock method's, batched and one at a time."""
    from transformers import FillMaskPipeline

    if type(pipe).postprocess is not FillMaskPipeline.postprocess:
        log.info("fill-mask answers decoded by %s's own postprocess", type(pipe).__name__)
        return None
    tokenizer = getattr(pipe, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "mask_token", None) is None \
            or not hasattr(backend, "decode_batch"):
        log.info("fill-mask answers decoded by the stock method: no fast tokenizer")
        return None
    samples = samples or check_inputs(tokenizer.mask_token)
    answers = FillMaskAnswers(pipe)
    calls = check_calls(samples)
    if not stand_ins.swap_in(pipe, "postprocess", answers,
                             lambda _: [pipe(*a, **k) for a, k in calls], operator.eq,
                             "fill-mask answers decoded by the stock method"):
        return None
    log.info("fill-mask answers: candidates decoded in one tokenizer call per input")
    return answers
