"""Deterministic benchmark inputs: the same texts for every server and for the ceiling.

Two shapes, both built from a fixed word list with a seeded RNG (no tokenizer needed):

* ``varied``: sentences of 5-40 words, the size of a typical request;
* ``mixed``: lengths spread evenly from 5 words up to the model's position limit, or over
  a given token range (``min_tokens``/``max_tokens``: issue 7's 5-400 tokens).

Every word in :data:`WORDS` is a single token in the BERT uncased vocabulary (MiniLM's and
the tiny model's), so a sentence of ``n`` words with its final period is ``n + 1`` tokens,
``n + 3`` with ``[CLS]`` and ``[SEP]``: ``mixed`` stays inside ``max_tokens`` by
construction. For fill-mask, one word of each sentence is replaced by ``[MASK]`` (also one
token), so every input is valid for the pipeline.
"""

from __future__ import annotations

import random
from typing import Iterable

#: Common English words, each one token in bert-base-uncased's vocab.txt (deduplicated).
WORDS = tuple(dict.fromkeys("""
the of and to in is was he for it with as his on be at by had are but from or have an
they which one you were her all she there would their we him been has when who will more
no if out so said what up its about into than them can only other new some could time
these two may then do first any my now such like our over man me even most made after
also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see
men work long get here between both life being under never day same another know while
last might us great old year off come since against go came right used take three
states himself few house use during without again place around however home small found
thought went say part once general high upon school every does got united left number
course war until always away something fact though water less public put think almost
hand enough far took head yet government system better set told nothing night end why
called did eyes find going look asked later knew point next city business give group
toward young let room president side social present given several order national
possible rather second face per among form important often things looked early white
case john become large big need four within felt children along saw best church ever
least power development light thing seemed family interest want members mind country
area others done turned although open god service certain kind problem began different
door thus help sense means whole matter perhaps itself york times law human line above
name example action company hands local show five history whether gave either today act
feet across taken past quite anything seen having death experience body word half
really field am car words already themselves information tell together college shall
money period held keep sure probably free seems real behind cannot miss political air
question making office brought whose special major heard problems ago became federal
study available known result street economic boy position reason change south board
individual job society areas west close turn love community true court force full seem
am wife age future voice center woman control common policy necessary following front
sometimes six girl clear further land able mrs feel party music education university
run short value morning above
""".split()))

MASK_TOKEN = "[MASK]"
VARIED_WORDS = (5, 40)
#: [CLS], [SEP] and the final period.
_EXTRA_TOKENS = 3


def _sentence(rng: random.Random, n_words: int, mask: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    if mask:
        words[rng.randrange(n_words)] = MASK_TOKEN
    words[0] = words[0].capitalize() if words[0] != MASK_TOKEN else words[0]
    return " ".join(words) + "."


def varied_sentences(count: int, *, mask: bool = False, seed: int = 1234,
                     words: tuple[int, int] = VARIED_WORDS) -> list[str]:
    """``count`` sentences of ``words[0]``..``words[1]`` words (inclusive)."""
    rng = random.Random(seed)
    lo, hi = words
    return [_sentence(rng, rng.randint(lo, hi), mask) for _ in range(count)]


def mixed_lengths(count: int, max_tokens: int, *, mask: bool = False, seed: int = 4321,
                  min_words: int = 5) -> list[str]:
    """``count`` texts whose lengths spread evenly from ``min_words`` words to the limit.

    The longest is exactly ``max_tokens`` tokens with special tokens, the shortest
    ``min_words + 3``; lengths are a shuffled even spread rather than random draws, so a
    short run still sees the whole range.
    """
    max_words = max_tokens - _EXTRA_TOKENS
    if min_words < 1:
        raise ValueError(f"min_words={min_words}: every text needs a word")
    if max_words < min_words:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for {min_words} words")
    rng = random.Random(seed)
    if count == 1:
        lengths = [max_words]
    else:
        step = (max_words - min_words) / (count - 1)
        lengths = [min_words + round(i * step) for i in range(count)]
    rng.shuffle(lengths)
    return [_sentence(rng, n, mask) for n in lengths]


def make_inputs(kind: str, count: int, *, task: str, max_tokens: int,
                min_tokens: int | None = None) -> list[str]:
    """The inputs of workload shape ``kind`` (``varied`` or ``mixed``) for ``task``.

    ``mixed`` spans ``min_tokens`` (default: 5 words, 8 tokens) to ``max_tokens`` tokens,
    special tokens included; ``varied`` ignores both.
    """
    mask = task == "fill-mask"
    if kind == "varied":
        return varied_sentences(count, mask=mask)
    if kind == "mixed":
        min_words = 5 if min_tokens is None else min_tokens - _EXTRA_TOKENS
        return mixed_lengths(count, max_tokens, mask=mask, min_words=min_words)
    raise ValueError(f"unknown workload shape {kind!r}: use varied or mixed")


def tokens_by_construction(text: str) -> int:
    """Tokens (special tokens included) of a text made here: its words, then the final
    period, [CLS] and [SEP]. Exact for these generators' texts only (every word is one token).
    """
    return len(text.split()) + _EXTRA_TOKENS


def token_counts(texts: Iterable[str], tokenizer) -> list[int]:
    """Token counts with special tokens (for checks; the generators do not need it)."""
    return [len(ids) for ids in tokenizer(list(texts))["input_ids"]]


if __name__ == "__main__":  # a peek at the data
    for text in varied_sentences(3, mask=True):
        print(text)
    print([len(t.split()) for t in mixed_lengths(8, 128)])
