"""The wire protocol between the batchwire gateway and its workers (no heavy imports)."""

from protocol.codec import MAX_FRAME_BYTES, ProtocolVersionMismatch, decode, encode
from protocol.errors import ProtocolError
from protocol.messages import (
    PROTOCOL_VERSION,
    Cancel,
    Disconnect,
    Error,
    Heartbeat,
    Message,
    MessageType,
    NDArray,
    Ready,
    Request,
    Result,
)

__all__ = [
    "MAX_FRAME_BYTES", "PROTOCOL_VERSION", "Cancel", "Disconnect", "Error", "Heartbeat",
    "Message", "MessageType", "NDArray", "ProtocolError", "ProtocolVersionMismatch", "Ready",
    "Request", "Result", "decode", "encode",
]
