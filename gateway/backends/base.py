"""What runs a job's inference, seen from the gateway: :class:`JobBackend`, and Triton's implementation.

The worker, the readiness check and the served-weights label talk only to this interface, so the app
can be built around another backend (:func:`gateway.api.app.create_app`'s ``backend``). A backend signals
a job that made no video with :class:`~gateway.backends.triton_client.TritonJobError`, whose ``kind`` the
worker acts on (``unavailable``: wait for the backend and retry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import tritonclient.grpc as grpcclient

from gateway.backends.triton_client import (
    MODEL,
    JobRequest,
    JobResult,
    ProgressListener,
    served_weights,
    stream_job,
)


class JobBackend(Protocol):
    def run(self, job: JobRequest, on_progress: ProgressListener, should_cancel: Callable[[], bool]) -> JobResult:
        """Run ``job`` to its video, reporting progress; stop (``kind == "cancelled"``) once ``should_cancel()``."""
        ...

    def ready(self) -> bool:
        """Whether a job sent now would be taken."""
        ...

    def weights(self) -> str:
        """The label of the weight set that makes the videos; raises when the backend cannot tell now."""
        ...


class TritonBackend:
    """Triton's streaming ``lipsync`` model at ``url`` (host:port of its gRPC)."""

    def __init__(self, url: str, poll_s: float = 0.5, timeout_s: float = 3600.0, probe_timeout_s: float = 2.0) -> None:
        self.url = url
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        """Deadline of a readiness check (an endpoint that does not answer in time is not ready)."""

    def run(self, job: JobRequest, on_progress: ProgressListener, should_cancel: Callable[[], bool]) -> JobResult:
        return stream_job(self.url, job, on_progress, should_cancel, poll_s=self.poll_s, timeout_s=self.timeout_s)

    def ready(self) -> bool:
        """Triton answers on gRPC and the ``lipsync`` model is loaded."""
        try:
            client = grpcclient.InferenceServerClient(self.url)
            try:
                timeout = self.probe_timeout_s
                return client.is_server_ready(client_timeout=timeout) and client.is_model_ready(
                    MODEL, client_timeout=timeout
                )
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - any failure to ask means "not ready"
            return False

    def weights(self) -> str:
        return served_weights(self.url)
