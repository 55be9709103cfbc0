"""Triton adapter for ``lipsync_generate``: a group of one job's windows in, its generated faces out.

The ``lipsync`` model's CPU instances (the jobs' frame work, one process each) send their window groups
here over BLS (``lipsync.remote``). Decoupled: ``execute`` takes a slot (``max_inflight_groups``; when
all are taken the next request waits in Triton's queue, or goes to another GPU's instance) and starts a
thread per request; the thread generates the group on this instance's :class:`~lipsync.sampling.Replica`
(VAE encode, the shared ``WindowBatcher``'s DDIM loop with the windows of every running group, VAE
decode), sends a STEP response after every DDIM step, then FACES_OUT. Errors travel as an ERROR output
(``lipsync.contract.failure_info``) because BLS callers do not see a decoupled model's error responses.

GPU memory stays within ``gpu_memory_gib``: the UNet's calls hold at most ``max_batch_windows`` windows,
at most ``vae_slots`` groups are in the VAE at once, and everything else waits for its turn.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from lipsync import remote
from lipsync.batching import BatchingSettings
from lipsync.contract import failure_info
from lipsync.gpu_stats import GPU_GAUGES, GpuSampler, limit_gpu_memory
from lipsync.lifecycle import (
    compile_unet,
    is_compiled,
    limit_graph_memory,
    start_compiling,
    warm_up,
)
from lipsync.pipeline import DTYPES, LipSyncPipeline, PipelineSettings
from lipsync.server_weights import weights_for
from lipsync.timing import StageTimer

CUDA_CONTEXT_GIB = 0.75
"""GPU memory of the process that torch does not allocate (CUDA context, kernels, cuBLAS/cuDNN handles)."""

MEMORY_WAIT_S = 120.0
"""How long a group over the memory cap waits for another group to end before its job fails."""


def _flag(value: str) -> bool | None:
    if value not in ("true", "false", ""):
        raise ValueError(f"expected true, false or empty, got {value!r}")
    return None if value == "" else value == "true"


def _text(name: str, value: str) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([value.encode()], dtype=np.object_))


class _LockedGauge:
    """A gauge whose updates take the instance's metric lock (the stub's metric updates are not thread-safe)."""

    def __init__(self, metric, lock: threading.RLock) -> None:
        self._metric, self._lock = metric, lock

    def set(self, value: float) -> None:
        with self._lock:
            self._metric.set(value)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        on_gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu")
        log = pb_utils.Logger.log_info
        cap = None
        if on_gpu:
            torch.cuda.set_device(self.device)
            budget = float(params["gpu_memory_gib"])
            if budget > 0:
                cap = limit_gpu_memory(self.device, budget, CUDA_CONTEXT_GIB)
                log(f"lipsync_generate: torch allocations on {self.device} capped at {cap / 2**30:.2f} GiB")
        if params["kernel_cache_dir"]:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = params["kernel_cache_dir"]
        _, paths = weights_for(params["weights"], params["checkpoints"] or None)
        self._lock = threading.RLock()  # one lock for every metric update (see the lipsync model)
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        families = {
            name: pb_utils.MetricFamily(name, description, kind)
            for name, description, kind in [
                ("lipsync_unet_batch_windows", "16-frame windows per shared DDIM loop (all jobs)", pb_utils.MetricFamily.HISTOGRAM),
                ("lipsync_unet_batch_jobs", "Jobs whose windows shared one DDIM loop", pb_utils.MetricFamily.HISTOGRAM),
                *((name, description, pb_utils.MetricFamily.GAUGE) for name, (description, _) in GPU_GAUGES.items()),
            ]
        }
        self.families = families
        buckets = [1, 2, 4, 8, 16, 32, 64]
        self._batch_windows = families["lipsync_unet_batch_windows"].Metric(labels=labels, buckets=buckets)
        self._batch_jobs = families["lipsync_unet_batch_jobs"].Metric(labels=labels, buckets=buckets)
        self.gauges: list = []
        batching = BatchingSettings(int(params["max_batch_windows"]), float(params["max_batch_delay_ms"]))
        self.pipeline = LipSyncPipeline.from_weights(
            paths, self.device, DTYPES.get(params["dtype"]),
            windows_per_call=int(params["windows_per_call"]), batching=batching, on_batch=self._observe_batch,
            settings=PipelineSettings.load(compile_unet=_flag(params["compile_unet"])),
            vae_slots=int(params["vae_slots"]),
        )
        self.replica = self.pipeline.local_replicas[0]
        if cap is not None:
            limit_graph_memory(self.pipeline, cap)
        if on_gpu:
            started = time.monotonic()
            warm_up(self.pipeline, max_windows=batching.max_windows, log=log)
            log(f"lipsync_generate: warmed up in {time.monotonic() - started:.1f} s")
        if not is_compiled(self.pipeline):
            if _flag(params["compile_before_ready"]):
                compile_unet(self.pipeline, max_windows=batching.max_windows, log=log)
            else:
                start_compiling(self.pipeline, max_windows=batching.max_windows, log=log)
        self.gpu = GpuSampler([self.device], self._gauge, float(params["gpu_metrics_interval_s"])) if on_gpu else None
        self.stop_file = params["stop_file"]
        self.unloading = threading.Event()
        self.slots = threading.BoundedSemaphore(int(params["max_inflight_groups"]))
        self.groups: set[threading.Thread] = set()
        self._ended = threading.Condition()
        self._ended_groups = 0
        """Groups ended so far: a group over the memory cap waits until this grows."""
        log(f"lipsync_generate: on {self.device}, {self.replica.dtype}")

    def _gauge(self, name: str, gpu: str) -> _LockedGauge:
        with self._lock:
            return _LockedGauge(self.families[name].Metric(labels={"gpu": gpu}), self._lock)

    def _observe_batch(self, windows: int, jobs: int) -> None:
        with self._lock:
            self._batch_windows.observe(windows)
            self._batch_jobs.observe(jobs)

    def _stopping(self) -> bool:
        return self.unloading.is_set() or bool(self.stop_file and os.path.exists(self.stop_file))

    def execute(self, requests) -> None:
        for request in requests:
            if pb_utils.get_input_tensor_by_name(request, "FACES") is None:
                info = json.dumps({"compiled": is_compiled(self.pipeline), "dtype": str(self.replica.dtype).removeprefix("torch.")})
                request.get_response_sender().send(
                    pb_utils.InferenceResponse([_text("INFO", info)]), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                )
                continue
            self.slots.acquire()
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            self.groups.add(thread)
            thread.start()

    def _serve(self, request) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        sender = request.get_response_sender()

        def on_step(step: int) -> None:
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("STEP", np.array([step], np.int32))]))

        try:
            arrays = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in remote.INPUTS}
            group = remote.group_from_arrays(arrays, self.replica.dtype, on_step, self._stopping)
            timer = StageTimer(self.device)
            faces = self._generate(group, timer)
            final = pb_utils.InferenceResponse([
                pb_utils.Tensor("FACES_OUT", faces.numpy()), _text("SECONDS", json.dumps(dict(timer.seconds))),
            ])
        except Exception as exc:  # noqa: BLE001 - the job gets the error; the instance stays up
            final = pb_utils.InferenceResponse([_text("ERROR", failure_info(exc))])
        try:
            sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self.slots.release()
            self.groups.discard(threading.current_thread())
            with self._ended:
                self._ended_groups += 1
                self._ended.notify_all()

    def _generate(self, group, timer: StageTimer) -> torch.Tensor:
        """Generate ``group``; when the memory cap is reached, wait for another group to end and try again.

        A group's result depends only on its inputs (its noise travels with it), so a retry gives the
        same faces. Alone on the instance, or when nothing ends within ``MEMORY_WAIT_S``, the error stands.
        """
        while True:
            with self._ended:
                ended = self._ended_groups
            try:
                return self.replica.generate(group, timer)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                with self._ended:
                    if not self._ended.wait_for(lambda: self._ended_groups > ended, timeout=MEMORY_WAIT_S):
                        raise
                pb_utils.Logger.log_info("lipsync_generate: a group waited for GPU memory and runs again")

    def finalize(self) -> None:
        self.unloading.set()
        for thread in list(self.groups):
            thread.join()
        if self.gpu is not None:
            self.gpu.stop()
        self.pipeline.close()
