"""The job table's interface: what the gateway reads and changes, whichever database holds it.

Two implementations: :class:`gateway.store_sqlite.SqliteJobStore` (the embedded default, one gateway)
and :class:`gateway.store_postgres.PostgresJobStore` (several gateways sharing one table);
:func:`open_store` picks one from the settings.

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

Beside the jobs, ``webhook_outbox`` holds each finished job's webhook until it is delivered or given up
(``pending`` → ``delivered`` | ``failed``), with its attempt count and next attempt time.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

IN_QUEUE, IN_PROGRESS, SUCCEED, FAILED, CANCELLED = "InQueue", "InProgress", "Succeed", "Failed", "Cancelled"
STATES = (IN_QUEUE, IN_PROGRESS, SUCCEED, FAILED, CANCELLED)
FINISHED = (SUCCEED, FAILED, CANCELLED)
WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED = "pending", "delivered", "failed"
LEASE_EXPIRED = "re-queued: the gateway running the job stopped (its lease ran out)"


class QuotaExceeded(Exception):
    """The owner already has as many queued and running jobs as allowed."""


@dataclass(frozen=True)
class Job:
    seq: int
    id: str
    owner: str
    idempotency_key: str | None
    status: str
    reason: str
    progress: float
    stage: str
    params: dict[str, Any]
    webhook_url: str | None
    webhook_state: str | None
    attempts: int
    result_token: str | None
    inference_s: float | None
    info: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    request_hash: str | None = None
    eta_s: float | None = None
    claimed_by: str | None = None
    lease_until: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        values = {field.name: row[field.name] for field in fields(cls)}
        values["params"] = json.loads(values["params"])
        values["info"] = json.loads(values["info"]) if values["info"] else None
        return cls(**values)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class Delivery:
    """One job's webhook in the outbox."""

    seq: int
    id: str
    job_id: str
    owner: str
    url: str
    body: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str
    created_at: float
    finished_at: float | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Delivery:
        return cls(**{field.name: row[field.name] for field in fields(cls)})


def new_job_id() -> str:
    """128 random bits as hex: ids cannot be guessed, and are safe as file names."""
    return secrets.token_hex(16)


def new_claimant() -> str:
    """This gateway's id in ``claimed_by``: host and process (for people reading the table), then random bits."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class JobStore(Protocol):
    """The job table and the webhook outbox. Implementations are thread-safe."""

    claimant: str
    """This store's id in the ``claimed_by`` of the jobs it claims."""

    def close(self) -> None: ...

    def create(
        self, job_id: str, owner: str, params: dict[str, Any], webhook_url: str | None = None,
        idempotency_key: str | None = None, request_hash: str | None = None, max_active: int | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job; with an ``idempotency_key`` this owner used before, return that job instead.

        Returns ``(job, created)``. With ``max_active``, raises :class:`QuotaExceeded` when the owner
        already has that many queued and running jobs (counted in the same transaction as the insert).
        """

    def active_jobs(self, owner: str) -> int:
        """The owner's queued and running jobs."""

    def find_idempotent(self, owner: str, idempotency_key: str | None) -> Job | None: ...

    def get(self, job_id: str) -> Job | None: ...

    def recent(self, owner: str, limit: int) -> list[Job]:
        """The owner's ``limit`` most recently submitted jobs, newest first."""

    def queue_position(self, job: Job) -> int:
        """1 for the next job to run; 0 when the job is not queued."""

    def claim_next(self) -> Job | None:
        """Move the oldest queued job to ``InProgress`` (one more attempt, leased to this store) and return it;
        no two stores on one table get the same job."""

    def renew_leases(self) -> int:
        """Extend the leases of the jobs this store runs; returns how many."""

    def recover(self, max_attempts: int, now: float | None = None) -> tuple[list[str], list[str]]:
        """``InProgress`` jobs whose lease ran out by ``now`` go back to the queue, or fail once out of attempts.

        Returns the ids ``(requeued, failed)``.
        """

    def set_progress(self, job_id: str, progress: float, stage: str, eta_s: float | None = None) -> None: ...

    def is_running(self, job_id: str) -> bool:
        """Whether the job is still ``InProgress`` under this store's lease (not cancelled, not taken over)."""

    def succeed(self, job_id: str, inference_s: float, info: dict[str, Any]) -> bool:
        """``InProgress`` → ``Succeed`` with a fresh download token; False if the job had left ``InProgress``."""

    def fail(self, job_id: str, reason: str) -> bool: ...

    def requeue(self, job_id: str, reason: str, refund: bool = False) -> bool:
        """``InProgress`` → ``InQueue`` (the job keeps its place: its submission order).

        ``refund``: the attempt does not count (the gateway stopped it on purpose).
        """

    def cancel(self, job_id: str, reason: str) -> bool:
        """A queued or running job → ``Cancelled`` (a running one's worker, in whichever gateway, notices and
        cancels its Triton stream). False if the job had already ended."""

    def set_webhook_state(self, job_id: str, state: str) -> None: ...

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, zero when none)."""

    def delete_finished(self, before: float) -> list[str]:
        """Delete the rows (and deliveries) of jobs finished before ``before``; returns their ids. Two stores
        never both delete the same job."""

    def all_ids(self) -> set[str]: ...

    def enqueue_webhook(self, job_id: str, owner: str, url: str, body: str) -> Delivery:
        """Queue the job's webhook, due now; a job already queued keeps its delivery (one per job)."""

    def due_webhooks(
        self, now: float, running: Collection[str], saturated: Collection[str], per_owner: int, limit: int,
    ) -> list[Delivery]:
        """Pending deliveries due by ``now``, oldest first: not ``running`` (ids), not of ``saturated``
        owners, at most ``per_owner`` of one owner, at most ``limit``. On a shared table they are leased to
        this store, so that no other gateway sends them meanwhile."""

    def next_webhook_due(self, running: Collection[str], saturated: Collection[str] = ()) -> float | None:
        """When the earliest pending delivery is due, leaving out ``running`` ids and ``saturated`` owners;
        None when there is none."""

    def webhook_delivered(self, delivery_id: str) -> None: ...

    def webhook_retry(self, delivery_id: str, error: str, next_attempt_at: float) -> None:
        """A failed attempt with attempts left: try again at ``next_attempt_at``."""

    def webhook_failed(self, delivery_id: str, error: str) -> None:
        """The last attempt failed: the delivery is given up."""

    def delivery(self, job_id: str) -> Delivery | None:
        """The webhook delivery of a job, if it has one."""

    def unnotified(self) -> list[str]:
        """Finished jobs with a webhook URL that never reached the outbox (the gateway stopped in between)."""


def open_store(database_url: str, sqlite_path: Path, lease_s: float) -> JobStore:
    """PostgreSQL for a ``postgresql+psycopg://`` URL, else SQLite at ``sqlite_path``."""
    if database_url:
        from gateway.store_postgres import (
            PostgresJobStore,  # SQLAlchemy is loaded only when used
        )

        return PostgresJobStore(database_url, lease_s=lease_s)
    from gateway.store_sqlite import SqliteJobStore

    return SqliteJobStore(sqlite_path, lease_s=lease_s)
