"""Per-GPU utilisation and memory gauges, sampled on a thread.

Triton's own DCGM-based ``nv_gpu_*`` metrics read 0 on some virtual machines, so a serving process
reports the GPUs it uses itself: utilisation through NVML (``torch.cuda.utilization``), memory
through the CUDA driver. Each family has one gauge per GPU, labelled ``gpu="<CUDA index>"``. Where
the gauges live (Triton's metric API, a Prometheus registry) is the caller's choice: it passes a
function that makes one gauge per family and GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lipsync.gpu_guard import GPU_GUARD

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GpuReading:
    """One device's state at one moment."""

    utilization: float
    """Busy fraction over NVML's last sample period, in [0, 1]."""
    memory_used: int
    """Bytes in use on the device, all processes."""
    memory_allocated: int
    """Bytes held by this process's tensors."""


GPU_GAUGES = {
    "lipsync_gpu_utilization_ratio": ("GPU busy fraction (NVML), per GPU", "utilization"),
    "lipsync_gpu_memory_used_bytes": ("Memory in use on the GPU, all processes, per GPU", "memory_used"),
    "lipsync_gpu_memory_allocated_bytes": ("GPU memory held by this process's tensors, per GPU", "memory_allocated"),
}
"""Family name → (description, :class:`GpuReading` field)."""


class Gauge(Protocol):
    def set(self, value: float) -> None: ...


GaugeFactory = Callable[[str, str], Gauge]
"""Makes the gauge of one family (its name) for one GPU (its label value)."""


def read_gpu(device: torch.device) -> GpuReading:
    import torch  # here, not at the top: the gauge names are also read by torch-free processes (lipsync.serving)

    with GPU_GUARD.shared():  # a driver call beside a CUDA-graph capture could invalidate it
        free, total = torch.cuda.mem_get_info(device)
    return GpuReading(torch.cuda.utilization(device) / 100, total - free, torch.cuda.memory_allocated(device))


class GpuSampler:
    """Reads every device each ``interval_s`` on a daemon thread and sets its gauges."""

    def __init__(
        self,
        devices: Sequence[torch.device],
        gauge: GaugeFactory,
        interval_s: float,
        read: Callable[[torch.device], GpuReading] = read_gpu,
    ) -> None:
        self.devices, self.interval_s, self.read = list(devices), interval_s, read
        self.gauges = {
            (name, device.index): gauge(name, str(device.index)) for name in GPU_GAUGES for device in self.devices
        }
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            for device in self.devices:
                reading = self.read(device)
                for name, (_, field) in GPU_GAUGES.items():
                    self.gauges[name, device.index].set(getattr(reading, field))

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
