"""Triton adapter for ``lipsync_generate``: a group of one job's windows in, its generated faces out.

The ``lipsync`` model's CPU instances (the jobs' frame work, one process each) send their window groups
here over BLS (``lipsync.remote``). Decoupled: ``execute`` takes a slot (``max_inflight_groups``; when
all are taken the next request waits in Triton's queue, or goes to another GPU's instance) and starts a
thread per request; the thread generates the group on this instance's :class:`~lipsync.sampling.Replica`
(VAE encode, the shared ``WindowBatcher``'s DDIM loop with the windows of every running group, VAE
decode), sends a STEP response after every DDIM step, then FACES_OUT. Errors travel as an ERROR output
(``lipsync.contract.failure_info``) because BLS callers do not see a decoupled model's error responses.

GPU memory stays within ``gpu_memory_gib``: the UNet's calls hold at most ``max_batch_windows`` windows,
at most ``vae_slots`` groups are in the VAE at once, and everything else waits for its turn. Its parameters,
metrics and stop check are :mod:`lipsync.serving`'s, as the ``lipsync`` model's are.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from lipsync import remote
from lipsync.batching import BatchingSettings
from lipsync.contract import failure_info
from lipsync.generation import WindowGroup
from lipsync.gpu_memory import limit_gpu_memory, release_failed_call
from lipsync.gpu_stats import GpuSampler
from lipsync.lifecycle import compile_unet, is_compiled, limit_graph_memory, start_compiling, warm_up
from lipsync.pipeline import DTYPES, LipSyncPipeline, PipelineSettings
from lipsync.server_weights import weights_for
from lipsync.serving import GenerateParameters, InstanceMetrics, InstanceStopping, text_tensor
from lipsync.timing import StageTimer

SERVER_OVERHEAD_GIB = 1.6
"""GPU memory the server holds on a GPU beside this process's torch allocations, so that ``gpu_memory_gib``
bounds the whole server there: this process's CUDA context, kernels and cuBLAS/cuDNN handles (0.73 GiB; 0.97 GiB
once the compiled UNet's kernels are loaded) and the ``tritonserver`` process's own context and CUDA memory pool
(0.57 GiB), as NVML measured them per process on an H100 (``docs/benchmarks.md``). The ``lipsync`` job processes
hold none (``keep_off_gpus``)."""

MEMORY_WAIT_S = 120.0
"""How long a group over the memory cap waits for another group to end before its job fails."""


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = GenerateParameters.from_model_config(json.loads(args["model_config"]))
        on_gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu")
        log = pb_utils.Logger.log_info
        cap = None
        if on_gpu:
            torch.cuda.set_device(self.device)
            if params.gpu_memory_gib > 0:
                cap = limit_gpu_memory(self.device, params.gpu_memory_gib, SERVER_OVERHEAD_GIB)
                log(f"lipsync_generate: torch allocations on {self.device} capped at {cap / 2**30:.2f} GiB")
        if params.kernel_cache_dir:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = params.kernel_cache_dir
        _, paths = weights_for(params.weights, params.checkpoints or None)
        self.metrics = InstanceMetrics(pb_utils, {"model": args["model_name"], "instance": args["model_instance_name"]})
        self.pipeline = LipSyncPipeline.from_weights(
            paths,
            self.device,
            DTYPES.get(params.dtype),
            windows_per_call=params.windows_per_call,
            batching=BatchingSettings(params.max_batch_windows, params.max_batch_delay_ms),
            on_batch=self.metrics.observe_batch,
            settings=PipelineSettings.load(compile_unet=params.compile_unet),
            vae_slots=params.vae_slots,
        )
        self.replica = self.pipeline.local_replicas[0]
        if cap is not None:
            limit_graph_memory(self.pipeline, cap)
        if on_gpu:
            started = time.monotonic()
            warm_up(self.pipeline, log=log)
            log(f"lipsync_generate: warmed up in {time.monotonic() - started:.1f} s")
        if not is_compiled(self.pipeline):
            if params.compile_before_ready:
                compile_unet(self.pipeline, log=log)
            else:
                start_compiling(self.pipeline, log=log)
        self.gpu = GpuSampler([self.device], self.metrics.gpu_gauge, params.gpu_metrics_interval_s) if on_gpu else None
        self.stopping = InstanceStopping(params.stop_file)
        self.slots = threading.BoundedSemaphore(params.max_inflight_groups)
        self.groups: set[threading.Thread] = set()
        self._ended = threading.Condition()
        self._ended_groups = 0
        """Groups ended so far: a group over the memory cap waits until this grows."""
        log(f"lipsync_generate: on {self.device}, {self.replica.dtype}")

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            if pb_utils.get_input_tensor_by_name(request, "FACES") is None:
                info = json.dumps(
                    {"compiled": is_compiled(self.pipeline), "dtype": str(self.replica.dtype).removeprefix("torch.")}
                )
                request.get_response_sender().send(
                    pb_utils.InferenceResponse([text_tensor(pb_utils, "INFO", info)]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
                continue
            self.slots.acquire()
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            self.groups.add(thread)
            thread.start()

    def _serve(self, request: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        sender = request.get_response_sender()

        def on_step(step: int) -> None:
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("STEP", np.array([step], np.int32))]))

        try:
            arrays = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in remote.INPUTS}
            group = remote.group_from_arrays(arrays, self.replica.dtype, on_step, self.stopping)
            timer = StageTimer(self.device)
            faces = self._generate(group, timer)
            final = pb_utils.InferenceResponse(
                [
                    pb_utils.Tensor("FACES_OUT", faces.numpy()),
                    text_tensor(pb_utils, "SECONDS", json.dumps(dict(timer.seconds))),
                ]
            )
        except Exception as exc:  # noqa: BLE001 - the job gets the error; the instance stays up
            final = pb_utils.InferenceResponse([text_tensor(pb_utils, "ERROR", failure_info(exc))])
        try:
            sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self.slots.release()
            self.groups.discard(threading.current_thread())
            with self._ended:
                self._ended_groups += 1
                self._ended.notify_all()

    def _generate(self, group: WindowGroup, timer: StageTimer) -> torch.Tensor:
        """Generate ``group``; when the memory cap is reached, wait for another group to end and try again.

        A group's result depends only on its inputs (its noise travels with it), so a retry gives the
        same faces. Alone on the instance, or when nothing ends within ``MEMORY_WAIT_S``, the error stands.
        """
        while True:
            with self._ended:
                ended_before = self._ended_groups
            try:
                return self.replica.generate(group, timer)
            except torch.OutOfMemoryError as exc:
                release_failed_call(exc)  # or this group would hold the memory it waits for
                if not self._another_group_ends(ended_before):
                    raise
                pb_utils.Logger.log_info("lipsync_generate: a group waited for GPU memory and runs again")

    def _another_group_ends(self, ended_before: int) -> bool:
        """Wait up to ``MEMORY_WAIT_S`` for a group to end after ``ended_before`` had; whether one did."""
        with self._ended:
            return self._ended.wait_for(lambda: self._ended_groups > ended_before, timeout=MEMORY_WAIT_S)

    def finalize(self) -> None:
        self.stopping.set()
        for thread in list(self.groups):
            thread.join()
        if self.gpu is not None:
            self.gpu.stop()
        self.pipeline.close()
        self.metrics.close()
