"""The job table and the webhook outbox.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

SEQ = sa.BigInteger().with_variant(sa.Integer, "sqlite")  # on SQLite the rowid


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("seq", SEQ, sa.Identity(always=True), primary_key=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("progress", sa.Double, nullable=False, server_default="0"),
        sa.Column("stage", sa.Text, nullable=False, server_default=""),
        sa.Column("eta_s", sa.Double),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("webhook_url", sa.Text),
        sa.Column("webhook_state", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("result_token", sa.Text),
        sa.Column("inference_s", sa.Double),
        sa.Column("info", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.Column("request_hash", sa.Text),
        sa.UniqueConstraint("owner", "idempotency_key"),
        sqlite_autoincrement=True,
    )
    op.create_index("jobs_status", "jobs", ["status", "seq"])
    op.create_table(
        "webhook_outbox",
        sa.Column("seq", SEQ, sa.Identity(always=True), primary_key=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("job_id", sa.Text, nullable=False, unique=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double),
        sqlite_autoincrement=True,
    )
    op.create_index("webhook_outbox_due", "webhook_outbox", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("webhook_outbox")
    op.drop_table("jobs")
