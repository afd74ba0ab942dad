"""Answers as JSON or msgpack bytes: whole, or, when large, a piece at a time.

A large answer encoded in one call held the event loop and the memory of its whole
encoding at once: the JSON of /predict's 256 token-level answers of 500 tokens (all-MiniLM-
L6-v2) is 595 MB and took 1.8 s, during which the gateway answered no one and heard no
worker. :func:`json_pieces` and :func:`msgpack_pieces` yield the same bytes in pieces of
about :data:`PIECE_BYTES` of input each; the list they stream is emptied as it goes, so
what was written can be freed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import orjson

from protocol import codec
from protocol.messages import NDArray

#: Input bytes encoded in one piece: about 7 ms of JSON encoding of float32.
PIECE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Flat:
    """numpy arrays written as one flat list, in order, without first copying them into one
    (KServe v2 ``data``)."""

    arrays: list


def _writable(array: np.ndarray) -> np.ndarray:
    # orjson writes float32 and float64; half precision goes out as float32.
    return array.astype("float32") if array.dtype.kind == "f" and array.itemsize < 4 else array


def _json_default(obj: Any) -> Any:
    if isinstance(obj, NDArray):
        return _writable(obj.to_numpy())
    if isinstance(obj, Flat):
        return np.concatenate([_writable(a).reshape(-1) for a in obj.arrays]) if obj.arrays else []
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def dump_json(payload: Any) -> bytes:
    # orjson writes numpy arrays straight from their buffers: no nested float lists.
    return orjson.dumps(payload, default=_json_default,
                        option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_PASSTHROUGH_DATACLASS)


# -- JSON, a piece at a time ------------------------------------------------------------------
def _array_json(array: np.ndarray) -> Iterator[bytes]:
    """An array's JSON: whole when small, else its rows a run at a time (split further when
    one row is large), each run's brackets dropped so the runs join into one list."""
    if array.ndim == 0 or array.nbytes <= PIECE_BYTES:
        yield dump_json(_writable(array))
        return
    row_bytes = array[0].nbytes if array.ndim > 1 else array.itemsize
    per_piece = PIECE_BYTES // row_bytes
    yield b"["
    if per_piece:
        for index, run in enumerate(_runs(array, per_piece)):
            yield b"," + run if index else run
    else:
        for index in range(len(array)):
            if index:
                yield b","
            yield from _array_json(array[index])
    yield b"]"


def _runs(array: np.ndarray, per_piece: int) -> Iterator[bytes]:
    """The JSON of ``array``'s first-axis items, ``per_piece`` at a time, each run without
    its brackets (to be joined with commas inside one list)."""
    for start in range(0, len(array), per_piece):
        yield dump_json(_writable(array[start:start + per_piece]))[1:-1]


def _flat_json(arrays: list) -> Iterator[bytes]:
    yield b"["
    first = True
    for array in arrays:
        flat = array.reshape(-1)
        for run in _runs(flat, PIECE_BYTES // flat.itemsize):
            yield run if first else b"," + run
            first = False
    yield b"]"


def _json_value(value: Any) -> Iterator[bytes]:
    if isinstance(value, dict):
        yield b"{"
        for index, (key, item) in enumerate(value.items()):
            yield (b"," if index else b"") + dump_json(key) + b":"
            yield from _json_value(item)
        yield b"}"
    elif isinstance(value, Flat):
        yield from _flat_json(value.arrays)
    elif isinstance(value, NDArray) and len(value.data) > PIECE_BYTES:
        yield from _array_json(value.to_numpy())
    else:
        yield dump_json(value)


def json_pieces(payload: Any, path: tuple = ()) -> Iterator[bytes]:
    """``payload``'s JSON in pieces. ``path``: the keys down to the list to stream (``()``:
    the payload is that list); each item of it is let go once written. Dicts on the way
    down keep their key order."""
    if path:
        key, rest = path[0], path[1:]
        yield b"{"
        for index, (name, value) in enumerate(payload.items()):
            yield (b"," if index else b"") + dump_json(name) + b":"
            if name == key:
                yield from json_pieces(value, rest)
            else:
                yield from _json_value(value)
        yield b"}"
        return
    if not isinstance(payload, list):  # a single input's answer
        yield from _json_value(payload)
        return
    yield b"["
    for index in range(len(payload)):
        item, payload[index] = payload[index], None
        if index:
            yield b","
        yield from _json_value(item)
    yield b"]"


# -- msgpack, a piece at a time ----------------------------------------------------------------
def msgpack_pieces(payload: Any, path: tuple = ()) -> Iterator[bytes]:
    """As :func:`json_pieces`, for clients that sent ``Accept: application/msgpack``
    (arrays are raw bytes there, so an item is one piece however large)."""
    if path:
        key, rest = path[0], path[1:]
        yield codec.client_map_header(len(payload))
        for name, value in payload.items():
            yield codec.encode_client(name)
            if name == key:
                yield from msgpack_pieces(value, rest)
            else:
                yield codec.encode_client(value)
        return
    if not isinstance(payload, list):
        yield codec.encode_client(payload)
        return
    yield codec.client_array_header(len(payload))
    for index in range(len(payload)):
        item, payload[index] = payload[index], None
        yield codec.encode_client(item)
