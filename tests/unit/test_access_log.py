"""The access logger formats a line only when its logger would emit it."""

from __future__ import annotations

import logging

from gateway.app import AccessLogger


def test_access_log_is_off_above_info_and_on_at_info():
    logger = logging.getLogger("batchwire.access.test")
    access = AccessLogger(logger, "")
    logger.setLevel(logging.WARNING)
    assert access.enabled is False  # aiohttp then never calls log(): no line is built
    logger.setLevel(logging.INFO)
    assert access.enabled is True
