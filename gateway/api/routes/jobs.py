"""Submit (JSON with base64 or multipart), status, cancel, the caller's recent jobs, the result download.

Request shapes follow the original tutorial's API so its clients keep working. Handlers that touch
files, the job table or FFmpeg are plain ``def``s or run on FastAPI's thread pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.deps import ApiKeyOwner, IdempotencyKey, JobServiceDep
from gateway.core.errors import ApiError
from gateway.jobs.forms import MAX_FIELDS, MAX_FILES, upload_parts
from gateway.jobs.idempotency import copy_file, write_bytes
from gateway.jobs.schemas import JobList, JobListQuery, JobRef, JobStatus, SubmitOptions, SubmitRequest, Submitted
from gateway.jobs.validation import InvalidInput, decode_base64

router = APIRouter()

DOWNLOAD_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-store"}
"""A result is served as the mp4 it is (a browser must not sniff another type into it) and is not kept
by shared caches or the browser: its URL carries the token that grants it."""

UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["video", "audio"],
                "properties": {
                    "video": {"type": "string", "format": "binary"},
                    "audio": {"type": "string", "format": "binary"},
                    **{
                        name: {"type": "string", "description": "as the submit's field of this name"}
                        for name in SubmitOptions.model_fields
                    },
                },
            }
        }
    },
}
"""The multipart body the upload route parses itself (:mod:`gateway.jobs.forms`), described for OpenAPI."""


@router.post("/lipsync/submit")
def submit(body: SubmitRequest, jobs: JobServiceDep, who: ApiKeyOwner, key: IdempotencyKey) -> Submitted:
    def stage(folder: Path) -> tuple[str, str]:
        return (
            write_bytes(decode_base64(body.video_source, "video_source"), folder / "video"),
            write_bytes(decode_base64(body.audio_source, "audio_source"), folder / "audio"),
        )

    return jobs.submit(who, body.options(), stage, key)


@router.post("/lipsync/upload", openapi_extra={"requestBody": UPLOAD_BODY})
async def upload(request: Request, jobs: JobServiceDep, who: ApiKeyOwner, key: IdempotencyKey) -> Submitted:
    """Multipart variant of submit: the files as parts (no base64), options as form fields."""
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
    except StarletteHTTPException as exc:
        if exc.status_code != 400:  # 413 from the body cap stays 413
            raise
        raise ApiError(422, f"malformed multipart form: {exc.detail}") from None
    try:
        try:
            options, files = upload_parts(form)
        except InvalidInput as exc:
            raise ApiError(422, str(exc)) from None

        def stage(folder: Path) -> tuple[str, str]:
            return copy_file(files["video"].file, folder / "video"), copy_file(files["audio"].file, folder / "audio")

        return await run_in_threadpool(jobs.submit, who, options, stage, key)
    finally:
        await form.close()


@router.post("/lipsync/status")
def status(body: JobRef, jobs: JobServiceDep, who: ApiKeyOwner) -> JobStatus:
    return jobs.status(body.request_id, who)


@router.post("/lipsync/cancel")
def cancel(body: JobRef, jobs: JobServiceDep, who: ApiKeyOwner) -> JobStatus:
    return jobs.view(jobs.cancel(jobs.owned(body.request_id, who)))


@router.get("/v1/jobs")
def recent_jobs(jobs: JobServiceDep, who: ApiKeyOwner, query: Annotated[JobListQuery, Query()]) -> JobList:
    """The caller's jobs, newest first, each as its status shows it, a page at a time: ``next_cursor``
    (null on the last page) asks for the next one."""
    return jobs.recent(who, query.limit, query.cursor)


@router.get(
    "/lipsync/result/{request_id}",
    response_class=FileResponse,
    responses={200: {"content": {"video/mp4": {}}, "description": "the result video"}},
)
def result(
    request_id: str,
    jobs: JobServiceDep,
    token: str | None = None,
    authorization: Annotated[str | None, Header()] = None,
) -> FileResponse:
    """The video, for its owner's key or the unguessable ``token`` of the status's URL (players cannot send headers)."""
    path = jobs.readable_result(request_id, token, authorization)
    return FileResponse(path, media_type="video/mp4", filename=f"lipsync-{request_id}.mp4", headers=DOWNLOAD_HEADERS)
