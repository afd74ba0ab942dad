"""Fixtures of the unit tests: ``make_batcher`` (see tests/unit/batching_harness.py)."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.unit.batching_harness")

from tests.unit.batching_harness import BatcherFactory


@pytest.fixture
async def make_batcher():
    """Factory: a started Batcher around a Runner; closed and awaited at teardown."""
    factory = BatcherFactory()
    yield factory
    await factory.close_all()
