"""The job table and the webhook outbox, in SQLite or PostgreSQL: :class:`JobStore`.

Every statement is written once in SQLAlchemy Core; :mod:`gateway.store.dialects` holds what the two
databases do differently. See :mod:`gateway.store` for the states, leases and the outbox.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Connection,
    Select,
    and_,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError

from gateway.store.dialects import dialect_for
from gateway.store.queue import NEXT_JOB, Owners, QueuePolicy, positions, queued_owners
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
    new_claimant,
)
from gateway.store.schema import batches, jobs, webhook_outbox

outbox = webhook_outbox

# What a status poll or a running job asks, built once: building a statement costs several times what
# running it on SQLite does.
_ID: BindParameter[str] = bindparam("job_id")
_OWNER: BindParameter[str] = bindparam("owner")
_KEY: BindParameter[str] = bindparam("key")
_CLAIMANT: BindParameter[str] = bindparam("claimant")
_GET = select(jobs).where(jobs.c.id == _ID)
_BY_KEY = select(jobs).where(jobs.c.owner == _OWNER, jobs.c.idempotency_key == _KEY)
_ACTIVE = select(func.count()).where(jobs.c.owner == _OWNER, jobs.c.status.in_((IN_QUEUE, IN_PROGRESS)))
_RUNNING_HERE = and_(jobs.c.id == _ID, jobs.c.status == IN_PROGRESS, jobs.c.claimed_by == _CLAIMANT)
_IS_RUNNING = select(func.count()).where(_RUNNING_HERE)
_NEWEST_FIRST = (jobs.c.created_at.desc(), jobs.c.id.desc())
_RECENT = select(jobs).where(jobs.c.owner == _OWNER).order_by(*_NEWEST_FIRST).limit(bindparam("limit"))
_RECENT_BEFORE = _RECENT.where(tuple_(jobs.c.created_at, jobs.c.id) < tuple_(bindparam("created_at"), _ID))
_COUNTS = select(jobs.c.status, func.count().label("n")).group_by(jobs.c.status)
_BATCH: BindParameter[str] = bindparam("batch_id")
_GET_BATCH = select(batches).where(batches.c.id == _BATCH)
_BATCH_BY_KEY = select(batches).where(batches.c.owner == _OWNER, batches.c.idempotency_key == _KEY)
_BATCH_JOBS = select(jobs).where(jobs.c.batch_id == _BATCH).order_by(jobs.c.batch_index)
_ACTIVE_IN_BATCH = select(jobs.c.id).where(jobs.c.batch_id == batches.c.id, jobs.c.status.in_((IN_QUEUE, IN_PROGRESS)))
_SUCCEEDED = select(jobs).where(jobs.c.status == SUCCEED).order_by(jobs.c.seq.desc()).limit(bindparam("limit"))
_RUNNING_ETAS = select(jobs.c.eta_s).where(jobs.c.status == IN_PROGRESS)


def greatest(value: Any, other: Any) -> ColumnElement:
    """The larger of two values (``GREATEST`` on PostgreSQL, ``MAX`` on SQLite), written once."""
    return case((value > other, value), else_=other)


class JobStore:
    """Thread-safe; every method is one transaction, committed before it returns.

    ``url``: ``sqlite:///…/jobs.db`` (:func:`gateway.store.dialects.sqlite_url`) or ``postgresql+psycopg://…``
    (``pool_size``: connections kept open to it).
    Opening it brings the schema to the newest migration.
    """

    def __init__(
        self,
        url: str,
        lease_s: float = 30.0,
        claimant: str | None = None,
        queue_policy: QueuePolicy = "fair",
        position_ttl_s: float = 0.0,
        pool_size: int = 8,
    ) -> None:
        self.lease_s = lease_s
        self.queue_policy = queue_policy
        """Which queued job a claim takes (:mod:`gateway.store.queue`); gateways sharing a table should agree."""
        self.claimant = claimant or new_claimant()
        """This store's id in the ``claimed_by`` of the jobs and deliveries it claims."""
        self.position_ttl_s = position_ttl_s
        """How long the owners' figures behind ``fair`` queue positions are reused, unless this store wrote
        to the table meanwhile (other gateways' changes show after at most this long); 0: never reused."""
        self._writes = 0
        """Write transactions of this store that ended, counted after each one ends."""
        self._owners: tuple[int, float, Owners] | None = None
        """The last owners' figures read: the write count before they were read, when, and the figures."""
        self._db = dialect_for(url, pool_size)
        self._db.migrate()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Connection]:
        try:
            with self._db.transaction(write) as db:
                yield db
        finally:
            if write:
                self._writes += 1

    def _queued_owners(self, db: Connection) -> Owners:
        """:func:`gateway.store.queue.queued_owners`, reused for ``position_ttl_s`` while this store writes nothing.
        The write count is taken before the read: a write ending during it makes the figures stale at once."""
        now, writes, cached = time.monotonic(), self._writes, self._owners
        if cached is not None and cached[0] == writes and now - cached[1] < self.position_ttl_s:
            return cached[2]
        figures = queued_owners(db)
        self._owners = (writes, now, figures)
        return figures

    def _rows(self, statement: Any, **params: Any) -> Sequence[Any]:
        with self._transaction(write=False) as db:
            return db.execute(statement, params).mappings().all()

    def _write(self, statement: Any, **params: Any) -> int:
        """Run one changing statement; returns the number of rows it changed."""
        with self._transaction() as db:
            return db.execute(statement, params).rowcount

    def _job(self, statement: Any, **params: Any) -> Job | None:
        rows = self._rows(statement, **params)
        return Job.from_row(rows[0]) if rows else None

    # Jobs

    def create(
        self,
        job_id: str,
        owner: str,
        params: dict[str, Any],
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        max_active: int | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job; with an ``idempotency_key`` this owner used before, return that job instead.

        Returns ``(job, created)``. With ``max_active``, raises :class:`QuotaExceeded` when the owner
        already has that many queued and running jobs (counted in the same transaction as the insert,
        one submit of an owner at a time across gateways).
        """
        try:
            with self._transaction() as db:
                self._db.lock_owner(db, owner)
                if max_active is not None and db.execute(_ACTIVE, {"owner": owner}).scalar_one() >= max_active:
                    raise QuotaExceeded(owner)
                row = (
                    db.execute(
                        jobs.insert()
                        .values(
                            id=job_id,
                            owner=owner,
                            idempotency_key=idempotency_key,
                            status=IN_QUEUE,
                            params=json.dumps(params),
                            webhook_url=webhook_url,
                            created_at=time.time(),
                            request_hash=request_hash,
                        )
                        .returning(*jobs.c)
                    )
                    .mappings()
                    .one()
                )
        except IntegrityError:
            existing = self.find_idempotent(owner, idempotency_key)
            if existing is None:
                raise
            return existing, False
        return Job.from_row(row), True

    def create_batch(
        self,
        batch_id: str,
        owner: str,
        items: Sequence[BatchItem],
        size: int,
        errors: dict[int, str],
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str = "",
        max_active: int | None = None,
    ) -> tuple[Batch, bool]:
        """Queue a batch's accepted ``items`` (one transaction: all of them or none); ``errors`` are the
        refused items' reasons by index. With an ``idempotency_key`` this owner used for a batch before,
        return that batch instead: ``(batch, created)``.

        With ``max_active``, raises :class:`QuotaExceeded` when the owner's queued and running jobs plus
        these items would be more than that (every item counts, as a submit of its own would).
        """
        now = time.time()
        try:
            with self._transaction() as db:
                self._db.lock_owner(db, owner)
                active = db.execute(_ACTIVE, {"owner": owner}).scalar_one()
                if max_active is not None and active + len(items) > max_active:
                    raise QuotaExceeded(owner)
                row = (
                    db.execute(
                        batches.insert()
                        .values(
                            id=batch_id,
                            owner=owner,
                            idempotency_key=idempotency_key,
                            request_hash=request_hash,
                            size=size,
                            errors=json.dumps({str(index): reason for index, reason in errors.items()}),
                            webhook_url=webhook_url,
                            created_at=now,
                        )
                        .returning(*batches.c)
                    )
                    .mappings()
                    .one()
                )
                if items:
                    db.execute(
                        jobs.insert(),
                        [
                            {
                                "id": item.job_id,
                                "owner": owner,
                                "status": IN_QUEUE,
                                "params": json.dumps(item.params),
                                "webhook_url": item.webhook_url,
                                "created_at": now,
                                "request_hash": item.request_hash,
                                "batch_id": batch_id,
                                "batch_index": item.index,
                            }
                            for item in items
                        ],
                    )
        except IntegrityError:
            existing = self.find_idempotent_batch(owner, idempotency_key)
            if existing is None:
                raise
            return existing, False
        return Batch.from_row(row), True

    def get_batch(self, batch_id: str) -> Batch | None:
        rows = self._rows(_GET_BATCH, batch_id=batch_id)
        return Batch.from_row(rows[0]) if rows else None

    def find_idempotent_batch(self, owner: str, idempotency_key: str | None) -> Batch | None:
        if idempotency_key is None:
            return None
        rows = self._rows(_BATCH_BY_KEY, owner=owner, key=idempotency_key)
        return Batch.from_row(rows[0]) if rows else None

    def batch_jobs(self, batch_id: str) -> list[Job]:
        """The jobs of a batch, in the order of its items."""
        return [Job.from_row(row) for row in self._rows(_BATCH_JOBS, batch_id=batch_id)]

    def cancel_batch(self, batch_id: str, reason: str) -> list[str]:
        """Every queued or running job of the batch → ``Cancelled``; returns the ids of those cancelled."""
        with self._transaction() as db:
            return list(
                db.execute(
                    update(jobs)
                    .where(jobs.c.batch_id == batch_id, jobs.c.status.in_((IN_QUEUE, IN_PROGRESS)))
                    .values(status=CANCELLED, reason=reason, finished_at=time.time(), lease_until=None)
                    .returning(jobs.c.id)
                ).scalars()
            )

    def end_batch(self, batch_id: str) -> bool:
        """Mark the batch ended if none of its jobs is queued or running any more; True for the one call that
        did (each job's ending calls it after committing, so the last one's call does)."""
        return (
            self._write(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.finished_at.is_(None), ~_ACTIVE_IN_BATCH.exists())
                .values(finished_at=time.time())
            )
            == 1
        )

    def open_batches(self) -> list[str]:
        """Batches not marked ended: :meth:`end_batch` tells which of them ended meanwhile (restart)."""
        return [row["id"] for row in self._rows(select(batches.c.id).where(batches.c.finished_at.is_(None)))]

    def recent_succeeded(self, limit: int) -> list[Job]:
        """The ``limit`` jobs that succeeded last (by submission), newest first: what estimates learn from."""
        return [Job.from_row(row) for row in self._rows(_SUCCEEDED, limit=limit)]

    def running_etas(self) -> list[float | None]:
        """The seconds left of each running job, as its server last estimated them (None: not known yet)."""
        return [row["eta_s"] for row in self._rows(_RUNNING_ETAS)]

    def active_jobs(self, owner: str) -> int:
        """The owner's queued and running jobs."""
        return self._count(_ACTIVE, owner=owner)

    def _count(self, statement: Select, **params: Any) -> int:
        with self._transaction(write=False) as db:
            return db.execute(statement, params).scalar_one()

    def find_idempotent(self, owner: str, idempotency_key: str | None) -> Job | None:
        if idempotency_key is None:
            return None
        return self._job(_BY_KEY, owner=owner, key=idempotency_key)

    def get(self, job_id: str) -> Job | None:
        return self._job(_GET, job_id=job_id)

    def recent(self, owner: str, limit: int, before: tuple[float, str] | None = None) -> list[Job]:
        """The owner's ``limit`` most recently submitted jobs, newest first (by ``created_at``, then ``id``);
        with ``before``, only those listed after the job of that ``(created_at, id)``."""
        if before is None:
            rows = self._rows(_RECENT, owner=owner, limit=limit)
        else:
            rows = self._rows(_RECENT_BEFORE, owner=owner, limit=limit, created_at=before[0], job_id=before[1])
        return [Job.from_row(row) for row in rows]

    def queue_position(self, job: Job) -> int:
        """1 for the next job to run (in the order of :attr:`queue_policy`); 0 when the job is not queued."""
        return self.queue_positions([job])[0]

    def queue_positions(self, listed: Sequence[Job]) -> list[int]:
        """:meth:`queue_position` of each job, read in one transaction."""
        if all(job.status != IN_QUEUE for job in listed):
            return [0] * len(listed)
        with self._transaction(write=False) as db:
            return positions(db, self.queue_policy, listed, self._queued_owners)

    def get_with_position(self, job_id: str) -> tuple[Job | None, int]:
        """:meth:`get` and the job's :meth:`queue_position`, in one transaction (what a status poll reads)."""
        with self._transaction(write=False) as db:
            rows = db.execute(_GET, {"job_id": job_id}).mappings().all()
            if not rows:
                return None, 0
            job = Job.from_row(rows[0])
            return job, positions(db, self.queue_policy, [job], self._queued_owners)[0]

    def claim_next(self) -> Job | None:
        """Move the next queued job (:attr:`queue_policy`) to ``InProgress`` (one more attempt, leased to this store) and return it;
        no two stores on one table get the same job."""
        now = time.time()
        chosen = NEXT_JOB[self.queue_policy].scalar_subquery()
        with self._transaction() as db:
            row = (
                db.execute(
                    update(jobs)
                    .where(jobs.c.seq == chosen)
                    .values(
                        status=IN_PROGRESS,
                        attempts=jobs.c.attempts + 1,
                        started_at=now,
                        progress=0,
                        stage="",
                        eta_s=None,
                        claimed_by=self.claimant,
                        lease_until=now + self.lease_s,
                    )
                    .returning(*jobs.c)
                )
                .mappings()
                .one_or_none()
            )
        return Job.from_row(row) if row else None

    def renew_leases(self) -> int:
        """Extend the leases of the jobs this store runs; returns how many."""
        return self._write(
            update(jobs)
            .where(jobs.c.status == IN_PROGRESS, jobs.c.claimed_by == self.claimant)
            .values(lease_until=time.time() + self.lease_s)
        )

    def recover(self, max_attempts: int, now: float | None = None) -> tuple[list[str], list[str]]:
        """``InProgress`` jobs whose lease ran out by ``now`` go back to the queue, or fail once out of attempts.

        Returns the ids ``(requeued, failed)``; two stores never both recover one job.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            rows = db.execute(
                select(jobs.c.id, jobs.c.attempts)
                .where(jobs.c.status == IN_PROGRESS, or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now))
                .order_by(jobs.c.seq)
                .with_for_update(skip_locked=True)
            ).all()
            requeued = [row.id for row in rows if row.attempts < max_attempts]
            failed = [row.id for row in rows if row.attempts >= max_attempts]
            if requeued:
                db.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(requeued))
                    .values(
                        status=IN_QUEUE,
                        reason=LEASE_EXPIRED,
                        progress=0,
                        stage="",
                        eta_s=None,
                        claimed_by=None,
                        lease_until=None,
                    )
                )
            if failed:
                db.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(failed))
                    .values(
                        status=FAILED,
                        reason=f"the gateway running the job stopped, {max_attempts} times",
                        finished_at=time.time(),
                        lease_until=None,
                    )
                )
        return requeued, failed

    def set_progress(self, job_id: str, progress: float, stage: str, eta_s: float | None = None) -> None:
        self._write(
            update(jobs)
            .where(_RUNNING_HERE)
            .values(progress=greatest(jobs.c.progress, progress), stage=stage, eta_s=eta_s),
            job_id=job_id,
            claimant=self.claimant,
        )

    def is_running(self, job_id: str) -> bool:
        """Whether the job is still ``InProgress`` under this store's lease (not cancelled, not taken over)."""
        return self._count(_IS_RUNNING, job_id=job_id, claimant=self.claimant) == 1

    def succeed(self, job_id: str, inference_s: float, info: dict[str, Any]) -> bool:
        """``InProgress`` → ``Succeed`` with a fresh download token; False if the job had left ``InProgress``."""
        return self._finish_running(
            job_id,
            SUCCEED,
            "",
            result_token=secrets.token_urlsafe(32),
            inference_s=inference_s,
            info=json.dumps(info),
            progress=1.0,
            stage="done",
            eta_s=None,
        )

    def fail(self, job_id: str, reason: str) -> bool:
        return self._finish_running(job_id, FAILED, reason)

    def _finish_running(self, job_id: str, status: str, reason: str, **values: Any) -> bool:
        return (
            self._write(
                update(jobs)
                .where(_RUNNING_HERE)
                .values(status=status, reason=reason, finished_at=time.time(), lease_until=None, **values),
                job_id=job_id,
                claimant=self.claimant,
            )
            == 1
        )

    def requeue(self, job_id: str, reason: str, refund: bool = False) -> bool:
        """``InProgress`` → ``InQueue`` (the job keeps its place: its submission order).

        ``refund``: the attempt does not count (the gateway stopped it on purpose).
        """
        return (
            self._write(
                update(jobs)
                .where(_RUNNING_HERE)
                .values(
                    status=IN_QUEUE,
                    reason=reason,
                    progress=0,
                    stage="",
                    eta_s=None,
                    attempts=jobs.c.attempts - int(refund),
                    claimed_by=None,
                    lease_until=None,
                ),
                job_id=job_id,
                claimant=self.claimant,
            )
            == 1
        )

    def cancel(self, job_id: str, reason: str) -> bool:
        """A queued or running job → ``Cancelled`` (a running one's worker, in whichever gateway, notices and
        cancels its Triton stream). False if the job had already ended."""
        return (
            self._write(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status.in_((IN_QUEUE, IN_PROGRESS)))
                .values(status=CANCELLED, reason=reason, finished_at=time.time(), lease_until=None)
            )
            == 1
        )

    def set_webhook_state(self, job_id: str, state: str) -> None:
        self._write(update(jobs).where(jobs.c.id == job_id).values(webhook_state=state))

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, zero when none)."""
        rows = self._rows(_COUNTS)
        return {state: 0 for state in STATES} | {row["status"]: row["n"] for row in rows}

    def delete_finished(self, before: float) -> list[str]:
        """Delete the rows (and deliveries) of jobs and batches finished before ``before``; returns the jobs'
        ids. Two stores never both delete the same job."""
        doomed = (
            select(jobs.c.id)
            .where(jobs.c.status.in_(FINISHED), jobs.c.finished_at < before)
            .with_for_update(skip_locked=True)
        )
        ended = select(batches.c.id).where(batches.c.finished_at < before).with_for_update(skip_locked=True)
        with self._transaction() as db:
            ids = list(db.execute(delete(jobs).where(jobs.c.id.in_(doomed)).returning(jobs.c.id)).scalars())
            gone = list(db.execute(delete(batches).where(batches.c.id.in_(ended)).returning(batches.c.id)).scalars())
            if ids or gone:
                db.execute(delete(outbox).where(outbox.c.job_id.in_(ids + gone)))
        return ids

    def all_ids(self) -> set[str]:
        return {row["id"] for row in self._rows(select(jobs.c.id))}

    # The webhook outbox: a finished job's webhook is a row here until it is delivered or given up,
    # so deliveries survive restarts and their back-off is kept in the table.

    def enqueue_webhook(self, job_id: str, owner: str, url: str, body: str) -> Delivery:
        """Queue the webhook of a job (or a batch: ``job_id`` is its id), due now; one already queued keeps
        its delivery (one per job)."""
        now = time.time()
        with self._transaction() as db:
            db.execute(
                self._db.insert(outbox)
                .values(
                    id=f"msg_{secrets.token_hex(16)}",
                    job_id=job_id,
                    owner=owner,
                    url=url,
                    body=body,
                    state=WEBHOOK_PENDING,
                    next_attempt_at=now,
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["job_id"])
            )
            for table in (jobs, batches):
                db.execute(
                    update(table)
                    .where(table.c.id == job_id, table.c.webhook_state.is_(None))
                    .values(webhook_state=WEBHOOK_PENDING)
                )
            row = db.execute(select(outbox).where(outbox.c.job_id == job_id)).mappings().one()
        return Delivery.from_row(row)

    def due_webhooks(
        self,
        now: float,
        running: Collection[str],
        saturated: Collection[str],
        per_owner: int,
        limit: int,
    ) -> list[Delivery]:
        """Pending deliveries due by ``now``, oldest first: not ``running`` (ids), not of ``saturated``
        owners, at most ``per_owner`` of one owner, at most ``limit``. They are leased to this store, so
        that no other gateway sends them meanwhile."""
        free = and_(
            outbox.c.state == WEBHOOK_PENDING,
            outbox.c.next_attempt_at <= now,
            or_(outbox.c.lease_until.is_(None), outbox.c.lease_until < now),
        )
        ranked = (
            select(
                outbox.c.id,
                func.row_number()
                .over(partition_by=outbox.c.owner, order_by=(outbox.c.next_attempt_at, outbox.c.seq))
                .label("rank"),
            )
            .where(free, outbox.c.id.not_in(tuple(running)), outbox.c.owner.not_in(tuple(saturated)))
            .subquery()
        )
        # Ranked per owner first; then the ranked rows no other gateway holds are locked and leased here.
        chosen = (
            select(outbox.c.id)
            .where(outbox.c.id.in_(select(ranked.c.id).where(ranked.c.rank <= per_owner)), free)
            .order_by(outbox.c.next_attempt_at, outbox.c.seq)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self._transaction() as db:
            rows = (
                db.execute(
                    update(outbox)
                    .where(outbox.c.id.in_(chosen))
                    .values(claimed_by=self.claimant, lease_until=now + self.lease_s)
                    .returning(*outbox.c)
                )
                .mappings()
                .all()
            )
        return sorted((Delivery.from_row(row) for row in rows), key=lambda d: (d.next_attempt_at, d.seq))

    def next_webhook_due(self, running: Collection[str], saturated: Collection[str] = ()) -> float | None:
        """When the earliest pending delivery is due, leaving out ``running`` ids and ``saturated`` owners;
        None when there is none. One another gateway holds is due again when its lease runs out (should
        that gateway die)."""
        with self._transaction(write=False) as db:
            return db.execute(
                select(func.min(greatest(outbox.c.next_attempt_at, func.coalesce(outbox.c.lease_until, 0.0)))).where(
                    outbox.c.state == WEBHOOK_PENDING,
                    outbox.c.id.not_in(tuple(running)),
                    outbox.c.owner.not_in(tuple(saturated)),
                )
            ).scalar_one()

    def release_webhooks(self) -> None:
        """Hand back the pending deliveries this store holds (its sender stopped), so that any gateway, this
        one included, may send them at once instead of after their lease."""
        self._write(
            update(outbox)
            .where(outbox.c.claimed_by == self.claimant, outbox.c.state == WEBHOOK_PENDING)
            .values(claimed_by=None, lease_until=None)
        )

    def webhook_delivered(self, delivery_id: str) -> None:
        self._webhook_attempted(delivery_id, WEBHOOK_DELIVERED, "", None)

    def webhook_retry(self, delivery_id: str, error: str, next_attempt_at: float) -> None:
        """A failed attempt with attempts left: try again at ``next_attempt_at``."""
        self._webhook_attempted(delivery_id, WEBHOOK_PENDING, error, next_attempt_at)

    def webhook_failed(self, delivery_id: str, error: str) -> None:
        """The last attempt failed: the delivery is given up."""
        self._webhook_attempted(delivery_id, WEBHOOK_FAILED, error, None)

    def _webhook_attempted(self, delivery_id: str, state: str, error: str, next_attempt_at: float | None) -> None:
        job_state = state if state != WEBHOOK_FAILED else f"{WEBHOOK_FAILED}: {error}"
        with self._transaction() as db:
            db.execute(
                update(outbox)
                .where(outbox.c.id == delivery_id, outbox.c.state == WEBHOOK_PENDING)
                .values(
                    state=state,
                    attempts=outbox.c.attempts + 1,
                    last_error=error,
                    next_attempt_at=outbox.c.next_attempt_at if next_attempt_at is None else next_attempt_at,
                    finished_at=None if state == WEBHOOK_PENDING else time.time(),
                    claimed_by=None,
                    lease_until=None,
                )
            )
            subject = select(outbox.c.job_id).where(outbox.c.id == delivery_id).scalar_subquery()
            for table in (jobs, batches):
                db.execute(update(table).where(table.c.id == subject).values(webhook_state=job_state))

    def delivery(self, job_id: str) -> Delivery | None:
        """The webhook delivery of a job, if it has one."""
        rows = self._rows(select(outbox).where(outbox.c.job_id == job_id))
        return Delivery.from_row(rows[0]) if rows else None

    def unnotified(self) -> list[str]:
        """Finished jobs with a webhook URL that never reached the outbox (the gateway stopped in between)."""
        rows = self._rows(
            select(jobs.c.id)
            .where(jobs.c.status.in_(FINISHED), jobs.c.webhook_url.is_not(None), jobs.c.webhook_state.is_(None))
            .order_by(jobs.c.seq)
        )
        return [row["id"] for row in rows]
