"""Face generation in another process (``lipsync.remote``): the wire format loses nothing, and a job
whose windows are generated through it gets the faces a local generator makes, bit for bit.

The transport here is a function in this process; the real one (Triton BLS to ``lipsync_generate``) is
covered end to end in ``test_triton_split.py``.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from support.files import TINY_UNET_CONFIG

from lipsync.config import load_config
from lipsync.contract import failure_info
from lipsync.errors import BadInput, JobCancelled, LipSyncError
from lipsync.generation import FaceGenerator, Replica, WindowGroup
from lipsync.models import load_unet
from lipsync.remote import (
    RemoteGenerator,
    faces_to_pixels,
    group_arrays,
    group_from_arrays,
    pixels_to_faces,
)
from lipsync.sampling import (
    DirectDenoiser,
    SamplingSettings,
    initial_noise,
    load_scheduler,
)
from lipsync.timing import StageTimer
from lipsync.vae import load_vae
from lipsync.weights import WeightPaths

WINDOW = 4
"""Frames per window of the generation test: a window's length changes nothing on the wire, and a quarter of the
tiny model's 16 frames keeps its UNet calls cheap."""


@pytest.fixture(scope="module")
def replica(tiny_weights: WeightPaths) -> Replica:
    unet = load_unet(tiny_weights.unet_config, tiny_weights.unet)
    return Replica(load_vae(tiny_weights.vae_dir), DirectDenoiser(unet, load_scheduler()))


def _inputs(frames: int, size: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Faces as the pipeline makes them from a warped batch: ``(N, R, R, 3)`` pixels seen as ``(N, 3, R, R)``
    (channels-last in memory), which reach a remote generator contiguous."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (frames, size, size, 3), generator=generator, dtype=torch.uint8)
    faces = pixels_to_faces(pixels.numpy()).permute(0, 3, 1, 2)
    audio = torch.randn(frames, 50, load_config(TINY_UNET_CONFIG)["model"]["cross_attention_dim"], generator=generator)
    mask = torch.ones(size, size)
    mask[size // 2 :] = 0
    return faces, audio, mask


def _in_process(replica: Replica, steps: list[int]):
    """A transport that generates on ``replica`` and answers as the generation model does."""

    def call(arrays):
        group = group_from_arrays(arrays, replica.dtype, on_step=steps.append)
        timer = StageTimer()
        faces = replica.generate(group, timer)
        for step in list(steps):
            yield {"STEP": np.array([step], np.int32)}
        yield {"FACES_OUT": faces.numpy(), "SECONDS": np.array([json.dumps(timer.seconds).encode()], np.object_)}

    return call


def test_faces_travel_as_their_own_pixels() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(1, 3, 16, 16)
    faces = pixels.float() / 127.5 - 1
    assert np.array_equal(faces_to_pixels(faces), pixels.numpy())


def test_remote_generation_equals_local_generation(replica: Replica) -> None:
    size = load_config(TINY_UNET_CONFIG)["data"]["resolution"]
    faces, audio, mask = _inputs(2 * WINDOW + 1, size)  # two full windows and a 1-frame tail: two groups
    settings = SamplingSettings.from_config(
        load_config(TINY_UNET_CONFIG), steps=3, windows_per_call=2, num_frames=WINDOW
    )
    steps: list[int] = []
    progress: list[float] = []

    def run(generator_replica) -> torch.Tensor:
        random = torch.Generator().manual_seed(1247)
        generate = FaceGenerator([generator_replica], settings)
        return generate(faces, audio, mask, initial_noise(random, size // 8), random, on_step=progress.append)

    local = run(replica)
    remote = run(RemoteGenerator(_in_process(replica, steps), replica.dtype))
    assert torch.equal(remote, local)
    assert steps and progress[-1] == pytest.approx(3.0)  # every window's steps reported, as locally


def test_vae_calls_of_fewer_frames_generate_the_same_faces(replica: Replica) -> None:
    """``vae_frames`` (fewer frames per VAE call for larger faces) bounds the VAE's memory, not what it computes."""
    size = load_config(TINY_UNET_CONFIG)["data"]["resolution"]
    faces, audio, mask = _inputs(2 * WINDOW, size)
    settings = SamplingSettings.from_config(load_config(TINY_UNET_CONFIG), steps=2, num_frames=WINDOW)

    def run(generator_replica: Replica) -> torch.Tensor:
        random = torch.Generator().manual_seed(31)
        return FaceGenerator([generator_replica], settings)(faces, audio, mask, initial_noise(random, size // 8), random)

    whole = run(replica)
    chunked = run(Replica(replica.vae, replica.denoiser, vae_frames=1))
    assert (chunked - whole).abs().max() <= 1e-4


def test_group_arrays_round_trip(replica: Replica) -> None:
    size = load_config(TINY_UNET_CONFIG)["data"]["resolution"]
    faces, audio, mask = _inputs(16, size)
    noise = torch.randn(16, 4, size // 8, size // 8)
    group = WindowGroup(faces, audio, mask, initial_noise(torch.Generator(), size // 8), noise, -noise, 16, 7, 2.5, 3)
    back = group_from_arrays(group_arrays(group), torch.float32)
    for name in ("faces", "audio", "mask", "noise", "masked_noise", "reference_noise"):
        assert torch.equal(getattr(back, name), getattr(group, name)), name
    assert (back.window_frames, back.steps, back.guidance_scale, back.cache_interval) == (16, 7, 2.5, 3)


def test_errors_keep_their_kind_across_the_wire(replica: Replica) -> None:
    size = load_config(TINY_UNET_CONFIG)["data"]["resolution"]
    faces, audio, mask = _inputs(16, size)
    settings = SamplingSettings.from_config(load_config(TINY_UNET_CONFIG), steps=2)
    random = torch.Generator().manual_seed(1)
    for error in (BadInput("no such thing"), JobCancelled("the server is stopping")):
        answer = {"ERROR": np.array([failure_info(error).encode()], np.object_)}
        failing = RemoteGenerator(lambda _arrays, answer=answer: iter([answer]), replica.dtype)
        with pytest.raises(LipSyncError) as raised:
            FaceGenerator([failing], settings)(faces, audio, mask, initial_noise(random, size // 8), random)
        assert (raised.value.kind, str(raised.value)) == (error.kind, str(error))


class _CountingSlots:
    """A semaphore of one slot that records how many holders it ever had at once."""

    def __init__(self) -> None:
        self._slot = threading.Semaphore(1)
        self._lock = threading.Lock()
        self.holders = self.most = self.waited = 0

    def __enter__(self) -> None:
        if not self._slot.acquire(blocking=False):
            with self._lock:
                self.waited += 1
            self._slot.acquire()
        with self._lock:
            self.holders += 1
            self.most = max(self.most, self.holders)

    def __exit__(self, *_exc) -> None:
        with self._lock:
            self.holders -= 1
        self._slot.release()


def test_groups_beyond_the_vae_slots_wait_and_all_finish(replica: Replica) -> None:
    """The generation model's memory bound: with one VAE slot, concurrent groups queue for the VAE instead of
    running side by side (on a GPU: instead of allocating past the budget), and every one of them completes."""
    size = load_config(TINY_UNET_CONFIG)["data"]["resolution"]
    slots = _CountingSlots()
    bounded = Replica(replica.vae, replica.denoiser, vae_slots=slots)  # type: ignore[arg-type]
    settings = SamplingSettings.from_config(load_config(TINY_UNET_CONFIG), steps=1)

    def job(seed: int) -> torch.Tensor:
        faces, audio, mask = _inputs(16, size, seed)
        random = torch.Generator().manual_seed(seed)
        return FaceGenerator([bounded], settings)(faces, audio, mask, initial_noise(random, size // 8), random)

    start = threading.Barrier(3)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda seed: (start.wait(), job(seed))[1], range(3)))
    assert all(result.shape == (16, 3, size, size) for result in results)
    assert slots.most == 1 and slots.waited >= 1
