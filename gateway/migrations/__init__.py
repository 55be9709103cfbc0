"""Alembic migrations of the PostgreSQL job table, run to ``head`` whenever a gateway opens it."""
