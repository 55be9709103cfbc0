"""Triton adapter for ``lipsync``: request tensors → ``lipsync.jobs.run_job`` → streamed responses.

Decoupled: ``execute`` starts one thread per request and returns; each thread streams progress, then
the final video, through the request's response sender. A request without VIDEO and AUDIO asks which
weights are served: it is answered at once with one final INFO. The instance's ``LipSyncPipeline``
shares one ``WindowBatcher`` per device, so windows of all running jobs ride in the same UNet calls.
With the ``devices`` parameter the instance holds a replica of the models on each listed GPU and
spreads long jobs' windows over them. With the ``generator`` parameter the instance holds no UNet or
VAE: it is one of several CPU processes doing the jobs' frame work, and sends each group of windows to
that model (``lipsync_generate``, one instance per GPU) over BLS (``lipsync.remote``).

Triton does not count a decoupled model's running jobs as in flight, so it unloads the model while
they run: jobs still running then (or once the launcher has created the ``stop_file`` parameter's
file, before it stops the server) end as cancelled at their next check, within one denoising step.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from lipsync import contract
from lipsync.batching import BatchingSettings
from lipsync.errors import BadInput, ErrorKind, LipSyncError
from lipsync.gpu_stats import GPU_GAUGES, GpuSampler
from lipsync.jobs import JobOptions, JobOutput, run_job
from lipsync.pipeline import DTYPES, LipSyncPipeline, PipelineSettings
from lipsync.progress import EtaEstimate, ProgressReport, ProgressReporter, StageRates
from lipsync.remote import RemoteGenerator
from lipsync.server_weights import weights_for
from lipsync.weights import load_weights_config

_OUTCOMES = {ErrorKind.BAD_INPUT: "rejected", ErrorKind.CANCELLED: "cancelled"}
"""``lipsync_jobs_total``'s outcome label of a failed job by error kind; any other kind is "failed"."""
_STAGE_BUCKETS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]
_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class _Serialized:
    """A metric whose updates take one lock shared by all of the instance's metrics.

    The Python backend's stub rewrites a metric's shared-memory message on every update, without the
    GIL: two threads updating one metric at once free the message the server is still reading, and
    the server dies (SIGSEGV in ``Metric::LoadFromSharedMemory``). Jobs start and end on their own
    threads, the batcher and the GPU sampler on theirs, so every update goes through here.
    """

    def __init__(self, metric, lock: threading.RLock) -> None:
        self._metric, self._lock = metric, lock

    def increment(self, value: float) -> None:
        with self._lock:
            self._metric.increment(value)

    def set(self, value: float) -> None:
        with self._lock:
            self._metric.set(value)

    def observe(self, value: float) -> None:
        with self._lock:
            self._metric.observe(value)


class _Metrics:
    """Our families on Triton's ``/metrics``, next to its own ``nv_inference_*``; safe to update from any thread."""

    def __init__(self, labels: dict[str, str]) -> None:
        # Families must outlive their metrics, so both are kept.
        self.labels = labels
        self._lock = threading.RLock()
        self.families = {
            name: pb_utils.MetricFamily(name, description, kind)
            for name, description, kind in [
                ("lipsync_jobs_total", "Finished jobs by outcome", pb_utils.MetricFamily.COUNTER),
                ("lipsync_frames_generated_total", "Video frames written by finished jobs", pb_utils.MetricFamily.COUNTER),
                ("lipsync_active_jobs", "Jobs running now", pb_utils.MetricFamily.GAUGE),
                ("lipsync_unet_batch_windows", "16-frame windows per shared DDIM loop (all jobs)", pb_utils.MetricFamily.HISTOGRAM),
                ("lipsync_unet_batch_jobs", "Jobs whose windows shared one DDIM loop", pb_utils.MetricFamily.HISTOGRAM),
                ("lipsync_stage_seconds", "Wall time per pipeline stage per job", pb_utils.MetricFamily.HISTOGRAM),
                *((name, description, pb_utils.MetricFamily.GAUGE) for name, (description, _) in GPU_GAUGES.items()),
            ]
        }
        self.frames = self._metric("lipsync_frames_generated_total")
        self.active = self._metric("lipsync_active_jobs")
        self.batch_windows = self._metric("lipsync_unet_batch_windows", buckets=_BATCH_BUCKETS)
        self.batch_jobs = self._metric("lipsync_unet_batch_jobs", buckets=_BATCH_BUCKETS)
        self._outcomes: dict[str, _Serialized] = {}
        self._stages: dict[str, _Serialized] = {}

    def _metric(self, family: str, extra_labels: dict[str, str] | None = None, **options) -> _Serialized:
        with self._lock:
            metric = self.families[family].Metric(labels=self.labels | (extra_labels or {}), **options)
        return _Serialized(metric, self._lock)

    def gpu_gauge(self, name: str, gpu: str) -> _Serialized:
        return self._metric(name, {"gpu": gpu})

    def observe_batch(self, windows: int, jobs: int) -> None:
        self.batch_windows.observe(windows)
        self.batch_jobs.observe(jobs)

    def finished(self, outcome: str, output: JobOutput | None = None) -> None:
        with self._lock:  # one metric per label set, even when two jobs end at once
            if outcome not in self._outcomes:
                self._outcomes[outcome] = self._metric("lipsync_jobs_total", {"outcome": outcome})
            self._outcomes[outcome].increment(1)
            if output is None:
                return
            self.frames.increment(output.result.frames)
            for stage, seconds in output.result.seconds.items():
                if stage not in self._stages:
                    self._stages[stage] = self._metric("lipsync_stage_seconds", {"stage": stage}, buckets=_STAGE_BUCKETS)
                self._stages[stage].observe(seconds)


class _Stopping:
    """True once the instance unloads (:meth:`set`) or ``stop_file`` exists; checked with each job's own cancel."""

    def __init__(self, stop_file: str) -> None:
        self.file = Path(stop_file) if stop_file else None
        self.unloading = threading.Event()

    def set(self) -> None:
        self.unloading.set()

    def __call__(self) -> bool:
        return self.unloading.is_set() or (self.file is not None and self.file.exists())


class _CancelCheck:
    """A job's cancel check: its request was cancelled (client gone, gRPC cancel) or the instance stops.

    :meth:`close` it before the job's last response. The Python backend frees a decoupled request's
    response factory when the final flag is sent, and ``is_cancelled()`` after that makes the server
    read freed memory; the lock also lets a check already under way end first.
    """

    def __init__(self, request, stopping: _Stopping) -> None:
        self._request, self._stopping = request, stopping
        self._lock = threading.Lock()
        self._open = True

    def __call__(self) -> bool:
        with self._lock:
            return self._open and (self._request.is_cancelled() or self._stopping())

    def close(self) -> None:
        with self._lock:
            self._open = False


def _progress_sender(sender):
    """A :class:`ProgressReporter` sink: one progress response per report; ETA -1 = not known yet."""

    def send(report: ProgressReport) -> None:
        eta = -1.0 if report.eta_s is None else report.eta_s
        sender.send(pb_utils.InferenceResponse(
            [_float("PROGRESS", report.fraction), _text("STAGE", report.stage), _float("ETA", eta)]
        ))

    return send


def _float(name: str, value: float) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([value], dtype=np.float32))


def _text(name: str, value: str | bytes) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([value if isinstance(value, bytes) else value.encode()], dtype=np.object_))


def _array(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _parameters(request) -> dict:
    """The request's parameters (Triton passes them as a JSON object)."""
    return json.loads(request.parameters() or "{}")


def _is_describe(request) -> bool:
    """A request with neither VIDEO nor AUDIO: it asks which weights are served."""
    return all(_array(request, name) is None for name in contract.MEDIA)


def _bytes(request, name: str) -> bytes:
    value = _array(request, name)
    if value is None:
        raise BadInput(f"input {name} is missing")
    return bytes(value.reshape(-1)[0])


def _options(request, served_version: str) -> JobOptions:
    options = JobOptions(**contract.decode(lambda name: _array(request, name)))
    if options.version not in (None, served_version):
        raise BadInput(f"this server runs LatentSync {served_version}, not {options.version!r}")
    return options


def _devices(value: str, own: torch.device) -> list[torch.device]:
    """The ``devices`` parameter: "" = the instance's own device; "all" or "0,1,…" = those GPUs, its own first."""
    if not value:
        return [own]
    indices = range(torch.cuda.device_count()) if value == "all" else [int(index) for index in value.split(",")]
    others = [torch.device("cuda", index) for index in indices if index != own.index]
    return [own, *others]


def _flag(value: str) -> bool | None:
    """A config.pbtxt boolean parameter: "true"/"false", or "" for the pipeline config's default."""
    if value not in ("true", "false", ""):
        raise ValueError(f"expected true, false or empty, got {value!r}")
    return None if value == "" else value == "true"


_GENERATOR_OUTPUTS = ["STEP", "FACES_OUT", "SECONDS", "ERROR", "INFO"]


def _bls_stream(model: str, arrays: dict[str, np.ndarray]):
    """The responses of a decoupled model to one BLS request, as ``{output name: array}``."""
    request = pb_utils.InferenceRequest(
        model_name=model,
        inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in arrays.items()],
        requested_output_names=_GENERATOR_OUTPUTS,
    )
    for response in request.exec(decoupled=True):
        if response.has_error():
            raise LipSyncError(f"{model}: {response.error().message()}", ErrorKind.INTERNAL)
        outputs = {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}
        if outputs:
            yield outputs


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        on_gpu = args["model_instance_kind"] == "GPU"
        device = self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu")
        devices = _devices(params["devices"], device) if on_gpu else [device]
        if on_gpu:
            torch.cuda.set_device(device)
        if params["kernel_cache_dir"]:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = params["kernel_cache_dir"]  # read by Inductor when it compiles
        self.version, paths = weights_for(params["weights"], params["checkpoints"] or None)
        self.weights = load_weights_config().version(self.version).label
        self.metrics = _Metrics({"model": args["model_name"], "instance": args["model_instance_name"]})
        self.generator = params["generator"]
        settings = PipelineSettings.load(
            detect_threads=int(params["detect_threads"]), finish_threads=int(params["finish_threads"]),
            compile_unet=_flag(params["compile_unet"]),
            split_min_seconds=0 if self.generator else None,  # every job keeps all its lanes busy
        )
        batching = BatchingSettings(int(params["max_batch_windows"]), float(params["max_batch_delay_ms"]))
        if self.generator:
            remote = RemoteGenerator(lambda arrays: _bls_stream(self.generator, arrays), DTYPES[params["dtype"]])
            self.pipeline = LipSyncPipeline.with_generators(
                paths, [remote] * int(params["generator_lanes"]), windows_per_call=int(params["windows_per_call"]),
                settings=settings,
            )
        else:
            self.pipeline = self._load_pipeline(paths, devices, params, settings, batching)
            self._prepare_unet(on_gpu, params, batching)
        self.heartbeat_s = float(params["progress_heartbeat_s"])
        self.stage_rates = StageRates(settings.eta_history_jobs)
        self.gpu = GpuSampler(devices, self.metrics.gpu_gauge, float(params["gpu_metrics_interval_s"])) if on_gpu else None
        self.slots = threading.BoundedSemaphore(int(params["max_concurrent_jobs"]))
        self.stopping = _Stopping(params["stop_file"])
        self.jobs: set[threading.Thread] = set()
        self.logger = pb_utils.Logger
        places = ", ".join(str(one) for one in devices) + (f" (windows on {self.generator})" if self.generator else "")
        self.logger.log_info(f"lipsync: LatentSync {self.version} ({self.weights}) on {places}, {self.pipeline.replicas[0].dtype}")

    def _load_pipeline(self, paths, devices, params, settings, batching) -> LipSyncPipeline:
        return LipSyncPipeline.from_weights(
            paths,
            devices,
            DTYPES.get(params["dtype"]),
            windows_per_call=int(params["windows_per_call"]),
            batching=batching,
            on_batch=self.metrics.observe_batch,
            settings=settings,
        )

    def _prepare_unet(self, on_gpu: bool, params: dict[str, str], batching: BatchingSettings) -> None:
        """Warm up (GPU) and compile this instance's own UNet, before or after it reports ready."""
        log = pb_utils.Logger.log_info
        if on_gpu:  # capture CUDA graphs and pick cuDNN algorithms before reporting ready
            started = time.monotonic()
            self.pipeline.warm_up(max_windows=batching.max_windows, log=log)
            log(f"lipsync: warmed up in {time.monotonic() - started:.1f} s")
        if not self.pipeline.compiled:
            log(f"lipsync: compiling the UNet, kernel cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'of Inductor')}")
            if _flag(params["compile_before_ready"]):
                self.pipeline.compile_unet(max_windows=batching.max_windows, log=log)
            else:
                self.pipeline.start_compiling(max_windows=batching.max_windows, log=log)

    def execute(self, requests) -> None:
        for request in requests:
            if _is_describe(request):
                self._describe(request)
                continue
            self.slots.acquire()  # a full instance holds the next request in Triton's queue
            job = threading.Thread(target=self._serve, args=(request,), daemon=True)
            self.jobs.add(job)
            job.start()

    def _describe(self, request) -> None:
        info = json.dumps({"weights": self.weights, "version": self.version, "compiled": self._compiled()})
        final = pb_utils.InferenceResponse([_text("STAGE", "served"), _text("INFO", info)])
        request.get_response_sender().send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _compiled(self) -> bool:
        """Whether jobs run on the compiled UNet: this instance's, or the generation model's."""
        if not self.generator:
            return self.pipeline.compiled
        for outputs in _bls_stream(self.generator, {}):
            return bool(json.loads(bytes(outputs["INFO"].reshape(-1)[0]))["compiled"])
        raise LipSyncError(f"{self.generator} gave no answer", ErrorKind.UNAVAILABLE)

    def _serve(self, request) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on device 0, not this instance's GPU
        sender = request.get_response_sender()
        job = request.request_id() or "-"
        cancelled = _CancelCheck(request, self.stopping)
        try:
            self.metrics.active.increment(1)
            options = _options(request, self.version)
            self.logger.log_info(f"lipsync: job {job} started: {options}")
            eta = EtaEstimate(self.stage_rates)
            with ProgressReporter(_progress_sender(sender), self.heartbeat_s, eta) as progress:
                output = run_job(
                    self.pipeline, _bytes(request, "VIDEO"), _bytes(request, "AUDIO"), options,
                    progress=progress, should_cancel=cancelled, on_plan=progress.plan,
                )
        except Exception as exc:  # noqa: BLE001 - reported to the client; the instance stays up for the next job
            cancelled.close()
            self._fail(sender, job, exc, error_response=not _parameters(request).get(contract.NO_ERROR_RESPONSE, False))
        else:
            cancelled.close()
            self.logger.log_info(f"lipsync: job {job} done: {output.result.frames} frames")
            info = json.dumps(output.info() | {
                "version": self.version, "weights": self.weights, "device": self.device.type,
                "stages": eta.durations, "steps": eta.size.steps if eta.size else None,
            })
            final = pb_utils.InferenceResponse([
                _text("VIDEO_OUT", output.video), _float("PROGRESS", 1.0), _text("STAGE", "done"), _float("ETA", 0.0),
                _text("INFO", info),
            ])
            sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.metrics.finished("succeeded", output)
        finally:
            self.metrics.active.increment(-1)
            self.slots.release()
            self.jobs.discard(threading.current_thread())

    def _fail(self, sender, job: str, error: Exception, error_response: bool) -> None:
        """End the stream with STAGE "failed" and INFO {"error", "code"} (:func:`lipsync.contract.failure_info`),
        then, if ``error_response``, the Triton error itself.

        The structured response comes first because BLS callers (``lipsync_unary``) never see error
        responses of a decoupled model in Triton 2.51 (they ask for none: :data:`contract.NO_ERROR_RESPONSE`),
        and stream clients get the code as data.
        """
        kind = contract.kind_of(error)
        prefix = {ErrorKind.BAD_INPUT: "invalid input: ", ErrorKind.INTERNAL: "internal error: "}.get(kind, "")
        message = f"{prefix}{error}"
        (self.logger.log_error if kind is ErrorKind.INTERNAL else self.logger.log_info)(
            f"lipsync: job {job} {kind.value}: {error!r}"
        )
        info = contract.failure_info(error, message)
        code = getattr(pb_utils.TritonError, contract.FAILURES[kind].triton_code)
        sender.send(pb_utils.InferenceResponse([_text("STAGE", contract.FAILED_STAGE), _text("INFO", info)]))
        if error_response:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self.metrics.finished(_OUTCOMES.get(kind, "failed"))

    def finalize(self) -> None:
        self.stopping.set()
        for job in list(self.jobs):
            job.join()
        if self.gpu is not None:
            self.gpu.stop()
        self.pipeline.close()
