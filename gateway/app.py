"""The REST API (FastAPI): submit, status, cancel, result download, the key's recent jobs, health,
readiness, metrics, the web page and what it is built from.

Request shapes follow the original tutorial's API so its clients keep working; every error is
``{"status": "Failed", "reason": …}`` with a 4xx/5xx code (:mod:`gateway.errors`). Requests that may
carry a body are authenticated and rate-limited from their headers before the body is read
(:mod:`gateway.guard`); bodies are validated strictly (:mod:`gateway.schemas`, :mod:`gateway.forms`).
A job another key submitted is answered exactly like one that does not exist (404). Handlers that
touch files, the job table or FFmpeg are plain ``def``s or run on FastAPI's thread pool.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.auth import ApiKeys, bearer_key, secure_equal
from gateway.cli import LOCAL_KEY_FILE
from gateway.errors import ApiError, error_response
from gateway.forms import MAX_FIELDS, MAX_FILES, upload_parts
from gateway.guard import OWNER, UNAUTHORIZED, RequestGuard
from gateway.idempotency import copy_file, fingerprint, write_bytes
from gateway.limits import BodyLimit
from gateway.metrics import Metrics
from gateway.quotas import Quotas
from gateway.schemas import JobOptions, JobRef, SubmitRequest, option_rules
from gateway.served import ServedWeights, demo_weights
from gateway.settings import GatewaySettings
from gateway.storage import DataDir, is_job_id
from gateway.store import CANCELLED, IN_PROGRESS, IN_QUEUE, SUCCEED, Job, JobStore, QuotaExceeded, new_job_id
from gateway.validation import InvalidInput, check_audio, check_video, decode_base64
from gateway.webhook import Webhooks
from gateway.webhook_signing import Signer, load_secret
from gateway.webhook_targets import AddressPolicy, WebhookRefused
from gateway.worker import Worker, triton_ready
from lipsync.media import MediaSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_MAX_IDEMPOTENCY_KEY = 200
_NOT_FOUND = "no such request_id for this API key"
_NO_RESULT = "no result for this request_id"
_MAX_LISTED_JOBS = 100

StageInputs = Callable[[Path], tuple[str, str]]
"""Writes a request's ``video`` and ``audio`` into a staging folder; returns their SHA-256s."""


class Gateway:
    """What the routes share: settings, keys, the job table, the data directory, the worker, the quotas."""

    def __init__(self, settings: GatewaySettings, keys: ApiKeys) -> None:
        self.settings = settings
        self.keys = keys
        self.media = MediaSettings.load()
        self.data = DataDir(settings.data_dir)
        self.store = JobStore(self.data.database)
        self.quotas = Quotas(settings, self.store)
        self.metrics = Metrics(self.store)
        self.webhooks = Webhooks(
            self.store, settings, Signer(load_secret(settings.webhook_secret_env, settings.webhook_secret_path)),
            AddressPolicy(settings.webhook_allow),
        )
        self.worker = Worker(settings, self.store, self.data, self.metrics, self.notify)
        self.weights = ServedWeights(settings.triton_grpc)

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
        self.weights.start()

    def stop(self) -> None:
        self.weights.stop()
        self.worker.stop()
        self.webhooks.close()
        self.store.close()

    def view(self, job: Job) -> dict[str, Any]:
        """A job as the status endpoint (and the webhook) shows it; URLs start with the configured base.

        ``weights``: what made the result for a finished job, what Triton serves for the others.
        """
        results = None
        if job.status == SUCCEED:
            url = f"{self.settings.base_url}/lipsync/result/{job.id}?token={job.result_token}"
            results = {"video": [{"url": url}], "timings": {"inference": round(job.inference_s or 0.0, 3)}}
        eta = round(job.eta_s, 1) if job.status == IN_PROGRESS and job.eta_s is not None else None
        return {
            "request_id": job.id, "status": job.status, "reason": job.reason or None,
            "queue_position": self.store.queue_position(job), "progress": round(job.progress, 4),
            "stage": job.stage or None, "eta_s": eta, "weights": (job.info or {}).get("weights", self.weights.value),
            "created_at": round(job.created_at, 3), "results": results,
        }

    def page_info(self) -> dict[str, Any]:
        """What the web page shows before any key is entered; never a key itself."""
        candidates = [self.settings.data_dir / LOCAL_KEY_FILE]  # made by `lipsync-serve up` when no key is configured
        if self.settings.api_keys_file:
            candidates.append(Path(self.settings.api_keys_file).resolve())
        files = [str(path) for path in candidates if path.is_file()]
        return {
            "weights": self.weights.value, "demo_weights": demo_weights(),
            "api_keys": {"env": self.settings.api_keys_env, "files": files},
            "options": option_rules(), "defaults": asdict(self.settings.defaults),
        }

    def notify(self, job_id: str) -> None:
        """A job finished (committed): call its webhook, if it has one."""
        job = self.store.get(job_id)
        if job is not None and job.webhook_url:
            self.webhooks.send(job, self.view(job))

    def owned(self, request_id: str, owner: str) -> Job:
        """The job ``request_id`` if ``owner`` submitted it; another key's job is as unknown as a missing one."""
        if not is_job_id(request_id):
            raise ApiError(400, "request_id is not a valid request id")
        job = self.store.get(request_id)
        if job is None or not secure_equal(job.owner, owner):
            raise ApiError(404, _NOT_FOUND)
        return job

    def readable_result(self, request_id: str, token: str | None, authorization: str | None) -> Path:
        """The result file of ``request_id`` for the holder of its token or of its owner's key.

        Every refusal is the same 404 (unknown id, unfinished job, wrong or missing token, a key that
        is not accepted or not the owner's), so the answer never tells whether the job exists.
        """
        if not is_job_id(request_id):
            raise ApiError(400, "request_id is not a valid request id")
        job = self.store.get(request_id)
        owner = self.keys.owner(bearer_key(authorization)) if authorization is not None else None
        allowed = job is not None and job.status == SUCCEED and (
            (token is not None and job.result_token is not None and secure_equal(token, job.result_token))
            or (owner is not None and secure_equal(owner, job.owner))
        )
        path = self.data.result(request_id)
        if not allowed or not path.is_file():
            raise ApiError(404, _NO_RESULT)
        return path

    def submit(
        self, owner: str, options: JobOptions, stage_inputs: StageInputs, idempotency_key: str | None,
    ) -> dict[str, str]:
        """Stage the inputs, check them by content and queue the job.

        With an ``idempotency_key`` this owner used before: the same request gets the first job's id, a
        different one 409. The staging folder never outlives the call.
        """
        staged = self.data.staging()
        try:
            request_hash = fingerprint(options, *stage_inputs(staged))
            replayed = self._replay(owner, idempotency_key, request_hash)
            if replayed is not None:
                return {"request_id": replayed.id}
            webhook = self.webhooks.admit(str(options.webhook_url) if options.webhook_url else None)
            check_video(staged / "video", "video_source", self.media)
            check_audio(staged / "audio", "audio_source", self.media)
            job_id = new_job_id()
            self.data.adopt(staged, job_id)
        except InvalidInput as exc:
            raise ApiError.of(exc) from None
        except WebhookRefused as exc:
            raise ApiError(400, str(exc)) from None
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        try:
            job, created = self.store.create(
                job_id, owner, self._params(options), webhook, idempotency_key, request_hash,
                max_active=self.settings.max_active_jobs,
            )
        except QuotaExceeded:
            self.data.drop_inputs(job_id)
            raise self.quotas.too_many_jobs() from None
        if not created:  # the same key raced us: that job stands, this upload goes
            self.data.drop_inputs(job_id)
            self._replay(owner, idempotency_key, request_hash)
        self.worker.wake()
        return {"request_id": job.id}

    def _replay(self, owner: str, idempotency_key: str | None, request_hash: str) -> Job | None:
        """The job this owner's ``idempotency_key`` already names, if the request is the same; 409 if not."""
        existing = self.store.find_idempotent(owner, idempotency_key)
        if existing is None:
            return None
        if existing.request_hash is not None and not secure_equal(existing.request_hash, request_hash):
            raise ApiError(
                409, "this Idempotency-Key was already used with a different request (inputs or options); "
                "send the same request again, or use a new key for a new job",
            )
        return existing

    def _params(self, options: JobOptions) -> dict[str, Any]:
        """The job options (:data:`lipsync.contract.OPTIONS`) by REST name: the request's, else the configured defaults."""
        defaults = asdict(self.settings.defaults)
        given = options.model_dump(exclude={"webhook_url"})
        return {name: defaults.get(name) if value is None else value for name, value in given.items()}

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


def _owner(request: Request) -> str:
    """The owner id the guard found for the request's Bearer key (checked again should a route be reached
    without the guard); 401 without an accepted key."""
    found = getattr(request.state, OWNER, None)
    if found is None:
        found = request.app.state.gateway.keys.owner(bearer_key(request.headers.get("authorization")))
    if found is None:
        raise ApiError(401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
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
    app.add_middleware(RequestGuard, keys=keys, quotas=gateway.quotas)  # outside the body cap: it reads no body

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.reason, exc.headers)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():  # field and message only: never echo the (possibly huge) input
            where = ".".join(str(part) for part in error["loc"] if part not in ("body", "query", "header"))
            problems.append(f"{where}: {error['msg']}" if where else error["msg"])
        return error_response(422, "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal error")

    @app.middleware("http")
    async def count_responses(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        gateway.metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.post("/lipsync/submit")
    def submit(body: SubmitRequest, who: Owner, key: Idempotency) -> dict[str, str]:
        def stage(folder: Path) -> tuple[str, str]:
            return (write_bytes(decode_base64(body.video_source, "video_source"), folder / "video"),
                    write_bytes(decode_base64(body.audio_source, "audio_source"), folder / "audio"))

        return gateway.submit(who, body.options(), stage, key)

    @app.post("/lipsync/upload")
    async def upload(request: Request, who: Owner, key: Idempotency) -> dict[str, str]:
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

            return await run_in_threadpool(gateway.submit, who, options, stage, key)
        finally:
            await form.close()

    @app.post("/lipsync/status")
    def status(body: JobRef, who: Owner) -> dict[str, Any]:
        return gateway.view(gateway.owned(body.request_id, who))

    @app.post("/lipsync/cancel")
    def cancel(body: JobRef, who: Owner) -> dict[str, Any]:
        return gateway.view(gateway.cancel(gateway.owned(body.request_id, who)))

    @app.get("/v1/jobs")
    def jobs(who: Owner, limit: Annotated[int, Query(ge=1, le=_MAX_LISTED_JOBS)] = 20) -> dict[str, Any]:
        """The caller's most recent jobs, newest first, each as its status shows it."""
        gateway.quotas.count_request(who, submit=False)
        return {"jobs": [gateway.view(job) for job in gateway.store.recent(who, limit)]}

    @app.get("/v1/info")
    def info() -> dict[str, Any]:
        return gateway.page_info()

    @app.get("/lipsync/result/{request_id}")
    def result(
        request_id: str, token: str | None = None, authorization: Annotated[str | None, Header()] = None,
    ) -> FileResponse:
        """The video, for its owner's key or the unguessable ``token`` of the status's URL (players cannot send headers)."""
        path = gateway.readable_result(request_id, token, authorization)
        return FileResponse(path, media_type="video/mp4", filename=f"lipsync-{request_id}.mp4")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if not triton_ready(settings.triton_grpc):
            return error_response(503, "Triton is not ready")
        return JSONResponse({"status": "ready", "weights": gateway.weights.refresh()})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
