"""Triton adapter for ``lipsync``: request tensors → ``lipsync.jobs.run_job`` → streamed responses.

Decoupled: ``execute`` starts one thread per request and returns; each thread streams progress, then
the final video, through the request's response sender. A request without VIDEO and AUDIO asks which
weights are served: it is answered on a thread of its own too (in a split server the answer asks the
generation model whether it compiled) with one final INFO. The instance's ``LipSyncPipeline``
shares one ``WindowBatcher`` per device, so windows of all running jobs ride in the same UNet calls.
With the ``devices`` parameter the instance holds a replica of the models on each listed GPU and
spreads long jobs' windows over them. Its parameters, metrics and cancel checks are :mod:`lipsync.serving`'s
(testable without Triton). With the ``generator`` parameter the instance holds no UNet or
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
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from lipsync import contract
from lipsync.batching import BatchingSettings
from lipsync.errors import BadInput, ErrorKind, LipSyncError
from lipsync.gpu_stats import GpuSampler
from lipsync.jobs import JobOptions, run_job
from lipsync.lifecycle import compile_unet, is_compiled, start_compiling, warm_up
from lipsync.pipeline import DTYPES, LipSyncPipeline, PipelineSettings
from lipsync.progress import EtaEstimate, ProgressReport, ProgressReporter, StageRates
from lipsync.remote import Arrays, RemoteGenerator
from lipsync.server_weights import weights_for
from lipsync.serving import (
    OUTCOMES,
    InstanceStopping,
    JobMetrics,
    LipSyncParameters,
    RequestCancelCheck,
    StreamReleases,
    keep_off_gpus,
    text_tensor,
)
from lipsync.weights import WeightPaths, load_weights_config


def _progress_sender(sender: Any) -> Callable[[ProgressReport], None]:
    """A :class:`ProgressReporter` sink: one progress response per report; ETA -1 = not known yet."""

    def send(report: ProgressReport) -> None:
        eta = -1.0 if report.eta_s is None else report.eta_s
        sender.send(
            pb_utils.InferenceResponse(
                [_float("PROGRESS", report.fraction), _text("STAGE", report.stage), _float("ETA", eta)]
            )
        )

    return send


def _float(name: str, value: float) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([value], dtype=np.float32))


def _text(name: str, value: str | bytes) -> pb_utils.Tensor:
    return text_tensor(pb_utils, name, value)


def _array(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _parameters(request: Any) -> dict[str, Any]:
    """The request's parameters (Triton passes them as a JSON object)."""
    return json.loads(request.parameters() or "{}")


def _is_describe(request: Any) -> bool:
    """A request with neither VIDEO nor AUDIO: it asks which weights are served."""
    return all(_array(request, name) is None for name in contract.MEDIA)


def _bytes(request: Any, name: str) -> bytes:
    value = _array(request, name)
    if value is None:
        raise BadInput(f"input {name} is missing")
    return bytes(value.reshape(-1)[0])


def _options(request: Any, served_version: str) -> JobOptions:
    options = JobOptions(**contract.decode(lambda name: _array(request, name)))
    if options.version not in (None, served_version):
        raise BadInput(f"this server runs LatentSync {served_version}, not {options.version!r}")
    return options


def _triton_code(error: Exception) -> Any:
    """The Triton error code of ``error``'s kind (:data:`lipsync.contract.FAILURES`)."""
    return getattr(pb_utils.TritonError, contract.FAILURES[contract.kind_of(error)].triton_code)


def _devices(value: str, own: torch.device) -> list[torch.device]:
    """The ``devices`` parameter: "" = the instance's own device; "all" or "0,1,…" = those GPUs, its own first."""
    if not value:
        return [own]
    indices = range(torch.cuda.device_count()) if value == "all" else [int(index) for index in value.split(",")]
    others = [torch.device("cuda", index) for index in indices if index != own.index]
    return [own, *others]


_GENERATOR_OUTPUTS = ["STEP", "FACES_OUT", "SECONDS", "ERROR", "INFO"]


def _bls_stream(model: str, arrays: Arrays, releases: StreamReleases) -> Iterator[dict[str, np.ndarray]]:
    """The responses of a decoupled model to one BLS request, as ``{output name: array}``; the stream is then
    kept in ``releases`` until a cancel check of the instance lets go of it."""
    request = pb_utils.InferenceRequest(
        model_name=model,
        inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in arrays.items()],
        requested_output_names=_GENERATOR_OUTPUTS,
    )
    for response in releases.read(request.exec(decoupled=True)):
        if response.has_error():
            raise LipSyncError(f"{model}: {response.error().message()}", ErrorKind.INTERNAL)
        outputs = {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}
        if outputs:
            yield outputs


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = LipSyncParameters.from_model_config(json.loads(args["model_config"]))
        on_gpu = args["model_instance_kind"] == "GPU"
        device = self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu")
        devices = _devices(params.devices, device) if on_gpu else [device]
        if on_gpu:
            torch.cuda.set_device(device)
        else:
            keep_off_gpus()
        if params.kernel_cache_dir:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = params.kernel_cache_dir  # read by Inductor when it compiles
        self.version, paths = weights_for(params.weights, params.checkpoints or None)
        self.weights = load_weights_config().version(self.version).label
        self.metrics = JobMetrics(pb_utils, {"model": args["model_name"], "instance": args["model_instance_name"]})
        self.generator = params.generator
        self.releases = StreamReleases()
        settings = PipelineSettings.load(
            detect_threads=params.detect_threads,
            finish_threads=params.finish_threads,
            compile_unet=params.compile_unet,
            split_min_seconds=0 if self.generator else None,  # every job keeps all its lanes busy
        )
        batching = BatchingSettings(params.max_batch_windows, params.max_batch_delay_ms)
        if self.generator:
            remote = RemoteGenerator(
                lambda arrays: _bls_stream(self.generator, arrays, self.releases), DTYPES[params.dtype]
            )
            self.pipeline = LipSyncPipeline.with_generators(
                paths,
                [remote] * params.generator_lanes,
                windows_per_call=params.windows_per_call,
                settings=settings,
            )
        else:
            self.pipeline = self._load_pipeline(paths, devices, params, settings, batching)
            self._prepare_unet(on_gpu, params)
        self.heartbeat_s = params.progress_heartbeat_s
        self.stage_rates = StageRates(settings.eta.history_jobs, settings.eta.fixed_share, params.stage_rates_file)
        self.gpu = GpuSampler(devices, self.metrics.gpu_gauge, params.gpu_metrics_interval_s) if on_gpu else None
        self.slots = threading.BoundedSemaphore(params.max_concurrent_jobs)
        self.stopping = InstanceStopping(params.stop_file)
        self.jobs: set[threading.Thread] = set()
        self.logger = pb_utils.Logger
        places = ", ".join(str(one) for one in devices) + (f" (windows on {self.generator})" if self.generator else "")
        self.logger.log_info(
            f"lipsync: LatentSync {self.version} ({self.weights}) on {places}, {self.pipeline.replicas[0].dtype}"
        )

    def _load_pipeline(
        self,
        paths: WeightPaths,
        devices: list[torch.device],
        params: LipSyncParameters,
        settings: PipelineSettings,
        batching: BatchingSettings,
    ) -> LipSyncPipeline:
        return LipSyncPipeline.from_weights(
            paths,
            devices,
            DTYPES.get(params.dtype),
            windows_per_call=params.windows_per_call,
            batching=batching,
            on_batch=self.metrics.observe_batch,
            settings=settings,
        )

    def _prepare_unet(self, on_gpu: bool, params: LipSyncParameters) -> None:
        """Warm up (GPU) and compile this instance's own UNet, before or after it reports ready."""
        log = pb_utils.Logger.log_info
        if on_gpu:  # capture CUDA graphs and pick cuDNN algorithms before reporting ready
            started = time.monotonic()
            warm_up(self.pipeline, log=log)
            log(f"lipsync: warmed up in {time.monotonic() - started:.1f} s")
        if not is_compiled(self.pipeline):
            log(f"lipsync: compiling the UNet, kernel cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'of Inductor')}")
            if params.compile_before_ready:
                compile_unet(self.pipeline, log=log)
            else:
                start_compiling(self.pipeline, log=log)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            if _is_describe(request):  # on a thread too: the answer may wait on the generation model
                threading.Thread(target=self._describe, args=(request,), daemon=True).start()
                continue
            self.slots.acquire()  # a full instance holds the next request in Triton's queue
            job = threading.Thread(target=self._serve, args=(request,), daemon=True)
            self.jobs.add(job)
            job.start()

    def _describe(self, request: Any) -> None:
        """Answer a describe request; an error (the generation model not answering) is the request's error."""
        cancelled = RequestCancelCheck(request, self.stopping, self.releases)
        try:
            info = json.dumps({"weights": self.weights, "version": self.version, "compiled": self._compiled()})
            final = pb_utils.InferenceResponse([_text("STAGE", "served"), _text("INFO", info)])
        except Exception as exc:  # noqa: BLE001 - the client gets it; the instance stays up
            final = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), _triton_code(exc)))
        cancelled.close()  # lets go of the generation model's stream
        request.get_response_sender().send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _compiled(self) -> bool:
        """Whether jobs run on the compiled UNet: this instance's, or the generation model's."""
        if not self.generator:
            return is_compiled(self.pipeline)
        answers = [
            json.loads(bytes(outputs["INFO"].reshape(-1)[0]))
            for outputs in _bls_stream(self.generator, {}, self.releases)
        ]
        if not answers:
            raise LipSyncError(f"{self.generator} gave no answer", ErrorKind.UNAVAILABLE)
        return bool(answers[0]["compiled"])

    def _serve(self, request: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on device 0, not this instance's GPU
        sender = request.get_response_sender()
        job = request.request_id() or "-"
        cancelled = RequestCancelCheck(request, self.stopping, self.releases)
        try:
            self.metrics.active.increment(1)
            options = _options(request, self.version)
            self.logger.log_info(f"lipsync: job {job} started: {options}")
            eta = EtaEstimate(self.stage_rates)
            with ProgressReporter(_progress_sender(sender), self.heartbeat_s, eta) as progress:
                output = run_job(
                    self.pipeline,
                    _bytes(request, "VIDEO"),
                    _bytes(request, "AUDIO"),
                    options,
                    progress=progress,
                    should_cancel=cancelled,
                    on_plan=progress.plan,
                )
        except Exception as exc:  # noqa: BLE001 - reported to the client; the instance stays up for the next job
            cancelled.close()
            self._fail(sender, job, exc, error_response=not _parameters(request).get(contract.NO_ERROR_RESPONSE, False))
        else:
            cancelled.close()
            self.logger.log_info(f"lipsync: job {job} done: {output.result.frames} frames")
            info = json.dumps(
                output.info()
                | {
                    "version": self.version,
                    "weights": self.weights,
                    "device": self.device.type,
                    "stages": eta.durations,
                    "steps": eta.size.steps if eta.size else None,
                }
            )
            final = pb_utils.InferenceResponse(
                [
                    _text("VIDEO_OUT", output.video),
                    _float("PROGRESS", 1.0),
                    _text("STAGE", "done"),
                    _float("ETA", 0.0),
                    _text("INFO", info),
                ]
            )
            sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.metrics.finished("succeeded", output.result)
        finally:
            self.metrics.active.increment(-1)
            self.slots.release()
            self.jobs.discard(threading.current_thread())

    def _fail(self, sender: Any, job: str, error: Exception, error_response: bool) -> None:
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
        sender.send(pb_utils.InferenceResponse([_text("STAGE", contract.FAILED_STAGE), _text("INFO", info)]))
        if error_response:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, _triton_code(error))))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self.metrics.finished(OUTCOMES.get(kind, "failed"))

    def finalize(self) -> None:
        self.stopping.set()
        for job in list(self.jobs):
            job.join()
        if self.gpu is not None:
            self.gpu.stop()
        self.pipeline.close()
        self.metrics.close()
