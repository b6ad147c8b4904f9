"""The system of record's schema on both backends: the migrations build exactly what schema.py declares, run
twice without harm, and the SQLite file is in WAL mode with full sync."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from gateway.core.errors import ConfigError
from gateway.database import migrate, schema
from gateway.database.connect import engine_for, shown


def test_migrations_build_the_declared_schema_and_are_idempotent(database_url: str) -> None:
    engine = engine_for(database_url)
    try:
        assert migrate.current(engine) is None
        before, after = migrate.upgrade(engine)
        assert (before, after) == (None, migrate.head())
        assert set(inspect(engine).get_table_names()) >= set(schema.metadata.tables)
        assert migrate.differences(engine) == []
        assert migrate.upgrade(engine) == (migrate.head(), migrate.head())  # a second run changes nothing
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    engine = engine_for(f"sqlite:///{tmp_path}/g.db")
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://x@127.0.0.1/db", "only sqlite:/// and postgresql://"),
        ("sqlite://", "must be a file"),
        ("postgresql+psycopg2://u@127.0.0.1/db", "use postgresql://"),
        ("not a url", "not a database URL"),
    ],
)
def test_unusable_urls_are_refused_with_what_to_write(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        engine_for(url)


def test_a_password_in_the_url_is_never_shown() -> None:
    assert "s3cret" not in shown("postgresql://gw:s3cret@127.0.0.1:5432/gateway")
    assert "***" in shown("postgresql://gw:s3cret@127.0.0.1:5432/gateway")
