"""One budget for the bytes of answers the gateway holds at once.

A request's answers wait in the gateway until all of its items are in and its response is
written. Token-level answers are large: ``/predict`` with 256 texts of 500 tokens on the
default model (all-MiniLM-L6-v2) is 200 MB of float32, and one such request took the gateway
to 1.4 GB, past the 1 GiB the Kubernetes manifest gives it. Nothing bounded how many of them
it held; with four at once the gateway would be killed, and every request on it lost.

So each answer is counted against ``--max-answer-bytes`` as it arrives from its worker,
before it is handed to the request:

- a request whose own answers pass the budget can never be served: 422
  ``answers_too_large``, saying to send fewer inputs per request;
- one that fits alone but not beside what the others hold now gets 503 ``overloaded`` with
  Retry-After, like a full queue.

What a request held is given back when its response has been written (or it failed).
"""

from __future__ import annotations

from typing import Any

from protocol.errors import AnswersTooLarge, Overloaded
from protocol.messages import NDArray

#: Decoded msgpack maps and strings (fill-mask's candidates, classification labels) take
#: up to about 5 times their encoded size as Python objects (measured: 4.75 for candidates
#: with 30-character sequences, 1.14 with 2,000); an array takes its own size.
STRUCTURED_EXPANSION = 5

_MIB = 1024 * 1024
#: Room for two of the largest answers the default model gives one request (200 MB each),
#: inside the 1 GiB the Kubernetes manifest gives the gateway.
DEFAULT_MAX_ANSWER_BYTES = 512 * _MIB


def held_size(output: Any, frame_bytes: int) -> int:
    """What an answer that came in a frame of ``frame_bytes`` holds, decoded."""
    return frame_bytes if isinstance(output, NDArray) else frame_bytes * STRUCTURED_EXPANSION


def _mib(nbytes: int) -> str:
    return f"{nbytes / _MIB:.0f} MiB" if nbytes >= 10 * _MIB else f"{nbytes / _MIB:.1f} MiB"


class AnswerMemory:
    """The gateway's one budget; :meth:`claim` opens a request's account in it."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.held = 0

    def claim(self) -> "Claim":
        return Claim(self)


class Claim:
    """One request's account: the bytes its answers hold until :meth:`release`."""

    __slots__ = ("memory", "held")

    def __init__(self, memory: AnswerMemory):
        self.memory = memory
        self.held = 0

    def hold(self, nbytes: int) -> None:
        """Count one more answer, or raise without counting it."""
        memory = self.memory
        if self.held + nbytes > memory.limit:
            raise AnswersTooLarge(
                f"the answers to this request come to more than the {_mib(memory.limit)} the "
                "server holds for answers at once (--max-answer-bytes); send fewer inputs per "
                "request, or shorter ones")
        if memory.held + nbytes > memory.limit:
            raise Overloaded(
                f"the server holds {_mib(memory.held)} of other answers until they are sent, "
                f"and this one would take it past its {_mib(memory.limit)} limit "
                "(--max-answer-bytes); retry shortly")
        self.held += nbytes
        memory.held += nbytes

    def release(self) -> None:
        self.memory.held -= self.held
        self.held = 0
