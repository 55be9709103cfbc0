"""The parts of the Triton models (``lipsync``, ``lipsync_generate``, ``lipsync_unary``) that need no Triton: their
``config.pbtxt`` parameters, their metrics, their cancel checks, when they let go of a BLS stream, and how a CPU
instance keeps off the GPUs (each ``model_repository/*/1/model.py`` wires them to ``pb_utils``).

They are here, importable, so unit tests exercise them with stand-ins for the Python backend's objects;
the three rules they enforce (one lock around every metric update, a cancel check closed before a job's
last response, a BLS stream let go of only after the stub did) each fixed a crash of the server.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypeVar

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)

from lipsync.config import ConfigError
from lipsync.errors import ErrorKind
from lipsync.gpu_stats import GPU_GAUGES

GPU_HIDING_ENVIRONMENT = {"CUDA_VISIBLE_DEVICES": "", "__EGL_VENDOR_LIBRARY_FILENAMES": os.devnull}
"""What :func:`keep_off_gpus` sets: no CUDA device, and no EGL vendor library (libglvnd then finds no driver)."""


def keep_off_gpus() -> None:
    """Hide every GPU from this process, for a CPU instance on a GPU server (the jobs' frame work).

    MediaPipe detects on the CPU, yet where it finds an EGL driver it opens a GL context on the GPU, which
    holds GPU memory in every such process beside the generation model's budget; without one it runs
    exactly as on a host without a GPU. Call it before anything in the process opens a GPU or a detector
    (both read these variables when they first start).
    """
    os.environ.update(GPU_HIDING_ENVIRONMENT)


def _flag(value: Any) -> Any:
    """A boolean parameter: ``"true"``/``"false"``, or ``""`` for the pipeline config's default (``None``)."""
    if value not in ("true", "false", ""):
        raise ValueError(f"expected true, false or empty, got {value!r}")
    return None if value == "" else value == "true"


Flag = Annotated[bool | None, BeforeValidator(_flag)]


def _absolute_path(value: Any) -> Any:
    """A file parameter: an absolute path (a backend stub's working folder is not the launcher's), or ``""`` for none."""
    if value == "":
        return None
    if not Path(value).is_absolute():
        raise ValueError(f"expected an absolute path or empty, got {value!r}")
    return Path(value)


AbsolutePath = Annotated[Path | None, BeforeValidator(_absolute_path)]

P = TypeVar("P", bound="ModelParameters")
Answer = TypeVar("Answer")
Response = TypeVar("Response")


class ModelParameters(BaseModel):
    """The ``config.pbtxt`` parameters both models have (their meaning is commented there), typed.

    Triton hands every parameter over as a string; numbers are parsed from it, flags by :func:`_flag`,
    and a missing, unknown or malformed parameter fails the model's load naming it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: str
    checkpoints: str
    dtype: Literal["auto", "fp16", "bf16", "fp32"]
    compile_unet: Flag
    compile_before_ready: Flag
    kernel_cache_dir: str
    stop_file: str
    windows_per_call: PositiveInt
    max_batch_windows: PositiveInt
    max_batch_delay_ms: NonNegativeFloat
    gpu_metrics_interval_s: PositiveFloat

    @classmethod
    def from_model_config(cls: type[P], config: Mapping[str, Any]) -> P:
        """From the model configuration Triton passes to ``initialize`` (``args["model_config"]``, parsed)."""
        values = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(f"{config.get('name', 'model')} parameters (config.pbtxt): {exc}") from None


class LipSyncParameters(ModelParameters):
    """The ``lipsync`` model's parameters."""

    max_concurrent_jobs: PositiveInt
    detect_threads: PositiveInt
    finish_threads: PositiveInt
    devices: str
    generator: str
    generator_lanes: PositiveInt
    progress_heartbeat_s: PositiveFloat
    stage_rates_file: AbsolutePath


class GenerateParameters(ModelParameters):
    """The ``lipsync_generate`` model's parameters."""

    vae_slots: PositiveInt
    max_inflight_groups: PositiveInt
    gpu_memory_gib: NonNegativeFloat


class TensorApi(Protocol):
    """What :func:`text_tensor` uses of ``pb_utils``: ``Tensor(name, array)``."""

    Tensor: Any


def text_tensor(api: TensorApi, name: str, value: str | bytes) -> Any:
    """A one-element ``TYPE_STRING`` output ``name`` holding ``value`` (text is sent UTF-8)."""
    return api.Tensor(name, np.array([value if isinstance(value, bytes) else value.encode()], dtype=np.object_))


OUTCOMES = {ErrorKind.BAD_INPUT: "rejected", ErrorKind.CANCELLED: "cancelled"}
"""``lipsync_jobs_total``'s outcome label of a failed job by error kind; any other kind is "failed"."""
STAGE_BUCKETS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class Metric(Protocol):
    """One labelled metric of the Python backend (``pb_utils.Metric``)."""

    def increment(self, value: float) -> None: ...

    def set(self, value: float) -> None: ...

    def observe(self, value: float) -> None: ...


class MetricApi(Protocol):
    """What :class:`InstanceMetrics` uses of ``pb_utils``: ``MetricFamily(name, description, kind)`` with its
    kinds ``COUNTER``, ``GAUGE``, ``HISTOGRAM``, and a family's ``Metric(labels=…, buckets=…)``."""

    MetricFamily: Any


class SerializedMetric:
    """A metric whose updates take one lock shared by all of the instance's metrics.

    The Python backend's stub rewrites a metric's shared-memory message on every update, without the
    GIL: two threads updating one metric at once free the message the server is still reading, and
    the server dies (SIGSEGV in ``Metric::LoadFromSharedMemory``). Jobs start and end on their own
    threads, the batcher and the GPU sampler on theirs, so every update goes through here.
    """

    def __init__(self, metric: Metric, lock: threading.RLock) -> None:
        self._metric: Metric | None = metric
        self._lock = lock

    def increment(self, value: float) -> None:
        with self._lock:
            if self._metric is not None:
                self._metric.increment(value)

    def set(self, value: float) -> None:
        with self._lock:
            if self._metric is not None:
                self._metric.set(value)

    def observe(self, value: float) -> None:
        with self._lock:
            if self._metric is not None:
                self._metric.observe(value)

    def close(self) -> None:
        """Let go of the backend's metric; later updates do nothing."""
        with self._lock:
            self._metric = None


class InstanceMetrics:
    """An instance's families on Triton's ``/metrics``, next to its own ``nv_inference_*``: the shared DDIM
    loop's batch sizes and the GPU gauges; safe to update from any thread."""

    FAMILIES: ClassVar[list[tuple[str, str, str]]] = [
        ("lipsync_unet_batch_windows", "16-frame windows per shared DDIM loop (all jobs)", "HISTOGRAM"),
        ("lipsync_unet_batch_jobs", "Jobs whose windows shared one DDIM loop", "HISTOGRAM"),
        *((name, description, "GAUGE") for name, (description, _) in GPU_GAUGES.items()),
    ]
    """Name, description and ``pb_utils.MetricFamily`` kind of each family."""

    def __init__(self, api: MetricApi, labels: dict[str, str]) -> None:
        # Families must outlive their metrics, so both are kept.
        self.labels = labels
        self._lock = threading.RLock()
        self._metrics: list[SerializedMetric] = []
        family = api.MetricFamily
        self.families = {
            name: family(name, description, getattr(family, kind)) for name, description, kind in self.FAMILIES
        }
        self.batch_windows = self._metric("lipsync_unet_batch_windows", buckets=BATCH_BUCKETS)
        self.batch_jobs = self._metric("lipsync_unet_batch_jobs", buckets=BATCH_BUCKETS)

    def _metric(self, family: str, extra_labels: dict[str, str] | None = None, **options: Any) -> SerializedMetric:
        with self._lock:
            metric = SerializedMetric(
                self.families[family].Metric(labels=self.labels | (extra_labels or {}), **options), self._lock
            )
            self._metrics.append(metric)
        return metric

    def close(self) -> None:
        """Let go of the backend's metrics, then their families, while the stub still runs (from ``finalize``).

        Left to the interpreter's exit, they are freed after the stub's shared memory, and each one's
        destructor, which tells the server, makes the stub die with SIGSEGV as it ends.
        """
        with self._lock:
            for metric in self._metrics:
                metric.close()
            self._metrics.clear()
            self.families.clear()

    def gpu_gauge(self, name: str, gpu: str) -> SerializedMetric:
        return self._metric(name, {"gpu": gpu})

    def observe_batch(self, windows: int, jobs: int) -> None:
        self.batch_windows.observe(windows)
        self.batch_jobs.observe(jobs)


class JobFrames(Protocol):
    """What :meth:`JobMetrics.finished` reads of a finished job (:class:`lipsync.jobs.JobOutput`'s result)."""

    @property
    def frames(self) -> int: ...

    @property
    def seconds(self) -> Mapping[str, float]: ...


class JobMetrics(InstanceMetrics):
    """The ``lipsync`` model's metrics: those of :class:`InstanceMetrics` and its jobs' outcomes, frames and stage times."""

    FAMILIES: ClassVar[list[tuple[str, str, str]]] = [
        ("lipsync_jobs_total", "Finished jobs by outcome", "COUNTER"),
        ("lipsync_frames_generated_total", "Video frames written by finished jobs", "COUNTER"),
        ("lipsync_active_jobs", "Jobs running now", "GAUGE"),
        ("lipsync_stage_seconds", "Wall time per pipeline stage per job", "HISTOGRAM"),
        *InstanceMetrics.FAMILIES,
    ]

    def __init__(self, api: MetricApi, labels: dict[str, str]) -> None:
        super().__init__(api, labels)
        self.frames = self._metric("lipsync_frames_generated_total")
        self.active = self._metric("lipsync_active_jobs")
        self._outcomes: dict[str, SerializedMetric] = {}
        self._stages: dict[str, SerializedMetric] = {}

    def finished(self, outcome: str, result: JobFrames | None = None) -> None:
        """One job ended with ``outcome``; a succeeded one adds its frames and stage times."""
        with self._lock:  # one metric per label set, even when two jobs end at once
            if outcome not in self._outcomes:
                self._outcomes[outcome] = self._metric("lipsync_jobs_total", {"outcome": outcome})
            self._outcomes[outcome].increment(1)
            if result is None:
                return
            self.frames.increment(result.frames)
            for stage, seconds in result.seconds.items():
                if stage not in self._stages:
                    self._stages[stage] = self._metric("lipsync_stage_seconds", {"stage": stage}, buckets=STAGE_BUCKETS)
                self._stages[stage].observe(seconds)


class InstanceStopping:
    """True once the instance unloads (:meth:`set`) or ``stop_file`` exists; checked with each job's own cancel."""

    def __init__(self, stop_file: str) -> None:
        self.file = Path(stop_file) if stop_file else None
        self.unloading = threading.Event()

    def set(self) -> None:
        self.unloading.set()

    def __call__(self) -> bool:
        return self.unloading.is_set() or (self.file is not None and self.file.exists())


class CancellableRequest(Protocol):
    """A Python-backend request, as far as a cancel check asks it."""

    def is_cancelled(self) -> bool: ...


class StreamReleases:
    """Finished decoupled BLS streams, each kept until the stub has dropped its own reference to it.

    The stub of the bundled Python backend (Triton 2.51) drops its reference to a stream whose last
    response was read on its message thread, without the GIL. When that reference is the last, the
    responses' NumPy arrays are freed there, beside Python code running on other threads: the heap is
    corrupted and the stub dies (``Stub process '…' is not healthy`` for every later request). That
    thread handles its messages in order, and a request's ``is_cancelled()`` is one of them whose caller
    waits for the answer: once a question asked after a stream was kept here has been answered, the
    stub's reference is gone, and the stream is let go of by the asking thread, with the GIL.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[int, object] = {}
        self._kept = 0

    def read(self, stream: Iterable[Response]) -> Iterator[Response]:
        """``stream``'s responses; when they end (or the reader stops), :meth:`keep` it."""
        try:
            yield from stream
        finally:
            self.keep(stream)
            del stream  # a traceback that keeps this frame must not keep the stream

    def keep(self, stream: object) -> None:
        """Keep ``stream`` (its last response read, or no longer wanted) until the next question is answered."""
        with self._lock:
            self._kept += 1
            self._streams[self._kept] = stream

    def ask(self, question: Callable[[], Answer]) -> Answer:
        """``question()``, which must be a round trip through the stub's message thread (an ``is_cancelled()``
        the stub does not answer from its cache); then let go of the streams kept before it was asked."""
        with self._lock:
            kept_before = self._kept
        answer = question()
        with self._lock:
            settled = [self._streams.pop(number) for number in list(self._streams) if number <= kept_before]
        del settled  # the last references: the arrays are freed here, with the GIL
        return answer

    def __len__(self) -> int:
        return len(self._streams)


class RequestCancelCheck:
    """A job's cancel check: its request was cancelled (client gone, gRPC cancel) or the instance stops.

    :meth:`close` it before the job's last response. The Python backend frees a decoupled request's
    response factory when the final flag is sent, and ``is_cancelled()`` after that makes the server
    read freed memory; the lock also lets a check already under way end first. The lock keeps one
    question to the stub at a time, so each is a round trip of its own until the request is known
    cancelled (the stub then answers from its cache, and so does this check): each one lets
    ``releases`` let go of the streams kept before it, and :meth:`close` asks once more for this job's last ones.
    """

    def __init__(self, request: CancellableRequest, stopping: Callable[[], bool], releases: StreamReleases) -> None:
        self._request, self._stopping, self._releases = request, stopping, releases
        self._lock = threading.Lock()
        self._open = True
        self._cancelled = False

    def __call__(self) -> bool:
        with self._lock:
            if not self._open:
                return False
            self._ask()
            return self._cancelled or self._stopping()

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._ask()
            self._open = False

    def _ask(self) -> None:
        if not self._cancelled:
            self._cancelled = self._releases.ask(self._request.is_cancelled)
