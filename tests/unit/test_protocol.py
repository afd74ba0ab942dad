"""Unit tests for protocol/: message round trips, hostile-frame decoding, error codes."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import protocol
import protocol.codec
from protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Disconnect,
    Error,
    Heartbeat,
    Message,
    MessageType,
    NDArray,
    ProtocolError,
    ProtocolVersionMismatch,
    Ready,
    Request,
    Result,
    decode,
    encode,
)
from protocol import errors
from protocol.messages import MESSAGE_TYPES

#: Example counts are set per test: enough to find the bugs these tests once caught, while the
#: whole file stays well under ten seconds.
FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: msgpack's integer range: what the wire can carry at all.
MSGPACK_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
SUPPORTED_DTYPES = ["<f2", "<f4", "<f8", ">f4", "|i1", "<i2", "<i4", "<i8", ">i8",
                    "|u1", "<u2", "<u4", "<u8", "|b1"]


def roundtrip(message: Message) -> Message:
    return decode(encode(message))


def frame(*parts) -> bytes:
    """A raw frame; msgpack.ExtType values travel as-is."""
    return msgpack.packb(list(parts), use_bin_type=True)


def ext_array(dtype, shape, data, code=1) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb([dtype, shape, data], use_bin_type=True))


def request_frame(inputs=None, parameters=None, budget_ms=100.0, waited_ms=0.0, request_id=1):
    return frame(PROTOCOL_VERSION, int(MessageType.REQUEST), request_id, inputs,
                 {} if parameters is None else parameters, budget_ms, waited_ms)


def assert_rejected(raw: bytes, match: str | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(raw)
    return info.value


# --------------------------------------------------------------------------- round trips

SAMPLES = [
    Ready("w-1", 4242, "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction",
          "cuda:0", 8, 32),
    Ready("w-2", 1, "m", "feature-extraction", "cpu", 2, 1, "gpu-host-3", "mean+normalize"),
    Ready("w-3", 1, "m", "feature-extraction", "cpu", 2, 1, prompts=("passage", "query")),
    Request(9, "embed me", {}, 100.0, 1.0, True),
    Result(9, None, 2, 0.5, 3.0, 17, 12),
    Request(7, "hello", {"truncation": True, "top_k": 3}, 1500.0, 12.5),
    Request(0, ["a", "b"], {}, 0.0, 0.0),
    Request(2**64 - 1, {"nested": [1, {"x": None}]}, {"p": [1.5, -2]}, 1e-3, 0.0),
    Result(7, [{"label": "POSITIVE", "score": 0.998}], 4, 3.25, 17.0),
    Result(8, None, 1, 0.0, 0.0),
    Error(7, "model_error", "CUDA out of memory"),
    Error(3, "", ""),
    Cancel(7),
    Heartbeat(),
    Disconnect(),
    Disconnect("shutting down"),
    Disconnect("ünïcødé ✓ 日本語"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(message):
    decoded = roundtrip(message)
    assert type(decoded) is type(message)
    assert decoded == message
    # The convenience methods on Message go through the same codec.
    assert Message.decode(message.encode()) == message


def test_samples_cover_every_message_type():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())
    assert set(MESSAGE_TYPES) == set(MessageType)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_wire_layout_is_version_type_then_fields_in_declared_order(message):
    parts = msgpack.unpackb(encode(message), raw=False)
    fields = [getattr(message, f.name) for f in dataclasses.fields(message)]
    assert parts[0] == PROTOCOL_VERSION
    assert parts[1] == int(message.TYPE)
    sent = len(parts) - 2
    # A field of names is a tuple in the message and an array on the wire.
    assert parts[2:] == [list(v) if isinstance(v, tuple) else v for v in fields[:sent]]
    # What is left off is trailing fields at their defaults.
    assert all(f.default == getattr(message, f.name)
               for f in dataclasses.fields(message)[sent:])


def test_wire_bytes_of_a_known_message_are_stable():
    # Pinned bytes: a silent change of field order or framing breaks mixed-version clusters.
    assert encode(Cancel(5)) == b"\x93\x01\x05\x05"
    assert encode(Heartbeat()) == b"\x92\x01\x06"
    assert encode(Disconnect("x")) == b"\x93\x01\x07\xa1x"


def test_field_order_on_the_wire():
    # Spelled out per type: fields are positional, so reordering a dataclass breaks peers.
    nd = NDArray("<i8", (1,), b"\x01" + b"\x00" * 7)
    # Built by keyword, so a swap of two same-typed fields in a dataclass is caught too.
    expected = [
        (Ready(worker_id="w", pid=12, model="m", task="t", device="cpu", capacity=2,
               max_batch_size=16, host="h", pooling="mean", max_batch_tokens=4096,
               dtype="bfloat16", max_seq_length=256, prompts=("passage", "query")),
         [1, 1, "w", 12, "m", "t", "cpu", 2, 16, "h", "mean", 4096, "bfloat16", 256,
          ["passage", "query"]]),
        (Request(request_id=5, inputs="in", parameters={"k": 1}, budget_ms=30.0,
                 waited_ms=2.5, embed=True, prompt_name="query"),
         [1, 2, 5, "in", {"k": 1}, 30.0, 2.5, True, "query"]),
        (Result(request_id=5, output="out", batch_size=3, queue_ms=1.25, inference_ms=4.5,
                batch_id=9, tokens=11, batch_tokens=48, padding_ratio=0.25),
         [1, 3, 5, "out", 3, 1.25, 4.5, 9, 11, 48, 0.25]),
        (Error(request_id=5, code="bad_input", message="nope"), [1, 4, 5, "bad_input", "nope"]),
        (Cancel(request_id=5), [1, 5, 5]),
        (Heartbeat(), [1, 6]),
        (Disconnect(reason="bye"), [1, 7, "bye"]),
    ]
    for message, parts in expected:
        assert encode(message) == msgpack.packb(parts, use_bin_type=True), message
        assert decode(msgpack.packb(parts, use_bin_type=True)) == message
    # A READY from a worker that predates prompts and max_seq_length (its last fields)
    # still decodes.
    older = decode(msgpack.packb(expected[0][1][:-2], use_bin_type=True))
    assert older.max_seq_length == 0 and older.dtype == "bfloat16" and older.prompts == ()
    ext = msgpack.ExtType(1, msgpack.packb(["<i8", [1], nd.data], use_bin_type=True))
    assert encode(Result(1, nd, 1, 0.0, 0.0, 7)) == msgpack.packb(
        [1, 3, 1, ext, 1, 0.0, 0.0, 7], use_bin_type=True
    )


def test_bytes_and_tuples_in_payloads():
    message = Result(1, {"raw": b"\x00\xff", "pair": (1, 2)}, 1, 0.0, 0.0)
    decoded = roundtrip(message)
    assert decoded.output["raw"] == b"\x00\xff"
    # Tuples travel as arrays and come back as lists.
    assert decoded.output["pair"] == [1, 2]


def test_int_accepted_where_float_declared():
    decoded = roundtrip(Request(1, "x", {}, 250, 3))
    assert decoded.budget_ms == 250 and decoded.waited_ms == 3


def _arrays():
    base = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    return {
        "float32": base,
        "float16": base.astype(np.float16),
        "int64": np.arange(-5, 7, dtype=np.int64).reshape(3, 4) * (2**40),
        "float64": np.linspace(-1, 1, 5),
        "uint8": np.arange(256, dtype=np.uint8),
        "int8": np.array([-128, 0, 127], dtype=np.int8),
        "bool": np.array([[True, False], [False, True]]),
        "big_endian": np.arange(6, dtype=">f8").reshape(2, 3),
        "empty": np.zeros((0,), dtype=np.float32),
        "empty_2d": np.zeros((3, 0), dtype=np.int64),
        "scalar_0d": np.array(3.5, dtype=np.float32),
        "strided_slice": base[:, ::2],
        "reversed": np.arange(10, dtype=np.int64)[::-1],
        "transposed": base.T,
        "fortran": np.asfortranarray(base),
    }


@pytest.mark.parametrize("name", list(_arrays()))
def test_ndarray_round_trips_through_a_message(name):
    original = _arrays()[name]
    nd = NDArray.from_array(original)
    assert nd.dtype == original.dtype.str
    assert nd.shape == original.shape
    # Non-contiguous input is copied to C order, never sent with its strides lost.
    assert nd.data == np.ascontiguousarray(original).tobytes()

    decoded = roundtrip(Request(1, nd, {}, 10.0, 0.0))
    assert decoded.inputs == nd
    back = decoded.inputs.to_numpy()
    assert back.dtype == original.dtype
    assert back.shape == original.shape
    np.testing.assert_array_equal(back, original)


def test_result_with_nested_containers_of_arrays():
    arrays = _arrays()
    output = {
        "embeddings": [NDArray.from_array(arrays["float32"]), NDArray.from_array(arrays["empty"])],
        "meta": {"ids": NDArray.from_array(arrays["int64"]), "tokens": ["a", "b"], "n": 2},
        "deep": [[{"half": NDArray.from_array(arrays["float16"])}], []],
        "slice": NDArray.from_array(arrays["strided_slice"]),
        "score": 0.25,
        "none": None,
    }
    message = Result(99, output, 3, 1.5, 20.25)
    decoded = roundtrip(message)
    assert decoded == message
    out = decoded.output
    np.testing.assert_array_equal(out["embeddings"][0].to_numpy(), arrays["float32"])
    assert out["embeddings"][1].to_numpy().shape == (0,)
    np.testing.assert_array_equal(out["meta"]["ids"].to_numpy(), arrays["int64"])
    np.testing.assert_array_equal(out["deep"][0][0]["half"].to_numpy(), arrays["float16"])
    np.testing.assert_array_equal(out["slice"].to_numpy(), arrays["strided_slice"])


def test_ndarray_in_request_parameters():
    message = Request(3, None, {"mask": NDArray.from_array(np.ones((2, 2), dtype=np.int64))},
                      5.0, 1.0)
    assert roundtrip(message) == message


@settings(FUZZ, max_examples=200)
@given(
    hnp.arrays(
        dtype=st.sampled_from(SUPPORTED_DTYPES).map(np.dtype),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    st.integers(min_value=1, max_value=3),
)
def test_ndarray_round_trip_property(array, step):
    view = array[::step] if array.ndim else array
    decoded = roundtrip(Result(1, NDArray.from_array(view), 1, 0.0, 0.0)).output
    back = decoded.to_numpy()
    assert back.dtype == view.dtype and back.shape == view.shape
    # Byte comparison, so NaN payloads count as equal.
    assert back.tobytes() == np.ascontiguousarray(view).tobytes()


# ------------------------------------------------------------------------- json-like round trip

JSON_LEAVES = st.none() | st.booleans() | MSGPACK_INT | FINITE | st.text(max_size=20)
JSON_LIKE = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(FUZZ, max_examples=200)
@given(
    request_id=st.integers(min_value=0, max_value=2**64 - 1),
    inputs=JSON_LIKE,
    parameters=st.dictionaries(st.text(max_size=12), JSON_LIKE, max_size=5),
    budget_ms=FINITE,
    waited_ms=st.floats(min_value=0, allow_nan=False, allow_infinity=False),
)
def test_request_round_trip_property(request_id, inputs, parameters, budget_ms, waited_ms):
    message = Request(request_id, inputs, parameters, budget_ms, waited_ms)
    decoded = roundtrip(message)
    assert decoded == message
    assert type(decoded.request_id) is int
    # Re-encoding the decoded message is byte-identical: decoding loses nothing.
    assert encode(decoded) == encode(message)


# --------------------------------------------------------------------------- fuzzing decode

def _decode_is_total(raw: bytes) -> Message | None:
    """decode() either returns a Message or raises ProtocolError; anything else fails."""
    try:
        message = decode(raw)
    except ProtocolError:
        return None
    assert isinstance(message, Message)
    assert type(message) in MESSAGE_TYPES.values()
    # Whatever was accepted re-encodes, and decodes again to the same bytes.
    again = encode(message)
    assert encode(decode(again)) == again
    # Every array the decoder accepted can actually be materialised by numpy.
    _check_arrays(message)
    return message


def _check_arrays(value):
    if isinstance(value, NDArray):
        assert value.to_numpy().size * np.dtype(value.dtype).itemsize == len(value.data)
    elif isinstance(value, Message):
        for f in dataclasses.fields(value):
            _check_arrays(getattr(value, f.name))
    elif isinstance(value, list):
        for item in value:
            _check_arrays(item)
    elif isinstance(value, dict):
        for item in value.values():
            _check_arrays(item)


@settings(FUZZ, max_examples=500)
@given(st.binary(max_size=512))
def test_decoding_arbitrary_bytes_returns_a_message_or_raises_protocol_error(raw):
    _decode_is_total(raw)


@FUZZ
@given(st.binary(max_size=64))
def test_decoding_bytes_behind_a_valid_header(tail):
    # A fixarray header + version 1 + a small type, so the fuzz gets past the first checks.
    for header in (b"\x92\x01\x06", b"\x93\x01\x05", b"\x93\x01\x07", b"\x97\x01\x02"):
        _decode_is_total(header + tail)


def _ndarray_exts():
    dims = st.lists(st.integers(min_value=0, max_value=4), max_size=3)

    @st.composite
    def build(draw):
        dtype = draw(st.sampled_from(SUPPORTED_DTYPES + ["|O8", "<c8", "<f16", "", 4]))
        shape = draw(dims | st.lists(MSGPACK_INT, max_size=3) | st.just([0, 2**40, 2**40]))
        size = math.prod(n for n in shape if isinstance(n, int)) if len(shape) else 1
        itemsize = protocol.codec._DTYPES.get(dtype, 1) if isinstance(dtype, str) else 1
        n_bytes = draw(st.sampled_from([size * itemsize, size * itemsize + 1, 0, 3]))
        data = b"\x00" * min(max(n_bytes, 0), 256)
        code = draw(st.sampled_from([1, 1, 1, 0, 2, 127]))
        return ext_array(dtype, shape, data, code)

    return build()


GOOD_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=10)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
)
ODD_LEAVES = (
    MSGPACK_INT
    | _ndarray_exts()
    | st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=8))
)
WIRE_VALUES = st.recursive(
    st.one_of(GOOD_LEAVES, GOOD_LEAVES, GOOD_LEAVES, ODD_LEAVES),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=5), children, max_size=3),
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=5), children, max_size=3),
        st.dictionaries(st.integers(-2, 2) | st.binary(max_size=3), children, max_size=2),
    ),
    max_leaves=10,
)
#: Values of the declared field type, so frames often get past type checks to check().
TYPED_VALUES = {
    int: st.integers(min_value=-2, max_value=10) | MSGPACK_INT,
    float: st.floats() | st.integers(min_value=-5, max_value=5),
    str: st.text(max_size=10),
    dict: st.dictionaries(st.text(max_size=5), WIRE_VALUES, max_size=3),
}


@st.composite
def plausible_frames(draw):
    type_id = draw(st.integers(min_value=0, max_value=9))
    cls = MESSAGE_TYPES.get(type_id)
    kinds = [f.type for f in dataclasses.fields(cls)] if cls else [None, None]
    count = draw(st.sampled_from([len(kinds)] * 4 + [max(len(kinds) - 1, 0), len(kinds) + 1]))
    values = []
    for kind in (kinds + [None])[:count]:
        typed = TYPED_VALUES.get(kind)
        if typed is not None and draw(st.integers(0, 9)) < 8:
            values.append(draw(typed))
        else:
            values.append(draw(WIRE_VALUES))
    version = draw(st.sampled_from([1] * 6 + [0, 2, True, 1.0]))
    return frame(version, type_id, *values)


@FUZZ
@given(plausible_frames())
def test_decoding_structurally_plausible_frames(raw):
    message = _decode_is_total(raw)
    if message is not None:
        parts = msgpack.unpackb(raw, raw=False, ext_hook=lambda code, data: None)
        assert parts[0] == PROTOCOL_VERSION and type(parts[0]) is int
        assert parts[1] == int(message.TYPE)


def _valid_frames():
    arr = NDArray.from_array(np.arange(6, dtype=np.float32).reshape(2, 3))
    return [encode(m) for m in SAMPLES] + [encode(Result(1, {"a": [arr, 1]}, 1, 0.0, 0.0))]


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_decoding_mutated_valid_frames(data):
    raw = bytearray(data.draw(st.sampled_from(_valid_frames())))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(min_value=0, max_value=max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] = data.draw(st.integers(min_value=0, max_value=255))
        elif op == "truncate":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and raw:
            del raw[pos]
    _decode_is_total(bytes(raw))


# ------------------------------------------------------------------------ specific rejections

@pytest.mark.parametrize("version", [0, 2, 99, -1])
def test_wrong_version_is_a_version_mismatch_naming_both_versions(version):
    error = assert_rejected(frame(version, int(MessageType.HEARTBEAT)))
    assert isinstance(error, ProtocolVersionMismatch)
    assert error.version == version
    text = str(error)
    assert f"protocol version {version}" in text
    assert f"speaks {PROTOCOL_VERSION}" in text


@pytest.mark.parametrize("version", [True, 1.0, "1", None, [1], b"\x01"])
def test_version_must_be_the_int_1(version):
    # True == 1 and 1.0 == 1 in Python, but neither is what a batchwire peer sends.
    error = assert_rejected(frame(version, int(MessageType.HEARTBEAT)))
    assert isinstance(error, ProtocolVersionMismatch)


@pytest.mark.parametrize("type_id", [0, 8, 99, -1, 2**64 - 1, "2", 2.0, True, None])
def test_unknown_message_type(type_id):
    error = assert_rejected(frame(PROTOCOL_VERSION, type_id), match="unknown message type")
    assert not isinstance(error, ProtocolVersionMismatch)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        msgpack.packb([]),
        msgpack.packb([1]),
        msgpack.packb(1),
        msgpack.packb("hello"),
        msgpack.packb({"version": 1, "type": 6}),
        msgpack.packb(None),
    ],
    ids=["empty", "empty-array", "version-only", "int", "str", "map", "nil"],
)
def test_frame_that_is_not_a_message_array(raw):
    assert_rejected(raw)


@pytest.mark.parametrize(
    "type_id, values",
    [
        (MessageType.CANCEL, []),
        (MessageType.ERROR, [1, "model_error"]),
        (MessageType.REQUEST, [1, "x", {}, 1.0]),
        (MessageType.READY, ["w", 1, "m", "t", "cpu", 1]),
    ],
)
def test_too_few_fields(type_id, values):
    assert_rejected(frame(PROTOCOL_VERSION, int(type_id), *values), match="fields, got")


@pytest.mark.parametrize(
    "type_id, values, request_id",
    [
        (MessageType.HEARTBEAT, [None], None),
        (MessageType.CANCEL, [1, 2], 1),
        (MessageType.DISCONNECT, ["a", "b"], None),
        (MessageType.RESULT, [1, "x", 1, 0.0, 0.0, 0, 0, 0, 0.0, 0], 1),
        (MessageType.REQUEST, [7, "x", {}, 1.0, 0.0, False, "", 1], 7),
        (MessageType.REQUEST, ["not an id", "x", {}, 1.0, 0.0, False, "", 1], None),
        (MessageType.READY, ["w", 1, "m", "t", "cpu", 1, 1, "", "", 0, "", 0, [], "new"], None),
    ],
)
def test_more_fields_than_known_say_the_peer_is_newer(type_id, values, request_id):
    """Fields are only added at the end: a frame with more is from a newer peer, told apart
    from garbage so the side that gets it can say to upgrade (and a worker can answer the
    request it could not read)."""
    error = assert_rejected(frame(PROTOCOL_VERSION, int(type_id), *values),
                            match="the peer runs a newer batchwire")
    assert isinstance(error, protocol.codec.NewerFields) and error.request_id == request_id


@pytest.mark.parametrize(
    "type_id, values",
    [
        (MessageType.REQUEST, ["1", "x", {}, 1.0, 0.0]),  # str request_id
        (MessageType.REQUEST, [True, "x", {}, 1.0, 0.0]),  # bool request_id
        (MessageType.REQUEST, [1.0, "x", {}, 1.0, 0.0]),  # float request_id
        (MessageType.REQUEST, [None, "x", {}, 1.0, 0.0]),
        (MessageType.REQUEST, [1, "x", [], 1.0, 0.0]),  # parameters not a map
        (MessageType.REQUEST, [1, "x", None, 1.0, 0.0]),
        (MessageType.REQUEST, [1, "x", {}, "5", 0.0]),  # str budget
        (MessageType.REQUEST, [1, "x", {}, True, 0.0]),  # bool budget
        (MessageType.REQUEST, [1, "x", {}, None, 0.0]),
        (MessageType.REQUEST, [1, "x", {}, 1.0, False]),
        (MessageType.REQUEST, [1, "x", {"k": 1, b"k": 2}, 1.0, 0.0]),  # bytes map key
        (MessageType.READY, ["w", True, "m", "t", "cpu", 1, 1]),  # bool pid
        (MessageType.READY, [b"w", 1, "m", "t", "cpu", 1, 1]),  # bytes where str expected
        (MessageType.READY, ["w", 1, "m", "t", "cpu", 1.0, 1]),  # float capacity
        (MessageType.READY, ["w", 1, "m", "t", None, 1, 1]),
        (MessageType.RESULT, [1, "x", 1.5, 0.0, 0.0]),  # float batch_size
        (MessageType.RESULT, [1, "x", True, 0.0, 0.0]),
        (MessageType.RESULT, [1, "x", 1, "0", 0.0]),
        (MessageType.ERROR, [1, 500, "boom"]),  # int code
        (MessageType.ERROR, [1, "model_error", None]),
        (MessageType.ERROR, [False, "model_error", "boom"]),
        (MessageType.CANCEL, ["7"]),
        (MessageType.CANCEL, [True]),
        (MessageType.CANCEL, [[7]]),
        (MessageType.DISCONNECT, [None]),
        (MessageType.DISCONNECT, [b"bye"]),
        (MessageType.DISCONNECT, [1]),
    ],
)
def test_wrong_field_type(type_id, values):
    assert_rejected(frame(PROTOCOL_VERSION, int(type_id), *values), match="wrong type")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["budget_ms", "waited_ms"])
def test_request_rejects_non_finite_floats(field, bad):
    kwargs = {"budget_ms": 10.0, "waited_ms": 0.0, field: bad}
    assert_rejected(request_frame("x", **kwargs), match=field)


@pytest.mark.parametrize("position", [3, 4])
def test_result_rejects_non_finite_timings(position):
    values = [1, "x", 1, 0.0, 0.0]
    values[position] = math.nan
    # Said as what it is: "wrong type (float)" for a float field read as a contradiction.
    assert_rejected(frame(PROTOCOL_VERSION, int(MessageType.RESULT), *values),
                    match=r"is not a finite number \(nan\)")


@pytest.mark.parametrize("waited_ms", [-1.0, -1e-9, -5])
def test_request_rejects_negative_waited_ms(waited_ms):
    assert_rejected(request_frame("x", waited_ms=waited_ms), match="waited_ms")


def test_request_rejects_negative_request_id():
    assert_rejected(request_frame("x", request_id=-1), match="request_id")


def test_request_accepts_boundary_values():
    # Zero waited, zero id, negative budget (already expired) are legal.
    message = decode(request_frame("x", request_id=0, budget_ms=-3.0, waited_ms=0.0))
    assert message == Request(0, "x", {}, -3.0, 0.0)


@pytest.mark.parametrize("capacity, max_batch_size", [(0, 8), (-1, 8), (4, 0), (4, -2)])
def test_ready_rejects_capacity_or_batch_size_below_one(capacity, max_batch_size):
    raw = encode(Ready("w", 1, "m", "t", "cpu", capacity, max_batch_size))
    assert_rejected(raw, match="at least 1")


@pytest.mark.parametrize("field, value", [("worker_id", "w" * 4097), ("model", "m" * (16 << 20)),
                                          ("worker_id", "w\n2026 INFO forged"),
                                          ("device", "cpu\x1b[31m")],
                         ids=["long-id", "huge-model", "newline", "escape"])
def test_ready_rejects_texts_too_long_to_hold_or_that_would_forge_log_lines(field, value):
    fields = {"worker_id": "w", "pid": 1, "model": "m", "task": "t", "device": "cpu",
              "capacity": 2, "max_batch_size": 1, field: value}
    assert_rejected(encode(Ready(**fields)), match=f"{field}: at most 4096 printable")
    assert roundtrip(Ready(**{**fields, field: "x" * 4096})).capacity == 2


@pytest.mark.parametrize("stats", [{"batch_size": 2**63}, {"batch_size": 0}, {"batch_size": -3},
                                   {"queue_ms": 9e305}, {"inference_ms": float("nan")},
                                   {"queue_ms": -1.0}, {"tokens": -1}, {"batch_id": -1}],
                         ids=["huge-batch", "no-batch", "negative-batch", "huge-wait",
                              "nan-inference", "negative-wait", "negative-tokens",
                              "negative-batch-id"])
def test_result_statistics_out_of_range_are_refused_before_they_reach_metrics(stats):
    fields = {"request_id": 1, "output": "x", "batch_size": 2, "queue_ms": 1.0,
              "inference_ms": 2.0, **stats}
    assert_rejected(encode(Result(**fields)), match="out of range|must be 0 to|not a finite")


def test_ready_from_a_worker_that_does_not_send_its_dtype_decodes_with_dtype_unknown():
    # The dtype was added at the end with a default: an older worker's READY still decodes.
    parts = [PROTOCOL_VERSION, int(MessageType.READY), "w", 1, "m", "t", "cpu", 2, 1, "h",
             "mean", 512]
    message = decode(msgpack.packb(parts, use_bin_type=True))
    assert isinstance(message, Ready) and message.dtype == "" and message.max_batch_tokens == 512


def test_ready_accepts_capacity_one():
    message = Ready("w", 1, "m", "t", "cpu", 1, 1)
    assert roundtrip(message) == message


@pytest.mark.parametrize(
    "dtype, shape, data",
    [
        ("<f4", [2, 3], b"\x00" * 23),  # one byte short
        ("<f4", [2, 3], b"\x00" * 25),  # one byte long
        ("<f4", [0], b"\x00"),
        ("<i8", [], b"\x00" * 4),  # a 0-d array still holds one element
        ("<f2", [3], b""),
    ],
)
def test_ndarray_data_must_match_dtype_and_shape(dtype, shape, data):
    assert_rejected(request_frame(ext_array(dtype, shape, data)), match="does not match")


@pytest.mark.parametrize("dtype", ["|O8", "|O", "<c8", "<c16", "<f16", "<U4", "|S4", "<M8[ns]",
                                   "f4", "float32", ""])
def test_ndarray_unsupported_dtype(dtype):
    assert_rejected(request_frame(ext_array(dtype, [1], b"\x00" * 4)), match="unsupported")


@pytest.mark.parametrize(
    "shape",
    [[-1], [2, -3], [-1, -1], [1.0], [True], ["2"], 3, None, [[2]], [1] * 33],
)
def test_ndarray_bad_shape(shape):
    # [-1, -1] has a "size" of 1 that matches the single data byte: only the sign check stops it.
    assert_rejected(request_frame(ext_array("|u1", shape, b"\x00")))


@pytest.mark.parametrize(
    "shape, dtype",
    [([0, 2**40, 2**40], "<f4"), ([0, 2**63], "|u1"), ([0, 2**62], "<f2"),
     ([0, 2**64 - 1], "<f8")],
)
def test_ndarray_shape_numpy_cannot_hold_is_rejected(shape, dtype):
    # No data is needed for a zero-size array, but numpy still refuses such a shape, so the
    # decoder must not hand it to a worker that will call to_numpy() on it.
    assert_rejected(request_frame(ext_array(dtype, shape, b"")), match="too large")


def test_ndarray_largest_zero_size_shape_numpy_accepts():
    message = decode(request_frame(ext_array("|u1", [0, 2**63 - 1], b"")))
    assert message.inputs.to_numpy().shape == (0, 2**63 - 1)


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb(["<f4", [1]]),  # two parts
        msgpack.packb(["<f4", [1], b"\x00" * 4, "extra"]),
        msgpack.packb({"dtype": "<f4"}),
        msgpack.packb("<f4"),
        msgpack.packb(["<f4", [1], "\x00" * 4]),  # str, not bin, data
        msgpack.packb([["<f4"], [1], b"\x00" * 4]),  # unhashable dtype
        msgpack.packb([4, [1], b"\x00" * 4]),
        msgpack.packb(["<f4", [1], b"\x00" * 4]) + b"\x00",  # trailing bytes
        msgpack.packb(["<f4", [1], b"\x00" * 4])[:-1],  # truncated
        b"\xc1",  # a byte msgpack never uses
        b"",
        msgpack.packb(["x" * 65, [1], b"\x00"]),  # dtype string beyond the ext's own limit
    ],
)
def test_malformed_ndarray_extension_payload(payload):
    assert_rejected(request_frame(msgpack.ExtType(1, payload)))


@pytest.mark.parametrize(
    "parts",
    [["<f4", [1]], ["<f4", [1], b"\x00" * 4, "extra"], {"dtype": "<f4"}, "<f4", None],
)
def test_ndarray_extension_must_be_three_parts(parts):
    payload = msgpack.packb(parts, use_bin_type=True)
    assert_rejected(request_frame(msgpack.ExtType(1, payload)), match=r"\[dtype, shape, data\]")


@pytest.mark.parametrize("code", [0, 2, 42, 127])
def test_unknown_ext_code(code):
    payload = msgpack.packb(["<f4", [1], b"\x00" * 4], use_bin_type=True)
    assert_rejected(request_frame(msgpack.ExtType(code, payload)), match="extension type")


def test_ext_in_a_typed_field_is_rejected():
    nd = ext_array("<i8", [], b"\x00" * 8)
    assert_rejected(frame(PROTOCOL_VERSION, int(MessageType.CANCEL), nd), match="wrong type")


def test_frame_over_max_frame_bytes(monkeypatch):
    monkeypatch.setattr(protocol.codec, "MAX_FRAME_BYTES", 64)
    fits = encode(Disconnect("x" * (64 - 5)))
    assert len(fits) == 64
    assert decode(fits) == Disconnect("x" * (64 - 5))
    too_big = encode(Disconnect("x" * (64 - 4)))
    assert len(too_big) == 65
    assert_rejected(too_big, match="exceeds")


def test_string_over_max_str_bytes(monkeypatch):
    monkeypatch.setattr(protocol.codec, "MAX_STR_BYTES", 16)
    assert decode(encode(Disconnect("y" * 16))) == Disconnect("y" * 16)
    assert_rejected(encode(Disconnect("y" * 17)))


def test_container_over_max_container_len(monkeypatch):
    monkeypatch.setattr(protocol.codec, "MAX_CONTAINER_LEN", 10)
    assert decode(request_frame(list(range(10)))).inputs == list(range(10))
    assert_rejected(request_frame(list(range(11))))
    assert_rejected(request_frame({str(i): i for i in range(11)}))


@pytest.mark.parametrize(
    "raw",
    [
        b"\x91" * 100_000,  # arrays in arrays, never closed
        b"\x81\xa1k" * 50_000,  # maps in maps
        b"\x97\x01\x02\x01" + b"\x91" * 100_000 + b"\xc0\x80\x00\x00",  # deep inputs of a Request
        b"\x93\x01\x05" + b"\xdd\xff\xff\xff\xff" * 1000,  # array32 headers claiming 4G items
        b"\xdd\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB with no bytes behind it
        b"\xc6\xff\xff\xff\xff",  # bin32 likewise
        b"\xc9\xff\xff\xff\xff\x01",  # ext32 likewise
    ],
    ids=["deep-arrays", "deep-maps", "deep-inputs", "huge-array-headers", "array32",
         "str32", "bin32", "ext32"],
)
def test_deeply_nested_or_lying_garbage(raw):
    assert_rejected(raw)


def _deep(leaf, depth: int):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(
    "raw, where",
    [
        (request_frame(inputs=msgpack.Timestamp(1, 0)), "Request.inputs"),
        (request_frame(inputs=["a", {"b": [msgpack.Timestamp(1, 5)]}]), "Request.inputs"),
        (request_frame(inputs="a", parameters={"t": msgpack.Timestamp(2**40, 0)}),
         "Request.parameters"),
        (request_frame(inputs=_deep(msgpack.Timestamp(1, 0), 900)), "Request.inputs"),
        (frame(PROTOCOL_VERSION, int(MessageType.RESULT), 1,
               [{"score": 0.5, "when": msgpack.Timestamp(1, 0)}], 1, 0.0, 1.0),
         "Result.output"),
    ],
    ids=["bare", "nested", "in-parameters", "900-deep", "in-a-result"],
)
def test_a_timestamp_anywhere_in_a_frame_is_rejected(raw, where):
    # msgpack decodes extension -1 itself, past the extension hook: the codec must look.
    assert_rejected(raw, match=rf"{where} holds a msgpack timestamp")


def test_a_clients_msgpack_timestamp_gets_a_message_that_says_what_to_send():
    from protocol.codec import decode_client

    body = msgpack.packb({"inputs": "a [MASK]", "parameters": {"t": msgpack.Timestamp(1, 0)}})
    with pytest.raises(ValueError, match="extension type .*send strings, numbers"):
        decode_client(body, 1 << 20)
    with pytest.raises(ValueError, match="extension type"):
        decode_client(msgpack.packb({"inputs": msgpack.ExtType(5, b"xyz")}), 1 << 20)


def test_a_clients_msgpack_map_keys_must_be_strings_at_any_depth():
    """msgpack's strict_map_key lets bin keys through; a bytes key among str ones was a 500
    in the routes' own checks."""
    from protocol.codec import decode_client

    for body in ({"inputs": "a [MASK]", "parameters": {b"top_k": 2}},
                 {b"a": 1, "inputs": "x"},
                 {"inputs": [{"text": "a", "deeper": [{b"k" * 100: 1}]}]}):
        with pytest.raises(ValueError, match=r"map key b'k*[a-z_]*' is bin, not str"):
            decode_client(msgpack.packb(body, use_bin_type=True), 1 << 20)
    good = {"inputs": ["a [MASK]", {"text": "b"}], "parameters": {"top_k": 2, "x": [b"bin"]}}
    assert decode_client(msgpack.packb(good, use_bin_type=True), 1 << 20) == good
    assert decode_client(msgpack.packb("just text"), 1 << 20) == "just text"


def test_a_request_nests_at_most_max_nesting_levels_and_one_deeper_is_answerable():
    """Pipelines take flat arguments; a client's 500 levels had exhausted the worker's
    recursion limit. Refused past MAX_NESTING (the gateway says so with a 400 first), with
    the request's id, so that a worker can still answer it instead of holding its slot."""
    from protocol.codec import Unreadable
    from protocol.messages import MAX_NESTING, nesting

    inputs = "leaf"
    for _ in range(MAX_NESTING):
        inputs = [inputs]
    assert nesting(inputs) == MAX_NESTING
    assert roundtrip(Request(1, inputs, {}, 1.0, 0.0)).inputs == inputs
    parameters = {"a": inputs}
    for deep_inputs, deep_parameters in (([inputs], {}), ("text", parameters)):
        with pytest.raises(Unreadable, match=f"nest more than {MAX_NESTING} levels") as info:
            decode(encode(Request(7, deep_inputs, deep_parameters, 1.0, 0.0)))
        assert (info.value.name, info.value.request_id) == ("Request", 7)
    # Measured without recursion, however deep.
    deep = 0
    for _ in range(100_000):
        deep = {"k": [deep]}
    assert nesting(deep) == 200_000


@pytest.mark.parametrize(
    "raw",
    [
        b"\x93\x01\x07\xa1\xff",  # Disconnect("\xff")
        b"\x93\x01\x07\xa2\xc3\x28",  # invalid 2-byte sequence
        b"\x93\x01\x07\xa3\xed\xa0\x80",  # UTF-16 surrogate encoded as UTF-8
        b"\x97\x01\x02\x01\xc0\x81\xa1\xfe\x01\xcb" + b"\x00" * 8 + b"\x00",  # bad map key
    ],
)
def test_invalid_utf8_in_str(raw):
    assert_rejected(raw)


@pytest.mark.parametrize("key", [1, -1, None, 1.5, True])
def test_non_str_map_keys_in_parameters(key):
    # msgpack can carry such keys; the decoder must not let them through.
    raw = frame(PROTOCOL_VERSION, int(MessageType.REQUEST), 1, None, {key: 1}, 1.0, 0.0)
    assert_rejected(raw)


def test_non_str_map_keys_anywhere():
    assert_rejected(request_frame([{1: "x"}]))


def test_truncated_and_padded_frames():
    raw = encode(Result(1, {"a": [1, 2, 3]}, 1, 0.5, 1.5))
    for cut in range(len(raw)):
        assert_rejected(raw[:cut])
    assert_rejected(raw + b"\x00", match="undecodable")
    assert_rejected(raw + raw, match="undecodable")


# ------------------------------------------------------------------------------- encoding

class Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        frozenset({"a"}),
        Opaque(),
        np.arange(3),  # a bare numpy array must be wrapped in NDArray
        np.float32(1.5),
        1 + 2j,
        object(),
        [1, {"nested": {3}}],
        {"deep": [Opaque()]},
    ],
    ids=["set", "frozenset", "custom", "ndarray", "numpy-scalar", "complex", "object",
         "nested-set", "nested-custom"],
)
def test_encoding_uncarriable_values_raises_type_error(value):
    with pytest.raises(TypeError):
        encode(Result(1, value, 1, 0.0, 0.0))
    with pytest.raises(TypeError):
        encode(Request(1, None, {"p": value}, 1.0, 0.0))


@pytest.mark.parametrize(
    "array",
    [np.zeros(2, dtype=np.complex64), np.array([object(), None], dtype=object),
     np.array(["ab", "c"]), np.zeros(2, dtype="datetime64[ns]")],
    ids=["complex64", "object", "unicode", "datetime64"],
)
def test_encoding_an_array_of_unsupported_dtype_raises_type_error(array):
    # The peer would reject the whole frame; fail where the mistake is made instead.
    with pytest.raises(TypeError, match="dtype"):
        encode(Result(1, NDArray.from_array(array), 1, 0.0, 0.0))


# --------------------------------------------------------------------------------- errors

#: The table in protocol/errors.py's docstring.
DOCUMENTED_STATUS = {
    "protocol_error": (errors.ProtocolError, 500),
    "bad_input": (errors.BadInput, 400),
    "malformed_request": (errors.MalformedRequest, 400),
    "head_too_large": (errors.HeadTooLarge, 431),
    "unauthorized": (errors.Unauthorized, 401),
    "origin_not_allowed": (errors.OriginNotAllowed, 403),
    "not_found": (errors.NotFound, 404),
    "method_not_allowed": (errors.MethodNotAllowed, 405),
    "body_too_large": (errors.BodyTooLarge, 413),
    "unsupported_media_type": (errors.UnsupportedMediaType, 415),
    "invalid_parameters": (errors.InvalidParameters, 422),
    "input_too_long": (errors.InputTooLong, 422),
    "answer_too_large": (errors.AnswerTooLarge, 422),
    "answers_too_large": (errors.AnswersTooLarge, 422),
    "model_error": (errors.ModelError, 500),
    "worker_crashed": (errors.WorkerCrashed, 500),
    "overloaded": (errors.Overloaded, 503),
    "no_workers": (errors.NoWorkers, 503),
    "draining": (errors.Draining, 503),
    "deadline_exceeded": (errors.DeadlineExceeded, 504),
    "cancelled": (errors.Cancelled, 499),
}


@pytest.mark.parametrize("code", list(DOCUMENTED_STATUS))
def test_error_from_code_rebuilds_each_class(code):
    cls, status = DOCUMENTED_STATUS[code]
    err = errors.error_from_code(code, "what went wrong")
    assert type(err) is cls
    assert err.code == code
    assert err.status == status
    assert err.message == "what went wrong"
    assert str(err) == "what went wrong"
    assert (err.retry_after is not None) == (status == 503)


def test_error_from_code_with_empty_message_uses_the_class_doc():
    err = errors.error_from_code("overloaded", "")
    assert err.message == errors.Overloaded.__doc__.strip()


def test_error_from_code_unknown_code_is_a_plain_500():
    err = errors.error_from_code("flux_capacitor_melted", "boom")
    assert type(err) is errors.BatchwireError
    assert err.code == "flux_capacitor_melted"
    assert err.status == 500
    assert err.message == "boom"
    # The code is set on the instance, not leaked into the class.
    assert errors.BatchwireError.code == "internal_error"
    assert errors.BatchwireError("x").code == "internal_error"


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _error_classes_with_own_code():
    classes = [errors.BatchwireError, *_all_subclasses(errors.BatchwireError)]
    return [c for c in classes if c.__module__ == "protocol.errors" and "code" in vars(c)]


def test_every_error_code_is_unique():
    codes = [c.code for c in _error_classes_with_own_code()]
    assert len(codes) == len(set(codes)), codes


def test_every_error_code_is_rebuildable_and_documented():
    own = {c.code: c for c in _error_classes_with_own_code()}
    own.pop("internal_error")  # BatchwireError itself: what unknown codes become
    assert set(own) == set(DOCUMENTED_STATUS)
    for code, cls in own.items():
        assert type(errors.error_from_code(code, "m")) is cls


def test_error_hierarchy():
    for code, (cls, status) in DOCUMENTED_STATUS.items():
        if issubclass(cls, errors.ClientError):
            assert 400 <= status < 500, code
        else:
            assert issubclass(cls, (errors.ServerError, errors.ProtocolError)), code
    assert issubclass(ProtocolVersionMismatch, ProtocolError)
    assert ProtocolVersionMismatch(2).code == "protocol_error"


def test_trailing_fields_with_defaults_may_be_left_off():
    """A field added at the end with a default keeps older peers' frames decodable."""
    assert decode(msgpack.packb([1, 3, 5, "out", 2, 1.0, 3.0])) == Result(5, "out", 2, 1.0, 3.0)
    assert decode(msgpack.packb([1, 2, 5, "in", {}, 9.0, 0.0])).embed is False
    assert decode(msgpack.packb([1, 7])) == Disconnect("")
    ready = decode(msgpack.packb([1, 1, "w", 1, "m", "t", "cpu", 2, 1]))
    assert (ready.host, ready.pooling, ready.prompts) == ("", "", ())
    # ...but never a field without a default.
    with pytest.raises(ProtocolError, match="fields, got"):
        decode(msgpack.packb([1, 3, 5, "out", 2, 1.0]))


def test_prompt_names_are_a_list_of_strings_on_the_wire_and_bounded():
    base = [1, 1, "w", 1, "m", "t", "cpu", 2, 1, "", "", 0, "", 0]
    assert decode(msgpack.packb(base + [["q"]])).prompts == ("q",)
    assert_rejected(msgpack.packb(base + [["q", 3]]), "prompts has the wrong type")
    assert_rejected(msgpack.packb(base + ["q"]), "prompts has the wrong type")
    assert_rejected(msgpack.packb(base + [[""]]), "each 1 to")
    assert_rejected(msgpack.packb(base + [["x" * 257]]), "each 1 to")
    assert_rejected(msgpack.packb(base + [[f"p{i}" for i in range(257)]]), "at most 256")
    # Left off at its default: an older gateway decodes the READY it always did.
    assert len(msgpack.unpackb(encode(Ready("w", 1, "m", "t", "cpu", 2, 1)))) == 9


def test_trailing_fields_at_their_defaults_stay_off_the_wire():
    """So an older peer, which knows fewer fields, decodes every message that does not use
    a newer one: a REQUEST without a prompt name is the frame it always was."""
    plain = Request(5, "in", {}, 9.0, 0.0)
    assert msgpack.unpackb(encode(plain)) == [1, 2, 5, "in", {}, 9.0, 0.0]
    embed = Request(5, "in", {}, 9.0, 0.0, embed=True)
    assert msgpack.unpackb(encode(embed)) == [1, 2, 5, "in", {}, 9.0, 0.0, True]
    named = Request(5, "in", {}, 9.0, 0.0, embed=True, prompt_name="query")
    assert msgpack.unpackb(encode(named))[-2:] == [True, "query"]
    # A field before a used one stays, default or not: fields are positional.
    assert msgpack.unpackb(encode(Request(5, "in", {}, 9.0, 0.0, prompt_name="q")))[-2:] == \
        [False, "q"]
    assert msgpack.unpackb(encode(Disconnect())) == [1, 7]
    assert msgpack.unpackb(encode(Result(5, "out", 2, 1.0, 3.0, 0, 0, 0, 0.0))) == \
        [1, 3, 5, "out", 2, 1.0, 3.0]
    # A value equal to the default but of another type is sent: it decodes as sent.
    assert len(msgpack.unpackb(encode(Result(5, "out", 2, 1.0, 3.0, padding_ratio=0)))) == 11
    for message in (plain, embed, named, Disconnect(), Disconnect("bye")):
        assert decode(encode(message)) == message


def test_freeze_startup_objects_takes_them_out_of_the_collectors_reach():
    import gc

    from protocol.heap import freeze_startup_objects

    survivor = [object() for _ in range(100)]
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > len(survivor)
        assert not any(o is survivor for o in gc.get_objects()), "frozen objects are still tracked"
    finally:
        gc.unfreeze()


def test_an_answer_past_the_frame_limit_is_an_error_to_send_not_a_frame():
    """The gateway drops a frame over MAX_FRAME_BYTES unread: the request would wait for its
    deadline, and the worker's slot for it would never come back. The worker sends the
    error instead."""
    from worker.batcher import BatchStats, WorkItem
    from worker.service import result_frame

    item = WorkItem(7, "x", {}, b"", 0.0, 1.0)
    stats = BatchStats(batch_size=2, queue_ms=0.5, inference_ms=3.0, batch_id=4, tokens=9)
    fits = NDArray.from_array(np.zeros(4, np.float32))
    assert decode(result_frame(item, fits, stats)) == Result(7, fits, 2, 0.5, 3.0, 4, 9)
    too_large = NDArray.from_array(np.zeros(protocol.MAX_FRAME_BYTES // 4, np.float32))
    with pytest.raises(errors.AnswerTooLarge, match="the answer to this input is 64.0 MiB, "
                       "more than the 64 MiB a worker sends in one message"):
        result_frame(item, too_large, stats)
    assert errors.AnswerTooLarge.status == 422


def test_a_version_that_is_not_a_number_is_called_what_it_is():
    """ "peer speaks protocol version '1', this side speaks 1" read as a contradiction."""
    error = assert_rejected(msgpack.packb([str(PROTOCOL_VERSION), 6], use_bin_type=True))
    assert f"peer sent '{PROTOCOL_VERSION}' (str) where a protocol version" in str(error)
    error = assert_rejected(msgpack.packb([PROTOCOL_VERSION + 1, 6], use_bin_type=True))
    assert f"speaks protocol version {PROTOCOL_VERSION + 1}, this side" in str(error)


def test_throttled_by_writes_each_keys_line_once_per_interval(caplog):
    import logging

    from protocol.logs import ThrottledBy

    logger = logging.getLogger("batchwire.test.throttled-by")
    throttled = ThrottledBy(logger, logging.WARNING, every_s=3600.0, max_keys=2)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for key in ("a", "b", "a", "b", "a"):
            throttled(key, "line for %s", key)
        assert [r.getMessage() for r in caplog.records] == ["line for a", "line for b"]
        throttled.forget()
        throttled("a", "line for %s", "a")
        throttled("b", "line for %s", "b")
        throttled("c", "line for %s", "c")  # a third key: the memory of two starts afresh
        throttled("a", "line for %s", "a")
    assert [r.getMessage() for r in caplog.records][2:] == [
        "line for a", "line for b", "line for c", "line for a"]
