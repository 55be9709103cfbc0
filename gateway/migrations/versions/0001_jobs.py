"""The job table and the webhook outbox, as the SQLite store has them.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE jobs (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- submission order: the queue's order
            id TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            idempotency_key TEXT,
            status TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            progress DOUBLE PRECISION NOT NULL DEFAULT 0,
            stage TEXT NOT NULL DEFAULT '',
            eta_s DOUBLE PRECISION,
            params TEXT NOT NULL,
            webhook_url TEXT,
            webhook_state TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            result_token TEXT,
            inference_s DOUBLE PRECISION,
            info TEXT,
            created_at DOUBLE PRECISION NOT NULL,  -- wall clock, seconds since the epoch
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            request_hash TEXT,
            UNIQUE (owner, idempotency_key)
        )
    """)
    op.execute("CREATE INDEX jobs_status ON jobs (status, seq)")
    op.execute("""
        CREATE TABLE webhook_outbox (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            job_id TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            url TEXT NOT NULL,
            body TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at DOUBLE PRECISION NOT NULL,
            last_error TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION
        )
    """)
    op.execute("CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_attempt_at)")


def downgrade() -> None:
    op.execute("DROP TABLE webhook_outbox")
    op.execute("DROP TABLE jobs")
