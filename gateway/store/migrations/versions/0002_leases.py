"""Leases: which gateway runs a job (or sends a webhook), and until when, so that several share the table.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

RUNNING_ONLY = sa.text("status = 'InProgress'")


def upgrade() -> None:
    for table in ("jobs", "webhook_outbox"):
        op.add_column(table, sa.Column("claimed_by", sa.Text))
        op.add_column(table, sa.Column("lease_until", sa.Double))
    op.create_index("jobs_lease", "jobs", ["lease_until"], postgresql_where=RUNNING_ONLY, sqlite_where=RUNNING_ONLY)


def downgrade() -> None:
    op.drop_index("jobs_lease", "jobs")
    for table in ("jobs", "webhook_outbox"):
        op.drop_column(table, "lease_until")
        op.drop_column(table, "claimed_by")
