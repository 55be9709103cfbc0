"""The REST API (FastAPI): submit, status, cancel, result download, health, readiness, metrics, web page.

Request shapes follow the original tutorial's API so its clients keep working; every error is
``{"status": "Failed", "reason": …}`` with a 4xx/5xx code. Handlers that touch files, the job table
or FFmpeg are plain ``def``s (FastAPI runs them on its thread pool).
"""

from __future__ import annotations

import hmac
import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.auth import ApiKeys
from gateway.limits import BodyLimit
from gateway.metrics import Metrics
from gateway.settings import GatewaySettings
from gateway.storage import DataDir, is_job_id
from gateway.store import CANCELLED, IN_PROGRESS, IN_QUEUE, SUCCEED, Job, JobStore, new_job_id
from gateway.validation import InvalidInput, check_audio, check_video, decode_base64
from gateway.webhook import Webhooks
from gateway.webhook_signing import Signer, load_secret
from gateway.webhook_targets import AddressPolicy, WebhookRefused
from gateway.worker import Worker, triton_ready

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_MAX_IDEMPOTENCY_KEY = 200


class ApiError(Exception):
    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason


def _failed(status_code: int, reason: str) -> JSONResponse:
    return JSONResponse({"status": "Failed", "reason": reason}, status_code=status_code)


class JobOptions(BaseModel):
    """Options shared by the JSON and the multipart submit; ``None`` = the configured default."""

    model_config = ConfigDict(extra="forbid")

    inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=20)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    loop_mode: Literal["pingpong", "loop", "cut"] | None = None
    version: Literal["1.5", "1.6"] | None = None
    mode: Literal["exact", "fast"] | None = None
    webhook_url: AnyHttpUrl | None = None


class SubmitRequest(JobOptions):
    video_source: str = Field(min_length=1)
    audio_source: str = Field(min_length=1)


class JobRef(BaseModel):
    request_id: str


class Gateway:
    """What the routes share: settings, keys, the job table, the data directory, the worker."""

    def __init__(self, settings: GatewaySettings, keys: ApiKeys) -> None:
        self.settings = settings
        self.keys = keys
        self.data = DataDir(settings.data_dir)
        self.store = JobStore(self.data.database)
        self.metrics = Metrics(self.store)
        self.webhooks = Webhooks(
            self.store, settings, Signer(load_secret(settings.webhook_secret_env, settings.webhook_secret_path)),
            AddressPolicy(settings.webhook_allow),
        )
        self.worker = Worker(settings, self.store, self.data, self.metrics, self.notify)

    def start(self) -> None:
        requeued, failed = self.store.recover(self.settings.max_attempts)
        for job_id in failed:
            self.data.drop_inputs(job_id)
            self.notify(job_id)
        if requeued or failed:
            log.warning("restart: %d running jobs re-queued, %d failed", len(requeued), len(failed))
        for job_id in self.store.unnotified():  # ended just before the last stop, webhook not yet queued
            self.notify(job_id)
        self.webhooks.start()
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.webhooks.close()
        self.store.close()

    def view(self, job: Job, base_url: str) -> dict[str, Any]:
        """A job as the status endpoint (and the webhook) shows it."""
        results = None
        if job.status == SUCCEED:
            url = f"{base_url.rstrip('/')}/lipsync/result/{job.id}?token={job.result_token}"
            results = {"video": [{"url": url}], "timings": {"inference": round(job.inference_s or 0.0, 3)}}
        return {
            "request_id": job.id, "status": job.status, "reason": job.reason or None,
            "queue_position": self.store.queue_position(job), "progress": round(job.progress, 4),
            "stage": job.stage or None, "results": results,
        }

    def notify(self, job_id: str) -> None:
        """A job finished (committed): call its webhook, if it has one."""
        job = self.store.get(job_id)
        if job is not None and job.webhook_url:
            self.webhooks.send(job, self.view(job, self.settings.base_url))

    def owned(self, request_id: str, owner: str) -> Job:
        """The job ``request_id`` if ``owner`` submitted it; another key's job is as unknown as a missing one."""
        if not is_job_id(request_id):
            raise ApiError(400, "request_id is not a valid request id")
        job = self.store.get(request_id)
        if job is None or not hmac.compare_digest(job.owner, owner):
            raise ApiError(404, "no such request_id for this API key")
        return job

    def submit(
        self, owner: str, options: JobOptions, staged: Path, idempotency_key: str | None,
    ) -> dict[str, str]:
        """Check the staged ``video``/``audio`` by content and queue the job; the staging folder is consumed."""
        try:
            existing = self.store.find_idempotent(owner, idempotency_key)
            if existing is not None:
                return {"request_id": existing.id}
            webhook = self.webhooks.admit(str(options.webhook_url) if options.webhook_url else None)
            check_video(staged / "video", "video_source")
            check_audio(staged / "audio", "audio_source")
            defaults = self.settings.defaults
            params = {
                "inference_steps": options.inference_steps or defaults.inference_steps,
                "guidance_scale": defaults.guidance_scale if options.guidance_scale is None else options.guidance_scale,
                "seed": defaults.seed if options.seed is None else options.seed,
                "loop_mode": options.loop_mode, "version": options.version, "mode": options.mode,
            }
            job_id = new_job_id()
            self.data.adopt(staged, job_id)
        except InvalidInput as exc:
            raise ApiError(422, str(exc)) from None
        except WebhookRefused as exc:
            raise ApiError(400, str(exc)) from None
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        job, created = self.store.create(job_id, owner, params, webhook, idempotency_key)
        if not created:  # the same key raced us: that job stands, this upload goes
            self.data.drop_inputs(job_id)
        self.worker.wake()
        return {"request_id": job.id}

    def cancel(self, job: Job) -> Job:
        if job.status not in (IN_QUEUE, IN_PROGRESS):
            raise ApiError(409, f"the job has already finished ({job.status})")
        if not self.store.cancel(job.id, "cancelled by the client"):  # it ended meanwhile
            raise ApiError(409, "the job has already finished")
        cancelled = self.store.get(job.id)
        assert cancelled is not None
        if cancelled.started_at is None:  # never claimed; a claimed job's worker drops the inputs when it stops
            self.data.drop_inputs(job.id)
        self.metrics.finished.labels(CANCELLED).inc()
        self.notify(job.id)
        return cancelled


def _owner(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The owner id of the request's Bearer key; 401 without an accepted one."""
    scheme, _, key = (authorization or "").partition(" ")
    found = request.app.state.gateway.keys.owner(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
    if found is None:
        raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)")
    return found


def _idempotency(idempotency_key: Annotated[str | None, Header()] = None) -> str | None:
    if idempotency_key is not None and not (0 < len(idempotency_key) <= _MAX_IDEMPOTENCY_KEY):
        raise ApiError(422, f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} characters")
    return idempotency_key


Owner = Annotated[str, Depends(_owner)]
Idempotency = Annotated[str | None, Depends(_idempotency)]


def create_app(settings: GatewaySettings, keys: ApiKeys) -> FastAPI:
    gateway = Gateway(settings, keys)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        gateway.start()
        yield
        gateway.stop()

    app = FastAPI(title="lipsync-serve gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _failed(exc.status_code, exc.reason)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():  # field and message only: never echo the (possibly huge) input
            where = ".".join(str(part) for part in error["loc"] if part not in ("body", "query", "header"))
            problems.append(f"{where}: {error['msg']}" if where else error["msg"])
        return _failed(422, "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _failed(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _failed(500, "internal error")

    @app.middleware("http")
    async def count_responses(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        gateway.metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.post("/lipsync/submit")
    def submit(body: SubmitRequest, who: Owner, key: Idempotency) -> dict[str, str]:
        existing = gateway.store.find_idempotent(who, key)
        if existing is not None:
            return {"request_id": existing.id}
        staged = gateway.data.staging()
        try:
            (staged / "video").write_bytes(decode_base64(body.video_source, "video_source"))
            (staged / "audio").write_bytes(decode_base64(body.audio_source, "audio_source"))
        except InvalidInput as exc:
            shutil.rmtree(staged, ignore_errors=True)
            raise ApiError(422, str(exc)) from None
        return gateway.submit(who, JobOptions(**body.model_dump(exclude={"video_source", "audio_source"})), staged, key)

    @app.post("/lipsync/upload")
    def upload(
        who: Owner, key: Idempotency,
        video: Annotated[UploadFile, File()], audio: Annotated[UploadFile, File()],
        inference_steps: Annotated[int | None, Form()] = None,
        guidance_scale: Annotated[float | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        loop_mode: Annotated[str | None, Form()] = None,
        version: Annotated[str | None, Form()] = None,
        mode: Annotated[str | None, Form()] = None,
        webhook_url: Annotated[str | None, Form()] = None,
    ) -> dict[str, str]:
        """Multipart variant of submit: the files as parts (no base64), options as form fields."""
        options = JobOptions.model_validate({
            "inference_steps": inference_steps, "guidance_scale": guidance_scale, "seed": seed,
            "loop_mode": loop_mode or None, "version": version or None, "mode": mode or None,
            "webhook_url": webhook_url or None,
        })
        staged = gateway.data.staging()
        for part, name in ((video, "video"), (audio, "audio")):
            with open(staged / name, "wb") as target:
                shutil.copyfileobj(part.file, target)
        return gateway.submit(who, options, staged, key)

    @app.post("/lipsync/status")
    def status(body: JobRef, who: Owner, request: Request) -> dict[str, Any]:
        return gateway.view(gateway.owned(body.request_id, who), str(request.base_url))

    @app.post("/lipsync/cancel")
    def cancel(body: JobRef, who: Owner, request: Request) -> dict[str, Any]:
        return gateway.view(gateway.cancel(gateway.owned(body.request_id, who)), str(request.base_url))

    @app.get("/lipsync/result/{request_id}")
    def result(
        request: Request, request_id: str, token: str | None = None, authorization: Annotated[str | None, Header()] = None,
    ) -> FileResponse:
        """The video, for its owner's key or the unguessable ``token`` of the status's URL (players cannot send headers)."""
        if not is_job_id(request_id):
            raise ApiError(400, "request_id is not a valid request id")
        if token is None and authorization is None:
            raise ApiError(401, "the result URL's token or the owner's API key is required")
        job = gateway.store.get(request_id)
        allowed = job is not None and job.status == SUCCEED and (
            (token is not None and job.result_token is not None and hmac.compare_digest(token, job.result_token))
            or (authorization is not None and hmac.compare_digest(_owner(request, authorization), job.owner))
        )
        path = gateway.data.result(request_id)
        if not allowed or not path.is_file():
            raise ApiError(404, "no result for this request_id")
        return FileResponse(path, media_type="video/mp4", filename=f"lipsync-{request_id}.mp4")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if not triton_ready(settings.triton_grpc):
            return _failed(503, "Triton is not ready")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
