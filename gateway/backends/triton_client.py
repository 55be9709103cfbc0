"""Run one lip-sync job on Triton's streaming ``lipsync`` model over gRPC, with progress and cancel.

The inputs are :func:`lipsync.contract.encode`'s, and the gateway's job id is the Triton request id,
so the model's log lines name it. Errors in a decoupled stream carry only a message, so a failed job
first sends STAGE "failed" with INFO ``{"error", "code"}`` (the contract's failure protocol);
:class:`TritonJobError` takes its kind from that code, or from the gRPC status of a transport error.
:func:`served_info` asks what the model serves (a request without VIDEO and AUDIO), :func:`served_weights` its weight set.
"""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import TYPE_CHECKING, Any

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from lipsync import contract
from lipsync.errors import ErrorKind, LipSyncError

MODEL = "lipsync"


class TritonJobError(LipSyncError):
    """A job did not produce a video; ``kind`` (an :class:`~lipsync.errors.ErrorKind`) says why, and
    ``retry`` whether the same job may succeed later."""

    @property
    def retry(self) -> bool:
        return contract.FAILURES[self.kind].retry


def _inputs(self: Any) -> list[grpcclient.InferInput]:
    """The request's Triton inputs: its files and every option that is not ``None``."""
    options = {name: value for name, value in asdict(self).items() if name in contract.BY_NAME}
    inputs = []
    for name, array in contract.encode(options, self.video, self.audio).items():
        tensor = grpcclient.InferInput(name, list(array.shape), contract.datatype(name))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


if TYPE_CHECKING:

    class JobRequest:
        """:data:`JobRequest` as type checkers see it: the files, ``job_id`` and the contract's options."""

        video: bytes
        audio: bytes
        job_id: str

        def __init__(self, video: bytes, audio: bytes, job_id: str = "", **options: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...

        def inputs(self) -> list[grpcclient.InferInput]: ...
else:
    JobRequest = make_dataclass(
        "JobRequest",
        [("video", bytes), ("audio", bytes), ("job_id", str, field(default=""))]
        + [(option.name, option.type | None, field(default=None)) for option in contract.OPTIONS],
        namespace={
            "inputs": _inputs,
            "__doc__": "The ``lipsync`` model's inputs: the files, ``job_id`` (sent as "
            "the Triton request id; empty: a fresh one) and one field per :data:`lipsync.contract.OPTIONS` "
            "entry; ``None`` leaves an option out (the served configuration decides).",
        },
        frozen=True,
    )
    JobRequest.__module__ = __name__


@dataclass(frozen=True)
class JobResult:
    video: bytes
    info: dict[str, Any] = field(default_factory=dict)
    """Frames, face-less frames, seconds per stage, version (the model's INFO output)."""


ProgressListener = Callable[[float, str, float | None], None]
"""Called with (fraction done, stage, estimated seconds left or ``None``) for every progress response."""


def stream_job(
    url: str,
    job: JobRequest,
    on_progress: ProgressListener | None = None,
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
        client.async_stream_infer(MODEL, job.inputs(), request_id=job.job_id or uuid.uuid4().hex)
        while True:
            if should_cancel is not None and should_cancel():
                client.stop_stream(cancel_requests=True)
                raise TritonJobError("the job was cancelled", ErrorKind.CANCELLED)
            try:
                result, error = responses.get(timeout=poll_s)
            except queue.Empty:
                waited += poll_s
                if waited > timeout_s:
                    client.stop_stream(cancel_requests=True)
                    raise TritonJobError(f"no answer from Triton in {timeout_s:.0f} s", ErrorKind.INTERNAL) from None
                continue
            waited = 0.0
            if error is not None:
                raise _job_error(error)
            stage = result.as_numpy("STAGE")[0].decode()
            if stage == contract.FAILED_STAGE:
                failure = contract.failure_from_info(result.as_numpy("INFO")[0])
                raise TritonJobError(str(failure), failure.kind)
            video = result.as_numpy("VIDEO_OUT")
            if video is not None:
                return JobResult(bytes(video[0]), json.loads(result.as_numpy("INFO")[0]))
            if on_progress is not None:
                eta = float(result.as_numpy("ETA")[0])
                on_progress(float(result.as_numpy("PROGRESS")[0]), stage, eta if eta >= 0 else None)
    except InferenceServerException as exc:
        raise _job_error(exc) from exc
    finally:
        client.stop_stream()
        client.close()


def served_weights(url: str, timeout_s: float = 10.0) -> str:
    """The weight set the ``lipsync`` model serves, e.g. ``tiny-demo`` or ``latentsync-1.5``.

    Raises :class:`TritonJobError` (``unavailable`` when Triton cannot be reached).
    """
    return served_info(url, timeout_s)["weights"]


def served_info(url: str, timeout_s: float = 10.0) -> dict:
    """What the answering ``lipsync`` instance serves: ``{"weights", "version", "compiled"}`` (docs/triton-api.md)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(MODEL, [], request_id=uuid.uuid4().hex)
        try:
            result, error = responses.get(timeout=timeout_s)
        except queue.Empty:
            client.stop_stream(cancel_requests=True)  # without cancelling, closing waits for the answer
            raise TritonJobError(f"no answer from Triton in {timeout_s:.0f} s", ErrorKind.UNAVAILABLE) from None
        if error is not None:
            raise _job_error(error)
        return json.loads(result.as_numpy("INFO")[0])
    except InferenceServerException as exc:
        raise _job_error(exc) from exc
    finally:
        client.stop_stream()
        client.close()


def _job_error(error: InferenceServerException) -> TritonJobError:
    """A gRPC error by its status (:func:`lipsync.contract.kind_for_code`; a lost connection is
    ``UNAVAILABLE``). An error response on the stream carries no status: the model did not send its
    failure INFO first, so the failure is ``internal``."""
    message = error.message() or str(error)
    status = error.status()
    kind = contract.kind_for_code(str(status)) if status else ErrorKind.INTERNAL
    if kind is ErrorKind.UNAVAILABLE:
        return TritonJobError(f"Triton is unavailable: {message}", kind)
    return TritonJobError(message, kind)
