"""The job table: what the gateway reads and changes, in SQLite (the embedded default, one gateway) or
PostgreSQL (several gateways sharing one table), through one :class:`JobStore`.

- :mod:`gateway.store.records` — states, :class:`Job`, :class:`Delivery`, ids;
- :mod:`gateway.store.schema` — the tables (SQLAlchemy metadata), made by the Alembic revisions of
  :mod:`gateway.store.migrations` on both databases;
- :mod:`gateway.store.dialects` — what differs between the two databases;
- :mod:`gateway.store.queue` — which queued job is claimed next (``fair`` across API keys, or ``fifo``);
- :mod:`gateway.store.store` — :class:`JobStore`, every statement written once.

Every state change is committed before the method that made it returns, so what a client was told
survives a crash of the gateway. Transitions are guarded by the state they start from
(``UPDATE … WHERE status = 'InProgress'``): a job cancelled while its worker is still talking to Triton
stays ``Cancelled`` whatever the worker reports afterwards.

States: ``InQueue`` → ``InProgress`` → ``Succeed`` | ``Failed`` | ``Cancelled``; ``InProgress`` goes
back to ``InQueue`` when Triton went away, or when the gateway running it stopped renewing its lease,
and the job has attempts left.

Leases: claiming a job writes the claiming store's ``claimant`` id and ``lease_until`` into its row. The
worker renews the leases of its running jobs every third of a lease; any gateway re-queues ``InProgress``
jobs whose lease ran out (their gateway died). A worker's own updates of a running job (progress, its
ending) are guarded by its claimant id too, so a gateway that lost its lease cannot end a job another
gateway has taken over.

``batches`` holds jobs submitted in one call: each job row names its batch and its place in it; the
batch row keeps the refused items' reasons and is marked ended by the last of its jobs to end.

Beside the jobs, ``webhook_outbox`` holds each finished job's webhook until it is delivered or given up
(``pending`` → ``delivered`` | ``failed``), with its attempt count and next attempt time; a delivery being
sent is leased to its gateway the same way.
"""

from __future__ import annotations

from pathlib import Path

from gateway.store.dialects import sqlite_url
from gateway.store.queue import QUEUE_POLICIES, QueuePolicy
from gateway.store.records import (
    CANCELLED,
    FAILED,
    FINISHED,
    IN_PROGRESS,
    IN_QUEUE,
    LEASE_EXPIRED,
    STATES,
    SUCCEED,
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    Batch,
    BatchItem,
    Delivery,
    Job,
    QuotaExceeded,
    StoreUnavailable,
    new_claimant,
    new_job_id,
)
from gateway.store.store import JobStore

__all__ = [
    "CANCELLED",
    "FAILED",
    "FINISHED",
    "IN_PROGRESS",
    "IN_QUEUE",
    "LEASE_EXPIRED",
    "QUEUE_POLICIES",
    "STATES",
    "SUCCEED",
    "WEBHOOK_DELIVERED",
    "WEBHOOK_FAILED",
    "WEBHOOK_PENDING",
    "Batch",
    "BatchItem",
    "Delivery",
    "Job",
    "JobStore",
    "QueuePolicy",
    "QuotaExceeded",
    "StoreUnavailable",
    "new_claimant",
    "new_job_id",
    "open_store",
    "sqlite_url",
]


def open_store(
    database_url: str,
    sqlite_path: Path,
    lease_s: float,
    queue_policy: QueuePolicy,
    position_ttl_s: float,
    pool_size: int,
) -> JobStore:
    """The job table at ``database_url`` (PostgreSQL), else SQLite at ``sqlite_path``."""
    return JobStore(
        database_url or sqlite_url(sqlite_path),
        lease_s=lease_s,
        queue_policy=queue_policy,
        position_ttl_s=position_ttl_s,
        pool_size=pool_size,
    )
