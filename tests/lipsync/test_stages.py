"""The job's named stages of ``LipSyncPipeline`` one at a time, on the CPU with the tiny weights, and the
replica placement of ``lipsync.lifecycle``.

One pipeline with one window per call, so a 20-frame clip is two batches: a full window and a 4-frame tail.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from support.clips import decode, demo_frames, flat, speech, write_video, write_wav

from lipsync.errors import BadInput, JobCancelled
from lipsync.generation import FaceGenerator
from lipsync.lifecycle import Placement
from lipsync.media import VideoWriter
from lipsync.pipeline import FrameBatch, Job, LipSyncPipeline
from lipsync.progress import JobSize
from lipsync.remote import pixels_to_faces
from lipsync.timeline import LoopMode
from lipsync.weights import WeightPaths

STEPS = 2
FRAMES = 20
FACELESS = 17
"""A frame of the clip replaced by a flat grey picture (no face): in the second batch."""

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def pipeline(tiny_weights: WeightPaths) -> LipSyncPipeline:
    return LipSyncPipeline.from_weights(tiny_weights, windows_per_call=1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("stages")
    frames = demo_frames(FRAMES)
    frames[FACELESS] = flat(120)
    return write_video(folder / "clip.mp4", frames), write_wav(folder / "speech.wav", speech(FRAMES / 25))


def _job(pipeline: LipSyncPipeline, clip: tuple[Path, Path], progress: list | None = None, **options) -> Job:
    settings, loop_mode = pipeline.check_options(inference_steps=STEPS, **options)
    return pipeline.plan(*clip, settings, loop_mode, progress=None if progress is None else lambda f, s: progress.append((f, s)))


def _batches(pipeline: LipSyncPipeline, job: Job) -> list[FrameBatch]:
    pipeline.analyse(job)
    batches = []
    while job.prepared < job.frames:
        batches.append(pipeline.prepare_batch(job))
    return batches


def test_check_options_takes_the_configs_defaults_and_refuses_what_is_out_of_range(pipeline: LipSyncPipeline) -> None:
    settings, loop_mode = pipeline.check_options()
    assert (settings.steps, settings.windows_per_call, loop_mode) == (20, 1, LoopMode.PINGPONG)
    settings, loop_mode = pipeline.check_options(inference_steps=3, mode="fast", loop_mode="loop")
    assert (settings.steps, settings.cache_interval > 1, loop_mode) == (3, True, LoopMode.LOOP)
    refused = {"inference_steps": 0, "devices": 0, "mode": "turbo", "loop_mode": "sideways"}
    for name, value in refused.items():
        with pytest.raises(BadInput, match=name):
            pipeline.check_options(**{name: value})


def test_plan_reads_the_audio_and_decides_the_output_without_decoding_the_video(
    pipeline: LipSyncPipeline, clip: tuple[Path, Path]
) -> None:
    progress: list[tuple[float, str]] = []
    sizes: list[JobSize] = []
    settings, loop_mode = pipeline.check_options(inference_steps=STEPS)
    job = pipeline.plan(*clip, settings, loop_mode, progress=lambda f, s: progress.append((f, s)), on_plan=sizes.append)
    assert (job.frames, job.parts, job.windows, job.batch_frames) == (FRAMES, 1, 2, 16)
    assert sizes == [JobSize(FRAMES, STEPS)] and progress[0] == (0.0, "audio")
    assert job.prepared == 0 and "decode" not in job.timer.seconds
    assert job.noise.shape == (1, 4, 1, pipeline.resolution // 8, pipeline.resolution // 8)
    again = _job(pipeline, clip)
    assert torch.equal(again.noise, job.noise) and torch.equal(again.features, job.features)  # the seed decides


def test_prepare_batch_gives_consecutive_batches_with_the_analysed_alignments(
    pipeline: LipSyncPipeline, clip: tuple[Path, Path]
) -> None:
    job = _job(pipeline, clip)
    batches = _batches(pipeline, job)
    assert [(batch.start, len(batch.sources)) for batch in batches] == [(0, 16), (16, 4)]
    assert [index for batch in batches for index in batch.sources] == list(range(FRAMES))
    assert [batch.faceless for batch in batches] == [0, 1]
    last = batches[-1]
    assert last.faces.shape == (4, pipeline.resolution, pipeline.resolution, 3) and last.faces.dtype == np.uint8
    for frame, (affine, _), face in zip(last.originals, last.placements, last.faces):
        assert np.array_equal(job.aligner.warp(frame, affine), face)


def test_generate_keeps_the_input_outside_the_mouth_reports_steps_and_stops_when_cancelled(
    pipeline: LipSyncPipeline, clip: tuple[Path, Path]
) -> None:
    progress: list[tuple[float, str]] = []
    job = _job(pipeline, clip, progress)
    first = _batches(pipeline, job)[0]
    generator = FaceGenerator(pipeline.replicas, job.settings, job.timer)
    faces = pipeline.generate(job, generator, first)
    assert faces.shape == (16, pipeline.resolution, pipeline.resolution, 3)
    keep = pipeline.mask.numpy() == 1
    assert np.array_equal(faces[:, keep], pixels_to_faces(first.faces).numpy()[:, keep])
    assert not np.array_equal(faces[:, ~keep], pixels_to_faces(first.faces).numpy()[:, ~keep])
    generating = [fraction for fraction, stage in progress if stage == "generate"]
    assert len(generating) == STEPS and generating == sorted(generating)
    with pytest.raises(JobCancelled):
        pipeline.generate(job, generator, first, should_cancel=lambda: True)


def test_finish_pastes_and_encodes_in_order_and_passes_faceless_frames_through(
    pipeline: LipSyncPipeline, clip: tuple[Path, Path], tmp_path: Path
) -> None:
    job = _job(pipeline, clip)
    last = _batches(pipeline, job)[-1]
    generated = -np.ones((len(last.sources), pipeline.resolution, pipeline.resolution, 3), np.float32)  # black faces
    with ThreadPoolExecutor(2) as finishers, VideoWriter(tmp_path / "last.mp4", job.info.width, job.info.height) as writer:
        pipeline.finish(job, last, generated, writer, finishers, torch.device("cpu"))
    frames = decode(tmp_path / "last.mp4")
    assert len(frames) == len(last.sources)
    for index, (frame, original) in enumerate(zip(frames, last.originals)):
        darker = original.astype(int).mean() - frame.astype(int).mean()
        if last.sources[index] == FACELESS:
            assert abs(darker) < 2  # passed through, only the encoder's loss
        else:
            assert darker > 2  # a black face pasted in


def test_the_stages_one_after_another_make_what_run_makes(
    pipeline: LipSyncPipeline, clip: tuple[Path, Path], tmp_path: Path
) -> None:
    result = pipeline.run(*clip, tmp_path / "run.mp4", inference_steps=STEPS)
    job = _job(pipeline, clip)
    generator = FaceGenerator(pipeline.replicas, job.settings, job.timer)
    with (
        ThreadPoolExecutor(1) as finishers,
        VideoWriter(tmp_path / "stages.mp4", job.info.width, job.info.height, audio=job.waveform) as writer,
    ):
        for batch in _batches(pipeline, job):
            pipeline.finish(job, batch, pipeline.generate(job, generator, batch), writer, finishers, torch.device("cpu"))
    assert result.frames == job.frames and result.faceless_frames == 1
    assert np.array_equal(np.stack(decode(tmp_path / "stages.mp4")), np.stack(decode(tmp_path / "run.mp4")))


def test_jobs_are_placed_on_the_least_busy_replicas_and_long_ones_on_all() -> None:
    replicas = ["a", "b", "c"]
    placement = Placement(replicas, split_min_seconds=60)  # type: ignore[arg-type]
    assert [placement.parts(10, None), placement.parts(60, None), placement.parts(10, 2), placement.parts(10, 9)] == [1, 3, 2, 3]
    with placement.placed(1) as first, placement.placed(1) as second, placement.placed(2) as pair:
        assert (first, second, pair) == (["a"], ["b"], ["c", "a"])
    with placement.placed(3) as every:
        assert every == replicas  # all free again
