"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from gateway.database import migrate
from gateway.database.connect import engine_for


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated system of record on each backend (``database_url``: SQLite and PostgreSQL)."""
    engine = engine_for(database_url)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()
