"""WindowBatcher: concurrent jobs share UNet calls, get exactly their own results, and can be cancelled."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lipsync import load_unet
from lipsync.batching import BatchingSettings, WindowBatcher
from lipsync.sampling import JobCancelled, WindowBatch, denoise, load_scheduler

STEPS = 4
FRAMES, LATENT = 4, 8
"""Window shape of the random inputs: the batcher stacks windows along the batch axis whatever their shape, so
a short window at a small latent size (a quarter of the tiny UNet's 16 frames, half its 16×16) keeps each
UNet call cheap on the CPU."""


@pytest.fixture(scope="module")
def tiny_unet(tiny_weights):
    return load_unet(tiny_weights.unet_config, tiny_weights.unet)


def _batch(seed: int, windows: int = 1, guidance: float = 1.5, steps: int = STEPS) -> WindowBatch:
    """Random but seeded inputs for the tiny UNet (``FRAMES`` frames of ``LATENT``² latents, audio 50×64 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    latents = lambda channels: torch.randn(windows, channels, FRAMES, LATENT, LATENT, generator=generator)  # noqa: E731
    return WindowBatch(
        latents(4), (latents(1) > 0).float(), latents(4), latents(4),
        torch.randn(windows * FRAMES, 50, 64, generator=generator), steps, guidance,
    )


def _alone(unet, batch: WindowBatch) -> torch.Tensor:
    return denoise(
        unet, load_scheduler(), batch.latents, batch.mask, batch.masked_latents, batch.reference_latents, batch.audio,
        batch.steps, batch.guidance_scale,
    )


def _run_together(batcher: WindowBatcher, batches: list[WindowBatch], cancel=None) -> list:
    """Submit all batches at once from their own threads; results or the exceptions raised."""
    start = threading.Barrier(len(batches))

    def job(index: int):
        start.wait()
        try:
            return batcher(batches[index], None if cancel is None else cancel[index])
        except Exception as exc:  # returned so the test can look at it
            return exc

    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(job, range(len(batches))))


def test_concurrent_jobs_share_one_call_and_get_their_own_results(tiny_unet) -> None:
    calls: list[tuple[int, int]] = []
    batcher = WindowBatcher(tiny_unet, load_scheduler(), BatchingSettings(max_windows=8, max_delay_ms=500), lambda w, j: calls.append((w, j)))
    batches = [_batch(1, windows=2, guidance=1.5), _batch(2, windows=1, guidance=3.0), _batch(3, windows=1, guidance=2.0)]
    try:
        results = _run_together(batcher, batches)
    finally:
        batcher.close()
    assert calls == [(4, 3)]
    for batch, result in zip(batches, results):
        expected = _alone(tiny_unet, batch)
        assert result.shape == expected.shape
        assert (result - expected).norm() / expected.norm() <= 1e-5


def test_a_call_never_exceeds_max_windows_nor_mixes_step_counts(tiny_unet) -> None:
    calls: list[tuple[int, int]] = []
    batcher = WindowBatcher(tiny_unet, load_scheduler(), BatchingSettings(max_windows=3, max_delay_ms=300), lambda w, j: calls.append((w, j)))
    batches = [_batch(1, windows=2), _batch(2, windows=2), _batch(3, windows=1, steps=2)]
    try:
        results = _run_together(batcher, batches)
    finally:
        batcher.close()
    assert all(windows <= 3 for windows, _ in calls)
    assert sum(windows for windows, _ in calls) == 5 and len(calls) >= 2
    for batch, result in zip(batches, results):
        assert (result - _alone(tiny_unet, batch)).norm() <= 1e-5 * result.norm()


def test_a_cancelled_job_leaves_the_call_within_one_step(tiny_unet) -> None:
    """Job 0 is cancelled after the second UNet call: later calls carry only job 1's rows."""
    rows_per_call: list[int] = []
    hook = tiny_unet.register_forward_hook(lambda _m, args, _o: rows_per_call.append(args[0].shape[0]))
    batcher = WindowBatcher(tiny_unet, load_scheduler(), BatchingSettings(max_windows=8, max_delay_ms=500))
    batches = [_batch(1, windows=2), _batch(2, windows=1)]
    try:
        results = _run_together(batcher, batches, cancel=[lambda: len(rows_per_call) >= 2, lambda: False])
    finally:
        hook.remove()
        batcher.close()
    assert isinstance(results[0], JobCancelled)
    assert rows_per_call == [2 * 4] * 2 + [2 * 1] * (STEPS - 2)  # 3 windows padded to 4, doubled by guidance
    assert (results[1] - _alone(tiny_unet, batches[1])).norm() <= 1e-5 * results[1].norm()


def test_a_job_cancelled_while_waiting_never_reaches_the_unet(tiny_unet) -> None:
    calls: list[tuple[int, int]] = []
    batcher = WindowBatcher(tiny_unet, load_scheduler(), BatchingSettings(max_delay_ms=0), lambda w, j: calls.append((w, j)))
    try:
        with pytest.raises(JobCancelled):
            batcher(_batch(1), lambda: True)
    finally:
        batcher.close()
    assert calls == []


def test_errors_reach_the_job_and_the_batcher_keeps_serving(tiny_unet) -> None:
    batcher = WindowBatcher(tiny_unet, load_scheduler(), BatchingSettings(max_delay_ms=0))
    try:
        broken = _batch(1)
        broken = WindowBatch(broken.latents, broken.mask, broken.masked_latents, broken.reference_latents, broken.audio[: FRAMES - 1], STEPS, 1.5)
        with pytest.raises(RuntimeError):
            batcher(broken)
        good = _batch(2)
        assert (batcher(good) - _alone(tiny_unet, good)).norm() <= 1e-5 * _alone(tiny_unet, good).norm()
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher(_batch(3))


def test_settings_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        BatchingSettings(max_windows=0)
    with pytest.raises(ValueError):
        BatchingSettings(max_delay_ms=-1)


def test_calls_are_padded_to_the_batch_sizes_and_results_stay_exact(tiny_unet) -> None:
    """3 and 5 windows become calls of 4 and 8 (the sizes captured as CUDA graphs); padding rows are dropped."""
    rows_per_call: list[int] = []
    hook = tiny_unet.register_forward_hook(lambda _m, args, _o: rows_per_call.append(args[0].shape[0]))
    calls: list[tuple[int, int]] = []
    settings = BatchingSettings(max_windows=8, max_delay_ms=0)
    assert settings.batch_sizes == (1, 2, 4, 8)
    batcher = WindowBatcher(tiny_unet, load_scheduler(), settings, lambda w, j: calls.append((w, j)))
    try:
        batches = [_batch(1, windows=3), _batch(2, windows=5, steps=2)]
        results = [batcher(batch) for batch in batches]
    finally:
        hook.remove()
        batcher.close()
    assert set(rows_per_call) == {2 * 4, 2 * 8}
    assert calls == [(3, 1), (5, 1)]  # the real windows
    for batch, result in zip(batches, results):
        assert result.shape == batch.latents.shape
        expected = _alone(tiny_unet, batch)
        assert (result - expected).norm() <= 1e-5 * expected.norm()


def test_batch_sizes_must_rise_to_max_windows() -> None:
    assert BatchingSettings(max_windows=6).batch_sizes == (1, 2, 4, 6)
    assert BatchingSettings(max_windows=4).padded(3) == 4
    with pytest.raises(ValueError, match="batch_sizes"):
        BatchingSettings(max_windows=8, batch_sizes=(1, 4))


def test_settings_at_most_a_smaller_call_keep_the_sizes_below_it() -> None:
    settings = BatchingSettings(max_windows=8, max_delay_ms=3)
    assert settings.at_most(2) == BatchingSettings(max_windows=2, max_delay_ms=3, batch_sizes=(1, 2))
    assert settings.at_most(3).batch_sizes == (1, 2, 3)
    assert settings.at_most(8) is settings and settings.at_most(12) is settings


class _MemoryCapped:
    """The tiny UNet behind a memory cap: a call of more than ``max_rows`` batch rows runs out of memory."""

    def __init__(self, unet, max_rows: int) -> None:
        self.unet, self.max_rows, self.rows_seen = unet, max_rows, []

    def __getattr__(self, name: str):
        return getattr(self.unet, name)

    def __call__(self, sample: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        self.rows_seen.append(sample.shape[0])
        if sample.shape[0] > self.max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in cap)")
        return self.unet(sample, *args)


class _Activations:
    """Stands in for a UNet forward's tensors: something its frame holds that a weak reference can watch."""


class _HoldsActivationsWhenItFails:
    """A UNet whose every call runs out of memory while its frame holds activations."""

    def __init__(self, unet) -> None:
        self.unet, self.held = unet, []

    def __getattr__(self, name: str):
        return getattr(self.unet, name)

    def __call__(self, sample: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        activations = _Activations()
        self.held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in cap)")


def test_a_job_gets_its_memory_error_with_the_failed_calls_memory_already_freed(tiny_unet) -> None:
    """The error reaches the job through a future, which with the batcher's frame forms a reference cycle: the
    failed call's activations would stay until a full garbage collection, and a retry would find no room."""
    failing = _HoldsActivationsWhenItFails(tiny_unet)
    batcher = WindowBatcher(failing, load_scheduler(), BatchingSettings(max_windows=2, max_delay_ms=0))
    gc.disable()
    try:
        with pytest.raises(torch.OutOfMemoryError) as failed:
            batcher(_batch(1, windows=1))
        assert failing.held and all(ref() is None for ref in failing.held)
    finally:
        gc.enable()
        batcher.close()
    assert "out of memory" in str(failed.value)


def test_a_call_over_the_memory_cap_splits_its_jobs_and_later_calls_stay_smaller(tiny_unet) -> None:
    capped = _MemoryCapped(tiny_unet, max_rows=4)  # two windows with guidance
    calls: list[tuple[int, int]] = []
    batcher = WindowBatcher(capped, load_scheduler(), BatchingSettings(max_windows=4, max_delay_ms=500), lambda w, j: calls.append((w, j)))
    batches = [_batch(seed, windows=1) for seed in (1, 2, 3)]
    try:
        results = _run_together(batcher, batches)
        later = _run_together(batcher, [_batch(seed, windows=1) for seed in (4, 5, 6)])
        alone_too_large = batcher(_batch(7, windows=4))
    except torch.OutOfMemoryError as exc:
        alone_too_large = exc
    finally:
        batcher.close()
    for batch, result in zip(batches, results):
        expected = _alone(tiny_unet, batch)
        assert (result - expected).norm() / expected.norm() <= 1e-5
    assert all(isinstance(result, torch.Tensor) for result in later)
    assert calls[:2] == [(1, 1), (2, 2)]  # the 3-window call (padded to 4) split into 1 + 2
    assert all(windows <= 2 for windows, _ in calls[2:])  # and no later call tried 4 windows again
    assert isinstance(alone_too_large, torch.OutOfMemoryError)  # one job's call that cannot fit fails
