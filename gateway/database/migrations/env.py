"""Alembic's entry point: migrations run on the connection ``gateway.database.migrate`` hands over."""

from __future__ import annotations

from alembic import context

from gateway.database.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
