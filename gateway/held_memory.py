"""One budget for the bytes the gateway holds for requests: their bodies and their answers.

A request's body is held from the moment it is read until the request is answered, and its
answers from the moment each arrives until the response is written. Both can be large:

- ``/predict`` with 256 texts of 500 tokens on the default model (all-MiniLM-L6-v2) is
  answered with 200 MB of token-level float32; one such request took the gateway to 1.4 GB,
  past the 1 GiB the Kubernetes manifest gives it;
- a body may be 4 MiB (``--max-body-bytes``), and up to ``--max-queue`` (4096) requests may
  wait: a few hundred large bodies at once were enough.

Nothing bounded the sum, so enough of either at once had the gateway killed, and every
request on it lost. So everything is counted against ``--max-held-bytes``:

- a body before it is read, twice (the bytes, and the inputs parsed from them), at its
  Content-Length, or at ``--max-body-bytes`` for a chunked one until its real size is known:
  one that would pass the budget beside what is held now gets 503 ``overloaded`` with
  Retry-After, like a full queue, and is never read. A compressed body is counted again at
  its inflated size once read (gateway/body_coding.py inflates it, up to ``--max-body-bytes``);
- each answer as it arrives from its worker: a request whose own answers pass the budget
  can never be served, 422 ``answers_too_large`` (send fewer inputs per request); one that
  fits alone but not beside what the others hold now gets 503 ``overloaded``.

What a request held is given back when its response has been written, or it failed.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import AnswersTooLarge, HeldMemoryFull
from protocol.messages import NDArray

#: Decoded msgpack maps and strings (fill-mask's candidates, classification labels) take
#: up to about 5 times their encoded size as Python objects (measured: 4.75 for candidates
#: with 30-character sequences, 1.14 with 2,000); an array takes its own size.
STRUCTURED_EXPANSION = 5

_MIB = 1024 * 1024
#: A body is counted twice: aiohttp keeps the bytes read for the request's life, and the
#: inputs parsed from them take about as much again.
BODY_HOLDS = 2
#: Room for two of the largest answers the default model gives one request (200 MB each),
#: inside the 1 GiB the Kubernetes manifest gives the gateway.
DEFAULT_MAX_HELD_BYTES = 512 * _MIB


def answer_size(output: Any, frame_bytes: int) -> int:
    """What an answer that came in a frame of ``frame_bytes`` holds, decoded."""
    return frame_bytes if isinstance(output, NDArray) else frame_bytes * STRUCTURED_EXPANSION


def _mib(nbytes: int) -> str:
    return f"{nbytes / _MIB:.0f} MiB" if nbytes >= 10 * _MIB else f"{nbytes / _MIB:.1f} MiB"


class HeldMemory:
    """The gateway's one budget; :meth:`claim` opens a request's account in it."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.held = 0

    def claim(self) -> "Claim":
        return Claim(self)


class Claim:
    """One request's account: the bytes its body and answers hold until :meth:`release`."""

    __slots__ = ("memory", "held", "answers")

    def __init__(self, memory: HeldMemory):
        self.memory = memory
        self.held = 0
        #: Of ``held``, the answers' share.
        self.answers = 0

    def hold_body(self, body_bytes: int) -> None:
        """Count a body about to be read, and the inputs it will be parsed into, or raise
        503 without counting them. (A body alone never passes the budget: the config keeps
        it at least BODY_HOLDS x ``--max-body-bytes``.)"""
        memory = self.memory
        nbytes = BODY_HOLDS * body_bytes
        if memory.held + nbytes > memory.limit:
            raise HeldMemoryFull(
                f"the server holds {_mib(memory.held)} of other requests' bodies and answers, "
                f"and this body would take it past its {_mib(memory.limit)} limit "
                "(--max-held-bytes); retry shortly")
        self._add(nbytes)

    def body_read(self, reserved: int, read: int) -> None:
        """The body counted at ``reserved`` bytes turned out ``read`` long. Shorter: give
        back the difference (a chunked body is reserved at --max-body-bytes). Longer, as a
        compressed body is once inflated (2 kB of gzip can be 2 MB of text):
        count the rest too, or raise 503 as for a body that would not fit."""
        if read <= reserved:
            self._give_back(BODY_HOLDS * (reserved - read))
        else:
            self.hold_body(read - reserved)

    def hold_answer(self, nbytes: int) -> None:
        """Count one more answer, or raise without counting it."""
        memory = self.memory
        if self.held + nbytes > memory.limit:
            raise AnswersTooLarge(
                f"the answers to this request come to more than the {_mib(memory.limit)} the "
                "server holds for requests at once (--max-held-bytes); send fewer inputs per "
                "request, or shorter ones")
        if memory.held + nbytes > memory.limit:
            raise HeldMemoryFull(
                f"the server holds {_mib(memory.held)} of other requests' bodies and answers "
                f"until they are answered, and this answer would take it past its "
                f"{_mib(memory.limit)} limit (--max-held-bytes); retry shortly")
        self._add(nbytes)
        self.answers += nbytes

    def _add(self, nbytes: int) -> None:
        self.held += nbytes
        self.memory.held += nbytes

    def release(self) -> None:
        """Give back all this request holds: it is answered, or failed."""
        self._give_back(self.held)
        self.answers = 0

    def _give_back(self, nbytes: int) -> None:
        self.held -= nbytes
        self.memory.held -= nbytes
