"""Fill-mask's vocabulary projection, computed only at the mask tokens.

A masked-LM head projects every position of every input onto the whole vocabulary, but the
fill-mask pipeline reads the logits of the mask positions alone. For a MiniLM-sized BERT
that projection (384 x 30522 per token) costs more than the six encoder layers together,
and a batch pays it for its padding too: the profile of a fill-mask worker under load
(docs/benchmarks.md) had ~50 % of its samples in that one ``Linear``.

:func:`install` wraps the model's output-embedding ``Linear`` so it runs on the mask rows
only. It writes them into an uninitialised ``[batch, tokens, vocab]`` tensor, which is the
shape the pipeline's own postprocess indexes. That memory is never touched outside those
rows, so a large allocation costs nothing. The input ids come from a pre-hook on the model,
so nothing in the pipeline changes.

It checks itself before it stays: a few fixed inputs must give the same answers with and
without it, or the dense head is put back (and a warning logged). A model whose head is not a
plain ``Linear`` (or that has no mask token) is left alone.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

log = logging.getLogger("batchwire.worker.sparse_head")

#: Scores (probabilities) may differ in the last float32 bits: the same rows multiplied in
#: a differently shaped matrix product.
SCORE_TOLERANCE = 1e-4


class SparseMaskedHead:
    """The installed wrapper; :meth:`remove` restores the dense head."""

    def __init__(self, model: Any, decoder: Any, mask_token_id: int):
        self.model = model
        self.decoder = decoder
        self.mask_token_id = mask_token_id
        self.enabled = True
        self._input_ids: Any = None
        self._dense: Callable = decoder.forward
        self._hooks = [
            model.register_forward_pre_hook(self._capture, with_kwargs=True),
            model.register_forward_hook(self._release),
        ]
        decoder.forward = self._forward

    def _capture(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._input_ids = kwargs.get("input_ids", args[0] if args else None)

    def _release(self, module: Any, args: tuple, output: Any) -> None:
        self._input_ids = None

    def _forward(self, hidden: Any) -> Any:
        ids = self._input_ids
        if (not self.enabled or ids is None or hidden.dim() != 3
                or tuple(hidden.shape[:2]) != tuple(ids.shape)):
            return self._dense(hidden)
        where = ids == self.mask_token_id
        logits = hidden.new_empty(*hidden.shape[:2], self.decoder.out_features)
        logits[where] = self._dense(hidden[where])
        return logits

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        # The instance attribute shadowed the class's forward; deleting it restores that.
        if self.decoder.__dict__.get("forward") == self._forward:
            del self.decoder.forward


def check_inputs(mask: str) -> list[str]:
    """Texts of different lengths, one with two masks, for the self-check."""
    return [f"Paris is the {mask} of France.", f"The {mask} sat on the mat by the {mask} door.",
            f"{mask}.", f"Every morning she walks her dog along the river to the old {mask}."]


def install(pipe: Any, samples: list[str] | None = None) -> SparseMaskedHead | None:
    """Wrap ``pipe``'s masked-LM head if it can be, and keep it only if ``samples`` (texts
    with a mask token; default :func:`check_inputs`) get the same answers both ways."""
    import torch

    model = getattr(pipe, "model", None)
    mask_id = getattr(getattr(pipe, "tokenizer", None), "mask_token_id", None)
    get_head = getattr(model, "get_output_embeddings", None)
    decoder = get_head() if get_head is not None else None
    if mask_id is None or not isinstance(decoder, torch.nn.Linear):
        log.info("fill-mask head left dense: %s", "no mask token" if mask_id is None
                 else f"output embeddings are {type(decoder).__name__}, not a Linear")
        return None
    head = SparseMaskedHead(model, decoder, mask_id)
    samples = samples or check_inputs(pipe.tokenizer.mask_token)
    try:
        head.enabled = False
        dense = pipe(samples, batch_size=len(samples))
        head.enabled = True
        sparse = pipe(samples, batch_size=len(samples))
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the stock head
        head.remove()
        log.warning("fill-mask head left dense: the sparse head failed its check (%s: %s)",
                    type(exc).__name__, exc)
        return None
    if not same_answers(dense, sparse):
        head.remove()
        log.warning("fill-mask head left dense: the sparse head changed the answers")
        return None
    log.info("fill-mask head: vocabulary logits computed at mask tokens only")
    return head


def same_answers(a: Any, b: Any) -> bool:
    """Fill-mask outputs equal: same scores (within tolerance), same tokens in the same order
    except where two candidates' scores tie within that tolerance."""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return False
        if a and all(isinstance(x, dict) for x in (*a, *b)):
            return _same_candidates(a, b)
        return all(same_answers(x, y) for x, y in zip(a, b))
    return a == b


def _close(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=SCORE_TOLERANCE, abs_tol=SCORE_TOLERANCE * 1e-3)


def _same_candidates(a: list[dict], b: list[dict]) -> bool:
    scores = [c.get("score", 0.0) for c in a]
    for i, (x, y) in enumerate(zip(a, b)):
        if not _close(x.get("score", 0.0), y.get("score", 0.0)):
            return False
        if x.get("token") != y.get("token"):
            # A tie: with a neighbour in the list, or (the last one) with the next one out.
            tied = i == len(a) - 1 or any(_close(scores[i], s)
                                          for j, s in enumerate(scores) if j != i)
            if not tied:
                return False
    return True
