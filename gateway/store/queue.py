"""The order in which queued jobs are claimed, decided inside the claim statement (so it holds on both
databases and across gateways sharing one table), and the queue position that follows it.

``fifo``: submission order. ``fair`` (the default): round-robin across owners (API keys). The next job
is the oldest queued job of the owner with the fewest running jobs; among owners running equally many,
the one whose last job started longest ago (never counts as longest); then the owner's oldest job.
One key with many queued jobs thus delays another key's job by at most one job per running slot.

The position of a queued job is its place in the order claims would take the queue now, if no job
ended meanwhile: the ``k``-th queued job of an owner running ``r`` jobs is claimed in round ``r + k - 1``;
within a round, owners that reach it with more running jobs go first (they had no earlier job in the
queue), then the order of the claim rule above.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import ColumnElement, Select, func, select

from gateway.store.records import IN_PROGRESS, IN_QUEUE
from gateway.store.schema import jobs

QueuePolicy = Literal["fair", "fifo"]
QUEUE_POLICIES: tuple[QueuePolicy, ...] = ("fair", "fifo")


def _running(owner: ColumnElement) -> ColumnElement:
    """How many jobs ``owner`` runs now."""
    running = jobs.alias("running")
    return (
        select(func.count()).where(running.c.owner == owner, running.c.status == IN_PROGRESS)
        .scalar_subquery()
    )


def _last_start(owner: ColumnElement) -> ColumnElement:
    """When ``owner``'s last job started (0 when none did)."""
    started = jobs.alias("started")
    return select(func.coalesce(func.max(started.c.started_at), 0.0)).where(started.c.owner == owner).scalar_subquery()


def next_job(policy: QueuePolicy) -> Select:
    """The ``seq`` of the job to claim next, its row locked (others skipped) on PostgreSQL."""
    order = (jobs.c.seq,) if policy == "fifo" else (_running(jobs.c.owner), _last_start(jobs.c.owner), jobs.c.seq)
    return select(jobs.c.seq).where(jobs.c.status == IN_QUEUE).order_by(*order).limit(1).with_for_update(skip_locked=True)


def position(policy: QueuePolicy, seq: int) -> Select:
    """The queue position (1 = next) of the queued job ``seq``."""
    if policy == "fifo":
        return select(func.count()).where(jobs.c.status == IN_QUEUE, jobs.c.seq <= seq)
    running = _running(jobs.c.owner)
    queued = select(
        jobs.c.seq,
        (running + func.row_number().over(partition_by=jobs.c.owner, order_by=jobs.c.seq) - 1).label("round"),
        running.label("running"),
        _last_start(jobs.c.owner).label("last_start"),
        func.min(jobs.c.seq).over(partition_by=jobs.c.owner).label("first_seq"),
    ).where(jobs.c.status == IN_QUEUE).subquery()
    ranked = select(
        queued.c.seq,
        func.row_number().over(order_by=(
            queued.c["round"], queued.c.running.desc(), queued.c.last_start, queued.c.first_seq, queued.c.seq,
        )).label("position"),
    ).subquery()
    return select(ranked.c.position).where(ranked.c.seq == seq)
