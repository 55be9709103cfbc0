"""The job table in PostgreSQL (SQLAlchemy Core on psycopg 3), shared by several gateways.

Opening it migrates the schema to the newest Alembic revision (:mod:`gateway.migrations`), under an
advisory lock so that gateways starting together migrate once. Claims take rows with
``FOR UPDATE SKIP LOCKED``: two gateways never get the same job, the same expired lease or the same
webhook, and neither waits for the other. See :mod:`gateway.store` for the states, leases and the outbox.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import IntegrityError

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

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x6C697073  # any constant shared by every gateway: the advisory lock of schema upgrades


def upgrade(connection: Connection) -> None:
    """Bring the schema to the newest revision, on ``connection`` (inside its transaction)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    command.upgrade(config, "head")


class PostgresJobStore:
    """A pool of connections; every method is one transaction (READ COMMITTED)."""

    def __init__(self, url: str, lease_s: float = 30.0, claimant: str | None = None) -> None:
        self.lease_s = lease_s
        self.claimant = claimant or new_claimant()
        self._engine = create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=True)
        with self._engine.begin() as db:
            upgrade(db)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self._engine.begin() as db:
            yield db

    def _rows(self, sql: str, **args: Any) -> list[dict[str, Any]]:
        with self._transaction() as db:
            return [dict(row) for row in db.execute(text(sql), args).mappings()]

    def _job(self, sql: str, **args: Any) -> Job | None:
        rows = self._rows(sql, **args)
        return Job.from_row(rows[0]) if rows else None

    def _changed(self, sql: str, **args: Any) -> int:
        with self._transaction() as db:
            return db.execute(text(sql), args).rowcount

    def create(
        self, job_id: str, owner: str, params: dict[str, Any], webhook_url: str | None = None,
        idempotency_key: str | None = None, request_hash: str | None = None, max_active: int | None = None,
    ) -> tuple[Job, bool]:
        try:
            with self._transaction() as db:
                # One submit of an owner at a time across gateways: the count and the insert stay together.
                db.execute(text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner})
                if max_active is not None and self._active(db, owner) >= max_active:
                    raise QuotaExceeded(owner)
                db.execute(
                    text(
                        "INSERT INTO jobs (id, owner, idempotency_key, status, params, webhook_url, created_at, request_hash)"
                        " VALUES (:id, :owner, :key, :status, :params, :url, :now, :hash)"
                    ),
                    {"id": job_id, "owner": owner, "key": idempotency_key, "status": IN_QUEUE, "params": json.dumps(params),
                     "url": webhook_url, "now": time.time(), "hash": request_hash},
                )
        except IntegrityError:
            existing = self.find_idempotent(owner, idempotency_key)
            if existing is None:
                raise
            return existing, False
        job = self.get(job_id)
        assert job is not None
        return job, True

    @staticmethod
    def _active(db: Connection, owner: str) -> int:
        return db.execute(
            text("SELECT COUNT(*) FROM jobs WHERE owner = :owner AND status IN (:queued, :running)"),
            {"owner": owner, "queued": IN_QUEUE, "running": IN_PROGRESS},
        ).scalar_one()

    def active_jobs(self, owner: str) -> int:
        with self._transaction() as db:
            return self._active(db, owner)

    def find_idempotent(self, owner: str, idempotency_key: str | None) -> Job | None:
        if idempotency_key is None:
            return None
        return self._job("SELECT * FROM jobs WHERE owner = :owner AND idempotency_key = :key", owner=owner, key=idempotency_key)

    def get(self, job_id: str) -> Job | None:
        return self._job("SELECT * FROM jobs WHERE id = :id", id=job_id)

    def recent(self, owner: str, limit: int) -> list[Job]:
        rows = self._rows("SELECT * FROM jobs WHERE owner = :owner ORDER BY seq DESC LIMIT :limit", owner=owner, limit=limit)
        return [Job.from_row(row) for row in rows]

    def queue_position(self, job: Job) -> int:
        if job.status != IN_QUEUE:
            return 0
        return self._rows("SELECT COUNT(*) AS n FROM jobs WHERE status = :s AND seq <= :seq", s=IN_QUEUE, seq=job.seq)[0]["n"]

    def claim_next(self) -> Job | None:
        now = time.time()
        return self._job(
            "UPDATE jobs SET status = :running, attempts = attempts + 1, started_at = :now, progress = 0, stage = '',"
            " eta_s = NULL, claimed_by = :me, lease_until = :until"
            " WHERE id = (SELECT id FROM jobs WHERE status = :queued ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
            " RETURNING *",
            running=IN_PROGRESS, queued=IN_QUEUE, now=now, me=self.claimant, until=now + self.lease_s,
        )

    def renew_leases(self) -> int:
        return self._changed(
            "UPDATE jobs SET lease_until = :until WHERE status = :running AND claimed_by = :me",
            until=time.time() + self.lease_s, running=IN_PROGRESS, me=self.claimant,
        )

    def recover(self, max_attempts: int, now: float | None = None) -> tuple[list[str], list[str]]:
        now = time.time() if now is None else now
        with self._transaction() as db:
            rows = db.execute(
                text(
                    "SELECT id, attempts FROM jobs WHERE status = :running AND (lease_until IS NULL OR lease_until < :now)"
                    " ORDER BY seq FOR UPDATE SKIP LOCKED"
                ),
                {"running": IN_PROGRESS, "now": now},
            ).all()
            requeued = [row.id for row in rows if row.attempts < max_attempts]
            failed = [row.id for row in rows if row.attempts >= max_attempts]
            if requeued:
                db.execute(
                    text(
                        "UPDATE jobs SET status = :queued, reason = :reason, progress = 0, stage = '', eta_s = NULL,"
                        " claimed_by = NULL, lease_until = NULL WHERE id = ANY(:ids)"
                    ),
                    {"queued": IN_QUEUE, "reason": LEASE_EXPIRED, "ids": requeued},
                )
            if failed:
                db.execute(
                    text("UPDATE jobs SET status = :failed, reason = :reason, finished_at = :now, lease_until = NULL"
                         " WHERE id = ANY(:ids)"),
                    {"failed": FAILED, "reason": f"the gateway running the job stopped, {max_attempts} times",
                     "now": time.time(), "ids": failed},
                )
        return requeued, failed

    def set_progress(self, job_id: str, progress: float, stage: str, eta_s: float | None = None) -> None:
        self._changed(
            "UPDATE jobs SET progress = GREATEST(progress, :progress), stage = :stage, eta_s = :eta"
            " WHERE id = :id AND status = :running AND claimed_by = :me",
            progress=progress, stage=stage, eta=eta_s, id=job_id, running=IN_PROGRESS, me=self.claimant,
        )

    def is_running(self, job_id: str) -> bool:
        rows = self._rows("SELECT status, claimed_by FROM jobs WHERE id = :id", id=job_id)
        return bool(rows) and rows[0]["status"] == IN_PROGRESS and rows[0]["claimed_by"] == self.claimant

    def succeed(self, job_id: str, inference_s: float, info: dict[str, Any]) -> bool:
        return self._finish_running(
            job_id, SUCCEED, "", result_token=secrets.token_urlsafe(32), inference_s=inference_s,
            info=json.dumps(info), progress=1.0, stage="done", eta_s=None,
        )

    def fail(self, job_id: str, reason: str) -> bool:
        return self._finish_running(job_id, FAILED, reason)

    def _finish_running(self, job_id: str, status: str, reason: str, **fields: Any) -> bool:
        fields |= {"status": status, "reason": reason, "finished_at": time.time(), "lease_until": None}
        assignments = ", ".join(f"{name} = :{name}" for name in fields)
        return self._changed(
            f"UPDATE jobs SET {assignments} WHERE id = :id_ AND status = :running_ AND claimed_by = :me_",
            **fields, id_=job_id, running_=IN_PROGRESS, me_=self.claimant,
        ) == 1

    def requeue(self, job_id: str, reason: str, refund: bool = False) -> bool:
        return self._changed(
            "UPDATE jobs SET status = :queued, reason = :reason, progress = 0, stage = '', eta_s = NULL,"
            " attempts = attempts - :refund, claimed_by = NULL, lease_until = NULL"
            " WHERE id = :id AND status = :running AND claimed_by = :me",
            queued=IN_QUEUE, reason=reason, refund=int(refund), id=job_id, running=IN_PROGRESS, me=self.claimant,
        ) == 1

    def cancel(self, job_id: str, reason: str) -> bool:
        return self._changed(
            "UPDATE jobs SET status = :cancelled, reason = :reason, finished_at = :now, lease_until = NULL"
            " WHERE id = :id AND status IN (:queued, :running)",
            cancelled=CANCELLED, reason=reason, now=time.time(), id=job_id, queued=IN_QUEUE, running=IN_PROGRESS,
        ) == 1

    def set_webhook_state(self, job_id: str, state: str) -> None:
        self._changed("UPDATE jobs SET webhook_state = :state WHERE id = :id", state=state, id=job_id)

    def counts(self) -> dict[str, int]:
        rows = self._rows("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {state: 0 for state in STATES} | {row["status"]: row["n"] for row in rows}

    def delete_finished(self, before: float) -> list[str]:
        with self._transaction() as db:
            ids = list(db.execute(
                text(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status = ANY(:finished) AND finished_at < :before"
                    " FOR UPDATE SKIP LOCKED) RETURNING id"
                ),
                {"finished": list(FINISHED), "before": before},
            ).scalars())
            db.execute(text("DELETE FROM webhook_outbox WHERE job_id = ANY(:ids)"), {"ids": ids})
        return ids

    def all_ids(self) -> set[str]:
        return {row["id"] for row in self._rows("SELECT id FROM jobs")}

    def enqueue_webhook(self, job_id: str, owner: str, url: str, body: str) -> Delivery:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                text(
                    "INSERT INTO webhook_outbox (id, job_id, owner, url, body, state, next_attempt_at, created_at)"
                    " VALUES (:id, :job_id, :owner, :url, :body, :pending, :now, :now) ON CONFLICT (job_id) DO NOTHING"
                ),
                {"id": f"msg_{secrets.token_hex(16)}", "job_id": job_id, "owner": owner, "url": url, "body": body,
                 "pending": WEBHOOK_PENDING, "now": now},
            )
            db.execute(
                text("UPDATE jobs SET webhook_state = :pending WHERE id = :id AND webhook_state IS NULL"),
                {"pending": WEBHOOK_PENDING, "id": job_id},
            )
            row = db.execute(text("SELECT * FROM webhook_outbox WHERE job_id = :id"), {"id": job_id}).mappings().one()
        return Delivery.from_row(row)

    def due_webhooks(
        self, now: float, running: Collection[str], saturated: Collection[str], per_owner: int, limit: int,
    ) -> list[Delivery]:
        # Ranked per owner first; then the ranked rows no other gateway holds are locked and leased here.
        rows = self._rows(
            "UPDATE webhook_outbox SET claimed_by = :me, lease_until = :until WHERE id IN ("
            "  SELECT id FROM webhook_outbox WHERE id IN ("
            "    SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY owner ORDER BY next_attempt_at, seq) AS rank"
            "      FROM webhook_outbox WHERE state = :pending AND next_attempt_at <= :now"
            "      AND (lease_until IS NULL OR lease_until < :now)"
            "      AND NOT (id = ANY(:running)) AND NOT (owner = ANY(:saturated))) ranked"
            "    WHERE rank <= :per_owner)"
            "  AND state = :pending AND (lease_until IS NULL OR lease_until < :now)"
            "  ORDER BY next_attempt_at, seq LIMIT :limit FOR UPDATE SKIP LOCKED)"
            " RETURNING *",
            me=self.claimant, until=now + self.lease_s, pending=WEBHOOK_PENDING, now=now, running=list(running),
            saturated=list(saturated), per_owner=per_owner, limit=limit,
        )
        return sorted((Delivery.from_row(row) for row in rows), key=lambda d: (d.next_attempt_at, d.seq))

    def next_webhook_due(self, running: Collection[str], saturated: Collection[str] = ()) -> float | None:
        """A delivery another gateway holds is due again when its lease runs out (should that gateway die)."""
        return self._rows(
            "SELECT MIN(GREATEST(next_attempt_at, COALESCE(lease_until, 0))) AS due FROM webhook_outbox"
            " WHERE state = :pending AND NOT (id = ANY(:running)) AND NOT (owner = ANY(:saturated))",
            pending=WEBHOOK_PENDING, running=list(running), saturated=list(saturated),
        )[0]["due"]

    def webhook_delivered(self, delivery_id: str) -> None:
        self._webhook_attempted(delivery_id, WEBHOOK_DELIVERED, "", None)

    def webhook_retry(self, delivery_id: str, error: str, next_attempt_at: float) -> None:
        self._webhook_attempted(delivery_id, WEBHOOK_PENDING, error, next_attempt_at)

    def webhook_failed(self, delivery_id: str, error: str) -> None:
        self._webhook_attempted(delivery_id, WEBHOOK_FAILED, error, None)

    def _webhook_attempted(self, delivery_id: str, state: str, error: str, next_attempt_at: float | None) -> None:
        job_state = state if state != WEBHOOK_FAILED else f"{WEBHOOK_FAILED}: {error}"
        with self._transaction() as db:
            db.execute(
                text(
                    "UPDATE webhook_outbox SET state = :state, attempts = attempts + 1, last_error = :error,"
                    " next_attempt_at = COALESCE(:next, next_attempt_at), finished_at = :finished, claimed_by = NULL,"
                    " lease_until = NULL WHERE id = :id AND state = :pending"
                ),
                {"state": state, "error": error, "next": next_attempt_at,
                 "finished": None if state == WEBHOOK_PENDING else time.time(), "id": delivery_id, "pending": WEBHOOK_PENDING},
            )
            db.execute(
                text("UPDATE jobs SET webhook_state = :state WHERE id = (SELECT job_id FROM webhook_outbox WHERE id = :id)"),
                {"state": job_state, "id": delivery_id},
            )

    def delivery(self, job_id: str) -> Delivery | None:
        rows = self._rows("SELECT * FROM webhook_outbox WHERE job_id = :id", id=job_id)
        return Delivery.from_row(rows[0]) if rows else None

    def unnotified(self) -> list[str]:
        rows = self._rows(
            "SELECT id FROM jobs WHERE status = ANY(:finished) AND webhook_url IS NOT NULL AND webhook_state IS NULL"
            " ORDER BY seq",
            finished=list(FINISHED),
        )
        return [row["id"] for row in rows]
