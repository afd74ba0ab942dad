"""Inputs that killed the workers running them, remembered so they are not run again; and
inputs a worker died holding once, remembered so that sent again they run alone.

Poison control (gateway/broker.py) answers 500 ``worker_crashed`` to an input after the
second worker running it died, the second running it alone. That cost two workers, each a
model load to replace. Most HTTP clients retry a 500, so one poison input sent by a
retrying client cost two workers per try: three tries of it held a pool of two down for
as long as its reloads took. An input found to be poison is now remembered for a while and
refused at admission, before any worker runs it.

An input is known by a digest of everything that decides what the worker computes: the
model and task, the input, its parameters, whether it is embedded and its prompt's name
(so the same text sent to /predict and to /v1/embeddings is two inputs, and a model
rolled out in place of the one it killed runs it). The digest is taken only while
something is remembered (for --poison-memory-s after a worker's death), so the usual case
costs nothing; a request's parameters are encoded once for all its inputs (once per input,
a 4 MB body of 256 inputs with a large ``targets`` list held the event loop for 30 s).

Only a death that says something about what the worker ran puts an input here: its process
exited, or its model call hung. Silence does not: workers frozen or cut off together (a
paused container, a partitioned host) each took the other's suspect to its grave, and an
innocent input would have been refused for the whole memory.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from protocol.codec import encode_canonical

#: Most inputs remembered at once; past it the oldest is forgotten first.
MAX_REMEMBERED = 1024
#: How long an input found to kill workers is refused (--poison-memory-s): long enough for
#: a client's retries, short enough that a false charge (a worker killed from outside while
#: it ran the input alone) does not outlast a coffee break.
POISON_MEMORY_S = 600.0


def fingerprinter(model: str, task: str, parameters: dict, embed: bool,
                  prompt_name: str) -> Callable[[Any], bytes]:
    """The digest of one input sent with these parameters: equal for two requests the
    workers would compute alike, whatever the order of their parameters' keys. What the
    inputs share is encoded once."""
    shared = hashlib.blake2b(encode_canonical([model, task, parameters, embed, prompt_name]),
                             digest_size=16)

    def digest(item: Any) -> bytes:
        one = shared.copy()
        one.update(encode_canonical(item))
        return one.digest()
    return digest


class PoisonMemo:
    """Digests of poison inputs, each kept for ``memory_s`` after it was last found so
    (0: none kept)."""

    def __init__(self, memory_s: float, max_remembered: int = MAX_REMEMBERED):
        self.memory_s = memory_s
        self.max_remembered = max_remembered
        #: digest -> when it is forgotten (the clock's time); insertion order is age order.
        self._until: dict[bytes, float] = {}
        #: Requests refused for holding a remembered input.
        self.refused = 0

    def __len__(self) -> int:
        """Entries held, some perhaps expired: a cheap "anything to check?"."""
        return len(self._until)

    def remembered(self, now: float) -> int:
        """Inputs refused now."""
        self._forget_expired(now)
        return len(self._until)

    def remember(self, digest: bytes, now: float) -> None:
        if self.memory_s <= 0:
            return
        self._until.pop(digest, None)  # found again: its time starts afresh, as the newest
        self._until[digest] = now + self.memory_s
        while len(self._until) > self.max_remembered:
            del self._until[next(iter(self._until))]

    def forget(self, digest: bytes) -> None:
        self._until.pop(digest, None)

    def known_for(self, digest: bytes, now: float) -> float | None:
        """Seconds until ``digest`` is forgotten, or None if it is not remembered."""
        self._forget_expired(now)
        until = self._until.get(digest)
        return None if until is None else until - now

    def _forget_expired(self, now: float) -> None:
        # Each entry lives memory_s from its insertion, so the oldest expire first.
        while self._until:
            oldest = next(iter(self._until))
            if self._until[oldest] > now:
                return
            del self._until[oldest]
