"""Alembic migrations of the job table, SQLite and PostgreSQL alike, run to ``head`` whenever a gateway opens it."""
