"""The database engine for a URL. SQLite (the default, a file in the data folder) runs in WAL mode with full
sync, so a committed write survives a power cut and readers never block the writer; PostgreSQL (psycopg 3) is
chosen by a ``postgresql://`` URL. A password in a URL is never logged (``shown``)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from gateway.core.errors import ConfigError

logger = logging.getLogger(__name__)

SQLITE_BUSY_MS = 30_000  # a reader or a `gateway db upgrade` in another process: wait, do not fail


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{Path(data_dir) / 'gateway.db'}"


def shown(url: str) -> str:
    """The URL with any password masked, for logs and /health."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid database URL>"


def engine_for(url: str) -> Engine:
    """An engine for ``url`` (sqlite:///path or postgresql://user@host:port/db)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database url {shown(url)!r} is not a database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ConfigError("database url: an SQLite database must be a file (sqlite:////path/gateway.db)")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_MS / 1000.0})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() in ("psycopg2", "pg8000", "asyncpg"):
            raise ConfigError(f"database url: use postgresql:// or postgresql+psycopg:// (got {shown(url)})")
        return create_engine(parsed.set(drivername="postgresql+psycopg"), pool_pre_ping=True, pool_size=5)
    raise ConfigError(f"database url: only sqlite:/// and postgresql:// are supported (got {shown(url)})")


def _sqlite_pragmas(connection: sqlite3.Connection, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cursor.close()


def upsert(connection: Connection, table: Table) -> Any:
    """An INSERT that takes ON CONFLICT DO NOTHING / DO UPDATE, in the connection's dialect (same API on both)."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def greatest(connection: Connection) -> Any:
    """The larger of two values in the connection's dialect: SQLite's two-argument max(), PostgreSQL's GREATEST."""
    return func.max if connection.dialect.name == "sqlite" else func.greatest
