"""Leases: which gateway runs a job (or sends a webhook), and until when, so that several share the table.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    for table in ("jobs", "webhook_outbox"):
        op.execute(f"ALTER TABLE {table} ADD COLUMN claimed_by TEXT, ADD COLUMN lease_until DOUBLE PRECISION")
    op.execute("CREATE INDEX jobs_lease ON jobs (lease_until) WHERE status = 'InProgress'")


def downgrade() -> None:
    op.execute("DROP INDEX jobs_lease")
    for table in ("jobs", "webhook_outbox"):
        op.execute(f"ALTER TABLE {table} DROP COLUMN claimed_by, DROP COLUMN lease_until")
