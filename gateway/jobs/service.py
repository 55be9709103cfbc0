"""The job service: submit, status, cancel, the owner's recent jobs, the result file, and the webhook
call when a job ends. Routes translate HTTP to these calls; every refusal is an :class:`ApiError`.

A job another key submitted is answered exactly like one that does not exist (404).
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.backends.served import ServedWeights
from gateway.core.auth import ApiKeys, bearer_key, secure_equal
from gateway.core.errors import ApiError
from gateway.core.metrics import Metrics
from gateway.core.settings import GatewaySettings
from gateway.jobs.idempotency import fingerprint
from gateway.jobs.quotas import Quotas
from gateway.jobs.schemas import JobList, JobResults, JobStatus, SubmitOptions, Submitted, Timings, VideoUrl
from gateway.jobs.storage import DataDir, DataDirFull, is_job_id, is_out_of_space
from gateway.jobs.validation import InvalidInput, check_audio, check_video
from gateway.store import (
    CANCELLED,
    IN_PROGRESS,
    IN_QUEUE,
    SUCCEED,
    Job,
    JobStore,
    QuotaExceeded,
    StoreUnavailable,
    new_job_id,
)
from gateway.webhooks.delivery import Webhooks
from gateway.webhooks.targets import WebhookRefused
from lipsync.contract import check_against_video
from lipsync.errors import BadInput
from lipsync.media import MediaSettings, VideoInfo

NOT_FOUND = "no such request_id for this API key"
NO_RESULT = "no result for this request_id"
BAD_ID = "request_id is not a valid request id"

CANCELLED_BY_CLIENT = "cancelled by the client"

BAD_CURSOR = "cursor: not a next_cursor this API gave out"

StageInputs = Callable[[Path], tuple[str, str]]
"""Writes a request's ``video`` and ``audio`` into a staging folder; returns their SHA-256s."""


def _no_space(reason: str) -> ApiError:
    """507 for a submit the data folder has no room for (:class:`gateway.jobs.storage.DataDirFull` or ENOSPC)."""
    return ApiError(507, f"no new jobs for now: {reason}")


class JobService:
    def __init__(
        self,
        settings: GatewaySettings,
        keys: ApiKeys,
        media: MediaSettings,
        data: DataDir,
        store: JobStore,
        quotas: Quotas,
        metrics: Metrics,
        webhooks: Webhooks,
        weights: ServedWeights,
        on_queued: Callable[[], None],
        on_batch_job_ended: Callable[[str], None] = lambda batch_id: None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.media = media
        self.data = data
        self.store = store
        self.quotas = quotas
        self.metrics = metrics
        self.webhooks = webhooks
        self.weights = weights
        self.on_queued = on_queued
        self.on_batch_job_ended = on_batch_job_ended
        """Called with the batch id after a job of a batch ended and its own webhook was queued."""

    def view(self, job: Job, queue_position: int | None = None) -> JobStatus:
        """A job as the status endpoint (and the webhook) shows it; URLs start with the configured base.

        ``weights``: what made the result for a finished job, what Triton serves for the others.
        ``queue_position``: the job's, when the caller read it already (else it is read here).
        """
        results = None
        if job.status == SUCCEED:
            url = f"{self.settings.base_url}/lipsync/result/{job.id}?token={job.result_token}"
            results = JobResults(
                video=[VideoUrl(url=url)],
                timings=Timings(inference=round(job.inference_s or 0.0, 3)),
                face=(job.info or {}).get("face"),
            )
        eta = round(job.eta_s, 1) if job.status == IN_PROGRESS and job.eta_s is not None else None
        return JobStatus(
            request_id=job.id,
            status=job.status,  # type: ignore[arg-type]
            reason=job.reason or None,
            queue_position=self.store.queue_position(job) if queue_position is None else queue_position,
            progress=round(job.progress, 4),
            stage=job.stage or None,
            eta_s=eta,
            weights=(job.info or {}).get("weights", self.weights.value),
            created_at=round(job.created_at, 3),
            results=results,
        )

    def recent(self, owner: str, limit: int, cursor: str | None = None) -> JobList:
        """A page of the owner's jobs, newest first, each as its status shows it, and the cursor of the next
        page (None on the last); counted against the key's rate.

        The cursor is the last listed job's (submission time, id), so a page starts right after it
        whatever was submitted meanwhile.
        """
        self.quotas.count_request(owner, submit=False)
        found = self.store.recent(owner, limit + 1, None if cursor is None else _read_cursor(cursor))
        shown = found[:limit]
        next_cursor = _cursor(shown[-1]) if len(found) > limit else None
        listed = zip(shown, self.store.queue_positions(shown), strict=True)
        return JobList(jobs=[self.view(job, position) for job, position in listed], next_cursor=next_cursor)

    def notify(self, job_id: str) -> None:
        """A job finished (committed): call its webhook, if it has one; tell its batch, if it is in one."""
        job = self.store.get(job_id)
        if job is None:
            return
        if job.webhook_url:
            self.webhooks.send(job, self.view(job))
        if job.batch_id is not None:
            self.on_batch_job_ended(job.batch_id)

    def owned(self, request_id: str, owner: str) -> Job:
        """The job ``request_id`` if ``owner`` submitted it; another key's job is as unknown as a missing one."""
        return _owned(self.store.get(_checked_id(request_id)), owner)

    def status(self, request_id: str, owner: str) -> JobStatus:
        """:meth:`view` of the :meth:`owned` job, the job and its queue position read in one transaction."""
        job, position = self.store.get_with_position(_checked_id(request_id))
        return self.view(_owned(job, owner), position)

    def readable_result(self, request_id: str, token: str | None, authorization: str | None) -> Path:
        """The result file of ``request_id`` for the holder of its token or of its owner's key.

        Every refusal is the same 404 (unknown id, unfinished job, wrong or missing token, a key that
        is not accepted or not the owner's), so the answer never tells whether the job exists.
        """
        job = self.store.get(_checked_id(request_id))
        owner = self.keys.owner(bearer_key(authorization)) if authorization is not None else None
        allowed = (
            job is not None
            and job.status == SUCCEED
            and (
                (token is not None and job.result_token is not None and secure_equal(token, job.result_token))
                or (owner is not None and secure_equal(owner, job.owner))
            )
        )
        path = self.data.result(request_id)
        if not allowed or not path.is_file():
            raise ApiError(404, NO_RESULT)
        return path

    def submit(
        self,
        owner: str,
        options: SubmitOptions,
        stage_inputs: StageInputs,
        idempotency_key: str | None,
    ) -> Submitted:
        """Stage the inputs, check them by content and queue the job.

        With an ``idempotency_key`` this owner used before: the same request gets the first job's id, a
        different one 409. The staging folder never outlives the call.
        """
        with self.staging() as staged, self.refusals():
            request_hash = fingerprint(options, *stage_inputs(staged))
            replayed = self._replay(owner, idempotency_key, request_hash)
            if replayed is not None:
                return Submitted(request_id=replayed.id)
            job_id, webhook = self.admit(staged, options)
        try:
            job, created = self.store.create(
                job_id,
                owner,
                self.params(options),
                webhook,
                idempotency_key,
                request_hash,
                max_active=self.settings.max_active_jobs,
            )
        except QuotaExceeded:
            self.data.drop_inputs(job_id)
            raise self.quotas.too_many_jobs() from None
        except StoreUnavailable:  # answered 503: nothing may stay behind
            self.data.drop_inputs(job_id)
            raise
        if not created:  # the same key raced us: that job stands, this upload goes
            self.data.drop_inputs(job_id)
            self._replay(owner, idempotency_key, request_hash)
        self.on_queued()
        return Submitted(request_id=job.id)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh staging folder in the data folder (507 when it has no room), removed when the block ends."""
        try:
            self.data.check_space()
            staged = self.data.staging()
        except DataDirFull as exc:
            raise _no_space(str(exc)) from None
        except OSError as exc:
            if is_out_of_space(exc):
                raise _no_space(f"the data folder ran out of space ({exc.strerror})") from None
            raise
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    @contextmanager
    def refusals(self) -> Iterator[None]:
        """Inside the block, inputs the client must fix become its 4xx :class:`ApiError`, a full disk 507."""
        try:
            yield
        except InvalidInput as exc:
            raise ApiError.of(exc) from None
        except WebhookRefused as exc:
            raise ApiError(400, str(exc)) from None
        except OSError as exc:
            if is_out_of_space(exc):
                raise _no_space(f"the data folder ran out of space ({exc.strerror})") from None
            raise

    def admit(self, staged: Path, options: SubmitOptions) -> tuple[str, str | None]:
        """Check staged inputs by content and move them to a new job's folder: ``(job id, webhook URL)``.

        Raises :class:`InvalidInput` or :class:`WebhookRefused` (:meth:`refusals` turns them into 4xx)."""
        webhook = self.webhooks.admit(str(options.webhook_url) if options.webhook_url else None)
        video = check_video(staged / "video", "video_source", self.media)
        check_face_choice(options, video)
        check_audio(staged / "audio", "audio_source", self.media)
        job_id = new_job_id()
        self.data.adopt(staged, job_id)
        return job_id, webhook

    def _replay(self, owner: str, idempotency_key: str | None, request_hash: str) -> Job | None:
        """The job this owner's ``idempotency_key`` already names, if the request is the same; 409 if not."""
        existing = self.store.find_idempotent(owner, idempotency_key)
        if existing is None:
            return None
        if existing.request_hash is not None and not secure_equal(existing.request_hash, request_hash):
            raise ApiError(
                409,
                "this Idempotency-Key was already used with a different request (inputs or options); "
                "send the same request again, or use a new key for a new job",
            )
        return existing

    @staticmethod
    def params(options: SubmitOptions) -> dict[str, Any]:
        """The job options (:data:`lipsync.contract.OPTIONS`) by name; ``None``: the served configuration decides."""
        return options.model_dump(exclude={"webhook_url"})

    def cancel(self, job: Job) -> Job:
        if job.status not in (IN_QUEUE, IN_PROGRESS):
            raise ApiError(409, f"the job has already finished ({job.status})")
        if not self.store.cancel(job.id, CANCELLED_BY_CLIENT):  # it ended meanwhile
            raise ApiError(409, "the job has already finished")
        return self.cancelled(job.id)

    def cancelled(self, job_id: str) -> Job:
        """After a client's cancel was committed: drop the inputs no worker will, count it, call back."""
        cancelled = self.store.get(job_id)
        assert cancelled is not None
        if cancelled.started_at is None:  # never claimed; a claimed job's worker drops the inputs when it stops
            self.data.drop_inputs(job_id)
        self.metrics.finished.labels(CANCELLED).inc()
        self.notify(job_id)
        return cancelled


def _checked_id(request_id: str) -> str:
    if not is_job_id(request_id):
        raise ApiError(400, BAD_ID)
    return request_id


def _owned(job: Job | None, owner: str) -> Job:
    if job is None or not secure_equal(job.owner, owner):
        raise ApiError(404, NOT_FOUND)
    return job


def check_face_choice(options: SubmitOptions, video: VideoInfo) -> None:
    """The face option against the video (``face_box`` in the frame, an audio track for ``active_speaker``)."""
    try:
        check_against_video(options.face, options.face_box, video.width, video.height, video.has_audio)
    except BadInput as exc:
        raise InvalidInput(str(exc)) from None


def _cursor(job: Job) -> str:
    """An opaque page cursor: where a listing continues after ``job``."""
    return base64.urlsafe_b64encode(json.dumps([job.created_at, job.id]).encode()).decode().rstrip("=")


def _read_cursor(cursor: str) -> tuple[float, str]:
    """``(created_at, id)`` of the job a page continues after; 422 for anything :func:`_cursor` did not make."""
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError):
        raise ApiError(422, BAD_CURSOR) from None
    if (
        type(created_at) is not float
        or not math.isfinite(created_at)
        or not isinstance(job_id, str)
        or not is_job_id(job_id)
    ):
        raise ApiError(422, BAD_CURSOR)
    return created_at, job_id
