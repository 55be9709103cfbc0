"""``WindowBatcher``: one GPU shared by concurrent jobs, their windows riding in the same UNet calls.

Every job thread hands its next windows to the batcher and blocks until they are denoised. A single
worker thread owns the UNet: it waits a moment (``max_delay_ms``) for windows from other jobs,
stacks up to ``max_windows`` compatible windows (same step count, guidance on/off and latent shape)
into one DDIM loop, and hands each job its rows back. Per-window guidance scales and per-job noise
travel with the windows, so a shared call computes exactly what separate calls would.

A call's windows are padded up to the next of a small set of sizes (``batch_sizes``) with copies of
its first window, whose results are dropped: the UNet then sees only those few shapes, so only they
are captured as CUDA graphs and their memory is bounded by the largest.

When a call runs out of GPU memory (a process memory cap), its jobs are split in two calls that run
one after the other, and later calls take at most the next smaller batch size: under a cap, jobs wait
for room rather than fail. Only a single job's call that does not fit fails.

Before every DDIM step the worker asks each job whether it was cancelled and drops that job's rows,
so a cancelled job stops using the GPU within one step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch
from diffusers import DDIMScheduler
from pydantic import NonNegativeFloat, PositiveInt
from pydantic.dataclasses import dataclass as pydantic_dataclass

from lipsync.config import SCHEMA
from lipsync.gpu_guard import GPU_GUARD
from lipsync.gpu_memory import release_failed_call
from lipsync.sampling import (
    CancelCheck,
    JobCancelled,
    NoisePredictor,
    WindowBatch,
    denoise,
)

BatchObserver = Callable[[int, int], None]
"""Called after each shared DDIM loop with (windows in the call, jobs in the call)."""


@pydantic_dataclass(frozen=True, config=SCHEMA)
class BatchingSettings:
    """How long the worker waits to fill a call, and how full a call may get."""

    max_windows: PositiveInt = 8
    """Windows per DDIM loop (each is one batch row, two with guidance): bounds GPU memory."""
    max_delay_ms: NonNegativeFloat = 10.0
    """How long the first waiting window waits for company before its call starts."""
    batch_sizes: tuple[PositiveInt, ...] = ()
    """Window counts a call is padded up to, rising to ``max_windows``; empty = the powers of two below
    ``max_windows``, then ``max_windows`` (1, 2, 4, 8 for 8)."""

    def __post_init__(self) -> None:
        if not self.batch_sizes:
            powers = {1 << bit for bit in range(self.max_windows.bit_length()) if 1 << bit < self.max_windows}
            object.__setattr__(self, "batch_sizes", tuple(sorted(powers | {self.max_windows})))
        if tuple(sorted(set(self.batch_sizes))) != self.batch_sizes or self.batch_sizes[-1] != self.max_windows:
            raise ValueError(
                f"batch_sizes must rise and end at max_windows ({self.max_windows}), got {list(self.batch_sizes)}"
            )

    def at_most(self, windows: int) -> BatchingSettings:
        """These settings with calls of at most ``windows`` windows (the batch sizes above it left out)."""
        if windows >= self.max_windows:
            return self
        sizes = (*(size for size in self.batch_sizes if size < windows), windows)
        return replace(self, max_windows=windows, batch_sizes=sizes)

    def padded(self, windows: int) -> int:
        """The call size ``windows`` windows are padded up to."""
        return next(size for size in self.batch_sizes if size >= windows)


@dataclass(eq=False)
class _Waiting:
    batch: WindowBatch
    should_cancel: CancelCheck | None
    future: Future = field(default_factory=Future)

    def cancelled(self) -> bool:
        return self.should_cancel is not None and self.should_cancel()


class WindowBatcher:
    """A :class:`~lipsync.sampling.Denoiser` that many threads may call at once."""

    def __init__(
        self,
        unet: NoisePredictor,
        scheduler: DDIMScheduler,
        settings: BatchingSettings | None = None,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.unet, self.scheduler = unet, scheduler
        self.settings = settings or BatchingSettings()
        self.on_batch = on_batch
        self._waiting: list[_Waiting] = []
        self._max_windows = self.settings.max_windows
        """Windows per call now: ``settings.max_windows``, less after a call ran out of memory."""
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="window-batcher", daemon=True)
        self._worker.start()

    @property
    def max_windows(self) -> int:
        """Windows per call now: ``settings.max_windows``, less after a call ran out of memory."""
        return self._max_windows

    def take_fewer_than(self, windows: int) -> None:
        """A call of ``windows`` windows did not fit in GPU memory: from now on calls take at most the next
        smaller batch size (at least one window). A single job's larger group still runs as one call."""
        smaller = max([1, *(size for size in self.settings.batch_sizes if size < windows)])
        self._max_windows = min(self._max_windows, smaller)

    def __call__(self, batch: WindowBatch, should_cancel: CancelCheck | None = None) -> torch.Tensor:
        waiting = _Waiting(batch, should_cancel)
        with self._changed:
            if self._closed:
                raise RuntimeError("the window batcher is closed")
            self._waiting.append(waiting)
            self._changed.notify_all()
        return waiting.future.result()

    def close(self) -> None:
        """Stop the worker after its current call; windows still waiting fail with ``RuntimeError``."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._worker.join()
        for waiting in self._waiting:
            waiting.future.set_exception(RuntimeError("the window batcher was closed"))
        self._waiting.clear()

    def _serve(self) -> None:
        if self.unet.device.type == "cuda":
            torch.cuda.set_device(self.unet.device)  # threads start on device 0; the UNet may be on another GPU
        while (group := self._next_group()) is not None:
            self._run(group)

    def _next_group(self) -> list[_Waiting] | None:
        """Wait for windows, give others ``max_delay_ms`` to join, then take the oldest compatible ones."""
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.settings.max_delay_ms / 1000
            while sum(w.batch.windows for w in self._waiting) < self._max_windows and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            key, total = self._waiting[0].batch.shape_key, 0
            group: list[_Waiting] = []
            for waiting in self._waiting:
                fits = not group or total + waiting.batch.windows <= self._max_windows
                if waiting.batch.shape_key == key and fits:
                    group.append(waiting)
                    total += waiting.batch.windows
            self._waiting = [waiting for waiting in self._waiting if waiting not in group]
            return group

    def _run(self, group: list[_Waiting]) -> None:
        live = []
        for waiting in group:
            if waiting.cancelled():
                waiting.future.set_exception(JobCancelled("the job was cancelled"))
            else:
                live.append(waiting)
        if not live:
            return
        owners = [index for index, waiting in enumerate(live) for _ in range(waiting.batch.windows)]
        padding = self.settings.padded(len(owners)) - len(owners)
        padded = [padding]  # padding rows still in the call: as few as keep it at a batch size, never more than before

        def active() -> list[bool]:
            on = [not waiting.cancelled() for waiting in live]
            real = [on[owner] for owner in owners]
            running = sum(real)
            padded[0] = min(padded[0], self.settings.padded(running) - running) if running else 0
            return real + [True] * padded[0] + [False] * (padding - padded[0])

        batches = [waiting.batch for waiting in live]
        if padding:
            batches.append(_padding(batches[0], padding))

        def on_step(step: int) -> None:
            for waiting in live:
                if waiting.batch.on_step is not None:
                    waiting.batch.on_step(step)

        try:
            with GPU_GUARD.shared():
                latents = denoise(
                    self.unet,
                    self.scheduler,
                    torch.cat([batch.latents for batch in batches]),
                    torch.cat([batch.mask for batch in batches]),
                    torch.cat([batch.masked_latents for batch in batches]),
                    torch.cat([batch.reference_latents for batch in batches]),
                    torch.cat([batch.audio for batch in batches]),
                    batches[0].steps,
                    torch.tensor([batch.guidance_scale for batch in batches for _ in range(batch.windows)]),
                    active=active,
                    cache_interval=batches[0].cache_interval,
                    on_step=on_step,
                )
        except torch.OutOfMemoryError as exc:
            release_failed_call(exc)  # the failed loop's activations, before a smaller call or the job's retry
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            self.take_fewer_than(self.settings.padded(len(owners)))
            half = len(live) // 2
            self._run(live[:half])
            self._run(live[half:])
            return
        except Exception as exc:  # noqa: BLE001 - the jobs get the error; the worker stays up for the next call
            for waiting in live:
                waiting.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(owners), len(live))
        for waiting, rows in zip(
            live, latents[: len(owners)].split([batch.windows for batch in batches[: len(live)]]), strict=True
        ):
            if waiting.cancelled():
                waiting.future.set_exception(JobCancelled("the job was cancelled"))
            else:
                waiting.future.set_result(rows)


def _padding(batch: WindowBatch, windows: int) -> WindowBatch:
    """``windows`` copies of ``batch``'s first window, to fill a call up to its size (results dropped)."""
    frames = batch.latents.shape[2]

    def first(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:1].expand(windows, *tensor.shape[1:])

    return WindowBatch(
        first(batch.latents),
        first(batch.mask),
        first(batch.masked_latents),
        first(batch.reference_latents),
        batch.audio[:frames].repeat(windows, 1, 1),
        batch.steps,
        batch.guidance_scale,
        batch.cache_interval,
    )
