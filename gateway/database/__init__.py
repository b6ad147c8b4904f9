"""The system of record: what the gateway knows about every study, series analysis, job, delivery,
notification, model and event, in one relational database - embedded SQLite by default, PostgreSQL when several
gateways share the work. The spool stays the source of truth for images; the database indexes it and records
everything that happened to them.

    schema.py      the tables (SQLAlchemy Core), the one definition the migrations are checked against
    states.py      the study state machine: states and the transitions allowed between them
    connect.py     the engine for a URL (SQLite: WAL, full sync, foreign keys; PostgreSQL: psycopg)
    migrate.py     Alembic migrations, run at start-up and by ``gateway db upgrade``
    recorder.py    one writer thread that records what the flow reports, batched, never on the caller's thread
    writes.py      what the writer does in its transactions: the state machine applied to what it is told
    jobs.py        what routing reports (a complete study, the series queued from it)
    queries.py     the questions people ask: studies by state / priority / PACS / time, a study's timeline
"""
