"""Alembic migrations of the system of record, run in code (no alembic.ini): at start-up and by
``gateway db upgrade``. Several gateways starting at once on one PostgreSQL take an advisory lock, so one of
them migrates and the others wait."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from gateway.core.errors import DatabaseError
from gateway.database.schema import metadata

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
PG_MIGRATION_LOCK = 0x6761_7465  # "gate": one advisory lock id for every gateway on the database


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest migration this build knows."""
    revision = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    """The database's migration (None: an empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the database to ``revision``; returns (before, after). Raises ``DatabaseError`` with what to
    check when the database cannot be reached."""
    try:
        return _upgrade(engine, revision)
    except OperationalError as exc:
        reason = str(exc.orig if exc.orig is not None else exc).splitlines()[0]
        raise DatabaseError(
            f"the system of record at {engine.url.render_as_string(hide_password=True)} cannot be "
            f"reached or migrated: {reason}. Check [database] url (empty: SQLite in data_dir) and that the "
            "database server runs."
        ) from None


def _upgrade(engine: Engine, revision: str) -> tuple[str | None, str]:
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": PG_MIGRATION_LOCK})
        before = MigrationContext.configure(connection).get_current_revision()
        command.upgrade(_config(connection), revision)
        after = MigrationContext.configure(connection).get_current_revision()
    if before != after:
        logger.info("database migrated from %s to %s", before or "empty", after)
    return before, str(after)


def differences(engine: Engine) -> list[object]:
    """What the migrated database lacks or has more than ``schema.metadata`` (empty when they agree)."""
    with engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), metadata))
