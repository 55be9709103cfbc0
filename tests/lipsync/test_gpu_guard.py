"""CUDA-graph capture must never overlap other threads' GPU work (``GpuGuard``).

On a GPU, a capture in the batcher's thread is invalidated by another thread's device sync, pageable
copy or lazily loaded kernel — which concurrent jobs do all the time (VAE encodes, stage timers).
The CPU shows the same race in thread interleavings: a capture window in the batcher's thread while
other jobs' threads are inside their GPU sections. These tests reproduce that overlap when a capture
does not take the guard, show that a capture holding it exclusively sees no other GPU work, and
check that every GPU section of the pipeline's job threads holds the guard.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from support.clips import demo_frames, speech, write_video, write_wav

from lipsync.batching import BatchingSettings
from lipsync.gpu_guard import GPU_GUARD, GpuGuard
from lipsync.models.graphed import CapturedCalls
from lipsync.pipeline import LipSyncPipeline
from lipsync.weights import WeightPaths


def test_exclusive_waits_for_shared_holders_and_blocks_new_ones() -> None:
    guard = GpuGuard()
    events: list[str] = []
    reader_in, release_reader = threading.Event(), threading.Event()

    def reader() -> None:
        with guard.shared():
            events.append("reader in")
            reader_in.set()
            release_reader.wait(5)
            events.append("reader out")

    def writer() -> None:
        with guard.exclusive():
            events.append("writer")

    def late_reader() -> None:
        with guard.shared():
            events.append("late reader")

    with ThreadPoolExecutor(3) as pool:
        pool.submit(reader)
        reader_in.wait(5)
        writing = pool.submit(writer)
        time.sleep(0.1)  # the writer is now waiting
        late = pool.submit(late_reader)
        time.sleep(0.1)
        assert events == ["reader in"]  # neither the writer nor a newcomer got in beside the reader
        release_reader.set()
        writing.result(5), late.result(5)
    assert events == ["reader in", "reader out", "writer", "late reader"]  # a waiting writer goes first


def test_a_shared_holder_can_take_it_exclusively_without_deadlock() -> None:
    """The batcher holds the guard shared around its DDIM loop and captures inside it."""
    guard = GpuGuard()
    others_inside = threading.Event()
    release = threading.Event()

    def other_job() -> None:
        with guard.shared():
            others_inside.set()
            release.wait(5)

    def batcher() -> bool:
        with guard.shared(), guard.shared():
            with guard.exclusive():
                alone = guard.readers == 0
            return alone and guard.held()

    with ThreadPoolExecutor(2) as pool:
        pool.submit(other_job)
        others_inside.wait(5)
        capture = pool.submit(batcher)
        time.sleep(0.1)
        assert not capture.done()  # waits for the other job's section to end
        release.set()
        assert capture.result(5)
    assert guard.readers == 0 and not guard.held()


def test_a_capture_beside_a_running_loop_on_the_same_unet_does_not_deadlock() -> None:
    """A compilation captures its graphs while the window batcher's DDIM loop runs on the same UNet: the loop
    holds the guard shared for all its steps and needs the UNet's lock for each call, while the capture waits
    for the guard exclusively."""
    guard = GpuGuard()

    def capture(function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor]:
        with guard.exclusive():  # as a CUDA-graph capture does
            assert guard.readers == 0
        return lambda call_inputs: function(*call_inputs)

    calls = CapturedCalls(lambda sample: True, capture, guard)
    sample = (torch.ones(2),)
    assert torch.equal(calls.run(("loop",), torch.neg, sample), -sample[0])  # the loop's shape has its graph
    loop_inside = threading.Event()
    done: list[str] = []

    def loop() -> None:
        with guard.shared():
            loop_inside.set()
            deadline = time.monotonic() + 10
            while guard.writers_waiting == 0:  # the capture now waits for the guard
                assert time.monotonic() < deadline
                time.sleep(0.001)
            for _ in range(3):  # the loop's next steps
                calls.run(("loop",), torch.neg, sample)
        done.append("loop")

    def compilation() -> None:
        with guard.shared():  # a compilation's own DDIM loop
            calls.run(("compiled",), torch.neg, sample)
        done.append("compilation")

    threads = [threading.Thread(target=loop, daemon=True), threading.Thread(target=compilation, daemon=True)]
    threads[0].start()
    assert loop_inside.wait(10)
    threads[1].start()
    for thread in threads:  # daemon threads joined with a bound: a deadlock fails the test, not the run
        thread.join(10)
    assert sorted(done) == ["compilation", "loop"]
    assert len(calls) == 2 and guard.readers == 0


class _GpuWork:
    """Counts threads inside the VAE's and Whisper's forward passes (the job threads' GPU work) and
    records any such call made without the guard held."""

    def __init__(self, pipeline: LipSyncPipeline) -> None:
        self.active = 0
        self.unguarded: list[str] = []
        self.entered = threading.Event()
        self._lock = threading.Lock()
        modules = {"vae.encoder": pipeline.vae.encoder, "vae.decoder": pipeline.vae.decoder, "whisper": pipeline.audio.encoder}
        self._hooks = []
        for name, module in modules.items():
            self._hooks.append(module.register_forward_pre_hook(lambda _m, _a, name=name: self._enter(name)))
            self._hooks.append(module.register_forward_hook(lambda _m, _a, _o: self._leave()))

    def _enter(self, name: str) -> None:
        with self._lock:
            self.active += 1
            if not GPU_GUARD.held():
                self.unguarded.append(f"{name} in {threading.current_thread().name}")
        self.entered.set()

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class _CaptureProbe:
    """A noise predictor that, like ``GraphedUNet``, "captures" each new call shape: a window of
    ``window_s`` in which it records how many job threads were inside GPU work."""

    def __init__(self, unet, work: _GpuWork, guarded: bool, window_s: float) -> None:
        self.unet, self.work, self.guarded, self.window_s = unet, work, guarded, window_s
        self.dtype, self.device = unet.dtype, unet.device
        self.shapes: set[tuple[int, ...]] = set()
        self.overlaps: list[int] = []

    @contextmanager
    def _capture_section(self) -> Iterator[None]:
        if self.guarded:
            with GPU_GUARD.exclusive():
                yield
        else:
            yield

    def __call__(self, sample: torch.Tensor, timestep, audio: torch.Tensor) -> torch.Tensor:
        shown = not self.guarded and any(self.overlaps)  # the race was shown once: stop waiting for it
        if tuple(sample.shape) not in self.shapes and not shown:
            self.shapes.add(tuple(sample.shape))
            with self._capture_section():
                self.work.entered.clear()
                deadline = time.monotonic() + self.window_s
                seen = 0
                while time.monotonic() < deadline:
                    seen = max(seen, self.work.active)
                    if not self.guarded and seen:
                        break  # the race is shown: another job's GPU work ran inside the capture
                    self.work.entered.wait(0.005)
                self.overlaps.append(seen)
        return self.unet(sample, timestep, audio)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("guard-clips")
    frames = demo_frames(24)
    return [
        (write_video(folder / f"v{index}.mp4", frames[: 12 + 4 * index]), write_wav(folder / f"a{index}.wav", speech(0.4 + 0.16 * index)))
        for index in range(3)
    ]


def _concurrent_jobs(tiny_weights: WeightPaths, clips, tmp_path: Path, guarded: bool, window_s: float):
    pipeline = LipSyncPipeline.from_weights(tiny_weights, batching=BatchingSettings(max_windows=4, max_delay_ms=50))
    work = _GpuWork(pipeline)
    probe = pipeline.denoiser.unet = _CaptureProbe(pipeline.denoiser.unet, work, guarded, window_s)
    try:
        with ThreadPoolExecutor(len(clips)) as pool:
            results = list(pool.map(
                lambda job: pipeline.run(*clips[job], tmp_path / f"out{job}.mp4", inference_steps=2), range(len(clips))
            ))
    finally:
        work.remove()
        pipeline.close()
    return probe, work, results


def test_unguarded_capture_overlaps_other_jobs_gpu_work(tiny_weights: WeightPaths, clips, tmp_path: Path) -> None:
    """The failure, reproduced: nothing else keeps concurrent jobs' VAE work out of a capture window."""
    probe, _, results = _concurrent_jobs(tiny_weights, clips, tmp_path, guarded=False, window_s=10)
    assert len(results) == len(clips)
    assert max(probe.overlaps) > 0


def test_guarded_capture_runs_alone_and_every_gpu_section_holds_the_guard(
    tiny_weights: WeightPaths, clips, tmp_path: Path
) -> None:
    probe, work, results = _concurrent_jobs(tiny_weights, clips, tmp_path, guarded=True, window_s=0.2)
    assert len(probe.overlaps) >= 2 and max(probe.overlaps) == 0
    assert work.unguarded == []
    assert all(result.output.is_file() for result in results)
    assert GPU_GUARD.readers == 0
