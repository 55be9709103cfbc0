"""Run one lip-sync job on Triton's streaming ``lipsync`` model over gRPC, with progress and cancel.

Errors in a decoupled stream carry only a message, so a failed job first sends STAGE "failed" with
INFO ``{"error", "code"}`` (docs/triton-api.md); :class:`TritonJobError` takes its kind from that
code. A connection failure is ``unavailable``: worth a retry.
"""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL = "lipsync"
_KINDS = {"INVALID_ARG": "invalid", "CANCELLED": "cancelled"}


class TritonJobError(RuntimeError):
    """A job did not produce a video. ``kind``: invalid, cancelled, internal or unavailable."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind



@dataclass(frozen=True)
class JobRequest:
    """The ``lipsync`` model's inputs; ``None`` leaves an optional input out (the model's default)."""

    video: bytes
    audio: bytes
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    loop_mode: str | None = None
    version: str | None = None
    mode: str | None = None
    devices: int | None = None

    def inputs(self) -> list[grpcclient.InferInput]:
        values: dict[str, tuple[str, Any]] = {
            "VIDEO": ("BYTES", self.video), "AUDIO": ("BYTES", self.audio), "STEPS": ("INT32", self.steps),
            "GUIDANCE": ("FP32", self.guidance_scale), "SEED": ("INT64", self.seed),
            "LOOP_MODE": ("BYTES", self.loop_mode), "VERSION": ("BYTES", self.version), "MODE": ("BYTES", self.mode),
            "DEVICES": ("INT32", self.devices),
        }
        numpy_types = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "INT64": np.int64}
        inputs = []
        for name, (datatype, value) in values.items():
            if value is None:
                continue
            if isinstance(value, str):
                value = value.encode()
            tensor = grpcclient.InferInput(name, [1], datatype)
            tensor.set_data_from_numpy(np.array([value], dtype=numpy_types[datatype]))
            inputs.append(tensor)
        return inputs


@dataclass(frozen=True)
class JobResult:
    video: bytes
    info: dict[str, Any] = field(default_factory=dict)
    """Frames, face-less frames, seconds per stage, version (the model's INFO output)."""


ProgressCallback = Callable[[float, str], None]


def run_job(
    url: str,
    job: JobRequest,
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    poll_s: float = 0.5,
    timeout_s: float = 3600.0,
) -> JobResult:
    """Stream one job to ``url`` (host:port of Triton's gRPC); cancel it when ``should_cancel()`` turns True.

    Raises :class:`TritonJobError`; a cancelled job raises it with ``kind == "cancelled"``.
    """
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    waited = 0.0
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(MODEL, job.inputs(), request_id=uuid.uuid4().hex)
        while True:
            if should_cancel is not None and should_cancel():
                client.stop_stream(cancel_requests=True)
                raise TritonJobError("the job was cancelled", "cancelled")
            try:
                result, error = responses.get(timeout=poll_s)
            except queue.Empty:
                waited += poll_s
                if waited > timeout_s:
                    client.stop_stream(cancel_requests=True)
                    raise TritonJobError(f"no answer from Triton in {timeout_s:.0f} s", "internal") from None
                continue
            waited = 0.0
            if error is not None:
                raise _job_error(error)
            stage = result.as_numpy("STAGE")[0].decode()
            if stage == "failed":
                failure = json.loads(result.as_numpy("INFO")[0])
                raise TritonJobError(failure["error"], _KINDS.get(failure["code"], "internal"))
            video = result.as_numpy("VIDEO_OUT")
            if video is not None:
                return JobResult(bytes(video[0]), json.loads(result.as_numpy("INFO")[0]))
            if on_progress is not None:
                on_progress(float(result.as_numpy("PROGRESS")[0]), stage)
    except InferenceServerException as exc:
        raise _job_error(exc) from exc
    finally:
        client.stop_stream()
        client.close()


def _job_error(error: InferenceServerException) -> TritonJobError:
    message = error.message() or str(error)
    status = str(error.status() or "")
    if "UNAVAILABLE" in status or "failed to connect" in message.lower() or "Socket closed" in message:
        return TritonJobError(f"Triton is unavailable: {message}", "unavailable")
    return TritonJobError(message, "internal")
