"""Batches (JSON with base64, or multipart), their status and cancel; estimates before a submit.

A batch is answered 202 when at least one item was queued, with a per-item error for the others
(:mod:`gateway.jobs.batches`). Status and cancel are the owner's only, like a job's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.deps import ApiKeyOwner, IdempotencyKey, RuntimeDep
from gateway.api.runtime import Runtime
from gateway.core.errors import ApiError
from gateway.jobs.batches import BatchService, ItemRequest
from gateway.jobs.estimates import Estimator, output_frames
from gateway.jobs.forms import MAX_FIELDS, MAX_FILES, batch_items, upload_parts
from gateway.jobs.idempotency import copy_file, write_bytes
from gateway.jobs.schemas import (
    BatchAccepted,
    BatchRequest,
    BatchStatus,
    Estimate,
    EstimateRequest,
    SubmitOptions,
    SubmitRequest,
)
from gateway.jobs.validation import (
    InvalidInput,
    check_audio,
    check_video,
    decode_base64,
)
from lipsync.contract import BY_NAME
from lipsync.errors import BadInput
from lipsync.media.probe import (
    check_audio_length,
    check_picture_size,
    check_video_length,
)
from lipsync.timeline import output_length

router = APIRouter()


def get_batches(runtime: RuntimeDep) -> BatchService:
    return runtime.batches


def get_estimator(runtime: RuntimeDep) -> Estimator:
    return runtime.estimator


BatchServiceDep = Annotated[BatchService, Depends(get_batches)]
EstimatorDep = Annotated[Estimator, Depends(get_estimator)]


def _refused(error: ValidationError | InvalidInput) -> ApiError:
    """An item's validation error as the 422 a submit of it would get (fields and messages, never the input)."""
    if isinstance(error, InvalidInput):
        return ApiError(422, str(error))
    problems = [
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" if problem["loc"] else problem["msg"]
        for problem in error.errors()
    ]
    return ApiError(422, "; ".join(problems))


def _json_item(body: object) -> ItemRequest:
    try:
        item = SubmitRequest.model_validate(body)

        def stage(folder: Path) -> tuple[str, str]:
            return (
                write_bytes(decode_base64(item.video_source, "video_source"), folder / "video"),
                write_bytes(decode_base64(item.audio_source, "audio_source"), folder / "audio"),
            )

        return item.options(), stage
    except (ValidationError, InvalidInput) as exc:
        return _refused(exc)


def _form_item(form: FormData) -> ItemRequest:
    try:
        options, files = upload_parts(form)
    except (ValidationError, InvalidInput) as exc:
        return _refused(exc)

    def stage(folder: Path) -> tuple[str, str]:
        return copy_file(files["video"].file, folder / "video"), copy_file(files["audio"].file, folder / "audio")

    return options, stage


@router.post("/v1/batches", status_code=202)
def submit_batch(body: BatchRequest, batches: BatchServiceDep, who: ApiKeyOwner, key: IdempotencyKey) -> BatchAccepted:
    """Up to ``max_batch_items`` job requests in one call: per item its ``request_id``, or its ``error``
    (nothing created for it) while the others run. Idempotent as a whole with ``Idempotency-Key``."""
    webhook = str(body.webhook_url) if body.webhook_url else None
    return batches.submit(who, [_json_item(item) for item in body.items], webhook, key)


@router.post("/v1/batches/upload", status_code=202)
async def upload_batch(
    request: Request, batches: BatchServiceDep, who: ApiKeyOwner, key: IdempotencyKey
) -> BatchAccepted:
    """Multipart variant: item ``i``'s files and options as parts ``items.<i>.video``, ``items.<i>.audio``,
    ``items.<i>.<option>``; the batch's ``webhook_url`` as a field."""
    limit = batches.settings.max_batch_items
    try:
        form = await request.form(max_files=limit * MAX_FILES, max_fields=limit * MAX_FIELDS + 1)
    except StarletteHTTPException as exc:
        if exc.status_code != 400:  # 413 from the body cap stays 413
            raise
        if "Too many files" in str(exc.detail) or "Too many fields" in str(exc.detail):
            raise ApiError(
                422,
                f"the form has more parts than {limit} items may have; at most {limit} items are "
                "allowed (max_batch_items)",
            ) from None
        raise ApiError(422, f"malformed multipart form: {exc.detail}") from None
    try:
        try:
            items, webhook = batch_items(form)
        except InvalidInput as exc:
            raise ApiError(422, str(exc)) from None
        if not items:
            raise ApiError(422, "the batch has no items (parts items.0.video, items.0.audio …)")
        return await run_in_threadpool(batches.submit, who, [_form_item(item) for item in items], webhook, key)
    finally:
        await form.close()


@router.get("/v1/batches/{batch_id}")
def batch_status(batch_id: str, batches: BatchServiceDep, who: ApiKeyOwner) -> BatchStatus:
    """Per item: its job's status, progress and result URL, or why it was refused."""
    batches.jobs.quotas.count_request(who, submit=False)
    return batches.view(batches.owned(batch_id, who))


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, batches: BatchServiceDep, who: ApiKeyOwner) -> BatchStatus:
    """Cancel every queued or running item (as ``/lipsync/cancel`` cancels a job); answers the batch's status."""
    return batches.cancel(batches.owned(batch_id, who))


def _clip_frames(seconds: float, width: int, height: int, estimator: Estimator) -> int:
    limits = estimator.media.limits
    try:
        check_picture_size(width, height, limits)
        check_video_length(seconds, limits)
        check_audio_length(seconds, limits)
    except BadInput as exc:
        raise ApiError(422, str(exc)) from None
    return output_frames(seconds, estimator.media)


@router.post("/v1/estimate")
def estimate(body: EstimateRequest, estimator: EstimatorDep, who: ApiKeyOwner) -> Estimate:
    """Expected run seconds, GPU-seconds and start of a job with this clip length, picture size and options,
    from this deployment's recent jobs. Nothing is queued."""
    return estimator.estimate(_clip_frames(body.duration_s, body.width, body.height, estimator), body.options())


@router.post("/v1/estimate/upload")
async def estimate_upload(request: Request, runtime: RuntimeDep, who: ApiKeyOwner) -> Estimate:
    """The same from the clip itself: a ``video`` part (and optionally the ``audio`` the job would get; without
    it the video's own length counts) and the option fields. Read, measured and deleted; nothing is queued."""
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
    except StarletteHTTPException as exc:
        if exc.status_code != 400:
            raise
        raise ApiError(422, f"malformed multipart form: {exc.detail}") from None
    try:
        try:
            options, files = upload_parts(form, optional=("audio",))
        except InvalidInput as exc:
            raise ApiError(422, str(exc)) from None
        return await run_in_threadpool(_estimate_files, runtime, options, files)
    finally:
        await form.close()


def _estimate_files(runtime: Runtime, options: SubmitOptions, files: dict[str, UploadFile]) -> Estimate:
    jobs, estimator = runtime.jobs, runtime.estimator
    with jobs.staging() as staged, jobs.refusals():
        copy_file(files["video"].file, staged / "video")
        info = check_video(staged / "video", "video", estimator.media)
        seconds = info.duration
        if "audio" in files:
            copy_file(files["audio"].file, staged / "audio")
            audio_s = check_audio(staged / "audio", "audio", estimator.media)
            fps = estimator.media.fps
            frames = output_length(
                round(audio_s * fps), info.frames_at(fps), options.loop_mode or BY_NAME["loop_mode"].default
            )
            return estimator.estimate(max(1, frames), options)
    return estimator.estimate(output_frames(seconds, estimator.media), options)
