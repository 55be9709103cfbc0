"""The order in which queued jobs are claimed, decided inside the claim statement (so it holds on both
databases and across gateways sharing one table), and the queue position that follows it.

``fifo``: submission order. ``fair`` (the default): round-robin across owners (API keys). The next job
is the oldest queued job of the owner with the fewest running jobs; among owners running equally many,
the one whose last job started longest ago (never counts as longest); then the owner's oldest job.
One key with many queued jobs thus delays another key's job by at most one job per running slot.

The position of a queued job is its place in the order claims would take the queue now, if no job
ended meanwhile: the ``k``-th queued job of an owner running ``r`` jobs is claimed in turn ``r + k - 1``;
within a turn, owners that reach it with more running jobs go first (they had no earlier job in the
queue), then the order of the claim rule above. It is counted per owner, not per job, so a status stays
cheap with many jobs queued.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from sqlalchemy import BindParameter, ColumnElement, Connection, Select, bindparam, func, select

from gateway.core.settings import QueuePolicy
from gateway.store.records import IN_PROGRESS, IN_QUEUE, Job
from gateway.store.schema import jobs

QUEUE_POLICIES: tuple[QueuePolicy, ...] = ("fair", "fifo")


def _last_start(owner: ColumnElement) -> ColumnElement:
    """When ``owner``'s last job started (0 when none did)."""
    started = jobs.alias("started")
    return select(func.coalesce(func.max(started.c.started_at), 0.0)).where(started.c.owner == owner).scalar_subquery()


def _running(owner: ColumnElement) -> ColumnElement:
    """How many jobs ``owner`` runs now."""
    running = jobs.alias("running")
    return select(func.count()).where(running.c.owner == owner, running.c.status == IN_PROGRESS).scalar_subquery()


def _owners() -> Select:
    """Each owner with queued jobs: how many (``queued``), its oldest (``first_seq``), how many it runs and
    when its last job started."""
    queued = (
        select(jobs.c.owner, func.count().label("queued"), func.min(jobs.c.seq).label("first_seq"))
        .where(jobs.c.status == IN_QUEUE)
        .group_by(jobs.c.owner)
        .subquery("queued")
    )
    return select(queued, _running(queued.c.owner).label("running"), _last_start(queued.c.owner).label("last_start"))


def _next_job(policy: QueuePolicy) -> Select:
    if policy == "fifo":
        query = select(jobs.c.seq).where(jobs.c.status == IN_QUEUE).order_by(jobs.c.seq)
    else:
        # Materialized: each owner's figures once, not once for each of its queued jobs in the join.
        owners = _owners().cte("owners").prefix_with("MATERIALIZED")
        query = (
            select(jobs.c.seq)
            .join_from(jobs, owners, owners.c.owner == jobs.c.owner)
            .where(jobs.c.status == IN_QUEUE)
            .order_by(owners.c.running, owners.c.last_start, jobs.c.seq)
        )
    return query.limit(1).with_for_update(skip_locked=True, of=jobs).correlate(None)


# Built once: the statements have no parameters of their own (building one costs more than running it).
NEXT_JOB = {policy: _next_job(policy) for policy in QUEUE_POLICIES}
"""The ``seq`` of the job to claim next, its row locked (rows other gateways hold skipped) on PostgreSQL."""
_OWNERS = _owners()
_SEQ: BindParameter[int] = bindparam("seq")
_OWNER: BindParameter[str] = bindparam("owner")
_AHEAD = select(func.count()).where(jobs.c.status == IN_QUEUE, jobs.c.seq <= _SEQ)
_AHEAD_OF_OWNER = _AHEAD.where(jobs.c.owner == _OWNER)


class OwnerFigures(NamedTuple):
    """An owner with queued jobs, as a ``fair`` position counts it."""

    queued: int
    running: int
    rank: tuple[int, float, int]
    """Order within a turn: more running jobs first, then the longest since its last start, then the oldest job."""


Owners = dict[str, OwnerFigures]


def queued_owners(db: Connection) -> Owners:
    """The figures of every owner with queued jobs: what a ``fair`` position is counted from, and the
    costly part of it (one pass over the queued jobs, two look-ups per owner)."""
    return {
        row.owner: OwnerFigures(row.queued, row.running, (-row.running, row.last_start, row.first_seq))
        for row in db.execute(_OWNERS)
    }


def positions(
    db: Connection,
    policy: QueuePolicy,
    listed: Sequence[Job],
    owners: Callable[[Connection], Owners] = queued_owners,
) -> list[int]:
    """The queue position (1 = next) of each of the ``listed`` jobs; 0 for one that is not queued. The
    owners' figures are read once for all of them, by ``owners`` (a cache may stand in)."""
    queued = [job for job in listed if job.status == IN_QUEUE]
    if not queued:
        return [0] * len(listed)
    if policy == "fifo":
        return [db.execute(_AHEAD, {"seq": job.seq}).scalar_one() if job.status == IN_QUEUE else 0 for job in listed]
    figures = owners(db)
    return [_fair_position(db, figures, job) if job.status == IN_QUEUE else 0 for job in listed]


def _fair_position(db: Connection, owners: Owners, job: Job) -> int:
    mine = owners.get(job.owner)
    if mine is None:  # no longer queued
        return 0
    nth = db.execute(_AHEAD_OF_OWNER, {"seq": job.seq, "owner": job.owner}).scalar_one()
    turn = mine.running + nth - 1
    # Another owner's queued jobs take turns running, running + 1, …: those in turns before this job's are
    # ahead, and the one in the same turn if that owner goes first within a turn.
    return nth + sum(
        min(other.queued, max(0, turn - other.running + (other.rank < mine.rank)))
        for owner, other in owners.items()
        if owner != job.owner
    )
