"""Where a long text may be cut so that tokenizing its start alone gives the whole text's
first tokens, and whether a tokenizer allows it (checked at load).

An embedding keeps a text's first max_seq_length tokens, and a text past the model's limit is
refused: neither needs the rest of a 4 MiB body tokenized, which cost 2.5 to 10 s. A cut is
only safe where the tokenizer starts a new piece whatever comes next: before whitespace, and,
for tokenizers that put every CJK ideograph in a piece of its own (BERT's), before an
ideograph, which is the only place to cut Chinese or Japanese text, written without spaces.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("batchwire.worker.text_starts")

#: Past this many characters for each token kept (and a margin), a text is tokenized from
#: its start only. English runs about 4 characters a token and CJK about 1; a start that
#: holds fewer tokens than the margin (long whitespace runs) is not used.
PREFIX_CHARS_PER_TOKEN = 32
PREFIX_MARGIN_TOKENS = 16
#: How far back from the budget's end a place to cut is looked for.
_CUT_WINDOW = 1024

#: Where a cut before an ideograph is looked for: the CJK Unified Ideographs, their
#: extension A and the compatibility ideographs, the blocks everyday Chinese and Japanese
#: text is written in. BERT's tokenizers set these apart one by one; the rarer blocks past
#: U+FFFF they do not all agree on (the Rust one skips part of extension E), and are not
#: worth a cut.
_IDEOGRAPHS = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF))


def _ideograph(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _IDEOGRAPHS)


def embedding_prefix(text: str, keep: int, ideographs: bool = False) -> str | None:
    """The start of ``text`` to tokenize for its first ``keep`` tokens, cut just before a
    whitespace character or, with ``ideographs``, a CJK ideograph, whichever comes later, so
    no word (and no special token written in the text) is split and the tokens before the
    cut are those of the whole text; None when the text is short enough to tokenize whole,
    or there is nowhere near the budget's end to cut."""
    budget = PREFIX_CHARS_PER_TOKEN * (keep + PREFIX_MARGIN_TOKENS)
    if len(text) <= budget:
        return None
    start = max(budget - _CUT_WINDOW, 0)
    cut = max(text.rfind(space, start, budget) for space in (" ", "\n", "\t"))
    if ideographs:
        # From the end back to the whitespace found: in CJK text the first one looked at.
        for at in range(budget - 1, max(cut, start, 0), -1):
            if _ideograph(text[at]):
                cut = at
                break
    return text[:cut] if cut > 0 else None


def long_text_start(counting: Any, text: str, keep: int, ideographs: bool = False) -> str | None:
    """``text``'s start (:func:`embedding_prefix`) when it holds the first ``keep`` tokens
    and the margin, counted with the Rust backend ``counting``; None when ``text`` is to be
    tokenized whole."""
    from worker.runner import encode_fast

    prefix = embedding_prefix(text, keep, ideographs)
    if prefix is None:
        return None
    if counting.truncation is not None or counting.padding is not None:
        # An earlier call with tokenizer arguments left them on this thread's backend (the
        # tokenizer's own next call sets what it needs again): cut, it would count too few;
        # padded, too many, and a start short of the tokens kept would pass.
        counting.no_truncation()
        counting.no_padding()
    [whole] = encode_fast(counting, [prefix])
    return prefix if len(whole) >= keep + PREFIX_MARGIN_TOKENS else None


def ideographs_stand_alone(backend: Any) -> bool:
    """Whether the Rust tokenizer ``backend`` makes every CJK ideograph a piece of its own
    before its model runs (BERT's normalizer spaces them out), so that text cut just before
    one tokenizes as the whole text does up to there. A sentencepiece tokenizer keeps a run
    of them in one piece, which its model splits as a whole: never cut there."""
    normalizer = getattr(backend, "normalizer", None)
    splitter = getattr(backend, "pre_tokenizer", None)
    if splitter is None:
        return False

    def pieces(text: str) -> list[str]:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        return [piece for piece, _ in splitter.pre_tokenize_str(text)]

    try:
        # An added token with an ideograph in it would be split by a cut.
        if any(_ideograph(char) for token in backend.get_added_tokens_decoder().values()
               for char in token.content):
            return False
        for low, high in _IDEOGRAPHS:
            for ideograph in (chr(low), chr((low + high) // 2), chr(high)):
                for left, right in (("x", "y"), ("が", "ア"), ("9", "。"), ("é", "中"),
                                    ("한\U0002B820", "")):
                    if pieces(left + ideograph + right) != (
                            pieces(left) + pieces(ideograph) + pieces(right)):
                        return False
    except Exception as exc:  # noqa: BLE001 - any doubt: no cuts before ideographs
        log.debug("long CJK texts tokenized whole: %s: %s", type(exc).__name__, exc)
        return False
    return True


def prefix_cut_agrees(counting: Any, truncating: Any, keep: int,
                      ideographs: bool = False) -> bool:
    """Whether long texts' encodings, cut at ``keep`` tokens, are the same from their start
    alone (:func:`embedding_prefix`) as from the whole text, on check texts of many kinds:
    words, punctuation, unicode, special tokens written in the text, line breaks; with
    ``ideographs``, Chinese and Japanese text cut before an ideograph."""
    from worker.runner import _COUNT_CHECKS, encode_fast

    pieces = [*_COUNT_CHECKS[1:4], "Don't stop , it's [SEP] here . Really ? [CLS] Yes !",
              "Pay $5.00 (or 4,5 €) at https://example.com/a?b=c#d — now!"]
    budget = PREFIX_CHARS_PER_TOKEN * (keep + PREFIX_MARGIN_TOKENS)
    checks = [(piece + " ") * (budget // (len(piece) + 1) + 2) for piece in pieces]
    checks.append(" ".join(pieces) * (budget // len(" ".join(pieces)) + 2))
    # Not periodic: a tokenizer that cuts from the left keeps other tokens here.
    checks.append(" ".join(f"item {n}," for n in range(budget // 6)))
    if ideographs:
        # No whitespace at all: only a cut before an ideograph can take these.
        checks.append("".join(chr(0x4E00 + (n * 7919) % 20902) for n in range(budget + 64)))
        checks.append("東京タワーは1958年に完成した。猫が[MASK]に座った！" * (budget // 20 + 2))
    if (getattr(truncating, "truncation", None) or {}).get("direction", "right") != "right":
        return False  # it keeps a long text's end, which its start cannot give
    try:
        for text in checks:
            start = long_text_start(counting, text, keep, ideographs)
            got = encode_fast(truncating, [start])[0] if start is not None else None
            [want] = encode_fast(truncating, [text])
            if got is None or any(list(getattr(got, attr)) != list(getattr(want, attr))
                                  for attr in ("ids", "type_ids", "attention_mask")):
                log.info("long %stexts' embeddings tokenized whole: from their start "
                         "alone, the check texts' encodings differ",
                         "CJK " if ideographs else "")
                return False
    except Exception as exc:  # noqa: BLE001 - any doubt: tokenize them whole
        log.debug("long texts' embeddings tokenized whole: %s: %s", type(exc).__name__, exc)
        return False
    return True
