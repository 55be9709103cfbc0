"""The job table, the batches and the webhook outbox as SQLAlchemy metadata: the schema the newest migration
(:mod:`gateway.store.migrations`) makes, on SQLite and PostgreSQL alike.

Times are wall-clock seconds since the epoch (``float``), so that gateways on several hosts compare them.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

SEQ = BigInteger().with_variant(Integer, "sqlite")
"""A 64-bit row number; on SQLite ``INTEGER PRIMARY KEY``, its rowid."""
RUNNING_ONLY = text("status = 'InProgress'")

jobs = Table(
    "jobs",
    metadata,
    Column("seq", SEQ, Identity(always=True), primary_key=True),  # submission order
    Column("id", Text, nullable=False, unique=True),
    Column("owner", Text, nullable=False),  # id of the API key that submitted it
    Column("idempotency_key", Text),
    Column("status", Text, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("progress", Double, nullable=False, server_default="0"),
    Column("stage", Text, nullable=False, server_default=""),
    Column("eta_s", Double),  # Triton's estimate of the seconds left, while running
    Column("params", Text, nullable=False),  # JSON: the job options
    Column("webhook_url", Text),
    Column("webhook_state", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("result_token", Text),
    Column("inference_s", Double),
    Column("info", Text),  # JSON: the model's INFO of a finished job
    Column("created_at", Double, nullable=False),
    Column("started_at", Double),  # the last claim
    Column("finished_at", Double),
    Column("request_hash", Text),  # fingerprint of the submit (inputs + options), for Idempotency-Key replays
    Column("claimed_by", Text),  # the store (gateway) running it
    Column("lease_until", Double),  # after this, any gateway may re-queue it
    Column("batch_id", Text),  # the batch it was submitted in, if any
    Column("batch_index", Integer),  # its place in that batch's items
    UniqueConstraint("owner", "idempotency_key"),
    Index("jobs_status", "status", "seq"),
    Index("jobs_lease", "lease_until", postgresql_where=RUNNING_ONLY, sqlite_where=RUNNING_ONLY),
    Index("jobs_owner", "owner", "created_at", "id"),  # an owner's list, newest first, page by page
    Index("jobs_owner_started", "owner", "started_at"),  # when an owner's last job started (fair share)
    Index("jobs_owner_status", "owner", "status", "seq"),  # an owner's queued jobs ahead of one, its running ones
    Index("jobs_batch", "batch_id", "batch_index"),
    sqlite_autoincrement=True,  # a deleted row's seq is never handed out again
)

batches = Table(
    "batches",
    metadata,
    Column("seq", SEQ, Identity(always=True), primary_key=True),
    Column("id", Text, nullable=False, unique=True),
    Column("owner", Text, nullable=False),
    Column("idempotency_key", Text),
    Column("request_hash", Text, nullable=False),  # fingerprint of the whole batch, for Idempotency-Key replays
    Column("size", Integer, nullable=False),  # items submitted, the refused ones included
    Column("errors", Text, nullable=False),  # JSON: {item index: why it was refused}
    Column("webhook_url", Text),
    Column("webhook_state", Text),
    Column("created_at", Double, nullable=False),
    Column("finished_at", Double),  # when its last job ended (its webhook is queued then)
    UniqueConstraint("owner", "idempotency_key"),
    sqlite_autoincrement=True,
)

webhook_outbox = Table(
    "webhook_outbox",
    metadata,
    Column("seq", SEQ, Identity(always=True), primary_key=True),
    Column("id", Text, nullable=False, unique=True),  # the webhook-id header: the same for every attempt
    Column("job_id", Text, nullable=False, unique=True),  # one delivery per job (or batch: its id)
    Column("owner", Text, nullable=False),  # deliveries in flight are capped per owner
    Column("url", Text, nullable=False),
    Column("body", Text, nullable=False),  # the JSON sent, exactly as signed
    Column("state", Text, nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Double, nullable=False),  # back-off survives restarts
    Column("last_error", Text, nullable=False, server_default=""),
    Column("created_at", Double, nullable=False),
    Column("finished_at", Double),
    Column("claimed_by", Text),  # the store (gateway) sending it
    Column("lease_until", Double),
    Index("webhook_outbox_due", "state", "next_attempt_at"),
    sqlite_autoincrement=True,
)
