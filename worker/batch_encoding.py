"""A batch's texts tokenized in one tokenizer call, not one call per text.

A pipeline called on a list tokenizes inside its data loader, one text at a time: each
``preprocess`` call runs the tokenizer's Python wrapper around a batch of one, then builds
tensors. On the tiny model under load that was 18 % of the worker's samples, against 20 %
for the model itself; on a GPU it is a larger share still. One call on the whole batch does
the same tokenization in Rust for all the texts at once.

:class:`BatchEncoder` sits in the pipeline's ``preprocess`` slot. Before a batch runs, the
runner hands it the batch's texts (:meth:`prepare`); it tokenizes them in one call, and
each ``preprocess`` call then builds that text's tensors from the result. Anything it was
not prepared for (a text outside the batch, tokenizer arguments among the parameters, a
lone text with no arrival encoding) goes to the stock method, so the pipeline's own code
path stays the fallback. It checks itself at load: fixed texts must give equal outputs both ways, or the
stock method stays.

A text is tokenized once already when it arrives: the worker counts its tokens through the
tokenizer's Rust backend on the I/O loop (:func:`worker.runner.counting_backend`). The runner
hands those encodings over (:meth:`BatchEncoder.remember`), and :meth:`BatchEncoder.prepare`
builds a remembered text's inputs from its encoding instead of tokenizing it again. That
path has its own check at load; if it fails, texts are tokenized again as before.
"""

from __future__ import annotations

import logging
from typing import Any

from worker import fill_mask_answers, stand_ins

log = logging.getLogger("batchwire.worker.batch_encoding")

#: Parameters that change how a text is tokenized: a batch carrying any of them is
#: tokenized by the stock method, which reads them.
TOKENIZER_PARAMETERS = ("tokenize_kwargs", "tokenizer_kwargs", "truncation")

#: A model input's name -> the Rust ``Encoding`` attribute that holds it.
ENCODING_FIELDS = {"input_ids": "ids", "token_type_ids": "type_ids",
                   "attention_mask": "attention_mask"}

#: Arrival encodings kept at most: four times a worker's default capacity on a GPU (4
#: batches of 32). Requests that never reach a batch (cancelled, expired) leave theirs
#: behind; past this many the lot is dropped, which costs only tokenizing those texts again.
#: A 512-token encoding holds about 70 kB (measured), so the worst case is about 36 MB,
#: with the texts they are kept by, up to MAX_REMEMBERED_CHARS (a client sending 1 MB texts
#: that were then refused left 1 MB each: 512 MB per worker).
MAX_REMEMBERED = 512
MAX_REMEMBERED_CHARS = 1 << 24


class BatchEncoder:
    """A drop-in ``preprocess`` for a fill-mask or feature-extraction pipeline."""

    def __init__(self, pipe: Any, kind: str):
        self.pipe = pipe
        self.kind = kind
        self.stock = pipe.preprocess
        self.mask_id = getattr(pipe.tokenizer, "mask_token_id", None)
        self._ready: dict[str, dict[str, list[int]]] = {}
        names = list(getattr(pipe.tokenizer, "model_input_names", None) or ())
        #: (model input, Encoding attribute) pairs to build a remembered text's inputs from;
        #: empty when arrival encodings are not used (see :func:`install`).
        self.fields: list[tuple[str, str]] = []
        self._encoding_fields = ([(n, ENCODING_FIELDS[n]) for n in names]
                                 if names and all(n in ENCODING_FIELDS for n in names) else [])
        # Written by the I/O loop's thread, read by the inference thread: single dict
        # operations, which the GIL keeps whole.
        #: Keyed by (text, the length it was cut at or None): the same text may arrive for
        #: its token-level answer (whole) and for its embedding (cut), and neither may get
        #: the other's inputs.
        self._remembered: dict[tuple[str, int | None], Any] = {}
        #: Characters of the texts remembered (their keys).
        self._remembered_chars = 0

    @property
    def uses_arrivals(self) -> bool:
        return bool(self.fields)

    def remember(self, text: str, encoding: Any, cut_at: int | None = None) -> None:
        """Keep ``text``'s arrival encoding (the counting backend's, no tokenizer
        parameters; ``cut_at``: cut at that many tokens) for the batch it will run in."""
        if not self.fields:
            return
        if (len(self._remembered) >= MAX_REMEMBERED
                or self._remembered_chars + len(text) > MAX_REMEMBERED_CHARS):
            self.forget_arrivals()
        self._remembered[(text, cut_at)] = encoding
        self._remembered_chars += len(text)

    def forget_arrivals(self) -> None:
        self._remembered.clear()
        self._remembered_chars = 0

    def prepare(self, texts: list, parameters: dict, max_length: int | None = None) -> bool:
        """Tokenize ``texts`` for the next pipeline call; False (nothing prepared) when the
        stock method must do it. A lone text is prepared only from its arrival encoding:
        tokenizing it here would cost what the stock method costs. ``max_length``: cut
        longer texts to this many tokens (the tokenizer's own truncation; sentence
        embeddings): only arrival encodings cut there apply."""
        self._ready = {}
        if not texts or any(name in parameters for name in TOKENIZER_PARAMETERS) \
                or not all(isinstance(t, str) for t in texts):
            return False
        fields, ready, missing = self.fields, {}, []
        for text in texts:
            encoding = self._remembered.pop((text, max_length or None), None) if fields else None
            if encoding is None:
                missing.append(text)
            else:
                self._remembered_chars -= len(text)
                ready[text] = {name: getattr(encoding, attr) for name, attr in fields}
        if missing:
            if len(texts) == 1:
                return False
            encoded = (self.pipe.tokenizer(missing, truncation=True, max_length=max_length)
                       if max_length else self.pipe.tokenizer(missing))
            names = list(encoded.keys())
            for i, text in enumerate(missing):
                ready[text] = {name: encoded[name][i] for name in names}
        self._ready = ready
        return True

    def clear(self) -> None:
        self._ready = {}

    def __call__(self, inputs: Any, **parameters: Any) -> Any:
        ready = self._ready.get(inputs) if isinstance(inputs, str) and not parameters else None
        if ready is None:
            return self.stock(inputs, **parameters)
        import torch
        from transformers import BatchEncoding

        # What the stock call returns: a batch of one, as int64 tensors.
        model_inputs = BatchEncoding({name: torch.tensor([ids]) for name, ids in ready.items()})
        if self.kind == "fill-mask" and self.mask_id not in ready["input_ids"]:
            # The stock check, for its error; on the ids list the test is 20x cheaper.
            self.pipe.ensure_exactly_one_mask_token(model_inputs)
        return model_inputs


def install(pipe: Any, kind: str, counting_backend: Any = None) -> BatchEncoder | None:
    """Put a :class:`BatchEncoder` in ``pipe.preprocess`` if batched calls give the same
    outputs with it as without it. ``counting_backend``: the Rust tokenizer the runner
    counts arrivals with; their encodings are reused if that, too, gives the same outputs."""
    from transformers import FeatureExtractionPipeline, FillMaskPipeline

    tokenizer = getattr(pipe, "tokenizer", None)
    stock_method = {"fill-mask": FillMaskPipeline.preprocess,
                    "feature-extraction": FeatureExtractionPipeline.preprocess}.get(kind)
    if stock_method is None or tokenizer is None or not getattr(tokenizer, "is_fast", False):
        return None
    if type(pipe).preprocess is not stock_method:
        # A custom pipeline's own preprocess may do more than tokenize; it keeps it.
        log.info("texts tokenized one at a time: %s has its own preprocess",
                 type(pipe).__name__)
        return None
    # The fill-mask answers' check texts (lengths that pad, unicode, punctuation); without
    # a mask token for feature-extraction, a plain word stands in its place.
    texts = fill_mask_answers.check_inputs(tokenizer.mask_token if kind == "fill-mask"
                                           else "word")
    extra = {"return_tensors": True} if kind == "feature-extraction" else {}
    encoder = BatchEncoder(pipe, kind)
    outputs: list = []

    def run_checks(installed: bool) -> Any:
        if installed and not encoder.prepare(texts, {}):
            raise RuntimeError("the check texts were not prepared")
        try:
            outputs.append(pipe(texts, batch_size=len(texts), **extra))
        finally:
            encoder.clear()
        return outputs[-1]
    if not stand_ins.swap_in(pipe, "preprocess", encoder, run_checks, _same,
                             "texts tokenized one at a time"):
        return None
    stock = outputs[0]
    if counting_backend is not None and encoder._encoding_fields:
        _check_arrivals(encoder, pipe, counting_backend, texts, extra, stock)
    log.info("a batch's texts are tokenized in one call%s",
             ", or not again when they were on arrival" if encoder.uses_arrivals else "")
    return encoder


def _check_arrivals(encoder: BatchEncoder, pipe: Any, backend: Any, texts: list,
                    extra: dict, stock: Any) -> None:
    """Turn on the reuse of arrival encodings if the check texts, encoded as arrivals are,
    give the stock outputs: batched, and alone (a batch of one runs the pipeline's
    unbatched call)."""
    from worker.runner import encode_fast

    try:
        encoder.clear()
        want = [stock, pipe(texts[0], **extra)]  # nothing prepared: the stock method
        encoder.fields = encoder._encoding_fields
        for text, encoding in zip(texts, encode_fast(backend, texts)):
            encoder.remember(text, encoding)
        reused = encoder.prepare(texts, {}) and not encoder._remembered
        fast = [pipe(texts, batch_size=len(texts), **extra)]
        encoder.remember(texts[0], encode_fast(backend, texts[:1])[0])
        reused = reused and encoder.prepare(texts[:1], {})
        fast.append(pipe(texts[0], **extra))
    except Exception as exc:  # noqa: BLE001 - any failure means: tokenize again
        reused, want, fast = False, None, None
        log.debug("arrival encodings not reused: %s: %s", type(exc).__name__, exc)
    encoder.clear()
    encoder.forget_arrivals()
    if not (reused and _same(want, fast)):
        encoder.fields = []
        log.warning("arrival encodings not reused: they did not give the stock inputs")


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and bool(torch.equal(a, b)))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
