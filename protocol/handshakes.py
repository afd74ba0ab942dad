"""Why a ZeroMQ handshake between a worker and the gateway failed, as both ends see it.

libzmq refuses a peer inside the handshake, before either side reads a frame: a worker
without CURVE meeting a gateway with it, a worker holding another gateway's public key, a
worker key the gateway does not authorize. Nothing in the application hears of it unless
it watches the socket's monitor, so such a worker sat silent for good, and neither log said
why. And after a refusal (a key not authorized, CURVE on one side only) libzmq does not try
that connection again: a worker stayed out even once the gateway was fixed.

:func:`watch` reads the monitor and turns its events into :class:`Handshake` s, which each
side words for its own log (gateway/broker.py, worker/gateway_handshakes.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("batchwire.handshakes")

#: Why a handshake failed.
REFUSED_KEY = "refused_key"  # the gateway's ZAP check refused the worker's public key
CURVE_ON_ONE_SIDE = "curve_on_one_side"  # one side runs CURVE, the other does not
UNDECRYPTABLE = "undecryptable"  # CURVE on both, but not with the gateway's key pair
CUT_SHORT = "cut_short"  # the peer hung up mid-handshake (the client side of UNDECRYPTABLE)
OTHER = "other"  # a ZMTP protocol error: a peer that is not a batchwire ZeroMQ socket

#: Causes after which libzmq gives the connection up; the connecting side must connect again.
NOT_RETRIED = frozenset({REFUSED_KEY, CURVE_ON_ONE_SIDE, OTHER})

_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@dataclass(frozen=True)
class Handshake:
    """One handshake's outcome: ``cause`` is None when it succeeded."""
    cause: str | None
    #: The ZAP status (400) or ZMTP protocol error code libzmq reported; 0 when none.
    code: int = 0
    endpoint: str = ""

    @property
    def ok(self) -> bool:
        return self.cause is None


def classify(event: int, value: int, endpoint: str = "") -> Handshake | None:
    """The handshake a monitor event reports; None for other events."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return Handshake(None, 0, endpoint)
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return Handshake(REFUSED_KEY, value, endpoint)
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return Handshake(CUT_SHORT, value, endpoint)
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        cause = {zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: CURVE_ON_ONE_SIDE,
                 zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: UNDECRYPTABLE}.get(value, OTHER)
        return Handshake(cause, value, endpoint)
    return None


def watch(sock: zmq.asyncio.Socket, on_handshake: Callable[[Handshake], None],
          name: str) -> asyncio.Task:
    """A task calling ``on_handshake`` for each handshake on ``sock`` until cancelled. The
    monitor is attached before this returns: call it before the socket binds or connects,
    and the first handshake is seen too."""
    monitor = sock.get_monitor_socket(_EVENTS)

    async def read() -> None:
        while True:
            try:
                event = parse_monitor_message(await monitor.recv_multipart())
            except (ValueError, KeyError, IndexError):
                continue  # not a monitor message this libzmq version speaks
            handshake = classify(int(event["event"]), int(event["value"]),
                                 event["endpoint"].decode("utf-8", "replace"))
            if handshake is not None:
                try:
                    on_handshake(handshake)
                except Exception:  # noqa: BLE001 - a logging bug must not end the watch
                    log.exception("handling a handshake event failed")

    def close(_task: asyncio.Task) -> None:
        # A callback, not a finally: a task cancelled before it first ran (the bind after it
        # failed) never enters its body, and its monitor socket stayed open.
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket is already closed
        monitor.close(linger=0)

    task = asyncio.create_task(read(), name=name)
    task.add_done_callback(close)
    return task
