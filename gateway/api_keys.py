"""The bearer keys the gateway accepts: ``--api-key``, and the keys of ``--api-keys-file``.

One key given as a flag can only be rotated by a restart, with every client switched at the
same moment. The file holds any number, one per line, and is read again when it changes
(gateway/watched_files.py): add the new key, move the clients over, remove the old one, with
no restart and no request refused on the way. A file that cannot be read, or that holds a
line that is not a key, stops the gateway at start; when that happens on a reload, it is
logged and the keys before are kept. A file emptied on purpose refuses every key (with a
warning): a key list that fails closed.
"""

from __future__ import annotations

import hmac
import logging

from gateway.watched_files import CHECK_S, WatchedFiles, every, unreadable

log = logging.getLogger("batchwire.gateway.api_keys")


class ApiKeysError(Exception):
    """The keys file cannot be used; the message says where and why."""


def read_keys(path: str) -> list[str]:
    """The keys in ``path``: one per line; blank lines and lines starting with # skipped."""
    why = unreadable(path)
    if why is not None:
        raise ApiKeysError(f"cannot read the API keys file {path!r} (--api-keys-file): {why}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeysError(f"cannot read the API keys file {path!r} (--api-keys-file): "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
    keys = []
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not key.isascii() or not key.isprintable() or " " in key:
            raise ApiKeysError(f"{path}:{number}: not a key: a key is printable ASCII without "
                               "spaces, one per line")
        keys.append(key)
    return keys


class ApiKeys:
    """What ``Authorization`` must say on every route but the probes, when any key is set."""

    def __init__(self, key: str | None = None, keys_file: str | None = None):
        self.key = key
        self.keys_file = keys_file
        self.files = WatchedFiles(keys_file) if keys_file else None
        self._accepted: tuple[bytes, ...] = ()
        self._load()
        if keys_file and not self._accepted:
            raise ApiKeysError(f"the API keys file {keys_file!r} (--api-keys-file) holds no key")

    @property
    def required(self) -> bool:
        return bool(self.key or self.keys_file)

    @property
    def count(self) -> int:
        return len(self._accepted)

    def _load(self) -> None:
        keys = [self.key] if self.key else []
        if self.keys_file:
            keys += read_keys(self.keys_file)
        self._accepted = tuple(f"Bearer {key}".encode() for key in dict.fromkeys(keys))

    def accepts(self, authorization: str) -> bool:
        given = authorization.encode()
        accepted = False
        # Every key compared, each in constant time: the answer's timing tells neither how
        # much of a guess was right nor which key it came near.
        for expected in self._accepted:
            accepted |= hmac.compare_digest(given, expected)
        return accepted

    def reload_if_changed(self) -> bool:
        """Read the keys file again if it changed; whether the keys were replaced."""
        if self.files is None or not self.files.changed():
            return False
        try:
            self._load()
        except ApiKeysError as exc:
            log.error("%s; still accepting the keys read before", exc)
            self.files.retry()
            return False
        if self._accepted:
            log.info("API keys reloaded from %s: %d key(s)", self.keys_file, len(self._accepted))
        else:
            log.warning("the API keys file %s now holds no key: every request but the probes "
                        "is refused with 401", self.keys_file)
        return True

    async def watch(self) -> None:
        """Check the keys file every :data:`~gateway.watched_files.CHECK_S` until cancelled."""
        if self.files is not None:
            await every(CHECK_S, self.reload_if_changed)
