"""Answers written a piece at a time are the bytes of the whole encoding, in pieces that
stay small, and the streamed list is let go of as it is written."""

from __future__ import annotations

import gc
import weakref

import msgpack
import numpy as np
import orjson
import pytest

from gateway import encoding
from gateway.encoding import PIECE_BYTES, Flat, dump_json, json_pieces, msgpack_pieces
from protocol import codec
from protocol.messages import NDArray


def nd(array: np.ndarray) -> NDArray:
    array = np.ascontiguousarray(array)
    return NDArray(array.dtype.str, array.shape, array.tobytes())


def joined(pieces) -> bytes:
    return b"".join(pieces)


def token_level(rng, n: int, tokens: int, hidden: int, dtype="float32") -> list[NDArray]:
    return [nd(rng.standard_normal((1, tokens, hidden)).astype(dtype)) for _ in range(n)]


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_json_pieces_of_a_list_are_the_whole_encoding(dtype):
    rng = np.random.default_rng(0)
    # Items over a piece (split by rows), under one, and with a row over a piece.
    items = token_level(rng, 3, 700, 384, dtype) + token_level(rng, 2, 5, 8, dtype)
    items.append(nd(rng.standard_normal((1, 2, PIECE_BYTES // 4 + 3)).astype(dtype)))
    whole = dump_json(list(items))
    pieces = list(json_pieces(list(items)))
    assert joined(pieces) == whole
    # No piece holds much more than a piece's worth of input (JSON of float32: ~3 bytes a byte).
    assert max(len(p) for p in pieces) < 4 * PIECE_BYTES


def test_json_pieces_of_structured_and_single_answers():
    answers = [[{"score": 0.5, "token": 7, "token_str": "é", "sequence": 'a "quoted" é'}],
               [], {"label": "x"}, None, 3]
    assert joined(json_pieces(list(answers))) == dump_json(answers)
    big = nd(np.arange(3 * PIECE_BYTES // 4, dtype="float32").reshape(3, -1))
    assert joined(json_pieces(big)) == dump_json(big)
    assert joined(json_pieces([])) == b"[]"


def test_json_pieces_down_a_path_keep_the_other_fields_and_their_order():
    rng = np.random.default_rng(1)
    vectors = [nd(rng.standard_normal(384).astype("float32")) for _ in range(5)]
    payload = {"object": "list",
               "data": [{"object": "embedding", "index": i, "embedding": v}
                        for i, v in enumerate(vectors)],
               "model": "m", "usage": {"prompt_tokens": 3, "total_tokens": 3}}
    whole = dump_json({**payload, "data": list(payload["data"])})
    assert joined(json_pieces(payload, ("data",))) == whole
    assert list(orjson.loads(whole)) == ["object", "data", "model", "usage"]


def test_flat_writes_arrays_as_one_list_as_concatenating_them_would():
    rng = np.random.default_rng(2)
    # One array over a piece (written a run at a time), one under, one empty.
    arrays = [rng.standard_normal((2, 600, 384)).astype("float32"), np.zeros((0, 3), "float32"),
              rng.standard_normal((1, 5, 4)).astype("float32")]
    halves = [rng.standard_normal((2, 3)).astype("float16"), np.zeros(0, "float16")]
    ints = [np.arange(6, dtype="int64").reshape(2, 3)]
    for group in (arrays, halves, ints):
        expected = np.concatenate([a.reshape(-1) for a in group]).tolist()
        payload = {"outputs": [{"name": "o", "data": Flat(group)}]}
        streamed = joined(json_pieces(payload, ("outputs",)))
        assert streamed == dump_json({"outputs": [{"name": "o", "data": Flat(group)}]})
        assert orjson.loads(streamed)["outputs"][0]["data"] == pytest.approx(expected, rel=1e-6)
    assert joined(json_pieces({"d": Flat([])}, ("x",))) == b'{"d":[]}' == dump_json({"d": Flat([])})


def test_msgpack_pieces_are_the_whole_encoding():
    rng = np.random.default_rng(3)
    items = token_level(rng, 3, 50, 16) + [[{"score": 0.1, "token": 2}]]
    assert joined(msgpack_pieces(list(items))) == codec.encode_client(items)
    payload = {"object": "list", "data": [{"embedding": items[0], "index": 0}], "model": None}
    whole = codec.encode_client(payload)
    streamed = joined(msgpack_pieces(payload, ("data",)))
    assert streamed == whole
    assert msgpack.unpackb(streamed)["data"][0]["index"] == 0
    assert joined(msgpack_pieces(items[0])) == codec.encode_client(items[0])


@pytest.mark.parametrize("pieces", [json_pieces, msgpack_pieces])
def test_each_item_is_let_go_once_written(pieces):
    class Answer(list):  # a list can be weakly referenced only through a subclass
        pass

    items = [Answer([float(i)] * 10) for i in range(3)]
    refs = [weakref.ref(item) for item in items]
    second = (dump_json if pieces is json_pieces else codec.encode_client)(items[1])
    payload = list(items)
    del items
    stream = pieces(payload)
    while next(stream) != second:
        pass
    gc.collect()
    # Held: the item being written, and those not yet written; the first is gone.
    assert refs[0]() is None and refs[2]() is not None
    list(stream)
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert payload == [None, None, None]


def test_rows_too_large_for_a_piece_are_split_inside():
    row = PIECE_BYTES // 4 * 3  # one float32 row of three pieces
    array = np.arange(2 * row, dtype="float32").reshape(1, 2, row)
    pieces = list(encoding._array_json(array))
    assert b"".join(pieces) == dump_json(array)
    assert len(pieces) > 4 and max(len(p) for p in pieces) < 4 * PIECE_BYTES
