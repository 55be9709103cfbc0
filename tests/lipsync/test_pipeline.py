"""LipSyncPipeline end to end on CPU with the tiny weights (Python API).

Clips are cut from the demo clip (a real face): its first frames, downscaled to 540×960 and
re-encoded, with slices of the demo speech. One pipeline (models loaded once) serves every test; jobs
run at 2 DDIM steps, so the mouth the random tiny weights generate is noise — which makes it easy to
tell generated pixels from passed-through ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from support.clips import (
    FPS,
    SAMPLE_RATE,
    SIZE,
    decode,
    demo_frames,
    flat,
    speech,
    write_video,
    write_wav,
)

from lipsync.audio import load_audio
from lipsync.faces import FaceAligner
from lipsync.media import VideoWriter
from lipsync.pipeline import JobCancelled, LipSyncPipeline, LipSyncResult, NoFaceError
from lipsync.timeline import source_frames
from lipsync.weights import WeightPaths

STEPS = 2
STAGES = {"audio", "decode", "detect_align", "vae_encode", "denoise", "vae_decode", "paste", "encode"}
MARGIN = 24
"""Pixels added around the pasted face's footprint before calling the rest "outside the face"."""

pytestmark = [
    pytest.mark.slow,
]


# --- building inputs -----------------------------------------------------------------------------


MARKER = (slice(0, 48), slice(0, 48))
"""Top-left block (trees in the demo clip, far from the face) where loop-test frames carry their index."""


def stamp(frame: np.ndarray, index: int) -> np.ndarray:
    frame = frame.copy()
    frame[MARKER] = 30 + 30 * index
    return frame


def read_stamp(frame: np.ndarray) -> int:
    return round((float(frame[MARKER].mean()) - 30) / 30)


# --- running jobs --------------------------------------------------------------------------------


@dataclass
class Job:
    video: Path
    audio: Path
    output: Path
    result: LipSyncResult
    progress: list[tuple[float, str]] = field(default_factory=list)


def run_job(pipeline: LipSyncPipeline, video: Path, audio: Path, output: Path, **options) -> Job:
    progress: list[tuple[float, str]] = []
    result = pipeline.run(video, audio, output, inference_steps=STEPS, progress=lambda f, s: progress.append((f, s)), **options)
    return Job(video, audio, output, result, progress)


@pytest.fixture(scope="module")
def pipeline(tiny_weights: WeightPaths) -> LipSyncPipeline:
    return LipSyncPipeline.from_weights(tiny_weights)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline-media")


@pytest.fixture(scope="module")
def base_job(pipeline: LipSyncPipeline, media: Path) -> Job:
    """40 frames (1.6 s) of the demo face with 1.44 s of speech: the video is cut to 36 frames."""
    video = write_video(media / "base.mp4", demo_frames(40))
    audio = write_wav(media / "base.wav", speech(1.44))
    (media / "base-out").mkdir()
    return run_job(pipeline, video, audio, media / "base-out" / "out.mp4")


FACELESS = (5, 6, 7)
"""Frames of the face-less clip replaced by flat grey pictures."""


@pytest.fixture(scope="module")
def faceless_clip(media: Path) -> tuple[Path, Path]:
    """20 frames of the demo face, frames 5–7 flat grey (no face), and 0.8 s (20 frames) of speech."""
    frames = demo_frames(20)
    for index in FACELESS:
        frames[index] = flat(100 + 20 * index)
    return write_video(media / "faceless.mp4", frames), write_wav(media / "faceless.wav", speech(0.8))


@pytest.fixture(scope="module")
def faceless_job(pipeline: LipSyncPipeline, faceless_clip: tuple[Path, Path], media: Path) -> Job:
    return run_job(pipeline, *faceless_clip, media / "faceless-out.mp4", seed=7)


def face_regions(
    pipeline: LipSyncPipeline, frames: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per frame: (outside, mouth) boolean masks, or None where the detector finds no face.

    *outside*: pixels more than ``MARGIN`` px from the quadrilateral the face crop was cut from (the
    paste cannot reach past it). *mouth*: the model's generated region (mask 0) warped back into the
    frame and eroded by 4 px. Affines are computed as the pipeline computes them (same detector,
    frames in order, the aligner's EMA).
    """
    aligner = FaceAligner(pipeline.resolution, pipeline.face_settings.alignment)
    crop_w, crop_h = aligner.crop_size
    generate = cv2.resize(1 - pipeline.mask.numpy().astype(np.float32), (crop_w, crop_h), interpolation=cv2.INTER_NEAREST)
    regions = []
    with pipeline.detectors.borrow() as detector:
        faces = [detector.detect(frame) for frame in frames]
    for frame, face in zip(frames, faces):
        if face is None:
            regions.append(None)
            continue
        affine = aligner.transform(face.points)
        height, width = frame.shape[:2]
        to_frame = cv2.invertAffineTransform(affine)
        corners = np.array([[0, 0], [crop_w, 0], [crop_w, crop_h], [0, crop_h]], np.float64)
        quad = corners @ to_frame[:, :2].T + to_frame[:, 2]
        footprint = np.zeros((height, width), np.uint8)
        cv2.fillConvexPoly(footprint, np.round(quad).astype(np.int32), 1)
        footprint = cv2.dilate(footprint, np.ones((2 * MARGIN + 1, 2 * MARGIN + 1), np.uint8))
        mouth = cv2.warpAffine(generate, affine, (width, height), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
        mouth = cv2.erode((mouth > 0.5).astype(np.uint8), np.ones((9, 9), np.uint8))
        regions.append((footprint == 0, mouth == 1))
    return regions


def mean_signed(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float((a.astype(np.int16) - b.astype(np.int16))[where].mean())


def mean_abs(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(diff.mean() if where is None else diff[where].mean())


# --- 1. output properties ------------------------------------------------------------------------


def test_output_has_input_resolution_25_fps_audio_length_and_stage_times(base_job: Job) -> None:
    result = base_job.result
    audio_seconds = load_audio(base_job.audio).size / SAMPLE_RATE
    assert result.output == base_job.output and base_job.output.is_file()
    assert abs(result.frames - audio_seconds * FPS) <= 1
    assert result.faceless_frames == 0
    with av.open(str(base_job.output)) as container:
        video = container.streams.video[0]
        assert (video.codec_context.name, video.width, video.height) == ("h264", *SIZE)
        assert video.average_rate == FPS
        assert len(container.streams.audio) == 1
        audio = container.streams.audio[0]
        audio_duration = float(audio.duration * audio.time_base)
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == result.frames
    assert abs(frames / FPS - audio_seconds) <= 1 / FPS
    assert abs(audio_duration - audio_seconds) <= 1 / FPS
    assert STAGES <= set(result.seconds), f"missing stages: {STAGES - set(result.seconds)}"
    assert all(seconds >= 0 for seconds in result.seconds.values())
    assert result.as_dict()["output"] == str(base_job.output)


# --- 2. pixels outside the face are the input's --------------------------------------------------


def test_pixels_outside_the_pasted_face_are_the_input_pixels(
    pipeline: LipSyncPipeline, base_job: Job, tmp_path: Path
) -> None:
    inputs = decode(base_job.video)[: base_job.result.frames]
    outputs = decode(base_job.output)
    assert len(outputs) == len(inputs)
    # What one more encode at the writer's settings costs by itself, for the same frames.
    with VideoWriter(tmp_path / "passthrough.mp4", *SIZE) as writer:
        for frame in inputs:
            writer.write(frame)
    passthrough = decode(tmp_path / "passthrough.mp4")
    regions = face_regions(pipeline, inputs)
    assert all(region is not None for region in regions)
    for index, (inp, out, ref, (outside, mouth)) in enumerate(zip(inputs, outputs, passthrough, regions)):
        assert outside.mean() > 0.8  # most of the frame is tested
        # A re-encode costs ~1.7 grey levels of mean absolute error here, ~1.1 of it a darkening bias
        # (swscale's yuv420p → RGB); the output must differ from its input exactly that much, no more.
        error, reference = mean_abs(out, inp, outside), mean_abs(ref, inp, outside)
        bias, reference_bias = mean_signed(out, inp, outside), mean_signed(ref, inp, outside)
        assert error < 2.5, f"frame {index}: outside the face differs by {error:.2f} grey levels"
        assert abs(error - reference) < 0.2, f"frame {index}: outside the face {error:.2f}, plain re-encode {reference:.2f}"
        assert abs(bias - reference_bias) < 0.3, f"frame {index}: outside bias {bias:+.2f}, plain re-encode {reference_bias:+.2f}"
        assert mouth.sum() > 500
        mouth_change = mean_abs(out, inp, mouth)
        assert mouth_change > 15, f"frame {index}: the mouth region barely changed ({mouth_change:.1f})"


# --- 3. audio longer than the video --------------------------------------------------------------


@pytest.fixture(scope="module")
def short_clip(media: Path) -> tuple[Path, Path]:
    """6 stamped frames (0.24 s) and 0.64 s of speech: 16 output frames, the video looped."""
    frames = [stamp(frame, index) for index, frame in enumerate(demo_frames(6))]
    return write_video(media / "six.mp4", frames), write_wav(media / "six.wav", speech(0.64))


@pytest.mark.parametrize("loop_mode", ["pingpong", "loop"])
def test_audio_longer_than_video_loops_it(
    pipeline: LipSyncPipeline, short_clip: tuple[Path, Path], tmp_path: Path, loop_mode: str
) -> None:
    video, audio = short_clip
    assert [read_stamp(frame) for frame in decode(video)] == list(range(6))
    result = pipeline.run(video, audio, tmp_path / "out.mp4", inference_steps=STEPS, loop_mode=loop_mode)
    assert result.frames == 16 and result.faceless_frames == 0
    shown = [read_stamp(frame) for frame in decode(tmp_path / "out.mp4")]
    expected = {
        "pingpong": [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0, 0, 1, 2, 3],
        "loop": [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
    }[loop_mode]
    assert shown == expected == source_frames(16, 6, loop_mode)


def test_unknown_loop_mode_is_a_clear_value_error(
    pipeline: LipSyncPipeline, short_clip: tuple[Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"loop_mode must be one of \['pingpong', 'loop', 'cut'\], got 'bounce'"):
        pipeline.run(*short_clip, tmp_path / "out.mp4", inference_steps=STEPS, loop_mode="bounce")
    assert list(tmp_path.iterdir()) == []


# --- 4. frames without a face --------------------------------------------------------------------


def test_faceless_frames_pass_through_and_are_counted(pipeline: LipSyncPipeline, faceless_job: Job) -> None:
    result = faceless_job.result
    assert result.frames == 20
    assert result.faceless_frames == len(FACELESS)
    inputs, outputs = decode(faceless_job.video), decode(faceless_job.output)
    regions = face_regions(pipeline, inputs)
    assert [index for index, region in enumerate(regions) if region is None] == list(FACELESS)
    for index, (inp, out, region) in enumerate(zip(inputs, outputs, regions)):
        if region is None:  # no paste: the whole frame is the input's
            assert mean_abs(out, inp) < 1.5, f"face-less frame {index} was changed"
        else:
            assert mean_abs(out, inp, region[1]) > 15, f"frame {index} with a face got no generated mouth"


def test_faceless_frames_are_counted_in_output_order(
    pipeline: LipSyncPipeline, media: Path, tmp_path: Path
) -> None:
    """Looped output shows a face-less source frame several times; each showing counts."""
    frames = demo_frames(6)
    frames[2] = flat(128)
    video = write_video(media / "six-faceless.mp4", frames)
    audio = write_wav(media / "six-faceless.wav", speech(0.64))
    result = pipeline.run(video, audio, tmp_path / "out.mp4", inference_steps=1)
    assert result.frames == 16
    assert result.faceless_frames == source_frames(16, 6).count(2) == 3


def test_clip_without_any_face_is_a_clear_error(pipeline: LipSyncPipeline, media: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pictures = [flat(128), flat(30)] + [rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8) for _ in range(4)]
    video = write_video(media / "no-face.mp4", pictures)
    audio = write_wav(media / "no-face.wav", speech(0.24))
    with pytest.raises(NoFaceError, match=r"no face was found in any of the 6 frames of no-face\.mp4"):
        pipeline.run(video, audio, tmp_path / "out.mp4", inference_steps=STEPS)
    assert list(tmp_path.iterdir()) == []


# --- 5. cancellation and progress ----------------------------------------------------------------


def test_cancelling_after_the_first_window_leaves_no_output(
    pipeline: LipSyncPipeline, faceless_clip: tuple[Path, Path], tmp_path: Path
) -> None:
    """The 20-frame clip is two windows (16 + 4), denoised in separate UNet calls.

    ``should_cancel`` turns True once the first window's denoising is done (counted by a forward hook
    on the UNet: one call per DDIM step); the second window must then never reach the UNet.
    """
    unet_calls: list[int] = []
    progress: list[tuple[float, str]] = []
    hook = pipeline.denoiser.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    try:
        with pytest.raises(JobCancelled, match="cancelled"):
            pipeline.run(
                *faceless_clip, tmp_path / "out.mp4", inference_steps=STEPS,
                progress=lambda f, s: progress.append((f, s)), should_cancel=lambda: len(unet_calls) >= STEPS,
            )
    finally:
        hook.remove()
    assert len(unet_calls) == STEPS  # window 1 only
    assert max(fraction for fraction, _ in progress) < 1.0
    assert list(tmp_path.iterdir()) == []  # neither the output nor its .part temp file


def test_cancelling_during_analysis_stops_before_generating(
    pipeline: LipSyncPipeline, faceless_clip: tuple[Path, Path], tmp_path: Path
) -> None:
    progress: list[tuple[float, str]] = []
    with pytest.raises(JobCancelled):
        pipeline.run(
            *faceless_clip, tmp_path / "out.mp4", inference_steps=STEPS,
            progress=lambda f, s: progress.append((f, s)), should_cancel=lambda: True,
        )
    assert {stage for _, stage in progress} <= {"audio", "analyse"}
    assert list(tmp_path.iterdir()) == []


def test_progress_rises_to_one_through_the_stages_and_moves_every_ddim_step(base_job: Job) -> None:
    fractions = [fraction for fraction, _ in base_job.progress]
    stages = [stage for _, stage in base_job.progress]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert all(later >= earlier for earlier, later in zip(fractions, fractions[1:])), fractions
    assert len(set(fractions)) >= 4  # it moves in steps, not only at the start and the end
    # Stages appear in pipeline order, each in one contiguous run.
    runs = [stage for index, stage in enumerate(stages) if index == 0 or stages[index - 1] != stage]
    assert runs == ["audio", "analyse", "generate", "encode"]
    # 36 frames: windows of 16, 16 and 4 frames, denoised in two DDIM loops (equal lengths share one).
    assert stages.count("generate") >= STEPS * 2


# --- 6. determinism ------------------------------------------------------------------------------


def test_same_seed_same_frames_other_seed_other_frames(
    pipeline: LipSyncPipeline, faceless_job: Job, tmp_path: Path
) -> None:
    first = decode(faceless_job.output)
    again = run_job(pipeline, faceless_job.video, faceless_job.audio, tmp_path / "again.mp4", seed=7)
    other = run_job(pipeline, faceless_job.video, faceless_job.audio, tmp_path / "other.mp4", seed=8)
    same, different = decode(again.output), decode(other.output)
    assert len(first) == len(same) == len(different) == 20
    for index, (a, b) in enumerate(zip(first, same)):
        np.testing.assert_array_equal(a, b, err_msg=f"frame {index} differs between runs with one seed")
    changed = [index for index, (a, b) in enumerate(zip(first, different)) if not np.array_equal(a, b)]
    # Every frame with a face gets a different mouth; the face-less ones are passed through.
    assert set(changed) >= set(range(20)) - set(FACELESS)


def test_window_counts_are_given_at_the_window_resolution_and_scale_with_face_area(tiny_weights: WeightPaths) -> None:
    """A setting sized for the GPU memory of 256 px faces holds for larger ones: the tiny model's 128 px faces
    against a window resolution of 64 count four times, as 1.6's 512 px faces do against 256."""
    from lipsync.batching import BatchingSettings
    from lipsync.pipeline import PipelineSettings

    scaled = PipelineSettings.load(window_resolution=64)
    pipeline = LipSyncPipeline.from_weights(
        tiny_weights, windows_per_call=8, batching=BatchingSettings(max_windows=8, max_delay_ms=0), settings=scaled
    )
    try:
        assert pipeline.windows_per_call == 2
        assert pipeline.denoiser.max_windows == 2  # type: ignore[attr-defined]
        assert pipeline.local_replicas[0].vae_frames == 4  # 16 frames' worth of 64 px faces
    finally:
        pipeline.close()
    frame_work = LipSyncPipeline.with_generators(tiny_weights, pipeline.replicas, windows_per_call=8, settings=scaled)
    assert frame_work.windows_per_call == 2
    frame_work.detectors.close()
    unscaled = LipSyncPipeline.from_weights(tiny_weights, windows_per_call=8)  # faces no larger than 256 px
    assert unscaled.windows_per_call == 8 and unscaled.local_replicas[0].vae_frames == 16
    unscaled.close()
