"""A real Triton server (bundled tritonserver, CPU, tiny weights) running our model repository.

Clients are the stock ``tritonclient`` ones, used exactly as docs/triton-api.md shows.
"""

from __future__ import annotations

import json
import queue
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from support.clips import (
    CLIP_SECONDS,
    demo_frames,
    flat,
    speech,
    write_video,
    write_wav,
)
from support.tensors import triton_inputs
from tritonclient.utils import InferenceServerException

from gateway.backends.triton_client import served_info, served_weights
from lipsync.media import VideoReader
from lipsync.testing import sample_sum

pytestmark = [
    pytest.mark.slow,
]

STEPS = 3
SECONDS = CLIP_SECONDS
JOBS_AT_ONCE = 8
"""The model's ``max_concurrent_jobs``: all of them run at once."""


def _inputs(module, video: bytes, audio: bytes, steps: int = STEPS, **extra) -> list:
    return triton_inputs(module, {"VIDEO": video, "AUDIO": audio, "STEPS": np.int32(steps)} | extra)


def _stream(triton, video: bytes, audio: bytes, cancel_when=None, **options) -> tuple[list[tuple[float, str, float]], object]:
    """Run one job over gRPC streaming; returns the progress seen (fraction, stage, ETA) and the final
    result, or the error (a failed job's INFO ``{"error", "code"}``, or a transport error).

    ``cancel_when(progress)`` may return True to cancel the request (the stream is stopped with
    ``cancel_requests=True``); the error then returned is whatever the stream delivered, or None.
    """
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.settings.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    progress: list[tuple[float, str, float]] = []
    try:
        client.async_stream_infer("lipsync", _inputs(grpcclient, video, audio, **options), request_id="job")
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                return progress, error
            stage = result.as_numpy("STAGE")[0].decode()
            if stage == "failed":
                return progress, json.loads(result.as_numpy("INFO")[0])
            progress.append((float(result.as_numpy("PROGRESS")[0]), stage, float(result.as_numpy("ETA")[0])))
            if result.as_numpy("VIDEO_OUT") is not None:
                return progress, result
            if cancel_when is not None and cancel_when(progress):
                client.stop_stream(cancel_requests=True)
                try:
                    return progress, responses.get(timeout=5)[1]
                except queue.Empty:
                    return progress, None
    finally:
        client.stop_stream()
        client.close()


def _check_video(data: bytes, tmp_path: Path, frames: int) -> None:
    path = tmp_path / "out.mp4"
    path.write_bytes(data)
    with VideoReader(path) as reader:
        decoded = list(reader)
        assert reader.info.has_audio
    assert len(decoded) == frames
    assert decoded[0].shape == (960, 540, 3)


def metric(triton, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` on Triton's /metrics whose labels include ``labels``."""
    return sample_sum(httpx2.get(triton.settings.metrics_url, timeout=10).text, name, **labels)


def test_grpc_stream_reports_rising_progress_then_the_video(triton, clip, tmp_path) -> None:
    progress, result = _stream(triton, *clip)
    assert not isinstance(result, Exception), result
    fractions = [fraction for fraction, _, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(set(fractions)) >= 4
    assert fractions.count(1.0) == 1  # only the response that carries the video
    assert [stage for _, stage, _ in progress][-1] == "done"
    assert {"audio", "analyse", "generate", "encode"} <= {stage for _, stage, _ in progress}
    info = json.loads(result.as_numpy("INFO")[0])
    assert info["frames"] == round(SECONDS * 25) and info["faceless_frames"] == 0 and info["version"] == "tiny"
    assert info["weights"] == "tiny-demo"
    assert {"decode", "detect_align", "denoise", "encode"} <= set(info["seconds"])
    _check_video(result.as_numpy("VIDEO_OUT")[0], tmp_path, info["frames"])


def test_progress_moves_after_every_ddim_step_with_stage_and_eta(triton, clip) -> None:
    video, _ = clip
    audio = write_wav(Path(triton.settings.workdir) / "progress.wav", speech(3.2)).read_bytes()
    # 80 frames = 5 windows; at 4 windows per call: calls of 4 and 1 window(s).
    steps, calls = 3, 2
    progress, result = _stream(triton, video, audio, steps=steps)
    assert not isinstance(result, (Exception, dict)), result
    generating = [report for report in progress if report[1] == "generate"]
    assert len(generating) >= steps * calls
    fractions = [fraction for fraction, _, _ in progress]
    assert fractions == sorted(fractions) and max(fractions[:-1]) < 1.0 and fractions[-1] == 1.0
    assert all(stage for _, stage, _ in progress)
    assert all(eta >= 0 for _, _, eta in generating)  # known once generation has moved
    assert progress[-1][2] == 0.0


def test_a_request_without_media_names_the_served_weights(triton) -> None:
    assert served_weights(triton.settings.grpc_url) == "tiny-demo"
    assert served_info(triton.settings.grpc_url) == {"weights": "tiny-demo", "version": "tiny", "compiled": True}


def test_http_unary_job_in_fast_mode_returns_the_video(triton, clip, tmp_path) -> None:
    client = httpclient.InferenceServerClient(triton.settings.http_address, network_timeout=600, connection_timeout=600)
    options = {"SEED": np.int64(7), "LOOP_MODE": "pingpong", "MODE": "fast", "DEVICES": np.int32(2)}
    result = client.infer("lipsync_unary", _inputs(httpclient, *clip, **options))
    info = json.loads(result.as_numpy("INFO")[0])
    assert info["devices"] == 1  # at most the instance's devices: a CPU instance has one
    _check_video(result.as_numpy("VIDEO_OUT")[0], tmp_path, info["frames"])


def test_cancelling_a_running_job_stops_it_within_one_window(triton, clip) -> None:
    video, _ = clip
    long_audio = write_wav(Path(triton.settings.workdir) / "long.wav", speech(8.0)).read_bytes()  # 13 windows
    cancelled_before = metric(triton, "lipsync_jobs_total", outcome="cancelled")
    calls_before = metric(triton, "lipsync_unet_batch_windows_count")
    progress, error = _stream(
        triton, video, long_audio, steps=20, cancel_when=lambda seen: seen[-1][1] == "generate" and seen[-1][0] > 0.25
    )
    assert progress[-1][0] < 1.0
    assert error is None or "CANCELLED" in (str(error["code"]) if isinstance(error, dict) else str(error.status()))
    deadline = time.monotonic() + 60
    while metric(triton, "lipsync_jobs_total", outcome="cancelled") <= cancelled_before:
        assert time.monotonic() < deadline, "the server never reported the job as cancelled"
        time.sleep(0.2)
    calls = metric(triton, "lipsync_unet_batch_windows_count")
    time.sleep(2)
    assert metric(triton, "lipsync_unet_batch_windows_count") == calls  # no UNet call after the cancel
    assert metric(triton, "lipsync_active_jobs") == 0
    assert calls - calls_before < 13 / 4  # it stopped before doing all its windows


@pytest.mark.parametrize(
    ("video", "audio", "extra", "message"),
    [
        ("garbage", "speech", {}, "not a video|media|decode|invalid"),
        ("faceless", "speech", {}, "no face"),
        ("clip", "garbage", {}, "audio"),
        ("clip", "speech", {"VERSION": "9.9"}, "9.9"),
        ("clip", "speech", {"LOOP_MODE": "sideways"}, "sideways"),
        ("clip", "speech", {"MODE": "turbo"}, "mode must be one of"),
        ("clip", "speech", {"GUIDANCE": np.float32(-2.0)}, "guidance"),
        ("clip", "speech", {"GUIDANCE": np.float32("nan")}, "guidance_scale must be a finite number"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_next_job_succeeds(triton, clip, tmp_path, video, audio, extra, message) -> None:
    good_video, good_audio = clip
    faceless = write_video(tmp_path / "faceless.mp4", [flat(90)] * 10).read_bytes()
    videos = {"garbage": b"this is not a video" * 10, "faceless": faceless, "clip": good_video}
    audios = {"garbage": b"\x00\x01junk" * 10, "speech": good_audio}
    client = httpclient.InferenceServerClient(triton.settings.http_address, network_timeout=600, connection_timeout=600)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("lipsync_unary", _inputs(httpclient, videos[video], audios[audio], **extra))
    assert re.search(message, str(raised.value), re.IGNORECASE), str(raised.value)
    assert "lipsync-job" not in str(raised.value)  # no server paths in messages
    assert "400" in str(raised.value)  # INVALID_ARG → HTTP 400
    result = client.infer("lipsync_unary", _inputs(httpclient, good_video, good_audio, steps=1))
    assert json.loads(result.as_numpy("INFO")[0])["frames"] == round(SECONDS * 25)


def test_jobs_starting_and_ending_together_leave_the_server_up(triton, tmp_path) -> None:
    """Eight short jobs at once, twice: their threads update the instance's metrics at the same moments.
    The Python backend's server reads a metric's message while the stub rewrites it, so one metric
    updated from two threads at once kills the server (SIGSEGV); the model serializes its updates."""
    video = write_video(tmp_path / "short.mp4", demo_frames(10, (270, 480))).read_bytes()
    audio = write_wav(tmp_path / "short.wav", speech(0.4)).read_bytes()
    before = metric(triton, "lipsync_jobs_total", outcome="succeeded")
    with ThreadPoolExecutor(JOBS_AT_ONCE) as pool:
        for _ in range(2):
            endings = list(pool.map(lambda _: _stream(triton, video, audio, steps=1)[1], range(JOBS_AT_ONCE)))
            assert all(hasattr(ending, "as_numpy") for ending in endings), endings
    assert triton.process.poll() is None
    assert metric(triton, "lipsync_jobs_total", outcome="succeeded") == before + 2 * JOBS_AT_ONCE


def test_metrics_show_our_families_beside_tritons(triton, clip) -> None:
    _stream(triton, *clip)
    assert metric(triton, "nv_inference_request_success", model="lipsync") >= 1
    assert metric(triton, "lipsync_jobs_total", outcome="succeeded") >= 1
    assert metric(triton, "lipsync_frames_generated_total") >= round(SECONDS * 25)
    assert metric(triton, "lipsync_unet_batch_windows_count") >= 1
    assert metric(triton, "lipsync_unet_batch_windows_sum") >= metric(triton, "lipsync_unet_batch_windows_count")
    for stage in ("decode", "detect_align", "denoise", "encode"):
        assert metric(triton, "lipsync_stage_seconds_count", stage=stage) >= 1
