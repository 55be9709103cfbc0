"""Batches: several jobs in one call, followed, cancelled and called back as one.

Each item is a job request of its own (checked as a submit is), so an invalid item is refused with its
reason while the valid ones are queued: the answer is 202 with, per item, its job id or its error. Only
a batch with no valid item at all is refused as a whole (422 listing every item's reason), as are a
batch over ``max_batch_items``, over the owner's ``max_active_jobs`` (every item counts) or an unusable
batch ``webhook_url``; then nothing is created.

``Idempotency-Key`` names the whole batch: the same batch again gets the first answer, a different one
409. The fingerprint is over each item's (:func:`gateway.jobs.idempotency.fingerprint`, or its reason
for a refused item) and the batch webhook, so the JSON and the multipart form of a batch match.

When the last of its jobs ends (succeeds, fails or is cancelled) the batch's webhook is queued in the
same outbox as the jobs' webhooks, once (:meth:`JobStore.end_batch` decides which ending is the last).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from gateway.core.auth import secure_equal
from gateway.core.errors import ApiError
from gateway.jobs.idempotency import fingerprint
from gateway.jobs.schemas import (
    BatchAccepted,
    BatchItemAccepted,
    BatchItemStatus,
    BatchStatus,
    SubmitOptions,
)
from gateway.jobs.service import CANCELLED_BY_CLIENT, JobService, StageInputs
from gateway.jobs.storage import is_job_id
from gateway.store import STATES, Batch, BatchItem, QuotaExceeded, new_job_id

ItemRequest = tuple[SubmitOptions, StageInputs] | ApiError
"""One item as a route parsed it: its options and how to write its files, or why it cannot be read."""

REFUSED = "Refused"
"""The ``counts`` key of items refused at submit (no job)."""
GONE = "the job ended more than retention_h ago and was deleted"
NO_BATCH = "no such batch_id for this API key"
BAD_BATCH_ID = "batch_id is not a valid batch id"


def too_many_items(given: int, limit: int) -> ApiError:
    return ApiError(422, f"the batch has {given} items; at most {limit} are allowed (max_batch_items)")


class BatchService:
    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs
        self.store = jobs.store
        self.settings = jobs.settings

    def submit(
        self,
        owner: str,
        items: Sequence[ItemRequest],
        webhook_url: str | None,
        idempotency_key: str | None,
    ) -> BatchAccepted:
        """Stage and check every item, then queue the valid ones as one batch (one transaction)."""
        if len(items) > self.settings.max_batch_items:
            raise too_many_items(len(items), self.settings.max_batch_items)
        self.jobs.quotas.count_submits(owner, len(items))
        errors: dict[int, str] = {}
        staged: dict[int, tuple[SubmitOptions, Path, str]] = {}
        with ExitStack() as folders:
            for index, item in enumerate(items):
                if isinstance(item, ApiError):
                    errors[index] = item.reason
                    continue
                options, stage_inputs = item
                folder = folders.enter_context(self.jobs.staging())
                try:
                    with self.jobs.refusals():
                        staged[index] = (options, folder, fingerprint(options, *stage_inputs(folder)))
                except ApiError as exc:
                    if exc.status_code >= 500:
                        raise
                    errors[index] = exc.reason
            request_hash = _batch_fingerprint(len(items), staged, errors, webhook_url)
            replayed = self._replay(owner, idempotency_key, request_hash)
            if replayed is not None:
                return self.accepted(replayed)
            with self.jobs.refusals():
                webhook = self.jobs.webhooks.admit(webhook_url)
            accepted = self._admit(staged, errors)
        if not accepted:
            listed = "; ".join(f"items[{index}]: {reason}" for index, reason in sorted(errors.items()))
            raise ApiError(422, f"no item of the batch can run: {listed}")
        batch_id = new_job_id()
        try:
            batch, created = self.store.create_batch(
                batch_id,
                owner,
                accepted,
                len(items),
                errors,
                webhook,
                idempotency_key,
                request_hash,
                max_active=self.settings.max_active_jobs,
            )
        except QuotaExceeded:
            self._drop(accepted)
            raise ApiError(
                429,
                f"the batch's {len(accepted)} jobs would take this API key over {self.settings.max_active_jobs} "
                "queued or running jobs (max_active_jobs); wait for some to end, cancel some or send fewer items",
                {"Retry-After": str(self.settings.quota_retry_after_s)},
            ) from None
        if not created:  # the same key raced us: that batch stands, these uploads go
            self._drop(accepted)
            self._replay(owner, idempotency_key, request_hash)
        self.jobs.on_queued()
        return self.accepted(batch)

    def _admit(self, staged: dict[int, tuple[SubmitOptions, Path, str]], errors: dict[int, str]) -> list[BatchItem]:
        """Check each staged item by content and move it into place; the refused ones' reasons go to ``errors``."""
        accepted: list[BatchItem] = []
        try:
            for index, (options, folder, item_hash) in sorted(staged.items()):
                try:
                    with self.jobs.refusals():
                        job_id, webhook = self.jobs.admit(folder, options)
                except ApiError as exc:
                    if exc.status_code >= 500:
                        raise
                    errors[index] = exc.reason
                    continue
                accepted.append(BatchItem(index, job_id, self.jobs.params(options), webhook, item_hash))
        except BaseException:
            self._drop(accepted)
            raise
        return accepted

    def _drop(self, items: Sequence[BatchItem]) -> None:
        for item in items:
            self.jobs.data.drop_inputs(item.job_id)

    def _replay(self, owner: str, idempotency_key: str | None, request_hash: str) -> Batch | None:
        existing = self.store.find_idempotent_batch(owner, idempotency_key)
        if existing is None:
            return None
        if not secure_equal(existing.request_hash, request_hash):
            raise ApiError(
                409,
                "this Idempotency-Key was already used with a different batch (items, inputs or options); "
                "send the same batch again, or use a new key for a new batch",
            )
        return existing

    def accepted(self, batch: Batch) -> BatchAccepted:
        """The submit's answer: per item its job id or its reason."""
        jobs = {job.batch_index: job.id for job in self.store.batch_jobs(batch.id)}
        return BatchAccepted(
            batch_id=batch.id,
            items=[
                BatchItemAccepted(index=index, request_id=jobs.get(index), error=batch.errors.get(index))
                for index in range(batch.size)
            ],
        )

    def owned(self, batch_id: str, owner: str) -> Batch:
        """The batch if ``owner`` submitted it; another key's batch is as unknown as a missing one (404)."""
        if not is_job_id(batch_id):
            raise ApiError(400, BAD_BATCH_ID)
        batch = self.store.get_batch(batch_id)
        if batch is None or not secure_equal(batch.owner, owner):
            raise ApiError(404, NO_BATCH)
        return batch

    def view(self, batch: Batch) -> BatchStatus:
        """Per item its job's status and result URL, or why it was refused; counts per status."""
        jobs = {job.batch_index: job for job in self.store.batch_jobs(batch.id)}
        counts = dict.fromkeys((*STATES, REFUSED), 0)
        items = []
        for index in range(batch.size):
            job = jobs.get(index)
            if job is None:  # refused, or its row already deleted after the retention time
                counts[REFUSED] += index in batch.errors
                items.append(
                    BatchItemStatus(
                        index=index,
                        request_id=None,
                        error=batch.errors.get(index, GONE),
                        status=None,
                        reason=None,
                        progress=None,
                        result_url=None,
                    )
                )
                continue
            counts[job.status] += 1
            shown = self.jobs.view(job)
            items.append(
                BatchItemStatus(
                    index=index,
                    request_id=job.id,
                    error=None,
                    status=job.status,
                    reason=shown.reason,
                    progress=shown.progress,
                    result_url=shown.results.video[0].url if shown.results else None,
                )
            )
        return BatchStatus(
            batch_id=batch.id,
            finished=not any(job.status in ("InQueue", "InProgress") for job in jobs.values()),
            counts=counts,
            created_at=round(batch.created_at, 3),
            finished_at=None if batch.finished_at is None else round(batch.finished_at, 3),
            items=items,
        )

    def cancel(self, batch: Batch) -> BatchStatus:
        """Cancel every queued or running item (the ended ones stay as they are); 409 when none was left."""
        cancelled = self.store.cancel_batch(batch.id, CANCELLED_BY_CLIENT)
        if not cancelled:
            raise ApiError(409, "the batch has already finished (no item is queued or running)")
        for job_id in cancelled:
            self.jobs.cancelled(job_id)
        return self.view(self.store.get_batch(batch.id) or batch)

    def job_ended(self, batch_id: str) -> None:
        """One of the batch's jobs ended (committed): if it was the last, mark the batch ended and queue its webhook."""
        if not self.store.end_batch(batch_id):
            return
        batch = self.store.get_batch(batch_id)
        if batch is not None and batch.webhook_url:
            self.jobs.webhooks.send_to(batch.id, batch.owner, batch.webhook_url, self.view(batch))

    def settle(self) -> None:
        """At start: end the batches whose last job ended just before the last stop (their webhook not yet queued)."""
        for batch_id in self.store.open_batches():
            self.job_ended(batch_id)


def _batch_fingerprint(
    size: int,
    staged: dict[int, tuple[SubmitOptions, Path, str]],
    errors: dict[int, str],
    webhook_url: str | None,
) -> str:
    items = [staged[index][2] if index in staged else f"refused: {errors[index]}" for index in range(size)]
    canonical = json.dumps({"items": items, "webhook_url": webhook_url}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
