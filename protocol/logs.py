"""Logging set-up shared by gateway and worker: text for people, JSON lines for machines."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    """A --log-level: one of LOG_LEVELS, in any case. (A type, not choices: argparse checks
    choices on the command line only, and the flag's env var is its default.)"""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return level


def add_logging_flags(flags) -> None:
    """--log-level and --log-format, the same for every batchwire process."""
    flags.add("--log-level", default="INFO", type=log_level, help="logging level")
    flags.add("--log-format", default="text", choices=LOG_FORMATS,
              help="text for people, json for log pipelines (one object per line)")


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str):
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": self.process_name,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Structured fields passed with extra={"fields": {...}} (the access log does).
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class Throttled:
    """A log line a peer can set off at any rate, written once per ``every_s`` at most, with
    how many came since the last: a peer sending garbage shows in the log, and cannot fill
    it (nor spend the process's time on writing it)."""

    def __init__(self, logger: logging.Logger, level: int, every_s: float = 60.0):
        self.logger = logger
        self.level = level
        self.every_s = every_s
        self._unlogged = 0
        self._logged_at = float("-inf")

    def __call__(self, message: str, *args) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < self.every_s:
            return
        more = self._unlogged - 1
        self.logger.log(self.level, message + (
            f" (and {more} more such since the last, one line per {self.every_s:g} s at most)"
            if more else ""),
            *args)
        self._logged_at = now
        self._unlogged = 0


class ThrottledBy:
    """A :class:`Throttled` line for each key (a cause, a peer's public key): each key's line
    once per ``every_s`` at most. Keys are remembered up to ``max_keys``; past it the memory
    starts afresh, so a stream of new keys costs lines, not memory."""

    def __init__(self, logger: logging.Logger, level: int, every_s: float = 60.0,
                 max_keys: int = 1024):
        self.logger = logger
        self.level = level
        self.every_s = every_s
        self.max_keys = max_keys
        self._by_key: dict[object, Throttled] = {}

    def __call__(self, key: object, message: str, *args) -> None:
        throttled = self._by_key.get(key)
        if throttled is None:
            if len(self._by_key) >= self.max_keys:
                self._by_key.clear()
            throttled = self._by_key[key] = Throttled(self.logger, self.level, self.every_s)
        throttled(message, *args)

    def forget(self) -> None:
        """Start afresh: the next line of every key is written."""
        self._by_key.clear()


def setup_logging(level: str, process_name: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process_name))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s [{process_name}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
