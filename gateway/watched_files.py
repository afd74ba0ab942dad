"""Files the gateway reads again when they change: the TLS certificate and key
(gateway/tls.py) and the API keys file (gateway/api_keys.py).

Renewals replace such files in place (certbot and cert-manager write new ones; a Kubernetes
Secret mounted as a volume swaps a symlink), so a check every :data:`CHECK_S` of each file's
inode, modification time and size finds them, with no restart and no signal to send.
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable

#: How often watched files are checked for a change.
CHECK_S = 30.0


class WatchedFiles:
    """Tells whether any of some files was replaced or rewritten since it was last asked."""

    def __init__(self, *paths: str):
        self.paths = paths
        self._seen = self._stamp()

    def _stamp(self) -> tuple:
        stamps = []
        for path in self.paths:
            try:
                info = os.stat(path)  # through a symlink: a swapped Secret changes its target
            except OSError:
                stamps.append(None)
            else:
                stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def changed(self) -> bool:
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        return True


async def every(interval_s: float, check: Callable[[], object]) -> None:
    """Call ``check`` every ``interval_s`` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        check()
