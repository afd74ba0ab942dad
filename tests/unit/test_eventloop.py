"""protocol.eventloop: which loop a process runs on, and refusing a wrong choice."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from gateway import config as gateway_config
from protocol import eventloop
from worker import config as worker_config

ROOT = Path(__file__).resolve().parents[2]


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
    with pytest.raises(eventloop.EventLoopUnavailable, match="pip install uvloop"):
        eventloop.uvloop_module("uvloop")


def test_both_clis_refuse_a_missing_uvloop_in_one_line(tmp_path):
    # A machine without uvloop: an importable package of that name that fails to import.
    (tmp_path / "uvloop").mkdir()
    (tmp_path / "uvloop" / "__init__.py").write_text("raise ImportError('not here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    gateway = subprocess.run([sys.executable, "-m", "gateway", "gateway", "--event-loop",
                              "uvloop"], env=env, capture_output=True, text=True, timeout=60)
    assert gateway.returncode == 2
    assert gateway.stderr.strip().splitlines() == [
        "batchwire: --event-loop uvloop, but uvloop is not installed: pip install uvloop, "
        "or use --event-loop auto"]
    # The worker says so before loading any model (this model path does not exist).
    worker = subprocess.run([sys.executable, "-m", "worker", "--connect", "ipc:///tmp/none",
                             "--event-loop", "uvloop", "--model", "/nonexistent/model"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert worker.returncode == worker_config.EXIT_CANNOT_LOAD
    assert "pip install uvloop" in worker.stderr and "Traceback" not in worker.stderr
    assert "nonexistent" not in worker.stderr


def test_both_processes_take_the_flag_and_its_env_var():
    _, serve = gateway_config.parse(["serve"], environ={"BATCHWIRE_EVENT_LOOP": "asyncio"})
    assert serve.gateway.event_loop == "asyncio"
    _, gw = gateway_config.parse(["gateway", "--event-loop", "uvloop"], environ={})
    assert gw.event_loop == "uvloop"
    worker = worker_config.parse(["--connect", "ipc:///tmp/x"], environ={})
    assert worker.event_loop == "auto"
    with pytest.raises(SystemExit):
        worker_config.parse(["--connect", "ipc:///tmp/x", "--event-loop", "tokio"], environ={})
