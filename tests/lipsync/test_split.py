"""One job's windows spread over several devices: the same frames as on one device, and one cancel stops every part.

The "devices" are CPU replicas: separate UNet and VAE objects loaded from the same tiny weights, as each
GPU of a multi-device pipeline holds its own copy.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support.clips import decode, demo_frames, speech, write_video, write_wav
from support.files import TINY_UNET_CONFIG

from lipsync.batching import BatchingSettings, WindowBatcher
from lipsync.config import load_config
from lipsync.generation import FaceGenerator, Replica
from lipsync.models import load_unet
from lipsync.pipeline import LipSyncPipeline, PipelineSettings
from lipsync.sampling import (
    DirectDenoiser,
    JobCancelled,
    SamplingSettings,
    initial_noise,
    load_scheduler,
)
from lipsync.vae import load_vae
from lipsync.weights import WeightPaths

CONFIG = load_config(TINY_UNET_CONFIG)
WINDOW, SIZE = 4, 64
"""Frames per window and face size of the generator tests: how windows are spread over replicas does not depend on
their shape, so windows shorter than the tiny model's 16 frames, of faces half its 128 px, keep each call cheap."""
FRAMES = WINDOW * 4 + 3
"""Four full windows and a 3-frame tail: groups of two windows, then the tail alone."""


class CountingUNet:
    """Counts the UNet calls made on one replica (and can hold them)."""

    def __init__(self, unet, before_call=None) -> None:
        self.unet, self.calls, self.before_call = unet, 0, before_call
        self.dtype, self.device = unet.dtype, unet.device

    def __call__(self, sample, timestep, audio):
        if self.before_call is not None:
            self.before_call(self)
        self.calls += 1
        return self.unet(sample, timestep, audio)


def _replicas(weights: WeightPaths, count: int, before_call=None, batching: bool = False) -> list[Replica]:
    replicas = []
    for _ in range(count):
        unet = CountingUNet(load_unet(weights.unet_config, weights.unet), before_call)
        denoiser = WindowBatcher(unet, load_scheduler(), BatchingSettings(max_delay_ms=0)) if batching else DirectDenoiser(unet, load_scheduler())
        replicas.append(Replica(load_vae(weights.vae_dir), denoiser))
    return replicas


def _close(replicas: list[Replica]) -> None:
    for replica in replicas:
        if isinstance(replica.denoiser, WindowBatcher):
            replica.denoiser.close()


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    faces = torch.rand(FRAMES, 3, SIZE, SIZE, generator=generator) * 2 - 1
    audio = torch.randn(FRAMES, 50, CONFIG["model"]["cross_attention_dim"], generator=generator)
    mask = torch.ones(SIZE, SIZE)
    mask[SIZE // 2 :, SIZE // 8 : -SIZE // 8] = 0
    return faces, audio, mask


def _generate(replicas: list[Replica], steps: int = 2, should_cancel=None, on_window=None) -> torch.Tensor:
    settings = SamplingSettings.from_config(CONFIG, steps=steps, windows_per_call=2, num_frames=WINDOW)
    random = torch.Generator().manual_seed(1247)
    noise = initial_noise(random, SIZE // 8)
    faces, audio, mask = _inputs()
    return FaceGenerator(replicas, settings)(faces, audio, mask, noise, random, on_window=on_window, should_cancel=should_cancel)


def _unet_calls(replicas: list[Replica]) -> list[int]:
    return [_unet(replica).calls for replica in replicas]


def _unet(replica: Replica) -> CountingUNet:
    return replica.denoiser.unet


def _replica_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("replica-")]


def test_split_frames_equal_one_device_frames_bit_for_bit(tiny_weights: WeightPaths) -> None:
    """Three groups on two replicas (groups 0 and 2 on the first, 1 on the second), reassembled in order."""
    one = _replicas(tiny_weights, 1)
    two = _replicas(tiny_weights, 2)
    progress: list[tuple[int, int]] = []
    alone = _generate(one)
    split = _generate(two, on_window=lambda done, total: progress.append((done, total)))
    assert torch.equal(split, alone)
    assert _unet_calls(two) == [2 * 2, 2]  # steps per group: two groups on the first replica, one on the second
    assert max(progress) == (5, 5) and len(progress) == 3
    assert not _replica_threads()


def test_split_frames_equal_through_window_batchers(tiny_weights: WeightPaths) -> None:
    """The serving setup: a WindowBatcher per replica."""
    one, two = _replicas(tiny_weights, 1, batching=True), _replicas(tiny_weights, 2, batching=True)
    try:
        assert torch.equal(_generate(two), _generate(one))
    finally:
        _close(one + two)


def test_cancel_stops_every_part_and_raises_cancelled(tiny_weights: WeightPaths) -> None:
    """Cancelled once both replicas are in their DDIM loops: both leave within a step, the call raises after they have."""
    started = threading.Barrier(2, timeout=30)
    cancelled = threading.Event()

    def meet(unet: CountingUNet) -> None:
        if unet.calls == 0:
            started.wait()  # each replica's first UNet call waits for the other's
            cancelled.set()

    replicas = _replicas(tiny_weights, 2, before_call=meet, batching=True)
    try:
        with pytest.raises(JobCancelled):
            _generate(replicas, steps=20, should_cancel=cancelled.is_set)
        assert not _replica_threads()
        calls = _unet_calls(replicas)
        time.sleep(0.3)
        assert _unet_calls(replicas) == calls  # nothing kept running
        assert all(1 <= count <= 2 for count in calls)  # the first step, at most one more, of 20
    finally:
        _close(replicas)


def test_a_failing_part_stops_the_others(tiny_weights: WeightPaths) -> None:
    failed = threading.Event()

    def fail_second(unet: CountingUNet) -> None:
        if unet is _unet(replicas[1]):
            failed.set()
            raise RuntimeError("device lost")
        failed.wait(30)  # the first replica's first step waits until the second has failed

    replicas = _replicas(tiny_weights, 2, before_call=fail_second)
    with pytest.raises(RuntimeError, match="device lost"):
        _generate(replicas, steps=20)
    assert not _replica_threads()
    assert _unet_calls(replicas)[0] < 20  # the first group left its loop early; its second group never started


def test_a_long_job_is_split_by_length_and_writes_the_same_video(tiny_weights: WeightPaths, tmp_path: Path) -> None:
    video = write_video(tmp_path / "in.mp4", demo_frames(24))
    audio = write_wav(tmp_path / "in.wav", speech(2.0))  # 50 frames: 3 full windows and a 2-frame tail
    settings = PipelineSettings.load(split_min_seconds=1.5)
    pipeline = LipSyncPipeline.from_weights(tiny_weights, device=["cpu", "cpu"], windows_per_call=1, settings=settings)
    try:
        split = pipeline.run(video, audio, tmp_path / "split.mp4", inference_steps=1)
        alone = pipeline.run(video, audio, tmp_path / "alone.mp4", inference_steps=1, devices=1)
    finally:
        pipeline.close()
    assert (split.devices, alone.devices) == (2, 1)
    assert split.frames == alone.frames == 50
    assert all(np.array_equal(a, b) for a, b in zip(decode(tmp_path / "split.mp4"), decode(tmp_path / "alone.mp4")))
