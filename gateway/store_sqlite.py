"""The job table in SQLite (WAL mode, ``synchronous=FULL``): the embedded default, for one gateway.

Statements go through one connection serialised by a lock; transactions are ``BEGIN IMMEDIATE``.
See :mod:`gateway.store` for the states, leases and the outbox.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.store import (
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
    Delivery,
    Job,
    QuotaExceeded,
    new_claimant,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: the queue's order
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,                    -- id of the API key that submitted it
    idempotency_key TEXT,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    eta_s REAL,                             -- Triton's estimate of the seconds left, while running
    params TEXT NOT NULL,                   -- JSON: the Triton job options
    webhook_url TEXT,
    webhook_state TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    result_token TEXT,
    inference_s REAL,
    info TEXT,                              -- JSON: the model's INFO of a finished job
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    request_hash TEXT,                      -- fingerprint of the submit (inputs + options), for Idempotency-Key replays
    claimed_by TEXT,                        -- the store (gateway) running it
    lease_until REAL,                       -- wall clock: after this, another gateway may re-queue it
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
_ADDED_COLUMNS = {"request_hash": "TEXT", "eta_s": "REAL", "claimed_by": "TEXT", "lease_until": "REAL"}
"""Columns newer than some existing tables: added to them on open."""


def _add_columns(db: sqlite3.Connection) -> None:
    """Give a table made by an older gateway the columns added since (a new table gets them from the schema)."""
    present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for name, kind in _ADDED_COLUMNS.items():
        if present and name not in present:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


_OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,                -- the webhook-id header: the same for every attempt
    job_id TEXT NOT NULL UNIQUE,            -- one delivery per job
    owner TEXT NOT NULL,                    -- the job's owner: deliveries in flight are capped per owner
    url TEXT NOT NULL,
    body TEXT NOT NULL,                     -- the JSON sent, exactly as signed
    state TEXT NOT NULL,                    -- pending | delivered | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,          -- wall clock: back-off survives restarts
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (state, next_attempt_at);
"""


class SqliteJobStore:
    """Thread-safe access to ``jobs.db``: one connection, serialised by a lock, autocommit per statement."""

    def __init__(self, path: Path, lease_s: float = 30.0, claimant: str | None = None) -> None:
        self.lease_s = lease_s
        self.claimant = claimant or new_claimant()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            _add_columns(self._db)
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before a client hears of it
            self._db.executescript(_SCHEMA)
            self._db.executescript(_OUTBOX_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple = ()) -> Job | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return Job.from_row(row) if row else None

    def create(
        self, job_id: str, owner: str, params: dict[str, Any], webhook_url: str | None = None,
        idempotency_key: str | None = None, request_hash: str | None = None, max_active: int | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job; with an ``idempotency_key`` this owner used before, return that job instead.

        Returns ``(job, created)``. With ``max_active``, raises :class:`QuotaExceeded` when the owner
        already has that many queued and running jobs (counted in the same transaction as the insert).
        """
        try:
            with self._transaction() as db:
                if max_active is not None and self._active(db, owner) >= max_active:
                    raise QuotaExceeded(owner)
                db.execute(
                    "INSERT INTO jobs (id, owner, idempotency_key, status, params, webhook_url, created_at, request_hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, owner, idempotency_key, IN_QUEUE, json.dumps(params), webhook_url, time.time(),
                     request_hash),
                )
        except sqlite3.IntegrityError:
            existing = self.find_idempotent(owner, idempotency_key)
            if existing is None:
                raise
            return existing, False
        job = self.get(job_id)
        assert job is not None
        return job, True

    @staticmethod
    def _active(db: sqlite3.Connection, owner: str) -> int:
        return db.execute(
            "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN (?, ?)", (owner, IN_QUEUE, IN_PROGRESS)
        ).fetchone()[0]

    def active_jobs(self, owner: str) -> int:
        """The owner's queued and running jobs."""
        with self._lock:
            return self._active(self._db, owner)

    def find_idempotent(self, owner: str, idempotency_key: str | None) -> Job | None:
        if idempotency_key is None:
            return None
        return self._one("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, idempotency_key))

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def recent(self, owner: str, limit: int) -> list[Job]:
        """The owner's ``limit`` most recently submitted jobs, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE owner = ? ORDER BY seq DESC LIMIT ?", (owner, limit)
            ).fetchall()
        return [Job.from_row(row) for row in rows]

    def queue_position(self, job: Job) -> int:
        """1 for the next job to run; 0 when the job is not queued."""
        if job.status != IN_QUEUE:
            return 0
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ? AND seq <= ?", (IN_QUEUE, job.seq)
            ).fetchone()[0]

    def claim_next(self) -> Job | None:
        with self._transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (IN_QUEUE,)).fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute(
                "UPDATE jobs SET status = ?, attempts = attempts + 1, started_at = ?, progress = 0, stage = '',"
                " eta_s = NULL, claimed_by = ?, lease_until = ? WHERE id = ?",
                (IN_PROGRESS, now, self.claimant, now + self.lease_s, row["id"]),
            )
        return self.get(row["id"])

    def renew_leases(self) -> int:
        with self._transaction() as db:
            return db.execute(
                "UPDATE jobs SET lease_until = ? WHERE status = ? AND claimed_by = ?",
                (time.time() + self.lease_s, IN_PROGRESS, self.claimant),
            ).rowcount

    def recover(self, max_attempts: int, now: float | None = None) -> tuple[list[str], list[str]]:
        now = time.time() if now is None else now
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, attempts FROM jobs WHERE status = ? AND (lease_until IS NULL OR lease_until < ?) ORDER BY seq",
                (IN_PROGRESS, now),
            ).fetchall()
            requeued = [row["id"] for row in rows if row["attempts"] < max_attempts]
            failed = [row["id"] for row in rows if row["attempts"] >= max_attempts]
            for job_id in requeued:
                db.execute(
                    "UPDATE jobs SET status = ?, reason = ?, progress = 0, stage = '', eta_s = NULL, claimed_by = NULL,"
                    " lease_until = NULL WHERE id = ?",
                    (IN_QUEUE, LEASE_EXPIRED, job_id),
                )
            for job_id in failed:
                db.execute(
                    "UPDATE jobs SET status = ?, reason = ?, finished_at = ?, lease_until = NULL WHERE id = ?",
                    (FAILED, f"the gateway running the job stopped, {max_attempts} times", time.time(), job_id),
                )
        return requeued, failed

    def set_progress(self, job_id: str, progress: float, stage: str, eta_s: float | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET progress = MAX(progress, ?), stage = ?, eta_s = ? WHERE id = ? AND status = ?"
                " AND claimed_by = ?",
                (progress, stage, eta_s, job_id, IN_PROGRESS, self.claimant),
            )

    def is_running(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT status, claimed_by FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and row["status"] == IN_PROGRESS and row["claimed_by"] == self.claimant

    def succeed(self, job_id: str, inference_s: float, info: dict[str, Any]) -> bool:
        return self._finish_running(
            job_id, SUCCEED, "", result_token=secrets.token_urlsafe(32), inference_s=inference_s,
            info=json.dumps(info), progress=1.0, stage="done", eta_s=None,
        )

    def fail(self, job_id: str, reason: str) -> bool:
        return self._finish_running(job_id, FAILED, reason)

    def _finish_running(self, job_id: str, status: str, reason: str, **fields: Any) -> bool:
        fields |= {"status": status, "reason": reason, "finished_at": time.time(), "lease_until": None}
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._transaction() as db:
            changed = db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND status = ? AND claimed_by = ?",
                (*fields.values(), job_id, IN_PROGRESS, self.claimant),
            ).rowcount
        return changed == 1

    def requeue(self, job_id: str, reason: str, refund: bool = False) -> bool:
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET status = ?, reason = ?, progress = 0, stage = '', eta_s = NULL, attempts = attempts - ?,"
                " claimed_by = NULL, lease_until = NULL WHERE id = ? AND status = ? AND claimed_by = ?",
                (IN_QUEUE, reason, int(refund), job_id, IN_PROGRESS, self.claimant),
            ).rowcount
        return changed == 1

    def cancel(self, job_id: str, reason: str) -> bool:
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET status = ?, reason = ?, finished_at = ?, lease_until = NULL WHERE id = ?"
                " AND status IN (?, ?)",
                (CANCELLED, reason, time.time(), job_id, IN_QUEUE, IN_PROGRESS),
            ).rowcount
        return changed == 1

    def set_webhook_state(self, job_id: str, state: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET webhook_state = ? WHERE id = ?", (state, job_id))

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {state: 0 for state in STATES} | {row["status"]: row["n"] for row in rows}

    def delete_finished(self, before: float) -> list[str]:
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE status IN ({', '.join('?' * len(FINISHED))}) AND finished_at < ?",
                (*FINISHED, before),
            ).fetchall()
            ids = [row["id"] for row in rows]
            for job_id in ids:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                db.execute("DELETE FROM webhook_outbox WHERE job_id = ?", (job_id,))
        return ids

    def all_ids(self) -> set[str]:
        with self._lock:
            return {row["id"] for row in self._db.execute("SELECT id FROM jobs").fetchall()}

    # The webhook outbox: a finished job's webhook is a row here until it is delivered or given up,
    # so deliveries survive restarts and their back-off is kept on disk.

    def enqueue_webhook(self, job_id: str, owner: str, url: str, body: str) -> Delivery:
        """Queue the job's webhook, due now; a job already queued keeps its delivery (one per job)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO webhook_outbox (id, job_id, owner, url, body, state, next_attempt_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (f"msg_{secrets.token_hex(16)}", job_id, owner, url, body, WEBHOOK_PENDING, time.time(), time.time()),
            )
            db.execute("UPDATE jobs SET webhook_state = ? WHERE id = ? AND webhook_state IS NULL", (WEBHOOK_PENDING, job_id))
            row = db.execute("SELECT * FROM webhook_outbox WHERE job_id = ?", (job_id,)).fetchone()
        return Delivery.from_row(row)

    def due_webhooks(
        self, now: float, running: Collection[str], saturated: Collection[str], per_owner: int, limit: int,
    ) -> list[Delivery]:
        """Pending deliveries due by ``now``, oldest first: not ``running`` (ids), not of ``saturated``
        owners, at most ``per_owner`` of one owner, at most ``limit``."""
        running, saturated = tuple(running), tuple(saturated)
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY owner ORDER BY next_attempt_at, seq) AS rank"
                "  FROM webhook_outbox WHERE state = ? AND next_attempt_at <= ?"
                f"  AND id NOT IN ({', '.join('?' * len(running))}) AND owner NOT IN ({', '.join('?' * len(saturated))}))"
                " WHERE rank <= ? ORDER BY next_attempt_at, seq LIMIT ?",
                (WEBHOOK_PENDING, now, *running, *saturated, per_owner, limit),
            ).fetchall()
        return [Delivery.from_row(row) for row in rows]

    def next_webhook_due(self, running: Collection[str], saturated: Collection[str] = ()) -> float | None:
        """When the earliest pending delivery is due, leaving out ``running`` ids and ``saturated`` owners;
        None when there is none."""
        running, saturated = tuple(running), tuple(saturated)
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE state = ?"
                f" AND id NOT IN ({', '.join('?' * len(running))}) AND owner NOT IN ({', '.join('?' * len(saturated))})",
                (WEBHOOK_PENDING, *running, *saturated),
            ).fetchone()
        return row[0]

    def webhook_delivered(self, delivery_id: str) -> None:
        self._webhook_attempted(delivery_id, WEBHOOK_DELIVERED, "", None)

    def webhook_retry(self, delivery_id: str, error: str, next_attempt_at: float) -> None:
        """A failed attempt with attempts left: try again at ``next_attempt_at``."""
        self._webhook_attempted(delivery_id, WEBHOOK_PENDING, error, next_attempt_at)

    def webhook_failed(self, delivery_id: str, error: str) -> None:
        """The last attempt failed: the delivery is given up."""
        self._webhook_attempted(delivery_id, WEBHOOK_FAILED, error, None)

    def _webhook_attempted(self, delivery_id: str, state: str, error: str, next_attempt_at: float | None) -> None:
        now = time.time()
        job_state = state if state != WEBHOOK_FAILED else f"{WEBHOOK_FAILED}: {error}"
        with self._transaction() as db:
            db.execute(
                "UPDATE webhook_outbox SET state = ?, attempts = attempts + 1, last_error = ?,"
                " next_attempt_at = COALESCE(?, next_attempt_at), finished_at = ? WHERE id = ? AND state = ?",
                (state, error, next_attempt_at, None if state == WEBHOOK_PENDING else now, delivery_id, WEBHOOK_PENDING),
            )
            db.execute(
                "UPDATE jobs SET webhook_state = ? WHERE id = (SELECT job_id FROM webhook_outbox WHERE id = ?)",
                (job_state, delivery_id),
            )

    def delivery(self, job_id: str) -> Delivery | None:
        """The webhook delivery of a job, if it has one."""
        with self._lock:
            row = self._db.execute("SELECT * FROM webhook_outbox WHERE job_id = ?", (job_id,)).fetchone()
        return Delivery.from_row(row) if row else None

    def unnotified(self) -> list[str]:
        """Finished jobs with a webhook URL that never reached the outbox (the gateway stopped in between)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM jobs WHERE status IN ({', '.join('?' * len(FINISHED))})"
                " AND webhook_url IS NOT NULL AND webhook_state IS NULL ORDER BY seq",
                FINISHED,
            ).fetchall()
        return [row["id"] for row in rows]
