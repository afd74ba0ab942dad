"""The gateway's held-memory budget: bodies and answers in one count, refused the right way."""

from __future__ import annotations

import pytest

from gateway.held_memory import BODY_HOLDS, STRUCTURED_EXPANSION, HeldMemory, answer_size
from protocol.errors import AnswersTooLarge, Overloaded
from protocol.messages import NDArray


def test_bodies_count_twice_and_only_what_was_read_stays_counted():
    memory = HeldMemory(1000)
    claim = memory.claim()
    claim.hold_body(300)  # a chunked body, reserved at its most
    assert memory.held == claim.held == BODY_HOLDS * 300 == 600
    claim.body_read(300, 100)  # it was 100 bytes
    assert memory.held == 200 and claim.answers == 0
    with pytest.raises(Overloaded, match="this body would take it past its 0.0 MiB limit"):
        memory.claim().hold_body(401)
    assert memory.held == 200, "a refused body is not counted"
    claim.release()
    assert memory.held == claim.held == 0


def test_a_compressed_body_counts_at_its_inflated_size_once_read():
    memory = HeldMemory(1000)
    other, claim = memory.claim(), memory.claim()
    claim.hold_body(10)  # Content-Length of 10 bytes of gzip
    claim.body_read(10, 300)  # inflated to 300
    assert claim.held == memory.held == BODY_HOLDS * 300
    other.hold_body(100)
    crowded = memory.claim()
    crowded.hold_body(10)
    with pytest.raises(Overloaded, match="this body would take it past"):
        crowded.body_read(10, 200)  # 600 + 200 + 400 > 1000
    assert crowded.held == BODY_HOLDS * 10, "what it could not hold is not counted"
    for c in (claim, other, crowded):
        c.release()
    assert memory.held == 0


def test_answers_alone_too_large_are_422_and_crowded_out_503():
    memory = HeldMemory(1000)
    other, claim = memory.claim(), memory.claim()
    other.hold_body(200)  # 400 held for someone else
    claim.hold_answer(500)
    assert claim.answers == 500 and memory.held == 900
    with pytest.raises(Overloaded, match="--max-held-bytes"):
        claim.hold_answer(200)  # 700 alone would fit; beside the other's 400 it does not
    with pytest.raises(AnswersTooLarge, match="send fewer inputs per request"):
        claim.hold_answer(501)  # 1001 alone: never
    assert claim.held == claim.answers == 500 and memory.held == 900
    other.release()
    claim.hold_answer(200)
    assert memory.held == 700
    claim.release()
    assert memory.held == 0 and claim.answers == 0


def test_structured_answers_count_at_their_decoded_size():
    array = NDArray("<f4", (2,), bytes(8))
    assert answer_size(array, 100) == 100
    assert answer_size([{"score": 0.5}], 100) == STRUCTURED_EXPANSION * 100
