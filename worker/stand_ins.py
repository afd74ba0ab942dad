"""A faster stand-in for one of a pipeline's methods, kept only if it answers alike.

The worker's stand-ins (batched fill-mask answers, the batch encoder, batched mask scoring)
share one rule. The stand-in goes in the pipeline instance's slot, where it shadows the
class's method, so deleting it brings the stock method back. Fixed check calls run with
the stock method and then with the stand-in. An exception, or outputs that differ, take
it out again, and the warning says what the worker does instead. A stand-in that answers
differently never serves a request.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("batchwire.worker.stand_ins")


def swap_in(pipe: Any, slot: str, stand_in: Any, run_checks: Callable[[bool], Any],
            same: Callable[[Any, Any], bool], instead: str) -> bool:
    """Put ``stand_in`` in ``pipe.<slot>`` if ``run_checks`` gives the same outputs with it
    (``run_checks(True)``, called once it is in place) as without (``run_checks(False)``).
    ``instead``: what the worker does when it is refused, for the warning."""
    try:
        stock = run_checks(False)
        setattr(pipe, slot, stand_in)
        fast = run_checks(True)
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the stock method
        pipe.__dict__.pop(slot, None)
        log.warning("%s: the stand-in for %s failed its check (%s: %s)", instead, slot,
                    type(exc).__name__, exc)
        return False
    if not same(stock, fast):
        pipe.__dict__.pop(slot, None)
        log.warning("%s: the stand-in for %s changed the outputs of the check calls",
                    instead, slot)
        return False
    return True
