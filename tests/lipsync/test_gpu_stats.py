"""Per-GPU gauges: every device of a process gets its own ``gpu`` label, from a fake NVML reading source."""

from __future__ import annotations

import time

import torch
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from lipsync.gpu_stats import GPU_GAUGES, GpuReading, GpuSampler
from lipsync.testing import sample_sum

READINGS = {0: GpuReading(0.25, 3 * 2**30, 2**30), 1: GpuReading(0.75, 5 * 2**30, 4 * 2**30)}


def test_each_gpu_is_reported_under_its_own_label() -> None:
    registry = CollectorRegistry()
    families = {name: Gauge(name, description, ["gpu"], registry=registry) for name, (description, _) in GPU_GAUGES.items()}
    devices = [torch.device("cuda", index) for index in READINGS]  # never touched: the reader is a fake
    sampler = GpuSampler(devices, lambda name, gpu: families[name].labels(gpu=gpu), 0.01, read=lambda device: READINGS[device.index])
    try:
        deadline = time.monotonic() + 10
        while sample_sum(generate_latest(registry).decode(), "lipsync_gpu_utilization_ratio") < 1.0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sampler.stop()
    text = generate_latest(registry).decode()
    for gpu, reading in READINGS.items():
        assert sample_sum(text, "lipsync_gpu_utilization_ratio", gpu=str(gpu)) == reading.utilization
        assert sample_sum(text, "lipsync_gpu_memory_used_bytes", gpu=str(gpu)) == reading.memory_used
        assert sample_sum(text, "lipsync_gpu_memory_allocated_bytes", gpu=str(gpu)) == reading.memory_allocated
    assert 'lipsync_gpu_utilization_ratio{gpu="1"} 0.75' in text
    assert not sampler.thread.is_alive()
