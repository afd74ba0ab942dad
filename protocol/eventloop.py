"""Run a process's main coroutine on uvloop where it is installed, else on asyncio's loop.

Both processes spend much of each request in the event loop: the gateway in aiohttp's
HTTP handling and its ZeroMQ socket, the worker in its socket and the hand-offs to the
inference thread. uvloop does that loop work in C (docs/benchmarks.md, "The gateway's
cost per request"). It is a dependency where it builds (not on Windows); ``--event-loop
asyncio`` runs the same code on the standard loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


class EventLoopUnavailable(RuntimeError):
    """``--event-loop uvloop`` where uvloop is not installed."""


def add_event_loop_flag(flags) -> None:
    """--event-loop, the same for every batchwire process."""
    flags.add("--event-loop", default="auto", choices=EVENT_LOOPS,
              help="auto: uvloop when installed, else asyncio's own loop; uvloop: require it")


def uvloop_module(choice: str) -> Any:
    """uvloop when ``choice`` and the install allow it, else None (asyncio's loop)."""
    if choice not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise EventLoopUnavailable("--event-loop uvloop, but uvloop is not installed: "
                                       "pip install uvloop, or use --event-loop auto") from None
        return None
    return uvloop


def run(coro: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    try:
        uvloop = uvloop_module(choice)
    except BaseException:
        coro.close()  # never awaited: close it so Python does not warn about it
        raise
    if uvloop is None:
        return asyncio.run(coro)
    return uvloop.run(coro)


def loop_name() -> str:
    """What runs the current loop: "uvloop" or "asyncio" (for /info and logs)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
