"""Per-owner index by state: an owner's queued jobs ahead of one (its queue position) and its running
jobs (fair share), read without visiting the other owners' queued jobs.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_index("jobs_owner_status", "jobs", ["owner", "status", "seq"])


def downgrade() -> None:
    op.drop_index("jobs_owner_status", "jobs")
