"""A real Triton server with the jobs split across models: two ``lipsync`` CPU instances (separate
processes doing the frame work) and one ``lipsync_generate`` instance generating every job's windows
over BLS — the layout of a GPU server (``job_processes``), here on the CPU with tiny weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from support.clips import speech, write_wav
from test_triton import SECONDS, _check_video, _stream, metric

from gateway.backends.triton_client import served_info
from gateway.launcher.ports import free_port
from gateway.launcher.triton_server import TritonServer, TritonSettings
from lipsync.media import VideoReader

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def split_triton(tmp_path_factory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("triton-split")
    settings = TritonSettings.load(
        device="cpu", job_processes=2, weights="tiny", checkpoints=str(root / "checkpoints"), workdir=root / "serve",
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), startup_timeout_s=300, exit_timeout_s=5,
    )
    with TritonServer(settings) as server:
        yield server


def _frames(data: bytes, path: Path) -> np.ndarray:
    path.write_bytes(data)
    with VideoReader(path) as reader:
        return np.stack(list(reader))


def test_split_job_streams_step_progress_and_equals_the_unsplit_job(split_triton, triton, clip, tmp_path) -> None:
    progress, result = _stream(split_triton, *clip)
    assert not isinstance(result, (Exception, dict)), result
    fractions = [fraction for fraction, _, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum(stage == "generate" for _, stage, _ in progress) >= 3  # a report per DDIM step, from the other model
    info = json.loads(result.as_numpy("INFO")[0])
    assert info["frames"] == round(SECONDS * 25)
    assert {"decode", "detect_align", "vae_encode", "denoise", "vae_decode", "encode"} <= set(info["seconds"])
    _check_video(result.as_numpy("VIDEO_OUT")[0], tmp_path, info["frames"])
    _, unsplit = _stream(triton, *clip)
    split_frames = _frames(result.as_numpy("VIDEO_OUT")[0], tmp_path / "split.mp4")
    unsplit_frames = _frames(unsplit.as_numpy("VIDEO_OUT")[0], tmp_path / "unsplit.mp4")
    assert split_frames.shape == unsplit_frames.shape
    # The same windows in the same UNet calls (one job at a time: a 3-window group and the short tail), so the
    # same frames, bit for bit.
    assert np.array_equal(split_frames, unsplit_frames), np.abs(split_frames.astype(np.int16) - unsplit_frames).max()


def test_the_generation_model_batches_and_reports(split_triton, clip) -> None:
    assert served_info(split_triton.settings.grpc_url) == {"weights": "tiny-demo", "version": "tiny", "compiled": True}
    with ThreadPoolExecutor(4) as pool:
        endings = list(pool.map(lambda _: _stream(split_triton, *clip, steps=1)[1], range(4)))
    assert all(hasattr(ending, "as_numpy") for ending in endings), endings
    assert metric(split_triton, "nv_inference_request_success", model="lipsync_generate") >= 4
    assert metric(split_triton, "lipsync_unet_batch_windows_count", model="lipsync_generate") >= 1
    assert metric(split_triton, "lipsync_jobs_total", outcome="succeeded") >= 4


def test_every_job_process_learns_from_the_jobs_the_others_finished(split_triton, clip) -> None:
    """The job processes share one stage rates file: once a job finished, every later job has an ETA before its
    own generation has moved, whichever process runs it (Triton spreads consecutive jobs over them)."""
    _, first = _stream(split_triton, *clip, steps=1)
    assert hasattr(first, "as_numpy"), first
    for _ in range(3):
        progress, ending = _stream(split_triton, *clip, steps=1)
        assert hasattr(ending, "as_numpy"), ending
        before_generation = progress[: next(index for index, (_, stage, _) in enumerate(progress) if stage == "generate")]
        assert any(eta >= 0 for _, _, eta in before_generation), progress
    rates = json.loads(split_triton.settings.stage_rates_file().read_text())
    assert len(rates["generate"]) >= 4


def test_bad_input_and_cancel_end_cleanly(split_triton, clip) -> None:
    video, _ = clip
    _, error = _stream(split_triton, b"not a video" * 10, clip[1])
    assert isinstance(error, dict) and "INVALID_ARG" in error["code"]
    long_audio = write_wav(Path(split_triton.settings.workdir) / "long.wav", speech(8.0)).read_bytes()
    # Cancelled within its first group: the generation model finishes the groups in flight
    # (every one of their steps) before the next job's, so few steps keep that wait short.
    progress, _ = _stream(
        split_triton, video, long_audio, steps=6, cancel_when=lambda seen: seen[-1][1] == "generate" and seen[-1][0] > 0.25
    )
    assert progress[-1][0] < 1.0
    _, result = _stream(split_triton, *clip, steps=1)  # the server goes on serving
    assert hasattr(result, "as_numpy"), result
