"""Batches: several jobs submitted in one call, followed and cancelled together, with one webhook at their end.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"

SEQ = sa.BigInteger().with_variant(sa.Integer, "sqlite")  # on SQLite the rowid


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("seq", SEQ, sa.Identity(always=True), primary_key=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("errors", sa.Text, nullable=False),
        sa.Column("webhook_url", sa.Text),
        sa.Column("webhook_state", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double),
        sa.UniqueConstraint("owner", "idempotency_key"),
        sqlite_autoincrement=True,
    )
    op.add_column("jobs", sa.Column("batch_id", sa.Text))
    op.add_column("jobs", sa.Column("batch_index", sa.Integer))
    op.create_index("jobs_batch", "jobs", ["batch_id", "batch_index"])


def downgrade() -> None:
    op.drop_index("jobs_batch", "jobs")
    op.drop_column("jobs", "batch_index")
    op.drop_column("jobs", "batch_id")
    op.drop_table("batches")
