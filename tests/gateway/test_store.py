"""The job store's contract, the same tests on SQLite and on a real PostgreSQL server (:mod:`support.postgres_server`):
states and their guards, leases and re-queues, attempts, exactly-once claims with two stores (two gateways)
on one database, quotas, the webhook outbox and its leases, retention, migrations."""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from gateway.jobs.storage import DataDir
from gateway.store import BatchItem, JobStore, QuotaExceeded, new_job_id, sqlite_url
from gateway.store.schema import metadata

PARAMS = {"inference_steps": 1, "guidance_scale": 1.5, "seed": 1, "loop_mode": None, "version": None}
LEASE_S = 5
_names = itertools.count()

OpenStore = Callable[..., JobStore]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request, tmp_path) -> str:
    """The URL of an empty database of each kind."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "jobs.db")
    return request.getfixturevalue("postgres").new_database(f"store_{os.getpid()}_{next(_names)}")


@pytest.fixture
def open_store(database) -> Iterator[OpenStore]:
    """Opens a store on the test's database (as a gateway would); all are closed after the test."""
    opened: list[JobStore] = []

    def open_(**options) -> JobStore:
        opened.append(JobStore(database, **{"lease_s": LEASE_S} | options))
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store) -> JobStore:
    return open_store()


@pytest.fixture
def stores(open_store) -> tuple[JobStore, JobStore]:
    """Two stores on one database, opened at once as two gateways starting together (both migrate)."""
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: open_store(), range(2))
    return first, second


def queue(store: JobStore, owner: str = "a", key: str | None = None) -> str:
    return store.create(new_job_id(), owner, PARAMS, idempotency_key=key)[0].id


def test_the_migrations_make_the_schema_the_store_describes(store, database) -> None:
    engine = create_engine(database)
    with engine.connect() as db:
        assert compare_metadata(MigrationContext.configure(db), metadata) == []
    engine.dispose()


def test_jobs_survive_reopening_and_sqlite_runs_in_wal_mode(open_store, database) -> None:
    job_id = queue(open_store())
    assert open_store().get(job_id).status == "InQueue"
    if database.startswith("sqlite"):
        with sqlite3.connect(database.removeprefix("sqlite:///")) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_one_owners_jobs_run_in_submission_order_and_queue_positions_follow(store) -> None:
    first, second, third = queue(store), queue(store), queue(store)
    assert [store.queue_position(store.get(j)) for j in (first, second, third)] == [1, 2, 3]
    claimed = store.claim_next()
    assert claimed.id == first and claimed.status == "InProgress" and claimed.attempts == 1
    assert claimed.claimed_by == store.claimant
    assert [store.queue_position(store.get(j)) for j in (first, second, third)] == [0, 1, 2]
    store.cancel(second, "by test")
    assert store.queue_position(store.get(third)) == 1
    assert store.claim_next().id == third
    assert store.claim_next() is None


def test_a_cancelled_running_job_stays_cancelled_whatever_its_worker_reports(store) -> None:
    job_id = queue(store)
    store.claim_next()
    store.set_progress(job_id, 0.5, "generate")
    assert store.cancel(job_id, "by test")
    assert not store.cancel(job_id, "again")
    assert not store.is_running(job_id)
    assert store.succeed(job_id, 1.0, {}) is False
    assert store.fail(job_id, "late") is False
    store.set_progress(job_id, 0.9, "generate")
    job = store.get(job_id)
    assert (job.status, job.reason, job.progress) == ("Cancelled", "by test", 0.5)


def test_progress_never_goes_back(store) -> None:
    job_id = queue(store)
    store.claim_next()
    store.set_progress(job_id, 0.6, "generate", eta_s=3.0)
    store.set_progress(job_id, 0.4, "generate")
    job = store.get(job_id)
    assert (job.progress, job.eta_s) == (0.6, None)


def test_success_gives_an_unguessable_download_token(store) -> None:
    tokens = set()
    for _ in range(2):
        job_id = queue(store)
        store.claim_next()
        assert store.succeed(job_id, 2.5, {"frames": 50})
        job = store.get(job_id)
        assert job.status == "Succeed" and job.info == {"frames": 50} and len(job.result_token) >= 40
        assert job.progress == 1.0 and job.lease_until is None
        tokens.add(job.result_token)
    assert len(tokens) == 2


def test_an_idempotency_key_is_per_owner_and_keeps_the_request_hash(store) -> None:
    first, created = store.create(new_job_id(), "a", PARAMS, idempotency_key="k1", request_hash="h1")
    job, created_again = store.create(new_job_id(), "a", PARAMS, idempotency_key="k1", request_hash="h2")
    assert created and not created_again and job.id == first.id and job.request_hash == "h1"
    assert store.find_idempotent("a", "k1").request_hash == "h1" and store.find_idempotent("a", None) is None
    assert queue(store, "b", "k1") != first.id
    assert queue(store, "a") != queue(store, "a")  # no key: always a new job


def test_the_quota_counts_queued_and_running_jobs_per_owner(store) -> None:
    first = queue(store)
    store.create(new_job_id(), "a", PARAMS, max_active=2)
    store.claim_next()
    assert store.active_jobs("a") == 2 and store.active_jobs("b") == 0
    with pytest.raises(QuotaExceeded):
        store.create(new_job_id(), "a", PARAMS, max_active=2)
    store.create(new_job_id(), "b", PARAMS, max_active=2)  # per owner
    store.cancel(first, "test")
    store.create(new_job_id(), "a", PARAMS, max_active=2)  # an ended job frees its place
    assert store.counts() == {"InQueue": 3, "InProgress": 0, "Succeed": 0, "Failed": 0, "Cancelled": 1}


def test_the_quota_holds_across_gateways(stores) -> None:
    def submit(store: JobStore) -> bool:
        try:
            store.create(new_job_id(), "a", PARAMS, max_active=5)
            return True
        except QuotaExceeded:
            return False

    with ThreadPoolExecutor(8) as pool:
        accepted = sum(pool.map(submit, list(stores) * 10))
    assert accepted == 5


def test_concurrent_claims_on_two_stores_hand_out_each_job_exactly_once(stores) -> None:
    queued = [queue(stores[0], owner) for owner in "abcd" * 10]

    def drain(store: JobStore) -> list[str]:
        claimed = []
        while (job := store.claim_next()) is not None:
            assert job.claimed_by == store.claimant
            claimed.append(job.id)
        return claimed

    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(drain, list(stores) * 4))
    assert sorted(itertools.chain.from_iterable(claims)) == sorted(queued)  # each exactly once
    assert stores[1].counts()["InProgress"] == 40


def test_only_the_claiming_store_ends_a_job_but_either_cancels_it(stores) -> None:
    first, second = stores
    running, other = queue(first), queue(first)
    assert first.claim_next().id == running
    assert first.is_running(running) and not second.is_running(running)
    assert not second.succeed(running, 1.0, {}) and not second.fail(running, "no") and not second.requeue(running, "no")
    first.set_progress(running, 0.5, "sampling")
    second.set_progress(running, 0.9, "sampling")
    assert second.get(running).progress == 0.5
    assert second.cancel(running, "cancelled by the client")
    assert not first.is_running(running)  # the owning worker sees it and stops its stream
    assert not first.succeed(running, 1.0, {})
    assert second.get(running).status == "Cancelled"
    assert second.claim_next().id == other


def test_a_requeued_job_keeps_its_place_and_a_job_stopped_on_purpose_its_attempt(store) -> None:
    job_id, waiting = queue(store), queue(store)
    store.claim_next()
    assert store.requeue(job_id, "re-queued: Triton was unavailable")
    assert store.claim_next().id == job_id  # before `waiting`: attempt 2
    assert store.requeue(job_id, "re-queued: the gateway stopped while the job ran", refund=True)
    assert store.get(job_id).attempts == 1 and store.get(job_id).claimed_by is None
    assert store.claim_next().attempts == 2
    assert store.get(waiting).status == "InQueue"


def test_expired_leases_are_requeued_by_one_gateway_once_and_fail_out_of_attempts(stores) -> None:
    dead, alive = stores
    first, second, waiting = queue(dead), queue(dead), queue(dead)
    assert dead.claim_next().id == first
    assert alive.claim_next().id == second
    later = time.time() + LEASE_S + 1
    assert alive.renew_leases() == 1
    assert alive.recover(max_attempts=2) == ([], [])  # nothing expired yet
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda store: store.recover(2, now=later), stores))
    requeued = list(itertools.chain.from_iterable(requeued for requeued, _ in outcomes))
    assert sorted(requeued) == sorted([first, second])  # each job re-queued by exactly one gateway
    job = alive.get(first)
    assert (job.status, job.claimed_by, job.attempts, job.progress) == ("InQueue", None, 1, 0)
    assert "lease ran out" in job.reason
    assert not dead.succeed(first, 1.0, {})  # the dead gateway's late answer changes nothing
    assert alive.claim_next().id == first  # attempt 2
    assert alive.recover(2, now=time.time() + LEASE_S + 1) == ([], [first])  # out of attempts: failed
    failed = alive.get(first)
    assert failed.status == "Failed" and "stopped, 2 times" in failed.reason
    assert alive.get(waiting).status == "InQueue" and alive.counts()["InProgress"] == 0


def test_renewed_leases_keep_running_jobs(stores) -> None:
    first, second = stores
    job_id = queue(first)
    first.claim_next()
    before = first.get(job_id).lease_until
    deadline = time.monotonic() + 5
    while time.time() <= before - LEASE_S:  # the clock moves on before the renewal
        assert time.monotonic() < deadline
    assert first.renew_leases() == 1 and second.renew_leases() == 0
    assert first.get(job_id).lease_until > before
    assert second.recover(2) == ([], [])


def test_the_outbox_keeps_one_delivery_per_job_ranked_per_owner(open_store) -> None:
    store = open_store()
    jobs = [store.create(new_job_id(), owner, PARAMS, webhook_url="http://x/")[0].id for owner in "aaab"]
    for job_id in jobs:
        store.cancel(job_id, "by test")
    assert store.unnotified() == jobs
    deliveries = [store.enqueue_webhook(job, owner, "http://x/", "{}") for job, owner in zip(jobs, "aaab", strict=True)]
    assert store.enqueue_webhook(jobs[0], "a", "http://y/", "{}").id == deliveries[0].id  # one per job
    assert store.unnotified() == [] and store.get(jobs[0]).webhook_state == "pending"
    now = time.time() + 1
    assert store.due_webhooks(now, [deliveries[0].id], ["b"], 1, 10) == [deliveries[1]]  # one of a's; b saturated
    assert store.due_webhooks(now, [], [], 2, 10) == [deliveries[0], deliveries[2], deliveries[3]]  # 1 is leased
    store.webhook_retry(deliveries[0].id, "HTTP 500", now + 100)
    store.webhook_delivered(deliveries[1].id)
    store.webhook_failed(deliveries[2].id, "HTTP 410")
    assert store.next_webhook_due([deliveries[3].id]) == pytest.approx(now + 100)
    reopened = open_store()
    first = reopened.delivery(jobs[0])
    assert (first.state, first.attempts, first.last_error, first.next_attempt_at) == ("pending", 1, "HTTP 500", now + 100)
    assert reopened.get(jobs[1]).webhook_state == "delivered" and reopened.delivery(jobs[1]).finished_at is not None
    assert reopened.get(jobs[2]).webhook_state == "failed: HTTP 410"


def test_webhooks_are_leased_to_one_gateway_at_a_time_until_sent_or_handed_back(stores) -> None:
    first, second = stores
    owners = "aabbc"
    jobs = [queue(first, owner) for owner in owners]
    for job_id, owner in zip(jobs, owners, strict=True):
        first.enqueue_webhook(job_id, owner, "http://x/", "{}")
    now = time.time() + 1
    with ThreadPoolExecutor(2) as pool:
        taken = list(pool.map(lambda store: store.due_webhooks(now, [], [], 10, 10), stores))
    assert sorted(d.job_id for batch in taken for d in batch) == sorted(jobs)  # every delivery once, none twice
    assert second.due_webhooks(now, [], [], 10, 10) == [] == first.due_webhooks(now, [], [], 10, 10)
    holder, batch = (first, taken[0]) if taken[0] else (second, taken[1])
    holder.webhook_retry(batch[0].id, "HTTP 500", now)
    other = second if holder is first else first
    assert [d.id for d in other.due_webhooks(now + 1, [], [], 10, 10)] == [batch[0].id]  # released by the retry
    assert first.next_webhook_due([]) >= now  # the rest are held until their lease runs out
    rest = sorted(set(jobs) - {batch[0].job_id})
    assert sorted(d.job_id for d in first.due_webhooks(now + LEASE_S + 1, [], [], 10, 10)) == rest  # then anyone's
    first.release_webhooks()  # its sender stopped: the deliveries go back at once
    held_by_first = rest + ([batch[0].job_id] if other is first else [])
    assert sorted(d.job_id for d in second.due_webhooks(now, [], [], 10, 10)) == sorted(held_by_first)


def test_retention_deletes_old_finished_jobs_with_their_deliveries_and_orphan_files_only(tmp_path, stores) -> None:
    store, other = stores
    data = DataDir(tmp_path / "data")
    old, recent, running = queue(store), queue(store), queue(store)
    for job_id in (old, recent, running):
        staged = data.staging()
        (staged / "video").write_bytes(b"v")
        (staged / "audio").write_bytes(b"a")
        data.adopt(staged, job_id)
    for _ in range(3):
        store.claim_next()
    for job_id in (old, recent):
        data.write_result(job_id, b"mp4")
        store.succeed(job_id, 1.0, {})
    store.enqueue_webhook(old, "a", "http://x/", "{}")
    orphan = data.result(new_job_id())
    orphan.write_bytes(b"left over")
    an_hour_ago = time.time() - 3600
    os.utime(orphan, (an_hour_ago, an_hour_ago))
    assert data.cleanup(store, retention_s=1800, now=time.time() + 1000) == 0  # `old` and `recent` finished ~now
    assert data.result(old).is_file()
    with ThreadPoolExecutor(2) as pool:
        deleted = list(pool.map(lambda s: s.delete_finished(time.time() + 2000), (store, other)))
    assert sorted(deleted[0] + deleted[1]) == sorted([old, recent])  # each deleted by one gateway
    assert data.cleanup(store, retention_s=1800, now=time.time() + 2000) == 0  # rows gone: their files go as orphans
    assert store.get(old) is None and store.delivery(old) is None and not data.result(old).exists()
    assert not data.inputs(old).exists() and store.all_ids() == {running}
    assert store.get(running).status == "InProgress" and data.video(running).is_file()
    assert not orphan.exists()


def test_a_jobs_db_made_before_migrations_opens_with_its_rows(tmp_path) -> None:
    path = tmp_path / "jobs.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,"
        " idempotency_key TEXT, status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', progress REAL NOT NULL DEFAULT 0,"
        " stage TEXT NOT NULL DEFAULT '', params TEXT NOT NULL, webhook_url TEXT, webhook_state TEXT,"
        " attempts INTEGER NOT NULL DEFAULT 0, result_token TEXT, inference_s REAL, info TEXT, created_at REAL NOT NULL,"
        " started_at REAL, finished_at REAL, claimed_by TEXT, lease_until REAL, UNIQUE (owner, idempotency_key));"
        "CREATE INDEX jobs_status ON jobs (status, seq);"
        "INSERT INTO jobs (seq, id, owner, idempotency_key, status, params, created_at, claimed_by, lease_until)"
        " VALUES (7, '0123456789abcdef0123456789abcdef', 'a', 'k', 'InProgress', '{}', 0, 'gone', 1);"
    )
    old.commit()
    old.close()
    store = JobStore(sqlite_url(path))
    try:
        kept = store.find_idempotent("a", "k")
        assert (kept.seq, kept.request_hash, kept.claimed_by) == (7, None, "gone")
        assert store.recover(2) == ([kept.id], [])  # its gateway's lease is long gone
        job, created = store.create(new_job_id(), "a", PARAMS, request_hash="h")
        assert created and job.request_hash == "h" and job.seq == 8
        store.enqueue_webhook(job.id, "a", "http://x/", "{}")  # the outbox exists, leases included
        assert store.due_webhooks(time.time() + 1, [], [], 1, 1)[0].job_id == job.id
    finally:
        store.close()
    engine = create_engine(sqlite_url(path))
    with engine.connect() as db:
        assert compare_metadata(MigrationContext.configure(db), metadata) == []
    engine.dispose()


def test_sqlite_claims_from_many_threads_hand_out_each_job_once(tmp_path) -> None:
    """One store's threads share its one SQLite connection (serialised), as the worker's threads do."""
    store = JobStore(sqlite_url(tmp_path / "jobs.db"))
    ids = {queue(store) for _ in range(40)}
    claimed: list[str] = []

    def claim() -> None:
        while (job := store.claim_next()) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert sorted(claimed) == sorted(ids)


def positions(store: JobStore, job_ids: list[str]) -> list[int]:
    return [store.queue_position(store.get(job_id)) for job_id in job_ids]


def test_a_key_with_one_job_goes_before_another_keys_queue_and_positions_follow_the_claims(open_store) -> None:
    store = open_store()
    busy = [queue(store, "b") for _ in range(16)]
    assert store.claim_next().id == busy[0]  # b runs one job and has 15 queued
    late = queue(store, "a")
    assert store.queue_position(store.get(late)) == 1
    assert positions(store, busy[1:]) == list(range(2, 17))
    assert store.claim_next().id == late  # a runs nothing: its job is next
    assert store.claim_next().id == busy[1]
    for job_id in (busy[0], late, busy[1]):
        store.succeed(job_id, 1.0, {})  # nobody runs anything now, but b's last job started after a's
    again = queue(store, "a")
    assert store.claim_next().id == again


def test_fair_share_round_robins_owners_in_the_order_the_positions_promised(open_store) -> None:
    store = open_store()
    submitted = [queue(store, owner) for owner in "aaaabbc"]
    store.claim_next()  # a's first
    queued = submitted[1:]
    promised = sorted(queued, key=lambda job_id: store.queue_position(store.get(job_id)))
    assert sorted(positions(store, queued)) == list(range(1, len(queued) + 1))
    claimed = [store.claim_next().id for _ in queued]
    assert claimed == promised
    owners = {job_id: owner for job_id, owner in zip(submitted, "aaaabbc", strict=True)}
    assert "".join(owners[job_id] for job_id in claimed) == "bcabaa"  # a, b, c, then round by round


def test_fair_share_holds_across_two_gateways(stores) -> None:
    first, second = stores
    busy = [queue(first, "b") for _ in range(6)]
    first.claim_next()
    second.claim_next()
    late = queue(second, "a")
    assert first.claim_next().id == late and second.claim_next().id == busy[2]


def test_the_fifo_policy_keeps_submission_order(open_store) -> None:
    store = open_store(queue_policy="fifo")
    submitted = [queue(store, owner) for owner in "bbba"]
    store.claim_next()
    assert positions(store, submitted) == [0, 1, 2, 3]
    assert [store.claim_next().id for _ in range(3)] == submitted[1:]


def test_an_owners_jobs_are_listed_newest_first_a_page_after_a_given_job(store) -> None:
    mine = [queue(store, "a") for _ in range(5)]
    queue(store, "b")
    newest_first = [store.get(job_id) for job_id in reversed(mine)]
    assert [job.id for job in store.recent("a", 10)] == [job.id for job in newest_first]
    after = newest_first[1]
    queue(store, "a")  # a later submit is not on the pages after the first
    assert [job.id for job in store.recent("a", 2, (after.created_at, after.id))] == [job.id for job in newest_first[2:4]]
    last = newest_first[-1]
    assert store.recent("a", 2, (last.created_at, last.id)) == []


def test_reused_owner_figures_follow_the_stores_own_changes_at_once_and_others_after_their_ttl(stores) -> None:
    first, second = stores
    first.position_ttl_s = 3600
    busy = [queue(first, "b") for _ in range(3)]
    assert positions(first, busy) == [1, 2, 3]
    first.claim_next()
    assert positions(first, busy) == [0, 1, 2]  # its own claim shows at once
    queue(second, "a")  # another gateway's: a runs nothing, so its job goes before b's queued ones
    assert positions(first, busy[1:]) == [1, 2]  # the figures read before it are still reused
    first.position_ttl_s = 0
    assert positions(first, busy[1:]) == [2, 3]


def batch_items(count: int, start: int = 0) -> list[BatchItem]:
    return [BatchItem(start + index, new_job_id(), PARAMS, None, f"hash-{index}") for index in range(count)]


def test_a_batch_queues_all_its_items_or_none_within_the_quota(store) -> None:
    queue(store, "a")
    with pytest.raises(QuotaExceeded):
        store.create_batch(new_job_id(), "a", batch_items(3), 3, {}, max_active=3)
    assert store.active_jobs("a") == 1 and store.open_batches() == []  # nothing of the refused batch
    batch, created = store.create_batch(new_job_id(), "a", batch_items(2, start=1), 3, {0: "bad video"}, max_active=3)
    assert created and batch.errors == {0: "bad video"} and batch.size == 3
    assert [(job.batch_index, job.status) for job in store.batch_jobs(batch.id)] == [(1, "InQueue"), (2, "InQueue")]


def test_a_batch_key_names_one_batch_per_owner(store) -> None:
    first, created = store.create_batch(new_job_id(), "a", batch_items(1), 1, {}, idempotency_key="k", request_hash="h")
    again, created_again = store.create_batch(new_job_id(), "a", batch_items(1), 1, {}, idempotency_key="k")
    assert created and not created_again and again.id == first.id and len(store.batch_jobs(first.id)) == 1
    other, created_other = store.create_batch(new_job_id(), "b", batch_items(1), 1, {}, idempotency_key="k")
    assert created_other and other.id != first.id


def test_only_the_last_ending_of_a_batch_ends_it_even_when_gateways_end_jobs_at_once(stores) -> None:
    first, second = stores
    batch, _ = first.create_batch(new_job_id(), "a", batch_items(6), 6, {})
    jobs = [job.id for job in first.batch_jobs(batch.id)]
    assert not first.end_batch(batch.id)

    def end(args: tuple[JobStore, str]) -> bool:
        store, job_id = args
        store.cancel(job_id, "done")
        return store.end_batch(batch.id)

    with ThreadPoolExecutor(6) as pool:
        ended = list(pool.map(end, [(first if index % 2 else second, job_id) for index, job_id in enumerate(jobs)]))
    assert ended.count(True) == 1 and first.get_batch(batch.id).finished_at is not None
    assert first.open_batches() == [] and not second.end_batch(batch.id)


def test_cancelling_a_batch_leaves_its_ended_jobs_alone(store) -> None:
    batch, _ = store.create_batch(new_job_id(), "a", batch_items(3), 3, {})
    running = store.claim_next()
    assert running is not None and running.batch_id == batch.id
    store.succeed(running.id, 1.0, {"frames": 1})
    cancelled = store.cancel_batch(batch.id, "by the client")
    assert sorted(cancelled) == sorted(job.id for job in store.batch_jobs(batch.id) if job.id != running.id)
    assert store.get(running.id).status == "Succeed" and store.cancel_batch(batch.id, "again") == []


def test_retention_deletes_ended_batches_with_their_webhook(store) -> None:
    batch, _ = store.create_batch(new_job_id(), "a", batch_items(1), 1, {}, webhook_url="http://hook.example/")
    store.cancel_batch(batch.id, "gone")
    assert store.end_batch(batch.id)
    store.enqueue_webhook(batch.id, "a", "http://hook.example/", "{}")
    assert store.get_batch(batch.id).webhook_state == "pending"
    store.delete_finished(time.time() + 1)
    assert store.get_batch(batch.id) is None and store.delivery(batch.id) is None


def test_estimates_read_recent_successes_and_running_etas(store) -> None:
    done = queue(store)
    queue(store)
    store.claim_next()
    store.succeed(done, 2.0, {"frames": 5, "stages": {"generate": 1.0}, "steps": 1})
    running = store.claim_next()
    store.set_progress(running.id, 0.5, "generate", 3.0)
    assert [job.id for job in store.recent_succeeded(10)] == [done]
    assert store.running_etas() == [3.0]
