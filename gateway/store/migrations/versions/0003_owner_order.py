"""Per-owner indexes: an owner's job list page by page, and when an owner's last job started (fair share).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_index("jobs_owner", "jobs", ["owner", "created_at", "id"])
    op.create_index("jobs_owner_started", "jobs", ["owner", "started_at"])


def downgrade() -> None:
    op.drop_index("jobs_owner_started", "jobs")
    op.drop_index("jobs_owner", "jobs")
