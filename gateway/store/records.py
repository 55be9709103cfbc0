"""What the job table holds, as the store hands it out: states, :class:`Job`, :class:`Batch`, :class:`Delivery`, ids."""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

IN_QUEUE, IN_PROGRESS, SUCCEED, FAILED, CANCELLED = "InQueue", "InProgress", "Succeed", "Failed", "Cancelled"
STATES = (IN_QUEUE, IN_PROGRESS, SUCCEED, FAILED, CANCELLED)
FINISHED = (SUCCEED, FAILED, CANCELLED)
WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED = "pending", "delivered", "failed"
LEASE_EXPIRED = "re-queued: the gateway running the job stopped (its lease ran out)"


class QuotaExceeded(Exception):
    """The owner already has as many queued and running jobs as allowed."""


class StoreUnavailable(Exception):
    """The database server did not answer (down, restarting, its connection lost): the call may be tried
    again later. Its transaction was rolled back, unless the connection was lost during the commit itself."""


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
    batch_id: str | None = None
    batch_index: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Job:
        values = {field.name: row[field.name] for field in fields(cls)}
        values["params"] = json.loads(values["params"])
        values["info"] = json.loads(values["info"]) if values["info"] else None
        return cls(**values)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class Batch:
    """Jobs submitted in one call. Its items are numbered from 0; a refused item has no job, its reason
    is in ``errors``."""

    seq: int
    id: str
    owner: str
    idempotency_key: str | None
    request_hash: str
    size: int
    errors: dict[int, str]
    webhook_url: str | None
    webhook_state: str | None
    created_at: float
    finished_at: float | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Batch:
        values = {field.name: row[field.name] for field in fields(cls)}
        values["errors"] = {int(index): reason for index, reason in json.loads(values["errors"]).items()}
        return cls(**values)


@dataclass(frozen=True)
class BatchItem:
    """One accepted item of a batch, as :meth:`JobStore.create_batch` queues it."""

    index: int
    job_id: str
    params: dict[str, Any]
    webhook_url: str | None
    request_hash: str


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
    def from_row(cls, row: Mapping[Any, Any]) -> Delivery:
        return cls(**{field.name: row[field.name] for field in fields(cls)})


def new_job_id() -> str:
    """128 random bits as hex: ids cannot be guessed, and are safe as file names."""
    return secrets.token_hex(16)


def new_claimant() -> str:
    """This gateway's id in ``claimed_by``: host and process (for people reading the table), then random bits."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
