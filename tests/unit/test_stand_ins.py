"""The rule every pipeline stand-in follows (worker/stand_ins.py), on a plain object."""

from __future__ import annotations

import logging
import operator

from worker.stand_ins import swap_in


class Pipe:
    def postprocess(self, x):
        return x * 2


def _checks(pipe):
    return lambda installed: [pipe.postprocess(x) for x in (1, 2, 3)]


def test_a_stand_in_that_answers_alike_stays():
    pipe = Pipe()
    fast = lambda x: x + x  # noqa: E731
    assert swap_in(pipe, "postprocess", fast, _checks(pipe), operator.eq, "stock")
    assert pipe.postprocess is fast


def test_a_stand_in_that_answers_otherwise_is_taken_out(caplog):
    pipe = Pipe()
    caplog.set_level(logging.WARNING, logger="batchwire.worker.stand_ins")
    assert not swap_in(pipe, "postprocess", lambda x: x * 3, _checks(pipe), operator.eq,
                       "doubled the stock way")
    assert "postprocess" not in pipe.__dict__ and pipe.postprocess(4) == 8
    assert "doubled the stock way" in caplog.text and "changed the outputs" in caplog.text


def test_a_stand_in_that_raises_is_taken_out(caplog):
    pipe = Pipe()
    caplog.set_level(logging.WARNING, logger="batchwire.worker.stand_ins")

    def broken(x):
        raise RuntimeError("no such tensor")
    assert not swap_in(pipe, "postprocess", broken, _checks(pipe), operator.eq, "stock")
    assert "postprocess" not in pipe.__dict__ and pipe.postprocess(4) == 8
    assert "RuntimeError: no such tensor" in caplog.text


def test_the_checks_are_told_whether_the_stand_in_is_in_place():
    pipe, seen = Pipe(), []

    def checks(installed):
        seen.append((installed, "postprocess" in pipe.__dict__))
        return pipe.postprocess(1)
    assert swap_in(pipe, "postprocess", lambda x: 2 * x, checks, operator.eq, "stock")
    assert seen == [(False, False), (True, True)]
