"""The worker public keys the gateway admits under ``--curve-authorized-keys DIR``.

The directory is read again when it changes (gateway/watched_files.py: every 30 s, and on
SIGHUP), as the TLS and API key files are: a worker host is added by copying its ``.key``
file in, with no restart, and one taken out by removing its file. Before, the keys were read
once at start, so adding a worker meant restarting the gateway and dropping its traffic.

A removed key is revoked, not only refused at the next handshake: ZeroMQ checks a key once,
when the connection is made, so the worker it admitted would have stayed in dispatch for as
long as its connection lasted. The broker takes such a worker out (``on_revoked``) and drops
what it sends from then on.

Each refusal is logged with the worker's public key and address, at most once a minute for
each key: the refused worker tries again every few seconds (worker/gateway_handshakes.py).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import zmq.auth.asyncio

from gateway.watched_files import CHECK_S, WatchedFiles, every, unreadable
from protocol import curve
from protocol.logs import ThrottledBy

log = logging.getLogger("batchwire.gateway.worker_keys")

#: A refused key is logged once per this many seconds at most.
REFUSAL_LOG_EVERY_S = 60.0
#: Refused keys remembered for the rate limit; the memory starts afresh past it.
MAX_REFUSED_REMEMBERED = 1024


def key_files(directory: str) -> list[str]:
    """The ``*.key`` files in ``directory``, sorted; OSError when it cannot be listed."""
    with os.scandir(directory) as entries:
        return sorted(entry.path for entry in entries if entry.name.endswith(".key"))


def read_keys(directory: str) -> frozenset[bytes]:
    """The public keys of the ``*.key`` files in ``directory``. A directory that is missing
    or cannot be listed is an error, not an empty one: read as empty, a directory moved
    away (or its permissions changed) revoked every worker at the next check."""
    if not os.path.isdir(directory):
        raise OSError(f"{directory} (--curve-authorized-keys) is not a directory")
    keys = set()
    for path in key_files(directory):
        why = unreadable(path)
        if why is not None:
            # A FIFO in its place would hold the event loop on open.
            raise ValueError(f"{path}: {why}")
        keys.add(curve.load_public(path))
    return frozenset(keys)


class Authenticator(zmq.auth.asyncio.AsyncioAuthenticator):
    """pyzmq's ZAP handler, which keeps each request's peer address for the refusal line
    (its key check is given the key alone)."""

    peer_address = "?"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # ZAP request frames (RFC 27): version, request id, domain, address, identity, ...
        self.peer_address = msg[3].decode("ascii", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)


class WorkerKeys:
    """ZAP credentials provider: admits the public keys in a directory, plus ``extra``
    (serve's own workers, which never leave)."""

    def __init__(self, directory: str, extra: set[bytes] = frozenset(),
                 peer_address: Callable[[], str] = lambda: "?"):
        self.directory = directory
        self.extra = frozenset(extra)
        self.peer_address = peer_address
        #: Called with the (z85) keys a reload took out.
        self.on_revoked: Callable[[frozenset[str]], None] = lambda keys: None
        self.files = WatchedFiles(*self._paths())
        self._keys: frozenset[bytes] = read_keys(directory) | self.extra
        self._admitted = frozenset(key.decode("ascii") for key in self._keys)
        self._log_refusal = ThrottledBy(log, logging.ERROR, REFUSAL_LOG_EVERY_S,
                                        MAX_REFUSED_REMEMBERED)

    def _paths(self) -> list[str]:
        # The directory's own stamp changes when a file is added, removed or renamed in
        # (a Kubernetes Secret swaps a symlink inside it); each file's, when it is rewritten.
        try:
            return [self.directory, *key_files(self.directory)]
        except OSError:
            return [self.directory]  # the read that follows says why

    @property
    def count(self) -> int:
        return len(self._keys)

    def admits(self, key: str | None) -> bool:
        """Whether a frame's ZAP User-Id (the sender's z85 public key) is still admitted."""
        return key in self._admitted

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self._keys:
            return True
        self._log_refusal(key, "refused a worker at %s: its CURVE public key %s is not in %s "
                          "(--curve-authorized-keys). To admit it, copy its .key file there; "
                          "the gateway reads the directory again within %g s, or at once on "
                          "SIGHUP", self.peer_address(), key.decode("ascii", "replace"),
                          self.directory, CHECK_S)
        return False

    def reload_if_changed(self) -> bool:
        """Read the directory again if it changed; whether the keys were replaced."""
        self.files.paths = tuple(self._paths())
        if not self.files.changed():
            return False
        try:
            keys = read_keys(self.directory) | self.extra
        except (OSError, ValueError) as exc:
            log.error("cannot read the worker keys in %s (--curve-authorized-keys): %s; "
                      "still admitting the keys read before", self.directory, exc)
            self.files.retry()
            return False
        removed = self._keys - keys
        added = keys - self._keys
        self._keys = keys
        self._admitted = frozenset(key.decode("ascii") for key in keys)
        self._log_refusal.forget()
        log.log(logging.INFO if keys - self.extra else logging.WARNING,
                "worker keys reloaded from %s: %d key(s), %d added, %d removed%s",
                self.directory, len(keys - self.extra), len(added), len(removed),
                "" if keys - self.extra else
                ": it holds none, so no worker is admitted but serve's own, if any")
        if removed:
            self.on_revoked(frozenset(key.decode("ascii") for key in removed))
        return True

    async def watch(self) -> None:
        """Check the directory every :data:`~gateway.watched_files.CHECK_S` until cancelled."""
        await every(CHECK_S, self.reload_if_changed)
