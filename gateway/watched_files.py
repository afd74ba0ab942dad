"""Files the gateway reads again when they change: the TLS certificate and key
(gateway/tls.py) and the API keys file (gateway/api_keys.py).

Renewals replace such files in place (certbot and cert-manager write new ones; a Kubernetes
Secret mounted as a volume swaps a symlink), so a check every :data:`CHECK_S` of each file's
inode, modification time and size finds them, with no restart and no signal to send.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from typing import Callable

log = logging.getLogger("batchwire.gateway.watched_files")

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

    def retry(self) -> None:
        """What was read after the last change did not load: read it again at the next check
        even if nothing changes (a chmod fixes an unreadable file without touching its
        mtime, and was never picked up)."""
        self._seen = None


def unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read as a small regular file, or None. A FIFO or a device in
    its place would block the event loop on open or read: every request, probes included,
    hung behind it."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def check_now(check: Callable[[], object]) -> None:
    """Run one check; a failure of its own is logged, and the next check runs all the same
    (one raised by a key file once ended the 30 s watch for good, silently)."""
    try:
        check()
    except Exception:  # noqa: BLE001 - logged; the files are checked again next time
        log.exception("checking watched files failed")


async def every(interval_s: float, check: Callable[[], object]) -> None:
    """Call ``check`` every ``interval_s`` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        check_now(check)
