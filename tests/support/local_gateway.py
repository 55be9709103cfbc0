"""The gateway app in the test process, on a stand-in backend instead of Triton, with its real job table
(SQLite), data directory, guard, body cap, media checks and webhooks.

For the tests of what the gateway itself decides (validation, limits, ownership, idempotency): no
gateway subprocess and no model run. The whole path through Triton is tested end to end against
``lipsync-serve gateway`` processes (:mod:`support.gateway_process`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.backends.triton_client import (
    JobRequest,
    JobResult,
    ProgressListener,
    TritonJobError,
)
from gateway.core.auth import ApiKeys
from gateway.core.settings import GatewaySettings
from gateway.launcher.ports import free_port
from support.gateway_process import HOOK_HOST, KEYS

STAND_IN_WEIGHTS = "stand-in"


class StandInBackend:
    """A :class:`gateway.backends.base.JobBackend` without a model: reports three progress steps and returns the
    job's input video as its result. ``hold``: each job then waits until :attr:`release` is set or the
    gateway cancels it, so that jobs stay active for as long as a test needs them to."""

    def __init__(self, hold: bool = False) -> None:
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def run(self, job: JobRequest, on_progress: ProgressListener, should_cancel: Any) -> JobResult:
        for step in (1, 2, 3):
            on_progress(step / 4, "generate", 0.1)
        while not self.release.wait(0.05):
            if should_cancel():
                raise TritonJobError("the job was cancelled", "cancelled")
        return JobResult(job.video, {"weights": STAND_IN_WEIGHTS})

    def ready(self) -> bool:
        return True

    def weights(self) -> str:
        return STAND_IN_WEIGHTS


class LocalGateway:
    """Settings as :class:`support.gateway_process.GatewayProcess` has them (one job at a time, 5 MB body cap, the
    two :data:`support.gateway_process.KEYS`), plus ``settings``. Use as a context manager: :attr:`client` talks
    to the app without a socket; after :meth:`serve`, :attr:`url` and :attr:`port` are a real HTTP server."""

    def __init__(self, data_dir: Path, backend: StandInBackend | None = None, **settings: Any) -> None:
        self.data_dir = data_dir
        self.backend = backend or StandInBackend()
        self.port = free_port()
        defaults = {"concurrency": 1, "max_body_mb": 5, "webhook_allow": HOOK_HOST, "webhook_timeout_s": 3}
        self.settings = GatewaySettings.load(data_dir=data_dir, address="127.0.0.1", port=self.port, **defaults | settings)
        keys = ApiKeys.load(self.settings.api_keys_env, self.settings.api_keys_file, extra=list(KEYS))
        self.app = create_app(self.settings, keys, self.backend)
        self.url = self.settings.base_url
        self.client = TestClient(self.app, base_url=self.url, raise_server_exceptions=False)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LocalGateway:
        self.client.__enter__()  # runs the app's lifespan: the worker and the webhook sender start
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(30)
        self.client.__exit__(*exc)

    def serve(self) -> LocalGateway:
        """Also answer on :attr:`port` (uvicorn on a thread; the lifespan already ran), for tests of the wire."""
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, lifespan="off",
                                                     log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="local-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "the local gateway did not start"
            time.sleep(0.05)
        return self
