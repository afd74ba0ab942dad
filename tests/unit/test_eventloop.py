"""protocol.eventloop: which loop a process runs on, and refusing a wrong choice."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

from gateway import config as gateway_config
from protocol import eventloop
from worker import config as worker_config


async def _which() -> str:
    await asyncio.sleep(0)
    return eventloop.loop_name()


@pytest.mark.parametrize("choice, expected", [("auto", "uvloop"), ("uvloop", "uvloop"),
                                              ("asyncio", "asyncio")])
def test_run_uses_the_chosen_loop(choice, expected):
    # uvloop is a dependency on Linux, so auto picks it here.
    assert eventloop.run(_which(), choice) == expected


def test_a_wrong_choice_is_refused_and_the_coroutine_closed():
    coro = _which()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... was never awaited"
        with pytest.raises(ValueError, match="auto, uvloop, asyncio"):
            eventloop.run(coro, "tokio")
        gc.collect()
    assert coro.cr_frame is None  # closed, not left pending


def test_uvloop_required_but_missing_says_how_to_fix(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert eventloop.uvloop_module("auto") is None
    with pytest.raises(RuntimeError, match="pip install uvloop"):
        eventloop.uvloop_module("uvloop")


def test_both_processes_take_the_flag_and_its_env_var():
    _, serve = gateway_config.parse(["serve"], environ={"BATCHWIRE_EVENT_LOOP": "asyncio"})
    assert serve.gateway.event_loop == "asyncio"
    _, gw = gateway_config.parse(["gateway", "--event-loop", "uvloop"], environ={})
    assert gw.event_loop == "uvloop"
    worker = worker_config.parse(["--connect", "ipc:///tmp/x"], environ={})
    assert worker.event_loop == "auto"
    with pytest.raises(SystemExit):
        worker_config.parse(["--connect", "ipc:///tmp/x", "--event-loop", "tokio"], environ={})
