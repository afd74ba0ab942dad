"""What a worker does when the gateway refuses it during the ZeroMQ handshake.

A refused worker heard nothing and said nothing: it logged "ready", then sat silent for
good. libzmq does not retry a connection after a refused key or a CURVE mismatch, so even
once the operator had fixed the gateway (its key copied into --curve-authorized-keys) the
worker stayed out until it was restarted. Now it says why it was refused and what to
change, once a minute while it lasts, and connects again every :data:`RETRY_S`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from protocol import handshakes
from protocol.logs import ThrottledBy
from worker.config import WorkerConfig

log = logging.getLogger("batchwire.worker.handshakes")

#: How soon a worker connects again after a refusal libzmq does not retry by itself.
RETRY_S = 5.0


class GatewayHandshakes:
    """Called with each handshake the worker's socket makes (protocol.handshakes.watch)."""

    def __init__(self, config: WorkerConfig, public_key: str | None,
                 reconnect: Callable[[], None]):
        self.config = config
        #: This worker's CURVE public key (z85), None without CURVE.
        self.public_key = public_key
        self.reconnect = reconnect
        self.failures = 0
        self._retry: asyncio.TimerHandle | None = None
        self._log = ThrottledBy(log, logging.ERROR)

    def __call__(self, handshake: handshakes.Handshake) -> None:
        if handshake.ok:
            if self.failures:
                log.info("joined the gateway at %s after %d refused handshake(s)",
                         self.config.connect, self.failures)
                self.failures = 0
            return
        self.failures += 1
        retried = handshake.cause not in handshakes.NOT_RETRIED
        self._log(handshake.cause, "the gateway at %s refused this worker: %s %s",
                  self.config.connect, self.why(handshake),
                  "Trying again." if retried else f"Trying again every {RETRY_S:g} s.")
        if not retried and self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(RETRY_S, self._connect_again)

    def _connect_again(self) -> None:
        self._retry = None
        self.reconnect()

    def cancel(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def why(self, handshake: handshakes.Handshake) -> str:
        config = self.config
        cause = handshake.cause
        if cause == handshakes.REFUSED_KEY:
            if not config.curve_secret_key:
                return (f"it does not admit this worker's CURVE key {self.public_key}, a fresh "
                        "one made at start since no --curve-secret-key was given. Create a key "
                        "pair with `batchwire keygen`, pass its .key_secret file as "
                        "--curve-secret-key, and copy its .key file into the gateway's "
                        "--curve-authorized-keys directory.")
            return (f"it does not admit this worker's CURVE key {self.public_key} "
                    f"({config.curve_secret_key}). Copy the matching .key file into the "
                    "gateway's --curve-authorized-keys directory (it reads it again within "
                    "30 s, or at once on SIGHUP).")
        if cause == handshakes.CURVE_ON_ONE_SIDE:
            if config.curve_server_key:
                return ("it runs without CURVE, and this worker with it (--curve-server-key): "
                        "give both CURVE, or neither.")
            return ("it requires CURVE: pass --curve-server-key with the gateway's public key "
                    "file, and --curve-secret-key with a key pair it authorizes.")
        if cause == handshakes.CUT_SHORT and config.curve_server_key:
            return (f"it hung up during the CURVE handshake: is {config.curve_server_key} "
                    "(--curve-server-key) that gateway's public key?")
        if cause == handshakes.CUT_SHORT:
            return "it hung up during the handshake."
        return (f"ZMTP protocol error {handshake.code:#x} (cause: {cause}): is it a batchwire "
                "gateway?")
