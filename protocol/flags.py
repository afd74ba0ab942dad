"""Flag declarations that read their defaults from ``BATCHWIRE_<FLAG>`` environment variables.

Shared by the gateway's and the worker's CLI (and light: no heavy imports). Each process
builds its one typed config object from the parsed flags; nothing else reads the
environment.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Mapping


#: What a BATCHWIRE_<FLAG> variable of an on/off flag may say.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class Flags:
    """Adds ``--flag`` options whose default comes from ``BATCHWIRE_FLAG`` when set."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None):
        self.parser = parser
        self.environ = os.environ if environ is None else environ
        self.env_names: list[str] = []

    @staticmethod
    def env_name(flag: str) -> str:
        return "BATCHWIRE_" + flag.lstrip("-").replace("-", "_").upper()

    def add(self, flag: str, *, default: Any = None, help: str, **kwargs: Any) -> None:
        env = self.env_name(flag)
        self.env_names.append(env)
        # Empty counts as unset: compose and Kubernetes set every listed variable, often to "".
        if self.environ.get(env, "").strip():
            # argparse applies `type` to string defaults, so env values are parsed and
            # validated exactly like flags.
            default = self.environ[env]
            if kwargs.get("action") == "store_true":
                word = default.strip().lower()
                if word not in TRUE_WORDS + FALSE_WORDS:
                    # "maybe" or "enabled" had quietly meant off.
                    self.parser.error(f"{env}={default!r}: must be one of "
                                      f"{', '.join(TRUE_WORDS)} or {', '.join(FALSE_WORDS)}")
                default = word in TRUE_WORDS
        self.parser.add_argument(flag, default=default, help=f"{help} [env {env}]", **kwargs)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def body_bytes(text: str) -> int:
    """A request body limit: positive, and at most what one message field carries, since an
    input travels to a worker as one (a longer one would be dropped there unanswered)."""
    from protocol.codec import MAX_STR_BYTES

    value = positive_int(text)
    if value > MAX_STR_BYTES:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_STR_BYTES} (16 MiB, the most text one message to a worker "
            f"carries), got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    # inf passed for "no limit" here, and a heartbeat interval of inf sent none.
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number, zero or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number more than zero, got {text}")
    return value


def auto_or_positive_int(text: str) -> int:
    """A count of at least 1, or "auto" (returned as 0: the caller's own default)."""
    if text.strip().lower() == "auto":
        return 0
    try:
        return positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be "auto" or a whole number, got {text!r}') \
            from None


def port_number(text: str) -> int:
    # An event loop may bind 70000 as 70000 % 65536 and log 70000: refuse it here instead.
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535, got {value}")
    return value
