"""Several batches of one job generating at once (``PipelineSettings.generations_in_flight``), on the CPU with
the tiny weights.

One window per call, so the clip's 52 output frames are four batches (16, 16, 16 and a 4-frame tail). The
generator is the pipeline's own replica behind :class:`Watched`, which sees every group it generates.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from support.clips import decode, demo_frames, speech, write_video, write_wav

from lipsync.errors import JobCancelled
from lipsync.generation import FaceGenerator, WindowGenerator, WindowGroup
from lipsync.pipeline import Job, LipSyncPipeline, PipelineSettings
from lipsync.progress import STAGE_SPANS
from lipsync.timing import StageTimer
from lipsync.weights import WeightPaths

STEPS = 2
FRAMES = 52
WINDOWS = 4
"""16-frame windows of the output: one per batch."""

pytestmark = [pytest.mark.slow]

BeforeCall = Callable[[int, WindowGroup], None]
"""Called as a group arrives, with its arrival number (1 = first) and the group."""


class Watched:
    """A :class:`WindowGenerator` handing each group to ``generator``: it counts the calls running at once and
    the DDIM steps done over all of them, keeps each group's faces (by its audio) and may hold a call first."""

    def __init__(self, generator: WindowGenerator, before: BeforeCall | None = None) -> None:
        self.generator, self.before = generator, before
        self.calls = self.running = self.most_at_once = self.steps = 0
        self.faces: dict[bytes, torch.Tensor] = {}
        self.lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.dtype

    def generate(self, group: WindowGroup, timer: StageTimer) -> torch.Tensor:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            arrival = self.calls
        try:
            if self.before is not None:
                self.before(arrival, group)
            faces = self.generator.generate(replace(group, on_step=self._counting(group.on_step)), timer)
        finally:
            with self.lock:
                self.running -= 1
        self.faces[hashlib.sha256(group.audio.numpy().tobytes()).digest()] = faces
        return faces

    def _counting(self, on_step: Callable[[int], None] | None) -> Callable[[int], None]:
        def report(step: int) -> None:
            with self.lock:  # held while the job reports it: the progress seen matches self.steps
                self.steps += 1
                if on_step is not None:
                    on_step(step)

        return report


@pytest.fixture(scope="module")
def base(tiny_weights: WeightPaths) -> LipSyncPipeline:
    return LipSyncPipeline.from_weights(tiny_weights, windows_per_call=1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """12 frames of the demo face (at half the test clips' size) and 52 frames of speech: the video plays back and forth."""
    folder = tmp_path_factory.mktemp("inflight")
    return write_video(folder / "clip.mp4", demo_frames(12, (270, 480))), write_wav(folder / "speech.wav", speech(FRAMES / 25))


def _pipeline(base: LipSyncPipeline, in_flight: int, generator: WindowGenerator) -> LipSyncPipeline:
    """``base``'s Whisper and detectors with ``generator`` and ``in_flight`` batches generating at once."""
    settings = PipelineSettings.load(generations_in_flight=in_flight)
    return LipSyncPipeline([generator], base.audio, base.detectors, base.config, base.windows_per_call, settings=settings)


def _meeting(cancelled: threading.Event | None = None) -> BeforeCall:
    """Holds the first two groups until both have arrived (then sets ``cancelled``): they generate at once."""
    both = threading.Barrier(2, timeout=120)

    def before(arrival: int, _group: WindowGroup) -> None:
        if arrival <= 2:
            both.wait()
            if cancelled is not None:
                cancelled.set()

    return before


def _wait_until(condition: Callable[[], bool], timeout_s: float = 120) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _job(pipeline: LipSyncPipeline, clip: tuple[Path, Path]) -> Job:
    settings, loop_mode = pipeline.check_options(inference_steps=STEPS)
    return pipeline.plan(*clip, settings, loop_mode)


def test_a_batch_draws_its_noise_when_its_generation_is_prepared_not_when_it_runs(
    base: LipSyncPipeline, clip: tuple[Path, Path]
) -> None:
    job = _job(base, clip)
    base.analyse(job)
    batches = [base.prepare_batch(job), base.prepare_batch(job)]
    generator = FaceGenerator(base.replicas, job.settings, job.timer)
    first = base.prepare_generation(job, generator, batches[0])
    second = base.prepare_generation(job, generator, batches[1])
    second_faces, first_faces = second(), first()  # run out of order
    again = _job(base, clip)
    generator = FaceGenerator(base.replicas, again.settings, again.timer)
    in_order = [base.generate(again, generator, batch) for batch in batches]
    assert np.array_equal(first_faces, in_order[0]) and np.array_equal(second_faces, in_order[1])


def test_the_frames_are_the_same_whatever_the_batches_in_flight(
    base: LipSyncPipeline, clip: tuple[Path, Path], tmp_path: Path
) -> None:
    faces, frames = {}, {}
    for in_flight in (1, 2, 3):
        watched = Watched(base.replicas[0])
        result = _pipeline(base, in_flight, watched).run(*clip, tmp_path / f"{in_flight}.mp4", inference_steps=STEPS)
        assert result.frames == FRAMES and watched.calls == WINDOWS
        faces[in_flight], frames[in_flight] = watched.faces, np.stack(decode(tmp_path / f"{in_flight}.mp4"))
    assert len(faces[1]) == WINDOWS
    for in_flight in (2, 3):
        assert faces[in_flight].keys() == faces[1].keys()
        assert all(torch.equal(faces[in_flight][key], faces[1][key]) for key in faces[1]), in_flight
        assert np.array_equal(frames[in_flight], frames[1]), in_flight


def test_two_batches_generate_at_once_and_progress_sums_their_steps(
    base: LipSyncPipeline, clip: tuple[Path, Path], tmp_path: Path
) -> None:
    """The first two batches meet inside the generator (with one in flight they would wait for each other
    forever); every generation report is the DDIM steps done over all batches so far."""
    watched = Watched(base.replicas[0], _meeting())
    progress: list[tuple[float, str, int]] = []
    result = _pipeline(base, 2, watched).run(
        *clip, tmp_path / "out.mp4", inference_steps=STEPS, progress=lambda f, s: progress.append((f, s, watched.steps))
    )
    assert result.frames == FRAMES
    assert watched.most_at_once == 2
    fractions = [fraction for fraction, _, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    low, high = STAGE_SPANS["generate"]
    generating = [(fraction, steps) for fraction, stage, steps in progress if stage == "generate"]
    assert [steps for _, steps in generating] == list(range(1, STEPS * WINDOWS + 1))  # one report per step, none dropped
    assert [fraction for fraction, _ in generating] == pytest.approx(
        [low + (high - low) * steps / (STEPS * WINDOWS) for _, steps in generating]
    )


def test_a_cancel_with_two_batches_in_flight_stops_both_and_leaves_no_thread(
    base: LipSyncPipeline, clip: tuple[Path, Path], tmp_path: Path
) -> None:
    cancelled = threading.Event()
    watched = Watched(base.replicas[0], _meeting(cancelled))
    before = set(threading.enumerate())
    with pytest.raises(JobCancelled):
        _pipeline(base, 2, watched).run(*clip, tmp_path / "out.mp4", inference_steps=STEPS, should_cancel=cancelled.is_set)
    assert watched.calls == 2 and watched.steps == 0  # both left before their first DDIM step; no batch started after
    assert set(threading.enumerate()) <= before
    assert list(tmp_path.iterdir()) == []


def test_a_failing_batch_stops_the_other_in_flight_and_its_error_is_raised(
    base: LipSyncPipeline, clip: tuple[Path, Path], tmp_path: Path
) -> None:
    """The first group to arrive waits until it is told to stop; the second fails meanwhile."""
    both = threading.Barrier(2, timeout=120)
    told_to_stop: list[bool] = []

    def before(arrival: int, group: WindowGroup) -> None:
        if arrival > 2:
            return
        both.wait()
        if arrival == 2:
            raise RuntimeError("device lost")
        assert group.should_cancel is not None
        told_to_stop.append(_wait_until(group.should_cancel))

    watched = Watched(base.replicas[0], before)
    threads = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="device lost"):
        _pipeline(base, 2, watched).run(*clip, tmp_path / "out.mp4", inference_steps=STEPS)
    assert told_to_stop == [True] and watched.calls == 2
    assert set(threading.enumerate()) <= threads
