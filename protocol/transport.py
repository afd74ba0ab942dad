"""Sending on an asyncio ZeroMQ socket without waiting, with failures raised at the call.

``zmq.asyncio`` sockets never raise from ``send``: even with ``NOBLOCK`` they return a
Future that holds the error (EAGAIN when the peer's pipe is full, EHOSTUNREACH when a
ROUTER_MANDATORY peer is gone). A caller that does not look at that Future never hears of
the failure, and asyncio later logs "Future exception was never retrieved".
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

log = logging.getLogger("batchwire.transport")


def send_now(sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
    """Send ``frames`` as one message now, or raise the :class:`zmq.ZMQError` that stopped it.

    Safe on an asyncio socket: its own send path runs, so its edge-triggered receive
    bookkeeping stays right (a send can consume the event that says a message is waiting).
    """
    future = sock.send_multipart(frames, flags=zmq.NOBLOCK)
    if future.done():
        error = future.exception()
        if error is not None:
            raise error
        return
    # Only when a blocking send is already queued on this socket, which batchwire never
    # does; report its outcome rather than lose it.
    future.add_done_callback(_report_late_failure)


def _report_late_failure(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a queued send failed: %s", future.exception())
