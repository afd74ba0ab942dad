"""msgpack encoding and validating decoding of :mod:`protocol.messages`.

The only module that calls msgpack. Decoding trusts nothing: sizes are capped by the
Unpacker's own limits before anything is allocated, every field is type-checked against
its dataclass, and whatever goes wrong surfaces as one :class:`ProtocolError`, so a peer
sending garbage can cost a log line and nothing more.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack

from protocol.errors import ProtocolError
from protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message, NDArray

#: Largest frame accepted: token-level outputs of long inputs run to a few MiB.
MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_STR_BYTES = 16 * 1024 * 1024
MAX_CONTAINER_LEN = 1_000_000

_NDARRAY_EXT = 1
#: dtype string -> item size. Only plain numeric dtypes travel; no object arrays.
_DTYPES = {
    f"{order}{kind}{size}": size
    for order in "<>"
    for kind, sizes in (("f", (2, 4, 8)), ("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8)))
    for size in sizes
}
_DTYPES.update({"|i1": 1, "|u1": 1, "|b1": 1})
_MAX_DIMS = 32


class ProtocolVersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""

    def __init__(self, version: Any):
        super().__init__(
            f"peer speaks protocol version {version!r}, this side speaks {PROTOCOL_VERSION}; "
            "run the same batchwire release on gateway and workers"
            if type(version) is int else
            # "version '1', this side speaks 1" read as a contradiction.
            f"peer sent {version!r} ({type(version).__name__}) where a protocol version (a "
            "whole number) goes: it is not a batchwire peer, or a broken one"
        )
        self.version = version


class Unreadable(ProtocolError):
    """A well-framed message of a known type whose fields this side refuses: the peer may
    still be told, when it was about a request (a REQUEST left unanswered holds a slot on
    the worker until the gateway declares it stuck)."""

    def __init__(self, message: str, name: str, request_id: int | None):
        super().__init__(message)
        self.name = name
        #: The request it was about (REQUEST, RESULT, ERROR and CANCEL lead with it).
        self.request_id = request_id


class NewerFields(Unreadable):
    """A message with more fields than this side knows: the peer runs a newer batchwire and
    sent something this side has no field for (fields are only ever added at the end)."""

    def __init__(self, name: str, sent: int, known: int, request_id: int | None):
        super().__init__(
            f"{name} with {sent} fields, of which this side knows {known}: the peer runs a "
            "newer batchwire and uses something this side lacks; upgrade this side",
            name, request_id)


def _default(obj: Any) -> Any:
    if isinstance(obj, NDArray):
        if obj.dtype not in _DTYPES:
            raise TypeError(f"cannot encode an array of dtype {obj.dtype!r} in a batchwire message")
        return msgpack.ExtType(
            _NDARRAY_EXT, msgpack.packb([obj.dtype, list(obj.shape), obj.data], use_bin_type=True)
        )
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} in a batchwire message")


def _ext_hook(code: int, data: bytes) -> NDArray:
    if code != _NDARRAY_EXT:
        raise ProtocolError(f"unknown msgpack extension type {code}")
    parts = msgpack.unpackb(data, raw=False, max_str_len=64, max_array_len=_MAX_DIMS + 3)
    if not (isinstance(parts, list) and len(parts) == 3):
        raise ProtocolError("array extension must be [dtype, shape, data]")
    dtype, shape, raw = parts
    if dtype not in _DTYPES:
        raise ProtocolError(f"unsupported array dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(
        type(n) is int and n >= 0 for n in shape
    ):
        raise ProtocolError("array shape must be a list of non-negative ints")
    # numpy bounds the byte size of the nonzero dimensions even when another one is 0.
    if math.prod(n for n in shape if n) * _DTYPES[dtype] >= 2**63:
        raise ProtocolError("array shape is too large")
    if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * _DTYPES[dtype]:
        raise ProtocolError("array data does not match its dtype and shape")
    return NDArray(dtype, tuple(shape), raw)


def _trailing_defaults(cls: type) -> tuple[tuple[str, Any], ...]:
    """The fields after the last one without a default, last first, with their defaults."""
    found = []
    for f in reversed(dataclasses.fields(cls)):
        if f.default is dataclasses.MISSING:
            break
        found.append((f.name, f.default))
    return tuple(found)


_FIELD_NAMES = {cls: tuple(f.name for f in dataclasses.fields(cls))
                for cls in MESSAGE_TYPES.values()}
_TRAILING_DEFAULTS = {cls: _trailing_defaults(cls) for cls in MESSAGE_TYPES.values()}


def encode(message: Message) -> bytes:
    cls = type(message)
    fields = [getattr(message, name) for name in _FIELD_NAMES[cls]]
    # Trailing fields still at their defaults stay off the wire, so a peer that predates a
    # field decodes every message that does not use it (a newer gateway's REQUEST, say,
    # reaches an older worker unless it asks for something that worker cannot do).
    for name, default in _TRAILING_DEFAULTS[cls]:
        value = fields[-1]
        if type(value) is not type(default) or value != default:
            break
        fields.pop()
    return msgpack.packb(
        [PROTOCOL_VERSION, int(message.TYPE), *fields], use_bin_type=True, default=_default
    )


def _without_timestamps(value: Any) -> bool:
    """No msgpack timestamp (extension -1) anywhere in ``value``. msgpack decodes those
    itself, before the extension hook sees them, and no batchwire peer sends one: a
    timestamp in a frame is a peer that does not speak the protocol."""
    timestamp = msgpack.Timestamp
    kind = type(value)
    if kind is not dict and kind is not list:
        return kind is not timestamp
    # Iterative, containers only: the walk costs about 2 us on a fill-mask answer (five
    # candidates), and nesting as deep as msgpack allows cannot exhaust Python's recursion
    # limit.
    stack = [value]
    while stack:
        container = stack.pop()
        for item in (container.values() if type(container) is dict else container):
            kind = type(item)
            if kind is dict or kind is list:
                stack.append(item)
            elif kind is timestamp:
                return False
    return True


#: A field of names: a msgpack array of strings, a tuple once decoded (messages are frozen).
NAMES = tuple[str, ...]


def _field_ok(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    if kind is int:
        return type(value) is int
    if kind is bool:
        return type(value) is bool
    if kind is float:
        return type(value) in (int, float) and math.isfinite(value)
    if kind is str:
        return type(value) is str
    if kind is dict:
        return type(value) is dict and all(type(k) is str for k in value)
    if kind == NAMES:
        return type(value) is list and all(type(v) is str for v in value)
    raise TypeError(f"no wire check for field type {kind!r}")


_SCHEMAS = {
    type_id: [(f.name, f.type) for f in dataclasses.fields(cls)]
    for type_id, cls in MESSAGE_TYPES.items()
}
#: Where each message type has NAMES fields (few do: decoding the others skips this).
_NAMES_FIELDS = {
    type_id: [i for i, (_, kind) in enumerate(schema) if kind == NAMES]
    for type_id, schema in _SCHEMAS.items()
}
#: Fields without a default must be on the wire; trailing fields with a default may be left
#: off, so a field added at the end with a default does not break older peers' frames.
_REQUIRED = {
    type_id: sum(1 for f in dataclasses.fields(cls)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    for type_id, cls in MESSAGE_TYPES.items()
}


def decode(frame: bytes) -> Message:
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES} byte limit")
    try:
        parts = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_ext_hook,
            max_str_len=MAX_STR_BYTES,
            max_bin_len=MAX_FRAME_BYTES,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
            max_ext_len=MAX_FRAME_BYTES,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo: ValueError, ExtraData, StackError, ...
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(parts, list) or len(parts) < 2:
        raise ProtocolError("a message is an array led by version and type")
    version, type_id, *values = parts
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolVersionMismatch(version)
    cls = MESSAGE_TYPES.get(type_id) if type(type_id) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_id!r}")
    schema = _SCHEMAS[type_id]
    first = values[0] if values and schema and schema[0][0] == "request_id" else None
    request_id = first if type(first) is int else None
    if len(values) > len(schema):
        raise NewerFields(cls.__name__, len(values), len(schema), request_id)
    if not _REQUIRED[type_id] <= len(values) <= len(schema):
        expected = (str(len(schema)) if _REQUIRED[type_id] == len(schema)
                    else f"{_REQUIRED[type_id]} to {len(schema)}")
        raise Unreadable(f"{cls.__name__} takes {expected} fields, got {len(values)}",
                         cls.__name__, request_id)
    for (name, kind), value in zip(schema, values):
        if not _field_ok(value, kind):
            why = (f"is not a finite number ({value})"
                   if isinstance(value, float) and not math.isfinite(value)
                   else f"has the wrong type ({type(value).__name__})")
            raise Unreadable(f"{cls.__name__}.{name} {why}", cls.__name__, request_id)
        if (kind is Any or kind is dict) and not _without_timestamps(value):
            raise Unreadable(f"{cls.__name__}.{name} holds a msgpack timestamp, which is "
                             "not part of the protocol", cls.__name__, request_id)
    for i in _NAMES_FIELDS[type_id]:
        if i < len(values):
            values[i] = tuple(values[i])
    message = cls(*values)
    try:
        message.check()
    except ValueError as exc:
        raise Unreadable(f"{cls.__name__}: {exc}", cls.__name__, request_id) from None
    return message


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_sorted(v) for v in value]
    return value


def encoded_size(value: Any) -> int:
    """Bytes ``value`` takes in a batchwire message."""
    return len(msgpack.packb(value, use_bin_type=True, default=_default))


def encode_canonical(value: Any) -> bytes:
    """Bytes that are equal exactly when the values are: dict key order does not matter."""
    return msgpack.packb(_sorted(value), use_bin_type=True, default=_default)


# -- client-facing msgpack (HTTP bodies), kept here so msgpack is called from one module ----
def _client_default(obj: Any) -> Any:
    if isinstance(obj, NDArray):
        # Raw bytes, not nested lists: a client reads it with numpy.frombuffer(data, dtype)
        # .reshape(shape).
        return {"dtype": obj.dtype, "shape": list(obj.shape), "data": obj.data}
    raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def encode_client(payload: Any) -> bytes:
    return msgpack.packb(payload, use_bin_type=True, default=_client_default)


def client_array_header(length: int) -> bytes:
    """The start of a msgpack array whose ``length`` items follow, each encoded alone."""
    return msgpack.Packer().pack_array_header(length)


def client_map_header(length: int) -> bytes:
    return msgpack.Packer().pack_map_header(length)


def decode_client(body: bytes, max_bytes: int) -> Any:
    """Decode a client's msgpack body under the same kind of limits as frames."""
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=True, max_str_len=max_bytes,
                                max_bin_len=max_bytes, max_array_len=MAX_CONTAINER_LEN,
                                max_map_len=MAX_CONTAINER_LEN, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types; the caller maps this to 400
        if "max_ext_len" in str(exc):
            # No pipeline takes a timestamp or a custom extension; msgpack's own words
            # ("5 exceeds max_ext_len(0)") would not tell the client what to change.
            raise ValueError(
                "it holds a msgpack extension type (a timestamp, say), which requests cannot "
                "carry; send strings, numbers, booleans, nil, bin, arrays and maps") from None
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    # strict_map_key lets bin keys through, which a JSON body cannot hold and no pipeline
    # argument is named by (a bytes key among str ones failed the route's own checks).
    stack = [value] if type(value) in (dict, list) else []
    while stack:
        container = stack.pop()
        if type(container) is dict:
            key = next((k for k in container if type(k) is not str), None)
            if key is not None:
                raise ValueError(f"map key {key[:40]!r} is bin, not str; send map keys as "
                                 "msgpack strings (use_bin_type packs Python str as str)")
            stack.extend(v for v in container.values() if type(v) in (dict, list))
        else:
            stack.extend(v for v in container if type(v) in (dict, list))
    return value
