"""The message types gateway and workers exchange, as typed records.

On the wire each message is one msgpack array: ``[version, type, *fields]`` in the field
order declared here. Keeping the fields positional makes frames small and decoding cheap;
the version header is what keeps that safe across upgrades. Encoding and validation live
in :mod:`protocol.codec`; this module only says what each message holds.

Time crosses processes only as durations in milliseconds: worker and gateway may sit on
different hosts whose clocks disagree, while a duration means the same on both.
"""


import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

PROTOCOL_VERSION = 1
#: Longest REQUEST.prompt_name: a prompt's name ("query", "search_document"), not its text.
MAX_PROMPT_NAME = 256
#: Most prompt names one READY lists.
MAX_PROMPTS = 256
#: Bounds of a RESULT's statistics: far past any real batch (2**31 tokens, a day).
MAX_STAT_COUNT = 1 << 31
MAX_STAT_MS = 86_400_000.0
#: Longest text a READY names (a model's path among them: Linux's PATH_MAX).
MAX_READY_TEXT = 4096
#: How deep a REQUEST's inputs and parameters may nest (an object in a list is two levels).
#: Pipelines take flat arguments and inputs a level or two deep; a client's 500 levels had
#: exhausted the worker's recursion limit while it keyed the parameters for batching.
MAX_NESTING = 32
#: Most bytes a REQUEST's parameters take encoded. Every input of a request carries them to
#: its worker, so a 1.1 MB ``targets`` list on a list of 256 inputs was 290 MB of frames:
#: the worker was killed (and restarted) and the request got 504 at its deadline.
#: Pipelines' real arguments (a few hundred candidate labels or targets at most) take a few
#: kilobytes.
MAX_PARAMETERS_BYTES = 64 * 1024


def nesting(value: Any) -> int:
    """How many lists and maps deep ``value`` goes (0 for a scalar); iterative, so any depth
    msgpack or JSON decodes is measured without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if isinstance(container, dict):
            children = container.values()
        elif isinstance(container, (list, tuple)):
            children = container
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list, tuple)))
    return deepest


class MessageType(enum.IntEnum):
    READY = 1
    REQUEST = 2
    RESULT = 3
    ERROR = 4
    CANCEL = 5
    HEARTBEAT = 6
    DISCONNECT = 7


@dataclass(frozen=True, slots=True)
class NDArray:
    """A dense array carried as dtype + shape + raw bytes, never as nested float lists.

    ``dtype`` is numpy's ``dtype.str`` (``"<f4"``); the protocol itself needs no numpy.
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_array(cls, array: Any) -> "NDArray":
        # Duck-typed on numpy's interface so the gateway can import protocol without numpy.
        if not array.flags["C_CONTIGUOUS"]:
            array = array.copy(order="C")
        return cls(array.dtype.str, tuple(int(n) for n in array.shape), array.tobytes())

    def to_numpy(self) -> Any:
        import numpy as np

        return np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)


class Message:
    """Base of every message type; ``TYPE`` selects the class when decoding."""

    TYPE: ClassVar[MessageType]

    __slots__ = ()

    def encode(self) -> bytes:
        from protocol.codec import encode

        return encode(self)

    @staticmethod
    def decode(frame: bytes) -> "Message":
        from protocol.codec import decode

        return decode(frame)

    def check(self) -> None:
        """Semantic checks beyond field types; raise ValueError to reject the message."""


@dataclass(frozen=True, slots=True)
class Ready(Message):
    """A worker has loaded and warmed its pipeline and may be sent up to ``capacity`` requests.

    Sent again by a known worker to update what it announced: its batch limits are the ones
    in effect, which an out-of-memory error lowers."""

    TYPE: ClassVar[MessageType] = MessageType.READY
    worker_id: str
    pid: int
    model: str
    task: str
    device: str
    capacity: int
    max_batch_size: int
    host: str = ""
    #: How this worker pools sentence embeddings (e.g. "mean+normalize"); "" if it cannot.
    pooling: str = ""
    #: Padded-token budget of one batch (0: batches are bounded by count alone).
    max_batch_tokens: int = 0
    #: The model weights' dtype by torch's name ("float32", "bfloat16"); "" if unknown.
    dtype: str = ""
    #: Sentence embeddings are of an input's first this-many tokens (sentence-transformers'
    #: max_seq_length); 0: not truncated, a longer input than the model takes is refused.
    max_seq_length: int = 0
    #: The names of the prompts the model declares, for REQUEST.prompt_name (sorted).
    prompts: tuple[str, ...] = ()

    def check(self) -> None:
        for name in ("worker_id", "model", "task", "device", "host", "pooling", "dtype"):
            text = getattr(self, name)
            # Logged and shown in /info: 16 MiB strings held 260 MB for four peers and made
            # a 256 MiB /info; a newline or an escape in one forged log lines.
            if len(text) > MAX_READY_TEXT or not text.isprintable():
                raise ValueError(f"{name}: at most {MAX_READY_TEXT} printable characters")
        if len(self.prompts) > MAX_PROMPTS or any(
                not 0 < len(name) <= MAX_PROMPT_NAME for name in self.prompts):
            raise ValueError(f"prompts: at most {MAX_PROMPTS} names, each 1 to "
                             f"{MAX_PROMPT_NAME} characters")
        if self.capacity < 1 or self.max_batch_size < 1:
            raise ValueError("capacity and max_batch_size must be at least 1")
        if self.max_batch_tokens < 0:
            raise ValueError("max_batch_tokens must not be negative")
        if self.max_seq_length < 0:
            raise ValueError("max_seq_length must not be negative")


@dataclass(frozen=True, slots=True)
class Request(Message):
    """One input for the pipeline.

    ``budget_ms`` is the time the worker has to send its answer: the time left before the
    gateway gives up on it, less the trip there and back that the gateway measured to
    this worker (an answer sent later arrives after the 504), but half of it at most;
    ``waited_ms`` is how long it has already spent since admission, so the worker's
    batching deadline counts time queued in the gateway.
    """

    TYPE: ClassVar[MessageType] = MessageType.REQUEST
    request_id: int
    inputs: Any
    parameters: dict
    budget_ms: float
    waited_ms: float
    #: Answer the pooled sentence embedding (the worker's READY.pooling) instead of the
    #: pipeline's token-level output.
    embed: bool = False
    #: With ``embed``: the model's prompt (config_sentence_transformers.json ``prompts``) to
    #: put before the text, as sentence-transformers' ``encode(prompt_name=...)`` does;
    #: "": the model's default prompt, if it has one.
    prompt_name: str = ""

    def check(self) -> None:
        if self.request_id < 0:
            raise ValueError("request_id must be non-negative")
        if self.waited_ms < 0:
            raise ValueError("waited_ms must be non-negative")
        if self.prompt_name and not self.embed:
            raise ValueError("prompt_name is for embedding requests only")
        if len(self.prompt_name) > MAX_PROMPT_NAME:
            raise ValueError(f"prompt_name is longer than {MAX_PROMPT_NAME} characters")
        if nesting(self.inputs) > MAX_NESTING or nesting(self.parameters) > MAX_NESTING:
            raise ValueError(f"inputs or parameters nest more than {MAX_NESTING} levels deep")


@dataclass(frozen=True, slots=True)
class Result(Message):
    """The pipeline's output for one request, with how it was served."""

    TYPE: ClassVar[MessageType] = MessageType.RESULT
    request_id: int
    output: Any
    batch_size: int
    queue_ms: float
    inference_ms: float
    #: Worker-local sequence number of the batch: results sharing it ran in one call.
    batch_id: int = 0
    #: The input's token count (0 when the pipeline has no tokenizer).
    tokens: int = 0
    #: The batch's padded cost: its longest input's tokens x its items.
    batch_tokens: int = 0
    #: Share of ``batch_tokens`` that was padding (0.0 to 1.0).
    padding_ratio: float = 0.0

    def check(self) -> None:
        if self.batch_tokens < 0 or not 0.0 <= self.padding_ratio <= 1.0:
            raise ValueError("batch_tokens must be non-negative and padding_ratio in [0, 1]")
        # They become metrics and answer headers: X-Batch-Size 9223372036854775808 and a
        # queue-wait sum of 9e305 came from a peer's RESULT.
        if not 1 <= self.batch_size <= MAX_STAT_COUNT or not 0 <= self.tokens <= MAX_STAT_COUNT \
                or self.batch_tokens > MAX_STAT_COUNT or self.batch_id < 0:
            raise ValueError(f"batch_size (1 to {MAX_STAT_COUNT}), tokens, batch_tokens and "
                             "batch_id out of range")
        if not (0.0 <= self.queue_ms <= MAX_STAT_MS and 0.0 <= self.inference_ms <= MAX_STAT_MS):
            raise ValueError(f"queue_ms and inference_ms must be 0 to {MAX_STAT_MS:g}")


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A request failed; ``code`` is one of :mod:`protocol.errors`' codes."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    request_id: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """The gateway no longer wants this request: skip it if it has not run yet."""

    TYPE: ClassVar[MessageType] = MessageType.CANCEL
    request_id: int


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """I am alive. Any message counts as a sign of life; this one is sent when idle."""

    TYPE: ClassVar[MessageType] = MessageType.HEARTBEAT


@dataclass(frozen=True, slots=True)
class Disconnect(Message):
    """The sender is leaving: forget it (workers) or stop sending to it (gateway)."""

    TYPE: ClassVar[MessageType] = MessageType.DISCONNECT
    reason: str = field(default="")


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls for cls in (Ready, Request, Result, Error, Cancel, Heartbeat, Disconnect)
}
