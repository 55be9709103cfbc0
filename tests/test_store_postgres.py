"""The PostgreSQL job table with two stores on it (two gateways): claims, leases, cancel, retention and
webhook claims never hand the same row to both. A real PostgreSQL server (:mod:`postgres_server`)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.store import QuotaExceeded, new_job_id
from gateway.store import JobStore as PostgresJobStore

pytestmark = pytest.mark.postgres

PARAMS = {"inference_steps": 1}
_names = itertools.count()


@pytest.fixture
def stores(postgres) -> Iterator[tuple[PostgresJobStore, PostgresJobStore]]:
    """Two stores on one fresh database, as two gateways would open it (both migrate; one does the work)."""
    url = postgres.new_database(f"jobs_{next(_names)}")
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: PostgresJobStore(url, lease_s=5), range(2))
    yield first, second
    first.close()
    second.close()


def queue(store: PostgresJobStore, owner: str = "a") -> str:
    return store.create(new_job_id(), owner, PARAMS)[0].id


def test_concurrent_claims_never_hand_out_the_same_job(stores) -> None:
    queued = [queue(stores[0]) for _ in range(40)]

    def drain(store: PostgresJobStore) -> list[str]:
        claimed = []
        while (job := store.claim_next()) is not None:
            assert job.claimed_by == store.claimant
            claimed.append(job.id)
        return claimed

    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(drain, [stores[0], stores[1]] * 4))
    everything = [job_id for claimed in claims for job_id in claimed]
    assert sorted(everything) == sorted(queued)  # each exactly once
    assert stores[1].counts()["InProgress"] == 40


def test_only_the_claiming_store_ends_a_job_but_either_cancels_it(stores) -> None:
    first, second = stores
    running, other = queue(first), queue(first)
    assert first.claim_next().id == running
    assert first.is_running(running) and not second.is_running(running)
    assert not second.succeed(running, 1.0, {}) and not second.requeue(running, "no")
    first.set_progress(running, 0.5, "sampling")
    assert second.get(running).progress == 0.5
    assert second.cancel(running, "cancelled by the client")
    assert not first.is_running(running)  # the owning worker sees it and stops its stream
    assert not first.succeed(running, 1.0, {})
    assert second.get(running).status == "Cancelled"
    assert second.claim_next().id == other


def test_an_expired_lease_is_requeued_once_and_respects_attempts(stores) -> None:
    dead, alive = stores
    first, second = queue(dead), queue(dead)
    assert dead.claim_next().id == first
    assert alive.claim_next().id == second
    later = time.time() + dead.lease_s + 1
    alive.renew_leases()
    assert alive.recover(max_attempts=2) == ([], [])  # nothing expired yet
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda store: store.recover(2, now=later), stores))
    requeued = list(itertools.chain.from_iterable(requeued for requeued, _ in outcomes))
    assert sorted(requeued) == sorted([first, second])  # each job re-queued by exactly one gateway
    job = alive.get(first)
    assert (job.status, job.claimed_by, job.attempts) == ("InQueue", None, 1) and "lease ran out" in job.reason
    assert not dead.succeed(first, 1.0, {})  # the dead gateway's late answer changes nothing
    assert alive.claim_next().id == first  # attempt 2
    assert alive.recover(2, now=time.time() + alive.lease_s + 1)[1] == [first]  # out of attempts: failed
    assert alive.get(first).status == "Failed"


def test_renewed_leases_keep_running_jobs(stores) -> None:
    first, second = stores
    job_id = queue(first)
    first.claim_next()
    before = first.get(job_id).lease_until
    time.sleep(0.05)
    assert first.renew_leases() == 1 and second.renew_leases() == 0
    assert first.get(job_id).lease_until > before
    assert second.recover(2) == ([], [])


def test_webhooks_are_claimed_by_one_gateway_at_a_time(stores) -> None:
    first, second = stores
    jobs = [queue(first, owner) for owner in "aabbc"]
    for job_id, owner in zip(jobs, "aabbc", strict=True):
        first.enqueue_webhook(job_id, owner, "http://x/", "{}")
    now = time.time() + 1
    with ThreadPoolExecutor(2) as pool:
        taken = list(pool.map(lambda store: store.due_webhooks(now, [], [], 10, 10), stores))
    ids = [d.job_id for batch in taken for d in batch]
    assert sorted(ids) == sorted(jobs)  # every delivery once, none twice
    assert second.due_webhooks(now, [], [], 10, 10) == [] == first.due_webhooks(now, [], [], 10, 10)
    delivery = taken[0][0] if taken[0] else taken[1][0]
    (first if taken[0] else second).webhook_retry(delivery.id, "HTTP 500", now)
    assert [d.id for d in second.due_webhooks(now + 1, [], [], 10, 10)] == [delivery.id]  # released by the retry
    assert first.next_webhook_due([]) >= now  # the rest are held until their lease runs out
    assert [d.job_id for d in first.due_webhooks(now, [], [], 1, 10)] == []


def test_per_owner_ranking_and_the_outbox_dies_with_its_job(stores) -> None:
    store = stores[0]
    jobs = [queue(store, owner) for owner in "aab"]
    for job_id, owner in zip(jobs, "aab", strict=True):
        store.enqueue_webhook(job_id, owner, "http://x/", "{}")
    assert store.enqueue_webhook(jobs[0], "a", "http://y/", "{}").url == "http://x/"  # one per job
    assert [d.job_id for d in store.due_webhooks(time.time() + 1, [], [], 1, 10)] == [jobs[0], jobs[2]]
    for job_id in jobs:
        store.claim_next()
        store.fail(job_id, "x")
    assert sorted(store.delete_finished(time.time() + 1)) == sorted(jobs)
    assert store.delivery(jobs[0]) is None and store.all_ids() == set()


def test_the_quota_holds_across_gateways(stores) -> None:
    def submit(store: PostgresJobStore) -> bool:
        try:
            store.create(new_job_id(), "a", PARAMS, max_active=5)
            return True
        except QuotaExceeded:
            return False

    with ThreadPoolExecutor(8) as pool:
        accepted = sum(pool.map(submit, list(stores) * 10))
    assert accepted == 5
